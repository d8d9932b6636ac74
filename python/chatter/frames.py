"""Frame encoding and decoding (chatter-core PROTOCOL.md §2-§5).

Frame headers use a strict MessagePack subset (arrays, unsigned integers, strings); this
module encodes and decodes them by hand, so that the strictness rules of §3 hold exactly
(signed integer formats are rejected even for non-negative values, extra trailing
elements are skipped, nesting is bounded).
"""

from __future__ import annotations

import struct
from typing import List, Tuple, Union

__all__ = [
    "HELLO",
    "MESSAGE",
    "PING",
    "PONG",
    "WINDOW",
    "CLOSE",
    "Malformed",
    "uint",
    "hello_frame",
    "message_frame",
    "window_frame",
    "close_frame",
    "PING_FRAME",
    "PONG_FRAME",
    "decode_header",
]

HELLO, MESSAGE, PING, PONG, WINDOW, CLOSE = range(6)
KIND_NAMES = ["hello", "message", "ping", "pong", "window", "close"]
#: Fields each kind needs, kind included.
NEEDED = [5, 4, 1, 1, 2, 3]
MAGIC = "chatter"
VERSION = 1
#: The reference decoder's limit on nested values skipped in a header.
MAX_SKIP_DEPTH = 16

_pack_len = struct.Struct(">I").pack
_unpack16 = struct.Struct(">H").unpack_from
_unpack32 = struct.Struct(">I").unpack_from
_unpack64 = struct.Struct(">Q").unpack_from


class Malformed(Exception):
    """A frame body that does not decode (the text is the reason, without the prefix)."""


def uint(v: int) -> bytes:
    """The shortest MessagePack encoding of an unsigned integer."""
    if v < 0x80:
        return bytes((v,))
    if v < 0x100:
        return bytes((0xCC, v))
    if v < 0x10000:
        return b"\xcd" + v.to_bytes(2, "big")
    if v < 0x100000000:
        return b"\xce" + v.to_bytes(4, "big")
    return b"\xcf" + v.to_bytes(8, "big")


def _str(s: str) -> bytes:
    b = s.encode()
    n = len(b)
    if n < 32:
        return bytes((0xA0 | n,)) + b
    if n < 0x100:
        return bytes((0xD9, n)) + b
    if n < 0x10000:
        return b"\xda" + n.to_bytes(2, "big") + b
    return b"\xdb" + n.to_bytes(4, "big") + b


def _frame(body: bytes) -> bytes:
    return _pack_len(len(body)) + body


def hello_frame(max_frame_size: int, receive_window: int) -> bytes:
    """``[0, "chatter", 1, max_frame_size, receive_window]`` with its length prefix."""
    return _frame(b"\x95\x00" + _str(MAGIC) + uint(VERSION) + uint(max_frame_size) + uint(receive_window))


def message_header(id_: int, first: int, flags: int) -> bytes:
    """The header array of a message frame (without the length prefix)."""
    if id_ < 0x80 and first < 0x80:
        return bytes((0x94, 0x01, id_, first, flags))
    return b"\x94\x01" + uint(id_) + uint(first) + bytes((flags,))


def message_frame(id_: int, first: int, flags: int, payload: bytes) -> Tuple[bytes, int]:
    """A whole message frame and its body length."""
    header = message_header(id_, first, flags)
    n = len(header) + len(payload)
    return _pack_len(n) + header + payload, n


def window_frame(credit: int) -> bytes:
    """``[4, credit]`` with its length prefix."""
    return _frame(b"\x92\x04" + uint(credit))


def close_frame(code: int, reason: str, limit: int) -> bytes:
    """``[5, code, reason]``, the reason cut (at a character boundary) to fit ``limit``."""
    cap = max(0, min(limit - 16, 1024))
    raw = reason.encode()
    if len(raw) > cap:
        raw = raw[:cap].decode("utf-8", "ignore").encode()
    return _frame(b"\x93\x05" + uint(code) + _str(raw.decode()))


PING_FRAME = b"\x00\x00\x00\x02\x91\x02"
PONG_FRAME = b"\x00\x00\x00\x02\x91\x03"

_SIGNED = {0xD0, 0xD1, 0xD2, 0xD3}
_FIXED_SKIP = {
    0xC0: 0, 0xC2: 0, 0xC3: 0,
    0xCA: 4, 0xCB: 8,
    0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
    0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,
    0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,
}


def _need(b: bytes, i: int, n: int) -> None:
    if i + n > len(b):
        raise Malformed("truncated header")


def _marker_name(m: int) -> str:
    if m >= 0xE0 or m in _SIGNED:
        return f"a signed integer (marker 0x{m:02x})"
    if m in (0xCA, 0xCB):
        return f"a float (marker 0x{m:02x})"
    if m == 0xC0:
        return "nil (marker 0xc0)"
    if m in (0xC2, 0xC3):
        return f"a boolean (marker 0x{m:02x})"
    if 0xC4 <= m <= 0xC6:
        return f"binary (marker 0x{m:02x})"
    return f"marker 0x{m:02x}"


def _read_uint(b: bytes, i: int) -> Tuple[int, int]:
    _need(b, i, 1)
    m = b[i]
    if m < 0x80:
        return m, i + 1
    if m == 0xCC:
        _need(b, i, 2)
        return b[i + 1], i + 2
    if m == 0xCD:
        _need(b, i, 3)
        return _unpack16(b, i + 1)[0], i + 3
    if m == 0xCE:
        _need(b, i, 5)
        return _unpack32(b, i + 1)[0], i + 5
    if m == 0xCF:
        _need(b, i, 9)
        return _unpack64(b, i + 1)[0], i + 9
    raise Malformed(f"expected an unsigned integer, found {_marker_name(m)}")


