"""Pollen's Flower ClientApp: receive the global adapter, train or evaluate locally, reply with adapter + metrics.

The reply holds the adapter tensors, scalar metrics and the platform's name; the head, the item table and
every interaction stay on the node. Under ``aggregation = "ffa"`` only the LoRA B tensors travel; under
``secagg = true`` training messages are SecAgg+ stages handled by client/secagg.py around the same ``fit``.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secagg
from client.session import ClientSession, export_dir
from common.adapters import from_record, record_bytes, to_record
from common.aggregation import merge_state, wire_state
from common.config import PollenConfig

STATE_KEY = "pollen"
app = ClientApp()


def _config(table: ConfigRecord) -> PollenConfig:
    table = dict(table)
    table.pop("server-round", None)  # added by the strategy
    return PollenConfig.from_flat(table)


def _open(table: ConfigRecord, arrays: ArrayRecord, context: Context) -> tuple[ClientSession, PollenConfig]:
    config = _config(table)
    session = ClientSession.open(config, dict(context.node_config))
    saved = context.state.config_records.get(STATE_KEY)
    session.restore(saved["checkpoint"] if saved else None)
    session.set_adapter(merge_state(session.encoder, from_record(arrays)))
    return session, config


def _platform(session: ClientSession) -> ConfigRecord:
    return ConfigRecord({"platform": session.name})


def fit(table: ConfigRecord, arrays: ArrayRecord, context: Context) -> tuple[ArrayRecord, dict[str, float], str]:
    """Local training from the global adapter ``arrays``: (adapter to send, scalar metrics, platform name)."""
    session, config = _open(table, arrays, context)
    metrics = session.train()
    context.state[STATE_KEY] = ConfigRecord({"checkpoint": session.checkpoint()})
    reply = to_record(wire_state(session.encoder.adapter_state(), config.privacy.aggregation))
    metrics["upload-bytes"] = float(record_bytes(reply))
    metrics["download-bytes"] = float(record_bytes(arrays))
    return reply, metrics, session.name


@app.train()
def train(msg: Message, context: Context) -> Message:
    if secagg.is_secagg(msg):  # a stage of Flower's SecAgg+ protocol (config secagg = true)
        return secagg.train(msg, context, fit)
    arrays, metrics, name = fit(msg.content["config"], msg.content["arrays"], context)
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics),
                          "platform": ConfigRecord({"platform": name})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    session, config = _open(msg.content["config"], msg.content["arrays"], context)
    trained = int(msg.content["config"].get("server-round", 0)) > 0  # round 0 is the untrained start
    metrics = session.evaluate(export_dir(config, dict(context.node_config)) if trained else None)
    context.state[STATE_KEY] = ConfigRecord({"checkpoint": session.checkpoint()})  # keeps the best-so-far
    content = RecordDict({"metrics": MetricRecord(metrics), "platform": _platform(session)})
    return Message(content=content, reply_to=msg)
