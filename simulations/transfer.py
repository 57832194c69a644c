"""Transfer experiment: how much of a new platform's data does the federated adapter save, and how much time?

    python -m simulations.transfer --data-dir ../shared/data [--target ecommerce/amazon-scientific-2018]
        [--adapter RUN/adapter] [--fractions 5,10,25,50,100] [--epochs 10] [--threads 1] [--num-rounds 5]

The new platform (--target, relative to --data-dir or any loader-supported folder by path) is not one of the
federation's platforms. For each fraction of its users (seeded, nested subsets) three starts train with the same
epoch budget and are tested on the same users (every user of the platform):

- federated: the federation's global adapter (--adapter, else the 3-platform federation of config 'platforms'
  runs first, num-rounds x local-epochs, and its final adapter is used) + a fresh head, adapter fine-tuned;
- pretrained: the plain pretrained model with a fresh LoRA + a fresh head (at 100% this is the local-only model);
- sasrec-id: scratch ID-only SASRec (text = false).

The newcomer's heads use the text prior by default (``text-prior``, common/config.py ``NEWCOMER``): an untrained
head ranks like MiniLM zero-shot, and that start is a candidate of model selection. Each run keeps its best
validation epoch (validation on its own training users), the start included. Time-to-quality: wall minutes
of training (per-epoch timestamps, validation included, item-state cache excluded) until a run's validation
NDCG@10 on all users (100% runs) first reaches the local-only model's best validation NDCG@10. At 100% the
test metrics are also given under Recformer's convention (history not masked, ties in the target's favour).
Writes transfer.json, transfer.md and transfer.png into the run folder. ``--merge DIR DIR ...`` combines runs
made by separate invocations (e.g. ``--starts federated`` and ``--starts pretrained,sasrec-id`` side by side, or
different ``--fractions``) into one table, after checking they share target, epochs and model/training settings.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

from common import cli
from common.config import NEWCOMER, PollenConfig, add_flags, from_args
from common.errors import ConfigError
from common.preflight import add_run_flags, preflight
from common.data.sources import load_split
from common.files import claim_run_dir, write_atomic, write_json
from common.runtime import configure_threads, default_cache_dir

STARTS = ("federated", "pretrained", "sasrec-id")
FRACTIONS = "5,10,25,50,100"
RECFORMER = {"ndcg@10": 0.1027, "recall@10": 0.1448}  # KDD 2023, Amazon Scientific, its own split and convention
CONVENTIONS = {"masked, ties against (Pollen)": {"mask_history": True, "ties": "against"},
               "masked, ties in favour": {"mask_history": True, "ties": "favour"},
               "not masked, ties against": {"mask_history": False, "ties": "against"},
               "not masked, ties in favour (Recformer)": {"mask_history": False, "ties": "favour"}}


def parse_fractions(text: str) -> list[float]:
    """'0,5,10,100' (percent) -> [0.0, 0.05, 0.1, 1.0], ascending; each in [0, 100] (0 = no training at all)."""
    try:
        values = sorted({float(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise ConfigError(f"--fractions: expected comma-separated percentages, got {text!r}") from None
    if not values or values[0] < 0 or values[-1] > 100:
        raise ConfigError(f"--fractions: every percentage must be in [0, 100], got {text!r}")
    return [v / 100 for v in values]


def federated_adapter(config: PollenConfig, adapter: str, run_dir: Path, log) -> tuple[str, dict]:
    """The adapter folder to start from: the given one, or the final adapter of a federation run here."""
    if adapter:
        return adapter, {"source": "given", "path": adapter}
    from simulations.run import simulate

    fed_dir = run_dir / "federation"
    log(f"no --adapter: running the {config.data.platforms} federation first, {config.federation.num_rounds} "
        f"rounds x {config.train.local_epochs} local epochs -> {fed_dir}")
    start = time.perf_counter()
    record = simulate(config.replace(**{"run-dir": str(fed_dir)}))
    return str(fed_dir / "adapter"), {"source": "federation run here", "path": str(fed_dir / "adapter"),
                                      "platforms": config.data.platforms, "rounds": config.federation.num_rounds,
                                      "local-epochs": config.train.local_epochs,
                                      "seconds": time.perf_counter() - start,
                                      "selected": record.selected()}


def run_transfer(config: PollenConfig, target: str, adapter_path: str, fractions: list[float], epochs: int,
                 run_dir: Path, cache_dir: str | None, starts: tuple[str, ...] = STARTS,
                 log=functools.partial(print, flush=True)) -> dict:
    from client.adapt import adapt, read_adapter, test_metrics
    from common.baselines import SASREC_ID

    name = Path(target).name
    path = Path(target) if Path(target).is_dir() else Path(config.data.data_dir) / target
    split = load_split(config.data, name, str(path))
    log(f"target {name}: {split.num_users:,} users, {split.num_items:,} items, "
        f"{sum(len(s) for s in split.sequences):,} interactions ({path})")
    results: dict = {"target": str(path), "users": split.num_users, "items": split.num_items, "epochs": epochs,
                     "fractions": fractions, "config": config.to_flat(), "runs": [], "recformer": RECFORMER}
    adapter = None
    if "federated" in starts:
        adapter_path, results["adapter"] = federated_adapter(config, adapter_path, run_dir, log)
        adapter = read_adapter(adapter_path)
    # the largest fraction first (the local-only reference), then the cheap small ones: an interrupted run keeps the most
    for fraction in sorted(fractions, key=lambda f: (f != max(fractions), f)):
        for start in starts:
            if fraction == 0.0:
                if start != "sasrec-id":  # an ID model knows nothing before training
                    results["runs"].append(zero_shot(split, config, start, adapter, cache_dir, log))
                continue
            run_config = config.replace(**SASREC_ID) if start == "sasrec-id" else config
            label = f"[{start} {fraction:.0%}] "
            adapted = adapt(split, run_config, adapter if start == "federated" else None, epochs, fraction,
                            cache_dir, log, label)
            r = adapted.result
            run = {"start": start, "fraction": fraction, "train-users": adapted.platform.split.num_users,
                   "global-share": adapted.share, "best-epoch": r.best_epoch[name], "seconds": r.seconds,
                   "elapsed": r.elapsed,
                   "valid-ndcg@10": [m["ndcg@10"] for m in r.valid[name]],
                   "test": test_metrics(adapted, split)}
            if fraction == 1.0:
                run["conventions"] = {c: test_metrics(adapted, split, **kw) for c, kw in CONVENTIONS.items()}
            log(f"{label}best epoch {run['best-epoch']}: test NDCG@10 {run['test']['ndcg@10']:.4f} "
                f"Recall@10 {run['test']['recall@10']:.4f}  ({r.seconds:.0f}s)")
            results["runs"].append(run)
            write_json(run_dir / "transfer.json", results)  # partial results survive an interruption
    results["time-to-quality"] = time_to_quality(results["runs"])
    results["data-to-quality"] = data_to_quality(results["runs"])
    return results


def zero_shot(split, config: PollenConfig, start: str, adapter: dict | None, cache_dir: str | None, log) -> dict:
    """Fraction 0: rank the new catalogue with no training on it. pretrained: MiniLM's cosine between each item
    and the user's recent items; federated: the federation's shared model (adapters, text adaptor, sequence
    encoder) over text-only item vectors, the new platform's item IDs being unknown."""
    from client.adapt import test_metrics, zero_shot_model
    from common.baselines import zero_shot_scorer
    from common.evaluate import evaluate
    from common.model.encoder import TextEncoder, cached_item_states

    begin, share = time.perf_counter(), None
    if start == "pretrained":
        import dataclasses

        encoder = TextEncoder(dataclasses.replace(config.model, lora_layers=0))
        test = evaluate(zero_shot_scorer(split, encoder, cached_item_states(encoder, split.item_texts, cache_dir)),
                        split, "test")
    else:
        model = zero_shot_model(split, config, adapter, cache_dir)
        test, share = test_metrics(model, split), model.share
    log(f"[{start} 0%] no training: test NDCG@10 {test['ndcg@10']:.4f}")
    return {"start": start, "fraction": 0.0, "train-users": 0, "global-share": share, "best-epoch": 0,
            "seconds": time.perf_counter() - begin, "elapsed": [], "valid-ndcg@10": [], "test": test}


