"""Publishing a trained model: a Hugging Face Space folder that runs alone, and a model repo folder with its card.

    python -m imagelab.deploy pets --model models/pets.pkl                    # -> build/pets-space/
    python -m imagelab.deploy pets --space USER/SPACE --model-repo USER/REPO  # + build/pets-model/, ids filled in
    python -m imagelab.deploy pets --space USER/SPACE --model-repo USER/REPO --push   # ... and upload both
    python -m imagelab.deploy pets --static --out build/pets-static --push USER/SPACE  # free: runs in the browser

Nothing is uploaded without --push. An app is an entry of imagelab.app_options.APPS and a folder
apps/<app>/ with a README.md: the Space's README as a template (title and emoji in its front matter; the first
paragraph after the title says what it does).
The model's kind (metrics.json "kind") picks the rest: imagelab/cards/<kind>.py (which model files the
Space runs and the model repo carries) and imagelab/cards/<kind>.md (the model card).

A Gradio Space runs on Hugging Face's paid CPU hardware (or ZeroGPU); a static Space (--static) is free for
everyone: a page in imagelab/web/ runs the model's ONNX graph (a classifier's, or an autoencoder's) in the
visitor's browser with onnxruntime-web, which is fetched once from the npm registry (imagelab.onnxruntime_web)
and then cached.
"""
import argparse
import html
import importlib
import json
import re
import shlex
import shutil
import sys
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from string import Template
from urllib.parse import quote

from . import UserError, run_cli
from .app_options import APPS
from .cards import PACKAGES, trained
from .hub import require_hub_login
from .onnxruntime_web import VERSION as RUNTIME_VERSION
from .onnxruntime_web import tarball, write_runtime
from .paths import (REPO, artifact_paths, default_model, examples_dir, metrics_path, remove_abandoned_staging,
                    report_dir, staging_path)

CARDS = Path(__file__).with_name("cards")
WEB = Path(__file__).with_name("web")
LICENSE = "apache-2.0"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
PLACEHOLDERS = {"repo_id": "USER/REPO", "space_id": "USER/SPACE"}


def apps():
    """The apps that publish: each serves a model (`app_options.APPS`) and has a Space README
    (`apps/<app>/README.md`)."""
    return sorted(app for app in APPS if (REPO / "apps" / app / "README.md").is_file())


def load_metrics(model, app):
    """The run's metrics.json and the module of its kind (imagelab/cards/), for a model of the kind `app` serves."""
    path = metrics_path(model)
    if not path.is_file():
        raise UserError(f"no report at {path}: train the model with training/ first")
    metrics = json.loads(path.read_text())
    kind = card_kind(metrics)
    if metrics["kind"] != APPS[app].kind:
        raise UserError(f"the {app} app serves {APPS[app].kind} models, and {model} is of kind "
                        f"{metrics['kind']!r}: publish it with its own app")
    return metrics, kind


def card_kind(metrics):
    """The module that says what a model of this kind publishes."""
    kind = metrics.get("kind")
    if not isinstance(kind, str) or not (CARDS / f"{kind}.py").is_file():
        raise UserError(f"metrics.json names no known model kind ({kind!r}): retrain with this version of training/")
    return importlib.import_module(f"{__package__}.cards.{kind}")


def app_readme(app):
    """(template, title, about) of an app's Space README."""
    text = (REPO / "apps" / app / "README.md").read_text()
    title = front_matter_value(text, "title")
    about = text.split(f"\n# {title}\n", 1)[1].strip().split("\n\n")[0]
    return text, title, about


def front_matter_value(text, key):
    return re.search(rf"^{key}: *(.+)$", text, re.M).group(1).strip()


def pip_pins(packages):
    """`name==version` for each package, pinned as this project's requirements pin it."""
    pins = {}
    for req in [REPO / "requirements.txt", *sorted((REPO / "apps").glob("*/requirements.txt"))]:
        for line in req.read_text().splitlines():
            name, sep, version = line.partition("==")
            if sep and not line.startswith("#"):
                pins.setdefault(name.strip().lower(), version.strip())
    return " ".join(f"{p}=={pins[p]}" if p in pins else p for p in packages)


