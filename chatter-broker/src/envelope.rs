//! The part of chatter-rpc's envelopes (chatter-rpc `PROTOCOL.md`) the broker reads and
//! rewrites: the head of a request up to its duration, and the call id of cancels and
//! stream envelopes. Arguments, contexts, results and items are never decoded: they are
//! copied as bytes.

use chatter_msgpack::{self as msgpack, Reader};

/// Request kinds: `[kind, object, method, duration, …]`.
const CALL: u8 = 0;
const SIGNAL: u8 = 1;
const CALL_WITH_CONTEXT: u8 = 9;
const SIGNAL_WITH_CONTEXT: u8 = 10;
const STREAM_CALL: u8 = 12;
const STREAM_CALL_WITH_CONTEXT: u8 = 13;
/// Envelopes that name a call by its id: `[kind, call, …]`.
pub(crate) const CANCEL: u8 = 2;
pub(crate) const ARGUMENT_STREAM: u8 = 14;
pub(crate) const RESULT_CREDIT: u8 = 15;
/// Reliable signals and their acks: `[3, stream, seq, object, method, ttl, …]`,
/// `[4, stream, seq, status]`.
const RELIABLE_SIGNAL: u8 = 3;
const ACK: u8 = 4;
const RELIABLE_SIGNAL_WITH_CONTEXT: u8 = 11;
/// An ack's status for a signal that was not run.
pub(crate) const ACK_FAILED: u64 = 2;

/// The separator between a peer's name and its object's in a routed object name.
pub const ROUTE_SEPARATOR: char = '/';

/// Failure kinds of chatter-rpc's replies that the broker sends itself.
pub(crate) const FAILURE_DEADLINE_EXCEEDED: u64 = 1;
pub(crate) const FAILURE_NO_SUCH_OBJECT: u64 = 3;
pub(crate) const FAILURE_NO_SUCH_METHOD: u64 = 4;
pub(crate) const FAILURE_BAD_ARGUMENTS: u64 = 5;
pub(crate) const FAILURE_PROTOCOL: u64 = 7;
pub(crate) const FAILURE_NO_SUCH_PEER: u64 = 11;
pub(crate) const FAILURE_PEER_LOST: u64 = 12;
pub(crate) const FAILURE_PEER_BUSY: u64 = 13;
pub(crate) const FAILURE_LAGGING: u64 = 14;
pub(crate) const FAILURE_PERMISSION_DENIED: u64 = 15;
/// A stream's opening `[0, nil]` and a failure's kind *cancelled*.
pub(crate) const FAILURE_CANCELLED: u64 = 2;

/// What an opening message's payload is, as far as routing needs to know.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Envelope<'a> {
    /// A call, stream call or signal.
    Request(Request<'a>),
    /// A cancel, argument stream or result credit, naming the call whose conversation
    /// began with message `call` (in the sender's id sequence).
    CallRef {
        kind: u8,
        call: u64,
        /// Where the call id begins and ends in the payload.
        at: (usize, usize),
    },
    /// An acknowledgement of a reliable signal, naming the sender's stream.
    Ack {
        stream: u64,
        /// Where the stream id begins and ends in the payload.
        at: (usize, usize),
    },
}

/// A request's head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Request<'a> {
    pub(crate) kind: u8,
    /// A reliable signal's stream id, and where its sequence number is in the payload.
    pub(crate) reliable: Option<(u64, (usize, usize))>,
    /// The peer name before the first `/`; `None` for an object of the broker itself.
    pub(crate) target: Option<&'a str>,
    /// The object name the callee sees (after the `/`).
    pub(crate) object: &'a str,
    /// The method name, encoded as it arrived.
    method: (usize, usize),
    /// The call's deadline or the signal's TTL, in milliseconds.
    pub(crate) duration_ms: u64,
    /// The array length, and where what follows the duration begins.
    len: u32,
    tail: usize,
}

