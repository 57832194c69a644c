"""Serving benchmark: top-10 latency and throughput of the HTTP service over a real catalogue, against in-process.

    python -m simulations.serving --data-dir ../shared/data [--target social/lastfm-sequences] [--epochs 1]
        [--model DIR] [--concurrency 1,4,16] [--requests 400] [--threads 1]

Trains and exports a model for the target platform (--epochs, default 1: latency does not depend on accuracy),
unless --model names an exported folder. Then, with the same requests (each platform user's test history, its
last max-len items, k = 10, seen items excluded):

- baseline: ``ServedModel.recommend`` called in this process, one request after another, before and after the
  HTTP levels (pooled: the load on a shared machine drifts);
- HTTP: ``python -m client.serve http`` started as a subprocess on 127.0.0.1, loaded by ``concurrency`` client
  threads, each with its own keep-alive connection (http.client), at every level given.

Reports p50 / p99 / mean latency, requests/s, errors, the service's resident memory (RSS now and peak) and the
ratios HTTP / in-process. Writes serving.json into the run folder.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from common.config import PollenConfig, add_flags, from_args
from common.files import resolve_run_dir, write_json
from common.processes import free_port
from common.runtime import configure_threads, default_cache_dir

K = 10


class Service:
    """``python -m client.serve http`` in a subprocess on a free local port; stopped on exit."""

    def __init__(self, model: str | Path, threads: int = 1, startup_timeout: float = 120.0):
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "client.serve", "http", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(self.port), "--threads", str(threads), "--log-level", "warning"],
            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + startup_timeout
        while not self._healthy():
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited ({self.process.returncode}): "
                                   f"{self.process.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the service did not answer /health within {startup_timeout:.0f}s")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def memory_mb(self) -> dict[str, float]:
        """Resident memory of the service process now and at its peak (Linux /proc), in MiB."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
        return {"rss-mb": fields.get("VmRSS", float("nan")), "peak-rss-mb": fields.get("VmHWM", float("nan"))}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def latency_summary(seconds: list[float], wall: float, errors: int = 0) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"requests": len(seconds), "errors": errors, "p50-ms": float(np.percentile(ms, 50)),
            "p99-ms": float(np.percentile(ms, 99)), "mean-ms": float(ms.mean()),
            "requests-per-s": len(seconds) / wall if wall > 0 else float("nan")}


