"""The server's checkpoint: everything a restarted ServerApp needs to carry on from the last finished round.

One folder, ``run_dir/checkpoint``, swapped in whole after every round (common/files.replace_dir), so a crash
leaves the previous round's checkpoint or the new one, never a mix:

    adapter.safetensors   the global adapter after the round (the tensors exactly as aggregated)
    strategy.pt           the strategy's own state (FedAvg keeps none; a stateful aggregation would)
    state.json            round number, federation id, the run record so far, the config it ran with
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from safetensors.torch import save_file

from common.adapters import from_record, to_record
from common.checks import check_tensors, load_tensors, load_torch
from common.errors import FileProblem, one_line
from common.files import replace_dir, write_json

FOLDER = "checkpoint"
VERSION = 1
# settings that may change when a run is resumed (more rounds, a longer timeout, fewer partners required)
RESUMABLE_KEYS = ("num-rounds", "round-timeout", "min-clients", "run-dir")


@dataclass
class Checkpoint:
    round: int                 # the last finished round (0 = only the starting adapter was evaluated)
    arrays: ArrayRecord        # the global adapter after that round
    federation_id: str         # names this federation's private state on the partners' disks
    strategy: dict[str, Any]
    record: dict[str, Any]     # RunRecord.state()
    config: dict[str, Any]     # the flat PollenConfig
    nodes: dict[int, str]      # node id -> platform, to name a failed node after a restart


def new_federation_id() -> str:
    return uuid.uuid4().hex[:16]


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in from_record(checkpoint.arrays).items()},
                  str(tmp / "adapter.safetensors"))
        torch.save(checkpoint.strategy, tmp / "strategy.pt")
        write_json(tmp / "state.json", {"version": VERSION, "round": checkpoint.round,
                                        "federation-id": checkpoint.federation_id,
                                        "record": checkpoint.record, "config": checkpoint.config,
                                        "nodes": {str(k): v for k, v in checkpoint.nodes.items()}})

    return replace_dir(Path(run_dir) / FOLDER, fill)


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The run folder's checkpoint, None when it has none; a damaged one is a FileProblem naming the file."""
    folder = Path(run_dir) / FOLDER
    state_file = folder / "state.json"
    if not state_file.is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise FileProblem(state_file, "missing, so the checkpoint is incomplete and cannot be resumed; "
                                          "choose a new run-dir or pass --overwrite to start again")
        return None
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise FileProblem(state_file, f"not readable JSON ({one_line(error)}); the checkpoint is damaged") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise FileProblem(state_file, f"checkpoint version {version!r}, this code reads {VERSION}")
    kinds = {"round": int, "federation-id": str, "record": dict, "config": dict, "nodes": dict}
    for key, kind in kinds.items():
        if not isinstance(state.get(key), kind) or (kind is int and isinstance(state[key], bool)):
            raise FileProblem(state_file, f"key {key!r} missing or not {kind.__name__} (got "
                                          f"{type(state.get(key)).__name__}); the checkpoint is damaged")
    if state["round"] < 0 or set(state["record"]) < {"evaluations", "training", "round_seconds", "failures"}:
        raise FileProblem(state_file, "round below 0 or an incomplete run record; the checkpoint is damaged")
    tensors = load_tensors(folder / "adapter.safetensors", "checkpoint adapter")
    check_tensors(tensors, folder / "adapter.safetensors", what="checkpoint adapter")
    strategy = load_torch(folder / "strategy.pt", "strategy state")
    try:
        nodes = {int(k): str(v) for k, v in state["nodes"].items()}
    except ValueError:
        raise FileProblem(state_file, "'nodes' must map node ids (integers) to platforms") from None
    return Checkpoint(state["round"], to_record(tensors), state["federation-id"], strategy, state["record"],
                      state["config"], nodes)


def check_resumable(saved: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    """A resumed run must train the same model on the same data: only RESUMABLE_KEYS may differ."""
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_KEYS and saved.get(k) != current.get(k))
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:5])
        raise FileProblem(folder / FOLDER, f"the run folder holds a checkpoint made with other settings ({detail}); "
                                           "resume with the same settings, choose a new run-dir, or pass --overwrite")
