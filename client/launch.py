"""A partner's side of a deployment: its SuperNode (Flower's flower-supernode), next to its private data.

    python -m client.launch --superlink coordinator.example.org:9092 --ca ca.crt --key video.key \\
        --platform video --data-path /data/video-export

The SuperNode verifies the coordinator with the operator's CA certificate, authenticates with the partner's
private key (its public key must be registered by the operator), and hands the ClientApp its node config:
the platform name, the absolute data path (omit it to use the embedded synthetic platform of that name) and a
home folder (``--home``) where the node keeps what survives between messages and runs: the frozen-layer cache
(``cache``), the private training state per federation and round (``state``) and the best model (``models``).
Next to the SuperNode it runs the node's warm worker (client/worker.py): Flower starts a fresh ClientApp
process per message, and the worker keeps the model libraries and the built session in memory across them, so
a message no longer pays seconds of imports and building (``--no-worker``: Flower's plain way). Ctrl-C or
SIGTERM stops both. ``--insecure`` (no TLS, no authentication) only works against an insecure SuperLink and
says so loudly.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from common import cli
from common.cli import add_debug_flag
from common.config import PollenConfig
from common.errors import ConfigError, FileProblem
from common.processes import INSECURE_WARNING, flower_binary, flower_env


PROJECT = Path(__file__).resolve().parents[1]


def node_config(platform: str, data_path: str | None, home: Path, threads: int = 0, device: str = "",
                worker: bool = False) -> str:
    """The ``--node-config`` string (TOML values; paths absolute: apps run in the SuperNode's folder)."""
    values: dict[str, object] = {"platform": platform}
    if data_path:
        path = Path(data_path).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"--data-path {data_path}: no such folder (it holds interactions.csv and "
                                    "items.csv, see the README)")
        values["data-path"] = str(path)
    home = home.expanduser().resolve()
    values.update({"cache-dir": str(home / "cache"), "state-dir": str(home / "state"),
                   "export-dir": str(home / "models")})
    if threads:
        values["threads"] = threads
    if device:
        values["device"] = device
    if worker:
        values["worker"] = str(home / "worker.sock")
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def supernode_command(superlink: str, platform: str, data_path: str | None, home: Path, ca: Path | None,
                      key: Path | None, port: int = 9094, threads: int = 0, device: str = "",
                      worker: bool = False) -> list[str]:
    """flower-supernode with TLS and authentication (ca and key None: insecure); ``worker``: its messages go to
    the warm worker in ``home`` (``run_node`` starts it)."""
    command = [flower_binary("flower-supernode"), "--superlink", superlink, "--port", str(port),
               "--node-config", node_config(platform, data_path, home, threads, device, worker)]
    if ca is None or key is None:
        return command + ["--insecure"]
    for path, what in ((ca, "CA certificate (from the operator)"), (key, "private key (python -m server.certs)")):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: {what} not found")
    return command + ["--root-certificates", str(ca.resolve()), "--auth-supernode-private-key", str(key.resolve())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.launch", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--superlink", required=True, help="coordinator host:port")
    parser.add_argument("--platform", required=True, help="this partner's platform name, e.g. video")
    parser.add_argument("--data-path", default=None, help="folder with interactions.csv and items.csv")
    parser.add_argument("--ca", default="ca.crt", help="CA certificate from the operator")
    parser.add_argument("--key", default=None, help="this partner's private key (default: <platform>.key)")
    parser.add_argument("--home", default="pollen-node", help="folder for cache, state and models")
    parser.add_argument("--port", type=int, default=9094, help="local port of the SuperNode (one per node on a host)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--device", default="", help="auto, cpu, cuda or cuda:N (default: the run's setting)")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no authentication (trials only)")
    parser.add_argument("--no-worker", action="store_true",
                        help="no warm worker: every message imports and builds the model in its own process")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    # check before work: the settings, the data, the key files, then the SuperLink itself (TLS or not)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.platform):
        raise ConfigError(f"--platform {args.platform!r}: expected letters, digits, '.', '_' or '-' (it names folders)")
    if args.threads < 0 or not 0 < args.port < 65536:
        raise ConfigError(f"--threads must be >= 0 and --port in 1..65535 (got {args.threads}, {args.port})")
    if args.device:
        PollenConfig.from_flat({"device": args.device})
    host, port = _address(args.superlink)
    try:
        command = supernode_command(args.superlink, args.platform, args.data_path, Path(args.home),
                                    None if args.insecure else Path(args.ca),
                                    None if args.insecure else Path(args.key or f"{args.platform}.key"),
                                    args.port, args.threads, args.device, worker=not args.no_worker)
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    if args.data_path:
        from common.preflight import check_platforms

        check_platforms(PollenConfig(), [args.platform], {args.platform: args.data_path}, log=print)
    check_superlink(host, port, None if args.insecure else Path(args.ca), log=functools.partial(print, flush=True))
    if not args.no_worker:
        return run_node(command, Path(args.home).expanduser().resolve())
    print("starting:", " ".join(command), flush=True)
    os.execve(command[0] if os.path.isabs(command[0]) else _which(command[0]), command, flower_env())


