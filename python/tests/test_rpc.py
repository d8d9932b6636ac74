"""Calls, typed errors, panics, deadlines, cancellation, signals and callbacks against the
Rust peer (examples/py_peer.rs)."""

from __future__ import annotations

import asyncio
import ssl
from typing import List

import pytest

import chatter
from conftest import run, within


async def connect(rust, name: str = "main", **peer_options) -> chatter.Peer:
    options = chatter.Options()
    if name == "tls":
        options.ssl = ssl.create_default_context(cafile=rust["ca"])
        options.server_hostname = "localhost"
    return await chatter.Peer.connect(rust[name], options, **peer_options)


@pytest.mark.parametrize("transport", ["main", "unix", "tls"])
def test_calls_over_each_transport(rust, transport):
    async def body():
        async with await connect(rust, transport) as peer:
            calc = peer.remote("calculator")
            assert await within(calc.add(2, 3)) == 5
            assert await within(calc.div(7, 2)) == 3
            assert await within(peer.call("test", "echo", "héllo")) == "héllo"
            assert await within(peer.remote("test").nothing()) == 42
            if transport == "tls":
                assert peer.connection.peer_certificate is not None

    run(body)


def test_typed_error_with_context_chain(rust):
    async def body():
        async with await connect(rust) as peer:
            with pytest.raises(chatter.AppError) as e:
                await within(peer.remote("calculator").div(1, 0))
            assert e.value.kind == "app"
            assert e.value.error == "DivisionByZero"  # a unit variant: a string
            assert e.value.message == "division by zero" and e.value.chain == []

            with pytest.raises(chatter.AppError) as e:
                await within(peer.remote("test").fail("outer text", "inner text"))
            assert e.value.message == "outer text"
            assert e.value.chain == ["inner text"]
            assert e.value.error == {"outer": "outer text", "inner": "inner text"}
            assert "caused by: inner text" in str(e.value)

    run(body)


def test_panic_is_its_own_kind_and_the_callee_keeps_serving(rust):
    async def body():
        async with await connect(rust) as peer:
            test = peer.remote("test")
            with pytest.raises(chatter.RemotePanic) as e:
                await within(test.panic("boom at 42"))
            assert e.value.kind == "remote_panic" and e.value.code == 6
            assert "boom at 42" in e.value.message
            assert await within(test.echo("still here")) == "still here"

    run(body)


def test_framework_failures(rust):
    async def body():
        async with await connect(rust) as peer:
            with pytest.raises(chatter.NoSuchObject) as e:
                await within(peer.call("abacus", "add", 1, 1))
            assert e.value.code == 3 and "abacus" in e.value.message
            with pytest.raises(chatter.NoSuchMethod) as e:
                await within(peer.call("calculator", "mul", 1, 1))
            assert e.value.code == 4 and "mul" in e.value.message
            with pytest.raises(chatter.BadArguments) as e:
                await within(peer.call("calculator", "add", "two", 3))
            assert e.value.code == 5 and "add" in e.value.message
            with pytest.raises(chatter.BadArguments):
                await within(peer.call("calculator", "add", 1))
            # Every failure left the connection usable.
            assert await within(peer.call("calculator", "add", 1, 1)) == 2

    run(body)


def test_deadline_passes_here_and_on_the_callee(rust):
    async def body():
        async with await connect(rust) as peer:
            test = peer.remote("test")
            with pytest.raises(chatter.DeadlineExceeded):
                await within(test.with_deadline(0.1).sleep(60_000))
            # The callee dropped the handler at its own deadline ...
            assert await within(test.wait_dropped(1, 10_000)) == 1
            # ... and its late "deadline exceeded" reply was discarded, not a protocol error.
            assert await within(test.echo("after")) == "after"
            assert peer.close_cause is None

    run(body)


def test_cancelling_the_task_cancels_the_remote_handler(rust):
    async def body():
        async with await connect(rust) as peer:
            test = peer.remote("test")

            async def sleeper():
                return await test.sleep(60_000)

            task = asyncio.ensure_future(sleeper())
            await asyncio.sleep(0)  # let the task send its request
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await within(task)
            assert await within(test.wait_dropped(1, 10_000)) == 1
            # The callee's "cancelled" reply was discarded; the connection is fine.
            assert await within(test.echo("ok")) == "ok"
            assert peer.close_cause is None

    run(body)


def test_pipelined_calls(rust):
    async def body():
        async with await connect(rust) as peer:
            calc = peer.remote("calculator")
            results = await within(asyncio.gather(*(calc.add(i, i) for i in range(2000))))
            assert results == [2 * i for i in range(2000)]

    run(body)


