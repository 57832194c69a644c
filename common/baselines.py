"""Scorers for the methods that do not train: popularity, frozen pretrained text (zero-shot), mean rating.

All plug into the one evaluator (common/evaluate.py) like a trained Recommender does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.data.split import SplitData
from common.evaluate import Rater, Scorer
from common.model.encoder import ItemStates, TextEncoder


def popularity_scorer(split: SplitData) -> Scorer:
    """Every user gets the items most often seen in training."""
    counts = torch.as_tensor(split.item_counts(), dtype=torch.float32)
    return lambda histories: counts.expand(len(histories), -1)


def mean_rating_rater(split: SplitData) -> Rater:
    """Every target gets the mean of the training ratings: the baseline a rating output has to beat."""
    mean = float(np.nanmean(np.concatenate(split.train_ratings())))
    return lambda histories, targets: torch.full((len(targets),), mean, dtype=torch.float64)


def zero_shot_scorer(split: SplitData, encoder: TextEncoder, states: ItemStates, recent: int = 10) -> Scorer:
    """Cosine between each item's pretrained text vector and the mean of the user's ``recent`` last items."""
    items = F.normalize(encoder.encode_catalogue(states), dim=-1).cpu()

    def score(histories: list[np.ndarray]) -> torch.Tensor:
        users = torch.stack([items[torch.tensor(h[-recent:])].mean(0) for h in histories])
        return F.normalize(users, dim=-1) @ items.T

    return score
