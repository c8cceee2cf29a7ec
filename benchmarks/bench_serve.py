"""Load on `digitwatch serve` over loopback, against one `digitwatch predict` process per image.

    .venv/bin/python benchmarks/bench_serve.py [--requests 2000] [--clients 16]

Starts the real server (`python -m digitwatch serve --port 0`) on 127.0.0.1 with fresh
folders, warms it up, then sends `--requests` POST /v1/predict requests of 28x28 PNG digits
from `--clients` concurrent clients (threads, each with one keep-alive connection), and
fails on any answer other than 200 with status ok. Then the same kind of image one at a
time through `--cli-runs` `digitwatch predict` processes, for the ratio. Bounded: every
request has a 30 s timeout, the whole load a `--deadline`; loopback only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from daemon_helpers import digit_png  # noqa: E402
from serve_helpers import ServeProcess  # noqa: E402


def load(url: str, images: list[bytes], requests: int, clients: int, deadline: float) -> dict:
    parts = urlsplit(url)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    next_index = iter(range(requests))
    stop_at = time.monotonic() + deadline

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            while time.monotonic() < stop_at:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                body = images[i % len(images)]
                t0 = time.perf_counter()
                conn.request("POST", f"/v1/predict?name=d{i}.png", body=body)
                r = conn.getresponse()
                data = r.read()
                dt = time.perf_counter() - t0
                ok = r.status == 200 and json.loads(data)["status"] == "ok"
                with lock:
                    latencies.append(dt)
                    if not ok:
                        errors.append(f"{r.status}: {data[:200]!r}")
        except (OSError, http.client.HTTPException) as e:
            with lock:
                errors.append(f"{type(e).__name__}: {e}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, name=f"client-{k}") for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies.sort()
    done = len(latencies)
    return {
        "requests": done,
        "errors": len(errors) + (requests - done),
        "first_errors": errors[:3],
        "seconds": round(wall, 3),
        "per_s": round(done / wall, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[min(done - 1, int(0.99 * done))], 2),
    }


def one_at_a_time(images: list[bytes], runs: int, folder: Path) -> dict:
    exe = Path(sys.executable).parent / "digitwatch"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITWATCH_")}
    paths = []
    for i in range(runs):
        p = folder / f"cli{i}.png"
        p.write_bytes(images[i % len(images)])
        paths.append(p)
    t0 = time.perf_counter()
    for p in paths:
        out = subprocess.run(
            [str(exe), "predict", str(p), "--format", "json"],
            capture_output=True,
            env=env,
            check=True,
            timeout=60,
        )
        assert json.loads(out.stdout)[0]["status"] == "ok"
    wall = time.perf_counter() - t0
    return {"runs": runs, "seconds": round(wall, 3), "per_s": round(runs / wall, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--cli-runs", type=int, default=20)
    ap.add_argument("--deadline", type=float, default=300.0, help="seconds the load may take")
    args = ap.parse_args()

    images = [digit_png(seed) for seed in range(32)]
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        inbox, outbox = root / "inbox", root / "outbox"
        inbox.mkdir()
        outbox.mkdir()
        server = ServeProcess(inbox, outbox, log=root / "serve.log")
        try:
            server.wait_serving()
            load(server.url, images, 100, args.clients, 60)  # warm-up, not counted
            served = load(server.url, images, args.requests, args.clients, args.deadline)
        finally:
            server.stop()
        cli = one_at_a_time(images, args.cli_runs, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ratio = served["per_s"] / cli["per_s"]
    print(
        f"serve: {served['requests']} requests from {args.clients} clients, "
        f"{served['errors']} errors, {served['per_s']:.0f} requests/s, "
        f"p50 {served['p50_ms']:.1f} ms, p99 {served['p99_ms']:.1f} ms"
    )
    print(
        f"predict, one process per image: {cli['per_s']:.2f} images/s "
        f"({cli['runs']} runs in {cli['seconds']:.1f} s); serve is {ratio:.0f}x that"
    )
    print(json.dumps({"serve": served, "predict_processes": cli, "ratio": round(ratio, 1)}))
    return 0 if served["errors"] == 0 and ratio >= 5 else 1


if __name__ == "__main__":
    sys.exit(main())
