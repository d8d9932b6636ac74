"""Disconnects: the Rust side closing, the Rust process dying, this side closing."""

from __future__ import annotations

import asyncio

import pytest

import chatter
from conftest import RustPeer, run, within


def test_rust_side_closes_the_connection(rust):
    async def body():
        peer = await within(chatter.Peer.connect(rust["main"]))
        test = peer.remote("test")
        pending = test.sleep(60_000)
        try:  # the close may overtake close_me's own reply
            await within(test.close_me())
        except chatter.ConnectionLost:
            pass
        cause = await within(peer.closed())
        assert cause.kind == "peer" and cause.code == 0
        # The Rust peer answers the calls it drops at close "cancelled" when it can.
        with pytest.raises((chatter.ConnectionLost, chatter.Cancelled)) as e:
            await within(pending)
        if isinstance(e.value, chatter.ConnectionLost):
            assert e.value.cause == cause
        with pytest.raises(chatter.ConnectionLost):
            await within(test.echo("x"))

    run(body)


def test_rust_process_dies(binary):
    async def body():
        victim = RustPeer(binary)
        try:
            peer = await within(chatter.Peer.connect(victim["main"]))
            pending = peer.remote("test").sleep(60_000)
            assert await within(peer.call("test", "echo", "alive")) == "alive"
            victim.kill()
            with pytest.raises(chatter.ConnectionLost) as e:
                await within(pending)
            assert e.value.cause.kind == "io"
            assert (await within(peer.closed())).kind == "io"
        finally:
            victim.kill()

    run(body)


def test_local_close_fails_pending_calls_and_cancels_handlers(rust):
    async def body():
        peer = await within(chatter.Peer.connect(rust["main"]))
        started = asyncio.Event()
        cancelled = asyncio.Event()

        class Py:
            async def slow(self, ms: int) -> int:
                started.set()
                try:
                    await asyncio.sleep(ms / 1000)
                finally:
                    cancelled.set()
                return ms

        peer.register("py", Py())
        rust_call = peer.remote("test").py_slow(60_000, 60_000)
        await within(started.wait())
        cause = await within(peer.close("bye"))
        assert cause.kind == "local" and cause.reason == "bye"
        await within(cancelled.wait())
        # Rust's call to Python was answered "cancelled" before the close frame; Rust's
        # own handler (test.py_slow) could not reply: this side is gone.
        with pytest.raises(chatter.ConnectionLost):
            await within(rust_call)
        assert peer.stats.calls_served == 1

    run(body)


def test_connect_errors_are_clear():
    async def body():
        with pytest.raises(ValueError, match="unknown scheme"):
            await chatter.connect("http://127.0.0.1:1")
        with pytest.raises(ValueError, match="host:port"):
            await chatter.connect("tcp://127.0.0.1")
        with pytest.raises(chatter.ConnectError) as e:
            await within(chatter.connect("unix:///nonexistent/socket"))
        assert e.value.cause.kind == "io"

    run(body)
