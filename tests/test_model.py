"""The encoder's cached-bottom / LoRA-top split computes what the plain model computes; the adapter round-trips."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from common.config import ModelConfig, PollenConfig
from common.data.synthetic import SyntheticConfig, generate
from common.data.split import leave_one_out
from common.model.encoder import TextEncoder, cached_item_states
from common.model.recommender import Recommender
from common.train import Platform, Trainer

TEXTS = ["Texas Instruments TI-30X IIS 2-Line Scientific Calculator", "Morcheeba",
         "Toy Story (1995) Animation Children's Comedy", "a"]


def _reference(path, texts):
    model = AutoModel.from_pretrained(path, add_pooling_layer=False)
    batch = AutoTokenizer.from_pretrained(path)(texts, padding=True, truncation=True, max_length=32,
                                               return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("lora_layers", [0, 1, 2])
def test_split_encoder_equals_plain_forward(tiny_bert, lora_layers):
    encoder = TextEncoder(ModelConfig(base_model=tiny_bert, lora_layers=lora_layers))
    vectors = encoder.encode_catalogue(encoder.item_states(TEXTS))
    assert torch.allclose(vectors[0], torch.zeros_like(vectors[0]))  # padding item
    assert torch.allclose(vectors[1:], _reference(tiny_bert, TEXTS), atol=2e-3)  # states cached as float16


@pytest.mark.integration
def test_real_minilm_split_equals_plain_forward():
    encoder = TextEncoder(ModelConfig(lora_layers=2))
    vectors = encoder.encode_catalogue(encoder.item_states(TEXTS))[1:]
    reference = _reference(str(encoder.bert.get_base_model().name_or_path), TEXTS)
    assert torch.nn.functional.cosine_similarity(vectors, reference).min() > 0.9999
    assert sum(p.numel() for p in encoder.lora_parameters()) == 2 * 2 * 8 * (384 + 384)  # q,v in 2 layers


@pytest.mark.parametrize("lora_layers", [0, 1])
def test_the_same_seed_builds_the_same_shared_start(tiny_bert, lora_layers):
    """The server and every client build the adapters' start from the seed, whatever torch's generator was doing
    before (the frozen default once drew its shared head from it: a federation differed from run to run)."""
    config = ModelConfig(base_model=tiny_bert, lora_layers=lora_layers)
    starts = []
    for draws in (0, 7):
        torch.rand(draws)
        starts.append(TextEncoder(config, seed=3).adapter_state())
    assert starts[0].keys() == starts[1].keys() and all(torch.equal(v, starts[1][k]) for k, v in starts[0].items())
    assert any(k.startswith("shared.") for k in starts[0])


def test_adapter_round_trip_through_peft_folder(tiny_bert, tmp_path):
    from peft import PeftModel

    encoder = TextEncoder(ModelConfig(base_model=tiny_bert, lora_layers=1))
    state = {k: torch.randn_like(v) for k, v in encoder.adapter_state().items()}
    encoder.load_adapter_state(state)
    encoder.save_adapter(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert, add_pooling_layer=False), tmp_path)
    from peft import get_peft_model_state_dict

    for key, value in get_peft_model_state_dict(reloaded).items():
        assert torch.equal(value, state[key])
    with pytest.raises(ValueError, match="adapter tensor .*expected shape"):
        encoder.load_adapter_state({k: v[:1] for k, v in state.items()})


def test_item_state_cache_is_reused(tiny_bert, tmp_path):
    encoder = TextEncoder(ModelConfig(base_model=tiny_bert, lora_layers=1))
    first = cached_item_states(encoder, TEXTS, tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    second = cached_item_states(encoder, TEXTS, tmp_path)
    assert torch.equal(first.states, second.states) and torch.equal(first.offsets, second.offsets)


def test_training_lowers_loss_and_updates_adapter_and_head(tiny_bert):
    config = PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 1, "batch-size": 32})
    split = leave_one_out(generate(SyntheticConfig())[0])
    torch.manual_seed(0)
    encoder = TextEncoder(config.model)
    platform = Platform(split, Recommender(split, config, encoder))
    trainer = Trainer([platform], encoder, config)
    adapter, head = encoder.adapter_state(), platform.model.private_state()
    losses = [trainer.epoch()[split.name] for _ in range(3)]
    assert losses[-1] < losses[0]
    assert any(not torch.equal(v, encoder.adapter_state()[k]) for k, v in adapter.items())
    assert any(not torch.equal(v, platform.model.private_state()[k]) for k, v in head.items())
    scores = platform.model.score([np.array([1, 2, 3])])
    assert scores.shape == (1, split.num_items + 1)


def test_a_new_model_scores_without_dropout(tiny_bert):
    """Found by the GPU check: a model built for evaluation (round 0, or each message of a deployed node, which
    builds its session anew) scored with the head's dropout on, so two evaluations of one model disagreed."""
    config = PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 1, "dropout": 0.5})
    split = leave_one_out(generate(SyntheticConfig())[0])
    model = Recommender(split, config, TextEncoder(config.model))
    histories = split.eval_inputs("valid")[0][:16]
    assert not model.training and torch.equal(model.score(histories), model.score(histories))
    Trainer([Platform(split, model)], model.encoder, config.replace(**{"max-steps": 1})).epoch()
    assert not model.training  # an epoch switches dropout on for itself only
    assert torch.equal(model.score(histories), model.score(histories))


