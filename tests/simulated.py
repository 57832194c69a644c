"""A real Flower simulation of Pollen's ServerApp for tests: the Grid records every reply a client sent."""

from __future__ import annotations

from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from common.config import PollenConfig
from server.app import run_federation


class RecordingGrid:
    """Pass-through Grid that keeps every reply."""

    def __init__(self, grid):
        self.grid, self.replies = grid, []

    def send_and_receive(self, messages, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies

    def pull_messages(self, message_ids):  # the round loop pushes, then pulls until every reply is in
        replies = list(self.grid.pull_messages(message_ids))
        self.replies.extend(replies)
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def simulate(config: PollenConfig, client_app, num_supernodes: int = 3) -> tuple:
    """Run ``run_federation`` against ``client_app`` in Flower's simulation engine (Ray, 2 CPUs, 1 per client).

    Returns (RunRecord, every reply the server received, the server's log lines)."""
    seen: dict = {"log": []}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context):
        recording = RecordingGrid(grid)
        seen["replies"] = recording.replies
        try:
            seen["record"] = run_federation(recording, config, log=seen["log"].append)
        except Exception as error:  # the caller sees it (raised below), not only Flower's log
            seen["error"] = error

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    if "error" in seen:
        seen["error"].server_log = seen["log"]
        raise seen["error"]
    assert "record" in seen, "the ServerApp did not finish"
    return seen["record"], seen["replies"], seen["log"]
