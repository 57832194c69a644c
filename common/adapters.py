"""The adapters on the wire, in one place: which tensors travel, torch tensors <-> Flower ArrayRecord, and the
checks every received record passes.

Only this leaves a client: the LoRA tensors and the shared recommendation adapters (``TextEncoder.adapter_state``).
A reply whose tensors do not match the expected adapter (keys, shapes, dtype, finite values) is refused with a
reason, never averaged.

LoRA computes ``W + B·A``. Averaging A and B separately gives ``mean(B)·mean(A)``, which is not the average of
the clients' products ``mean(B·A)``. With ``aggregation = "ffa"`` (FFA-LoRA, Sun et al. 2024) every party keeps
A frozen at the shared seeded start and trains only B, so the plain weighted mean of B is exactly the weighted
mean of the products; only B travels (half the LoRA bytes).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def to_record(state: dict[str, torch.Tensor], dtype: str = "float32") -> ArrayRecord:
    """The adapter as it travels, cast to the wire dtype ``adapter-dtype`` (both directions use it)."""
    wire = getattr(torch, dtype)
    return ArrayRecord({k: v.detach().cpu().to(wire).contiguous() for k, v in state.items()})


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


def signature(state: dict[str, torch.Tensor], dtype: str = "float32") -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, wire dtype name) of an adapter, to check received records against."""
    return {k: (tuple(v.shape), dtype) for k, v in state.items()}


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Float32 tensors whatever the wire dtype: training and aggregation always run in float32."""
    return {k: v.float() for k, v in record.to_torch_state_dict().items()}


def cast_record(record: ArrayRecord, dtype: str) -> ArrayRecord:
    """A copy in ``dtype``: the server widens replies to float32 to average them, and narrows the result to send."""
    return ArrayRecord({k: Array(np.asarray(v.numpy(), dtype=dtype)) for k, v in record.items()})


def travels(key: str, aggregation: str) -> bool:
    """Whether this adapter tensor is trained and sent under ``aggregation``."""
    return aggregation != "ffa" or "lora_A" not in key


def wire_state(state: dict[str, torch.Tensor], aggregation: str) -> dict[str, torch.Tensor]:
    """The part of an adapter state that is sent and averaged."""
    return {k: v for k, v in state.items() if travels(k, aggregation)}


def merge_state(own: dict[str, torch.Tensor], received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full adapter state: the received tensors over one's own (the frozen A under FFA)."""
    return {**own, **received}


def mix_state(own: dict[str, torch.Tensor], received: dict[str, torch.Tensor], share: float
              ) -> dict[str, torch.Tensor]:
    """share x received + (1 - share) x own, tensor by tensor (the same keys): a point between one's own adapters
    and the federation's. Both descend from the same seeded start, so the points between are models too."""
    return {k: torch.lerp(v, received[k].to(v), share) for k, v in own.items()}


def freeze_untravelled(encoder, aggregation: str) -> None:
    """Under FFA, A never trains: freeze it (a ``TextEncoder``'s) before the optimiser is built."""
    for name, param in encoder.bert.named_parameters():
        if param.requires_grad and not travels(name, aggregation):
            param.requires_grad_(False)
