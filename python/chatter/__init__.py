"""chatter: an asyncio client and peer for the chatter RPC framework.

Talks chatter-core's wire protocol (handshake, conversations, flow control, keepalive,
close) and chatter-rpc's envelopes (calls, signals, typed errors) to Rust peers over TCP,
TLS and Unix sockets. Depends only on ``msgpack``.

>>> import asyncio, chatter
>>> async def main():
...     async with await chatter.Peer.connect("tcp://127.0.0.1:7000") as peer:
...         calc = peer.remote("calculator")
...         print(await calc.add(2, 3))
"""

from .connection import Connection, Conversation, Msg, Options, connect, parse_address
from .errors import (
    AppError,
    BadArguments,
    CallError,
    Cancelled,
    ChatterError,
    CloseCause,
    ConnectError,
    ConnectionClosed,
    ConnectionLost,
    ConversationEnded,
    DeadlineExceeded,
    MessageTooLarge,
    NoSuchMethod,
    NoSuchObject,
    NotYourTurn,
    OutboxFull,
    RemotePanic,
    RpcProtocolError,
    SendError,
    ShuttingDown,
    SignalError,
    SignalExpired,
    WouldBlock,
)
from .rpc import CallContext, Peer, PeerStats, RemoteMethod, RemoteObject, current_context

__version__ = "0.1.0"

__all__ = [
    "AppError",
    "BadArguments",
    "CallContext",
    "CallError",
    "Cancelled",
    "ChatterError",
    "CloseCause",
    "ConnectError",
    "Connection",
    "ConnectionClosed",
    "ConnectionLost",
    "Conversation",
    "ConversationEnded",
    "DeadlineExceeded",
    "MessageTooLarge",
    "Msg",
    "NoSuchMethod",
    "NoSuchObject",
    "NotYourTurn",
    "Options",
    "OutboxFull",
    "Peer",
    "PeerStats",
    "RemoteMethod",
    "RemoteObject",
    "RemotePanic",
    "RpcProtocolError",
    "SendError",
    "ShuttingDown",
    "SignalError",
    "SignalExpired",
    "WouldBlock",
    "connect",
    "current_context",
    "parse_address",
]
