//! Signals this side sends, through the peer's one outbox (`outbox.rs`), whatever its link.
//!
//! A signal goes straight to the connection when nothing is queued before it and the
//! connection has flow-control credit (the fast path: no lock, no allocation for a signal
//! that is not acknowledged). Otherwise it goes into the outbox, and the connection's
//! *sender* task hands the outbox to the connection in order, as credit allows. An
//! acknowledged signal stays in the outbox until its acknowledgement arrives (a
//! reconnecting link re-sends it on the next connection if it was lost); one that is not
//! acknowledged leaves once handed over. A full outbox applies [`WhenFull`]: the default
//! makes the signal's future wait for room within its TTL.

use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chatter_core::{SendError, SendOptions};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::error::SignalError;
use crate::store;
use crate::wire::{self, AckStatus, Payload};

use super::events::PeerEvent;
use super::options::{bump, WhenFull};
use super::outbox::{Delivery, Item, Sent, SignalId};
use super::{after, lock, Inner, Peer, PeerState};

/// What trying to send a signal without waiting came to.
pub(crate) enum Attempt {
    /// Sent, queued, or failed.
    Done(Result<Sent, SignalError>),
    /// The outbox is full and the peer waits for room ([`WhenFull::Wait`]): hand the
    /// signal to [`Peer::signal_when_room`].
    Full(Payload, Instant),
}

impl Peer {
    /// Sends or queues a signal without waiting (generated clients call this first).
    pub(crate) fn try_signal(&self, payload: Payload, ttl: Duration, persistent: bool) -> Attempt {
        if let Some(unpinned) = self.unpinned() {
            return unpinned.try_signal(payload, ttl, persistent);
        }
        let state = &*self.state;
        if state.is_shutting_down() {
            return Attempt::Done(Err(SignalError::ShuttingDown));
        }
        if let (Some(inner), false) = (&self.plain, state.acknowledged) {
            // The fast path: nothing queued before it, credit available.
            if state.queued.load(Ordering::Acquire) == 0 {
                match inner.conn.try_send(&payload, signal_options(inner)) {
                    Ok(_) => {
                        bump(&state.stats.signals_sent);
                        return Attempt::Done(Ok(Sent::untracked()));
                    }
                    Err(SendError::WouldBlock) => {}
                    Err(SendError::Closed(cause)) => {
                        return Attempt::Done(Err(SignalError::ConnectionLost(cause)))
                    }
                    Err(e) => return Attempt::Done(Err(SignalError::TooLarge(e.to_string()))),
                }
            }
        }
        self.enqueue(payload, after(ttl), persistent)
    }

    /// Waits for room in the outbox, at most until `expires`, then queues the signal.
    pub(crate) async fn signal_when_room(
        self,
        mut payload: Payload,
        expires: Instant,
        persistent: bool,
    ) -> Result<Sent, SignalError> {
        let queue = self.state.queue();
        loop {
            let mut room = pin!(queue.room.notified());
            room.as_mut().enable();
            match self.enqueue(payload, expires, persistent) {
                Attempt::Done(done) => return done,
                Attempt::Full(back, _) => payload = back,
            }
            if tokio::time::timeout_at(expires, room).await.is_err() {
                bump(&self.state.stats.signals_expired);
                return Err(SignalError::Expired);
            }
        }
    }

