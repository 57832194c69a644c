"""The run's record: a line per round on the console, rounds.csv, results.json and a plot of NDCG@10.

Each platform's reported model is the round with its best validation NDCG@10; test metrics are only read at
that round. Round 0, the untrained start, is shown, and is a candidate only with ``text-prior``: that untrained
model is MiniLM's zero-shot ranking, a model worth serving, as ``common.train.fit`` keeps epoch 0.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Callable

from common.config import PollenConfig
from common.files import write_atomic, write_json

SHOWN = "test-ndcg@10"
VALID = "valid-ndcg@10"


class RunRecord:
    def __init__(self, run_dir: Path, config: dict, num_rounds: int, log: Callable[[str], None] = print):
        self.run_dir, self.config, self.num_rounds, self.log = run_dir, config, num_rounds, log
        self.first_candidate = PollenConfig.from_flat(config).model.first_candidate  # round 0 only with the prior
        self.evaluations: dict[int, dict[str, dict[str, float]]] = {}
        self.training: dict[int, dict[str, dict[str, float]]] = {}
        self.round_seconds: dict[int, float] = {}
        self.failures: dict[int, list[str]] = {}  # per round: the nodes that failed or did not answer in time
        self.adapter_bytes = 0
        self.started = self._last = time.perf_counter()

    def add_training(self, server_round: int, per_platform: dict[str, dict[str, float]]) -> None:
        self.training[server_round] = per_platform

    def add_failure(self, server_round: int, line: str) -> None:
        self.failures.setdefault(server_round, []).append(line)
        self.save()  # an operator watching results.json sees it at once

    def add_evaluation(self, server_round: int, per_platform: dict[str, dict[str, float]]) -> None:
        now = time.perf_counter()
        self.evaluations[server_round] = per_platform
        self.round_seconds[server_round] = now - self._last
        self._last = now
        shown = "  ".join(f"{name} {m.get(SHOWN, float('nan')):.4f}" for name, m in sorted(per_platform.items()))
        upload = [m.get("upload-bytes", 0) for m in self.training.get(server_round, {}).values()]
        extra = f"  upload {max(upload) / 1024:.0f} KiB/client" if upload else ""
        epsilon = {n: m["dp-epsilon"] for n, m in sorted(self.training.get(server_round, {}).items())
                   if "dp-epsilon" in m}
        if epsilon:  # user-level DP spent so far per platform (opacus RDP accountant, at each client's delta)
            extra += "  epsilon: " + " ".join(f"{n} {e:.2f}" for n, e in epsilon.items())
        self.log(f"round {server_round}/{self.num_rounds}  test NDCG@10: {shown}{extra}  "
                 f"({self.round_seconds[server_round]:.0f}s)")
        self.save()

    def selected(self) -> dict[str, dict]:
        """Per platform: the candidate round (trained, or round 0 with the text prior) with the best validation
        NDCG@10 and its test metrics."""
        out: dict[str, dict] = {}
        for rnd, per_platform in sorted(self.evaluations.items()):
            for name, m in per_platform.items():
                if rnd >= self.first_candidate and m["valid-ndcg@10"] > out.get(name, {}).get("valid-ndcg@10", -1.0):
                    out[name] = {"round": rnd, "valid-ndcg@10": m["valid-ndcg@10"],
                                 "test": {k[5:]: v for k, v in m.items() if k.startswith("test-")}}
        return out

    # -- checkpoint: the record so far, so a resumed run reports every round ---------------------
    def state(self) -> dict:
        return {"evaluations": self.evaluations, "training": self.training, "round_seconds": self.round_seconds,
                "failures": self.failures}

    def restore(self, state: dict) -> None:
        """Inverse of ``state`` after a JSON round trip (round numbers come back as strings)."""
        for name in ("evaluations", "training", "round_seconds", "failures"):
            setattr(self, name, {int(k): v for k, v in state[name].items()})

    def save(self) -> None:
        write_json(self.run_dir / "results.json", {
            "config": self.config, "rounds_completed": max(self.evaluations, default=0),
            "adapter_bytes": self.adapter_bytes, "seconds": time.perf_counter() - self.started,
            "round_seconds": self.round_seconds, "failures": self.failures, "evaluations": self.evaluations,
            "training": self.training,
            "selected": self.selected()})
        write_atomic(self.run_dir / "rounds.csv", self._csv())
        self._plot()

    def _csv(self) -> str:
        rows = []
        for rnd, per_platform in sorted(self.evaluations.items()):
            for name, m in sorted(per_platform.items()):
                train = self.training.get(rnd, {}).get(name, {})
                rows.append({"round": rnd, "platform": name, **m,
                             **{f"train-{k}": v for k, v in train.items() if k != "num-examples"}})
        keys = list(dict.fromkeys(k for row in rows for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def _plot(self) -> None:
        import matplotlib.pyplot as plt

        fig = self.figure()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        write_atomic(self.run_dir / "ndcg_per_round.png", buffer.getvalue())

    def figure(self):
        """NDCG@10 per platform per round: test solid, validation dashed, each platform's best validation
        round (its reported model) starred; every kind of line is in the legend."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        names = sorted({n for per in self.evaluations.values() for n in per})
        best, marked = self.selected(), False
        for name in names:
            rounds = [r for r in sorted(self.evaluations) if name in self.evaluations[r]]
            line, = ax.plot(rounds, [self.evaluations[r][name][SHOWN] for r in rounds], marker="o", ls="-",
                            label=f"{name} test")
            ax.plot(rounds, [self.evaluations[r][name][VALID] for r in rounds], marker="o", ls="--",
                    color=line.get_color(), alpha=0.6, label=f"{name} validation")
            if name in best:  # the reported model: the candidate round with the best validation NDCG@10
                r = best[name]["round"]
                ax.plot([r], [self.evaluations[r][name][VALID]], marker="*", ms=14, ls="none",
                        color=line.get_color(), markeredgecolor="black")
                marked = True
        if marked:  # one legend entry for the stars, in no platform's colour
            ax.plot([], [], marker="*", ms=12, ls="none", color="white", markeredgecolor="black",
                    label="best validation round")
        ax.set(xlabel="round (0 = before training)", ylabel="NDCG@10 (full ranking)",
               title="Pollen federation: test (solid) and validation (dashed) NDCG@10")
        ax.legend(fontsize="small", ncol=2)
        ax.grid(alpha=0.3)
        return fig
