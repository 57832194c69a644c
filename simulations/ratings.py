"""Rating prediction next to ranking: does the head's rating output beat the mean rating, and what does it cost?

    python -m simulations.ratings --data-dir ../shared/data [--target video/movielens-100k] [--epochs 10]
        [--rating-weight 1.0] [--threads 1]

On one platform with explicit ratings, trains the local model (pretrained encoder + fresh LoRA + head, the one
``fit``) twice with the same budget: with the rating output (MSE at --rating-weight next to the ranking loss)
and without it (rating-weight 0), and reports test RMSE / MAE of the predicted rating of each leave-one-out test
target next to the ranking metrics, against the mean training rating as a baseline. Writes ratings.json and
ratings.md into the run folder.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

from common.baselines import mean_rating_rater
from common.config import PollenConfig, add_flags, from_args
from common.data.sources import load_split
from common.evaluate import rating_metrics
from common.files import resolve_run_dir, write_atomic, write_json
from common.runtime import configure_threads, default_cache_dir

SHOWN = ("rmse", "mae", "ndcg@10", "hr@10", "mrr")


def run_ratings(config: PollenConfig, target: str, epochs: int, cache_dir: str | None,
                log=functools.partial(print, flush=True)) -> dict:
    from client.adapt import adapt

    name = Path(target).name
    path = Path(target) if Path(target).is_dir() else Path(config.data.data_dir) / target
    split = load_split(config.data, name, str(path))
    if split.ratings is None:
        raise ValueError(f"{path}: the data has no explicit ratings (loaders keep a 'rating' column where one exists)")
    log(f"{name}: {split.num_users:,} users, {split.num_items:,} items")
    results: dict = {"target": str(path), "epochs": epochs, "config": config.to_flat(), "methods": {}}
    results["methods"]["mean rating"] = {"test": rating_metrics(mean_rating_rater(split), split, "test")}
    weight = config.model.rating_weight
    for label, run_config in ((f"ranking + rating (weight {weight:g})", config),
                              ("ranking only", config.replace(**{"rating-weight": 0.0}))):
        adapted = adapt(split, run_config, None, epochs, 1.0, cache_dir, log, f"[{label}] ")
        r = adapted.result
        results["methods"][label] = {"test": r.test[name], "best-epoch": r.best_epoch[name], "seconds": r.seconds}
        log(f"[{label}] best epoch {r.best_epoch[name]}: " + "  ".join(
            f"{k} {r.test[name][k]:.4f}" for k in SHOWN if k in r.test[name]))
        write_json(Path(config.federation.run_dir) / "ratings.json", results)
    return results


def markdown(results: dict) -> str:
    lines = [f"{Path(results['target']).name}: test targets (leave-one-out, every user), {results['epochs']} "
             "epochs per trained model, best validation NDCG@10 epoch; ranking over all items, history masked.", "",
             "| method | " + " | ".join(SHOWN) + " |", "|---" * (len(SHOWN) + 1) + "|"]
    for name, m in results["methods"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m['test'][k]:.4f}" if k in m["test"] else "-" for k in SHOWN)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.ratings", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="video/movielens-100k", help="platform folder, under --data-dir or a path")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per trained model")
    parser.add_argument("--cache-dir", default=default_cache_dir(), help="where frozen-layer item states are kept")
    add_flags(parser, PollenConfig().replace(**{"data-dir": "../shared/data", "rating-weight": 1.0}),
              scopes=("model", "data", "run"))
    args = parser.parse_args(argv)
    config = from_args(args)
    if args.epochs < 1 or config.model.rating_weight <= 0:
        parser.error("--epochs must be >= 1 and --rating-weight > 0")
    configure_threads(config.train.threads)
    run_dir = resolve_run_dir(config.federation.run_dir, "ratings")
    config = config.replace(**{"run-dir": str(run_dir)})
    start = time.perf_counter()
    results = run_ratings(config, args.target, args.epochs, args.cache_dir)
    results["seconds"] = time.perf_counter() - start
    write_json(run_dir / "ratings.json", results)
    write_atomic(run_dir / "ratings.md", markdown(results))
    print(markdown(results))
    print(f"total {results['seconds'] / 60:.1f} min; written to {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
