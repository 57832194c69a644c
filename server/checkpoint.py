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
from safetensors.torch import load_file, save_file

from common.adapters import from_record, to_record
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
    folder = Path(run_dir) / FOLDER
    if not (folder / "state.json").is_file():
        return None
    state = json.loads((folder / "state.json").read_text())
    if state.get("version") != VERSION:
        raise ValueError(f"{folder / 'state.json'}: checkpoint version {state.get('version')!r}, "
                         f"this code reads {VERSION}")
    arrays = to_record(load_file(str(folder / "adapter.safetensors")))
    strategy = torch.load(folder / "strategy.pt", weights_only=True)
    return Checkpoint(state["round"], arrays, state["federation-id"], strategy, state["record"], state["config"],
                      {int(k): v for k, v in state["nodes"].items()})


def check_resumable(saved: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    """A resumed run must train the same model on the same data: only RESUMABLE_KEYS may differ."""
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_KEYS and saved.get(k) != current.get(k))
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:5])
        raise ValueError(f"{folder / FOLDER}: the run folder holds a checkpoint made with other settings "
                         f"({detail}); resume with the same settings or choose a new run-dir")
