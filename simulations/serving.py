"""Serving benchmark: top-10 latency and throughput of the HTTP service over a real catalogue, against in-process.

    python -m simulations.serving --data-dir ../shared/data [--target social/lastfm-sequences] [--epochs 1]
        [--model DIR] [--concurrency 1,4,16] [--requests 2000] [--threads 1] [--batch-max 64] [--batch-wait-ms 1]

Trains and exports a model for the target platform (--epochs, default 1: latency does not depend on accuracy),
unless --model names an exported folder. Then, with the same requests (each platform user's test history, its
last max-len items, k = 10, seen items excluded):

- baseline: ``ServedModel.recommend`` called in this process, one request after another, before and after the
  HTTP levels (pooled: the load on a shared machine drifts);
- HTTP: ``python -m client.serve http`` (micro-batching, scoring on --threads torch threads) started as a
  subprocess on 127.0.0.1, loaded over ``concurrency`` keep-alive connections (one asyncio client, each
  connection one request at a time), at every level given.

Reports p50 / p99 / mean latency, requests/s, errors, how many of the served top-10 lists differ from the
in-process ones (every response is checked), the mean micro-batch, the service's resident memory (RSS now and
peak) and the ratios HTTP / in-process. Writes serving.json into the run folder.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import subprocess
import sys
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

    def __init__(self, model: str | Path, threads: int = 1, startup_timeout: float = 120.0,
                 extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "client.serve", "http", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(self.port), "--threads", str(threads), "--log-level", "warning", *extra_args],
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
            self.health()
            return True
        except OSError:
            return False

    def health(self) -> dict:
        """GET /health: the catalogue size and the scoring thread's counters (passes, requests)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            if response.status != 200:
                raise OSError(f"/health answered {response.status}")
            return json.loads(response.read())
        finally:
            conn.close()

    def memory_mb(self) -> dict[str, float]:
        """Resident memory of the service process now and at its peak (Linux /proc), in MiB."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
        return {"rss-mb": fields.get("VmRSS", float("nan")), "peak-rss-mb": fields.get("VmHWM", float("nan"))}

    def cpu_seconds(self) -> float:
        """User + system CPU time the service process has used so far (Linux /proc), all its threads."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

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


def load_test(port: int, bodies: list[bytes], concurrency: int, path: str = "/recommend",
              responses: list | None = None) -> dict[str, float]:
    """Send every body once over ``concurrency`` keep-alive connections, each one request at a time.

    One asyncio event loop (uvloop when installed) drives all connections with plain HTTP/1.1 on sockets, so
    the load generator costs little CPU next to the service it measures (the two share the machine). A
    request's latency runs from writing it to having read its whole response. ``responses``, when given, gets
    each response body at its request's index.
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        uvloop = None
    run = uvloop.run if uvloop is not None else asyncio.run
    return run(_load(port, bodies, concurrency, path, responses))


async def _load(port: int, bodies: list[bytes], concurrency: int, path: str, responses: list | None) -> dict:
    pending = iter(range(len(bodies)))  # shared by the workers; one thread, so no lock
    latencies: list[float] = []
    errors = 0
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n".encode()

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in pending:
                start = time.perf_counter()
                writer.write(b"%sContent-Length: %d\r\n\r\n%s" % (head, len(bodies[i]), bodies[i]))
                status, close, body = await _read_response(reader)
                latencies.append(time.perf_counter() - start)
                errors += status != 200
                if responses is not None:
                    responses[i] = body
                if close:
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latency_summary(latencies, time.perf_counter() - start, errors)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """(status, whether the server closes the connection, body) of one HTTP/1.1 response."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    else:
        body = await reader.readexactly(int(headers.get("content-length", 0)))
    return status, headers.get("connection", "").lower() == "close", body


def request_histories(split, count: int, max_len: int) -> list[list[str]]:
    """Real histories: each user's test input (last max_len items) as item ids, cycled to ``count`` requests."""
    ids = [[split.item_ids[i - 1] for i in seq[:-1][-max_len:]] for seq in split.sequences]
    return [ids[i % len(ids)] for i in range(count)]


def in_process(model, histories: list[list[str]], lists: list | None = None) -> tuple[list[float], float]:
    """The baseline: the same recommend calls without HTTP, one after another; (latencies, wall seconds).

    ``lists``, when given, gets each request's top-k item ids."""
    latencies = []
    start = time.perf_counter()
    for history in histories:
        t = time.perf_counter()
        rows = model.recommend(history, K)
        latencies.append(time.perf_counter() - t)
        if lists is not None:
            lists.append([row["item"] for row in rows])
    return latencies, time.perf_counter() - start


