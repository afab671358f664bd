"""onnxruntime-web, the runtime of a static Space: fetched once from the npm registry, checked, cached.

    python -m imagelab.onnxruntime_web      # fetch it now (deploy --static then works offline)

The version and the tarball's integrity hash are pinned here; a tarball that does not match is refused.
The verified tarball is kept in the imagelab cache, so only the first static build needs the network.
Standard library only.
"""
import base64
import hashlib
import http.client
import io
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from . import ArgumentParser, UserError, run_cli
from .paths import cache_folder
from .writes import staging_path

PACKAGE = "onnxruntime-web"
VERSION = "1.30.0"
INTEGRITY = "sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZClzcV7svNc4rKY3jL02Vb7QmRMDs1SigqR4CXAfKYQ=="
DEFAULT_REGISTRY = "https://registry.npmjs.org/"
# What a page that runs ONNX graphs on the CPU needs: the ES module with its loader inlined and the one
# WebAssembly build it loads (SIMD; threads only where the page is cross-origin isolated). The WebGPU,
# WebGL and JSPI builds stay out. Renamed .mjs -> .js: every file server sends .js as JavaScript.
FILES = {"package/dist/ort.wasm.bundle.min.mjs": "ort.wasm.bundle.min.js",
         "package/dist/ort-wasm-simd-threaded.wasm": "ort-wasm-simd-threaded.wasm"}
TIMEOUT = 60


def registry():
    """The npm registry: npm's own `npm_config_registry` when set (a mirror), else the public one."""
    return os.environ.get("npm_config_registry") or DEFAULT_REGISTRY


def tarball_url():
    return f"{registry().rstrip('/')}/{PACKAGE}/-/{PACKAGE}-{VERSION}.tgz"


def cached_tarball(cache=None):
    return cache_folder(cache) / "npm" / f"{PACKAGE}-{VERSION}.tgz"


def integrity(data):
    """npm's `dist.integrity` of some bytes (Subresource Integrity, sha512)."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def download():
    url = tarball_url()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            return r.read()
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # HTTPException: a connection cut short
        reason = getattr(e, "reason", None) or e
        raise UserError(f"cannot fetch {PACKAGE} {VERSION} from {url} ({reason}); the static Space serves it from its "
                        f"own folder: run this once online (python -m imagelab.onnxruntime_web), then it works offline")


def tarball():
    """The verified tarball's bytes: from the cache, else downloaded, verified, then cached."""
    path = cached_tarball()
    if path.is_file():
        data = path.read_bytes()
        if integrity(data) == INTEGRITY:
            return data
        path.unlink()  # damaged: fetch it again
    data = download()
    if integrity(data) != INTEGRITY:
        raise UserError(f"{tarball_url()} failed its integrity check (expected {INTEGRITY[:24]}..., got "
                        f"{integrity(data)[:24]}...): refusing to ship it")
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = staging_path(path)
    stage.write_bytes(data)
    os.replace(stage, path)
    return data


def write_runtime(dest):
    """Write the files a page needs into `dest`."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tarball()), mode="r:gz") as tf:
        for member, name in FILES.items():
            (dest / name).write_bytes(tf.extractfile(member).read())


def main(argv=None):
    p = ArgumentParser(prog="python -m imagelab.onnxruntime_web", description=__doc__.split("\n\n")[0])
    p.parse_args(argv)
    tarball()
    print(f"{PACKAGE} {VERSION} verified in {cached_tarball()}")


if __name__ == "__main__":
    run_cli(main)
