//! The envelopes of streams (PROTOCOL.md, "Streams"), routed by `peer/streams.rs`.
//!
//! In the call's conversation, after the callee's `[0, nil]` (no `last`), and in an
//! argument stream's own conversation:
//!
//! | envelope | meaning |
//! |---|---|
//! | `[3, item]` | one item |
//! | `[4]` | the end (with `last`) |
//! | `[5, bytes]` | (callee → caller, in the call's conversation) credit for the argument stream |
//! | `[6]` | (callee → caller, in the call's conversation) the callee stopped reading the argument stream |
//!
//! Caller → callee, opening conversations:
//!
//! | envelope | meaning |
//! |---|---|
//! | `[12, object, method, deadline_ms, window, args]` | a call whose result is a stream; `window` is the caller's first grant |
//! | `[14, call]` | opens the argument stream of call `call` (flags `01`: the caller keeps the turn) |
//! | `[15, call, bytes]` | one-shot: more credit for the result stream of call `call` |

use std::time::Duration;

use chatter_msgpack::{self as msgpack, Reader};
use serde::Serialize;

use super::{bad, encode, header, millis, Payload, WireError};

pub(crate) const ITEM: u8 = 3;
pub(crate) const END: u8 = 4;
pub(crate) const GRANT: u8 = 5;
pub(crate) const STOP: u8 = 6;
pub(crate) const STREAM_CALL: u8 = 12;
/// A stream call with a context map after the window.
pub(crate) const STREAM_CALL_CTX: u8 = 13;
pub(crate) const OPEN_ARGUMENT: u8 = 14;
pub(crate) const GRANT_RESULT: u8 = 15;

/// A message of a stream, in the call's conversation or an argument stream's.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum StreamMsg<'a> {
    /// One item, as a MessagePack value.
    Item(&'a [u8]),
    End,
    Grant(u64),
    Stop,
}

/// `[3, item]`.
pub(crate) fn encode_item<T: Serialize + ?Sized>(item: &T) -> Result<Payload, WireError> {
    encode(|w| {
        header(w, 2, ITEM);
        super::value(w, item)
    })
}

/// `[4]`, `[6]`: the envelopes without fields.
pub(crate) fn encode_bare(kind: u8) -> Payload {
    debug_assert!(kind == END || kind == STOP);
    encode(|w| {
        header(w, 1, kind);
        Ok(())
    })
    .unwrap_or_else(|_| unreachable!("writing two bytes cannot fail"))
}

/// `[5, bytes]`.
pub(crate) fn encode_grant(bytes: u64) -> Payload {
    encode(|w| {
        header(w, 2, GRANT);
        msgpack::write_uint(w, bytes);
        Ok(())
    })
    .unwrap_or_else(|_| unreachable!("writing integers cannot fail"))
}

/// Decodes a stream message. An item must be exactly one value; anything after it, an
/// unknown kind or a wrong element count is an error.
pub(crate) fn decode_stream_msg(payload: &[u8]) -> Result<StreamMsg<'_>, WireError> {
    let mut r = Reader::new(payload);
    let len = r.read_array_len().map_err(|e| bad("stream message", e))?;
    let kind: u8 = r.read_int().map_err(|e| bad("stream message kind", e))?;
    let msg = match (kind, len) {
        (ITEM, 2) => {
            let rest = r.remaining();
            let mut item = Reader::new(rest);
            item.skip_value(msgpack::MAX_DEPTH - 1)
                .map_err(|e| bad("stream item", e))?;
            let used = rest.len() - item.remaining().len();
            r = item;
            StreamMsg::Item(&rest[..used])
        }
        (END, 1) => StreamMsg::End,
        (GRANT, 2) => StreamMsg::Grant(r.read_int().map_err(|e| bad("grant", e))?),
        (STOP, 1) => StreamMsg::Stop,
        (kind, len) => {
            return Err(WireError(format!(
                "unknown stream message kind {kind} with {len} elements"
            )))
        }
    };
    r.finish().map_err(|e| bad("stream message", e))?;
    Ok(msg)
}

/// A call whose result is a stream: `[12, object, method, deadline_ms, window, args]`.
/// With a context map (`context`, as the per-call context of kinds 9-11), the kind is 13
/// and the map follows the window.
pub(crate) fn encode_stream_call(
    object: &[u8],
    method: &[u8],
    deadline: Duration,
    window: u64,
    context: Option<&[u8]>,
    args: impl FnOnce(&mut Vec<u8>) -> Result<(), WireError>,
) -> Result<Payload, WireError> {
    encode(|w| {
        match context {
            None => header(w, 6, STREAM_CALL),
            Some(_) => header(w, 7, STREAM_CALL_CTX),
        }
        w.extend_from_slice(object);
        w.extend_from_slice(method);
        msgpack::write_uint(w, millis(deadline));
        msgpack::write_uint(w, window);
        if let Some(context) = context {
            w.extend_from_slice(context);
        }
        args(w)
    })
}

