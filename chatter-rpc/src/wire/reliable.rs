//! The envelopes of reliable delivery (see `PROTOCOL.md`, "Reliable signals"):
//! `[3, stream, seq, object, method, ttl_ms, args]` and `[4, stream, seq, status]`.

use std::time::Duration;

use bytes::Bytes;

use chatter_msgpack::{self as msgpack, Reader};

use super::{bad, header, millis, Incoming, WireError};

/// What the receiver of a reliable signal did with it (the `status` of an ack).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum AckStatus {
    /// The handler ran to its end.
    Handled = 0,
    /// The TTL ran out before a handler could start: dropped, never run.
    Expired = 1,
    /// Not run: no such object or method, bad arguments, a context over the receiver's
    /// limit (kind 11), or the handler panicked.
    Failed = 2,
}

impl AckStatus {
    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => AckStatus::Handled,
            1 => AckStatus::Expired,
            2 => AckStatus::Failed,
            _ => return None,
        })
    }
}

/// Re-wraps a plain signal envelope `[1, object, method, ttl_ms, args]` as the reliable
/// `[3, stream, seq, object, method, ttl_ms, args]`, with `ttl` (the time it has left).
pub(crate) fn encode_reliable(
    stream: u64,
    seq: u64,
    signal: &[u8],
    ttl: Duration,
) -> Result<Bytes, WireError> {
    let Ok(Incoming::Signal {
        object,
        method,
        context,
        args,
        ..
    }) = super::decode_incoming(signal, usize::MAX)
    else {
        return Err(WireError("not a signal envelope".into()));
    };
    let extra = context.map_or(0, <[u8]>::len);
    let mut w = Vec::with_capacity(48 + object.0.len() + method.0.len() + extra + args.len());
    match context {
        None => header(&mut w, 7, super::RELIABLE),
        Some(_) => header(&mut w, 8, super::RELIABLE_CTX),
    }
    msgpack::write_uint(&mut w, stream);
    msgpack::write_uint(&mut w, seq);
    super::put_name(&mut w, object);
    super::put_name(&mut w, method);
    msgpack::write_uint(&mut w, millis(ttl));
    if let Some(context) = context {
        w.extend_from_slice(context);
    }
    w.extend_from_slice(args);
    Ok(Bytes::from(w))
}

/// The same call envelope `[0, object, method, deadline_ms, args]` with another deadline
/// (what is left of it after waiting for a reconnect).
pub(crate) fn rewrite_deadline(call: &[u8], deadline: Duration) -> Result<Bytes, WireError> {
    let Ok(Incoming::Call {
        object,
        method,
        context,
        args,
        ..
    }) = super::decode_incoming(call, usize::MAX)
    else {
        return Err(WireError("not a call envelope".into()));
    };
    let extra = context.map_or(0, <[u8]>::len);
    let mut w = Vec::with_capacity(32 + object.0.len() + method.0.len() + extra + args.len());
    match context {
        None => header(&mut w, 5, super::CALL),
        Some(_) => header(&mut w, 6, super::CALL_CTX),
    }
    super::put_name(&mut w, object);
    super::put_name(&mut w, method);
    msgpack::write_uint(&mut w, millis(deadline));
    if let Some(context) = context {
        w.extend_from_slice(context);
    }
    w.extend_from_slice(args);
    Ok(Bytes::from(w))
}

/// `[4, stream, seq, status]`.
pub(crate) fn encode_ack(stream: u64, seq: u64, status: AckStatus) -> super::Payload {
    let mut w = Vec::with_capacity(24);
    header(&mut w, 4, super::ACK);
    msgpack::write_uint(&mut w, stream);
    msgpack::write_uint(&mut w, seq);
    msgpack::write_uint(&mut w, status as u64);
    super::Payload::from_vec(w)
}

