//! The envelopes of streams (PROTOCOL.md, "Streams"), routed by `peer/streams.rs`.
//!
//! In the call's conversation, after the callee's `[0, nil]` (no `last`), and in an
//! argument stream's own conversation:
//!
//! | envelope | meaning |
//! |---|---|
//! | `[3, item, ...]` | one or more items, in order (a writer batches the items it has ready) |
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
    /// One or more items.
    Items(Items<'a>),
    End,
    Grant(u64),
    Stop,
}

/// The items of one `[3, item, ...]` message: `count` MessagePack values, each checked
/// when the message was decoded, back to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Items<'a> {
    values: &'a [u8],
    count: u32,
}

impl<'a> Items<'a> {
    /// How many items the message carries (at least one).
    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    /// The bytes of all the items' values.
    pub(crate) fn values_len(&self) -> usize {
        self.values.len()
    }

    /// Each item's value, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut rest = self.values;
        std::iter::from_fn(move || {
            let mut r = Reader::new(rest);
            // Checked when decoded: an error cannot happen here, and would end the items.
            r.skip_value(msgpack::MAX_DEPTH - 1).ok()?;
            let used = rest.len() - r.remaining().len();
            let (item, next) = rest.split_at(used);
            rest = next;
            (!item.is_empty()).then_some(item)
        })
    }
}

/// Room in front of a batch's items for its longest header: `array16` (3 bytes) and the
/// kind.
const ROOM: usize = 4;

/// The most items in one batch: its header stays an `array16`.
pub(crate) const MAX_BATCH: u32 = 4096;

/// The envelope `[3, item, ...]` of a batch of items, built in place: each item is
/// encoded straight into one buffer, behind room for the longest header, and the header
/// that fits the count is written in front of the items when the batch is sent. The last
/// item written can be held back for the next batch without a copy elsewhere.
#[derive(Debug)]
pub(crate) struct ItemBatch {
    buf: Vec<u8>,
    count: u32,
    /// Where the item held back for the next batch starts (it is not counted).
    held: Option<usize>,
}

impl ItemBatch {
    pub(crate) fn new() -> Self {
        ItemBatch {
            buf: vec![0; ROOM],
            count: 0,
            held: None,
        }
    }

    /// Starts the next batch: empty, or with the item held back as its first. Keeps the
    /// buffer unless it grew past `keep` bytes.
    pub(crate) fn next(&mut self, keep: usize) {
        self.count = 0;
        if let Some(at) = self.held.take() {
            self.buf.copy_within(at.., ROOM);
            self.buf.truncate(ROOM + (self.buf.len() - at));
            self.count = 1;
        } else {
            self.buf.truncate(ROOM);
        }
        if self.buf.capacity() > keep && self.buf.len() <= keep {
            self.buf.shrink_to(keep);
        }
    }

    /// The buffer to append one item's MessagePack value to, then [`added`](Self::added).
    pub(crate) fn buf(&mut self) -> &mut Vec<u8> {
        debug_assert!(self.held.is_none(), "nothing goes after a held-back item");
        &mut self.buf
    }

    /// The buffer's length: where the next item starts.
    pub(crate) fn len(&self) -> usize {
        self.buf.len()
    }

    /// One more item was appended.
    pub(crate) fn added(&mut self) {
        self.count += 1;
    }

    /// Holds the last item (written after `mark`) back for the next batch.
    pub(crate) fn hold_back(&mut self, mark: usize) {
        self.count -= 1;
        self.held = Some(mark);
    }

    /// How many items the batch holds.
    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    /// The end of the batch's items.
    fn end(&self) -> usize {
        self.held.unwrap_or(self.buf.len())
    }

    /// The bytes of the items' values.
    pub(crate) fn values_len(&self) -> usize {
        self.end() - ROOM
    }

