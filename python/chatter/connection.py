"""chatter-core connections: handshake, conversations, flow control, keepalive, close.

A :class:`Connection` is one chatter connection over TCP, TLS or a Unix socket, as
chatter-core PROTOCOL.md specifies it. Open one with :func:`connect`. Its messages belong
to conversations whose turn rules (owner, token, last) are enforced on both sides; the
peer's flow-control window is respected (sends wait for credit) and this side's is
announced and given back as the application consumes messages.

Memory is bounded: the receive queue holds at most ``receive_window`` bytes of messages
(counted as body + 64 each, as the protocol counts them; a peer that sends more is
disconnected), a partial frame at most ``max_frame_size`` bytes (a larger length prefix
closes the connection before anything is read), and sends wait while ``send_buffer``
bytes are unwritten.
"""

from __future__ import annotations

import asyncio
import collections
import ssl as _ssl
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, NamedTuple, Optional, Tuple
from urllib.parse import urlsplit

import msgpack

from . import frames as F
from .errors import (
    BUSY,
    KEEPALIVE_TIMEOUT,
    NORMAL,
    PROTOCOL_ERROR,
    CloseCause,
    ConnectError,
    ConnectionClosed,
    ConversationEnded,
    MessageTooLarge,
    NotYourTurn,
    WouldBlock,
)

__all__ = ["Options", "Conversation", "Msg", "Connection", "connect", "parse_address"]

OWNER, TOKEN, LAST = 0x01, 0x02, 0x04
#: What a message costs beyond its body (PROTOCOL.md §8.1).
OVERHEAD = 64
#: Until the peer's hello arrived, a side accepts first frames of at most this size.
FIRST_FRAME_LIMIT = 256
#: Early credit (§4.1): every receiver accepts this much whatever it announced.
EARLY = 4096
MAX_U32 = 2**32 - 1


@dataclass
class Options:
    """Connection options; the defaults are chatter-core's (PROTOCOL.md §14).

    Durations are in seconds. ``keepalive_interval=None`` disables keepalive (pings are
    still answered).
    """

    max_frame_size: int = 4 * 1024 * 1024
    receive_window: int = 8 * 1024 * 1024
    keepalive_interval: Optional[float] = 20.0
    keepalive_timeout: float = 20.0
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    close_linger: float = 2.0
    send_buffer: int = 1024 * 1024
    max_conversations: int = 65536
    #: For ``tls://``: the context (default: ``ssl.create_default_context()``, which
    #: verifies the server against the system's CAs).
    ssl: Optional[_ssl.SSLContext] = None
    #: For ``tls://``: the name to verify (default: the host of the address).
    server_hostname: Optional[str] = None

    def validate(self) -> None:
        """Raises ``ValueError`` for settings chatter-core refuses too."""
        if not 64 <= self.max_frame_size <= MAX_U32:
            raise ValueError("max_frame_size must be between 64 and 2**32-1")
        if not self.max_frame_size + OVERHEAD <= self.receive_window <= MAX_U32:
            raise ValueError("receive_window must be at least max_frame_size + 64 (and at most 2**32-1)")
        if self.send_buffer < 1 or self.max_conversations < 1:
            raise ValueError("send_buffer and max_conversations must be positive")


class Conversation(NamedTuple):
    """A conversation from this side's point of view: whether this side opened it, and the
    id of its first message (in the opener's id sequence)."""

    owner: bool
    first: int


@dataclass
class Msg:
    """A received message."""

    #: The conversation, from this side's point of view.
    conversation: Conversation
    #: Whether this message opened the conversation.
    opening: bool
    #: Whether it ended the conversation.
    last: bool
    #: Whether it passed the turn to this side (meaningless with ``last``).
    token: bool
    #: The raw payload bytes.
    payload: bytes
    #: Its flow-control cost (body length + 64).
    cost: int = field(default=0, repr=False)

    def decode(self) -> Any:
        """The payload as a MessagePack value."""
        return msgpack.unpackb(self.payload, raw=False, strict_map_key=False)


