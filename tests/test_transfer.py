"""A new platform adopts a federated adapter: the adapt command end to end, the transfer runner's outputs, and the
evaluator's tie convention used to compare with Recformer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from common.errors import FileProblem
import torch
from safetensors.torch import load_file

from client.adapt import main as adapt_main
from client.adapt import read_adapter, user_subset
from client.export import load_model
from common.adapters import mix_state
from common.config import NEWCOMER, PollenConfig
from common.data.split import leave_one_out
from common.data.synthetic import SyntheticConfig, generate
from common.evaluate import rank_metrics, target_ranks
from common.model.encoder import TextEncoder
from simulations import transfer


@pytest.fixture(scope="module")
def platform_folder(tmp_path_factory):
    """The synthetic e-commerce platform written in the generic partner format (a folder passed by path)."""
    data = generate(SyntheticConfig())[0]
    folder = tmp_path_factory.mktemp("newshop") / "newshop"
    folder.mkdir()
    data.interactions[["user", "item", "timestamp"]].to_csv(folder / "interactions.csv", index=False)
    data.items.to_csv(folder / "items.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def adapter_folder(tiny_bert, tmp_path_factory):
    """A PEFT adapter as the federation saves it, with non-zero lora_B so it differs from a fresh one."""
    config = PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 1})
    encoder = TextEncoder(config.model, seed=7)
    state = encoder.adapter_state()
    encoder.load_adapter_state({k: v + 0.05 * torch.randn_like(v) for k, v in state.items()})
    folder = tmp_path_factory.mktemp("run") / "adapter"
    encoder.save_adapter(folder)
    return folder


# -- the tie convention ---------------------------------------------------------------------------------
def test_tie_conventions_against_hand_computed_ranks():
    # items 1..5; target item 1 scores 0.5 and ties with items 3 and 5; item 2 scores higher; history = [2]
    scores = torch.tensor([[9.0, 0.5, 0.9, 0.5, 0.1, 0.5]])
    target, history = torch.tensor([1]), [np.array([2])]
    assert target_ranks(scores, target, history, mask_history=True, ties="against").item() == 2
    assert target_ranks(scores, target, history, mask_history=True, ties="favour").item() == 0
    assert target_ranks(scores, target, history, mask_history=False, ties="against").item() == 3
    assert target_ranks(scores, target, history, mask_history=False, ties="favour").item() == 1
    assert rank_metrics(np.array([1]))["ndcg@10"] == pytest.approx(1 / np.log2(3))
    with pytest.raises(ValueError, match="ties must be one of"):
        target_ranks(scores, target, history, ties="random")


def test_user_subsets_are_nested_and_keep_the_catalogue():
    split = leave_one_out(generate(SyntheticConfig())[0])
    small, large = user_subset(split, 0.1, seed=3), user_subset(split, 0.5, seed=3)
    assert small.num_users == 30 and large.num_users == 150 and set(small.user_ids) <= set(large.user_ids)
    assert small.item_ids == split.item_ids and user_subset(split, 1.0, seed=3) is split
    with pytest.raises(ValueError, match="fraction"):
        user_subset(split, 0.0, seed=3)


# -- the adapt command ------------------------------------------------------------------------------------
def test_adapt_command_starts_from_the_adapter_and_exports_a_servable_model(tiny_bert, platform_folder,
                                                                            adapter_folder, tmp_path, capsys):
    export = tmp_path / "model"
    # lora-lr 0 leaves the adapter exactly where it started, so the export shows which adapter was loaded
    assert adapt_main(["--adapter", str(adapter_folder), "--data-path", str(platform_folder), "--export-dir",
                       str(export), "--fraction", "0.5", "--epochs", "2", "--base-model", tiny_bert,
                       "--lora-layers", "1", "--lora-lr", "0", "--threads", "1", "--cache-dir", ""]) == 0
    metrics = json.loads((export / "metrics.json").read_text())
    own = TextEncoder(PollenConfig().replace(**{**NEWCOMER, "base-model": tiny_bert, "lora-layers": 1}).model,
                      seed=42).adapter_state()  # the pretrained start: the newcomer's seeded fresh adapters
    start = mix_state(own, read_adapter(adapter_folder), metrics["global-share"])
    given = {k: v for k, v in start.items() if "lora_" in k}  # the shared head trains on
    exported = load_file(export / "adapter" / "adapter_model.safetensors")
    assert set(exported) == set(given) and all(torch.allclose(exported[k], given[k]) for k in given)
    assert metrics["train-users"] == 150 and metrics["test"]["users"] == 300 and 1 <= metrics["best-epoch"] <= 2
    model = load_model(export)
    top = model.recommend([model.items(0, 1)[0]["item"]], k=5)
    assert len(top) == 5 and top[0]["score"] >= top[-1]["score"]
    assert "exported to" in capsys.readouterr().out


def test_adapt_command_takes_an_adapter_without_lora(tiny_bert, platform_folder, tmp_path):
    """With the default frozen encoder (lora-layers 0) the federation's adapter folder holds only the
    recommendation adapters; the preflight used to demand peft's file and refused it."""
    config = PollenConfig().replace(**{"base-model": tiny_bert})
    encoder = TextEncoder(config.model, seed=7)
    shared = {k: v + 0.05 for k, v in encoder.adapter_state().items()}
    encoder.load_adapter_state(shared)
    encoder.save_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["recommendation_adapter.safetensors"]
    assert adapt_main(["--adapter", str(tmp_path / "adapter"), "--data-path", str(platform_folder), "--export-dir",
                       str(tmp_path / "model"), "--fraction", "0.2", "--epochs", "1", "--base-model", tiny_bert,
                       "--lr", "1e-12", "--threads", "1", "--cache-dir", ""]) == 0
    head = load_file(tmp_path / "model" / "head.safetensors")  # the shared parts are in the exported head
    share = json.loads((tmp_path / "model" / "metrics.json").read_text())["global-share"]
    start = mix_state(TextEncoder(config.replace(**NEWCOMER).model, seed=42).adapter_state(), shared, share)
    assert all(torch.allclose(head[k], start[k], atol=1e-6) for k in shared)  # started from the given adapter


