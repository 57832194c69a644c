"""Pollen's Flower ClientApp: receive the global adapter, train or evaluate locally, reply with adapter + metrics.

The reply holds the adapter tensors, scalar metrics and the platform's name; the head, the item table and
every interaction stay on the node. The private state a round starts from is read from the node's disk
(client/state.py), so any process, in any Flower run of the same federation, continues where the last one left.
Under ``aggregation = "ffa"`` only the LoRA B tensors travel; under ``secagg = true`` training messages are
SecAgg+ stages handled by client/secagg.py around the same ``fit``.
"""

from __future__ import annotations

import functools
import sys
import traceback

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.clientapp import ClientApp

from client import secagg
from client.session import ClientSession, export_dir, node_platform, state_root
from client.state import NodeState
from common.adapters import from_record, record_bytes, to_record
from common.aggregation import merge_state, wire_state
from common.config import FEDERATION_ID, SERVER_ROUND, PollenConfig
from common.errors import UserError, node_error_reason

app = ClientApp()


def _open(table: ConfigRecord, arrays: ArrayRecord, context: Context, training: bool
          ) -> tuple[ClientSession, PollenConfig, NodeState, int]:
    """This node's session with the private state the round starts from and the received adapter loaded."""
    table = dict(table)
    server_round = int(table.pop(SERVER_ROUND, 0))
    federation_id = str(table.pop(FEDERATION_ID, "default"))
    config = PollenConfig.from_flat(table)
    node_config = dict(context.node_config)
    session = ClientSession.open(config, node_config)
    state = NodeState.open(state_root(config, node_config), federation_id, session.name, config)
    session.restore(state.load(up_to=server_round - 1 if training else server_round))
    session.set_adapter(merge_state(session.encoder, from_record(arrays)))
    return session, config, state, server_round


def fit(table: ConfigRecord, arrays: ArrayRecord, context: Context) -> tuple[ArrayRecord, dict[str, float], str]:
    """Local training from the global adapter ``arrays``: (adapter to send, scalar metrics, platform name)."""
    session, config, state, server_round = _open(table, arrays, context, training=True)
    metrics = {**session.start_costs(), **session.train()}
    state.save(server_round, session.checkpoint())
    reply = to_record(wire_state(session.encoder.adapter_state(), config.privacy.aggregation),
                      config.federation.adapter_dtype)
    metrics["upload-bytes"] = float(record_bytes(reply))
    metrics["download-bytes"] = float(record_bytes(arrays))
    return reply, metrics, session.name


def _platform(msg: Message, context: Context) -> str:
    """This node's platform name for an error reply, whatever went wrong (best effort, never raises)."""
    try:
        table = {k: v for k, v in dict(msg.content["config"]).items() if k not in (SERVER_ROUND, FEDERATION_ID)}
        return node_platform(PollenConfig.from_flat(table), dict(context.node_config))[0]
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
    if secagg.is_secagg(msg):  # a stage of Flower's SecAgg+ protocol (config secagg = true)
        return secagg.train(msg, context, fit)
    arrays, metrics, name = fit(msg.content["config"], msg.content["arrays"], context)
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                          "platform": ConfigRecord({"platform": name})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@answered
def evaluate(msg: Message, context: Context) -> Message:
    session, config, state, server_round = _open(msg.content["config"], msg.content["arrays"], context,
                                                 training=False)
    trained = server_round > 0  # round 0 is the untrained start
    metrics = {**session.start_costs(),
               **session.evaluate(export_dir(config, dict(context.node_config)) if trained else None)}
    state.save(server_round, session.checkpoint())  # keeps the best validation score so far
    content = RecordDict({"metrics": MetricRecord(metrics), "platform": ConfigRecord({"platform": session.name})})
    return Message(content=content, reply_to=msg)
