"""Typed configuration, built from one flat table of ``kebab-case`` keys.

The same keys appear in ``[tool.flwr.app.config]`` (pyproject.toml), in ``flwr run --run-config`` and as
command-line flags of the simulations, so a setting has one name everywhere. The ServerApp sends the flat table
to every client with each message, so both sides always agree on it.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from common.errors import ConfigError

BENCHMARK_PLATFORMS = ("ecommerce=ecommerce/amazon-office-2014,social=social/lastfm-sequences,"
                       "video=video/movielens-100k")


@dataclass
class DataConfig:
    """data: where the platforms come from"""

    data_dir: str = field(default="", metadata={
        "help": "folder of platform folders; empty = the embedded synthetic data (3 small platforms)",
        "values": "a folder path, or empty", "scope": "data"})
    platforms: str = field(default=BENCHMARK_PLATFORMS, metadata={
        "help": "the platforms under data-dir, one client each (ignored without data-dir)",
        "values": "name=relative/folder pairs separated by commas", "scope": "data"})
    k_core: int = field(default=0, metadata={
        "help": "drop users and items with fewer interactions than this (0 = keep all)", "values": ">= 0"})
    max_len: int = field(default=50, metadata={
        "help": "most recent history items the head sees", "values": ">= 1"})
    window_stride: int = field(default=0, metadata={
        "help": "training windows (max-len + 1 items) end every this many items of a history and each learns only "
                "its last stride next items, so an item is learned after at least max-len - stride + 1 earlier "
                "ones (ranking sees max-len); the ID-only SASRec baseline uses 10, the text head 0 (README)",
        "values": "0 = max-len (windows do not overlap), else 1 to max-len"})
    synthetic_seed: int = field(default=0, metadata={
        "help": "seed of the embedded synthetic data (used without data-dir)", "values": "any integer"})
    # speed and scale (issue 6)
    clients_per_platform: int = field(default=1, metadata={
        "help": "simulation: each platform's users are dealt into this many silos, one client each",
        "values": ">= 1", "scope": "federation"})

    def platform_paths(self) -> list[tuple[str, str]]:
        pairs = []
        for part in filter(None, (p.strip() for p in self.platforms.split(","))):
            name, sep, path = part.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"config 'platforms': expected name=path pairs separated by commas, got {part!r}")
            name = name.strip()
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in dict(pairs):
                raise ConfigError(f"config 'platforms': platform name {name!r} must be unique and use only letters, "
                                  "digits, '.', '_' or '-' (it names folders)")
            pairs.append((name, path.strip()))
        if not pairs:
            raise ConfigError("config 'platforms': expected at least one name=path pair")
        return pairs


@dataclass
class ModelConfig:
    """model: the text encoder (frozen, optional LoRA), the shared adaptor + sequence encoder, the private head"""

    base_model: str = field(default="", metadata={
        "help": "local Hugging Face model folder; empty = the shipped all-MiniLM-L6-v2",
        "values": "a folder path, or empty"})
    text: bool = field(default=True, metadata={
        "help": "use item texts through the encoder; false = ID-only SASRec (no encoder, no adapter)"})
    lora_layers: int = field(default=0, metadata={
        "help": "LoRA in the top k transformer layers; the frozen layers below are cached per item "
                "(0 = the whole encoder frozen, the measured better default)",
        "values": ">= 0"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r", "values": ">= 1"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha/r)",
                                                      "values": "> 0"})
    lora_targets: str = field(default="query,value", metadata={
        "help": "the linear maps of each LoRA layer that get an adapter",
        "values": "comma-separated module names, e.g. query,key,value,dense"})
    max_tokens: int = field(default=0, metadata={
        "help": "item text truncation, in tokens; 0 = per catalogue, the length that >= 95% of its texts fit "
                "(at most 128)", "values": ">= 0"})
    hidden_size: int = field(default=64, metadata={"help": "width of the head (adaptor output, sequence encoder)",
                                                   "values": ">= 1"})
    head_layers: int = field(default=2, metadata={"help": "transformer layers of the head's user encoder",
                                                  "values": ">= 1"})
    head_heads: int = field(default=2, metadata={"help": "attention heads of the head's user encoder",
                                                 "values": ">= 1, dividing hidden-size"})
    dropout: float = field(default=0.2, metadata={"help": "dropout in the sequence encoder", "values": "[0, 1)"})
    adaptor_experts: int = field(default=1, metadata={
        "help": "text adaptor: 1 = one whitening projection (x - b) W; more = UniSRec's gated mixture of them",
        "values": ">= 1"})
    temperature: float = field(default=0.0, metadata={
        "help": "logits: 0 = dot product of user state and item vector; > 0 = cosine / temperature (UniSRec 0.07)",
        "values": ">= 0"})
    item_ids: bool = field(default=True, metadata={
        "help": "fuse platform-private item-ID embeddings with the text vectors"})
    fusion: str = field(default="learned", metadata={
        "help": "theta, the weight of text against item IDs in an item's vector",
        "values": "'learned' or a number in [0, 1]"})
    rating_weight: float = field(default=0.0, metadata={
        "help": "> 0: the head also predicts explicit ratings, MSE loss at this weight", "values": ">= 0 (0 = off)"})
    text_prior: bool = field(default=False, metadata={
        "help": "add the text prior to every score: the cosine of an item's pretrained text vector with a mean of "
                "the history's (latest items weighted most), times a learned scale; the learned part starts at 0, "
                "so an untrained model ranks like MiniLM with no training and validation can keep that start"})
    train_adaptor: bool = field(default=True, metadata={
        "help": "train the shared text adaptor (false: it stays at the seeded start every party shares; under DP "
                "that removes each user's adaptor gradient, the dearest part of a DP step on short histories)"})
    popularity_prior: bool = field(default=False, metadata={
        "help": "with text-prior: add w x log(1 + the item's training users) to every score (users weighted so "
                "each adds norm 1, common/data/split.py user_popularity), w trained from where validation puts it; "
                "under DP from 0, the counts released once with Gaussian noise for a dp-popularity-share of "
                "dp-epsilon"})

    @property
    def first_candidate(self) -> int:
        """The first epoch (federated round) whose model may be kept and served: 0, the untrained start, only
        with the text prior (it then ranks like MiniLM zero-shot, a model worth serving); else 1. Read by
        ``common.train.fit``, the server's record and the client's export."""
        return 0 if self.text_prior else 1

    def fusion_theta(self) -> float | None:
        if self.fusion == "learned":
            return None
        try:
            theta = float(self.fusion)
        except ValueError:
            theta = -1.0
        if not 0.0 <= theta <= 1.0:
            raise ConfigError(f"config 'fusion': expected 'learned' or a number in [0, 1], got {self.fusion!r}")
        return theta


@dataclass
class TrainConfig:
    """train: the local training loop"""

    local_epochs: int = field(default=1, metadata={
        "help": "epochs per federated round (a local method's whole budget = num-rounds x this)", "values": ">= 1"})
    batch_size: int = field(default=128, metadata={"help": "training sequences per step", "values": ">= 1"})
    lr: float = field(default=1e-3, metadata={
        "help": "AdamW learning rate of the head, text adaptor and sequence encoder", "values": "> 0"})
    lora_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the LoRA adapter",
                                                    "values": "> 0"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "values": ">= 0"})
    live_items: int = field(default=32, metadata={
        "help": "items per step re-encoded with gradient; the rest come from a table refreshed each epoch",
        "values": ">= 1"})
    loss: str = field(default="softmax", metadata={
        "help": "softmax over the whole catalogue, or over sampled negatives", "choices": ("softmax", "sampled")})
    logits_dtype: str = field(default="auto", metadata={
        "help": "number format of the training logits' matrix products over the whole catalogue (forward and both "
                "backward), most of an epoch on a large catalogue; bfloat16 took a third off SASRec-ID's Last.fm "
                "epoch on a CPU with AVX512-BF16 at the same test NDCG@10 over 3 seeds, and the 3-seed benchmark "
                "from 72 to 55 minutes (README, Speed and scale); auto = bfloat16 where the hardware multiplies it "
                "natively (a CUDA GPU with bfloat16; a CPU with AVX512-BF16 or AMX), else float32; scoring is always "
                "float32", "choices": ("auto", "float32", "bfloat16")})
    negatives: int = field(default=256, metadata={"help": "negatives per step for loss = sampled",
                                                  "values": ">= 1"})
    seed: int = field(default=42, metadata={"help": "seed of the adapter's start, the head and the data order",
                                            "values": "any integer"})
    threads: int = field(default=0, metadata={
        "help": "torch threads of this process", "values": ">= 0 (0 = what the process was given, else all cores)"})
    device: str = field(default="auto", metadata={"help": "where the model runs (auto = the GPU when there is one)",
                                                  "values": "auto | cpu | cuda | cuda:N"})
    max_steps: int = field(default=0, metadata={
        "help": "cap on optimiser steps per epoch: a reduced, equal budget", "values": ">= 0 (0 = the full epoch)"})
    patience: int = field(default=10, metadata={
        "help": "early stopping: stop after this many epochs (rounds) without a better validation NDCG@10",
        "values": ">= 0 (0 = never)"})


@dataclass
class FederationConfig:
    """federation: rounds, the server's wait and the run folder"""

    num_rounds: int = field(default=5, metadata={"help": "federated rounds (round 0 evaluates the start)",
                                                 "values": ">= 1", "scope": "federation"})
    min_clients: int = field(default=0, metadata={"help": "acceptable replies needed to aggregate a round",
                                                  "values": ">= 0 (0 = every client of the run)",
                                                  "scope": "federation"})
    round_timeout: float = field(default=1800.0, metadata={
        "help": "seconds the server waits for nodes and replies in a round", "values": "> 0",
        "scope": "federation"})
    run_dir: str = field(default="", metadata={
        "help": "where results, plots and adapters are written", "values": "a folder path; empty = runs/<time>",
        "scope": "run"})
    personalise: bool = field(default=True, metadata={
        "help": "members evaluate and serve their own adapters after the round's local training, which starts from "
                "the mix (1, 1/2 or 0) of the global adapters and their own last ones that ranks their validation "
                "best (not under DP: the global; false: train from the global, evaluate it as received)",
        "scope": "federation"})
    # speed and scale (issue 6)
    adapter_dtype: str = field(default="float32", metadata={
        "help": "the adapter's dtype on the wire, both ways (averaged in float32)",
        "choices": ("float32", "float16"), "scope": "federation"})


