"""User-level DP-SGD in the one Trainer (opacus accountant) and exact LoRA aggregation (FFA-LoRA), tiny BERT."""

import numpy as np
import pytest
import torch

from common.adapters import freeze_untravelled, wire_state
from common.config import PollenConfig
from common.data.split import leave_one_out
from common.data.synthetic import SyntheticConfig, generate
from common.model.encoder import TextEncoder
from common.model.recommender import Recommender
from common.train import Platform, Trainer, training_pairs, window_owners


@pytest.fixture(scope="module")
def split():
    return leave_one_out(generate(SyntheticConfig())[2])  # the smallest platform keeps the test fast


def build(split, tiny_bert, **flat):
    """float32 logits: these tests hold DP's per-user path to ``Recommender.loss`` digit for digit; the default's
    bfloat16 (where native) is held to rounding by its own test."""
    config = PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 1, "batch-size": 8, "max-steps": 2,
                                       "logits-dtype": "float32", **flat})
    torch.manual_seed(0)
    encoder = TextEncoder(config.model, seed=0)  # the shared start of every party; "seed" varies the training
    freeze_untravelled(encoder, config.privacy.aggregation)
    platform = Platform(split, Recommender(split, config, encoder))
    return Trainer([platform], encoder, config), encoder, config


def test_window_owners_follow_training_pairs(split):
    inputs, targets = training_pairs(split, max_len=5)
    owners = window_owners(split, max_len=5)
    assert len(owners) == len(inputs) and np.all(np.diff(owners) >= 0)
    for user in np.unique(owners)[:20]:  # a user's windows hold only that user's training items
        items = set(split.train_sequences()[user].tolist())
        assert set(targets[owners == user].flatten().tolist()) - {0} <= items


def test_dp_epsilon_is_opacus_rdp_and_grows_per_epoch(split, tiny_bert):
    from opacus.accountants import RDPAccountant

    trainer, _, config = build(split, tiny_bert, **{"dp-noise": 1.1, "dp-clip": 0.5})
    dp = trainer.dp
    assert dp.num_users == len(np.unique(window_owners(split, config.data.max_len)))
    assert dp.delta == pytest.approx(1 / dp.num_users)
    spent = []
    for _ in range(2):
        loss = trainer.epoch()[split.name]
        assert np.isfinite(loss)
        spent.append(trainer.dp.metrics()["dp-epsilon"])
    reference = RDPAccountant()
    reference.history = [(1.1, dp.sample_rate, 2 * dp.steps_per_epoch)]
    assert spent[0] < spent[1] == pytest.approx(reference.get_epsilon(dp.delta))
    restored, _, _ = build(split, tiny_bert, **{"dp-noise": 1.1, "dp-clip": 0.5})
    restored.load_state_dict(trainer.state_dict())  # the accountant travels with the trainer between rounds
    assert restored.dp.epsilon() == pytest.approx(spent[1])


def test_target_epsilon_calibrates_the_noise_over_the_planned_rounds(split, tiny_bert):
    trainer, _, config = build(split, tiny_bert, **{"dp-epsilon": 2.0, "num-rounds": 2})
    assert trainer.dp.noise > 0.3
    for _ in range(config.federation.num_rounds * config.train.local_epochs):
        trainer.epoch()
    assert trainer.dp.epsilon() == pytest.approx(2.0, abs=0.05)


def test_one_user_moves_the_summed_gradient_by_at_most_the_clip(split, tiny_bert):
    """User-level sensitivity: adding any one user's clipped gradient changes the sum by <= dp-clip."""
    trainer, _, _ = build(split, tiny_bert, **{"dp-noise": 1.0, "dp-clip": 0.05})
    model = trainer.platforms[0].model
    model.train()
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    inputs, targets = trainer.pairs[0]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for windows in trainer.dp.users[:6]:
        before = [t.clone() for t in total]
        index = torch.as_tensor(windows)
        loss = model.loss(inputs[index], targets[index], trainer._live_items(inputs[index], targets[index], 1))
        norms.append(trainer.dp.add_clipped(total, torch.autograd.grad(loss, params, allow_unused=True)))
        change = torch.sqrt(sum((t - b).pow(2).sum() for t, b in zip(total, before)))
        assert change <= 0.05 * (1 + 1e-5)
    assert max(norms) > 0.05  # the bound was active: clipping did something


