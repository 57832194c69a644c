"""The one training loop, used by the Flower client, the local and centralised baselines and ID-only SASRec.

A Trainer holds one AdamW over the shared adapter (if any) and every given platform's head. One epoch visits
each platform's training sequences once, in a shuffled interleaving of platforms (a single platform for a
client; several for the centralised reference). ``fit`` adds model selection on validation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from common.config import PollenConfig
from common.data.split import SplitData
from common.evaluate import evaluate
from common.model.encoder import TextEncoder
from common.model.recommender import Recommender, pad_left

Log = Callable[[str], None]
SORT_POOL = 50  # batches per pool of windows sorted by length (batch_plan): similar lengths, still random


@dataclass
class Platform:
    """A platform ready to train: its split data and its model (which may share an encoder with others)."""

    split: SplitData
    model: Recommender

    def evaluate(self, which: str) -> dict[str, float]:
        """Metrics on 'valid' or 'test' with the catalogue encoded by the current adapter."""
        rater = self.model.predict_ratings if self.model.head.rating is not None else None
        return evaluate(self.model.score, self.split, which, rater=rater)


def training_pairs(split: SplitData, max_len: int, stride: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-item targets [S, L] (target 0 = not learned here): windows of up to max_len + 1 items of
    each training sequence, ending every ``stride`` items from its end (0 = max_len, as ``window-stride``).

    Every training item is learned once per epoch, however long the history (SASRec's usual "last 50 only"
    throws most of a long history away), after as long a context as the history allows up to max_len - stride + 1
    items: a window learns only its last ``stride`` targets (the window from the sequence's first item, all of its).
    Windows that do not overlap (stride = max_len) learn half their targets after fewer than max_len / 2 items,
    though ranking sees the last max_len. Overlap costs max_len / stride windows through the sequence encoder
    per epoch; the logits, the cost on a large catalogue, stay one per training item.
    """
    windows = list(_windows(split.train_sequences(), max_len, stride))
    inputs = pad_left([w[:-1] for _, w, _ in windows], max_len)
    targets = pad_left([_learned(w[1:], new) for _, w, new in windows], max_len)
    return inputs, targets


def rating_targets(split: SplitData, max_len: int, stride: int = 0) -> torch.Tensor:
    """The explicit ratings of training_pairs' targets [S, L] (NaN = unrated, padding or not learned there)."""
    windows = _windows(split.train_ratings(), max_len, stride)
    return pad_left([_learned(w[1:], new, np.nan) for _, w, new in windows], max_len, fill=np.nan, dtype=np.float32)


def window_owners(split: SplitData, max_len: int, stride: int = 0) -> np.ndarray:
    """The user of each training window, in ``training_pairs`` order (the unit of user-level DP)."""
    return np.array([user for user, _, _ in _windows(split.train_sequences(), max_len, stride)], dtype=np.int64)


def _windows(sequences, max_len: int, stride: int):
    """(user, window, new): each sequence's windows, latest first, back to the one that starts at its first item;
    a window learns its last ``new`` targets (the earlier ones a later window learns after a longer context)."""
    stride = stride or max_len
    for user, seq in enumerate(sequences):
        for end in range(len(seq), 1, -stride):
            start = max(0, end - max_len - 1)
            yield user, seq[start:end], (stride if start else end - 1)
            if not start:
                break


def _learned(targets: np.ndarray, new: int, blank=0) -> np.ndarray:
    """``targets`` with all but the last ``new`` set to ``blank`` (not learned in this window)."""
    if new >= len(targets):
        return targets
    out = np.array(targets)  # a copy (item indices, or float ratings with NaN blanks)
    out[:len(out) - new] = blank
    return out


