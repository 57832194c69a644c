"""A new user's mistakes, measured: each case of issue 14 run as a command, with its exit status, lines of output
and seconds until it ended, in any checkout of Pollen (so the same cases can be run before and after a change).

    python -m simulations.mistakes                                   # this checkout, every case
    python -m simulations.mistakes --tree /work/wt-before --out runs/mistakes-before   # another checkout
    python -m simulations.mistakes --cases sim-bad-timestamp,adapt-nan-adapter --cap 120
    python -m simulations.mistakes --table runs/mistakes-before runs/mistakes-after     # the before -> after table

The inputs are built here, in a scratch folder, from the embedded synthetic generator: two platform folders in
the documented format (``shop-export``, ``forum-export``), and broken copies of them, an all-NaN adapter,
damaged checkpoints. Every command runs with one torch thread and Flower's offline environment; a command still
running after ``--cap`` seconds is stopped (its process group) and reported as a timeout. Writes
``mistakes.json`` and ``mistakes.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

PROJECT = Path(__file__).resolve().parents[1]
SMALL = ["--num-rounds", "1", "--max-steps", "2", "--threads", "1"]  # a federation that fails or ends quickly
ADAPT = ["--epochs", "1", "--max-steps", "2", "--threads", "1"]


@dataclass
class Case:
    name: str
    what: str                      # the mistake, in words
    argv: Callable[[Path], list[str]]  # scratch folder -> the command's arguments after "python -m"
    expected: str                  # what the fixed code should do
    before: Callable[[Path, "Runner"], object] | None = None  # started first (e.g. a competing run)
    after_check: Callable[[Path], str] | None = None  # a note on the result (e.g. were old results kept)
    cap: float | None = None       # its own cap (seconds), else --cap
    tags: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- the inputs
def write_platforms(root: Path, names: dict[str, str] | None = None, seed: int = 0) -> Path:
    """Platform folders in the documented generic format (interactions.csv, items.csv) from the synthetic data."""
    from common.data.synthetic import SyntheticConfig, generate

    names = names or {"ecommerce": "shop-export", "social": "forum-export", "video": "video-export"}
    for data in generate(SyntheticConfig(seed=seed)):
        if data.name not in names:
            continue
        folder = root / names[data.name]
        folder.mkdir(parents=True, exist_ok=True)
        data.interactions[["user", "item", "timestamp"]].to_csv(folder / "interactions.csv", index=False)
        data.items[["item", "text"]].to_csv(folder / "items.csv", index=False)
    return root


def broken_copy(root: Path, name: str, edit: Callable[[list[str]], list[str]], source: str = "shop-export") -> str:
    """A copy of a platform folder whose interactions.csv lines went through ``edit``; returns its folder name."""
    target = root / name
    if not target.exists():
        shutil.copytree(root / source, target)
        lines = (root / source / "interactions.csv").read_text().splitlines()
        (target / "interactions.csv").write_text("\n".join(edit(lines)) + "\n")
    return name


def set_cell(line: int, column: str, value: str) -> Callable[[list[str]], list[str]]:
    """Replace one cell (1-based line, the header is line 1) of a CSV without quoted commas."""
    def edit(lines: list[str]) -> list[str]:
        header = lines[0].split(",")
        if column not in header:
            header.append(column)
            lines = [lines[0] + "," + column] + [row + "," for row in lines[1:]]
        cells = lines[line - 1].split(",")
        cells[header.index(column)] = value
        lines[line - 1] = ",".join(cells)
        return lines
    return edit


def ratings(value: str) -> Callable[[list[str]], list[str]]:
    """Every row rated 4, line 3 rated ``value``."""
    def edit(lines: list[str]) -> list[str]:
        lines = [lines[0] + ",rating"] + [row + ",4" for row in lines[1:]]
        return set_cell(3, "rating", value)(lines)
    return edit


def few_interactions(lines: list[str]) -> list[str]:
    """Keep each user's first two interactions only: every user has < 3."""
    seen: dict[str, int] = {}
    kept = [lines[0]]
    for row in lines[1:]:
        user = row.split(",")[0]
        seen[user] = seen.get(user, 0) + 1
        if seen[user] <= 2:
            kept.append(row)
    return kept


def nan_adapter(root: Path) -> Path:
    """An adapter folder of the default model (its recommendation adapters, and LoRA when it has any) whose every
    tensor is NaN."""
    folder = root / "nan-adapter"
    if not folder.exists():
        import torch
        from safetensors.torch import load_file, save_file

        from common.config import ModelConfig
        from common.model.encoder import TextEncoder

        TextEncoder(ModelConfig(), seed=42).save_adapter(folder)
        for file in folder.glob("*.safetensors"):
            save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(file).items()}, str(file))
    return folder


