//! The serving path: the receive task, and the handlers of the calls and signals the other side sends.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use chatter_core::{ConnectionClosed, Conversation, Event, Msg, SendError, SendOptions};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::client::Traced;
use crate::context::{CallContext, Received, Request};
use crate::service::{BoxFuture, CatchUnwind, Dispatch, Handlers, Service};
use crate::telemetry::{HandlerTimer, Timer};
use crate::wire::AckStatus;

use super::backlog::{Kind, Waiting};
use crate::wire::{self, FailureKind, Incoming, Name, Payload};

use super::*;

/// The receive task's memo of the object it looked up last: most connections talk to one
/// object, and a hit skips the lock, the SipHash of the name, the map probe and the
/// reference count updates. Valid while `PeerState::objects_generation` is unchanged; holds the
/// object only while the receive task handles one batch of messages (it is cleared before
/// the task waits for the next), so that unregistering an object still drops it.
#[derive(Default)]
pub(super) struct LastObject {
    pub(super) generation: u64,
    pub(super) name: MemoName,
    pub(super) service: Option<Arc<dyn Service>>,
}

/// How many bytes of a name [`MemoName`] keeps inline.
const MEMO_INLINE: usize = 22;

/// The memo's copy of the name it looked up: inline up to [`MEMO_INLINE`] bytes (most
/// objects' names), so that the first call on a connection does not allocate a copy;
/// longer ones on the heap. The size of the `String` it replaces (the receive task's
/// future does not grow).
pub(super) enum MemoName {
    Inline { len: u8, bytes: [u8; MEMO_INLINE] },
    Heap(Box<[u8]>),
}

impl Default for MemoName {
    fn default() -> Self {
        MemoName::Inline {
            len: 0,
            bytes: [0; MEMO_INLINE],
        }
    }
}

impl MemoName {
    pub(super) fn as_bytes(&self) -> &[u8] {
        match self {
            // `set` keeps `len` within `bytes`.
            MemoName::Inline { len, bytes } => bytes.get(..usize::from(*len)).unwrap_or(&[]),
            MemoName::Heap(bytes) => bytes,
        }
    }

    pub(super) fn set(&mut self, name: &[u8]) {
        *self = match u8::try_from(name.len()) {
            Ok(len) if name.len() <= MEMO_INLINE => {
                let mut bytes = [0; MEMO_INLINE];
                bytes[..name.len()].copy_from_slice(name);
                MemoName::Inline { len, bytes }
            }
            _ => MemoName::Heap(name.into()),
        };
    }
}

/// An object found by a lookup: borrowed from the receive task's memo, or owned.
pub(super) enum Found<'a> {
    Memo(&'a dyn Service),
    Owned(Arc<dyn Service>),
}

impl std::ops::Deref for Found<'_> {
    type Target = dyn Service;

    fn deref(&self) -> &Self::Target {
        match self {
            Found::Memo(service) => *service,
            Found::Owned(service) => &**service,
        }
    }
}

/// What the receive task carries through one batch of messages.
#[derive(Default)]
pub(super) struct Batch {
    /// A handler slot kept from the previous inline handler of this batch (giving a slot
    /// back may take the backlog's lock), given back before waiting for the next batch.
    slot: bool,
    /// Credit of the messages done with in this batch: given back with the next take.
    pub(super) release: u64,
    /// Waiting requests that a slot came free for: each starts in a task.
    start: Vec<Waiting>,
}

impl Batch {
    /// A slot for a handler run inline: the one kept from the previous inline handler of
    /// this batch, or a free one.
    fn take_slot(&mut self, inner: &Inner) -> bool {
        std::mem::take(&mut self.slot) || inner.slots.try_take()
    }
}

impl Inner {
    pub(super) fn on_message(
        self: &Arc<Self>,
        msg: Msg,
        last: &mut LastObject,
        batch: &mut Batch,
        handlers: &mut Handlers,
    ) {
        if msg.conversation.is_owner() {
            batch.release += u64::from(msg.credit());
            self.on_reply(msg);
        } else {
            self.on_request(msg, last, batch, handlers);
        }
    }