def context(app, metrics, repo_id=None, space_id=None):
    """Every `$field` a README or card template may use: the run's metrics, the app's text, the Hub ids."""
    kind = card_kind(metrics)
    _, title, about = app_readme(app)
    return {
        "name": app, "title": title, "about": about, "license": LICENSE, "sdk_version": version("gradio"),
        "repo_id": repo_id or PLACEHOLDERS["repo_id"], "space_id": space_id or PLACEHOLDERS["space_id"],
        "data": Path(metrics["data"]).name,  # the folder's name: the trainer's disk layout is nobody's business
        "seed": metrics["seed"], "trained": trained(metrics),
        **{f"pip_{route}": pip_pins(packages) for route, packages in PACKAGES.items()},
        **kind.fields(metrics),
    }


def fill(template, fields):
    return Template(template).substitute(fields)


def model_summary(metrics, report, repo_id=None):
    summary = f"Model: `{metrics.get('arch', metrics['kind'])}`, {card_kind(metrics).summary(metrics)}"
    if repo_id:
        summary += f" ([{repo_id}](https://huggingface.co/{repo_id}))"
    return summary + f"; the report is in `{report}/`."


def space_readme(app, metrics, space_id=None, repo_id=None):
    fields = context(app, metrics, repo_id, space_id)
    return fill(app_readme(app)[0], {**fields, "model_summary": model_summary(metrics, f"models/{app}.report", repo_id)})


def model_card(app, metrics, repo_id=None, files=None):
    """A Hub model card from the run's metrics.json, for a repo holding `files` (default: the kind's required ones)."""
    kind = card_kind(metrics)
    files = set(kind.REPO_FILES if files is None else files)
    fields = context(app, metrics, repo_id)
    for optional in kind.OPTIONAL_FILES:
        fragment = CARDS / f"{metrics['kind']}.{optional}.md"
        if fragment.is_file():
            fields[f"{optional}_section"] = fill(fragment.read_text(), fields) if optional in files else ""
    return fill((CARDS / f"{metrics['kind']}.md").read_text(), fields)


def copy_model(app, model, dest, required, optional=()):
    """The model files named (renamed after the app) and its report; returns which were copied."""
    src = {"pkl": Path(model), **artifact_paths(model)}
    dst = {"pkl": dest / f"{app}.pkl", **artifact_paths(dest / f"{app}.pkl")}
    for kind in required:
        if not src[kind].is_file():
            raise UserError(f"missing {src[kind]}: re-export the model with this version of training/")
    copied = [*required, *(k for k in optional if src[k].is_file())]
    for kind in copied:
        shutil.copy2(src[kind], dst[kind])
    shutil.copytree(report_dir(model), report_dir(dst["pkl"]))
    return copied


def copy_library(dest):
    """This project's `imagelab/`: a Space's app imports it, and a `.pkl` names its classes."""
    shutil.copytree(REPO / "imagelab", dest / "imagelab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyi"))


def write_lfs_rules(dest, extra=()):
    """This repository's Git LFS rules, without its comments: they speak of this repository, not of `dest`.

    `extra`: patterns of other large files `dest` holds."""
    rules = [line for line in (REPO / ".gitattributes").read_text().splitlines() if "filter=lfs" in line]
    rules += [f"{pattern} filter=lfs diff=lfs merge=lfs -text" for pattern in extra]
    (dest / ".gitattributes").write_text("\n".join(rules) + "\n")


@contextmanager
def staged(out):
    """A folder built beside `out` and renamed into place: an interrupted build never leaves half of one."""
    out = Path(out)
    remove_abandoned_staging(out)  # a build killed before its end
    stage = staging_path(out)
    try:
        yield stage
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def build_space(app, model, out, space_id=None, repo_id=None):
    """Write a folder that is a complete Space: app, library, requirements, model, examples, README, LFS rules."""
    metrics, kind = load_metrics(model, app)
    with staged(out) as stage:
        shutil.copytree(REPO / "apps" / app, stage, ignore=shutil.ignore_patterns("__pycache__"))
        copy_library(stage)
        (stage / "models").mkdir()
        copy_model(app, model, stage / "models", kind.SPACE_FILES)
        check_outputs(stage / "models" / f"{app}.onnx", kind.GRAPH_OUTPUTS, "a Space")
        write_lfs_rules(stage)
        (stage / "README.md").write_text(space_readme(app, metrics, space_id, repo_id))
    return Path(out)


