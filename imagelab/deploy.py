"""Publishing a trained model: a Hugging Face Space folder that runs alone, and a model repo folder with its card.

    python -m imagelab.deploy pets --model models/pets.pkl                    # -> build/pets-space/
    python -m imagelab.deploy pets --space USER/SPACE --model-repo USER/REPO  # + build/pets-model/, ids filled in
    python -m imagelab.deploy pets --space USER/SPACE --model-repo USER/REPO --push   # ... and upload both
    python -m imagelab.deploy pets --static --out build/pets-static --push USER/SPACE  # free: runs in the browser

Nothing is uploaded without --push; a push makes the Hub repo match the folder (a file the folder lacks is
deleted there). An output folder is replaced only if an earlier deploy built it, or if it is empty: a folder
of yours never is.

An app is an entry of imagelab.app_options.APPS and a folder apps/<app>/ with a README.md: the Space's
README as a template (title and emoji in its front matter; the first paragraph after the title says what it
does); `deploy` makes the Space from it.
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
import os
import re
import shlex
import shutil
import sys
import tempfile
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from string import Template
from urllib.parse import quote

from . import ArgumentParser, UserError, run_cli, say
from .app_options import APPS, train_hint
from .cards import PACKAGES, trained
from .hub import hub_login, push
from .images import MAX_PIXELS
from .loading import model_file, read_config
from .metadata import write_json
from .onnxruntime_web import VERSION as RUNTIME_VERSION
from .onnxruntime_web import tarball, write_runtime
from .paths import REPO, artifact_paths, default_model, example_images, metrics_path, report_dir, split_path
from .writes import remove_abandoned_staging, staging_path

CARDS = Path(__file__).with_name("cards")
WEB = Path(__file__).with_name("web")
LICENSE = "apache-2.0"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
PLACEHOLDERS = {"repo_id": "USER/REPO", "space_id": "USER/SPACE"}
# In every folder deploy builds: what tells it from the user's folders, which it never replaces. Not uploaded.
MARKER = ".imagelab-deploy"
INTERRUPTED = ("interrupted: a folder not finished was not written (an earlier one is as it was); an upload stopped "
               "part-way may have left part of it on the Hub: push again")


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


def context(app, metrics, *, space_id=None, repo_id=None):
    """Every `$field` a README or card template may use: the run's metrics, the app's text, the Hub ids."""
    kind = card_kind(metrics)
    _, title, about = app_readme(app)
    return {
        "name": app, "title": title, "about": about, "license": LICENSE, "sdk_version": version("gradio"),
        "repo_id": repo_id or PLACEHOLDERS["repo_id"], "space_id": space_id or PLACEHOLDERS["space_id"],
        "data": data_name(metrics),
        "seed": metrics["seed"], "trained": trained(metrics),
        **{f"pip_{route}": pip_pins(packages) for route, packages in PACKAGES.items()},
        **kind.fields(metrics),
    }


def data_name(metrics):
    """The data folder's name, not its path: the trainer's disk layout is nobody's business."""
    return Path(metrics["data"]).name


def fill(template, fields):
    return Template(template).substitute(fields)


def model_summary(metrics, report, *, repo_id=None):
    summary = f"Model: `{metrics.get('arch', metrics['kind'])}`, {card_kind(metrics).summary(metrics)}"
    if repo_id:
        summary += f" ([{repo_id}](https://huggingface.co/{repo_id}))"
    return summary + f"; the report is in `{report}/`."


def space_readme(app, metrics, *, space_id=None, repo_id=None):
    fields = context(app, metrics, space_id=space_id, repo_id=repo_id)
    # the report beside the Space's model, from the Space's root
    summary = model_summary(metrics, report_dir(default_model(app, root="")).as_posix(), repo_id=repo_id)
    return fill(app_readme(app)[0], {**fields, "model_summary": summary})


def model_card(app, metrics, *, repo_id=None, files=None):
    """A Hub model card from the run's metrics.json, for a repo holding `files` (default: the kind's required ones)."""
    kind = card_kind(metrics)
    files = set(kind.REPO_FILES if files is None else files)
    fields = context(app, metrics, repo_id=repo_id)
    for optional in kind.OPTIONAL_FILES:
        fragment = CARDS / f"{metrics['kind']}.{optional}.md"
        if fragment.is_file():
            fields[f"{optional}_section"] = fill(fragment.read_text(), fields) if optional in files else ""
    return fill((CARDS / f"{metrics['kind']}.md").read_text(), fields)


