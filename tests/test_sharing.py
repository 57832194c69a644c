"""What the federation shares and how it is used: personalised members, the zero-shot newcomer."""

import numpy as np
import torch

from common.config import PollenConfig
from common.data.sources import load_split


def _config(tiny_bert, **extra):
    return PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 0, "batch-size": 32,
                                     "hidden-size": 16, **extra})


def test_members_evaluate_their_personalised_adapters(tiny_bert, tmp_path):
    """After a round's local training a member scores with its own adapters, not the received average;
    with personalise = false it scores with the global ones as received."""
    from client.session import ClientSession

    for personalise in (True, False):
        session = ClientSession(_config(tiny_bert, personalise=personalise), "video", None, str(tmp_path), "cpu")
        received = session.encoder.adapter_state()
        session.train()
        personal = session.personal
        assert any(not torch.equal(personal[k], received[k]) for k in received)  # training moved them
        session.set_adapter(received)  # the next message starts from the global adapters
        session.personalise()
        now = session.encoder.adapter_state()
        expected = personal if personalise else received
        assert all(torch.equal(now[k], expected[k]) for k in expected)
        restored = ClientSession(_config(tiny_bert, personalise=personalise), "video", None, str(tmp_path), "cpu")
        restored.restore(session.checkpoint())  # the personal adapters live in the node's private state
        assert all(torch.equal(restored.personal[k], personal[k]) for k in personal)


def test_a_newcomer_ranks_its_catalogue_with_the_shared_model_alone(tiny_bert):
    """Fraction 0: text-only item vectors through the received adaptor and sequence encoder, no item IDs."""
    from client.adapt import adapt, test_metrics, zero_shot_model
    from simulations.transfer import zero_shot

    config = _config(tiny_bert)
    member = load_split(config.data, "video")
    trained = adapt(member, config, None, epochs=2, log=lambda line: None).encoder.adapter_state()
    newcomer = load_split(config.data, "ecommerce")
    model = zero_shot_model(newcomer, config, trained)
    assert model.platform.model.head.item_emb is None  # the federation never saw this catalogue's items
    shared = model.encoder.adapter_state()
    assert shared.keys() == trained.keys() and all(torch.equal(shared[k], trained[k]) for k in trained)
    metrics = test_metrics(model, newcomer)
    assert np.isfinite(list(metrics.values())).all() and metrics["users"] == newcomer.num_users
    fresh = test_metrics(zero_shot_model(newcomer, config, None), newcomer)
    assert fresh["mrr"] != metrics["mrr"]  # the received adapters decide the ranking
    row = zero_shot(newcomer, config, "federated", trained, None, lambda line: None)
    assert row["fraction"] == 0.0 and row["train-users"] == 0 and row["test"]["mrr"] == metrics["mrr"]
    pretrained = zero_shot(newcomer, config, "pretrained", None, None, lambda line: None)
    assert 0 <= pretrained["test"]["ndcg@10"] <= 1
