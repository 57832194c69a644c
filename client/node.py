"""The node's settings, decided once per message: simulated or deployed, its platform and data, and its folders.

A deployed node is started with ``flower-supernode --node-config 'platform="video" data-path="/abs/path" ...'``
(client/launch.py writes it); a simulated node only gets Flower's ``partition-id``, which names a platform and
one of its silos, and keeps its state and exported models in the run folder. Everything else on the client
side (client/app.py, client/session.py, client/state.py) reads this object instead of asking the node config.
Importing this module loads no model library, so the ClientApp can decide where a message runs cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.config import PollenConfig
from common.runtime import default_cache_dir


@dataclass(frozen=True)
class NodeSettings:
    deployed: bool           # started by flower-supernode with a platform in its node config
    platform: str            # the platform this node trains for
    data_path: str | None    # a deployed node's own data folder; None = the run's data config (or embedded data)
    silo: int | None         # a simulated silo of the platform's users (clients-per-platform); None = all users
    cache_dir: str           # frozen-layer item states (and parsed data) kept across messages
    state_dir: str           # private training state per federation and round (client/state.py)
    export_dir: str | None   # where a new best-on-validation model is exported for serving; None = not exported
    threads: int             # torch threads (0 = the process's share)
    device: str              # torch device
    worker: str | None       # a deployed node's warm worker socket (client/worker.py); None = work in-process

    @classmethod
    def build(cls, config: PollenConfig, node_config: dict) -> "NodeSettings":
        cache_dir = str(node_config.get("cache-dir", default_cache_dir()))
        run_dir = config.federation.run_dir
        common = {"cache_dir": cache_dir, "threads": int(node_config.get("threads", config.train.threads)),
                  "device": str(node_config.get("device", config.train.device))}
        if "platform" in node_config:  # deployed
            return cls(deployed=True, platform=str(node_config["platform"]),
                       data_path=str(node_config["data-path"]) if node_config.get("data-path") else None, silo=None,
                       state_dir=str(node_config.get("state-dir", Path(cache_dir) / "state")),
                       export_dir=str(node_config["export-dir"]) if "export-dir" in node_config else None,
                       worker=str(node_config["worker"]) if node_config.get("worker") else None, **common)
        from common.data.sources import simulated_client

        platform, silo = simulated_client(config.data, int(node_config.get("partition-id", 0)))
        state_dir = node_config.get("state-dir", Path(run_dir) / "client-state" if run_dir else Path(cache_dir) / "state")
        export_dir = node_config.get("export-dir", Path(run_dir) / "models" if run_dir else None)
        return cls(deployed=False, platform=platform, data_path=None, silo=silo, state_dir=str(state_dir),
                   export_dir=None if export_dir is None else str(export_dir), worker=None, **common)
