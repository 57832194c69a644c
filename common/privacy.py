"""User-level DP-SGD for one platform, a plug-in of the one epoch body (``Trainer.epoch``, common/train.py).

The unit of privacy is one user: all of that user's training windows. Each step samples users independently with
probability q (Poisson sampling, which opacus's RDP accountant assumes; drawn from a secret generator, so the
sample is not predictable from the run's public seed), computes one gradient per sampled user, clips it to L2 norm
``dp-clip``, sums, adds Gaussian noise of std ``sigma * dp-clip`` and divides by the expected number of users
``q * n``; the optimiser then takes its step as in non-private training. Opacus's ``RDPAccountant`` tracks
(sigma, q, steps) across rounds (its history travels in the trainer state) and reports epsilon at delta.

Per-user gradients, two paths:
- frozen encoder (lora-layers = 0, the default): vectorised. ``torch.func``: ``grad`` of each user's loss
  (``Recommender.items_loss``) ``vmap``-ed over the step's users (one pass per group of users with the same
  number of windows) with respect to the sequence encoder and the item table; each user's table gradient is then
  pulled back to the text adaptor, theta and the ID table by one batched VJP (``user_gradients``). Without item
  IDs (the DP recipe), users with short histories take the adaptor's gradient directly instead, scoring in the
  text space (``TextSpaceItems``): cheaper than a catalogue-sized table gradient per user.
- LoRA (lora-layers > 0): a step re-encodes sampled items through peft's LoRA layers; vmap over those is
  impractical, so each user is one micro-batch with its share of ``live-items`` (one forward/backward per user),
  the previous implementation, kept as a correct fallback.

What is trained under DP: every trainable parameter, shared (text adaptor, sequence encoder, LoRA) or private
(item IDs, theta, the rating output); all are clipped and noised together, so nothing trained without noise feeds
what leaves. With ``popularity-prior`` the items' counts of training users are released once, before the first
step (``release_popularity``: Gaussian noise, sensitivity 1, accounted with the steps). See README, "What
user-level DP guarantees".
"""

from __future__ import annotations

import secrets
from typing import Callable

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.config import PollenConfig
from common.model.head import TextSpaceItems

# How per-user gradients are batched, by device: (window-length step, logits per vmap chunk). Users are grouped by
# their number of windows and their longest window rounded up to the step (None: by windows alone), and vmap-ed as
# many at a time as keep a chunk's logits (users x windows x length x candidates) within the budget: per-user
# gradients on a large catalogue and long histories are what fills the memory (a Last.fm client held 5 GB with 64
# users a chunk). A CPU gains from cutting padding, at the price of more, smaller vmaps; a GPU is bound by kernel
# launches and wants few, large ones (H200, DP recipe, DP / plain epoch wall time: CPU grouping 9-14x, GPU 3-8x).
GROUPING = {"cpu": (8, 2 ** 25), "cuda": (None, 2 ** 31)}


