"""A real deployment on one machine: a SuperLink and one SuperNode per platform on 127.0.0.1, TLS + node auth.

    python -m simulations.deployment                       # 2 rounds, embedded data, the real MiniLM
    python -m simulations.deployment --num-rounds 3 --compare-simulation

Every process is Flower's own (flower-superlink, flower-supernode, flwr run), started through the same launch
code an operator and a partner use (server/launch.py, client/launch.py), each in its own process group on a
free port, and stopped on exit or failure. Prints a line per round (from the ServerApp's log), the run's wall
time, each message's start cost (process start + imports, building the session) and the round times; writes
``deployment.json`` into the run folder. ``--compare-simulation`` runs the same work in Flower's simulation
engine afterwards and reports both.
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

    def __init__(self, workdir: Path, platforms: tuple[str, ...] = SYNTHETIC_PLATFORMS, threads: int = 1):
        self.workdir = Path(workdir).resolve()
        self.platforms, self.threads = platforms, threads
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
        command = supernode_command(f"{HOST}:{self.port}", name, None, self.workdir / "nodes" / (label or name),
                                    self.certs / "ca.crt", key or self.certs / "partners" / f"{name}.key", port,
                                    threads=self.threads)
        process = start_process(command, self.workdir / "logs" / f"supernode-{label or name}.log", cwd=self.workdir)
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


def message_costs(results: dict) -> dict[str, float]:
    """Mean seconds per message: its start (process + imports, building the session) against its work (training,
    evaluation), over every train reply and every evaluation after round 0."""
    train = [m for per in results["training"].values() for m in per.values()]
    evaluate = [m for rnd, per in results["evaluations"].items() if int(rnd) > 0 for m in per.values()]
    mean = lambda rows, key: sum(r.get(key, 0.0) for r in rows) / max(1, len(rows))  # noqa: E731
    return {"messages": len(train) + len(evaluate),
            "process-seconds": mean(train + evaluate, "start-process-seconds"),
            "build-seconds": mean(train + evaluate, "start-build-seconds"),
            "train-seconds": mean(train, "train-seconds"), "eval-seconds": mean(evaluate, "eval-seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="certificates, logs, node homes (default: <run-dir>/deploy)")
    parser.add_argument("--compare-simulation", action="store_true", help="then run the same work in simulation")
    add_flags(parser, PollenConfig().replace(**{"num-rounds": 2}))
    args = parser.parse_args()
    config = from_args(args)
    run_dir = Path(config.federation.run_dir or PROJECT / "runs" / time.strftime("deploy-%Y%m%d-%H%M%S")).resolve()
    config = config.replace(**{"run-dir": str(run_dir / "deployment")})
    workdir = Path(args.workdir or run_dir / "deploy")
    summary: dict = {"config": config.to_flat()}
    with LocalDeployment(workdir, threads=config.train.threads or 1) as deployment:  # 1: nodes share the cores
        print(f"SuperLink on {HOST}:{deployment.port} (TLS, node authentication), SuperNodes "
              f"{', '.join(f'{n}:{p}' for n, p in deployment.node_ports.items())}; logs in {workdir / 'logs'}")
        info = deployment.run(config.to_flat())
    print("\n".join(line for line in info["log"].splitlines() if line.startswith("round ")))
    results = json.loads((Path(config.federation.run_dir) / "results.json").read_text())
    summary["deployment"] = {"status": info["status"], "wall-seconds": info["wall-seconds"],
                             "round-seconds": results["round_seconds"], "per-message": message_costs(results)}
    print(f"deployment: {info['status']} in {info['wall-seconds']:.0f}s wall; per message: "
          + _costs(summary["deployment"]["per-message"]))
    if args.compare_simulation:
        from simulations.run import simulate

        sim_config = config.replace(**{"run-dir": str(run_dir / "simulation")})
        start = time.perf_counter()
        record = simulate(sim_config)
        sim_results = json.loads((record.run_dir / "results.json").read_text())
        summary["simulation"] = {"wall-seconds": time.perf_counter() - start,
                                 "round-seconds": sim_results["round_seconds"],
                                 "per-message": message_costs(sim_results)}
        print(f"simulation: {summary['simulation']['wall-seconds']:.0f}s wall; per message: "
              + _costs(summary["simulation"]["per-message"]))
        trained = [r for r in results["round_seconds"] if int(r) > 0]
        for r in trained:
            d, s = results["round_seconds"][r], sim_results["round_seconds"][r]
            print(f"round {r}: deployment {d:.1f}s, simulation {s:.1f}s ({d / s:.2f}x)")
    write_json(run_dir / "deployment.json", summary)
    print(f"summary in {run_dir / 'deployment.json'}")
    if info["status"] != "finished:completed":
        sys.exit(1)


def _costs(costs: dict[str, float]) -> str:
    return (f"start {costs['process-seconds']:.1f}s process + imports, {costs['build-seconds']:.1f}s building; "
            f"work {costs['train-seconds']:.1f}s training, {costs['eval-seconds']:.1f}s evaluating")


if __name__ == "__main__":
    cli.run(main)