def model_files(model, required, optional=()):
    """{kind: path} of the files `required` and `optional` name (the ones there) of the model at `model`: its learner
    or any of its exports, which are all named after the learner; one line if a required one is missing."""
    model = Path(model)
    src = {"pkl": model.with_suffix(".pkl"), **artifact_paths(model)}
    for kind in required:
        if kind == "pkl" and not src[kind].is_file():
            raise UserError(f"no learner {src[kind]} beside {model}: a model repo carries the .pkl that training/ "
                            "exported with it")
        if not src[kind].is_file():
            raise UserError(f"missing {src[kind]}: re-export the model with this version of training/")
    return {k: src[k] for k in [*required, *(k for k in optional if src[k].is_file())]}


def copy_model(model, to, required, optional=()):
    """The model files named, and its report, as those of the model at `to`; returns which were copied."""
    files = model_files(model, required, optional)
    dst = {"pkl": to, **artifact_paths(to)}
    for kind, path in files.items():
        shutil.copy2(path, dst[kind])
    # The names of the user's files (which trained, which were held out or skipped) stay on their machine.
    shutil.copytree(report_dir(model), report_dir(dst["pkl"]), ignore=shutil.ignore_patterns(split_path(model).name))
    metrics = json.loads(metrics_path(dst["pkl"]).read_text())
    published = {k: v for k, v in metrics.items() if k != "skipped_files"}
    write_json({**published, "data": data_name(metrics)}, metrics_path(dst["pkl"]))
    return list(files)


def generated(path):
    """Whether `path` is what running the code beside it writes: Python's bytecode, and the stub (`<module>.pyi`)
    Gradio writes beside every module that defines a component (`imagelab.ui.ImageUpload`), each time it is imported.
    Never copied; in a built folder, not the user's: trying a Space in its folder must not block the next build."""
    path = Path(path)
    return ("__pycache__" in path.parts or path.suffix == ".pyc"
            or (path.suffix == ".pyi" and path.with_suffix(".py").is_file()))


def ignore_generated(folder, names):
    """`shutil.copytree`'s `ignore`: the `generated` files among `names` in `folder`."""
    return {name for name in names if generated(Path(folder) / name)}


def copy_library(dest):
    """This project's `imagelab/`: a Space's app imports it, and a `.pkl` names its classes."""
    shutil.copytree(REPO / "imagelab", dest / "imagelab", ignore=ignore_generated)


def write_lfs_rules(dest, extra=()):
    """This repository's Git LFS rules, without its comments: they speak of this repository, not of `dest`.

    `extra`: patterns of other large files `dest` holds."""
    rules = [line for line in (REPO / ".gitattributes").read_text().splitlines() if "filter=lfs" in line]
    rules += [f"{pattern} filter=lfs diff=lfs merge=lfs -text" for pattern in extra]
    (dest / ".gitattributes").write_text("\n".join(rules) + "\n")


