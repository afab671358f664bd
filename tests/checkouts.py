"""Places an app can run from in the tests: a checkout without trained models, a Hub cache holding a model."""
import os
import shutil
from pathlib import Path

from conftest import ROOT


def repo_app_without_models(app, tmp_path):
    """A copy of `app` (path in this repository) in an otherwise empty checkout: its default models were never
    trained. Returns (path, env) to run it with this repository's imagelab."""
    dest = tmp_path / "checkout" / app
    dest.parent.mkdir(parents=True)
    shutil.copy(ROOT / app, dest)
    return dest, {"PYTHONPATH": str(ROOT)}


def fill_hub_cache(hf_home, repo_id, files, commit="0123456789abcdef0123456789abcdef01234567"):
    """Put files in the Hub's own cache layout, as a download would have: blobs, a snapshot, refs/main.

    `files`: paths (each lands at the repo's top) or a folder (its whole tree, as a snapshot download has it).
    """
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    if isinstance(files, Path):
        files = {p.relative_to(files).as_posix(): p for p in files.rglob("*") if p.is_file()}
    else:
        files = {p.name: p for p in files}
    for name, src in files.items():
        blob = repo / "blobs" / f"blob-{name.replace('/', '--')}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, blob)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


def hub_cache(home, repo_id, files):
    """A Hugging Face cache (HF_HOME) in which `repo_id` holds `files` at main: the environment that serves hf://
    models from it offline."""
    fill_hub_cache(home, repo_id, files)
    return {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def with_env(extra):
    """This process's environment plus `extra` (a value of None removes that variable)."""
    env = {**os.environ, **extra}
    return {k: v for k, v in env.items() if v is not None}
