"""Where a platform's data comes from: the embedded synthetic default, a benchmark folder, or a partner's path.

Every entry point (simulation, client, baselines) gets its split data through ``load_split``.
"""

from __future__ import annotations

from pathlib import Path

from common.config import DataConfig
from common.data.schema import PlatformData
from common.data.split import SplitData, leave_one_out

SYNTHETIC_PLATFORMS = ("ecommerce", "social", "video")


def platform_names(config: DataConfig) -> list[str]:
    """The platforms a simulation runs, one client each."""
    if not config.data_dir:
        return list(SYNTHETIC_PLATFORMS)
    return [name for name, _ in config.platform_paths()]


def load_platform(config: DataConfig, name: str, path: str | None = None) -> PlatformData:
    """A platform's raw data: from ``path`` if given (a partner's node), else from the run's data config."""
    if path:
        from common.data.loaders import load_platform as load_folder

        return load_folder(Path(path), name)
    if not config.data_dir:
        from common.data.synthetic import SyntheticConfig, generate

        by_name = {p.name: p for p in generate(SyntheticConfig(seed=config.synthetic_seed))}
        if name not in by_name:
            raise ValueError(f"no synthetic platform {name!r}; expected one of {sorted(by_name)}")
        return by_name[name]
    paths = dict(config.platform_paths())
    if name not in paths:
        raise ValueError(f"platform {name!r} is not in config 'platforms' ({config.platforms})")
    from common.data.loaders import load_platform as load_folder

    return load_folder(Path(config.data_dir) / paths[name], name)


def load_split(config: DataConfig, name: str, path: str | None = None) -> SplitData:
    data = load_platform(config, name, path)
    if config.k_core > 1:
        from common.data.loaders import k_core

        data = k_core(data, config.k_core)
    return leave_one_out(data)
