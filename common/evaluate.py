"""The one evaluation routine: full ranking over the whole catalogue, leave-one-out targets.

A user's earlier items are masked (a repeated target therefore counts as a miss), and ties count against the
target, so a model cannot score well by giving many items the same score. Where a dataset ships sampled
negatives, the target is also ranked against those alone (``sampled-`` metrics). Both choices can be switched
(``mask_history=False``, ``ties="favour"``) only to compare with published figures that use the other convention
(Recformer ranks all items, history included, and counts ties in the target's favour).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from common.checks import NonFiniteMetric, finite_metrics
from common.data.split import SplitData

Scorer = Callable[[list[np.ndarray]], torch.Tensor]  # histories -> scores [B, num_items + 1]
Rater = Callable[[list[np.ndarray], np.ndarray], torch.Tensor]  # histories, target items -> ratings [B]
KS = (10, 20)


def rank_metrics(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Mean metrics of 0-based target ranks (one target per user): HR, NDCG, precision, recall, F1 at K, MRR."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        precision, recall = hit / k, hit.astype(np.float64)
        f1 = np.where(hit, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2), 0.0).mean())
        out[f"precision@{k}"] = float(precision.mean())
        out[f"recall@{k}"] = float(recall.mean())
        out[f"f1@{k}"] = float(f1.mean())
    out["mrr"] = float((1.0 / (ranks + 1)).mean())
    return out


TIES = ("against", "favour")


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, histories: list[np.ndarray],
                 mask_history: bool = True, ties: str = "against") -> torch.Tensor:
    """0-based rank of each target among all items; masked items rank last.

    ties="against": every other item with the target's score ranks above it; "favour": none does.
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    scores = scores.float().clone()
    scores[:, 0] = float("-inf")
    if mask_history:
        rows = np.concatenate([np.full(len(h), i) for i, h in enumerate(histories)]) if histories else []
        cols = np.concatenate(histories) if histories else []
        scores[torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)] = float("-inf")
    target = scores.gather(1, targets[:, None])
    above = (scores > target).sum(1)
    ranks = above + ((scores == target).sum(1) - 1 if ties == "against" else 0)
    # a masked target ranks after every real item
    return torch.where(torch.isinf(target[:, 0]), torch.full_like(ranks, scores.shape[1] - 1), ranks)


def evaluate(scorer: Scorer, split: SplitData, which: str, ks: Sequence[int] = KS, batch_size: int = 512,
             mask_history: bool = True, ties: str = "against", rater: Rater | None = None) -> dict[str, float]:
    """Metrics of ``scorer`` on the 'valid' or 'test' targets of every user of ``split``.

    With a ``rater`` and explicit ratings in the data, also the RMSE / MAE of its predicted rating of each rated
    target (``rated-users`` of them).
    """
    histories, targets = split.eval_inputs(which)
    ranks, sampled = [], []
    for start in range(0, len(histories), batch_size):
        hist = histories[start:start + batch_size]
        tgt = torch.as_tensor(targets[start:start + batch_size])
        scores = scorer(hist).cpu()
        if bool(torch.isnan(scores).any()) or bool((scores == float("inf")).any()):
            raise NonFiniteMetric(f"{split.name} {which}: the model scored items NaN or +infinity (training "
                                  "diverged, or an adapter/head with NaN values); no metrics are reported")
        ranks.append(target_ranks(scores, tgt, hist, mask_history, ties).numpy())
        if split.sampled_negatives:
            sampled.extend(_sampled_ranks(scores, tgt, which, start, split))
    out = rank_metrics(np.concatenate(ranks), ks)
    if sampled:
        out.update({f"sampled-{k}": v for k, v in rank_metrics(np.array(sampled), ks).items() if "@" in k})
    out["users"] = float(len(histories))
    if rater is not None:
        out.update(rating_metrics(rater, split, which, batch_size))
    return dict(finite_metrics(out, f"{split.name} {which}"))


def rating_metrics(rater: Rater, split: SplitData, which: str, batch_size: int = 512) -> dict[str, float]:
    """RMSE and MAE of predicted explicit ratings over the rated targets (empty when nothing is rated)."""
    truth = split.eval_ratings(which)
    rated = np.flatnonzero(~np.isnan(truth)) if truth is not None else np.array([], dtype=np.int64)
    if not len(rated):
        return {}
    histories, targets = split.eval_inputs(which)
    predicted = np.concatenate([
        rater([histories[i] for i in chunk], targets[chunk]).detach().cpu().double().numpy()
        for chunk in (rated[s:s + batch_size] for s in range(0, len(rated), batch_size))])
    error = predicted - truth[rated]
    return {"rmse": float(np.sqrt(np.mean(error ** 2))), "mae": float(np.mean(np.abs(error))),
            "rated-users": float(len(rated))}


def _sampled_ranks(scores: torch.Tensor, targets: torch.Tensor, which: str, start: int,
                   split: SplitData) -> list[int]:
    ranks = []
    for row in range(len(targets)):
        negatives = split.sampled_negatives.get((which, start + row))
        if negatives is not None:
            s = scores[row]
            t = s[targets[row]]
            ranks.append(int((s[negatives] >= t).sum()))
    return ranks
