"""Bad input from the Rust side: every case closes the connection (or fails the call)
with a clear error, never hangs. The `bad:*` listeners of py_peer.rs misbehave on purpose.
"""

from __future__ import annotations

import asyncio

import pytest

import chatter
from conftest import run, within


@pytest.mark.parametrize(
    "name,kind,reason",
    [
        ("not_chatter", "handshake", 'peer does not speak chatter (first bytes: 48 54 54 50 2f 31 2e 31 20 34 30 30 20 42 61 64 "HTTP/1.1 400 Bad")'),
        ("bad_version", "handshake", "peer speaks protocol version 2, this side speaks 1"),
        ("close_first", "peer", "busy"),
    ],
)
def test_handshake_failures(rust, name, kind, reason):
    async def body():
        with pytest.raises(chatter.ConnectError) as e:
            await within(chatter.connect(rust["bad:" + name]))
        assert e.value.cause.kind == kind
        assert e.value.cause.reason == reason
        if name == "close_first":
            assert e.value.cause.code == 4

    run(body)


def test_silent_server_fails_the_handshake_in_time(rust):
    async def body():
        with pytest.raises(chatter.ConnectError) as e:
            await within(chatter.connect(rust["bad:silent"], chatter.Options(handshake_timeout=0.2)))
        assert e.value.cause.reason == "handshake timed out"

    run(body)


@pytest.mark.parametrize(
    "name,reason",
    [
        ("oversized", "frame of 2147483647 bytes exceeds the maximum of 4194304"),
        ("signed_id", "malformed frame: expected an unsigned integer, found a signed integer (marker 0xd0)"),
        ("bad_id", "message id 2 where 1 was expected"),
        ("unknown_conversation", "message in unknown or ended conversation (first id 5, opened by us)"),
        ("window_overflow", "unexpected frame: window update to 2097153 bytes exceeds the announced window of 2097152"),
    ],
)
def test_protocol_errors_close_the_connection(rust, name, reason):
    async def body():
        conn = await within(chatter.connect(rust["bad:" + name]))
        cause = await within(conn.closed())
        assert cause.kind == "protocol" and cause.code == 1
        assert cause.reason == reason
        with pytest.raises(chatter.ConnectionClosed):
            await within(conn.receive())

    run(body)


def test_a_peer_exceeding_our_window_is_disconnected(rust):
    async def body():
        options = chatter.Options(max_frame_size=16 * 1024, receive_window=64 * 1024)
        conn = await within(chatter.connect(rust["bad:exceed_window"], options))
        cause = await within(conn.closed())
        assert cause.kind == "protocol"
        assert cause.reason.startswith("peer exceeded the receive window (")
        assert cause.reason.endswith("window 65536)")
        # What was accepted before the violation is bounded by the window.
        assert conn.buffered <= 64 * 1024 + 1064

    run(body)


def test_truncated_frame_then_end_of_stream(rust):
    async def body():
        conn = await within(chatter.connect(rust["bad:truncated"]))
        cause = await within(conn.closed())
        assert cause.kind == "io"
        assert "without a close frame" in cause.reason

    run(body)


def test_keepalive_closes_a_mute_peer(rust):
    async def body():
        options = chatter.Options(keepalive_interval=0.1, keepalive_timeout=0.2)
        conn = await within(chatter.connect(rust["bad:mute"], options))
        cause = await within(conn.closed(), 5)
        assert cause.kind == "keepalive"

    run(body)


def test_pings_are_answered(rust):
    async def body():
        conn = await within(chatter.connect(rust["bad:ping"]))
        msg = await within(conn.receive())  # sent by the peer once our pong arrived
        assert msg.decode() is True and msg.opening and msg.last
        await within(conn.close())

    run(body)


@pytest.mark.parametrize(
    "name,message",
    [
        ("reply_unknown_status", "unknown reply status 9"),
        ("reply_not_array", "malformed reply"),
        ("reply_unknown_failure", "unknown failure kind 99"),
        ("reply_not_last", "the callee answered without ending the call"),
    ],
)
def test_bad_replies_fail_the_call(rust, name, message):
    async def body():
        async with await chatter.Peer.connect(rust["bad:" + name]) as peer:
            with pytest.raises(chatter.RpcProtocolError, match=message):
                await within(peer.call("x", "y", 1))
            # A one-off bad reply does not close the connection.
            assert peer.close_cause is None

    run(body)


def test_turns_and_timeouts_are_enforced_locally(rust):
    async def body():
        # The mute peer reads and never answers: our turn rules and timers are on their own.
        conn = await within(chatter.connect(rust["bad:mute"], chatter.Options(keepalive_interval=None)))
        conv = await within(conn.send(b"\xc0", last=False, token=True, timeout=0.05))
        with pytest.raises(chatter.NotYourTurn):
            conn.try_send(b"\xc0", conv)
        kept = await within(conn.send(b"\xc0", last=False, token=False))
        await within(conn.send(b"\xc0", kept, last=True))  # our turn: we may end it
        with pytest.raises(chatter.ConversationEnded):
            conn.try_send(b"\xc0", kept)
        # Two receivers wait at once; the timeout of `conv` fires (nothing is sent).
        receivers = [asyncio.ensure_future(conn.receive()) for _ in range(2)]
        assert await within(conn.next_timeout()) == conv
        assert not any(r.done() for r in receivers)
        await within(conn.close())
        for r in receivers:
            with pytest.raises(chatter.ConnectionClosed):
                await within(r)

    run(body)