    /// Each item's value, in order (not the one held back).
    pub(crate) fn items(&self) -> impl Iterator<Item = &[u8]> + '_ {
        Items {
            values: &self.buf[ROOM..self.end()],
            count: self.count,
        }
        .iter()
    }

    /// The length of the envelope as [`payload`](Self::payload) will write it.
    pub(crate) fn payload_len(&self) -> usize {
        let header = if self.count < 15 { 1 } else { 3 };
        header + 1 + self.values_len()
    }

    /// The envelope: the header written in front of the items.
    pub(crate) fn payload(&mut self) -> &[u8] {
        debug_assert!(self.count >= 1 && self.count <= MAX_BATCH);
        let (elements, end) = (self.count + 1, self.end());
        self.buf[ROOM - 1] = ITEM;
        if elements < 16 {
            self.buf[ROOM - 2] = 0x90 | elements as u8;
            &self.buf[ROOM - 2..end]
        } else {
            let [a, b] = u16::try_from(elements).unwrap_or(u16::MAX).to_be_bytes();
            self.buf[..ROOM - 1].copy_from_slice(&[0xdc, a, b]);
            &self.buf[..end]
        }
    }
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
        (ITEM, 2..) => {
            let count = len - 1;
            let rest = r.remaining();
            let mut items = Reader::new(rest);
            for _ in 0..count {
                items
                    .skip_value(msgpack::MAX_DEPTH - 1)
                    .map_err(|e| bad("stream item", e))?;
            }
            let used = rest.len() - items.remaining().len();
            r = items;
            StreamMsg::Items(Items {
                values: &rest[..used],
                count,
            })
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
        let mut batch = ItemBatch::new();
        super::super::value(batch.buf(), &("a", 1u8)).unwrap();
        batch.added();
        let item = batch.payload().to_vec();
        assert_eq!(&item[..], b"\x92\x03\x92\xa1a\x01");
        let Ok(StreamMsg::Items(items)) = decode_stream_msg(&item) else {
            panic!("not items: {item:x?}")
        };
        assert_eq!(items.iter().collect::<Vec<_>>(), [b"\x92\xa1a\x01"]);
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
    fn a_batch_carries_its_items_in_order_under_the_shortest_header() {
        let mut batch = ItemBatch::new();
        for n in [1, 2, 14, 15, 16, 300, MAX_BATCH] {
            batch.next(1 << 20);
            for i in 0..n {
                super::super::value(batch.buf(), &i).unwrap();
                batch.added();
            }
            let len = batch.payload_len();
            let payload = batch.payload().to_vec();
            assert_eq!(payload.len(), len, "{n} items");
            // The header is the shortest for n + 1 elements, then the kind.
            let head: &[u8] = if n < 15 {
                &[0x91 + n as u8, 3]
            } else {
                &[0xdc, ((n + 1) >> 8) as u8, (n + 1) as u8, 3]
            };
            assert_eq!(&payload[..head.len()], head, "{n} items");
            let Ok(StreamMsg::Items(items)) = decode_stream_msg(&payload) else {
                panic!("{n} items: not items")
            };
            assert_eq!(items.count(), n);
            let got: Vec<u32> = items
                .iter()
                .map(|v| crate::wire::decode_value(v).unwrap())
                .collect();
            assert_eq!(got, (0..n).collect::<Vec<_>>());
        }
        batch.next(1 << 20);
        super::super::value(batch.buf(), &7u8).unwrap();
        batch.added();
        // One held back is not sent, and is the next batch's first.
        let mark = batch.len();
        super::super::value(batch.buf(), &"next").unwrap();
        batch.added();
        batch.hold_back(mark);
        assert_eq!((batch.count(), batch.payload_len()), (1, 3));
        assert_eq!(batch.payload(), b"\x92\x03\x07");
        batch.next(1 << 20);
        assert_eq!(batch.count(), 1);
        assert_eq!(batch.payload(), b"\x92\x03\xa4next");
        batch.next(1 << 20);
        assert_eq!((batch.count(), batch.values_len()), (0, 0));
    }

    #[test]
    fn malformed_stream_messages_are_errors() {
        for bad in [
            &b""[..],
            b"\x90",
            b"\x92\x03",                     // an item without its value
            b"\x92\x03\x01\x02",             // two values where one goes
            b"\x93\x03\x01",                 // two items announced, one sent
            b"\x93\x03\x01\xc1",             // a second item that is no value
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
