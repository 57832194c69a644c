"""The real benchmark: every method on the same split, the same epoch budget, full-ranking metrics.

    python -m simulations.benchmark --data-dir ../shared/data

Platforms (config 'platforms'): e-commerce = Amazon Office (ReChorus), social = Last.fm sequences (RecBole),
video = MovieLens-100K (RecBole). Methods: popularity, SASRec on item IDs, zero-shot frozen text, the head
trained on each platform alone, Pollen's federation, and the centralised (pooled, privacy-violating) reference;
optional: LoRA after the frozen encoder, and the pooled reference fine-tuned per platform (the most a federation
of these platforms, then personalised, could give its members).
Budget = num-rounds x local-epochs epochs for every trained method; each platform's reported model is its
best epoch (or round) on validation. Writes benchmark.json and benchmark.md into the run folder. The work runs
as ``--jobs`` child processes of one thread at a time (``run_jobs``): a job is one seed's method on one platform,
or on all platforms for the methods that train them together.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common.baselines import SASREC_ID, popularity_scorer, zero_shot_scorer
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
# not run by default (name them in --methods): the LoRA-vs-frozen comparison; the pooled reference with each
# platform then fine-tuned alone from its selected pooled state (the ceiling of "federate, then personalise")
OPTIONAL = ("local-only-lora", "centralised-finetuned")
# Pollen's federation with privacy / aggregation settings changed (not run by default; name them in --methods)
# under DP: text only (noise on the ID table drowns it on sparse data), the text prior, so that an untrained
# model is the zero-shot ranking and the noised steps only correct it, and a 10x learning rate: the few noisy
# steps of a DP run barely move the learned part off zero at the default (local DP, epsilon 8, seed 42, best
# validation NDCG@10 at lr 1e-3 / 3e-3 / 1e-2: Last.fm 0.0109 / 0.0141 / 0.0157, MovieLens 0.0293 / 0.0418 /
# 0.0487), and the items' popularity released under DP for half of epsilon (epsilon 8, 5 rounds, 3 seeds: Last.fm
# 0.0089 -> 0.0170, MovieLens 0.0419 -> 0.0570), with the text adaptor left at its shared start: level on Last.fm
# (- + +), + + + on MovieLens, and a DP epoch 17-20% cheaper (README, "Privacy and robustness")
DP_RECIPE = {"item-ids": False, "text-prior": True, "popularity-prior": True, "train-adaptor": False, "lr": 0.01}
FEDERATED_VARIANTS = {"federated-ffa": {"aggregation": "ffa"},
                      **{f"federated-dp-eps{e}": {"dp-epsilon": float(e), **DP_RECIPE} for e in (1, 4, 8)}}
BUDGET_EPOCHS = 100  # the benchmark's cap on epochs (rounds); early stopping on validation ends every run sooner
SEED_FREE = ("popularity", "zero-shot")  # nothing random: evaluated once, whatever the number of seeds
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


def lora_after_frozen(split: SplitData, config: PollenConfig, budget: int, cache_dir: str | None, log):
    """Head first on the frozen encoder (early stopped), then LoRA on the top ``LORA_LAYERS`` layers from that
    state, at lora-lr, with the same cap and patience; the frozen result stays a candidate (epoch 0), so the
    LoRA phase is kept only where validation says it helps."""
    frozen_config = config.replace(**{"lora-layers": 0})
    torch.manual_seed(config.train.seed)
    frozen = TextEncoder(frozen_config.model, seed=config.train.seed, max_len=config.data.max_len)
    platform, = build_platforms([split], frozen_config, cache_dir, frozen)
    fit([platform], frozen, frozen_config, budget, log=log, label=f"[local-only-lora {split.name} frozen] ")
    lora_config = config.replace(**{"lora-layers": LORA_LAYERS})
    torch.manual_seed(config.train.seed)
    encoder = TextEncoder(lora_config.model, seed=config.train.seed, max_len=config.data.max_len)
    encoder.load_adapter_state({**encoder.adapter_state(), **frozen.adapter_state()})  # LoRA at zero, B = 0
    lora, = build_platforms([split], lora_config, cache_dir, encoder)
    lora.model.head.load_private_state(platform.model.private_state())
    return fit([lora], encoder, lora_config, budget, log=log, label=f"[local-only-lora {split.name} LoRA] ",
               keep_start=True)


LORA_LAYERS = 2


def fit_pooled(splits: list[SplitData], config: PollenConfig, budget: int, cache_dir: str | None, log):
    """The centralised reference: every platform's data in one training, one shared adapter, private heads."""
    torch.manual_seed(config.train.seed)
    encoder = TextEncoder(config.model, seed=config.train.seed, max_len=config.data.max_len)
    platforms = build_platforms(splits, config, cache_dir, encoder)
    return encoder, platforms, fit(platforms, encoder, config, budget, log=log, label="[centralised] ")


