"""A platform's private training state (head, optimiser, RNGs, best validation score) on the node's own disk.

The Deployment Engine runs every message in a fresh process, and a restarted server is a new Flower run whose
``Context.state`` starts empty, so this state lives in files: one per round, under

    STATE_ROOT/<federation id>/<platform>-<digest of the training settings>-v<VERSION>/round-<k>.pt

Training round k starts from the newest file of a round before k, evaluation of round k from the newest file up
to k. A round that is repeated after a server restart therefore starts from exactly the state the interrupted
one started from. The two newest rounds are kept.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from common.config import FederationConfig, PollenConfig
from common.files import write_atomic

VERSION = 2  # 2: the state holds torch's global RNG
KEEP = 2
_FILE = re.compile(r"round-(\d+)\.pt$")


def training_settings(config: PollenConfig) -> dict:
    """The settings that shape a client's model and data; not the federation's own (rounds, timeout, run folder)."""
    federation = {f.replace("_", "-") for f in FederationConfig.__dataclass_fields__}
    return {k: v for k, v in config.to_flat().items() if k not in federation}


class NodeState:
    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def open(cls, root: str | Path, federation_id: str, platform: str, config: PollenConfig) -> "NodeState":
        digest = hashlib.sha256(json.dumps(training_settings(config), sort_keys=True).encode()).hexdigest()[:12]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", federation_id):
            raise ValueError(f"federation id {federation_id!r}: expected letters, digits, '.', '_' or '-'")
        return cls(Path(root) / federation_id / f"{platform}-{digest}-v{VERSION}")

    def rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _FILE.match(p.name)))

    def load(self, up_to: int) -> bytes | None:
        """The newest state saved at a round <= up_to, or None (the node starts fresh)."""
        usable = [r for r in self.rounds() if r <= up_to]
        return (self.folder / f"round-{usable[-1]}.pt").read_bytes() if usable else None

    def save(self, server_round: int, data: bytes) -> None:
        write_atomic(self.folder / f"round-{server_round}.pt", data)
        for old in self.rounds()[:-KEEP]:
            (self.folder / f"round-{old}.pt").unlink(missing_ok=True)
