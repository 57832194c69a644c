"""The real benchmark: every method on the same split, the same epoch budget, full-ranking metrics.

    python -m simulations.benchmark --data-dir ../shared/data

Platforms (config 'platforms'): e-commerce = Amazon Office (ReChorus), social = Last.fm sequences (RecBole),
video = MovieLens-100K (RecBole). Methods: popularity, SASRec on item IDs, zero-shot frozen text, LoRA+head
trained on each platform alone, Pollen's federation, and the centralised (pooled, privacy-violating) reference.
Budget = num-rounds x local-epochs epochs for every trained method; each platform's reported model is its
best epoch (or round) on validation. Writes benchmark.json and benchmark.md into the run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from pathlib import Path

import torch

from common.baselines import popularity_scorer, zero_shot_scorer
from common import cli
from common.config import PollenConfig, add_flags, from_args
from common.errors import ConfigError
from common.preflight import add_run_flags, preflight
from common.data.sources import load_split, platform_names
from common.data.split import SplitData
from common.evaluate import evaluate
from common.files import write_atomic, write_json
from common.model.encoder import TextEncoder, cached_item_states
from common.model.recommender import Recommender
from common.runtime import configure_threads, default_cache_dir
from common.train import Platform, fit

METHODS = ("popularity", "zero-shot", "federated", "sasrec-id", "local-only", "centralised")
# Pollen's federation with privacy / aggregation settings changed (not run by default; name them in --methods)
FEDERATED_VARIANTS = {"federated-ffa": {"aggregation": "ffa"},
                      "federated-dp-eps1": {"dp-epsilon": 1.0}, "federated-dp-eps4": {"dp-epsilon": 4.0},
                      "federated-dp-eps8": {"dp-epsilon": 8.0}}
SHOWN = ("ndcg@10", "ndcg@20", "hr@10", "hr@20", "mrr", "precision@10", "recall@10", "f1@10")


def build_platforms(splits: list[SplitData], config: PollenConfig, cache_dir: str | None,
                    encoder: TextEncoder | None = None) -> list[Platform]:
    """Fresh models with the run's seed; platforms given one encoder share it (the centralised case)."""
    torch.manual_seed(config.train.seed)
    platforms = []
    for split in splits:
        states = cached_item_states(encoder, split.item_texts, cache_dir) if encoder is not None else None
        platforms.append(Platform(split, Recommender(split, config, encoder, states)))
    return platforms


def run_benchmark(config: PollenConfig, methods: tuple[str, ...], cache_dir: str | None,
                  log=functools.partial(print, flush=True)) -> dict:
    budget = config.federation.num_rounds * config.train.local_epochs
    splits = [load_split(config.data, name) for name in platform_names(config.data)]
    for s in splits:
        log(f"{s.name}: {s.num_users:,} users, {s.num_items:,} items, "
            f"{sum(len(q) for q in s.sequences):,} interactions")
    results: dict[str, dict] = {"budget_epochs": budget, "config": config.to_flat(), "methods": {}}

    def record(method: str, test: dict[str, dict], seconds: float, **extra) -> None:
        results["methods"][method] = {"test": test, "seconds": seconds, **extra}
        log(f"[{method}] {seconds:.0f}s  " + "  ".join(f"{n}: NDCG@10 {m['ndcg@10']:.4f}" for n, m in test.items()))

    for method in methods:
        start = time.perf_counter()
        if method == "popularity":
            record(method, {s.name: evaluate(popularity_scorer(s), s, "test") for s in splits},
                   time.perf_counter() - start)
        elif method == "zero-shot":
            encoder = TextEncoder(dataclasses.replace(config.model, lora_layers=0))
            test = {s.name: evaluate(zero_shot_scorer(s, encoder, cached_item_states(encoder, s.item_texts,
                                                                                     cache_dir)), s, "test")
                    for s in splits}
            record(method, test, time.perf_counter() - start)
        elif method == "sasrec-id":
            id_config = config.replace(**{"text": False, "item-ids": True})
            test, best = {}, {}
            for p in build_platforms(splits, id_config, None):
                r = fit([p], None, id_config, budget, log=log, label=f"[sasrec-id {p.split.name}] ")
                test.update(r.test)
                best.update(r.best_epoch)
            record(method, test, time.perf_counter() - start, best_epoch=best)
        elif method == "local-only":
            test, best = {}, {}
            for split in splits:
                torch.manual_seed(config.train.seed)
                encoder = TextEncoder(config.model, seed=config.train.seed)
                r = fit(build_platforms([split], config, cache_dir, encoder), encoder, config, budget, log=log,
                        label=f"[local-only {split.name}] ")
                test.update(r.test)
                best.update(r.best_epoch)
            record(method, test, time.perf_counter() - start, best_epoch=best)
        elif method == "centralised":
            torch.manual_seed(config.train.seed)
            encoder = TextEncoder(config.model, seed=config.train.seed)
            r = fit(build_platforms(splits, config, cache_dir, encoder), encoder, config, budget, log=log,
                    label="[centralised] ")
            record(method, r.test, time.perf_counter() - start, best_epoch=r.best_epoch)
        elif method == "federated" or method in FEDERATED_VARIANTS:
            from simulations.run import simulate

            folder = "federation" if method == "federated" else method
            run = simulate(config.replace(**FEDERATED_VARIANTS.get(method, {}),
                                          **{"run-dir": str(Path(config.federation.run_dir) / folder)}))
            chosen = run.selected()
            upload = {name: per[name]["upload-bytes"] for per in run.training.values() for name in per}
            last = run.training[max(run.training)]
            epsilon = {name: m["dp-epsilon"] for name, m in last.items() if "dp-epsilon" in m}
            record(method, {n: c["test"] for n, c in chosen.items()}, time.perf_counter() - start,
                   best_epoch={n: c["round"] for n, c in chosen.items()}, settings=FEDERATED_VARIANTS.get(method, {}),
                   upload_bytes_per_client_per_round=upload, round_seconds=run.round_seconds,
                   **({"dp_epsilon_spent": epsilon, "dp_noise": {n: m["dp-noise"] for n, m in last.items()}}
                      if epsilon else {}))
        else:
            raise ValueError(f"unknown method {method!r}; expected some of {METHODS + tuple(FEDERATED_VARIANTS)}")
        write_json(Path(config.federation.run_dir) / "benchmark.json", results)  # partial results survive a crash
    full = TextEncoder(config.model)
    results["full_model_bytes"] = full.base_model_bytes()
    results["adapter_bytes"] = sum(v.numel() * v.element_size() for v in full.adapter_state().values())
    return results