def test_large_values_both_ways(rust):
    async def body():
        async with await connect(rust) as peer:
            test = peer.remote("test")
            assert len(await within(test.blob(3_000_000))) == 3_000_000
            big = "z" * 2_000_000
            assert await within(test.echo(big)) == big
            with pytest.raises(chatter.MessageTooLarge):
                await within(test.echo("z" * 5_000_000))

    run(body)


def test_signals_with_ttl(rust):
    async def body():
        async with await connect(rust) as peer:
            test = peer.remote("test")
            for _ in range(500):
                await within(test.bump.signal(1))
            assert await within(test.wait_count(500, 10_000)) == 500
            # A TTL of 0 ms: the callee never starts it (it expired on arrival).
            await within(peer.signal("test", "bump", 1000, ttl=0))
            await within(peer.signal("test", "bump", 1, ttl=10))
            assert await within(test.wait_count(501, 10_000)) == 501
            assert await within(test.wait_count(1501, 50)) == 501

    run(body)


class PyObj:
    """What the Rust side calls back (trait PyObj in py_peer.rs)."""

    def __init__(self) -> None:
        self.notes: asyncio.Queue = asyncio.Queue(10)
        self.slow_cancelled = asyncio.Event()

    def add(self, a: int, b: int) -> int:
        return a + b

    async def fail(self, msg: str) -> int:
        try:
            raise KeyError("inner cause")
        except KeyError as e:
            raise chatter.AppError(msg) from e

    def crash(self) -> int:
        raise RuntimeError("python handler crashed")

    async def slow(self, ms: int) -> int:
        try:
            await asyncio.sleep(ms / 1000)
        except asyncio.CancelledError:
            self.slow_cancelled.set()
            raise
        return ms

    def note(self, text: str) -> None:
        context = chatter.current_context()
        if context is not None and context.metadata:
            text = f"{text} {context.metadata}"
        self.notes.put_nowait(text)

    async def context_seen(self) -> str:
        await asyncio.sleep(0)  # still there in the handler's task
        cx = chatter.current_context()
        assert cx is not None
        return f"{cx.object}.{cx.method} {cx.is_signal} {list(cx.metadata)} {cx.traceparent}"


def test_rust_calls_python(rust):
    async def body():
        async with await connect(rust) as peer:
            py = PyObj()
            assert peer.register("py", py)
            test = peer.remote("test")
            assert await within(test.py_add(2, 40)) == "ok 42"
            assert await within(test.py_fail("nope")) == "app \"nope\" / nope / [\"'inner cause'\"]"
            out = await within(test.py_crash())
            assert out.startswith("panic RuntimeError: python handler crashed"), out
            assert await within(test.py_missing()) == "no such method missing"
            assert await within(test.py_no_object()) == "no such object nobody"
            # Rust's deadline passes: the Python handler is cancelled.
            assert await within(test.py_slow(60_000, 100)) == "deadline"
            await within(py.slow_cancelled.wait())
            # A signal from Rust, with a TTL.
            assert await within(test.py_note("hello python", 5_000)) == "queued"
            assert await within(py.notes.get()) == "hello python"
            assert peer.stats.calls_served >= 5
            assert chatter.current_context() is None

    run(body)


def test_rust_calls_python_with_metadata_and_trace_context(rust):
    async def body():
        async with await connect(rust) as peer:
            py = PyObj()
            peer.register("py", py)
            test = peer.remote("test")
            trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            out = await within(test.py_context("user", "ada", trace))
            assert out == f"ok \"py.context_seen False [('user', 'ada')] {trace}\"", out
            assert await within(py.notes.get()) == "with context (('user', 'ada'),)"
            # A malformed trace context is ignored, the call still served.
            out = await within(test.py_context("k", "v", "00-junk"))
            assert out == "ok \"py.context_seen False [('k', 'v')] None\"", out

    run(body)


def test_call_after_close_and_close_cause(rust):
    async def body():
        peer = await connect(rust)
        cause = await within(peer.close())
        assert cause.kind == "local" and cause.code == 0
        with pytest.raises(chatter.ConnectionLost):
            await within(peer.call("calculator", "add", 1, 2))
        with pytest.raises(chatter.ConnectionClosed):
            await within(peer.signal("test", "bump", 1))

    run(body)


def test_streams_are_not_implemented(rust):
    async def body():
        async with await connect(rust) as peer:
            with pytest.raises(NotImplementedError, match="streams"):
                peer.stream("x")

    run(body)
