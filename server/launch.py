"""The coordinator's side of a deployment, wrapping Flower's own commands (flower-superlink, flwr).

    # operator, on the coordinator host: SuperLink with TLS + node authentication, partners' keys registered
    python -m server.launch superlink --certs certs --partner-keys certs/partners --port 9092

    # data scientist (and the operator's own machine): a named connection in $FLWR_HOME/config.toml
    python -m server.launch connect --address coordinator.example.org:9092 --ca certs/ca.crt

    # data scientist: submit the federation, follow its log, exit 1 unless it finished without error
    python -m server.launch run --run-config 'num-rounds=10 run-dir="/srv/pollen/runs/first"'

    # anyone who used plain `flwr run .` (local simulation): stop the local SuperLink it left running, and only it
    python -m server.launch stop-local

A run started on a run-dir that holds a checkpoint resumes after its last finished round (server/app.py).
``--insecure`` (no TLS, no node authentication) exists for a quick local trial and says so loudly.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import cli
from common.config import PollenConfig
from common.errors import ConfigError, one_line
from common.preflight import check_settings
from common.processes import INSECURE_WARNING, flower_binary, flower_env, wait_for_port

LOCAL_SUPERLINK_LOG = ("local-superlink", "superlink.log")  # where `flwr run` tells its local SuperLink to log

CONNECTION = "pollen"
FINISHED = "finished"


# -- the SuperLink ---------------------------------------------------------------------------------------
def superlink_command(host: str, port: int, certs: Path | None, database: Path) -> list[str]:
    """flower-superlink with TLS and SuperNode authentication (certs = None: insecure, no authentication)."""
    database.parent.mkdir(parents=True, exist_ok=True)
    command = [flower_binary("flower-superlink"), "--host", host, "--port", str(port),
               "--database", str(database), "--disable-runtime-dependency-installation"]
    if certs is None:
        return command + ["--insecure"]
    for name in ("ca.crt", "server.crt", "server.key"):
        if not (certs / name).is_file():
            raise FileNotFoundError(f"{certs / name} not found: make it with python -m server.certs --out {certs} "
                                    "--host <coordinator host>")
    return command + ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.crt"),
                      "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth"]


# -- the flwr CLI --------------------------------------------------------------------------------------
def flwr(*args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
    result = subprocess.run([flower_binary("flwr"), *args], capture_output=True, text=True, env=flower_env(),
                            timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"flwr {' '.join(args)} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def _json(result: subprocess.CompletedProcess) -> dict:
    text = result.stdout
    return json.loads(text[text.index("{"):])


def write_connection(name: str, address: str, ca: Path | None) -> Path:
    """``[superlink.NAME]`` in $FLWR_HOME/config.toml, written with Flower's own config code."""
    from flwr.cli.flower_config import write_superlink_connection
    from flwr.cli.typing import SuperLinkConnection
    from flwr.supercore.utils import get_flwr_home

    if ca is not None and not ca.is_file():
        raise FileNotFoundError(f"CA certificate {ca} not found (the operator gives you ca.crt)")
    write_superlink_connection(SuperLinkConnection(
        name=name, address=address, root_certificates=str(ca.resolve()) if ca else None,
        insecure=True if ca is None else None))
    return get_flwr_home() / "config.toml"


def register(public_key: Path, connection: str) -> str:
    """Register a partner's public key; returns the node id ("registered before" for a known key, which keeps
    its id: the SuperLink's --database remembers it)."""
    result = flwr("supernode", "register", str(public_key), connection, "--format", "json", check=False)
    if "already in use" in result.stdout + result.stderr:
        return "registered before"
    payload = _json(result) if "{" in result.stdout else {}
    if not payload.get("success"):
        raise RuntimeError(f"could not register {public_key}:\n{result.stdout}{result.stderr}")
    return str(payload["node-id"])


def node_statuses(connection: str) -> list[str]:
    return [n["status"] for n in _json(flwr("supernode", "ls", connection, "--format", "json"))["nodes"]]


def submit_run(app: Path, connection: str, run_config: str = "") -> int:
    args = ["run", str(app), connection, "--format", "json"] + (["--run-config", run_config] if run_config else [])
    payload = _json(flwr(*args))
    if not payload.get("success"):
        raise RuntimeError(f"flwr run was refused: {payload}")
    return int(payload["run-id"])