def run_node(command: list[str], home: Path, ready_timeout: float = 600.0) -> int:
    """The warm worker, then (once it listens) the SuperNode; both stop together. Returns the SuperNode's code."""
    from client.worker import SOCKET

    socket_path = home / SOCKET
    socket_path.unlink(missing_ok=True)
    print(f"starting the warm worker (python -m client.worker --home {home})", flush=True)
    worker = subprocess.Popen([sys.executable, "-m", "client.worker", "--home", str(home)], env=flower_env(),
                              cwd=PROJECT)
    children = [worker]

    def stop(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        deadline = time.monotonic() + ready_timeout
        while not socket_path.exists():
            if worker.poll() is not None:
                print(f"error: the warm worker exited with code {worker.returncode}; start with --no-worker to run "
                      "without it", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print(f"error: the warm worker is not ready after {ready_timeout:.0f}s", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print("starting:", " ".join(command), flush=True)
        supernode = subprocess.Popen(command, env=flower_env())
        children.append(supernode)
        return supernode.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()


def _address(superlink: str) -> tuple[str, int]:
    host, sep, port = superlink.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--superlink {superlink!r}: expected host:port, e.g. coordinator.example.org:9092")
    return host.strip("[]"), int(port)


def check_superlink(host: str, port: int, ca: Path | None, log=print, notice_seconds: float = 30.0) -> None:
    """Wait until the SuperLink accepts connections (saying so every 30 s), then check it speaks what this node
    will: TLS with a certificate the operator's CA signed, or (``ca`` None, --insecure) plain text. Flower's
    SuperNode itself would retry a mismatch forever without saying why."""
    start = time.monotonic()
    notice = start + notice_seconds
    while True:
        try:
            with socket.create_connection((host, port), timeout=10) as sock:
                tls = _speaks_tls(sock, host)
            break
        except OSError as error:
            if time.monotonic() >= notice:
                log(f"waiting for the SuperLink at {host}:{port} to accept connections "
                    f"({time.monotonic() - start:.0f}s: {error.strerror or error}); Ctrl-C stops")
                notice = time.monotonic() + notice_seconds
            time.sleep(1.0)
    where = f"the SuperLink at {host}:{port}"
    if ca is None and tls:
        raise ConfigError(f"--insecure, but {where} speaks TLS: connect with --ca (the operator's ca.crt) and "
                          "--key (this partner's private key) instead")
    if ca is not None and not tls:
        raise ConfigError(f"{where} does not speak TLS (it was started with --insecure): pass --insecure for a "
                          "trial, or ask the operator for the TLS address")
    if ca is not None:
        context = ssl.create_default_context(cafile=str(ca))
        context.set_alpn_protocols(["h2"])
        try:
            with socket.create_connection((host, port), timeout=10) as sock, \
                    context.wrap_socket(sock, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as error:
            raise FileProblem(ca, f"{where} has a certificate this CA does not verify ({error.verify_message}); "
                                  "ask the operator for the CA certificate of this SuperLink") from None
        except (ssl.SSLError, OSError):
            pass  # anything else is Flower's to report


def _speaks_tls(sock: socket.socket, host: str) -> bool:
    """Whether the server answers a TLS handshake (its certificate is checked separately)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=True):
            return True
    except (ssl.SSLError, OSError):
        return False


def _which(name: str) -> str:
    import shutil

    found = shutil.which(name, path=flower_env()["PATH"])
    if not found:
        raise FileNotFoundError(f"{name} not found: install Pollen (pip install -e .) in this environment")
    return found


if __name__ == "__main__":
    cli.run(main)
