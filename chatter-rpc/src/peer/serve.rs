//! The serving path: the receive task, and the handlers of the calls and signals the other side sends.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use chatter_core::{ConnectionClosed, Conversation, Event, Msg, SendError, SendOptions};
use tokio::sync::{oneshot, SemaphorePermit};
use tokio::time::Instant;

use crate::service::{CatchUnwind, Dispatch, HandlerFuture, Handlers, Service};
use crate::wire::{self, FailureKind, Incoming, Name, Payload};

use super::*;

/// The receive task's memo of the object it looked up last: most connections talk to one
/// object, and a hit skips the lock, the SipHash of the name, the map probe and the
/// reference count updates. Valid while `Inner::objects_generation` is unchanged; holds the
/// object only while the receive task handles one batch of messages (it is cleared before
/// the task waits for the next), so that unregistering an object still drops it.
#[derive(Default)]
pub(super) struct LastObject {
    pub(super) generation: u64,
    pub(super) name: String,
    pub(super) service: Option<Arc<dyn Service>>,
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

impl Inner {
    pub(super) fn on_message<'a>(
        self: &'a Arc<Self>,
        msg: Msg,
        last: &mut LastObject,
        slot: &mut Option<SemaphorePermit<'a>>,
        handlers: &mut Handlers,
    ) {
        if msg.conversation.is_owner() {
            self.on_reply(msg);
        } else {
            self.on_request(msg, last, slot, handlers);
        }
    }

