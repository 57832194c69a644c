"""The private recommendation head: item vectors (text fused with local IDs) and a SASRec-style user encoder.

The item-ID embeddings, theta and the rating output never leave a platform; the text adaptor and the sequence
encoder (``SharedHead``) are shared through the federation with the LoRA adapter. theta, the weight of text against IDs (the "transfer parameter"), is either
learned (a sigmoid of one parameter) or fixed by the config. With ``rating-weight`` > 0 it also predicts the
explicit rating a user gives the next item (the seed's MSE example).

With ``text-prior`` every score also holds the zero-shot text ranking, and the learned part starts at zero (the
sequence encoder's output scale is zero-initialised, ReZero-style): an untrained head ranks exactly like MiniLM
zero-shot, and training moves away from it only as far as validation rewards. An item vector is then
``[fused vector | whitened, normalised text vector]`` (the whitening made from the catalogue's own texts) and a
user state ``[sequence state | normalised recency-weighted mean of the history's text vectors]``, ``similarity``
adds the two terms, and scoring, export and serving stay the same code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.config import DataConfig, ModelConfig


# w of the popularity term in steps of 1/POPULARITY_STEP of its parameter: the term needs w of about 1-2 (log
# counts of 0-4 against the prior's 5.7 x cosine), and a DP run's few dozen Adam steps at lr 1e-2 move a
# parameter by at most a few tenths
POPULARITY_STEP = 10.0


class RecommendationHead(nn.Module):
    """Item vectors (text through the shared adaptor, fused with private IDs) and the shared user encoder.

    ``shared`` (the text adaptor and the sequence encoder) is what a federation averages; pass the encoder's
    (``TextEncoder.shared``) so that it travels with the LoRA adapter, or leave it None for a head of its own
    (ID-only SASRec). item_emb, theta and the rating output never leave the platform.
    """

    def __init__(self, num_items: int, text_dim: int | None, model: ModelConfig, data: DataConfig,
                 shared: "SharedHead | None" = None):
        super().__init__()
        d = model.hidden_size
        self.num_items = num_items
        self.width = d  # of the learned part of item vectors and user states
        self.prior = bool(text_dim) and model.text_prior
        if self.prior:
            # log of the prior's scale and its recency weight, set by Recommender (from the data; under DP public)
            self.prior_scale = nn.Parameter(torch.zeros(()))
            self.register_buffer("prior_decay", torch.tensor(0.5))
            # the catalogue's whitening of its text vectors (mean, matrix), set by Recommender; identity = none
            self.register_buffer("prior_mean", torch.zeros(text_dim))
            self.register_buffer("prior_whiten", torch.eye(text_dim))
        # the item popularity term (``popularity-prior``): w x log(1 + training users) rides on the prior's item
        # columns as one more column. Recommender sets the counts and w's start (chosen on validation, like the
        # recency weight); under DP w starts at 0 and the trainer's DP plug-in releases the counts with noise
        self.popularity = self.prior and model.popularity_prior
        if self.popularity:
            self.register_buffer("prior_popularity", torch.zeros(num_items + 1))
            self.popularity_weight = nn.Parameter(torch.zeros(()))
        self._prior_columns: tuple | None = None  # (key, text table, its prior columns): prior_vectors' cache
        # the prior's columns are functions of the frozen text alone unless LoRA adapts the encoder: then no
        # gradient flows through them (one catalogue-wide product instead of three, per user under DP)
        self.prior_constant = model.lora_layers == 0
        self.shared = shared if shared is not None else SharedHead(text_dim, model, data.max_len)
        self.temperature = model.temperature
        self.item_emb = nn.Embedding(num_items + 1, d, padding_idx=0) if model.item_ids else None
        if self.item_emb is not None:
            nn.init.normal_(self.item_emb.weight, std=0.02)
            with torch.no_grad():
                self.item_emb.weight[0].zero_()
        theta = model.fusion_theta()
        self.theta_logit = nn.Parameter(torch.zeros(())) if theta is None else None
        self.fixed_theta = theta
        # explicit rating of the next item from (user state, item vector); offset = the training mean rating
        self.rating = None
        if model.rating_weight > 0:
            self.rating = nn.Sequential(nn.Linear(3 * d, d), nn.GELU(), nn.Linear(d, 1))
            self.register_buffer("rating_offset", torch.zeros(()))

    @property
    def item_width(self) -> int:
        """Width of item vectors: the learned part, plus the text prior's when it is on (and its popularity
        column); user states have no popularity column."""
        return self.width + (self.text_proj.weight.shape[1] + self.popularity if self.prior else 0)

    @property
    def text_proj(self) -> "TextAdaptor | None":
        return self.shared.adaptor

    def private_state(self) -> dict[str, torch.Tensor]:
        """What stays on the platform: everything but the shared adaptor and sequence encoder."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("shared.")}

    def load_private_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load what ``private_state`` gave (or a whole state dict); the shared part is left as it is."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("shared.")]
        if missing or unexpected:
            raise ValueError(f"head state: missing {missing[:3]}, unexpected {unexpected[:3]}")

    def item_parameters(self) -> list[nn.Parameter]:
        """The parameters ``item_vectors`` is made of (text adaptor, theta, item IDs): they reach a loss only
        through the item table."""
        text = list(self.text_proj.parameters()) if self.text_proj is not None else []
        ids = [self.item_emb.weight] if self.item_emb is not None else []
        mixed = self.theta_logit is not None and text and ids  # theta is used only to mix the two
        return text + ids + ([self.theta_logit] if mixed else [])

    def predict_ratings(self, states: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Ratings [...] from matching user states and item vectors [..., d]; needs rating-weight > 0."""
        states, items = states[..., :self.width], items[..., :self.width]
        return self.rating_offset + self.rating(torch.cat([states, items, states * items], -1)).squeeze(-1)

    def theta(self) -> torch.Tensor | float:
        """Weight of the text vector in the fused item vector (1 = text only, 0 = IDs only)."""
        if self.text_proj is None:
            return 0.0
        if self.item_emb is None:
            return 1.0
        return torch.sigmoid(self.theta_logit) if self.theta_logit is not None else self.fixed_theta

    def item_vectors(self, text: torch.Tensor | None, with_prior: bool = True) -> torch.Tensor:
        """[num_items + 1, item_width] from the catalogue's text vectors [num_items + 1, text_dim] (row 0 =
        padding); ``with_prior=False``: the learned columns alone [num_items + 1, width] (what DP differentiates)."""
        out = self.theta() * self.text_proj(text) if self.text_proj is not None else 0.0
        if self.item_emb is not None:
            out = out + (1.0 - self.theta()) * self.item_emb.weight
        return self._append_prior(out, text) if with_prior else out

    def text_vectors(self, text: torch.Tensor) -> torch.Tensor:
        """The text part of item vectors: all an item never seen in training (no ID embedding, no popularity)
        has."""
        return self._append_prior(self.theta() * self.text_proj(text), text, catalogue=False)

    def _append_prior(self, learned: torch.Tensor, text: torch.Tensor | None, catalogue: bool = True
                      ) -> torch.Tensor:
        return torch.cat([learned, self.prior_vectors(text, catalogue)], -1) if self.prior else learned

    def prior_vectors(self, text: torch.Tensor, catalogue: bool = True) -> torch.Tensor:
        """The text prior's item columns: the frozen text vectors, whitened for the catalogue and normalised (no
        trained parameter), then with ``popularity-prior`` log(1 + the item's training users) (``catalogue``:
        ``text`` is the whole catalogue, row i item i; else texts of new items, popularity 0). Without LoRA the
        text table is the same between refreshes, so its columns are made once and kept, keyed on the storage and
        in-place version of the table and of the whitening (the catalogue-wide 384 x 384 product at every step
        cost 18 ms on Scientific, 55 ms on Last.fm, one thread)."""
        if text.requires_grad or not catalogue:  # LoRA's live items (with gradient), or new items: made afresh
            return self._with_popularity(prior_items(text, self.prior_mean, self.prior_whiten), catalogue)
        held = (text, self.prior_mean, self.prior_whiten) + ((self.prior_popularity,) if self.popularity else ())
        key = tuple((t.data_ptr(), t.shape, -1 if t.is_inference() else t._version)  # no version counter there
                    for t in held)
        if self._prior_columns is None or self._prior_columns[0] != key:  # the table is held: no reused storage
            columns = self._with_popularity(prior_items(text, self.prior_mean, self.prior_whiten), catalogue)
            self._prior_columns = (key, text, columns)
        return self._prior_columns[2]

    def _with_popularity(self, columns: torch.Tensor, catalogue: bool) -> torch.Tensor:
        if not self.popularity:
            return columns
        if not catalogue:  # new items: no training users
            return torch.cat([columns, columns.new_zeros(columns.shape[:-1] + (1,))], -1)
        return torch.cat([columns, torch.log1p(self.prior_popularity.clamp(min=0)).to(columns.dtype)[:, None]], -1)

    def set_popularity(self, counts=None, weight: float | None = None) -> None:
        """Whichever is given: the items' training users (``SplitData.user_popularity``, or its noisy release
        under DP), the term's weight in logits per unit of log(1 + count) (its parameter holds weight /
        POPULARITY_STEP)."""
        if counts is not None:
            self.prior_popularity.copy_(torch.as_tensor(counts, dtype=torch.float32))
        if weight is not None:
            self.popularity_weight.data.fill_(weight / POPULARITY_STEP)

    def similarity(self, states: torch.Tensor, items: torch.Tensor, prior: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """Logits [..., n] of user states [..., d] against item vectors [..., n, d]: a dot product, or with a
        temperature the cosine / temperature (UniSRec), which keeps text vectors of any norm on one scale; plus
        the text prior's scale x cosine. The prior's cosines are a product of constants (the frozen text), so
        autograd keeps them for the scale's gradient and runs no 384-wide backward (the slices are detached:
        they are slices of tensors whose learned columns do need gradients).
        ``prior``: the prior's item columns given apart, ``items`` then holding the learned ones alone (DP takes
        per-user gradients of the learned table: slicing one wide table would make each user's gradient as wide
        as the whole table, 7x the work). ``dtype``: the learned logits' product in that format (training's
        ``logits-dtype``), returned in the states' format."""
        w = self.width
        user, (item, item_text) = states[..., :w], self._columns(items, prior)
        if self.temperature:
            user, item = F.normalize(user, dim=-1) / self.temperature, F.normalize(item, dim=-1)
        if isinstance(item, TextSpaceItems):
            logits = item.scores(user)
        elif dtype is not None and dtype != user.dtype:
            logits = (user.to(dtype) @ item.to(dtype).transpose(-1, -2)).to(user.dtype)
        else:
            logits = user @ item.transpose(-1, -2)
        if self.prior:
            user = states[..., w:]
            if self.prior_constant:
                user, item_text = user.detach(), item_text.detach()
            k = user.shape[-1]
            logits = logits + self.prior_scale.exp() * (user @ item_text[..., :k].transpose(-1, -2))
            if self.popularity:  # [..., 1, n], as the logits [..., m, n]
                logits = logits + POPULARITY_STEP * self.popularity_weight * item_text[..., None, :, k].detach()
        return logits

    def user_states(self, sequences: torch.Tensor, items: torch.Tensor, prior: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """The user state after every position of right-aligned sequences [B, L] -> [B, L, state width]
        (``prior`` as in ``similarity``)."""
        items, text = self._columns(items, prior)
        return self._with_prior(self.shared.sequence(sequences, items), sequences, text, last=False)

    def last_states(self, sequences: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The user state after each whole sequence [B, state width]: what ranking needs (eval mode)."""
        items, text = self._columns(items)
        return self._with_prior(self.shared.sequence.last_state(sequences, items), sequences, text, last=True)

    def _columns(self, items: torch.Tensor, prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(learned columns, text prior's columns) of item vectors, given together or apart."""
        if prior is not None or isinstance(items, TextSpaceItems):
            return items, prior
        return items[..., :self.width], items[..., self.width:]

    def _with_prior(self, states: torch.Tensor, sequences: torch.Tensor, text: torch.Tensor, last: bool
                    ) -> torch.Tensor:
        """Append the text prior's user part: the normalised mean of the history's normalised text vectors
        ``text`` [num_items + 1, k], weighted decay^age (the latest item age 0), as
        ``common.baselines.zero_shot_scorer`` ranks."""
        if not self.prior:
            return states
        if self.popularity:  # the items' popularity column is not part of the history's mean
            text = text[..., :-1]
        text = text[sequences]  # [B, L, k]; padding rows are zero
        position = torch.arange(sequences.shape[1], device=text.device)
        if last:
            mean = torch.einsum("s,bsk->bk", self.prior_decay ** (position[-1] - position).to(text.dtype), text)
        else:
            age = position[:, None] - position[None, :]
            weights = torch.where(age >= 0, self.prior_decay ** age.clamp(min=0).to(text.dtype), 0.0)
            mean = torch.einsum("ts,bsk->btk", weights, text)
        return torch.cat([states, F.normalize(mean, dim=-1)], -1)


class SharedHead(nn.Module):
    """The recommendation part a federation shares: text adaptor (None without text) + sequence encoder.
    Its tensors' shapes depend only on the config, never on a catalogue or on users."""

    def __init__(self, text_dim: int | None, model: ModelConfig, max_len: int):
        super().__init__()
        self.adaptor = TextAdaptor(text_dim, model.hidden_size, model.adaptor_experts) if text_dim else None
        self.sequence = SequenceEncoder(model, max_len)
        if model.text_prior and text_dim:  # the learned score starts at 0: an untrained model is the text prior
            nn.init.zeros_(self.sequence.output_norm.weight)
        if self.adaptor is not None and not model.train_adaptor:  # it stays at the shared start
            self.adaptor.requires_grad_(False)


class SequenceEncoder(nn.Module):
    """SASRec's user encoder: causal transformer over the item vectors of a history, learned positions.

    The parameters are those of PyTorch's pre-norm ``TransformerEncoderLayer`` (so the shared tensors keep their
    names), but the layers are spelled out in ``_encode``: scoring runs the last layer for the last position alone,
    and dropout draws its mask with ``torch.rand_like`` (``dropout``)."""

    def __init__(self, model: ModelConfig, max_len: int):
        super().__init__()
        d = model.hidden_size
        self.position = nn.Embedding(max_len, d)
        # parameters only (its dropout modules are never called): ``_encode`` runs the layers
        layer = nn.TransformerEncoderLayer(d, model.head_heads, dim_feedforward=d, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, model.head_layers, enable_nested_tensor=False)
        self.input_norm = nn.LayerNorm(d)
        self.output_norm = nn.LayerNorm(d)
        self.dropout_p = model.dropout
        self.heads = model.head_heads

    def forward(self, sequences: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Causal user state after every position of right-aligned sequences [B, L] (0 = padding)."""
        x, pad = self._encode(sequences, items, last_only=False)
        return self.output_norm(x * (~pad)[..., None])

    def last_state(self, sequences: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``forward(sequences, items)[:, -1]`` for scoring, at about half the cost: the last layer runs its
        attention query and its feed-forward for the last position alone (tests/test_model.py). In training, with
        dropout, it is ``forward``'s, so that a batch draws one mask whichever is asked."""
        if self.training:
            return self.forward(sequences, items)[:, -1]
        x, pad = self._encode(sequences, items, last_only=True)
        return self.output_norm(x[:, -1] * (~pad[:, -1:]))

    def _encode(self, sequences: torch.Tensor, items: torch.Tensor, last_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The layers (``norm_first`` ``TransformerEncoderLayer``, one [B, 1, L, L] mask for all heads), and the
        padding [B, L]. Attention is ``scaled_dot_product_attention`` unless dropout is on, whose mask on the
        attention weights this spells out too (PyTorch's would draw it with ``bernoulli_``)."""
        length = sequences.shape[1]
        p = self.dropout_p if self.training else 0.0
        x = items[sequences] * math.sqrt(items.shape[1])
        x = dropout(self.input_norm(x + self.position.weight[-length:][None]), p)
        pad = sequences == 0
        # causal, no attention to padding, but every position may attend to itself (keeps softmax finite)
        blocked = torch.triu(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=1)
        blocked = (blocked[None] | pad[:, None, :]) & ~torch.eye(length, dtype=torch.bool, device=x.device)[None]
        allowed = ~blocked[:, None]
        layers = self.blocks.layers
        for n, layer in enumerate(layers):
            attention = layer.self_attn
            q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in
                       F.linear(layer.norm1(x), attention.in_proj_weight, attention.in_proj_bias).chunk(3, -1))
            mask = allowed
            if last_only and n == len(layers) - 1:
                x, q, mask = x[:, -1:], q[:, :, -1:], allowed[:, :, -1:]
            if p:
                weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
                mixed = dropout(weights.softmax(-1), p) @ v
            else:
                mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + dropout(attention.out_proj(mixed.transpose(1, 2).flatten(2)), p)
            x = x + dropout(layer.linear2(dropout(layer.activation(layer.linear1(layer.norm2(x))), p)), p)
        return x, pad


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``F.dropout(x, p)`` in training, its mask drawn with ``torch.rand_like``: the same distribution, at half
    the CPU time or less (``bernoulli_``, F.dropout's mask, took a third of an ID-only SASRec epoch at p = 0.5).
    Under ``vmap(randomness="different")`` (per-user DP gradients) every user draws its own mask."""
    if not p:
        return x
    return x * ((torch.rand_like(x) >= p).to(x.dtype) * (1.0 / (1.0 - p)))


class TextSpaceItems:
    """The learned item columns of a one-expert text adaptor without item IDs, ``adaptor(text)`` = ``(text - b) W``
    (zero for items without text), kept factored: ``scores`` maps user states back to the text space (``s W^T``)
    and scores them against the catalogue's text vectors. Under user-level DP this is each user's loss as a
    function of the adaptor itself, at positions x catalogue x text_dim per user, instead of a per-user gradient of
    the whole item table pulled back to the adaptor (catalogue x text_dim x width per user; common/privacy.py).
    Indexing with a slice keeps it factored (the candidates); with a tensor it gives those items' vectors. The
    adaptor's weights are read when used, so under ``torch.func.functional_call`` they are the call's."""

    def __init__(self, text: torch.Tensor, adaptor: "TextAdaptor", present: torch.Tensor | None = None):
        self.text, self.adaptor = text, adaptor  # [n, k]
        self.present = has_text(text)[..., 0] if present is None else present  # once, not once per user
        self.shape = (text.shape[0], adaptor.weight.shape[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TextSpaceItems(self.text[index], self.adaptor, self.present[index])
        return self.adaptor(self.text[index])

    def scores(self, user: torch.Tensor) -> torch.Tensor:
        """user [..., d] . every item vector: [..., n]."""
        back = user @ self.adaptor.weight[0].T
        return (back @ self.text.T - (back @ self.adaptor.bias[0])[..., None]) * self.present


class TextAdaptor(nn.Module):
    """Text vector -> head space: UniSRec's MoE-enhanced adaptor (KDD 2022).

    Each of ``experts`` parametric-whitening projections ``(x - b_e) W_e`` maps the pretrained vector to the
    head's width, mixed by a softmax gate over x; one expert is a plain affine projection. The vector is used as
    MiniLM gives it: L2-normalising it first, or dropout on it, lowered validation NDCG@10 on Amazon Office
    (0.0688 / 0.0671 vs 0.0753, one seed). The padding item (a zero vector) maps to zero.
    """

    def __init__(self, text_dim: int, d: int, experts: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(experts, text_dim))
        self.weight = nn.Parameter(torch.empty(experts, text_dim, d))
        for w in self.weight:
            nn.init.xavier_uniform_(w)
        self.gate = nn.Linear(text_dim, experts, bias=False) if experts > 1 else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)  # start as the plain mean of the experts

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        present = has_text(text)  # text [..., text_dim]
        # (x - b) W written as x W - b W: the same values, but the bias's gradient is then the column sum of the
        # output's gradient times W, not a catalogue-sized product (DP pulls back one gradient per user)
        out = torch.einsum("...k,ekd->...ed", text, self.weight) - torch.einsum("ek,ekd->ed", self.bias, self.weight)
        if self.gate is None:
            return out[..., 0, :] * present
        gate = torch.softmax(self.gate(text), dim=-1)
        return (gate[..., None] * out).sum(-2) * present


def prior_items(text: torch.Tensor, mean: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """Text vectors as the text prior compares them: ``(text - mean) @ whiten``, normalised; the padding item
    stays a zero row (``common.baselines.whitening`` makes ``mean`` and ``whiten`` from the catalogue's texts)."""
    return F.normalize((text - mean) @ whiten, dim=-1) * has_text(text)


def has_text(text: torch.Tensor) -> torch.Tensor:
    """[..., 1]: 1 for an item with a text vector, 0 for the padding item (a zero vector)."""
    return (text.abs().sum(-1, keepdim=True) > 0).to(text.dtype)
