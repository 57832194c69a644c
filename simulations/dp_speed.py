"""A user-level DP epoch against a plain epoch: same platform, same model, same batch size, measured in one run.

    python -m simulations.dp_speed --data-dir ../shared/data --platform video --threads 1

For each platform: a plain epoch (``batch-size`` windows per step, every window once) and a DP epoch (about one
pass over the users, ``batch-size`` users expected per step, all of each one's windows: per-user gradients
vmap-ed over users, clipped, noised; common/privacy.py), alternated ``--reps`` times on fresh trainers, the best
of each kept. Both run through the same ``Trainer.epoch``. Reported per epoch and per training window, in CPU
seconds of this thread (at 1 thread; wall seconds measure the neighbours on a shared machine) and wall seconds.
On a CUDA GPU (``--device``, default auto) only wall seconds mean anything; the GPU's queue is drained before
each clock stops.
``--max-steps`` caps both epochs for a quick figure (then per-window rates are the ones to compare). Writes
dp_speed.json into --run-dir (default runs/dp-speed-<time>).
"""

from __future__ import annotations

import argparse
import time

from common import runtime  # noqa: F401  (offline mode before transformers loads)

import numpy as np
import torch

from common.config import PollenConfig, add_flags, from_args
from common.data.sources import load_split, platform_names
from common.files import resolve_run_dir, write_json
from common.model.encoder import TextEncoder, cached_item_states
from common.model.recommender import Recommender
from common.runtime import configure_threads, default_cache_dir, resolve_device
from common.train import Platform, Trainer


def clock():
    return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()


def timed_epoch(split, states, config: PollenConfig, device: torch.device) -> dict[str, float]:
    """One epoch of a fresh trainer: CPU and wall seconds, windows trained, steps."""
    torch.manual_seed(config.train.seed)
    encoder = TextEncoder(config.model, seed=config.train.seed, max_len=config.data.max_len).to(device)
    model = Recommender(split, config, encoder, states).to(device)
    trainer = Trainer([Platform(split, model)], encoder, config)
    model.refresh_text_table()  # the catalogue table is made once per adapter version, outside the timing
    plan = trainer.batch_plan()
    trainer.batch_plan = lambda: plan  # the same plan the timed epoch runs (DP: the sampled users)
    start, start_cpu = time.perf_counter(), clock()
    trainer.epoch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"cpu_s": clock() - start_cpu, "wall_s": time.perf_counter() - start,
            "windows": int(sum(len(idx) for _, idx in plan)), "steps": len(plan)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--platform", default="", help="one platform's name (default: every platform)")
    parser.add_argument("--reps", type=int, default=2, help="plain/DP epochs alternated; the best of each counts")
    add_flags(parser, PollenConfig().replace(threads=1))
    args = parser.parse_args()
    config = from_args(args)
    if not config.privacy.dp:
        config = config.replace(**{"dp-noise": 1.0})
    plain = config.replace(**{"dp-noise": 0.0, "dp-epsilon": 0.0})
    threads = configure_threads(config.train.threads)
    device = resolve_device(config.train.device)
    run_dir = resolve_run_dir(config.federation.run_dir, "dp-speed")
    run_dir.mkdir(parents=True, exist_ok=True)
    clock_key = "wall_s" if device.type == "cuda" else "cpu_s"
    names = [args.platform] if args.platform else platform_names(config.data)
    out = {"threads": threads, "device": str(device), "config": config.to_flat(), "platforms": {},
           "clock": "CPU seconds of this thread at 1 thread (else of the process), and wall seconds"}
    encoder = TextEncoder(config.model, seed=config.train.seed, max_len=config.data.max_len)
    for name in names:
        split = load_split(config.data, name)
        states = cached_item_states(encoder, split.item_texts, default_cache_dir())
        runs = {"plain": [], "dp": []}
        for _ in range(args.reps):
            runs["plain"].append(timed_epoch(split, states, plain, device))
            runs["dp"].append(timed_epoch(split, states, config, device))
        best = {k: min(v, key=lambda r: r[clock_key]) for k, v in runs.items()}
        per_window = {k: {c: r[c] / max(1, r["windows"]) for c in ("cpu_s", "wall_s")} for k, r in best.items()}
        result = {"runs": runs, "best": best, "per_window": per_window,
                  "ratio_epoch_cpu": best["dp"]["cpu_s"] / best["plain"]["cpu_s"],
                  "ratio_epoch_wall": best["dp"]["wall_s"] / best["plain"]["wall_s"],
                  "ratio_per_window_cpu": per_window["dp"]["cpu_s"] / per_window["plain"]["cpu_s"],
                  "ratio_per_window_wall": per_window["dp"]["wall_s"] / per_window["plain"]["wall_s"]}
        out["platforms"][name] = result
        print(f"{name}: plain epoch {best['plain']['cpu_s']:.2f} CPU-s / {best['plain']['wall_s']:.2f} wall-s "
              f"({best['plain']['steps']} steps, {best['plain']['windows']} windows); DP epoch "
              f"{best['dp']['cpu_s']:.2f} CPU-s / {best['dp']['wall_s']:.2f} wall-s ({best['dp']['steps']} steps, "
              f"{best['dp']['windows']} windows); DP / plain: epoch {result['ratio_epoch_cpu']:.2f}x CPU "
              f"({result['ratio_epoch_wall']:.2f}x wall), per window {result['ratio_per_window_cpu']:.2f}x CPU "
              f"({result['ratio_per_window_wall']:.2f}x wall)",
              flush=True)
    write_json(run_dir / "dp_speed.json", out)
    print(f"wrote {run_dir / 'dp_speed.json'}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
