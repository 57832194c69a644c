"""Where a platform's data comes from: the embedded synthetic default, a benchmark folder, or a partner's path.

Every entry point (simulation, client, baselines) gets its split data through ``load_split``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from common.config import DataConfig
from common.errors import ConfigError
from common.data.schema import DataError, PlatformData
from common.data.split import MIN_HISTORY, SplitData, leave_one_out, silo

SYNTHETIC_PLATFORMS = ("ecommerce", "social", "video")


def platform_names(config: DataConfig) -> list[str]:
    """The platforms a simulation runs, one client each."""
    if not config.data_dir:
        return list(SYNTHETIC_PLATFORMS)
    return [name for name, _ in config.platform_paths()]


def client_names(config: DataConfig) -> list[str]:
    """The simulated clients, in partition-id order: each platform's silos in turn (see ``simulated_client``)."""
    count = config.clients_per_platform
    return [name if count == 1 else f"{name}-silo{i}" for name in platform_names(config) for i in range(count)]


def simulated_client(config: DataConfig, partition: int) -> tuple[str, int]:
    """(platform, silo) of a simulation node's partition id: partition = platform index x silos + silo."""
    names = platform_names(config)
    count = config.clients_per_platform
    if not 0 <= partition < len(names) * count:
        raise ConfigError(f"node partition-id {partition} but the run has only {len(names) * count} clients "
                         f"({len(names)} platforms x clients-per-platform {count})")
    return names[partition // count], partition % count


@lru_cache(maxsize=2)
def _synthetic(seed: int) -> dict[str, PlatformData]:
    """Generated once per process: every silo of every platform starts from the same tables."""
    from common.data.synthetic import SyntheticConfig, generate

    return {p.name: p for p in generate(SyntheticConfig(seed=seed))}


def load_platform(config: DataConfig, name: str, path: str | None = None) -> PlatformData:
    """A platform's raw data: from ``path`` if given (a partner's node), else from the run's data config."""
    if path:
        from common.data.loaders import load_platform as load_folder

        return load_folder(Path(path), name)
    if not config.data_dir:
        by_name = _synthetic(config.synthetic_seed)
        if name not in by_name:
            raise ConfigError(f"no synthetic platform {name!r} (config 'data-dir' is empty: the embedded data); "
                              f"expected one of {sorted(by_name)}, or set data-dir")
        return by_name[name]
    paths = dict(config.platform_paths())
    if name not in paths:
        raise ConfigError(f"platform {name!r} is not in config 'platforms' ({config.platforms})")
    from common.data.loaders import load_platform as load_folder

    return load_folder(Path(config.data_dir) / paths[name], name)


def load_split(config: DataConfig, name: str, path: str | None = None, silo_index: int | None = None) -> SplitData:
    """The platform's split data; with ``silo_index`` only that silo's users (``clients-per-platform`` silos)."""
    data = load_platform(config, name, path)
    if config.k_core > 1:
        from common.data.loaders import k_core

        data = k_core(data, config.k_core)
    split = leave_one_out(data)
    if split.num_users == 0:
        raise DataError(data.source or name, f"no user has {MIN_HISTORY} or more interactions ({data.num_users:,} "
                        f"users, {len(data.interactions):,} interactions"
                        + (f" after the {config.k_core}-core" if config.k_core > 1 else "")
                        + f"); expected users with at least {MIN_HISTORY}: a training, a validation and a test item")
    if silo_index is None:
        return split
    part = silo(split, silo_index, config.clients_per_platform)
    if part.num_users == 0:
        raise ConfigError(f"config 'clients-per-platform' {config.clients_per_platform} is more than the "
                          f"{split.num_users} usable users of platform {name!r}")
    return part
