//! Per-call context: what a handler can learn about the call it serves ([`CallContext`]),
//! the [`Metadata`] a caller attaches to its calls and signals, and the W3C trace context
//! ([`TraceParent`]) that joins a call's spans across processes.
//!
//! A handler does not take the context as a parameter: it asks for it while it runs,
//! with [`CallContext::current`] (a tokio task-local, set only around the handler's polls,
//! so `None` anywhere else). The context is made of what the serving path has at hand
//! anyway (the connection handle, the received envelope, the time of receipt): asking for
//! it costs nothing until a handler does.

use std::cell::Cell;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chatter_core::{Address, Connection};
use tokio::time::Instant;

/// What a handler can learn about the call (or signal) it serves: who called, the time
/// left, the object and method, the caller's [`Metadata`] and trace context.
///
/// Available inside a handler (and in whatever the handler's task awaits) through
/// [`CallContext::current`]; `None` outside one.
///
/// ```
/// use chatter_rpc::{remote, CallContext};
///
/// #[remote]
/// pub trait Whoami {
///     async fn whoami(&self) -> String;
/// }
///
/// struct Me;
/// impl Whoami for Me {
///     async fn whoami(&self) -> String {
///         let cx = CallContext::current().expect("inside a handler");
///         let user = cx.metadata().get("user").unwrap_or("nobody");
///         format!("{user} from {} ({:?} left)", cx.remote_address(), cx.remaining())
///     }
/// }
/// assert!(CallContext::current().is_none());
/// ```
#[derive(Clone)]
pub struct CallContext {
    conn: Connection,
    /// The envelope as received; `object` and `method` are ranges in it.
    envelope: Bytes,
    object: Range<u32>,
    method: Range<u32>,
    signal: bool,
    /// The call's deadline or the signal's TTL as an instant.
    deadline: Instant,
    /// The metadata and trace context the caller sent (kinds 9, 10, 11), if any.
    sent: Option<Arc<Received>>,
}

/// What a caller sent besides its arguments: decoded once, on receipt.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Received {
    pub(crate) metadata: Metadata,
    pub(crate) trace: Option<TraceParent>,
    /// The id of this side's span for the call (the parent id of the calls its handler
    /// makes), when the caller sent a trace context.
    pub(crate) span_id: u64,
}

tokio::task_local! {
    /// The context of a handler that runs in a task of its own (one that did not complete
    /// on its first poll, or that waited for a slot).
    static CURRENT: CallContext;
}

/// A request as the serving path has it at hand (borrowed from the received message),
/// made into a [`CallContext`] only when a handler asks for one: the receive task polls
/// most handlers in place, and one that completes on its first poll (most do) then costs
/// two stores for its context (see [`Request::poll_inline`]).
pub(crate) struct Request<'a> {
    pub(crate) conn: &'a Connection,
    /// The envelope as received; `object` and `method` lie in it.
    pub(crate) envelope: &'a Bytes,
    pub(crate) object: &'a [u8],
    pub(crate) method: &'a [u8],
    pub(crate) signal: bool,
    /// The deadline or TTL, counted from receipt.
    pub(crate) time: Duration,
    /// What the caller sent besides its arguments, if anything.
    pub(crate) sent: Option<&'a Arc<Received>>,
}

thread_local! {
    /// The [`Request`] whose handler this thread is polling in place, or null: set by
    /// [`Request::poll_inline`] for the poll only.
    static INLINE: Cell<*const ()> = const { Cell::new(std::ptr::null()) };
}