    /// A handler slot for a handler run inline: the one the receive task kept from the
    /// previous inline handler of this batch, or a free one.
    pub(super) fn inline_slot<'a>(
        &'a self,
        slot: &mut Option<SemaphorePermit<'a>>,
    ) -> Option<SemaphorePermit<'a>> {
        slot.take().or_else(|| self.handlers.try_acquire().ok())
    }

    /// (it bumps [`ReaderCounter`]s).
    pub(super) fn on_request<'a>(
        self: &'a Arc<Self>,
        msg: Msg,
        last: &mut LastObject,
        slot: &mut Option<SemaphorePermit<'a>>,
        handlers: &mut Handlers,
    ) {
        let conv = msg.conversation;
        let open = msg.token && !msg.last;
        match wire::decode_incoming(&msg.payload) {
            Ok(Incoming::Call {
                deadline,
                object,
                method,
                args,
            }) if open && msg.first => {
                self.peer.stats.calls_received.bump();
                // Fast path: with a handler slot free now, start the handler right here. One
                // that completes on its first poll (most do) is answered without a task, a
                // timer, a cancel channel or the `inflight` lock; one that waits continues in
                // a task. While closing, the slow path below refuses the call.
                if !deadline.is_zero() && !self.is_closing() {
                    if let Some(permit) = self.inline_slot(slot) {
                        if let Err(refusal) =
                            self.start_call(object, method, args, Some(last), handlers)
                        {
                            *slot = Some(permit);
                            self.reply(conv, refusal);
                            return;
                        }
                        let mut cx = Context::from_waker(Waker::noop());
                        match Pin::new(&mut CatchUnwind(handlers.call_mut())).poll(&mut cx) {
                            Poll::Ready(result) => {
                                *slot = Some(permit);
                                let reply = self.handler_result(result);
                                self.reply(conv, reply);
                            }
                            Poll::Pending => {
                                let handler = CatchUnwind(handlers.take_call());
                                let mut inflight = lock(&self.inflight);
                                if inflight.closing {
                                    // A graceful close began meanwhile: cancel.
                                    drop((inflight, handler, permit));
                                    let cancelled =
                                        wire::encode_failure(FailureKind::Cancelled, "closing");
                                    self.reply(conv, cancelled);
                                    return;
                                }
                                let (tx, rx) = oneshot::channel();
                                inflight.calls.insert(conv.first_id(), tx);
                                drop(inflight);
                                // The task gives the slot back when the handler is done.
                                permit.forget();
                                self.active.fetch_add(1, Ordering::AcqRel);
                                let deadline = after(deadline);
                                tokio::spawn(finish_call(
                                    self.clone(),
                                    conv,
                                    handler,
                                    deadline,
                                    rx,
                                ));
                            }
                        }
                        return;
                    }
                }
                // The cancel channel is made only for handlers that continue in a task.
                let rx = {
                    let mut inflight = lock(&self.inflight);
                    if inflight.closing {
                        let refusal = if inflight.shutting_down {
                            wire::encode_failure(FailureKind::ShuttingDown, "shutting down")
                        } else {
                            wire::encode_failure(FailureKind::Cancelled, "closing")
                        };
                        drop(inflight);
                        self.reply(conv, refusal);
                        return;
                    }
                    let (tx, rx) = oneshot::channel();
                    inflight.calls.insert(conv.first_id(), tx);
                    rx
                };
                self.active.fetch_add(1, Ordering::AcqRel);
                let deadline = after(deadline);
                tokio::spawn(run_call(self.clone(), conv, msg.payload, deadline, rx));
            }
            Ok(Incoming::Signal {
                ttl,
                object,
                method,
                args,
            }) if msg.last => {
                // Fast path, as for calls: unordered signals with a free handler slot start
                // here, and only a handler that waits gets a task.
                if !self.peer.options.ordered_signals && !ttl.is_zero() {
                    if let Some(permit) = self.inline_slot(slot) {
                        if !self.start_signal(object, method, args, Some(last), handlers) {
                            *slot = Some(permit);
                            return;
                        }
                        self.peer.stats.signals_delivered_inline.bump();
                        let mut cx = Context::from_waker(Waker::noop());
                        match Pin::new(&mut CatchUnwind(handlers.signal_mut())).poll(&mut cx) {
                            Poll::Ready(result) => {
                                *slot = Some(permit);
                                self.signal_result(result, object, method);
                            }
                            Poll::Pending => {
                                let handler = CatchUnwind(handlers.take_signal());
                                permit.forget();
                                let (inner, object, method) =
                                    (self.clone(), object.0.to_vec(), method.0.to_vec());
                                tokio::spawn(async move {
                                    let result = handler.await;
                                    inner.handlers.add_permits(1);
                                    inner.signal_result(result, Name(&object), Name(&method));
                                });
                            }
                        }
                        return;
                    }
                }
                let expires = after(ttl);
                self.spawn_signal(run_signal(self.clone(), msg.payload, expires));
            }
            Ok(Incoming::Reliable { .. }) if msg.last => self.on_reliable(msg.payload),
            Ok(Incoming::Ack {
                stream,
                seq,
                status,
            }) if msg.last => {
                self.peer.on_ack(stream, seq, status);
            }
            Ok(Incoming::Cancel { call }) if msg.last => {
                // Dropping the sender wakes the handler task, which drops the handler.
                lock(&self.inflight).calls.remove(&call);
            }
            Ok(other) => {
                let what = format!("misplaced envelope {other:?}");
                self.protocol_error(conv, open, &what);
            }
            Err(e) => self.protocol_error(conv, open, &e.0),
        }
    }

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
        if matches!(dispatch, Ok(Dispatch::Signal) | Err(_)) {
            // A handler that will not run: drop it (and what it holds) now.
            handlers.clear();
        }
        match dispatch {
            Ok(Dispatch::Call) => Ok(()),
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
        if matches!(dispatch, Ok(Dispatch::Call) | Err(_)) {
            // A handler that will not run: drop it (and what it holds) now.
            handlers.clear();
        }
        match dispatch {
            Ok(Dispatch::Signal) => return true,
            Ok(Dispatch::Call) => failed("the method is a call, not a signal"),
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
        tracing::warn!("chatter-rpc: signal `{object}.{method}` not delivered: {why}");
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

    pub(super) fn protocol_error(&self, conv: Conversation, open: bool, what: &str) {
        tracing::warn!("chatter-rpc: protocol error from peer: {what}");
        if open {
            self.reply(conv, wire::encode_failure(FailureKind::Protocol, what));
        }
    }

    pub(super) fn reply(&self, conv: Conversation, payload: Payload) {
        self.send_soon(payload, SendOptions::new().conversation(conv));
    }

    pub(super) fn lookup(&self, object: &str) -> Option<Arc<dyn Service>> {
        read(&self.peer.objects).get(object).cloned()
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
            last.name.clear();
            last.name.push_str(object);
            last.service = Some(service);
        }
        last.service.as_deref().map(Found::Memo)
    }
}

/// How many events the receive task takes from the connection at once.
pub(super) const READ_BATCH: usize = 64;

