"""Starting and stopping Flower's processes the same way everywhere: this venv's binaries, Flower's offline
environment, one process group per process, and stopping means the whole process tree (a SuperLink or SuperNode
and the apps it spawned).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

INSECURE_WARNING = ("WARNING: --insecure: no TLS and no node authentication. Anyone who can reach this port can "
                    "join the federation and read the adapter. Use it only for a trial on one machine.")


def flower_env() -> dict[str, str]:
    """The environment every Flower process gets: this venv's binaries first, offline, no runtime installs."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def flower_binary(name: str) -> str:
    """A Flower command from this Python's environment (the venv), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def start_process(command: list[str], log_file: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``command`` in its own process group (so stopping it also stops the apps it spawned)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=flower_env(), cwd=cwd,
                                start_new_session=True)


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Signal the process group; SIGKILL whatever of the process tree is left after ``grace`` seconds.

    The tree is collected first: Flower's SuperLink and SuperNode start their SuperExec (which starts the apps)
    in a session of its own, out of reach of the group's signal.
    """
    tree = _descendants(process.pid)
    if process.poll() is None:
        _signal_group(process, sig)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(process, signal.SIGKILL)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process listening on {host}:{port} exited with code {process.returncode}")
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
