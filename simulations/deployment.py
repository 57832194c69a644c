"""A real deployment on one machine: a SuperLink and one SuperNode per platform on 127.0.0.1, TLS + node auth.

    python -m simulations.deployment                       # 2 rounds, embedded data, the real MiniLM
    python -m simulations.deployment --compare-simulation --compare-no-worker   # where each second goes

Every process is Flower's own (flower-superlink, flower-supernode, flwr run) or Pollen's node worker, started
through the same launch code an operator and a partner use (server/launch.py, python -m client.launch: a
SuperNode plus its warm worker, client/worker.py), each in its own process group on a free port, and stopped on
exit or failure. Prints a line per round (from the ServerApp's log), the run's wall time, the mean seconds per
message by where they went (process start + Flower, model imports, session build, hand-off to the worker,
training, evaluating) and the round times; writes ``deployment.json`` into the run folder.
``--compare-no-worker`` also runs the nodes without their warm workers (every message in a fresh process, as
Flower does by itself); ``--compare-simulation`` runs the same work in Flower's simulation engine afterwards and
prints each deployed round against the simulated one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import cli
from common.config import PollenConfig, add_flags, from_args
from common.data.sources import SYNTHETIC_PLATFORMS
from common.files import write_json
from common.processes import flower_binary, free_port, start_process, stop_process, wait_for_port
from server.certs import make_partner_key, make_server_cert
from server.launch import node_statuses, register, submit_run, superlink_command, wait_run, write_connection
from client.launch import supernode_command

PROJECT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


class LocalDeployment:
    """SuperLink + SuperNodes on 127.0.0.1 in ``workdir``; use as a context manager so everything is stopped."""

    def __init__(self, workdir: Path, platforms: tuple[str, ...] = SYNTHETIC_PLATFORMS, threads: int = 1,
                 worker: bool = True):
        self.workdir = Path(workdir).resolve()
        self.platforms, self.threads, self.worker = platforms, threads, worker
        self.certs = self.workdir / "certs"
        self.connection = "pollen-local"
        self.port = free_port(HOST)
        self.node_ports = {name: free_port(HOST) for name in platforms}
        self.link: subprocess.Popen | None = None
        self.nodes: dict[str, subprocess.Popen] = {}
        self._saved_home = os.environ.get("FLWR_HOME")

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> "LocalDeployment":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        os.environ["FLWR_HOME"] = str(self.workdir / "flwr-home")  # this deployment's connections only
        make_server_cert(self.certs, HOST)
        self.start_superlink()
        write_connection(self.connection, f"{HOST}:{self.port}", self.certs / "ca.crt")
        for name in self.platforms:
            _, public = make_partner_key(self.certs, name)
            register(public, self.connection)
        for name in self.platforms:
            self.start_node(name)
        self.wait_online(len(self.platforms))

    def close(self) -> None:
        for process in [*self.nodes.values(), self.link]:
            if process is not None:
                stop_process(process)
        self.nodes.clear()
        self.link = None
        if self._saved_home is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = self._saved_home

    # -- processes ---------------------------------------------------------------------------------------
    def start_superlink(self) -> None:
        command = superlink_command(HOST, self.port, self.certs, self.workdir / "superlink" / "state.db")
        self.link = start_process(command, self.workdir / "logs" / "superlink.log", cwd=self.workdir)
        wait_for_port(HOST, self.port, 60, self.link)

    def kill_superlink(self) -> None:
        """The coordinator host dies: SuperLink and the ServerApp it runs, without warning."""
        stop_process(self.link, signal.SIGKILL)
        self.link = None

    def start_node(self, name: str, key: Path | None = None, label: str | None = None) -> subprocess.Popen:
        """The SuperNode of platform ``name``; with another ``key`` (and ``label`` for its log and port) it is an
        extra node that this deployment does not manage."""
        port = self.node_ports[name] if key is None else free_port(HOST)
        home = self.workdir / "nodes" / (label or name)
        if self.worker:  # the partner's own command: SuperNode + warm worker (client/launch.py)
            partner_key = key or self.certs / "partners" / f"{name}.key"
            command = [sys.executable, "-m", "client.launch", "--superlink", f"{HOST}:{self.port}", "--platform", name,
                       "--ca", str(self.certs / "ca.crt"), "--key", str(partner_key), "--home", str(home),
                       "--port", str(port), "--threads", str(self.threads)]
        else:
            command = supernode_command(f"{HOST}:{self.port}", name, None, home, self.certs / "ca.crt",
                                        key or self.certs / "partners" / f"{name}.key", port, threads=self.threads)
        process = start_process(command, self.workdir / "logs" / f"supernode-{label or name}.log",
                                cwd=PROJECT if self.worker else self.workdir)
        if key is None:
            self.nodes[name] = process
        return process

    def kill_node(self, name: str) -> None:
        stop_process(self.nodes.pop(name), signal.SIGKILL)

    def wait_online(self, count: int, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        online = 0
        while True:
            try:
                online = node_statuses(self.connection).count("online")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass  # the SuperLink is busy or restarting: ask again
            if online >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{online} of {count} SuperNodes online after {timeout:.0f}s; see "
                                   f"{self.workdir / 'logs'}")
            time.sleep(1.0)

    # -- runs --------------------------------------------------------------------------------------------
    def submit(self, run_config: dict) -> tuple[int, subprocess.Popen, Path]:
        """Start a run; its log streams into logs/run-<id>.log."""
        text = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        run_id = submit_run(PROJECT, self.connection, text)
        log_path = self.workdir / "logs" / f"run-{run_id}.log"
        stream = start_process([flower_binary("flwr"), "log", str(run_id), self.connection, "--stream"], log_path)
        return run_id, stream, log_path

    def run(self, run_config: dict, timeout: float = 1800.0) -> dict:
        """Submit, wait for the end; returns Flower's run info plus the log text and the wall time."""
        start = time.perf_counter()
        run_id, stream, log_path = self.submit(run_config)
        try:
            info = self.wait(run_id, timeout)
        finally:
            time.sleep(1.0)  # the stream's last lines
            stop_process(stream)
        return {**info, "wall-seconds": time.perf_counter() - start, "log": log_path.read_text(errors="replace")}

    def wait(self, run_id: int, timeout: float = 1800.0) -> dict:
        return wait_run(self.connection, run_id, timeout)


