//! Frames: the length-delimited units on the wire, and their pure encoder and decoder.
//!
//! ```text
//! +----------------+-------------------------------------------+
//! | length: u32 BE | body: MessagePack header array [+ payload] |
//! +----------------+-------------------------------------------+
//! ```
//!
//! The body starts with a MessagePack array whose first element is the frame kind. Only
//! message frames carry a payload: the bytes after the header array, up to the end of the
//! body. `chatter-core/PROTOCOL.md` is the normative description.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::msgpack::{self, Reader};
use crate::error::ProtocolError;

/// The magic string in the hello frame.
pub const MAGIC: &str = "chatter";
/// The protocol version this crate speaks.
pub const VERSION: u64 = 1;
/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;
/// The largest hello body accepted: anything longer is not a chatter peer.
pub const MAX_HELLO: u32 = 256;

pub(crate) const KIND_HELLO: u64 = 0;
pub(crate) const KIND_MESSAGE: u64 = 1;
pub(crate) const KIND_PING: u64 = 2;
pub(crate) const KIND_PONG: u64 = 3;
pub(crate) const KIND_WINDOW: u64 = 4;
pub(crate) const KIND_CLOSE: u64 = 5;

/// Flag bit: the sender of this message owns (opened) the conversation.
pub const FLAG_OWNER: u8 = 0x01;
/// Flag bit: the sender passes the turn to the receiver.
pub const FLAG_TOKEN: u8 = 0x02;
/// Flag bit: this is the conversation's last message.
pub const FLAG_LAST: u8 = 0x04;
const FLAGS_KNOWN: u8 = FLAG_OWNER | FLAG_TOKEN | FLAG_LAST;

/// Close codes carried by a close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseCode {
    /// The application closed the connection.
    Normal,
    /// The sender detected a protocol violation by the receiver.
    ProtocolError,
    /// The sender stopped hearing from the receiver.
    KeepaliveTimeout,
    /// The sender is shutting down (a server closing its connections).
    GoingAway,
    /// A code this version does not know.
    Other(u64),
}

impl CloseCode {
    pub(crate) fn to_wire(self) -> u64 {
        match self {
            CloseCode::Normal => 0,
            CloseCode::ProtocolError => 1,
            CloseCode::KeepaliveTimeout => 2,
            CloseCode::GoingAway => 3,
            CloseCode::Other(c) => c,
        }
    }

    pub(crate) fn from_wire(c: u64) -> Self {
        match c {
            0 => CloseCode::Normal,
            1 => CloseCode::ProtocolError,
            2 => CloseCode::KeepaliveTimeout,
            3 => CloseCode::GoingAway,
            c => CloseCode::Other(c),
        }
    }
}

/// The first frame each side sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The largest frame body the sender accepts.
    pub max_frame_size: u32,
    /// How many bytes of message bodies the sender buffers before the receiver must wait.
    pub receive_window: u32,
}

/// The header of a message frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageHeader {
    /// The message id: 1 for the first message a side sends, then +1 per message.
    pub id: u64,
    /// The id of the conversation's first message.
    pub first: u64,
    /// `FLAG_*` bits.
    pub flags: u8,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// The handshake.
    Hello(Hello),
    /// A conversation message and its payload.
    Message(MessageHeader, Bytes),
    /// A keepalive probe.
    Ping,
    /// The answer to a ping.
    Pong,
    /// Flow-control credit: the receiver consumed this many more bytes.
    Window(u64),
    /// The sender is closing the connection.
    Close(CloseCode, String),
}

