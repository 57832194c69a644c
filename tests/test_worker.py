"""A deployed node's warm worker (client/worker.py): a real worker process serves the ClientApp's messages, with
the same result as working in the ClientApp's own process, refuses other code, and the ClientApp then works
itself."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from client import app as client_app
from client import worker as node_worker
from common.adapters import to_record
from common.config import FEDERATION_ID, SERVER_ROUND, PollenConfig
from common.processes import flower_env, stop_process

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def running_worker(tmp_path):
    home = tmp_path / "node"
    process = subprocess.Popen([sys.executable, "-m", "client.worker", "--home", str(home)], cwd=ROOT,
                               env=flower_env(), start_new_session=True)
    deadline = time.monotonic() + 300
    while not (home / node_worker.SOCKET).exists():
        assert process.poll() is None and time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.2)
    yield home
    stop_process(process)


def message(tiny_bert, tmp_path, server_round: int):
    from common.model.encoder import TextEncoder

    config = PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 1, "threads": 1, "max-steps": 2})
    arrays = to_record(TextEncoder(config.model, seed=config.train.seed).adapter_state(), "float32")
    table = ConfigRecord({**config.to_flat(), SERVER_ROUND: server_round, FEDERATION_ID: "test"})
    return table, arrays


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def node_config(home: Path, worker: bool) -> dict:
    config = {"platform": "video", "cache-dir": str(home / "cache"), "state-dir": str(home / "state"), "threads": 1}
    return {**config, "worker": str(home / node_worker.SOCKET)} if worker else config


@pytest.mark.integration
def test_worker_trains_exactly_like_the_clientapp_process(running_worker, tiny_bert, tmp_path):
    table, arrays = message(tiny_bert, tmp_path, server_round=1)
    warm, warm_metrics, name = client_app.run("train", table, arrays, context(node_config(running_worker, True)))
    here, here_metrics, _ = client_app.run("train", table, arrays, context(node_config(tmp_path / "alone", False)))
    assert name == "video" and warm_metrics["worker"] == 1.0 and here_metrics["worker"] == 0.0
    assert list(warm.keys()) == list(here.keys())
    for key in warm:
        np.testing.assert_array_equal(warm[key].numpy(), here[key].numpy())
    assert warm_metrics["train-loss"] == here_metrics["train-loss"]
    # the second message finds the session built: no imports, no build, only the hand-off
    _, again, _ = client_app.run("evaluate", table, warm, context(node_config(running_worker, True)))
    assert again["worker"] == 1.0 and again["start-import-seconds"] < 0.01 and again["start-build-seconds"] < 0.5
    assert (running_worker / "state" / "test").is_dir()  # the private state is on the node's disk, as before


@pytest.mark.integration
def test_worker_refuses_other_code_and_the_clientapp_works_itself(running_worker, tiny_bert, tmp_path, monkeypatch):
    table, arrays = message(tiny_bert, tmp_path, server_round=0)
    with pytest.raises(node_worker.WorkerUnavailable, match="restart the node"):
        node_worker.call(str(running_worker / node_worker.SOCKET), ("evaluate", {}, arrays, {}), digest="0" * 16)
    _, metrics, _ = client_app.run("evaluate", table, arrays,
                                   context({**node_config(running_worker, True),
                                            "worker": str(tmp_path / "nobody" / node_worker.SOCKET)}))
    assert metrics["worker"] == 0.0 and "valid-ndcg@10" in metrics


def test_the_socket_and_key_are_private(running_worker):
    for name in (node_worker.SOCKET, node_worker.KEY):
        assert (running_worker / name).stat().st_mode & 0o077 == 0, name
