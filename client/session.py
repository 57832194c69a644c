"""A platform's local side of the federation: its data, model and private state, kept between messages.

Objects live for the life of the process: a Ray actor in simulation; in deployment the node's warm worker
(client/worker.py), or one message where the node runs without one (the Deployment Engine starts a fresh
process per message, so building must be cheap: the frozen-layer item states come from the disk cache). Where
the node's data, state and exports live is decided once, in its ``NodeSettings`` (client/node.py). One process may serve many simulated clients (silos): they share one encoder (each
message loads the global adapter into it first) and one copy of each platform's frozen-bottom item states, so a
session adds only its head. The private state (head, optimiser, RNG) is restored from the node's disk before
every message (client/state.py). Whenever the validation NDCG@10 improves, the platform's model is exported
for serving (client/export.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import time
from pathlib import Path

import torch

from client.export import export_model
from client.node import NodeSettings
from client.state import training_settings
from common.adapters import freeze_untravelled
from common.checks import NonFiniteMetric, load_torch
from common.config import PollenConfig
from common.data.sources import load_split
from common.data.split import SplitData
from common.model.encoder import TextEncoder, cached_item_states
from common.model.recommender import Recommender
from common.runtime import configure_threads, resolve_device
from common.train import Platform, Trainer, adopt

_SESSIONS: dict[str, "ClientSession"] = {}
_SHARED: dict[str, object] = {}  # per process: the encoder and item states every session here can share


def _shared(key: list, build):
    """``build()`` once per process for this key."""
    text = json.dumps(key, sort_keys=True, default=str)
    if text not in _SHARED:
        _SHARED[text] = build()
    return _SHARED[text]


def _build_encoder(config: PollenConfig, device: torch.device) -> tuple[TextEncoder, torch.Tensor]:
    torch.manual_seed(config.train.seed)
    encoder = TextEncoder(config.model, seed=config.train.seed, max_len=config.data.max_len).to(device)
    return encoder, torch.get_rng_state()  # sessions start their heads from this RNG state, shared or not


def cached_split(config: PollenConfig, name: str, data_path: str | None, silo: int | None,
                 cache_dir: str | None) -> SplitData:
    """``load_split``, kept parsed on the node's disk (``cache_dir/splits``) for the next process.

    Valid while nothing it came from changes: the key holds the data settings, the platform, silo and folder,
    every file of that folder (name, size, modification time) and the code that parses and splits
    (common/data/*.py); anything else is a new key, so a stale split is never read."""
    if not cache_dir:
        return load_split(config.data, name, data_path, silo)
    folder = Path(data_path) if data_path else (
        Path(config.data.data_dir) / dict(config.data.platform_paths()).get(name, name) if config.data.data_dir
        else None)
    files = sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in folder.rglob("*") if p.is_file()) if folder is not None and folder.is_dir() else []
    code = sorted((p.name, p.read_bytes().hex()) for p in Path(load_split.__code__.co_filename).parent.glob("*.py"))
    key = json.dumps([vars(config.data), name, silo, str(folder), files, code], sort_keys=True, default=str)
    path = Path(cache_dir) / "splits" / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pkl"
    if path.is_file():
        try:
            return pickle.loads(path.read_bytes())
        except Exception:  # noqa: BLE001  (a damaged cache file is rebuilt)
            pass
    split = load_split(config.data, name, data_path, silo)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(pickle.dumps(split, protocol=pickle.HIGHEST_PROTOCOL))
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return split


class ClientSession:
    def __init__(self, config: PollenConfig, name: str, data_path: str | None, cache_dir: str, device: str,
                 silo: int | None = None):
        self.config = config
        self.device = resolve_device(device)
        split = cached_split(config, name, data_path, silo, cache_dir)
        key = [vars(config.model), config.privacy.aggregation, config.train.seed, str(self.device)]
        self.encoder, rng = _shared(["encoder", *key], lambda: _build_encoder(config, self.device))
        states = _shared(["states", *key, name, data_path, vars(config.data)],
                         lambda: cached_item_states(self.encoder, split.item_texts, cache_dir))
        torch.set_rng_state(rng)
        model = Recommender(split, config, self.encoder, states).to(self.device)
        self.platform = Platform(split, model)
        freeze_untravelled(self.encoder, config.privacy.aggregation)  # FFA-LoRA: A stays at the shared start
        self.trainer = Trainer([self.platform], self.encoder, config)
        self.best_valid = -1.0  # best validation NDCG@10 so far: the exported model
        self.personal: dict[str, torch.Tensor] | None = None  # the adapters as this platform's last training left them
        self.costs: dict[str, float] = {}  # start costs of the current message (see open)
        self.fresh_state = self.checkpoint()  # what a node that never trained starts from

    @classmethod
    def open(cls, config: PollenConfig, node: NodeSettings) -> "ClientSession":
        """The session for this node's platform, built once per process and reused."""
        opened = time.perf_counter()
        configure_threads(node.threads)
        key = json.dumps([node.platform, node.silo, node.data_path, node.device, training_settings(config)],
                         sort_keys=True)
        if key not in _SESSIONS:
            _SESSIONS[key] = cls(config, node.platform, node.data_path, node.cache_dir, node.device, node.silo)
        session = _SESSIONS[key]
        session.costs = {"start-build-seconds": time.perf_counter() - opened}
        return session

    def start_costs(self) -> dict[str, float]:
        """What this message paid for building the session (0 when the process already had it)."""
        return dict(self.costs)

    @property
    def name(self) -> str:
        return self.platform.split.name

    # -- private state ---------------------------------------------------------------------------
    def checkpoint(self) -> bytes:
        buffer = io.BytesIO()
        # torch's global RNG too (the head's dropout draws from it): a platform's random stream then continues
        # across messages whichever process serves them, in simulation (shared actors) and deployment alike
        torch.save({"head": self.platform.model.private_state(), "trainer": self.trainer.state_dict(),
                    "best-valid": self.best_valid, "torch-rng": torch.get_rng_state(),
                    "personal": self.personal}, buffer)
        return buffer.getvalue()

    def restore(self, checkpoint: bytes | None) -> None:
        state = load_torch(checkpoint or self.fresh_state, "private state", f"{self.name}'s private state")
        self.platform.model.head.load_private_state(state["head"])
        self.trainer.load_state_dict(state["trainer"])
        self.best_valid = state["best-valid"]
        self.personal = state.get("personal")
        torch.set_rng_state(state["torch-rng"])

    # -- the work of one message -----------------------------------------------------------------
    def set_adapter(self, state: dict[str, torch.Tensor]) -> None:
        self.encoder.load_adapter_state({k: v.to(self.device) for k, v in state.items()})

    def train(self) -> dict[str, float]:
        """One round's local training. A personalised member (not under DP) starts it from the mix of the global
        adapters just received and its own last ones that ranks its validation best (``adopt``): it takes from
        the federation only what its own validation rewards, and what it trains from there is what it sends."""
        start, share = time.perf_counter(), 1.0  # of the global adapters this round's training starts from
        if self.config.federation.personalise and self.personal is not None and self.trainer.dp is None:
            share, _ = adopt(self.platform, self.encoder, self.encoder.adapter_state(),
                                  {k: v.to(self.device) for k, v in self.personal.items()})
        losses = [self.trainer.epoch()[self.name] for _ in range(self.config.train.local_epochs)]
        self.personal = {k: v.cpu() for k, v in self.encoder.adapter_state().items()}
        if self.trainer.num_sequences and not all(math.isfinite(loss) for loss in losses):
            raise NonFiniteMetric(f"platform {self.name}: training loss {losses[-1]} is not finite (training "
                                  "diverged); lower lr / lora-lr, or check the ratings and the adapter")
        metrics = {"num-examples": float(self.trainer.num_sequences), "train-loss": losses[-1],
                   "global-share": share, "train-seconds": time.perf_counter() - start}
        return {**metrics, **(self.trainer.dp.metrics() if self.trainer.dp else {})}  # epsilon spent so far

    def personalise(self) -> None:
        """Members evaluate and serve their personalised model: the adapters after this platform's own local
        training of the round (``personal``), not the average, which was fitted to no platform's head
        (``personalise = false``: the global adapters as received)."""
        if self.config.federation.personalise and self.personal is not None:
            self.set_adapter(self.personal)

    def evaluate(self, export_dir: str | None = None) -> dict[str, float]:
        """Validation and test metrics; a new best on validation is exported to ``export_dir/<platform>``."""
        start = time.perf_counter()
        metrics = {f"{which}-{k}": v for which in ("valid", "test") for k, v in self.platform.evaluate(which).items()}
        metrics["theta"] = float(torch.as_tensor(self.platform.model.head.theta()).detach())
        metrics["num-examples"] = metrics["test-users"]
        if export_dir and metrics["valid-ndcg@10"] > self.best_valid:
            self.best_valid = metrics["valid-ndcg@10"]
            export_model(Path(export_dir) / self.name, self.platform, self.config, metrics)
        metrics["eval-seconds"] = time.perf_counter() - start
        return metrics
