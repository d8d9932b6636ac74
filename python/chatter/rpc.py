"""chatter-rpc over a :class:`~chatter.connection.Connection` (chatter-rpc PROTOCOL.md).

A :class:`Peer` calls remote objects and serves local ones over one connection; both ends
are peers, so the Rust side can call the Python objects registered here.

Calls
    ``await peer.call("calculator", "add", 2, 3)`` or, through a proxy,
    ``await peer.remote("calculator").add(2, 3)``. The request goes out when the method
    is called (a proxy call returns an :class:`asyncio.Future`), so many calls can be in
    flight at once. Every call has a deadline (``default_deadline``, or
    ``remote(..., deadline=)`` / ``call(..., deadline=)``); cancelling the awaiting task
    (or the future) sends a cancel to the callee. Failures are :class:`CallError`
    subclasses carrying ``kind``, ``message`` and ``chain``.
Signals
    ``await peer.signal("calculator", "log", "hello", ttl=5)`` queues a signal (no
    reply). The outbox is bounded (``max_queued_signals``); when it is full the send
    waits for room within the TTL (``when_full="wait"``), raises :class:`OutboxFull`
    (``"error"``) or drops the oldest queued signal (``"drop_oldest"``). A signal not
    handed to the connection within its TTL is dropped and counted.
Serving
    ``peer.register("py", obj)``: every public method of ``obj`` (plain or ``async``) can
    be called or signalled by the peer. A handler returns its result, raises
    :class:`AppError` for an application error, and any other exception becomes a
    *remote panic* (wire kind 6). At most ``max_concurrent_handlers`` handlers run at
    once; each request keeps its flow-control credit until its handler is done, so a
    slow handler makes the peer wait instead of growing this side's memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Set, Tuple

import msgpack

from .connection import Connection, Conversation, Options, connect
from .errors import (
    FAILURES,
    AppError,
    CallError,
    CloseCause,
    ConnectionClosed,
    ConnectionLost,
    DeadlineExceeded,
    OutboxFull,
    RpcProtocolError,
    SendError,
    SignalExpired,
)

__all__ = ["CallContext", "Peer", "PeerStats", "RemoteObject", "RemoteMethod", "current_context"]

log = logging.getLogger("chatter.rpc")

#: How many of a connection's warnings about the peer's messages are logged before the
#: limit applies: the first 8, then the 16th, 32nd, 64th, ... (each with the count so
#: far), and a summary of the rest when the connection closes, as chatter-rpc does. A
#: peer sending a malformed 20-byte message in a loop cannot flood the log.
WARNINGS_LOGGED_IN_FULL = 8

CALL, SIGNAL, CANCEL, RELIABLE, ACK = range(5)
#: Calls, signals and reliable signals with a context map (metadata, trace context).
CALL_CTX, SIGNAL_CTX, RELIABLE_CTX = 9, 10, 11
#: W3C trace context, version 00 (a later version may append ``-`` and more).
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
OK, APP_ERROR, FAILURE = range(3)
#: The longest duration that travels (ms): chatter-rpc caps durations likewise.
MAX_MS = 2**32 - 1

_packer = msgpack.Packer(use_bin_type=True)
_pack = _packer.pack


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _ms(seconds: float) -> int:
    return max(0, min(MAX_MS, int(seconds * 1000)))


def _request(kind: int, obj: bytes, method: bytes, ms: int, args: bytes) -> bytes:
    """``[kind, object, method, ms, args]`` from pre-encoded names and arguments."""
    return b"\x95" + bytes((kind,)) + obj + method + _pack(ms) + args


def _encode_args(args: Tuple[Any, ...]) -> bytes:
    # A method without arguments takes nil (serde's `()`); otherwise an array, one
    # element per argument (chatter-rpc PROTOCOL.md, "args").
    return b"\xc0" if not args else _pack(list(args))


def _failure(kind: int, message: str) -> bytes:
    return _pack([FAILURE, kind, message])


def _chain(exc: BaseException) -> List[str]:
    chain: List[str] = []
    cur: Optional[BaseException] = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    while cur is not None and len(chain) < 64:
        chain.append(str(cur) or type(cur).__name__)
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    return chain


@dataclass
class PeerStats:
    """Counters of a :class:`Peer`."""

    calls_sent: int = 0
    calls_served: int = 0
    signals_sent: int = 0
    signals_received: int = 0
    #: Signals dropped here because their TTL ran out before they could be sent.
    signals_expired: int = 0
    #: Signals from the peer dropped because no handler could start within their TTL.
    signals_expired_on_arrival: int = 0
    #: Signals from the peer whose handler failed (raised, unknown method, bad arguments).
    signals_failed: int = 0
    #: Signals dropped from a full outbox under ``when_full="drop_oldest"``.
    signals_dropped: int = 0
    #: Malformed requests from the peer that were logged and ignored.
    malformed: int = 0


@dataclass(frozen=True)
class CallContext:
    """What a handler can learn about the call or signal it serves: see
    :func:`current_context`."""

    object: str
    method: str
    is_signal: bool
    #: The caller's metadata, in order (a key may repeat).
    metadata: Tuple[Tuple[str, str], ...]
    #: The caller's W3C ``traceparent``, if it sent a valid one.
    traceparent: Optional[str]
    #: When the deadline (or TTL) runs out, in the event loop's clock.
    deadline: float

    def get(self, key: str) -> Optional[str]:
        """The first metadata value under ``key``."""
        for k, v in self.metadata:
            if k == key:
                return v
        return None


_current: "contextvars.ContextVar[Optional[CallContext]]" = contextvars.ContextVar("chatter_rpc_context", default=None)


def current_context() -> Optional[CallContext]:
    """The context of the call the running handler serves (also in the task it runs
    in); ``None`` outside a handler."""
    return _current.get()


def _valid_traceparent(value: str) -> bool:
    m = _TRACEPARENT.match(value)
    if m is None:
        return False
    version, trace_id, parent_id, _flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return False
    return trace_id != "0" * 32 and parent_id != "0" * 16


def _context(ctx: Any, max_bytes: int) -> Tuple[Tuple[Tuple[str, str], ...], Optional[str]]:
    """Checks a context map (PROTOCOL.md, "Context") and splits it into metadata and
    trace context. Raises ``_TooLarge`` over ``max_bytes``, ``ValueError`` if malformed."""
    if not isinstance(ctx, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ctx.items()):
        raise ValueError("the context must be a map of strings to strings")
    size = len(_pack(ctx))
    if size > max_bytes:
        raise _TooLarge(f"metadata too large: {size} bytes, over the limit of {max_bytes}")
    trace = ctx.get("traceparent")
    if trace is not None and not _valid_traceparent(trace):
        log.debug("ignoring a malformed traceparent %r", trace)
        trace = None
    return tuple((k, v) for k, v in ctx.items() if k != "traceparent"), trace


class _Served:
    """An incoming call or signal: waiting for a handler slot, or running."""

    __slots__ = ("first", "obj", "method", "args", "cost", "expires", "task", "timer", "is_call", "reliable", "context")

    def __init__(self, first: int, obj: str, method: str, args: Any, cost: int, expires: float, is_call: bool) -> None:
        self.first = first
        self.obj = obj
        self.method = method
        self.args = args
        self.cost = cost
        self.expires = expires
        self.task: Optional[asyncio.Task] = None
        self.timer: Optional[asyncio.TimerHandle] = None
        self.is_call = is_call
        self.reliable: Optional[Tuple[int, int]] = None
        #: Metadata and trace context (kinds 9 to 11).
        self.context: Optional[Tuple[Tuple[Tuple[str, str], ...], Optional[str]]] = None


class Peer:
    """An RPC peer over one connection. Make one with :meth:`Peer.connect` or from a
    :class:`~chatter.connection.Connection`.

    :param default_deadline: seconds a call may take (30, as chatter-rpc).
    :param default_signal_ttl: seconds a signal may wait to be sent or started (60).
    :param max_concurrent_handlers: handlers run at once for the peer's requests (256).
    :param max_queued_signals: signals the outbox holds (1024).
    :param when_full: ``"wait"``, ``"error"`` or ``"drop_oldest"``.
    """

    def __init__(
        self,
        connection: Connection,
        *,
        default_deadline: float = 30.0,
        default_signal_ttl: float = 60.0,
        max_concurrent_handlers: int = 256,
        max_queued_signals: int = 1024,
        when_full: str = "wait",
        max_metadata_bytes: int = 8192,
    ) -> None:
        if when_full not in ("wait", "error", "drop_oldest"):
            raise ValueError("when_full must be 'wait', 'error' or 'drop_oldest'")
        if max_concurrent_handlers < 1 or max_queued_signals < 1:
            raise ValueError("max_concurrent_handlers and max_queued_signals must be positive")
        self.connection = connection
        self.default_deadline = default_deadline
        self.default_signal_ttl = default_signal_ttl
        self.max_concurrent_handlers = max_concurrent_handlers
        self.max_queued_signals = max_queued_signals
        self.max_metadata_bytes = max_metadata_bytes
        self.when_full = when_full
        self.stats = PeerStats()
        self._loop = asyncio.get_running_loop()
        self._objects: Dict[str, Any] = {}
        # Outgoing calls: first id -> (future, deadline timer).
        self._calls: Dict[int, Tuple[asyncio.Future, asyncio.TimerHandle]] = {}
        # Calls given up here (deadline, cancel) whose reply is still due: discarded.
        self._abandoned: Set[int] = set()
        # Outbox of signals: (payload pieces, expires).
        self._outbox: Deque[Tuple[bytes, bytes, bytes, bytes, float]] = collections.deque()
        self._outbox_task: Optional[asyncio.Task] = None
        self._room_waiters: Deque[asyncio.Future] = collections.deque()
        # Serving.
        self._running: Dict[int, _Served] = {}
        self._running_signals: Set[_Served] = set()
        self._waiting_calls: Deque[_Served] = collections.deque()
        self._waiting_signals: Deque[_Served] = collections.deque()
        self._slots = max_concurrent_handlers
        self._reliable_seen: Dict[int, int] = {}
        self._names: Dict[str, bytes] = {}
        self._cause: Optional[CloseCause] = None
        self._warnings = 0  # counted, see WARNINGS_LOGGED_IN_FULL
        self._warnings_logged = 0
        connection.set_handler(self._on_message, self._on_timeout)
        connection.on_close(self._on_close)

    @classmethod
    async def connect(cls, address: str, options: Optional[Options] = None, **peer_options: Any) -> "Peer":
        """Connects to ``address`` (see :func:`chatter.connect`) and makes a peer."""
        return cls(await connect(address, options), **peer_options)

    # ------------------------------------------------------------------ objects

    def register(self, name: str, obj: Any) -> bool:
        """Serves ``obj`` under ``name``: the peer may call or signal its public methods
        (names not starting with ``_``). Returns False if the name was taken (the old
        object stays)."""
        if name in self._objects:
            return False
        self._objects[name] = obj
        return True

    def unregister(self, name: str) -> bool:
        """Stops serving ``name``; returns whether it was registered."""
        return self._objects.pop(name, None) is not None

    def remote(self, name: str, *, deadline: Optional[float] = None, ttl: Optional[float] = None) -> "RemoteObject":
        """A proxy of the peer's object ``name``: ``await proxy.method(args)`` calls,
        ``await proxy.method.signal(args)`` signals."""
        return RemoteObject(self, name, deadline, ttl)

    # ------------------------------------------------------------------ calls

    def _name(self, name: str) -> bytes:
        encoded = self._names.get(name)
        if encoded is None:
            encoded = _pack(name)
            if len(self._names) < 4096:
                self._names[name] = encoded
        return encoded

    def start_call(self, obj: str, method: str, args: Tuple[Any, ...] = (), deadline: Optional[float] = None) -> asyncio.Future:
        """Sends a call now and returns the future of its result. Cancelling the future
        cancels the call on the callee."""
        loop = self._loop
        fut = loop.create_future()
        if self._cause is not None:
            fut.set_exception(ConnectionLost(self._cause))
            return fut
        deadline = self.default_deadline if deadline is None else deadline
        expires = loop.time() + deadline
        try:
            pieces = (self._name(obj), self._name(method), _encode_args(args))
        except (TypeError, ValueError, OverflowError) as e:
            from .errors import BadArguments

            fut.set_exception(BadArguments(f"cannot encode the arguments of {obj}.{method}: {e}"))
            return fut
        conn = self.connection
        try:
            conv = conn._send(
                _request(CALL, pieces[0], pieces[1], _ms(deadline), pieces[2]),
                None, False, True, None, conn.peer_window >> 2,
            )
        except ConnectionClosed as e:
            fut.set_exception(ConnectionLost(e.cause))
            return fut
        except SendError as e:  # MessageTooLarge: the request can never be sent
            fut.set_exception(e)
            return fut
        self.stats.calls_sent += 1
        if conv is not None:
            self._track(fut, conv.first, expires)
        else:
            task = loop.create_task(self._call_when_credit(fut, pieces, expires))
            fut.add_done_callback(lambda _f: task.cancel())
        return fut

    async def call(self, obj: str, method: str, *args: Any, deadline: Optional[float] = None) -> Any:
        """Calls ``obj.method(*args)`` and returns its result (see :meth:`start_call`)."""
        return await self.start_call(obj, method, args, deadline)

    async def _call_when_credit(self, fut: asyncio.Future, pieces: Tuple[bytes, bytes, bytes], expires: float) -> None:
        conn = self.connection
        try:
            while True:
                left = expires - self._loop.time()
                if left <= 0:
                    if not fut.done():
                        fut.set_exception(DeadlineExceeded("deadline exceeded while waiting for flow-control credit"))
                    return
                # The request says how much time is left when it goes out.
                conv = conn._send(
                    _request(CALL, pieces[0], pieces[1], _ms(left), pieces[2]),
                    None, False, True, None, conn.peer_window >> 2,
                )
                if conv is not None:
                    break
                try:
                    await asyncio.wait_for(conn._wait_writable(), left)
                except asyncio.TimeoutError:
                    continue
        except ConnectionClosed as e:
            if not fut.done():
                fut.set_exception(ConnectionLost(e.cause))
            return
        if fut.done():  # cancelled meanwhile: the call went out anyway, so cancel it
            self._abandon(conv.first, send_cancel=True)
            return
        self._track(fut, conv.first, expires)

    def _track(self, fut: asyncio.Future, first: int, expires: float) -> None:
        timer = self._loop.call_at(expires, self._deadline_passed, first)
        self._calls[first] = (fut, timer)
        fut.add_done_callback(functools.partial(self._call_done, first))

    def _deadline_passed(self, first: int) -> None:
        entry = self._calls.pop(first, None)
        if entry is None:
            return
        # The callee answers a call whose deadline passed on its side too; the
        # conversation stays open here until that reply ends it, and the reply is dropped.
        self._abandoned.add(first)
        if not entry[0].done():
            entry[0].set_exception(DeadlineExceeded("deadline exceeded"))

    def _call_done(self, first: int, fut: asyncio.Future) -> None:
        if fut.cancelled() and first in self._calls:
            self._calls.pop(first)[1].cancel()
            self._abandon(first, send_cancel=True)

    def _abandon(self, first: int, send_cancel: bool) -> None:
        self._abandoned.add(first)
        if send_cancel and self._cause is None:
            payload = _pack([CANCEL, first])
            try:
                if self.connection._send(payload, None, True, True, None, 0) is None:
                    self._loop.create_task(self._send_quietly(payload))
            except (ConnectionClosed, SendError):
                pass

    async def _send_quietly(self, payload: bytes, conversation: Optional[Conversation] = None) -> bool:
        try:
            await self.connection.send(payload, conversation)
            return True
        except (ConnectionClosed, SendError):
            return False

    def _on_reply(self, first: int, last: bool, payload: bytes) -> None:
        entry = self._calls.pop(first, None)
        if entry is None:
            if last:
                self._abandoned.discard(first)
            return
        fut, timer = entry
        timer.cancel()
        if fut.done():
            return
        if not last:
            fut.set_exception(RpcProtocolError("the callee answered without ending the call"))
            return
        # The common case first: [0, value].
        if payload[:2] == b"\x92\x00" and len(payload) > 2:
            try:
                fut.set_result(_unpack(payload[2:]))
                return
            except Exception:
                pass
        try:
            reply = _unpack(payload)
        except Exception as e:
            fut.set_exception(RpcProtocolError(f"malformed reply: {e}"))
            return
        if _is_ok(reply):
            fut.set_result(reply[1])
        else:
            fut.set_exception(_reply_error(reply))

    def _on_timeout(self, conv: Conversation) -> None:  # no conversation timers are used
        pass

    # ------------------------------------------------------------------ signals

    async def signal(self, obj: str, method: str, *args: Any, ttl: Optional[float] = None) -> None:
        """Queues the signal ``obj.method(*args)`` (no reply). Returns once it is handed
        to the connection or queued in the outbox; see the class docs for a full outbox.
        """
        ttl = self.default_signal_ttl if ttl is None else ttl
        if self._cause is not None:
            raise ConnectionClosed(self._cause)
        pieces = (self._name(obj), self._name(method), _encode_args(args))
        expires = self._loop.time() + ttl
        if not self._outbox and self._send_signal(pieces, ttl):
            return
        if len(self._outbox) >= self.max_queued_signals:
            if self.when_full == "error":
                raise OutboxFull(f"the outbox holds {self.max_queued_signals} signals")
            if self.when_full == "drop_oldest":
                self._outbox.popleft()
                self.stats.signals_dropped += 1
            else:
                while len(self._outbox) >= self.max_queued_signals:
                    left = expires - self._loop.time()
                    if left <= 0:
                        self.stats.signals_expired += 1
                        raise SignalExpired("the TTL ran out while waiting for room in the outbox")
                    waiter = self._loop.create_future()
                    self._room_waiters.append(waiter)
                    try:
                        await asyncio.wait_for(waiter, left)
                    except asyncio.TimeoutError:
                        pass
                    finally:
                        if waiter in self._room_waiters:
                            self._room_waiters.remove(waiter)
                    if self._cause is not None:
                        raise ConnectionClosed(self._cause)
        self._outbox.append((pieces[0], pieces[1], pieces[2], b"", expires))
        if self._outbox_task is None:
            self._outbox_task = self._loop.create_task(self._drain_outbox())

    def _send_signal(self, pieces: Tuple[bytes, bytes, bytes], ttl: float) -> bool:
        conn = self.connection
        conv = conn._send(_request(SIGNAL, pieces[0], pieces[1], _ms(ttl), pieces[2]), None, True, True, None, conn.peer_window >> 1)
        if conv is None:
            return False
        self.stats.signals_sent += 1
        return True

    async def _drain_outbox(self) -> None:
        conn = self.connection
        try:
            while self._outbox:
                obj, method, args, _, expires = self._outbox[0]
                left = expires - self._loop.time()
                if left <= 0:
                    self._outbox.popleft()
                    self.stats.signals_expired += 1
                    self._room()
                    continue
                if self._send_signal((obj, method, args), left):
                    self._outbox.popleft()
                    self._room()
                    continue
                try:
                    await asyncio.wait_for(conn._wait_writable(), left)
                except asyncio.TimeoutError:
                    pass
        except ConnectionClosed:
            pass
        finally:
            self._outbox_task = None

    def _room(self) -> None:
        while self._room_waiters:
            waiter = self._room_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    @property
    def queued(self) -> int:
        """Signals waiting in the outbox."""
        return len(self._outbox)

    async def flush(self, timeout: Optional[float] = None) -> None:
        """Waits until the outbox is empty (sent or expired)."""
        task = self._outbox_task
        if task is not None:
            await asyncio.wait_for(asyncio.shield(task), timeout)

    # ------------------------------------------------------------------ incoming

    def _on_message(self, we_own: bool, first: int, opening: bool, last: bool, token: bool, payload: bytes, cost: int) -> None:
        if we_own:
            # A reply in a call conversation this side opened.
            self.connection.release(cost)
            self._on_reply(first, last, payload)
            return
        if not opening:
            # The peer continues a conversation of its own: nothing in chatter-rpc does
            # (streams are not implemented here).
            self.connection.release(cost)
            self.stats.malformed += 1
            self._warn("ignoring a message in a conversation the peer opened (first id %d)", first)
            return
        try:
            req = _unpack(payload)
            kind = req[0]
        except Exception as e:
            self._malformed(first, last, cost, f"malformed request: {e}")
            return
        try:
            if kind in (CALL, SIGNAL, CALL_CTX, SIGNAL_CTX):
                context = None
                if kind >= CALL_CTX:
                    _, obj, method, ms, ctx, args = req
                    is_call = kind == CALL_CTX
                    try:
                        context = _context(ctx, self.max_metadata_bytes)
                    except _TooLarge as e:
                        if is_call and not last and token:
                            self._reply(_Served(first, obj, method, None, cost, 0.0, True), _failure(9, str(e)))
                        else:
                            self.connection.release(cost)
                            self.stats.signals_failed += 1
                            self._warn("signal %s.%s dropped: %s", obj, method, e)
                        return
                else:
                    _, obj, method, ms, args = req
                    is_call = kind == CALL
                if is_call != (not last and token):
                    raise ValueError("a call must pass the turn without ending its conversation; a signal is one-shot")
                if not isinstance(ms, int) or ms < 0:
                    raise ValueError("bad duration")
                served = _Served(first, obj, method, args, cost, self._loop.time() + ms / 1000, is_call)
                served.context = context
                if is_call and ms == 0:
                    # As chatter-rpc does: a call with no time at all is not started.
                    self._reply(served, _failure(1, "deadline 0"))
                    return
                self._serve(served)
            elif kind == CANCEL:
                self.connection.release(cost)
                served = self._running.get(req[1])
                if served is not None:
                    self._finish_call(served, _failure(2, "cancelled"))
                else:
                    for w in self._waiting_calls:
                        if w.first == req[1]:
                            self._waiting_calls.remove(w)
                            self._reply(w, _failure(2, "cancelled"))
                            break
            elif kind == RELIABLE or kind == RELIABLE_CTX:
                context = None
                too_large = None
                if kind == RELIABLE_CTX:
                    _, stream, seq, obj, method, ms, ctx, args = req
                    try:
                        context = _context(ctx, self.max_metadata_bytes)
                    except _TooLarge as e:
                        too_large = e
                else:
                    _, stream, seq, obj, method, ms, args = req
                if not isinstance(ms, int) or ms < 0:
                    raise ValueError("bad duration")
                if seq <= self._reliable_seen.get(stream, 0):
                    self.connection.release(cost)
                    self._ack(stream, seq, 0)  # a duplicate: acknowledged again
                    return
                if len(self._reliable_seen) < 65536 or stream in self._reliable_seen:
                    self._reliable_seen[stream] = seq
                if too_large is not None:
                    # Not run, and acknowledged failed at once, so that the sender stops
                    # re-sending it (PROTOCOL.md, "Reliable signals").
                    self.connection.release(cost)
                    self.stats.signals_failed += 1
                    self._warn("reliable signal %s.%s refused: %s", obj, method, too_large)
                    self._ack(stream, seq, 2)
                    return
                served = _Served(first, obj, method, args, cost, self._loop.time() + ms / 1000, False)
                served.reliable = (stream, seq)
                served.context = context
                self._serve(served)
            elif kind == ACK:
                self.connection.release(cost)  # this side sends no reliable signals
            else:
                raise ValueError(f"unknown envelope kind {kind}")
        except Exception as e:
            self._malformed(first, last, cost, f"malformed request: {e}")

    def _warn(self, fmt: str, *args: Any) -> None:
        """Logs a warning the peer's messages caused, within the limit
        (:data:`WARNINGS_LOGGED_IN_FULL`)."""
        self._warnings += 1
        n = self._warnings
        if n <= WARNINGS_LOGGED_IN_FULL or n & (n - 1) == 0:
            self._warnings_logged += 1
            if n > WARNINGS_LOGGED_IN_FULL:
                fmt += " (warning %d about this peer)"
                args = args + (n,)
            log.warning(fmt, *args)

    def _malformed(self, first: int, last: bool, cost: int, what: str) -> None:
        self.stats.malformed += 1
        conn = self.connection
        if not last and (False, first) in conn._convs and conn._convs[(False, first)]:
            # It holds the turn: answer kind 7 so that the caller is not left waiting.
            served = _Served(first, "", "", None, cost, 0.0, True)
            self._reply(served, _failure(7, what))
        else:
            conn.release(cost)
            self._warn("%s (ignored)", what)

    def _serve(self, served: _Served) -> None:
        if self._slots > 0 and not self._waiting_calls and not self._waiting_signals:
            self._start(served)
        elif served.is_call:
            self._waiting_calls.append(served)
            served.timer = self._loop.call_at(served.expires, self._waiting_deadline, served)
        else:
            self._waiting_signals.append(served)

    def _waiting_deadline(self, served: _Served) -> None:
        try:
            self._waiting_calls.remove(served)
        except ValueError:
            return
        self._reply(served, _failure(1, "deadline exceeded before a handler slot was free"))

    def _start(self, served: _Served) -> None:
        now = self._loop.time()
        if not served.is_call and now >= served.expires:
            self.stats.signals_expired_on_arrival += 1
            self._signal_done(served, 1)
            return
        if served.is_call:
            self.stats.calls_served += 1
        else:
            self.stats.signals_received += 1
        try:
            fn = self._resolve(served)
            args = served.args
            if args is None:
                args = ()
            elif not isinstance(args, (list, tuple)):
                raise _BadArgs(f"arguments of `{served.method}` must be an array or nil, got {type(args).__name__}")
            metadata, trace = served.context or ((), None)
            token = _current.set(CallContext(served.obj, served.method, not served.is_call, metadata, trace, served.expires))
            try:
                result = fn(*args)
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    # The task copies the context variables now: the handler sees its context.
                    served.task = self._loop.create_task(_awaited(result))
            except TypeError as e:
                if e.__traceback__ is not None and e.__traceback__.tb_next is None:
                    raise _BadArgs(f"arguments of `{served.method}`: {e}") from None
                raise
            finally:
                _current.reset(token)
        except _Failure as f:
            if served.is_call:
                self._reply(served, _failure(f.code, f.message))
            else:
                self.stats.signals_failed += 1
                self._warn("signal %s.%s: %s", served.obj, served.method, f.message)
                self._signal_done(served, 2)
            return
        except BaseException as e:  # the handler raised synchronously
            self._handler_raised(served, e)
            return
        if served.task is not None:
            self._slots -= 1
            if served.is_call:
                self._running[served.first] = served
                if served.timer is not None:
                    served.timer.cancel()
                served.timer = self._loop.call_at(served.expires, self._handler_deadline, served)
            else:
                self._running_signals.add(served)
            served.task.add_done_callback(functools.partial(self._task_done, served))
        elif served.is_call:
            self._reply(served, _ok(result))
        else:
            self._signal_done(served, 0)

    def _resolve(self, served: _Served) -> Callable[..., Any]:
        obj = self._objects.get(served.obj) if isinstance(served.obj, str) else None
        if obj is None:
            raise _Failure(3, str(served.obj))
        method = served.method
        fn = getattr(obj, method, None) if isinstance(method, str) and not method.startswith("_") else None
        if fn is None or not callable(fn):
            raise _Failure(4, str(method))
        return fn

    def _handler_raised(self, served: _Served, e: BaseException) -> None:
        if served.is_call:
            if isinstance(e, AppError):
                try:
                    payload = _pack([APP_ERROR, [e.message, e.chain or _chain(e)], e.error])
                except Exception as enc:
                    payload = _failure(7, f"callee: cannot encode the application error: {enc}")
                self._reply(served, payload)
            elif isinstance(e, asyncio.CancelledError):
                self._reply(served, _failure(2, "cancelled"))
            else:
                log.debug("handler %s.%s raised", served.obj, served.method, exc_info=e)
                self._reply(served, _failure(6, f"{type(e).__name__}: {e}"))
        else:
            self.stats.signals_failed += 1
            self._warn("signal handler %s.%s raised %r", served.obj, served.method, e)
            self._signal_done(served, 2)

    def _task_done(self, served: _Served, task: asyncio.Task) -> None:
        if served.is_call:
            if self._running.get(served.first) is not served:
                return  # already answered (deadline, cancel)
            if task.cancelled():
                self._finish_call(served, _failure(2, "cancelled"))
                return
            exc = task.exception()
            if exc is not None:
                self._running.pop(served.first, None)
                self._slot_free()
                if served.timer is not None:
                    served.timer.cancel()
                self._handler_raised(served, exc)
            else:
                self._finish_call(served, _ok(task.result()))
        else:
            self._running_signals.discard(served)
            self._slot_free()
            if task.cancelled():
                self._signal_done(served, 2)
                return
            exc = task.exception()
            if exc is not None:
                self._handler_raised(served, exc)
            else:
                self._signal_done(served, 0)

    def _handler_deadline(self, served: _Served) -> None:
        if self._running.get(served.first) is served:
            self._finish_call(served, _failure(1, "deadline exceeded"))

    def _finish_call(self, served: _Served, payload: bytes) -> None:
        """Ends a running call: drops its handler and sends ``payload`` as the reply."""
        if self._running.pop(served.first, None) is None:
            return
        self._slot_free()
        if served.timer is not None:
            served.timer.cancel()
        if served.task is not None and not served.task.done():
            served.task.cancel()
        self._reply(served, payload)

    def _reply(self, served: _Served, payload: bytes) -> None:
        conn = self.connection
        conv = Conversation(False, served.first)
        try:
            if conn._send(payload, conv, True, True, None, 0) is not None:
                conn.release(served.cost)
                return
        except ConnectionClosed:
            return
        except SendError as e:
            try:
                if conn._send(_failure(7, f"callee: cannot send the reply: {e}"), conv, True, True, None, 0) is not None:
                    conn.release(served.cost)
                    return
            except (ConnectionClosed, SendError):
                return
            payload = _failure(7, "callee: cannot send the reply")

        async def later() -> None:
            # The handler's slot is free already; the request's credit is held until the
            # reply is handed to the connection.
            if await self._send_quietly(payload, conv):
                conn.release(served.cost)

        self._loop.create_task(later())

    def _signal_done(self, served: _Served, status: int) -> None:
        self.connection.release(served.cost)
        if served.reliable is not None:
            self._ack(served.reliable[0], served.reliable[1], status)

    def _ack(self, stream: int, seq: int, status: int) -> None:
        payload = _pack([ACK, stream, seq, status])
        try:
            if self.connection._send(payload, None, True, True, None, 0) is None:
                self._loop.create_task(self._send_quietly(payload))
        except (ConnectionClosed, SendError):
            pass

    def _slot_free(self) -> None:
        self._slots += 1
        while self._slots > 0 and (self._waiting_calls or self._waiting_signals):
            if self._waiting_calls:
                served = self._waiting_calls.popleft()
                if served.timer is not None:
                    served.timer.cancel()
                    served.timer = None
            else:
                served = self._waiting_signals.popleft()
            self._start(served)

    # ------------------------------------------------------------------ closing

    def _on_close(self, cause: CloseCause) -> None:
        self._cause = cause
        suppressed = self._warnings - self._warnings_logged
        if suppressed > 0:
            log.warning(
                "%d further warnings about this peer's messages were not logged "
                "(the first %d are, then every power of two)",
                suppressed,
                WARNINGS_LOGGED_IN_FULL,
            )
        calls, self._calls = self._calls, {}
        for fut, timer in calls.values():
            timer.cancel()
            if not fut.done():
                fut.set_exception(ConnectionLost(cause))
        self._abandoned.clear()
        for served in list(self._running.values()) + list(self._running_signals):
            if served.timer is not None:
                served.timer.cancel()
            if served.task is not None:
                served.task.cancel()
        self._running.clear()
        self._running_signals.clear()
        for served in self._waiting_calls:
            if served.timer is not None:
                served.timer.cancel()
        self._waiting_calls.clear()
        self._waiting_signals.clear()
        self.stats.signals_expired += len(self._outbox)
        self._outbox.clear()
        for waiter in self._room_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._room_waiters.clear()

    async def close(self, reason: str = "closed by peer application") -> CloseCause:
        """Closes the connection: the peer's calls in flight here are answered *cancelled*
        (``closing``) ahead of the close frame, as chatter-rpc does; this side's calls in
        flight fail with :class:`ConnectionLost`."""
        if self._cause is None:
            for served in list(self._running.values()):
                self._finish_call(served, _failure(2, "closing"))
            while self._waiting_calls:
                served = self._waiting_calls.popleft()
                if served.timer is not None:
                    served.timer.cancel()
                self._reply(served, _failure(2, "closing"))
        return await self.connection.close(reason=reason)

    async def closed(self) -> CloseCause:
        """Waits until the connection closed; returns why."""
        return await self.connection.closed()

    @property
    def close_cause(self) -> Optional[CloseCause]:
        """Why the connection closed, or None while it is open."""
        return self._cause

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        """Streams are not implemented: chatter-rpc's streams have not landed yet."""
        raise NotImplementedError("streams are not implemented in the Python client (chatter-rpc streams have not landed)")

    def reliable_signal(self, *args: Any, **kwargs: Any) -> Any:
        """Sending reliable signals (kind 3, a reconnecting peer's) is not implemented;
        receiving them is (they are handled and acknowledged)."""
        raise NotImplementedError("sending reliable signals (envelope kind 3) is not implemented in the Python client")

    async def __aenter__(self) -> "Peer":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


