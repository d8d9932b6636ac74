//! Calls this side makes: sending requests, waiting for outcomes, cancelling.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use chatter_core::proto::IdBuildHasher;
use chatter_core::{CloseCause, Conversation, Msg, SendError, SendOptions};

use tokio::time::Instant;

use crate::error::CallError;
use crate::first_inline::{Entry, FirstInline};
use crate::wire::{self};

use super::events::ConnectionState;
use super::link::{Link, Supervisor};
use super::*;

#[derive(Default)]
pub(super) struct Pending {
    /// Set once the receive task saw the connection close ([`Inner::finish`]): no reply
    /// comes any more. The cause is the connection's ([`Inner::close_cause`]), read when
    /// a call needs it rather than copied here at every close (a box and the reason's
    /// string, for most connections never read).
    pub(super) closed: bool,
    /// Inline first entry: a connection that makes one call at a time (as most short
    /// ones do) never allocates the map's table.
    pub(super) calls: FirstInline<u64, Slot, IdBuildHasher>,
}

/// The state of one outgoing call. The outcome is handed over in the slot itself (the
/// caller's future polls it), not through a channel: no allocation per call.
pub(super) enum Slot {
    /// The caller waits; wake it when the outcome arrives.
    Waiting(Waker),
    /// The outcome, not yet taken by the caller (it may have arrived before the caller
    /// registered: it raced the send's return). With `then_abandon`, the reply is still to
    /// come and end the conversation: the slot stays `Abandoned` once the outcome is taken.
    Arrived {
        outcome: Outcome,
        then_abandon: bool,
    },
    /// The caller gave up (dropped or deadline); the reply still ends the conversation.
    Abandoned,
}

/// How an outgoing call ended, as seen by the receive task.
#[derive(Debug)]
pub(crate) enum Outcome {
    Reply(Bytes),
    Deadline,
    Lost(CloseCause),
    /// The request was never handed to the connection.
    NotSent(CloseCause),
    Protocol(String),
    /// The callee opened the result stream of a stream call (its items follow).
    Opened,
}

