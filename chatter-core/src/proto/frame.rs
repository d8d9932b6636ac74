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

use crate::error::ProtocolError;
use chatter_msgpack::{self as msgpack, DecodeError, Reader};

/// The magic string in the hello frame.
pub const MAGIC: &str = "chatter";
/// The protocol version this crate speaks.
pub const VERSION: u64 = 1;
/// Bytes of the length prefix.
pub const LENGTH_PREFIX: usize = 4;
/// The largest hello body accepted: anything longer is not a chatter peer.
pub const MAX_HELLO: u32 = 256;

/// How deeply unknown header fields that later versions may append can nest: skipping them
/// refuses anything deeper.
const HEADER_MAX_DEPTH: u16 = 16;

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
    /// The sender has no room for this connection now (a server at its connection limit);
    /// trying again later may succeed.
    Busy,
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
            CloseCode::Busy => 4,
            CloseCode::Other(c) => c,
        }
    }

    pub(crate) fn from_wire(c: u64) -> Self {
        match c {
            0 => CloseCode::Normal,
            1 => CloseCode::ProtocolError,
            2 => CloseCode::KeepaliveTimeout,
            3 => CloseCode::GoingAway,
            4 => CloseCode::Busy,
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

/// A frame decoded from a slice ([`Frame::decode_parts`]).
enum Parts {
    /// Any frame but a message.
    Whole(Frame),
    /// A message's header, and where its payload starts in the body.
    Message(MessageHeader, usize),
}

impl Frame {
    /// Decodes one frame body (without its length prefix).
    pub fn decode(body: Bytes) -> Result<Frame, ProtocolError> {
        Ok(match Frame::decode_parts(&body)? {
            Parts::Whole(frame) => frame,
            Parts::Message(header, at) => Frame::Message(header, body.slice(at..)),
        })
    }

    /// Decodes one frame body from a slice: every frame but a message's payload, which is
    /// left where it starts in `body` (so that only a message needs the body as `Bytes`).
    fn decode_parts(body: &[u8]) -> Result<Parts, ProtocolError> {
        let mut r = Reader::new(body);
        let malformed = |e: DecodeError| ProtocolError::Malformed(e.to_string());
        let fields = r.read_array_len().map_err(malformed)?;
        if fields == 0 {
            return Err(ProtocolError::Malformed("empty frame header".into()));
        }
        let kind = r.read_uint().map_err(malformed)?;
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
                // The magic and the version first: a later version may change or drop the
                // fields after them (PROTOCOL.md §4), and is told so by its version.
                needs(3, "hello")?;
                let magic = r.read_str().map_err(malformed)?;
                if magic != MAGIC {
                    return Err(ProtocolError::NotChatter {
                        first_bytes: body.iter().take(16).copied().collect(),
                    });
                }
                let version = r.read_uint().map_err(malformed)?;
                if version != VERSION {
                    return Err(ProtocolError::UnsupportedVersion {
                        peer: version,
                        ours: VERSION,
                    });
                }
                needs(5, "hello")?;
                let max_frame_size = r.read_uint().map_err(malformed)?;
                let receive_window = r.read_uint().map_err(malformed)?;
                let hello = Hello {
                    max_frame_size: u32::try_from(max_frame_size).unwrap_or(u32::MAX),
                    receive_window: u32::try_from(receive_window).unwrap_or(u32::MAX),
                };
                (Frame::Hello(hello), 5)
            }
            KIND_MESSAGE => {
                needs(4, "message")?;
                let id = r.read_uint().map_err(malformed)?;
                let first = r.read_uint().map_err(malformed)?;
                let flags = r.read_uint().map_err(malformed)?;
                if flags > u8::MAX as u64 || flags as u8 & !FLAGS_KNOWN != 0 {
                    return Err(ProtocolError::Malformed(format!(
                        "message flags 0x{flags:x} set unknown bits"
                    )));
                }
                for _ in 4..fields {
                    r.skip_value(HEADER_MAX_DEPTH).map_err(malformed)?;
                }
                return Ok(Parts::Message(
                    MessageHeader {
                        id,
                        first,
                        flags: flags as u8,
                    },
                    r.position(),
                ));
            }
            KIND_PING => (Frame::Ping, 1),
            KIND_PONG => (Frame::Pong, 1),
            KIND_WINDOW => {
                needs(2, "window")?;
                (Frame::Window(r.read_uint().map_err(malformed)?), 2)
            }
            KIND_CLOSE => {
                needs(3, "close")?;
                let code = CloseCode::from_wire(r.read_uint().map_err(malformed)?);
                let reason = r.read_str().map_err(malformed)?.to_string();
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
            r.skip_value(HEADER_MAX_DEPTH).map_err(malformed)?;
        }
        if r.position() != body.len() {
            return Err(ProtocolError::Malformed(format!(
                "{} bytes after the header of a frame that carries no payload",
                body.len() - r.position()
            )));
        }
        Ok(Parts::Whole(frame))
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
    MessageHead::new(header, payload.len()).append(out, payload);
}

/// The length prefix and header of a message frame, assembled on the stack with plain
/// stores (this runs once per message): the sender learns the frame's size from it before
/// deciding to queue the frame, without encoding the header twice.
pub(crate) struct MessageHead {
    bytes: [u8; HEAD_ROOM],
    len: usize,
}

/// Room for the length prefix and the largest plain message header.
const HEAD_ROOM: usize = LENGTH_PREFIX + 2 + 3 * msgpack::MAX_UINT_LEN;

impl MessageHead {
    #[inline]
    pub(crate) fn new(header: MessageHeader, payload_len: usize) -> Self {
        let mut bytes = [0u8; HEAD_ROOM];
        bytes[LENGTH_PREFIX] = 0x94; // fixarray of 4
        bytes[LENGTH_PREFIX + 1] = KIND_MESSAGE as u8;
        let mut at = LENGTH_PREFIX + 2;
        at = msgpack::write_uint_at(&mut bytes, at, header.id);
        at = msgpack::write_uint_at(&mut bytes, at, header.first);
        at = msgpack::write_uint_at(&mut bytes, at, header.flags as u64);
        let body_len = (at - LENGTH_PREFIX + payload_len) as u32;
        bytes[..LENGTH_PREFIX].copy_from_slice(&body_len.to_be_bytes());
        MessageHead { bytes, len: at }
    }

    /// The frame's body length with a payload of `payload_len` bytes.
    #[inline]
    pub(crate) fn body_len(&self, payload_len: usize) -> usize {
        self.len - LENGTH_PREFIX + payload_len
    }

    /// Appends the frame to `out`; `payload` must be as long as announced to [`Self::new`].
    #[inline]
    pub(crate) fn append(&self, out: &mut BytesMut, payload: &[u8]) {
        out.reserve(HEAD_ROOM + payload.len());
        // Copying the whole array (a fixed size: a few moves) and cutting it back is cheaper
        // than a copy of a variable length (a call to memcpy).
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        out.truncate(start + self.len);
        out.extend_from_slice(payload);
    }
}

/// The length of the run of complete frames at the front of `buf` that start like message
/// frames with a plain header (a fixarray of 4, kind 1: what every encoder writes) and are
/// at most `max` bytes: the common case, which the receiver splits off in one go and
/// decodes with [`plain_header`] (or, for a frame of the run whose header turns out not to
/// be plain, [`Frame::decode`]). Anything after the run (an incomplete frame, another
/// kind, a frame above `max`) is left to [`take_frame`], errors
/// included.
pub(crate) fn plain_messages_end(buf: &[u8], max: u32) -> usize {
    let mut end = 0;
    while let Some(prefix) = buf
        .get(end..)
        .and_then(|b| b.first_chunk::<LENGTH_PREFIX>())
    {
        let len = u32::from_be_bytes(*prefix);
        if len > max {
            break;
        }
        let next = end + LENGTH_PREFIX + len as usize;
        match buf.get(end + LENGTH_PREFIX..next) {
            Some([0x94, kind, ..]) if *kind == KIND_MESSAGE as u8 => end = next,
            _ => break,
        }
    }
    end
}

/// Decodes the header of a message frame body when it is plain (`[1, id, first, flags]` as
/// a fixarray, known flags only): the header and its length, where the payload starts.
/// `None` for anything else, which [`Frame::decode`] then handles, errors included.
#[inline]
pub(crate) fn plain_header(body: &[u8]) -> Option<(MessageHeader, usize)> {
    if body.get(..2)? != [0x94, KIND_MESSAGE as u8] {
        return None;
    }
    let mut r = Reader::new(&body[2..]);
    let id = r.read_uint().ok()?;
    let first = r.read_uint().ok()?;
    let flags = r.read_uint().ok()?;
    let at = 2 + r.position();
    if flags > u8::MAX as u64 || flags as u8 & !FLAGS_KNOWN != 0 {
        return None;
    }
    let header = MessageHeader {
        id,
        first,
        flags: flags as u8,
    };
    Some((header, at))
}

/// Splits the next frame off `buf` when it is a complete plain message frame of at most
/// `max` bytes (as the receiver's fast path decodes it): the header, the payload and the
/// body length. `None`, consuming nothing, for anything else.
#[cfg(test)]
pub(crate) fn split_plain_message(
    buf: &mut BytesMut,
    max: u32,
) -> Option<(MessageHeader, Bytes, usize)> {
    let prefix = buf.get(..LENGTH_PREFIX)?;
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if plain_messages_end(buf, max) < LENGTH_PREFIX + len {
        return None;
    }
    let (header, head_len) = plain_header(&buf[LENGTH_PREFIX..LENGTH_PREFIX + len])?;
    let mut payload = buf.split_to(LENGTH_PREFIX + len).freeze();
    payload.advance(LENGTH_PREFIX + head_len);
    Some((header, payload, len))
}

/// The body length of a message frame with this header and payload length.
#[cfg(test)]
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

/// Decodes the next complete frame in `buf` and consumes it; returns it with its body's
/// length.
///
/// Returns `Ok(None)` when more bytes are needed. A length above `max` is an error before
/// anything is allocated for it. On an error `buf` is left as it was. Only a message's
/// body is split off `buf` (its payload is a slice of it); any other frame is decoded in
/// place, so that the handshake's hellos and a close frame cost no allocation of a shared
/// buffer (the split would make one).
pub fn take_frame(buf: &mut BytesMut, max: u32) -> Result<Option<(Frame, usize)>, ProtocolError> {
    let Some(len) = complete_frame_len(buf, max)? else {
        return Ok(None);
    };
    let total = LENGTH_PREFIX + len;
    Ok(Some(
        match Frame::decode_parts(&buf[LENGTH_PREFIX..total])? {
            Parts::Whole(frame) => {
                buf.advance(total);
                (frame, len)
            }
            Parts::Message(header, at) => {
                buf.advance(LENGTH_PREFIX);
                let body = buf.split_to(len).freeze();
                (Frame::Message(header, body.slice(at..)), len)
            }
        },
    ))
}

/// The body length of the complete frame at the start of `buf`, `None` if it is not all
/// there yet; an error for a length above `max`.
fn complete_frame_len(buf: &[u8], max: u32) -> Result<Option<usize>, ProtocolError> {
    let Some(prefix) = buf.first_chunk::<LENGTH_PREFIX>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*prefix);
    if len > max {
        return Err(ProtocolError::FrameTooLarge {
            size: len as u64,
            max,
        });
    }
    // Nothing is reserved for the rest: the buffer grows as bytes arrive (a peer that
    // announces a large frame and sends it slowly holds only what it sent).
    Ok((buf.len() >= LENGTH_PREFIX + len as usize).then_some(len as usize))
}

/// Splits the next complete frame body off `buf`.
///
/// Returns `Ok(None)` when more bytes are needed. A length above `max` is an error before
/// anything is allocated for it.
pub fn decode_frame(buf: &mut BytesMut, max: u32) -> Result<Option<Bytes>, ProtocolError> {
    let Some(len) = complete_frame_len(buf, max)? else {
        return Ok(None);
    };
    buf.advance(LENGTH_PREFIX);
    Ok(Some(buf.split_to(len).freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(frame: &Frame) -> Vec<u8> {
        let mut out = BytesMut::new();
        frame.encode(&mut out);
        out.to_vec()
    }

    #[test]
    fn take_frame_decodes_in_place_and_splits_off_only_a_message() {
        let hello = Frame::Hello(Hello {
            max_frame_size: 1 << 20,
            receive_window: 1 << 16,
        });
        let message = Frame::Message(
            MessageHeader {
                id: 7,
                first: 7,
                flags: 0,
            },
            Bytes::from_static(b"payload"),
        );
        let close = Frame::Close(CloseCode::Normal, "bye".into());
        let mut input = encoded(&hello);
        input.extend(encoded(&message));
        input.extend(encoded(&close));
        input.extend(&[0, 0, 0, 9, 0x93]); // the start of a frame still arriving
        let mut buf = BytesMut::from(&input[..]);
        let total = buf.len();

        let (frame, len) = take_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(frame, hello);
        assert_eq!(len + LENGTH_PREFIX, encoded(&hello).len());
        assert_eq!(buf.len(), total - encoded(&hello).len());

        let (frame, _) = take_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(frame, message);
        let (frame, _) = take_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(frame, close);
        assert_eq!(take_frame(&mut buf, 1 << 20).unwrap(), None);
        assert_eq!(&buf[..], &[0, 0, 0, 9, 0x93]);

        // An error leaves the input where it was, for the caller's error text.
        let mut bad = BytesMut::from(&[0, 0, 0, 3, 0x93, 0, 0xa1][..]);
        assert!(take_frame(&mut bad, 1 << 20).is_err());
        assert_eq!(bad.len(), 7);
        let mut large = BytesMut::from(&b"GET / HTTP/1.1"[..]);
        assert!(matches!(
            take_frame(&mut large, 1024),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        assert_eq!(large.len(), 14);
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
    fn plain_messages_split_like_the_general_decoder() {
        let mut all = BytesMut::new();
        for (id, first, flags) in [(1, 1, 7), (200, 3, 1), (70_000, 300, 2), (u64::MAX, 5, 0)] {
            let header = MessageHeader { id, first, flags };
            encode_message(&mut all, header, b"payload");
        }
        let mut general = all.clone();
        while !all.is_empty() {
            let (header, payload, body_len) = split_plain_message(&mut all, 1 << 20).unwrap();
            let body = decode_frame(&mut general, 1 << 20).unwrap().unwrap();
            assert_eq!(body.len(), body_len);
            assert_eq!(
                Frame::decode(body).unwrap(),
                Frame::Message(header, payload)
            );
        }
        assert!(general.is_empty());
    }

    #[test]
    fn anything_but_a_complete_plain_message_is_left_to_the_general_decoder() {
        let mut message = BytesMut::new();
        let header = MessageHeader {
            id: 1,
            first: 1,
            flags: 0,
        };
        encode_message(&mut message, header, b"abc");
        let cases: Vec<Vec<u8>> = vec![
            message[..message.len() - 1].to_vec(), // incomplete
            encoded(&Frame::Ping),                 // another kind
            b"\x00\x00\x00\x08\x95\x01\x02\x01\x00\xa1xP".to_vec(), // extension field
            b"\x00\x00\x00\x05\x94\x01\x01\x01\x08".to_vec(), // unknown flag
            b"\x00\x00\x00\x05\x94\x01\x01\xd0\x00".to_vec(), // signed int
            b"\x00\x00\x00\x04\x94\x01\x01\xcd".to_vec(), // truncated uint
            b"\x00\x00\x00\x00".to_vec(),          // empty body
        ];
        for case in cases {
            let mut buf = BytesMut::from(&case[..]);
            assert!(
                split_plain_message(&mut buf, 1 << 20).is_none(),
                "{case:02x?}"
            );
            assert_eq!(&buf[..], &case[..], "consumed nothing");
        }
        let mut big = message.clone();
        assert!(split_plain_message(&mut big, 4).is_none(), "above max");
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
/// Every hex example in `chatter-core/PROTOCOL.md`, checked against the real encoder (and,
/// for the decoding examples and the complete exchange, the real decoder and state machine).
/// Each expected string must also appear verbatim in the document, so neither can drift.
#[cfg(test)]
mod protocol_doc_examples {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::error::CloseCause;
    use crate::proto::{Config, Event, Protocol, SendArgs, MESSAGE_OVERHEAD};

    const DOC: &str = include_str!("../../PROTOCOL.md");

    fn hex(bytes: &[u8]) -> String {
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        hex.join(" ")
    }

    fn unhex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    fn in_doc(text: &str) {
        assert!(DOC.contains(text), "PROTOCOL.md does not contain {text:?}");
    }

    /// Encodes `frame`, compares with `expected` and checks the document shows it.
    fn check(frame: Frame, expected: &str) {
        let mut out = BytesMut::new();
        frame.encode(&mut out);
        assert_eq!(hex(&out), expected, "encoding of {frame:?}");
        in_doc(expected);
        // The documented bytes decode back to the same frame.
        let mut buf = BytesMut::from(&out[..]);
        let body = decode_frame(&mut buf, u32::MAX).unwrap().unwrap();
        assert!(buf.is_empty());
        if let Frame::Message(header, payload) = &frame {
            assert_eq!(message_body_len(*header, payload.len()), body.len());
        }
        assert_eq!(Frame::decode(body).unwrap(), frame);
    }

    fn message(id: u64, first: u64, flags: u8, payload: &'static [u8]) -> Frame {
        Frame::Message(
            MessageHeader { id, first, flags },
            Bytes::from_static(payload),
        )
    }

    /// Splits a byte stream into hex strings, one per frame (length prefix included).
    fn frames(bytes: &[u8]) -> Vec<String> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while !buf.is_empty() {
            let body = decode_frame(&mut buf, u32::MAX).unwrap().unwrap();
            let mut frame = (body.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(&body);
            out.push(hex(&frame));
        }
        out
    }

    const HELLO: &str =
        "00 00 00 15 95 00 a7 63 68 61 74 74 65 72 01 ce 00 40 00 00 ce 00 80 00 00";

    #[test]
    fn early_message_behind_the_hello() {
        let now = Instant::now();
        let mut client = Protocol::new(Config::default(), now);
        let args = SendArgs {
            last: false,
            ..SendArgs::new()
        };
        client.send(now, args, b"\xa2hi").unwrap();
        let mut out = BytesMut::new();
        client.take_output(&mut out);
        let frames = frames(&out);
        assert_eq!(frames, [HELLO, "00 00 00 08 94 01 01 01 03 a2 68 69"]);
        in_doc(&frames.join("\n"));
    }

    #[test]
    fn hello_with_default_settings() {
        let defaults = Config::default();
        check(
            Frame::Hello(Hello {
                max_frame_size: defaults.max_frame_size,
                receive_window: defaults.receive_window,
            }),
            HELLO,
        );
        assert_eq!(
            (defaults.max_frame_size, defaults.receive_window),
            (4 << 20, 8 << 20)
        );
    }

    #[test]
    fn one_shot_message() {
        check(
            message(1, 1, FLAG_OWNER | FLAG_TOKEN | FLAG_LAST, b"\xa2hi"),
            "00 00 00 08 94 01 01 01 07 a2 68 69",
        );
    }

    #[test]
    fn request_and_reply() {
        check(
            message(130, 130, FLAG_OWNER | FLAG_TOKEN, b"\x92\xa4echo\xa2hi"),
            "00 00 00 10 94 01 cc 82 cc 82 03 92 a4 65 63 68 6f a2 68 69",
        );
        check(
            message(300, 130, FLAG_TOKEN | FLAG_LAST, b"\xa2hi"),
            "00 00 00 0b 94 01 cd 01 2c cc 82 06 a2 68 69",
        );
    }

    #[test]
    fn longer_conversation_table() {
        check(
            message(4, 4, FLAG_OWNER, b"\x01"),
            "00 00 00 06 94 01 04 04 01 01",
        );
        check(
            message(5, 4, FLAG_OWNER | FLAG_TOKEN, b"\x02"),
            "00 00 00 06 94 01 05 04 03 02",
        );
        check(message(2, 4, 0, b"\x03"), "00 00 00 06 94 01 02 04 00 03");
        check(
            message(3, 4, FLAG_TOKEN, b"\x04"),
            "00 00 00 06 94 01 03 04 02 04",
        );
        check(
            message(6, 4, FLAG_OWNER | FLAG_LAST, b"\xc0"),
            "00 00 00 06 94 01 06 04 05 c0",
        );
    }

    #[test]
    fn longer_conversation_is_accepted_by_the_state_machine() {
        let now = Instant::now();
        let (mut a, mut b) = connected_pair(now);
        let mut wire = BytesMut::new();
        // A has sent three messages before, B one.
        for _ in 0..3 {
            a.send(now, SendArgs::new(), b"\xc0").unwrap();
        }
        b.send(now, SendArgs::new(), b"\xc0").unwrap();
        deliver(&mut a, &mut b, now);
        deliver(&mut b, &mut a, now);
        drain_events(&mut a);
        drain_events(&mut b);

        let keep = |conversation| SendArgs {
            conversation,
            last: false,
            token: false,
            timeout: None,
        };
        let conv = a.send(now, keep(None), b"\x01").unwrap();
        let pass = SendArgs {
            token: true,
            ..keep(Some(conv))
        };
        a.send(now, pass, b"\x02").unwrap();
        a.take_output(&mut wire);
        assert_eq!(
            frames(&wire),
            [
                "00 00 00 06 94 01 04 04 01 01",
                "00 00 00 06 94 01 05 04 03 02"
            ]
        );
        b.handle_input(now, &mut wire);
        let received = drain_events(&mut b);
        let Event::Message(m) = &received[0] else {
            panic!("{received:?}")
        };
        assert!(m.first && !m.token && !m.last);
        let theirs = m.conversation;
        b.send(now, keep(Some(theirs)), b"\x03").unwrap();
        let pass = SendArgs {
            token: true,
            ..keep(Some(theirs))
        };
        b.send(now, pass, b"\x04").unwrap();
        b.take_output(&mut wire);
        let sent = frames(&wire);
        // Window frames may come first (credit returned as b's application consumed).
        let messages: Vec<&String> = sent
            .iter()
            .filter(|f| !f.starts_with("00 00 00 03 92 04"))
            .collect();
        assert_eq!(
            messages,
            [
                "00 00 00 06 94 01 02 04 00 03",
                "00 00 00 06 94 01 03 04 02 04"
            ]
        );
        a.handle_input(now, &mut wire);
        drain_events(&mut a);
        let last = SendArgs {
            last: true,
            ..keep(Some(conv))
        };
        a.send(now, last, b"\xc0").unwrap();
        a.take_output(&mut wire);
        assert_eq!(
            frames(&wire).last().unwrap(),
            "00 00 00 06 94 01 06 04 05 c0"
        );
        b.handle_input(now, &mut wire);
        let received = drain_events(&mut b);
        assert!(
            matches!(received.last(), Some(Event::Message(m)) if m.last),
            "{received:?}"
        );
        assert!(a.is_open() && b.is_open());
    }

    #[test]
    fn ping_and_pong() {
        check(Frame::Ping, "00 00 00 02 91 02");
        check(Frame::Pong, "00 00 00 02 91 03");
    }

    #[test]
    fn window() {
        check(Frame::Window(12), "00 00 00 03 92 04 0c");
        check(Frame::Window(2 << 20), "00 00 00 07 92 04 ce 00 20 00 00");
        // A quarter of the default window is the threshold for sending window frames.
        assert_eq!(Config::default().receive_window / 4, 2 << 20);
    }

    #[test]
    fn close() {
        check(
            Frame::Close(CloseCode::GoingAway, "server closing".into()),
            "00 00 00 12 93 05 03 ae 73 65 72 76 65 72 20 63 6c 6f 73 69 6e 67",
        );
        let reason = ProtocolError::BadMessageId {
            got: 3,
            expected: 2,
        }
        .to_string();
        assert_eq!(reason, "message id 3 where 2 was expected");
        in_doc(&reason);
        check(
            Frame::Close(CloseCode::ProtocolError, reason),
            "00 00 00 26 93 05 01 d9 21 6d 65 73 73 61 67 65 20 69 64 20 33 20 77 68 65 72 65 \
             20 32 20 77 61 73 20 65 78 70 65 63 74 65 64",
        );
        check(
            Frame::Close(CloseCode::Normal, "closed by peer application".into()),
            "00 00 00 1e 93 05 00 ba 63 6c 6f 73 65 64 20 62 79 20 70 65 65 72 20 61 70 70 6c \
             69 63 61 74 69 6f 6e",
        );
    }

    #[test]
    fn decoder_examples() {
        let one_shot = message(1, 1, FLAG_OWNER | FLAG_TOKEN | FLAG_LAST, b"\xa2hi");
        let accepted = [
            (
                "94 01 cf 00 00 00 00 00 00 00 01 cc 01 cd 00 07 a2 68 69",
                one_shot.clone(),
            ),
            ("95 01 01 01 07 a3 66 6f 6f a2 68 69", one_shot),
            ("92 02 c0", Frame::Ping),
            ("dc 00 01 02", Frame::Ping),
        ];
        for (body, frame) in accepted {
            in_doc(&format!("| `{body}` |"));
            assert_eq!(
                Frame::decode(Bytes::from(unhex(body))).unwrap(),
                frame,
                "{body}"
            );
        }
        let rejected = [
            ("91 02 00", "1 bytes after the header"),
            ("94 01 01 01 08", "message flags 0x8 set unknown bits"),
            (
                "94 01 d0 01 01 07",
                "expected an unsigned integer, found a signed integer (marker 0xd0)",
            ),
            ("91 06", "unknown frame kind 6"),
        ];
        for (body, message) in rejected {
            in_doc(&format!("| `{body}` |"));
            let err = Frame::decode(Bytes::from(unhex(body))).unwrap_err();
            assert!(err.to_string().contains(message), "{body}: {err}");
        }
        in_doc("expected an unsigned integer, found a signed integer (marker 0xd0)");
        in_doc("message flags 0x8 set unknown bits");
        // A non-canonical encoding costs its real length (§8.1): the doc's figure is that
        // body's length + 64, and the canonical encoding of the same message is shorter.
        let wide = unhex("94 01 cf 00 00 00 00 00 00 00 01 cc 01 cd 00 07 a2 68 69");
        in_doc(&format!("{} + 64 = {}", wide.len(), wide.len() + 64));
        let canonical = MessageHeader {
            id: 1,
            first: 1,
            flags: 7,
        };
        assert_eq!(message_body_len(canonical, 3), 8);
        in_doc(&format!("not the {} of the canonical encoding", 8 + 64));
    }

    #[test]
    fn http_request_is_not_chatter() {
        in_doc("`47 45 54 20`");
        in_doc("1 195 725 856");
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert_eq!(
            decode_frame(&mut buf, MAX_HELLO).unwrap_err(),
            ProtocolError::FrameTooLarge {
                size: 1_195_725_856,
                max: 256
            }
        );
        // Through the state machine: reported as "does not speak chatter", closed with code 1.
        let now = Instant::now();
        let mut p = Protocol::accepting(Config::default(), now);
        let mut out = BytesMut::new();
        p.take_output(&mut out);
        assert!(
            out.is_empty(),
            "a server says nothing before the client's hello"
        );
        p.handle_input(now, &mut BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]));
        let events = drain_events(&mut p);
        let Some(Event::Closed(CloseCause::Protocol(e))) = events.last() else {
            panic!("{events:?}")
        };
        assert!(e
            .to_string()
            .starts_with("peer does not speak chatter (first bytes: 47 45 54 20"));
        out.clear();
        p.take_output(&mut out);
        let mut buf = out.clone();
        let body = decode_frame(&mut buf, u32::MAX).unwrap().unwrap();
        assert!(matches!(
            Frame::decode(body).unwrap(),
            Frame::Close(CloseCode::ProtocolError, _)
        ));
    }

    fn drain_events(p: &mut Protocol) -> Vec<Event> {
        std::iter::from_fn(|| p.poll_event()).collect()
    }

    fn deliver(from: &mut Protocol, to: &mut Protocol, now: Instant) {
        let mut wire = BytesMut::new();
        from.take_output(&mut wire);
        to.handle_input(now, &mut wire);
        assert!(wire.is_empty());
    }

    fn connected_pair(now: Instant) -> (Protocol, Protocol) {
        let mut a = Protocol::new(Config::default(), now);
        let mut b = Protocol::accepting(Config::default(), now);
        deliver(&mut a, &mut b, now);
        deliver(&mut b, &mut a, now);
        assert!(matches!(drain_events(&mut a)[..], [Event::Connected(_)]));
        assert!(matches!(drain_events(&mut b)[..], [Event::Connected(_)]));
        (a, b)
    }

    /// §13, replayed with two state machines: every frame each side writes is the one
    /// documented, in the documented order.
    #[test]
    fn complete_exchange() {
        const REQUEST: &str = "00 00 00 0c 94 01 01 01 03 93 a3 61 64 64 02 03";
        const REPLY: &str = "00 00 00 06 94 01 01 01 06 05";
        const CLOSE: &str = "00 00 00 1e 93 05 00 ba 63 6c 6f 73 65 64 20 62 79 20 70 65 65 \
                             72 20 61 70 70 6c 69 63 61 74 69 6f 6e";
        let lines = [
            ("C → S", HELLO),
            ("S → C", HELLO),
            ("C → S", REQUEST),
            ("S → C", REPLY),
            ("C → S", CLOSE),
        ];
        let listing: Vec<String> = lines.iter().map(|(d, f)| format!("{d}  {f}")).collect();
        in_doc(&format!("```text\n{}\n```", listing.join("\n")));

        let now = Instant::now();
        let mut c = Protocol::new(Config::default(), now);
        let mut s = Protocol::accepting(Config::default(), now);
        let (mut to_s, mut to_c) = (BytesMut::new(), BytesMut::new());

        // 1. Hellos: C's at once; S says nothing until it has C's, then answers.
        c.take_output(&mut to_s);
        s.take_output(&mut to_c);
        assert_eq!(frames(&to_s), [HELLO]);
        assert!(to_c.is_empty(), "the server spoke first");
        s.handle_input(now, &mut to_s);
        assert!(matches!(drain_events(&mut s)[..], [Event::Connected(_)]));
        s.take_output(&mut to_c);
        assert_eq!(frames(&to_c), [HELLO]);
        c.handle_input(now, &mut to_c);
        assert!(matches!(drain_events(&mut c)[..], [Event::Connected(_)]));

        // 2. The request, with a local 5 s timeout.
        let request = SendArgs {
            conversation: None,
            last: false,
            token: true,
            timeout: Some(Duration::from_secs(5)),
        };
        let conv = c.send(now, request, b"\x93\xa3add\x02\x03").unwrap();
        assert!(conv.owner && conv.first == 1);
        c.take_output(&mut to_s);
        assert_eq!(frames(&to_s), [REQUEST]);
        s.handle_input(now, &mut to_s);
        let events = drain_events(&mut s);
        let [Event::Message(req)] = &events[..] else {
            panic!("{events:?}")
        };
        assert!(req.first && req.token && !req.last && req.cost == 12 + MESSAGE_OVERHEAD);
        assert!(!req.conversation.owner && req.conversation.first == 1);

        // 3. S's application takes the request and replies. 12 bytes of credit are far
        // below the threshold at which a window frame goes out.
        s.release(req.cost);
        let reply = SendArgs {
            conversation: Some(req.conversation),
            ..SendArgs::new()
        };
        s.send(now, reply, b"\x05").unwrap();
        s.take_output(&mut to_c);
        assert_eq!(frames(&to_c), [REPLY]);
        c.handle_input(now, &mut to_c);
        let events = drain_events(&mut c);
        let [Event::Message(rep)] = &events[..] else {
            panic!("{events:?}")
        };
        assert!(rep.last && rep.conversation == conv && rep.cost == 6 + MESSAGE_OVERHEAD);

        // The reply cancelled the 5 s timer.
        c.handle_timeout(now + Duration::from_secs(6));
        assert!(drain_events(&mut c).is_empty());

        // 4. C's application takes the reply, then closes.
        c.release(rep.cost);
        c.close(CloseCode::Normal, "closed by peer application");
        c.take_output(&mut to_s);
        assert_eq!(frames(&to_s), [CLOSE]);
        s.handle_input(now, &mut to_s);
        let events = drain_events(&mut s);
        let [Event::Closed(CloseCause::Peer { code, reason })] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!(*code, CloseCode::Normal);
        assert_eq!(reason, "closed by peer application");
        // No close frame is sent back.
        assert!(!s.has_output());
    }

    /// §13 with the request sent early (§4.1): the same frames, C's hello and request in
    /// one write, S's hello and reply in one write.
    #[test]
    fn complete_exchange_with_an_early_request() {
        const REQUEST: &str = "00 00 00 0c 94 01 01 01 03 93 a3 61 64 64 02 03";
        const REPLY: &str = "00 00 00 06 94 01 01 01 06 05";
        let now = Instant::now();
        let mut c = Protocol::new(Config::default(), now);
        let mut s = Protocol::accepting(Config::default(), now);
        let (mut to_s, mut to_c) = (BytesMut::new(), BytesMut::new());
        let request = SendArgs {
            last: false,
            ..SendArgs::new()
        };
        let conv = c.send(now, request, b"\x93\xa3add\x02\x03").unwrap();
        c.take_output(&mut to_s);
        assert_eq!(frames(&to_s), [HELLO, REQUEST]);
        s.handle_input(now, &mut to_s);
        let events = drain_events(&mut s);
        let [Event::Connected(_), Event::Message(req)] = &events[..] else {
            panic!("{events:?}")
        };
        s.release(req.cost);
        let reply = SendArgs {
            conversation: Some(req.conversation),
            ..SendArgs::new()
        };
        s.send(now, reply, b"\x05").unwrap();
        s.take_output(&mut to_c);
        assert_eq!(frames(&to_c), [HELLO, REPLY]);
        c.handle_input(now, &mut to_c);
        let events = drain_events(&mut c);
        let [Event::Connected(_), Event::Message(rep)] = &events[..] else {
            panic!("{events:?}")
        };
        assert!(rep.last && rep.conversation == conv);
    }
}