impl Request<'_> {
    /// True for calls and stream calls (answered with a reply), false for signals.
    pub(crate) fn is_call(&self) -> bool {
        !matches!(
            self.kind,
            SIGNAL | SIGNAL_WITH_CONTEXT | RELIABLE_SIGNAL | RELIABLE_SIGNAL_WITH_CONTEXT
        )
    }

    /// Where the rest of the envelope (after the duration) begins in the payload.
    pub(crate) fn tail(&self) -> usize {
        self.tail
    }

    /// The method name's bytes.
    pub(crate) fn method<'p>(&self, payload: &'p [u8]) -> &'p [u8] {
        Reader::new(&payload[self.method.0..self.method.1])
            .read_str_bytes()
            .unwrap_or_default()
    }

    /// The arguments of a plain call (kind 0, or 9 after its context); `None` for other
    /// kinds.
    pub(crate) fn args<'p>(&self, payload: &'p [u8]) -> Option<&'p [u8]> {
        let mut r = Reader::new(&payload[self.tail..]);
        match self.kind {
            CALL => {}
            CALL_WITH_CONTEXT => r.skip_value(msgpack::MAX_DEPTH).ok()?,
            _ => return None,
        }
        Some(r.remaining())
    }

    /// The arguments of any request kind, after its context (if any), with a stream call's
    /// window; `None` if the envelope is cut short before them.
    pub(crate) fn window_and_args<'p>(&self, payload: &'p [u8]) -> Option<(u64, &'p [u8])> {
        let mut r = Reader::new(&payload[self.tail..]);
        let window = match self.kind {
            STREAM_CALL | STREAM_CALL_WITH_CONTEXT => r.read_uint().ok()?,
            _ => 0,
        };
        if matches!(
            self.kind,
            CALL_WITH_CONTEXT
                | SIGNAL_WITH_CONTEXT
                | STREAM_CALL_WITH_CONTEXT
                | RELIABLE_SIGNAL_WITH_CONTEXT
        ) {
            r.skip_value(msgpack::MAX_DEPTH).ok()?;
        }
        Some((window, r.remaining()))
    }

    /// The head as a plain signal's (kind 1, or 10 with a context): a reliable signal's
    /// stream id and sequence number left out, up to (not including) the duration.
    pub(crate) fn plain_head(&self, payload: &[u8]) -> Vec<u8> {
        let (kind, len) = match self.kind {
            RELIABLE_SIGNAL => (SIGNAL, self.len - 2),
            RELIABLE_SIGNAL_WITH_CONTEXT => (SIGNAL_WITH_CONTEXT, self.len - 2),
            kind => (kind, self.len),
        };
        let method = &payload[self.method.0..self.method.1];
        let mut head = Vec::with_capacity(32 + self.object.len() + method.len());
        msgpack::write_array_len(&mut head, len);
        msgpack::write_uint(&mut head, u64::from(kind));
        msgpack::write_str(&mut head, self.object);
        head.extend_from_slice(method);
        head
    }

    /// True for stream calls (kinds 12 and 13).
    pub(crate) fn is_stream_call(&self) -> bool {
        matches!(self.kind, STREAM_CALL | STREAM_CALL_WITH_CONTEXT)
    }

    /// The head as the callee gets it: the same envelope with the object name without its
    /// route (and a reliable signal's stream id replaced by `stream`), up to (not
    /// including) the duration.
    pub(crate) fn rewritten_head(&self, payload: &[u8], stream: Option<u64>) -> Vec<u8> {
        let method = &payload[self.method.0..self.method.1];
        let mut head = Vec::with_capacity(32 + self.object.len() + method.len());
        msgpack::write_array_len(&mut head, self.len);
        msgpack::write_uint(&mut head, u64::from(self.kind));
        if let Some((original, seq)) = self.reliable {
            msgpack::write_uint(&mut head, stream.unwrap_or(original));
            head.extend_from_slice(&payload[seq.0..seq.1]);
        }
        msgpack::write_str(&mut head, self.object);
        head.extend_from_slice(method);
        head
    }
}

/// Why an envelope cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unroutable(pub(crate) String);

