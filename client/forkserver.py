"""A node's ClientApp fork server: Flower's per-message ``flwr-clientapp`` process, started in milliseconds.

Flower 1.42 runs every message in a fresh ``flwr-clientapp`` process, and that process spends ~2 s of CPU
importing Flower (grpc, protobuf, cryptography, sqlalchemy) before it asks for its message: with three nodes
on two cores that was ~4 s of every message, more than the work itself. This server imports Flower's
ClientApp runner once; ``python -m client.launch`` puts a tiny ``flwr-clientapp`` (``SHIM``, written into
``<home>/bin`` and put first on the SuperNode's PATH) in front of Flower's. The shim hands its arguments and
its stdin/stdout/stderr to this server over a Unix socket (``<home>/clientapp.sock``, 0600), the server forks a
child that runs Flower's own ``flwr-clientapp`` main with them, and the shim exits with the child's code
(forwarding SIGTERM/SIGINT to it). Flower's code runs unchanged, one message per process as before; only the
imports are shared, copy-on-write. Nothing of the ClientApp itself (``client.app``, from the run's FAB) is
imported before the fork, so each message still runs the FAB's code. If the server is not there, the shim
runs Flower's ``flwr-clientapp`` itself.

The server exits when its parent (``client.launch``) is gone; it is never started with ``--no-worker``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

SOCKET = "clientapp.sock"
SHIM = """#!{python} -IS
# Pollen's flwr-clientapp: asks the node's fork server (client/forkserver.py) to run Flower's flwr-clientapp,
# or runs Flower's own when the server is not there.
import json, os, signal, socket, sys
try:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect({socket!r})
except OSError:
    os.execv({real!r}, [{real!r}] + sys.argv[1:])
socket.send_fds(sock, [json.dumps(sys.argv[1:]).encode()], [0, 1, 2])
for number in (signal.SIGTERM, signal.SIGINT):
    signal.signal(number, lambda signum, frame: sock.send(bytes([signum])))
reply = b""
while True:
    try:
        part = sock.recv(64)
    except InterruptedError:
        continue
    if not part:
        break
    reply += part
sys.exit(int(reply) if reply.strip().lstrip(b"-").isdigit() else 1)
"""


def write_shim(home: Path) -> Path:
    """``<home>/bin/flwr-clientapp``, which the SuperNode then runs for every message; returns the bin folder."""
    folder = home / "bin"
    folder.mkdir(parents=True, exist_ok=True)
    real = Path(sys.executable).parent / "flwr-clientapp"
    shim = folder / "flwr-clientapp"
    temporary = shim.with_suffix(".tmp")
    temporary.write_text(SHIM.format(python=sys.executable, socket=str(home / SOCKET), real=str(real)))
    temporary.chmod(0o700)
    temporary.replace(shim)
    return folder


def serve(home: Path, log=print) -> None:
    """Import Flower's ClientApp runner, then fork one child per shim connection until the parent is gone."""
    start = time.perf_counter()
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp  # the seconds every message used to pay

    path = home / SOCKET
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX)
    old_umask = os.umask(0o177)  # the socket file is created 0600: only the node's user may connect
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(16)
    parent = os.getppid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    log(f"Pollen ClientApp fork server ready on {path} (Flower imports {time.perf_counter() - start:.1f}s)")
    listener.settimeout(1.0)
    while os.getppid() == parent:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        try:
            message, fds, _, _ = socket.recv_fds(conn, 65536, 3)
            argv = json.loads(message)
        except (OSError, ValueError) as error:
            log(f"fork server: refused a malformed request ({error})")
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:  # the child: Flower's flwr-clientapp main with the shim's arguments and stdio
            code = 1
            try:
                listener.close()
                conn.close()
                for target, fd in enumerate(fds):
                    os.dup2(fd, target)
                    os.close(fd)
                sys.argv = ["flwr-clientapp", *argv]
                flwr_clientapp()
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        for fd in fds:
            os.close(fd)
        threading.Thread(target=_attend, args=(conn, pid), daemon=True).start()


def _attend(conn: socket.socket, pid: int) -> None:
    """Forward the shim's signals to the child; when the child exits, send the shim its exit code."""
    reaped = threading.Event()  # after it, the pid may belong to another process: never signal it again

    def forward() -> None:
        while not reaped.is_set():
            try:
                data = conn.recv(1)
            except OSError:
                return
            if reaped.is_set():
                return
            # no data: the shim is gone (Flower killed the process it started), so must its child be
            _kill(pid, data[0] if data else signal.SIGTERM)
            if not data:
                return

    threading.Thread(target=forward, daemon=True).start()
    _, status = os.waitpid(pid, 0)
    reaped.set()
    try:
        conn.sendall(str(os.waitstatus_to_exitcode(status)).encode())
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    conn.close()


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.forkserver", description=__doc__.split("\n")[0],
                                     epilog="Started by python -m client.launch; not meant to be run by hand.")
    parser.add_argument("--home", required=True, help="the node's home folder (the socket goes there)")
    args = parser.parse_args(argv)
    serve(Path(args.home).resolve(), log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