def run_info(connection: str, run_id: int) -> dict:
    return _json(flwr("ls", connection, "--run-id", str(run_id), "--format", "json"))["runs"][0]


def wait_run(connection: str, run_id: int, timeout: float, poll: float = 3.0) -> dict:
    """Poll until the run is finished (``flwr run`` itself exits 0 even when the ServerApp failed). A poll that
    fails (the SuperLink too busy to answer in time, or restarting) is retried until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = run_info(connection, run_id)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            info = {"status": f"unknown ({str(error).splitlines()[0]})"}
        if info["status"].startswith(FINISHED):
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still {info['status']} after {timeout:.0f}s")
        time.sleep(poll)


# -- the local SuperLink of `flwr run .` ----------------------------------------------------------------
def local_superlink_processes(flwr_home: Path) -> list:
    """The processes a plain ``flwr run .`` left running for this ``flwr_home``: the local SuperLink it starts
    detached (recognised by its ``--log-file FLWR_HOME/local-superlink/superlink.log``, owned by this user), its
    process tree, and any SuperExec that names it as ``--parent-pid``. Nobody else's processes."""
    import os

    import psutil

    log_file = str(flwr_home.joinpath(*LOCAL_SUPERLINK_LOG).resolve())
    found: dict[int, psutil.Process] = {}
    everything = list(psutil.process_iter(["cmdline", "uids"]))
    for process in everything:
        command = process.info["cmdline"] or []
        if (process.info["uids"] and process.info["uids"].real == os.getuid()
                and any(Path(part).name == "flower-superlink" for part in command[:2])
                and _option(command, "--log-file") == log_file):
            found[process.pid] = process
            for child in _children(process):
                found.setdefault(child.pid, child)
    links = {str(pid) for pid in found}
    for process in everything:  # a SuperExec whose SuperLink died is no child any more, but still names it
        if _option(process.info["cmdline"] or [], "--parent-pid") in links:
            found.setdefault(process.pid, process)
    return list(found.values())


def stop_local_superlink(flwr_home: Path, grace: float = 10.0, dry_run: bool = False) -> list[str]:
    """Stop what ``local_superlink_processes`` finds (SIGTERM, SIGKILL after ``grace`` s); returns what it saw."""
    import psutil

    processes = local_superlink_processes(flwr_home)
    seen = [f"{p.pid} {' '.join(_cmdline(p))[:160]}" for p in processes]
    if dry_run or not processes:
        return seen
    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    return seen


def _option(command: list[str], name: str) -> str | None:
    for i, part in enumerate(command):
        if part == name and i + 1 < len(command):
            return command[i + 1]
        if part.startswith(name + "="):
            return part[len(name) + 1:]
    return None


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _children(process) -> list:
    import psutil

    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


# -- command line --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "insecure", False):
        print(INSECURE_WARNING, file=sys.stderr)
    try:
        return {"superlink": _superlink, "connect": _connect, "run": _run,
                "stop-local": _stop_local}[args.command](args)
    except FileNotFoundError as error:  # certificates, keys, the CA: the user's files
        raise ConfigError(one_line(error)) from None


def _superlink(args: argparse.Namespace) -> int:
    certs = None if args.insecure else Path(args.certs).resolve()
    command = superlink_command(args.host, args.port, certs, Path(args.database).resolve())
    print("starting:", " ".join(command), flush=True)
    process = subprocess.Popen(command, env=flower_env())  # in the foreground: its log is this terminal
    try:
        wait_for_port("127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host, args.port, 60, process)
        dial = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        write_connection(args.connection, f"{dial}:{args.port}", None if certs is None else certs / "ca.crt")
        keys = sorted(Path(args.partner_keys).glob("*.pub")) if args.partner_keys else []
        if certs is not None and not keys:
            print(f"note: no *.pub in {args.partner_keys!r}: no SuperNode can join until you register one with "
                  f"flwr supernode register KEY.pub {args.connection}", flush=True)
        for key in keys if certs is not None else []:
            print(f"registered {key.name}: node {register(key, args.connection)}", flush=True)
        print(f"SuperLink ready on {args.host}:{args.port} (connection '{args.connection}' in $FLWR_HOME/config.toml)"
              "; Ctrl-C stops it", flush=True)
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(30)


def _connect(args: argparse.Namespace) -> int:
    path = write_connection(args.name, args.address, None if args.insecure else Path(args.ca))
    print(f"connection '{args.name}' -> {args.address} written to {path}")
    return 0


def check_run_config(app: Path, run_config: str) -> PollenConfig:
    """The settings the ServerApp will get (the app's [tool.flwr.app.config] with --run-config over it), checked
    here before anything is submitted: a mistake is one line now, not a failed run on the SuperLink later."""
    import click
    from flwr.common.config import flatten_dict, get_project_config, parse_config_args

    try:
        project = get_project_config(app)
        overrides = parse_config_args([run_config]) if run_config else {}
    except (OSError, ValueError, click.ClickException) as error:
        raise ConfigError(f"--app {app} / --run-config: {one_line(error)}") from None
    defaults = flatten_dict(project.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))
    config = PollenConfig.from_flat({**defaults, **overrides})
    check_settings(config, federation=True)
    if config.federation.run_dir and not Path(config.federation.run_dir).is_absolute():
        raise ConfigError(f"--run-config run-dir {config.federation.run_dir!r}: expected an absolute path (the "
                          "ServerApp runs in the SuperLink's folder)")
    return config