    /// A message in a conversation the other side opened. Only the receive task calls this
    /// (it bumps [`ReaderCounter`]s).
    ///
    /// Each envelope is decoded once, here. A request that can start now runs inline (one
    /// that completes on its first poll, as most do, is answered without a task) or in a
    /// task that owns its slot; one that cannot waits in the backlog with its credit
    /// held. Everything else is done with at once: its credit goes back with the batch.
    pub(super) fn on_request(
        self: &Arc<Self>,
        msg: Msg,
        last: &mut LastObject,
        batch: &mut Batch,
        handlers: &mut Handlers,
    ) {
        let conv = msg.conversation;
        if !msg.first {
            // A later message in a conversation the other side opened: an argument
            // stream's (calls and signals are one message each way).
            batch.release += self.on_argument(&msg, None);
            return;
        }
        let open = msg.token && !msg.last;
        let credit = msg.credit();
        match wire::decode_incoming(&msg.payload, self.peer.options.max_metadata_bytes) {
            Ok(Incoming::Call {
                deadline,
                object,
                method,
                context,
                args,
            }) if open && msg.first => {
                self.peer.stats.calls_received.bump();
                if self.is_closing() {
                    let refusal = if self.peer.is_shutting_down() {
                        wire::encode_failure(FailureKind::ShuttingDown, "shutting down")
                    } else {
                        wire::encode_failure(FailureKind::Cancelled, "closing")
                    };
                    self.refused(&msg.payload, (object, method), context, conv, &refusal);
                    batch.release += self.answer(conv, refusal, credit);
                    return;
                }
                if deadline.is_zero() {
                    let late = wire::encode_failure(FailureKind::DeadlineExceeded, "deadline 0");
                    self.refused(&msg.payload, (object, method), context, conv, &late);
                    batch.release += self.answer(conv, late, credit);
                    return;
                }
                if !batch.take_slot(self) {
                    let item = Waiting::new(
                        Kind::Call(conv),
                        &msg.payload,
                        (object, method, args),
                        context,
                        after(deadline),
                        credit,
                    );
                    self.active.fetch_add(1, Ordering::AcqRel);
                    self.wait(conv, true, item, credit, batch);
                    return;
                }
                // A slot is free: start the handler right here. One that completes on its
                // first poll is answered without a task, a timer, a cancel channel or the
                // `inflight` lock; one that waits continues in a task.
                if let Err(refusal) = self.start_call(object, method, args, Some(last), handlers) {
                    batch.slot = true;
                    self.refused(&msg.payload, (object, method), context, conv, &refusal);
                    batch.release += self.answer(conv, refusal, credit);
                    return;
                }
                let sent = context.map(Received::decode);
                let request = Request {
                    conn: &self.conn,
                    envelope: &msg.payload,
                    object: object.as_bytes(),
                    method: method.as_bytes(),
                    signal: false,
                    time: deadline,
                    sent: sent.as_ref(),
                };
                let traced = Traced(self.handle_span("call", &request, Some(conv)));
                let timer = Timer::start();
                let polled = traced.poll_in_place(&request, &mut CatchUnwind(handlers.call_mut()));
                match polled {
                    Poll::Ready(result) => {
                        let reply = self.handler_result(result);
                        if let Some(traced) = &traced.0 {
                            traced.handled(reply_outcome(&reply));
                        }
                        let names = (request.object, request.method);
                        timer.handled(names, "call", reply_outcome(&reply));
                        let options = SendOptions::new().conversation(conv);
                        match self.conn.try_send(&reply, options) {
                            // The reply (of any size) waits for the caller's window in a
                            // task that keeps the handler slot: a caller that does not read
                            // holds at most one reply per slot.
                            // The handler is done: the request's credit goes back now; the
                            // reply's memory is bounded by the slot it keeps.
                            Err(SendError::WouldBlock) => {
                                batch.release += u64::from(credit);
                                self.queue_reply(reply, options, 0);
                            }
                            sent => {
                                if let Err(e) = sent {
                                    self.reply_failed(conv, &e);
                                }
                                batch.slot = true;
                                batch.release += u64::from(credit);
                            }
                        }
                    }
                    Poll::Pending => {
                        let handler = CatchUnwind(handlers.take_call());
                        let mut inflight = lock(&self.inflight);
                        if inflight.closing {
                            // A graceful close began meanwhile: cancel.
                            drop((inflight, handler));
                            batch.slot = true;
                            let cancelled = wire::encode_failure(FailureKind::Cancelled, "closing");
                            batch.release += self.answer(conv, cancelled, credit);
                            return;
                        }
                        let (tx, rx) = oneshot::channel();
                        inflight.calls.insert(conv.first_id(), tx);
                        drop(inflight);
                        self.active.fetch_add(1, Ordering::AcqRel);
                        let call = request.context(after(deadline));
                        let handler = CallContext::scope(Some(call), handler);
                        let span = traced.span();
                        let timed = HandlerTimer::new(timer, (request.object, request.method));
                        let handler = (handler, traced, timed);
                        let run =
                            continue_call(self.clone(), conv, handler, after(deadline), rx, credit);
                        let run = tracing::Instrument::instrument(run, span);
                        // Owns the handler slot taken above: at most
                        // `max_concurrent_handlers` such tasks per connection.
                        tokio::spawn(run);
                    }
                }
            }
            Ok(Incoming::Signal {
                ttl,
                object,
                method,
                context,
                args,
            }) if msg.last => {
                if ttl.is_zero() {
                    bump(&self.peer.stats.signals_expired_on_arrival);
                    batch.release += u64::from(credit);
                    return;
                }
                // Ordered signals all go through the backlog (its signal lane runs one at
                // a time); others start here when a slot is free, as calls do.
                if self.peer.options.ordered_signals || !batch.take_slot(self) {
                    let item = Waiting::new(
                        Kind::Signal,
                        &msg.payload,
                        (object, method, args),
                        context,
                        after(ttl),
                        credit,
                    );
                    self.wait(conv, false, item, credit, batch);
                    return;
                }
                if !self.start_signal(object, method, args, Some(last), handlers) {
                    batch.slot = true;
                    batch.release += u64::from(credit);
                    return;
                }
                self.peer.stats.signals_delivered_inline.bump();
                let sent = context.map(Received::decode);
                let request = Request {
                    conn: &self.conn,
                    envelope: &msg.payload,
                    object: object.as_bytes(),
                    method: method.as_bytes(),
                    signal: true,
                    time: ttl,
                    sent: sent.as_ref(),
                };
                let traced = Traced(self.handle_span("signal", &request, Some(conv)));
                let timer = Timer::start();
                let polled =
                    traced.poll_in_place(&request, &mut CatchUnwind(handlers.signal_mut()));
                match polled {
                    Poll::Ready(result) => {
                        batch.slot = true;
                        batch.release += u64::from(credit);
                        let outcome = if result.is_ok() { "ok" } else { "remote_panic" };
                        if let Some(traced) = &traced.0 {
                            traced.handled(outcome);
                        }
                        timer.handled((request.object, request.method), "signal", outcome);
                        if result.is_err() {
                            self.signal_result(result, object, method);
                        }
                    }
                    Poll::Pending => {
                        let names = (object.as_bytes().to_vec(), method.as_bytes().to_vec());
                        let signal = request.context(after(ttl));
                        let handler =
                            CallContext::scope(Some(signal), CatchUnwind(handlers.take_signal()));
                        // Owns its handler slot: at most `max_concurrent_handlers`.
                        let span = traced.span();
                        let timed = HandlerTimer::new(timer, (&names.0, &names.1));
                        let run =
                            continue_signal(self.clone(), (handler, traced, timed), names, credit);
                        tokio::spawn(tracing::Instrument::instrument(run, span));
                    }
                }
            }
            Ok(Incoming::Reliable {
                stream,
                seq,
                object,
                method,
                ttl,
                context,
                args,
            }) if msg.last => {
                let parts = (object, method, args);
                self.on_reliable(&msg, (stream, seq), ttl, parts, context, batch);
            }
            Ok(Incoming::ReliableTooLarge { stream, seq, what }) if msg.last => {
                batch.release += self.reliable_too_large((stream, seq), &what.0, credit);
            }
            Ok(Incoming::Ack {
                stream,
                seq,
                status,
            }) if msg.last => {
                batch.release += u64::from(credit);
                self.peer.on_ack(stream, seq, status);
            }
            Ok(Incoming::Cancel { call }) if msg.last => {
                batch.release += u64::from(credit);
                if let Some(waiting) = self.slots.remove_call(call) {
                    // Cancelled before it started: answered now, its credit given back.
                    if let Kind::Call(conv) = waiting.kind {
                        let cancelled = wire::encode_failure(FailureKind::Cancelled, "cancelled");
                        batch.release += self.answer(conv, cancelled, waiting.credit);
                        self.call_done();
                    }
                    return;
                }
                // Dropping the sender wakes the handler task, which drops the handler.
                lock(&self.inflight).calls.remove(&call);
            }
            Ok(Incoming::StreamCall {
                object,
                method,
                deadline,
                window,
                context,
                args,
            }) if open => {
                self.peer.stats.calls_received.bump();
                let refusal = if self.is_closing() {
                    Some(if self.peer.is_shutting_down() {
                        wire::encode_failure(FailureKind::ShuttingDown, "shutting down")
                    } else {
                        wire::encode_failure(FailureKind::Cancelled, "closing")
                    })
                } else if deadline.is_zero() {
                    Some(wire::encode_failure(
                        FailureKind::DeadlineExceeded,
                        "deadline 0",
                    ))
                } else {
                    let call = super::streams::StreamCallIn {
                        conv,
                        envelope: &msg.payload,
                        object,
                        method,
                        deadline,
                        window,
                        context,
                        args,
                    };
                    self.start_stream_call(call).err()
                };
                if let Some(refusal) = refusal {
                    self.refused(&msg.payload, (object, method), context, conv, &refusal);
                    batch.release += self.answer(conv, refusal, credit);
                    return;
                }
                // The handler runs in its own task (counted against `max_streams`), which
                // holds what it decoded: the request's credit goes back now.
                batch.release += u64::from(credit);
            }
            Ok(Incoming::OpenArgument { call }) if !msg.token => {
                batch.release += self.on_argument(&msg, Some(call));
            }
            Ok(Incoming::GrantResult { call, bytes }) if msg.last => {
                batch.release += u64::from(credit);
                self.on_result_grant(call, bytes);
            }
            Ok(other) => {
                let mut what = misplaced(&other, &msg);
                // Small whatever the envelope held: answers queued for a peer that does not
                // read are bounded by the credit of the requests they answer.
                truncate(&mut what, MAX_ERROR_TEXT);
                batch.release += self.protocol_error(conv, open, &what, credit);
            }
            Err(e) if e.is_too_large() => {
                batch.release += self.metadata_too_large(conv, open, &e.0, credit);
            }
            Err(e) => {
                let mut what = e.0;
                truncate(&mut what, MAX_ERROR_TEXT);
                batch.release += self.protocol_error(conv, open, &what, credit);
            }
        }
    }