def load_splits(config: PollenConfig, log=print, platform: str | None = None) -> list[SplitData]:
    """The config's platforms, or only ``platform`` of them."""
    splits = [load_split(config.data, name) for name in platform_names(config.data) if platform in (None, name)]
    for s in splits:
        log(f"{s.name}: {s.num_users:,} users, {s.num_items:,} items, "
            f"{sum(len(q) for q in s.sequences):,} interactions")
    return splits


def run_benchmark(config: PollenConfig, methods: tuple[str, ...], cache_dir: str | None,
                  log=functools.partial(print, flush=True), splits: list[SplitData] | None = None,
                  reuse: dict | None = None) -> dict:
    """Every method once with the config's seed. ``reuse``: results of methods that do not depend on the seed
    (popularity, zero-shot), taken as they are instead of being evaluated again."""
    budget = config.federation.num_rounds * config.train.local_epochs
    splits = splits or load_splits(config, log)
    results: dict[str, dict] = {"budget_epochs": budget, "patience": config.train.patience,
                                "seed": config.train.seed, "config": config.to_flat(), "methods": {}}

    def record(method: str, test: dict[str, dict], seconds: float, **extra) -> None:
        results["methods"][method] = {"test": test, "seconds": seconds, **extra}
        log(f"[{method}] {seconds:.0f}s  " + "  ".join(f"{n}: NDCG@10 {m['ndcg@10']:.4f}" for n, m in test.items()))

    pooled = None  # the centralised fit (encoder, platforms, result), reused by centralised-finetuned
    for method in methods:
        start = time.perf_counter()
        if method in SEED_FREE and reuse and method in reuse:
            results["methods"][method] = reuse[method]
        elif method == "popularity":
            record(method, {s.name: evaluate(popularity_scorer(s), s, "test") for s in splits},
                   time.perf_counter() - start)
        elif method == "zero-shot":
            encoder = TextEncoder(dataclasses.replace(config.model, lora_layers=0))
            test = {s.name: evaluate(zero_shot_scorer(s, encoder, cached_item_states(encoder, s.item_texts,
                                                                                     cache_dir)), s, "test")
                    for s in splits}
            record(method, test, time.perf_counter() - start)
        elif method == "sasrec-id":
            id_config = config.replace(**SASREC_ID)
            test, best, ran = {}, {}, {}
            for split in splits:  # each seeded on its own: the same result alone (one job per platform)
                p, = build_platforms([split], id_config, None)
                r = fit([p], None, id_config, budget, log=log, label=f"[sasrec-id {p.split.name}] ")
                test.update(r.test)
                best.update(r.best_epoch)
                ran.update(r.epochs_run)
            record(method, test, time.perf_counter() - start, best_epoch=best, epochs_run=ran)
        elif method == "local-only":
            test, best, ran = {}, {}, {}
            for split in splits:
                torch.manual_seed(config.train.seed)
                encoder = TextEncoder(config.model, seed=config.train.seed, max_len=config.data.max_len)
                r = fit(build_platforms([split], config, cache_dir, encoder), encoder, config, budget, log=log,
                        label=f"[local-only {split.name}] ")
                test.update(r.test)
                best.update(r.best_epoch)
                ran.update(r.epochs_run)
            record(method, test, time.perf_counter() - start, best_epoch=best, epochs_run=ran)
        elif method == "local-only-lora":
            test, best, ran = {}, {}, {}
            for split in splits:
                r = lora_after_frozen(split, config, budget, cache_dir, log)
                test.update(r.test)
                best.update(r.best_epoch)
                ran.update(r.epochs_run)
            record(method, test, time.perf_counter() - start, best_epoch=best, epochs_run=ran,
                   note="frozen encoder until early stop, then LoRA (best frozen state kept as epoch 0)")
        elif method == "centralised":
            pooled = fit_pooled(splits, config, budget, cache_dir, log)
            record(method, pooled[2].test, time.perf_counter() - start, best_epoch=pooled[2].best_epoch,
                   epochs_run=pooled[2].epochs_run)
        elif method == "centralised-finetuned":
            encoder, platforms, r = pooled or fit_pooled(splits, config, budget, cache_dir, log)
            test, best, ran = {}, {}, {}
            for p in platforms:
                r.restore(p, encoder)
                tuned = fit([p], encoder, config, budget, log=log, label=f"[centralised-finetuned {p.split.name}] ",
                            keep_start=True)
                test.update(tuned.test)
                best.update(tuned.best_epoch)
                ran.update(tuned.epochs_run)
            record(method, test, time.perf_counter() - start, best_epoch=best, epochs_run=ran,
                   pooled_best_epoch=r.best_epoch,
                   note="pooled training, then each platform alone from its selected pooled state (kept as epoch 0); "
                        "two phases under the cap each, like local-only-lora: a ceiling, not a competitor")
        elif method == "federated" or method in FEDERATED_VARIANTS:
            from simulations.run import simulate

            folder = "federation" if method == "federated" else method
            run = simulate(config.replace(**FEDERATED_VARIANTS.get(method, {}),
                                          **{"run-dir": str(Path(config.federation.run_dir) / folder)}),
                           cpus=config.train.threads or None)  # one job of --jobs: one client at a time
            chosen = run.selected()
            upload = {name: per[name]["upload-bytes"] for per in run.training.values() for name in per}
            last = run.training[max(run.training)]
            epsilon = {name: m["dp-epsilon"] for name, m in last.items() if "dp-epsilon" in m}
            record(method, {n: c["test"] for n, c in chosen.items()}, time.perf_counter() - start,
                   best_epoch={n: c["round"] for n, c in chosen.items()}, settings=FEDERATED_VARIANTS.get(method, {}),
                   epochs_run={n: max(run.evaluations) for n in chosen},
                   upload_bytes_per_client_per_round=upload, round_seconds=run.round_seconds,
                   **({"dp_epsilon_spent": epsilon, "dp_noise": {n: m["dp-noise"] for n, m in last.items()}}
                      if epsilon else {}))
        else:
            raise ValueError(f"unknown method {method!r}; expected some of {METHODS + OPTIONAL + tuple(FEDERATED_VARIANTS)}")
        write_json(Path(config.federation.run_dir) / "benchmark.json", results)  # partial results survive a crash
    full = TextEncoder(config.model, max_len=config.data.max_len)
    results["full_model_bytes"] = full.base_model_bytes()
    results["adapter_bytes"] = sum(v.numel() * v.element_size() for v in full.adapter_state().values())
    return results


