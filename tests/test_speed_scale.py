"""Speed and scale pieces: silos of a platform, the float16 wire format, length batches, the FLOP counter."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from common.adapters import cast_record, from_record, problems, record_bytes, signature, to_record
from common.config import ModelConfig, PollenConfig
from common.data.sources import client_names, load_split, simulated_client
from common.model.encoder import TextEncoder, length_batches
from simulations.flops import EncoderShape, encoder_flops, head_step_flops, layer_parts


def test_silos_split_each_platform_users_exactly_once_and_share_the_catalogue():
    config = PollenConfig().replace(**{"clients-per-platform": 3}).data
    whole = load_split(config, "video")
    silos = [load_split(config, "video", silo_index=i) for i in range(3)]
    users = [u for s in silos for u in s.user_ids]
    assert sorted(users) == sorted(whole.user_ids)  # every user in exactly one silo
    assert max(s.num_users for s in silos) - min(s.num_users for s in silos) <= 1
    by_user = dict(zip(whole.user_ids, whole.sequences))
    for s in silos:
        assert s.item_ids == whole.item_ids and s.item_texts == whole.item_texts  # one catalogue
        assert all(np.array_equal(seq, by_user[u]) for u, seq in zip(s.user_ids, s.sequences))
    again = load_split(config, "video", silo_index=1)
    assert again.user_ids == silos[1].user_ids and again.name == "video-silo1"  # deterministic
    assert load_split(config, "video").user_ids == whole.user_ids  # no silo asked: the whole platform
    with pytest.raises(ValueError, match="silo 3 out of range for 3 silos"):
        load_split(config, "video", silo_index=3)


def test_partition_ids_map_to_platform_silos():
    config = PollenConfig().replace(**{"clients-per-platform": 2}).data
    names = client_names(config)
    assert names == ["ecommerce-silo0", "ecommerce-silo1", "social-silo0", "social-silo1",
                     "video-silo0", "video-silo1"]
    assert [simulated_client(config, p) for p in (0, 1, 2, 5)] == [("ecommerce", 0), ("ecommerce", 1),
                                                                     ("social", 0), ("video", 1)]
    with pytest.raises(ValueError, match="partition-id 6 but the run has only 6 clients"):
        simulated_client(config, 6)
    assert client_names(PollenConfig().data) == ["ecommerce", "social", "video"]


def test_float16_adapter_halves_bytes_round_trips_and_is_checked():
    state = {"a.lora_A.weight": torch.randn(8, 384) * 0.05, "a.lora_B.weight": torch.randn(384, 8) * 1e-3}
    wide, narrow = to_record(state), to_record(state, "float16")
    assert sum(a.numpy().nbytes for a in narrow.values()) * 2 == sum(a.numpy().nbytes for a in wide.values())
    assert record_bytes(narrow) < 0.51 * record_bytes(wide)  # plus a fixed 128-byte .npy header per tensor
    back = from_record(narrow)
    for key, value in state.items():
        assert back[key].dtype == torch.float32
        assert torch.equal(back[key], value.half().float())  # exactly the float16 rounding, nothing else
        assert torch.allclose(back[key], value, rtol=1e-3, atol=1e-7)
    assert problems(narrow, signature(state, "float16")) == []
    assert problems(wide, signature(state)) == []
    issues = problems(wide, signature(state, "float16"))  # a float32 reply where float16 is configured
    assert "a.lora_A.weight: expected float16[8, 384], got float32[8, 384]" in issues
    assert problems(narrow, signature(state)) != []
    assert cast_record(narrow, "float32")["a.lora_A.weight"].dtype == "float32"


def test_adapter_dtype_is_validated():
    with pytest.raises(ValueError, match="adapter-dtype must be 'float32' or 'float16'"):
        PollenConfig.from_flat({"adapter-dtype": "bfloat16"})
    with pytest.raises(ValueError, match="clients-per-platform must be >= 1"):
        PollenConfig.from_flat({"clients-per-platform": 0})


def test_length_batches_cover_every_item_once_within_the_token_budget():
    lengths = torch.tensor([5, 30, 1, 17, 17, 2, 9, 30, 0, 12] * 7)
    batches = length_batches(lengths, 64)
    seen = torch.cat(batches)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    assert torch.equal(lengths[seen], torch.sort(lengths, stable=True).values)  # shortest first
    for batch in batches:
        assert len(batch) == 1 or int(lengths[batch].max().clamp(min=1)) * len(batch) <= 64


def test_flop_formula_hand_computed_case():
    # T=3 tokens, H=4, I=8, LoRA rank 2 on 2 maps
    linear, attention, lora = layer_parts(3, 4, 8, 2, 2)
    assert linear == 2 * 3 * (4 * 16 + 2 * 32) == 768
    assert attention == 2 * 2 * 9 * 4 == 144
    assert lora == 2 * 4 * 3 * 4 * 2 == 192
    shape = EncoderShape(hidden=4, intermediate=8, layers=3, lora_layers=1, lora_rank=2, lora_maps=2)
    assert encoder_flops(shape, [3], "bottom") == 2 * (768 + 144)
    assert encoder_flops(shape, [3], "top") == 768 + 144 + 192
    assert encoder_flops(shape, [3], "all", train=True) == 2 * (768 + 144) + 2 * 768 + 3 * (144 + 192)
    # head: catalogue 9 items, text 4 -> d 2, batch 1 x length 3, 1 layer with feed-forward 2, 3 positions
    assert head_step_flops(3, 1, 3, 9, 4, 2, 1, 2) == 3 * (2 * 10 * 4 * 2 + 2 * 3 * (16 + 8) + 4 * 9 * 2
                                                          + 2 * 3 * 2 * 9)


def test_flop_formula_matches_torch_flop_counter(tiny_bert):
    """The encoder's own forward over one unpadded text, counted by torch, equals the formula."""
    encoder = TextEncoder(ModelConfig(base_model=tiny_bert, lora_layers=1))
    shape = EncoderShape.of(encoder)
    assert (shape.hidden, shape.intermediate, shape.layers, shape.lora_rank, shape.lora_maps) == (32, 64, 2, 8, 2)
    states = encoder.item_states(["a tiny catalogue item text"])
    tokens = int(states.lengths[1])
    with FlopCounterMode(display=False) as counter:
        encoder(states, torch.tensor([1]))  # the top (LoRA) layer on the cached bottom states
    assert counter.get_total_flops() == encoder_flops(shape, [tokens], "top")
    bert = encoder.bert
    ids = encoder.tokenizer(["a tiny catalogue item text"], return_tensors="pt")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        bert(**ids)
    assert counter.get_total_flops() == encoder_flops(shape, [tokens], "all")