/// Reads what routing needs from an opening message's payload.
pub(crate) fn parse(payload: &[u8]) -> Result<Envelope<'_>, Unroutable> {
    let mut r = Reader::new(payload);
    let len = r.read_array_len().map_err(bad)?;
    let kind = r.read_uint().map_err(bad)?;
    let kind =
        u8::try_from(kind).map_err(|_| Unroutable(format!("unknown envelope kind {kind}")))?;
    match kind {
        CALL
        | SIGNAL
        | CALL_WITH_CONTEXT
        | SIGNAL_WITH_CONTEXT
        | STREAM_CALL
        | STREAM_CALL_WITH_CONTEXT
        | RELIABLE_SIGNAL
        | RELIABLE_SIGNAL_WITH_CONTEXT => {
            let expected = match kind {
                CALL | SIGNAL => 5,
                CALL_WITH_CONTEXT | SIGNAL_WITH_CONTEXT | STREAM_CALL => 6,
                STREAM_CALL_WITH_CONTEXT | RELIABLE_SIGNAL => 7,
                _ => 8,
            };
            if len != expected {
                return Err(Unroutable(format!(
                    "envelope kind {kind} with {len} elements (expected {expected})"
                )));
            }
            let reliable = if matches!(kind, RELIABLE_SIGNAL | RELIABLE_SIGNAL_WITH_CONTEXT) {
                let stream = r
                    .read_uint()
                    .map_err(|e| Unroutable(format!("stream id: {e}")))?;
                let start = r.position();
                r.read_uint()
                    .map_err(|e| Unroutable(format!("sequence number: {e}")))?;
                Some((stream, (start, r.position())))
            } else {
                None
            };
            let name = r
                .read_str()
                .map_err(|e| Unroutable(format!("object name: {e}")))?;
            let start = r.position();
            r.read_str_bytes()
                .map_err(|e| Unroutable(format!("method name: {e}")))?;
            let method = (start, r.position());
            let duration_ms = r
                .read_int::<u64>()
                .map_err(|e| Unroutable(format!("bad duration: {e}")))?;
            let (target, object) = match name.split_once(ROUTE_SEPARATOR) {
                Some((target, object)) => (Some(target), object),
                None => (None, name),
            };
            Ok(Envelope::Request(Request {
                kind,
                reliable,
                target,
                object,
                method,
                duration_ms,
                len,
                tail: r.position(),
            }))
        }
        CANCEL | ARGUMENT_STREAM | RESULT_CREDIT => {
            let expected = if kind == RESULT_CREDIT { 3 } else { 2 };
            if len != expected {
                return Err(Unroutable(format!(
                    "envelope kind {kind} with {len} elements (expected {expected})"
                )));
            }
            let start = r.position();
            let call = r
                .read_uint()
                .map_err(|e| Unroutable(format!("call id: {e}")))?;
            Ok(Envelope::CallRef {
                kind,
                call,
                at: (start, r.position()),
            })
        }
        ACK => {
            if len != 4 {
                return Err(Unroutable(format!(
                    "envelope kind {kind} with {len} elements (expected 4)"
                )));
            }
            let start = r.position();
            let stream = r
                .read_uint()
                .map_err(|e| Unroutable(format!("stream id: {e}")))?;
            Ok(Envelope::Ack {
                stream,
                at: (start, r.position()),
            })
        }
        _ => Err(Unroutable(format!("unknown envelope kind {kind}"))),
    }
}

fn bad(e: msgpack::DecodeError) -> Unroutable {
    Unroutable(format!("not an envelope: {e}"))
}

/// `[2, kind, message]`: a failure reply.
pub(crate) fn failure(kind: u64, message: &str) -> Vec<u8> {
    let mut w = Vec::with_capacity(8 + message.len());
    msgpack::write_array_len(&mut w, 3);
    msgpack::write_uint(&mut w, 2);
    msgpack::write_uint(&mut w, kind);
    msgpack::write_str(&mut w, message);
    w
}

/// `[0, nil]`: a call's reply without a value.
pub(crate) fn ok_unit() -> Vec<u8> {
    vec![0x92, 0x00, 0xc0]
}

/// `[0, value]` with a string value.
pub(crate) fn ok_value_str(value: &str) -> Vec<u8> {
    let mut w = Vec::with_capacity(8 + value.len());
    msgpack::write_array_len(&mut w, 2);
    msgpack::write_uint(&mut w, 0);
    msgpack::write_str(&mut w, value);
    w
}

