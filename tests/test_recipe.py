"""The training recipe's rules: token budget from the catalogue, early stopping, seeds summarised, equal budgets."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from common.config import PollenConfig
from common.data.sources import load_split, platform_names
from common.model.encoder import TOKEN_CAP, TextEncoder, token_budget
from common.train import should_stop
from simulations.benchmark import markdown, run_seeds, summarise


def test_token_budget_fits_95_percent_of_the_catalogue(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts = [" ".join(["word"] * n) for n in range(1, 101)]  # 1..100 words = 3..102 tokens with [CLS] / [SEP]
    lengths = sorted(len(ids) for ids in tokenizer(texts)["input_ids"])
    budget = token_budget(tokenizer, texts)
    assert budget == lengths[94]  # the 95th of 100: exactly 95 texts fit whole
    assert sum(n <= budget for n in lengths) == 95
    assert token_budget(tokenizer, texts + ["word " * 500]) <= TOKEN_CAP  # capped
    assert token_budget(tokenizer, ["a"]) == 3


def test_max_tokens_overrides_the_budget_and_states_record_it(tiny_bert):
    from common.config import ModelConfig

    texts = ["one two three four five six seven eight", "nine"]
    auto = TextEncoder(ModelConfig(base_model=tiny_bert, lora_layers=1))
    assert auto.item_states(texts).max_tokens == token_budget(auto.tokenizer, texts)
    fixed = TextEncoder(ModelConfig(base_model=tiny_bert, lora_layers=1, max_tokens=4))
    states = fixed.item_states(texts)
    assert states.max_tokens == 4 and int(states.lengths.max()) == 4


def test_should_stop_counts_epochs_since_the_latest_best():
    assert not should_stop([3], 12, patience=10)
    assert should_stop([3], 13, patience=10)
    assert not should_stop([3, 9], 13, patience=10)  # one platform still improving keeps every one going
    assert not should_stop([1], 500, patience=0)     # 0 = never


def test_fit_stops_early_and_keeps_the_best_epoch(tiny_bert):
    from common.model.recommender import Recommender
    from common.train import Platform, fit

    config = PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 0, "patience": 2, "lr": 0.05,
                                       "hidden-size": 16})
    split = load_split(config.data, platform_names(config.data)[0])
    encoder = TextEncoder(config.model)
    platform = Platform(split, Recommender(split, config, encoder, encoder.item_states(split.item_texts)))
    result = fit([platform], encoder, config, epochs=60, log=lambda line: None)
    epochs_run = len(result.valid[split.name])
    best = result.best_epoch[split.name]
    assert epochs_run < 60 and epochs_run == best + 2  # stopped two epochs after the best one
    scores = [m["ndcg@10"] for m in result.valid[split.name]]
    assert scores[best - 1] == max(scores)
    assert platform.evaluate("valid")["ndcg@10"] == pytest.approx(scores[best - 1])  # the best state is restored


def _run(methods: dict[str, dict[str, float]]) -> dict:
    return {"budget_epochs": 5, "patience": 2, "config": {}, "seed": 0, "full_model_bytes": 10_000,
            "adapter_bytes": 100, "methods": {m: {"test": {"shop": metrics}, "seconds": 1.0,
                                                   "upload_bytes_per_client_per_round": {"shop": 100}}
                                               for m, metrics in methods.items()}}


def test_seed_summary_mean_sd_and_paired_signs_by_hand():
    runs = {42: _run({"local-only": {"ndcg@10": 0.10}, "federated": {"ndcg@10": 0.12}}),
            43: _run({"local-only": {"ndcg@10": 0.20}, "federated": {"ndcg@10": 0.19}}),
            44: _run({"local-only": {"ndcg@10": 0.30}, "federated": {"ndcg@10": 0.35}})}
    out = summarise(runs)
    local = out["methods"]["local-only"]["test"]["shop"]["ndcg@10"]
    assert local["seeds"] == [0.10, 0.20, 0.30]
    assert local["mean"] == pytest.approx(0.20)
    assert local["std"] == pytest.approx(0.10)  # sample s.d.: sqrt((0.01 + 0 + 0.01) / 2)
    diff = out["paired"]["federated - local-only"]["shop"]
    assert diff["seeds"] == pytest.approx([0.02, -0.01, 0.05])
    assert diff["mean"] == pytest.approx(0.02) and diff["signs"] == "+-+"
    assert diff["std"] == pytest.approx(np.std([0.02, -0.01, 0.05], ddof=1))
    table = markdown(out)  # the seeds' summary renders whole, the federation's share of the model included
    assert "| local-only | 0.2000 ± 0.1000 |" in table and "ratio 1.0000%" in table


@pytest.mark.integration
def test_every_benchmark_method_gets_the_same_budget(tiny_bert, tmp_path):
    """Two seeds on the embedded data: each trained method runs under the same epoch cap and patience, and
    none runs more epochs than the cap; seed-free methods are evaluated once and reused."""
    config = PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 0, "num-rounds": 3, "patience": 2,
                                       "hidden-size": 16, "run-dir": str(tmp_path), "threads": 1})
    trained = ("sasrec-id", "local-only", "centralised", "centralised-finetuned")
    out = run_seeds(config, ("popularity", *trained), [1, 2], None, log=lambda line: None)
    assert out["budget_epochs"] == 3 and out["patience"] == 2 and out["seeds"] == [1, 2]
    for method in trained:
        epochs = out["methods"][method]["epochs_run"]
        epochs = epochs if isinstance(epochs, list) else [epochs]  # one value when both seeds agree
        assert all(1 <= e <= 3 for per_seed in epochs for e in per_seed.values()), (method, epochs)
    popularity = out["methods"]["popularity"]["test"]
    assert all(m["ndcg@10"]["std"] == 0 for m in popularity.values())
    # fine-tuning starts from each platform's selected pooled state: where validation kept it (epoch 0), the test
    # figure is the centralised one exactly
    pooled, tuned = out["methods"]["centralised"]["test"], out["methods"]["centralised-finetuned"]
    best = tuned["best_epoch"] if isinstance(tuned["best_epoch"], list) else [tuned["best_epoch"]] * 2
    for i, per_seed in enumerate(best):
        for platform, epoch in per_seed.items():
            if epoch == 0:
                assert tuned["test"][platform]["ndcg@10"]["seeds"][i] == pooled[platform]["ndcg@10"]["seeds"][i]


@pytest.mark.integration
def test_jobs_in_parallel_match_methods_in_turn(tiny_bert, tmp_path):
    """``--jobs``: each seed's method on each platform in its own process gives what the methods give one after
    the other in one process; the seed-free methods run once, in the parent, and every seed's own
    benchmark.json holds them too, with the methods in the order asked and the platforms in the config's order."""
    import json

    from simulations.benchmark import run_jobs

    config = PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 0, "num-rounds": 2, "patience": 2,
                                       "hidden-size": 16, "threads": 1})
    methods, cache = ("popularity", "sasrec-id", "local-only"), str(tmp_path / "cache")
    turn = run_seeds(config.replace(**{"run-dir": str(tmp_path / "turn")}), methods, [1, 2], cache,
                     log=lambda line: None)
    parallel = run_jobs(config.replace(**{"run-dir": str(tmp_path / "parallel")}), methods, [1, 2], cache,
                        jobs=2, log=lambda line: None)
    for method in methods:
        assert parallel["methods"][method]["test"] == turn["methods"][method]["test"], method
        assert parallel["methods"][method].get("epochs_run") == turn["methods"][method].get("epochs_run"), method
    assert (tmp_path / "parallel" / "seed-free" / "benchmark.json").exists()
    for seed in (1, 2):
        run = json.loads((tmp_path / "parallel" / f"seed-{seed}" / "benchmark.json").read_text())
        assert list(run["methods"]) == list(methods) and run["seed"] == seed
        assert list(run["methods"]["local-only"]["test"]) == platform_names(config.data)
        assert run["methods"]["local-only"]["seconds"] > 0
        for platform in platform_names(config.data):  # one job, one log, per seed, method and platform
            log = (tmp_path / "parallel" / f"seed-{seed}" / f"local-only-{platform}.log").read_text()
            assert f"[local-only {platform}]" in log and "[popularity]" not in log


def test_jobs_plan_each_platform_alone_and_the_pooled_pair_together():
    from simulations.benchmark import load_splits, plan_jobs

    splits = load_splits(PollenConfig(), log=lambda line: None)
    plan = plan_jobs(("federated", "centralised", "centralised-finetuned", "local-only"), [1, 2], splits)
    names = sorted((job.seed, job.name) for job in plan)
    assert names == sorted([(seed, name) for seed in (1, 2) for name in
                            ("federated", "centralised", *(f"local-only-{s.name}" for s in splits))])
    pooled = [job for job in plan if job.name == "centralised"]
    assert all(job.methods == ("centralised", "centralised-finetuned") and job.platform is None for job in pooled)
    assert [job.cost for job in plan] == sorted((job.cost for job in plan), reverse=True)  # longest first
