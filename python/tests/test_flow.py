"""Flow control both ways, against the `small` server of py_peer.rs (64 KiB window, two
handler slots, an outbox of 16 signals)."""

from __future__ import annotations

import asyncio

import pytest

import chatter
from conftest import run, within

WINDOW = 64 * 1024
SIZE = 1000


def test_python_sender_waits_for_a_slow_rust_consumer(rust):
    async def body():
        peer = await within(chatter.Peer.connect(rust["small"], max_queued_signals=8, when_full="error"))
        gate = peer.remote("gate")
        # The filled connection's handler slots are all blocked (its calls would wait for
        # a slot too): the gate is watched and opened through a second connection.
        control = await within(chatter.Peer.connect(rust["small"]))
        watch = control.remote("gate")
        before = await within(watch.passed())
        data = "d" * SIZE
        sent = 0
        # Nothing is handled (the gate is closed): Rust holds the credit of every signal,
        # so the Python side runs out of credit, then out of outbox room.
        with pytest.raises(chatter.OutboxFull):
            for sent in range(1000):
                await within(gate.hold.signal(sent, data))
        cost = SIZE + 30 + 64
        # What went out is bounded by Rust's window (signals keep half of it free), the
        # rest waits in the bounded outbox.
        assert sent <= WINDOW // cost + 8, sent
        assert peer.queued == 8
        assert peer.connection.credit < WINDOW // 2 + cost
        assert await within(watch.passed()) == before

        # The waiting policy: the next signal waits for room instead of failing.
        peer.when_full = "wait"
        waiting = asyncio.ensure_future(gate.hold.signal(sent, data))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done()

        # Open the gate: everything flows, the waiting send completes.
        await within(watch.open(sent + 1))
        await within(waiting)
        await within(peer.flush(), 10)
        assert await within(watch.wait_passed(before + sent + 1, 10_000)) == before + sent + 1
        assert peer.stats.signals_expired == 0
        await peer.close()
        await control.close()

    run(body)


class Sink:
    """A slow consumer: each `put` waits until the test opens the gate."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.all_arrived = asyncio.Event()
        self.gate = asyncio.Event()
        self.arrived = []
        self.max_buffered = 0
        self.conn = None

    async def put(self, i: int, data: str) -> None:
        self.arrived.append(i)
        if len(self.arrived) == self.n:
            self.all_arrived.set()
        self.max_buffered = max(self.max_buffered, self.conn.buffered)
        await self.gate.wait()


def test_rust_sender_waits_for_a_slow_python_consumer(rust):
    async def body():
        options = chatter.Options(max_frame_size=16 * 1024, receive_window=WINDOW)
        peer = await within(chatter.Peer.connect(rust["small"], options, max_concurrent_handlers=4))
        n = 400
        sink = Sink(n)
        sink.conn = peer.connection
        peer.register("py", sink)
        test = peer.remote("test")
        await within(test.flood(n, SIZE))
        # Rust runs out of credit, then fills its outbox (16) and its sender waits.
        while True:
            status = await within(test.flood_status())
            if status["queued"] >= 16:
                break
        assert not status["done"]
        # What Rust has handed over is bounded by our window: it waits, it does not grow.
        received_bound = WINDOW // (SIZE + 64) + 1
        assert status["sent"] <= received_bound + 16 + 1, status
        assert peer.connection.buffered <= WINDOW
        assert len(sink.arrived) == 4  # only the handler slots took messages
        again = await within(test.flood_status())
        assert again["sent"] == status["sent"]

        sink.gate.set()
        status = await within(test.wait_flood(15_000), 20)
        assert status["done"] and status["sent"] == n and status["errors"] == 0
        await within(sink.all_arrived.wait())
        assert sorted(sink.arrived) == list(range(n))
        assert sink.max_buffered <= WINDOW
        assert status["max_queued"] <= 16
        await peer.close()

    run(body, 30)