class UserLevelDP:
    def __init__(self, owners: np.ndarray, config: PollenConfig):
        """``owners[w]`` = the user of training window w."""
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier

        privacy = config.privacy
        self.owners = owners
        order = np.argsort(owners, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(owners[order]) != 0])
        self.users = np.split(order, starts[1:])  # window indices of each user
        self.num_users = len(self.users)
        if self.num_users == 0:
            raise ValueError("dp: the platform has no training windows")
        users_per_step = privacy.dp_users_per_step or config.train.batch_size
        self.sample_rate = min(1.0, users_per_step / self.num_users)
        self.steps_per_epoch = max(1, round(1 / self.sample_rate))  # about one pass over the users
        if config.train.max_steps:
            self.steps_per_epoch = min(self.steps_per_epoch, config.train.max_steps)
        # LoRA fallback: each user re-encodes its share of live-items, so a step costs the encoder what a
        # non-private step does
        live = config.train.live_items
        self.live_items_per_user = max(1, round(live / users_per_step)) if live > 0 else 0
        self.planned_steps = config.federation.num_rounds * config.train.local_epochs * self.steps_per_epoch
        self.delta = privacy.dp_delta or 1.0 / self.num_users
        self.clip = privacy.dp_clip
        self.noise = privacy.dp_noise
        self.accountant = RDPAccountant()
        # popularity-prior: the item counts are released once (``release_popularity``), a Gaussian mechanism on
        # the whole platform (sample rate 1) at dp-popularity-share of epsilon, composed with the training steps
        self.popularity_noise = 0.0
        if config.model.popularity_prior and privacy.dp_epsilon > 0:
            self.popularity_noise = get_noise_multiplier(
                target_epsilon=privacy.dp_popularity_share * privacy.dp_epsilon, target_delta=self.delta,
                sample_rate=1.0, steps=1, accountant="rdp")
        if privacy.dp_epsilon > 0:  # calibrate sigma so the planned run (and the release) ends at the target
            self.noise = calibrate(privacy.dp_epsilon, self.delta, self.sample_rate, self.planned_steps,
                                   [(self.popularity_noise, 1.0, 1)] if self.popularity_noise else [])
        # neither the noise nor the sample of users may be predictable from the run's public seed
        self.noise_generator = torch.Generator().manual_seed(secrets.randbits(63))
        self.sampler = np.random.default_rng(secrets.randbits(128))

    def release_popularity(self, counts: np.ndarray) -> torch.Tensor:
        """The items' training users (``SplitData.user_popularity``: one user moves them by at most L2 norm 1)
        plus N(0, popularity_noise^2) per item, accounted as one step at sample rate 1. Called once per platform
        (the trainer's start); the result is private state, kept with the head across rounds."""
        noise = torch.randn(len(counts), generator=self.noise_generator, dtype=torch.float64)
        self.accountant.step(noise_multiplier=self.popularity_noise, sample_rate=1.0)
        return torch.as_tensor(counts, dtype=torch.float64) + noise * self.popularity_noise

    # -- sampling ----------------------------------------------------------------------------------
    def sample(self) -> list[np.ndarray]:
        """The window indices of each user drawn for one step (each user independently with probability q)."""
        return [self.users[u] for u in np.flatnonzero(self.sampler.random(self.num_users) < self.sample_rate)]

    def plan(self) -> list[np.ndarray]:
        """One epoch: ``steps_per_epoch`` steps, each the windows of the users sampled for it, user by user."""
        return [np.concatenate(users) if users else np.zeros(0, dtype=np.int64)
                for users in (self.sample() for _ in range(self.steps_per_epoch))]

    # -- one private step --------------------------------------------------------------------------
    def backward(self, model, params: list[torch.Tensor], idx: np.ndarray, batch: tuple | None,
                 live_items: Callable | None = None, negatives: torch.Tensor | None = None) -> float:
        """Set ``p.grad`` of ``params`` from the noisy mean of the clipped per-user gradients of the step's users
        (``idx``: their windows, user by user; ``batch``: (inputs, targets, ratings) of those windows or None
        when no user was sampled); one accountant step. Returns the mean per-user loss (NaN without users)."""
        total, losses = [torch.zeros_like(p) for p in params], []
        if batch is not None and len(idx):
            users = segments(self.owners[idx])
            if live_items is None:
                losses = self._vectorised(model, params, users, batch, total, negatives)
            else:
                losses = self._per_user(model, params, users, batch, total, live_items, negatives)
        self.set_noisy_grads(params, total)
        return float(np.mean(losses)) if len(losses) else float("nan")

    def _vectorised(self, model, params, users, batch, total, negatives) -> list[float]:
        """Per-user gradients (``user_gradients``), clipped and summed into ``total``."""
        grads, losses = user_gradients(model, params, users, batch, negatives)
        norms = torch.sqrt(sum(g.reshape(len(g), -1).pow(2).sum(1) for g in grads))
        scale = (self.clip / (norms + 1e-12)).clamp(max=1.0)
        for t, g in zip(total, grads):
            t.add_(torch.tensordot(scale, g, dims=1))
        return losses.tolist()

    def _per_user(self, model, params, users, batch, total, live_items, negatives) -> list[float]:
        """LoRA fallback: one forward/backward per user (a micro-batch of its windows), clipped and summed."""
        inputs, targets, ratings = batch
        losses = []
        for rows in users:
            x, y = inputs[rows], targets[rows]
            r = ratings[rows] if ratings is not None else None
            loss = model(x, y, model.text_table(live_items(x, y, self.live_items_per_user)), r, negatives)
            self.add_clipped(total, torch.autograd.grad(loss, params, allow_unused=True))
            losses.append(loss.item())
        return losses

    def add_clipped(self, total: list[torch.Tensor], grads: tuple[torch.Tensor | None, ...]) -> float:
        """total += grads scaled to norm <= clip; returns the user's unclipped gradient norm."""
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads if g is not None)).item()
        scale = min(1.0, self.clip / (norm + 1e-12))
        for t, g in zip(total, grads):
            if g is not None:
                t.add_(g, alpha=scale)
        return norm

    def set_noisy_grads(self, params: list[torch.Tensor], total: list[torch.Tensor]) -> None:
        """p.grad = (sum of clipped user gradients + N(0, (sigma C)^2)) / (q n); one accountant step."""
        expected = self.sample_rate * self.num_users
        for p, t in zip(params, total):
            noise = torch.randn(t.shape, generator=self.noise_generator) * (self.noise * self.clip)
            p.grad = (t + noise.to(t.device)) / expected
        self.accountant.step(noise_multiplier=self.noise, sample_rate=self.sample_rate)

    # -- accounting --------------------------------------------------------------------------------
    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(self.delta)) if self.accountant.history else 0.0

    def metrics(self) -> dict[str, float]:
        """What a client reports each round: the privacy spent so far and the mechanism's parameters."""
        return {"dp-epsilon": self.epsilon(), "dp-delta": self.delta, "dp-noise": float(self.noise),
                "dp-clip": self.clip, "dp-sample-rate": self.sample_rate,
                "dp-steps": float(sum(steps for _, _, steps in self.accountant.history))}

    def state_dict(self) -> dict:
        return {"history": list(self.accountant.history)}

    def load_state_dict(self, state: dict) -> None:
        self.accountant.history = list(state["history"])


