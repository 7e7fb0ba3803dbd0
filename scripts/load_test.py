"""Load test for a running ``snapfusion serve`` on this machine: for each client count, that many concurrent clients
send a bounded number of POST /v1/images/generations; reports throughput, p50/p95 latency, 429s, errors, the
server's mean batch and its peak memory (from /health).

    python -m snapfusion.cli serve --port 7860 &
    python scripts/load_test.py --url http://127.0.0.1:7860 --clients 1,2,4,8 --requests 8 --out results/serve_load.json
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

LOCAL = ("127.0.0.1", "localhost", "::1")
PROMPTS = ("a red apple to the left of a cat", "a blue circle above a dog", "a green car on a yellow background",
           "a cat below a star", "two red balls next to a tree", "a sun above a house")


def call(url: str, path: str, body: dict | None = None, token: str | None = None, timeout: float = 600.0):
    """(status, JSON body, headers) of one request; HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}"), dict(err.headers)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def run_level(args, clients: int) -> dict:
    """``args.requests`` requests from ``clients`` threads; one row of the table."""
    before = call(args.url, "/health")[1]
    lock, next_index = threading.Lock(), [0]
    latencies, statuses = [], []

    def client():
        while True:
            with lock:
                i = next_index[0]
                if i >= args.requests:
                    return
                next_index[0] += 1
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "size": args.size, "seed": args.seed + i, "n": 1,
                    "response_format": "b64_json"}
            if args.steps:
                body["steps"] = args.steps
            if args.model:
                body["model"] = args.model
            t0 = time.perf_counter()
            try:
                status = call(args.url, "/v1/images/generations", body, args.token, args.http_timeout)[0]
            except Exception:  # noqa: BLE001  (a dropped connection counts as an error)
                status = -1
            with lock:
                statuses.append(status)
                if status == 200:
                    latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    after = call(args.url, "/health")[1]
    batches = after["batches"] - before["batches"]
    ok = statuses.count(200)
    return {"clients": clients, "requests": len(statuses), "ok": ok, "wall_s": round(wall, 2),
            "images_per_s": round(ok / wall, 3), "p50_s": _round(percentile(latencies, 50)),
            "p95_s": _round(percentile(latencies, 95)), "rejected_429": statuses.count(429),
            "errors": sum(1 for s in statuses if s not in (200, 429)),
            "mean_batch": round((after["images"] - before["images"]) / batches, 2) if batches else None,
            "server_rss_mib": after.get("rss_mib"), "server_peak_rss_mib": after["peak_rss_mib"]}


def _round(x):
    return None if x is None else round(x, 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="example: python scripts/load_test.py --url http://127.0.0.1:7860 --clients "
                                "1,2,4,8 --requests 8")
    p.add_argument("--url", default="http://127.0.0.1:7860", help="the server (this machine only; default %(default)s)")
    p.add_argument("--clients", default="1,2,4,8",
                   help="comma-separated concurrent client counts (default %(default)s)")
    p.add_argument("--requests", type=int, default=8, help="requests per client count, 1..1000 (default %(default)s)")
    p.add_argument("--size", default="512x512", help="image size (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--model", default=None, help="model id (default: the server's default)")
    p.add_argument("--seed", type=int, default=0, help="request i gets seed + i")
    p.add_argument("--token", default=None, help="bearer token, if the server needs one")
    p.add_argument("--http-timeout", type=float, default=600.0, help="seconds before a client gives up")
    p.add_argument("--warmup", type=int, default=1, help="requests sent (not counted) before measuring")
    p.add_argument("--out", default=None, help="write the rows (and the settings) as JSON here")
    p.add_argument("--note", default="", help="a caption kept in the JSON (the machine, what else ran)")
    args = p.parse_args(argv)
    host = urlparse(args.url).hostname
    if host not in LOCAL:
        print(f"load_test: error: --url must point at this machine ({', '.join(LOCAL)}), got {host!r}",
              file=sys.stderr)
        return 2
    try:
        clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        print(f"load_test: error: --clients must be comma-separated integers, got {args.clients!r}", file=sys.stderr)
        return 2
    if not all(1 <= c <= 256 for c in clients) or not 1 <= args.requests <= 1000:
        print("load_test: error: --clients each 1..256 and --requests 1..1000", file=sys.stderr)
        return 2
    try:
        health = call(args.url, "/health")[1]
    except OSError as err:
        print(f"load_test: error: no server at {args.url}: {err}", file=sys.stderr)
        return 2
    for i in range(args.warmup):
        call(args.url, "/v1/images/generations", {"prompt": PROMPTS[0], "size": args.size, "seed": 10**6 + i,
                                                  **({"steps": args.steps} if args.steps else {})}, args.token)
    rows = []
    print("| clients | requests | images/s | p50 s | p95 s | 429s | errors | mean batch | server RSS after, MiB | "
          "server peak RSS, MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in clients:
        r = run_level(args, c)
        rows.append(r)
        print(f"| {r['clients']} | {r['requests']} | {r['images_per_s']} | {r['p50_s']} | {r['p95_s']} | "
              f"{r['rejected_429']} | {r['errors']} | {r['mean_batch']} | {r['server_rss_mib']} | "
              f"{r['server_peak_rss_mib']} |", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"note": args.note, "command": " ".join(sys.argv), "url": args.url,
                                              "size": args.size, "steps": args.steps,
                                              "model": args.model or health["default_model"],
                                              "max_batch": health["max_batch"],
                                              "queue_capacity": health["queue_capacity"], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
