"""Values, not just types, for every tensor file Pollen reads (adapters, checkpoints, exported models, private
state) and every metric it reports. A damaged or foreign file is a one-line error naming the file and what is
wrong (common/errors.FileProblem); nothing is ever unpickled beyond tensors and plain values (weights_only=True).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from common.errors import FileProblem, UserError, one_line

Shapes = Mapping[str, tuple[int, ...]]


def load_tensors(path: str | Path, what: str = "tensor file") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or FileProblem naming the file (missing, truncated, not safetensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileProblem(path, f"{what} not found")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError, OSError or ValueError
        raise FileProblem(path, f"not a readable safetensors {what} ({one_line(error)[:200]}); the file is "
                                "damaged or of another kind: write it again") from None


def check_tensors(tensors: Mapping[str, torch.Tensor], path: str | Path, expected: Shapes | None = None,
                  what: str = "tensor file") -> None:
    """Every tensor finite; with ``expected`` (key -> shape) exactly those keys with those shapes."""
    issues = []
    if expected is not None:
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            issues.append(f"keys differ from the model's: {len(missing)} missing (e.g. {missing[:2]}), "
                          f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        for key in sorted(set(expected) & set(tensors)):
            if tuple(tensors[key].shape) != tuple(expected[key]):
                issues.append(f"{key}: shape {list(tensors[key].shape)}, expected {list(expected[key])}")
    for key, tensor in sorted(tensors.items()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            issues.append(f"{key}: {bad} of {tensor.numel()} values are NaN or infinite")
    if issues:
        more = f" (and {len(issues) - 3} more)" if len(issues) > 3 else ""
        raise FileProblem(path, f"unusable {what}: " + "; ".join(issues[:3]) + more)


def read_adapter(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder (what the server writes to RUN/adapter after every round: peft's LoRA
    file and/or the recommendation adapters, either may be absent) or of one adapter file, checked for finite
    values; whoever loads them checks keys and shapes against its model. Errors name the file."""
    from common.model.encoder import ADAPTER_FILE, SHARED_FILE, TextEncoder

    def checked(file: Path) -> dict[str, torch.Tensor]:
        tensors = load_tensors(file, "adapter")
        check_tensors(tensors, file, what="adapter")
        return tensors

    path = Path(folder)
    state = checked(path) if path.is_file() else TextEncoder.read_adapter(path, checked) if path.is_dir() else {}
    if not state:
        raise FileProblem(folder, f"expected an adapter folder holding {ADAPTER_FILE} and/or {SHARED_FILE} (the "
                                  "federation writes one to RUN/adapter)")
    return state


def shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def load_torch(source: str | Path | bytes, what: str = "state file", name: str | None = None) -> Any:
    """``torch.load`` with weights_only=True (tensors and plain values only) from a path or bytes; a file that
    is damaged, or holds anything else, is a FileProblem naming it (``name`` for bytes)."""
    label = name or str(source)
    if isinstance(source, (str, Path)) and not Path(source).is_file():
        raise FileProblem(label, f"{what} not found")
    try:
        data = io.BytesIO(source) if isinstance(source, bytes) else source
        return torch.load(data, weights_only=True, map_location="cpu")
    except Exception as error:  # UnpicklingError, RuntimeError, EOFError... depending on the damage
        first = one_line(error).split(". ")[0][:160]
        raise FileProblem(label, f"not a readable {what} ({type(error).__name__}: {first}); only tensors and "
                                 "plain values are read from it: write it again") from None


class NonFiniteMetric(UserError):
    """A metric came out NaN or infinite: the model produced non-finite scores (diverged, or a broken input)."""


def finite_metrics(metrics: Mapping[str, float], where: str) -> Mapping[str, float]:
    """``metrics`` unchanged when every value is finite; otherwise one line naming them."""
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise NonFiniteMetric(f"{where}: metric(s) {', '.join(f'{k} = {v}' for k, v in list(bad.items())[:4])} are "
                              "not finite: the model's scores hold NaN or infinity (training diverged, or an "
                              "adapter/head with NaN values); lower lr / lora-lr or check the inputs")
    return metrics
