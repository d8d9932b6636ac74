//! The signal outbox of a [`ReconnectingPeer`](crate::ReconnectingPeer): signals in send
//! order, each kept until the receiver acknowledged it, its TTL ran out, or it was
//! dropped; and [`Sent`], what sending one returns.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::AckError;

/// The id of a signal sent through a [`ReconnectingPeer`](crate::ReconnectingPeer): the
/// sender's stream id (random per peer, or stored with a persistent store) and the
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
    /// A plain peer's connection closed before the acknowledgement arrived.
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
    /// A signal sent through a plain [`Peer`](crate::Peer) without
    /// [`acknowledged_signals`](crate::PeerOptions::acknowledged_signals): no id, no
    /// acknowledgement.
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

    /// The signal's id (`None` for signals sent through a plain [`Peer`](crate::Peer)
    /// without [`acknowledged_signals`](crate::PeerOptions::acknowledged_signals)).
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
    /// [`AckError::ConnectionLost`] when a plain peer's connection closed first, and
    /// [`AckError::NotSupported`] for signals sent through a plain [`Peer`](crate::Peer)
    /// without [`acknowledged_signals`](crate::PeerOptions::acknowledged_signals). It
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

/// One queued signal.
pub(crate) struct Item {
    pub(crate) seq: u64,
    /// The plain signal envelope `[1, object, method, ttl, args]`.
    pub(crate) payload: Bytes,
    pub(crate) expires: Instant,
    /// The connection generation it was last sent on.
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
}

/// Signals by sequence number (ascending).
#[derive(Default)]
pub(crate) struct Outbox {
    pub(crate) items: VecDeque<Item>,
    pub(crate) next_seq: u64,
}

impl Outbox {
    pub(crate) fn take(&mut self, seq: u64) -> Option<Item> {
        let i = self.items.binary_search_by_key(&seq, |it| it.seq).ok()?;
        self.items.remove(i)
    }

    /// The first item with `seq >= from`.
    pub(crate) fn first_from(&self, from: u64) -> Option<&Item> {
        let i = self.items.partition_point(|it| it.seq < from);
        self.items.get(i)
    }

    pub(crate) fn get_mut(&mut self, seq: u64) -> Option<&mut Item> {
        let i = self.items.binary_search_by_key(&seq, |it| it.seq).ok()?;
        self.items.get_mut(i)
    }
}