def _run(args: argparse.Namespace) -> int:
    check_run_config(Path(args.app).resolve(), args.run_config)
    run_id = submit_run(Path(args.app).resolve(), args.connection, args.run_config)
    print(f"run {run_id} submitted to '{args.connection}'; following its log", flush=True)
    log = subprocess.Popen([flower_binary("flwr"), "log", str(run_id), args.connection, "--stream"],
                           env=flower_env())
    try:
        info = wait_run(args.connection, run_id, args.timeout)
    finally:
        time.sleep(2)  # let the stream print the last lines
        log.terminate()
        log.wait()
    print(f"run {run_id}: {info['status']} after {info['elapsed']}", flush=True)
    return 0 if info["status"] == "finished:completed" else 1


def _stop_local(args: argparse.Namespace) -> int:
    from flwr.supercore.utils import get_flwr_home

    home = Path(args.flwr_home).expanduser() if args.flwr_home else get_flwr_home()
    seen = stop_local_superlink(home, dry_run=args.dry_run)
    if not seen:
        print(f"no local SuperLink of {home} is running")
    for line in seen:
        print(("would stop " if args.dry_run else "stopped ") + line)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server.launch", description=__doc__.split("\n")[0],
                                     epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=cli.DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    link = commands.add_parser("superlink", help="operator: run the SuperLink (TLS + node authentication)")
    link.add_argument("--certs", default="certs", help="folder with ca.crt, server.crt, server.key (server.certs)")
    link.add_argument("--partner-keys", default="certs/partners", help="folder of partners' *.pub keys to register")
    link.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    link.add_argument("--port", type=int, default=9092, help="Fleet API port the partners' nodes dial (default 9092)")
    link.add_argument("--database", default="superlink/state.db",
                      help="SuperLink state (registered nodes, runs); keep it so nodes keep their ids on restart")
    link.add_argument("--connection", default=CONNECTION, help="name of the connection written for this machine")
    link.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (trials only)")
    connect = commands.add_parser("connect", help="data scientist: save the connection to the SuperLink")
    connect.add_argument("--address", required=True, help="coordinator host:port")
    connect.add_argument("--ca", default="certs/ca.crt", help="the CA certificate the operator gave you")
    connect.add_argument("--name", default=CONNECTION, help=f"name to save the connection under (default {CONNECTION})")
    connect.add_argument("--insecure", action="store_true", help="no TLS (only against an --insecure SuperLink)")
    run = commands.add_parser("run", help="data scientist: start the federation and wait for its end")
    run.add_argument("--connection", default=CONNECTION, help=f"the saved connection to run on (default {CONNECTION})")
    run.add_argument("--app", default=".", help="the Pollen project folder (default: the current one)")
    run.add_argument("--run-config", default="", help="settings, e.g. 'num-rounds=10 run-dir=\"/abs/run\"'")
    run.add_argument("--timeout", type=float, default=24 * 3600, help="give up waiting after this many seconds")
    stop = commands.add_parser("stop-local", help="stop the local SuperLink a plain `flwr run .` left running "
                                                  "(this user's, this FLWR_HOME's; nothing else)")
    stop.add_argument("--flwr-home", default="", help="the FLWR_HOME `flwr run` used (default: $FLWR_HOME or ~/.flwr)")
    stop.add_argument("--dry-run", action="store_true", help="only list the processes it would stop")
    return parser


if __name__ == "__main__":
    cli.run(main)