def test_sampled_negative_loss_trains(tiny_bert):
    config = PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 1, "loss": "sampled",
                                       "negatives": 16, "batch-size": 32})
    split = leave_one_out(generate(SyntheticConfig())[1])
    encoder = TextEncoder(config.model)
    trainer = Trainer([Platform(split, Recommender(split, config, encoder))], encoder, config)
    losses = [trainer.epoch()[split.name] for _ in range(3)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_bfloat16_training_logits_give_the_float32_loss_and_gradients_and_leave_scoring_alone():
    """``logits-dtype bfloat16``: the catalogue-wide training logits' products in bfloat16; the loss and every
    gradient stay within bfloat16's rounding of float32's, and scoring is float32 whatever the setting."""
    split = leave_one_out(generate(SyntheticConfig())[0])
    base = PollenConfig().replace(**{"text": False, "item-ids": True, "dropout": 0.0})
    models = {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        models[dtype] = Recommender(split, base.replace(**{"logits-dtype": dtype}), None)
    histories = [h for h in split.eval_inputs("valid")[0] if len(h) >= 9][:32]
    x = torch.as_tensor(np.stack([h[-9:-1] for h in histories]))  # 8 items, each followed by its target
    y = torch.as_tensor(np.stack([h[-8:] for h in histories]))
    grads, losses = {}, {}
    for dtype, model in models.items():
        model.train()
        loss = model.loss(x, y, None)
        loss.backward()
        losses[dtype] = loss.item()
        grads[dtype] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.eval()
    assert losses["bfloat16"] != losses["float32"] and losses["bfloat16"] == pytest.approx(losses["float32"], rel=1e-3)
    errors = [((a - b).norm() / a.norm()).item() for a, b in zip(grads["float32"], grads["bfloat16"])]
    assert len(errors) > 5 and max(errors) < 0.01, errors  # bfloat16 keeps 8 bits: about 0.4% per number
    assert torch.equal(models["float32"].score(histories), models["bfloat16"].score(histories))


def test_auto_logits_dtype_is_bfloat16_where_the_cpu_multiplies_it_natively():
    """``logits-dtype auto`` on a CPU: bfloat16 with AVX512-BF16 or AMX (emulated elsewhere: slower than float32)."""
    from common.runtime import logits_dtype

    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert logits_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert (logits_dtype("float32", "cpu"), logits_dtype("bfloat16", "cpu")) == (torch.float32, torch.bfloat16)
    split = leave_one_out(generate(SyntheticConfig())[0])
    assert Recommender(split, PollenConfig().replace(**{"text": False, "item-ids": True}), None).logits_dtype == \
        logits_dtype("auto", "cpu")


def test_client_private_state_survives_a_new_process_session(tiny_bert, tmp_path):
    """What a node keeps on its disk between messages (head, optimiser, RNG) restores exactly into a fresh session."""
    from client.session import ClientSession

    config = PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 1, "batch-size": 32})
    first = ClientSession(config, "video", None, str(tmp_path), "cpu")
    first.train()
    saved = first.checkpoint()
    second = ClientSession(config, "video", None, str(tmp_path), "cpu")
    second.restore(saved)
    for key, value in first.platform.model.private_state().items():
        assert torch.equal(value, second.platform.model.private_state()[key]), key
    assert second.trainer.optimizer.state_dict()["state"].keys() == first.trainer.optimizer.state_dict()["state"].keys()
    second.set_adapter(first.encoder.adapter_state())
    assert first.trainer.rng.integers(1 << 30) == second.trainer.rng.integers(1 << 30)