@dataclass
class PrivacyConfig:
    """privacy: secure aggregation, user-level DP-SGD, LoRA aggregation and the checks on updates"""

    secagg: bool = field(default=False, metadata={
        "help": "Flower SecAgg+: the server only ever sees the masked sum of the adapters", "scope": "federation"})
    aggregation: str = field(default="fedavg", metadata={
        "help": "fedavg: average LoRA A and B; ffa: A frozen at its shared start, only B trained and sent",
        "choices": ("fedavg", "ffa"), "scope": "federation"})
    aggregator: str = field(default="mean", metadata={
        "help": "how the server combines updates: weighted mean, or per-entry median / trimmed mean",
        "choices": ("mean", "median", "trimmed-mean"), "scope": "federation"})
    trim_ratio: float = field(default=0.2, metadata={
        "help": "fraction cut at each end by trimmed-mean (at least one reply when >= 3)", "values": "[0, 0.5)",
        "scope": "federation"})
    update_norm_factor: float = field(default=10.0, metadata={
        "help": "reject an update whose norm exceeds this x the round's median norm",
        "values": "0 (off) or >= 1", "scope": "federation"})
    max_update_norm: float = field(default=0.0, metadata={
        "help": "reject an update whose L2 norm exceeds this", "values": ">= 0 (0 = off)", "scope": "federation"})
    dp_epsilon: float = field(default=0.0, metadata={
        "help": "user-level DP-SGD: target epsilon over all rounds (calibrates the noise)", "values": ">= 0 (0 = off)"})
    dp_noise: float = field(default=0.0, metadata={
        "help": "DP-SGD noise multiplier sigma, used when dp-epsilon = 0", "values": ">= 0 (both 0 = no DP)"})
    dp_clip: float = field(default=1.0, metadata={"help": "L2 bound on one user's gradient (adapter + head)",
                                                  "values": "> 0"})
    dp_delta: float = field(default=0.0, metadata={"help": "delta of the reported epsilon",
                                                   "values": "[0, 1) (0 = 1 / training users)"})
    dp_popularity_share: float = field(default=0.5, metadata={
        "help": "user-level DP with popularity-prior: the share of the target epsilon spent on releasing the item "
                "counts once (a Gaussian mechanism, composed with the training steps by the same accountant)",
        "values": "(0, 1)"})
    dp_users_per_step: int = field(default=0, metadata={
        "help": "user-level DP: expected users per noisy step (sample rate = this / users); fewer, larger steps "
                "add relatively less noise", "values": ">= 0 (0 = batch-size)"})
    secagg_max_weight: float = field(default=10000.0, metadata={
        "help": "SecAgg+ weights are training sequences / this (keep it >= the largest client)", "values": "> 0",
        "scope": "federation"})

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
            (0.0 < self.dp_popularity_share < 1.0, "dp-popularity-share must be in (0, 1)"),
            (self.secagg_max_weight > 0, "secagg-max-weight must be > 0"),
            (not (self.secagg and self.aggregator != "mean"), "secagg sums the updates: aggregator must be 'mean'"),
        ]