def test_adapt_command_rejects_a_missing_adapter(platform_folder, tmp_path):
    with pytest.raises(FileProblem, match="adapter_model.safetensors"):
        adapt_main(["--adapter", str(tmp_path), "--data-path", str(platform_folder), "--export-dir",
                    str(tmp_path / "m")])


# -- the transfer runner ----------------------------------------------------------------------------------
@pytest.mark.integration
def test_transfer_runner_writes_table_curve_and_time_to_quality(tiny_bert, platform_folder, adapter_folder,
                                                                tmp_path):
    run_dir = tmp_path / "transfer"
    assert transfer.main(["--target", str(platform_folder), "--adapter", str(adapter_folder), "--fractions",
                          "50,100", "--epochs", "2", "--base-model", tiny_bert, "--lora-layers", "1",
                          "--threads", "1", "--run-dir", str(run_dir), "--cache-dir", ""]) == 0
    results = json.loads((run_dir / "transfer.json").read_text())
    assert [(r["start"], r["fraction"]) for r in results["runs"]] == [
        (s, f) for f in (1.0, 0.5) for s in ("federated", "pretrained", "sasrec-id")]
    for r in results["runs"]:
        assert r["test"]["users"] == 300  # the same test users whatever the fraction
        assert r["train-users"] == (150 if r["fraction"] == 0.5 else 300)
        assert len(r["valid-ndcg@10"]) == len(r["elapsed"]) == 2 and r["elapsed"] == sorted(r["elapsed"])
        assert 0.0 <= r["test"]["ndcg@10"] <= 1.0
        assert ("conventions" in r) == (r["fraction"] == 1.0)
    full = [r for r in results["runs"] if r["fraction"] == 1.0]
    for r in full:  # ties in favour and no masking can only raise a target's rank: metrics never drop
        c = r["conventions"]
        assert c["masked, ties against (Pollen)"]["ndcg@10"] == pytest.approx(r["test"]["ndcg@10"])
        assert c["masked, ties in favour"]["ndcg@10"] >= c["masked, ties against (Pollen)"]["ndcg@10"]
    ttq = results["time-to-quality"]
    local = next(r for r in full if r["start"] == "pretrained")
    assert ttq["goal-valid-ndcg@10"] == max(local["valid-ndcg@10"])
    assert ttq["pretrained"]["minutes"] * 60 == pytest.approx(local["elapsed"][ttq["pretrained"]["epoch"] - 1])
    assert results["adapter"]["source"] == "given"
    table = (run_dir / "transfer.md").read_text()
    assert "| federated |" in table and "Recformer" in table and "Time-to-quality" in table
    assert (run_dir / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same runs made by two invocations (different starts) merge back into the same table
    for name, keep in (("a", {"federated"}), ("b", {"pretrained", "sasrec-id"})):
        part = {**results, "runs": [r for r in results["runs"] if r["start"] in keep]}
        (tmp_path / name).mkdir()
        (tmp_path / name / "transfer.json").write_text(json.dumps(part))
    assert transfer.main(["--merge", str(tmp_path / "b"), str(tmp_path / "a"), "--run-dir",
                          str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "transfer.json").read_text())
    assert merged["runs"] == results["runs"] and merged["time-to-quality"] == results["time-to-quality"]
    with pytest.raises(ValueError, match="appears in more than one part"):
        transfer.merge([results, results])


def test_fractions_are_parsed_as_percentages():
    assert transfer.parse_fractions("100,5, 10") == [0.05, 0.1, 1.0]
    assert transfer.parse_fractions("0,50") == [0.0, 0.5]  # 0 = no training: the zero-shot row
    with pytest.raises(ValueError, match="in \\[0, 100\\]"):
        transfer.parse_fractions("-5,50")
