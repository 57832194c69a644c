"""The node's settings (client/node.py) and the parsed-data cache on the node's disk (client/session.py)."""

import os
from pathlib import Path

from client.node import NodeSettings
from client.session import cached_split
from common.config import PollenConfig


def test_deployed_node_takes_its_folders_from_the_node_config(tmp_path):
    node = NodeSettings.build(PollenConfig(), {"platform": "video", "data-path": "/data/video", "cache-dir": "/n/cache",
                                               "state-dir": "/n/state", "export-dir": "/n/models", "threads": 2,
                                               "worker": "/n/worker.sock"})
    assert node.deployed and (node.platform, node.data_path, node.silo) == ("video", "/data/video", None)
    assert (node.cache_dir, node.state_dir, node.export_dir, node.threads, node.worker) == (
        "/n/cache", "/n/state", "/n/models", 2, "/n/worker.sock")
    bare = NodeSettings.build(PollenConfig(), {"platform": "video", "cache-dir": "/n/cache"})
    assert bare.state_dir == "/n/cache/state" and bare.export_dir is None and bare.worker is None


def test_simulated_node_keeps_state_and_models_in_the_run_folder():
    config = PollenConfig().replace(**{"run-dir": "/runs/x", "clients-per-platform": 2})
    node = NodeSettings.build(config, {"partition-id": 3, "num-partitions": 6})
    assert not node.deployed and (node.platform, node.silo) == ("social", 1)
    assert (node.state_dir, node.export_dir, node.worker) == ("/runs/x/client-state", "/runs/x/models", None)


def write_platform(folder: Path, users: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"u{u},i{(u + k) % 7},{1000 * u + k}" for u in range(users) for k in range(4)]
    (folder / "interactions.csv").write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    (folder / "items.csv").write_text("item,text\n" + "\n".join(f"i{i},item number {i}" for i in range(7)) + "\n")


def test_parsed_split_is_cached_on_disk_until_its_files_change(tmp_path):
    data, cache = tmp_path / "shop", tmp_path / "cache"
    write_platform(data, users=5)
    config = PollenConfig()
    first = cached_split(config, "shop", str(data), None, str(cache))
    files = list((cache / "splits").iterdir())
    assert first.num_users == 5 and len(files) == 1
    again = cached_split(config, "shop", str(data), None, str(cache))
    assert again.user_ids == first.user_ids and list((cache / "splits").iterdir()) == files
    write_platform(data, users=6)  # the partner exported new data: the cached split is no longer valid
    os.utime(data / "interactions.csv", ns=(1, 1))
    assert cached_split(config, "shop", str(data), None, str(cache)).num_users == 6
    assert cached_split(config.replace(**{"max-len": 3}), "shop", str(data), None, str(cache)).num_users == 6
    assert len(list((cache / "splits").iterdir())) == 3  # one per valid (data, settings) pair