@pytest.mark.integration
def test_simulation_with_two_silos_per_platform_and_float16_adapters(tiny_bert, tmp_path):
    """A real Flower simulation: 6 clients (2 silos x 3 platforms), float16 on the wire, averaged in float32."""

    from client.app import app as client_app
    from simulated import simulate

    config = PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 1, "num-rounds": 1,
                                       "clients-per-platform": 2, "adapter-dtype": "float16",
                                       "run-dir": str(tmp_path), "round-timeout": 600.0})
    record, replies, _ = simulate(config, client_app, num_supernodes=6)
    names = client_names(config.data)
    assert sorted(record.evaluations[1]) == sorted(names)
    train = [r for r in replies if r.metadata.message_type.endswith("train")]
    assert sorted(r.content["platform"]["platform"] for r in train) == sorted(names)
    for platform in ("ecommerce", "social", "video"):  # the silos' users add up to the platform's
        silo_users = sum(record.evaluations[1][f"{platform}-silo{i}"]["test-users"] for i in range(2))
        assert silo_users == load_split(config.data, platform).num_users
    assert all(a.dtype == "float16" for r in train for a in r.content["arrays"].values())
    assert all(r.content["metrics"]["upload-bytes"] == record_bytes(r.content["arrays"]) == record.adapter_bytes
               for r in train)  # what the server sends (float16 too) is what each client uploads
    weights = np.array([r.content["metrics"]["num-examples"] for r in train])
    saved = TextEncoder.read_adapter(tmp_path / "adapter")  # LoRA (PEFT file) + shared.* (recommendation adapters)
    for key in train[0].content["arrays"]:
        stacked = np.stack([r.content["arrays"][key].numpy().astype(np.float32) for r in train])
        expected = np.tensordot(weights / weights.sum(), stacked, axes=1).astype(np.float16)
        got = saved[key.replace(".default", "")].numpy()
        assert got.dtype == np.float32 and np.array_equal(got, got.astype(np.float16))  # sent as float16
        assert np.allclose(got, expected, rtol=2e-3, atol=1e-7), key


def test_device_check_runs_the_client_session_twice_from_one_start(tiny_bert, tmp_path):
    """simulations.gpu_check on two CPU sessions (no GPU here): same start adapter and head, identical round-0
    scores, and the figures it reports are written."""
    import json

    from simulations.gpu_check import main

    main(["--devices", "cpu,cpu", "--epochs", "1", "--max-steps", "2", "--base-model", tiny_bert, "--lora-layers",
          "1", "--threads", "1", "--run-dir", str(tmp_path), "--cache-dir", str(tmp_path / "cache")])
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["agree"] and result["round-0-score-difference"] == 0.0 and result["round-0-top10-overlap"] == 1.0
    assert [r["device"] for r in result["runs"]] == ["cpu", "cpu"]
    assert all(len(r["epochs"]) == 1 and r["epochs"][0]["seconds"] > 0 for r in result["runs"])


def test_freed_memory_is_kept_in_every_process_unless_the_user_set_glibc_s_own_setting():
    """common.runtime turns glibc's mmap of large blocks off in its own process (mallopt) and, through glibc's
    environment variables, in every child (Ray's workers, the benchmark's seeds); a value the user set stays."""
    import os
    import subprocess
    import sys

    def child_sees(env: dict) -> str:
        code = "import common.runtime, subprocess; print(subprocess.run(['env'], capture_output=True, " \
               "text=True).stdout.count('MALLOC_MMAP_MAX_=0'))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              check=True).stdout.strip()

    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if sys.platform.startswith("linux"):
        assert child_sees(base) == "1"
    assert child_sees({**base, "MALLOC_MMAP_MAX_": "65536"}) == "0"