def check_outputs(graph, names, what="a static Space"):
    """One line if the ONNX `graph` lacks an output its app or page reads (a model exported by an older version)."""
    import onnx
    have = [o.name for o in onnx.load(graph, load_external_data=False).graph.output]
    missing = [n for n in names if n not in have]
    if missing:
        raise UserError(f"the model's ONNX graph has no output {missing[0]!r} (it has {', '.join(have)}): retrain it "
                        f"with this version of training/ to publish it as {what}")


def build_static_space(app, model, out, space_id=None, repo_id=None):
    """Write a folder that is a complete static Space: the page, the model's ONNX graph and config, its report
    and examples, onnxruntime-web, README, LFS rules. Any file server serves it; nothing runs on a server."""
    metrics, kind = load_metrics(model, app)
    if not hasattr(kind, "STATIC_FILES"):
        raise UserError(f"no static Space for a model of kind {metrics['kind']!r}: "
                        "publish it as a Gradio Space (leave out --static)")
    part, script, readme = kind.STATIC_PAGE  # what its page shows beside the upload, the page's code, its README
    tarball()  # fetched and verified before anything is written: offline without a cached copy is one line
    with staged(out) as stage:
        stage.mkdir(parents=True)
        copy_model(app, model, stage, kind.STATIC_FILES)
        check_outputs(stage / f"{app}.onnx", kind.GRAPH_OUTPUTS)
        write_runtime(stage / "onnxruntime-web")
        for name in (script, "images.js"):
            shutil.copy2(WEB / name, stage)
        config = json.loads((stage / f"{app}.config.json").read_text())
        template = app_readme(app)[0]
        fields = {**context(app, metrics, repo_id, space_id), "runtime": RUNTIME_VERSION,
                  "emoji": front_matter_value(template, "emoji"), "color_from": front_matter_value(template, "colorFrom"),
                  "color_to": front_matter_value(template, "colorTo"), **kind.static_fields(config)}
        examples = sorted(p.relative_to(stage).as_posix() for p in examples_dir(stage / f"{app}.pkl").glob("*"))
        page = {**{k: html.escape(str(v)) for k, v in fields.items()}, "model": html.escape(app),
                "summary": html.escape(f"Model: {metrics.get('arch', metrics['kind'])}, {kind.summary(metrics)}."),
                "examples": "\n".join(f'<button type="button"><img src="{html.escape(quote(e))}" alt="example {i + 1}"></button>'
                                      for i, e in enumerate(examples)),  # scraped names hold ? and #
                "script": script}
        page["main"] = fill((WEB / part).read_text(), page)
        (stage / "index.html").write_text(fill((WEB / "page.html").read_text(), page), encoding="utf-8")
        write_lfs_rules(stage, extra=["*.wasm"])
        (stage / "README.md").write_text(fill((CARDS / readme).read_text(),
                                              {**fields, "model_summary": model_summary(metrics, f"{app}.report", repo_id)}),
                                         encoding="utf-8")
    return Path(out)


def build_model_repo(app, model, out, repo_id=None):
    """A folder for a Hub model repo: the model files, the report, the library the `.pkl` needs, and the card."""
    metrics, kind = load_metrics(model, app)
    with staged(out) as stage:
        stage.mkdir(parents=True)
        files = copy_model(app, model, stage, kind.REPO_FILES, kind.OPTIONAL_FILES)
        copy_library(stage)
        write_lfs_rules(stage)
        (stage / "README.md").write_text(model_card(app, metrics, repo_id, files))
    return Path(out)


def push(folder, repo_id, repo_type, sdk="gradio"):
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo_id, repo_type=repo_type, space_sdk=sdk if repo_type == "space" else None, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type=repo_type,
                      commit_message="Upload from imagelab.deploy")
    print(f"pushed {folder} to https://huggingface.co/{'spaces/' if repo_type == 'space' else ''}{repo_id}")