def summarise(runs: dict[int, dict]) -> dict:
    """One result from several seeds' runs: per method, platform and metric ``{"mean", "std", "seeds"}``
    (sample standard deviation; std 0 for one seed) and, where both ran, the paired difference federated -
    local-only of every metric with its sign per seed."""
    seeds = sorted(runs)
    first = runs[seeds[0]]
    same = ("budget_epochs", "patience", "config", "full_model_bytes", "adapter_bytes")  # alike for every seed
    out = {"seeds": seeds, **{k: first[k] for k in same if k in first}, "methods": {}}
    for method in first["methods"]:
        per = [runs[s]["methods"][method] for s in seeds]
        test = {platform: {metric: spread([p["test"][platform][metric] for p in per])
                           for metric in per[0]["test"][platform]}
                for platform in per[0]["test"]}
        out["methods"][method] = {"test": test, "seconds": spread([p["seconds"] for p in per]),
                                  **{k: per[0][k] if all(p[k] == per[0][k] for p in per) else [p[k] for p in per]
                                     for k in per[0] if k not in ("test", "seconds")}}
    if "local-only" in first["methods"]:  # what sharing gives a member over training alone, per seed
        out["paired"] = {f"{m} - local-only": paired(runs, m, "local-only")
                         for m in ("federated", "centralised-finetuned") if m in first["methods"]}
    return out


def spread(values: list[float]) -> dict:
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "seeds": values}


def paired(runs: dict[int, dict], a: str, b: str, metric: str = "ndcg@10") -> dict:
    """Per platform: a - b per seed, its mean and s.d., and how many seeds a was ahead (the sign test's count)."""
    out = {}
    for platform in runs[min(runs)]["methods"][a]["test"]:
        diff = [runs[s]["methods"][a]["test"][platform][metric] - runs[s]["methods"][b]["test"][platform][metric]
                for s in sorted(runs)]
        out[platform] = {**spread(diff), "metric": metric, "signs": "".join("+" if d > 0 else "-" if d < 0 else "0"
                                                                             for d in diff)}
    return out


