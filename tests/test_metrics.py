"""Metrics against hand-computed values, and the ranking rules (masking, ties)."""

import math

import numpy as np
import pytest
import torch

from common.evaluate import rank_metrics, target_ranks


@pytest.mark.parametrize("ranks, key, expected", [
    ([0], "hr@10", 1.0),
    ([0], "ndcg@10", 1.0),
    ([0], "mrr", 1.0),
    ([2], "ndcg@10", 1 / math.log2(4)),            # third place: 1/log2(3+1) = 0.5
    ([2], "mrr", 1 / 3),
    ([9, 10], "hr@10", 0.5),                        # rank 9 is the 10th item: a hit; rank 10 is not
    ([9, 10], "ndcg@10", 0.5 / math.log2(11)),
    ([9, 10], "hr@20", 1.0),
    ([0, 3], "precision@10", 0.1),                  # one relevant item: P@K = hit / K
    ([0, 30], "recall@20", 0.5),
    ([0], "f1@10", 2 * 0.1 * 1.0 / 1.1),           # 2PR/(P+R) with P = 0.1, R = 1
    ([50], "f1@10", 0.0),
    ([0, 1, 3], "mrr", (1 + 1 / 2 + 1 / 4) / 3),
])
def test_rank_metrics_hand_computed(ranks, key, expected):
    assert rank_metrics(np.array(ranks))[key] == pytest.approx(expected)


def test_ranks_mask_history_and_count_ties_against_target():
    scores = torch.tensor([[0.0, 5.0, 4.0, 3.0, 3.0, 1.0]])  # item 0 is padding
    # target 3 ties with item 4; item 1 (the best) is in the history and masked
    rank = target_ranks(scores, torch.tensor([3]), [np.array([1])])
    assert rank.item() == 2  # above it: item 2; tie: item 4 -> rank 2 (0-based)
    rank_unmasked = target_ranks(scores, torch.tensor([3]), [np.array([1])], mask_history=False)
    assert rank_unmasked.item() == 3


def test_masked_target_counts_as_a_miss():
    scores = torch.tensor([[0.0, 5.0, 4.0]])
    rank = target_ranks(scores, torch.tensor([1]), [np.array([1])])
    assert rank.item() == 2  # last of the 3 columns: never a hit at any K < catalogue size


def test_platform_metrics_average_only_what_all_report():
    from server.strategy import mean_shared_metrics

    per_platform = {"shop": {"num-examples": 3.0, "ndcg@10": 0.4, "sampled-ndcg@10": 0.9},
                    "video": {"num-examples": 1.0, "ndcg@10": 0.0}}
    assert mean_shared_metrics(per_platform) == {"ndcg@10": pytest.approx(0.3)}
