"""Explicit ratings survive the split, the rating output trains with the ranking loss, and RMSE / MAE are exact."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from common.baselines import mean_rating_rater
from common.config import PollenConfig
from common.data.schema import PlatformData
from common.data.sources import load_split
from common.data.split import leave_one_out
from common.data.synthetic import SyntheticConfig, generate
from common.evaluate import rating_metrics
from common.model.recommender import Recommender
from common.train import Platform, Trainer, rating_targets, training_pairs


def _tiny() -> PlatformData:
    """Two users, hand-picked ratings; u2's second interaction is unrated."""
    rows = [("u1", "a", 1, 4.0), ("u1", "b", 2, 2.0), ("u1", "c", 3, 5.0), ("u1", "d", 4, 3.0),
            ("u2", "b", 1, 1.0), ("u2", "a", 2, np.nan), ("u2", "c", 3, 4.0)]
    interactions = pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating"]).assign(platform="t")
    items = pd.DataFrame({"item": list("abcd"), "text": ["alpha", "beta", "gamma", "delta"]})
    return PlatformData("t", interactions, items)


def test_split_keeps_ratings_aligned_with_sequences():
    split = leave_one_out(_tiny())
    assert [list(s) for s in split.sequences] == [[1, 2, 3, 4], [2, 1, 3]]
    np.testing.assert_array_equal(split.ratings[0], [4.0, 2.0, 5.0, 3.0])
    np.testing.assert_array_equal(split.eval_ratings("test"), [3.0, 4.0])
    np.testing.assert_array_equal(split.eval_ratings("valid")[:1], [5.0])
    assert np.isnan(split.eval_ratings("valid")[1])
    # the windows' rating targets line up with the item targets (NaN = padding or unrated)
    # u1 trains on a -> b (rated 2.0), u2 on a single item (no pair); one earlier item each shows the padding
    longer = _tiny()
    extra = pd.DataFrame([("u1", "a", 0, np.nan), ("u2", "d", 0, 5.0)], columns=["user", "item", "timestamp", "rating"])
    longer.interactions = pd.concat([longer.interactions, extra.assign(platform="t")], ignore_index=True)
    for data, items, expected in ((_tiny(), [[2]], [[2.0]]),
                                  (longer, [[1, 2], [0, 2]], [[4.0, 2.0], [np.nan, 1.0]])):
        one = leave_one_out(data)
        assert training_pairs(one, max_len=3)[1].tolist() == items
        np.testing.assert_array_equal(rating_targets(one, max_len=3).numpy(), expected)
    assert leave_one_out(generate(SyntheticConfig())[0]).ratings is None  # no ratings in the data: none kept


def test_movielens_loader_keeps_ratings(shared_data):
    split = load_split(PollenConfig().data, "video", str(shared_data / "video" / "movielens-100k"))
    values = np.concatenate(split.ratings)
    assert len(values) == 100_000 and not np.isnan(values).any() and set(np.unique(values)) == {1, 2, 3, 4, 5}


def test_rmse_and_mae_against_hand_computed_values():
    split = leave_one_out(_tiny())
    # test targets: u1 rates d 3.0, u2 rates c 4.0; predict 3.5 and 2.0 -> errors 0.5, -2.0
    rater = lambda histories, targets: torch.tensor([3.5, 2.0])  # noqa: E731
    metrics = rating_metrics(rater, split, "test")
    assert metrics == pytest.approx({"rmse": np.sqrt((0.25 + 4.0) / 2), "mae": 1.25, "rated-users": 2})
    # the mean baseline: training ratings are u1's 4, 2 and u2's 1 -> mean 7/3
    base = rating_metrics(mean_rating_rater(split), split, "test")
    assert base["mae"] == pytest.approx((abs(7 / 3 - 3) + abs(7 / 3 - 4)) / 2)


def test_rating_output_starts_at_the_mean_and_learns_with_the_ranking_loss():
    split = leave_one_out(generate(SyntheticConfig())[2])  # the synthetic video platform has 1-5 star ratings
    config = PollenConfig().replace(**{"text": False, "rating-weight": 1.0})
    torch.manual_seed(0)
    platform = Platform(split, Recommender(split, config, None))
    head = platform.model.head
    mean = float(np.nanmean(np.concatenate(split.train_ratings())))
    assert float(head.rating_offset) == pytest.approx(mean)
    torch.nn.init.zeros_(head.rating[-1].weight)
    torch.nn.init.zeros_(head.rating[-1].bias)  # the output is then exactly the offset: the mean baseline
    before = platform.evaluate("test")
    assert before["rmse"] == pytest.approx(rating_metrics(mean_rating_rater(split), split, "test")["rmse"])
    assert "ndcg@10" in before and before["rated-users"] == split.num_users
    Trainer([platform], None, config).epoch()
    after = platform.evaluate("valid")
    assert np.isfinite(after["rmse"]) and head.rating[-1].weight.abs().sum() > 0  # the rating output trained
    assert PollenConfig().model.rating_weight == 0 and Recommender(split, PollenConfig().replace(text=False),
                                                                   None).head.rating is None
