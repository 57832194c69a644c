"""Writes that never leave a half-written file: write beside the target, then rename over it."""

from __future__ import annotations

import json
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
    return write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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
    """The run folder, created and absolute: ``run_dir``, else runs/<kind->time (kind names the driver)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(run_dir) if run_dir else Path("runs") / (f"{kind}-{stamp}" if kind else stamp)
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