IGNORED_WHEN_MERGING = ("run-dir", "num-rounds", "threads")


def merge(parts: list[dict]) -> dict:
    """One result from several transfer.json of the same experiment (different starts)."""
    first = parts[0]
    for part in parts[1:]:
        for key in ("target", "epochs", "users", "items"):
            if part[key] != first[key]:
                raise ValueError(f"cannot merge: {key} differs ({part[key]!r} vs {first[key]!r})")
        differ = sorted(k for k in first["config"] if k not in IGNORED_WHEN_MERGING
                        and part["config"].get(k) != first["config"][k])
        if differ:
            raise ValueError(f"cannot merge: config differs in {differ}")
    fractions = sorted({f for p in parts for f in p["fractions"]})
    top = max(fractions)
    runs = sorted((r for p in parts for r in p["runs"]),
                  key=lambda r: (r["fraction"] != top, r["fraction"], STARTS.index(r["start"])))  # the run order
    out = {**first, "fractions": fractions, "runs": runs, "merged-from": len(parts)}
    starts = [r["start"] for r in out["runs"]]
    for start in set(starts):
        if len({r["fraction"] for r in out["runs"] if r["start"] == start}) != starts.count(start):
            raise ValueError(f"cannot merge: start {start!r} appears in more than one part")
    out["adapter"] = next((p["adapter"] for p in parts if "adapter" in p), None)
    out["seconds"] = max(p.get("seconds", 0.0) for p in parts)
    out["time-to-quality"] = time_to_quality(out["runs"])
    out["data-to-quality"] = data_to_quality(out["runs"])
    return out