    /// Puts a request that cannot start now in the backlog (or refuses it when its
    /// envelope's parts cannot be located, which the decoder rules out).
    pub(super) fn wait(
        &self,
        conv: Conversation,
        is_call: bool,
        item: Option<Waiting>,
        credit: u32,
        batch: &mut Batch,
    ) {
        match item {
            Some(item) => self.slots.wait(conv.first_id(), item, &mut batch.start),
            None => {
                if is_call {
                    self.call_done();
                }
                batch.release += self.protocol_error(conv, is_call, "envelope parts", credit);
            }
        }
    }

    /// Sends `payload` as the answer in `conv` if the connection takes it now and returns
    /// `credit` to give back; else queues it holding the request's credit (given back
    /// once sent) and returns 0. So answers that wait for a peer that does not read are
    /// bounded by the credit of the requests they answer.
    pub(super) fn answer(&self, conv: Conversation, payload: Payload, credit: u32) -> u64 {
        let options = SendOptions::new().conversation(conv);
        let mut payload = payload;
        let mut sent = self.conn.try_send(&payload, options);
        if let Some(failure) = sent.as_ref().err().and_then(too_large_failure) {
            sent = self.conn.try_send(&failure, options);
            payload = failure;
        }
        match sent {
            Err(SendError::WouldBlock) => {
                self.queue_holding(payload, options, credit);
                0
            }
            Err(e) => {
                reply_not_sent(conv, &e);
                u64::from(credit)
            }
            Ok(_) => u64::from(credit),
        }
    }

    /// A reply the connection refused: one larger than the caller accepts is answered
    /// with a short failure in its place ([`too_large_failure`]); any other refusal (the
    /// connection closed) is logged.
    #[cold]
    #[inline(never)]
    fn reply_failed(&self, conv: Conversation, error: &SendError) {
        match too_large_failure(error) {
            Some(failure) => {
                self.answer(conv, failure, 0);
            }
            None => reply_not_sent(conv, error),
        }
    }

    /// Logs a protocol error and, in a conversation that expects an answer, answers it.
    /// Returns the credit to give back now (see [`answer`](Self::answer)).
    pub(super) fn protocol_error(
        &self,
        conv: Conversation,
        open: bool,
        what: &str,
        credit: u32,
    ) -> u64 {
        if let Some(warnings) = self.warnings.admit() {
            tracing::warn!(peer = %self.conn.remote_address(), conversation = conv.first_id(), error = what, warnings, "protocol error from peer");
        }
        if open {
            self.answer(
                conv,
                wire::encode_failure(FailureKind::Protocol, what),
                credit,
            )
        } else {
            u64::from(credit)
        }
    }

    /// A request whose context map is over `max_metadata_bytes`: a call is answered with
    /// failure kind 9, anything else is logged, dropped and counted as a failed signal.
    /// Returns the credit to give back now (see [`answer`](Self::answer)).
    #[cold]
    fn metadata_too_large(&self, conv: Conversation, open: bool, what: &str, credit: u32) -> u64 {
        if let Some(warnings) = self.warnings.admit() {
            tracing::warn!(
                peer = %self.conn.remote_address(),
                conversation = conv.first_id(),
                error = what,
                warnings,
                "request refused: metadata too large"
            );
        }
        if open {
            let refusal = wire::encode_failure(FailureKind::MetadataTooLarge, what);
            self.answer(conv, refusal, credit)
        } else {
            bump(&self.peer.stats.signals_failed);
            u64::from(credit)
        }
    }

    /// The context of a request whose parts lie in `envelope`, for its handler.
    pub(super) fn context(
        &self,
        envelope: &Bytes,
        (object, method): (Name<'_>, Name<'_>),
        signal: bool,
        deadline: Instant,
        context: Option<&[u8]>,
    ) -> Option<CallContext> {
        let sent = context.map(Received::decode);
        let request = Request {
            conn: &self.conn,
            envelope,
            object: object.as_bytes(),
            method: method.as_bytes(),
            signal,
            time: Duration::ZERO,
            sent: sent.as_ref(),
        };
        Some(request.context(deadline))
    }

    /// A call refused before a handler started (the peer is closing, a zero deadline, no
    /// such object or method, bad arguments): a `chatter_rpc::handle` span, if enabled,
    /// ended at once with the refusal as its outcome.
    #[cold]
    #[inline(never)]
    fn refused(
        &self,
        envelope: &Bytes,
        (object, method): (Name<'_>, Name<'_>),
        context: Option<&[u8]>,
        conv: Conversation,
        refusal: &[u8],
    ) {
        if !tracing::enabled!(target: "chatter_rpc::handle", tracing::Level::DEBUG) {
            return;
        }
        let sent = context.map(Received::decode);
        let request = Request {
            conn: &self.conn,
            envelope,
            object: object.0,
            method: method.0,
            signal: false,
            time: Duration::ZERO,
            sent: sent.as_ref(),
        };
        if let Some(traced) = self.make_handle_span("call", &request, Some(conv)) {
            traced.handled(reply_outcome(refusal));
        }
    }

