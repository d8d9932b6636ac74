//! The signal outbox of a [`Peer`](crate::Peer), one per peer whatever its link: signals
//! in send order, each kept until it was handed to a connection (or, for acknowledged
//! signals, until the receiver acknowledged it), its TTL ran out, or it was dropped; and
//! [`Sent`], what sending one returns.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::AckError;

/// The id of an acknowledged signal (sent through a reconnecting [`Peer`](crate::Peer), or
/// with [`PeerOptions::acknowledged_signals`](crate::PeerOptions::acknowledged_signals)):
/// the sender's stream id (random per peer, or stored with a persistent store) and the
/// signal's sequence number in it (from 1, in send order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SignalId {
    /// The sender's stream.
    pub stream: u64,
    /// The position in the stream.
    pub seq: u64,
}

impl fmt::Display for SignalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}/{}", self.stream, self.seq)
    }
}

/// How a queued signal ended.
#[derive(Debug, Clone)]
pub(crate) enum Delivery {
    Handled,
    Expired {
        maybe_delivered: bool,
    },
    Failed,
    Dropped {
        maybe_delivered: bool,
    },
    /// The connection of a peer that does not reconnect closed before the acknowledgement
    /// arrived.
    Lost(chatter_core::CloseCause),
}

/// A signal accepted for sending: its id, and a way to wait until the receiver's handler
/// finished with it (an *acknowledged send*, like libchirp's synchronous mode).
///
/// Dropping it changes nothing: the signal is delivered (or expires) either way.
///
/// ```
/// # async fn demo(sent: chatter_rpc::Sent) {
/// use std::time::Duration;
/// match sent.acknowledged(Duration::from_secs(5)).await {
///     Ok(()) => println!("handled by the receiver"),
///     Err(e) => println!("not (known to be) handled: {e}"),
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct Sent {
    id: Option<SignalId>,
    ack: Option<oneshot::Receiver<Delivery>>,
}

impl Sent {
    /// A signal that is not acknowledged: no id, no acknowledgement.
    pub(crate) fn untracked() -> Sent {
        Sent {
            id: None,
            ack: None,
        }
    }

    pub(crate) fn tracked(id: SignalId, ack: oneshot::Receiver<Delivery>) -> Sent {
        Sent {
            id: Some(id),
            ack: Some(ack),
        }
    }

    /// The signal's id (`None` for a signal that is not acknowledged: sent through a
    /// [`Peer::new`](crate::Peer::new) peer without
    /// [`acknowledged_signals`](crate::PeerOptions::acknowledged_signals)).
    /// Expiry events ([`PeerEvent::SignalExpired`](crate::PeerEvent::SignalExpired)) name
    /// signals by this id.
    pub fn id(&self) -> Option<SignalId> {
        self.id
    }

    /// Waits until the receiver's handler finished with the signal, at most `timeout`.
    ///
    /// Fails with [`AckError::Timeout`] when no acknowledgement came in time (the signal
    /// stays queued), [`AckError::Expired`] when its TTL ran out first (for example
    /// because the receiver died and did not come back), [`AckError::Failed`] when the
    /// receiver could not run it, [`AckError::Dropped`] when this side dropped it,
    /// [`AckError::ConnectionLost`] when the connection of a peer that does not reconnect
    /// closed first, and [`AckError::NotSupported`] for a signal that is not acknowledged
    /// (see [`id`](Self::id)). It
    /// never waits longer than `timeout`.
    pub async fn acknowledged(self, timeout: Duration) -> Result<(), AckError> {
        let Some(ack) = self.ack else {
            return Err(AckError::NotSupported);
        };
        match tokio::time::timeout(timeout, ack).await {
            Err(_) => Err(AckError::Timeout),
            Ok(Err(_)) => Err(AckError::Dropped {
                maybe_delivered: true,
            }),
            Ok(Ok(Delivery::Handled)) => Ok(()),
            Ok(Ok(Delivery::Expired { maybe_delivered })) => {
                Err(AckError::Expired { maybe_delivered })
            }
            Ok(Ok(Delivery::Failed)) => Err(AckError::Failed),
            Ok(Ok(Delivery::Dropped { maybe_delivered })) => {
                Err(AckError::Dropped { maybe_delivered })
            }
            Ok(Ok(Delivery::Lost(cause))) => Err(AckError::ConnectionLost {
                cause: cause.to_string(),
            }),
        }
    }
}

/// One signal in the outbox.
pub(crate) struct Item {
    /// Its place in send order; the sequence number of its stream if it is acknowledged.
    pub(crate) seq: u64,
    /// The plain signal envelope `[1, object, method, ttl, args]` (empty once a peer that
    /// never re-sends handed it to its connection).
    pub(crate) payload: Bytes,
    pub(crate) expires: Instant,
    /// The connection generation it was last sent on (set just before it is handed to
    /// that connection, so that nothing reports it never delivered meanwhile).
    pub(crate) sent_gen: Option<u64>,
    /// Stored in the peer's store (deleted from it when it leaves the outbox).
    pub(crate) persistent: bool,
    pub(crate) ack: Option<oneshot::Sender<Delivery>>,
}

impl Item {
    /// Resolves the sender's `Sent` future.
    pub(crate) fn settle(&mut self, how: Delivery) {
        if let Some(tx) = self.ack.take() {
            let _ = tx.send(how);
        }
    }

    /// Whether the receiver may have it: a copy was handed to a connection.
    pub(crate) fn maybe_delivered(&self) -> bool {
        self.sent_gen.is_some()
    }
}

/// Signals by sequence number (ascending). Acknowledged signals stay after they were sent,
/// until their acknowledgement; the others leave when they are handed to a connection.
pub(crate) struct Outbox {
    pub(crate) items: VecDeque<Item>,
    pub(crate) next_seq: u64,
    /// Every item below this sequence number was handed to the current connection: the
    /// next to send is the first at or above it. Reset to 0 for each new connection, so
    /// that what was not acknowledged is sent again.
    pub(crate) cursor: u64,
    /// The generation of the live connection of a reconnecting link, if there is one
    /// (for its sweep; always `None` for a peer made from a connection, which has no
    /// sweep).
    pub(crate) live: Option<u64>,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            items: VecDeque::new(),
            next_seq: 1,
            cursor: 0,
            live: None,
        }
    }
}

impl Outbox {
    pub(crate) fn take(&mut self, seq: u64) -> Option<Item> {
        let i = self.items.binary_search_by_key(&seq, |it| it.seq).ok()?;
        self.items.remove(i)
    }

    /// The next item to hand to the current connection.
    pub(crate) fn next_unsent(&self) -> Option<&Item> {
        self.items.get(self.in_flight())
    }

    /// How many items were handed to the current connection and wait for their
    /// acknowledgement.
    pub(crate) fn in_flight(&self) -> usize {
        self.items.partition_point(|it| it.seq < self.cursor)
    }

    pub(crate) fn get_mut(&mut self, seq: u64) -> Option<&mut Item> {
        let i = self.items.binary_search_by_key(&seq, |it| it.seq).ok()?;
        self.items.get_mut(i)
    }
}