/// `[1, [message, []], error]`: an application error, `error` already encoded.
pub(crate) fn app_error(message: &str, error: &[u8]) -> Vec<u8> {
    let mut w = Vec::with_capacity(8 + message.len() + error.len());
    msgpack::write_array_len(&mut w, 3);
    msgpack::write_uint(&mut w, 1);
    msgpack::write_array_len(&mut w, 2);
    msgpack::write_str(&mut w, message);
    msgpack::write_array_len(&mut w, 0);
    w.extend_from_slice(error);
    w
}

/// `[4, stream, seq, status]`: an ack, `seq` as it arrived (encoded).
pub(crate) fn ack(stream: u64, seq: &[u8], status: u64) -> Vec<u8> {
    let mut w = Vec::with_capacity(24);
    msgpack::write_array_len(&mut w, 4);
    msgpack::write_uint(&mut w, u64::from(ACK));
    msgpack::write_uint(&mut w, stream);
    w.extend_from_slice(seq);
    msgpack::write_uint(&mut w, status);
    w
}

/// `[2, call]`: cancel the call whose conversation began with message `call`.
pub(crate) fn cancel(call: u64) -> Vec<u8> {
    let mut w = Vec::with_capacity(11);
    msgpack::write_array_len(&mut w, 2);
    msgpack::write_uint(&mut w, u64::from(CANCEL));
    msgpack::write_uint(&mut w, call);
    w
}

/// The arguments of the broker's `publish(topic, value)`: the topic, and where the value's
/// bytes are in `args`.
pub(crate) fn publish_args(args: &[u8]) -> Result<(&str, (usize, usize)), String> {
    let mut r = Reader::new(args);
    let len = r.read_array_len().map_err(|e| e.to_string())?;
    if len != 2 {
        return Err(format!("{len} arguments, expected 2 (topic, value)"));
    }
    let topic = r.read_str().map_err(|e| format!("topic: {e}"))?;
    let start = r.position();
    r.skip_value(msgpack::MAX_DEPTH)
        .map_err(|e| format!("value: {e}"))?;
    let end = r.position();
    if !r.remaining().is_empty() {
        return Err("bytes after the arguments".into());
    }
    Ok((topic, (start, end)))
}

/// The arguments of the broker's `subscribe(pattern, options)` (`options` may be left out).
pub(crate) fn subscribe_args(args: &[u8]) -> Result<(String, crate::SubscribeOptions), String> {
    let mut r = Reader::new(args);
    let len = r.read_array_len().map_err(|e| e.to_string())?;
    if !(1..=2).contains(&len) {
        return Err(format!("{len} arguments, expected (pattern, options)"));
    }
    let pattern = r
        .read_str()
        .map_err(|e| format!("pattern: {e}"))?
        .to_owned();
    let options = if len == 2 {
        r.read_value::<crate::SubscribeOptions>(msgpack::MAX_DEPTH - 1)
            .map_err(|e| format!("options: {e}"))?
    } else {
        crate::SubscribeOptions::default()
    };
    Ok((pattern, options))
}

/// `[3, …]` is an item message; `[0, nil]` opens a stream (the same bytes as `ok_unit`).
pub(crate) fn stream_open() -> Vec<u8> {
    ok_unit()
}