    /// The span (as [`handle_span`](Self::handle_span)) and timer of the handler of a
    /// request that waited for a slot (or a reliable signal), whose context is `cx`.
    pub(super) fn waiting_span(
        &self,
        kind: &'static str,
        item: &Waiting,
        cx: Option<&CallContext>,
        conv: Option<Conversation>,
    ) -> (Traced<HandleTrace>, Timer) {
        let request = Request {
            conn: &self.conn,
            envelope: item.payload(),
            object: item.object().0,
            method: item.method().0,
            signal: kind != "call",
            time: Duration::ZERO,
            sent: cx.and_then(CallContext::received),
        };
        (
            Traced(self.handle_span(kind, &request, conv)),
            Timer::start(),
        )
    }

    /// The `chatter_rpc::handle` span of a request this side serves, if that target is
    /// enabled at debug level (`None` after one level check otherwise: not even a
    /// disabled span, which costs more with `tracing`'s `log` feature).
    #[inline(always)]
    pub(super) fn handle_span(
        &self,
        kind: &'static str,
        request: &Request<'_>,
        conv: Option<Conversation>,
    ) -> Option<Box<HandleTrace>> {
        if !tracing::enabled!(target: "chatter_rpc::handle", tracing::Level::DEBUG) {
            return None;
        }
        self.make_handle_span(kind, request, conv)
    }

    /// The span of [`handle_span`](Self::handle_span), once its target is enabled.
    #[cold]
    #[inline(never)]
    fn make_handle_span(
        &self,
        kind: &'static str,
        request: &Request<'_>,
        conv: Option<Conversation>,
    ) -> Option<Box<HandleTrace>> {
        let (object, method) = (Name(request.object), Name(request.method));
        let span = tracing::debug_span!(
            target: "chatter_rpc::handle",
            "handle",
            kind,
            peer = %self.conn.remote_address(),
            object = %object,
            method = %method,
            conversation = conv.map(|c| c.first_id()),
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            parent_id = tracing::field::Empty,
            outcome = tracing::field::Empty,
            duration_us = tracing::field::Empty,
        );
        if let Some(sent) = request.sent.filter(|_| !span.is_disabled()) {
            if let Some(trace) = sent.trace {
                span.record("trace_id", tracing::field::display(trace.trace_id_hex()));
                let hex = |id: u64| tracing::field::display(format!("{id:016x}"));
                span.record("parent_id", hex(trace.parent_id()));
                span.record("span_id", hex(sent.span_id));
            }
        }
        Some(Box::new(HandleTrace {
            span,
            start: Instant::now(),
        }))
    }

    /// A call accepted on this side is over (answered or dropped).
    pub(super) fn call_done(&self) {
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Gives back credit held by a task.
    pub(super) fn release(&self, credit: u32) {
        self.conn.release(u64::from(credit));
    }

    /// Answers or drops the waiting requests whose deadline or TTL passed.
    pub(super) fn expire_waiting(&self) {
        let mut release = 0;
        for item in self.slots.expired(Instant::now()) {
            release += self.expire(item);
        }
        self.conn.release(release);
    }

    /// A waiting request expired: a call is answered with "deadline exceeded", a signal
    /// is dropped and counted (a reliable one acknowledged as expired). Returns the credit
    /// to give back now.
    pub(super) fn expire(&self, item: Waiting) -> u64 {
        match item.kind {
            Kind::Call(conv) => {
                self.call_done();
                let late = wire::encode_failure(FailureKind::DeadlineExceeded, "deadline exceeded");
                self.answer(conv, late, item.credit)
            }
            Kind::Signal => {
                bump(&self.peer.stats.signals_expired_on_arrival);
                u64::from(item.credit)
            }
            Kind::Reliable(admitted) => {
                bump(&self.peer.stats.signals_expired_on_arrival);
                let (stream, seq) = (admitted.stream, admitted.seq);
                admitted.finish(AckStatus::Expired);
                self.acknowledge(stream, seq, AckStatus::Expired, item.credit)
            }
            // The first copy still decides; the sender re-sends if it hears nothing.
            Kind::Duplicate { .. } => u64::from(item.credit),
        }
    }

    /// Runs a request that waited for a slot (the caller owns the slot).
    pub(super) async fn run_waiting(self: &Arc<Self>, mut item: Waiting) {
        if Instant::now() >= item.expires {
            let release = self.expire(item);
            self.conn.release(release);
            return;
        }
        match std::mem::replace(&mut item.kind, Kind::Signal) {
            Kind::Call(conv) => {
                let call = item.context(self, false);
                let (traced, timer) = self.waiting_span("call", &item, call.as_ref(), Some(conv));
                let mut cancel = {
                    let mut inflight = lock(&self.inflight);
                    if inflight.closing {
                        drop(inflight);
                        let cancelled = wire::encode_failure(FailureKind::Cancelled, "closing");
                        let release = self.answer(conv, cancelled, item.credit);
                        self.conn.release(release);
                        self.call_done();
                        return;
                    }
                    let (tx, rx) = oneshot::channel();
                    inflight.calls.insert(conv.first_id(), tx);
                    rx
                };
                let mut handlers = Handlers::new();
                // Whether a handler started: a refused call (no such object or method, bad
                // arguments) is not timed, as when it is refused without waiting, so that
                // names a peer makes up do not become metric labels.
                let started = AtomicBool::new(false);
                let work = async {
                    let (object, method, args) = (item.object(), item.method(), item.args());
                    match self.start_call(object, method, args, None, &mut handlers) {
                        Ok(()) => {
                            started.store(true, Ordering::Relaxed);
                            let handler = CatchUnwind(handlers.call_mut());
                            self.handler_result(CallContext::scope(call, handler).await)
                        }
                        Err(refusal) => refusal,
                    }
                };
                let work = race_call(work, &mut cancel, item.expires);
                let reply = tracing::Instrument::instrument(work, traced.span()).await;
                if let Some(traced) = &traced.0 {
                    traced.handled(reply_outcome(&reply));
                }
                if started.load(Ordering::Relaxed) {
                    let names = (item.object().0, item.method().0);
                    timer.handled(names, "call", reply_outcome(&reply));
                }
                send_call_reply(self, conv, reply, item.credit).await;
            }
            Kind::Signal => {
                let (object, method) = (item.object(), item.method());
                let mut handlers = Handlers::new();
                if self.start_signal(object, method, item.args(), None, &mut handlers) {
                    bump(&self.peer.stats.signals_delivered);
                    let handler = CatchUnwind(handlers.signal_mut());
                    let cx = item.context(self, true);
                    let (traced, timer) = self.waiting_span("signal", &item, cx.as_ref(), None);
                    let run = CallContext::scope(cx, handler);
                    let result = tracing::Instrument::instrument(run, traced.span()).await;
                    let outcome = if result.is_ok() { "ok" } else { "remote_panic" };
                    if let Some(traced) = &traced.0 {
                        traced.handled(outcome);
                    }
                    timer.handled((object.as_bytes(), method.as_bytes()), "signal", outcome);
                    self.signal_result(result, object, method);
                }
                drop(handlers);
                self.release(item.credit);
            }
            Kind::Reliable(admitted) => {
                let Some(status) = self.run_reliable(&item).await else {
                    admitted.abandon();
                    self.release(item.credit);
                    return;
                };
                let (stream, seq) = (admitted.stream, admitted.seq);
                admitted.finish(status);
                let release = self.acknowledge(stream, seq, status, item.credit);
                self.conn.release(release);
            }
            Kind::Duplicate {
                stream,
                seq,
                outcome,
            } => {
                let release = self.run_duplicate(stream, seq, outcome, &item).await;
                self.conn.release(release);
            }
        }
    }

    /// Starts a task for each request a slot came free for (each task owns that slot: at
    /// most `max_concurrent_handlers` run per connection).
    pub(super) fn start_waiting(self: &Arc<Self>, start: &mut Vec<Waiting>) {
        for item in start.drain(..) {
            tokio::spawn(work(self.clone(), item));
        }
    }
}

/// Runs waiting requests in a task that owns a handler slot: `item`, then whichever waits
/// next, until none does.
pub(super) async fn work(inner: Arc<Inner>, mut item: Waiting) {
    loop {
        let ordered_signal =
            inner.peer.options.ordered_signals && !matches!(item.kind, Kind::Call(_));
        inner.run_waiting(item).await;
        match inner.slots.give_back(ordered_signal) {
            Some(next) => item = next,
            None => return,
        }
    }
}

/// What is wrong with an envelope that came in a message of the wrong kind (PROTOCOL.md,
/// "Caller → callee envelopes"): which envelope it is, how it must be sent and how it was.
#[cold]
#[inline(never)]
fn misplaced(envelope: &Incoming<'_>, msg: &Msg) -> String {
    const ONE_SHOT: &str = "is a one-shot message (flags 07 or 05)";
    const CALL: &str = "opens a conversation and passes the turn (flags 03)";
    let with = |context: &Option<&[u8]>, plain: u8, rich: u8| {
        if context.is_some() {
            rich
        } else {
            plain
        }
    };
    let (name, kind, rule) = match envelope {
        Incoming::Call { context, .. } => ("a call", with(context, 0, 9), CALL),
        Incoming::Signal { context, .. } => ("a signal", with(context, 1, 10), ONE_SHOT),
        Incoming::Cancel { .. } => ("a cancel", 2, ONE_SHOT),
        Incoming::Reliable { context, .. } => ("a reliable signal", with(context, 3, 11), ONE_SHOT),
        Incoming::ReliableTooLarge { .. } => ("a reliable signal", 11, ONE_SHOT),
        Incoming::Ack { .. } => ("an ack", 4, ONE_SHOT),
        Incoming::StreamCall { context, .. } => ("a stream call", with(context, 12, 13), CALL),
        Incoming::OpenArgument { .. } => (
            "an argument stream's opening",
            14,
            "opens a conversation and keeps the turn (flags 01)",
        ),
        Incoming::GrantResult { .. } => ("a result credit", 15, ONE_SHOT),
    };
    // An opening message: the owner bit is set.
    let flags = 1 | u8::from(msg.token) << 1 | u8::from(msg.last) << 2;
    format!("misplaced envelope: {name} (kind {kind}) {rule}, this one has flags {flags:02x}")
}

/// The longest error text this side puts in a failure reply to a malformed request.
const MAX_ERROR_TEXT: usize = 200;

/// Cuts `text` to at most `max` bytes, at a character boundary.
fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
}

