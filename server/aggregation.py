"""Server-only statistics of the clients' adapter updates: update norms (hostile-update checks) and robust
per-entry aggregates (server/strategy.py). Nothing here runs on a client."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord


def update_norm(reply: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of reply - reference over every tensor (the client's update this round)."""
    total = 0.0
    for key, array in reply.items():
        diff = array.numpy().astype(np.float64) - reference[key].numpy().astype(np.float64)
        total += float(np.square(diff).sum())
    return total ** 0.5


def robust_mean(records: list[ArrayRecord], aggregator: str, trim_ratio: float) -> ArrayRecord:
    """Per-entry median or trimmed mean of the records (unweighted: robustness does not trust claimed sizes)."""
    out = {}
    for key, first in records[0].items():
        stacked = np.stack([r[key].numpy() for r in records]).astype(np.float64)
        if aggregator == "median":
            value = np.median(stacked, axis=0)
        elif aggregator == "trimmed-mean":
            cut = max(1, int(trim_ratio * len(records))) if len(records) >= 3 else 0
            ordered = np.sort(stacked, axis=0)
            value = ordered[cut:len(records) - cut].mean(axis=0)
        else:
            raise ValueError(f"aggregator {aggregator!r}: expected 'median' or 'trimmed-mean'")
        out[key] = value.astype(first.numpy().dtype)
    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()})
