//! The runtime half of generated clients.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use chatter_core::SendError;

use serde::de::DeserializeOwned;

use crate::context::{CallContext, Metadata, TraceParent};
use crate::error::{CallError, RemoteContext, SignalError};
use crate::peer::{Attempt, Inner, Outcome, Peer, Sent, MAX_DURATION};
use crate::stream::Receiver;
use crate::telemetry::Timer;
use crate::values::{write_args, ArgError, ArgsWriter, Receivable, Sendable};
use crate::wire::{self, FailureKind, Payload, Reply, WireName};

/// What a generated `{Trait}Client` wraps: a peer, the remote object's name, and the
/// client's deadline and signal TTL overrides. Generated code only.
#[doc(hidden)]
#[derive(Clone)]
pub struct ClientCore {
    /// What every call and signal needs: one reference count per call, not one per part.
    shared: Arc<Shared>,
    idempotent: bool,
    persistent: bool,
    deadline: Option<Duration>,
    ttl: Option<Duration>,
    /// Metadata and trace context for every call and signal (`with_metadata`,
    /// `with_trace_parent`); `None` for most clients.
    context: Option<Arc<Outgoing>>,
}

/// Why a request could not be encoded.
enum EncodeFailure {
    Args(String),
    Metadata(String),
}

impl From<EncodeFailure> for SignalError {
    fn from(e: EncodeFailure) -> Self {
        match e {
            EncodeFailure::Args(what) => SignalError::BadArguments { what },
            EncodeFailure::Metadata(what) => SignalError::MetadataTooLarge { what },
        }
    }
}

impl<E> From<EncodeFailure> for CallError<E> {
    fn from(e: EncodeFailure) -> Self {
        match e {
            EncodeFailure::Args(what) => CallError::BadArguments { what },
            EncodeFailure::Metadata(what) => CallError::MetadataTooLarge { what },
        }
    }
}

/// What a client attaches to each call and signal.
#[derive(Default)]
struct Outgoing {
    metadata: Metadata,
    /// `metadata`'s entries, encoded once (without the map's header).
    encoded: Vec<u8>,
    trace: Option<TraceParent>,
}

struct Shared {
    peer: Peer,
    object: WireName,
    /// The peer's defaults (its options do not change), capped at `MAX_DURATION`.
    default_deadline: Duration,
    default_ttl: Duration,
    max_metadata: usize,
    start_traces: bool,
}

/// A method of a `#[remote]` trait: its name, and the name encoded as a MessagePack
/// string (`#[remote]` encodes it at compile time). Generated code only.
#[doc(hidden)]
#[derive(Clone, Copy, Debug)]
pub struct Method {
    pub name: &'static str,
    pub wire: &'static [u8],
}

impl fmt::Debug for ClientCore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("object", &self.shared.object)
            .field("deadline", &self.deadline())
            .field("ttl", &self.ttl)
            .field("persistent", &self.persistent)
            .finish_non_exhaustive()
    }
}

impl ClientCore {
    pub fn new(peer: &Peer, object: &str) -> Self {
        let peer = peer.clone();
        let options = peer.options();
        let (default_deadline, default_ttl) =
            (options.default_deadline, options.default_signal_ttl);
        let (max_metadata, start_traces) = (options.max_metadata_bytes, options.start_traces);
        // A routed handle's clients address `{route}/{object}` (`Peer::routed`), joined
        // here once so that calls pay nothing for it.
        let object = match peer.route() {
            None => WireName::new(object),
            Some(route) => WireName::new(&format!("{route}/{object}")),
        };
        ClientCore {
            shared: Arc::new(Shared {
                peer,
                object,
                default_deadline: default_deadline.min(MAX_DURATION),
                default_ttl: default_ttl.min(MAX_DURATION),
                max_metadata,
                start_traces,
            }),
            idempotent: false,
            persistent: false,
            deadline: None,
            ttl: None,
            // With `start_traces`, an empty one: `is_plain` then checks one field.
            context: start_traces.then(Arc::default),
        }
    }

    pub fn peer(&self) -> &Peer {
        &self.shared.peer
    }

    /// The same client, allowed to re-send calls whose outcome is unknown (for methods
    /// marked `#[idempotent]`).
    pub fn idempotent(&self) -> Self {
        ClientCore {
            idempotent: true,
            ..self.clone()
        }
    }