/// How many events the receive task takes from the connection at once.
pub(super) const READ_BATCH: usize = 64;

/// The receive loop of `inner`'s connection: runs until the connection closed, then
/// tells everything waiting on it and runs the peer's end hook ([`Inner::on_end`]).
pub(super) fn run_reader(inner: Arc<Inner>) -> impl Future<Output = ()> + Send + 'static {
    receive_loop(Reader(inner))
}

/// The receive loop's hold on its peer. Dropping it runs the peer's end hook
/// ([`Inner::on_end`]: [`serve`](crate::serve) forgets the peer), so the hook runs
/// however the loop ends: at its normal end (after everything waiting on the connection
/// was told), in the unwind of a panic inside the loop (chatter-core catches a panic of
/// an attached future and keeps the connection going without it; the loop does not
/// catch panics of its own code or of a `tracing` subscriber or metrics recorder it
/// calls, so after one it closes the connection: [`Inner::end_after_a_panic`]), or when
/// the loop's future is dropped unfinished (its runtime shut down).
/// Without it a server kept listing the peer of a connection nobody read any more.
/// The loop's argument itself, so the loop's future does not grow.
struct Reader(Arc<Inner>);

impl std::ops::Deref for Reader {
    type Target = Arc<Inner>;

    fn deref(&self) -> &Arc<Inner> {
        &self.0
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The loop panicked: nothing reads this connection any more. Without this the
            // connection stayed open, the other side's calls went unanswered and this
            // side's waited for their deadlines. Done in a task of its own, not here in the
            // unwind, where a second panic (of a subscriber that panicked the loop, say)
            // would abort the process. One task per panicked loop, so at most one per
            // connection; it ends at once.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let inner = self.0.clone();
                drop(runtime.spawn(async move { inner.end_after_a_panic() }));
            }
        }
        let on_end = super::lock(&self.0.on_end).take();
        if let Some(on_end) = on_end {
            on_end.run();
        }
    }
}

