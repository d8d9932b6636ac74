//! [`PeerOptions`] and the counters ([`PeerStats`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Settings of a [`Peer`].
///
/// ```
/// use std::time::Duration;
/// use chatter_rpc::PeerOptions;
///
/// let options = PeerOptions::default()
///     .default_deadline(Duration::from_secs(5))
///     .max_concurrent_handlers(16);
/// # let _ = options;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerOptions {
    pub(crate) default_deadline: Duration,
    pub(crate) default_signal_ttl: Duration,
    pub(crate) max_concurrent_handlers: usize,
    pub(crate) max_queued_signals: usize,
    pub(crate) ordered_signals: bool,
    pub(crate) acknowledged_signals: bool,
}

impl Default for PeerOptions {
    fn default() -> Self {
        PeerOptions {
            default_deadline: Duration::from_secs(30),
            default_signal_ttl: Duration::from_secs(30),
            max_concurrent_handlers: 256,
            max_queued_signals: 1024,
            ordered_signals: false,
            acknowledged_signals: false,
        }
    }
}

impl PeerOptions {
    /// The deadline of calls made through this peer's clients unless a client overrides it
    /// (default 30 s). It travels to the callee as a relative duration.
    pub fn default_deadline(mut self, deadline: Duration) -> Self {
        self.default_deadline = deadline;
        self
    }

    /// The TTL of signals whose method has no `#[signal(ttl = "..")]` and whose client sets
    /// none (default 30 s).
    pub fn default_signal_ttl(mut self, ttl: Duration) -> Self {
        self.default_signal_ttl = ttl;
        self
    }

    /// How many handlers (calls and signals) of this connection run at once (default 256,
    /// at least 1). Further requests wait for a slot (calls first, then signals, each in
    /// arrival order), each until its deadline or TTL, holding its flow-control credit:
    /// the sender cannot get more than the connection's `receive_window` ahead.
    ///
    /// Each running handler may hold its reply until the caller's window takes it, so
    /// `max_concurrent_handlers` × the largest reply is part of a connection's memory
    /// bound: lower it for methods that return large values to untrusted callers.
    pub fn max_concurrent_handlers(mut self, limit: usize) -> Self {
        self.max_concurrent_handlers = limit.max(1);
        self
    }

    /// How many signals may wait for flow-control credit (default 1024). A signal sent
    /// while the outbox is full fails with
    /// [`SignalError::OutboxFull`](crate::SignalError::OutboxFull).
    pub fn max_queued_signals(mut self, limit: usize) -> Self {
        self.max_queued_signals = limit;
        self
    }

    /// Handles the signals this peer receives one after another, in the order they
    /// arrived (default false: each signal runs in its own task, concurrently). With a
    /// [`ReconnectingPeer`](crate::ReconnectingPeer) on the other side, arrival order is
    /// send order, also across reconnects.
    pub fn ordered_signals(mut self, ordered: bool) -> Self {
        self.ordered_signals = ordered;
        self
    }

    /// Sends this peer's signals as *acknowledged* signals, like libchirp's synchronous
    /// mode (default false): each carries an id, the receiver acknowledges it once its
    /// handler finished (and discards duplicates), and the [`Sent`](crate::Sent) it
    /// returns can wait for that with [`acknowledged`](crate::Sent::acknowledged), which
    /// fails with [`AckError::ConnectionLost`](crate::AckError::ConnectionLost) if the
    /// connection closes first. A plain peer never re-sends: for signals that survive
    /// disconnects, send through a [`ReconnectingPeer`](crate::ReconnectingPeer) (whose
    /// signals are always acknowledged). Costs one acknowledgement message per signal.
    pub fn acknowledged_signals(mut self, acknowledged: bool) -> Self {
        self.acknowledged_signals = acknowledged;
        self
    }
}

/// Counters of a [`Peer`], from [`Peer::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerStats {
    /// Signals handed to the connection.
    pub signals_sent: u64,
    /// Signals dropped on this side because their TTL ran out before the connection could
    /// take them (flow control): never delivered late.
    pub signals_expired: u64,
    /// Signals refused because the outbox was full.
    pub signals_rejected: u64,
    /// Signals received whose handler ran.
    pub signals_delivered: u64,
    /// Signals received but dropped because their TTL ran out before a handler slot was
    /// free.
    pub signals_expired_on_arrival: u64,
    /// Signals received for an unknown object or method, with bad arguments, or whose
    /// handler panicked.
    pub signals_failed: u64,
    /// Calls received (whatever their outcome).
    pub calls_received: u64,
    /// Handlers (calls or signals) that panicked.
    pub handler_panics: u64,
    /// Received calls and signals waiting for a handler slot now (a gauge). Each holds its
    /// flow-control credit until it ran or was dropped, so their bytes are part of
    /// [`Buffered::received`](chatter_core::Buffered::received) of
    /// [`Connection::buffered`](chatter_core::Connection::buffered), which stays within
    /// the connection's `receive_window`.
    pub requests_waiting: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) signals_sent: AtomicU64,
    pub(super) signals_expired: AtomicU64,
    pub(crate) signals_rejected: AtomicU64,
    pub(super) signals_delivered: AtomicU64,
    /// Signals delivered by handlers the receive task started itself.
    pub(super) signals_delivered_inline: ReaderCounter,
    pub(super) signals_expired_on_arrival: AtomicU64,
    pub(super) signals_failed: AtomicU64,
    pub(super) calls_received: ReaderCounter,
    pub(super) handler_panics: AtomicU64,
}

/// A counter that only the receive task bumps (once per message), so it needs no locked
/// read-modify-write: a plain load and store is exact. Measured: 3% more signals per
/// second than `fetch_add` (`onecore`, 7 alternated runs).
#[derive(Debug, Default)]
pub(crate) struct ReaderCounter(AtomicU64);

impl ReaderCounter {
    /// Counts one. Only the receive task may call this (two writers could lose counts).
    pub(super) fn bump(&self) {
        let n = self.0.load(Ordering::Relaxed);
        self.0.store(n.wrapping_add(1), Ordering::Relaxed);
    }

    pub(super) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Stats {
    pub(super) fn snapshot(&self) -> PeerStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PeerStats {
            signals_sent: l(&self.signals_sent),
            signals_expired: l(&self.signals_expired),
            signals_rejected: l(&self.signals_rejected),
            signals_delivered: l(&self.signals_delivered)
                .wrapping_add(self.signals_delivered_inline.get()),
            signals_expired_on_arrival: l(&self.signals_expired_on_arrival),
            signals_failed: l(&self.signals_failed),
            calls_received: self.calls_received.get(),
            handler_panics: l(&self.handler_panics),
            requests_waiting: 0,
        }
    }
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