pub(super) async fn run_reader(inner: Arc<Inner>) {
    let mut closing = false;
    // Events are taken in batches: one connection lock and one wake-up registration (here
    // and for the shutdown signal) per batch, not per message.
    // Grows with the batches actually seen: an idle connection keeps a small one.
    let mut events = Vec::new();
    let mut last = LastObject::default();
    // Boxes for the handlers run inline, reused from one to the next.
    let mut handlers = Handlers::new();
    let cause = loop {
        let batch = if closing {
            inner.conn.next_events(&mut events, READ_BATCH).await
        } else {
            tokio::select! {
                batch = inner.conn.next_events(&mut events, READ_BATCH) => batch,
                () = inner.shutdown.notified() => {
                    closing = true;
                    let inner = inner.clone();
                    tokio::spawn(async move { inner.close_gracefully().await });
                    continue;
                }
            }
        };
        let full = match batch {
            Ok(n) => n == READ_BATCH,
            Err(ConnectionClosed(cause)) => break cause,
        };
        // A handler slot taken for an inline handler is kept for the next one of the
        // batch (giving a tokio semaphore permit back takes its waiter lock), and given
        // back before waiting for the next batch.
        let mut slot = None;
        // Calls or replies (anything but one-shot messages such as signals) in the batch.
        let mut calls = false;
        for event in events.drain(..) {
            match event {
                Event::Message(msg) => {
                    calls |= !(msg.first && msg.last);
                    inner.on_message(msg, &mut last, &mut slot, &mut handlers);
                }
                Event::Timeout(conv) => inner.on_timeout(conv),
                _ => {}
            }
        }
        drop(slot);
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
    inner.finish(cause);
}

pub(super) async fn run_call(
    inner: Arc<Inner>,
    conv: Conversation,
    payload: Bytes,
    deadline: Instant,
    mut cancel: oneshot::Receiver<()>,
) {
    let work = async {
        let Ok(Incoming::Call {
            object,
            method,
            args,
            ..
        }) = wire::decode_incoming(&payload)
        else {
            return wire::encode_failure(FailureKind::Protocol, "envelope changed");
        };
        let Ok(_permit) = inner.handlers.acquire().await else {
            return wire::encode_failure(FailureKind::Cancelled, "closing");
        };
        let mut handlers = Handlers::new();
        match inner.start_call(object, method, args, None, &mut handlers) {
            Ok(()) => inner.handler_result(CatchUnwind(handlers.call_mut()).await),
            Err(refusal) => refusal,
        }
    };
    let reply = race_call(work, &mut cancel, deadline).await;
    send_call_reply(&inner, conv, reply).await;
}

/// Continues a call whose handler the fast path started and that did not finish on its
/// first poll; gives its handler slot back when done.
pub(super) async fn finish_call(
    inner: Arc<Inner>,
    conv: Conversation,
    handler: CatchUnwind<HandlerFuture<Payload>>,
    deadline: Instant,
    mut cancel: oneshot::Receiver<()>,
) {
    let work = async { inner.handler_result(handler.await) };
    let reply = race_call(work, &mut cancel, deadline).await;
    inner.handlers.add_permits(1);
    send_call_reply(&inner, conv, reply).await;
}

/// Runs a call's work until it finishes, is cancelled or passes its deadline.
pub(super) async fn race_call(
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

/// Sends a spawned call's reply and retires the call.
pub(super) async fn send_call_reply(inner: &Arc<Inner>, conv: Conversation, reply: Payload) {
    lock(&inner.inflight).calls.remove(&conv.first_id());
    let options = SendOptions::new().conversation(conv);
    let sent = match inner.conn.try_send(&reply, options) {
        Err(SendError::WouldBlock) => inner.conn.send_bytes(&reply, options).await,
        other => other,
    };
    if let Err(e) = sent {
        tracing::debug!("chatter-rpc: reply not sent: {e}");
    }
    if inner.active.fetch_sub(1, Ordering::AcqRel) == 1 {
        inner.idle.notify_waiters();
    }
}

pub(super) async fn run_signal(inner: Arc<Inner>, payload: Bytes, expires: Instant) {
    let Ok(Incoming::Signal {
        object,
        method,
        args,
        ..
    }) = wire::decode_incoming(&payload)
    else {
        return;
    };
    let permit = tokio::time::timeout_at(expires, inner.handlers.acquire()).await;
    let (Ok(Ok(_permit)), false) = (permit, Instant::now() > expires) else {
        bump(&inner.peer.stats.signals_expired_on_arrival);
        return;
    };
    let mut handlers = Handlers::new();
    if inner.start_signal(object, method, args, None, &mut handlers) {
        bump(&inner.peer.stats.signals_delivered);
        let result = CatchUnwind(handlers.signal_mut()).await;
        inner.signal_result(result, object, method);
    }
}
