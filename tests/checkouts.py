"""Places an app can run from in the tests: a checkout without trained models, a Hub cache holding a model."""
import os
import shutil

from conftest import ROOT


def repo_app_without_models(app, tmp_path):
    """A copy of `app` (path in this repository) in an otherwise empty checkout: its default models were never
    trained. Returns (path, env) to run it with this repository's imagelab."""
    dest = tmp_path / "checkout" / app
    dest.parent.mkdir(parents=True)
    shutil.copy(ROOT / app, dest)
    return dest, {"PYTHONPATH": str(ROOT)}


def hub_cache(home, repo_id, files):
    """A Hugging Face cache (HF_HOME) in which `repo_id` holds `files` at main: hf:// models served offline."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("1" * 40)
    snapshot = repo / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, snapshot / f.name)
    return {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def with_env(extra):
    """This process's environment plus `extra` (a value of None removes that variable)."""
    env = {**os.environ, **extra}
    return {k: v for k, v in env.items() if v is not None}