def cell(value) -> str:
    """A table cell: a number, or mean ± s.d. over seeds."""
    if isinstance(value, dict):
        return f"{value['mean']:.4f} ± {value['std']:.4f}" if len(value["seeds"]) > 1 else f"{value['mean']:.4f}"
    return f"{value:.4f}"


def markdown(results: dict) -> str:
    methods = results["methods"]
    platforms = sorted({p for m in methods.values() for p in m["test"]})
    seeds = results.get("seeds", [results.get("seed")])
    lines = [f"Budget: at most {results['budget_epochs']} epochs (rounds) per trained method, early stopping after "
             f"{results['patience']} without a better validation NDCG@10; seeds {seeds} (mean ± s.d.); full "
             "ranking over all items, history masked, ties against the target; test metrics at each method's "
             "best validation epoch.", ""]
    for name, per in results.get("paired", {}).items():
        lines += [f"Paired difference {name}, test NDCG@10 per seed: " + "; ".join(
            f"{p} {d['mean']:+.4f} ± {d['std']:.4f} (signs {d['signs']})" for p, d in per.items()), ""]
    for platform in platforms:
        sampled = any("sampled-ndcg@10" in m["test"].get(platform, {}) for m in methods.values())
        cols = list(SHOWN) + (["sampled-hr@10", "sampled-ndcg@10"] if sampled else [])
        lines += [f"### {platform}", "", "| method | " + " | ".join(cols) + " | wall s |",
                  "|---" * (len(cols) + 2) + "|"]
        for name, m in methods.items():
            if platform in m["test"]:
                t = m["test"][platform]
                seconds = m["seconds"]["mean"] if isinstance(m["seconds"], dict) else m["seconds"]
                lines.append(f"| {name} | " + " | ".join(cell(t.get(c, float("nan"))) for c in cols)
                             + f" | {seconds:.0f} |")
        lines.append("")
    first = lambda value: value[0] if isinstance(value, list) else value  # noqa: E731 (per-seed lists)
    private = {name: {k: first(v) for k, v in m.items()} for name, m in methods.items() if "dp_epsilon_spent" in m}
    if private:
        lines += ["### User-level DP (epsilon spent at the end, per platform; delta = 1 / training users)", ""]
        lines += [f"- {name}: " + ", ".join(f"{p} epsilon {e:.2f} (sigma {m['dp_noise'][p]:.2f})"
                                            for p, e in sorted(m["dp_epsilon_spent"].items()))
                  for name, m in private.items()] + [""]
    fed = methods.get("federated")
    if fed:
        per = first(fed["upload_bytes_per_client_per_round"])
        lines += ["### Communication", "",
                  f"Bytes uploaded per client per round: {max(per.values()):,.0f} (the shared adapters); "
                  f"full model: {results['full_model_bytes']:,} bytes; ratio "
                  f"{max(per.values()) / results['full_model_bytes']:.4%}.", ""]
    return "\n".join(lines)


def seed_folder(run_dir: Path, seed: int, seeds: list[int]) -> Path:
    return run_dir / f"seed-{seed}" if len(seeds) > 1 else run_dir  # one seed: the run folder itself


def run_seeds(config: PollenConfig, methods: tuple[str, ...], seeds: list[int], cache_dir: str | None,
              log=functools.partial(print, flush=True), platform: str | None = None) -> dict:
    """The benchmark once per seed (each in RUN/seed-N), one method after another in this process, then
    ``summarise``; data is loaded once, and the seed-free methods are evaluated once. Returns one seed's result
    as it is when only one seed ran. ``platform``: that platform alone (methods that train each on its own)."""
    run_dir = Path(config.federation.run_dir)
    splits = load_splits(config, log, platform)
    runs: dict[int, dict] = {}
    for seed in seeds:
        log(f"== seed {seed} ==")
        seeded = config.replace(**{"seed": seed, "run-dir": str(seed_folder(run_dir, seed, seeds))})
        runs[seed] = run_benchmark(seeded, methods, cache_dir, log, splits, reuse=runs[seeds[0]]["methods"]
                                   if runs else None)
    return runs[seeds[0]] if len(seeds) == 1 else summarise(runs)


