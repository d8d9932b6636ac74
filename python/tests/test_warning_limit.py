"""A peer that sends malformed messages in a loop costs a bounded number of log lines:
the first 8 warnings, then every power of two, and one summary when the connection closes
(as chatter-rpc's limit, chatter-core's `LogLimit`)."""

import asyncio
import logging
from typing import Any, List

import msgpack
import pytest

from chatter import rpc


class StandIn:
    """The part of `Connection` a `Peer` uses to receive; keeps the close callback."""

    def __init__(self) -> None:
        self.released = 0
        self._convs: dict = {}
        self.closers: List[Any] = []

    def set_handler(self, on_message, on_timeout) -> None:
        self.on_message = on_message

    def on_close(self, callback) -> None:
        self.closers.append(callback)

    def release(self, cost: int) -> None:
        self.released += cost


def test_a_flood_of_malformed_messages_logs_a_bounded_number_of_warnings(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        conn = StandIn()
        peer = rpc.Peer(conn)  # type: ignore[arg-type]
        caplog.set_level(logging.WARNING, logger="chatter.rpc")
        # A one-shot message (last set): nothing to answer, so each is only logged.
        for i in range(1000):
            conn.on_message(False, 2 * i + 1, True, True, False, msgpack.packb([99, "x"]), 10)
        # Every message is counted and its credit returned, logged or not.
        assert peer.stats.malformed == 1000
        assert conn.released == 10_000
        lines = [r.getMessage() for r in caplog.records]
        # 1..8, then 16, 32, 64, 128, 256, 512: 14 lines for 1000 messages.
        assert len(lines) == 14, lines
        assert all("unknown envelope kind 99" in line for line in lines)
        assert lines[-1].endswith("(warning 512 about this peer)")
        caplog.clear()
        for close in conn.closers:
            close(object())
        summary = [r.getMessage() for r in caplog.records]
        assert summary == [
            "986 further warnings about this peer's messages were not logged "
            "(the first 8 are, then every power of two)"
        ]

    asyncio.run(asyncio.wait_for(body(), 10))


def test_a_flood_of_signals_to_an_unknown_object_logs_a_bounded_number_of_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Signals the peer sends to an object this side does not host (or to a method it
    does not have) are warnings its messages cause, as chatter-rpc's "signal not
    delivered": within the same limit. Before, each was logged."""

    async def body() -> None:
        conn = StandIn()
        peer = rpc.Peer(conn)  # type: ignore[arg-type]
        caplog.set_level(logging.WARNING, logger="chatter.rpc")
        for i in range(1000):
            # A signal (kind 1): one-shot, to an object nobody registered.
            conn.on_message(False, 2 * i + 1, True, True, False, msgpack.packb([1, "nope", "m", 1000, []]), 10)
        assert peer.stats.signals_failed == 1000
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 14, lines
        assert lines[-1].endswith("(warning 512 about this peer)")

    asyncio.run(asyncio.wait_for(body(), 10))