def test_dp_trains_adapter_and_head(split, tiny_bert):
    trainer, encoder, _ = build(split, tiny_bert, **{"dp-noise": 0.5})
    head = trainer.platforms[0].model.private_state()
    adapter = encoder.adapter_state()
    trainer.epoch()
    assert any(not torch.equal(v, encoder.adapter_state()[k]) for k, v in adapter.items())
    assert any(not torch.equal(v, trainer.platforms[0].model.private_state()[k]) for k, v in head.items())


def test_ffa_trains_only_b_and_averaging_b_is_exact(split, tiny_bert):
    """FFA: A stays at the seeded start every party shares, so mean(B) A == mean(B A); FedAvg of A and B is not."""
    states = {}
    for aggregation in ("ffa", "fedavg"):
        for seed in (1, 2):
            trainer, encoder, _ = build(split, tiny_bert, **{"aggregation": aggregation, "seed": seed})
            start = encoder.adapter_state()
            trainer.epoch()
            states[aggregation, seed] = encoder.adapter_state()
            changed = {k for k, v in start.items() if not torch.equal(v, states[aggregation, seed][k])}
            travelling = set(wire_state(start, aggregation))
            assert changed == travelling if aggregation == "ffa" else changed == set(start)
    for aggregation, exact in (("ffa", True), ("fedavg", False)):
        one, two = states[aggregation, 1], states[aggregation, 2]
        for a_key in (k for k in one if "lora_A" in k):
            b_key = a_key.replace("lora_A", "lora_B")
            mean_of_products = (one[b_key] @ one[a_key] + two[b_key] @ two[a_key]) / 2
            product_of_means = ((one[b_key] + two[b_key]) / 2) @ ((one[a_key] + two[a_key]) / 2)
            assert torch.allclose(mean_of_products, product_of_means, atol=1e-7) == exact
    assert set(wire_state(states["ffa", 1], "ffa")) == {k for k in states["ffa", 1]
                                                        if "lora_B" in k or k.startswith("shared.")}


@pytest.mark.parametrize("table, message", [
    ({"aggregation": "svd"}, "aggregation must be 'fedavg' or 'ffa'"),
    ({"aggregator": "mode"}, "aggregator must be 'mean', 'median' or 'trimmed-mean'"),
    ({"secagg": True, "aggregator": "median"}, "secagg sums the updates: aggregator must be 'mean'"),
    ({"dp-clip": 0.0}, "dp-clip must be > 0"),
    ({"dp-epsilon": -1.0}, "dp-epsilon and dp-noise must be >= 0"),
    ({"update-norm-factor": 0.5}, "update-norm-factor must be 0 or >= 1"),
    ({"dp-popularity-share": 1.0}, "dp-popularity-share must be in (0, 1)"),
    ({"popularity-prior": True}, "popularity-prior needs text-prior = true"),
    ({"text-prior": True, "popularity-prior": True, "dp-noise": 1.0},
     "popularity-prior under DP needs dp-epsilon (its release takes a dp-popularity-share of it), not dp-noise"),
])
def test_bad_privacy_settings_are_named(table, message):
    with pytest.raises(ValueError, match="config: " + message.replace("(", r"\(").replace(")", r"\)")):
        PollenConfig.from_flat(table)


# -- the vectorised path (frozen encoder, the default model) and the guarantee's testable claims -----------------
def build_frozen(split, tiny_bert, **flat):
    return build(split, tiny_bert, **{"lora-layers": 0, **flat})


