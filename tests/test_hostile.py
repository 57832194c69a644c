"""Hostile and broken updates, one test per kind: each is rejected (logged with its node id) and the round still
aggregates the honest replies, as their weighted mean. Strategy level, on real Flower Messages and ArrayRecords
(the real simulation with a NaN-sending client is tests/test_federation.py).
"""

import logging
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.metadata import Metadata

from common.adapters import signature
from server.aggregation import robust_mean
from common.config import PrivacyConfig
from server.strategy import AdapterFedAvg

KEYS = {"layer.0.query.lora_A.weight": (4, 8), "layer.0.query.lora_B.weight": (8, 4)}
GLOBAL = {k: torch.zeros(shape) for k, shape in KEYS.items()}


def reply(node: int, arrays: dict, examples: float) -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"i{node}", group_id="1", created_at=time.time(), ttl=600.0,
                        message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: torch.as_tensor(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0}),
                          "platform": ConfigRecord({"platform": f"p{node}"})})
    return Message(content=content, metadata=metadata)


def honest(node: int, scale: float = 1.0) -> dict:
    generator = torch.Generator().manual_seed(node)
    return {k: scale * torch.randn(shape, generator=generator) * 0.01 for k, shape in KEYS.items()}


def aggregate(hostile: Message, privacy: PrivacyConfig | None = None, honest_nodes=(1, 2, 3), left_out=True):
    """Run one round's aggregation over honest replies + the hostile one; return (aggregate, honest replies)."""
    saved = {}
    strategy = AdapterFedAvg(signature(GLOBAL), min_clients=1, privacy=privacy,
                             on_aggregate=lambda rnd, arrays, per: saved.update(arrays=arrays, per=per))
    strategy.sent = ArrayRecord(GLOBAL)  # what configure_train sent this round
    good = [reply(n, honest(n), 100.0 * n) for n in honest_nodes]
    arrays, metrics = strategy.aggregate_train(1, good + [hostile])
    assert arrays is not None and metrics is not None, "the round must still complete"
    kept = [f"p{n}" for n in honest_nodes] + ([] if left_out else [hostile.content["platform"]["platform"]])
    assert sorted(saved["per"]) == sorted(kept)  # a rejected platform is left out
    return arrays, good


def assert_weighted_mean_of(arrays: ArrayRecord, good: list[Message]) -> None:
    weights = np.array([m.content["metrics"]["num-examples"] for m in good])
    for key in KEYS:
        expected = np.tensordot(weights / weights.sum(), np.stack([m.content["arrays"][key].numpy() for m in good]), 1)
        assert np.allclose(arrays[key].numpy(), expected, atol=1e-7), key


def rejected(caplog, node: int, reason: str) -> bool:
    return any(f"rejected the update of node {node}" in r.getMessage() and reason in r.getMessage()
               for r in caplog.records)


@pytest.fixture(autouse=True)
def _log(caplog):
    caplog.set_level(logging.WARNING, logger="flwr")


def test_wrong_keys(caplog):
    bad = honest(9)
    bad["layer.0.head.weight"] = bad.pop("layer.0.query.lora_B.weight")  # smuggles a head tensor, drops B
    arrays, good = aggregate(reply(9, bad, 1000.0))
    assert rejected(caplog, 9, "keys differ")
    assert_weighted_mean_of(arrays, good)


def test_wrong_shape(caplog):
    bad = honest(9)
    bad["layer.0.query.lora_A.weight"] = torch.zeros(4, 9)
    arrays, good = aggregate(reply(9, bad, 1000.0))
    assert rejected(caplog, 9, "expected float32[4, 8], got float32[4, 9]")
    assert_weighted_mean_of(arrays, good)


def test_wrong_dtype(caplog):
    bad = {k: v.double() for k, v in honest(9).items()}
    arrays, good = aggregate(reply(9, bad, 1000.0))
    assert rejected(caplog, 9, "got float64")
    assert_weighted_mean_of(arrays, good)


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "-Inf")])
def test_non_finite(caplog, value, kind):
    bad = honest(9)
    bad["layer.0.query.lora_B.weight"][3, 1] = value
    arrays, good = aggregate(reply(9, bad, 1000.0))
    assert rejected(caplog, 9, "contains NaN or Inf"), kind
    assert_weighted_mean_of(arrays, good)


def test_update_norm_far_above_the_others(caplog):
    """A well-formed update 50x larger than the round's median is left out (update-norm-factor, default 10)."""
    arrays, good = aggregate(reply(9, honest(9, scale=50.0), 1000.0))
    assert rejected(caplog, 9, "update norm")
    assert_weighted_mean_of(arrays, good)


def test_update_norm_above_an_absolute_bound(caplog):
    privacy = PrivacyConfig(update_norm_factor=0.0, max_update_norm=0.2)
    arrays, good = aggregate(reply(9, honest(9, scale=3.0), 1000.0), privacy)
    assert rejected(caplog, 9, "exceeds the bound 0.2")
    assert_weighted_mean_of(arrays, good)


def test_honest_updates_of_different_size_pass_the_norm_bound(caplog):
    other = reply(4, honest(4, scale=3.0), 400.0)
    arrays, good = aggregate(other, honest_nodes=(1, 2, 3, 5), left_out=False)
    assert not any("rejected" in r.getMessage() for r in caplog.records)
    assert_weighted_mean_of(arrays, good + [other])


@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean"])
def test_robust_aggregator_bounds_a_poisoned_update(aggregator):
    """With one well-formed but poisoned update among five, the median / trimmed mean stays near the honest ones."""
    poison = reply(9, {k: torch.full(shape, 0.5) for k, shape in KEYS.items()}, 1000.0)
    privacy = PrivacyConfig(aggregator=aggregator, update_norm_factor=0.0)
    arrays, good = aggregate(poison, privacy, honest_nodes=(1, 2, 3, 4), left_out=False)
    records = [m.content["arrays"] for m in good] + [poison.content["arrays"]]
    expected = robust_mean(records, aggregator, privacy.trim_ratio)
    for key in KEYS:
        honest_max = max(np.abs(m.content["arrays"][key].numpy()).max() for m in good)
        assert np.abs(arrays[key].numpy()).max() <= honest_max + 1e-7
        assert np.allclose(arrays[key].numpy(), expected[key].numpy())
    column = np.stack([r["layer.0.query.lora_A.weight"].numpy()[0, 0] for r in records])
    if aggregator == "median":
        assert arrays["layer.0.query.lora_A.weight"].numpy()[0, 0] == pytest.approx(np.median(column))
    else:  # 5 replies, trim-ratio 0.2: one cut at each end
        assert arrays["layer.0.query.lora_A.weight"].numpy()[0, 0] == pytest.approx(np.sort(column)[1:4].mean())