def load_test(port: int, bodies: list[bytes], concurrency: int, path: str = "/recommend") -> dict[str, float]:
    """Send every body once, ``concurrency`` threads at a time, each on its own keep-alive connection."""
    next_index = iter(range(len(bodies)))
    lock = threading.Lock()
    latencies: list[float] = []
    errors = [0]

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                start = time.perf_counter()
                conn.request("POST", path, body=bodies[i], headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    errors[0] += response.status != 200
        finally:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latency_summary(latencies, time.perf_counter() - start, errors[0])


def request_histories(split, count: int, max_len: int) -> list[list[str]]:
    """Real histories: each user's test input (last max_len items) as item ids, cycled to ``count`` requests."""
    ids = [[split.item_ids[i - 1] for i in seq[:-1][-max_len:]] for seq in split.sequences]
    return [ids[i % len(ids)] for i in range(count)]


def in_process(model, histories: list[list[str]]) -> tuple[list[float], float]:
    """The baseline: the same recommend calls without HTTP, one after another; (latencies, wall seconds)."""
    latencies = []
    start = time.perf_counter()
    for history in histories:
        t = time.perf_counter()
        model.recommend(history, K)
        latencies.append(time.perf_counter() - t)
    return latencies, time.perf_counter() - start


def run_serving(model_dir: Path, split, levels: list[int], requests: int, threads: int, log=print) -> dict:
    from client.export import load_model

    model = load_model(model_dir)
    histories = request_histories(split, requests, model.config.data.max_len)
    bodies = [json.dumps({"history": h, "k": K}).encode() for h in histories]
    results: dict = {"model": str(model_dir), "items": model.num_items, "k": K, "requests": requests,
                     "history-length-mean": float(np.mean([len(h) for h in histories])), "threads": threads}
    in_process(model, histories[:20])  # warm-up
    before = in_process(model, histories)
    results["in-process-before"] = latency_summary(*before)
    results["http"] = {}
    with Service(model_dir, threads) as service:
        results["service-memory-idle"] = service.memory_mb()
        load_test(service.port, bodies[:20], 1)  # warm-up
        # the same top-10 through HTTP as in process
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=60)
        conn.request("POST", "/recommend", body=bodies[0], headers={"Content-Type": "application/json"})
        served = [row["item"] for row in json.loads(conn.getresponse().read())["items"]]
        conn.close()
        results["http-equals-in-process"] = served == [row["item"] for row in model.recommend(histories[0], K)]
        for level in levels:
            r = load_test(service.port, bodies, level)
            r.update(service.memory_mb())
            results["http"][str(level)] = r
    # the baseline again after the HTTP levels: on a shared machine the load drifts, so the two are pooled
    after = in_process(model, histories)
    results["in-process-after"] = latency_summary(*after)
    base = results["in-process"] = latency_summary(before[0] + after[0], before[1] + after[1])
    log(f"in-process (before + after): p50 {base['p50-ms']:.2f} ms  p99 {base['p99-ms']:.2f} ms  "
        f"{base['requests-per-s']:.0f} req/s")
    for level, r in results["http"].items():
        r["p50-ratio-vs-in-process"] = r["p50-ms"] / base["p50-ms"]
        r["throughput-ratio-vs-in-process"] = r["requests-per-s"] / base["requests-per-s"]
        log(f"http, {level:>2} concurrent: p50 {r['p50-ms']:.2f} ms  p99 {r['p99-ms']:.2f} ms  "
            f"{r['requests-per-s']:.0f} req/s  errors {r['errors']}  RSS {r['rss-mb']:.0f} MiB "
            f"(peak {r['peak-rss-mb']:.0f}); p50 x{r['p50-ratio-vs-in-process']:.2f} of in-process")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="social/lastfm-sequences",
                        help="platform folder, under --data-dir or a path")
    parser.add_argument("--model", default="", help="an exported model folder; empty = train and export one")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs when no --model is given")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client thread counts")
    parser.add_argument("--requests", type=int, default=400, help="requests per level")
    parser.add_argument("--cache-dir", default=default_cache_dir(), help="where frozen-layer item states are kept")
    add_flags(parser, PollenConfig().replace(**{"data-dir": "../shared/data", "threads": 1}))
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1 or args.requests < 1 or args.epochs < 1:
        parser.error("--concurrency needs positive integers; --requests and --epochs must be >= 1")
    config = from_args(args)
    threads = configure_threads(config.train.threads)
    run_dir = resolve_run_dir(config.federation.run_dir, "serving")
    from common.data.sources import load_split

    name = Path(args.target).name
    path = Path(args.target) if Path(args.target).is_dir() else Path(config.data.data_dir) / args.target
    split = load_split(config.data, name, str(path))
    print(f"{name}: {split.num_users:,} users, {split.num_items:,} items", flush=True)
    model_dir = Path(args.model) if args.model else run_dir / "model"
    train_seconds = None
    if not args.model:
        from client.adapt import adapt
        from client.export import export_model

        start = time.perf_counter()
        adapted = adapt(split, config, None, args.epochs, 1.0, args.cache_dir, label=f"[{name}] ")
        export_model(model_dir, adapted.platform, config, {"test": adapted.result.test[name]})
        train_seconds = time.perf_counter() - start
    results = run_serving(model_dir, split, levels, args.requests, threads, log=lambda m: print(m, flush=True))
    results.update({"target": str(path), "train-seconds": train_seconds, "cpu-count": os.cpu_count(),
                    "load-average-1min": os.getloadavg()[0]})
    write_json(run_dir / "serving.json", results)
    print(f"written to {run_dir / 'serving.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
