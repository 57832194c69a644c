"""Pollen's Flower ServerApp: start from the pretrained model's fresh adapter, run FedAvg over adapters,
save the global adapter in PEFT format and a checkpoint after every round, and keep the run's record.
A ServerApp started on a run folder that holds a checkpoint resumes after its last finished round.
"""

from __future__ import annotations


from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.adapters import from_record, merge_state, problems, record_bytes, signature, to_record, wire_state
from common.config import FEDERATION_ID, PollenConfig
from common.preflight import resolve_min_clients
from common.errors import ConfigError, FileProblem
from common.files import claim_run_dir, replace_dir
from common.model.encoder import TextEncoder
from common.runtime import configure_threads
from common.train import should_stop
from server.checkpoint import FOLDER as CHECKPOINT
from server.checkpoint import Checkpoint, check_resumable, load_checkpoint, new_federation_id, save_checkpoint
from server.record import RunRecord
from server.rounds import RoundLoop
from server.strategy import AdapterFedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, PollenConfig.from_flat(dict(context.run_config)))


def run_federation(grid: Grid, config: PollenConfig, log=print) -> RunRecord:
    """Run (or resume, when run-dir holds a checkpoint) the federation; returns the run's record."""
    configure_threads(1)  # the server only averages; leave the cores to the clients
    # never silently reused: locked while this run writes it; resumed only from its checkpoint, else refused
    run_dir = claim_run_dir(config.federation.run_dir, resume_marker=f"{CHECKPOINT}/state.json")
    config = resolve_min_clients(config.replace(**{"run-dir": str(run_dir)}), log, strict=False)
    saved = load_checkpoint(run_dir)  # a damaged checkpoint stops here, naming its file
    if not config.model.text:
        raise ConfigError("config: a federation needs text = true (an ID-only model has nothing to share: its "
                          "item IDs never leave a platform)")
    encoder = TextEncoder(config.model, seed=config.train.seed, max_len=config.data.max_len)
    initial = encoder.adapter_state()
    fed, wire = config.federation, config.federation.adapter_dtype
    shared = wire_state(initial, config.privacy.aggregation)  # FFA: only B travels
    record = RunRecord(run_dir, config.to_flat(), fed.num_rounds, log)
    record.adapter_bytes = record_bytes(to_record(shared, wire))
    strategy = AdapterFedAvg(signature(shared, wire), fed.min_clients,
                             on_aggregate=lambda rnd, arrays, training: record.add_training(rnd, training),
                             on_evaluate=record.add_evaluation, wire_dtype=wire, privacy=config.privacy)
    loop = RoundLoop(grid, strategy, fed, log, on_failure=record.add_failure)
    if saved:
        check_resumable(saved.config, config.to_flat(), run_dir)
        wrong = problems(saved.arrays, signature(shared))  # a checkpoint holds float32 tensors
        if wrong:
            raise FileProblem(run_dir / CHECKPOINT / "adapter.safetensors",
                              f"does not fit this model's adapter: {'; '.join(wrong[:3])}")
        arrays, first_round, federation_id = saved.arrays, saved.round + 1, saved.federation_id
        record.restore(saved.record)
        strategy.load_state_dict(saved.strategy)
        loop.names.update(saved.nodes)
        log(f"Pollen federation: resuming from the checkpoint of round {saved.round} in {run_dir}")
    else:
        arrays, first_round, federation_id = to_record(shared, wire), 0, new_federation_id()
        log(f"Pollen federation: {fed.num_rounds} rounds, adapter {record.adapter_bytes / 1024:.0f} KiB, "
            f"run folder {run_dir}")

    def end_round(server_round: int, arrays: ArrayRecord) -> bool:
        encoder.load_adapter_state(merge_state(encoder.adapter_state(), from_record(arrays)))
        replace_dir(run_dir / "adapter", encoder.save_adapter)  # the latest global adapter, PEFT format
        save_checkpoint(run_dir, Checkpoint(server_round, arrays, federation_id, strategy.state_dict(),
                                            record.state(), config.to_flat(), loop.names))
        best = [chosen["round"] for chosen in record.selected().values()]
        if should_stop(best, server_round, config.train.patience) and server_round > 0:
            log(f"round {server_round}: early stop, no platform's validation NDCG@10 improved for "
                f"{config.train.patience} rounds")
            return True
        return False

    # the clients get the flat config plus the federation id, under which they keep their private state
    flat = ConfigRecord({**config.to_flat(), FEDERATION_ID: federation_id})
    if config.privacy.secagg:  # training rounds through Flower's SecAgg+ workflow: the server sees only the sum
        from server.secagg import SecAggTraining

        with SecAggTraining(grid, strategy, config, flat) as secure:
            loop.run(arrays, flat, first_round, end_round, train=secure.round)
    else:
        loop.run(arrays, flat, first_round, end_round)
    record.save()
    return record