/// How many received trace contexts are alive: while none is, a call made anywhere
/// cannot be inside a traced handler, and skips looking for one.
static TRACES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl CallContext {
    /// The context of the call the current handler serves; `None` outside a handler.
    pub fn current() -> Option<CallContext> {
        // Innermost first: a receive task driven inside a handler's task may poll other
        // handlers in place, never the other way round.
        let inline = Request::with_polled_inline(|request| {
            // Polled in place right after it was taken off the connection: now is when
            // it arrived.
            request.map(|r| r.context(crate::peer::instant_after(Instant::now(), r.time)))
        });
        if inline.is_some() {
            return inline;
        }
        CURRENT.try_with(CallContext::clone).ok()
    }

    /// Runs `f` with the current handler's context.
    ///
    /// ```
    /// use chatter_rpc::CallContext;
    /// // Outside a handler: none.
    /// assert_eq!(CallContext::with_current(|cx| cx.map(|cx| cx.method().to_owned())), None);
    /// ```
    pub fn with_current<R>(f: impl FnOnce(Option<&CallContext>) -> R) -> R {
        f(CallContext::current().as_ref())
    }

    /// The caller's address (for TCP, its IP address and port).
    pub fn remote_address(&self) -> &Address {
        self.conn.remote_address()
    }

    /// This side's address of the connection the call came in on.
    pub fn local_address(&self) -> &Address {
        self.conn.local_address()
    }

    /// The certificate chain the caller presented (DER, leaf first) on a TLS connection
    /// with client authentication; `None` on other transports.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn peer_certificates(&self) -> Option<&[chatter_core::tls::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// The name of the object called.
    pub fn object(&self) -> &str {
        self.part(&self.object)
    }

    /// The name of the method called.
    pub fn method(&self) -> &str {
        self.part(&self.method)
    }

    /// True for a signal (no reply), false for a call.
    pub fn is_signal(&self) -> bool {
        self.signal
    }

    /// When the call's deadline (or the signal's TTL) runs out: after it the caller no
    /// longer waits, and the handler is dropped. (Counted from when the request was
    /// taken off the connection.)
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// How much of the deadline (or TTL) is left now.
    pub fn remaining(&self) -> Duration {
        self.deadline().saturating_duration_since(Instant::now())
    }

    /// The metadata the caller attached (empty if none).
    pub fn metadata(&self) -> &Metadata {
        static EMPTY: Metadata = Metadata {
            entries: Vec::new(),
        };
        self.sent.as_ref().map_or(&EMPTY, |sent| &sent.metadata)
    }

    /// The caller's trace context, as it arrived (its `parent_id` is the caller's span).
    /// A malformed `traceparent` is ignored (logged at debug level): this is then `None`.
    pub fn trace_parent(&self) -> Option<TraceParent> {
        self.sent.as_ref().and_then(|sent| sent.trace)
    }

    /// The trace context the calls made by this handler carry: the caller's trace id,
    /// with this call's span as their parent. `None` when the caller sent none.
    pub fn child_trace_parent(&self) -> Option<TraceParent> {
        let sent = self.sent.as_ref()?;
        sent.trace.map(|trace| trace.with_parent(sent.span_id))
    }

    fn part(&self, range: &Range<u32>) -> &str {
        let range = range.start as usize..range.end as usize;
        // Names were matched against registered (UTF-8) names before a handler ran.
        self.envelope
            .get(range)
            .and_then(|name| std::str::from_utf8(name).ok())
            .unwrap_or_default()
    }
}

impl fmt::Debug for CallContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallContext")
            .field("remote", self.remote_address())
            .field("object", &self.object())
            .field("method", &self.method())
            .field("signal", &self.signal)
            .field("remaining", &self.remaining())
            .field("metadata", self.metadata())
            .field("trace_parent", &self.trace_parent())
            .finish()
    }
}

/// Crate-internal: how the serving path installs contexts.
impl CallContext {
    /// `fut` with `cx` as the current context while it is polled.
    pub(crate) async fn scope<F: std::future::Future>(
        cx: Option<CallContext>,
        fut: F,
    ) -> F::Output {
        match cx {
            Some(cx) => CURRENT.scope(cx, fut).await,
            None => fut.await,
        }
    }

    /// Whether a call made now might be inside a traced handler.
    #[inline]
    pub(crate) fn may_inherit() -> bool {
        TRACES.load(std::sync::atomic::Ordering::Relaxed) != 0
    }

    /// What the caller sent besides its arguments, if anything.
    pub(crate) fn received(&self) -> Option<&Arc<Received>> {
        self.sent.as_ref()
    }

    /// The trace context a call made now carries on from the handler it is made in, if
    /// any (cheap when no received trace context is alive).
    pub(crate) fn inherited_trace() -> Option<TraceParent> {
        if TRACES.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return None;
        }
        CallContext::current().and_then(|cx| cx.child_trace_parent())
    }
}

