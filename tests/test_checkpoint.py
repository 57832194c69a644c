"""The pieces a resumed run relies on, without processes: the server checkpoint and the node's per-round state."""

import pytest
import torch

from client.state import NodeState
from common.adapters import from_record, to_record
from common.config import PollenConfig
from server.checkpoint import Checkpoint, check_resumable, load_checkpoint, save_checkpoint


def test_checkpoint_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    adapter = {"layer.lora_A.default.weight": torch.randn(8, 32), "layer.lora_B.default.weight": torch.randn(32, 8)}
    record = {"evaluations": {1: {"video": {"valid-ndcg@10": 0.1}}}, "training": {}, "round_seconds": {1: 2.0},
              "failures": {1: ["round 1 train: node 7 (video) failed: gone"]}}
    save_checkpoint(tmp_path, Checkpoint(1, to_record(adapter), "abc123", {"momentum": torch.ones(3)}, record,
                                         PollenConfig().to_flat(), {7: "video"}))
    saved = load_checkpoint(tmp_path)
    assert saved.round == 1 and saved.federation_id == "abc123" and saved.nodes == {7: "video"}
    for key, value in from_record(saved.arrays).items():
        assert torch.equal(value, adapter[key])
    assert torch.equal(saved.strategy["momentum"], torch.ones(3))
    assert saved.record["failures"] == {"1": record["failures"][1]}  # JSON keys; RunRecord.restore turns them back
    assert load_checkpoint(tmp_path / "elsewhere") is None


def test_resume_refuses_other_settings_but_allows_more_rounds(tmp_path):
    saved = PollenConfig().to_flat()
    check_resumable(saved, PollenConfig().replace(**{"num-rounds": 9, "min-clients": 2}).to_flat(), tmp_path)
    with pytest.raises(ValueError, match=r"lora-rank: 8 -> 4.*choose a new run-dir"):
        check_resumable(saved, PollenConfig().replace(**{"lora-rank": 4}).to_flat(), tmp_path)


def test_node_state_starts_each_round_from_the_previous_one(tmp_path):
    config = PollenConfig()
    state = NodeState.open(tmp_path, "fed1", "video", config)
    assert state.load(up_to=5) is None  # a node that never trained starts fresh
    for rnd in range(4):
        state.save(rnd, f"after round {rnd}".encode())
    assert state.rounds() == [2, 3]  # the two newest are kept
    assert state.load(up_to=2) == b"after round 2"  # training round 3 (repeated after a restart) starts here
    assert state.load(up_to=3) == b"after round 3"
    # another federation, or other training settings, never see this state
    assert NodeState.open(tmp_path, "fed2", "video", config).load(up_to=9) is None
    other = NodeState.open(tmp_path, "fed1", "video", config.replace(**{"lr": 0.1}))
    assert other.load(up_to=9) is None
    assert NodeState.open(tmp_path, "fed1", "video", config.replace(**{"num-rounds": 50})).load(up_to=9)
    with pytest.raises(ValueError, match="federation id"):
        NodeState.open(tmp_path, "../escape", "video", config)
