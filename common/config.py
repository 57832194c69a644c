"""Typed configuration, built from one flat table of ``kebab-case`` keys.

The same keys appear in ``[tool.flwr.app.config]`` (pyproject.toml), in ``flwr run --run-config`` and as
command-line flags of the simulations, so a setting has one name everywhere. The ServerApp sends the flat table
to every client with each message, so both sides always agree on it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

BENCHMARK_PLATFORMS = ("ecommerce=ecommerce/amazon-office-2014,social=social/lastfm-sequences,"
                       "video=video/movielens-100k")


@dataclass
class DataConfig:
    data_dir: str = ""              # folder of platform folders; empty = the embedded synthetic data
    platforms: str = BENCHMARK_PLATFORMS  # name=relative/path pairs under data_dir, one client each
    k_core: int = 0                 # drop users/items with fewer interactions (0 = keep all)
    max_len: int = 50               # most recent history items the head sees
    synthetic_seed: int = 0
    # speed and scale (issue 6)
    clients_per_platform: int = 1   # simulation: each platform's users split into this many silos, one client each

    def platform_paths(self) -> list[tuple[str, str]]:
        pairs = []
        for part in filter(None, (p.strip() for p in self.platforms.split(","))):
            name, sep, path = part.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"config 'platforms': expected name=path pairs separated by commas, got {part!r}")
            pairs.append((name.strip(), path.strip()))
        return pairs


@dataclass
class ModelConfig:
    base_model: str = ""            # local Hugging Face folder; empty = the shipped all-MiniLM-L6-v2
    text: bool = True               # False = ID-only SASRec (no text encoder)
    lora_layers: int = 0            # LoRA in the top k transformer layers (0 = frozen encoder: measured better); the frozen bottom is cached per item
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "query,value"
    max_tokens: int = 0             # item text truncation; 0 = per catalogue, the length >= 95% of its texts fit (<= 128)
    hidden_size: int = 64           # head width
    head_layers: int = 2
    head_heads: int = 2
    dropout: float = 0.2
    adaptor_experts: int = 1        # text -> head adaptor: 1 = one whitening projection, > 1 = UniSRec's mixture of experts
    temperature: float = 0.0        # logits: 0 = dot product; > 0 = cosine / temperature (UniSRec uses 0.07)
    item_ids: bool = True           # fuse platform-private item-ID embeddings with the text vectors
    fusion: str = "learned"         # theta, the weight of text vs IDs: "learned" or a number in [0, 1]
    rating_weight: float = 0.0      # > 0: the head also predicts explicit ratings, MSE at this weight (0 = off)

    def fusion_theta(self) -> float | None:
        if self.fusion == "learned":
            return None
        try:
            theta = float(self.fusion)
        except ValueError:
            theta = -1.0
        if not 0.0 <= theta <= 1.0:
            raise ValueError(f"config 'fusion': expected 'learned' or a number in [0, 1], got {self.fusion!r}")
        return theta


@dataclass
class TrainConfig:
    local_epochs: int = 1           # epochs per federated round (the whole budget for a local method = rounds x this)
    batch_size: int = 128
    lr: float = 1e-3                # head, text adaptor and sequence encoder
    lora_lr: float = 1e-3
    weight_decay: float = 0.0
    live_items: int = 32            # items per step re-encoded with gradient; the rest come from a per-epoch table
    loss: str = "softmax"           # "softmax" over the whole catalogue, or "sampled" negatives
    negatives: int = 256            # for loss = "sampled"
    seed: int = 42
    threads: int = 0                # torch threads; 0 = all cores of this process
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    max_steps: int = 0              # cap on optimiser steps per epoch (0 = the full epoch): a reduced, equal budget
    patience: int = 10              # early stopping: stop after this many epochs (rounds) without a better validation NDCG@10; 0 = never


@dataclass
class FederationConfig:
    num_rounds: int = 5
    min_clients: int = 3            # replies needed to aggregate a round
    round_timeout: float = 1800.0   # seconds to wait for replies
    run_dir: str = ""               # where the server writes adapters and metrics; empty = runs/<time>
    personalise: bool = True        # members evaluate/serve the global adapters after their own local training of the round
    # speed and scale (issue 6)
    adapter_dtype: str = "float32"  # adapter on the wire, both directions: float32 | float16 (averaged in float32)


@dataclass
class PrivacyConfig:
    """Secure aggregation, user-level DP-SGD, LoRA aggregation and the checks on updates (common/privacy.py)."""

    secagg: bool = False            # Flower SecAgg+: the server only ever sees the masked sum of the adapters
    aggregation: str = "fedavg"     # "fedavg": average A and B; "ffa": A frozen at its shared start, only B trained
    aggregator: str = "mean"        # "mean" (weighted by training sequences), "median", "trimmed-mean" (per entry)
    trim_ratio: float = 0.2         # fraction cut at each end by "trimmed-mean" (at least one when >= 3 replies)
    update_norm_factor: float = 10.0  # reject an update (reply - global) whose norm > this x the round's median; 0 = off
    max_update_norm: float = 0.0    # reject an update whose L2 norm exceeds this; 0 = off
    dp_epsilon: float = 0.0         # user-level DP-SGD: target epsilon over all rounds (calibrates dp-noise); 0 = off
    dp_noise: float = 0.0           # noise multiplier sigma when dp-epsilon = 0; both 0 = no DP
    dp_clip: float = 1.0            # L2 bound on one user's gradient (every trained parameter)
    dp_delta: float = 0.0           # delta of the reported epsilon; 0 = 1 / training users of the platform
    dp_users_per_step: int = 0      # expected users per noisy step (sample rate = this / users); 0 = batch-size
    secagg_max_weight: float = 10000.0  # SecAgg+ weights = training sequences / this (keep >= the largest client)

    @property
    def dp(self) -> bool:
        return self.dp_epsilon > 0 or self.dp_noise > 0

    def checks(self) -> list[tuple[bool, str]]:
        return [
            (self.aggregation in ("fedavg", "ffa"), "aggregation must be 'fedavg' or 'ffa'"),
            (self.aggregator in ("mean", "median", "trimmed-mean"),
             "aggregator must be 'mean', 'median' or 'trimmed-mean'"),
            (0.0 <= self.trim_ratio < 0.5, "trim-ratio must be in [0, 0.5)"),
            (self.update_norm_factor == 0 or self.update_norm_factor >= 1, "update-norm-factor must be 0 or >= 1"),
            (self.max_update_norm >= 0, "max-update-norm must be >= 0"),
            (self.dp_epsilon >= 0 and self.dp_noise >= 0, "dp-epsilon and dp-noise must be >= 0"),
            (self.dp_clip > 0, "dp-clip must be > 0"),
            (0.0 <= self.dp_delta < 1.0, "dp-delta must be in [0, 1)"),
            (self.dp_users_per_step >= 0, "dp-users-per-step must be >= 0"),
            (self.secagg_max_weight > 0, "secagg-max-weight must be > 0"),
            (not (self.secagg and self.aggregator != "mean"), "secagg sums the updates: aggregator must be 'mean'"),
        ]


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "federation": FederationConfig,
            "privacy": PrivacyConfig}


@dataclass
class PollenConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    @classmethod
    def from_flat(cls, table: Mapping[str, Any]) -> "PollenConfig":
        """Build from kebab-case keys; unknown keys and wrongly typed values raise one clear error."""
        known = {key: (section, f) for section, klass in SECTIONS.items() for f in fields(klass)
                 for key in [f.name.replace("_", "-")]}
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        config = cls()
        for key, value in table.items():
            section, f = known[key]
            setattr(getattr(config, section), f.name, _coerce(key, value, type(getattr(getattr(config, section), f.name))))
        config.validate()
        return config

    def to_flat(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(getattr(self, section), f.name)
                for section in SECTIONS for f in fields(getattr(self, section))}

    def validate(self) -> None:
        checks = [
            (self.data.max_len >= 1, "max-len must be >= 1"),
            (self.model.lora_layers >= 0, "lora-layers must be >= 0"),
            (self.model.lora_rank >= 1, "lora-rank must be >= 1"),
            (self.model.text or self.model.item_ids, "a model needs text or item-ids"),
            (self.model.rating_weight >= 0, "rating-weight must be >= 0"),
            (self.train.local_epochs >= 1, "local-epochs must be >= 1"),
            (self.train.batch_size >= 1, "batch-size must be >= 1"),
            (self.train.max_steps >= 0, "max-steps must be >= 0"),
            (self.train.patience >= 0, "patience must be >= 0"),
            (self.model.adaptor_experts >= 1, "adaptor-experts must be >= 1"),
            (self.model.temperature >= 0, "temperature must be >= 0 (0 = dot product)"),
            (self.train.loss in ("softmax", "sampled"), "loss must be 'softmax' or 'sampled'"),
            (self.federation.num_rounds >= 1, "num-rounds must be >= 1"),
            (self.federation.min_clients >= 1, "min-clients must be >= 1"),
            (self.federation.adapter_dtype in ("float32", "float16"),
             "adapter-dtype must be 'float32' or 'float16' (numpy, Flower's array format, has no bfloat16)"),
            (self.data.clients_per_platform >= 1, "clients-per-platform must be >= 1"),
        ] + self.privacy.checks()
        for ok, message in checks:
            if not ok:
                raise ValueError(f"config: {message}")
        self.model.fusion_theta()
        self.data.platform_paths()

    def replace(self, **flat: Any) -> "PollenConfig":
        """A copy with some kebab-case keys changed."""
        return PollenConfig.from_flat({**self.to_flat(), **flat})


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Flower passes numbers and strings; accept the obvious spellings and nothing else."""
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"config '{key}': expected {kind.__name__}, got {value!r}") from None


def add_flags(parser: argparse.ArgumentParser, defaults: PollenConfig | None = None) -> None:
    """One --flag per config key, defaulting to ``defaults``."""
    for key, value in (defaults or PollenConfig()).to_flat().items():
        kind = type(value)
        parser.add_argument(f"--{key}", dest=key.replace("-", "_"), default=value,
                            type=(lambda s, k=key: _coerce(k, s, bool)) if kind is bool else kind,
                            metavar=kind.__name__.upper())


def from_args(args: argparse.Namespace) -> PollenConfig:
    known = PollenConfig().to_flat()
    return PollenConfig.from_flat({k: getattr(args, k.replace("-", "_")) for k in known})


# Keys the server adds to the flat table in every message; they are not settings. The federation id names the
# partners' private state on disk, so a resumed run finds it again and a new run never mixes with an old one.
SERVER_ROUND, FEDERATION_ID = "server-round", "federation-id"