def earlier_run(root: Path, name: str, state: str | None, adapter: bytes | None = None) -> Path:
    """A run folder with earlier results (results.json marked 'EARLIER') and a checkpoint folder; ``state`` is
    the text of checkpoint/state.json (None: missing), ``adapter`` the bytes of its adapter (None: missing)."""
    run = Path(fresh(name))
    (run / "checkpoint").mkdir(parents=True)
    (run / "results.json").write_text('{"marker": "EARLIER"}\n')
    if state is not None:
        (run / "checkpoint" / "state.json").write_text(state)
    if adapter is not None:
        (run / "checkpoint" / "adapter.safetensors").write_bytes(adapter)
    return run


def fresh(name: str) -> str:
    """A run folder that does not exist yet, under this measurement's output folder."""
    path = RUNNER.logs.parent / "runs" / name
    shutil.rmtree(path, ignore_errors=True)
    return str(path)


def kept_earlier(run: Path) -> str:
    text = (run / "results.json").read_text() if (run / "results.json").is_file() else ""
    return "earlier results.json kept" if "EARLIER" in text else "earlier results.json REPLACED"


def state_json(**changes) -> str:
    from common.config import PollenConfig

    state = {"version": 1, "round": 0, "federation-id": "abc", "record": {"evaluations": {}, "training": {},
             "round_seconds": {}, "failures": {}}, "config": PollenConfig().to_flat(), "nodes": {}}
    state.update(changes)
    return json.dumps({k: v for k, v in state.items() if v is not None})


def non_utf8_folder(root: Path) -> str:
    """A copy of shop-export under a folder name that is not UTF-8 (Latin-1 'é'); returns the path as str."""
    raw = os.fsencode(root) + b"/caf\xe9-export"
    if not os.path.exists(raw):
        shutil.copytree(root / "shop-export", os.fsdecode(raw))
    return os.fsdecode(raw)


def tls_superlink(root: Path, runner: "Runner") -> subprocess.Popen:
    """A SuperLink with TLS (and node authentication) on a free port of 127.0.0.1, for the insecure-node case."""
    from common.processes import free_port, start_process, wait_for_port
    from server.certs import make_server_cert
    from server.launch import superlink_command

    certs = root / "certs"
    make_server_cert(certs, "127.0.0.1")
    runner.port = free_port()
    link = start_process(superlink_command("127.0.0.1", runner.port, certs, root / "superlink" / "state.db"),
                         root / "superlink.log", cwd=root)
    wait_for_port("127.0.0.1", runner.port, 60, link)
    return link


def competing_run(root: Path, runner: "Runner") -> subprocess.Popen:
    """A first simulation on run folder 'shared-run', left running; the measured command is the second one."""
    run = Path(fresh("shared-run"))
    process = runner.start(["simulations.run", "--data-dir", str(root), "--platforms",
                            "shop=shop-export,forum=forum-export,video=video-export", "--run-dir", str(run), *SMALL,
                            "--num-rounds", "2"], runner.logs / "first-run.log")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run / "results.json").exists() and process.poll() is None:
        time.sleep(0.5)  # the first run is working (Ray started) before the second starts
    return process


