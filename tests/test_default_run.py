"""The default command, ``python -m simulations.run``, as a user runs it: no deprecation warning on screen, and
nothing left running afterwards (Ray's processes included)."""

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from common.processes import flower_env

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def test_default_run_prints_no_deprecation_and_leaves_no_process(tiny_bert, tmp_path):
    # the default command with a smaller model and budget: the same code path (simulate -> Flower's engine)
    command = [sys.executable, "-m", "simulations.run", "--num-rounds", "1", "--base-model", tiny_bert,
               "--lora-layers", "1", "--max-steps", "2", "--run-dir", str(tmp_path / "run")]
    log = tmp_path / "output.txt"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=flower_env(), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    seen: dict[int, psutil.Process] = {}  # every process the run started, whatever its session
    deadline = time.monotonic() + 900
    while process.poll() is None:
        assert time.monotonic() < deadline, "the run did not finish"
        try:
            for child in psutil.Process(process.pid).children(recursive=True):
                seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.2)
    text = log.read_text(errors="replace")
    assert process.returncode == 0, text[-3000:]
    assert "finished 1 rounds" in text
    assert seen, "the run started no process: Ray's were expected"
    assert "DEPRECATED" not in text and "deprecated" not in text.lower(), text[-3000:]
    time.sleep(3.0)  # a process may take a moment to go after its parent
    left = [p for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [(p.pid, " ".join(p.cmdline())[:120]) for p in left]