# A platform joining with little data (client.adapt, simulations.transfer) starts from the text prior: its
# untrained model is MiniLM's zero-shot ranking and validation keeps it until training beats it. Amazon Scientific,
# 5-25% of its users: above zero-shot on every seed, where the plain head fell below it; members training on all
# their data keep the default (off), measured below it on Amazon Office (README, "A new platform joins"). And with
# the items' popularity among its training users, weighted on validation: Scientific, pretrained start, 3 seeds,
# test NDCG@10 at 5 / 10 / 25 / 100% of the users 0.0788 / 0.0815 / 0.0778 / 0.0833 without, 0.0848 / 0.0863 /
# 0.0855 / 0.0868 with (+ + + at every fraction).
NEWCOMER = {"text-prior": True, "popularity-prior": True}

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
            raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
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
            (0 <= self.data.window_stride <= self.data.max_len, "window-stride must be >= 0 and at most max-len"),
            (self.model.lora_layers >= 0, "lora-layers must be >= 0"),
            (self.model.lora_rank >= 1, "lora-rank must be >= 1"),
            (self.model.text or self.model.item_ids, "a model needs text or item-ids"),
            (self.model.rating_weight >= 0, "rating-weight must be >= 0"),
            (self.model.text or not self.model.text_prior, "text-prior needs text = true"),
            (self.model.text_prior or not self.model.popularity_prior, "popularity-prior needs text-prior = true"),
            (not (self.model.popularity_prior and self.privacy.dp_noise > 0 and self.privacy.dp_epsilon == 0),
             "popularity-prior under DP needs dp-epsilon (its release takes a dp-popularity-share of it), "
             "not dp-noise"),
            (self.train.local_epochs >= 1, "local-epochs must be >= 1"),
            (self.train.batch_size >= 1, "batch-size must be >= 1"),
            (self.train.max_steps >= 0, "max-steps must be >= 0"),
            (self.train.patience >= 0, "patience must be >= 0"),
            (self.model.adaptor_experts >= 1, "adaptor-experts must be >= 1"),
            (self.model.temperature >= 0, "temperature must be >= 0 (0 = dot product)"),
            (self.train.loss in ("softmax", "sampled"), "loss must be 'softmax' or 'sampled'"),
            (self.federation.num_rounds >= 1, "num-rounds must be >= 1"),
            (self.federation.min_clients >= 0, "min-clients must be >= 0 (0 = every client of the run)"),
            (self.federation.round_timeout > 0, "round-timeout must be > 0 seconds"),
            (self.train.threads >= 0, "threads must be >= 0 (0 = all cores of the process)"),
            (re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.train.device) is not None,
             f"device must be auto, cpu, cuda or cuda:N, got {self.train.device!r}"),
            (self.train.lr > 0 and self.train.lora_lr >= 0 and self.train.weight_decay >= 0,
             "lr must be > 0, lora-lr and weight-decay >= 0"),
            (self.train.live_items >= 0 and self.train.negatives >= 1, "live-items must be >= 0, negatives >= 1"),
            (self.data.k_core >= 0, "k-core must be >= 0"),
            (self.model.max_tokens >= 0 and self.model.lora_alpha > 0,
             "max-tokens must be >= 0 (0 = from the catalogue), lora-alpha > 0"),
            (self.model.hidden_size >= 1 and self.model.head_layers >= 1 and self.model.head_heads >= 1
             and self.model.hidden_size % self.model.head_heads == 0,
             "hidden-size, head-layers and head-heads must be >= 1, hidden-size a multiple of head-heads"),
            (0.0 <= self.model.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.federation.adapter_dtype in ("float32", "float16"),
             "adapter-dtype must be 'float32' or 'float16' (numpy, Flower's array format, has no bfloat16)"),
            (self.data.clients_per_platform >= 1, "clients-per-platform must be >= 1"),
        ] + self.privacy.checks()
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"config: {message}")
        infinite = [k for k, v in self.to_flat().items() if isinstance(v, float) and not math.isfinite(v)]
        if infinite:
            raise ConfigError(f"config '{infinite[0]}': expected a finite number, got {self.to_flat()[infinite[0]]}")
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
        raise ConfigError(f"config '{key}': expected {kind.__name__}, got {value!r}") from None


