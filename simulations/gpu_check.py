"""GPU check: one platform's client session built, trained and evaluated on the CPU and on a CUDA GPU.

    python -m simulations.gpu_check --data-dir ../shared/data --platforms ecommerce=ecommerce/amazon-office-2014

The client's own code path (client/session.py: build the session, train local epochs, evaluate with full ranking)
runs once per device (--devices, default cpu,cuda) with the same config and seed. Before any training both
devices hold the same weights and data, so their scores for the first validation users must agree up to float
rounding; a larger difference is a device bug. (Metrics are compared too but need not match: where an untrained
model scores many items almost alike, rounding reorders near-ties. After training starts, dropout draws from
each device's own random stream, so the trajectories part.) Prints per device the build, epoch and evaluation
seconds, losses, NDCG@10 and peak GPU memory, and the GPU/CPU time ratios. With --dp-epsilon the user-level DP
path runs. Writes gpu_check.json.
"""

from __future__ import annotations

import argparse
import time

from common import runtime  # noqa: F401  (offline mode before transformers loads)

import torch

from common.config import PollenConfig, add_flags, from_args
from common.data.sources import platform_names
from common.files import resolve_run_dir, write_json
from common.runtime import configure_threads, default_cache_dir

AGREEMENT = 1e-2  # largest round-0 score difference accepted between devices, relative to the scores' spread
COMPARED_USERS = 512


def timed(device: str, work) -> tuple[object, float]:
    """(result, wall seconds) with the GPU's queue drained, so asynchronous kernels are counted."""
    start = time.perf_counter()
    result = work()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def run_on(device: str, config: PollenConfig, name: str, epochs: int, cache_dir: str, start: dict
           ) -> tuple[dict, torch.Tensor]:
    """The device's timings and metrics, and its round-0 scores [users, items] for the comparison. Every device
    starts from the adapter in ``start`` (filled by the first one), as every federated message does."""
    from client.session import ClientSession

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    session, build = timed(device, lambda: ClientSession(config, name, None, cache_dir, device))
    if not start:
        start.update({k: v.detach().cpu().clone() for k, v in session.encoder.adapter_state().items()})
    session.set_adapter(start)
    before, first_eval = timed(device, lambda: session.platform.evaluate("valid"))
    with torch.no_grad():
        scores = session.platform.model.score(session.platform.split.eval_inputs("valid")[0][:COMPARED_USERS]).cpu()
    out = {"device": device, "build-seconds": build, "round-0-valid": before, "round-0-eval-seconds": first_eval,
           "epochs": []}
    for epoch in range(epochs):
        metrics, seconds = timed(device, session.train)
        out["epochs"].append({"seconds": seconds, "train-loss": metrics["train-loss"],
                              **{k: v for k, v in metrics.items() if k.startswith("dp-")}})
        print(f"  {device} epoch {epoch + 1}: {seconds:.1f}s loss {metrics['train-loss']:.4f}", flush=True)
    after, out["eval-seconds"] = timed(device, session.evaluate)
    out.update({"valid-ndcg@10": after["valid-ndcg@10"], "test-ndcg@10": after["test-ndcg@10"]})
    if device.startswith("cuda"):
        out["peak-gpu-bytes"] = torch.cuda.max_memory_allocated()
    return out, scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated torch devices to compare")
    parser.add_argument("--epochs", type=int, default=2, help="local epochs on each device")
    parser.add_argument("--cache-dir", default=default_cache_dir(), help="where frozen-layer item states are kept")
    add_flags(parser, scopes=("model", "data", "run"))
    args = parser.parse_args(argv)
    config = from_args(args).replace(**{"local-epochs": 1})
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        parser.error("--devices names a CUDA device but torch sees no GPU here")
    threads = configure_threads(config.train.threads)
    name = platform_names(config.data)[0]
    print(f"platform {name}, {args.epochs} epochs, {threads} CPU threads, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}", flush=True)
    start: dict = {}
    runs, scores = zip(*(run_on(d, config, name, args.epochs, args.cache_dir, start) for d in devices))
    spread = scores[0][:, 1:].std().item()
    disagreement = max((s - scores[0])[:, 1:].abs().max().item() for s in scores) / spread
    top = [s[:, 1:].topk(10).indices for s in scores]
    overlap = min(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top[0], t)) / top[0].numel() for t in top)
    result = {"platform": name, "threads": threads, "config": config.to_flat(), "runs": runs,
              "round-0-score-difference": disagreement, "round-0-top10-overlap": overlap,
              "agree": disagreement <= AGREEMENT}
    for r in runs:
        epoch = min(e["seconds"] for e in r["epochs"])
        ratio = "" if r is runs[0] else (f"  (x{runs[0]['build-seconds'] / max(r['build-seconds'], 1e-9):.1f} build, "
                                         f"x{min(e['seconds'] for e in runs[0]['epochs']) / epoch:.1f} epoch, "
                                         f"x{runs[0]['eval-seconds'] / r['eval-seconds']:.1f} eval vs {devices[0]})")
        print(f"{r['device']}: build {r['build-seconds']:.1f}s, epoch {epoch:.1f}s, eval {r['eval-seconds']:.1f}s, "
              f"round-0 valid NDCG@10 {r['round-0-valid']['ndcg@10']:.4f}, final valid {r['valid-ndcg@10']:.4f} "
              f"test {r['test-ndcg@10']:.4f}" + ratio)
    print(f"round-0 scores agree across devices: {result['agree']} (largest difference {disagreement:.1e} of the "
          f"scores' standard deviation; top-10 overlap {overlap:.1%}; {len(scores[0])} validation users)")
    run_dir = resolve_run_dir(config.federation.run_dir, "gpu-check")
    write_json(run_dir / "gpu_check.json", result)
    print(f"written to {run_dir / 'gpu_check.json'}")
    if not result["agree"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
