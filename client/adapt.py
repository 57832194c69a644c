"""A platform outside the federation adopts its global adapter: fine-tune adapter + a fresh head locally, export.

    python -m client.adapt --adapter RUN/adapter --data-path PATH [--platform NAME] --export-dir DIR \
        [--fraction F] [--epochs E] [config flags, e.g. --threads 1]

Loads the PEFT adapter the federation saved (RUN/adapter) into the pretrained encoder, trains adapter + head on
the platform's own data with the one training loop (common/train.py ``fit``: full budget, best epoch on
validation), and exports the selected model for serving (client/export.py). ``--fraction`` trains on the first
F of the platform's users in a seeded order (nested: 0.1 holds 0.05), to measure how little data a join needs;
validation picks the epoch on those users, test covers every user.

Joining the federation itself (from the next round) is a deployment matter, not this command: start one more
SuperNode for the platform with node config ``platform="NAME" data-path="PATH"`` (optionally ``export-dir``,
``threads``, ``device``, ``cache-dir``; see client/node.py ``NodeSettings``), e.g.

    flower-supernode --superlink HOST:9092 --node-config 'platform="scientific" data-path="/data/scientific"' ...

The ServerApp samples every connected node, so the fourth client takes part from the next round that starts
after it connects; it receives the global adapter with that round's message, so it needs no adapter file.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.export import export_model
from common import cli
from common.checks import check_tensors, read_adapter, shapes
from common.cli import add_debug_flag
from common.config import NEWCOMER, PollenConfig, add_flags, from_args
from common.errors import ConfigError, FileProblem, printable_path
from common.preflight import check_settings
from common.data.sources import load_split
from common.data.split import SplitData
from common.evaluate import evaluate
from common.model.encoder import TextEncoder, cached_item_states
from common.model.recommender import Recommender
from common.runtime import configure_threads, default_cache_dir
from common.train import FitResult, Log, Platform, adopt, fit



def user_order(num_users: int, seed: int) -> np.ndarray:
    """A seeded permutation of user positions; every fraction takes a prefix of it, so subsets are nested."""
    return np.random.default_rng(seed).permutation(num_users)


def user_subset(split: SplitData, fraction: float, seed: int) -> SplitData:
    """The same catalogue with only the first ``fraction`` of users (seeded order, at least one user)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return split
    return split.subset(np.sort(user_order(split.num_users, seed)[:max(1, math.ceil(fraction * split.num_users))]))


@dataclass
class Adapted:
    """A platform model after local training: the platform (on its training users) and the fit's record."""

    platform: Platform
    encoder: TextEncoder | None
    result: FitResult
    share: float | None = None  # of the federation's adapters the model started from (``_received``); None: none given


def adapt(split: SplitData, config: PollenConfig, adapter: dict[str, torch.Tensor] | None, epochs: int,
          fraction: float = 1.0, cache_dir: str | None = None, log: Log = print, label: str = "",
          adapter_source: str = "adapter") -> Adapted:
    """Train a fresh head (and the LoRA adapter, started from ``adapter`` or fresh) on a fraction of the users.

    ``config.model.text = false`` gives ID-only SASRec, where ``adapter`` must be None. The returned platform
    holds the best-on-validation state.
    """
    torch.manual_seed(config.train.seed)
    encoder = None
    if config.model.text:
        encoder = TextEncoder(config.model, seed=config.train.seed, max_len=config.data.max_len)
        if adapter is not None:  # the adapter must fit this model (keys and shapes) and hold finite values
            check_tensors(adapter, adapter_source, shapes(encoder.adapter_state()), "adapter for this model "
                          f"(base-model, lora-layers {config.model.lora_layers}, lora-rank {config.model.lora_rank})")
    elif adapter is not None:
        raise ConfigError("config: an ID-only model (text = false) has no encoder to load an adapter into")
    train_split = user_subset(split, fraction, config.train.seed)
    states = cached_item_states(encoder, split.item_texts, cache_dir) if encoder is not None else None
    model, share = _received(train_split, config, encoder, states, adapter, log, label)
    platform = Platform(train_split, model)
    return Adapted(platform, encoder, fit([platform], encoder, config, epochs, log=log, label=label), share)


def _received(split: SplitData, config: PollenConfig, encoder: TextEncoder | None, states, adapter,
              log: Log = print, label: str = "") -> tuple[Recommender, float | None]:
    """The newcomer's model and the share of the received ``adapter`` its encoder holds: with the text prior (not
    under DP) the mix of it and the pretrained start (the encoder's own, seeded) that ranks the newcomer's
    validation best (``common.train.adopt``), so a federation that does not help this catalogue cannot lower its
    start; else all of it."""
    if adapter is None:
        return Recommender(split, config, encoder, states), None
    own = encoder.adapter_state()
    encoder.load_adapter_state(adapter)
    model, share = Recommender(split, config, encoder, states), 1.0
    if model.head.prior and not config.privacy.dp:
        share, score = adopt(Platform(split, model), encoder, adapter, own)
        log(f"{label}starting from {share:.0%} of the federation's adapters (validation NDCG@10 {score:.4f})")
    return model, share