async fn receive_loop(inner: Reader) {
    let mut closing = false;
    // Events are taken in batches: one connection lock and one wake-up registration (here
    // and for the shutdown signal) per batch, not per message.
    // Grows with the batches actually seen: an idle connection keeps a small one.
    let mut events = Vec::new();
    let mut last = LastObject::default();
    // Boxes for the handlers run inline, reused from one to the next.
    let mut handlers = Handlers::new();
    let mut batch = Batch::default();
    // The timer of the backlog's next expiry, while requests wait: made when one starts
    // waiting, reset to the next expiry each turn, dropped when none waits. Boxed, and
    // only while needed: most connections never have a request waiting, and a `Sleep` in
    // this future (made anew each turn, as it was) makes it 616 bytes instead of 504
    // (release build), which takes every connection's receive task from 640 to 768 bytes
    // (tokio rounds a task up to a multiple of 128 bytes).
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    // One wait for the shutdown request for the whole loop, not one per turn: a
    // `Notified` made in the `select!` each turn was registered with the `Notify` (under
    // its lock) when polled and taken off again (under the lock) when the turn ended.
    // This one registers once; a `notify_one` before its first poll leaves a permit that
    // the poll takes, as before.
    let mut shutdown = pin!(inner.shutdown.notified());
    let cause = loop {
        // The take is polled first (`biased`), so the credit handed to it is given back
        // even when another branch wins.
        let release = std::mem::take(&mut batch.release);
        let armed = match (inner.slots.next_expiry(), &mut timer) {
            (None, _) => {
                // Nothing waits: no timer left to wake this task for nothing.
                timer = None;
                None
            }
            (Some(at), Some(sleep)) => {
                if sleep.deadline() != at {
                    sleep.as_mut().reset(at);
                }
                Some(sleep)
            }
            (Some(at), None) => Some(timer.insert(Box::pin(tokio::time::sleep_until(at)))),
        };
        let expiry = async move {
            match armed {
                Some(sleep) => sleep.as_mut().await,
                None => std::future::pending().await,
            }
        };
        let taken = tokio::select! {
            biased;
            taken = inner.conn.next_events_holding(&mut events, READ_BATCH, release) => taken,
            () = &mut shutdown, if !closing => {
                closing = true;
                // Without running handlers the connection closes here, and this loop sees
                // its close next; otherwise a task waits for their replies first. Once per
                // connection: `closing` stays set.
                if !inner.close_if_idle() {
                    let inner = inner.clone();
                    tokio::spawn(async move { inner.finish_close().await });
                }
                continue;
            }
            () = expiry => {
                inner.expire_waiting();
                continue;
            }
        };
        let full = match taken {
            Ok(n) => n == READ_BATCH,
            Err(ConnectionClosed(cause)) => break cause,
        };
        // Calls or replies (anything but one-shot messages such as signals) in the batch.
        let mut calls = false;
        for event in events.drain(..) {
            match event {
                Event::Message(msg) => {
                    calls |= !(msg.first && msg.last);
                    inner.on_message(msg, &mut last, &mut batch, &mut handlers);
                }
                Event::Timeout(conv) => inner.on_timeout(conv),
                _ => {}
            }
        }
        if std::mem::take(&mut batch.slot) {
            if let Some(item) = inner.slots.give_back_inline() {
                batch.start.push(item);
            }
        }
        inner.start_waiting(&mut batch.start);
        last.service = None;
        if full && calls {
            // More calls or replies wait. Let the connection's driver write this batch's
            // replies (and the callers woken here send new calls) before handling the
            // rest, so that the other side can work meanwhile: without it, with both
            // sides on their own CPU, a deep pipeline turns into stop-and-go (measured:
            // pipelined calls, split layout, -40%). Signals need no such turn.
            tokio::task::yield_now().await;
        }
    };
    inner.conn.release(batch.release);
    inner.finish(cause);
    let suppressed = inner.warnings.suppressed();
    if suppressed > 0 {
        tracing::warn!(
            peer = %inner.conn.remote_address(),
            suppressed,
            "further warnings about this peer's messages were not logged (the first {} are, then every power of two)",
            chatter_core::LogLimit::LOGGED_IN_FULL
        );
    }
    // `inner`, dropped last, runs the end hook now.
}

/// The failure that answers a call in place of a reply larger than the caller accepts
/// (its `max_frame_size`, or its window less 64), or `None` for any other refusal. The
/// callee answers every call exactly once (PROTOCOL.md): without it the caller would wait
/// for nothing until its deadline, and the call's conversation would stay open on both
/// sides. Kind 7 (*protocol*), as a broker answers a message it cannot forward; the
/// message is cut to fit the caller's frames (a failure's envelope and a message header
/// take at most 32 bytes besides it).
#[cold]
pub(super) fn too_large_failure(error: &SendError) -> Option<Payload> {
    let SendError::TooLarge { max, .. } = error else {
        return None;
    };
    let why = format!("the reply could not be sent: {error}");
    let mut cut = why.len().min((*max as usize).saturating_sub(32));
    while !why.is_char_boundary(cut) {
        cut -= 1;
    }
    tracing::debug!(error = %error, "reply too large for the caller, answered with a failure");
    Some(wire::encode_failure(FailureKind::Protocol, &why[..cut]))
}

/// Logs a reply (or refusal) the connection would not take (it closed).
#[cold]
#[inline(never)]
fn reply_not_sent(conv: Conversation, error: &SendError) {
    tracing::debug!(conversation = conv.first_id(), error = %error, "reply not sent");
}

/// The `chatter_rpc::handle` span of a request, while that target is enabled.
pub(crate) struct HandleTrace {
    span: tracing::Span,
    start: Instant,
}

impl HandleTrace {
    /// Records how a handler ended in its span, with an event.
    #[cold]
    pub(super) fn handled(&self, outcome: &'static str) {
        let elapsed = self.start.elapsed().as_micros() as u64;
        self.span.record("outcome", outcome);
        self.span.record("duration_us", elapsed);
        self.span.in_scope(|| {
            tracing::debug!(target: "chatter_rpc::handle", outcome, duration_us = elapsed, "handled");
        });
    }
}

impl Traced<HandleTrace> {
    /// Polls a handler once in place (in the receive task), with `request` as the
    /// current context and inside the span when there is one.
    #[inline(always)]
    fn poll_in_place<F: Future + Unpin>(
        &self,
        request: &Request<'_>,
        handler: &mut F,
    ) -> Poll<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        // Each path polls in a closure of its own, called once (so inlined).
        match &self.0 {
            None => request.poll_inline(|| Pin::new(handler).poll(&mut cx)),
            Some(t) => t
                .span
                .in_scope(|| request.poll_inline(|| Pin::new(handler).poll(&mut cx))),
        }
    }

    /// The span, for the task a handler continues in (a disabled one without).
    pub(super) fn span(&self) -> tracing::Span {
        self.0
            .as_ref()
            .map_or_else(tracing::Span::none, |t| t.span.clone())
    }
}

/// The `outcome` of a reply envelope, for spans: `ok`, `app_error`, or the failure's
/// name.
fn reply_outcome(reply: &[u8]) -> &'static str {
    match reply {
        [0x92, 0x00, ..] => "ok",
        [0x93, 0x01, ..] => "app_error",
        [0x93, 0x02, kind, ..] => match kind {
            1 => "deadline_exceeded",
            2 => "cancelled",
            3 => "no_such_object",
            4 => "no_such_method",
            5 => "bad_arguments",
            6 => "remote_panic",
            7 => "protocol",
            8 => "shutting_down",
            9 => "metadata_too_large",
            10 => "too_many_streams",
            _ => "failure",
        },
        _ => "other",
    }
}

