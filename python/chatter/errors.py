"""Exceptions and close causes of the chatter client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

__all__ = [
    "CloseCause",
    "ChatterError",
    "ConnectError",
    "ConnectionClosed",
    "ProtocolViolation",
    "SendError",
    "NotYourTurn",
    "ConversationEnded",
    "MessageTooLarge",
    "WouldBlock",
    "CallError",
    "AppError",
    "DeadlineExceeded",
    "Cancelled",
    "NoSuchObject",
    "NoSuchMethod",
    "BadArguments",
    "RemotePanic",
    "RpcProtocolError",
    "ShuttingDown",
    "ConnectionLost",
    "SignalError",
    "OutboxFull",
    "SignalExpired",
]


# Close codes (chatter-core PROTOCOL.md §10).
NORMAL = 0
PROTOCOL_ERROR = 1
KEEPALIVE_TIMEOUT = 2
GOING_AWAY = 3
BUSY = 4

_CODE_NAMES = {0: "normal", 1: "protocol error", 2: "keepalive timeout", 3: "going away", 4: "busy"}


@dataclass(frozen=True)
class CloseCause:
    """Why a connection closed.

    ``kind`` is one of:

    - ``"local"``: this side closed it (``code`` and ``reason`` are what it sent);
    - ``"peer"``: the peer sent a close frame (``code``, ``reason`` from it);
    - ``"keepalive"``: the peer did not answer a ping in time;
    - ``"protocol"``: the peer broke the protocol (``reason`` says how; this side sent
      close code 1);
    - ``"handshake"``: the handshake failed (not a chatter peer, wrong version, timeout);
    - ``"io"``: the transport failed or ended without a close frame;
    - ``"tls"``: the TLS handshake or session failed.
    """

    kind: str
    code: Optional[int] = None
    reason: str = ""

    def __str__(self) -> str:
        if self.kind == "peer":
            name = _CODE_NAMES.get(self.code or 0, f"code {self.code}")
            return f"closed by peer ({name}): {self.reason}"
        if self.kind == "local":
            return f"closed locally: {self.reason}"
        if self.kind == "keepalive":
            return "keepalive timeout"
        if self.kind == "protocol":
            return f"protocol error: {self.reason}"
        if self.kind == "handshake":
            return f"handshake failed: {self.reason}"
        if self.kind == "tls":
            return f"TLS error: {self.reason}"
        return f"I/O error: {self.reason}"


class ChatterError(Exception):
    """Base class of every exception this package raises."""


class ConnectError(ChatterError):
    """Connecting failed: the transport did not open, or the handshake failed."""

    def __init__(self, cause: CloseCause) -> None:
        super().__init__(str(cause))
        #: Why the connection attempt failed.
        self.cause = cause


class ConnectionClosed(ChatterError):
    """The connection is closed; ``cause`` says why."""

    def __init__(self, cause: CloseCause) -> None:
        super().__init__(str(cause))
        #: Why the connection closed.
        self.cause = cause


class ProtocolViolation(ChatterError):
    """Raised internally when the peer breaks the protocol (it closes the connection)."""


class SendError(ChatterError):
    """A message could not be sent (nothing was put on the wire)."""


class NotYourTurn(SendError):
    """The peer holds the turn in this conversation."""


class ConversationEnded(SendError):
    """The conversation is not open (it ended, or never existed)."""


class MessageTooLarge(SendError):
    """The message exceeds what the peer accepts (its max_frame_size or receive_window)."""


class WouldBlock(SendError):
    """There is no flow-control credit (or send-buffer room) now (``try_send`` only)."""


class CallError(ChatterError):
    """A remote call failed.

    Every call failure carries ``kind`` (a short name such as ``"app"``,
    ``"deadline_exceeded"``, ``"remote_panic"``), ``code`` (the wire failure kind, 1-8, or
    ``None`` when the failure was not a wire failure), ``message`` and ``chain`` (the
    remote context: the error's description and the description of each cause, outermost
    first).
    """

    kind: str = "call"
    code: Optional[int] = None

    def __init__(self, message: str = "", chain: Optional[List[str]] = None) -> None:
        super().__init__(message)
        self.message = message
        self.chain: List[str] = list(chain or [])

    def __str__(self) -> str:
        if self.chain:
            return f"{self.kind}: {self.message} (caused by: {'; '.join(self.chain)})"
        return f"{self.kind}: {self.message}"


class AppError(CallError):
    """The remote handler returned an application error.

    ``error`` is the error value as the callee encoded it (for a Rust enum, a string for a
    unit variant or a one-key dict for a data variant), ``message`` its ``Display`` and
    ``chain`` its ``source()`` chain.

    A Python handler raises ``AppError(value)`` to return an application error:
    ``message`` defaults to ``str(value)`` and ``chain`` to the descriptions of the
    exception's ``__cause__`` chain (``raise AppError("x") from err``).
    """

    kind = "app"

    def __init__(self, error: Any, message: Optional[str] = None, chain: Optional[List[str]] = None) -> None:
        super().__init__(str(error) if message is None else message, chain)
        self.error = error


class DeadlineExceeded(CallError):
    """The call's deadline passed (here, or on the callee: wire kind 1)."""

    kind = "deadline_exceeded"
    code = 1


class Cancelled(CallError):
    """The callee cancelled the call (wire kind 2)."""

    kind = "cancelled"
    code = 2


class NoSuchObject(CallError):
    """The callee hosts no object of that name (wire kind 3)."""

    kind = "no_such_object"
    code = 3


class NoSuchMethod(CallError):
    """The object has no method of that name (wire kind 4)."""

    kind = "no_such_method"
    code = 4


class BadArguments(CallError):
    """The callee could not decode the arguments (wire kind 5)."""

    kind = "bad_arguments"
    code = 5


class RemotePanic(CallError):
    """The remote handler panicked (Rust) or raised an unexpected exception (Python); wire
    kind 6. The callee keeps serving."""

    kind = "remote_panic"
    code = 6


class RpcProtocolError(CallError):
    """The callee reported a malformed request (wire kind 7), or its reply was malformed
    (``code`` is then ``None``)."""

    kind = "protocol"
    code = 7


class ShuttingDown(CallError):
    """The callee is shutting down and did not start the call (wire kind 8)."""

    kind = "shutting_down"
    code = 8


class ConnectionLost(CallError):
    """The connection closed before the reply arrived; ``cause`` says why."""

    kind = "connection_lost"

    def __init__(self, cause: CloseCause) -> None:
        super().__init__(str(cause))
        self.cause = cause


FAILURES = {
    1: DeadlineExceeded,
    2: Cancelled,
    3: NoSuchObject,
    4: NoSuchMethod,
    5: BadArguments,
    6: RemotePanic,
    7: RpcProtocolError,
    8: ShuttingDown,
}


class SignalError(ChatterError):
    """A signal could not be queued."""


class OutboxFull(SignalError):
    """The outbox is full and the peer's policy is ``when_full="error"``."""


class SignalExpired(SignalError):
    """The signal's TTL ran out while it waited for room in the outbox."""