@pytest.mark.parametrize("layers,heads", [(1, 1), (2, 2), (3, 4)])
def test_last_state_equals_forward_at_the_last_position(layers, heads):
    """Scoring's cheaper pass (last position only in the last layer, one mask for all heads) gives the state
    ``forward`` gives after the last position, for histories of every length including one item."""
    from common.model.head import SequenceEncoder

    torch.manual_seed(0)
    model = ModelConfig(hidden_size=32, head_layers=layers, head_heads=heads)
    encoder = SequenceEncoder(model, max_len=12).eval()
    items = torch.randn(40, 32)
    items[0] = 0
    sequences = torch.randint(1, 40, (6, 12))
    for row, length in enumerate([12, 11, 7, 3, 1, 12]):
        sequences[row, :12 - length] = 0
    with torch.inference_mode():
        full = encoder(sequences, items)[:, -1]
        last = encoder.last_state(sequences, items)
    assert last.shape == (6, 32)
    torch.testing.assert_close(last, full, rtol=1e-5, atol=1e-5)
    encoder.train()  # in training mode it is forward's own (dropout lives in forward's layers)
    torch.manual_seed(1)
    a = encoder.last_state(sequences, items)
    torch.manual_seed(1)
    torch.testing.assert_close(a, encoder(sequences, items)[:, -1])


def test_whitening_makes_the_catalogue_covariance_the_identity_and_power_0_changes_nothing():
    """``common.baselines.whitening``: at power 1 the catalogue's whitened text vectors have zero mean and, but
    for the shrinkage (1% of the mean variance), unit covariance; at power 0 the prior compares MiniLM's vectors
    as they are. The padding row stays zero either way (it must not enter a history's mean)."""
    from common.baselines import whitening
    from common.model.head import prior_items

    generator = torch.Generator().manual_seed(0)
    text = torch.randn(500, 16, generator=generator) @ torch.randn(16, 16, generator=generator) + 3.0
    text[0] = 0
    mean, whiten = whitening(text, 1.0)
    white = (text[1:] - mean) @ whiten
    torch.testing.assert_close(white.mean(0), torch.zeros(16), atol=1e-4, rtol=0)
    before = torch.linalg.eigvalsh(torch.cov(text[1:].T))  # each direction's variance v becomes v / (v + 1% of mean)
    torch.testing.assert_close(torch.linalg.eigvalsh(torch.cov(white.T)), before / (before + 0.01 * before.mean()),
                               atol=1e-4, rtol=1e-4)
    assert torch.equal(prior_items(text, mean, whiten)[0], torch.zeros(16))
    torch.testing.assert_close(prior_items(text, *whitening(text, 0.0)), F.normalize(text, dim=-1))
    half = prior_items(text, *whitening(text, 0.5))
    torch.testing.assert_close(half.norm(dim=-1)[1:], torch.ones(499))