/// The arguments of the broker's `register(name, force)`.
pub(crate) fn register_args(args: &[u8]) -> Result<(String, bool), String> {
    chatter_core::codec::decode::<(String, bool)>(args).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).expect("hex"))
            .collect()
    }

    /// `add(2, 3)` on `calc-1/calc`, 1.5 s (chatter-rpc PROTOCOL.md's example, routed).
    #[test]
    fn a_routed_call_loses_its_route_and_keeps_the_rest() {
        let mut payload = hex("95 00 ab 63 61 6c 63 2d 31 2f 63 61 6c 63 a3 61 64 64 cd 05 dc");
        payload.extend_from_slice(&hex("92 02 03"));
        let Ok(Envelope::Request(request)) = parse(&payload) else {
            panic!("not a request: {:?}", parse(&payload));
        };
        assert_eq!(request.target, Some("calc-1"));
        assert_eq!(request.object, "calc");
        assert_eq!(request.duration_ms, 1500);
        assert!(request.is_call());
        let mut out = request.rewritten_head(&payload, None);
        msgpack::write_uint(&mut out, request.duration_ms);
        out.extend_from_slice(&payload[request.tail()..]);
        // PROTOCOL.md's unrouted `add(2, 3)` on "calc".
        assert_eq!(
            out,
            hex("95 00 a4 63 61 6c 63 a3 61 64 64 cd 05 dc 92 02 03")
        );
    }

    #[test]
    fn a_signal_with_context_keeps_its_context() {
        // `[10, "n/log", "line", 4000, {"a": "b"}, ["hi"]]`
        let payload =
            hex("96 0a a5 6e 2f 6c 6f 67 a4 6c 69 6e 65 cd 0f a0 81 a1 61 a1 62 91 a2 68 69");
        let Ok(Envelope::Request(request)) = parse(&payload) else {
            panic!("not a request");
        };
        assert!(!request.is_call());
        assert_eq!((request.target, request.object), (Some("n"), "log"));
        assert_eq!(
            &payload[request.tail()..],
            hex("81 a1 61 a1 62 91 a2 68 69")
        );
    }

    #[test]
    fn names_without_a_route_are_the_brokers() {
        let payload = hex("95 00 a4 63 61 6c 63 a3 61 64 64 05 c0");
        let Ok(Envelope::Request(request)) = parse(&payload) else {
            panic!("not a request");
        };
        assert_eq!((request.target, request.object), (None, "calc"));
    }

    #[test]
    fn cancels_and_credits_name_their_call() {
        assert_eq!(
            parse(&hex("92 02 cd 01 2c")),
            Ok(Envelope::CallRef {
                kind: CANCEL,
                call: 300,
                at: (2, 5)
            })
        );
        assert_eq!(
            parse(&hex("93 0f cd 01 2c ce 00 02 00 00")),
            Ok(Envelope::CallRef {
                kind: RESULT_CREDIT,
                call: 300,
                at: (2, 5)
            })
        );
    }

    /// PROTOCOL.md's reliable signal `log.line("hi")`, stream 7, seq 300, routed to `n`,
    /// and its ack.
    #[test]
    fn reliable_signals_and_acks_name_their_stream() {
        let payload =
            hex("97 03 07 cd 01 2c a5 6e 2f 6c 6f 67 a4 6c 69 6e 65 cd 0f a0 91 a2 68 69");
        let Ok(Envelope::Request(request)) = parse(&payload) else {
            panic!("not a request");
        };
        assert!(!request.is_call());
        assert_eq!(request.target, Some("n"));
        let mut out = request.rewritten_head(&payload, Some(9));
        msgpack::write_uint(&mut out, 4000);
        out.extend_from_slice(&payload[request.tail()..]);
        assert_eq!(
            out,
            hex("97 03 09 cd 01 2c a3 6c 6f 67 a4 6c 69 6e 65 cd 0f a0 91 a2 68 69")
        );
        let acked = hex("94 04 07 cd 01 2c 00");
        assert_eq!(
            parse(&acked),
            Ok(Envelope::Ack {
                stream: 7,
                at: (2, 3)
            })
        );
        assert_eq!(ack(7, &hex("cd 01 2c"), 0), hex("94 04 07 cd 01 2c 00"));
    }

    #[test]
    fn garbage_is_unroutable_not_a_panic() {
        for bad in [
            &[][..],
            &[0xc1],
            &[0x95, 0x00],
            &[0x95, 0x00, 0xa1],
            &[0x92, 0x02, 0xd0, 0xff],
            &[0x95, 0x00, 0xa1, 0x61, 0xa1, 0x62, 0xff],
            &[0x91, 0x63],
        ] {
            assert!(parse(bad).is_err(), "{bad:x?}");
        }
    }

    #[test]
    fn replies_are_chatter_rpc_replies() {
        assert_eq!(failure(11, "x"), hex("93 02 0b a1 78"));
        assert_eq!(cancel(300), hex("92 02 cd 01 2c"));
        assert_eq!(ok_unit(), hex("92 00 c0"));
    }
}