impl Inner {
    /// Sends a request and waits for its outcome. The caller's future owns a guard: if it is
    /// dropped before the outcome, the callee is told to cancel.
    pub(crate) fn call<'a>(
        self: &'a Arc<Self>,
        payload: impl AsRef<[u8]> + Send + Sync + 'a,
        deadline: Duration,
    ) -> impl Future<Output = Outcome> + Send + 'a {
        // Sent before the future is made, so that the future does not hold the request:
        // its buffer goes back to the pool now, not when the reply comes. Callers call
        // this in the first poll of their own future, so calls are still sent when first
        // polled.
        let start = match self.try_start_call(payload.as_ref(), deadline) {
            Ok(id) => Start::Sent(CallGuard {
                inner: self,
                id,
                armed: true,
            }),
            // Rare (the peer's window is full). Boxed so that its timer and wait state do
            // not make every call future larger: callers move these futures around.
            // The request is made anew at each attempt, with the time left: a call that
            // waited for credit still ends at its deadline on the callee's side too.
            // The deadline travels in milliseconds: the request is re-encoded only when
            // that figure changed since the last attempt (every waiting call retries at
            // each window update).
            Err(SendError::WouldBlock) => Start::Wait(Box::pin(async move {
                let until = Instant::now() + deadline;
                let mut made: Option<(u128, Bytes)> = None;
                let send = self.conn.send_made(|| {
                    let left = until.saturating_duration_since(Instant::now());
                    let request = match &made {
                        Some((ms, request)) if *ms == left.as_millis() => request.clone(),
                        _ => {
                            let request = wire::rewrite_deadline(payload.as_ref(), left)
                                .unwrap_or_else(|_| Bytes::copy_from_slice(payload.as_ref()));
                            made = Some((left.as_millis(), request.clone()));
                            request
                        }
                    };
                    (request, call_options(self, left))
                });
                match tokio::time::timeout_at(until, send).await {
                    Ok(Ok(conv)) => Ok(conv),
                    Ok(Err(e)) => Err(send_failure(e)),
                    Err(_) => Err(Outcome::Deadline),
                }
            })),
            Err(e) => Start::Wait(Box::pin(std::future::ready(Err(send_failure(e))))),
        };
        async move {
            let mut guard = match start {
                Start::Sent(guard) => guard,
                Start::Wait(wait) => match wait.await {
                    Ok(conv) => CallGuard {
                        inner: self,
                        id: conv.first_id(),
                        armed: true,
                    },
                    Err(outcome) => return outcome,
                },
            };
            let id = guard.id;
            let outcome = std::future::poll_fn(|cx| self.poll_outcome(id, cx)).await;
            guard.armed = false;
            outcome
        }
    }

    /// Sends a request now if the peer's window has room: returns its pending slot id, to
    /// poll with [`poll_outcome`](Self::poll_outcome) and, if the caller gives up, to
    /// [`abandon_call`](Self::abandon_call). Fails with [`SendError::WouldBlock`] when the
    /// window has no room now (then use [`call`](Self::call)).
    pub(crate) fn try_start_call(
        &self,
        payload: &[u8],
        deadline: Duration,
    ) -> Result<u64, SendError> {
        self.conn
            .try_send(payload, call_options(self, deadline))
            .map(|conv| conv.first_id())
    }

    /// Takes the outcome of call `id` if it arrived, else registers (or refreshes) the
    /// caller's waker.
    pub(crate) fn poll_outcome(&self, id: u64, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut pending = lock(&self.pending);
        let closed = pending.closed;
        let lost = match pending.calls.entry(id) {
            Entry::Occupied(mut slot) => match slot.get_mut() {
                Slot::Waiting(waker) => {
                    if !waker.will_wake(cx.waker()) {
                        *waker = cx.waker().clone();
                    }
                    return Poll::Pending;
                }
                Slot::Arrived { then_abandon, .. } => {
                    let outcome = if *then_abandon {
                        std::mem::replace(slot.get_mut(), Slot::Abandoned)
                    } else {
                        slot.remove()
                    };
                    let Slot::Arrived { outcome, .. } = outcome else {
                        unreachable!("matched as arrived")
                    };
                    return Poll::Ready(outcome);
                }
                // Only the caller abandons its slot, and then it does not poll any more.
                Slot::Abandoned => closed,
            },
            Entry::Vacant(_) if closed => true,
            Entry::Vacant(slot) => {
                slot.insert(Slot::Waiting(cx.waker().clone()));
                return Poll::Pending;
            }
        };
        // The cause is read without the lock (it takes the connection's).
        drop(pending);
        let cause = if lost {
            self.close_cause()
        } else {
            CloseCause::Local
        };
        Poll::Ready(Outcome::Lost(cause))
    }

    pub(super) fn on_reply(&self, msg: Msg) {
        // One pointer test when this connection never had a stream.
        let msg = match self.streams.get() {
            None => msg,
            Some(streams) => match self.on_stream_reply(streams, msg) {
                Some(msg) => msg,
                None => return,
            },
        };
        let outcome = if msg.last {
            Outcome::Reply(msg.payload)
        } else {
            Outcome::Protocol("the callee answered without ending the call".into())
        };
        self.settle(msg.conversation.first_id(), outcome);
    }

    pub(super) fn on_timeout(&self, conv: Conversation) {
        if conv.is_owner() {
            self.settle(conv.first_id(), Outcome::Deadline);
        }
    }

    /// Delivers an outcome to the waiting caller.
    pub(super) fn settle(&self, id: u64, outcome: Outcome) {
        let mut pending = lock(&self.pending);
        let is_reply = matches!(outcome, Outcome::Reply(_));
        match pending.calls.entry(id) {
            Entry::Occupied(mut slot) => match slot.get() {
                Slot::Waiting(_) => {
                    let arrived = Slot::Arrived {
                        outcome,
                        // Not a reply: the reply will still come and end the conversation.
                        then_abandon: !is_reply,
                    };
                    let Slot::Waiting(waker) = std::mem::replace(slot.get_mut(), arrived) else {
                        unreachable!("matched as waiting")
                    };
                    drop(pending);
                    waker.wake();
                }
                Slot::Abandoned if is_reply => {
                    slot.remove();
                }
                Slot::Abandoned => {}
                Slot::Arrived { .. } => {
                    // The first outcome wins; a reply after it ends the conversation.
                    if let Slot::Arrived { then_abandon, .. } = slot.get_mut() {
                        if is_reply {
                            *then_abandon = false;
                        }
                    }
                }
            },
            Entry::Vacant(slot) => {
                slot.insert(Slot::Arrived {
                    outcome,
                    then_abandon: !is_reply,
                });
            }
        }
    }
}

/// How a call began: sent (the guard owns its pending slot), or waiting to be sent.
pub(super) enum Start<'a> {
    Sent(CallGuard<'a>),
    Wait(Pin<Box<dyn Future<Output = Result<Conversation, Outcome>> + Send + 'a>>),
}

/// Tells the callee to cancel a call whose future was dropped.
pub(super) struct CallGuard<'a> {
    pub(super) inner: &'a Inner,
    pub(super) id: u64,
    pub(super) armed: bool,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.abandon_call(self.id);
        }
    }
}

impl Inner {
    /// The caller of call `id` gave up before taking its outcome: tells the callee to
    /// cancel, and keeps the slot until the reply ends the conversation.
    pub(crate) fn abandon_call(&self, id: u64) {
        let mut pending = lock(&self.pending);
        let closed = pending.closed;
        let mut slot = match pending.calls.entry(id) {
            Entry::Occupied(slot) => slot,
            // Sent, but the caller's future was dropped before its first poll registered
            // the slot: abandon it as the reply has yet to end the conversation.
            Entry::Vacant(slot) => {
                if !closed {
                    slot.insert(Slot::Abandoned);
                    drop(pending);
                    self.send_soon(wire::encode_cancel(id), SendOptions::new());
                }
                return;
            }
        };
        match slot.get() {
            Slot::Waiting(_) => {
                *slot.get_mut() = Slot::Abandoned;
                drop(pending);
                self.send_soon(wire::encode_cancel(id), SendOptions::new());
            }
            // The outcome arrived but was not taken; the reply may still have to come.
            Slot::Arrived {
                then_abandon: true, ..
            } => *slot.get_mut() = Slot::Abandoned,
            Slot::Arrived { .. } => {
                slot.remove();
            }
            Slot::Abandoned => {}
        }
    }
}

