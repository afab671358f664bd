"""A labelled image folder from a web image search: search, parallel download, de-duplication, verification.

    make_dataset(["grizzly", "black", "teddy"], "data/bears", query="{} bear")

writes `data/bears/<class>/<sha256[:16]>.<format>`: one sub-folder per class, every file a fully
decoded image, each picture once (the same bytes, or the same picture resized or converted:
imagelab.lookalikes). Files that do not decode go to `quarantine/<class>/`
with their reason in `quarantine/reasons.tsv` (never deleted); `download-summary.json` counts it all.

The search goes through `ddgs` (DuckDuckGo / Bing image search) and its own HTTP client, which
honours the usual proxy settings (`HTTPS_PROXY`, or ddgs's `DDGS_PROXY`) and `SSL_CERT_FILE`.
"""
import hashlib
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import Request, urlopen
from uuid import uuid4

from tqdm.auto import tqdm

from . import UserError, first_line, proxy_for, reachable, require
from .images import check_image, open_image
from .lookalikes import collect, fingerprint, fingerprints, pairs
from .metadata import write_json
from .paths import DOWNLOAD_SUMMARY, QUARANTINE, check_class_name, hidden, visible_files

SEARCH_HOST = "duckduckgo.com"  # ddgs's image search asks duckduckgo.com (and www.bing.com)
REASONS = "reasons.tsv"
# Seconds the search gets at least; ddgs bounds each request and each engine's whole search by it.
SEARCH_TIMEOUT = 10
MAX_BYTES = 20_000_000  # a bigger "image" is not a photo worth training on
SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "TIFF": ".tif"}  # else the format's name: .png, .webp, .gif ...
# Some image hosts refuse Python's default User-Agent.
HEADERS = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) imagelab", "Accept": "image/*,*/*;q=0.8"}


def search_proxy():
    """The proxy the search client will use, if any: ddgs's own setting first, then the usual environment."""
    return os.environ.get("DDGS_PROXY") or proxy_for(f"https://{SEARCH_HOST}")


def search_reachable():
    """One TCP connect to the search host (or its proxy): seconds instead of the client's timeouts offline."""
    return reachable(f"https://{SEARCH_HOST}", search_proxy())


