"""Pollen's Flower ClientApp: receive the global adapter, train or evaluate locally, reply with adapter + metrics.

The reply holds the adapter tensors, scalar metrics and the platform's name; the head, the item table and
every interaction stay on the node. The private state a round starts from is read from the node's disk
(client/state.py), so any process, in any Flower run of the same federation, continues where the last one left.
Under ``aggregation = "ffa"`` only the LoRA B tensors travel; under ``secagg = true`` training messages are
SecAgg+ stages handled by client/secagg.py around the same ``fit``.

Starting is cheap: this module imports Flower and the config only. The work of a message (``work``) runs in the
node's warm worker when the node has one (client/worker.py, started by client.launch), else here, importing
the model libraries on first use. Every reply reports where its seconds went: ``start-process-seconds``
(process start + Flower + this module, first message of a process only), ``start-import-seconds`` (the model
libraries), ``start-build-seconds`` (the session), ``train-seconds`` / ``eval-seconds``, and with a worker
``handoff-seconds`` (the round trip to it, less its work) and ``worker`` = 1.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
import traceback

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client.node import NodeSettings
from common.config import FEDERATION_ID, SERVER_ROUND, PollenConfig
from common.errors import UserError, node_error_reason

app = ClientApp()
_PROCESS = {"fresh": True}  # the first message a process serves pays for its start


def _process_seconds() -> float:
    """Seconds from this process's start to now on its first message; 0 afterwards."""
    if not _PROCESS.pop("fresh", False):
        return 0.0
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


def work(phase: str, table: dict, arrays: ArrayRecord, node_config: dict
         ) -> tuple[ArrayRecord | None, dict[str, float], str]:
    """Train (``phase`` "train") or evaluate from the global adapter ``arrays``, in this process:
    (adapter to send or None, scalar metrics, platform name)."""
    started = time.perf_counter()
    from client.session import ClientSession  # torch, transformers, peft: once per process
    from client.state import NodeState
    from common.adapters import from_record, merge_state, record_bytes, to_record, wire_state

    imported = time.perf_counter() - started
    table = dict(table)
    server_round = int(table.pop(SERVER_ROUND, 0))
    federation_id = str(table.pop(FEDERATION_ID, "default"))
    config = PollenConfig.from_flat(table)
    node = NodeSettings.build(config, node_config)
    session = ClientSession.open(config, node)
    state = NodeState.open(node.state_dir, federation_id, session.name, config)
    training = phase == "train"
    session.restore(state.load(up_to=server_round - 1 if training else server_round))
    session.set_adapter(merge_state(session.encoder.adapter_state(), from_record(arrays)))
    metrics = {"start-import-seconds": imported, **session.start_costs()}
    if training:
        metrics.update(session.train())
        state.save(server_round, session.checkpoint())
        reply = to_record(wire_state(session.encoder.adapter_state(), config.privacy.aggregation),
                          config.federation.adapter_dtype)
        metrics["upload-bytes"] = float(record_bytes(reply))
        metrics["download-bytes"] = float(record_bytes(arrays))
        return reply, metrics, session.name
    candidate = server_round >= config.model.first_candidate  # round 0, the untrained start: only with the prior
    session.personalise()
    metrics.update(session.evaluate(node.export_dir if candidate else None))
    state.save(server_round, session.checkpoint())  # keeps the best validation score so far
    return None, metrics, session.name


def run(phase: str, table: ConfigRecord, arrays: ArrayRecord, context: Context
        ) -> tuple[ArrayRecord | None, dict[str, float], str]:
    """The message's work in the node's worker if it has one, else here; with this process's start cost."""
    process = _process_seconds()
    node_config = dict(context.node_config)
    worker = node_config.get("worker")
    if worker:
        from client.worker import WorkerUnavailable, call

        sent = time.perf_counter()
        try:
            reply, metrics, name = call(str(worker), (phase, dict(table), arrays, node_config))
            inside = sum(metrics.get(k, 0.0) for k in ("start-import-seconds", "start-build-seconds",
                                                       "train-seconds", "eval-seconds"))
            metrics.update({"handoff-seconds": max(0.0, time.perf_counter() - sent - inside), "worker": 1.0,
                            "start-process-seconds": process})
            return reply, metrics, name
        except WorkerUnavailable as reason:
            logging.getLogger("flwr").warning("Pollen: working in the ClientApp process: %s", reason)
    reply, metrics, name = work(phase, table, arrays, node_config)
    metrics.update({"start-process-seconds": process, "worker": 0.0})
    return reply, metrics, name


def fit(table: ConfigRecord, arrays: ArrayRecord, context: Context) -> tuple[ArrayRecord, dict[str, float], str]:
    """Local training from the global adapter ``arrays``: (adapter to send, scalar metrics, platform name)."""
    reply, metrics, name = run("train", table, arrays, context)
    return reply, metrics, name


def _platform(msg: Message, context: Context) -> str:
    """This node's platform name for an error reply, whatever went wrong (best effort, never raises)."""
    try:
        table = {k: v for k, v in dict(msg.content["config"]).items() if k not in (SERVER_ROUND, FEDERATION_ID)}
        return NodeSettings.build(PollenConfig.from_flat(table), dict(context.node_config)).platform
    except Exception:  # the name is only for the message; the error itself is what matters
        return str(dict(context.node_config).get("platform", f"partition {context.node_config.get('partition-id')}"))


def _error_reply(msg: Message, context: Context, error: Exception) -> Message:
    """One line naming this node's platform (the server prints it and stops the federation); a bug's traceback
    goes to the node's own log."""
    if not isinstance(error, UserError):
        traceback.print_exc(file=sys.stderr)
    reason = node_error_reason(_platform(msg, context), error)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def answered(handler):
    """A handler whose failure becomes an error reply that names the platform (see _error_reply)."""
    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as error:  # noqa: BLE001 -- every failure is answered, never a raw crash
            return _error_reply(msg, context, error)
    return wrapper


@app.train()
@answered
def train(msg: Message, context: Context) -> Message:
    from client import secagg  # a light check; the SecAgg+ machinery itself only loads for secagg = true

    if secagg.is_secagg(msg):  # a stage of Flower's SecAgg+ protocol (config secagg = true)
        return secagg.train(msg, context, fit)
    arrays, metrics, name = fit(msg.content["config"], msg.content["arrays"], context)
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                          "platform": ConfigRecord({"platform": name})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@answered
def evaluate(msg: Message, context: Context) -> Message:
    _, metrics, name = run("evaluate", msg.content["config"], msg.content["arrays"], context)
    content = RecordDict({"metrics": MetricRecord(metrics), "platform": ConfigRecord({"platform": name})})
    return Message(content=content, reply_to=msg)