def sampled_step(trainer, users=range(6)):
    """The windows and batch of ``users`` (indices), as a DP step gives them to the plug-in."""
    idx = np.concatenate([trainer.dp.users[u] for u in users])
    return idx, trainer.batch(0, idx)


@pytest.mark.parametrize("grouping", [(8, 2 ** 25), (2, 1), (None, 2 ** 31)], ids=["cpu", "short-spans", "gpu"])
@pytest.mark.parametrize("prior", [False, True, "popularity"])
@pytest.mark.parametrize("trained, factored, through", [
    ({}, False, 4),  # adaptor weight and bias, the ID table, theta
    ({"item-ids": False}, True, 2),  # the adaptor alone: per-user losses of the adaptor itself (TextSpaceItems)
    ({"item-ids": False}, False, 2),  # the same through the item table's gradient and its pull-back
    ({"item-ids": False, "train-adaptor": False}, False, 0)],  # a constant item table: no pull-back at all
    ids=["all", "text", "text-table", "fixed-adaptor"])
def test_vectorised_per_user_gradients_equal_one_backward_per_user(split, tiny_bert, prior, grouping, trained,
                                                                    factored, through, monkeypatch):
    """vmap(grad) of the masked per-user loss, then the batched pull-back from the item table to the adaptor,
    theta and the ID table == autograd of Recommender.loss on each user's windows alone; with the text prior
    too, whose constant columns take no per-user gradient and whose scale is trained (noised) like the rest,
    from the public constants, not from the users' data. Under every grouping of users (``GROUPING``): windows
    cut to their group's used length (2: several lengths of 8) with one user a vmap chunk (a budget of 1 logit),
    one group per number of windows (a GPU's). Without item IDs, with the adaptor's gradient taken through
    ``TextSpaceItems`` or through the table. With the popularity term, whose weight is trained like the prior's
    scale (its counts are released noised before training: ``popularity-prior`` needs ``dp-epsilon``)."""
    from common import privacy
    from common.baselines import PUBLIC_PRIOR
    from common.privacy import segments, split_parameters, user_gradients

    monkeypatch.setitem(privacy.GROUPING, "cpu", grouping)
    monkeypatch.setattr(privacy, "text_space_pays", lambda *sizes: factored)

    popularity = {"popularity-prior": True, "dp-epsilon": 8.0} if prior == "popularity" else {}
    trainer, _, _ = build_frozen(split, tiny_bert, **{"dp-noise": 1.0, "dropout": 0.0, "rating-weight": 0.0,
                                                     "max-len": 8, "text-prior": bool(prior),  # several windows
                                                     **trained, **popularity})  # a user
    model = trainer.platforms[0].model
    if popularity:
        assert any(p is model.head.popularity_weight for p in trainer.params)
        model.head.popularity_weight.data.fill_(0.05)
    if prior:
        assert model.head.prior_decay.item() == PUBLIC_PRIOR[0]
        assert model.head.prior_scale.exp().item() == pytest.approx(PUBLIC_PRIOR[1])
        assert torch.equal(model.head.prior_whiten, torch.eye(len(model.head.prior_whiten)))  # not whitened
        assert any(p is model.head.prior_scale for p in trainer.params)
        model.head.shared.sequence.output_norm.weight.data.fill_(1.0)  # a learned part that is not zero yet
    model.train()
    everyone = range(len(trainer.dp.users))
    idx, (inputs, targets, _) = sampled_step(trainer, everyone)
    used = ((inputs != 0) | (targets > 0)).sum(1).numpy()
    longest = [used[rows].max() for rows in segments(trainer.dp.owners[idx])]  # each user's longest window
    short = [u for u in everyone if longest[u] <= 5][:2]
    idx, batch = sampled_step(trainer, [0, 1, 2, 3, *short])  # 2 or 1 windows of 8, and users whose span is cut
    users = segments(trainer.dp.owners[idx])
    assert len(users) == 6 and len({len(u) for u in users}) > 1  # several groups of window counts
    table_parameters = split_parameters(model, trainer.params)[0]
    assert len(table_parameters) == through
    assert (privacy.factored_adaptor(model, table_parameters) is not None) == (through == 2)
    grads, losses = user_gradients(model, trainer.params, users, batch)
    inputs, targets, _ = batch
    for u, rows in enumerate(users):
        loss = model.loss(inputs[rows], targets[rows], None)
        expected = torch.autograd.grad(loss, trainer.params, allow_unused=True)
        assert losses[u].item() == pytest.approx(loss.item(), rel=1e-5)
        for g, e in zip(grads, expected):
            # the popularity weight's gradient sums a term over every position and item (noisy counts): float32
            assert torch.allclose(g[u], torch.zeros_like(g[u]) if e is None else e, atol=1e-5 if popularity else 1e-6,
                                  rtol=1e-4)


