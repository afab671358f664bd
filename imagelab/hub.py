"""Hugging Face Hub access that fails fast and clearly when the network is not there."""
import socket
from urllib.parse import urlparse

from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

from . import UserError


def hub_reachable(timeout=3.0):
    """One TCP connect to the Hub: seconds instead of the client's minute of retries when offline."""
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_file(repo_id, filename, revision=None, what="file"):
    """Local path of a Hub file: from the Hub cache when it is there, else downloaded into it."""
    cached = try_to_load_from_cache(repo_id, filename, revision=revision)
    if isinstance(cached, str):
        return cached
    if constants.HF_HUB_OFFLINE or not hub_reachable():
        raise UserError(f"cannot download the {what} {repo_id}/{filename} from the Hugging Face Hub "
                        "(offline, and not in the local Hub cache)")
    return hf_hub_download(repo_id, filename, revision=revision)
