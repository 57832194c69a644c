"""`python -m server.launch stop-local` stops the local SuperLink a plain `flwr run .` started for this FLWR_HOME
(and its SuperExec), and leaves another FLWR_HOME's alone. The SuperLinks are started by Flower's own code, the
one `flwr run` calls, on free ports."""

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from common.processes import flower_env, free_port
from server.launch import local_superlink_processes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def start_local_superlink(home: Path) -> list[psutil.Process]:
    env = {**flower_env(), "FLWR_HOME": str(home), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    subprocess.run([sys.executable, "-c", "from flwr.cli.local_superlink import _start_local_superlink as s; s()"],
                   env=env, check=True, capture_output=True, timeout=120)
    deadline = time.monotonic() + 60
    while len(found := local_superlink_processes(home)) < 2:  # the SuperLink and its SuperExec
        assert time.monotonic() < deadline, f"local SuperLink of {home}: {found}"
        time.sleep(0.5)
    return found


def test_stop_local_stops_exactly_this_homes_superlink(tmp_path):
    mine, other = start_local_superlink(tmp_path / "mine"), start_local_superlink(tmp_path / "other")
    try:
        assert not {p.pid for p in mine} & {p.pid for p in other}
        result = subprocess.run([sys.executable, "-m", "server.launch", "stop-local", "--flwr-home",
                                 str(tmp_path / "mine")], cwd=ROOT, env=flower_env(), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "stopped" in result.stdout and "flower-superlink" in result.stdout
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in mine)
        assert all(p.is_running() for p in other)
    finally:
        for process in mine + other:
            try:
                process.kill()
            except psutil.Error:
                pass