def built_files(folder):
    """Every file and folder in `folder`, relative to it, but MARKER."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.name != MARKER)


def not_built(out):
    """What `out` holds that no earlier build wrote there (all of it, without MARKER's list), but what running the
    build wrote (`generated`): a `.git`, notes, a `.venv` made inside it are the user's, and replacing the folder
    would delete them."""
    try:
        listed = set(json.loads((out / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(p.name for p in out.iterdir())  # no list of deploy's: the folder is the user's, not walked
    return [f for f in built_files(out) if f not in listed and not generated(out / f)]


def check_out(out, model, app, what="the Space"):
    """`out` as a Path if `what` may be built there: a new folder, an empty one, or one an earlier build made
    and nobody added to (MARKER lists what it wrote); else one line, before anything is built. Nothing of the
    user's is ever replaced."""
    out = Path(out)
    where, model = out.resolve(), Path(model).resolve()
    refuse = f"will not build {what} in {out}:"
    for name, path in (("the current folder", Path.cwd()), ("this project", REPO), ("the model", model)):
        if where == path or where in path.parents:
            raise UserError(f"{refuse} it is or holds {name} ({path}); name a folder of its own")
    for source in (REPO / "imagelab", REPO / "apps" / app, report_dir(model)):
        if where == source or source in where.parents:
            raise UserError(f"{refuse} {source} is copied into it; name a folder outside")
    if out.is_symlink():
        raise UserError(f"{refuse} it is a link; name a folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{refuse} it is a file; name a folder")
    above = next(p for p in where.parents if p.exists())
    if not above.is_dir():
        raise UserError(f"{refuse} {above} is a file")
    try:  # where it cannot be written (read-only, another user's, /proc): found now, not half way through the build
        os.rmdir(tempfile.mkdtemp(prefix=".imagelab-deploy-", dir=above))
    except OSError as e:
        raise UserError(f"{refuse} {above} cannot be written ({e.strerror})") from None
    foreign = not_built(out) if out.is_dir() else []
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserError(f"{refuse} it holds files that deploy did not write ({foreign[0]}{more}); move them out, "
                        "or name a new or empty folder")
    return out


def check_apart(space, repo):
    """One line if the Space and the model repo would be built in one folder, or one inside the other."""
    a, b = Path(space).resolve(), Path(repo).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise UserError(f"the Space ({space}) and the model repo ({repo}) need two folders, neither inside the other: "
                        "give --space-out and --model-out apart")


@contextmanager
def staged(out):
    """A folder built beside `out`, marked as deploy's and renamed into place: an interrupted build never leaves
    half of one. `out` is what `check_out` allows: nothing, an empty folder or an earlier build, set aside and removed
    once the new one is in place."""
    out = Path(out)
    remove_abandoned_staging(out)  # a build killed before its end
    stage = staging_path(out)
    earlier = stage.with_suffix(".old.tmp")  # a staging path too: removed by the next build if this one is killed
    try:
        yield stage
        (stage / MARKER).write_text(json.dumps({
            "about": "built by python -m imagelab.deploy, which replaces this folder when it builds here again, "
                     "unless it holds files other than these", "files": built_files(stage)}, indent=1) + "\n")
        if (out / MARKER).is_file():
            out.rename(earlier)
        stage.rename(out)  # a folder renamed onto an empty one replaces it
    finally:
        if earlier.exists() and not out.exists():  # interrupted between the two renames: the earlier build stays
            earlier.rename(out)
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(earlier, ignore_errors=True)


def space_files(metrics, kind, static=False):
    """Which model files a Space of this kind runs (a static Space: in the browser)."""
    if not static:
        return kind.SPACE_FILES
    if not hasattr(kind, "STATIC_FILES"):
        raise UserError(f"no static Space for a model of kind {metrics['kind']!r}: "
                        "publish it as a Gradio Space (leave out --static)")
    return kind.STATIC_FILES


def build_space(app, model, out, *, space_id=None, repo_id=None):
    """Write a folder that is a complete Space: app, library, requirements, model, examples, README, LFS rules."""
    check_out(out, model, app)
    metrics, kind = load_metrics(model, app)
    with staged(out) as stage:
        shutil.copytree(REPO / "apps" / app, stage, ignore=ignore_generated)
        copy_library(stage)
        bundled = default_model(app, stage)  # where the app looks (app_options.app_default_model)
        bundled.parent.mkdir()
        copy_model(model, bundled, space_files(metrics, kind))
        check_outputs(bundled.with_suffix(".onnx"), kind.GRAPH_OUTPUTS, "a Space")
        write_lfs_rules(stage)
        (stage / "README.md").write_text(space_readme(app, metrics, space_id=space_id, repo_id=repo_id))
    return Path(out)


def check_outputs(graph, names, what="a static Space"):
    """One line if the ONNX `graph` lacks an output its app or page reads (a model exported by an older version)."""
    import onnx
    have = [o.name for o in onnx.load(graph, load_external_data=False).graph.output]
    missing = [n for n in names if n not in have]
    if missing:
        raise UserError(f"the model's ONNX graph has no output {missing[0]!r} (it has {', '.join(have)}): retrain it "
                        f"with this version of training/ to publish it as {what}")


def build_static_space(app, model, out, *, space_id=None, repo_id=None):
    """Write a folder that is a complete static Space: the page, the model's ONNX graph and config, its report
    and examples, onnxruntime-web, README, LFS rules. Any file server serves it; nothing runs on a server."""
    check_out(out, model, app)
    metrics, kind = load_metrics(model, app)
    files = space_files(metrics, kind, static=True)
    part, script, readme = kind.STATIC_PAGE  # what its page shows beside the upload, the page's code, its README
    tarball()  # fetched and verified before anything is written: offline without a cached copy is one line
    with staged(out) as stage:
        stage.mkdir(parents=True)
        beside = stage / f"{app}.pkl"  # the page fetches `<model>.onnx` from its own folder
        copy_model(model, beside, files)
        check_outputs(beside.with_suffix(".onnx"), kind.GRAPH_OUTPUTS)
        write_runtime(stage / "onnxruntime-web")
        for name in (script, "images.js"):
            shutil.copy2(WEB / name, stage)
        config = read_config(beside)
        template = app_readme(app)[0]
        fields = {**context(app, metrics, space_id=space_id, repo_id=repo_id), "runtime": RUNTIME_VERSION,
                  "emoji": front_matter_value(template, "emoji"), "color_from": front_matter_value(template, "colorFrom"),
                  "color_to": front_matter_value(template, "colorTo"), **kind.static_fields(config)}
        examples = [p.relative_to(stage).as_posix() for p in example_images(beside)]
        page = {**{k: html.escape(str(v)) for k, v in fields.items()}, "model": html.escape(app),
                "max_pixels": MAX_PIXELS,
                "summary": html.escape(f"Model: {metrics.get('arch', metrics['kind'])}, {kind.summary(metrics)}."),
                "examples": "\n".join(f'<button type="button"><img src="{html.escape(quote(e))}" alt="example {i + 1}"></button>'
                                      for i, e in enumerate(examples)),  # scraped names hold ? and #
                "script": script}
        page["main"] = fill((WEB / part).read_text(), page)
        (stage / "index.html").write_text(fill((WEB / "page.html").read_text(), page), encoding="utf-8")
        write_lfs_rules(stage, extra=["*.wasm"])
        summary = model_summary(metrics, report_dir(beside.relative_to(stage)).as_posix(), repo_id=repo_id)
        (stage / "README.md").write_text(fill((CARDS / readme).read_text(), {**fields, "model_summary": summary}),
                                         encoding="utf-8")
    return Path(out)


def build_model_repo(app, model, out, *, repo_id=None):
    """A folder for a Hub model repo: the model files, the report, the library the `.pkl` needs, and the card."""
    check_out(out, model, app, "the model repo")
    metrics, kind = load_metrics(model, app)
    with staged(out) as stage:
        stage.mkdir(parents=True)
        files = copy_model(model, stage / f"{app}.pkl", kind.REPO_FILES, kind.OPTIONAL_FILES)
        copy_library(stage)
        write_lfs_rules(stage)
        (stage / "README.md").write_text(model_card(app, metrics, repo_id=repo_id, files=files))
    return Path(out)


def run_alone_hint(space):
    """Commands that run the Space folder by itself: this project's Python, or a venv of its own requirements."""
    cd = f"cd {shlex.quote(str(space))}"
    # the venv beside the folder, not in it: a push would upload it, and the next build refuses a folder holding it
    venv = shlex.quote(f"../{Path(space).name}.venv")
    return (f"try it alone before you push, with this project's Python:\n  {cd} && {shlex.quote(sys.executable)} app.py\n"
            f"or anywhere, in a venv of its own:\n  {cd} && python3 -m venv {venv} && "
            f"{venv}/bin/pip install -r requirements.txt && {venv}/bin/python app.py")


def serve_hint(folder):
    return (f"try it before you push, from any file server:\n  {shlex.quote(sys.executable)} -m http.server 8000 "
            f"--bind 127.0.0.1 --directory {shlex.quote(str(folder))}\nthen open http://127.0.0.1:8000/")


PAID_GRADIO = ("note: Hugging Face runs a Gradio Space only on paid hardware (PRO, Team or Enterprise) or, for "
               "free accounts, ZeroGPU; a static Space is free for everyone and runs the model in the browser: "
               "python -m imagelab.deploy {app} --static --push {space}")


def parser():
    p = ArgumentParser(prog="python -m imagelab.deploy", description=__doc__.split("\n\n")[0],
                       epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("app", choices=apps(), help="which app (a folder apps/<app>/ with a README.md)")
    p.add_argument("--model", help="trained model: its .pkl, or an export beside it (default: models/<app>.pkl)")
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


def check_model(model, app):
    """`model` (--model; None: the app's default) as a Path, or one line if there is none."""
    default = default_model(app)
    model = model or default
    return model_file(model, APPS[app].kind, train_hint(app, model, default))


def main(argv=None):
    args = parser().parse_args(argv)
    check_args(args)
    model = check_model(args.model, args.app)
    metrics, kind = load_metrics(model, args.app)
    # Everything that can be checked here is, before anything is built or uploaded: the folders, the files.
    space = check_out(args.space_out or Path("build") / f"{args.app}-{'static' if args.static else 'space'}",
                      model, args.app)
    model_files(model, space_files(metrics, kind, args.static))
    repo = None
    if args.model_repo or args.model_out:
        repo = check_out(args.model_out or Path("build") / f"{args.app}-model", model, args.app, "the model repo")
        check_apart(space, repo)
        model_files(model, kind.REPO_FILES)
    if args.push:
        hub_login([i for i in (args.space, args.model_repo) if i])
        if args.space and not args.static:
            say(PAID_GRADIO.format(app=args.app, space=args.space))
    if args.static:
        build_static_space(args.app, model, space, space_id=args.space, repo_id=args.model_repo)
        say(f"wrote {space} (static Space); {serve_hint(space)}")
    else:
        build_space(args.app, model, space, space_id=args.space, repo_id=args.model_repo)
        say(f"wrote {space}; {run_alone_hint(space)}")
    if repo:
        build_model_repo(args.app, model, repo, repo_id=args.model_repo)
        say(f"wrote {repo} (model repo{' ' + args.model_repo if args.model_repo else ''})")
    if args.push:
        push([*([(space, args.space, "space", "static" if args.static else "gradio")] if args.space else []),
              *([(repo, args.model_repo, "model", None)] if args.model_repo else [])], ignore=[MARKER])


if __name__ == "__main__":
    run_cli(main, interrupted=INTERRUPTED)
