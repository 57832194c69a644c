"""SecAgg+ (``secagg = true``) in a real Flower simulation: the global adapter equals the plain weighted mean of the
clients' adapters within quantisation error, while nothing the ServerApp ever received holds an individual one.

The ClientApp is Pollen's SecAgg+ handler (Flower's secaggplus_mod around Pollen's own local training); the
test's only addition is that each client also writes its unmasked adapter to the run folder, so the test can
compute the mean the server must never see. The ServerApp is Pollen's ``run_federation`` with the Grid wrapped
to keep every reply: that is everything the server received.
"""

import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray

from client import app as pollen_client
from client import secagg as client_secagg
from common.model.encoder import TextEncoder
from common.config import PollenConfig
from server.secagg import CLIPPING_RANGE, QUANTIZATION_RANGE
from simulated import simulate

pytestmark = pytest.mark.integration


def recording_fit(table, arrays, context):
    reply, metrics, name = pollen_client.fit(table, arrays, context)
    folder = Path(str(table["run-dir"])) / "plain"
    folder.mkdir(exist_ok=True)
    np.savez(folder / f"{name}-round{int(table['server-round'])}.npz", num_examples=metrics["num-examples"],
             **{key.replace(".", "|"): a.numpy() for key, a in reply.items()})
    return reply, metrics, name


client_app = ClientApp()


@client_app.train()
def _train(msg, context):
    assert client_secagg.is_secagg(msg), "under secagg = true every training message is a SecAgg+ stage"
    return client_secagg.train(msg, context, recording_fit)


@client_app.evaluate()
def _evaluate(msg, context):
    return pollen_client.evaluate(msg, context)


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray actors cannot import a test module


@pytest.fixture(scope="module")
def secure_run(tiny_bert, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("secagg")
    config = PollenConfig().replace(**{"base-model": tiny_bert, "lora-layers": 1, "num-rounds": 1,
                                       "run-dir": str(run_dir), "round-timeout": 600.0, "secagg": True})
    record, replies, _ = simulate(config, client_app)
    plain = {path.stem.split("-round")[0]: dict(np.load(path)) for path in (run_dir / "plain").glob("*.npz")}
    return config, record, replies, plain, run_dir


def test_aggregate_is_the_weighted_mean_within_quantisation_error(secure_run):
    config, record, _, plain, run_dir = secure_run

    assert sorted(plain) == ["ecommerce", "social", "video"]
    assert sorted(record.training[1]) == sorted(plain)  # every platform's scalar metrics came through
    weights = np.array([p["num_examples"] for p in plain.values()], dtype=np.float64)
    assert len(set(weights)) > 1  # platforms differ in size, so the weighting matters
    # each client quantises w * x to steps of 2C / Q; the sum is divided by the summed weight (w = n / max weight)
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
    tolerance = len(plain) * step / (weights.sum() / config.privacy.secagg_max_weight)
    saved = TextEncoder.read_adapter(run_dir / "adapter")  # LoRA (PEFT file) + shared.* (recommendation adapters)
    keys = [k for k in next(iter(plain.values())) if k != "num_examples"]
    errors, spread = [], []
    for key in keys:
        stacked = np.stack([p[key] for p in plain.values()]).astype(np.float64)
        mean = np.tensordot(weights / weights.sum(), stacked, axes=1)
        got = saved[key.replace("|", ".").replace(".default", "")].numpy()
        errors.append(np.abs(got - mean).max())
        assert np.abs(got - mean).max() <= tolerance, key
        spread.append(np.abs(stacked - mean).max())
    assert max(spread) > 30 * tolerance  # the clients' adapters differ far more than the tolerance: it can tell
    assert max(errors) > 0  # quantised, not copied


def test_the_server_never_received_an_individual_update(secure_run):
    _, _, replies, plain, _ = secure_run
    train = [r for r in replies if r.metadata.message_type.endswith("train")]
    assert len(train) == 4 * 3  # setup, share keys, masked vectors, unmask: three clients each
    masked_seen = 0
    for reply in train:
        assert not reply.has_error()
        for arrays in reply.content.array_records.values():
            assert len(arrays) == 0  # secaggplus_mod cleared the plain parameters before the reply left
        for records in reply.content.config_records.values():
            for value in records.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, bytes) and item[:6] == b"\x93NUMPY":
                        masked = bytes_to_ndarray(item).astype(np.float64).ravel()
                        if masked.size < 100:  # the masked weight travels as a one-entry array
                            continue
                        masked_seen += 1
                        # masked integers are uniform over [0, 2^32); a quantised adapter lies in [0, 2^22)
                        assert 0.35 < masked.mean() / 2 ** 32 < 0.65
                        assert (masked < QUANTIZATION_RANGE).mean() < 0.05  # 1/1024 expected by chance
    assert masked_seen >= 3
