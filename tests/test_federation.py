"""A real Flower simulation (Ray backend, three platforms, tiny BERT): what travels, what is aggregated, what is saved.

The ServerApp here is Pollen's own ``run_federation`` with the Grid wrapped so that every reply a client sent
is kept for inspection: that is exactly what left the clients. The ClientApp is Pollen's own, except that the
video platform turns hostile in round 2 and sends a NaN in its adapter: the server must leave it out.
"""

import json

import numpy as np
import pytest
import sys

import cloudpickle
from flwr.app import Array
from flwr.clientapp import ClientApp

from client import app as pollen_client
from common.config import PollenConfig
from common.model.encoder import SHARED, SHARED_FILE
from simulated import simulate


HOSTILE_PLATFORM, HOSTILE_ROUND = "video", 2
client_app = ClientApp()


@client_app.train()
def _train(msg, context):
    reply = pollen_client.train(msg, context)
    if (reply.content["platform"]["platform"] == HOSTILE_PLATFORM
            and msg.content["config"]["server-round"] == HOSTILE_ROUND):
        arrays = reply.content["arrays"]
        key = next(iter(arrays))
        poisoned = arrays[key].numpy().copy()
        poisoned.flat[0] = np.nan
        arrays[key] = Array(poisoned)
    return reply


@client_app.evaluate()
def _evaluate(msg, context):
    return pollen_client.evaluate(msg, context)


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray actors cannot import a test module


@pytest.fixture(scope="module")
def federation(tiny_bert, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    # min-clients 2: round 2 aggregates the two honest updates once the hostile one is rejected
    config = PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 1, "num-rounds": 2, "min-clients": 2,
                                       "batch-size": 64, "run-dir": str(run_dir), "round-timeout": 600.0})
    record, replies, _ = simulate(config, client_app)
    return config, record, replies, run_dir


def test_only_adapter_tensors_and_scalars_leave_clients(federation):
    _, record, replies, _ = federation
    assert replies and not any(r.has_error() for r in replies)
    for reply in replies:
        content = reply.content
        assert set(content.config_records) == {"platform"}
        assert set(content.config_records["platform"]) == {"platform"}
        for metrics in content.metric_records.values():
            assert all(isinstance(v, (int, float)) for v in metrics.values())
        if reply.metadata.message_type.endswith("train"):
            (name, arrays), = content.array_records.items()
            assert name == "arrays"
            # the shared set only: LoRA + text adaptor + sequence encoder; no item table, theta or rating output
            assert all("lora_" in key or key.startswith(("shared.adaptor.", "shared.sequence.")) for key in arrays)
            assert not any("item_emb" in key or "theta" in key or "rating" in key for key in arrays)
            assert sum(len(a.data) for a in arrays.values()) == record.adapter_bytes
        else:
            assert not content.array_records


def test_global_adapter_is_weighted_mean_of_honest_updates(federation):
    """Round 2: the aggregate is the mean of the two honest adapters weighted by training sequences."""
    config, _, replies, run_dir = federation
    from safetensors.torch import load_file

    last_round = [r for r in replies if r.metadata.message_type.endswith("train")][-3:]
    assert sorted(r.content["platform"]["platform"] for r in last_round) == ["ecommerce", "social", "video"]
    last_round = [r for r in last_round if r.content["platform"]["platform"] != HOSTILE_PLATFORM]
    weights = np.array([r.content["metrics"]["num-examples"] for r in last_round], dtype=np.float64)
    assert len(set(weights)) > 1  # platforms differ in size, so the weighting matters
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))  # LoRA, PEFT format
    shared = load_file(str(run_dir / "adapter" / SHARED_FILE))  # the text adaptor and sequence encoder
    for key in last_round[0].content["arrays"]:
        stacked = np.stack([r.content["arrays"][key].numpy() for r in last_round])
        expected = np.tensordot(weights / weights.sum(), stacked, axes=1)
        value = shared[key[len(SHARED):]] if key.startswith(SHARED) else saved[key.replace(".default", "")]
        assert np.allclose(value.numpy(), expected, atol=1e-6), key
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == config.model.lora_rank


def test_run_record_has_every_round_and_platform(federation):
    _, record, _, run_dir = federation
    results = json.loads((run_dir / "results.json").read_text())
    assert results["rounds_completed"] == 2
    assert sorted(results["evaluations"]) == ["0", "1", "2"]
    for per_platform in results["evaluations"].values():
        assert sorted(per_platform) == ["ecommerce", "social", "video"]
    assert set(record.selected()) == {"ecommerce", "social", "video"}
    assert sorted(record.training[HOSTILE_ROUND]) == ["ecommerce", "social"]  # the NaN update was rejected
    assert sorted(record.training[1]) == ["ecommerce", "social", "video"]
    assert (run_dir / "rounds.csv").read_text().count("\n") == 1 + 3 * 3
    assert (run_dir / "ndcg_per_round.png").stat().st_size > 1000


def test_each_platform_exports_its_best_validation_model(federation):
    from client.export import load_model

    _, record, _, run_dir = federation
    for name, chosen in record.selected().items():
        model = load_model(run_dir / "models" / name)
        metrics = json.loads((run_dir / "models" / name / "metrics.json").read_text())
        assert metrics["valid-ndcg@10"] == pytest.approx(chosen["valid-ndcg@10"])
        first_item = model.items(0, 1)[0]["item"]
        assert len(model.recommend([first_item], k=5)) == 5