def run_alone_hint(space):
    """Commands that run the Space folder by itself: this project's Python, or a venv of its own requirements."""
    cd = f"cd {shlex.quote(str(space))}"
    return (f"try it alone before you push, with this project's Python:\n  {cd} && {shlex.quote(sys.executable)} app.py\n"
            f"or anywhere, in a venv of its own:\n  {cd} && python3 -m venv .venv && "
            ".venv/bin/pip install -r requirements.txt && .venv/bin/python app.py")


def serve_hint(folder):
    return (f"try it before you push, from any file server:\n  {shlex.quote(sys.executable)} -m http.server 8000 "
            f"--bind 127.0.0.1 --directory {shlex.quote(str(folder))}\nthen open http://127.0.0.1:8000/")


PAID_GRADIO = ("note: Hugging Face runs a Gradio Space only on paid hardware (PRO, Team or Enterprise) or, for "
               "free accounts, ZeroGPU; a static Space is free for everyone and runs the model in the browser: "
               "python -m imagelab.deploy {app} --static --push {space}")


def parser():
    p = argparse.ArgumentParser(prog="python -m imagelab.deploy", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("app", choices=apps(), help="which app (a folder apps/<app>/ with a README.md)")
    p.add_argument("--model", help="trained model (default: models/<app>.pkl)")
    p.add_argument("--space", metavar="USER/SPACE", help="the Space's id: filled into its README; --push uploads there")
    p.add_argument("--static", action="store_true",
                   help="a static Space: the model runs in the visitor's browser (onnxruntime-web), free to host")
    p.add_argument("--space-out", "--out", metavar="DIR",
                   help="Space folder to write (default: build/<app>-space, with --static build/<app>-static)")
    p.add_argument("--model-repo", metavar="USER/REPO",
                   help="also write a model repo folder, its card filled with this id; --push uploads there")
    p.add_argument("--model-out", metavar="DIR",
                   help="model repo folder to write (default: build/<app>-model when --model-repo is given)")
    p.add_argument("--push", nargs="?", const=True, default=False, metavar="USER/SPACE",
                   help="upload the Space to --space (or to the id given here) and the model repo to --model-repo "
                        "(needs a Hugging Face token)")
    return p


def check_args(args):
    if isinstance(args.push, str):
        if args.space not in (None, args.push):
            raise UserError(f"--push {args.push} and --space {args.space} name two Spaces: give one")
        args.space, args.push = args.push, True
    for flag, value in (("--space", args.space), ("--model-repo", args.model_repo)):
        if value is not None and not REPO_ID.fullmatch(value):
            raise UserError(f"{flag} {value!r} is not a Hub id like USER/NAME")
    if args.push and not (args.space or args.model_repo):
        raise UserError("--push uploads to --space USER/SPACE and/or --model-repo USER/REPO: name at least one")


def main(argv=None):
    args = parser().parse_args(argv)
    check_args(args)
    if args.push and args.space and not args.static:
        print(PAID_GRADIO.format(app=args.app, space=args.space))
    if args.push:
        require_hub_login()  # before building anything: offline or logged out is one line, not a half upload
    model = Path(args.model or default_model(args.app))
    if not model.is_file():
        raise UserError(f"no model at {model}: train it first: {APPS[args.app].train}")
    if args.static:
        space = build_static_space(args.app, model, args.space_out or Path("build") / f"{args.app}-static",
                                   args.space, args.model_repo)
        print(f"wrote {space} (static Space); {serve_hint(space)}")
    else:
        space = build_space(args.app, model, args.space_out or Path("build") / f"{args.app}-space",
                            args.space, args.model_repo)
        print(f"wrote {space}; {run_alone_hint(space)}")
    repo = None
    if args.model_repo or args.model_out:
        repo = build_model_repo(args.app, model, args.model_out or Path("build") / f"{args.app}-model", args.model_repo)
        print(f"wrote {repo} (model repo{' ' + args.model_repo if args.model_repo else ''})")
    if args.push and args.space:
        push(space, args.space, "space", "static" if args.static else "gradio")
    if args.push and args.model_repo:
        push(repo, args.model_repo, "model")


if __name__ == "__main__":
    run_cli(main)