def zero_shot_model(split: SplitData, config: PollenConfig, adapter: dict[str, torch.Tensor] | None,
                    cache_dir: str | None = None) -> Adapted:
    """The shared model as received, untrained on this platform: text-only item vectors (its item IDs are
    unknown to the federation), the shared text adaptor and sequence encoder, with the text prior at the share of
    them its validation chose (``_received``). What a newcomer gets on day 0, before it has training data: hence
    no popularity term either (``popularity-prior`` counts training users)."""
    text_only = config.replace(**{"item-ids": False, "text": True, "popularity-prior": False})
    torch.manual_seed(config.train.seed)
    encoder = TextEncoder(text_only.model, seed=config.train.seed, max_len=config.data.max_len)
    states = cached_item_states(encoder, split.item_texts, cache_dir)
    model, share = _received(split, text_only, encoder, states, adapter, log=lambda line: None)
    return Adapted(Platform(split, model), encoder, FitResult(), share)


def test_metrics(adapted: Adapted, split: SplitData, **convention) -> dict[str, float]:
    """Test metrics of the adapted model over every user of ``split`` (the full platform, whatever fraction)."""
    return evaluate(adapted.platform.model.score, split, "test", **convention)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.adapt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="", help="PEFT adapter folder (RUN/adapter); empty = a fresh LoRA")
    parser.add_argument("--data-path", required=True, help="the platform's data folder (any loader format)")
    parser.add_argument("--platform", default="", help="platform name (default: the folder's name)")
    parser.add_argument("--export-dir", required=True, help="where the model folder is written")
    parser.add_argument("--fraction", type=float, default=1.0, help="share of users to train on, in (0, 1]")
    parser.add_argument("--epochs", type=int, default=100, help="most local epochs (early stopping after config "
                        "'patience' epochs without a better validation NDCG@10); the best on validation is kept")
    parser.add_argument("--cache-dir", default=default_cache_dir(), help="where frozen-layer item states are kept")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --export-dir")
    add_debug_flag(parser)
    add_flags(parser, PollenConfig().replace(**NEWCOMER), scopes=("model",))  # no federation, no data-dir: --data-path
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    # check before work: settings, the export folder, the adapter file, the data; then the model
    config = from_args(args)
    check_settings(config)
    if not 0.0 < args.fraction <= 1.0:
        raise ConfigError(f"--fraction must be in (0, 1], got {args.fraction}")
    export = Path(args.export_dir)
    if export.exists() and (not export.is_dir() or any(export.iterdir())) and not args.overwrite:
        raise FileProblem(export, "--export-dir already holds something; choose another folder or pass --overwrite "
                                  "to replace it")
    adapter = read_adapter(args.adapter) if args.adapter else None
    configure_threads(config.train.threads)
    log = functools.partial(print, flush=True)
    name = args.platform or Path(args.data_path).resolve().name
    split = load_split(config.data, name, args.data_path)
    log(f"{printable_path(name)}: {split.num_users:,} users, {split.num_items:,} items; training on "
        f"{args.fraction:.0%} of users, {'federated adapter ' + args.adapter if args.adapter else 'fresh adapter'}")
    start = time.perf_counter()
    adapted = adapt(split, config, adapter, args.epochs, args.fraction, args.cache_dir, log,
                    f"[{printable_path(name)}] ", adapter_source=str(args.adapter))
    test = test_metrics(adapted, split)
    metrics = {"adapter": str(args.adapter), "global-share": adapted.share, "fraction": args.fraction,
               "epochs": args.epochs, "best-epoch": adapted.result.best_epoch[name],
               "train-users": adapted.platform.split.num_users,
               "valid": adapted.result.valid[name][adapted.result.best_epoch[name] - 1], "test": test,
               "seconds": time.perf_counter() - start}
    folder = export_model(Path(args.export_dir), adapted.platform, config, metrics)
    log(f"best epoch {metrics['best-epoch']}: test NDCG@10 {test['ndcg@10']:.4f}  HR@10 {test['hr@10']:.4f} "
        f"(all {int(test['users']):,} users); exported to {folder}")
    log(json.dumps({"export": str(folder), "test-ndcg@10": test["ndcg@10"]}))
    return 0


if __name__ == "__main__":
    cli.run(main)