def test_the_prior_columns_are_made_once_per_text_table_and_again_when_it_or_the_whitening_changes():
    """``RecommendationHead.prior_vectors`` keeps the whitened columns of a constant table (no LoRA) instead of
    redoing the 384 x 384 product at every step; an in-place change of the table or of the whitening, a new
    table, and a table that carries a gradient (LoRA) all get fresh columns, always equal to ``prior_items``."""
    from common.baselines import whitening
    from common.model.head import RecommendationHead, prior_items

    config = PollenConfig().replace(**{"text-prior": True})
    head = RecommendationHead(99, 16, config.model, config.data)
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(100, 16, generator=generator)
    text[0] = 0
    first = head.prior_vectors(text)
    assert head.prior_vectors(text) is first and head.prior_vectors(text.detach()) is first  # same table
    mean, whiten = whitening(text, 1.0)
    head.load_state_dict({**head.state_dict(), "prior_mean": mean, "prior_whiten": whiten})
    whitened = head.prior_vectors(text)
    assert whitened is not first
    torch.testing.assert_close(whitened, prior_items(text, mean, whiten))
    text[5] += 1.0  # the table changed in place
    torch.testing.assert_close(head.prior_vectors(text), prior_items(text, mean, whiten))
    torch.testing.assert_close(head.prior_vectors(text.clone() * 2), prior_items(text * 2, mean, whiten))
    with torch.inference_mode():  # scoring's table: an inference tensor has no version counter
        frozen = text.clone()
    assert head.prior_vectors(frozen) is head.prior_vectors(frozen)
    live = text.clone().requires_grad_()
    columns = head.prior_vectors(live)
    assert columns.requires_grad and columns is not head.prior_vectors(live)


@pytest.mark.parametrize("power", [0.0, 1.0])
def test_an_untrained_text_prior_model_ranks_like_zero_shot_and_fit_can_keep_it(tiny_bert, power, monkeypatch):
    """``text-prior``: before training the score is the zero-shot text ranking exactly (scaled), whitened or not,
    the per-position states of training agree with scoring's, and ``fit`` keeps the start when training does not
    beat it."""
    from common import baselines
    from common.baselines import zero_shot_scorer
    from common.evaluate import evaluate
    from common.train import fit

    monkeypatch.setattr(baselines, "WHITENINGS", (power,))
    config = PollenConfig().replace(**{"base-model": tiny_bert, "text-prior": True, "batch-size": 32})
    split = leave_one_out(generate(SyntheticConfig())[0])
    torch.manual_seed(0)
    encoder = TextEncoder(config.model)
    model = Recommender(split, config, encoder)
    assert torch.equal(model.head.prior_whiten, torch.eye(len(model.head.prior_whiten))) == (power == 0)
    zero_shot = zero_shot_scorer(split, encoder, model.states, window=config.data.max_len)
    histories = split.eval_inputs("test")[0][:32]
    scale = model.head.prior_scale.exp().item()
    torch.testing.assert_close(model.score(histories)[:, 1:] / scale, zero_shot(histories)[:, 1:],
                               rtol=1e-4, atol=1e-5)
    platform = Platform(split, model)
    Trainer([platform], encoder, config.replace(**{"max-steps": 3})).epoch()  # the learned part moves off zero
    assert model.head.shared.sequence.output_norm.weight.abs().sum() > 0
    items = model.item_vectors()
    inputs = torch.from_numpy(np.stack([np.pad(h[-10:], (10 - len(h[-10:]), 0)) for h in histories]))
    with torch.inference_mode():
        torch.testing.assert_close(model.head.last_states(inputs, items),
                                   model.head.user_states(inputs, items)[:, -1], rtol=1e-4, atol=1e-4)
    fresh = Platform(split, Recommender(split, config, TextEncoder(config.model)))
    result = fit([fresh], fresh.model.encoder, config.replace(lr=1e-12), epochs=1, log=lambda _: None)
    assert result.best_epoch[split.name] == 0  # a step of 1e-12 cannot beat the start: the start is kept
    assert result.test[split.name] == evaluate(zero_shot, split, "test")