def search_images(query, n, backend="auto", timeout=SEARCH_TIMEOUT):
    """Up to `n` distinct image URLs for `query`, page after page of results."""
    from ddgs import DDGS  # imported here: it loads every search engine module
    from ddgs.exceptions import DDGSException

    urls = {}  # a dict: ordered, and fast to look up
    ddgs = DDGS(timeout=timeout)
    for page in range(1, n // 35 + 3):  # Bing pages hold 35 results, DuckDuckGo's 100
        try:
            hits = ddgs.images(query, max_results=n, page=page, backend=backend)
        except DDGSException as e:
            if urls:  # later pages run dry: keep what the first ones gave
                break
            raise UserError(f"image search for {query!r} failed: {e}") from None
        before = len(urls)
        urls.update((h["image"], None) for h in hits if h.get("image") and h["image"] not in urls)
        if len(urls) == before or len(urls) >= n:
            break
    return list(urls)[:n]


def fetch(url, dest, timeout):
    """Stream `url` into the file `dest` and return its sha256; any failure raises."""
    if urlparse(url).scheme not in ("http", "https"):
        raise ValueError("not an http(s) URL")  # a result could be file:// or data:, never read locally
    deadline = time.monotonic() + timeout  # urlopen's timeout is per read; a trickling server has a total too
    digest, size = hashlib.sha256(), 0
    with urlopen(Request(url, headers=HEADERS), timeout=timeout) as r, open(dest, "wb") as f:
        while chunk := r.read(1 << 16):
            size += len(chunk)
            if size > MAX_BYTES:
                raise ValueError(f"larger than {MAX_BYTES:,} bytes")
            if time.monotonic() > deadline:
                raise TimeoutError(f"took longer than {timeout}s")
            digest.update(chunk)
            f.write(chunk)
    if size == 0:
        raise ValueError("empty response")
    return digest.hexdigest()


class Downloader:
    """Download into `<dest>/<class>/`, keeping each distinct content once (sha256) and quarantining bad files."""

    def __init__(self, dest, timeout=10):
        self.dest, self.timeout = Path(dest), timeout
        # Hashes of what is already there (removed and quarantined files too): a second run adds new
        # images, not copies of old ones, and does not bring back what was thrown out.
        there = [p for p in visible_files(self.dest) if p.parent != self.dest and p.name != REASONS and p.is_file()]
        self.seen = {sha256(p) for p in there}
        self.prints = fingerprints(there)  # the same pictures at another size, in another format

    def download(self, url, label):
        """Download and check one URL into a hidden part file: (part, sha256, why it is not an image or None, its
        look-alike fingerprint), or (None, None, why the download failed, None)."""
        part = self.dest / label / f".part-{uuid4().hex}"  # hidden: training never sees a half file
        try:
            digest = fetch(url, part, self.timeout)
        except Exception as e:  # network, HTTP, size and time limits: each is a reason, none a crash
            part.unlink(missing_ok=True)
            return None, None, first_line(e), None  # one line: reasons.tsv keeps one a line
        reason = check_image(part)
        # here, without a pool or a progress bar of its own: made while Ctrl-C stops the main thread (whose bar
        # holds tqdm's lock), those could wait forever, and the interrupted download never end
        return part, digest, reason, None if reason else collect([fingerprint(part)])

    def settle(self, url, label, part, digest, reason, prints):
        """Keep, drop or quarantine one download: (outcome, url, label, detail), outcome saved / duplicate (the same
        bytes, or a look-alike: the same picture resized or converted) / quarantined / failed. Called in search order,
        so the first copy of an image is the one kept."""
        if part is None:
            return "failed", url, label, reason
        if digest in self.seen:
            part.unlink()
            return "duplicate", url, label, None
        self.seen.add(digest)
        if reason:
            bad = self.dest / QUARANTINE / label / f"{digest[:16]}{url_suffix(url)}"
            bad.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, bad)
            return "quarantined", url, label, f"{bad.relative_to(self.dest)}\t{reason}"
        if pairs(prints, self.prints):
            part.unlink()
            return "duplicate", url, label, None
        self.prints += prints
        with open_image(part) as im:
            fmt = im.format
        final = self.dest / label / f"{digest[:16]}{SUFFIX.get(fmt, '.' + fmt.lower())}"
        os.replace(part, final)  # a complete file appears under its final name in one step
        return "saved", url, label, final

    def run(self, jobs, workers=16):
        """Download every (url, label) in parallel with a progress bar; returns the outcomes in job order."""
        pool = ThreadPoolExecutor(workers)
        try:
            futures = [pool.submit(self.download, url, label) for url, label in jobs]
            for _ in tqdm(as_completed(futures), total=len(futures), desc="downloading", unit="img"):
                pass
            return [self.settle(url, label, *f.result()) for (url, label), f in zip(jobs, futures)]
        finally:
            # On Ctrl-C: drop what has not started, let the running downloads end (each is bounded by the
            # timeout), then remove every part file: only complete, checked images are left.
            pool.shutdown(wait=True, cancel_futures=True)
            for part in self.dest.glob("*/.part-*"):
                part.unlink(missing_ok=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def url_suffix(url):
    suffix = Path(urlparse(url).path).suffix.lower()
    return suffix if suffix[1:].isalnum() and len(suffix) <= 6 else ".bin"


def make_dataset(classes, dest, per_class=150, query="{}", workers=16, timeout=10, backend="auto"):
    """Search `query` with `{}` replaced by each class, download into `dest/<class>/`; returns the summary."""
    classes = [check_class_name(c) for c in dict.fromkeys(classes)]
    if not classes:
        raise UserError("no classes to download")
    if "{}" not in query:
        raise UserError(f"--query must contain {{}} where the class name goes, e.g. '{{}} bear' (got {query!r})")
    require([("--per-class", per_class, per_class >= 1, "at least 1"),
             ("--download-workers", workers, workers >= 1, "at least 1"),
             ("--timeout", timeout, timeout > 0, "more than 0 seconds")])
    if not search_reachable():
        proxy = search_proxy()
        raise UserError(f"cannot reach the image search ({SEARCH_HOST}{' via proxy ' + proxy if proxy else ''}): "
                        "offline? (a folder of images you have trains with --data DIR)")
    # Search everything before writing anything: a failed search leaves no half-made dataset behind.
    # A slow network's longer --timeout is the search's too; a shorter one, to skip slow image hosts, is not: a
    # search engine that ddgs stops waiting for fails as "No results found".
    found = {c: search_images(query.replace("{}", c), per_class, backend=backend, timeout=max(timeout, SEARCH_TIMEOUT))
             for c in tqdm(classes, desc="searching")}
    dest = Path(dest)
    try:
        for c in classes:
            (dest / c).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to {dest}: {e.strerror}") from None
    start = time.perf_counter()
    outcomes = Downloader(dest, timeout).run([(u, c) for c in classes for u in found[c]], workers)
    return summarise(dest, query, found, outcomes, time.perf_counter() - start)


def summarise(dest, query, found, outcomes, seconds):
    """Counts per class, printed as a table and written to `download-summary.json`; reasons to `quarantine/`."""
    counts = Counter((label, outcome) for outcome, _, label, _ in outcomes)
    kinds = ("saved", "duplicate", "quarantined", "failed")
    per_class = {c: {"found": len(found[c]), **{k: counts[c, k] for k in kinds},
                     "images": sum(1 for p in (dest / c).iterdir() if not hidden(p.name))}
                 for c in found}
    quarantined = [(url, label, info) for outcome, url, label, info in outcomes if outcome == "quarantined"]
    if quarantined:
        with open(dest / QUARANTINE / REASONS, "a") as f:
            f.writelines(f"{info}\t{label}\t{url}\n" for url, label, info in quarantined)
    summary = {"query": query, "dest": str(dest), "seconds": round(seconds, 2), "classes": per_class,
               "total": {k: sum(v[k] for v in per_class.values()) for k in ("found", *kinds, "images")},
               "quarantine": str(dest / QUARANTINE) if quarantined else None,
               "failed": [{"url": url, "class": label, "reason": why}
                          for outcome, url, label, why in outcomes if outcome == "failed"]}
    write_json(summary, dest / DOWNLOAD_SUMMARY)
    print(f"{'class':<16}{'found':>7}{'saved':>7}{'dupes':>7}{'quarantined':>13}{'failed':>8}{'images':>8}")
    for c, v in [*per_class.items(), ("total", summary["total"])]:
        print(f"{c:<16}{v['found']:>7}{v['saved']:>7}{v['duplicate']:>7}{v['quarantined']:>13}{v['failed']:>8}"
              f"{v['images']:>8}")
    if quarantined:
        print(f"{len(quarantined)} files that are not readable images are in {dest / QUARANTINE} ({REASONS})")
    print(f"wrote {dest / DOWNLOAD_SUMMARY}")
    return summary
