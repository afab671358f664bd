"""Hugging Face Hub access that fails fast and clearly when the network is not there: models in, Spaces out."""
import logging
from pathlib import Path

from huggingface_hub import constants, get_token, hf_hub_download, try_to_load_from_cache

from . import UserError, first_line, proxy_for, reachable, say
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


def resolve_model(spec, prefer, needs=None):
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


def hub_login(repo_ids):
    """Before building anything: a token the Hub takes, that may write, of an account that may write to each of
    `repo_ids`; else one line that says what is wrong."""
    token = get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login` first")
    if constants.HF_HUB_OFFLINE or not hub_reachable():
        raise UserError("cannot reach the Hugging Face Hub (offline?); nothing was uploaded")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    try:
        me = HfApi().whoami()
    except HfHubHTTPError as e:
        if e.response.status_code == 401:
            raise UserError("the Hugging Face Hub refused the token (wrong or expired?): make one at "
                            "https://huggingface.co/settings/tokens; nothing was built or uploaded") from None
        raise UserError(f"the Hugging Face Hub did not check the token ({hub_error(e)}); nothing was built or "
                        "uploaded") from None
    except Exception as e:  # the network's many failures, as the Hub's HTTP client raises them
        raise UserError(f"cannot reach the Hugging Face Hub ({first_line(e)}); nothing was built or uploaded") from None
    if me.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise UserError("the Hugging Face token is read-only: uploading needs a write token "
                        "(https://huggingface.co/settings/tokens); nothing was built or uploaded")
    accounts = {str(a).lower() for a in (me.get("name"), *(org.get("name") for org in me.get("orgs", [])))}
    for repo_id in repo_ids:
        if repo_id.split("/")[0].lower() not in accounts:  # without case: a refusal must be sure
            raise UserError(f"the Hugging Face token is {me.get('name')}'s, who cannot write to {repo_id} (not their "
                            "name, nor one of their organisations'); nothing was built or uploaded")


def hub_error(e):
    """An exception of the Hub's client in one line: an HTTP error as its status and the Hub's own words."""
    response = getattr(e, "response", None)
    if response is None:
        return first_line(e)
    words = " ".join((getattr(e, "server_message", None) or "").split())
    return f"{response.status_code} {response.reason_phrase}" + (f": {words}" if words else "")


def hub_url(repo_id, repo_type):
    return f"{constants.ENDPOINT}/{'spaces/' if repo_type == 'space' else ''}{repo_id}"


def push(uploads, ignore=()):
    """Upload each (folder, repo_id, repo_type, sdk) in turn but the files `ignore` matches, the Hub repo made to match
    the folder: files it no longer has are deleted there. A failure is one line that says what was uploaded and what
    was not."""
    from huggingface_hub import HfApi
    # The client retries a refused commit in smaller parts, saying so in a warning each time, before the error that
    # ends them: the one line below says it.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    api, done = HfApi(), []
    for i, (folder, repo_id, repo_type, sdk) in enumerate(uploads):
        url = hub_url(repo_id, repo_type)
        step, left = f"cannot create {url}", [str(f) for f, *_ in uploads[i:]]
        try:
            api.create_repo(repo_id, repo_type=repo_type, space_sdk=sdk if repo_type == "space" else None,
                            exist_ok=True)
            step, left = f"the upload of {folder} to {url} stopped (it may be there in part: push again)", left[1:]
            say(f"uploading {folder} to {url} (the Hub's client retries a failing upload for some minutes)")
            # delete_patterns: a file of an earlier push that the folder no longer has (an old example, a Gradio
            # Space's app.py in a Space now static) is deleted; the Hub's client keeps .gitattributes
            api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type=repo_type, ignore_patterns=list(ignore),
                              delete_patterns="*", commit_message="Upload from imagelab.deploy")
        except Exception as e:  # HTTP refusals, network failures, the uploader's own: the Hub's client raises many
            raise UserError(f"{step}: {hub_error(e)}; uploaded: {', '.join(done) or 'nothing'}"
                            + (f"; not uploaded: {', '.join(left)}" if left else "")) from None
        done.append(f"{folder} to {url}")
        say(f"pushed {folder} to {url}")
