//! What happens to a [`Peer`](crate::Peer): its [`ConnectionState`], and the
//! [`PeerEvent`]s its subscribers ([`Events`]) receive.

use std::sync::Mutex;
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

/// A subscription to a peer's [`PeerEvent`]s (each subscriber gets every event from the
/// moment it subscribed; unread events are kept).
#[derive(Debug)]
pub struct Events {
    rx: mpsc::UnboundedReceiver<PeerEvent>,
}

impl Events {
    /// The next event; `None` once the peer is gone.
    pub async fn next(&mut self) -> Option<PeerEvent> {
        self.rx.recv().await
    }

    /// The next event if one is waiting.
    pub fn try_next(&mut self) -> Option<PeerEvent> {
        self.rx.try_recv().ok()
    }
}

/// The subscribers of one peer.
#[derive(Default)]
pub(crate) struct Subscribers(Mutex<Vec<mpsc::UnboundedSender<PeerEvent>>>);

impl Subscribers {
    pub(crate) fn subscribe(&self) -> Events {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.0).push(tx);
        Events { rx }
    }

    /// Sends `event` to every subscriber still listening.
    pub(crate) fn emit(&self, event: PeerEvent) {
        let mut subscribers = lock(&self.0);
        if !subscribers.is_empty() {
            subscribers.retain(|s| s.send(event.clone()).is_ok());
        }
    }
}