/// The rest of a kind-3 envelope, after `[3,`, or with `max_context`, of a kind-11
/// envelope (its context map before the arguments). A context over `max_context` is
/// [`Incoming::ReliableTooLarge`], not an error: the refusal is acknowledged.
pub(super) fn decode_reliable(
    mut r: Reader<'_>,
    max_context: Option<usize>,
) -> Result<Incoming<'_>, WireError> {
    let stream: u64 = r.read_int().map_err(|e| bad("stream id", e))?;
    let seq: u64 = r.read_int().map_err(|e| bad("sequence number", e))?;
    let object = super::read_name(&mut r, "object name")?;
    let method = super::read_name(&mut r, "method name")?;
    let ms: u64 = r.read_int().map_err(|e| bad("ttl", e))?;
    let context = match max_context.map(|max| super::read_context(&mut r, max)) {
        Some(Ok(context)) => Some(context),
        // Still answerable: the stream and sequence number came first.
        Some(Err(what)) if what.is_too_large() => {
            return Ok(Incoming::ReliableTooLarge { stream, seq, what })
        }
        Some(Err(e)) => return Err(e),
        None => None,
    };
    let rd = r.remaining();
    if rd.is_empty() {
        return Err(WireError("missing arguments".into()));
    }
    Ok(Incoming::Reliable {
        stream,
        seq,
        object,
        method,
        ttl: Duration::from_millis(ms),
        context,
        args: rd,
    })
}

/// The rest of a kind-4 envelope, after `[4,`.
pub(super) fn decode_ack(mut r: Reader<'_>) -> Result<Incoming<'_>, WireError> {
    let stream: u64 = r.read_int().map_err(|e| bad("stream id", e))?;
    let seq: u64 = r.read_int().map_err(|e| bad("sequence number", e))?;
    let status: u8 = r.read_int().map_err(|e| bad("ack status", e))?;
    Ok(Incoming::Ack {
        stream,
        seq,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode_incoming, decode_value, encode_request, Name, SIGNAL};

    #[test]
    fn protocol_md_reliable_examples() {
        let plain = encode_request(SIGNAL, "log", "line", Duration::from_secs(5), &("hi",))
            .expect("encodes");
        let bytes = encode_reliable(7, 300, &plain, Duration::from_millis(4000)).expect("ok");
        // [3, 7, 300, "log", "line", 4000, ["hi"]]
        assert_eq!(
            bytes.as_ref(),
            b"\x97\x03\x07\xcd\x01\x2c\xa3log\xa4line\xcd\x0f\xa0\x91\xa2hi".as_ref()
        );
        let Incoming::Reliable {
            stream,
            seq,
            object,
            method,
            ttl,
            context: None,
            args,
        } = decode_incoming(&bytes, 8192).expect("decodes")
        else {
            panic!("not a reliable signal")
        };
        assert_eq!(
            (stream, seq, object, method),
            (7, 300, Name(b"log"), Name(b"line"))
        );
        assert_eq!(ttl, Duration::from_secs(4));
        assert_eq!(decode_value::<(String,)>(args).expect("args").0, "hi");

        let ack = encode_ack(7, 300, AckStatus::Handled);
        assert_eq!(ack.as_ref(), b"\x94\x04\x07\xcd\x01\x2c\x00".as_ref());
        assert_eq!(
            decode_incoming(&ack, 8192).expect("decodes"),
            Incoming::Ack {
                stream: 7,
                seq: 300,
                status: 0
            }
        );
    }

    #[test]
    fn protocol_md_shutting_down_example() {
        use crate::wire::{encode_failure, FailureKind};
        assert_eq!(
            encode_failure(FailureKind::ShuttingDown, "shutting down").as_ref(),
            b"\x93\x02\x08\xadshutting down".as_ref()
        );
    }

    #[test]
    fn reliable_garbage_is_an_error() {
        for input in [
            &b"\x97\x03"[..],
            b"\x97\x03\x07",
            b"\x97\x03\x07\x01\xa1o\xa1m\x05",
            b"\x94\x04\x07\x01",
            b"\x94\x04\xc1\x01\x00",
            b"\x97\x03\x07\x01\xa1o\xa1m\xcc",
        ] {
            assert!(decode_incoming(input, 8192).is_err(), "{input:x?}");
        }
        assert!(encode_reliable(1, 1, b"\x92\x02\x01", Duration::ZERO).is_err());
        assert!(rewrite_deadline(b"\x92\x02\x01", Duration::ZERO).is_err());
    }

    #[test]
    fn deadline_rewrite_keeps_the_rest() {
        let call = encode_request(
            crate::wire::CALL,
            "calc",
            "add",
            Duration::from_millis(1500),
            &(2i64, 3i64),
        )
        .expect("encodes");
        let shorter = rewrite_deadline(&call, Duration::from_millis(200)).expect("rewrites");
        assert_eq!(
            shorter.as_ref(),
            b"\x95\x00\xa4calc\xa3add\xcc\xc8\x92\x02\x03".as_ref()
        );
    }
}
