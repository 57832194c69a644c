"""The private recommendation head: item vectors (text fused with local IDs) and a SASRec-style user encoder.

Nothing here leaves a platform. theta, the weight of text against IDs (the "transfer parameter"), is either
learned (a sigmoid of one parameter) or fixed by the config. With ``rating-weight`` > 0 it also predicts the
explicit rating a user gives the next item (the seed's MSE example).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from common.config import DataConfig, ModelConfig


class RecommendationHead(nn.Module):
    def __init__(self, num_items: int, text_dim: int | None, model: ModelConfig, data: DataConfig):
        super().__init__()
        d = model.hidden_size
        self.num_items = num_items
        self.text_proj = nn.Linear(text_dim, d) if text_dim else None
        self.item_emb = nn.Embedding(num_items + 1, d, padding_idx=0) if model.item_ids else None
        if self.item_emb is not None:
            nn.init.normal_(self.item_emb.weight, std=0.02)
            with torch.no_grad():
                self.item_emb.weight[0].zero_()
        theta = model.fusion_theta()
        self.theta_logit = nn.Parameter(torch.zeros(())) if theta is None else None
        self.fixed_theta = theta
        self.position = nn.Embedding(data.max_len, d)
        layer = nn.TransformerEncoderLayer(d, model.head_heads, dim_feedforward=d, dropout=model.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, model.head_layers, enable_nested_tensor=False)
        self.input_norm = nn.LayerNorm(d)
        self.output_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(model.dropout)
        self.heads = model.head_heads
        # explicit rating of the next item from (user state, item vector); offset = the training mean rating
        self.rating = None
        if model.rating_weight > 0:
            self.rating = nn.Sequential(nn.Linear(3 * d, d), nn.GELU(), nn.Linear(d, 1))
            self.register_buffer("rating_offset", torch.zeros(()))

    def predict_ratings(self, states: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Ratings [...] from matching user states and item vectors [..., d]; needs rating-weight > 0."""
        return self.rating_offset + self.rating(torch.cat([states, items, states * items], -1)).squeeze(-1)

    def theta(self) -> torch.Tensor | float:
        """Weight of the text vector in the fused item vector (1 = text only, 0 = IDs only)."""
        if self.text_proj is None:
            return 0.0
        if self.item_emb is None:
            return 1.0
        return torch.sigmoid(self.theta_logit) if self.theta_logit is not None else self.fixed_theta

    def item_vectors(self, text: torch.Tensor | None) -> torch.Tensor:
        """[num_items + 1, d] from the catalogue's text vectors [num_items + 1, text_dim] (row 0 = padding)."""
        out = self.text_vectors(text) if self.text_proj is not None else 0.0
        if self.item_emb is not None:
            out = out + (1.0 - self.theta()) * self.item_emb.weight
        return out

    def text_vectors(self, text: torch.Tensor) -> torch.Tensor:
        """The text part of item vectors: all an item never seen in training (no ID embedding) has."""
        return self.theta() * self.text_proj(text)

    def user_states(self, sequences: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Causal user state after every position of right-aligned sequences [B, L] (0 = padding)."""
        length = sequences.shape[1]
        x = items[sequences] * math.sqrt(items.shape[1])
        x = x + self.position.weight[-length:][None]
        x = self.dropout(self.input_norm(x))
        pad = sequences == 0
        # causal, no attention to padding, but every position may attend to itself (keeps softmax finite)
        blocked = torch.triu(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=1)
        blocked = (blocked[None] | pad[:, None, :]) & ~torch.eye(length, dtype=torch.bool, device=x.device)[None]
        x = self.blocks(x, mask=blocked.repeat_interleave(self.heads, 0))
        x = x * (~pad)[..., None]
        return self.output_norm(x)
