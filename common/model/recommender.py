"""One platform's recommender: the shared text encoder (optional) + its private head, scoring its catalogue.

Score(user, item) = user state . item vector. The catalogue's text vectors come from a table refreshed once per
epoch (the model does it when it enters training, and before scoring) without gradient; each training step re-encodes a random sample of the batch's items with gradient
(``live-items``) and puts them into the table, so the LoRA adapter learns at a bounded cost per step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import PollenConfig
from common.data.split import SplitData
from common.model.encoder import ItemStates, TextEncoder
from common.model.head import RecommendationHead, prior_items
from common.runtime import logits_dtype


class Recommender(nn.Module):
    def __init__(self, split: SplitData, config: PollenConfig, encoder: TextEncoder | None,
                 states: ItemStates | None = None):
        super().__init__()
        self.name = split.name
        self.num_items = split.num_items
        self.max_len = config.data.max_len
        self.encoder = encoder if config.model.text else None
        self.states = states
        if self.encoder is not None and states is None:
            self.states = self.encoder.item_states(split.item_texts)
        text_dim = self.encoder.hidden_size if self.encoder is not None else None
        self.head = RecommendationHead(split.num_items, text_dim, config.model, config.data,
                                       self.encoder.shared if self.encoder is not None else None)
        self.rating_weight = config.model.rating_weight
        self.logits_dtype = logits_dtype(config.train.logits_dtype, config.train.device)  # training's, catalogue-wide
        if self.head.rating is not None and split.ratings is not None:
            rated = np.concatenate(split.train_ratings())
            if not np.isnan(rated).all():
                self.head.rating_offset.fill_(float(np.nanmean(rated)))
        self._text_table: torch.Tensor | None = None
        self._table_version = -1
        if self.head.prior:  # the zero-shot recency weight and whitening (validation targets), scale (training items)
            from common.baselines import PUBLIC_PRIOR, best_prior, prior_scale

            # under DP these are public constants, fitted on users' data they would steer the noised updates; the
            # popularity weight then starts at 0 and the trainer's DP plug-in releases the counts with noise
            if config.privacy.dp:
                decay, scale = PUBLIC_PRIOR
            else:
                text = self.text_table().detach().float().cpu()
                decay, mean, whiten = best_prior(split, text, self.max_len)
                self.head.prior_mean.copy_(mean)
                self.head.prior_whiten.copy_(whiten)
                columns = prior_items(text, mean, whiten)
                scale = prior_scale(split, columns, decay, self.max_len)
            self.head.prior_decay.fill_(decay)
            self.head.prior_scale.data.fill_(math.log(scale))
        self.eval()  # built for scoring: dropout is on only inside a training epoch (common/train.py)
        if self.head.popularity and not config.privacy.dp:
            self.head.set_popularity(split.user_popularity())
            self.choose_popularity(split)

    def choose_popularity(self, split: SplitData) -> float:
        """Set the popularity term's weight to the share of ``POPULARITY_SHARES`` x the prior's scale whose model,
        as it stands, ranks ``split``'s validation targets best (the smaller share on a tie; 0 when popularity does
        not help); returns that validation NDCG@10. With the learned part at its zero start this ranks as the prior's
        cosine + share x log(1 + training users); with a received sequence encoder in place its score counts too,
        which a choice made for the prior alone missed (README, "A new platform joins")."""
        from common.baselines import POPULARITY_SHARES
        from common.evaluate import evaluate

        scale, scores = self.head.prior_scale.detach().exp().item(), {}
        for share in POPULARITY_SHARES:
            self.head.set_popularity(weight=scale * share)
            scores[share] = evaluate(self.score, split, "valid")["ndcg@10"]
        share = max(scores, key=lambda s: (scores[s], -s))
        self.head.set_popularity(weight=scale * share)
        return scores[share]

    # -- catalogue ---------------------------------------------------------------------------------
    def refresh_text_table(self) -> None:
        """Re-encode the whole catalogue if the adapter changed since the table was made."""
        if self.encoder is not None and self._table_version != self.encoder.version:
            self._text_table = self.encoder.encode_catalogue(self.states)
            self._table_version = self.encoder.version

    def train(self, mode: bool = True) -> "Recommender":
        """Entering training (an epoch) brings the table up to date once; within the epoch it is deliberately
        left stale, each step re-encoding only its live items with gradient."""
        self.refresh_text_table()
        return super().train(mode)

    def text_table(self, live_items: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.encoder is None:
            return None
        if not self.training or self._text_table is None:
            self.refresh_text_table()  # scoring always sees the current adapter
        if live_items is None or len(live_items) == 0:
            return self._text_table
        live = self.encoder(self.states, live_items)
        return self._text_table.index_put((live_items.to(live.device),), live)

    # -- training ----------------------------------------------------------------------------------
    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, live_items: torch.Tensor | None,
             kind: str = "softmax", negatives: int = 256, generator: torch.Generator | None = None,
             ratings: torch.Tensor | None = None) -> torch.Tensor:
        """Next-item cross-entropy at every non-padding position of right-aligned [B, L] sequences.

        With a rating output and ``ratings`` [B, L] (the targets' ratings, NaN = unrated), plus rating-weight x
        the mean squared error of the predicted ratings.
        """
        items = self.head.item_vectors(self.text_table(live_items))
        states = self.head.user_states(inputs, items)
        extra = self._rating_loss(states, items, targets, ratings) if self.head.rating is not None else 0.0
        keep = targets > 0
        states, targets = states[keep], targets[keep]
        if kind == "softmax":
            # the padding item is never a candidate
            logits = self.head.similarity(states, items[1:], dtype=self.logits_dtype)
            return F.cross_entropy(logits, targets - 1) + extra
        sampled = torch.randint(1, self.num_items + 1, (negatives,), generator=generator).to(items.device)
        positive = self.head.similarity(states[:, None, :], items[targets][:, None, :]).squeeze(-1)
        negative = self.head.similarity(states, items[sampled])
        negative = negative.masked_fill(sampled[None, :] == targets[:, None], float("-inf"))
        logits = torch.cat([positive, negative], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device)) + extra

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, table: torch.Tensor | None,
                ratings: torch.Tensor | None = None, negatives: torch.Tensor | None = None) -> torch.Tensor:
        """``loss`` written with masks instead of data-dependent indexing, so that ``torch.func.vmap`` can run it
        once per user (user-level DP, common/privacy.py): the mean next-item cross-entropy over the non-padding
        positions of [W, L] windows (0 if there are none), the catalogue's text vectors ``table`` given.
        ``negatives``: the sampled-softmax candidates (None = the whole catalogue)."""
        return self.items_loss(self.head.item_vectors(table), inputs, targets, ratings, negatives)

    def items_loss(self, items: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor,
                   ratings: torch.Tensor | None = None, negatives: torch.Tensor | None = None,
                   prior: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` from the item vectors [num_items + 1, d] (DP takes per-user gradients of those, and passes
        the text prior's constant columns apart as ``prior``: ``RecommendationHead.similarity``)."""
        states = self.head.user_states(inputs, items, prior)

        def similarity(states, index, dtype=None):
            return self.head.similarity(states, items[index], None if prior is None else prior[index], dtype)

        keep = (targets > 0).to(states.dtype)
        count = keep.sum().clamp(min=1.0)
        if negatives is None:
            logits = similarity(states, slice(1, None), self.logits_dtype)
            nll = F.cross_entropy(logits.flatten(0, -2), (targets - 1).clamp(min=0).flatten(), reduction="none")
        else:
            positive = similarity(states[..., None, :], targets[..., None]).squeeze(-1)
            negative = similarity(states, negatives)
            negative = negative.masked_fill(negatives == targets[..., None], float("-inf"))
            nll = -torch.log_softmax(torch.cat([positive, negative], -1), -1)[..., 0].flatten()
        loss = (nll * keep.flatten()).sum() / count
        if self.head.rating is not None and ratings is not None:
            rated = keep * ~torch.isnan(ratings)
            predicted = self.head.predict_ratings(states, items[targets])
            error = (predicted - torch.nan_to_num(ratings).to(predicted.dtype)).pow(2) * rated
            loss = loss + self.rating_weight * error.sum() / rated.sum().clamp(min=1.0)
        return loss

    def _rating_loss(self, states: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                     ratings: torch.Tensor | None) -> torch.Tensor | float:
        if ratings is None:
            return 0.0
        rated = (targets > 0) & ~torch.isnan(ratings)
        if not rated.any():
            return 0.0
        predicted = self.head.predict_ratings(states[rated], items[targets[rated]])
        return self.rating_weight * F.mse_loss(predicted, ratings[rated].to(predicted.dtype))

    # -- inference ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def item_vectors(self) -> torch.Tensor:
        return self.head.item_vectors(self.text_table())

    @torch.inference_mode()
    def score(self, histories: list[np.ndarray], items: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B, num_items + 1] of every item after each history (column 0 is the padding item)."""
        return score_histories(self.head, self.item_vectors() if items is None else items, histories, self.max_len)

    @torch.inference_mode()
    def predict_ratings(self, histories: list[np.ndarray], targets: np.ndarray) -> torch.Tensor:
        """The rating each user would give its target item after its history: [B] (needs rating-weight > 0)."""
        items = self.item_vectors()
        states = self.head.last_states(pad_left(histories, self.max_len).to(items.device), items)
        return self.head.predict_ratings(states, items[torch.as_tensor(targets, device=items.device)])

    def private_state(self) -> dict[str, torch.Tensor]:
        """What stays on the platform: item IDs, theta, rating output (the shared parts are the encoder's)."""
        return self.head.private_state() if self.encoder is not None else \
            {k: v.detach().clone() for k, v in self.head.state_dict().items()}


def score_histories(head: RecommendationHead, items: torch.Tensor, histories: list[np.ndarray],
                    max_len: int) -> torch.Tensor:
    """User state after each history (its last max_len items) . every item vector: scores [B, items]."""
    inputs = pad_left(histories, max_len).to(items.device)
    return head.similarity(head.last_states(inputs, items), items)


def pad_left(sequences: list[np.ndarray], max_len: int, fill: float = 0, dtype: type = np.int64) -> torch.Tensor:
    """Right-aligned [B, L] tensor of the last ``max_len`` items of each sequence (``fill`` = padding)."""
    width = max(1, min(max_len, max((len(s) for s in sequences), default=1)))
    out = np.full((len(sequences), width), fill, dtype=dtype)
    for row, seq in enumerate(sequences):
        tail = seq[-width:]
        if len(tail):
            out[row, width - len(tail):] = tail
    return torch.from_numpy(out)
