"""The serving benchmark's load generator against the real HTTP service (a subprocess) over a tiny model."""

from __future__ import annotations

import pytest
import torch

from client.export import export_model
from common.config import PollenConfig
from common.data.split import leave_one_out
from common.data.synthetic import SyntheticConfig, generate
from common.model.encoder import TextEncoder
from common.model.recommender import Recommender
from common.train import Platform, Trainer
from simulations.serving import Service, load_test, run_serving


@pytest.mark.integration
def test_load_generator_measures_the_live_service(tiny_bert, tmp_path):
    split = leave_one_out(generate(SyntheticConfig())[0])
    config = PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 1})
    torch.manual_seed(0)
    encoder = TextEncoder(config.model)
    platform = Platform(split, Recommender(split, config, encoder))
    Trainer([platform], encoder, config).epoch()
    folder = export_model(tmp_path / "model", platform, config)

    results = run_serving(folder, split, levels=[1, 3, 8], requests=48, threads=1, log=lambda _: None)
    assert results["items"] == split.num_items and results["http-equals-in-process"] is True
    assert results["in-process"]["requests"] == 96  # 48 before and 48 after the HTTP levels, pooled
    assert results["in-process"]["cpu-ms-per-request"] > 0
    for level in ("1", "3", "8"):
        r = results["http"][level]
        assert r["requests"] == 48 and r["errors"] == 0 and r["top10-different"] == 0  # every response checked
        assert r["service-cpu-ms-per-request"] > 0 and r["client-cpu-ms-per-request"] > 0
        assert 1 <= r["mean-batch"] <= int(level) and 0 < r["scoring-busy"] <= 1.5
        assert 0 < r["p50-ms"] <= r["p99-ms"] and r["requests-per-s"] > 0
        assert r["rss-mb"] > 0 and r["peak-rss-mb"] >= r["rss-mb"]
        assert r["p50-ratio-vs-in-process"] == pytest.approx(r["p50-ms"] / results["in-process"]["p50-ms"])
    # bad requests are counted as errors, not lost
    with Service(folder) as service:
        bad = load_test(service.port, [b'{"history": ["no-such-item"], "k": 10}', b'{"history": []}'], 2)
    assert bad["requests"] == 2 and bad["errors"] == 2
    assert results["http"]["1"]["mean-batch"] == 1  # a lone request is never held back for company