    /// The same client, sending every signal as persistent.
    pub fn persistent(&self) -> Self {
        ClientCore {
            persistent: true,
            ..self.clone()
        }
    }

    pub fn object(&self) -> &str {
        self.shared.object.as_str()
    }

    pub fn deadline(&self) -> Duration {
        match self.deadline {
            Some(deadline) => deadline.min(MAX_DURATION),
            None => self.shared.default_deadline,
        }
    }

    pub fn with_deadline(&self, deadline: Duration) -> Self {
        ClientCore {
            deadline: Some(deadline),
            ..self.clone()
        }
    }

    pub fn with_ttl(&self, ttl: Duration) -> Self {
        ClientCore {
            ttl: Some(ttl),
            ..self.clone()
        }
    }

    /// The same client, sending `key: value` with each call and signal (after the
    /// metadata it sends already). The key `traceparent` sets the trace context instead
    /// (see [`with_trace_parent`](Self::with_trace_parent); an invalid one is ignored).
    pub fn with_metadata(&self, key: &str, value: &str) -> Self {
        let mut context = self.outgoing();
        if key == wire::TRACEPARENT {
            match value.parse() {
                Ok(trace) => context.trace = Some(trace),
                Err(e) => {
                    tracing::debug!(traceparent = value, error = %e, "invalid trace context ignored")
                }
            }
        } else {
            context.metadata.insert(key, value);
            wire::put_entry(&mut context.encoded, key, value);
        }
        ClientCore {
            context: Some(Arc::new(context)),
            ..self.clone()
        }
    }

    /// The same client, sending `trace` as the trace context of each call and signal
    /// (instead of the one of the handler it is called from, if any).
    pub fn with_trace_parent(&self, trace: TraceParent) -> Self {
        let mut context = self.outgoing();
        context.trace = Some(trace);
        ClientCore {
            context: Some(Arc::new(context)),
            ..self.clone()
        }
    }

    /// The metadata this client sends.
    pub fn metadata(&self) -> &Metadata {
        static EMPTY: Metadata = Metadata::new();
        self.context.as_ref().map_or(&EMPTY, |c| &c.metadata)
    }

    /// A copy of what this client attaches, to change.
    fn outgoing(&self) -> Outgoing {
        match &self.context {
            Some(context) => Outgoing {
                metadata: context.metadata.clone(),
                encoded: context.encoded.clone(),
                trace: context.trace,
            },
            None => Outgoing::default(),
        }
    }

    /// True when a request goes without a context for sure (no metadata, no trace to
    /// carry on or start: `context` is set with any of them or with `start_traces`): the
    /// common case, checked without a call.
    #[inline(always)]
    fn is_plain(&self) -> bool {
        self.context.is_none() && !CallContext::may_inherit()
    }

    /// A plain request (`encoded`) with this client's context, if it has one to send
    /// (see [`is_plain`](Self::is_plain)). Cold and out of line: the plain path,
    /// inlined into each generated method, stays as it was before contexts.
    #[cold]
    #[inline(never)]
    fn with_context<E: From<EncodeFailure>>(
        &self,
        encoded: Result<Payload, wire::WireError>,
        method: &Method,
    ) -> Result<(Payload, Option<TraceParent>), E> {
        let plain = encoded.map_err(|e| EncodeFailure::Args(e.0))?;
        let (context, trace) = self.request_context().map_err(EncodeFailure::Metadata)?;
        let Some(context) = context else {
            return Ok((plain, trace));
        };
        let names = self.shared.object.encoded().len() + method.wire.len();
        wire::add_context(&plain, names, &context)
            .map(|payload| (payload, trace))
            .map_err(|e| EncodeFailure::Args(e.0).into())
    }

