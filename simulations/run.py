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

from common import runtime  # noqa: F401  (sets offline / telemetry environment before flwr loads)
from common import cli
from common.cli import add_debug_flag
from common.config import PollenConfig, add_flags, from_args
from common.errors import ConfigError
from common.files import claim_run_dir
from common.preflight import check_platforms, check_settings, resolve_min_clients
from common.data.sources import client_names


def simulate(config: PollenConfig, cpus: int | None = None, quiet: bool = True, ray_address: str | None = None):
    """Run the federation with one simulated node per client (a platform, or a silo of one); returns the
    server's RunRecord. ``ray_address`` (e.g. "auto" or "head-host:6379") runs the clients on an existing
    Ray cluster instead of a local one; its size then comes from the cluster, not ``cpus``."""
    import torch
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import run_federation

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
    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=len(names), backend_config=backend)
    if failures:
        raise failures[0]
    if not records or set(records[0].evaluations.get(config.federation.num_rounds, {})) != set(names):
        raise RuntimeError(f"the federation did not finish with every client ({sorted(names)}): "
                           "see the log above")
    return records[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
