"""Pollen's Flower ServerApp: start from the pretrained model's fresh adapter, run FedAvg over adapters,
save the global adapter in PEFT format after every round, and keep the run's record.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.adapters import from_record, record_bytes, signature, to_record
from common.aggregation import merge_state, wire_state
from common.config import PollenConfig
from common.files import replace_dir
from common.model.encoder import TextEncoder
from common.runtime import configure_threads
from server.record import RunRecord
from server.strategy import AdapterFedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, PollenConfig.from_flat(dict(context.run_config)))


def run_federation(grid: Grid, config: PollenConfig, log=print) -> RunRecord:
    configure_threads(1)  # the server only averages; leave the cores to the clients
    run_dir = resolve_run_dir(config.federation.run_dir)
    config = config.replace(**{"run-dir": str(run_dir)})  # simulated clients export their models there
    encoder = TextEncoder(config.model, seed=config.train.seed)
    initial = encoder.adapter_state()
    if not initial:
        raise ValueError("config: a federation needs text = true and lora-layers >= 1 (there is no adapter to share)")
    fed = config.federation
    shared = wire_state(initial, config.privacy.aggregation)  # FFA: only B travels
    record = RunRecord(run_dir, config.to_flat(), fed.num_rounds, log)
    record.adapter_bytes = record_bytes(to_record(shared))

    def after_aggregate(server_round: int, arrays: ArrayRecord, training: dict) -> None:
        record.add_training(server_round, training)
        encoder.load_adapter_state(merge_state(encoder, from_record(arrays)))
        replace_dir(run_dir / "adapter", encoder.save_adapter)  # the latest global adapter, PEFT format

    strategy = AdapterFedAvg(signature(shared), fed.min_clients, on_aggregate=after_aggregate,
                             on_evaluate=record.add_evaluation, privacy=config.privacy)
    flat = ConfigRecord(config.to_flat())
    arrays = to_record(shared)
    log(f"Pollen federation: {fed.num_rounds} rounds, adapter {record.adapter_bytes / 1024:.0f} KiB, "
        f"run folder {run_dir}")
    strategy.evaluate_round(grid, 0, arrays, flat, fed.round_timeout)
    if config.privacy.secagg:  # training rounds through Flower's SecAgg+ workflow: the server sees only the sum
        from server.secagg import run_secagg

        run_secagg(grid, strategy, arrays, config)
    else:
        strategy.start(grid, arrays, fed.num_rounds, fed.round_timeout, train_config=flat, evaluate_config=flat)
    record.save()
    return record


def resolve_run_dir(run_dir: str) -> Path:
    path = Path(run_dir) if run_dir else Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path