def calibrate(epsilon: float, delta: float, sample_rate: float, steps: int, spent: list[tuple]) -> float:
    """The noise multiplier sigma at which ``steps`` Poisson-sampled Gaussian steps at ``sample_rate``, after the
    mechanisms already ``spent`` (opacus history entries: sigma, sample rate, steps), end at ``epsilon`` at
    ``delta`` under the RDP accountant: opacus's ``get_noise_multiplier`` (the same bisection, within 0.01 of
    epsilon from below), which cannot start from a history."""
    from opacus.accountants import RDPAccountant

    def spend(sigma: float) -> float:
        accountant = RDPAccountant()
        accountant.history = [*spent, (sigma, sample_rate, steps)]
        return accountant.get_epsilon(delta)

    low, high, reached = 0.0, 10.0, float("inf")
    while reached > epsilon:
        high *= 2
        reached = spend(high)
        if high > 1e6:
            raise ValueError(f"dp: epsilon {epsilon} is too low for the planned steps"
                             + (" after the popularity release (lower dp-popularity-share)" if spent else ""))
    while epsilon - reached > 0.01:
        sigma = (low + high) / 2
        spent_at = spend(sigma)
        if spent_at < epsilon:
            high, reached = sigma, spent_at
        else:
            low = sigma
    return high


