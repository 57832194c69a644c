"""The client's side of SecAgg+ (``secagg = true``): Flower's ``secaggplus_mod`` around the usual local training.

The mod runs the protocol's four stages; in the one that trains it calls ``legacy_fit``, which runs the same
``client.app.fit`` as the plain path, then quantises ``[w, w * adapter]`` (w = training sequences / max weight),
masks it and clears the plain arrays from the reply, so only masked integers leave the node. Legacy parameters
carry no names: the adapter tensors travel in the key order of the platform's adapter on both sides.
"""

from __future__ import annotations

from typing import Callable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.node import NodeSettings
from common.config import FEDERATION_ID, SERVER_ROUND, PollenConfig

Fit = Callable[[ConfigRecord, ArrayRecord, Context], tuple[ArrayRecord, dict, str]]


def is_secagg(msg: Message) -> bool:
    return RECORD_KEY_CONFIGS in msg.content.config_records


def train(msg: Message, context: Context, fit: Fit) -> Message:
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, lambda m, c: legacy_fit(m, c, fit))


def legacy_fit(msg: Message, context: Context, fit: Fit) -> Message:
    import torch
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from client.session import ClientSession
    from common.adapters import wire_state

    ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    table = {k: v for k, v in ins.config.items() if k not in (SERVER_ROUND, FEDERATION_ID)}
    config = PollenConfig.from_flat(table)
    session = ClientSession.open(config, NodeSettings.build(config, dict(context.node_config)))
    expected = wire_state(session.encoder.adapter_state(), session.config.privacy.aggregation)
    received = parameters_to_ndarrays(ins.parameters)
    if len(received) != len(expected):
        raise ValueError(f"secagg: received {len(received)} tensors, the adapter has {len(expected)}")
    arrays = ArrayRecord({key: torch.from_numpy(array.reshape(tuple(expected[key].shape)))
                          for key, array in zip(expected, received)})
    reply, metrics, name = fit(ConfigRecord(ins.config), arrays, context)
    res = FitRes(status=Status(code=Code.OK, message="Success"),
                 parameters=ndarrays_to_parameters([reply[key].numpy() for key in expected]),
                 num_examples=int(metrics["num-examples"]), metrics={**metrics, "platform": name})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)
