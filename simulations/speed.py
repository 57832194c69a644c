"""Speed benchmark: Pollen's encoding and training against a naive baseline measured in the same run.

    python -m simulations.speed                          # embedded synthetic data, 1 torch thread
    python -m simulations.speed --data-dir ../shared/data --threads 2

Prints, next to the naive baseline: item texts encoded per second (inference), training sequences per second,
seconds per local epoch per platform, seconds per federated round and peak memory; then this machine's attainable
float32 matmul rate (a large ``torch.mm``) and achieved / attainable FLOP rates (FLOPs counted from the model's
shapes, simulations/flops.py). Writes ``speed.json`` and ``speed.png`` into --run-dir (default runs/speed-<time>).

The NAIVE BASELINE lives only in this file (``naive_encode``, ``naive_train_step``): every item text -- each
occurrence in every history, duplicates included -- is tokenized and run through the whole model (all layers,
with gradient when training) at every step; nothing is cached or deduplicated. It is given the product's
per-epoch catalogue table for the softmax candidates (re-encoding the catalogue every step would be slower
still). Naive steps are few and small (--naive-steps x --naive-batch sequences), their per-sequence rate is
extrapolated to an epoch and a round: stated as such in the output.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from common import runtime  # noqa: F401  (offline mode before transformers loads)

import numpy as np
import torch
import torch.nn.functional as F

from common.config import PollenConfig, add_flags, from_args
from common.data.sources import load_split, platform_names
from common.files import resolve_run_dir, write_json
from common.model.encoder import TextEncoder
from common.model.recommender import Recommender
from common.runtime import configure_threads
from common.train import Platform, Trainer, batch_plan, training_pairs, trim
from simulations.flops import EncoderShape, encoder_flops, head_step_flops
from simulations.memory import PeakMemory

GIB = 1024 ** 3


def attainable_gflops(threads: int, size: int = 2048, reps: int = 5) -> tuple[float, float]:
    """Best float32 GFLOP per wall second and per CPU second of a [size x size] @ [size x size]
    torch.mm with ``threads`` torch threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    _, wall, cpu = timed(lambda: torch.mm(a, b), reps)
    torch.set_num_threads(before)
    return 2 * size ** 3 / wall / 1e9, 2 * size ** 3 / cpu / 1e9


def cpu_clock():
    """CPU seconds of the work: this thread's when torch runs on it alone (1 thread), else the process's.

    The machine this was written on is shared (load average up to 20 on 2 cores); wall-clock rates then
    measure the neighbours, CPU-time rates measure the code. Both are reported.
    """
    return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()


def timed(fn, reps: int = 1):
    """(result, best wall seconds, best CPU seconds) over ``reps`` runs."""
    wall, cpu = math.inf, math.inf
    for _ in range(reps):
        start, start_cpu = time.perf_counter(), cpu_clock()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, cpu_clock() - start_cpu)
    return out, wall, cpu