    /// The context map of one request and its trace context, or why it cannot be sent.
    /// Without metadata, outside a traced handler and without `start_traces`, `None`:
    /// the request goes as a plain call or signal, byte for byte as before contexts.
    fn request_context(&self) -> Result<(Option<Vec<u8>>, Option<TraceParent>), String> {
        let trace = match &self.context {
            Some(context) if context.trace.is_some() => context.trace,
            _ => CallContext::inherited_trace().or_else(|| self.started_trace()),
        };
        let (entries, encoded) = match &self.context {
            Some(c) => (c.metadata.len(), c.encoded.as_slice()),
            None if trace.is_none() => return Ok((None, None)),
            None => (0, &[][..]),
        };
        let Some(map) = wire::encode_context(entries, encoded, trace.as_ref()) else {
            return Ok((None, trace));
        };
        if map.len() > self.shared.max_metadata {
            return Err(format!(
                "{} bytes, over this side's limit of {} (PeerOptions::max_metadata_bytes)",
                map.len(),
                self.shared.max_metadata
            ));
        }
        Ok((Some(map), trace))
    }

    /// A new trace for a call made outside any, with `start_traces` and the call span
    /// enabled.
    fn started_trace(&self) -> Option<TraceParent> {
        let enabled = self.shared.start_traces
            && tracing::enabled!(target: "chatter_rpc::call", tracing::Level::DEBUG);
        enabled.then(TraceParent::random)
    }

