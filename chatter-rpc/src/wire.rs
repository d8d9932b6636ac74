//! The RPC envelopes carried in chatter-core message payloads (see `PROTOCOL.md`).
//!
//! Every envelope is a MessagePack array whose first element says what it is. User values
//! (arguments, return values, application errors) are embedded as MessagePack values
//! encoded as rmp-serde encodes them (structs as maps; written and read by
//! `chatter_core::codec`, that is chatter-msgpack), never as nested byte strings, so a
//! payload is encoded in one pass into one buffer. Envelope headers are written and read
//! with chatter-msgpack's single-value writers and `Reader`.

use std::cell::RefCell;
use std::time::Duration;

use bytes::Bytes;
use chatter_core::codec;
use chatter_msgpack::{self as msgpack, DecodeError, EncodeError, Reader};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::RemoteContext;

pub(crate) mod reliable;
pub(crate) mod stream;
pub(crate) use reliable::{encode_ack, encode_reliable, rewrite_deadline, AckStatus};

/// Envelope kinds: the first element of a message from caller to callee.
pub(crate) const CALL: u8 = 0;
pub(crate) const SIGNAL: u8 = 1;
pub(crate) const CANCEL: u8 = 2;
pub(crate) const RELIABLE: u8 = 3;
pub(crate) const ACK: u8 = 4;
/// A call, signal or reliable signal with a context map (metadata, trace context): the
/// plain kind + [`WITH_CONTEXT`]. Sent only when there is a context to send, so plain
/// requests stay as they were and peers that predate these kinds still work.
pub(crate) const CALL_CTX: u8 = 9;
pub(crate) const SIGNAL_CTX: u8 = 10;
pub(crate) const RELIABLE_CTX: u8 = 11;
/// What a context adds to a request's kind.
pub(crate) const WITH_CONTEXT: u8 = 9;
/// The context map's key for the W3C trace context.
pub(crate) const TRACEPARENT: &str = "traceparent";

/// Reply statuses: the first element of a reply.
pub(crate) const OK: u8 = 0;
pub(crate) const APP_ERROR: u8 = 1;
pub(crate) const FAILURE: u8 = 2;

/// Framework failure kinds in a `FAILURE` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum FailureKind {
    DeadlineExceeded = 1,
    Cancelled = 2,
    NoSuchObject = 3,
    NoSuchMethod = 4,
    BadArguments = 5,
    RemotePanic = 6,
    Protocol = 7,
    ShuttingDown = 8,
    MetadataTooLarge = 9,
    /// A stream call beyond the callee's `max_streams` open streams on the connection.
    TooManyStreams = 10,
    /// A routed call to a name no peer holds (sent by a broker).
    NoSuchPeer = 11,
    /// The peer a routed call went to disconnected before it answered (sent by a broker).
    PeerLost = 12,
    /// The peer a routed call went to has as many calls open through the broker as the
    /// broker allows (sent by a broker).
    PeerBusy = 13,
    /// A subscription's reader fell further behind than its queue allows, and its policy
    /// ends it (sent by a broker, in a stream).
    Lagging = 14,
    /// The broker's access control does not let the sender do this (sent by a broker).
    PermissionDenied = 15,
}

impl FailureKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => FailureKind::DeadlineExceeded,
            2 => FailureKind::Cancelled,
            3 => FailureKind::NoSuchObject,
            4 => FailureKind::NoSuchMethod,
            5 => FailureKind::BadArguments,
            6 => FailureKind::RemotePanic,
            7 => FailureKind::Protocol,
            8 => FailureKind::ShuttingDown,
            9 => FailureKind::MetadataTooLarge,
            10 => FailureKind::TooManyStreams,
            11 => FailureKind::NoSuchPeer,
            12 => FailureKind::PeerLost,
            13 => FailureKind::PeerBusy,
            14 => FailureKind::Lagging,
            15 => FailureKind::PermissionDenied,
            _ => return None,
        })
    }
}

/// An object or method name as it arrived. Names are matched against registered ones, not
/// read, so they are compared as bytes and not checked to be UTF-8 on the way in (that
/// check cost as much as the rest of decoding a request); shown lossily in messages. A
/// name that is not UTF-8 matches nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Name<'a>(pub(crate) &'a [u8]);

impl Name<'_> {
    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0
    }
}

impl std::fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(self.0))
    }
}

/// A decoded caller-to-callee envelope. `args` borrows the payload.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming<'a> {
    Call {
        object: Name<'a>,
        method: Name<'a>,
        deadline: Duration,
        /// The context map of a kind 9 call (checked: a map of strings within the limit).
        context: Option<&'a [u8]>,
        args: &'a [u8],
    },
    Signal {
        object: Name<'a>,
        method: Name<'a>,
        ttl: Duration,
        context: Option<&'a [u8]>,
        args: &'a [u8],
    },
    Cancel {
        call: u64,
    },
    /// A signal with the sender's stream id and sequence number, answered by an `Ack`.
    Reliable {
        stream: u64,
        seq: u64,
        object: Name<'a>,
        method: Name<'a>,
        ttl: Duration,
        context: Option<&'a [u8]>,
        args: &'a [u8],
    },
    /// A reliable signal (kind 11) whose context is over the receiver's limit: refused
    /// unrun, and acknowledged *failed* so that its sender stops re-sending it. `what`
    /// says the size and the limit.
    ReliableTooLarge {
        stream: u64,
        seq: u64,
        what: WireError,
    },
    /// The receiver of a reliable signal finished with it.
    Ack {
        stream: u64,
        seq: u64,
        status: u8,
    },
    /// A call of a method with a stream (kinds 12, 13): as `Call`, with the caller's window
    /// for the result stream.
    StreamCall {
        object: Name<'a>,
        method: Name<'a>,
        deadline: Duration,
        window: u64,
        context: Option<&'a [u8]>,
        args: &'a [u8],
    },
    /// Opens the argument stream of call `call` (kind 14).
    OpenArgument {
        call: u64,
    },
    /// More credit for the result stream of call `call` (kind 15).
    GrantResult {
        call: u64,
        bytes: u64,
    },
}

/// A decoded reply. Values borrow the payload.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply<'a> {
    Ok(&'a [u8]),
    AppError {
        context: RemoteContext,
        error: &'a [u8],
    },
    Failure {
        kind: Result<FailureKind, u8>,
        message: String,
    },
}

/// Why an envelope or a value could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WireError(pub(crate) String);

