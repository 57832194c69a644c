"""User-level DP-SGD for one platform: the unit of privacy is one user (all of that user's training windows).

Each step samples users independently with probability q (Poisson sampling, which opacus's RDP accountant
assumes), computes one gradient per sampled user over the adapter and the head (common/train.py runs the user's
windows as one micro-batch), clips it to L2 norm ``dp-clip``, sums, adds Gaussian noise of std
``sigma * dp-clip`` and divides by the expected number of users ``q * n``. Opacus's ``RDPAccountant`` tracks
(sigma, q, steps) across rounds (its history travels in the trainer state) and reports epsilon at delta.

Why micro-batches rather than per-sample gradient hooks: a training step re-encodes items through the LoRA
layers once for the whole batch and every user's softmax runs over the same item table, so per-example hooks
(opacus GradSampleModule) would mix users; one forward/backward per user keeps users separate by construction.
Each user re-encodes only its share of ``live-items`` (live-items / batch-size, at least one of its own items),
so the encoder work per step equals a non-private step's; the per-user head forward/backward is the extra cost.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch

from common.config import PollenConfig


class UserLevelDP:
    def __init__(self, owners: np.ndarray, config: PollenConfig):
        """``owners[w]`` = the user of training window w."""
        from opacus.accountants import RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier

        privacy = config.privacy
        order = np.argsort(owners, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(owners[order]) != 0])
        self.users = np.split(order, starts[1:])  # window indices of each user
        self.num_users = len(self.users)
        if self.num_users == 0:
            raise ValueError("dp: the platform has no training windows")
        self.sample_rate = min(1.0, config.train.batch_size / self.num_users)
        self.steps_per_epoch = max(1, round(1 / self.sample_rate))  # about one pass over the users
        if config.train.max_steps:
            self.steps_per_epoch = min(self.steps_per_epoch, config.train.max_steps)
        # each user re-encodes its share of live-items: a step costs the encoder what a non-private step does
        live = config.train.live_items
        self.live_items_per_user = max(1, round(live / config.train.batch_size)) if live > 0 else 0
        self.planned_steps = config.federation.num_rounds * config.train.local_epochs * self.steps_per_epoch
        self.delta = privacy.dp_delta or 1.0 / self.num_users
        self.clip = privacy.dp_clip
        self.noise = privacy.dp_noise
        if privacy.dp_epsilon > 0:  # calibrate sigma so the planned run ends at the target epsilon
            self.noise = get_noise_multiplier(target_epsilon=privacy.dp_epsilon, target_delta=self.delta,
                                              sample_rate=self.sample_rate, steps=self.planned_steps,
                                              accountant="rdp")
        self.accountant = RDPAccountant()
        # the noise must not be predictable from the run's public seed
        self.noise_generator = torch.Generator().manual_seed(secrets.randbits(63))

    def sample(self, rng: np.random.Generator) -> list[np.ndarray]:
        """The window indices of each user drawn for this step (each user independently with probability q)."""
        return [self.users[u] for u in np.flatnonzero(rng.random(self.num_users) < self.sample_rate)]

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