# ---------------------------------------------------------------------------------------------- the cases
def cases() -> list[Case]:
    byod = ["--platforms", "shop=shop-export,forum=forum-export"]  # the README's example: 2 platforms
    three = ["--platforms", "shop=shop-export,forum=forum-export,video=video-export"]  # the old default count
    sim = lambda r, *extra: ["simulations.run", "--data-dir", str(r), *extra]  # noqa: E731
    adapt = lambda r, data, *extra: ["client.adapt", "--data-path", data if data.startswith("/") else  # noqa: E731
                                     str(r / data), "--export-dir", fresh("export-" + os.path.basename(data)), *ADAPT, *extra]
    bad_ts = lambda r: broken_copy(r, "bad-timestamp", set_cell(3, "timestamp", "yesterday"))  # noqa: E731
    return [
        Case("readme-byod-2", "README's bring-your-own-data command, 2 platforms, default settings",
             lambda r: sim(r, *byod, "--run-dir", fresh("byod2")), "finishes (min-clients = 2 platforms)",
             tags=["long"]),
        Case("byod-1", "the same with 1 platform (1 round)",
             lambda r: sim(r, "--platforms", "shop=shop-export", "--num-rounds", "1", "--run-dir", fresh("byod1")),
             "finishes"),
        Case("sim-bad-timestamp", "simulation of 3 platforms, one's line 3 has timestamp 'yesterday' (2 rounds)",
             lambda r: sim(r, "--platforms", f"shop={bad_ts(r)},forum=forum-export,video=video-export", "--num-rounds", "2",
                           "--threads", "1", "--run-dir", fresh("bad-ts")),
             "exit 2, one line naming file, line, column, before Ray"),
        Case("adapt-bad-timestamp", "client.adapt on the same folder",
             lambda r: adapt(r, bad_ts(r)), "exit 2, one line"),
        Case("sim-threads-negative", "--threads -1", lambda r: sim(r, *three, *SMALL, "--threads", "-1",
                                                                     "--run-dir", fresh("t")), "exit 2, one line"),
        Case("sim-device-bogus", "--device bogus", lambda r: sim(r, *three, *SMALL, "--device", "bogus",
                                                                   "--run-dir", fresh("d")), "exit 2, one line"),
        Case("sim-missing-folder", "a platform folder that does not exist",
             lambda r: sim(r, "--platforms", "shop=shop-export,forum=forum-export,video=no-such-folder", *SMALL,
                           "--run-dir", fresh("m")), "exit 2, one line"),
        Case("sim-lora-layers-0", "--lora-layers 0 in a federation (now the default: a frozen encoder, the "
             "text adaptor and sequence encoder shared)",
             lambda r: sim(r, *three, *SMALL, "--lora-layers", "0", "--run-dir", fresh("l")), "finishes"),
        Case("load-timestamp-20-digits", "timestamp 123456789012345678901234 (client.adapt)",
             lambda r: adapt(r, broken_copy(r, "ts-digits", set_cell(3, "timestamp", "1" * 24))), "exit 2, one line"),
        Case("load-date-1500", "ISO date 1500-01-01, outside pandas' nanosecond range (client.adapt)",
             lambda r: adapt(r, broken_copy(r, "ts-1500", set_cell(3, "timestamp", "1500-01-01"))),
             "loads (years 1-9999 are in range)"),
        Case("load-non-utf8-folder", "platform folder whose name is not UTF-8 (client.adapt)",
             lambda r: adapt(r, non_utf8_folder(r)), "exit 2, one line"),
        Case("load-under-3-interactions", "every user has < 3 interactions (client.adapt)",
             lambda r: adapt(r, broken_copy(r, "few", few_interactions)), "exit 2, one line"),
        Case("load-rating-negative", "rating -50 (client.adapt)",
             lambda r: adapt(r, broken_copy(r, "rating-neg", ratings("-50"))), "exit 2, one line"),
        Case("load-rating-inf", "rating inf (client.adapt)",
             lambda r: adapt(r, broken_copy(r, "rating-inf", ratings("inf"))), "exit 2, one line"),
        Case("load-rating-1e300", "rating 1e300 with --rating-weight 1 (client.adapt)",
             lambda r: adapt(r, broken_copy(r, "rating-big", ratings("1e300")), "--rating-weight", "1"),
             "exit 2, one line"),
        Case("adapt-nan-adapter", "client.adapt --adapter holding only NaN tensors",
             lambda r: adapt(r, "shop-export", "--adapter", str(nan_adapter(r))), "exit 2, one line naming the file"),
        Case("rerun-without-state", "rerun on a --run-dir whose checkpoint/state.json is missing (1 round)",
             lambda r: sim(r, *three, *SMALL, "--run-dir", str(earlier_run(r, "no-state", None, b"x"))),
             "exit 2, refused; earlier results kept", after_check=lambda r: kept_earlier(RUNNER.logs.parent / "runs" / "no-state")),
        Case("checkpoint-bad-header", "checkpoint/adapter.safetensors with a damaged header",
             lambda r: sim(r, *three, *SMALL, "--run-dir", str(earlier_run(r, "bad-header", state_json(),
                                                                            b"\xff" * 64))),
             "exit 2, one line naming the file"),
        Case("checkpoint-no-round", "checkpoint/state.json without 'round'",
             lambda r: sim(r, *three, *SMALL, "--run-dir", str(earlier_run(r, "no-round", state_json(round=None),
                                                                            b"x"))),
             "exit 2, one line naming the file"),
        Case("two-runs-one-folder", "a second simulation on the --run-dir a running one writes",
             lambda r: sim(r, *three, *SMALL, "--run-dir", str(RUNNER.logs.parent / "runs" / "shared-run")), "exit 2 at once, refused",
             before=competing_run),
        Case("insecure-node-vs-tls", "client.launch --insecure against a TLS SuperLink",
             lambda r: ["client.launch", "--superlink", f"127.0.0.1:{RUNNER.port}", "--platform", "shop",
                        "--data-path", str(r / "shop-export"), "--home", str(r / "node"), "--insecure"],
             "exit 2 at once, saying the SuperLink speaks TLS", before=tls_superlink, cap=60),
    ]


