"""The federation's round loop, the same for simulation and deployment.

Flower's ``Strategy.start`` always counts from round 1; this loop starts wherever the checkpoint says, and
round 0 evaluates the starting adapter. Each round: wait (at most round-timeout) until min-clients nodes are
connected, send train messages to every connected node, aggregate the replies that came within round-timeout
(the strategy refuses to aggregate fewer than min-clients), evaluate the new adapter, then ``end_round``
(the server checkpoints). A node that failed (error reply, e.g. its SuperNode missed its heartbeats) or did
not answer in time is named in the log with its platform. When the nodes still able to answer are fewer than
min-clients (by default every client of the run), the federation stops at once (NodeFailed) instead of running
on without them; a lower min-clients asks for partial federations, where a node that comes back is simply
sampled again in the next round. Every wait (for nodes, for replies) says what it waits for every 30 s.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.config import FederationConfig
from common.errors import NodeFailed, parse_node_error

PULL_SECONDS = 0.1  # how often replies are pulled (Flower's send_and_receive pulls as often)
NOTICE_SECONDS = 30.0  # a wait longer than this says what it waits for, and again every NOTICE_SECONDS

Log = Callable[[str], None]
Train = Callable[[int, ArrayRecord, ConfigRecord], "ArrayRecord | None"]


class RoundLoop:
    def __init__(self, grid: Grid, strategy: Strategy, federation: FederationConfig, log: Log = print,
                 on_failure: Callable[[int, str], None] = lambda r, line: None, poll_seconds: float = 1.0,
                 reply_poll_seconds: float = 0.2, notice_seconds: float | None = None):
        self.grid, self.strategy, self.federation = grid, strategy, federation
        self.reply_poll_seconds = reply_poll_seconds
        self.log, self.on_failure, self.poll_seconds = log, on_failure, poll_seconds
        self.notice_seconds = NOTICE_SECONDS if notice_seconds is None else notice_seconds
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
        """Flower's sampling waits forever for min-clients nodes; say so every 30 s, give up after round-timeout."""
        need, timeout = self.federation.min_clients, self.federation.round_timeout
        start = time.monotonic()
        notice = start + self.notice_seconds
        while (connected := len(list(self.grid.get_node_ids()))) < need:
            now = time.monotonic()
            if now - start > timeout:
                kept = f"; the checkpoint of round {rnd - 1} is kept: run again to resume" if rnd > 0 else ""
                raise NodeFailed(f"round {rnd}: {connected} node(s) connected after {timeout:.0f}s (round-timeout), "
                                 f"min-clients is {need}{kept}")
            if now >= notice:
                self.log(f"round {rnd}: waiting for nodes to connect: {connected} of min-clients {need} "
                         f"({now - start:.0f}s; giving up after round-timeout {timeout:.0f}s)")
                notice = now + self.notice_seconds
            time.sleep(self.poll_seconds)

    def exchange(self, rnd: int, phase: str, messages: Iterable[Message]) -> list[Message]:
        """Send, collect the replies that come within round-timeout, name every node that failed or stayed silent;
        stop the federation (NodeFailed) as soon as fewer than min-clients nodes can still answer.

        A reply is matched to its node through the message it answers: the SuperLink itself signs the error
        reply for a node that missed its heartbeats.
        """
        messages = list(messages)
        if not messages:
            return []
        timeout, need = self.federation.round_timeout, self.federation.min_clients
        pending = set(self.grid.push_messages(messages))
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        replies: list[Message] = []
        failed = 0
        start = time.monotonic()
        notice = start + self.notice_seconds
        while pending:
            for reply in list(self.grid.pull_messages(set(pending))):
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
                node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                if not reply.has_error():
                    if "platform" in reply.content.config_records:
                        self.names[node] = str(reply.content["platform"]["platform"])
                    continue
                reason = str(reply.error.reason or f"error code {reply.error.code}")
                known = parse_node_error(reason)  # the ClientApp names its platform (client/app.py)
                if known:
                    self.names[node], reason = known[0], known[2]
                failed += 1
                line = f"node {node} ({self.name(node)}) failed: {reason}"
                self.fail(rnd, phase, line)
                if len(messages) - failed < need:
                    raise NodeFailed(f"round {rnd} {phase}: {line} -- the federation stops (min-clients {need}; "
                                     "set min-clients lower to go on without a failed platform)",
                                     user_error=bool(known and known[1]))
            now = time.monotonic()
            if not pending or now - start > timeout:
                break
            if now >= notice:
                waiting = ", ".join(f"node {node_of[m]} ({self.name(node_of[m])})" for m in sorted(pending))
                self.log(f"round {rnd} {phase}: waiting for {len(pending)} of {len(messages)} replies: {waiting} "
                         f"({now - start:.0f}s; giving up after round-timeout {timeout:.0f}s)")
                notice = now + self.notice_seconds
            time.sleep(self.reply_poll_seconds)
        silent = sorted(node_of[m] for m in pending)
        for node in silent:
            self.fail(rnd, phase, f"node {node} ({self.name(node)}) sent no reply within {timeout:.0f}s")
        if silent and len(messages) - failed - len(silent) < need:
            raise NodeFailed(f"round {rnd} {phase}: {len(silent)} node(s) sent no reply within round-timeout "
                             f"{timeout:.0f}s ({', '.join(self.name(n) for n in silent)}) -- the federation stops "
                             f"(min-clients {need}); the checkpoint of the last finished round is kept")
        return replies

    def fail(self, rnd: int, phase: str, what: str) -> None:
        line = f"round {rnd} {phase}: {what}"
        self.log(line)
        self.on_failure(rnd, line)

    def name(self, node_id: int) -> str:
        return self.names.get(node_id, "platform unknown")