def test_bfloat16_logits_give_each_user_the_float32_gradient_within_rounding(split, tiny_bert, monkeypatch):
    """``logits-dtype bfloat16`` under DP: each user's loss and gradient through the item table within bfloat16's
    rounding of float32's, a small fraction of the noise a step adds (sigma x clip). (``TextSpaceItems`` stays
    float32: its products in bfloat16 made Office's DP epoch 1.5x slower, README "Speed and scale".)"""
    from common import privacy
    from common.privacy import segments, user_gradients

    monkeypatch.setattr(privacy, "text_space_pays", lambda *sizes: False)
    trainer, _, _ = build_frozen(split, tiny_bert, **{"dp-noise": 1.0, "dropout": 0.0, "rating-weight": 0.0,
                                                     "max-len": 8})
    model = trainer.platforms[0].model
    model.train()
    idx, batch = sampled_step(trainer)
    users = segments(trainer.dp.owners[idx])
    found = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.logits_dtype = dtype
        found[dtype] = user_gradients(model, trainer.params, users, batch)
    (grads, losses), (narrow, narrow_losses) = found[torch.float32], found[torch.bfloat16]
    assert not torch.equal(losses, narrow_losses) and torch.allclose(losses, narrow_losses, rtol=5e-3)
    errors = [((g[u] - n[u]).norm() / g[u].norm()).item()
              for g, n in zip(grads, narrow) for u in range(len(users)) if g[u].norm() > 0]
    # one user's loss covers a few positions, so a logit's rounding (about 0.4% of it) weighs more than in a
    # batch's mean (within 1% there, tests/test_model.py): measured median 0.9%, largest 3%
    assert len(errors) > 10 and np.median(errors) < 0.02 and max(errors) < 0.05, errors


@pytest.mark.parametrize("item_ids", [True, False])
def test_without_noise_or_clipping_the_dp_gradient_is_the_mean_of_the_users_gradients(split, tiny_bert, item_ids):
    """With no noise and a clip no user reaches, a DP step gives every parameter exactly the sum of the users' own
    gradients divided by the expected number of users (with IDs and without, where theta mixes nothing)."""
    trainer, _, _ = build_frozen(split, tiny_bert, **{"dp-noise": 1.0, "dp-clip": 1e6, "dropout": 0.0,
                                                     "rating-weight": 0.0, "max-len": 8, "item-ids": item_ids})
    dp, model = trainer.dp, trainer.platforms[0].model
    dp.noise = 0.0
    model.train()
    idx, batch = sampled_step(trainer)
    from common.privacy import segments
    inputs, targets, _ = batch
    expected = [torch.zeros_like(p) for p in trainer.params]
    for rows in segments(dp.owners[idx]):
        for e, g in zip(expected, torch.autograd.grad(model.loss(inputs[rows], targets[rows], None), trainer.params,
                                                      allow_unused=True)):
            if g is not None:
                e.add_(g / (dp.sample_rate * dp.num_users))
    dp.backward(model, trainer.params, idx, batch)
    for p, e in zip(trainer.params, expected):
        torch.testing.assert_close(p.grad, e, atol=1e-6, rtol=1e-4)
    assert trainer.epoch()  # a whole epoch runs (without IDs, theta is unused and must not break the pull-back)


