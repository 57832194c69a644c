"""The LoRA adapter on the wire: torch tensors <-> Flower ArrayRecord, and the checks every received one passes.

Only this leaves a client. A reply whose tensors do not match the expected adapter (keys, shapes, dtype,
finite values) is refused with a reason, never averaged.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def record_bytes(record: ArrayRecord) -> int:
    """Serialised size of the tensors, what one transfer of the adapter costs."""
    return sum(len(array.data) for array in record.values())


def problems(record: ArrayRecord, expected: dict[str, tuple[tuple[int, ...], str]]) -> list[str]:
    """Why ``record`` is not a valid adapter (empty list = valid). ``expected`` maps key -> (shape, dtype)."""
    found = set(record.keys())
    issues = []
    if found != set(expected):
        issues.append(f"keys differ: missing {sorted(set(expected) - found)[:3]}, "
                      f"unexpected {sorted(found - set(expected))[:3]}")
    for key in sorted(found & set(expected)):
        shape, dtype = expected[key]
        array = record[key]
        if tuple(array.shape) != tuple(shape) or array.dtype != dtype:
            issues.append(f"{key}: expected {dtype}{list(shape)}, got {array.dtype}{list(array.shape)}")
        elif not np.isfinite(array.numpy()).all():
            issues.append(f"{key}: contains NaN or Inf")
    return issues


def signature(state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, dtype name) of an adapter, to check received records against."""
    return {k: (tuple(v.shape), str(v.detach().cpu().numpy().dtype)) for k, v in state.items()}


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())