/// Continues a call whose handler the receive task started and that did not finish on
/// its first poll; then serves the backlog with its slot.
async fn continue_call(
    inner: Arc<Inner>,
    conv: Conversation,
    (handler, traced, timer): (
        impl Future<Output = Result<Payload, String>>,
        Traced<HandleTrace>,
        HandlerTimer,
    ),
    deadline: Instant,
    mut cancel: oneshot::Receiver<()>,
    credit: u32,
) {
    let work = async { inner.handler_result(handler.await) };
    let reply = race_call(work, &mut cancel, deadline).await;
    if let Some(traced) = &traced.0 {
        traced.handled(reply_outcome(&reply));
    }
    timer.handled("call", reply_outcome(&reply));
    drop(traced);
    send_call_reply(&inner, conv, reply, credit).await;
    if let Some(next) = inner.slots.give_back(false) {
        work_on(inner, next).await;
    }
}

/// Continues a signal whose handler the receive task started and that did not finish on
/// its first poll; then serves the backlog with its slot.
async fn continue_signal(
    inner: Arc<Inner>,
    (handler, traced, timer): (
        impl Future<Output = Result<(), String>>,
        Traced<HandleTrace>,
        HandlerTimer,
    ),
    (object, method): (Vec<u8>, Vec<u8>),
    credit: u32,
) {
    let result = handler.await;
    let outcome = if result.is_ok() { "ok" } else { "remote_panic" };
    if let Some(traced) = traced.0.as_deref() {
        traced.handled(outcome);
    }
    timer.handled("signal", outcome);
    drop(traced);
    inner.release(credit);
    inner.signal_result(result, Name(&object), Name(&method));
    if let Some(next) = inner.slots.give_back(false) {
        work_on(inner, next).await;
    }
}

/// [`work`], boxed: the tasks above would otherwise carry its state in theirs.
fn work_on(inner: Arc<Inner>, item: Waiting) -> BoxFuture<()> {
    Box::pin(work(inner, item))
}

/// Runs a call's work until it finishes, is cancelled or passes its deadline.
async fn race_call(
    work: impl Future<Output = Payload>,
    cancel: &mut oneshot::Receiver<()>,
    deadline: Instant,
) -> Payload {
    tokio::select! {
        biased;
        _ = cancel => wire::encode_failure(FailureKind::Cancelled, "cancelled"),
        () = tokio::time::sleep_until(deadline) => {
            wire::encode_failure(FailureKind::DeadlineExceeded, "deadline exceeded")
        }
        reply = work => reply,
    }
}

/// Sends the reply of a call run in a task and retires the call. The reply waits for
/// send credit while the task holds its handler slot (a peer that does not read stalls
/// only its own calls); the request's credit goes back when the handler is done.
async fn send_call_reply(inner: &Arc<Inner>, conv: Conversation, reply: Payload, credit: u32) {
    lock(&inner.inflight).calls.remove(&conv.first_id());
    // The handler is done: the request's credit goes back now (holding it until the reply
    // is written measured 10-20% slower for 64 KiB calls over TLS); the reply waits keeping
    // the handler slot, which bounds what replies hold.
    inner.release(credit);
    let options = SendOptions::new().conversation(conv);
    let sent = match inner.conn.try_send(&reply, options) {
        Err(SendError::WouldBlock) => inner.conn.send_bytes(&reply, options).await,
        other => other,
    };
    if let Err(e) = sent {
        inner.reply_failed(conv, &e);
    }
    inner.call_done();
}

impl Inner {
    /// Finds the object and method of a call and puts its handler in `handlers`, or
    /// returns the failure reply that says why it cannot run.
    pub(super) fn start_call(
        &self,
        object: Name<'_>,
        method: Name<'_>,
        args: &[u8],
        last: Option<&mut LastObject>,
        handlers: &mut Handlers,
    ) -> Result<(), Payload> {
        let Some(service) = self.lookup_with(object, last) else {
            return Err(wire::encode_failure(
                FailureKind::NoSuchObject,
                &object.to_string(),
            ));
        };
        let dispatch = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            service.__dispatch(method.as_bytes(), args, handlers)
        }));
        if matches!(dispatch, Ok(Dispatch::Signal | Dispatch::Stream) | Err(_)) {
            // A handler that will not run: drop it (and what it holds) now.
            handlers.clear();
        }
        match dispatch {
            Ok(Dispatch::Call) => Ok(()),
            Ok(Dispatch::Stream) => {
                let what = format!(
                    "`{method}` has a stream: it must come as a stream call (envelope kind 12)"
                );
                Err(wire::encode_failure(FailureKind::Protocol, &what))
            }
            Ok(Dispatch::Signal) => {
                let what = format!("`{method}` is a signal: send it, do not call it");
                Err(wire::encode_failure(FailureKind::Protocol, &what))
            }
            Ok(Dispatch::NoSuchMethod) => Err(wire::encode_failure(
                FailureKind::NoSuchMethod,
                &method.to_string(),
            )),
            Ok(Dispatch::BadArguments(what)) => {
                Err(wire::encode_failure(FailureKind::BadArguments, &what))
            }
            Err(panic) => {
                bump(&self.peer.stats.handler_panics);
                let message = crate::service::panic_message(panic.as_ref());
                Err(wire::encode_failure(FailureKind::RemotePanic, &message))
            }
        }
    }

    /// Finds the object and method of a signal and starts its handler; counts and logs why
    /// when it cannot run. The caller counts the delivery.
    pub(super) fn start_signal(
        &self,
        object: Name<'_>,
        method: Name<'_>,
        args: &[u8],
        last: Option<&mut LastObject>,
        handlers: &mut Handlers,
    ) -> bool {
        let failed = |why: &str| self.signal_failed(object, method, why);
        let Some(service) = self.lookup_with(object, last) else {
            failed("no such object");
            return false;
        };
        let dispatch = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            service.__dispatch(method.as_bytes(), args, handlers)
        }));
        if matches!(dispatch, Ok(Dispatch::Call | Dispatch::Stream) | Err(_)) {
            // A handler that will not run: drop it (and what it holds) now.
            handlers.clear();
        }
        match dispatch {
            Ok(Dispatch::Signal) => return true,
            Ok(Dispatch::Call | Dispatch::Stream) => failed("the method is a call, not a signal"),
            Ok(Dispatch::NoSuchMethod) => failed("no such method"),
            Ok(Dispatch::BadArguments(what)) => failed(&what),
            Err(_) => {
                bump(&self.peer.stats.handler_panics);
                failed("argument decoding panicked");
            }
        }
        false
    }

    /// Counts and logs a signal that could not be delivered.
    #[cold]
    #[inline(never)]
    pub(super) fn signal_failed(&self, object: Name<'_>, method: Name<'_>, why: &str) {
        if let Some(warnings) = self.warnings.admit() {
            tracing::warn!(peer = %self.conn.remote_address(), %object, %method, error = why, warnings, "signal not delivered");
        }
        bump(&self.peer.stats.signals_failed);
    }

    /// Counts a signal handler that panicked.
    pub(super) fn signal_result(
        &self,
        result: Result<(), String>,
        object: Name<'_>,
        method: Name<'_>,
    ) {
        if let Err(message) = result {
            bump(&self.peer.stats.handler_panics);
            self.signal_failed(object, method, &format!("handler panicked: {message}"));
        }
    }

    /// The reply for a handler's outcome (its encoded reply, or the message of its panic).
    pub(super) fn handler_result(&self, result: Result<Payload, String>) -> Payload {
        result.unwrap_or_else(|message| {
            bump(&self.peer.stats.handler_panics);
            wire::encode_failure(FailureKind::RemotePanic, &message)
        })
    }

    pub(super) fn lookup(&self, object: &str) -> Option<Arc<dyn Service>> {
        let found = read(&self.peer.objects).get(object).cloned();
        // Only on a miss: the built-in `chatter.introspect`, made on demand (no registry
        // entry per peer).
        found.or_else(|| crate::introspect::builtin(&self.peer, object))
    }

    /// [`lookup`](Self::lookup) of a name as it arrived (not UTF-8: no such object).
    pub(crate) fn lookup_name(&self, object: Name<'_>) -> Option<Arc<dyn Service>> {
        self.lookup(std::str::from_utf8(object.as_bytes()).ok()?)
    }

    /// [`lookup_name`](Self::lookup_name) through the receive task's memo, when there is
    /// one.
    pub(super) fn lookup_with<'a>(
        &self,
        object: Name<'_>,
        last: Option<&'a mut LastObject>,
    ) -> Option<Found<'a>> {
        let Some(last) = last else {
            return self.lookup_name(object).map(Found::Owned);
        };
        let generation = self.peer.objects_generation.load(Ordering::Acquire);
        let hit = last.generation == generation && last.name.as_bytes() == object.as_bytes();
        if !hit || last.service.is_none() {
            let object = std::str::from_utf8(object.as_bytes()).ok()?;
            let service = self.lookup(object)?;
            last.generation = generation;
            last.name.set(object.as_bytes());
            last.service = Some(service);
        }
        last.service.as_deref().map(Found::Memo)
    }
}