def test_vectorised_dp_epoch_accounts_like_opacus_and_noises_the_id_table_like_the_rest(split, tiny_bert):
    from opacus.accountants import RDPAccountant

    trainer, encoder, _ = build_frozen(split, tiny_bert, **{"dp-noise": 1.1, "dp-clip": 0.5})
    dp = trainer.dp
    head = trainer.platforms[0].model.head
    assert any(p is head.item_emb.weight for p in trainer.params)  # trained, so clipped and noised
    start_ids, start_adapter = head.item_emb.weight.detach().clone(), encoder.adapter_state()
    for _ in range(2):
        assert np.isfinite(trainer.epoch()[split.name])
    reference = RDPAccountant()
    reference.history = [(1.1, dp.sample_rate, 2 * dp.steps_per_epoch)]
    assert dp.epsilon() == pytest.approx(reference.get_epsilon(dp.delta))
    assert not torch.equal(head.item_emb.weight, start_ids)
    # functional_call left the model's own parameters in place: the optimiser still steps the model
    assert {id(p) for p in trainer.params} <= {id(p) for p in trainer.platforms[0].model.parameters()}
    assert any(not torch.equal(v, encoder.adapter_state()[k]) for k, v in start_adapter.items())


@pytest.mark.parametrize("settings", [{"lora-layers": 0}, {"lora-layers": 1},
                                      {"lora-layers": 0, "item-ids": False, "text-prior": True,
                                       "popularity-prior": True, "dp-epsilon": 8.0}],
                         ids=["frozen", "lora", "dp-recipe"])
def test_every_trained_tensor_is_noised_and_the_rest_never_changes(split, tiny_bert, settings):
    """What leaves (the adapter) is trained only through noised gradients: every model tensor that changes in a
    DP epoch is one the plug-in clips and noises; the others (frozen encoder, item-ID table) stay at their
    seeded, data-independent start (also in the DP recipe, whose adaptor gradients go through TextSpaceItems)."""
    trainer, encoder, _ = build(split, tiny_bert, **{"dp-noise": 1.0, **settings})
    model = trainer.platforms[0].model
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.epoch()
    noised = {id(p) for p in trainer.params}
    named = dict(model.named_parameters(remove_duplicate=False))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k in named and id(named[k]) in noised for k in changed)
    assert all(p.requires_grad == (id(p) in noised) for p in model.parameters())


def test_each_user_moves_the_clipped_sum_by_at_most_the_clip_vectorised(split, tiny_bert):
    from common.privacy import segments, user_gradients

    trainer, _, _ = build_frozen(split, tiny_bert, **{"dp-noise": 1.0, "dp-clip": 0.05})
    model = trainer.platforms[0].model
    model.train()
    idx, batch = sampled_step(trainer, users=range(8))
    users = segments(trainer.dp.owners[idx])
    grads, _ = user_gradients(model, trainer.params, users, batch)
    norms = torch.sqrt(sum(g.reshape(len(g), -1).pow(2).sum(1) for g in grads))
    assert norms.max() > 0.05  # the bound is active
    model.eval()  # the same dropout (none) in both sums: the step with and without the last user
    total, without = ([torch.zeros_like(p) for p in trainer.params] for _ in range(2))
    trainer.dp._vectorised(model, trainer.params, users, batch, total, None)
    trainer.dp._vectorised(model, trainer.params, users[:-1], batch, without, None)
    change = torch.sqrt(sum((t - w).pow(2).sum() for t, w in zip(total, without)))
    assert 0 < change <= 0.05 * (1 + 1e-5)


