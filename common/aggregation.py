"""How client adapters become the global one: which LoRA tensors travel, update norms, robust per-entry aggregates.

LoRA computes ``W + B·A``. Averaging A and B separately gives ``mean(B)·mean(A)``, which is not the average of
the clients' products ``mean(B·A)``. With ``aggregation = "ffa"`` (FFA-LoRA, Sun et al. 2024) every party keeps
A frozen at the shared seeded start and trains only B, so the plain weighted mean of B is exactly the weighted
mean of the products; only B travels (half the bytes).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord

from common.model.encoder import TextEncoder


def travels(key: str, aggregation: str) -> bool:
    """Whether this adapter tensor is trained and sent under ``aggregation``."""
    return aggregation != "ffa" or "lora_A" not in key


def wire_state(state: dict[str, torch.Tensor], aggregation: str) -> dict[str, torch.Tensor]:
    """The part of an adapter state that is sent and averaged."""
    return {k: v for k, v in state.items() if travels(k, aggregation)}


def merge_state(encoder: TextEncoder, received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full adapter state: the received tensors over the encoder's own (its frozen A under FFA)."""
    return {**encoder.adapter_state(), **received}


def freeze_untravelled(encoder: TextEncoder, aggregation: str) -> None:
    """Under FFA, A never trains: freeze it before the optimiser is built."""
    for name, param in encoder.bert.named_parameters():
        if param.requires_grad and not travels(name, aggregation):
            param.requires_grad_(False)


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