impl Request<'_> {
    /// The context of this request for its handler, whose deadline (or TTL) runs out at
    /// `deadline`.
    pub(crate) fn context(&self, deadline: Instant) -> CallContext {
        CallContext {
            conn: self.conn.clone(),
            envelope: self.envelope.clone(),
            object: range_in(self.envelope, self.object),
            method: range_in(self.envelope, self.method),
            signal: self.signal,
            deadline,
            sent: self.sent.cloned(),
        }
    }

    /// Runs `f` (a poll of this request's handler, in the receive task) with this request
    /// as the current context: its address goes into this thread's [`INLINE`] slot, and
    /// the previous value back after `f`, even if `f` unwinds.
    #[inline(always)]
    pub(crate) fn poll_inline<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore(*const ());
        impl Drop for Restore {
            #[inline(always)]
            fn drop(&mut self) {
                INLINE.with(|inline| inline.set(self.0));
            }
        }
        let this = self as *const Request<'_> as *const ();
        // `with`, not `LocalKey::replace`: a const-initialised `Cell` without drop glue
        // is then a plain thread-local access (`replace` calls out of line).
        let _restore = Restore(INLINE.with(|inline| inline.replace(this)));
        f()
    }

    /// `f` of the request whose handler this thread polls in place, if it is polling one.
    #[allow(unsafe_code)]
    fn with_polled_inline<R>(f: impl FnOnce(Option<&Request<'_>>) -> R) -> R {
        let request = INLINE.with(Cell::get) as *const Request<'_>;
        // SAFETY: `INLINE` is non-null only inside `poll_inline`, which stores the address
        // of a `Request` that outlives that call and puts the previous value back before
        // it returns or unwinds; a `Request` is only ever read, and `INLINE` is per
        // thread. So a non-null value points to a live `Request` while code inside that
        // poll runs, and `f` (which runs inside it) cannot keep the reference.
        f(unsafe { request.as_ref() })
    }
}

/// Where `part` lies in `envelope` (it always does with the envelope decoder: checked,
/// not trusted); empty if not in it.
fn range_in(envelope: &[u8], part: &[u8]) -> Range<u32> {
    let start = (part.as_ptr() as usize).wrapping_sub(envelope.as_ptr() as usize);
    match start.checked_add(part.len()) {
        Some(end) if end <= envelope.len() => match (u32::try_from(start), u32::try_from(end)) {
            (Ok(start), Ok(end)) => start..end,
            _ => 0..0,
        },
        _ => 0..0,
    }
}