    /// Puts a signal into the outbox (and, on a plain link with nothing unsent, hands an
    /// acknowledged one to the connection right away).
    fn enqueue(&self, payload: Payload, expires: Instant, persistent: bool) -> Attempt {
        let state = &*self.state;
        if state.is_shutting_down() {
            return Attempt::Done(Err(SignalError::ShuttingDown));
        }
        if let Some(error) = self.closed_link() {
            return Attempt::Done(Err(error));
        }
        let queue = state.queue();
        let mut evicted = None;
        let mut sent_now = false;
        let sent = {
            let mut outbox = lock(&queue.outbox);
            if outbox.items.len() >= state.capacity() {
                match state.options.when_full {
                    WhenFull::Error => {
                        bump(&state.stats.signals_rejected);
                        return Attempt::Done(Err(SignalError::OutboxFull));
                    }
                    WhenFull::DropOldest => evicted = outbox.items.pop_front(),
                    _ => return Attempt::Full(payload, expires),
                }
            }
            let seq = outbox.next_seq;
            let persistent = persistent && queue.store.is_some();
            if let Some(store) = &queue.store {
                let mut store = lock(store);
                let stored = if persistent {
                    let left = expires.saturating_duration_since(Instant::now());
                    store.insert(seq, &payload, store::wall_ms_after(left))
                } else {
                    store.reserve(seq)
                };
                if let Err(e) = stored {
                    // Nothing was queued: put an evicted signal back where it was.
                    if let Some(item) = evicted.take() {
                        outbox.items.push_front(item);
                    }
                    return Attempt::Done(Err(SignalError::Store(e)));
                }
            }
            outbox.next_seq += 1;
            let (ack, sent) = if state.acknowledged {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Sent::tracked(state.id(seq), rx))
            } else {
                (None, Sent::untracked())
            };
            let mut item = Item {
                seq,
                payload: Bytes::new(),
                expires,
                sent_gen: None,
                persistent,
                ack,
            };
            // A peer made from a connection, with nothing unsent before this signal:
            // hand it over now if the connection has credit (under the outbox lock, so
            // that nothing overtakes it). Not acknowledged signals tried that already.
            let now = Instant::now();
            if let (Some(inner), true) = (&self.plain, state.acknowledged) {
                if outbox.next_unsent().is_none() && now < expires {
                    let encoded = wire::encode_reliable(state.stream, seq, &payload, expires - now);
                    let bytes = match encoded {
                        Ok(bytes) => bytes,
                        Err(e) => {
                            if let Some(item) = evicted.take() {
                                outbox.items.push_front(item);
                            }
                            let error = SignalError::BadArguments { what: e.0 };
                            return Attempt::Done(Err(error));
                        }
                    };
                    match inner.conn.try_send(&bytes, signal_options(inner)) {
                        Ok(_) => {
                            sent_now = true;
                            item.sent_gen = Some(inner.generation);
                            outbox.cursor = seq + 1;
                        }
                        Err(SendError::WouldBlock) => {}
                        Err(e) => {
                            // Nothing was queued: put an evicted signal back where it was.
                            if let Some(item) = evicted.take() {
                                outbox.items.push_front(item);
                            }
                            let error = match e {
                                SendError::Closed(cause) => SignalError::ConnectionLost(cause),
                                e => SignalError::TooLarge(e.to_string()),
                            };
                            return Attempt::Done(Err(error));
                        }
                    }
                }
            }
            if !sent_now || state.resends {
                item.payload = payload.into_bytes();
            }
            outbox.items.push_back(item);
            state.queued.store(outbox.items.len(), Ordering::Release);
            sent
        };
        bump(&state.stats.signals_queued);
        if sent_now {
            bump(&state.stats.signals_sent);
        }
        if let Some(mut item) = evicted {
            let maybe_delivered = item.maybe_delivered();
            item.settle(Delivery::Dropped { maybe_delivered });
            bump(&state.stats.signals_dropped);
            if state.acknowledged {
                queue.events.emit(PeerEvent::SignalDropped {
                    id: state.id(item.seq),
                    maybe_delivered,
                });
            }
            state.forget(&item);
        }
        if !sent_now {
            queue.changed.notify_waiters();
            if let Some(inner) = &self.plain {
                inner.start_sender(usize::MAX);
            }
        }
        Attempt::Done(Ok(sent))
    }
}

impl Inner {
    /// Starts this connection's sender task unless it runs already (once per connection:
    /// it ends when the connection closes).
    pub(crate) fn start_sender(self: &Arc<Self>, window: usize) {
        self.sender.get_or_init(|| {
            self.peer.runtime.spawn(run_sender(self.clone(), window));
        });
    }
}

impl PeerState {
    /// The id of the acknowledged signal `seq`.
    pub(crate) fn id(&self, seq: u64) -> SignalId {
        SignalId {
            stream: self.stream,
            seq,
        }
    }