impl Frame {
    /// Decodes one frame body (without its length prefix).
    pub fn decode(body: Bytes) -> Result<Frame, ProtocolError> {
        let mut r = Reader::new(&body);
        let malformed = |e: String| ProtocolError::Malformed(e);
        let fields = r.array_len().map_err(malformed)?;
        if fields == 0 {
            return Err(ProtocolError::Malformed("empty frame header".into()));
        }
        let kind = r.uint().map_err(malformed)?;
        let needs = |n: u32, what: &str| {
            if fields < n {
                Err(ProtocolError::Malformed(format!(
                    "{what} frame has {fields} header fields, needs {n}"
                )))
            } else {
                Ok(())
            }
        };
        let (frame, used) = match kind {
            KIND_HELLO => {
                needs(5, "hello")?;
                let magic = r.str().map_err(malformed)?;
                if magic != MAGIC {
                    return Err(ProtocolError::NotChatter {
                        first_bytes: body.iter().take(16).copied().collect(),
                    });
                }
                let version = r.uint().map_err(malformed)?;
                if version != VERSION {
                    return Err(ProtocolError::UnsupportedVersion {
                        peer: version,
                        ours: VERSION,
                    });
                }
                let max_frame_size = r.uint().map_err(malformed)?;
                let receive_window = r.uint().map_err(malformed)?;
                let hello = Hello {
                    max_frame_size: u32::try_from(max_frame_size).unwrap_or(u32::MAX),
                    receive_window: u32::try_from(receive_window).unwrap_or(u32::MAX),
                };
                (Frame::Hello(hello), 5)
            }
            KIND_MESSAGE => {
                needs(4, "message")?;
                let id = r.uint().map_err(malformed)?;
                let first = r.uint().map_err(malformed)?;
                let flags = r.uint().map_err(malformed)?;
                if flags > u8::MAX as u64 || flags as u8 & !FLAGS_KNOWN != 0 {
                    return Err(ProtocolError::Malformed(format!(
                        "message flags 0x{flags:x} set unknown bits"
                    )));
                }
                for _ in 4..fields {
                    r.skip().map_err(malformed)?;
                }
                let payload = body.slice(r.position()..);
                return Ok(Frame::Message(
                    MessageHeader {
                        id,
                        first,
                        flags: flags as u8,
                    },
                    payload,
                ));
            }
            KIND_PING => (Frame::Ping, 1),
            KIND_PONG => (Frame::Pong, 1),
            KIND_WINDOW => {
                needs(2, "window")?;
                (Frame::Window(r.uint().map_err(malformed)?), 2)
            }
            KIND_CLOSE => {
                needs(3, "close")?;
                let code = CloseCode::from_wire(r.uint().map_err(malformed)?);
                let reason = r.str().map_err(malformed)?.to_string();
                (Frame::Close(code, reason), 3)
            }
            other => {
                return Err(ProtocolError::Malformed(format!(
                    "unknown frame kind {other}"
                )))
            }
        };
        // Later versions may append header fields; skip them, but nothing may follow.
        for _ in used..fields {
            r.skip().map_err(malformed)?;
        }
        if r.position() != body.len() {
            return Err(ProtocolError::Malformed(format!(
                "{} bytes after the header of a frame that carries no payload",
                body.len() - r.position()
            )));
        }
        Ok(frame)
    }

    /// Appends this frame, length prefix included, to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = begin(out);
        match self {
            Frame::Hello(h) => {
                msgpack::write_array_len(out, 5);
                msgpack::write_uint(out, KIND_HELLO);
                msgpack::write_str(out, MAGIC);
                msgpack::write_uint(out, VERSION);
                msgpack::write_uint(out, h.max_frame_size as u64);
                msgpack::write_uint(out, h.receive_window as u64);
            }
            Frame::Ping => {
                msgpack::write_array_len(out, 1);
                msgpack::write_uint(out, KIND_PING);
            }
            Frame::Pong => {
                msgpack::write_array_len(out, 1);
                msgpack::write_uint(out, KIND_PONG);
            }
            Frame::Window(n) => {
                msgpack::write_array_len(out, 2);
                msgpack::write_uint(out, KIND_WINDOW);
                msgpack::write_uint(out, *n);
            }
            Frame::Close(code, reason) => {
                msgpack::write_array_len(out, 3);
                msgpack::write_uint(out, KIND_CLOSE);
                msgpack::write_uint(out, code.to_wire());
                msgpack::write_str(out, reason);
            }
            Frame::Message(header, payload) => {
                out.truncate(start);
                return encode_message(out, *header, payload);
            }
        }
        finish(out, start);
    }
}

/// Encodes a message frame without building a [`Frame`] first.
pub(crate) fn encode_message(out: &mut BytesMut, header: MessageHeader, payload: &[u8]) {
    out.reserve(LENGTH_PREFIX + 24 + payload.len());
    let start = begin(out);
    msgpack::write_array_len(out, 4);
    msgpack::write_uint(out, KIND_MESSAGE);
    msgpack::write_uint(out, header.id);
    msgpack::write_uint(out, header.first);
    msgpack::write_uint(out, header.flags as u64);
    out.put_slice(payload);
    finish(out, start);
}

/// The body length of a message frame with this header and payload length.
pub(crate) fn message_body_len(header: MessageHeader, payload_len: usize) -> usize {
    fn uint_len(v: u64) -> usize {
        match v {
            0..=127 => 1,
            128..=0xff => 2,
            0x100..=0xffff => 3,
            0x1_0000..=0xffff_ffff => 5,
            _ => 9,
        }
    }
    2 + uint_len(header.id) + uint_len(header.first) + uint_len(header.flags as u64) + payload_len
}

fn begin(out: &mut BytesMut) -> usize {
    let start = out.len();
    out.put_u32(0);
    start
}