def run_serving(model_dir: Path, split, levels: list[int], requests: int, threads: int, log=print,
                service_args: tuple[str, ...] = ()) -> dict:
    from client.export import load_model

    model = load_model(model_dir)
    histories = request_histories(split, requests, model.config.data.max_len)
    bodies = [json.dumps({"history": h, "k": K}).encode() for h in histories]
    results: dict = {"model": str(model_dir), "items": model.num_items, "k": K, "requests": requests,
                     "history-length-mean": float(np.mean([len(h) for h in histories])), "threads": threads,
                     "service-args": list(service_args)}
    in_process(model, histories[:20])  # warm-up
    expected: list[list[str]] = []
    cpu = time.process_time()
    before = in_process(model, histories, expected)
    cpu_before = time.process_time() - cpu
    results["in-process-before"] = latency_summary(*before)
    results["http"] = {}
    with Service(model_dir, threads, extra_args=service_args) as service:
        results["service-memory-idle"] = service.memory_mb()
        load_test(service.port, bodies[:20], 1)  # warm-up
        for level in levels:
            served: list = [None] * len(bodies)
            counters = service.health()
            cpu, own = service.cpu_seconds(), time.process_time()
            r = load_test(service.port, bodies, level, responses=served)
            # CPU per request, the figure the machine's other load does not change much: service and client
            r["service-cpu-ms-per-request"] = (service.cpu_seconds() - cpu) * 1000 / len(bodies)
            r["client-cpu-ms-per-request"] = (time.process_time() - own) * 1000 / len(bodies)
            after_level = service.health()
            r.update(service.memory_mb())
            # every response, not a sample: the same top-10 through HTTP (micro-batched) as in process, in order
            r["top10-different"] = sum(1 for body, want in zip(served, expected)
                                       if body is None or [row["item"] for row in _items(body)] != want)
            passes = after_level["scoring"]["passes"] - counters["scoring"]["passes"]
            scored = after_level["scoring"]["requests"] - counters["scoring"]["requests"]
            r["mean-batch"] = scored / passes if passes else float("nan")
            r["scoring-busy"] = (after_level["scoring"]["seconds"] - counters["scoring"]["seconds"]) \
                * r["requests-per-s"] / r["requests"]  # scoring time / wall time of the level
            results["http"][str(level)] = r
    results["http-equals-in-process"] = all(r["top10-different"] == 0 for r in results["http"].values())
    # the baseline again after the HTTP levels: on a shared machine the load drifts, so the two are pooled
    cpu = time.process_time()
    after = in_process(model, histories)
    cpu_after = time.process_time() - cpu
    results["in-process-after"] = latency_summary(*after)
    base = results["in-process"] = latency_summary(before[0] + after[0], before[1] + after[1])
    base["cpu-ms-per-request"] = (cpu_before + cpu_after) * 1000 / (2 * len(histories))
    log(f"in-process (before + after): p50 {base['p50-ms']:.2f} ms  p99 {base['p99-ms']:.2f} ms  "
        f"{base['requests-per-s']:.0f} req/s  CPU/request {base['cpu-ms-per-request']:.2f} ms  "
        f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    for level, r in results["http"].items():
        r["p50-ratio-vs-in-process"] = r["p50-ms"] / base["p50-ms"]
        r["throughput-ratio-vs-in-process"] = r["requests-per-s"] / base["requests-per-s"]
        log(f"http, {level:>2} concurrent: p50 {r['p50-ms']:.2f} ms  p99 {r['p99-ms']:.2f} ms  "
            f"{r['requests-per-s']:.0f} req/s (x{r['throughput-ratio-vs-in-process']:.2f} of in-process)  "
            f"errors {r['errors']}  top-10 different {r['top10-different']}/{r['requests']}  "
            f"mean batch {r['mean-batch']:.1f} (scorer busy {r['scoring-busy']:.0%})  CPU/request: service "
            f"{r['service-cpu-ms-per-request']:.2f} ms, client {r['client-cpu-ms-per-request']:.2f} ms  "
            f"RSS {r['rss-mb']:.0f} MiB (peak {r['peak-rss-mb']:.0f})")
    return results


def _items(body: bytes) -> list[dict]:
    try:
        return json.loads(body)["items"]
    except (ValueError, KeyError, TypeError):
        return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="social/lastfm-sequences",
                        help="platform folder, under --data-dir or a path")
    parser.add_argument("--model", default="", help="an exported model folder; empty = train and export one")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs when no --model is given")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client thread counts")
    parser.add_argument("--requests", type=int, default=2000, help="requests per level")
    parser.add_argument("--batch-max", type=int, default=64, help="the service's --batch-max")
    parser.add_argument("--batch-wait-ms", type=float, default=1.0, help="the service's --batch-wait-ms")
    parser.add_argument("--cache-dir", default=default_cache_dir(), help="where frozen-layer item states are kept")
    add_flags(parser, PollenConfig().replace(**{"data-dir": "../shared/data", "threads": 1}))
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1 or args.requests < 1 or args.epochs < 1 or args.batch_max < 1 \
            or args.batch_wait_ms < 0:
        parser.error("--concurrency needs positive integers; --requests, --epochs and --batch-max must be >= 1, "
                     "--batch-wait-ms >= 0")
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
    service_args = ("--batch-max", str(args.batch_max), "--batch-wait-ms", str(args.batch_wait_ms))
    results = run_serving(model_dir, split, levels, args.requests, threads, log=lambda m: print(m, flush=True),
                          service_args=service_args)
    results.update({"target": str(path), "train-seconds": train_seconds, "cpu-count": os.cpu_count(),
                    "load-average-1min": os.getloadavg()[0]})
    write_json(run_dir / "serving.json", results)
    print(f"written to {run_dir / 'serving.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
