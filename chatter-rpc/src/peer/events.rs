//! What happens to a [`Peer`](crate::Peer): its [`ConnectionState`], and the
//! [`PeerEvent`]s its subscribers ([`Events`]) receive.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatter_core::{Address, CloseCause};
use tokio::sync::mpsc;

use super::lock;
use super::outbox::SignalId;

/// Where a [`Peer`](crate::Peer)'s link stands, from [`Peer::state`](crate::Peer::state).
/// A peer made from a connection is `Connected`, then `Closed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// The first connection attempt runs.
    Connecting,
    /// Connected.
    Connected,
    /// Disconnected; waiting before, or running, attempt `attempt` (from 1).
    Reconnecting {
        /// The attempt number since the last connection.
        attempt: u32,
    },
    /// Closed (by [`close`](crate::Peer::close), a shutdown, the other side, or because
    /// the backoff gave up).
    Closed,
}

/// Something that happened to a [`Peer`](crate::Peer), from
/// [`Peer::events`](crate::Peer::events).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PeerEvent {
    /// A connection is up (registered objects are served on it; queued signals are being
    /// sent). A peer made from a connection does not report its one connection.
    Connected {
        /// The address connected to.
        remote: Address,
    },
    /// The connection dropped (or closed, for a peer made from a connection).
    Disconnected {
        /// Why.
        cause: CloseCause,
    },
    /// The next attempt is scheduled.
    Reconnecting {
        /// Its number (from 1).
        attempt: u32,
        /// The wait before it.
        delay: Duration,
        /// Why the previous attempt or connection failed.
        last_error: String,
    },
    /// A connection was made, but one of its
    /// [`ReconnectOptions::on_connect`](crate::ReconnectOptions::on_connect) hooks failed:
    /// the connection was closed, and the attempt counts as failed
    /// ([`PeerEvent::Reconnecting`] or [`PeerEvent::GaveUp`] follows).
    OnConnectFailed {
        /// The address connected to.
        remote: Address,
        /// The hook's error.
        error: String,
    },
    /// The backoff gave up; the peer is closed.
    GaveUp {
        /// Why the last attempt failed.
        last_error: String,
    },
    /// An acknowledged signal's TTL ran out: it was dropped, never delivered late.
    SignalExpired {
        /// The signal.
        id: SignalId,
        /// True when a copy was sent on a connection that was lost before its
        /// acknowledgement came back: the receiver may have handled it.
        maybe_delivered: bool,
    },
    /// An acknowledged signal was dropped from a full outbox
    /// ([`WhenFull::DropOldest`](crate::WhenFull::DropOldest)) or because the peer closed
    /// without a store.
    SignalDropped {
        /// The signal.
        id: SignalId,
        /// As for [`PeerEvent::SignalExpired`].
        maybe_delivered: bool,
    },
    /// The receiver could not handle an acknowledged signal (no such object or method,
    /// bad arguments, a panicking handler).
    SignalFailed {
        /// The signal.
        id: SignalId,
    },
}

/// How many unread events a subscription keeps; later ones are counted in
/// [`Events::missed`] and dropped.
pub const EVENTS_KEPT: usize = 1024;

/// A subscription to a peer's [`PeerEvent`]s: each subscriber gets every event from the
/// moment it subscribed. Up to [`EVENTS_KEPT`] unread events are kept; while that many
/// wait, newer ones are dropped and counted ([`missed`](Self::missed)), so a subscriber
/// that stops reading costs at most that much memory.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<PeerEvent>,
    missed: Arc<AtomicU64>,
}

impl Events {
    /// Events dropped because [`EVENTS_KEPT`] unread ones were waiting.
    pub fn missed(&self) -> u64 {
        self.missed.load(Ordering::Relaxed)
    }

    /// The next event; `None` once the peer is gone.
    pub async fn next(&mut self) -> Option<PeerEvent> {
        self.rx.recv().await
    }

    /// The next event if one is waiting.
    pub fn try_next(&mut self) -> Option<PeerEvent> {
        self.rx.try_recv().ok()
    }
}

/// The subscribers of one peer, each with its count of missed events. Dropped
/// subscriptions are forgotten at the next event.
#[derive(Default)]
pub(crate) struct Subscribers(Mutex<Vec<(mpsc::Sender<PeerEvent>, Arc<AtomicU64>)>>);

impl Subscribers {
    pub(crate) fn subscribe(&self) -> Events {
        let (tx, rx) = mpsc::channel(EVENTS_KEPT);
        let missed = Arc::new(AtomicU64::new(0));
        lock(&self.0).push((tx, missed.clone()));
        Events { rx, missed }
    }

    /// Sends `event` to every subscriber still listening; one with [`EVENTS_KEPT`] unread
    /// events misses it.
    pub(crate) fn emit(&self, event: PeerEvent) {
        let mut subscribers = lock(&self.0);
        if !subscribers.is_empty() {
            subscribers.retain(|(tx, missed)| match tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    missed.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscriber_that_stops_reading_keeps_a_bounded_number_of_events() {
        let subscribers = Subscribers::default();
        let mut reader = subscribers.subscribe();
        let dropped = subscribers.subscribe();
        drop(dropped);
        let event = |seq| PeerEvent::SignalFailed {
            id: SignalId { stream: 1, seq },
        };
        for seq in 0..(EVENTS_KEPT as u64 + 10) {
            subscribers.emit(event(seq));
        }
        assert_eq!(reader.missed(), 10);
        assert_eq!(
            lock(&subscribers.0).len(),
            1,
            "the dropped subscription is forgotten"
        );
        let mut kept = 0;
        while let Some(PeerEvent::SignalFailed { id }) = reader.try_next() {
            assert_eq!(id.seq, kept, "the oldest are kept, in order");
            kept += 1;
        }
        assert_eq!(kept, EVENTS_KEPT as u64);
        // Read, it receives again.
        subscribers.emit(event(0));
        assert!(reader.try_next().is_some());
    }
}
