"""The default federation in Flower's simulation engine: three platforms, the embedded data unless told otherwise.

    python -m simulations.run                       # embedded synthetic data, 5 rounds
    python -m simulations.run --data-dir ../shared/data --num-rounds 10
    python -m simulations.run --clients-per-platform 10   # 30 clients: each platform's users in 10 silos

Writes results.json, rounds.csv and ndcg_per_round.png into the run folder (--run-dir, default runs/<time>).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings

from common import cli
from common.cli import add_debug_flag
from common.config import PollenConfig, add_flags, from_args  # light: parsing flags imports no model library
from common.errors import ConfigError


class HideRunSimulationDeprecation(logging.Filter):
    """Drop Flower's "DEPRECATED FEATURE: run_simulation" warning, and only that one.

    Pollen runs the simulation engine in-process on purpose (README, "Flower's own runner"): the driver gets the
    run's record back, fails loudly when the ServerApp fails, and leaves no SuperLink behind. ``flwr run`` runs
    the very same apps (pyproject.toml) for those who want Flower's CLI."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (text.lstrip().startswith("DEPRECATED FEATURE") and "run_simulation" in text)


def hide_run_simulation_deprecation() -> None:
    logger = logging.getLogger("flwr")
    if not any(isinstance(f, HideRunSimulationDeprecation) for f in logger.filters):
        logger.addFilter(HideRunSimulationDeprecation())


class ChildProcesses:
    """Notes every process started under this one while in use, then waits for them to go (killing what is left
    after ``grace`` seconds). Ray's workers outlive ``ray.shutdown()`` by seconds and, reparented once the raylet
    is gone, are no longer our children: without this the command can return while they still run."""

    def __init__(self, grace: float = 30.0, poll: float = 0.5):
        import threading

        self.grace, self.poll, self.seen, self._stop = grace, poll, {}, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _note(self) -> None:
        import psutil

        try:
            for child in psutil.Process().children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            self._note()

    def __enter__(self) -> "ChildProcesses":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import psutil

        self._stop.set()
        self._thread.join()
        self._note()
        _, alive = psutil.wait_procs(list(self.seen.values()), timeout=self.grace)
        for process in alive:
            try:
                process.kill()
            except psutil.Error:
                pass


def simulate(config: PollenConfig, cpus: int | None = None, quiet: bool = True, ray_address: str | None = None):
    """Run the federation with one simulated node per client (a platform, or a silo of one); returns the
    server's RunRecord. ``ray_address`` (e.g. "auto" or "head-host:6379") runs the clients on an existing
    Ray cluster instead of a local one; its size then comes from the cluster, not ``cpus``."""
    from common import runtime  # noqa: F401  (offline / telemetry environment before flwr and torch load)

    import torch
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from common.data.sources import client_names
    from server.app import run_federation

    hide_run_simulation_deprecation()
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
    cpus = cpus or os.cpu_count() or 1
    names = client_names(config.data)
    gpus = 1.0 / len(names) if torch.cuda.is_available() else 0.0  # Ray hides the GPU from actors given none
    records, failures = [], []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        try:
            records.append(run_federation(grid, config))
        except Exception as error:  # raised again below, in the caller's thread, after the simulation stops
            failures.append(error)

    if quiet:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    # one CPU per client: Ray runs at most `cpus` clients at once, each with one torch thread
    init = {"include_dashboard": False, "logging_level": "error", "log_to_driver": True}
    init.update({"address": ray_address} if ray_address else {"num_cpus": cpus})  # a cluster has its own size
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": gpus}, "init_args": init}
    with ChildProcesses():  # nothing of the run outlives it
        run_simulation(server_app=server_app, client_app=client_app,
                       num_supernodes=len(names), backend_config=backend)
    if failures:
        raise failures[0]
    last = max(records[0].evaluations, default=None) if records else None  # early stopping may end it sooner
    if last is None or set(records[0].evaluations[last]) != set(names):
        raise RuntimeError(f"the federation did not finish with every client ({sorted(names)}): "
                           "see the log above")
    return records[0]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpus", type=int, default=None, help="cores for the simulation (default: all)")
    parser.add_argument("--verbose", action="store_true", help="show Flower's own log")
    parser.add_argument("--ray-address", default=None,
                        help="run the clients on an existing Ray cluster (e.g. 'auto' on its head node)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --run-dir holds (by default a folder with results is resumed from its "
                             "checkpoint, or refused)")
    add_debug_flag(parser)
    add_flags(parser)
    args = parser.parse_args()
    if args.cpus is not None and args.cpus < 1:
        raise ConfigError(f"--cpus must be >= 1, got {args.cpus}")
    config = from_args(args)
    start = time.perf_counter()
    # check before work: every setting and every platform's data, before Ray, Flower or a model starts
    from common.files import claim_run_dir  # after parsing: --help stays light
    from common.preflight import check_platforms, check_settings, resolve_min_clients

    check_settings(config, federation=True)
    config = resolve_min_clients(config, print)
    run_dir = claim_run_dir(config.federation.run_dir, overwrite=args.overwrite,
                            resume_marker="checkpoint/state.json")
    config = config.replace(**{"run-dir": str(run_dir)})
    check_platforms(config, log=print)
    record = simulate(config, args.cpus, quiet=not args.verbose, ray_address=args.ray_address)
    print(f"\nfinished {record.num_rounds} rounds in {time.perf_counter() - start:.0f}s; results in {record.run_dir}")
    for name, chosen in sorted(record.selected().items()):
        print(f"  {name}: round {chosen['round']} (best validation)  test NDCG@10 {chosen['test']['ndcg@10']:.4f}  "
              f"HR@10 {chosen['test']['hr@10']:.4f}")
    return 0


if __name__ == "__main__":
    cli.run(main)