def test_the_popularity_term_starts_at_zero_then_adds_its_weight_times_log_training_users(tiny_bert):
    """``popularity-prior``: w starts at the share of the prior's scale that validation chose
    (``Recommender.choose_popularity``: with the learned part at its zero start, the share whose cosine + share x
    log(1 + training users) ranks validation best; with a trained learned part, the best of the whole model's
    scores); at w = 0 the model ranks exactly like the text prior alone; with w, every catalogue
    item's score rises by POPULARITY_STEP x w x log(1 + its training users) (``SplitData.user_popularity``), the
    same for every user; training moves w; an item added by its text alone (serving's ``POST /items``) has no
    popularity; new counts give new columns."""
    from common.baselines import POPULARITY_SHARES, _cosine_scorer
    from common.evaluate import evaluate
    from common.model.head import POPULARITY_STEP, prior_items

    config = PollenConfig().replace(**{"base-model": tiny_bert, "text-prior": True, "batch-size": 32})
    split = leave_one_out(generate(SyntheticConfig())[0])
    torch.manual_seed(0)
    encoder = TextEncoder(config.model)
    plain = Recommender(split, config, encoder)
    torch.manual_seed(0)
    model = Recommender(split, config.replace(**{"popularity-prior": True}), encoder)
    counts = torch.as_tensor(split.user_popularity(), dtype=torch.float32)
    torch.testing.assert_close(model.head.prior_popularity, counts)
    scale = model.head.prior_scale.exp().item()
    cosine = _cosine_scorer(prior_items(model.text_table().detach(), model.head.prior_mean, model.head.prior_whiten),
                            model.head.prior_decay.item(), 50)
    valid = {share: evaluate(lambda h: cosine(h) + share * torch.log1p(counts), split, "valid")["ndcg@10"]
             for share in POPULARITY_SHARES}
    best = max(POPULARITY_SHARES, key=lambda share: (valid[share], -share))
    assert model.head.popularity_weight.item() == pytest.approx(best * scale / POPULARITY_STEP)
    histories = split.eval_inputs("test")[0][:16]
    model.head.popularity_weight.data.zero_()
    torch.testing.assert_close(model.score(histories), plain.score(histories))
    model.head.popularity_weight.data.fill_(0.1)
    lift = (model.score(histories) - plain.score(histories))[:, 1:]
    torch.testing.assert_close(lift, (POPULARITY_STEP * 0.1 * torch.log1p(counts[1:])).expand_as(lift),
                               rtol=1e-4, atol=1e-4)
    assert model.head.text_vectors(model.text_table()[1:4])[:, -1].eq(0).all()
    model.head.set_popularity(counts * 2)
    assert model.head.prior_vectors(model.text_table())[1:, -1].equal(torch.log1p(counts[1:] * 2))
    Trainer([Platform(split, model)], encoder, config.replace(**{"max-steps": 3, "popularity-prior": True})).epoch()
    assert model.head.popularity_weight.item() != 0.1
    # with the learned part trained (a received sequence encoder), the weight is the best for the whole model
    valid, scale = {}, model.head.prior_scale.exp().item()
    for share in POPULARITY_SHARES:
        model.head.popularity_weight.data.fill_(share * scale / POPULARITY_STEP)
        valid[share] = evaluate(model.score, split, "valid")["ndcg@10"]
    best = max(POPULARITY_SHARES, key=lambda share: (valid[share], -share))
    assert model.choose_popularity(split) == valid[best]
    assert model.head.popularity_weight.item() == pytest.approx(best * scale / POPULARITY_STEP)