/// `[14, call]` and `[15, call, bytes]`: the caller's envelopes about call `call`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CallerStreamMsg {
    OpenArgument { call: u64 },
    GrantResult { call: u64, bytes: u64 },
}

pub(crate) fn encode_caller_msg(msg: &CallerStreamMsg) -> Payload {
    encode(|w| {
        match *msg {
            CallerStreamMsg::OpenArgument { call } => {
                header(w, 2, OPEN_ARGUMENT);
                msgpack::write_uint(w, call);
            }
            CallerStreamMsg::GrantResult { call, bytes } => {
                header(w, 3, GRANT_RESULT);
                msgpack::write_uint(w, call);
                msgpack::write_uint(w, bytes);
            }
        }
        Ok(())
    })
    .unwrap_or_else(|_| unreachable!("writing integers cannot fail"))
}

#[cfg(test)]
mod tests {
    use super::super::{decode_incoming, Incoming, WireName};
    use super::*;

    #[test]
    fn stream_messages_round_trip_in_their_shortest_form() {
        let item = encode_item(&("a", 1u8)).unwrap();
        assert_eq!(&item[..], b"\x92\x03\x92\xa1a\x01");
        assert_eq!(
            decode_stream_msg(&item).unwrap(),
            StreamMsg::Item(b"\x92\xa1a\x01")
        );
        assert_eq!(&encode_bare(END)[..], b"\x91\x04");
        assert_eq!(decode_stream_msg(b"\x91\x04").unwrap(), StreamMsg::End);
        assert_eq!(&encode_bare(STOP)[..], b"\x91\x06");
        assert_eq!(decode_stream_msg(b"\x91\x06").unwrap(), StreamMsg::Stop);
        let grant = encode_grant(131_072);
        assert_eq!(&grant[..], b"\x92\x05\xce\x00\x02\x00\x00");
        assert_eq!(
            decode_stream_msg(&grant).unwrap(),
            StreamMsg::Grant(131_072)
        );
    }

    #[test]
    fn malformed_stream_messages_are_errors() {
        for bad in [
            &b""[..],
            b"\x90",
            b"\x92\x03",                     // an item without its value
            b"\x92\x03\x01\x02",             // two values where one goes
            b"\x93\x03\x01\x02",             // an item with three elements
            b"\x92\x04\x00",                 // an end with a field
            b"\x92\x05\xa1x",                // a grant that is not a number
            b"\x92\x05\xff",                 // a negative grant
            b"\x91\x07",                     // an unknown kind
            b"\x92\x03\xdd\xff\xff\xff\xff", // an item claiming 2^32 elements
        ] {
            assert!(decode_stream_msg(bad).is_err(), "{bad:x?}");
        }
    }

    #[test]
    fn a_stream_call_carries_the_callers_window() {
        let (object, method) = (WireName::new("files"), WireName::new("watch"));
        let call = encode_stream_call(
            object.encoded(),
            method.encoded(),
            Duration::from_secs(2),
            262_144,
            None,
            |w| super::super::value(w, &("/tmp",)),
        )
        .unwrap();
        let Ok(Incoming::StreamCall {
            object,
            method,
            deadline,
            window,
            context: None,
            args,
        }) = decode_incoming(&call, 8192)
        else {
            panic!("not a stream call: {call:x?}")
        };
        assert_eq!(object.as_bytes(), b"files");
        assert_eq!(method.as_bytes(), b"watch");
        assert_eq!(deadline, Duration::from_secs(2));
        assert_eq!(window, 262_144);
        assert_eq!(args, b"\x91\xa4/tmp");
        assert!(decode_incoming(b"\x95\x0c\xa1o\xa1m\x05\x00", 8192).is_err());
        assert!(decode_incoming(b"\x96\x0c\xa1o\xa1m\x05\x00", 8192).is_err());
    }

    #[test]
    fn caller_messages_round_trip_and_reject_extras() {
        let open = encode_caller_msg(&CallerStreamMsg::OpenArgument { call: 7 });
        assert_eq!(
            decode_incoming(&open, 8192).unwrap(),
            Incoming::OpenArgument { call: 7 }
        );
        let grant = encode_caller_msg(&CallerStreamMsg::GrantResult {
            call: 300,
            bytes: 65_536,
        });
        assert_eq!(
            decode_incoming(&grant, 8192).unwrap(),
            Incoming::GrantResult {
                call: 300,
                bytes: 65_536
            }
        );
        assert!(decode_incoming(b"\x93\x0e\x07\x00", 8192).is_err());
        assert!(decode_incoming(b"\x92\x0e\x07\x00", 8192).is_err());
        assert!(decode_incoming(b"\x92\x0f\x07", 8192).is_err());
    }
}