class _Failure(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _TooLarge(Exception):
    """A request's context over ``max_metadata_bytes``."""


class _BadArgs(_Failure):
    def __init__(self, message: str) -> None:
        super().__init__(5, message)


def _ok(value: Any) -> bytes:
    try:
        return b"\x92\x00" + _pack(value)
    except Exception as e:
        return _failure(7, f"callee: cannot encode the reply: {e}")


def _is_ok(reply: Any) -> bool:
    return isinstance(reply, list) and len(reply) == 2 and reply[0] == OK


def _reply_error(reply: Any) -> CallError:
    if not isinstance(reply, list) or not reply or not isinstance(reply[0], int):
        return RpcProtocolError(f"malformed reply: {reply!r:.200}")
    status = reply[0]
    if status == APP_ERROR and len(reply) == 3:
        context = reply[1]
        if (
            isinstance(context, list)
            and len(context) == 2
            and isinstance(context[0], str)
            and isinstance(context[1], list)
            and all(isinstance(c, str) for c in context[1])
        ):
            return AppError(reply[2], context[0], context[1])
        return RpcProtocolError(f"malformed application error context: {context!r:.200}")
    if status == FAILURE and len(reply) == 3 and isinstance(reply[1], int) and isinstance(reply[2], str):
        cls = FAILURES.get(reply[1])
        if cls is None:
            return RpcProtocolError(f"unknown failure kind {reply[1]}: {reply[2]}")
        return cls(reply[2])
    err = RpcProtocolError(f"unknown reply status {status} with {len(reply)} elements")
    err.code = None
    return err


class RemoteMethod:
    """One method of a :class:`RemoteObject`: call it for a call, ``.signal(...)`` for a
    signal."""

    __slots__ = ("_peer", "_obj", "_name", "_deadline", "_ttl")

    def __init__(self, peer: Peer, obj: str, name: str, deadline: Optional[float], ttl: Optional[float]) -> None:
        self._peer = peer
        self._obj = obj
        self._name = name
        self._deadline = deadline
        self._ttl = ttl

    def __call__(self, *args: Any) -> "asyncio.Future[Any]":
        """Sends the call now; await the returned future for its result."""
        return self._peer.start_call(self._obj, self._name, args, self._deadline)

    async def signal(self, *args: Any) -> None:
        """Queues the method as a signal (no reply)."""
        await self._peer.signal(self._obj, self._name, *args, ttl=self._ttl)


class RemoteObject:
    """A proxy of a remote object: ``proxy.name(args)`` is a :class:`RemoteMethod` call."""

    def __init__(self, peer: Peer, name: str, deadline: Optional[float] = None, ttl: Optional[float] = None) -> None:
        self._peer = peer
        self._name = name
        self._deadline = deadline
        self._ttl = ttl

    def with_deadline(self, seconds: float) -> "RemoteObject":
        """The same proxy with another call deadline."""
        return RemoteObject(self._peer, self._name, seconds, self._ttl)

    def with_ttl(self, seconds: float) -> "RemoteObject":
        """The same proxy with another signal TTL."""
        return RemoteObject(self._peer, self._name, self._deadline, seconds)

    def __getattr__(self, method: str) -> RemoteMethod:
        if method.startswith("__"):
            raise AttributeError(method)
        m = RemoteMethod(self._peer, self._name, method, self._deadline, self._ttl)
        self.__dict__[method] = m
        return m
