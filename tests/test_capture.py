"""Adapter-only, proved: every message Pollen's real ClientApp sends during a real Flower simulation is captured
(by a Flower client mod around each handler, recording the reply as it leaves the ClientApp) and checked: a
training reply holds exactly the peft adapter's tensors (names, shapes, dtypes, byte count) plus scalar metrics
and the platform's name; an evaluation reply only scalar metrics and the name. No head weights, item or user
ids, embeddings or text. Runs with user-level DP on, so the epsilon each client reports per round is checked too.
"""

import pickle
import sys
import uuid
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
from flwr.clientapp import ClientApp

from client import app as pollen_client
from common.adapters import signature
from common.config import PollenConfig
from common.data.sources import load_split, platform_names
from common.model.encoder import TextEncoder
from simulated import simulate

pytestmark = pytest.mark.integration


def capture(msg, context, call_next):
    """Flower client mod: record the reply exactly as the ClientApp hands it to Flower."""
    reply = call_next(msg, context)
    folder = Path(str(msg.content["config"]["run-dir"])) / "captured"
    folder.mkdir(exist_ok=True)
    entry = {"type": msg.metadata.message_type, "round": int(msg.content["config"].get("server-round", 0)),
             "content": reply.content}
    (folder / f"{uuid.uuid4().hex}.pkl").write_bytes(pickle.dumps(entry))
    return reply


client_app = ClientApp()


@client_app.train(mods=[capture])
def _train(msg, context):
    return pollen_client.train(msg, context)


@client_app.evaluate(mods=[capture])
def _evaluate(msg, context):
    return pollen_client.evaluate(msg, context)


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray actors cannot import a test module


@pytest.fixture(scope="module")
def captured(tiny_bert, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("capture")
    config = PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 1, "num-rounds": 2,
                                       "run-dir": str(run_dir), "round-timeout": 600.0, "dp-noise": 1.0})
    record, _, log = simulate(config, client_app)
    seen = {"record": record, "log": log}
    entries = [pickle.loads(p.read_bytes()) for p in sorted((run_dir / "captured").glob("*.pkl"))]
    return config, seen, entries


def test_every_reply_holds_exactly_the_adapter_and_scalars(captured):
    config, _, entries = captured
    adapter = TextEncoder(config.model, seed=config.train.seed).adapter_state()  # the peft adapter
    expected = signature(adapter)
    adapter_bytes = sum(v.numel() * v.element_size() for v in adapter.values())
    names = set(platform_names(config.data))
    assert sorted(e["type"] for e in entries) == ["evaluate"] * 9 + ["train"] * 6  # rounds 0-2, 1-2, 3 nodes
    for entry in entries:
        content = entry["content"]
        # the only text that leaves a platform is its name
        assert set(content.config_records) == {"platform"}
        assert dict(content.config_records["platform"]).keys() == {"platform"}
        assert content.config_records["platform"]["platform"] in names
        (metric_name, metrics), = content.metric_records.items()
        assert metric_name == "metrics"
        assert all(type(v) in (int, float) for v in metrics.values())  # scalars, no lists
        if entry["type"] == "train":
            assert set(content) == {"arrays", "metrics", "platform"}
            (array_name, arrays), = content.array_records.items()
            assert array_name == "arrays"
            assert {k: (tuple(a.shape), a.dtype) for k, a in arrays.items()} == expected
            assert sum(np.prod(a.shape) * 4 for a in arrays.values()) == adapter_bytes
            assert sum(len(a.data) for a in arrays.values()) < adapter_bytes + 200 * len(arrays)  # npy headers only
            assert metrics["num-examples"] > 0 and metrics["dp-epsilon"] > 0
        else:
            assert set(content) == {"metrics", "platform"} and not content.array_records


def test_no_catalogue_or_user_sized_tensor_leaves(captured):
    """The shared set (LoRA + text adaptor + sequence encoder) has shapes set by the config alone: every
    platform sends the same shapes, and no dimension is a catalogue's or a user count of any platform."""
    config, _, entries = captured
    sizes = set()
    for name in platform_names(config.data):
        split = load_split(config.data, name)
        sizes |= {split.num_items, split.num_items + 1, split.num_users}
    shapes = {}
    for entry in (e for e in entries if e["type"] == "train"):
        arrays = entry["content"].array_records["arrays"]
        shapes.setdefault(entry["content"]["platform"]["platform"], {k: tuple(a.shape) for k, a in arrays.items()})
    assert len({tuple(sorted(s.items())) for s in shapes.values()}) == 1  # one shape set for every platform
    leaving = next(iter(shapes.values()))
    assert any(k.startswith("shared.sequence.") for k in leaving) and any(k.startswith("shared.adaptor.")
                                                                          for k in leaving)
    assert not any(k.startswith("shared.") and "item_emb" in k for k in leaving)
    assert not {dim for shape in leaving.values() for dim in shape} & sizes


def test_epsilon_is_reported_every_round_and_grows(captured):
    _, seen, entries = captured
    per_platform = {}
    for entry in sorted((e for e in entries if e["type"] == "train"), key=lambda e: e["round"]):
        per_platform.setdefault(entry["content"]["platform"]["platform"], []).append(
            entry["content"]["metrics"]["dp-epsilon"])
    assert all(len(eps) == 2 and 0 < eps[0] < eps[1] for eps in per_platform.values())
    lines = [line for line in seen["log"] if line.startswith("round ") and "epsilon:" in line]
    assert len(lines) == 2  # the server prints every platform's epsilon after each round
    record = seen["record"]
    for rnd in (1, 2):
        assert {n: m["dp-epsilon"] for n, m in record.training[rnd].items()} == \
            {n: eps[rnd - 1] for n, eps in per_platform.items()}