/// How a request is sent: it opens a conversation, passes the turn to the callee and
/// times out at the call's deadline; it keeps a quarter of the peer's window free for
/// replies (signals keep half: a backlog of signals cannot starve calls).
pub(super) fn call_options(inner: &Inner, deadline: Duration) -> SendOptions {
    SendOptions::new()
        .last(false)
        .timeout(deadline)
        .reserve(inner.peer_window() / 4)
}

pub(super) fn send_failure(e: SendError) -> Outcome {
    match e {
        SendError::Closed(cause) => Outcome::NotSent(cause),
        other => Outcome::Protocol(other.to_string()),
    }
}

impl PeerState {
    /// A call through a reconnecting link: waits for a connection within the deadline,
    /// re-sends an idempotent call whose connection was lost (generated clients call
    /// this).
    pub(crate) async fn call_reconnecting(
        self: Arc<Self>,
        payload: Bytes,
        deadline: Duration,
        idempotent: bool,
    ) -> Result<Bytes, CallError> {
        let Link::Reconnecting(sv) = &self.link else {
            return Err(CallError::Protocol("not a reconnecting peer".into()));
        };
        if self.is_shutting_down() {
            return Err(CallError::ShuttingDown);
        }
        sv.calls.fetch_add(1, Ordering::AcqRel);
        let _active = ActiveCall(sv);
        let until = Instant::now() + deadline;
        let work = async {
            let mut dead = 0;
            loop {
                let (inner, generation) = sv.connected(until, dead).await?;
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(CallError::DeadlineExceeded);
                }
                let request = wire::rewrite_deadline(&payload, left)
                    .map_err(|e| CallError::BadArguments { what: e.0 })?;
                match inner.call(&request, left).await {
                    Outcome::Reply(reply) => return Ok(reply),
                    Outcome::Deadline => return Err(CallError::DeadlineExceeded),
                    Outcome::Protocol(what) => return Err(CallError::Protocol(what)),
                    Outcome::Opened => {
                        return Err(CallError::Protocol("a stream opened for a call".into()))
                    }
                    Outcome::NotSent(_) => dead = generation,
                    Outcome::Lost(_) if idempotent => dead = generation,
                    Outcome::Lost(cause) => return Err(CallError::OutcomeUnknown(cause)),
                }
            }
        };
        match tokio::time::timeout_at(until, work).await {
            Ok(result) => result,
            Err(_) => Err(CallError::DeadlineExceeded),
        }
    }
}

impl PeerState {
    /// The connection of a reconnecting peer, waiting for one until `until` (for stream
    /// calls, which are never re-sent: a stream lives on one connection).
    pub(crate) async fn connection_until(&self, until: Instant) -> Result<Arc<Inner>, CallError> {
        let Link::Reconnecting(sv) = &self.link else {
            return Err(CallError::Protocol("not a reconnecting peer".into()));
        };
        sv.connected(until, 0).await.map(|(inner, _)| inner)
    }
}

impl Supervisor {
    /// The current connection, waiting for one (not generation `dead`, which failed the
    /// caller) until `until`.
    pub(crate) async fn connected(
        &self,
        until: Instant,
        dead: u64,
    ) -> Result<(Arc<Inner>, u64), CallError> {
        let mut current = self.current.subscribe();
        let wait = async {
            loop {
                {
                    let c = current.borrow_and_update();
                    if let Some(inner) = &c.inner {
                        if c.generation != dead && !inner.conn.is_closed() {
                            return Ok((inner.clone(), c.generation));
                        }
                    }
                    if c.state == ConnectionState::Closed {
                        return Err(c.last_error.clone());
                    }
                }
                if current.changed().await.is_err() {
                    return Err("the peer is closed".to_string());
                }
            }
        };
        match tokio::time::timeout_at(until, wait).await {
            Ok(Ok(found)) => Ok(found),
            Ok(Err(last_error)) => Err(CallError::NotConnected { last_error }),
            Err(_) => {
                let last_error = self.current.borrow().last_error.clone();
                Err(CallError::NotConnected { last_error })
            }
        }
    }
}

/// Counts a call in progress on a reconnecting link (for graceful shutdown).
struct ActiveCall<'a>(&'a Supervisor);

impl Drop for ActiveCall<'_> {
    fn drop(&mut self) {
        if self.0.calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.calls_idle.notify_waiters();
        }
    }
}