# ---------------------------------------------------------------------------------------------- running
class Runner:
    def __init__(self, tree: Path, cap: float, logs: Path):
        self.tree, self.cap, self.logs = tree.resolve(), cap, logs
        self.port = 0

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(PYTHONPATH=str(self.tree), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0",
                   FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_DISABLE_UPDATE_CHECK="1",
                   FLWR_HOME=str(self.logs / "flwr-home"), PYTHONUNBUFFERED="1")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def start(self, argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            return subprocess.Popen([sys.executable, "-m", *argv], cwd=self.tree, env=self.env(), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def measure(self, case: Case, scratch: Path) -> dict:
        helper = case.before(scratch, self) if case.before else None
        try:
            argv = case.argv(scratch)
            log = self.logs / f"{case.name}.log"
            cap = case.cap or self.cap
            start = time.perf_counter()
            process = self.start(argv, log)
            try:
                code: int | str = process.wait(cap)
            except subprocess.TimeoutExpired:
                code = "timeout"
            seconds = time.perf_counter() - start
            _stop(process)
        finally:
            if helper is not None:
                _stop(helper)
        text = log.read_text(errors="replace")
        lines = text.splitlines()
        return {"case": case.name, "what": case.what, "expected": case.expected, "exit": code,
                "lines": len(lines), "seconds": round(seconds, 1), "cap": cap,
                "last-line": next((line for line in reversed(lines) if line.strip()), "")[:300],
                "note": case.after_check(scratch) if case.after_check else "",
                "command": "python -m " + " ".join(argv)}


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()


RUNNER: Runner  # the cases' argv may need the runner's state (the insecure case's port)


# ---------------------------------------------------------------------------------------------- the table
def table(before: list[dict], after: list[dict]) -> str:
    old = {r["case"]: r for r in before}
    rows = ["| case | mistake | before: exit, lines, s | after: exit, lines, s | after: last line |",
            "|---|---|---|---|---|"]
    for r in after:
        b = old.get(r["case"])
        cell = lambda x: (f"{x['exit']}, {x['lines']}, {x['seconds']:.0f}" +  # noqa: E731
                          (f" (cap {x['cap']:.0f} s)" if x["exit"] == "timeout" else "")
                          + (f"; {x['note']}" if x.get("note") else "")) if x else "-"
        last = r["last-line"].replace("|", "\\|")
        rows.append(f"| {r['case']} | {r['what']} | {cell(b)} | {cell(r)} | {last[:160]} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    global RUNNER
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", default=str(PROJECT), help="the Pollen checkout whose commands are measured")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated case names to leave out")
    parser.add_argument("--cap", type=float, default=300.0, help="seconds after which a command is stopped")
    parser.add_argument("--out", default="", help="folder for mistakes.json, .md and the logs")
    parser.add_argument("--scratch", default="", help="folder for the inputs (default: OUT/inputs)")
    parser.add_argument("--table", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="only print the before->after table (each side: output folders, comma-separated)")
    args = parser.parse_args(argv)
    if args.table:
        before, after = ([r for d in side.split(",") for r in json.loads((Path(d) / "mistakes.json").read_text())
                          ["results"]] for side in args.table)
        print(table(before, after))
        return 0
    chosen = [c for c in cases() if (not args.cases or c.name in args.cases.split(","))
              and c.name not in args.skip.split(",")]
    if not chosen:
        parser.error(f"--cases: none of {args.cases!r}; known: {', '.join(c.name for c in cases())}")
    out = Path(args.out or PROJECT / "runs" / time.strftime("mistakes-%Y%m%d-%H%M%S")).resolve()
    scratch = Path(args.scratch).resolve() if args.scratch else out / "inputs"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if not all((scratch / f).is_dir() for f in ("shop-export", "forum-export", "video-export")):
        write_platforms(scratch)
    RUNNER = Runner(Path(args.tree), args.cap, out / "logs")
    results = []
    for case in chosen:
        result = RUNNER.measure(case, scratch)
        results.append(result)
        print(f"{case.name}: exit {result['exit']}, {result['lines']} lines, {result['seconds']:.1f}s  "
              f"| {result['last-line'][:150]}", flush=True)
        (out / "mistakes.json").write_text(json.dumps({"tree": str(RUNNER.tree), "results": results}, indent=2))
    (out / "mistakes.md").write_text(table([], results))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