SCOPES = ("model", "data", "run", "federation")
"""Which commands a setting concerns (its metadata "scope", default "model"): "model" shapes the data, model or
training of any command that trains; "data" finds the platforms under a data folder (drivers); "run" is a
driver's output folder; "federation" matters only where a federation runs."""


def settings() -> list[tuple[str, str, Any]]:
    """Every setting as (section, kebab-case key, dataclass field), in declaration order."""
    return [(section, f.name.replace("_", "-"), f) for section, klass in SECTIONS.items() for f in fields(klass)]


def describe(f: Any, default: Any) -> str:
    """A setting's one line of help: meaning, default and allowed values, from its field metadata."""
    meta = f.metadata
    if "help" not in meta:
        raise ValueError(f"config field {f.name!r} has no metadata help: declare it as "
                         "field(default=..., metadata={\"help\": \"...\"})")
    if "choices" in meta:
        values = " | ".join(meta["choices"])
    elif isinstance(default, bool):
        values = "true | false"
    else:
        values = meta.get("values", {int: "integer", float: "number", str: "text"}.get(type(default), ""))
    shown = str(default).lower() if isinstance(default, bool) else (repr(default) if default == "" else default)
    return f"{meta['help']} [default: {shown}; {values}]"


def add_flags(parser: argparse.ArgumentParser, defaults: PollenConfig | None = None,
              scopes: tuple[str, ...] = SCOPES) -> None:
    """One --flag per setting of the given ``scopes``, defaulting to ``defaults``, grouped by section, each with
    its one line of help from the field's metadata. Settings outside ``scopes`` get no flag but keep their
    default in the parsed namespace, so ``from_args`` builds the whole config either way."""
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise ValueError(f"add_flags: unknown scope(s) {sorted(unknown)}; known: {SCOPES}")
    values = (defaults or PollenConfig()).to_flat()
    groups: dict[str, argparse._ArgumentGroup] = {}
    hidden = {}
    for section, key, f in settings():
        value, dest = values[key], key.replace("-", "_")
        if f.metadata.get("scope", "model") not in scopes:
            hidden[dest] = value
            continue
        if section not in groups:
            title = (SECTIONS[section].__doc__ or section).strip().split("\n")[0]
            groups[section] = parser.add_argument_group(f"{title} (common/config.py)")
        kind = type(value)
        choices = f.metadata.get("choices")
        groups[section].add_argument(
            f"--{key}", dest=dest, default=value, choices=choices,
            type=(lambda s, k=key: _coerce(k, s, bool)) if kind is bool else kind,
            metavar="{" + ",".join(choices) + "}" if choices else "BOOL" if kind is bool else kind.__name__.upper(),
            help=describe(f, value).replace("%", "%%"))
    parser.set_defaults(**hidden)


def from_args(args: argparse.Namespace) -> PollenConfig:
    """The config from a namespace filled by ``add_flags`` (every key is there, flag or not)."""
    known = PollenConfig().to_flat()
    return PollenConfig.from_flat({k: getattr(args, k.replace("-", "_")) for k in known})


# Keys the server adds to the flat table in every message; they are not settings. The federation id names the
# partners' private state on disk, so a resumed run finds it again and a new run never mixes with an old one.
SERVER_ROUND, FEDERATION_ID = "server-round", "federation-id"
