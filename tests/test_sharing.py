"""What the federation shares and how it is used: personalised members, the zero-shot newcomer."""

import numpy as np
import torch

from common.adapters import mix_state
from common.config import PollenConfig
from common.data.sources import load_split
from common.train import MIXES


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


def test_a_member_starts_each_round_from_the_mix_its_validation_ranks_best(tiny_bert, tmp_path):
    """From its second round a member trains from share x global + (1 - share) x its own last adapters, the share
    of MIXES whose model ranks its validation best (ties: more of the global), and reports it; the first round
    (nothing of its own yet) and a DP member (the choice reads validation users) start from the global."""
    from client.session import ClientSession

    session = ClientSession(_config(tiny_bert), "video", None, str(tmp_path), "cpu")
    assert session.train()["global-share"] == 1.0
    own = session.personal
    torch.manual_seed(0)
    chosen = []
    for spread in (0.0, 0.05, 3.0):  # the global as one's own (a tie), near it, far from it
        received = {k: v + spread * torch.randn_like(v) for k, v in own.items()}
        valid = {}
        for share in MIXES:
            session.set_adapter(mix_state(own, received, share))
            valid[share] = session.platform.evaluate("valid")["ndcg@10"]
        session.set_adapter(received)
        session.personal = own
        chosen.append(session.train()["global-share"])
        assert chosen[-1] == max(MIXES, key=lambda s: (valid[s], s))
    assert chosen[0] == 1.0 and chosen[-1] < 1.0  # a global far from its own is not taken whole
    dp = ClientSession(_config(tiny_bert, **{"dp-noise": 1.0}), "video", None, str(tmp_path), "cpu")
    dp.train()
    dp.set_adapter({k: v + 3.0 * torch.randn_like(v) for k, v in dp.personal.items()})
    assert dp.train()["global-share"] == 1.0


def test_a_newcomer_ranks_its_catalogue_with_the_shared_model_alone(tiny_bert):
    """Fraction 0: text-only item vectors through the received adaptor and sequence encoder, no item IDs."""
    from client.adapt import adapt, test_metrics, zero_shot_model
    from simulations.transfer import zero_shot

    config = _config(tiny_bert)
    member = load_split(config.data, "video")
    trained = adapt(member, config, None, epochs=2, log=lambda line: None).encoder.adapter_state()
    newcomer = load_split(config.data, "ecommerce")
    model = zero_shot_model(newcomer, config.replace(**{"text-prior": False}), trained)
    assert model.platform.model.head.item_emb is None  # the federation never saw this catalogue's items
    shared = model.encoder.adapter_state()
    assert shared.keys() == trained.keys() and all(torch.equal(shared[k], trained[k]) for k in trained)
    metrics = test_metrics(model, newcomer)
    assert np.isfinite(list(metrics.values())).all() and metrics["users"] == newcomer.num_users
    # with the text prior (a newcomer's default) it ranks at the mix of the received adapters and the pretrained
    # start that its validation ranks best: never below either on validation
    prior = config.replace(**{"text-prior": True})
    model = zero_shot_model(newcomer, prior, trained)
    fresh = zero_shot_model(newcomer, prior, None)
    ends = [zero_shot_model(newcomer, prior, trained).platform, fresh.platform]
    ends[0].model.encoder.load_adapter_state(trained)  # the received adapters whole
    valid = model.platform.evaluate("valid")["ndcg@10"]
    assert model.share in MIXES and valid >= max(p.evaluate("valid")["ndcg@10"] for p in ends)
    expected = mix_state(fresh.encoder.adapter_state(), trained, model.share)
    assert all(torch.equal(v, expected[k]) for k, v in model.encoder.adapter_state().items())
    row = zero_shot(newcomer, prior, "federated", trained, None, lambda line: None)
    assert row["fraction"] == 0.0 and row["train-users"] == 0 and row["global-share"] == model.share
    assert row["test"]["mrr"] == test_metrics(model, newcomer)["mrr"]
    pretrained = zero_shot(newcomer, config, "pretrained", None, None, lambda line: None)
    assert 0 <= pretrained["test"]["ndcg@10"] <= 1
