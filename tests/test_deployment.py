"""Flower's Deployment Engine on 127.0.0.1: a SuperLink with TLS and SuperNode authentication, three SuperNodes.

Real processes (flower-superlink, flower-supernode, flwr), started by the same launch code an operator and a
partner use, with the tiny BERT and the embedded synthetic data. One deployment (certificates, SuperLink,
three registered nodes) serves every test here; the uninterrupted 2-round run is the reference the resumed run
must reproduce. The dead-node test runs last: it kills and restarts a SuperNode.
"""

import json
import signal
import socket
import ssl
import time

import pytest
import torch
from safetensors.torch import load_file

from common.processes import stop_process
from server.certs import make_partner_key
from simulations.deployment import HOST, LocalDeployment

pytestmark = pytest.mark.integration
PLATFORMS = ["ecommerce", "social", "video"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    with LocalDeployment(tmp_path_factory.mktemp("deploy")) as running:
        yield running


def settings(tiny_bert, run_dir, **extra) -> dict:
    return {"base-model": tiny_bert, "lora-layers": 1, "num-rounds": 2, "round-timeout": 600.0,
            "run-dir": str(run_dir), **extra}


@pytest.fixture(scope="module")
def uninterrupted(deployment, tiny_bert, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    info = deployment.run(settings(tiny_bert, run_dir))
    print(f"\n2 rounds, 3 SuperNodes, TLS + node auth: {info['wall-seconds']:.0f}s wall")
    return info, run_dir


def results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def checkpoint_round(run_dir) -> int:
    state = run_dir / "checkpoint" / "state.json"
    return json.loads(state.read_text())["round"] if state.is_file() else -1


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_two_rounds_over_tls_with_node_auth(deployment, uninterrupted):
    info, run_dir = uninterrupted
    assert info["status"] == "finished:completed", info["log"][-3000:]
    assert (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 8
    record = results(run_dir)
    assert record["rounds_completed"] == 2 and record["failures"] == {}
    for rnd in ("0", "1", "2"):
        assert sorted(record["evaluations"][rnd]) == PLATFORMS
    assert sorted(record["training"]["2"]) == PLATFORMS
    assert "round 2/2  test NDCG@10" in info["log"]  # the ServerApp's own lines reach `flwr log`
    # the coordinator speaks TLS with a certificate our CA signed for this host, and requires node auth
    context = ssl.create_default_context(cafile=str(deployment.certs / "ca.crt"))
    with socket.create_connection((HOST, deployment.port)) as raw, context.wrap_socket(raw, server_hostname=HOST):
        pass
    assert "--enable-supernode-auth" in deployment.link.args
    for node in deployment.nodes.values():  # flower-supernode itself, or the partner's client.launch around it
        assert ("--auth-supernode-private-key" in node.args or "--key" in node.args) and "--insecure" not in node.args


def test_unregistered_node_is_refused(deployment, tmp_path):
    key, _ = make_partner_key(tmp_path, "intruder")  # a valid key pair the operator never registered
    intruder = deployment.start_node("video", key=key, label="intruder")
    try:
        intruder.wait(timeout=300)
    finally:
        stop_process(intruder)
    log = (deployment.workdir / "logs" / "supernode-intruder.log").read_text()
    assert intruder.returncode != 0
    assert "Exit Code: 305" in log and "Failed to activate SuperNode" in log
    deployment.wait_online(len(PLATFORMS))


def test_killed_server_resumes_from_checkpoint(deployment, uninterrupted, tiny_bert, tmp_path):
    _, reference = uninterrupted
    run_dir = tmp_path / "run"
    _, stream, _ = deployment.submit(settings(tiny_bert, run_dir))
    try:
        wait_for(lambda: checkpoint_round(run_dir) >= 1, 900, "the checkpoint of round 1")
        deployment.kill_superlink()  # SuperLink and ServerApp die without warning, during round 2
    finally:
        stop_process(stream)
    assert checkpoint_round(run_dir) == 1
    deployment.start_superlink()
    deployment.wait_online(len(PLATFORMS))  # the SuperNodes reconnect with the same node ids
    info = deployment.run(settings(tiny_bert, run_dir))
    assert info["status"] == "finished:completed", info["log"][-3000:]
    assert "resuming from the checkpoint of round 1" in info["log"]
    assert "round 1/2" not in info["log"] and "round 2/2" in info["log"]  # round 1 is not trained again
    record = results(run_dir)
    assert sorted(record["evaluations"]) == ["0", "1", "2"]  # the record carries over
    resumed = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    expected = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert resumed.keys() == expected.keys()
    for key in expected:  # bit for bit: same seeds, private state from the nodes' disks, fixed averaging order
        assert torch.equal(resumed[key], expected[key]), key
    scores = lambda per: {p: {k: v for k, v in m.items() if k.startswith(("valid-", "test-"))}  # noqa: E731
                          for p, m in per.items()}  # not the timings
    assert scores(record["evaluations"]["2"]) == scores(results(reference)["evaluations"]["2"])


def test_dead_node_is_named_and_the_run_finishes(deployment, tiny_bert, tmp_path):
    run_dir = tmp_path / "run"
    run_id, stream, log_path = deployment.submit(settings(tiny_bert, run_dir, **{"num-rounds": 3, "min-clients": 2}))
    try:
        wait_for(lambda: checkpoint_round(run_dir) >= 1, 900, "the checkpoint of round 1")
        deployment.kill_node("video")  # round 2 has begun: the video partner's machine dies
        wait_for(lambda: "2" in results(run_dir).get("failures", {}), 300, "round 2 to report the dead node")
        deployment.start_node("video")  # the partner comes back while round 2 is evaluated
        info = deployment.wait(run_id, timeout=900)
        time.sleep(1.0)  # the stream's last lines
    finally:
        stop_process(stream, signal.SIGTERM)
    log = log_path.read_text()
    assert info["status"] == "finished:completed", log[-3000:]
    record = results(run_dir)
    assert any("(video) failed" in line for line in record["failures"]["2"]), record["failures"]
    assert "round 2 train: node" in log and "(video) failed" in log
    assert sorted(record["training"]["2"]) == ["ecommerce", "social"]  # aggregated without it
    assert record["rounds_completed"] == 3 and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(record["training"]["3"]) == PLATFORMS  # it rejoined


def test_simulation_computes_the_same_federation(uninterrupted, tiny_bert, tmp_path):
    """One code path: Flower's simulation engine, same settings, ends with the same global adapter and scores."""
    from common.config import PollenConfig
    from simulations.run import simulate

    _, reference = uninterrupted
    simulate(PollenConfig.from_flat(settings(tiny_bert, tmp_path)))
    simulated = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    deployed = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    for key in deployed:
        assert torch.equal(simulated[key], deployed[key]), key
