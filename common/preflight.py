"""Check before work: every driver calls these before it starts Ray, Flower or a model, so a mistake in the
settings or in any platform's data costs seconds and one line (common/cli.py), not a crashed federation.

- ``check_settings``: what the config's own ``validate`` cannot see: the device exists, the base model folder is
  there, and a federation has an adapter to share.
- ``check_platforms``: loads and splits every platform's data the way its client will (the loaders' own checks:
  file, line, column, expected) and returns a one-line summary per platform.
- ``resolve_min_clients``: min-clients 0 means every client of the run; says so, and refuses more than there are.
"""

from __future__ import annotations

import json
from typing import Callable

from common.config import PollenConfig
from common.errors import ConfigError, FileProblem

Log = Callable[[str], None]


def check_settings(config: PollenConfig, federation: bool = False) -> None:
    from common.model.encoder import resolve_model_path
    from common.runtime import resolve_device

    try:
        resolve_device(config.train.device)
    except (ValueError, RuntimeError) as error:
        raise ConfigError(f"config 'device': {error}") from None
    if federation and not config.model.text:
        raise ConfigError("config: a federation shares the text adaptor and sequence encoder (and LoRA), so it "
                          "needs text = true (an ID-only model's item IDs never leave a platform)")
    if config.model.text:
        try:
            folder = resolve_model_path(config.model.base_model)
        except FileNotFoundError as error:
            raise ConfigError(f"config {error}") from None
        try:
            json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise FileProblem(folder / "config.json", f"not a readable model config ({error})") from None


def check_platforms(config: PollenConfig, names: list[str] | None = None, paths: dict[str, str] | None = None,
                    log: Log | None = None) -> dict[str, str]:
    """Load and split each platform (``names``, default: the run's; ``paths`` name a folder per platform for a
    partner's node); the first bad one raises its one-line error. Returns platform -> summary."""
    from common.data.sources import load_split, platform_names

    summaries = {}
    for name in names or platform_names(config.data):
        split = load_split(config.data, name, (paths or {}).get(name))
        summaries[name] = (f"{name}: {split.num_users:,} users with >= 3 interactions, {split.num_items:,} items, "
                           f"{sum(len(s) for s in split.sequences):,} interactions")
        if log:
            log(f"data ok  {summaries[name]}")
    return summaries


def resolve_min_clients(config: PollenConfig, log: Log | None = None, strict: bool = True) -> PollenConfig:
    """min-clients 0 -> the number of clients of the run (platforms x clients-per-platform), said in one line.
    ``strict`` (a simulation, where the clients are exactly the platforms) refuses more than there are."""
    from common.data.sources import client_names

    clients = len(client_names(config.data))
    need = config.federation.min_clients
    if need == 0:
        if log:
            log(f"min-clients {clients}: every client of the run ({clients} = platforms x clients-per-platform; "
                "set min-clients to run with fewer)")
        return config.replace(**{"min-clients": clients})
    if strict and need > clients:
        raise ConfigError(f"config 'min-clients' is {need} but the run has only {clients} client(s) "
                          f"({', '.join(client_names(config.data))}); set min-clients <= {clients} or 0 (= all)")
    return config


def add_run_flags(parser) -> None:
    """--overwrite and --debug, for drivers that write a run folder."""
    from common.cli import add_debug_flag

    parser.add_argument("--overwrite", action="store_true",
                        help="replace what --run-dir holds (by default a folder with earlier results is refused)")
    add_debug_flag(parser)


def preflight(config: PollenConfig, kind: str, overwrite: bool = False, federation: bool = False,
              platforms: bool = True, targets: dict[str, str] | None = None, adapter: str | None = None,
              log: Log = print) -> PollenConfig:
    """Everything a driver checks before work, in order of cost; returns the config with min-clients resolved and
    run-dir set to the claimed (new, or emptied with ``overwrite``) and locked run folder."""
    from common.checks import read_adapter
    from common.files import claim_run_dir

    check_settings(config, federation=federation)
    if federation:
        config = resolve_min_clients(config, log)
    if adapter:
        read_adapter(adapter)  # LoRA and/or recommendation adapters; without LoRA a folder holds only the latter
    run_dir = claim_run_dir(config.federation.run_dir, kind, overwrite)
    config = config.replace(**{"run-dir": str(run_dir)})
    if platforms:
        check_platforms(config, log=log)
    if targets:
        check_platforms(config, list(targets), targets, log=log)
    return config