# methods that train each platform on its own: one job per platform. The others train all platforms together;
# centralised-finetuned starts from the centralised fit, so the two share a job when both are asked for.
PER_PLATFORM = ("sasrec-id", "local-only", "local-only-lora")
# a job's expected cost, relative, per unit of its platforms' size (below); it only orders the queue (longest
# first, so that no long job starts last), from the 3-seed benchmark's times on the shared data
COST = {"sasrec-id": 2.5, "local-only": 1.0, "local-only-lora": 2.0, "centralised": 1.5,
        "centralised-finetuned": 1.0, "federated": 2.2}  # the federation's variants: as "federated"


@dataclasses.dataclass
class Job:
    """Some methods of one seed, on one platform or on all: one child process of one thread."""
    seed: int
    methods: tuple[str, ...]
    platform: str | None
    cost: float

    @property
    def name(self) -> str:
        return self.methods[0] + (f"-{self.platform}" if self.platform else "")


def plan_jobs(methods: tuple[str, ...], seeds: list[int], splits: list[SplitData]) -> list[Job]:
    """The trained methods of every seed as jobs, most expensive first. Size of a platform: its interactions
    times (1 + items / 5,000): the encoder's work grows with the interactions, the logits' with the catalogue."""
    size = {s.name: sum(len(q) for q in s.sequences) * (1 + s.num_items / 5000) for s in splits}
    pooled = tuple(m for m in ("centralised", "centralised-finetuned") if m in methods)
    together = [(m,) for m in methods if m not in PER_PLATFORM + pooled] + ([pooled] if pooled else [])
    jobs = []
    for seed in seeds:
        jobs += [Job(seed, group, None, sum(COST.get(m, COST["federated"]) for m in group) * sum(size.values()))
                 for group in together]
        jobs += [Job(seed, (m,), name, COST[m] * size[name]) for m in methods if m in PER_PLATFORM for name in size]
    return sorted(jobs, key=lambda job: -job.cost)


def merge_jobs(parts: list[dict], shared: dict, methods: tuple[str, ...], platforms: list[str]) -> dict:
    """One seed's benchmark.json from its jobs' and the seed-free methods' (``shared``): a method's per-platform
    entries (test, best epoch, ...) joined in the platforms' order, its seconds added up; methods in the order
    asked."""
    merged = dict(shared)
    for part in parts:
        for method, entry in part["methods"].items():
            if method not in merged:
                merged[method] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in entry.items()}
                continue
            for key, value in entry.items():
                if isinstance(value, dict):
                    merged[method][key].update(value)
                elif key == "seconds":
                    merged[method][key] += value
    for entry in merged.values():
        for key, value in entry.items():
            if isinstance(value, dict) and set(value) <= set(platforms):
                entry[key] = {p: value[p] for p in platforms if p in value}
    return {**{k: v for k, v in parts[0].items() if k != "methods"}, "methods": {m: merged[m] for m in methods}}