def batch_plan(inputs: list[torch.Tensor], size: int, rng: np.random.Generator, max_steps: int = 0
               ) -> list[tuple[int, np.ndarray]]:
    """One epoch's batches as (platform, window indices), in random order, from each platform's inputs [S, L].

    Windows are shuffled, then sorted by length within pools of ``SORT_POOL`` batches before being cut, so a
    batch holds windows of similar length and is trimmed to its longest (``Trainer.batch``): on catalogues of
    short histories (a median of a few items) most of a max-len row would otherwise be padding.
    """
    plan = []
    for i, x in enumerate(inputs):
        lengths = (x != 0).sum(1).numpy()
        order = rng.permutation(len(x))
        pool = size * SORT_POOL
        order = np.concatenate([chunk[np.argsort(lengths[chunk], kind="stable")]
                                for chunk in np.split(order, range(pool, len(order), pool))])
        plan += [(i, idx) for idx in np.array_split(order, max(1, -(-len(order) // size)))]
    rng.shuffle(plan)
    return plan[:max_steps] if max_steps else plan


def trim(*rows: torch.Tensor) -> list[torch.Tensor]:
    """Right-aligned [B, L] tensors cut to the longest row of the first one (columns of padding only go): pass
    the inputs first (a window's first targets may be blank where its inputs are not)."""
    width = max(1, int((rows[0] != 0).sum(1).max()))
    return [r[:, -width:] for r in rows]


class Trainer:
    def __init__(self, platforms: list[Platform], encoder: TextEncoder | None, config: PollenConfig):
        self.platforms = platforms
        self.encoder = encoder if config.model.text else None
        self.config = config.train
        self.max_len, stride = config.data.max_len, config.data.window_stride
        self.pairs = [training_pairs(p.split, self.max_len, stride) for p in platforms]
        self.ratings = [rating_targets(p.split, self.max_len, stride) if p.model.head.rating is not None else None
                        for p in platforms]
        self.dp = None  # user-level DP-SGD (common/privacy.py) when the privacy config asks for it
        if config.privacy.dp:
            if len(platforms) != 1:
                raise ValueError("user-level DP trains one platform per Trainer (a client)")
            from common.privacy import UserLevelDP

            self.dp = UserLevelDP(window_owners(platforms[0].split, self.max_len, stride), config)
            head = platforms[0].model.head
            if head.popularity:  # released once, noised and accounted: it feeds every noised step after
                head.set_popularity(self.dp.release_popularity(platforms[0].split.user_popularity()))
        heads = {id(q): q for p in platforms for q in p.model.head.parameters()  # platforms may share a SharedHead
                 if q.requires_grad}
        groups = [{"params": list(heads.values()), "lr": self.config.lr}]
        if self.encoder is not None and self.encoder.lora_parameters():
            groups.append({"params": self.encoder.lora_parameters(), "lr": self.config.lora_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=self.config.weight_decay)
        self.params = [q for group in groups for q in group["params"]]
        self.rng = np.random.default_rng(self.config.seed)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.device = next(platforms[0].model.head.parameters()).device

    @property
    def num_sequences(self) -> int:
        return sum(len(inputs) for inputs, _ in self.pairs)

    def epoch(self) -> dict[str, float]:
        """One pass over every platform's training sequences; returns the mean loss per platform.

        Under user-level DP the same loop runs the DP plug-in's plan (Poisson-sampled users, all of each one's
        windows) and the plug-in sets the gradients (clipped per user, noised) in place of ``backward``."""
        for p in self.platforms:
            p.model.train()
        losses: dict[int, list[float]] = {i: [] for i in range(len(self.platforms))}
        for i, idx in self.batch_plan():
            model = self.platforms[i].model
            batch = self.batch(i, idx) if len(idx) else None
            self.optimizer.zero_grad(set_to_none=True)
            if self.dp is None:
                inputs, targets, ratings = batch
                loss = model.loss(inputs, targets, self._live_items(inputs, targets), self.config.loss,
                                  self.config.negatives, self.generator, ratings=ratings)
                loss.backward()
                loss = loss.item()
            else:
                lora = self.encoder is not None and bool(self.encoder.lora_parameters())
                loss = self.dp.backward(model, self.params, idx, batch, self._live_items if lora else None,
                                        self._negatives(model))
            self.optimizer.step()
            if not np.isnan(loss):
                losses[i].append(loss)
        for p in self.platforms:
            p.model.eval()
        return {self.platforms[i].split.name: float(np.mean(v)) if v else float("nan") for i, v in losses.items()}

    def batch_plan(self) -> list[tuple[int, np.ndarray]]:
        if self.dp is not None:
            return [(0, idx) for idx in self.dp.plan()]
        return batch_plan([inputs for inputs, _ in self.pairs], self.config.batch_size, self.rng,
                          self.config.max_steps)

    def batch(self, i: int, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs, targets (and target ratings) of platform i's windows ``idx``, cut to the longest window."""
        index = torch.as_tensor(idx)
        rows = [self.pairs[i][0][index], self.pairs[i][1][index]]
        if self.ratings[i] is not None:
            rows.append(self.ratings[i][index])
        inputs, targets, *ratings = (r.to(self.device) for r in trim(*rows))
        return inputs, targets, ratings[0] if ratings else None

    def _negatives(self, model: Recommender) -> torch.Tensor | None:
        """The step's sampled-softmax candidates (loss = "sampled"), or None for the whole catalogue."""
        if self.config.loss != "sampled":
            return None
        return torch.randint(1, model.num_items + 1, (self.config.negatives,),
                             generator=self.generator).to(self.device)

    def _live_items(self, inputs: torch.Tensor, targets: torch.Tensor, count: int | None = None
                    ) -> torch.Tensor | None:
        """A random sample of ``count`` (default live-items) of the batch's distinct items to re-encode with
        gradient this step."""
        count = self.config.live_items if count is None else count
        if self.encoder is None or not self.encoder.lora_parameters() or count <= 0:
            return None
        items = torch.unique(torch.cat([inputs.flatten(), targets.flatten()]).cpu())
        items = items[items > 0]
        if len(items) > count:
            items = items[torch.randperm(len(items), generator=self.generator)[:count]]
        return items

    # -- persistence between federated rounds ------------------------------------------------------
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "rng": self.rng.bit_generator.state,
                "generator": self.generator.get_state(), "dp": self.dp.state_dict() if self.dp else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])
        if self.dp is not None and state.get("dp"):
            self.dp.load_state_dict(state["dp"])


@dataclass
class FitResult:
    """Per platform: validation metrics of every epoch, the selected epoch, and test metrics at it.

    elapsed[e] is the wall time in seconds from the start to the end of epoch e + 1's validation (time-to-quality).
    """

    valid: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    best_epoch: dict[str, int] = field(default_factory=dict)
    test: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    elapsed: list[float] = field(default_factory=list)
    states: dict[str, dict] = field(default_factory=dict, repr=False)  # each platform's selected state

    def restore(self, platform: Platform, encoder: TextEncoder | None) -> None:
        """Put ``platform`` and the encoder's shared adapters back at the platform's selected state (after a
        joint fit the shared adapters hold the last platform's)."""
        _restore(platform, encoder, self.states[platform.split.name])

    @property
    def epochs_run(self) -> dict[str, int]:
        """Epochs trained per platform (fewer than the cap when early stopping ended the run)."""
        return {name: len(valid) for name, valid in self.valid.items()}


def fit(platforms: list[Platform], encoder: TextEncoder | None, config: PollenConfig, epochs: int,
        log: Log = print, label: str = "", keep_start: bool = False) -> FitResult:
    """Train for at most ``epochs``, stopping early once no platform's validation NDCG@10 improved for
    ``patience`` epochs; each platform keeps its best-on-validation state, then is tested once.

    ``keep_start``: the starting state is a candidate too (epoch 0), for a phase that continues a trained model;
    always so with ``text-prior``, whose untrained model is the zero-shot ranking.
    """
    keep_start = keep_start or config.model.first_candidate == 0
    trainer = Trainer(platforms, encoder, config)
    result = FitResult(valid={p.split.name: [] for p in platforms})
    best: dict[str, tuple[float, dict]] = {}
    if keep_start:
        for p in platforms:
            best[p.split.name] = (p.evaluate("valid")["ndcg@10"], _snapshot(p, encoder))
            result.best_epoch[p.split.name] = 0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        losses = trainer.epoch()
        for p in platforms:
            metrics = p.evaluate("valid")
            result.valid[p.split.name].append(metrics)
            if metrics["ndcg@10"] > best.get(p.split.name, (-1.0, {}))[0]:
                best[p.split.name] = (metrics["ndcg@10"], _snapshot(p, encoder))
                result.best_epoch[p.split.name] = epoch
        result.elapsed.append(time.perf_counter() - start)
        log(f"{label}epoch {epoch}/{epochs}  " + "  ".join(
            f"{name}: loss {losses[name]:.3f} val-ndcg@10 {result.valid[name][-1]['ndcg@10']:.4f}"
            for name in losses) + f"  ({time.perf_counter() - start:.0f}s)")
        if should_stop(result.best_epoch.values(), epoch, config.train.patience):
            log(f"{label}early stop: no better validation NDCG@10 for {config.train.patience} epochs")
            break
    result.seconds = time.perf_counter() - start
    for p in platforms:
        result.states[p.split.name] = best[p.split.name][1]
        result.restore(p, encoder)
        result.test[p.split.name] = p.evaluate("test")
    return result


# shares of the federation's adapters a platform may start from, the rest its own (``adopt``)
MIXES = (1.0, 0.5, 0.0)


def adopt(platform: Platform, encoder: TextEncoder, received: dict[str, torch.Tensor],
          own: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Leave ``encoder`` at the share of ``MIXES`` of the ``received`` adapters (the rest ``own``) whose model ranks
    ``platform``'s validation targets best (ties: more of the received), the popularity weight chosen anew for
    each (``popularity-prior``); returns (share, validation NDCG@10).

    So a platform takes from the federation only as much as its own validation rewards: a member each round
    between the global adapters and its own last ones (``personalise``), a newcomer between the federation's and
    the pretrained start. Not under user-level DP: the choice reads the users' validation items, and what a
    member trains from there is sent."""
    from common.adapters import mix_state

    model, best = platform.model, None
    for share in MIXES:
        encoder.load_adapter_state(mix_state(own, received, share))
        score = model.choose_popularity(platform.split) if model.head.popularity else \
            platform.evaluate("valid")["ndcg@10"]
        if best is None or score > best[1]:
            best = (share, score, _snapshot(platform, encoder))
    share, score, snapshot = best
    _restore(platform, encoder, snapshot)
    return share, score


def should_stop(best_epochs, epoch: int, patience: int) -> bool:
    """Early stopping: ``patience`` epochs (or rounds) have passed since the latest best epoch of any platform."""
    return patience > 0 and epoch - max(best_epochs, default=0) >= patience


def _snapshot(platform: Platform, encoder: TextEncoder | None) -> dict:
    return {"head": platform.model.private_state(),
            "adapter": encoder.adapter_state() if encoder is not None else {}}


def _restore(platform: Platform, encoder: TextEncoder | None, snapshot: dict) -> None:
    platform.model.head.load_private_state(snapshot["head"])
    if encoder is not None and snapshot["adapter"]:
        encoder.load_adapter_state(snapshot["adapter"])