def split_parameters(model, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(through, direct): the trained parameters that reach the loss only through the item table (text adaptor,
    theta, item IDs: ``RecommendationHead.item_parameters``) and the others (sequence encoder, rating output)."""
    inside = {id(p) for p in model.head.item_parameters()}
    return [p for p in params if id(p) in inside], [p for p in params if id(p) not in inside]


def user_gradients(model, params: list[torch.Tensor], users: list[np.ndarray], batch: tuple,
                   negatives: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each user's gradient of its loss (``Recommender.items_loss`` over its windows) with respect to ``params``,
    stacked [U, *p.shape] in the order of ``users``, and the users' losses [U].

    Two stages. (1) ``torch.func`` grad vmap-ed over users (``GROUPING``; dropout drawn per user) of
    the loss with respect to the direct parameters (``split_parameters``) and the step's item table
    [num_items + 1, d]. (2) Each user's table gradient pulled back to the parameters the table is made of (text
    adaptor, theta, item IDs) by a vmap-ed VJP of ``item_vectors`` (``item_table``; its forward also gives the
    table of stage 1). Before, the adaptor ran over the whole catalogue inside the per-user gradient, forward and
    backward once per user (4-6x a plain epoch on Last.fm); the pull-back is the adaptor's backward alone,
    batched over users. Without item IDs, a group of short windows instead takes the adaptor's gradient in stage
    (1), scoring in the text space (``TextSpaceItems``, where ``text_space_pays``), and skips stage (2). The
    gradients are the same (tested).
    ``users``: each user's rows of ``batch``. Users are grouped by their number of windows (and on a CPU their
    window length, ``GROUPING``), one vmap per group:
    padding every user to the step's most windows cost 4-6x on catalogues of long histories, and one vmap over
    all windows (per-window gradients summed per user) was 1.4-2x slower than this (it materialises a table
    gradient per window instead of per user)."""
    from torch.func import functional_call, grad_and_value, vmap

    loss = HeadLoss(model)
    through, direct = split_parameters(model, params)
    names = parameter_names(loss, direct)
    items, prior, pull, through_names = item_table(model, through)

    def user_loss(weights, table, x, y, r):
        return functional_call(loss, weights, (table, x, y, r, negatives, prior))

    def step(chunk):
        return vmap(grad_and_value(user_loss, argnums=(0, 1)),
                    in_dims=(None, None, 0, 0, 0 if batch[2] is not None else None),
                    randomness="different", chunk_size=chunk)

    # the adaptor's gradient without the item table's: each user's loss as a function of the adaptor itself
    # (``TextSpaceItems``), where that costs less than the table's gradient and its pull-back
    factored = factored_adaptor(model, through)
    if factored:
        text = model.text_table().detach()
        adaptor_names = parameter_names(loss, through)
        items_in_text_space = TextSpaceItems(text, factored)

        def text_space_loss(weights, x, y, r):
            return functional_call(loss, weights, (items_in_text_space, x, y, r, negatives, prior))

        def text_space_step(chunk):
            return vmap(grad_and_value(text_space_loss), in_dims=(None, 0, 0, 0 if batch[2] is not None else None),
                        randomness="different", chunk_size=chunk)

    span_step, budget = GROUPING.get(items.device.type, GROUPING["cuda"])
    candidates = len(items) - 1 if negatives is None else 1 + len(negatives)
    # group key: (windows, the user's longest window rounded up to span_step); windows are right-aligned and
    # positions count from the right, so the leading columns that are padding in every window of a group are
    # cut off exactly (on short histories most of a window is padding)
    length = batch[0].shape[1]
    used = ((batch[0] != 0) | (batch[1] > 0)).sum(1).cpu().numpy()
    span_step = span_step or length
    keys = np.array([(len(u), min(length, -(-used[u].max() // span_step) * span_step)) for u in users])
    grads: dict[str, list] = {name: [] for name in names + through_names}
    losses, order = [], []
    for size, span in np.unique(keys, axis=0):
        group = np.flatnonzero((keys == (size, span)).all(1))
        members = [users[i] for i in group]
        inputs, targets, ratings = (per_user(t[:, -span:], members) if t is not None else None for t in batch)
        chunk = max(1, budget // (size * span * candidates))
        # the fused CPU attention kernels have no vmap batching rule (vmap would loop over users); the math
        # kernel is made of batched matmuls and softmax
        with sdpa_kernel(SDPBackend.MATH):
            if factored and text_space_pays(size * span, text.shape[1], items.shape[1]):
                weights = dict(zip(names + adaptor_names, direct + through))
                part, part_losses = text_space_step(chunk)(weights, inputs, targets, ratings)
                part = {**{n: part[n] for n in names}, **dict(zip(through_names, (part[n] for n in adaptor_names)))}
            else:
                (part, table_part), part_losses = step(chunk)(dict(zip(names, direct)), items, inputs, targets,
                                                              ratings)
                # each user's table gradient pulled back to the parameters the table is made of, a group at a time
                # (the whole step's table gradients at once would be its largest tensor)
                if through:
                    part.update(vmap(lambda g: pull(g)[0], chunk_size=max(1, budget // items.numel()))(table_part))
        for name in grads:
            grads[name].append(part[name])
        losses.append(part_losses.detach())
        order.append(group)
    back = torch.as_tensor(np.argsort(np.concatenate(order), kind="stable"))
    per_user_grads = {id(p): torch.cat(grads[name])[back]
                      for name, p in zip(names + through_names, direct + through)}
    return [per_user_grads[id(p)] for p in params], torch.cat(losses)[back]


def factored_adaptor(model, through: list[torch.Tensor]):
    """The text adaptor when the trained item-table parameters are exactly those of a one-expert adaptor, the
    table is text alone (no item IDs) and logits are dot products: then ``TextSpaceItems`` can stand for the
    table; else None."""
    adaptor = model.head.text_proj
    if adaptor is None or adaptor.gate is not None or model.head.temperature or model.head.item_emb is not None:
        return None
    if {id(p) for p in through} != {id(adaptor.weight), id(adaptor.bias)}:
        return None
    return adaptor


def text_space_pays(positions: int, text_dim: int, width: int) -> bool:
    """Whether a user's loss through ``TextSpaceItems`` (about 2 x positions x text_dim multiply-adds per
    catalogue item) is cheaper than through the item table (3 x positions x width, plus text_dim x width for the
    pull-back): users with short histories (Amazon Office), not MovieLens's long ones."""
    return 2 * positions * text_dim < 3 * positions * width + text_dim * width


def item_table(model, through: list[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor | None, Callable | None, list[str]]:
    """The step's item vectors, learned columns [num_items + 1, d] (detached), the text prior's columns (constants;
    None without the prior: only the learned columns get a per-user gradient, the prior's would make it 7x wider
    and is never used) and, when ``through`` (parameters of ``item_vectors``) is not empty, the VJP that maps a
    gradient of the learned columns to gradients of ``through`` (a dict keyed by the returned names): one forward
    of the adaptor serves both."""
    from torch.func import functional_call, vjp

    table = model.text_table()
    table = table.detach() if table is not None else None
    prior = model.head.prior_vectors(table) if model.head.prior else None
    if not through:
        with torch.no_grad():
            return model.head.item_vectors(table, with_prior=False), prior, None, []
    module = ItemVectors(model.head)
    names = parameter_names(module, through)
    items, pull = vjp(lambda weights: functional_call(module, weights, (table,)), dict(zip(names, through)))
    return items.detach(), prior, pull, names


class ItemVectors(torch.nn.Module):
    """The learned columns of ``RecommendationHead.item_vectors`` as a module's forward, for
    ``torch.func.functional_call``."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, table):
        return self.head.item_vectors(table, with_prior=False)


class HeadLoss(torch.nn.Module):
    """``Recommender.items_loss`` seen through the head alone. The recommender holds the shared adaptor and
    sequence encoder twice (encoder.shared, head.shared); torch.func.functional_call under grad does not restore
    such tied parameters as the module's own (torch 2.13: they come back as plain tensors), so it is given the
    head only."""

    def __init__(self, model):
        super().__init__()
        self.head = model.head
        self._model = [model]  # not registered: its parameters are the head's, plus frozen ones

    def forward(self, *args):
        return self._model[0].items_loss(*args)


def segments(owners: np.ndarray) -> list[np.ndarray]:
    """Row indices of each user in a batch whose rows are grouped user by user."""
    starts = np.flatnonzero(np.r_[True, np.diff(owners) != 0])
    return np.split(np.arange(len(owners)), starts[1:])


def per_user(rows: torch.Tensor, users: list[np.ndarray]) -> torch.Tensor:
    """[U, W, L] from batch rows [B, L]: each user's windows (``user_gradients`` groups users with W windows)."""
    index = torch.as_tensor(np.stack(users), device=rows.device)
    return rows[index]


def parameter_names(model: torch.nn.Module, params: list[torch.Tensor]) -> list[str]:
    """The model's name of each parameter (the first, for tensors the model holds under two names)."""
    names = {id(p): name for name, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"dp: {len(missing)} trained parameter(s) are not the model's")
    return [names[id(p)] for p in params]
