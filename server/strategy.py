"""FedAvg over the LoRA adapter only, weighted by each client's number of training sequences.

On top of Flower's FedAvg: every reply is checked against the adapter's keys, shapes and dtypes and for
finite values, and its update (reply - global) against the norm bounds of the privacy config, before it is
averaged (a bad one is logged with its node id and left out, the round goes on); ``aggregator`` may replace the
weighted mean by a per-entry median or trimmed mean (server/aggregation.py). A round with fewer than min-clients
acceptable replies is not aggregated. Replies are averaged in float32 and in platform order, so the aggregate
does not depend on which reply arrived first (a resumed run reproduces an uninterrupted one bit for bit). The
aggregate plus each platform's training metrics go to ``on_aggregate`` (the server saves them) after every
round; each platform's evaluation metrics go to ``on_evaluate``.
"""

from __future__ import annotations

import copy
from logging import WARNING
from typing import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.adapters import cast_record, problems
from server.aggregation import robust_mean, update_norm
from common.config import PrivacyConfig


class AdapterFedAvg(FedAvg):
    def __init__(self, expected: dict, min_clients: int,
                 on_aggregate: Callable[[int, ArrayRecord, dict[str, dict[str, float]]], None] = lambda *a: None,
                 on_evaluate: Callable[[int, dict[str, dict[str, float]]], None] = lambda r, m: None,
                 wire_dtype: str = "float32", privacy: PrivacyConfig | None = None):
        super().__init__(min_train_nodes=min_clients, min_evaluate_nodes=min_clients,
                         min_available_nodes=min_clients)
        self.expected = expected
        self.min_clients = min_clients
        self.on_aggregate = on_aggregate
        self.on_evaluate = on_evaluate
        self.wire_dtype = wire_dtype  # replies arrive in it and are averaged in float32; the result leaves in it
        self.privacy = privacy or PrivacyConfig()
        self.sent: ArrayRecord | None = None  # the global adapter of the round in progress

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self.sent = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = []
        for reply in replies:
            if not reply.has_error():
                issues = problems(reply.content["arrays"], self.expected) if "arrays" in reply.content else \
                    ["no 'arrays' record"]
                if issues:
                    log(WARNING, "round %d: rejected the update of node %d (%s): %s", server_round,
                        reply.metadata.src_node_id, _platform(reply), "; ".join(issues))
                    continue
                reply = _widened(reply)
            accepted.append(reply)
        accepted = self.within_norm_bounds(server_round, accepted)
        valid = sum(not r.has_error() for r in accepted)
        if valid < self.min_clients:
            log(WARNING, "round %d: %d acceptable update(s), min-clients is %d: not aggregated", server_round,
                valid, self.min_clients)
            return None, None
        accepted = sorted((r for r in accepted if not r.has_error()), key=_platform)
        per_platform = {_platform(r): dict(r.content["metrics"]) for r in accepted}
        arrays, metrics = super().aggregate_train(server_round, accepted)
        if arrays is not None and self.privacy.aggregator != "mean":
            arrays = robust_mean([r.content["arrays"] for r in accepted],
                                 self.privacy.aggregator, self.privacy.trim_ratio)
        if arrays is not None:
            arrays = cast_record(arrays, self.wire_dtype)
            self.on_aggregate(server_round, arrays, per_platform)
        return arrays, metrics

    def within_norm_bounds(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Leave out updates whose norm exceeds max-update-norm or update-norm-factor x the round's median."""
        valid = [r for r in replies if not r.has_error()]
        if self.sent is None or not valid:
            return replies
        norms = {id(r): update_norm(r.content["arrays"], self.sent) for r in valid}
        bound = self.privacy.max_update_norm or float("inf")
        if self.privacy.update_norm_factor and len(valid) >= 3:  # a median of two cannot tell which one is off
            bound = min(bound, self.privacy.update_norm_factor * float(np.median(list(norms.values()))))
        kept = []
        for reply in replies:
            norm = norms.get(id(reply))
            if norm is not None:
                reply.content["metrics"]["update-norm"] = norm
                if norm > bound:
                    log(WARNING, "round %d: rejected the update of node %d (%s): update norm %.4g exceeds the "
                        "bound %.4g", server_round, reply.metadata.src_node_id, _platform(reply), norm, bound)
                    continue
            kept.append(reply)
        return kept

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Platforms report different metrics (only some ship sampled negatives): average the shared ones."""
        replies = list(replies)  # failed nodes are named by the round loop (server/rounds.py)
        per_platform = {_platform(r): dict(r.content["metrics"]) for r in replies if not r.has_error()}
        self.on_evaluate(server_round, per_platform)
        return MetricRecord(mean_shared_metrics(per_platform)) if per_platform else None

    # -- checkpoint: what a restarted server needs to carry on (FedAvg keeps nothing between rounds) --
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def mean_shared_metrics(per_platform: dict[str, dict[str, float]], weight: str = "num-examples") -> dict[str, float]:
    """Mean of the metrics every platform reported, weighted by ``weight`` (e.g. users evaluated)."""
    shared = set.intersection(*(set(m) for m in per_platform.values())) - {weight}
    total = sum(m[weight] for m in per_platform.values())
    return {key: sum(m[key] * m[weight] for m in per_platform.values()) / total for key in sorted(shared)}


def _platform(reply: Message) -> str:
    record = reply.content.config_records.get("platform")
    return str(record["platform"]) if record else f"node-{reply.metadata.src_node_id}"


def _widened(reply: Message) -> Message:
    """A copy of the reply whose adapter is float32, so that FedAvg accumulates in float32 (the received
    message is left as it came)."""
    widened = copy.copy(reply)
    widened.content = RecordDict({**reply.content, "arrays": cast_record(reply.content["arrays"], "float32")})
    return widened