fn finish(out: &mut BytesMut, start: usize) {
    let len = (out.len() - start - LENGTH_PREFIX) as u32;
    out[start..start + LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
}

/// Splits the next complete frame body off `buf`.
///
/// Returns `Ok(None)` when more bytes are needed. A length above `max` is an error before
/// anything is allocated for it.
pub fn decode_frame(buf: &mut BytesMut, max: u32) -> Result<Option<Bytes>, ProtocolError> {
    if buf.len() < LENGTH_PREFIX {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len > max {
        return Err(ProtocolError::FrameTooLarge {
            size: len as u64,
            max,
        });
    }
    let total = LENGTH_PREFIX + len as usize;
    if buf.len() < total {
        // Make room for the rest of this frame in one go.
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    buf.advance(LENGTH_PREFIX);
    Ok(Some(buf.split_to(len as usize).freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(frame: &Frame) -> Vec<u8> {
        let mut out = BytesMut::new();
        frame.encode(&mut out);
        out.to_vec()
    }

    fn roundtrip(frame: Frame) {
        let mut buf = BytesMut::from(&encoded(&frame)[..]);
        let body = decode_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!(Frame::decode(body).unwrap(), frame);
    }

    #[test]
    fn every_frame_kind_roundtrips() {
        roundtrip(Frame::Hello(Hello {
            max_frame_size: 4 << 20,
            receive_window: 8 << 20,
        }));
        roundtrip(Frame::Message(
            MessageHeader {
                id: 300,
                first: 1,
                flags: FLAG_TOKEN | FLAG_LAST,
            },
            Bytes::from_static(b"\x93\x01\x02\x03"),
        ));
        roundtrip(Frame::Ping);
        roundtrip(Frame::Pong);
        roundtrip(Frame::Window(65536));
        roundtrip(Frame::Close(CloseCode::GoingAway, "server closing".into()));
    }

    #[test]
    fn hello_bytes_match_the_protocol_document() {
        let hello = Frame::Hello(Hello {
            max_frame_size: 4 * 1024 * 1024,
            receive_window: 8 * 1024 * 1024,
        });
        let hex: Vec<String> = encoded(&hello).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex.join(" "),
            "00 00 00 15 95 00 a7 63 68 61 74 74 65 72 01 ce 00 40 00 00 ce 00 80 00 00"
        );
    }

    #[test]
    fn message_bytes_match_the_protocol_document() {
        // A one-shot message (id 1, owner, token, last) whose payload is the MessagePack
        // encoding of the string "hi".
        let msg = Frame::Message(
            MessageHeader {
                id: 1,
                first: 1,
                flags: FLAG_OWNER | FLAG_TOKEN | FLAG_LAST,
            },
            Bytes::from_static(b"\xa2hi"),
        );
        assert_eq!(
            encoded(&msg),
            [0, 0, 0, 8, 0x94, 0x01, 0x01, 0x01, 0x07, 0xa2, b'h', b'i']
        );
    }

    #[test]
    fn body_length_prediction_matches_encoding() {
        for (id, first) in [(1, 1), (200, 3), (70_000, 70_000), (u64::MAX, 5)] {
            let header = MessageHeader {
                id,
                first,
                flags: FLAG_OWNER,
            };
            let mut out = BytesMut::new();
            encode_message(&mut out, header, b"abc");
            assert_eq!(out.len() - LENGTH_PREFIX, message_body_len(header, 3));
        }
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let bytes = encoded(&Frame::Window(7));
        let mut buf = BytesMut::new();
        for (i, b) in bytes.iter().enumerate() {
            assert_eq!(decode_frame(&mut buf, 100).unwrap(), None, "byte {i}");
            buf.put_u8(*b);
        }
        assert!(decode_frame(&mut buf, 100).unwrap().is_some());
    }

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1, 2][..]);
        let err = decode_frame(&mut buf, 1024).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::FrameTooLarge {
                size: u32::MAX as u64,
                max: 1024
            }
        );
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        let cases: &[&[u8]] = &[
            b"",
            b"\x90",
            b"\x91\x09",
            b"\x92\x04",
            b"\x93\x01\x01",
            b"\x94\x01\x01\x01\x08",
            b"\x91\x02extra",
            b"\x93\x05\x00\xcc",
            b"\xc1",
            b"\x95\x00\xa3abc\x01\x00\x00",
        ];
        for case in cases {
            let res = Frame::decode(Bytes::copy_from_slice(case));
            assert!(res.is_err(), "{case:02x?} decoded as {res:?}");
        }
    }

    #[test]
    fn newer_peers_may_append_header_fields() {
        // A ping with an extra map field, and a message with an extra string field.
        assert_eq!(
            Frame::decode(Bytes::from_static(b"\x92\x02\x81\xa1k\x01")).unwrap(),
            Frame::Ping
        );
        let f = Frame::decode(Bytes::from_static(b"\x95\x01\x02\x01\x00\xa1xPAY")).unwrap();
        assert_eq!(
            f,
            Frame::Message(
                MessageHeader {
                    id: 2,
                    first: 1,
                    flags: 0
                },
                Bytes::from_static(b"PAY")
            )
        );
    }
}
