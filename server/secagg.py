"""Training rounds under Flower's SecAgg+ (``secagg = true``): the server only ever holds the sum of the adapters.

In Flower 1.42 SecAgg+ is reachable only through the legacy workflow: ``SecAggPlusWorkflow`` driven by a
``LegacyContext`` and a legacy strategy, with ``secaggplus_mod`` and a legacy fit reply on the client
(client/secagg.py). Each client quantises ``[w, w * adapter]`` (w = its number of training sequences / max
weight), adds pairwise and private masks and uploads only that; the workflow sums the masked vectors, removes the
masks with the secret shares, divides by the summed weight, and hands the legacy strategy (``SecureSum``) one
weighted mean. Per-reply checks of the plain path (keys, shapes, norms, robust aggregators) cannot apply, since
no individual update is ever seen: only the aggregate is checked (shape, finite values). Evaluation, checkpoints
and resuming are those of the plain path (server/rounds.py).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.server import ServerConfig
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from common.adapters import problems
from common.config import PollenConfig
from server.strategy import AdapterFedAvg

CLIPPING_RANGE = 2.0  # |weight x adapter entry| bound before quantisation; LoRA entries stay far below it
QUANTIZATION_RANGE = 2 ** 22  # Flower's default; step 2 * CLIPPING_RANGE / 2**22 ~ 1e-6 per entry


class SecureSum(LegacyFedAvg):
    """The legacy strategy the SecAgg+ workflow calls: it is given the unmasked weighted mean only (every result
    carries that same aggregate) and each client's scalar metrics. ``received`` keeps what it was given."""

    def __init__(self, min_clients: int, fit_config: dict):
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=min_clients,
                         min_available_clients=min_clients,
                         on_fit_config_fn=lambda server_round: {**fit_config, "server-round": server_round})
        self.received: list[list] = []
        self.per_platform: dict[str, dict[str, float]] = {}

    def aggregate_fit(self, server_round, results, failures):
        self.received.append([fit_res for _, fit_res in results])
        if not results:
            return None, {}
        self.per_platform = {str(res.metrics.get("platform", f"node-{proxy.node_id}")):
                             {k: float(v) for k, v in res.metrics.items() if k != "platform"}
                             for proxy, res in results}
        return results[0][1].parameters, {}


class SecAggTraining:
    """The training step of a round under SecAgg+ (``RoundLoop.run(..., train=secure.round)``); evaluation stays
    on the Message API. A context manager: it keeps Flower's legacy client manager in step with the grid."""

    def __init__(self, grid: Grid, strategy: AdapterFedAvg, config: PollenConfig, flat: ConfigRecord):
        fed = config.federation
        self.grid, self.strategy = grid, strategy
        self.secure = SecureSum(fed.min_clients, dict(flat))
        base = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
        self.context = LegacyContext(base, config=ServerConfig(num_rounds=fed.num_rounds,
                                                               round_timeout=fed.round_timeout),
                                     strategy=self.secure)
        # every client is every other's neighbour (classic SecAgg); any two of three shares rebuild a dropped key
        self.workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=0.67,
                                           max_weight=config.privacy.secagg_max_weight,
                                           clipping_range=CLIPPING_RANGE, quantization_range=QUANTIZATION_RANGE,
                                           timeout=fed.round_timeout)

    def __enter__(self) -> "SecAggTraining":
        self.thread, self.stop, registered = start_update_client_manager_thread(self.grid, self.context.client_manager)
        registered.wait()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def round(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord) -> ArrayRecord:
        """One SecAgg+ training round from the global ``arrays``: the securely aggregated adapter."""
        expected = self.strategy.expected
        self.context.state.array_records[MAIN_PARAMS_RECORD] = arrays  # sent in key order (client/secagg.py)
        self.context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round, WorkflowKey.START_TIME: time.time()})
        before = len(self.secure.received)
        self.workflow(self.grid, self.context)
        if len(self.secure.received) == before:
            raise RuntimeError(f"round {server_round}: secure aggregation halted (see Flower's log)")
        aggregated = named(self.context.state.array_records[MAIN_PARAMS_RECORD], expected)
        issues = problems(aggregated, expected)
        if issues:
            raise RuntimeError(f"round {server_round}: the securely aggregated adapter is invalid: {issues}")
        self.strategy.on_aggregate(server_round, aggregated, self.secure.per_platform)
        return aggregated


def named(record: ArrayRecord, expected: dict[str, tuple[tuple[int, ...], str]]) -> ArrayRecord:
    """Legacy parameters come back as nameless arrays "0", "1", ... in the order they were sent."""
    arrays = [bytes_to_ndarray(a.data) for a in record.values()]
    if len(arrays) != len(expected):
        raise RuntimeError(f"secure aggregate has {len(arrays)} tensors, the adapter {len(expected)}")
    return ArrayRecord({key: torch.from_numpy(np.ascontiguousarray(a.astype(dtype)).reshape(shape))
                        for a, (key, (shape, dtype)) in zip(arrays, expected.items())})