def _find(runs: list[dict], start: str, fraction: float) -> dict | None:
    return next((r for r in runs if r["start"] == start and r["fraction"] == fraction), None)


def time_to_quality(runs: list[dict]) -> dict:
    """Minutes until each 100% run's validation NDCG@10 first reaches local-only's best (None = never)."""
    local = _find(runs, "pretrained", 1.0)
    if local is None:
        return {}
    goal = max(local["valid-ndcg@10"])
    out: dict = {"goal-valid-ndcg@10": goal, "local-only-test-ndcg@10": local["test"]["ndcg@10"]}
    for r in runs:
        if r["fraction"] == 1.0:
            hit = next((e for e, v in enumerate(r["valid-ndcg@10"]) if v >= goal), None)
            out[r["start"]] = None if hit is None else {"epoch": hit + 1, "minutes": r["elapsed"][hit] / 60}
    return out


def data_to_quality(runs: list[dict]) -> dict:
    """Per start: the smallest fraction whose test NDCG@10 reaches the local-only model's (None = none)."""
    local = _find(runs, "pretrained", 1.0)
    if local is None:
        return {}
    goal = local["test"]["ndcg@10"]
    return {start: min((r["fraction"] for r in runs if r["start"] == start and r["test"]["ndcg@10"] >= goal),
                       default=None) for start in {r["start"] for r in runs}}