/// An answer (reply, acknowledgement, cancel) waiting for send credit, with the credit
/// of the request it answers, given back once it is sent.
pub(super) struct Answer {
    payload: Bytes,
    options: SendOptions,
    credit: u32,
    /// A handler's reply: the call's handler slot stays taken until it is sent.
    slot: bool,
}

impl Inner {
    /// Queues an answer the connection could not take now. The queue (one per connection,
    /// its task started on first use) is not bounded by a length but by what each entry
    /// holds, so a peer that sends faster than it reads cannot grow it: an answer to a
    /// request (refusal, deadline, cancelled, protocol error: at most 200 bytes of text;
    /// an acknowledgement) holds that request's credit, so these stay within the receive
    /// window; a handler's reply keeps its handler slot, so at most
    /// `max_concurrent_handlers` of them; a cancel this side sends holds nothing, and
    /// there is at most one per call this side made (bounded by `max_conversations`).
    pub(super) fn queue_holding(&self, payload: Payload, options: SendOptions, credit: u32) {
        self.queue_answer(payload, options, credit, false);
    }

    /// Queues the reply of a call answered inline that the connection could not take at
    /// once. The call keeps its handler slot until the reply is sent, so a caller that
    /// does not read holds at most one reply per slot; the replies wait in the one queue
    /// (one task waiting for the window, not one per reply).
    pub(super) fn queue_reply(
        self: &Arc<Self>,
        payload: Payload,
        options: SendOptions,
        credit: u32,
    ) {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.queue_answer(payload, options, credit, true);
    }

    fn queue_answer(&self, payload: Payload, options: SendOptions, credit: u32, slot: bool) {
        let queue = self.answers.get_or_init(|| {
            // Unbounded by length, bounded by what each entry holds: see `queue_holding`.
            let (tx, rx) = mpsc::unbounded_channel();
            self.peer
                .runtime
                .spawn(send_answers(self.conn.clone(), self.me.clone(), rx));
            tx
        });
        let answer = Answer {
            payload: payload.into_bytes(),
            options,
            credit,
            slot,
        };
        if let Err(back) = queue.send(answer) {
            self.finish_answer(&back.0);
        }
    }

    /// An answer was sent (or cannot be): its credit goes back, and a reply's slot to
    /// the next waiting request.
    fn finish_answer(&self, answer: &Answer) {
        self.release(answer.credit);
        if answer.slot {
            self.call_done();
        }
    }
}

/// Sends queued answers in order as credit allows (answers use no reserve: they go
/// ahead of calls and signals waiting for the window).
async fn send_answers(
    conn: Connection,
    inner: Weak<Inner>,
    mut rx: mpsc::UnboundedReceiver<Answer>,
) {
    while let Some(answer) = rx.recv().await {
        if let Err(e) = conn.send_bytes(&answer.payload, answer.options).await {
            tracing::debug!(error = %e, "reply not sent");
        }
        let Some(inner) = inner.upgrade() else {
            conn.release(u64::from(answer.credit));
            continue;
        };
        inner.finish_answer(&answer);
        if answer.slot {
            if let Some(next) = inner.slots.give_back(false) {
                // The freed handler slot passes to the next waiting request: one task
                // per slot, so at most `max_concurrent_handlers`.
                tokio::spawn(work(inner, next));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memo_names_keep_every_length_and_short_ones_inline() {
        let mut name = MemoName::default();
        assert_eq!(name.as_bytes(), b"");
        for len in [0, 1, MEMO_INLINE - 1, MEMO_INLINE, MEMO_INLINE + 1, 300] {
            let text: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            name.set(&text);
            assert_eq!(name.as_bytes(), text.as_slice(), "length {len}");
            assert_eq!(
                matches!(name, MemoName::Inline { .. }),
                len <= MEMO_INLINE,
                "length {len}"
            );
        }
        // Shorter again after a long one: inline again, not a prefix of the old one.
        name.set(b"calc");
        assert_eq!(name.as_bytes(), b"calc");
        assert!(std::mem::size_of::<MemoName>() <= std::mem::size_of::<String>());
    }
}
