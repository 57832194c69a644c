"""The federation's round loop, the same for simulation and deployment.

Flower's ``Strategy.start`` always counts from round 1; this loop starts wherever the checkpoint says, and
round 0 evaluates the starting adapter. Each round: wait (at most round-timeout) until min-clients nodes are
connected, send train messages to every connected node, aggregate the replies that came within round-timeout
(the strategy refuses to aggregate fewer than min-clients), evaluate the new adapter, then ``end_round``
(the server checkpoints). A node that failed (error reply, e.g. its SuperNode missed its heartbeats) or did
not answer in time is named in the log; a node that comes back is simply sampled again in the next round.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.config import FederationConfig

Log = Callable[[str], None]
Train = Callable[[int, ArrayRecord, ConfigRecord], "ArrayRecord | None"]


class RoundLoop:
    def __init__(self, grid: Grid, strategy: Strategy, federation: FederationConfig, log: Log = print,
                 on_failure: Callable[[int, str], None] = lambda r, line: None, poll_seconds: float = 1.0,
                 reply_poll_seconds: float = 0.2):
        self.grid, self.strategy, self.federation = grid, strategy, federation
        self.reply_poll_seconds = reply_poll_seconds
        self.log, self.on_failure, self.poll_seconds = log, on_failure, poll_seconds
        self.names: dict[int, str] = {}  # node id -> platform, learned from replies, to name failed nodes

    def run(self, arrays: ArrayRecord, config: ConfigRecord, first_round: int,
            end_round: Callable[[int, ArrayRecord], bool | None], train: Train | None = None) -> ArrayRecord:
        """Rounds ``first_round``..num-rounds, or until ``end_round`` returns True (early stopping);
        ``train`` replaces the plain training step (SecAgg+)."""
        train = train or self.train
        for rnd in range(first_round, self.federation.num_rounds + 1):
            self.wait_for_nodes(rnd)
            if rnd > 0:
                aggregated = train(rnd, arrays, config)
                if aggregated is None:
                    self.log(f"round {rnd}: nothing aggregated; the global adapter stays as it was")
                else:
                    arrays = aggregated
            replies = self.exchange(rnd, "evaluate", self.strategy.configure_evaluate(rnd, arrays, config, self.grid))
            self.strategy.aggregate_evaluate(rnd, replies)
            if end_round(rnd, arrays):
                break
        return arrays

    def train(self, rnd: int, arrays: ArrayRecord, config: ConfigRecord) -> ArrayRecord | None:
        """Send the global adapter to every node, aggregate the replies (None: nothing to aggregate)."""
        replies = self.exchange(rnd, "train", self.strategy.configure_train(rnd, arrays, config, self.grid))
        return self.strategy.aggregate_train(rnd, replies)[0]

    def wait_for_nodes(self, rnd: int) -> None:
        """Flower's sampling waits forever for min-clients nodes; give up after round-timeout with a clear error."""
        need, timeout = self.federation.min_clients, self.federation.round_timeout
        deadline = time.monotonic() + timeout
        while (connected := len(list(self.grid.get_node_ids()))) < need:
            if time.monotonic() > deadline:
                kept = f"; the checkpoint of round {rnd - 1} is kept: run again to resume" if rnd > 0 else ""
                raise RuntimeError(f"round {rnd}: {connected} node(s) connected after {timeout:.0f}s, min-clients "
                                   f"is {need}{kept}")
            time.sleep(self.poll_seconds)

    def exchange(self, rnd: int, phase: str, messages: Iterable[Message]) -> list[Message]:
        """Send, collect the replies that came within round-timeout, name every node that failed or stayed silent.

        A reply is matched to its node through the message it answers: the SuperLink itself signs the error
        reply for a node that missed its heartbeats.
        """
        messages = list(messages)
        timeout = self.federation.round_timeout
        replies = self.send_and_receive(messages, timeout)
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        answered = set()
        for reply in replies:
            node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            if reply.has_error():
                self.fail(rnd, phase, f"node {node} ({self.name(node)}) failed: {reply.error.reason}")
            elif "platform" in reply.content.config_records:
                self.names[node] = str(reply.content["platform"]["platform"])
        for node in sorted(set(node_of.values()) - answered):
            self.fail(rnd, phase, f"node {node} ({self.name(node)}) sent no reply within {timeout:.0f}s")
        return replies

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        """``Grid.send_and_receive`` with a short poll: the deployed Grid looks for replies every 3 s (the
        simulation's every 0.1 s), which costs a deployed round up to 3 s per phase for nothing."""
        pending = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                replies.append(reply)
                pending.discard(reply.metadata.reply_to_message_id)
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(self.reply_poll_seconds)
        return replies

    def fail(self, rnd: int, phase: str, what: str) -> None:
        line = f"round {rnd} {phase}: {what}"
        self.log(line)
        self.on_failure(rnd, line)

    def name(self, node_id: int) -> str:
        return self.names.get(node_id, "platform unknown")
