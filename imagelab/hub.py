"""Hugging Face Hub access that fails fast and clearly when the network is not there."""
from pathlib import Path

from huggingface_hub import constants, get_token, hf_hub_download, try_to_load_from_cache

from . import UserError, first_line, proxy_for, reachable
from .paths import artifact_paths

try:  # the HTTP client of huggingface_hub, whose errors a download may raise (the network failing midway)
    from httpx2 import HTTPError as ClientError  # huggingface_hub 2
except ImportError:
    from httpx import HTTPError as ClientError  # huggingface_hub 1 (the GPU machine's)

HF_PREFIX = "hf://"


def hub_reachable():
    """One TCP connect to the Hub (or the proxy its client goes through): seconds instead of the client's minute of
    retries when offline."""
    return reachable(constants.ENDPOINT, proxy_for(constants.ENDPOINT))


def hub_file(repo_id, filename, revision=None, what="file"):
    """Local path of a Hub file: from the Hub cache when it is there, else downloaded into it."""
    cached = try_to_load_from_cache(repo_id, filename, revision=revision)
    if isinstance(cached, str):
        return cached
    where = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    if constants.HF_HUB_OFFLINE or not hub_reachable():
        raise UserError(f"cannot download the {what} {where} from the Hugging Face Hub "
                        "(offline, and not in the local Hub cache)")
    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except (ClientError, OSError, ValueError) as e:  # the Hub's answers and the network's failures, the disk, a bad id
        raise UserError(f"cannot download the {what} {where}: {first_line(e)}") from None


def resolve_model(spec, prefer=(".onnx", ".safetensors"), needs=None):
    """A local path for a model: a path as given, or `hf://USER/REPO/FILE[@REVISION]` fetched once into the Hub cache.

    For a Hub model the weights-only artifacts beside FILE (its config and the first of `<stem><suffix>`
    for the suffixes in `prefer` that the repo has, with the artifacts `needs[suffix]` names: an
    autoencoder's graph of an image comes with its graph of a code) are fetched instead of FILE: they load
    without running any pickle. A learner (.pkl) is never fetched: loading one runs whatever code it holds.
    """
    spec = str(spec)
    if not spec.startswith(HF_PREFIX):
        return Path(spec)
    body, _, revision = spec[len(HF_PREFIX):].partition("@")
    parts = body.split("/")
    if len(parts) < 3 or not all(parts):
        raise UserError(f"expected hf://USER/REPO/FILE[@REVISION], got {spec}")
    repo_id, filename, revision = "/".join(parts[:2]), "/".join(parts[2:]), revision or None
    beside, why = artifact_paths(filename), "nothing but it to load"
    try:
        hub_file(repo_id, beside["config"].as_posix(), revision, what="model config")
        for suffix in prefer:
            try:
                for artifact in (needs or {}).get(suffix, ()):
                    hub_file(repo_id, beside[artifact].as_posix(), revision, what="model")
                return Path(hub_file(repo_id, Path(filename).with_suffix(suffix).as_posix(), revision, what="model"))
            except UserError as e:
                why = str(e)
    except UserError as e:
        why = str(e)
    if Path(filename).suffix == ".pkl":
        raise UserError(f"{spec}: {why}; a learner (.pkl) is not loaded from the Hub, where anyone's "
                        "pickle could run code here (download it, and pass its path, only if you trust who made it)")
    return Path(hub_file(repo_id, filename, revision, what="model"))


def require_hub_login():
    """Before publishing anything: a token and a reachable Hub, or one line that says which is missing."""
    token = get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login` first")
    if constants.HF_HUB_OFFLINE or not hub_reachable():
        raise UserError("cannot reach the Hugging Face Hub (offline?); nothing was uploaded")
    return token
