"""Many concurrent clients against one running app: failures and latency percentiles.

    python benchmarks/load.py --url http://127.0.0.1:7860/ --image cat.jpg --clients 32 --requests 10

Only for apps you run yourself on this machine. Prints a summary line, then one JSON object last.
"""
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from gradio_client import Client, handle_file

from imagelab import ArgumentParser, UserError, first_line, run_cli


def client_session(url, image, api_name, n, timeout):
    """One client sending `n` requests one after another; (latencies in ms, errors)."""
    client = Client(url, verbose=False)
    latencies, errors = [], []
    for _ in range(n):
        t = time.perf_counter()
        try:
            client.submit(handle_file(image), api_name=api_name).result(timeout=timeout)
            latencies.append((time.perf_counter() - t) * 1000)
        except Exception as e:  # counted, not raised: the point is how many fail
            errors.append(f"{type(e).__name__}: {e}"[:200])
    return latencies, errors


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the running app, e.g. http://127.0.0.1:7860")
    p.add_argument("--image", required=True, help="image file every request sends")
    p.add_argument("--api-name", default="/predict", help="the endpoint to call")
    p.add_argument("--clients", type=int, default=32, help="requests sent at once")
    p.add_argument("--requests", type=int, default=10, help="per client")
    p.add_argument("--timeout", type=float, default=120, help="seconds one request may take")
    args = p.parse_args(argv)
    if not Path(args.image).is_file():
        raise UserError(f"{args.image}: no such image file")
    try:  # once before the clock starts: a wrong URL is one line, not every client's traceback or failure
        Client(args.url, verbose=False)
    except (httpx.HTTPError, ValueError) as e:  # nothing listening, or no Gradio app there
        raise UserError(f"{args.url}: no Gradio app answers there, is it running? ({first_line(e)})") from None
    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        runs = list(pool.map(lambda _: client_session(args.url, args.image, args.api_name, args.requests,
                                                       args.timeout), range(args.clients)))
    wall = time.perf_counter() - start
    latencies = [x for lat, _ in runs for x in lat]
    errors = [e for _, errs in runs for e in errs]
    result = {"clients": args.clients, "requests": args.clients * args.requests, "ok": len(latencies),
              "failures": len(errors), "p50_ms": round(float(np.percentile(latencies, 50)), 1) if latencies else None,
              "p95_ms": round(float(np.percentile(latencies, 95)), 1) if latencies else None,
              "throughput_per_s": round(len(latencies) / wall, 2), "seconds": round(wall, 2),
              "first_errors": errors[:3]}
    print(f"{result['ok']}/{result['requests']} ok, p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, "
          f"{result['throughput_per_s']} req/s")
    print(json.dumps(result))


if __name__ == "__main__":
    run_cli(main)
