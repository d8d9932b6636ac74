"""The receiving side of reliable signals (kinds 3 and 11), driven message by message over a
stand-in connection: what the peer acknowledges (PROTOCOL.md, "Reliable signals")."""

import asyncio
from typing import Any, List

import msgpack

from chatter import rpc


class StandIn:
    """The part of `Connection` a `Peer` uses to receive and acknowledge; records the acks."""

    def __init__(self) -> None:
        self.sent: List[Any] = []
        self.released = 0
        self._convs: dict = {}

    def set_handler(self, on_message, on_timeout) -> None:
        self.on_message = on_message

    def on_close(self, callback) -> None:
        pass

    def release(self, cost: int) -> None:
        self.released += cost

    def _send(self, payload: bytes, *_args: Any) -> object:
        self.sent.append(msgpack.unpackb(payload, raw=False))
        return object()


class Notes:
    def __init__(self) -> None:
        self.seen: List[str] = []

    def note(self, text: str) -> None:
        self.seen.append(text)


def test_a_reliable_signal_with_a_context_over_the_limit_is_acknowledged_failed():
    async def body() -> None:
        conn = StandIn()
        peer = rpc.Peer(conn, max_metadata_bytes=100)  # type: ignore[arg-type]
        notes = Notes()
        peer.register("notes", notes)

        def deliver(seq: int, metadata: dict, cost: int = 50) -> None:
            payload = msgpack.packb([rpc.RELIABLE_CTX, 7, seq, "notes", "note", 60_000, metadata, ["hi"]])
            conn.on_message(False, seq, True, True, False, payload, cost)

        deliver(1, {"k": "y" * 120})
        # Refused at once, never run, its credit back; the sender learns it failed.
        assert conn.sent == [[rpc.ACK, 7, 1, 2]]
        assert conn.released == 50
        assert peer.stats.signals_failed == 1
        # A re-sent copy is a duplicate: acknowledged again, not run.
        deliver(1, {"k": "y" * 120})
        assert conn.sent[1][:3] == [rpc.ACK, 7, 1]
        # The stream goes on: the next seq, within the limit, is run and acknowledged handled.
        deliver(2, {"k": "v"})
        for _ in range(10):
            if len(conn.sent) == 3:
                break
            await asyncio.sleep(0)
        assert notes.seen == ["hi"]
        assert conn.sent[2] == [rpc.ACK, 7, 2, 0]
        assert conn.released == 150

    asyncio.run(asyncio.wait_for(body(), 10))