COSTS = (("process-seconds", "start-process-seconds", "process start + Flower + ClientApp module"),
         ("import-seconds", "start-import-seconds", "model libraries import"),
         ("build-seconds", "start-build-seconds", "session build"),
         ("handoff-seconds", "handoff-seconds", "hand-off to the warm worker"),
         ("train-seconds", "train-seconds", "training"),
         ("eval-seconds", "eval-seconds", "evaluating"))


def message_costs(results: dict) -> dict[str, float]:
    """Mean seconds per message, where each went: the start (process + Flower + the ClientApp module, the model
    libraries, building the session, the hand-off to the node's warm worker) against the work (training over the
    train replies, evaluating over the evaluations after round 0)."""
    train = [m for per in results["training"].values() for m in per.values()]
    evaluate = [m for rnd, per in results["evaluations"].items() if int(rnd) > 0 for m in per.values()]
    mean = lambda rows, key: sum(r.get(key, 0.0) for r in rows) / max(1, len(rows))  # noqa: E731
    out = {"messages": len(train) + len(evaluate), "worker-messages": sum(r.get("worker", 0.0) for r in train + evaluate)}
    for name, key, _ in COSTS:
        rows = train if key == "train-seconds" else evaluate if key == "eval-seconds" else train + evaluate
        out[name] = mean(rows, key)
    return out


def deploy(config: PollenConfig, workdir: Path, worker: bool) -> dict:
    """One deployment on 127.0.0.1 running ``config``; its status, wall and round times and message costs."""
    with LocalDeployment(workdir, threads=config.train.threads or 1, worker=worker) as deployment:  # 1: shared cores
        print(f"SuperLink on {HOST}:{deployment.port} (TLS, node authentication), SuperNodes "
              f"{', '.join(f'{n}:{p}' for n, p in deployment.node_ports.items())}"
              f"{' with warm workers' if worker else ' (no warm worker)'}; logs in {workdir / 'logs'}", flush=True)
        info = deployment.run(config.to_flat())
    print("\n".join(line for line in info["log"].splitlines() if line.startswith("round ")))
    results = json.loads((Path(config.federation.run_dir) / "results.json").read_text())
    return {"status": info["status"], "wall-seconds": info["wall-seconds"], "worker": worker,
            "round-seconds": results["round_seconds"], "per-message": message_costs(results)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.deployment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="certificates, logs, node homes (default: <run-dir>/deploy)")
    parser.add_argument("--compare-simulation", action="store_true", help="then run the same work in simulation")
    parser.add_argument("--no-worker", action="store_true",
                        help="nodes without the warm worker: every message imports and builds in its own process")
    parser.add_argument("--compare-no-worker", action="store_true",
                        help="also run the deployment without warm workers (Flower's plain per-message processes)")
    add_flags(parser, PollenConfig().replace(**{"num-rounds": 2}))
    args = parser.parse_args()
    config = from_args(args)
    run_dir = Path(config.federation.run_dir or PROJECT / "runs" / time.strftime("deploy-%Y%m%d-%H%M%S")).resolve()
    workdir = Path(args.workdir or run_dir / "deploy")
    summary: dict = {"config": config.to_flat(), "runs": {}}
    kinds = [("deployment", not args.no_worker)] + ([("deployment-no-worker", False)]
                                                    if args.compare_no_worker and not args.no_worker else [])
    for label, worker in kinds:
        run_config = config.replace(**{"run-dir": str(run_dir / label)})
        summary["runs"][label] = deploy(run_config, workdir / label, worker)
        report(label, summary["runs"][label])
    if args.compare_simulation:
        from simulations.run import simulate

        sim_config = config.replace(**{"run-dir": str(run_dir / "simulation")})
        start = time.perf_counter()
        record = simulate(sim_config)
        sim_results = json.loads((record.run_dir / "results.json").read_text())
        summary["runs"]["simulation"] = {"wall-seconds": time.perf_counter() - start,
                                         "round-seconds": sim_results["round_seconds"],
                                         "per-message": message_costs(sim_results)}
        report("simulation", summary["runs"]["simulation"])
        for label, _ in kinds:
            rounds = summary["runs"][label]["round-seconds"]
            for r in (r for r in rounds if int(r) > 0):
                d, s = rounds[r], sim_results["round_seconds"][r]
                print(f"round {r}: {label} {d:.1f}s, simulation {s:.1f}s ({d / s:.2f}x)")
    write_json(run_dir / "deployment.json", summary)
    print(f"summary in {run_dir / 'deployment.json'}")
    if any(run.get("status", "finished:completed") != "finished:completed" for run in summary["runs"].values()):
        sys.exit(1)


def report(label: str, run: dict) -> None:
    costs = run["per-message"]
    print(f"{label}: {run.get('status', 'finished')} in {run['wall-seconds']:.0f}s wall; mean seconds per message "
          f"({costs['messages']} messages, {costs['worker-messages']:.0f} in a warm worker):")
    for name, _, meaning in COSTS:
        print(f"  {meaning:<42} {costs[name]:6.2f}")


if __name__ == "__main__":
    cli.run(main)