    /// Connection `generation` of a reconnecting link is up: send it everything not
    /// acknowledged, from the start of the outbox.
    pub(crate) fn start_connection(&self, generation: u64) {
        let queue = self.queue();
        {
            let mut outbox = lock(&queue.outbox);
            outbox.cursor = 0;
            outbox.live = Some(generation);
        }
        queue.changed.notify_waiters();
    }

    /// The live connection of a reconnecting link is gone: what it was sent waits for
    /// the next (or expires).
    pub(crate) fn connection_lost(&self) {
        let queue = self.queue();
        lock(&queue.outbox).live = None;
        queue.changed.notify_waiters();
    }

    /// Takes item `seq` out of the outbox.
    fn take(&self, seq: u64) -> Option<Item> {
        let mut outbox = lock(&self.queue.get()?.outbox);
        let item = outbox.take(seq)?;
        self.queued.store(outbox.items.len(), Ordering::Release);
        Some(item)
    }

    /// Deletes a signal from the store and announces the room (after the signal's outcome
    /// was counted and reported, so that `flush` returns with everything accounted for).
    fn forget(&self, item: &Item) {
        let queue = self.queue();
        if let (true, Some(store)) = (item.persistent, &queue.store) {
            lock(store).delete(item.seq);
        }
        queue.room.notify_waiters();
    }

    /// Drops signal `seq`, whose TTL ran out before it was acknowledged (or sent).
    fn expire(&self, seq: u64) {
        let Some(mut item) = self.take(seq) else {
            return;
        };
        let maybe_delivered = item.maybe_delivered();
        item.settle(Delivery::Expired { maybe_delivered });
        bump(&self.stats.signals_expired);
        if self.acknowledged {
            self.emit(PeerEvent::SignalExpired {
                id: self.id(seq),
                maybe_delivered,
            });
        }
        self.forget(&item);
    }

    /// An acknowledgement arrived (the receive task calls this).
    pub(crate) fn on_ack(&self, stream: u64, seq: u64, status: u8) {
        if stream != self.stream || !self.acknowledged {
            tracing::debug!(stream, seq, "acknowledgement for a stream not ours ignored");
            return;
        }
        let Some(mut item) = self.take(seq) else {
            return; // a duplicate acknowledgement
        };
        match AckStatus::from_u8(status) {
            Some(AckStatus::Handled) => {
                bump(&self.stats.signals_acknowledged);
                item.settle(Delivery::Handled);
            }
            Some(AckStatus::Expired) => {
                bump(&self.stats.signals_expired);
                item.settle(Delivery::Expired {
                    maybe_delivered: false,
                });
                self.emit(PeerEvent::SignalExpired {
                    id: self.id(seq),
                    maybe_delivered: false,
                });
            }
            Some(AckStatus::Failed) | None => {
                bump(&self.stats.signals_failed_remotely);
                item.settle(Delivery::Failed);
                self.emit(PeerEvent::SignalFailed { id: self.id(seq) });
            }
        }
        self.forget(&item);
    }
}

/// How a signal is sent: only while half the peer's window stays free after it (unless
/// nothing is in flight), so that a backlog of signals the receiver is slow to handle
/// never takes the whole window from calls (which keep a quarter free) and replies
/// (which keep none).
pub(crate) fn signal_options(inner: &Inner) -> SendOptions {
    SendOptions::new().reserve(inner.peer_window() / 2)
}

