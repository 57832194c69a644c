"""A deployed node's warm worker: one long-lived process that does the work of every message for this node.

Flower 1.42 starts a fresh ClientApp process for every message (``flwr-clientapp`` handles one message and
exits; ``flower-supernode --isolation process`` only moves that process out of the SuperNode, and the warm
executor pools are Kubernetes-only and still one task per process). Importing torch, transformers and peft and
building the session cost seconds per message, more than the work itself on small data. So a node started with
``python -m client.launch`` also runs this worker next to its SuperNode; the ClientApp of each message stays
light (flwr + the config) and hands the message to the worker over a Unix socket in the node's home folder,
where the session (model, data, cached item states) stays in memory from one message to the next, exactly as
in a Ray actor of the simulation. The private state still goes to the node's disk after every message
(client/state.py), so a restarted worker continues where the last one left.

Safety: the socket and its key are readable by the node's user only (0600; the key authenticates every
connection), the worker serves one message at a time, and it runs only messages of the same Pollen code as the
FAB the ClientApp came from (a digest of client/ and common/ must match): otherwise the ClientApp does the work
itself, in its own process, and says so in the log. It exits when its parent (client.launch) is gone.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Listener
from pathlib import Path

SOCKET, KEY = "worker.sock", "worker.key"
PACKAGES = ("client", "common")


def code_digest(root: Path | None = None) -> str:
    """Digest of the Pollen code a process runs (client/ and common/ under ``root``, default: this copy)."""
    root = root or Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


class WorkerUnavailable(RuntimeError):
    """The worker cannot take this message (not running, or another code version): work in-process."""


def call(socket_path: str, request: tuple, timeout: float = 5.0, digest: str | None = None) -> tuple:
    """Send (phase, table, arrays, node_config) to the worker; returns its (arrays, metrics, platform).
    ``digest``: the code the message's app runs (default: this copy's)."""
    path = Path(socket_path)
    try:
        key = (path.parent / KEY).read_bytes()
        deadline = time.monotonic() + timeout
        while True:  # the worker serves one message at a time: another message may hold the socket a moment
            try:
                conn = Client(str(path), family="AF_UNIX", authkey=key)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    except (OSError, EOFError) as error:
        raise WorkerUnavailable(f"no worker at {path}: {error!r}") from None
    with conn:
        conn.send((digest or code_digest(), request))
        status, payload = conn.recv()
    if status == "refused":
        raise WorkerUnavailable(payload)
    if status == "error":
        raise RuntimeError(f"the node's worker failed:\n{payload}")
    return payload


def serve(home: Path, log=print) -> None:
    """Listen on home/worker.sock until the parent process is gone."""
    home.mkdir(parents=True, exist_ok=True)
    socket_path, key_path = home / SOCKET, home / KEY
    socket_path.unlink(missing_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
    os.chmod(key_path, 0o600)
    start = time.perf_counter()
    from client.app import work  # the model libraries, once for the life of the worker

    digest = code_digest()
    old_umask = os.umask(0o177)  # the socket file is created 0600
    try:
        listener = Listener(str(socket_path), family="AF_UNIX", authkey=key)
    finally:
        os.umask(old_umask)
    _exit_with_parent()
    log(f"Pollen worker ready on {socket_path} (code {digest}, imports {time.perf_counter() - start:.1f}s)")
    with listener:
        while True:
            try:
                conn = listener.accept()
            except (OSError, EOFError):  # a client that failed authentication
                continue
            with conn:
                try:
                    sent_digest, (phase, table, arrays, node_config) = conn.recv()
                    if sent_digest != digest:
                        conn.send(("refused", f"the worker runs Pollen code {digest}, the message's app {sent_digest}"
                                   "; restart the node (python -m client.launch) to update it"))
                        continue
                    conn.send(("ok", work(phase, table, arrays, node_config)))
                except (OSError, EOFError):
                    pass  # the ClientApp process went away
                except BaseException:  # noqa: BLE001  (reported to the ClientApp, which fails the message)
                    try:
                        conn.send(("error", traceback.format_exc()))
                    except OSError:
                        pass


def _exit_with_parent() -> None:
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__.split("\n")[0],
                                     epilog="Started by python -m client.launch; not meant to be run by hand.")
    parser.add_argument("--home", required=True, help="the node's home folder (the socket and key go there)")
    args = parser.parse_args(argv)
    serve(Path(args.home).resolve(), log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
