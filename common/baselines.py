"""Scorers for the methods that do not train: popularity, frozen pretrained text (zero-shot), mean rating.

All plug into the one evaluator (common/evaluate.py) like a trained Recommender does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.data.split import SplitData
from common.evaluate import Rater, Scorer, evaluate
from common.model.encoder import ItemStates, TextEncoder
from common.model.head import has_text, prior_items

# SASRec on item IDs (the trained ID-only baseline of the benchmark and the transfer runner): the same head and
# loop without text, at SASRec's dropout for sparse data (Kang & McAuley 2018), on overlapping windows. At seed 42
# dropout 0.5 beat the text head's 0.2 on every platform's validation NDCG@10 (Office 0.0641 vs 0.0614, Last.fm
# 0.0167 vs 0.0147, MovieLens-100K 0.0954 vs 0.0905); window-stride 10 (each item learned after >= 41 earlier ones)
# beat windows that do not overlap on validation (MovieLens 0.1078 vs 0.0954, Last.fm 0.0172 vs 0.0164) and test
# (0.0938 vs 0.0798, 0.0186 vs 0.0159). On Office only 22 users' histories are longer than a window.
SASREC_ID = {"text": False, "item-ids": True, "dropout": 0.5, "text-prior": False, "popularity-prior": False,
             "window-stride": 10}


def popularity_scorer(split: SplitData) -> Scorer:
    """Every user gets the items most often seen in training."""
    counts = torch.as_tensor(split.item_counts(), dtype=torch.float32)
    return lambda histories: counts.expand(len(histories), -1)


def mean_rating_rater(split: SplitData) -> Rater:
    """Every target gets the mean of the training ratings: the baseline a rating output has to beat."""
    mean = float(np.nanmean(np.concatenate(split.train_ratings())))
    return lambda histories, targets: torch.full((len(targets),), mean, dtype=torch.float64)


DECAYS = (0.3, 0.5, 0.7, 0.9, 1.0)  # recency weights tried by zero_shot_scorer; 1.0 = the plain mean
# whitening powers tried with them (0 = MiniLM's vectors as they are). Zero-shot test NDCG@10, raw -> the power
# validation chose: Scientific 0.0708 -> 0.0781, Office 0.0455 -> 0.0476, MovieLens-100K 0.0297 -> 0.0369, Yelp
# 0.0037 -> 0.0047, Last.fm 0.0108 -> 0.0092 (validation 0.0099 -> 0.0127: it chose 0.5 and lost on test)
WHITENINGS = (0.0, 0.5, 1.0)


def zero_shot_scorer(split: SplitData, encoder: TextEncoder, states: ItemStates, window: int = 50) -> Scorer:
    """Cosine between each item's pretrained text vector and a recency-weighted mean of the user's last
    ``window`` items (weight decay^age, the last item age 0), the text vectors whitened for the catalogue: the
    pair of ``DECAYS`` x ``WHITENINGS`` with the best validation NDCG@10 (chosen on validation targets, never on
    test ones). On Amazon Scientific the plain mean of the last 10 items gave test NDCG@10 0.048, decay 0.5
    0.071, decay 0.7 with full whitening 0.078."""
    text = encoder.encode_catalogue(states).detach().float().cpu()
    decay, mean, whiten = best_prior(split, text, window)
    return _cosine_scorer(prior_items(text, mean, whiten), decay, window)


def whitening(text: torch.Tensor, power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, matrix) that whiten a catalogue's text vectors [num_items + 1, k] (row 0 = padding) to ``power``:
    0 = none (zero, identity), 1 = the items' covariance made the identity (ZCA, UniSRec's whitening, from the
    item texts alone, so no user's data). MiniLM's space is anisotropic: a few directions shared by every text
    dominate its cosines. Eigenvalues are shrunk by 1% of their mean, so a catalogue of fewer items than
    dimensions stays finite."""
    k = text.shape[-1]
    if power == 0:
        return torch.zeros(k), torch.eye(k)
    items = text[has_text(text)[:, 0] > 0].double()  # the catalogue's texts (not the padding row)
    mean = items.mean(0) if len(items) else torch.zeros(k, dtype=torch.float64)
    covariance = torch.cov((items - mean).T) if len(items) > 1 else torch.zeros(k, k, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(covariance)
    values = values.clamp(min=0) + 0.01 * values.clamp(min=0).mean() + 1e-12
    return mean.float(), ((vectors * values ** (-power / 2)) @ vectors.T).float()


def best_prior(split: SplitData, text: torch.Tensor, window: int
               ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(decay, mean, matrix): the recency weight of ``DECAYS`` and the whitening (``whitening`` at a power of
    ``WHITENINGS``) whose zero-shot ranking has the best validation NDCG@10 on ``split`` (raw text vectors
    ``text`` [num_items + 1, k]); the text prior of a head starts from them."""
    scores, whitenings = {}, {}
    for power in WHITENINGS:
        whitenings[power] = whitening(text, power)
        items = prior_items(text, *whitenings[power])
        for rate in DECAYS:
            scores[rate, power] = evaluate(_cosine_scorer(items, rate, window), split, "valid")["ndcg@10"]
    decay, power = max(scores, key=scores.get)
    return decay, *whitenings[power]


SCALES = tuple(2.0 ** (k / 2) for k in range(-2, 13))  # text prior scales tried by prior_scale: 0.5 .. 64
# Under user-level DP the prior's recency weight and starting scale are these public constants, not fitted on
# the platform's users (the scale is then trained, clipped and noised like every parameter), and the text is not
# whitened. The values are the middle of what best_prior / prior_scale chose on five platforms (decay 0.3-1.0,
# scale 4-8) before whitening was added.
PUBLIC_PRIOR = (0.5, 2.0 ** 2.5)


def prior_scale(split: SplitData, items: torch.Tensor, decay: float, window: int, users: int = 2000) -> float:
    """The scale of the zero-shot cosines (a softmax temperature) that best explains the training data: the one
    of ``SCALES`` with the lowest cross-entropy of each user's last training item after the items before it
    (at most ``users`` users, every item a candidate, as in training). A fixed 1/0.07 made the prior's loss
    worse than a uniform guess on Amazon Office (9.4 vs 7.7 nats), and training never recovered from it."""
    pairs = [(s[:-1], s[-1]) for s in split.train_sequences()[:users] if len(s) >= 2]
    if not pairs:
        return 1.0
    cosines = _cosine_scorer(items, decay, window)([h for h, _ in pairs])[:, 1:]
    targets = torch.tensor([t - 1 for _, t in pairs])
    return min(SCALES, key=lambda scale: F.cross_entropy(scale * cosines, targets).item())


# weights of log(1 + the item's training users) against the zero-shot cosine, tried by
# Recommender.choose_popularity. Amazon Scientific (whitened prior, no training), validation / test NDCG@10:
# 0 -> 0.0786 / 0.0781, 0.05 -> 0.0887 / 0.0877, 0.1 -> 0.0900 / 0.0868, 0.2 -> 0.0795 / 0.0701, 0.5 -> 0.0414 / 0.0375
POPULARITY_SHARES = (0.0, 0.025, 0.05, 0.1, 0.2, 0.4)


def _cosine_scorer(items: torch.Tensor, rate: float, window: int) -> Scorer:
    def score(histories: list[np.ndarray]) -> torch.Tensor:
        users = torch.stack([(items[torch.tensor(h[-window:])] * (rate ** torch.arange(
            len(h[-window:]) - 1, -1, -1, dtype=torch.float32))[:, None]).sum(0) for h in histories])
        return F.normalize(users, dim=-1) @ items.T
    return score