/// Hands the outbox to one connection, in sequence order: first what is there (on a new
/// connection of a reconnecting link: everything not acknowledged), then whatever comes.
/// At most `window` acknowledged signals are in flight at once. Ends when the connection
/// closes.
pub(crate) async fn run_sender(inner: Arc<Inner>, window: usize) {
    let state = &*inner.peer;
    let queue = state.queue();
    let generation = inner.generation;
    let resends = state.resends;
    loop {
        let mut changed = pin!(queue.changed.notified());
        changed.as_mut().enable();
        let mut room = pin!(queue.room.notified());
        room.as_mut().enable();
        if inner.conn.is_closed() {
            return;
        }
        let (next, in_flight) = {
            let outbox = lock(&queue.outbox);
            let next = outbox
                .next_unsent()
                .map(|it| (it.seq, it.payload.clone(), it.expires, it.sent_gen));
            (next, outbox.in_flight())
        };
        if in_flight >= window {
            room.await;
            continue;
        }
        let Some((seq, payload, expires, sent_before)) = next else {
            changed.await;
            continue;
        };
        let now = Instant::now();
        if now >= expires {
            state.expire(seq);
            continue;
        }
        let bytes = if state.acknowledged {
            match wire::encode_reliable(state.stream, seq, &payload, expires - now) {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::warn!(seq, error = %e, "malformed queued signal dropped");
                    state.on_ack(state.stream, seq, AckStatus::Failed as u8);
                    continue;
                }
            }
        } else {
            payload
        };
        // Marked as sent on this connection *before* it is handed over, not after: in
        // between, the sweep (on another thread) or an eviction would find it unsent and
        // report it expired or dropped as never delivered, while the receiver, which gets
        // the TTL left rounded up to a millisecond, may still run it (seen as "handled
        // and reported as never delivered" in
        // `thousands_of_signals_through_repeated_cuts_arrive_once_in_order_or_are_reported`).
        // Marked, the sweep leaves it to this task, which expires it itself at its TTL if
        // the send is still waiting then. Gone already (expired, dropped, acknowledged):
        // not sent.
        {
            let mut outbox = lock(&queue.outbox);
            match outbox.get_mut(seq) {
                Some(it) => it.sent_gen = Some(generation),
                None => continue,
            }
        }
        let send = inner.conn.send_bytes(&bytes, signal_options(&inner));
        let sent = tokio::time::timeout_at(expires, send).await;
        if !matches!(sent, Ok(Ok(_))) {
            // Not handed over after all: it is as sent (or not) as before.
            if let Some(it) = lock(&queue.outbox).get_mut(seq) {
                it.sent_gen = sent_before;
            }
            // The sweep may have skipped it while it was marked.
            queue.changed.notify_waiters();
        }
        match sent {
            Ok(Ok(_)) => {
                bump(&state.stats.signals_sent);
                if sent_before.is_some() {
                    bump(&state.stats.signals_resent);
                }
                let mut outbox = lock(&queue.outbox);
                if !state.acknowledged {
                    // Handed over: it leaves the outbox.
                    outbox.take(seq);
                    state.queued.store(outbox.items.len(), Ordering::Release);
                    drop(outbox);
                    queue.room.notify_waiters();
                    continue;
                }
                outbox.cursor = outbox.cursor.max(seq + 1);
                // (`sent_gen` was set before the send.)
                if let (Some(it), false) = (outbox.get_mut(seq), resends) {
                    // Never sent again: only its acknowledgement is awaited.
                    it.payload = Bytes::new();
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(seq, error = %e, "signal not sent");
                return; // the connection closed
            }
            Err(_) => state.expire(seq),
        }
    }
}

/// Drops signals whose TTL ran out, except those sent on the live connection (the
/// receiver decides about those: it acknowledges them as handled or expired). Runs for a
/// reconnecting link, whose signals may wait for a connection, until `stop`.
pub(crate) async fn sweep(state: Arc<PeerState>, mut stop: watch::Receiver<bool>) {
    let queue = state.queue();
    loop {
        let mut changed = pin!(queue.changed.notified());
        changed.as_mut().enable();
        let now = Instant::now();
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        {
            let outbox = lock(&queue.outbox);
            let live = outbox.live;
            for it in outbox.items.iter() {
                if live.is_some() && it.sent_gen == live {
                    continue;
                }
                if it.expires <= now {
                    due.push(it.seq);
                } else {
                    next = Some(next.map_or(it.expires, |n| n.min(it.expires)));
                }
            }
        }
        for seq in due {
            state.expire(seq);
        }
        let far = now + Duration::from_secs(3600);
        tokio::select! {
            () = &mut changed => {}
            () = tokio::time::sleep_until(next.unwrap_or(far)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