impl WireError {
    /// A context map over the receiver's limit: [`FailureKind::MetadataTooLarge`].
    pub(crate) fn too_large(size: usize, max: usize) -> WireError {
        WireError(format!(
            "{METADATA_TOO_LARGE}: {size} bytes or more, over the limit of {max} (PeerOptions::max_metadata_bytes)"
        ))
    }

    /// Whether this is [`too_large`](Self::too_large).
    pub(crate) fn is_too_large(&self) -> bool {
        self.0.starts_with(METADATA_TOO_LARGE)
    }
}

const METADATA_TOO_LARGE: &str = "metadata too large";

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[0, object, method, deadline_ms, args]` (call) or `[1, object, method, ttl_ms, args]`
/// (signal).
#[cfg(test)]
pub(crate) fn encode_request<A: Serialize + ?Sized>(
    kind: u8,
    object: &str,
    method: &str,
    duration: Duration,
    args: &A,
) -> Result<Payload, WireError> {
    let (object, method) = (WireName::new(object), WireName::new(method));
    let args = |w: &mut Vec<u8>| value(w, args);
    encode_request_with(kind, object.encoded(), method.encoded(), duration, args)
}

/// A request (see `encode_request` in the tests) with the object and method names already
/// encoded (see [`WireName`]): clients encode their names once, not per call. `args`
/// writes the argument list (generated clients write it one argument at a time).
pub(crate) fn encode_request_with(
    kind: u8,
    object: &[u8],
    method: &[u8],
    duration: Duration,
    args: impl FnOnce(&mut Vec<u8>) -> Result<(), WireError>,
) -> Result<Payload, WireError> {
    encode(|w| {
        w.reserve(2 + object.len() + method.len() + 9);
        header(w, 5, kind);
        w.extend_from_slice(object);
        w.extend_from_slice(method);
        msgpack::write_uint(w, millis(duration));
        args(w)
    })
}

/// A request as [`encode_request_with`] makes it, with a `context` map (already encoded,
/// see [`encode_context`]) or without one: see [`add_context`].
#[cfg(test)]
pub(crate) fn encode_request_with_context(
    kind: u8,
    object: &[u8],
    method: &[u8],
    duration: Duration,
    context: Option<&[u8]>,
    args: impl FnOnce(&mut Vec<u8>) -> Result<(), WireError>,
) -> Result<Payload, WireError> {
    let plain = encode_request_with(kind, object, method, duration, args)?;
    match context {
        Some(context) => add_context(&plain, object.len() + method.len(), context),
        None => Ok(plain),
    }
}

/// The request `plain` (made by [`encode_request_with`], whose encoded object and method
/// names take `names` bytes) with a `context` map (already encoded, see
/// [`encode_context`]): of the kind + [`WITH_CONTEXT`], with the map between the
/// duration and the arguments. Made from the plain request rather than by a second
/// encoder of the arguments, so that a client's argument writer has one caller (the
/// plain path inlines it).
pub(crate) fn add_context(
    plain: &[u8],
    names: usize,
    context: &[u8],
) -> Result<Payload, WireError> {
    let at = 2 + names;
    let duration = match plain.get(at) {
        Some(0x00..=0x7f) => 1,
        Some(0xcc) => 2,
        Some(0xcd) => 3,
        Some(0xce) => 5,
        Some(0xcf) => 9,
        _ => 0,
    };
    let (Some(&[0x95, kind]), true) = (
        plain.get(..2),
        duration != 0 && at + duration <= plain.len(),
    ) else {
        return Err(WireError("not a plain request".to_owned()));
    };
    let (head, args) = plain.split_at(at + duration);
    encode(|w| {
        w.reserve(plain.len() + context.len());
        header(w, 6, kind + WITH_CONTEXT);
        w.extend_from_slice(&head[2..]);
        w.extend_from_slice(context);
        w.extend_from_slice(args);
        Ok(())
    })
}

/// Appends one metadata entry, as [`encode_context`] takes them.
pub(crate) fn put_entry(w: &mut Vec<u8>, key: &str, value: &str) {
    put_str(w, key);
    put_str(w, value);
}

/// The context map of a request: `entries` metadata entries already encoded (with
/// [`put_entry`]), then the trace context under `"traceparent"`. `None` when there is
/// nothing to send.
pub(crate) fn encode_context(
    entries: usize,
    encoded: &[u8],
    trace: Option<&crate::TraceParent>,
) -> Option<Vec<u8>> {
    let entries = entries + usize::from(trace.is_some());
    if entries == 0 {
        return None;
    }
    let mut w = Vec::with_capacity(5 + encoded.len() + 70);
    msgpack::write_map_len(&mut w, len32(entries));
    w.extend_from_slice(encoded);
    if let Some(trace) = trace {
        put_str(&mut w, TRACEPARENT);
        put_str(&mut w, &trace.to_string());
    }
    Some(w)
}

/// Checks a context map (a map of strings to strings, at most `max` bytes encoded) at
/// the start of `r`'s input, and returns its bytes.
fn read_context<'a>(r: &mut Reader<'a>, max: usize) -> Result<&'a [u8], WireError> {
    let start = r.remaining();
    let n = r.read_map_len().map_err(|e| bad("context", e))?;
    for _ in 0..n {
        r.read_str_bytes().map_err(|e| bad("context key", e))?;
        r.read_str_bytes().map_err(|e| bad("context value", e))?;
        if start.len() - r.remaining().len() > max {
            break;
        }
    }
    let size = start.len() - r.remaining().len();
    if size > max {
        return Err(WireError::too_large(size, max));
    }
    Ok(&start[..size])
}

/// Decodes a context map that [`read_context`] checked: the metadata, and the trace
/// context (a malformed one is ignored, logged at debug level: W3C trace context says a
/// receiver starts afresh rather than fail).
pub(crate) fn decode_context(context: &[u8]) -> (crate::Metadata, Option<crate::TraceParent>) {
    let mut metadata = crate::Metadata::new();
    let mut trace = None;
    let mut r = Reader::new(context);
    let n = r.read_map_len().unwrap_or(0);
    for _ in 0..n {
        let (Ok(key), Ok(value)) = (r.read_str_bytes(), r.read_str_bytes()) else {
            break;
        };
        let (key, value) = (String::from_utf8_lossy(key), String::from_utf8_lossy(value));
        if key == TRACEPARENT {
            match value.parse() {
                Ok(parsed) if trace.is_none() => trace = Some(parsed),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(traceparent = %value, error = %e, "malformed trace context ignored")
                }
            }
        } else {
            metadata.insert(key, value);
        }
    }
    (metadata, trace)
}

/// A name and its MessagePack string encoding, made once and copied into every envelope
/// that names it. One allocation: the name is the encoding's tail (after its header), not
/// a copy of its own. A client makes one per object it calls, that is, for a client made
/// per connection, one per connection (three before: the name, the encoding, and the
/// encoding shrunk to fit).
pub(crate) struct WireName {
    /// The encoded string: its header, then the name's bytes.
    encoded: Box<[u8]>,
    /// Where the name starts in `encoded` (the header's length: 1, 2, 3 or 5).
    start: u8,
}

/// A msgpack `str` header (at most 5 bytes), written on the stack.
#[derive(Default)]
struct StrHeader {
    bytes: [u8; 5],
    len: usize,
}

impl msgpack::Output for StrHeader {
    fn put_u8(&mut self, byte: u8) {
        self.put_slice(&[byte]);
    }

    fn put_slice(&mut self, bytes: &[u8]) {
        // A str header is at most 5 bytes: a longer write cannot come from
        // `write_str_len`, and is cut rather than panic.
        let end = (self.len + bytes.len()).min(self.bytes.len());
        let n = end - self.len;
        self.bytes[self.len..end].copy_from_slice(&bytes[..n]);
        self.len = end;
    }
}

impl WireName {
    pub(crate) fn new(name: &str) -> WireName {
        // The header first, on the stack (chatter-msgpack decides its length), so that
        // the one allocation has the exact size: `put_str` reserves room for the longest
        // header, which would grow the box.
        let mut head = StrHeader::default();
        msgpack::write_str_len(&mut head, len32(name.len()));
        let header = head.len;
        let mut encoded = Vec::with_capacity(header + name.len());
        encoded.extend_from_slice(&head.bytes[..header]);
        encoded.extend_from_slice(name.as_bytes());
        WireName {
            // Exactly the capacity asked for: no reallocation.
            encoded: encoded.into_boxed_slice(),
            start: header as u8,
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        // The tail is the `&str` `new` was given, so this never fails; checking it again
        // (a few instructions for a short name) keeps this crate free of `unsafe` here.
        std::str::from_utf8(&self.encoded[usize::from(self.start)..]).unwrap_or_default()
    }

    pub(crate) fn encoded(&self) -> &[u8] {
        &self.encoded
    }
}

impl std::fmt::Debug for WireName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// `[2, call]`: cancel the call whose conversation's first message had id `call`.
pub(crate) fn encode_cancel(call: u64) -> Payload {
    let mut w = Vec::with_capacity(11);
    header(&mut w, 2, CANCEL);
    msgpack::write_uint(&mut w, call);
    Payload::from_vec(w)
}

/// `[0, value]`.
pub(crate) fn encode_ok<T: Serialize + ?Sized>(v: &T) -> Result<Payload, WireError> {
    encode(|w| {
        header(w, 2, OK);
        value(w, v)
    })
}

/// `[1, [message, [chain...]], error]`.
pub(crate) fn encode_app_error<E: Serialize + ?Sized>(
    error: &E,
    context: &RemoteContext,
) -> Result<Payload, WireError> {
    let mut w = Vec::with_capacity(64);
    header(&mut w, 3, APP_ERROR);
    msgpack::write_array_len(&mut w, 2);
    put_str(&mut w, &context.message);
    msgpack::write_array_len(&mut w, len32(context.chain.len()));
    for cause in &context.chain {
        put_str(&mut w, cause);
    }
    value(&mut w, error)?;
    Ok(Payload::from_vec(w))
}

/// `[2, kind, message]`.
pub(crate) fn encode_failure(kind: FailureKind, message: &str) -> Payload {
    let mut w = Vec::with_capacity(8 + message.len());
    header(&mut w, 3, FAILURE);
    msgpack::write_uint(&mut w, kind as u64);
    put_str(&mut w, message);
    Payload::from_vec(w)
}

/// An encoded envelope, ready to send.
///
/// Envelopes are built in buffers recycled through a small per-thread pool: one is taken
/// for each call, reply or signal and given back when the payload has been copied into the
/// connection (which happens at once unless the peer's window is full), so the hot paths
/// neither allocate nor free per message. Envelopes that must be kept (queued, stored,
/// re-sent) become [`Bytes`] with [`into_bytes`](Self::into_bytes).
#[doc(hidden)]
pub struct Payload(Repr);

enum Repr {
    Pooled(Vec<u8>),
    Shared(Bytes),
}

/// Buffers kept per thread, and the largest capacity worth keeping: a pool of small
/// buffers for the common small envelopes, never a cache of large payloads (at most
/// 128 KiB per thread). Callers often make a batch of calls before the first is polled
/// (`join_all`, `FuturesUnordered`), each holding its buffer until then: with 16 buffers,
/// 3 of 4 pipelined calls still allocated one.
const POOL_MAX: usize = 128;
const POOLED_CAPACITY: usize = 1024;
/// The capacity of a new pooled buffer: most envelopes are far smaller.
const FIRST_CAPACITY: usize = 256;
/// Envelopes up to this size are copied out of their buffer when kept (the buffer goes
/// back to the pool); larger ones hand their buffer over.
const COPY_MAX: usize = 1024;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

impl Payload {
    /// An empty payload in a recycled buffer.
    fn pooled() -> Payload {
        let buf = POOL
            .try_with(|pool| pool.try_borrow_mut().ok()?.pop())
            .ok()
            .flatten()
            .unwrap_or_else(|| Vec::with_capacity(FIRST_CAPACITY));
        Payload(Repr::Pooled(buf))
    }

    /// An envelope built in `buf` (which is recycled when the payload is dropped).
    fn from_vec(buf: Vec<u8>) -> Payload {
        Payload(Repr::Pooled(buf))
    }

    /// The payload as `Bytes`, to keep.
    pub(crate) fn into_bytes(mut self) -> Bytes {
        match &mut self.0 {
            Repr::Shared(bytes) => std::mem::take(bytes),
            Repr::Pooled(buf) if buf.len() <= COPY_MAX => Bytes::copy_from_slice(buf),
            Repr::Pooled(buf) => Bytes::from(std::mem::take(buf)),
        }
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        let Repr::Pooled(buf) = &mut self.0 else {
            return;
        };
        if buf.capacity() == 0 || buf.capacity() > POOLED_CAPACITY {
            return;
        }
        let mut buf = std::mem::take(buf);
        buf.clear();
        // `try_with`: a payload dropped while the thread's locals are torn down is freed.
        let _ = POOL.try_with(|pool| {
            if let Ok(mut pool) = pool.try_borrow_mut() {
                if pool.len() < POOL_MAX {
                    pool.push(buf);
                }
            }
        });
    }
}

impl From<Bytes> for Payload {
    fn from(bytes: Bytes) -> Payload {
        Payload(Repr::Shared(bytes))
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Pooled(buf) => buf,
            Repr::Shared(bytes) => bytes,
        }
    }
}

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payload({} bytes)", self.len())
    }
}

/// Runs `build` on an empty recycled buffer and returns what it wrote.
fn encode(build: impl FnOnce(&mut Vec<u8>) -> Result<(), WireError>) -> Result<Payload, WireError> {
    let mut payload = Payload::pooled();
    let Repr::Pooled(buf) = &mut payload.0 else {
        unreachable!("a new payload is pooled")
    };
    build(buf)?;
    Ok(payload)
}

/// Decodes a caller-to-callee envelope; a context map (kinds 9 to 11) may take at most
/// `max_context` bytes.
pub(crate) fn decode_incoming(
    payload: &[u8],
    max_context: usize,
) -> Result<Incoming<'_>, WireError> {
    match decode_plain_request(payload) {
        Some(request) => Ok(request),
        None => decode_any_incoming(payload, max_context),
    }
}

/// Decodes a caller-to-callee envelope in any valid MessagePack form.
fn decode_any_incoming(payload: &[u8], max_context: usize) -> Result<Incoming<'_>, WireError> {
    let mut r = Reader::new(payload);
    let len = r.read_array_len().map_err(|e| bad("envelope", e))?;
    let kind: u8 = r.read_int().map_err(|e| bad("envelope kind", e))?;
    match (kind, len) {
        (CALL | SIGNAL, 5) | (CALL_CTX | SIGNAL_CTX, 6) => {
            let object = read_name(&mut r, "object name")?;
            let method = read_name(&mut r, "method name")?;
            let ms: u64 = r.read_int().map_err(|e| bad("duration", e))?;
            let duration = Duration::from_millis(ms);
            let context = match len {
                6 => Some(read_context(&mut r, max_context)?),
                _ => None,
            };
            let rd = r.remaining();
            if rd.is_empty() {
                return Err(WireError("missing arguments".into()));
            }
            Ok(if kind == CALL || kind == CALL_CTX {
                Incoming::Call {
                    object,
                    method,
                    deadline: duration,
                    context,
                    args: rd,
                }
            } else {
                Incoming::Signal {
                    object,
                    method,
                    ttl: duration,
                    context,
                    args: rd,
                }
            })
        }
        (CANCEL, 2) => {
            let call: u64 = r.read_int().map_err(|e| bad("call id", e))?;
            Ok(Incoming::Cancel { call })
        }
        (RELIABLE, 7) => reliable::decode_reliable(r, None),
        (RELIABLE_CTX, 8) => reliable::decode_reliable(r, Some(max_context)),
        (ACK, 4) => reliable::decode_ack(r),
        (stream::STREAM_CALL, 6) | (stream::STREAM_CALL_CTX, 7) => {
            let object = read_name(&mut r, "object name")?;
            let method = read_name(&mut r, "method name")?;
            let ms: u64 = r.read_int().map_err(|e| bad("duration", e))?;
            let window: u64 = r.read_int().map_err(|e| bad("window", e))?;
            let context = match len {
                7 => Some(read_context(&mut r, max_context)?),
                _ => None,
            };
            let args = r.remaining();
            if args.is_empty() {
                return Err(WireError("missing arguments".into()));
            }
            Ok(Incoming::StreamCall {
                object,
                method,
                deadline: Duration::from_millis(ms),
                window,
                context,
                args,
            })
        }
        (stream::OPEN_ARGUMENT, 2) => {
            let call = r.read_int().map_err(|e| bad("call id", e))?;
            r.finish().map_err(|e| bad("envelope", e))?;
            Ok(Incoming::OpenArgument { call })
        }
        (stream::GRANT_RESULT, 3) => {
            let call = r.read_int().map_err(|e| bad("call id", e))?;
            let bytes = r.read_int().map_err(|e| bad("grant", e))?;
            r.finish().map_err(|e| bad("envelope", e))?;
            Ok(Incoming::GrantResult { call, bytes })
        }
        (kind, len) => Err(WireError(format!(
            "unknown envelope kind {kind} with {len} elements"
        ))),
    }
}

/// Decodes a call or signal in the form encoders write for short names (fixarray, fixstr
/// names, an unsigned duration), the common case, without the general MessagePack reader.
/// `None` for anything else, left to the general decoder (which also makes the errors).
fn decode_plain_request(payload: &[u8]) -> Option<Incoming<'_>> {
    let (&[len, kind], rest) = payload.split_first_chunk::<2>()?;
    if len != 0x95 || !(kind == CALL || kind == SIGNAL) {
        return None;
    }
    let (object, rest) = plain_name(rest)?;
    let (method, rest) = plain_name(rest)?;
    let (&tag, rest) = rest.split_first()?;
    let (ms, args) = match tag {
        0x00..=0x7f => (u64::from(tag), rest),
        0xcc..=0xcf => {
            let n = 1 << (tag - 0xcc);
            let (bytes, args) = rest.split_at_checked(n)?;
            (
                bytes.iter().fold(0, |acc, &b| (acc << 8) | u64::from(b)),
                args,
            )
        }
        _ => return None,
    };
    if args.is_empty() {
        return None;
    }
    let duration = Duration::from_millis(ms);
    Some(if kind == CALL {
        Incoming::Call {
            object,
            method,
            deadline: duration,
            context: None,
            args,
        }
    } else {
        Incoming::Signal {
            object,
            method,
            ttl: duration,
            context: None,
            args,
        }
    })
}

/// A fixstr (under 32 bytes) and what follows it.
fn plain_name(rd: &[u8]) -> Option<(Name<'_>, &[u8])> {
    let (&tag, rest) = rd.split_first()?;
    if !(0xa0..=0xbf).contains(&tag) {
        return None;
    }
    let (s, rest) = rest.split_at_checked(usize::from(tag & 0x1f))?;
    Some((Name(s), rest))
}

/// A MessagePack string of any length (its bytes, see [`Name`]).
fn read_name<'a>(r: &mut Reader<'a>, what: &str) -> Result<Name<'a>, WireError> {
    r.read_str_bytes().map(Name).map_err(|e| bad(what, e))
}

/// A name (or any string's bytes) as a MessagePack string in its shortest form.
fn put_name(w: &mut Vec<u8>, name: Name<'_>) {
    let bytes = name.as_bytes();
    w.reserve(5 + bytes.len());
    msgpack::write_str_len(w, len32(bytes.len()));
    w.extend_from_slice(bytes);
}

/// Decodes a reply envelope.
pub(crate) fn decode_reply(payload: &[u8]) -> Result<Reply<'_>, WireError> {
    // The common case, `[0, value]` as encoders write it, without the generic reader.
    if let [0x92, OK, value @ ..] = payload {
        if !value.is_empty() {
            return Ok(Reply::Ok(value));
        }
    }
    let mut r = Reader::new(payload);
    let len = r.read_array_len().map_err(|e| bad("reply", e))?;
    let status: u8 = r.read_int().map_err(|e| bad("reply status", e))?;
    match (status, len) {
        (OK, 2) if !r.is_empty() => Ok(Reply::Ok(r.remaining())),
        (APP_ERROR, 3) => {
            let n = r.read_array_len().map_err(|e| bad("error context", e))?;
            if n != 2 {
                return Err(WireError("error context must have 2 elements".into()));
            }
            let message = read_str(&mut r, "error message")?;
            let n = r.read_array_len().map_err(|e| bad("error chain", e))?;
            let mut chain = Vec::with_capacity(n.min(64) as usize);
            for _ in 0..n {
                chain.push(read_str(&mut r, "error chain")?.to_owned());
            }
            let rd = r.remaining();
            if rd.is_empty() {
                return Err(WireError("missing application error value".into()));
            }
            Ok(Reply::AppError {
                context: RemoteContext {
                    message: message.to_owned(),
                    chain,
                },
                error: rd,
            })
        }
        (FAILURE, 3) => {
            let kind: u8 = r.read_int().map_err(|e| bad("failure kind", e))?;
            let message = read_str(&mut r, "failure message")?;
            Ok(Reply::Failure {
                kind: FailureKind::from_u8(kind).ok_or(kind),
                message: message.to_owned(),
            })
        }
        (status, len) => Err(WireError(format!(
            "unknown reply status {status} with {len} elements"
        ))),
    }
}

/// Decodes one embedded user value.
pub(crate) fn decode_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    codec::decode(bytes).map_err(|e| decode_error(std::any::type_name::<T>(), e))
}

#[cold]
#[inline(never)]
pub(crate) fn decode_error(type_name: &str, e: DecodeError) -> WireError {
    match e {
        DecodeError::DepthLimitExceeded => WireError(format!(
            "cannot decode {type_name}: nested more than {} levels deep",
            codec::MAX_DEPTH
        )),
        e => WireError(format!("cannot decode {type_name}: {e}")),
    }
}

/// The array header and kind of an envelope, in the shortest forms. The common case (a
/// fixarray and a fixint kind) is a single two-byte store: this runs for every call, reply
/// and signal. (Inlined: the sizes and kinds are constants where it is called.)
#[inline(always)]
fn header(w: &mut Vec<u8>, len: u32, kind: u8) {
    if len < 16 && kind < 0x80 {
        w.extend_from_slice(&[0x90 | len as u8, kind]);
    } else {
        msgpack::write_array_len(w, len);
        msgpack::write_uint(w, u64::from(kind));
    }
}

/// A MessagePack string in its shortest form.
fn put_str(w: &mut Vec<u8>, s: &str) {
    put_name(w, Name(s.as_bytes()));
}

/// Appends one user value.
#[inline(always)]
pub(crate) fn value<T: Serialize + ?Sized>(w: &mut Vec<u8>, v: &T) -> Result<(), WireError> {
    codec::encode(w, v).map_err(|e| encode_error(std::any::type_name::<T>(), e))
}

#[cold]
#[inline(never)]
fn encode_error(type_name: &str, e: EncodeError) -> WireError {
    WireError(format!("cannot encode {type_name}: {e}"))
}

/// Whole milliseconds, rounded up: a duration that is not zero never goes as 0, which the
/// receiver takes for "already expired" (PROTOCOL.md, "Durations").
fn millis(d: Duration) -> u64 {
    let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn read_str<'a>(r: &mut Reader<'a>, what: &str) -> Result<&'a str, WireError> {
    r.read_str().map_err(|e| bad(what, e))
}

fn bad(what: &str, e: impl std::fmt::Display) -> WireError {
    WireError(format!("bad {what}: {e}"))
}

/// PROTOCOL.md's examples, read back for the tests that check them (here, in
/// `wire/reliable.rs` and in `introspect.rs`).
#[cfg(test)]
pub(crate) mod protocol_doc {
    /// PROTOCOL.md, for checking that its examples are what the code writes.
    const DOC: &str = include_str!("../PROTOCOL.md");

    fn unhex(hex: &str) -> Vec<u8> {
        hex.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
            .collect()
    }

    /// The bytes of the first code block after `marker` in PROTOCOL.md: the leading hex
    /// bytes of each line (annotations follow them).
    pub(crate) fn doc_block(marker: &str) -> Vec<u8> {
        let at = DOC
            .find(marker)
            .unwrap_or_else(|| panic!("not in PROTOCOL.md: {marker}"));
        let rest = &DOC[at..];
        let open = rest.find("```").expect("a code block") + 3;
        let body = &rest[open..];
        let body = &body[body.find('\n').expect("fence line") + 1..];
        let body = &body[..body.find("```").expect("closing fence")];
        let mut bytes = Vec::new();
        for line in body.lines() {
            for token in line.split_whitespace() {
                match u8::from_str_radix(token, 16) {
                    Ok(b) if token.len() == 2 => bytes.push(b),
                    _ => break,
                }
            }
        }
        bytes
    }

    /// `hex` appears in PROTOCOL.md as written, in backquotes.
    pub(crate) fn inline_in_doc(hex: &str, bytes: &[u8]) {
        assert!(
            DOC.contains(&format!("`{hex}`")),
            "not in PROTOCOL.md: `{hex}`"
        );
        assert_eq!(unhex(hex), bytes, "{hex}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_of_every_header_length_encode_as_strings_and_keep_the_name() {
        for len in [0, 1, 31, 32, 255, 256, 65_535, 65_536] {
            let name = "é".repeat(len / 2) + &"n".repeat(len % 2);
            let wire = WireName::new(&name);
            assert_eq!(wire.as_str(), name, "length {len}");
            let mut expected = Vec::new();
            put_str(&mut expected, &name);
            assert_eq!(wire.encoded(), expected.as_slice(), "length {len}");
            let mut r = Reader::new(wire.encoded());
            assert_eq!(r.read_str().expect("a string"), name, "length {len}");
            assert!(r.is_empty(), "length {len}");
        }
    }

    #[test]
    fn values_nested_too_deep_say_so_by_type() {
        let bomb = [[0x91u8; 600].as_slice(), &[0xc0]].concat();
        let err = decode_value::<serde::de::IgnoredAny>(&bomb).unwrap_err();
        assert!(err.0.starts_with("cannot decode "), "{}", err.0);
        assert!(
            err.0
                .ends_with("IgnoredAny: nested more than 512 levels deep"),
            "{}",
            err.0
        );
        let err = decode_value::<(i32, i32)>(b"\x92\x01").unwrap_err();
        assert!(err.0.starts_with("cannot decode (i32, i32): "), "{}", err.0);
    }

    #[test]
    fn payload_buffers_are_recycled_but_large_ones_are_not_kept() {
        let pooled = || POOL.with(|pool| pool.borrow().len());
        let first = encode_ok(&1).unwrap();
        let at = first.as_ptr();
        drop(first);
        assert_eq!(pooled(), 1);
        let second = encode_ok(&2).unwrap();
        assert_eq!(second.as_ptr(), at, "the buffer is reused");
        assert_eq!(pooled(), 0);
        // Kept as `Bytes`: a small envelope is copied and its buffer goes back.
        assert_eq!(second.into_bytes().as_ref(), b"\x92\x00\x02");
        assert_eq!(pooled(), 1);
        let large = encode_ok(&"x".repeat(COPY_MAX * 2)).unwrap();
        drop(large);
        assert_eq!(pooled(), 0, "a large buffer is freed, not kept");
        let many: Vec<_> = (0..POOL_MAX + 10).map(|i| encode_ok(&i).unwrap()).collect();
        drop(many);
        assert_eq!(pooled(), POOL_MAX);
    }

    #[test]
    fn call_round_trip_and_hex() {
        let bytes = encode_request(
            CALL,
            "calc",
            "add",
            Duration::from_millis(1500),
            &(2i64, 3i64),
        )
        .unwrap();
        // [0, "calc", "add", 1500, [2, 3]]
        assert_eq!(
            bytes.as_ref(),
            b"\x95\x00\xa4calc\xa3add\xcd\x05\xdc\x92\x02\x03".as_ref()
        );
        let Incoming::Call {
            object,
            method,
            deadline,
            context: None,
            args,
        } = decode_incoming(&bytes, 8192).unwrap()
        else {
            panic!("not a call")
        };
        assert_eq!((object, method), (Name(b"calc"), Name(b"add")));
        assert_eq!(deadline, Duration::from_millis(1500));
        assert_eq!(decode_value::<(i64, i64)>(args).unwrap(), (2, 3));
    }

    #[test]
    fn signal_and_cancel_round_trip() {
        let bytes = encode_request(SIGNAL, "o", "m", Duration::from_secs(30), &()).unwrap();
        assert!(matches!(
            decode_incoming(&bytes, 8192).unwrap(),
            Incoming::Signal { ttl, .. } if ttl == Duration::from_secs(30)
        ));
        let bytes = encode_cancel(300);
        assert_eq!(bytes.as_ref(), b"\x92\x02\xcd\x01\x2c".as_ref());
        assert_eq!(
            decode_incoming(&bytes, 8192).unwrap(),
            Incoming::Cancel { call: 300 }
        );
    }

    #[test]
    fn replies_round_trip() {
        let ok = encode_ok(&5i64).unwrap();
        assert_eq!(ok.as_ref(), b"\x92\x00\x05".as_ref());
        assert_eq!(decode_reply(&ok).unwrap(), Reply::Ok(b"\x05"));

        let ctx = RemoteContext {
            message: "outer".into(),
            chain: vec!["inner".into()],
        };
        let err = encode_app_error("nope", &ctx).unwrap();
        let Reply::AppError { context, error } = decode_reply(&err).unwrap() else {
            panic!("not an app error")
        };
        assert_eq!(context, ctx);
        assert_eq!(decode_value::<String>(error).unwrap(), "nope");

        let f = encode_failure(FailureKind::NoSuchMethod, "sub");
        assert_eq!(
            decode_reply(&f).unwrap(),
            Reply::Failure {
                kind: Ok(FailureKind::NoSuchMethod),
                message: "sub".into()
            }
        );
    }

    use super::protocol_doc::{doc_block, inline_in_doc};

    #[derive(serde::Serialize)]
    enum CalcError {
        DivisionByZero,
        Overflow { op: String, detail: String },
    }

    #[test]
    fn protocol_md_stream_examples() {
        use super::stream::*;
        let (object, method) = (WireName::new("s"), WireName::new("count"));
        let call = encode_stream_call(
            object.encoded(),
            method.encoded(),
            Duration::from_secs(1),
            262_144,
            None,
            |w| value(w, &(3,)),
        )
        .unwrap();
        assert_eq!(doc_block("The stream call `count(3)`"), &call[..]);
        inline_in_doc("92 00 c0", encode_ok(&()).unwrap().as_ref());
        let items = |values: &[u32]| {
            let mut batch = ItemBatch::new();
            for v in values {
                value(batch.buf(), v).unwrap();
                batch.added();
            }
            batch.payload().to_vec()
        };
        for (hex, i) in [("92 03 00", 0u32), ("92 03 01", 1), ("92 03 02", 2)] {
            inline_in_doc(hex, &items(&[i]));
        }
        inline_in_doc("94 03 00 01 02", &items(&[0, 1, 2]));
        assert_eq!(crate::stream::cost(5, 3), 197);
        inline_in_doc("91 04", encode_bare(END).as_ref());
        inline_in_doc("91 06", encode_bare(STOP).as_ref());
        let grant = CallerStreamMsg::GrantResult {
            call: 300,
            bytes: 131_072,
        };
        inline_in_doc(
            "93 0f cd 01 2c ce 00 02 00 00",
            encode_caller_msg(&grant).as_ref(),
        );
        inline_in_doc("92 05 ce 00 04 00 00", encode_grant(262_144).as_ref());
        let open = CallerStreamMsg::OpenArgument { call: 300 };
        inline_in_doc("92 0e cd 01 2c", encode_caller_msg(&open).as_ref());
        inline_in_doc(
            "93 02 0a a3 6d 61 78",
            encode_failure(FailureKind::TooManyStreams, "max").as_ref(),
        );
        assert_eq!(crate::stream::cost(3, 1), 67);
    }

    #[test]
    fn protocol_md_examples() {
        let call = encode_request(CALL, "calc", "add", Duration::from_millis(1500), &(2, 3));
        assert_eq!(doc_block("`add(2, 3)` on object"), call.unwrap().as_ref());
        inline_in_doc("92 00 05", encode_ok(&5).unwrap().as_ref());
        inline_in_doc("92 02 cd 01 2c", encode_cancel(300).as_ref());
        inline_in_doc(
            "93 02 04 a3 73 75 62",
            encode_failure(FailureKind::NoSuchMethod, "sub").as_ref(),
        );
        inline_in_doc(
            "93 02 08 ad 73 68 75 74 74 69 6e 67 20 64 6f 77 6e",
            encode_failure(FailureKind::ShuttingDown, "shutting down").as_ref(),
        );

        let ctx = RemoteContext {
            message: "division by zero".into(),
            chain: vec![],
        };
        let err = encode_app_error(&CalcError::DivisionByZero, &ctx).unwrap();
        assert_eq!(doc_block("`div(1, 0)` failing"), err.as_ref());
        let ctx = RemoteContext {
            message: "overflow in div".into(),
            chain: vec!["too big".into()],
        };
        let overflow = CalcError::Overflow {
            op: "div".into(),
            detail: "too big".into(),
        };
        let err = encode_app_error(&overflow, &ctx).unwrap();
        assert_eq!(
            doc_block("whose `Display` is `overflow in div`"),
            err.as_ref()
        );

        // Kind 9 and 10: the context map before the arguments.
        let tp: crate::TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap();
        let mut entries = Vec::new();
        put_entry(&mut entries, "user", "ada");
        let context = encode_context(1, &entries, Some(&tp)).unwrap();
        let (object, method) = (WireName::new("calc"), WireName::new("add"));
        let (object, method) = (object.encoded(), method.encoded());
        let ms = Duration::from_millis(1500);
        let call = encode_request_with_context(CALL, object, method, ms, Some(&context), |w| {
            value(w, &(2, 3))
        });
        let call = call.unwrap();
        assert_eq!(
            doc_block("the metadata `user: ada` and a trace context"),
            &call[..]
        );
        let Ok(Incoming::Call {
            context: Some(raw),
            args,
            ..
        }) = decode_incoming(&call, 8192)
        else {
            panic!("not a call with a context")
        };
        assert_eq!(args, b"\x92\x02\x03");
        let (metadata, trace) = decode_context(raw);
        assert_eq!(metadata, crate::Metadata::new().with("user", "ada"));
        assert_eq!(trace, Some(tp));
        // One byte over the limit: refused as too large.
        let err = decode_incoming(&call, raw.len() - 1).unwrap_err();
        assert!(err.is_too_large(), "{err}");
        assert!(decode_incoming(&call, raw.len()).is_ok());
        let mut entries = Vec::new();
        put_entry(&mut entries, "a", "b");
        let context = encode_context(1, &entries, None).unwrap();
        let (object, method) = (WireName::new("log"), WireName::new("line"));
        let ttl = Duration::from_secs(4);
        let signal = encode_request_with_context(
            SIGNAL,
            object.encoded(),
            method.encoded(),
            ttl,
            Some(&context),
            |w| value(w, &("hi",)),
        );
        inline_in_doc(
            "96 0a a3 6c 6f 67 a4 6c 69 6e 65 cd 0f a0 81 a1 61 a1 62 91 a2 68 69",
            &signal.unwrap(),
        );
        inline_in_doc(
            "93 02 09 a5 62 69 67 21 21",
            &encode_failure(FailureKind::MetadataTooLarge, "big!!"),
        );

        // No arguments: nil.
        let bytes = encode_request(CALL, "o", "m", Duration::ZERO, &()).unwrap();
        assert_eq!(bytes.as_ref(), b"\x95\x00\xa1o\xa1m\x00\xc0".as_ref());
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Point {
        x: i32,
        y: i32,
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Unit;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    enum Shape {
        Empty,
        Rect(i32, i32),
        Named { w: i32 },
    }

    fn value_bytes<T: Serialize>(v: &T) -> Vec<u8> {
        let mut w = Vec::new();
        value(&mut w, v).unwrap();
        w
    }

    /// The table "Values: what each type looks like on the wire".
    #[test]
    fn protocol_md_value_shapes() {
        inline_in_doc("c3", &value_bytes(&true));
        inline_in_doc("cd 01 2c", &value_bytes(&300u64));
        inline_in_doc("ff", &value_bytes(&-1i8));
        inline_in_doc("ca 3f c0 00 00", &value_bytes(&1.5f32));
        inline_in_doc("cb 3f f8 00 00 00 00 00 00", &value_bytes(&1.5f64));
        inline_in_doc("a2 68 69", &value_bytes(&"hi"));
        inline_in_doc("c4 03 01 02 ff", &value_bytes(&vec![1u8, 2, 255]));
        inline_in_doc("93 01 02 cc ff", &value_bytes(&[1u8, 2, 255]));
        inline_in_doc("92 01 a1 61", &value_bytes(&(1, "a")));
        inline_in_doc(
            "81 a1 61 01",
            &value_bytes(
                &[("a", 1)]
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            ),
        );
        inline_in_doc("82 a1 78 01 a1 79 02", &value_bytes(&Point { x: 1, y: 2 }));
        inline_in_doc("90", &value_bytes(&Unit));
        inline_in_doc("a5 45 6d 70 74 79", &value_bytes(&Shape::Empty));
        inline_in_doc(
            "81 a4 52 65 63 74 92 01 02",
            &value_bytes(&Shape::Rect(1, 2)),
        );
        inline_in_doc(
            "81 a5 4e 61 6d 65 64 81 a1 77 03",
            &value_bytes(&Shape::Named { w: 3 }),
        );
        // What is also accepted.
        assert_eq!(
            decode_value::<Point>(b"\x92\x01\x02").unwrap(),
            Point { x: 1, y: 2 }
        );
        assert_eq!(decode_value::<Unit>(b"\xc0").unwrap(), Unit);
        let empty_as_map = b"\x81\xa5Empty\xc0";
        assert_eq!(decode_value::<Shape>(empty_as_map).unwrap(), Shape::Empty);
        assert_eq!(decode_value::<Vec<u8>>(b"\x92\x01\x02").unwrap(), [1, 2]);
        assert_eq!(
            decode_value::<[u8; 2]>(b"\xc4\x02\x01\x02").unwrap(),
            [1, 2]
        );
        assert_eq!(decode_value::<f64>(b"\x01").unwrap(), 1.0);
        assert!(decode_value::<u8>(b"\xcd\x01\x2c").is_err());
    }

    #[test]
    fn durations_go_in_whole_milliseconds_rounded_up() {
        let ms = |d: Duration| {
            let bytes = encode_request(CALL, "o", "m", d, &()).unwrap();
            match decode_incoming(&bytes, 8192).unwrap() {
                Incoming::Call { deadline, .. } => deadline,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(ms(Duration::ZERO), Duration::ZERO);
        assert_eq!(ms(Duration::from_micros(1)), Duration::from_millis(1));
        assert_eq!(ms(Duration::from_micros(1500)), Duration::from_millis(2));
        assert_eq!(ms(Duration::from_millis(7)), Duration::from_millis(7));
        assert_eq!(ms(Duration::MAX), Duration::from_millis(u64::MAX));
        // A non-negative duration in a signed format is accepted (PROTOCOL.md, Durations).
        let signed = b"\x95\x00\xa1o\xa1m\xd0\x05\xc0";
        assert!(matches!(
            decode_incoming(signed, 8192).unwrap(),
            Incoming::Call { deadline, .. } if deadline == Duration::from_millis(5)
        ));
    }

    #[test]
    fn hand_written_headers_match_the_codec() {
        // chatter-msgpack's writers are checked against rmp's in that crate.
        for len in [0, 1, 31, 32, 255, 256, 70_000] {
            let s = "x".repeat(len);
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            put_str(&mut ours, &s);
            msgpack::write_str(&mut theirs, &s);
            assert_eq!(ours, theirs, "{len}");
        }
        for (len, kind) in [(2, 0), (5, 4), (15, 127), (16, 0), (3, 128)] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            header(&mut ours, len, kind);
            msgpack::write_array_len(&mut theirs, len);
            msgpack::write_uint(&mut theirs, u64::from(kind));
            assert_eq!(ours, theirs, "{len} {kind}");
        }
    }

    #[test]
    fn plain_requests_decode_as_the_general_decoder_does() {
        let long = "o".repeat(40);
        for (kind, object, ms) in [
            (CALL, "calc", 0),
            (SIGNAL, "calc", 127),
            (CALL, "x", 200),
            (SIGNAL, "y", 70_000),
            (CALL, "z", u64::MAX),
            (CALL, long.as_str(), 5),
        ] {
            let bytes =
                encode_request(kind, object, "m", Duration::from_millis(ms), &(1, 2)).unwrap();
            let plain = decode_plain_request(&bytes);
            // Long names are left to the general decoder.
            assert_eq!(plain.is_some(), object.len() < 32, "{object}");
            if let Some(plain) = plain {
                assert_eq!(Ok(plain), decode_any_incoming(&bytes, 8192));
            }
        }
        // Signed durations and bad UTF-8 are not plain.
        assert!(decode_plain_request(b"\x95\x00\xa1o\xa1m\xd0\x05\xc0").is_none());

        assert!(decode_plain_request(b"\x95\x00\xa1o\xa1m\x05").is_none());
        assert!(decode_incoming(b"\x95\x00\xa1o\xa1m\xd0\x05\xc0", 8192).is_ok());
        // Names are bytes: one that is not UTF-8 decodes (the same in both decoders, long
        // or short) and then matches no object.
        let bad_name = b"\x95\x00\xa1\xff\xa1m\x05\xc0";
        let long_bad_name = b"\x95\x00\xd9\x01\xff\xa1m\x05\xc0";
        for bytes in [&bad_name[..], long_bad_name] {
            let Ok(Incoming::Call { object, .. }) = decode_incoming(bytes, 8192) else {
                panic!("{bytes:x?} does not decode");
            };
            assert_eq!(object, Name(b"\xff"));
            assert_eq!(object.to_string(), "\u{fffd}");
        }
        assert_eq!(
            decode_plain_request(bad_name),
            decode_any_incoming(bad_name, 8192).ok()
        );
    }

    #[test]
    fn contexts_must_be_maps_of_strings() {
        for input in [
            &b"\x96\x09\xa1o\xa1m\x05\x80"[..],
            b"\x96\x09\xa1o\xa1m\x05\x81\xa1k\x01\xc0",
            b"\x96\x09\xa1o\xa1m\x05\x91\xa1k\xc0",
            b"\x96\x0a\xa1o\xa1m\x05\x81\xa1k\xa1",
            b"\x95\x09\xa1o\xa1m\x05\xc0",
            b"\x97\x0b\x01\x01\xa1o\xa1m\x05\x80",
        ] {
            let err = decode_incoming(input, 8192).unwrap_err();
            assert!(!err.is_too_large(), "{input:x?}: {err}");
        }
        // An empty map is a context without entries.
        let empty = b"\x96\x09\xa1o\xa1m\x05\x80\xc0";
        assert!(matches!(
            decode_incoming(empty, 8192),
            Ok(Incoming::Call {
                context: Some(b"\x80"),
                ..
            })
        ));
        let reliable = b"\x98\x0b\x01\x02\xa1o\xa1m\x05\x81\xa1k\xa1v\xc0";
        assert!(matches!(
            decode_incoming(reliable, 8192),
            Ok(Incoming::Reliable {
                stream: 1,
                seq: 2,
                context: Some(_),
                ..
            })
        ));
        // Over the limit (5 bytes, limit 4): still addressed, to be acknowledged.
        assert!(matches!(
            decode_incoming(reliable, 4),
            Ok(Incoming::ReliableTooLarge {
                stream: 1,
                seq: 2,
                what,
            }) if what.is_too_large()
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for input in [
            &b""[..],
            b"\xc1",
            b"\x95\x00",
            b"\x95\x00\xa4cal",
            b"\x92\x09\x00",
            b"\x93\x01\x92\xa1x",
            b"\x93\x02\x63\xa1x",
            b"\x95\x00\xa1o\xa1m\x01",
        ] {
            assert!(decode_incoming(input, 8192).is_err(), "{input:x?}");
            assert!(decode_reply(input).is_err() || input == b"\x93\x02\x63\xa1x");
        }
    }
}