def parse_address(address: str) -> Tuple[str, Any]:
    """Splits ``tcp://host:port``, ``tls://host:port`` or ``unix:///path`` into
    ``(scheme, (host, port))`` or ``("unix", path)``. Raises ``ValueError``."""
    parts = urlsplit(address)
    scheme = parts.scheme
    if scheme == "unix":
        path = parts.path
        if not path:
            raise ValueError(f"{address!r}: a unix address needs a path")
        return scheme, path
    if scheme not in ("tcp", "tls"):
        raise ValueError(f"{address!r}: unknown scheme (expected tcp://, tls:// or unix://)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{address!r}: bad port") from None
    if not parts.hostname or port is None:
        raise ValueError(f"{address!r}: expected {scheme}://host:port")
    return scheme, (parts.hostname, port)


class _Protocol(asyncio.Protocol):
    """The asyncio side of a connection: forwards transport events."""

    def __init__(self, conn: "Connection") -> None:
        self.conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn._made(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.conn._data(data)

    def eof_received(self) -> bool:
        self.conn._eof()
        return True

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.conn._lost(exc)

    def pause_writing(self) -> None:
        self.conn._write_paused = True

    def resume_writing(self) -> None:
        self.conn._write_paused = False
        self.conn._wake_senders()


class Connection:
    """One chatter connection. Made by :func:`connect` (or a listener).

    Two ways to consume messages: :meth:`receive` (a queue), or a message handler set
    with :meth:`set_handler`, which the RPC layer uses and which must hand back each
    message's credit with :meth:`release` when done with it.
    """

    def __init__(self, options: Optional[Options] = None, *, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        self.options = options or Options()
        self.options.validate()
        self._loop = loop or asyncio.get_running_loop()
        self._transport: Optional[asyncio.Transport] = None
        self._buf = bytearray()
        # Handshake
        self._handshaken = False
        self._handshake: asyncio.Future = self._loop.create_future()
        self.peer_max_frame_size = 0
        #: The receive window the peer announced.
        self.peer_window = 0
        # Sending
        self._next_id = 1
        self._credit = 0
        self._out: List[bytes] = []
        self._out_bytes = 0
        self._flush_handle: Optional[asyncio.Handle] = None
        self._pong_due = False
        self._direct = True
        self._write_paused = False
        self._senders: Deque[asyncio.Future] = collections.deque()
        # Receiving
        self._rx_next = 1
        self._rx_used = 0
        self._rx_max = max(self.options.receive_window, EARLY)
        self._frame_max = max(self.options.max_frame_size, EARLY)
        self._unannounced = 0
        w = self.options.receive_window
        self._threshold = max(1, min(w // 4, w - (self.options.max_frame_size + OVERHEAD) + 1))
        self._queue: Deque[Msg] = collections.deque()
        self._queue_waiters: List[asyncio.Future] = []
        self._handler: Optional[Callable[[bool, int, bool, bool, bool, bytes, int], None]] = None
        # Conversations: key (we_own, first) -> whether this side holds the turn.
        self._convs: Dict[Tuple[bool, int], bool] = {}
        self._peer_opened = 0
        self._timers: Dict[Tuple[bool, int], asyncio.TimerHandle] = {}
        self._timeouts: Deque[Conversation] = collections.deque()
        self._timeout_waiters: List[asyncio.Future] = []
        self._timeout_handler: Optional[Callable[[Conversation], None]] = None
        # Keepalive
        self._last_rx = 0.0
        self._keepalive_handle: Optional[asyncio.TimerHandle] = None
        self._ping_sent: Optional[float] = None
        # Close
        self._cause: Optional[CloseCause] = None
        self._closed: asyncio.Future = self._loop.create_future()
        self._close_listeners: List[Callable[[CloseCause], None]] = []
        self._linger_handle: Optional[asyncio.TimerHandle] = None
        self._eof_seen = False
        self._gone = False
        #: Statistics: messages and bytes in each direction.
        self.stats = {"sent": 0, "received": 0, "bytes_sent": 0, "bytes_received": 0}
        self.protocol = _Protocol(self)

    # ------------------------------------------------------------------ public API

    @property
    def is_closed(self) -> bool:
        """Whether the connection is closed (or closing)."""
        return self._cause is not None

    @property
    def close_cause(self) -> Optional[CloseCause]:
        """Why the connection closed, or ``None`` while it is open."""
        return self._cause

    @property
    def credit(self) -> int:
        """Send credit left in the peer's window (bytes)."""
        return self._credit

    @property
    def buffered(self) -> int:
        """Bytes of received messages not released yet (counted as body + 64 each)."""
        return self._rx_used

    async def wait_handshake(self) -> None:
        """Waits until the peer's hello arrived; raises :class:`ConnectError` if the
        handshake failed."""
        await asyncio.shield(self._handshake)

    async def closed(self) -> CloseCause:
        """Waits until the connection closed; returns why."""
        return await asyncio.shield(self._closed)

    def on_close(self, listener: Callable[[CloseCause], None]) -> None:
        """Calls ``listener(cause)`` once when the connection closes."""
        if self._cause is not None:
            self._loop.call_soon(listener, self._cause)
        else:
            self._close_listeners.append(listener)

    def set_handler(
        self,
        handler: Optional[Callable[[bool, int, bool, bool, bool, bytes, int], None]],
        timeout_handler: Optional[Callable[[Conversation], None]] = None,
    ) -> None:
        """Delivers each message to ``handler(we_own, first, opening, last, token,
        payload, cost)`` instead of the queue. The handler owns the message's credit: it
        must call :meth:`release` with ``cost`` when done with the message."""
        self._handler = handler
        self._timeout_handler = timeout_handler

    async def receive(self) -> Msg:
        """The next message (its credit goes back to the peer now). Messages that
        arrived before the close are still returned; then :class:`ConnectionClosed`."""
        await self._wait_for(self._queue, self._queue_waiters)
        msg = self._queue.popleft()
        self.release(msg.cost)
        return msg

    async def next_timeout(self) -> Conversation:
        """The next conversation whose timeout fired (PROTOCOL.md §7)."""
        await self._wait_for(self._timeouts, self._timeout_waiters)
        return self._timeouts.popleft()

    async def _wait_for(self, items: Deque[Any], waiters: List[asyncio.Future]) -> None:
        """Waits until ``items`` is not empty; raises :class:`ConnectionClosed` once it
        is empty and the connection closed."""
        while not items:
            if self._cause is not None:
                raise ConnectionClosed(self._cause)
            waiter = self._loop.create_future()
            waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in waiters:
                    waiters.remove(waiter)

    def release(self, cost: int) -> None:
        """Gives back the credit of a consumed message (handler mode)."""
        self._rx_used -= cost
        if self._cause is not None:
            return
        self._unannounced += cost
        if self._unannounced >= self._threshold:
            credit, self._unannounced = self._unannounced, 0
            self._write(F.window_frame(credit))

    def max_message(self) -> int:
        """The largest payload-carrying body the peer accepts."""
        return min(self.peer_max_frame_size, self.peer_window - OVERHEAD)

    def try_send(
        self,
        payload: bytes,
        conversation: Optional[Conversation] = None,
        *,
        last: bool = True,
        token: bool = True,
        timeout: Optional[float] = None,
        reserve: int = 0,
    ) -> Conversation:
        """Sends now or raises :class:`WouldBlock` (no credit or send-buffer room).

        ``conversation=None`` opens a conversation; ``last`` ends it; ``token`` passes
        the turn (PROTOCOL.md §6). ``timeout`` reports the conversation through
        :meth:`next_timeout` if the peer says nothing in it for that long. ``reserve``
        bytes of the peer's window must stay free after this message (unless nothing is
        in flight).
        """
        conv = self._send(payload, conversation, last, token, timeout, reserve)
        if conv is None:
            raise WouldBlock("no flow-control credit or send-buffer room now")
        return conv

    async def send(
        self,
        payload: bytes,
        conversation: Optional[Conversation] = None,
        *,
        last: bool = True,
        token: bool = True,
        timeout: Optional[float] = None,
        reserve: int = 0,
    ) -> Conversation:
        """Sends a message, waiting while credit or send-buffer room is short. See
        :meth:`try_send` for the arguments."""
        while True:
            conv = self._send(payload, conversation, last, token, timeout, reserve)
            if conv is not None:
                return conv
            await self._wait_writable()

    async def close(self, code: int = NORMAL, reason: str = "closed by peer application") -> CloseCause:
        """Closes the connection (PROTOCOL.md §10): queued messages go out first, then
        the close frame. Returns the close cause once the transport is gone."""
        self._close(CloseCause("local", code, reason), code, reason)
        return await self.closed()

    @property
    def local_address(self) -> Any:
        """The transport's local address."""
        return self._transport.get_extra_info("sockname") if self._transport else None

    @property
    def peer_certificate(self) -> Optional[Dict[str, Any]]:
        """The peer's certificate on TLS (``ssl.SSLSocket.getpeercert()``), else None."""
        obj = self._transport.get_extra_info("ssl_object") if self._transport else None
        return obj.getpeercert() if obj is not None else None

    # ------------------------------------------------------------------ sending

    def _send(
        self,
        payload: bytes,
        conversation: Optional[Conversation],
        last: bool,
        token: bool,
        timeout: Optional[float],
        reserve: int,
    ) -> Optional[Conversation]:
        if self._cause is not None:
            raise ConnectionClosed(self._cause)
        if not self._handshaken:
            return None
        if conversation is not None:
            key = (conversation.owner, conversation.first)
            ours = self._convs.get(key)
            if ours is None:
                raise ConversationEnded(f"conversation {conversation} is not open")
            if not ours:
                raise NotYourTurn(f"the peer holds the turn in conversation {conversation}")
        id_ = self._next_id
        if conversation is None:
            first, owner = id_, True
        else:
            first, owner = conversation.first, conversation.owner
        flags = OWNER if owner else 0
        if last:
            flags |= LAST | (TOKEN if token else 0)
        elif token:
            flags |= TOKEN
        if id_ < 0x80 and first < 0x80:
            header = bytes((0x94, 0x01, id_, first, flags))
        else:
            header = F.message_header(id_, first, flags)
        body_len = len(header) + len(payload)
        if body_len > self.max_message():
            raise MessageTooLarge(
                f"a message body of {body_len} bytes exceeds the peer's limit of {self.max_message()}"
            )
        cost = body_len + OVERHEAD
        credit = self._credit
        if (cost + reserve > credit and credit < self.peer_window) or cost > credit:
            return None
        if self._write_paused or self._out_bytes >= self.options.send_buffer:
            return None
        self._credit = credit - cost
        self._next_id = id_ + 1
        key = (owner, first)
        if last:
            if conversation is not None:
                del self._convs[key]
                if not owner:
                    self._peer_opened -= 1
        else:
            self._convs[key] = not token
        if self._timers and key in self._timers:
            self._timers.pop(key).cancel()
        if timeout is not None and not last:
            self._timers[key] = self._loop.call_later(timeout, self._timer_fired, key)
        frame = b"".join((body_len.to_bytes(4, "big"), header, payload))
        self.stats["sent"] += 1
        self._write(frame)
        return Conversation(True, id_) if conversation is None else conversation

    def _write(self, data: bytes) -> None:
        if self._direct and self._flush_handle is None and not self._pong_due and self._transport is not None and not self._gone:
            # Nothing waits to be written: write now (a round trip sooner, no extra turn
            # of the event loop); what else is written before input arrives or the next
            # flush is batched behind it.
            self._direct = False
            self.stats["bytes_sent"] += len(data)
            self._transport.write(data)
            return
        self._out.append(data)
        self._out_bytes += len(data)
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        self._direct = True
        if self._gone or self._transport is None:
            self._out.clear()
            self._out_bytes = 0
            return
        if self._pong_due:
            self._pong_due = False
            self._out.append(F.PONG_FRAME)
        if not self._out:
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        self._out_bytes = 0
        self.stats["bytes_sent"] += len(data)
        self._transport.write(data)
        if self._senders:
            self._wake_senders()

    async def _wait_writable(self) -> None:
        fut = self._loop.create_future()
        self._senders.append(fut)
        try:
            await fut
        finally:
            if not fut.done():
                fut.cancel()
            try:
                self._senders.remove(fut)
            except ValueError:
                pass

    def _wake_senders(self) -> None:
        for fut in self._senders:
            if not fut.done():
                fut.set_result(None)
        self._senders.clear()

    def _timer_fired(self, key: Tuple[bool, int]) -> None:
        self._timers.pop(key, None)
        if self._cause is not None:
            return
        conv = Conversation(*key)
        if self._timeout_handler is not None:
            self._timeout_handler(conv)
            return
        self._timeouts.append(conv)
        _wake(self._timeout_waiters)

    # ------------------------------------------------------------------ receiving

    def _made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        transport.set_write_buffer_limits(high=self.options.send_buffer)
        self._last_rx = self._loop.time()
        transport.write(F.hello_frame(self.options.max_frame_size, self.options.receive_window))

    def _data(self, data: bytes) -> None:
        if self._cause is not None:
            return  # draining after a close
        self._last_rx = self._loop.time()
        self._direct = True
        self.stats["bytes_received"] += len(data)
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        limit = self._frame_max if self._handshaken else FIRST_FRAME_LIMIT
        try:
            while n - pos >= 4:
                length = int.from_bytes(buf[pos : pos + 4], "big")
                if length > limit or length == 0:
                    if not self._handshaken:
                        raise _NotChatter(bytes(buf[pos : pos + 16]))
                    if length == 0:
                        raise _Violation("malformed frame: empty frame body")
                    raise _Violation(f"frame of {length} bytes exceeds the maximum of {limit}")
                end = pos + 4 + length
                if end > n:
                    break
                body = bytes(buf[pos + 4 : end])
                pos = end
                self._frame(body)
                if self._cause is not None:
                    return
                limit = self._frame_max
        except _NotChatter as e:
            self._fail_handshake(_not_chatter_reason(e.args[0]))
            return
        except _Violation as e:
            self._violation(str(e))
            return
        del buf[:pos]

    def _frame(self, body: bytes) -> None:
        # Fast path: a message whose header is a fixarray of 4 fixints.
        if body[0] == 0x94 and body[1] == 0x01 and self._handshaken and len(body) >= 5:
            id_, first, flags = body[2], body[3], body[4]
            if id_ < 0x80 and first < 0x80 and flags < 0x80:
                if flags > 7:
                    raise _Violation(f"malformed frame: message flags 0x{flags & ~7:x} set unknown bits")
                self._message(id_, first, flags, body[5:], len(body))
                return
            # The next most common shape: ids as uint 16 (cd) or uint 32 (ce).
            if id_ in _WIDE and len(body) >= 3 + _WIDE[id_]:
                i = 3 + _WIDE[id_]
                id_ = int.from_bytes(body[3:i], "big")
                m = body[i]
                if m in _WIDE and len(body) >= i + 2 + _WIDE[m]:
                    j = i + 1 + _WIDE[m]
                    first = int.from_bytes(body[i + 1 : j], "big")
                    flags = body[j]
                    if flags <= 7:
                        self._message(id_, first, flags, body[j + 1 :], len(body))
                        return
                elif m < 0x80 and len(body) > i + 1:
                    flags = body[i + 1]
                    if flags <= 7:
                        self._message(id_, m, flags, body[i + 2 :], len(body))
                        return
        try:
            kind, fields, end = F.decode_header(body)
        except F.Malformed as e:
            if not self._handshaken:
                raise _NotChatter(body[:16]) from None
            raise _Violation(f"malformed frame: {e}") from None
        if not self._handshaken:
            if kind == F.HELLO:
                if fields[0] != F.MAGIC:
                    raise _NotChatter(body[:16])
                self._hello(fields)
            elif kind == F.CLOSE:
                self._peer_close(int(fields[0]), str(fields[1]))
            else:
                raise _Violation(f"unexpected frame: expected hello, got {F.KIND_NAMES[kind]}")
            return
        if kind == F.MESSAGE:
            id_, first, flags = fields  # type: ignore[misc]
            if flags > 7:  # type: ignore[operator]
                if flags > 255:  # type: ignore[operator]
                    raise _Violation(f"malformed frame: message flags {flags} out of range")
                raise _Violation(f"malformed frame: message flags 0x{flags & ~7:x} set unknown bits")  # type: ignore[operator]
            self._message(id_, first, flags, body[end:], len(body))  # type: ignore[arg-type]
        elif kind == F.PING:
            self._pong_due = True
            if self._flush_handle is None:
                self._flush_handle = self._loop.call_soon(self._flush)
        elif kind == F.PONG:
            pass
        elif kind == F.WINDOW:
            credit = self._credit + fields[0]  # type: ignore[operator]
            if credit > self.peer_window:
                raise _Violation(
                    f"unexpected frame: window update to {credit} bytes exceeds the announced window of {self.peer_window}"
                )
            self._credit = credit
            if self._senders:
                self._wake_senders()
        elif kind == F.CLOSE:
            self._peer_close(int(fields[0]), str(fields[1]))
        else:
            raise _Violation("unexpected frame: second hello")

    def _hello(self, fields: List[Any]) -> None:
        version = fields[1]
        if version != F.VERSION:
            self._fail_handshake(f"peer speaks protocol version {version}, this side speaks {F.VERSION}")
            return
        max_frame, window = fields[2], fields[3]
        if max_frame < 64 or window < 64:
            raise _Violation(
                f"malformed frame: hello announces max_frame_size {max_frame} and receive_window {window}; both must be at least 64"
            )
        self.peer_max_frame_size = min(max_frame, MAX_U32)
        self.peer_window = min(window, MAX_U32)
        self._credit = self.peer_window
        self._handshaken = True
        if not self._handshake.done():
            self._handshake.set_result(None)
        self._arm_keepalive()
        if self._senders:
            self._wake_senders()

    def _message(self, id_: int, first: int, flags: int, payload: bytes, body_len: int) -> None:
        if id_ != self._rx_next:
            raise _Violation(f"message id {id_} where {self._rx_next} was expected")
        self._rx_next = id_ + 1
        cost = body_len + OVERHEAD
        self._rx_used += cost
        if self._rx_used > self._rx_max:
            raise _Violation(f"peer exceeded the receive window ({self._rx_used} bytes in use, window {self._rx_max})")
        peer_owns = flags & OWNER
        last = bool(flags & LAST)
        token = bool(flags & TOKEN)
        key = (not peer_owns, first)
        opening = bool(peer_owns) and first == id_
        if opening:
            if not last:
                if self._peer_opened >= self.options.max_conversations:
                    raise _Violation(f"peer opened more than {self.options.max_conversations} concurrent conversations")
                self._peer_opened += 1
                self._convs[key] = bool(token)
        else:
            ours = self._convs.get(key)
            who = "by peer" if peer_owns else "by us"
            if ours is None:
                raise _Violation(f"message in unknown or ended conversation (first id {first}, opened {who})")
            if ours:
                raise _Violation(f"peer sent out of turn in conversation (first id {first}, opened {who})")
            timer = self._timers.pop(key, None) if self._timers else None
            if timer is not None:
                timer.cancel()
            if last:
                del self._convs[key]
                if peer_owns:
                    self._peer_opened -= 1
            elif token:
                self._convs[key] = True
        self.stats["received"] += 1
        handler = self._handler
        if handler is not None:
            handler(not peer_owns, first, opening, last, token, payload, cost)
            return
        self._queue.append(Msg(Conversation(not peer_owns, first), opening, last, token, payload, cost))
        if self._queue_waiters:
            _wake(self._queue_waiters)

    # ------------------------------------------------------------------ keepalive

    def _arm_keepalive(self) -> None:
        interval = self.options.keepalive_interval
        if interval is None or self._cause is not None:
            return
        self._keepalive_handle = self._loop.call_at(self._last_rx + interval, self._keepalive)

    def _keepalive(self) -> None:
        self._keepalive_handle = None
        if self._cause is not None:
            return
        now = self._loop.time()
        interval = self.options.keepalive_interval
        assert interval is not None
        if self._ping_sent is not None:
            if self._last_rx > self._ping_sent:
                self._ping_sent = None
            elif now >= self._ping_sent + self.options.keepalive_timeout:
                self._close(CloseCause("keepalive"), KEEPALIVE_TIMEOUT, "keepalive timeout", linger=False)
                return
            else:
                self._keepalive_handle = self._loop.call_at(self._ping_sent + self.options.keepalive_timeout, self._keepalive)
                return
        if now >= self._last_rx + interval:
            self._ping_sent = now
            self._write(F.PING_FRAME)
            self._keepalive_handle = self._loop.call_at(now + self.options.keepalive_timeout, self._keepalive)
        else:
            self._keepalive_handle = self._loop.call_at(self._last_rx + interval, self._keepalive)

    # ------------------------------------------------------------------ closing

    def _violation(self, reason: str) -> None:
        self._close(CloseCause("protocol", PROTOCOL_ERROR, reason), PROTOCOL_ERROR, reason)

    def _fail_handshake(self, reason: str) -> None:
        self._close(CloseCause("handshake", PROTOCOL_ERROR, reason), PROTOCOL_ERROR, reason)

    def _peer_close(self, code: int, reason: str) -> None:
        # No close frame back (§10); stop processing input, half-close, drain.
        self._close(CloseCause("peer", code, reason), None, "")

    def _close(self, cause: CloseCause, code: Optional[int], reason: str, linger: bool = True) -> None:
        if self._cause is not None:
            return
        self._cause = cause
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._convs.clear()
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        self._pong_due = False
        transport = self._transport
        if transport is not None and not self._gone:
            if code is not None:
                limit = self.peer_max_frame_size if self._handshaken else FIRST_FRAME_LIMIT
                self._out.append(F.close_frame(code, reason, limit))
            if self._flush_handle is not None:
                self._flush_handle.cancel()
            self._flush_handle = None
            self._flush()
            if not linger:
                transport.abort()
            else:
                if transport.can_write_eof():
                    try:
                        transport.write_eof()
                    except (OSError, RuntimeError):
                        pass
                    if self._eof_seen:
                        transport.close()
                    else:
                        self._linger_handle = self._loop.call_later(self.options.close_linger, self._linger_over)
                else:
                    transport.close()  # TLS: close_notify after the buffered output
                    self._linger_handle = self._loop.call_later(self.options.close_linger, self._linger_over)
        self._buf = bytearray()
        self._finish(cause)

    def _linger_over(self) -> None:
        self._linger_handle = None
        if self._transport is not None and not self._gone:
            self._transport.abort()

    def _finish(self, cause: CloseCause) -> None:
        """Wakes every waiter with the cause (the transport may still be lingering)."""
        if not self._handshake.done():
            self._handshake.set_exception(ConnectError(cause))
            self._handshake.exception()  # retrieved: no "never retrieved" warning
        self._wake_senders()
        _wake(self._queue_waiters)
        _wake(self._timeout_waiters)
        listeners, self._close_listeners = self._close_listeners, []
        for listener in listeners:
            try:
                listener(cause)
            except Exception:  # pragma: no cover - a listener's bug must not stop the others
                import logging

                logging.getLogger("chatter").exception("close listener failed")
        if self._gone and not self._closed.done():
            self._closed.set_result(cause)

    def _eof(self) -> None:
        self._eof_seen = True
        if self._cause is None:
            if self._buf:
                reason = f"peer closed the connection without a close frame (in the middle of a frame, {len(self._buf)} bytes buffered)"
            else:
                reason = "peer closed the connection without a close frame"
            kind = "io" if self._handshaken else "handshake"
            self._close(CloseCause(kind, None, reason), None, "")
        elif self._transport is not None and not self._gone:
            self._transport.close()

    def _lost(self, exc: Optional[Exception]) -> None:
        self._gone = True
        if self._linger_handle is not None:
            self._linger_handle.cancel()
        if self._keepalive_handle is not None:
            self._keepalive_handle.cancel()
        if self._cause is None:
            if isinstance(exc, _ssl.SSLError):
                cause = CloseCause("tls", None, str(exc))
            else:
                cause = CloseCause("io", None, str(exc) if exc else "connection lost")
            self._close(cause, None, "")
        if not self._closed.done():
            assert self._cause is not None
            self._closed.set_result(self._cause)
            self._closed.exception()


def _wake(waiters: List[asyncio.Future]) -> None:
    """Wakes every waiter (each checks again what it waits for)."""
    for w in waiters:
        if not w.done():
            w.set_result(None)
    waiters.clear()


_WIDE = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


class _Violation(Exception):
    pass


class _NotChatter(Exception):
    pass


def _not_chatter_reason(first: bytes) -> str:
    hexed = " ".join(f"{b:02x}" for b in first[:16])
    text = "".join(chr(b) if 32 <= b < 127 else "." for b in first[:16])
    return f'peer does not speak chatter (first bytes: {hexed} "{text}")'


async def connect(address: str, options: Optional[Options] = None) -> Connection:
    """Opens a connection to ``tcp://host:port``, ``tls://host:port`` or
    ``unix:///path`` and waits for the peer's hello.

    Raises :class:`ConnectError` (with a :class:`CloseCause`) if the transport cannot be
    opened within ``connect_timeout``, the TLS handshake fails, or the peer does not
    complete the chatter handshake within ``handshake_timeout``; ``ValueError`` for a
    malformed address.
    """
    options = options or Options()
    scheme, where = parse_address(address)
    loop = asyncio.get_running_loop()
    conn = Connection(options, loop=loop)
    try:
        if scheme == "unix":
            coro = loop.create_unix_connection(lambda: conn.protocol, where)
        elif scheme == "tls":
            context = options.ssl or _ssl.create_default_context()
            host, port = where
            coro = loop.create_connection(
                lambda: conn.protocol, host, port, ssl=context, server_hostname=options.server_hostname or host
            )
        else:
            host, port = where
            coro = loop.create_connection(lambda: conn.protocol, host, port)
        await asyncio.wait_for(coro, options.connect_timeout)
    except asyncio.TimeoutError:
        raise ConnectError(CloseCause("io", None, f"connecting to {address} timed out")) from None
    except _ssl.SSLError as e:
        raise ConnectError(CloseCause("tls", None, str(e))) from e
    except OSError as e:
        raise ConnectError(CloseCause("io", None, f"connecting to {address}: {e}")) from e
    try:
        await asyncio.wait_for(asyncio.shield(conn._handshake), options.handshake_timeout)
    except asyncio.TimeoutError:
        conn._fail_handshake("handshake timed out")
        raise ConnectError(conn.close_cause or CloseCause("handshake", PROTOCOL_ERROR, "handshake timed out")) from None
    except asyncio.CancelledError:
        conn._close(CloseCause("local", NORMAL, "connect cancelled"), NORMAL, "connect cancelled", linger=False)
        raise
    return conn


__all__ += ["BUSY"]
