"""Process settings every entry point makes the same way: threads, device, offline mode."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the functions that need it: importing this module stays cheap
    import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)


def configure_threads(threads: int = 0) -> int:
    """Use ``threads`` (0 = what the process was given: OMP_NUM_THREADS, e.g. 1 per Ray actor, else all cores)."""
    import torch

    n = threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def resolve_device(name: str = "auto") -> "torch.device":
    """'auto' picks the GPU when there is one; an explicit 'cuda' without one is an error, not a silent CPU run."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA GPU is available")
    return device


def default_cache_dir() -> str:
    """Where frozen-layer item states are kept between processes (POLLEN_CACHE overrides)."""
    return os.environ.get("POLLEN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pollen"))
