"""Scale: the same federation with more simulated clients (each platform's users split into silos).

    python -m simulations.scale                             # 3, 12, 30 clients on the embedded data, 2 rounds
    python -m simulations.scale --clients-per-platform-list 1,4,10 --num-rounds 3

Each size runs ``python -m simulations.run --clients-per-platform N`` as a child process; its whole process
tree (the driver, Ray's raylet and GCS, every Ray worker) is sampled every second for peak memory (summed PSS,
and summed RSS, which counts shared pages once per process). Writes scale.json and scale.png into --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common.files import write_json
from simulations.memory import wait_with_peak

GIB = 1024 ** 3


def run_size(per_platform: int, rounds: int, run_dir: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "simulations.run", "--clients-per-platform", str(per_platform),
               "--num-rounds", str(rounds), "--run-dir", str(run_dir), *extra]
    start = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        code, peak = wait_with_peak(process)
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {code}: see {run_dir.with_suffix('.log')}")
    results = json.loads((run_dir / "results.json").read_text())
    last = results["evaluations"][str(rounds)]
    platforms: dict[str, dict[str, float]] = {}
    for client, metrics in last.items():  # users-weighted mean over a platform's silos
        name = client.split("-silo")[0]
        entry = platforms.setdefault(name, {"users": 0.0, "ndcg": 0.0, "clients": 0})
        entry["users"] += metrics["test-users"]
        entry["ndcg"] += metrics["test-ndcg@10"] * metrics["test-users"]
        entry["clients"] += 1
    rounds_s = [results["round_seconds"][str(r)] for r in range(1, rounds + 1)]
    return {"clients": len(last), "clients_per_platform": per_platform, "wall_s": wall,
            "start_and_round0_s": results["round_seconds"]["0"], "round_s": rounds_s,
            "mean_round_s": sum(rounds_s) / len(rounds_s),
            "peak_pss_sum_gib": peak.pss / GIB, "peak_rss_sum_gib": peak.rss / GIB, "max_processes": peak.processes,
            "test_ndcg@10_at_last_round": {n: e["ndcg"] / e["users"] for n, e in sorted(platforms.items())},
            "users": {n: e["users"] for n, e in sorted(platforms.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m simulations.scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients-per-platform-list", default="1,4,10",
                        help="silos per platform to measure, comma-separated (default 1,4,10)")
    parser.add_argument("--num-rounds", type=int, default=2, help="federated rounds per measurement (default 2)")
    parser.add_argument("--out", default=f"runs/scale-{time.strftime('%Y%m%d-%H%M%S')}",
                        help="folder for scale.json and each measurement's run (default runs/scale-<time>)")
    args, extra = parser.parse_known_args()  # anything else goes to simulations.run
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for per_platform in [int(x) for x in args.clients_per_platform_list.split(",")]:
        row = run_size(per_platform, args.num_rounds, out / f"clients-per-platform-{per_platform}", extra)
        rows.append(row)
        print(f"{row['clients']:3d} clients: round {row['mean_round_s']:6.1f}s (rounds {', '.join(f'{s:.0f}' for s in row['round_s'])}s; "
              f"start + round 0 {row['start_and_round0_s']:.0f}s)  peak memory {row['peak_pss_sum_gib']:.2f} GiB PSS "
              f"({row['peak_rss_sum_gib']:.2f} GiB summed RSS, {row['max_processes']} processes)  test NDCG@10 "
              + "  ".join(f"{n} {v:.4f}" for n, v in row["test_ndcg@10_at_last_round"].items()), flush=True)
        write_json(out / "scale.json", {"num_rounds": args.num_rounds, "extra_args": extra, "runs": rows})
    plot(rows, out / "scale.png")
    print(f"written {out / 'scale.json'} and scale.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [r["clients"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(clients, [r["mean_round_s"] for r in rows], "o-")
    axes[0].set_ylabel("seconds per round")
    axes[1].plot(clients, [r["peak_pss_sum_gib"] for r in rows], "o-", label="summed PSS")
    axes[1].plot(clients, [r["peak_rss_sum_gib"] for r in rows], "o--", label="summed RSS")
    axes[1].set_ylabel("peak memory of the process tree (GiB)")
    axes[1].set_ylim(bottom=0)
    axes[1].legend()
    for name in rows[0]["test_ndcg@10_at_last_round"]:
        axes[2].plot(clients, [r["test_ndcg@10_at_last_round"][name] for r in rows], "o-", label=name)
    axes[2].set_ylabel("test NDCG@10 (last round, users-weighted)")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("simulated clients")
        ax.set_xticks(clients)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