def markdown(results: dict) -> str:
    methods = results["methods"]
    platforms = sorted({p for m in methods.values() for p in m["test"]})
    lines = [f"Budget: {results['budget_epochs']} epochs per trained method; full ranking over all items, "
             "history masked, ties against the target; test metrics at each method's best validation epoch.", ""]
    for platform in platforms:
        sampled = any("sampled-ndcg@10" in m["test"].get(platform, {}) for m in methods.values())
        cols = list(SHOWN) + (["sampled-hr@10", "sampled-ndcg@10"] if sampled else [])
        lines += [f"### {platform}", "", "| method | " + " | ".join(cols) + " | wall s |",
                  "|---" * (len(cols) + 2) + "|"]
        for name, m in methods.items():
            if platform in m["test"]:
                t = m["test"][platform]
                lines.append(f"| {name} | " + " | ".join(f"{t.get(c, float('nan')):.4f}" for c in cols)
                             + f" | {m['seconds']:.0f} |")
        lines.append("")
    private = {name: m for name, m in methods.items() if "dp_epsilon_spent" in m}
    if private:
        lines += ["### User-level DP (epsilon spent at the end, per platform; delta = 1 / training users)", ""]
        lines += [f"- {name}: " + ", ".join(f"{p} epsilon {e:.2f} (sigma {m['dp_noise'][p]:.2f})"
                                            for p, e in sorted(m["dp_epsilon_spent"].items()))
                  for name, m in private.items()] + [""]
    fed = methods.get("federated")
    if fed:
        per = fed["upload_bytes_per_client_per_round"]
        lines += ["### Communication", "",
                  f"Bytes uploaded per client per round: {max(per.values()):,.0f} (the LoRA adapter); "
                  f"full model: {results['full_model_bytes']:,} bytes; ratio "
                  f"{max(per.values()) / results['full_model_bytes']:.4%}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(
        METHODS + tuple(FEDERATED_VARIANTS)))
    parser.add_argument("--cache-dir", default=default_cache_dir(), help="where frozen-layer item states are kept")
    add_flags(parser, PollenConfig().replace(**{"data-dir": "../shared/data", "num-rounds": 10}))
    add_run_flags(parser)
    args = parser.parse_args()
    config = from_args(args)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = sorted(set(methods) - set(METHODS + tuple(FEDERATED_VARIANTS)))
    if unknown or not methods:
        raise ConfigError(f"--methods: unknown {unknown or 'empty'}; expected some of {METHODS + tuple(FEDERATED_VARIANTS)}")
    config = preflight(config, "benchmark", args.overwrite, federation=any(m.startswith("federated") for m in methods))
    configure_threads(config.train.threads)
    start = time.perf_counter()
    results = run_benchmark(config, methods, args.cache_dir)
    results["seconds"] = time.perf_counter() - start
    run_dir = Path(config.federation.run_dir)
    write_json(run_dir / "benchmark.json", results)
    write_atomic(run_dir / "benchmark.md", markdown(results))
    print(markdown(results))
    print(f"total {results['seconds'] / 60:.1f} min; written to {run_dir}")


if __name__ == "__main__":
    cli.run(main)