impl Received {
    /// Decodes a context map the envelope decoder checked; this side's span id is drawn
    /// when the caller sent a trace context.
    pub(crate) fn decode(raw: &[u8]) -> Arc<Received> {
        let (metadata, trace) = crate::wire::decode_context(raw);
        let span_id = if trace.is_some() {
            TRACES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            random_id()
        } else {
            0
        };
        Arc::new(Received {
            metadata,
            trace,
            span_id,
        })
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        if self.trace.is_some() {
            TRACES.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Key-value pairs a caller attaches to its calls and signals (like HTTP or gRPC
/// headers), from a client's `with_metadata`; a handler reads them with
/// [`CallContext::metadata`]. Keys and values are UTF-8 strings; a key may repeat.
///
/// Bounded on both sides by [`PeerOptions::max_metadata_bytes`](crate::PeerOptions::max_metadata_bytes)
/// (8 KiB by default), counted as the encoded size of the whole context map.
///
/// ```
/// use chatter_rpc::Metadata;
///
/// let metadata = Metadata::new().with("user", "ada").with("tenant", "7");
/// assert_eq!(metadata.get("user"), Some("ada"));
/// assert_eq!(metadata.get("nope"), None);
/// assert_eq!(metadata.len(), 2);
/// ```
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Metadata {
    entries: Vec<(Box<str>, Box<str>)>,
}

impl Metadata {
    /// No entries.
    pub const fn new() -> Self {
        Metadata {
            entries: Vec::new(),
        }
    }

    /// These entries and one more.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.insert(key, value);
        self
    }

    /// Adds an entry (after any with the same key).
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let (key, value): (String, String) = (key.into(), value.into());
        self.entries.push((key.into(), value.into()));
    }

    /// The first value under `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Every value under `key`, in the order they were added.
    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.iter().filter(move |(k, _)| *k == key).map(|(_, v)| v)
    }

    /// The entries, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.entries.iter().map(|(k, v)| (&**k, &**v))
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True without entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A W3C trace context (`traceparent`: `00-<32 hex trace id>-<16 hex parent id>-<2 hex
/// flags>`): which trace a call belongs to and which span (on the caller's side) it
/// comes from.
///
/// chatter puts the trace id and span ids of each call in its client and server spans
/// (`trace_id`, `span_id`, `parent_id` fields), so logs of both processes join by trace
/// id; a call made inside a handler carries its caller's trace id on. To bridge to
/// OpenTelemetry, format the otel span context as a `traceparent` (its `trace_id`,
/// `span_id` and flags, or a propagator's `traceparent` header) and give it to a
/// client's `with_trace_parent`; read [`CallContext::trace_parent`] on the other side to
/// make the remote parent context.
///
/// ```
/// use chatter_rpc::TraceParent;
///
/// let tp: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
/// assert_eq!(tp.trace_id(), 0x4bf92f3577b34da6a3ce929d0e0e4736);
/// assert_eq!(tp.parent_id(), 0x00f067aa0ba902b7);
/// assert!(tp.sampled());
/// assert_eq!(tp.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// assert!("00-00000000000000000000000000000000-00f067aa0ba902b7-01".parse::<TraceParent>().is_err());
/// # Ok::<(), chatter_rpc::InvalidTraceParent>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: u128,
    parent_id: u64,
    flags: u8,
}

/// A `traceparent` that is not valid W3C trace context.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid traceparent: {0}")]
pub struct InvalidTraceParent(&'static str);

impl TraceParent {
    /// A trace context; `None` if an id is zero (invalid in W3C trace context).
    /// `sampled` is the `01` flag.
    pub fn new(trace_id: u128, parent_id: u64, sampled: bool) -> Option<TraceParent> {
        (trace_id != 0 && parent_id != 0).then_some(TraceParent {
            trace_id,
            parent_id,
            flags: u8::from(sampled),
        })
    }

    /// A new trace: random trace and parent ids, sampled.
    pub fn random() -> TraceParent {
        TraceParent {
            trace_id: (u128::from(random_id()) << 64) | u128::from(random_id()),
            parent_id: random_id(),
            flags: 1,
        }
    }

    /// The trace id (16 bytes).
    pub fn trace_id(&self) -> u128 {
        self.trace_id
    }

    /// The caller's span id (8 bytes).
    pub fn parent_id(&self) -> u64 {
        self.parent_id
    }

    /// The trace flags.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// The `sampled` flag.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The same trace, with `parent_id` as the parent (a zero id keeps the current one).
    pub fn with_parent(self, parent_id: u64) -> TraceParent {
        TraceParent {
            parent_id: if parent_id == 0 {
                self.parent_id
            } else {
                parent_id
            },
            ..self
        }
    }

    /// The trace id as 32 lowercase hex digits (the `trace_id` field of chatter's spans).
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

impl FromStr for TraceParent {
    type Err = InvalidTraceParent;

    /// Parses a `traceparent` as W3C trace context level 1 says: version `00` is exactly
    /// 55 characters; a later version may append `-` and more, which is ignored; version
    /// `ff`, upper-case hex and all-zero ids are invalid.
    fn from_str(s: &str) -> Result<TraceParent, InvalidTraceParent> {
        let b = s.as_bytes();
        if b.len() < 55 {
            return Err(InvalidTraceParent("shorter than 55 characters"));
        }
        let version = hex(&b[0..2]).ok_or(InvalidTraceParent("bad version"))?;
        if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
            return Err(InvalidTraceParent("bad version or length"));
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return Err(InvalidTraceParent("bad separators"));
        }
        let trace_id = hex(&b[3..35]).ok_or(InvalidTraceParent("bad trace id"))?;
        let parent_id = hex(&b[36..52]).ok_or(InvalidTraceParent("bad parent id"))?;
        let flags = hex(&b[53..55]).ok_or(InvalidTraceParent("bad flags"))?;
        let parent_id =
            u64::try_from(parent_id).map_err(|_| InvalidTraceParent("bad parent id"))?;
        TraceParent::new(trace_id, parent_id, false)
            .map(|tp| TraceParent {
                flags: flags as u8,
                ..tp
            })
            .ok_or(InvalidTraceParent("an id is zero"))
    }
}

/// Lowercase hex digits (at most 32) as a number.
fn hex(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |acc, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some((acc << 4) | u128::from(v))
    })
}

/// A random non-zero 64-bit id (span and trace ids): a per-thread generator (wyrand)
/// seeded from the OS-seeded hasher; not for secrets.
pub(crate) fn random_id() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(crate::peer::random_u64());
    }
    STATE.with(|state| loop {
        let s = state.get().wrapping_add(0xa076_1d64_78bd_642f);
        state.set(s);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        let id = ((t >> 64) as u64) ^ (t as u64);
        if id != 0 {
            return id;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_validated_as_w3c_says() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp: TraceParent = good.parse().unwrap();
        assert_eq!(tp.to_string(), good);
        assert_eq!(tp.with_parent(7).parent_id(), 7);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(bad.parse::<TraceParent>().is_err(), "{bad}");
        }
        // A later version may carry more.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what";
        assert!(later.parse::<TraceParent>().is_ok());
        let random = TraceParent::random();
        assert_eq!(random.to_string().parse::<TraceParent>(), Ok(random));
        assert_ne!(TraceParent::random(), random);
    }
}