# -- the NAIVE BASELINE (benchmark only; the product path is TextEncoder / Trainer) ------------------------------
def naive_encode(encoder: TextEncoder, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """BASELINE: tokenize and run every text through the whole model (all layers), in the given order, in
    batches of 32 padded to their longest text (sentence-transformers' default; faster here than 256)."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = encoder.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                  max_length=encoder.max_tokens, return_tensors="pt")
        hidden = encoder.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        weights = batch["attention_mask"].float()[..., None]
        out.append((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0))
    return torch.cat(out)


def naive_train_step(model: Recommender, texts: list[str], optimizer: torch.optim.Optimizer,
                     inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """BASELINE: every history item occurrence re-encoded through the whole model with gradient, then the same
    next-item softmax as the product (candidates from the per-epoch table)."""
    head = model.head
    catalogue = head.item_vectors(model.text_table())           # [N + 1, d], stale table as in the product
    keep = inputs > 0
    occurrences = inputs[keep]                                   # duplicates included
    text = naive_encode(model.encoder, [texts[i - 1] for i in occurrences.tolist()])
    vectors = head.text_vectors(text)
    if head.item_emb is not None:
        vectors = vectors + (1.0 - head.theta()) * head.item_emb.weight[occurrences]
    extended = torch.cat([catalogue, vectors])                   # occurrence j is row N + 1 + j
    sequences = torch.zeros_like(inputs)
    sequences[keep] = len(catalogue) + torch.arange(len(occurrences))
    states = head.user_states(sequences, extended)
    mask = targets > 0
    loss = F.cross_entropy(states[mask] @ catalogue[1:].T, targets[mask] - 1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss)


# -- FLOPs of the product's epoch ----------------------------------------------------------------------------
def epoch_flops(split, config: PollenConfig, shape: EncoderShape, lengths: np.ndarray, seed: int = 0) -> tuple[int, int]:
    """(FLOPs, steps) of one product epoch: the catalogue refresh (top layers, no gradient) plus, per batch, the
    live items through the top layers with gradient and the head; batches and live items drawn as the Trainer
    draws them (same sizes, another seed)."""
    inputs, targets = training_pairs(split, config.data.max_len, config.data.window_stride)
    rng = np.random.default_rng(seed)
    batches = [idx for _, idx in batch_plan([inputs], config.train.batch_size, rng, config.train.max_steps)]
    total = encoder_flops(shape, lengths[1:], "top")
    for idx in batches:
        x, y = trim(inputs[idx], targets[idx])
        items = np.unique(np.concatenate([x.flatten().numpy(), y.flatten().numpy()]))
        items = items[items > 0]
        live = rng.permutation(items)[:config.train.live_items] if config.train.live_items > 0 else items[:0]
        total += encoder_flops(shape, lengths[live], "top", train=True)
        total += head_step_flops(int((y > 0).sum()), len(idx), x.shape[1], split.num_items, shape.hidden,
                                 config.model.hidden_size, config.model.head_layers, config.model.hidden_size)
    return total, len(batches)


def naive_step_flops(split, model_config, shape: EncoderShape, inputs: torch.Tensor, targets: torch.Tensor,
                     lengths: np.ndarray) -> int:
    """FLOPs the baseline step performs: every occurrence through all layers with gradient, padded as batched."""
    occurrences = inputs[inputs > 0].numpy()
    padded = []
    for start in range(0, len(occurrences), 32):
        chunk = lengths[occurrences[start:start + 32]]
        padded.extend([int(chunk.max())] * len(chunk))
    return encoder_flops(shape, padded, "all", train=True) + head_step_flops(
        int((targets > 0).sum()), len(inputs), inputs.shape[1], split.num_items, shape.hidden,
        model_config.hidden_size, model_config.head_layers, model_config.hidden_size)




def rates(work: float, wall: float, cpu: float) -> dict[str, float]:
    return {"per_wall_s": work / wall, "per_cpu_s": work / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.speed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--naive-steps", type=int, default=3, help="timed baseline training steps per platform")
    parser.add_argument("--naive-batch", type=int, default=4, help="sequences per baseline step")
    parser.add_argument("--naive-texts", type=int, default=512,
                        help="texts the baseline encodes (inference): a fixed random sample of every platform's")
    parser.add_argument("--reps", type=int, default=2, help="encoding repetitions (the best counts)")
    parser.add_argument("--cpus", type=int, default=None, help="cores for the one-round simulation (default all)")
    parser.add_argument("--skip-round", action="store_true", help="do not run the one-round simulation")
    add_flags(parser, PollenConfig().replace(threads=1, **{"num-rounds": 1}))
    args = parser.parse_args()
    config = from_args(args)
    run_dir = resolve_run_dir(config.federation.run_dir, "speed")
    run_dir.mkdir(parents=True, exist_ok=True)
    threads = configure_threads(config.train.threads)
    out: dict = {"threads": threads, "config": config.to_flat(), "platforms": {},
                 "clock": "rates per CPU second (thread CPU time at 1 thread) and per wall second"}
    say = print

    # -- the limit ---------------------------------------------------------------------------------------
    out["attainable_gflops"] = {str(t): dict(zip(("per_wall_s", "per_cpu_s"), attainable_gflops(t)))
                                for t in sorted({1, 2, threads})}
    limit = out["attainable_gflops"][str(threads)]
    say("attainable float32 matmul (2048^3 torch.mm, best of 5): " + ", ".join(
        f"{t} thread(s) {g['per_wall_s']:.1f} GFLOP/s wall, {g['per_cpu_s']:.1f} GFLOP per CPU-s"
        for t, g in out["attainable_gflops"].items()))

    splits = [load_split(config.data, name) for name in platform_names(config.data)]
    torch.manual_seed(config.train.seed)
    encoder = TextEncoder(config.model, seed=config.train.seed, max_len=config.data.max_len)
    shape = EncoderShape.of(encoder)
    out["encoder_shape"] = vars(shape)

    # -- encoding (inference) ----------------------------------------------------------------------------
    say("\n== encoding item texts (inference), rates per CPU-second [per wall-second] ==")
    states, lengths = {}, {}
    cold = [0.0, 0.0]
    warm = [0.0, 0.0]
    with PeakMemory(interval=0.1, pss=False) as mem_encode:
        for split in splits:
            states[split.name], w, c = timed(lambda: encoder.item_states(split.item_texts), args.reps)
            cold = [cold[0] + w, cold[1] + c]
            lengths[split.name] = states[split.name].lengths.numpy()
            _, w, c = timed(lambda: encoder.encode_catalogue(states[split.name]), args.reps)
            warm = [warm[0] + w, warm[1] + c]
    cold = [cold[0] + warm[0], cold[1] + warm[1]]  # cold = bottom + top
    texts = [t for s in splits for t in s.item_texts]
    all_lengths = np.concatenate([lengths[s.name][1:] for s in splits])
    sample = np.sort(np.random.default_rng(0).permutation(len(texts))[:args.naive_texts])  # all platforms
    naive_texts = [texts[i] for i in sample]
    with PeakMemory(interval=0.1, pss=False) as mem_naive_encode, torch.no_grad():
        _, naive_wall, naive_cpu = timed(lambda: naive_encode(encoder, naive_texts), args.reps)
    n = len(texts)
    full = encoder_flops(shape, all_lengths, "all")
    top = encoder_flops(shape, all_lengths, "top")
    naive_lengths = all_lengths[sample]
    naive_tokens = [int(naive_lengths[i:i + 32].max()) for i in range(0, len(naive_texts), 32)
                    for _ in range(i, min(i + 32, len(naive_texts)))]
    naive_useful = encoder_flops(shape, naive_lengths, "all")
    enc = {"texts": n, "mean_tokens": float(all_lengths.mean()), "max_tokens": int(all_lengths.max()),
           "flops_per_text_full_model": full / n, "flops_per_text_top_layers": top / n,
           "naive_texts_per_s": rates(len(naive_texts), naive_wall, naive_cpu),
           "cold_texts_per_s": rates(n, *cold), "warm_texts_per_s": rates(n, *warm),
           # useful FLOPs (real tokens, no padding) per CPU-second, and what the baseline executes with padding
           "naive_gflops": naive_useful / naive_cpu / 1e9,
           "naive_executed_gflops": encoder_flops(shape, naive_tokens, "all") / naive_cpu / 1e9,
           "cold_gflops": full / cold[1] / 1e9, "warm_gflops": top / warm[1] / 1e9,
           "peak_rss_gib": mem_encode.rss / GIB, "naive_peak_rss_gib": mem_naive_encode.rss / GIB}
    for key in ("cold", "warm"):
        enc[f"{key}_speedup"] = {k: enc[f"{key}_texts_per_s"][k] / enc["naive_texts_per_s"][k]
                                 for k in ("per_cpu_s", "per_wall_s")}
    for key in ("naive", "naive_executed", "cold", "warm"):
        enc[f"{key}_of_attainable"] = enc[f"{key}_gflops"] / limit["per_cpu_s"]
    out["encoding"] = enc
    say(f"{n} texts, {enc['mean_tokens']:.1f} tokens on average (max {enc['max_tokens']}); full model "
        f"{enc['flops_per_text_full_model'] / 1e6:.1f} MFLOP/text, top {shape.lora_layers} layers "
        f"{enc['flops_per_text_top_layers'] / 1e6:.1f} MFLOP/text")

    def line(label, r, gflops, share, speedup=None):
        tail = f"   x{speedup['per_cpu_s']:.1f} [x{speedup['per_wall_s']:.1f}]" if speedup else ""
        say(f"  {label:<44} {r['per_cpu_s']:8.1f} [{r['per_wall_s']:8.1f}]  {gflops:5.1f} GFLOP/CPU-s = "
            f"{share:4.0%} of attainable{tail}")

    line("naive (whole model, unsorted, every time)", enc["naive_texts_per_s"], enc["naive_gflops"],
         enc["naive_of_attainable"])
    line("Pollen cold (all layers once, length buckets)", enc["cold_texts_per_s"], enc["cold_gflops"],
         enc["cold_of_attainable"], enc["cold_speedup"])
    line("Pollen warm (bottom cached: top layers only)", enc["warm_texts_per_s"], enc["warm_gflops"],
         enc["warm_of_attainable"], enc["warm_speedup"])

    # -- training ----------------------------------------------------------------------------------------
    say("\n== training: one local epoch per platform; baseline a few steps, extrapolated ==")
    total = dict.fromkeys(("seqs", "wall", "cpu", "flops", "naive_seqs", "naive_wall", "naive_cpu",
                           "naive_flops"), 0)
    initial_adapter = encoder.adapter_state()
    peak_train, peak_naive = 0, 0
    for split in splits:
        encoder.load_adapter_state(initial_adapter)
        torch.manual_seed(config.train.seed)
        model = Recommender(split, config, encoder, states[split.name])
        trainer = Trainer([Platform(split, model)], encoder, config)
        with PeakMemory(interval=0.1, pss=False) as peak:
            _, wall, cpu = timed(trainer.epoch)
        peak_train = max(peak_train, peak.rss)
        flops, steps = epoch_flops(split, config, shape, lengths[split.name])
        seqs = trainer.num_sequences
        # baseline: a fresh optimiser over the same parameters, a warm-up step, then timed steps
        optimizer = torch.optim.AdamW([{"params": list(model.head.parameters()), "lr": config.train.lr},
                                       {"params": encoder.lora_parameters(), "lr": config.train.lora_lr}])
        inputs, targets = training_pairs(split, config.data.max_len, config.data.window_stride)
        order = np.random.default_rng(1).permutation(len(inputs))
        batches = [order[i * args.naive_batch:(i + 1) * args.naive_batch] for i in range(args.naive_steps + 1)]
        model.train()
        with PeakMemory(interval=0.1, pss=False) as peak:
            naive_train_step(model, split.item_texts, optimizer, inputs[batches[0]], targets[batches[0]])
            _, naive_wall, naive_cpu = timed(lambda: [naive_train_step(model, split.item_texts, optimizer,
                                                                       inputs[b], targets[b]) for b in batches[1:]])
        model.eval()
        peak_naive = max(peak_naive, peak.rss)
        naive_seqs = sum(len(b) for b in batches[1:])
        naive_flops = sum(naive_step_flops(split, config.model, shape, inputs[b], targets[b], lengths[split.name])
                          for b in batches[1:])
        row = {"sequences": seqs, "steps": steps, "epoch_wall_s": wall, "epoch_cpu_s": cpu,
               "sequences_per_s": rates(seqs, wall, cpu), "flops_per_step": flops / steps,
               "gflops": flops / cpu / 1e9, "naive_sequences_per_s": rates(naive_seqs, naive_wall, naive_cpu),
               "naive_flops_per_sequence": naive_flops / naive_seqs, "naive_gflops": naive_flops / naive_cpu / 1e9}
        row["naive_epoch_wall_s_extrapolated"] = seqs / row["naive_sequences_per_s"]["per_wall_s"]
        row["naive_epoch_cpu_s_extrapolated"] = seqs / row["naive_sequences_per_s"]["per_cpu_s"]
        row["speedup"] = {k: row["sequences_per_s"][k] / row["naive_sequences_per_s"][k]
                          for k in ("per_cpu_s", "per_wall_s")}
        out["platforms"][split.name] = row
        for key, value in (("seqs", seqs), ("wall", wall), ("cpu", cpu), ("flops", flops),
                           ("naive_seqs", naive_seqs), ("naive_wall", naive_wall), ("naive_cpu", naive_cpu),
                           ("naive_flops", naive_flops)):
            total[key] += value
        say(f"  {split.name:>12}: epoch {cpu:6.1f} CPU-s [{wall:6.1f}s wall], {seqs} seqs, {steps} steps, "
            f"{row['flops_per_step'] / 1e9:.1f} GFLOP/step; naive epoch ~{row['naive_epoch_cpu_s_extrapolated']:.0f} "
            f"CPU-s [~{row['naive_epoch_wall_s_extrapolated']:.0f}s] (extrapolated)   x{row['speedup']['per_cpu_s']:.1f} "
            f"[x{row['speedup']['per_wall_s']:.1f}]")
    train = {"sequences_per_s": rates(total["seqs"], total["wall"], total["cpu"]),
             "naive_sequences_per_s": rates(total["naive_seqs"], total["naive_wall"], total["naive_cpu"]),
             "gflops": total["flops"] / total["cpu"] / 1e9, "naive_gflops": total["naive_flops"] / total["naive_cpu"] / 1e9,
             "peak_rss_gib": peak_train / GIB, "naive_peak_rss_gib": peak_naive / GIB,
             "naive_measured": f"{args.naive_steps} steps x {args.naive_batch} sequences per platform (after one "
                               "warm-up step), rates extrapolated"}
    train["speedup"] = {k: train["sequences_per_s"][k] / train["naive_sequences_per_s"][k]
                        for k in ("per_cpu_s", "per_wall_s")}
    train["of_attainable"] = train["gflops"] / limit["per_cpu_s"]
    train["naive_of_attainable"] = train["naive_gflops"] / limit["per_cpu_s"]
    out["training"] = train
    say(f"  all platforms: {train['sequences_per_s']['per_cpu_s']:.1f} seqs/CPU-s "
        f"[{train['sequences_per_s']['per_wall_s']:.1f} seqs/s], {train['gflops']:.1f} GFLOP/CPU-s = "
        f"{train['of_attainable']:.0%} of attainable; naive {train['naive_sequences_per_s']['per_cpu_s']:.2f} "
        f"[{train['naive_sequences_per_s']['per_wall_s']:.2f}], {train['naive_gflops']:.1f} GFLOP/CPU-s = "
        f"{train['naive_of_attainable']:.0%}:  x{train['speedup']['per_cpu_s']:.1f} [x{train['speedup']['per_wall_s']:.1f}]")
    say(f"  peak RSS of this process: Pollen {train['peak_rss_gib']:.2f} GiB (batches of {config.train.batch_size}), "
        f"naive {train['naive_peak_rss_gib']:.2f} GiB (batches of {args.naive_batch})")

    # -- a federated round -------------------------------------------------------------------------------
    if not args.skip_round:
        from simulations.run import simulate

        say("\n== one federated round (Flower simulation, Ray, 1 CPU + 1 thread per client) ==")
        sim_config = config.replace(**{"num-rounds": 1, "run-dir": str(run_dir / "round"), "threads": 0})
        with PeakMemory(interval=0.5) as mem_round:
            record = simulate(sim_config, args.cpus)
        parallel = min(len(splits), args.cpus or os.cpu_count() or 1)
        extra = sum(r["naive_epoch_wall_s_extrapolated"] - r["epoch_wall_s"] for r in out["platforms"].values())
        rnd = {"round_s": record.round_seconds[1], "start_and_round0_s": record.round_seconds[0],
               "naive_round_s_estimated": record.round_seconds[1] + extra / parallel,
               "peak_rss_sum_gib": mem_round.rss / GIB, "peak_pss_sum_gib": mem_round.pss / GIB,
               "max_processes": mem_round.processes,
               "naive_estimate": "measured round + sum over platforms of (naive - Pollen epoch, wall) / parallel "
                                 "clients"}
        rnd["speedup"] = rnd["naive_round_s_estimated"] / rnd["round_s"]
        out["round"] = rnd
        say(f"  round 1: {rnd['round_s']:.1f}s wall (naive estimated {rnd['naive_round_s_estimated']:.0f}s, "
            f"x{rnd['speedup']:.1f}); peak memory of the process tree {rnd['peak_pss_sum_gib']:.2f} GiB PSS "
            f"({rnd['peak_rss_sum_gib']:.2f} GiB summed RSS, {rnd['max_processes']} processes)")

    write_json(run_dir / "speed.json", out)
    plot(out, run_dir / "speed.png")
    say(f"\nwritten {run_dir / 'speed.json'} and speed.png")


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    enc, train = out["encoding"], out["training"]
    labels = ["encode\n(cold)", "encode\n(warm)", "train"]
    pollen = [enc["cold_texts_per_s"]["per_cpu_s"], enc["warm_texts_per_s"]["per_cpu_s"],
              train["sequences_per_s"]["per_cpu_s"]]
    naive = [enc["naive_texts_per_s"]["per_cpu_s"], enc["naive_texts_per_s"]["per_cpu_s"],
             train["naive_sequences_per_s"]["per_cpu_s"]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(labels))
    ax.bar(x - 0.2, naive, 0.4, label="naive baseline")
    ax.bar(x + 0.2, pollen, 0.4, label="Pollen")
    ax.set_xticks(x, labels)
    ax.set_yscale("log")
    ax.set_ylabel("texts or sequences per CPU-second (log)")
    ax.legend()
    ratios = [enc["naive_of_attainable"], enc["cold_of_attainable"], enc["warm_of_attainable"],
              train["naive_of_attainable"], train["of_attainable"]]
    ax2.bar(["enc naive", "enc cold", "enc warm", "train naive", "train"], [100 * r for r in ratios])
    ax2.set_ylabel(f"% of attainable matmul GFLOP per CPU-s ({out['threads']} thread(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