def run_jobs(config: PollenConfig, methods: tuple[str, ...], seeds: list[int], cache_dir: str, jobs: int,
             log=functools.partial(print, flush=True)) -> dict:
    """``run_seeds`` as ``jobs`` child processes at a time, one torch thread each (on 2 cores two single-threaded
    processes do more per second than one with two threads: the head's operations are small); a job is one
    seed's method on one platform, or on all for the methods that train them together (a federation then runs
    one client at a time), longest first. Each job writes RUN[/seed-N]/JOB/benchmark.json and JOB.log; the
    seed-free methods run once, here, while the jobs train, and every seed's benchmark.json holds them too."""
    run_dir = Path(config.federation.run_dir)
    splits = load_splits(config, log)
    platforms = [s.name for s in splits]
    free = tuple(m for m in methods if m in SEED_FREE)
    queue = plan_jobs(tuple(m for m in methods if m not in SEED_FREE), seeds, splits)
    if len(queue) < 2:  # nothing to run beside it: this process, with all its threads
        return run_seeds(config, methods, seeds, cache_dir, log)
    left = {seed: sum(job.seed == seed for job in queue) for seed in seeds}
    total, parts, running, runs, shared = len(queue), {seed: [] for seed in seeds}, {}, {}, None
    while queue or running:
        while queue and len(running) < jobs:
            job = queue.pop(0)
            folder = seed_folder(run_dir, job.seed, seeds) / job.name
            folder.parent.mkdir(parents=True, exist_ok=True)
            flags = [f"--{k}={v}" for k, v in config.replace(**{"seed": job.seed, "run-dir": str(folder),
                                                                  "threads": 1}).to_flat().items()]
            command = [sys.executable, "-m", "simulations.benchmark", "--methods", ",".join(job.methods),
                       "--jobs", "1", "--cache-dir", cache_dir, *(["--platform", job.platform] if job.platform
                                                                   else []), *flags]
            output = open(folder.with_suffix(".log"), "w")
            running[job.seed, job.name] = (job, folder, subprocess.Popen(command, stdout=output,
                                                                          stderr=subprocess.STDOUT), output)
            log(f"seed {job.seed} {job.name}: started (log {folder.with_suffix('.log')})")
        if shared is None:
            configure_threads(1)  # one core's share beside the jobs
            seed_free = config.replace(**{"run-dir": str(run_dir / "seed-free")})
            shared = run_benchmark(seed_free, free, cache_dir, log, splits)["methods"] if free else {}
        time.sleep(2)
        for key, (job, folder, process, output) in list(running.items()):
            if process.poll() is None:
                continue
            output.close()
            del running[key]
            if process.returncode != 0:
                for other in running.values():  # no half-run job left behind
                    other[2].terminate()
                raise RuntimeError(f"seed {job.seed} {job.name} failed (exit {process.returncode}); see "
                                   f"{folder.with_suffix('.log')}")
            part = json.loads((folder / "benchmark.json").read_text())
            parts[job.seed].append(part)
            left[job.seed] -= 1
            done = total - len(queue) - len(running)
            log(f"seed {job.seed} {job.name}: done in {sum(m['seconds'] for m in part['methods'].values()):.0f}s "
                f"({done}/{total} jobs)")
            if not left[job.seed]:
                home = seed_folder(run_dir, job.seed, seeds)
                run = merge_jobs(parts[job.seed], shared, methods, platforms)
                run.update(seed=job.seed, config=config.replace(**{"seed": job.seed, "run-dir": str(home)}).to_flat())
                write_json(home / "benchmark.json", run)
                runs[job.seed] = run
    return runs[seeds[0]] if len(seeds) == 1 else summarise({seed: runs[seed] for seed in seeds})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(
        METHODS + OPTIONAL + tuple(FEDERATED_VARIANTS)))
    parser.add_argument("--seeds", default="", help="comma-separated seeds, e.g. 42,43,44: every method runs once "
                        "per seed; results as mean ± s.d. (default: config 'seed' alone)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="child processes at once, one "
                        "thread each; a job is one seed's method on one platform, or on all platforms for the "
                        "methods that train them together (default: one per core; 1 = everything one after "
                        "another in this process, with --threads)")
    parser.add_argument("--platform", default=None, help=f"only this platform (methods {', '.join(PER_PLATFORM)} "
                        "and the seed-free ones; what each job of --jobs runs)")
    parser.add_argument("--cache-dir", default=default_cache_dir(), help="where frozen-layer item states are kept")
    add_flags(parser, PollenConfig().replace(**{"data-dir": "../shared/data", "num-rounds": BUDGET_EPOCHS}))
    add_run_flags(parser)
    args = parser.parse_args()
    config = from_args(args)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] or [config.train.seed]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    known = METHODS + OPTIONAL + tuple(FEDERATED_VARIANTS)
    unknown = sorted(set(methods) - set(known))
    if unknown or not methods:
        raise ConfigError(f"--methods: unknown {unknown or 'empty'}; expected some of {known}")
    if args.jobs < 1:
        raise ConfigError(f"--jobs: expected at least 1, got {args.jobs}")
    if args.platform is not None:
        names = platform_names(config.data)
        if args.platform not in names:
            raise ConfigError(f"--platform: {args.platform!r} is not one of the platforms {names}")
        together = sorted(set(methods) - set(PER_PLATFORM + SEED_FREE))
        if together:
            raise ConfigError(f"--platform: only with methods that train each platform alone "
                              f"({', '.join(PER_PLATFORM)}) or seed-free ones; got {together}")
    config = preflight(config, "benchmark", args.overwrite, federation=any(m.startswith("federated") for m in methods))
    configure_threads(config.train.threads)
    start = time.perf_counter()
    if args.jobs > 1 and args.platform is None:
        results = run_jobs(config, methods, seeds, args.cache_dir, args.jobs)
    else:
        results = run_seeds(config, methods, seeds, args.cache_dir, platform=args.platform)
    results["seconds"] = time.perf_counter() - start
    run_dir = Path(config.federation.run_dir)
    write_json(run_dir / "benchmark.json", results)
    write_atomic(run_dir / "benchmark.md", markdown(results))
    print(markdown(results))
    print(f"total {results['seconds'] / 60:.1f} min; written to {run_dir}")


if __name__ == "__main__":
    cli.run(main)
