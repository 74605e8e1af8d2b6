"""The server's side of the Flower messaging: send messages to parties, collect the replies
that arrive in time, and map each party to its SuperNode (:func:`connect`). Every reply is
checked on arrival (a time-out or an error raised in the ClientApp leaves the party out with a
one-line reason); the protocols' servers (:mod:`.server_app`, :mod:`.server_fedmd`) build on it.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fed_distill.errors import FlowerError
from fed_distill.federated.flower.common import (
    HELLO,
    content,
)


def say(text: str) -> None:
    print(text, flush=True)


class Exchange:
    """Send messages to parties and collect the replies that arrive in time.

    A party whose reply is late stays *pending*: before it is sent anything new, the server
    waits (up to a timeout) for the late reply, so one node never runs two messages at once.
    """

    def __init__(self, grid: Grid, nodes: dict[int, int], names: list[str]):
        self.grid, self.nodes, self.names = grid, nodes, names
        self.pending: dict[int, str] = {}  # party -> id of a message it has not answered

    def _drain(self, parties: list[int], timeout: float) -> dict[int, str]:
        """Wait for late replies of ``parties``; returns those still busy -> reason."""
        waiting = {p: self.pending[p] for p in parties if p in self.pending}
        end = time.monotonic() + timeout
        while waiting:
            got = list(self.grid.pull_messages(list(waiting.values())))
            done = {m.metadata.reply_to_message_id for m in got}
            waiting = {p: mid for p, mid in waiting.items() if mid not in done}
            for p in list(self.pending):
                if self.pending[p] in done:
                    del self.pending[p]
            if not waiting or time.monotonic() > end:
                break
            time.sleep(0.05)
        return {
            p: f"{self.names[p]}: still busy with an earlier message it never answered"
            for p in waiting
        }

    def ask(
        self,
        message_type: str,
        contents: dict[int, Any],
        timeout: float,
        group: str,
        late: frozenset[int] = frozenset(),
    ) -> tuple[dict[int, Message], dict[int, str]]:
        """Send ``contents[party]`` to each party; return (replies with content, left out ->
        reason). The parties in ``late`` (an injected ``timeout`` fault) have their deadline
        forced: the server waits only for the others, and leaves these out as timed out
        whenever their reply comes, so a test's outcome never hangs on the wall clock."""
        left: dict[int, str] = self._drain(list(contents), timeout)
        send = {p: c for p, c in contents.items() if p not in left}
        msgs = [
            Message(c, dst_node_id=self.nodes[p], message_type=message_type, group_id=group)
            for p, c in send.items()
        ]
        ids = list(self.grid.push_messages(msgs))
        by_id = dict(zip(ids, send, strict=True))
        replies: dict[int, Message] = {}
        end = time.monotonic() + timeout
        waiting = set(ids)
        while waiting - {mid for mid in waiting if by_id[mid] in late}:
            for m in self.grid.pull_messages(list(waiting)):
                mid = m.metadata.reply_to_message_id
                waiting.discard(mid)
                replies[by_id[mid]] = m
            if time.monotonic() > end:
                break
            time.sleep(0.02)
        for p in late & set(replies):  # in time after all, but its deadline was forced
            del replies[p]
            left[p] = f"{self.names[p]}: no answer within {timeout:g}s (timeout)"
        for mid in waiting:
            p = by_id[mid]
            self.pending[p] = mid
            left[p] = f"{self.names[p]}: no answer within {timeout:g}s (timeout)"
        ok: dict[int, Message] = {}
        for p, m in replies.items():
            if m.has_error():
                left[p] = f"{self.names[p]}: the ClientApp failed: {_one_line(m.error.reason)}"
            else:
                ok[p] = m
        for _p, reason in sorted(left.items()):
            say(f"left out: {reason}")
        return ok, left


def _one_line(reason: str, limit: int = 300) -> str:
    """The gist of a ClientApp's error report (Ray wraps it in a multi-line traceback)."""
    text = str(reason)
    if "Message:" in text:
        text = text.rsplit("Message:", 1)[1]
    text = " ".join(text.replace("'>", " ").split())
    return text[:limit]


def connect(
    grid: Grid, num: int, names: list[str], wait_s: float, answer_s: float | None = None
) -> Exchange:
    """Wait until ``num`` nodes are connected and map each party (partition id) to its node.

    ``answer_s`` bounds the wait for each node's first answer (default ``wait_s``): a ClientApp
    can take long to start on a busy machine (Ray actors import torch and build the data)."""
    end = time.monotonic() + wait_s
    nodes = list(grid.get_node_ids())
    while len(nodes) < num:
        if time.monotonic() > end:
            raise FlowerError(
                f"only {len(nodes)} of {num} SuperNodes connected within {wait_s:g}s; start one "
                "SuperNode per party (node config partition-id=0..N-1)"
            )
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    ex = Exchange(grid, dict(enumerate(nodes)), [f"node {n}" for n in nodes])
    replies, left = ex.ask(
        HELLO, {i: content() for i in range(len(nodes))}, answer_s or wait_s, "hello"
    )
    mapping: dict[int, int] = {}
    for i, m in replies.items():
        part = int(m.content["metrics"]["partition"])
        if part in mapping or not 0 <= part < num:
            raise FlowerError(
                f"node {nodes[i]} has partition-id {part}; need 0..{num - 1}, each once"
            )
        mapping[part] = nodes[i]
    if len(mapping) != num:
        raise FlowerError(
            f"nodes hold partitions {sorted(mapping)}, but parties 0..{num - 1} are needed"
            + (f" ({'; '.join(left.values())})" if left else "")
        )
    return Exchange(grid, mapping, names)


# How long a party with an injected ``timeout`` fault sleeps before it answers: the server
# forces its deadline (``Exchange.ask(late=...)``), so the sleep only makes the reply late for
# real, to be drained before the party's next message; it never decides the outcome.
FAULT_SLEEP_S = 1.0


def fault_options(
    faults: dict[tuple[int, int], str],
    party: int,
    round_: int,
    timeout: float,
    forced: bool = False,
) -> dict:
    """What a party's message carries to inject its fault of ``round_`` (none: {}). A
    ``timeout`` sleeps past the deadline ``timeout``, or, where the server forces the party's
    deadline (``forced``: it asks with ``late=late_parties(...)``), briefly."""
    kind = faults.get((party, round_), "")
    sleep = min(FAULT_SLEEP_S, timeout) if forced else timeout + 3.0
    return {"fault": kind, "fault_sleep": sleep} if kind else {}


def late_parties(faults: dict[tuple[int, int], str], round_: int) -> frozenset[int]:
    """The parties with an injected ``timeout`` fault in ``round_``: their deadline is forced."""
    return frozenset(p for (p, r), kind in faults.items() if r == round_ and kind == "timeout")


def flower_summary(job: dict[str, Any]) -> dict[str, Any]:
    return {k: job[k] for k in ("timeout", "train_timeout", "faults") if k in job}