def test_noise_has_the_accounted_scale_and_the_sample_is_secret(split, tiny_bert):
    trainer, _, _ = build_frozen(split, tiny_bert, **{"dp-noise": 2.0, "dp-clip": 0.5})
    dp = trainer.dp
    big = [torch.zeros(20000)]
    dp.set_noisy_grads([big[0].requires_grad_()], [torch.zeros(20000)])
    expected = 2.0 * 0.5 / (dp.sample_rate * dp.num_users)
    assert big[0].grad.std().item() == pytest.approx(expected, rel=0.05)
    assert dp.accountant.history == [(2.0, dp.sample_rate, 1)]
    twin, _, _ = build_frozen(split, tiny_bert, **{"dp-noise": 2.0, "dp-clip": 0.5})  # same public seed
    assert any(not np.array_equal(a, b) for a, b in zip(dp.plan(), twin.dp.plan()))


def test_users_per_step_sets_the_sampling_rate_and_steps(split, tiny_bert):
    trainer, _, _ = build_frozen(split, tiny_bert, **{"dp-noise": 1.0, "dp-users-per-step": 20, "max-steps": 0})
    dp = trainer.dp
    assert dp.sample_rate == pytest.approx(20 / dp.num_users)
    assert dp.steps_per_epoch == round(dp.num_users / 20) and len(dp.plan()) == dp.steps_per_epoch


def test_one_user_moves_the_item_popularity_by_at_most_one(split):
    """The sensitivity of the popularity release: removing any one user changes ``user_popularity`` by L2 norm
    1 exactly (a user with training items) and never more."""
    full = split.user_popularity()
    for user in range(12):
        without = split.subset(np.delete(np.arange(split.num_users), user)).user_popularity()
        assert np.linalg.norm(full - without) == pytest.approx(1.0 if len(split.train_sequences()[user]) else 0.0)


def test_the_popularity_release_is_noised_once_accounted_and_the_run_ends_at_its_epsilon(split, tiny_bert):
    """``popularity-prior`` under DP: the counts are released once, before training, with Gaussian noise whose
    multiplier spends dp-popularity-share of epsilon alone (opacus, sample rate 1, one step), from the secret
    generator; the training noise is calibrated so that the release and the planned steps together end at
    dp-epsilon, as an independent accountant composes them; the release travels with the accountant's state."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    settings = {"dp-epsilon": 4.0, "num-rounds": 2, "item-ids": False, "text-prior": True, "popularity-prior": True}
    trainer, _, config = build_frozen(split, tiny_bert, **settings)
    dp, head = trainer.dp, trainer.platforms[0].model.head
    assert dp.popularity_noise == get_noise_multiplier(target_epsilon=2.0, target_delta=dp.delta, sample_rate=1.0,
                                                       steps=1, accountant="rdp")
    assert dp.accountant.history == [(dp.popularity_noise, 1.0, 1)]
    noise = head.prior_popularity.double() - torch.as_tensor(split.user_popularity())
    assert noise.std().item() == pytest.approx(dp.popularity_noise, rel=0.2)
    twin, _, _ = build_frozen(split, tiny_bert, **settings)  # the same public seed, another release
    assert not torch.equal(twin.platforms[0].model.head.prior_popularity, head.prior_popularity)
    for _ in range(config.federation.num_rounds * config.train.local_epochs):
        trainer.epoch()
    reference = RDPAccountant()
    reference.history = [(dp.popularity_noise, 1.0, 1), (dp.noise, dp.sample_rate, dp.planned_steps)]
    assert dp.epsilon() == pytest.approx(reference.get_epsilon(dp.delta))
    assert 3.99 <= dp.epsilon() <= 4.0
    twin.load_state_dict(trainer.state_dict())
    assert twin.dp.epsilon() == pytest.approx(dp.epsilon())