def _read_str(b: bytes, i: int) -> Tuple[str, int]:
    _need(b, i, 1)
    m = b[i]
    if 0xA0 <= m <= 0xBF:
        n, i = m & 0x1F, i + 1
    elif m == 0xD9:
        _need(b, i, 2)
        n, i = b[i + 1], i + 2
    elif m == 0xDA:
        _need(b, i, 3)
        n, i = _unpack16(b, i + 1)[0], i + 3
    elif m == 0xDB:
        _need(b, i, 5)
        n, i = _unpack32(b, i + 1)[0], i + 5
    else:
        raise Malformed(f"expected a string, found {_marker_name(m)}")
    _need(b, i, n)
    try:
        return bytes(b[i : i + n]).decode("utf-8"), i + n
    except UnicodeDecodeError:
        raise Malformed("invalid UTF-8 in a string") from None


def _read_array_len(b: bytes, i: int) -> Tuple[int, int]:
    _need(b, i, 1)
    m = b[i]
    if 0x90 <= m <= 0x9F:
        return m & 0x0F, i + 1
    if m == 0xDC:
        _need(b, i, 3)
        return _unpack16(b, i + 1)[0], i + 3
    if m == 0xDD:
        _need(b, i, 5)
        return _unpack32(b, i + 1)[0], i + 5
    raise Malformed(f"expected an array, found {_marker_name(m)}")


def _skip(b: bytes, i: int, depth: int) -> int:
    """Skips one MessagePack value of any type; returns the index after it."""
    if depth > MAX_SKIP_DEPTH:
        raise Malformed(f"values nested more than {MAX_SKIP_DEPTH} levels deep")
    _need(b, i, 1)
    m = b[i]
    if m < 0x80 or m >= 0xE0:
        return i + 1
    if 0xA0 <= m <= 0xBF:
        n = m & 0x1F
        _need(b, i + 1, n)
        return i + 1 + n
    if 0x90 <= m <= 0x9F or m in (0xDC, 0xDD):
        n, i = _read_array_len(b, i)
        for _ in range(n):
            i = _skip(b, i, depth + 1)
        return i
    if 0x80 <= m <= 0x8F or m in (0xDE, 0xDF):
        if m <= 0x8F:
            n, i = m & 0x0F, i + 1
        elif m == 0xDE:
            _need(b, i, 3)
            n, i = _unpack16(b, i + 1)[0], i + 3
        else:
            _need(b, i, 5)
            n, i = _unpack32(b, i + 1)[0], i + 5
        for _ in range(2 * n):
            i = _skip(b, i, depth + 1)
        return i
    if m in _FIXED_SKIP:
        n = _FIXED_SKIP[m]
        _need(b, i + 1, n)
        return i + 1 + n
    if m in (0xC4, 0xD9):  # bin 8, str 8
        _need(b, i, 2)
        n, i = b[i + 1], i + 2
    elif m in (0xC5, 0xDA):
        _need(b, i, 3)
        n, i = _unpack16(b, i + 1)[0], i + 3
    elif m in (0xC6, 0xDB):
        _need(b, i, 5)
        n, i = _unpack32(b, i + 1)[0], i + 5
    elif m == 0xC7:  # ext 8/16/32: length, type, data
        _need(b, i, 3)
        n, i = b[i + 1] + 1, i + 2
    elif m == 0xC8:
        _need(b, i, 4)
        n, i = _unpack16(b, i + 1)[0] + 1, i + 3
    elif m == 0xC9:
        _need(b, i, 6)
        n, i = _unpack32(b, i + 1)[0] + 1, i + 5
    else:  # 0xc1: never used
        raise Malformed(f"invalid MessagePack marker 0x{m:02x}")
    _need(b, i, n)
    return i + n


Field = Union[int, str]


def decode_header(body: bytes) -> Tuple[int, List[Field], int]:
    """Decodes a frame body's header: ``(kind, fields after the kind, end of header)``.

    Raises :class:`Malformed` with the reason text of PROTOCOL.md §11.
    """
    count, i = _read_array_len(body, 0)
    if count == 0:
        raise Malformed("empty frame header")
    kind, i = _read_uint(body, i)
    if kind > CLOSE:
        raise Malformed(f"unknown frame kind {kind}")
    needed = NEEDED[kind]
    if count < needed:
        raise Malformed(f"a {KIND_NAMES[kind]} header needs {needed} elements, found {count}")
    fields: List[Field] = []
    if kind == HELLO:
        magic, i = _read_str(body, i)
        fields.append(magic)
        version, i = _read_uint(body, i)
        fields.append(version)
        if magic == MAGIC and version == VERSION:
            # The sizes are read only for version 1 (§4: a later version may change them).
            for _ in range(2):
                v, i = _read_uint(body, i)
                fields.append(v)
        else:
            return kind, fields, i
    elif kind == CLOSE:
        code, i = _read_uint(body, i)
        reason, i = _read_str(body, i)
        fields += [code, reason]
    else:
        for _ in range(needed - 1):
            v, i = _read_uint(body, i)
            fields.append(v)
    for _ in range(count - needed):
        i = _skip(body, i, 1)
    if kind != MESSAGE and i != len(body):
        raise Malformed(f"{len(body) - i} bytes after the header of a frame that carries no payload")
    return kind, fields, i
