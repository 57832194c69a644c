"""Writes that never leave a half-written file: write beside the target, then rename over it."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Strict JSON: a NaN or infinity (which json would write as the non-standard NaN / Infinity) becomes null."""
    return write_atomic(path, json.dumps(_finite(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def replace_dir(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build a folder with ``fill(tmp)`` and swap it in, so readers see the old or the new folder, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def resolve_run_dir(run_dir: str, kind: str = "") -> Path:
    """The run folder, created and absolute: ``run_dir``, else a new runs/<kind->time (kind names the driver)."""
    path = Path(run_dir).resolve() if run_dir else _new_default(kind)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _new_default(kind: str) -> Path:
    """runs/<kind->time, never one that exists already (two runs started in the same second get -2, -3...)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = (Path("runs") / (f"{kind}-{stamp}" if kind else stamp)).resolve()
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"{base}: 999 run folders of this second exist already")


LOCK = ".pollen.lock"
_HELD: dict[Path, Any] = {}  # run folders this process holds the lock of (an open file each, kept open)


def claim_run_dir(run_dir: str, kind: str = "", overwrite: bool = False, resume_marker: str | None = None) -> Path:
    """The run folder, created, absolute and locked for this process: never silently reused.

    - no ``run_dir``: a new runs/<kind->time folder;
    - another process writing the folder (holding its lock) -> refused;
    - an existing folder with content: resumed when it holds ``resume_marker`` (a checkpoint); otherwise
      refused, unless ``overwrite`` (then emptied first, the checkpoint too).
    The lock (flock on RUN/.pollen.lock) lasts as long as this process: a crashed run leaves no stale lock.
    """
    from common.errors import FileProblem

    path = Path(run_dir).resolve() if run_dir else _new_default(kind)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise FileProblem(path, "exists and is not a folder; expected a run folder (choose another run-dir)") from None
    if path not in _HELD:
        _lock(path)
    content = sorted(p.name for p in path.iterdir() if p.name != LOCK)
    if content and not (resume_marker and (path / resume_marker).is_file() and not overwrite):
        if not overwrite:
            what = f"no {resume_marker} to resume from" if resume_marker else "it is not resumable"
            raise FileProblem(path, f"the run folder holds earlier results ({', '.join(content[:4])}"
                                    f"{', ...' if len(content) > 4 else ''}) and {what}; choose a new run-dir, "
                                    "or pass --overwrite to replace them")
        for name in content:
            target = path / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    return path


def _lock(path: Path) -> None:
    import fcntl

    from common.errors import FileProblem

    handle = open(path / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise FileProblem(path, f"another run is writing this run folder (process {holder}); wait for it to end "
                                "or choose another run-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _HELD[path] = handle
