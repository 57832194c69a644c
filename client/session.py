"""A platform's local side of the federation: its data, model and private state, kept between messages.

Objects live for the life of the process (a Ray actor in simulation; one message in deployment, where the
Deployment Engine starts a fresh process per message, so building must be cheap: the frozen-layer item states
come from the disk cache). One process may serve many simulated clients (silos): they share one encoder (each
message loads the global adapter into it first) and one copy of each platform's frozen-bottom item states, so a
session adds only its head. The private state (head, optimiser, RNG) is restored from the node's disk before
every message (client/state.py). Whenever the validation NDCG@10 improves, the platform's model is exported
for serving (client/export.py).
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import psutil
import torch

from client.export import export_model
from client.state import training_settings
from common.aggregation import freeze_untravelled
from common.checks import NonFiniteMetric, load_torch
from common.config import PollenConfig
from common.data.sources import load_split, simulated_client
from common.model.encoder import TextEncoder, cached_item_states
from common.model.recommender import Recommender
from common.runtime import configure_threads, default_cache_dir, resolve_device
from common.train import Platform, Trainer

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
    encoder = TextEncoder(config.model, seed=config.train.seed).to(device)
    return encoder, torch.get_rng_state()  # sessions start their heads from this RNG state, shared or not


_PROCESS = {"fresh": True}  # the first message a process serves pays for its imports


class ClientSession:
    def __init__(self, config: PollenConfig, name: str, data_path: str | None, cache_dir: str, device: str,
                 silo: int | None = None):
        self.config = config
        self.device = resolve_device(device)
        split = load_split(config.data, name, data_path, silo)
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
        self.costs: dict[str, float] = {}  # start costs of the current message (see open)
        self.fresh_state = self.checkpoint()  # what a node that never trained starts from

    @classmethod
    def open(cls, config: PollenConfig, node_config: dict) -> "ClientSession":
        """The session for this node's platform, built once per process and reused."""
        opened = time.time()
        imports = opened - psutil.Process().create_time() if _PROCESS.pop("fresh", False) else 0.0
        configure_threads(int(node_config.get("threads", config.train.threads)))
        name, data_path, silo = node_platform(config, node_config)
        cache_dir = str(node_config.get("cache-dir", default_cache_dir()))
        device = str(node_config.get("device", config.train.device))
        key = json.dumps([name, silo, data_path, device, training_settings(config)], sort_keys=True)
        if key not in _SESSIONS:
            _SESSIONS[key] = cls(config, name, data_path, cache_dir, device, silo)
        session = _SESSIONS[key]
        session.costs = {"start-process-seconds": imports, "start-build-seconds": time.time() - opened}
        return session

    def start_costs(self) -> dict[str, float]:
        """What this message paid before its work: process start + imports (first message of a process only)
        and building the session (0 when the process already had it)."""
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
                    "best-valid": self.best_valid, "torch-rng": torch.get_rng_state()}, buffer)
        return buffer.getvalue()

    def restore(self, checkpoint: bytes | None) -> None:
        state = load_torch(checkpoint or self.fresh_state, "private state", f"{self.name}'s private state")
        self.platform.model.head.load_state_dict(state["head"])
        self.trainer.load_state_dict(state["trainer"])
        self.best_valid = state["best-valid"]
        torch.set_rng_state(state["torch-rng"])

    # -- the work of one message -----------------------------------------------------------------
    def set_adapter(self, state: dict[str, torch.Tensor]) -> None:
        self.encoder.load_adapter_state({k: v.to(self.device) for k, v in state.items()})

    def train(self) -> dict[str, float]:
        start = time.perf_counter()
        losses = [self.trainer.epoch()[self.name] for _ in range(self.config.train.local_epochs)]
        if self.trainer.num_sequences and not all(math.isfinite(loss) for loss in losses):
            raise NonFiniteMetric(f"platform {self.name}: training loss {losses[-1]} is not finite (training "
                                  "diverged); lower lr / lora-lr, or check the ratings and the adapter")
        metrics = {"num-examples": float(self.trainer.num_sequences), "train-loss": losses[-1],
                   "train-seconds": time.perf_counter() - start}
        return {**metrics, **(self.trainer.dp.metrics() if self.trainer.dp else {})}  # epsilon spent so far

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


def export_dir(config: PollenConfig, node_config: dict) -> str | None:
    """A deployed node exports where its node config says; a simulated one into the run folder."""
    if "export-dir" in node_config:
        return str(node_config["export-dir"])
    if "platform" not in node_config and config.federation.run_dir:
        return str(Path(config.federation.run_dir) / "models")
    return None


def state_root(config: PollenConfig, node_config: dict) -> str:
    """Where a node keeps its private state: its node config's state-dir, a simulated node's run folder, or the
    node's cache folder."""
    if "state-dir" in node_config:
        return str(node_config["state-dir"])
    if "platform" not in node_config and config.federation.run_dir:
        return str(Path(config.federation.run_dir) / "client-state")
    return str(Path(str(node_config.get("cache-dir", default_cache_dir()))) / "state")


def node_platform(config: PollenConfig, node_config: dict) -> tuple[str, str | None, int | None]:
    """(platform name, data path, silo): a deployed node names its platform and data (all of it, silo None);
    a simulated node is given a partition id, which names a platform and one of its silos."""
    if "platform" in node_config:
        return (str(node_config["platform"]), node_config.get("data-path") and str(node_config["data-path"]),
                None)
    name, silo = simulated_client(config.data, int(node_config.get("partition-id", 0)))
    return name, None, silo