    /// A call of a method returning `Result<T, E>`, with `count` arguments written by
    /// `args`.
    pub fn call<T, E, A>(
        &self,
        method: &'static Method,
        count: u32,
        args: A,
    ) -> impl Future<Output = Result<T, CallError<E>>> + Send + 'static
    where
        T: Receivable + Send + 'static,
        E: Receivable + Send + 'static,
        A: FnOnce(&mut ArgsWriter<'_>) -> Result<(), ArgError>,
    {
        self.call_with(
            method,
            count,
            args,
            |error, remote| match wire::decode_value::<E>(error) {
                Ok(error) => CallError::App { error, remote },
                Err(e) => CallError::BadReply { what: e.0 },
            },
        )
    }

    /// A call of a method returning a plain `T`, with `count` arguments written by `args`.
    pub fn call_plain<T, A>(
        &self,
        method: &'static Method,
        count: u32,
        args: A,
    ) -> impl Future<Output = Result<T, CallError<Infallible>>> + Send + 'static
    where
        T: Receivable + Send + 'static,
        A: FnOnce(&mut ArgsWriter<'_>) -> Result<(), ArgError>,
    {
        self.call_with(method, count, args, |_, remote| CallError::BadReply {
            what: format!("unexpected application error from a method without one: {remote}"),
        })
    }

    /// Sends a signal: encodes its `count` arguments now (written by `args`), queues the
    /// signal when first polled (see [`Peer`](crate::Peer) for TTL, outbox and persistence
    /// rules).
    #[inline]
    pub fn signal<A>(
        &self,
        method: &'static Method,
        default_ttl: Option<Duration>,
        persistent: bool,
        count: u32,
        args: A,
    ) -> impl Future<Output = Result<Sent, SignalError>> + Send + 'static
    where
        A: FnOnce(&mut ArgsWriter<'_>) -> Result<(), ArgError>,
    {
        let ttl = match self.ttl.or(default_ttl) {
            Some(ttl) => ttl.min(MAX_DURATION),
            None => self.shared.default_ttl,
        };
        let object = self.shared.object.encoded();
        let args = |w: &mut Vec<u8>| write_args(w, count, args);
        let encoded = wire::encode_request_with(wire::SIGNAL, object, method.wire, ttl, args);
        let encoded: Result<Payload, SignalError> = if self.is_plain() {
            encoded.map_err(|e| SignalError::BadArguments { what: e.0 })
        } else {
            self.with_context(encoded, method)
                .map(|(payload, _trace)| payload)
        };
        let shared = self.shared.clone();
        let persistent = persistent || self.persistent;
        async move {
            let payload = encoded?;
            let wait = match shared.peer.try_signal(payload, ttl, persistent) {
                Attempt::Done(done) => return done,
                // Boxed, as for calls: its wait state would make every signal future
                // several times larger, and futures are moved when awaited. Made before
                // the await so that the future holds only the box across it.
                Attempt::Full(payload, expires) => Box::pin(
                    shared
                        .peer
                        .clone()
                        .signal_when_room(payload, expires, persistent),
                ),
            };
            wait.await
        }
    }

    /// A call of a method whose result is a stream (`Result<Receiver<T>, E>`), with `count`
    /// ordinary arguments written by `args` and, if the method takes one, the argument
    /// stream `input`.
    pub fn call_stream<T, E, A, I>(
        &self,
        method: &'static Method,
        count: u32,
        args: A,
        input: Option<Receiver<I>>,
    ) -> impl Future<Output = Result<Receiver<T>, CallError<E>>> + Send + 'static
    where
        T: Receivable + Send + 'static,
        E: Receivable + Send + 'static,
        I: Sendable + Send + 'static,
        A: FnOnce(&mut ArgsWriter<'_>) -> Result<(), ArgError>,
    {
        let start = self.stream_call_with(method, count, args, input, true);
        let names = self.names(method);
        async move { opened_stream(start.await, app_error::<E>, names) }
    }

    /// [`call_stream`](Self::call_stream) of a method returning a plain `Receiver<T>`.
    pub fn call_stream_plain<T, A, I>(
        &self,
        method: &'static Method,
        count: u32,
        args: A,
        input: Option<Receiver<I>>,
    ) -> impl Future<Output = Result<Receiver<T>, CallError<Infallible>>> + Send + 'static
    where
        T: Receivable + Send + 'static,
        A: FnOnce(&mut ArgsWriter<'_>) -> Result<(), ArgError>,
        I: Sendable + Send + 'static,
    {
        let start = self.stream_call_with(method, count, args, input, true);
        let names = self.names(method);
        async move { opened_stream(start.await, no_app_error, names) }
    }

    /// A call of a method that takes an argument stream (`input`) and returns
    /// `Result<T, E>`, with `count` ordinary arguments written by `args`.
    pub fn call_input<T, E, A, I>(
        &self,
        method: &'static Method,
        count: u32,
        args: A,
        input: Receiver<I>,
    ) -> impl Future<Output = Result<T, CallError<E>>> + Send + 'static
    where
        T: Receivable + Send + 'static,
        E: Receivable + Send + 'static,
        I: Sendable + Send + 'static,
        A: FnOnce(&mut ArgsWriter<'_>) -> Result<(), ArgError>,
    {
        let start = self.stream_call_with(method, count, args, Some(input), false);
        let names = self.names(method);
        async move { opened_value(start.await, app_error::<E>, names) }
    }

    /// [`call_input`](Self::call_input) of a method returning a plain `T`.
    pub fn call_input_plain<T, A, I>(
        &self,
        method: &'static Method,
        count: u32,
        args: A,
        input: Receiver<I>,
    ) -> impl Future<Output = Result<T, CallError<Infallible>>> + Send + 'static
    where
        T: Receivable + Send + 'static,
        A: FnOnce(&mut ArgsWriter<'_>) -> Result<(), ArgError>,
        I: Sendable + Send + 'static,
    {
        let start = self.stream_call_with(method, count, args, Some(input), false);
        let names = self.names(method);
        async move { opened_value(start.await, no_app_error, names) }
    }

    /// The object's and method's names, for errors.
    fn names(&self, method: &'static Method) -> (String, &'static str) {
        (self.shared.object.as_str().to_owned(), method.name)
    }

    /// Starts a stream call: sends `[12, …]` with this side's stream window, hands the
    /// argument stream (if any) to the peer, and resolves once the callee opened the
    /// result stream or ended the call.
    fn stream_call_with<A, I>(
        &self,
        method: &'static Method,
        count: u32,
        args: A,
        input: Option<Receiver<I>>,
        result_stream: bool,
    ) -> impl Future<Output = Result<Opened, CallError>> + Send + 'static
    where
        A: FnOnce(&mut ArgsWriter<'_>) -> Result<(), ArgError>,
        I: Sendable + Send + 'static,
    {
        let deadline = self.deadline();
        let window = self.shared.peer.state.options.stream_window;
        let object = self.shared.object.encoded();
        let args = |w: &mut Vec<u8>| write_args(w, count, args);
        let encoded = match self.request_context() {
            Ok((context, _trace)) => wire::stream::encode_stream_call(
                object,
                method.wire,
                deadline,
                window,
                context.as_deref(),
                args,
            )
            .map_err(|e| CallError::BadArguments { what: e.0 }),
            Err(what) => Err(CallError::MetadataTooLarge { what }),
        };
        let shared = self.shared.clone();
        let input = input.map(crate::stream::encoded);
        async move {
            let payload = encoded?;
            let inner = match shared.inner() {
                Some(inner) => inner.clone(),
                None => {
                    let until = tokio::time::Instant::now() + deadline;
                    shared.peer.state.connection_until(until).await?
                }
            };
            inner
                .stream_call(payload, deadline, result_stream, input)
                .await
        }
    }

    #[inline]
    fn call_with<A, T, E, F>(
        &self,
        method: &'static Method,
        count: u32,
        args: A,
        app: F,
    ) -> impl Future<Output = Result<T, CallError<E>>> + Send + 'static
    where
        A: FnOnce(&mut ArgsWriter<'_>) -> Result<(), ArgError>,
        T: DeserializeOwned + Send + 'static,
        E: Send + 'static,
        F: FnOnce(&[u8], RemoteContext) -> CallError<E> + Send + Unpin + 'static,
    {
        let deadline = self.deadline();
        let object = self.shared.object.encoded();
        let args = |w: &mut Vec<u8>| write_args(w, count, args);
        let mut trace = None;
        let encoded = wire::encode_request_with(wire::CALL, object, method.wire, deadline, args);
        let encoded = if self.is_plain() {
            encoded.map_err(|e| CallError::BadArguments { what: e.0 })
        } else {
            self.with_context(encoded, method).map(|(payload, sent)| {
                trace = sent;
                payload
            })
        };
        let (request, boxed) = match encoded {
            Ok(payload) => (Some(payload), None),
            Err(failed) => {
                let failed = Err(failed);
                (
                    None,
                    Some(Box::pin(std::future::ready(failed)) as BoxedCall),
                )
            }
        };
        Call {
            request,
            waiting: 0,
            boxed,
            shared: self.shared.clone(),
            method,
            deadline,
            idempotent: self.idempotent,
            app: Some(app),
            traced: Traced(CallTrace::start(&self.shared.object, method.name, trace)),
            timer: Timer::start(),
            out: PhantomData,
        }
    }
}

/// The `chatter_rpc::call` span of a call, while it is enabled (boxed: a call future
/// without it stays as small as it was).
struct CallTrace {
    span: tracing::Span,
    start: tokio::time::Instant,
}

/// A span's record (a call's [`CallTrace`], a handler's), if tracing is on: boxed and
/// dropped out of line, so that it is one pointer and its drop a null check when
/// tracing is off.
pub(crate) struct Traced<T>(pub(crate) Option<Box<T>>);

impl<T> Drop for Traced<T> {
    #[inline(always)]
    fn drop(&mut self) {
        if let Some(traced) = self.0.take() {
            drop_cold(traced);
        }
    }
}

#[cold]
#[inline(never)]
fn drop_cold<T>(value: T) {
    drop(value);
}

impl CallTrace {
    /// The call's span, if the `chatter_rpc::call` target is enabled at debug level.
    #[inline(always)]
    fn start(
        object: &WireName,
        method: &str,
        trace: Option<TraceParent>,
    ) -> Option<Box<CallTrace>> {
        // One level check when off: not even a disabled span (which costs more with
        // `tracing`'s `log` feature).
        if !tracing::enabled!(target: "chatter_rpc::call", tracing::Level::DEBUG) {
            return None;
        }
        CallTrace::start_enabled(object.as_str(), method, trace)
    }

    /// [`start`](Self::start), once the target is enabled.
    #[cold]
    #[inline(never)]
    fn start_enabled(
        object: &str,
        method: &str,
        trace: Option<TraceParent>,
    ) -> Option<Box<CallTrace>> {
        let span = tracing::debug_span!(
            target: "chatter_rpc::call",
            "call",
            object,
            method,
            conversation = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            parent_id = tracing::field::Empty,
            outcome = tracing::field::Empty,
            duration_us = tracing::field::Empty,
        );
        if span.is_disabled() {
            return None;
        }
        if let Some(trace) = trace {
            span.record("trace_id", tracing::field::display(trace.trace_id_hex()));
            // The id this side sent as the callee's parent: its span for the call.
            span.record(
                "span_id",
                tracing::field::display(format_args!("{:016x}", trace.parent_id())),
            );
        }
        Some(Box::new(CallTrace {
            span,
            start: tokio::time::Instant::now(),
        }))
    }

    /// Records how the call ended and closes the span.
    fn finish<T, E>(&self, result: &Result<T, CallError<E>>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => outcome_name(e),
        };
        let elapsed = self.start.elapsed().as_micros() as u64;
        self.span.record("outcome", outcome);
        self.span.record("duration_us", elapsed);
        self.span.in_scope(|| {
            tracing::debug!(target: "chatter_rpc::call", outcome, duration_us = elapsed, "call finished");
        });
    }
}

/// A short name for how a call failed (the `outcome` field of call spans).
fn outcome_name<E>(e: &CallError<E>) -> &'static str {
    match e {
        CallError::App { .. } => "app_error",
        CallError::DeadlineExceeded => "deadline_exceeded",
        CallError::Cancelled => "cancelled",
        CallError::ConnectionLost(_) => "connection_lost",
        CallError::NoSuchObject { .. } => "no_such_object",
        CallError::NoSuchMethod { .. } => "no_such_method",
        CallError::BadArguments { .. } => "bad_arguments",
        CallError::BadReply { .. } => "bad_reply",
        CallError::RemotePanic { .. } => "remote_panic",
        CallError::Protocol(_) => "protocol",
        CallError::NotConnected { .. } => "not_connected",
        CallError::OutcomeUnknown(_) => "outcome_unknown",
        CallError::ShuttingDown => "shutting_down",
        CallError::MetadataTooLarge { .. } => "metadata_too_large",
        CallError::TooManyStreams { .. } => "too_many_streams",
        CallError::NoSuchPeer { .. } => "no_such_peer",
        CallError::PeerLost { .. } => "peer_lost",
        CallError::PeerBusy { .. } => "peer_busy",
        CallError::PermissionDenied { .. } => "permission_denied",
    }
}

/// The future of a call: a hand-written state machine rather than nested `async` blocks,
/// so that it stays small (callers move it around: into `join_all`, `FuturesUnordered`,
/// tasks) and its poll does no more than the call needs. Sends the request when first
/// polled; dropped while waiting, it tells the callee to cancel.
///
/// Its states are separate fields rather than an enum: replacing an enum's state runs its
/// drop code, a measurable part of a call.
struct Call<T, E, F> {
    /// The encoded request, until it is sent.
    request: Option<Payload>,
    /// Sent through a peer made from a connection: the outcome arrives in the peer's pending slot with this
    /// id (conversation ids start at 1; 0 is none).
    waiting: u64,
    /// Anything rarer (a reconnecting link, a full window, arguments that failed to
    /// encode), boxed so that it does not make every call future larger.
    boxed: Option<BoxedCall>,
    shared: Arc<Shared>,
    method: &'static Method,
    deadline: Duration,
    idempotent: bool,
    /// How to make the caller's error from an application error reply; taken once.
    app: Option<F>,
    /// The call's span, when enabled.
    traced: Traced<CallTrace>,
    /// When the call began (with the `metrics` feature; nothing otherwise).
    timer: Timer,
    out: PhantomData<fn() -> (T, E)>,
}

type BoxedCall = Pin<Box<dyn Future<Output = Result<Bytes, CallError>> + Send>>;

impl Shared {
    /// The connection's part of the peer, for a client of a peer made from a connection.
    fn inner(&self) -> Option<&Arc<Inner>> {
        self.peer.plain.as_ref()
    }
}

impl<T, E, F> Future for Call<T, E, F>
where
    T: DeserializeOwned,
    F: FnOnce(&[u8], RemoteContext) -> CallError<E> + Unpin,
{
    type Output = Result<T, CallError<E>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Some(payload) = this.request.take() {
            if let Err(e) = this.start(payload) {
                this.app = None;
                let failed = Err(e.map_app(|n| match n {}));
                if let Some(traced) = this.traced.0.take() {
                    traced.finish(&failed);
                }
                this.timed(&failed);
                return Poll::Ready(failed);
            }
            if let Some(traced) = &this.traced.0 {
                if this.waiting != 0 {
                    traced.span.record("conversation", this.waiting);
                }
            }
        }
        // `waiting` is only set for a peer made from a connection.
        let reply = if let (id @ 1.., Some(inner)) = (this.waiting, this.shared.inner()) {
            let outcome = std::task::ready!(inner.poll_outcome(id, cx));
            this.waiting = 0;
            outcome_reply(outcome)
        } else if let Some(call) = &mut this.boxed {
            let reply = std::task::ready!(call.as_mut().poll(cx));
            this.boxed = None;
            reply
        } else {
            panic!("a call future was polled after it completed")
        };
        let app = this.app.take().expect("kept until the call completes");
        let reply = reply.map_err(|e| e.map_app(|n| match n {}));
        // The object's name is read (checked as UTF-8 again) only for a failure that
        // names it.
        let object = || this.shared.object.as_str().to_owned();
        let result = finish(reply, app, object, this.method.name);
        if let Some(traced) = this.traced.0.take() {
            traced.finish(&result);
        }
        this.timed(&result);
        Poll::Ready(result)
    }
}

impl<T, E, F> Call<T, E, F> {
    /// Records the call's duration (with the `metrics` feature; without, this is
    /// nothing: `Timer` is empty and its method inlined).
    #[inline(always)]
    fn timed<R>(&self, result: &Result<R, CallError<E>>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) => outcome_name(e),
        };
        // Without the feature, not even the object's name is read.
        #[cfg(feature = "metrics")]
        let object = self.shared.object.as_str();
        #[cfg(not(feature = "metrics"))]
        let object = "";
        self.timer.call_finished(object, self.method.name, outcome);
    }

    /// Hands the request to the connection (or starts the boxed path that will).
    fn start(&mut self, payload: Payload) -> Result<(), CallError> {
        let deadline = self.deadline;
        let Some(inner) = self.shared.inner() else {
            let (state, idempotent) = (self.shared.peer.state.clone(), self.idempotent);
            let bytes = payload.into_bytes();
            self.boxed = Some(Box::pin(
                state.call_reconnecting(bytes, deadline, idempotent),
            ));
            return Ok(());
        };
        if inner.peer.is_shutting_down() {
            return Err(CallError::ShuttingDown);
        }
        match inner.try_start_call(&payload, deadline) {
            Ok(id) => self.waiting = id,
            Err(SendError::WouldBlock) => {
                // The peer's window is full: wait for room (rare).
                let inner = inner.clone();
                self.boxed = Some(Box::pin(async move {
                    outcome_reply(inner.call(payload, deadline).await)
                }));
            }
            Err(SendError::Closed(cause)) => return Err(CallError::ConnectionLost(cause)),
            Err(e) => return Err(CallError::Protocol(e.to_string())),
        }
        Ok(())
    }
}

impl<T, E, F> Drop for Call<T, E, F> {
    fn drop(&mut self) {
        if let (id @ 1.., Some(inner)) = (self.waiting, self.shared.inner()) {
            inner.abandon_call(id);
        }
    }
}

/// How a stream call began: the result stream opened, or the call ended with a reply.
pub(crate) enum Opened {
    Stream(Arc<crate::stream::Inbox>, Arc<dyn crate::stream::RemoteEnd>),
    Reply(Bytes),
}

/// The value of a stream call whose result is not a stream (a method taking an argument
/// stream).
fn opened_value<T: DeserializeOwned, E>(
    opened: Result<Opened, CallError>,
    app: impl FnOnce(&[u8], RemoteContext) -> CallError<E>,
    (object, method): (String, &'static str),
) -> Result<T, CallError<E>> {
    let reply = match opened {
        Ok(Opened::Reply(reply)) => Ok(reply),
        // `Inner::stream_call` already refuses a result stream nobody asked for.
        Ok(Opened::Stream(..)) => Err(CallError::Protocol(
            "the callee opened a result stream for a method that returns none".into(),
        )),
        Err(e) => Err(e),
    };
    finish(
        reply.map_err(|e| e.map_app(|n| match n {})),
        app,
        move || object,
        method,
    )
}

/// The result stream of a stream call, or why there is none.
fn opened_stream<T: DeserializeOwned + 'static, E>(
    opened: Result<Opened, CallError>,
    app: impl FnOnce(&[u8], RemoteContext) -> CallError<E>,
    (object, method): (String, &'static str),
) -> Result<Receiver<T>, CallError<E>> {
    match opened.map_err(|e| e.map_app(|n| match n {}))? {
        Opened::Stream(inbox, end) => Ok(Receiver::remote(inbox, end)),
        Opened::Reply(reply) => {
            match finish::<serde::de::IgnoredAny, E>(Ok(reply), app, move || object, method) {
                Ok(_) => Err(CallError::BadReply {
                    what: "the callee answered a stream call with a value, not a stream".into(),
                }),
                Err(e) => Err(e),
            }
        }
    }
}

/// An application error of type `E` from its encoded form.
fn app_error<E: DeserializeOwned>(error: &[u8], remote: RemoteContext) -> CallError<E> {
    match wire::decode_value::<E>(error) {
        Ok(error) => CallError::App { error, remote },
        Err(e) => CallError::BadReply { what: e.0 },
    }
}

/// A method without an application error got one.
fn no_app_error(_: &[u8], remote: RemoteContext) -> CallError<Infallible> {
    CallError::BadReply {
        what: format!("unexpected application error from a method without one: {remote}"),
    }
}

/// A call's outcome as the caller sees it.
fn outcome_reply(outcome: Outcome) -> Result<Bytes, CallError> {
    match outcome {
        Outcome::Reply(reply) => Ok(reply),
        Outcome::Deadline => Err(CallError::DeadlineExceeded),
        Outcome::Lost(cause) | Outcome::NotSent(cause) => Err(CallError::ConnectionLost(cause)),
        Outcome::Protocol(what) => Err(CallError::Protocol(what)),
        Outcome::Opened => Err(CallError::Protocol(
            "the callee opened a stream for a call without one".into(),
        )),
    }
}

/// Decodes a reply (or passes a framework failure through). `object` makes the object's
/// name, for the failures that name it.
fn finish<T, E>(
    reply: Result<Bytes, CallError<E>>,
    app: impl FnOnce(&[u8], RemoteContext) -> CallError<E>,
    object: impl FnOnce() -> String,
    method: &str,
) -> Result<T, CallError<E>>
where
    T: DeserializeOwned,
{
    let reply = reply?;
    match wire::decode_reply(&reply) {
        Ok(Reply::Ok(value)) => {
            wire::decode_value(value).map_err(|e| CallError::BadReply { what: e.0 })
        }
        Ok(Reply::AppError { context, error }) => Err(app(error, context)),
        Ok(Reply::Failure { kind, message }) => Err(failure(kind, message, object, method)),
        Err(e) => Err(CallError::Protocol(e.0)),
    }
}

fn failure<E>(
    kind: Result<FailureKind, u8>,
    message: String,
    object: impl FnOnce() -> String,
    method: &str,
) -> CallError<E> {
    match kind {
        Ok(FailureKind::DeadlineExceeded) => CallError::DeadlineExceeded,
        Ok(FailureKind::Cancelled) => CallError::Cancelled,
        Ok(FailureKind::NoSuchObject) => CallError::NoSuchObject { object: object() },
        Ok(FailureKind::NoSuchMethod) => CallError::NoSuchMethod {
            object: object(),
            method: method.to_owned(),
        },
        Ok(FailureKind::BadArguments) => CallError::BadArguments { what: message },
        Ok(FailureKind::RemotePanic) => CallError::RemotePanic { message },
        Ok(FailureKind::Protocol) => CallError::Protocol(message),
        Ok(FailureKind::ShuttingDown) => CallError::ShuttingDown,
        Ok(FailureKind::TooManyStreams) => CallError::TooManyStreams { what: message },
        Ok(FailureKind::NoSuchPeer) => CallError::NoSuchPeer { peer: message },
        Ok(FailureKind::PeerLost) => CallError::PeerLost { what: message },
        Ok(FailureKind::PeerBusy) => CallError::PeerBusy { what: message },
        Ok(FailureKind::PermissionDenied) => CallError::PermissionDenied { what: message },
        Ok(FailureKind::MetadataTooLarge) => CallError::MetadataTooLarge {
            what: format!("refused by the callee: {message}"),
        },
        // Only a stream's end may say it; as a call's answer it is out of place.
        Ok(FailureKind::Lagging) => CallError::Protocol(format!(
            "failure kind 14 (lagging) as a call's answer: {message}"
        )),
        Err(kind) => CallError::Protocol(format!("unknown failure kind {kind}: {message}")),
    }
}
