"""Process settings every entry point makes the same way: threads, device, offline mode."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
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
# Ray starts its workers (the simulated clients) at niceness 15: beside any other busy process (another seed of
# the benchmark) a federation then crawls (a round of 274 s instead of ~22 s). Clients are the work here.
os.environ.setdefault("RAY_worker_niceness", "0")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)


def keep_freed_memory() -> None:
    """Keep freed memory in the process instead of handing it back to the kernel at every step (Linux, glibc).

    glibc serves each block over 32 MB with its own mmap and unmaps it when freed; the kernel then zero-fills every
    page again at the next touch. A training step over a large catalogue makes and frees several such blocks (the
    logits over every item, their softmax and gradients): on Last.fm (11,853 items) a third of a step was page
    faults. With mmap off and no trimming the heap is reused: a Last.fm step 0.87 -> 0.56 s, MovieLens-100K
    0.23 -> 0.18 s (one thread, median of 23); peak memory of that Last.fm run 1.3 -> 1.9 GB, kept until the
    process ends. Child processes (Ray's client workers, the benchmark's seeds) get the same through glibc's
    environment variables; a user who sets MALLOC_MMAP_MAX_ keeps theirs."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_MAX_" in os.environ:
        return
    os.environ["MALLOC_MMAP_MAX_"] = "0"
    os.environ["MALLOC_TRIM_THRESHOLD_"] = str(2**31 - 1)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its allocator, its defaults
        pass


keep_freed_memory()


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


def logits_dtype(setting: str, device: str = "auto") -> "torch.dtype":
    """The ``logits-dtype`` setting as a torch dtype. 'auto': bfloat16 where its matrix products run natively (a
    CUDA GPU that has them; a CPU with AVX512-BF16 or AMX, read from Linux's /proc/cpuinfo), float32 elsewhere,
    where bfloat16 is emulated and slower than float32."""
    import torch

    if setting != "auto":
        return getattr(torch, setting)
    if resolve_device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if native_bfloat16_cpu() else torch.float32


@functools.cache
def native_bfloat16_cpu() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX); read once a process."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def default_cache_dir() -> str:
    """Where frozen-layer item states are kept between processes (POLLEN_CACHE overrides)."""
    return os.environ.get("POLLEN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pollen"))