def markdown(results: dict) -> str:
    runs, fractions = results["runs"], results["fractions"]
    starts = list(dict.fromkeys(r["start"] for r in runs))
    lines = [f"Target {Path(results['target']).name}: {results['users']:,} users, {results['items']:,} items; "
             f"{results['epochs']} epochs per run, best validation epoch; test = every user, full ranking, "
             "history masked, ties against the target.", "",
             "| start | " + " | ".join(f"{f:.0%} NDCG@10 / Recall@10" for f in fractions) + " |",
             "|---" * (len(fractions) + 1) + "|"]
    for start in starts:
        cells = []
        for f in fractions:
            r = _find(runs, start, f)
            cells.append(f"{r['test']['ndcg@10']:.4f} / {r['test']['recall@10']:.4f}" if r else "-")
        lines.append(f"| {start} | " + " | ".join(cells) + " |")
    lines += ["", "| start | " + " | ".join(f"{f:.0%} train users / wall s" for f in fractions) + " |",
              "|---" * (len(fractions) + 1) + "|"]
    for start in starts:
        lines.append(f"| {start} | " + " | ".join(
            f"{r['train-users']:,} / {r['seconds']:.0f}" if (r := _find(runs, start, f)) else "-"
            for f in fractions) + " |")
    full = [r for r in runs if r["fraction"] == 1.0 and "conventions" in r]
    if full:
        lines += ["", "At 100% under both conventions (Recformer: NDCG@10 "
                  f"{RECFORMER['ndcg@10']}, Recall@10 {RECFORMER['recall@10']} on its own 1/5 user sample):", "",
                  "| start | convention | NDCG@10 | Recall@10 | MRR |", "|---|---|---|---|---|"]
        for r in full:
            for c, m in r["conventions"].items():
                lines.append(f"| {r['start']} | {c} | {m['ndcg@10']:.4f} | {m['recall@10']:.4f} | {m['mrr']:.4f} |")
    ttq = results.get("time-to-quality") or {}
    if ttq:
        lines += ["", f"Time-to-quality (validation NDCG@10 >= local-only's best, {ttq['goal-valid-ndcg@10']:.4f}):"]
        for start in starts:
            if start in ttq:
                hit = ttq[start]
                lines.append(f"- {start}: " + ("not reached" if hit is None else
                                               f"{hit['minutes']:.2f} min (epoch {hit['epoch']})"))
    dtq = results.get("data-to-quality") or {}
    if dtq:
        lines += ["", f"Smallest fraction whose test NDCG@10 reaches local-only at 100% "
                  f"({ttq.get('local-only-test-ndcg@10', float('nan')):.4f}): " +
                  ", ".join(f"{s} {'-' if dtq.get(s) is None else format(dtq[s], '.0%')}" for s in starts)]
    fed10, sas100 = _find(runs, "federated", 0.1), _find(runs, "sasrec-id", 1.0)
    if fed10 and sas100:
        lines += ["", f"At 10% data, federated start: NDCG@10 {fed10['test']['ndcg@10']:.4f}, Recall@10 "
                  f"{fed10['test']['recall@10']:.4f}; scratch SASRec-ID at 100%: NDCG@10 "
                  f"{sas100['test']['ndcg@10']:.4f}, Recall@10 {sas100['test']['recall@10']:.4f}."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for start in dict.fromkeys(r["start"] for r in results["runs"]):
        runs = sorted((r for r in results["runs"] if r["start"] == start), key=lambda r: r["fraction"])
        left.plot([100 * r["fraction"] for r in runs], [r["test"]["ndcg@10"] for r in runs], marker="o", label=start)
        full = _find(results["runs"], start, 1.0)
        if full:
            right.plot([s / 60 for s in full["elapsed"]], full["valid-ndcg@10"], marker=".", label=start)
    left.set_xscale("symlog", linthresh=1)  # fraction 0 (no training) sits left of the log part
    left.set(xlabel="% of the new platform's training users", ylabel="test NDCG@10 (all users)",
             title=f"{Path(results['target']).name}: NDCG@10 vs data")
    fractions = [100 * f for f in results["fractions"]]
    left.set_xticks(fractions, [f"{f:g}" for f in fractions])
    right.set(xlabel="wall minutes of training", ylabel="validation NDCG@10", title="100% data: quality over time")
    goal = (results.get("time-to-quality") or {}).get("goal-valid-ndcg@10")
    if goal is not None:
        right.axhline(goal, color="grey", linestyle=":", label="local-only best")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.transfer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="ecommerce/amazon-scientific-2018",
                        help="the new platform's folder, under --data-dir or a path")
    parser.add_argument("--adapter", default="", help="federated adapter folder; empty = run the federation first")
    parser.add_argument("--fractions", default=FRACTIONS, help="percentages of the new platform's users")
    parser.add_argument("--epochs", type=int, default=100, help="most epochs per run, the same for every start "
                        "(each stops early after config 'patience' epochs without a better validation NDCG@10)")
    parser.add_argument("--starts", default=",".join(STARTS), help="comma-separated subset of " + ", ".join(STARTS))
    parser.add_argument("--cache-dir", default=default_cache_dir(), help="where frozen-layer item states are kept")
    parser.add_argument("--merge", nargs="+", default=[], metavar="DIR",
                        help="combine the transfer.json of these run folders into --run-dir instead of running")
    add_flags(parser, PollenConfig().replace(**{"data-dir": "../shared/data", **NEWCOMER}))
    add_run_flags(parser)
    args = parser.parse_args(argv)
    if args.merge:
        run_dir = claim_run_dir(args.run_dir, "transfer", args.overwrite)
        results = merge([json.loads((Path(d) / "transfer.json").read_text()) for d in args.merge])
        return _write(results, run_dir)
    starts = tuple(s.strip() for s in args.starts.split(",") if s.strip())
    if args.epochs < 1 or not starts or set(starts) - set(STARTS):
        parser.error(f"--epochs must be >= 1 and --starts a subset of {STARTS}")
    config = from_args(args)
    fractions = parse_fractions(args.fractions)
    federate = "federated" in starts and not args.adapter  # the federation runs here first
    config = preflight(config, "transfer", args.overwrite, federation=federate, platforms=federate,
                       targets={Path(args.target).name: str(_target_path(config, args.target))},
                       adapter=args.adapter or None)
    configure_threads(config.train.threads)
    run_dir = Path(config.federation.run_dir)
    begin = time.perf_counter()
    results = run_transfer(config, args.target, args.adapter, fractions, args.epochs,
                           run_dir, args.cache_dir, starts)
    results["seconds"] = time.perf_counter() - begin
    return _write(results, run_dir)


def _write(results: dict, run_dir: Path) -> int:
    write_json(run_dir / "transfer.json", results)
    write_atomic(run_dir / "transfer.md", markdown(results))
    plot(results, run_dir / "transfer.png")
    print(markdown(results))
    print(f"total {results['seconds'] / 60:.1f} min; written to {run_dir}")
    return 0


def _target_path(config: PollenConfig, target: str) -> Path:
    return Path(target) if Path(target).is_dir() else Path(config.data.data_dir) / target


if __name__ == "__main__":
    cli.run(main)
