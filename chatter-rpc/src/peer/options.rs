//! [`PeerOptions`], [`WhenFull`] and the counters ([`PeerStats`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Settings of a [`Peer`](crate::Peer), whatever its link.
///
/// ```
/// use std::time::Duration;
/// use chatter_rpc::{PeerOptions, WhenFull};
///
/// let options = PeerOptions::default()
///     .default_deadline(Duration::from_secs(5))
///     .max_concurrent_handlers(16)
///     .max_queued_signals(10_000)
///     .when_full(WhenFull::Error);
/// # let _ = options;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerOptions {
    pub(crate) default_deadline: Duration,
    pub(crate) default_signal_ttl: Duration,
    pub(crate) max_concurrent_handlers: usize,
    pub(crate) max_queued_signals: usize,
    pub(crate) when_full: WhenFull,
    pub(crate) ordered_signals: bool,
    pub(crate) acknowledged_signals: bool,
    pub(crate) max_metadata_bytes: usize,
    pub(crate) start_traces: bool,
    pub(crate) stream_window: u64,
    pub(crate) max_streams: usize,
    pub(crate) introspection: bool,
}

impl Default for PeerOptions {
    fn default() -> Self {
        PeerOptions {
            default_deadline: Duration::from_secs(30),
            default_signal_ttl: Duration::from_secs(30),
            max_concurrent_handlers: 256,
            max_queued_signals: 1024,
            when_full: WhenFull::Wait,
            ordered_signals: false,
            acknowledged_signals: false,
            max_metadata_bytes: 8192,
            start_traces: false,
            stream_window: 1024 * 1024,
            max_streams: 64,
            introspection: true,
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

    /// The capacity of the signal outbox (default 1024, at least 1): how many signals
    /// this peer holds at once, waiting for flow-control credit or a connection, or (when
    /// they are acknowledged) sent and waiting for their acknowledgement. What a signal
    /// sent while the outbox is full does is [`when_full`](Self::when_full)'s choice.
    ///
    /// The sender's memory for signals is bounded by this capacity times the largest
    /// signal's encoded size.
    pub fn max_queued_signals(mut self, limit: usize) -> Self {
        self.max_queued_signals = limit.max(1);
        self
    }

    /// What a signal sent while the outbox is full does (default [`WhenFull::Wait`]: its
    /// future waits for room within the signal's TTL).
    pub fn when_full(mut self, policy: WhenFull) -> Self {
        self.when_full = policy;
        self
    }

    /// Handles the signals this peer receives one after another, in the order they
    /// arrived (default false: each signal runs in its own task, concurrently). With a
    /// reconnecting [`Peer`](crate::Peer) on the other side, arrival order is send order,
    /// also across reconnects.
    pub fn ordered_signals(mut self, ordered: bool) -> Self {
        self.ordered_signals = ordered;
        self
    }

    /// Sends this peer's signals as *acknowledged* signals, like libchirp's synchronous
    /// mode (default false): each carries an id, stays in the outbox until the receiver
    /// acknowledged it once its handler finished (the receiver discards duplicates), and
    /// the [`Sent`](crate::Sent) it returns can wait for that with
    /// [`acknowledged`](crate::Sent::acknowledged), which fails with
    /// [`AckError::ConnectionLost`](crate::AckError::ConnectionLost) if the connection
    /// closes first. A peer made with [`Peer::new`](crate::Peer::new) never re-sends: for
    /// signals that survive disconnects, use [`Peer::reconnecting`](crate::Peer::reconnecting)
    /// (whose signals are always acknowledged, whatever this option says). Costs one
    /// acknowledgement message per signal.
    pub fn acknowledged_signals(mut self, acknowledged: bool) -> Self {
        self.acknowledged_signals = acknowledged;
        self
    }
}

impl PeerOptions {
    /// The largest context (the [`Metadata`](crate::Metadata) and trace context of one
    /// call or signal, counted as its encoded map: each string + 1 to 5 bytes) this peer
    /// sends or accepts (default 8 KiB, like common HTTP header limits). A client whose
    /// metadata is larger fails the call or signal at once with
    /// [`CallError::MetadataTooLarge`](crate::CallError::MetadataTooLarge) (or
    /// [`SignalError::MetadataTooLarge`](crate::SignalError::MetadataTooLarge)); a
    /// received call over the limit is answered with failure kind 9, which the caller
    /// sees as the same error, and a received signal over it is dropped, logged and
    /// counted as failed (a reliable one is acknowledged *failed*, so that its sender
    /// stops re-sending it and sees [`AckError::Failed`](crate::AckError::Failed)). Part of a request's size, so already within the connection's
    /// receive window; this bounds what decoding it allocates per handler.
    ///
    /// ```
    /// use chatter_rpc::PeerOptions;
    /// let options = PeerOptions::default().max_metadata_bytes(1024);
    /// # let _ = options;
    /// ```
    pub fn max_metadata_bytes(mut self, limit: usize) -> Self {
        self.max_metadata_bytes = limit;
        self
    }

    /// Starts a trace (a random W3C trace id) for each call or signal made outside any
    /// trace, when the `chatter_rpc::call` span is enabled (default false). Calls inside a
    /// handler whose caller sent a trace context, and clients given one with
    /// `with_trace_parent`, always propagate it. Off by default because a request with a
    /// trace context uses the envelope kinds 9 to 11, which peers older than them refuse:
    /// turn it on once every peer is recent.
    ///
    /// ```
    /// use chatter_rpc::PeerOptions;
    /// let options = PeerOptions::default().start_traces(true);
    /// # let _ = options;
    /// ```
    pub fn start_traces(mut self, start: bool) -> Self {
        self.start_traces = start;
        self
    }

    /// The window of each stream this side reads (default 1 MiB): the most bytes of a
    /// stream's items (each counted as its encoded size plus 64) that arrived and wait to
    /// be read. The writer waits for the reader to read before it sends more, so a slow
    /// reader stalls only its own stream. An item must fit in the window, and in a frame
    /// (`max_frame_size`): send large payloads as a stream of chunks.
    ///
    /// Per connection, what streams hold is bounded by
    /// `max_streams × stream_window` on each side (reading ends), see
    /// [`max_streams`](Self::max_streams).
    ///
    /// Why 1 MiB: the reader grants credit back each half window, so a window of a few
    /// chunks stops the writer once per grant's round trip. Measured (BENCHMARKS.md,
    /// streams), 1 GiB in 64 KiB chunks ran at 0.40x raw TCP with a 256 KiB window and
    /// 0.71x with 1 MiB, client and server each on its own core (`split`). A server exposed
    /// to untrusted callers of methods that take streams can lower it (docs/SECURITY.md).
    ///
    /// ```
    /// use chatter_rpc::PeerOptions;
    /// let options = PeerOptions::default().stream_window(1024 * 1024);
    /// # let _ = options;
    /// ```
    ///
    /// # Panics
    ///
    /// If `bytes` is under 1 KiB (no useful item would fit).
    pub fn stream_window(mut self, bytes: u64) -> Self {
        assert!(bytes >= 1024, "a stream window must be at least 1 KiB");
        self.stream_window = bytes;
        self
    }

    /// The most stream calls this side serves at once on one connection (default 64): a
    /// stream call beyond it is refused with
    /// [`CallError::TooManyStreams`](crate::CallError::TooManyStreams). Each runs in a task
    /// of its own, counted here and not against
    /// [`max_concurrent_handlers`](Self::max_concurrent_handlers), so long streams never
    /// take handler slots from calls. Each holds at most one argument stream's window
    /// (`stream_window`) of received items: `max_streams × stream_window` per connection
    /// (64 MiB by default, reached only by argument streams whose handlers do not read).
    ///
    /// ```
    /// use chatter_rpc::PeerOptions;
    /// let options = PeerOptions::default().max_streams(8);
    /// # let _ = options;
    /// ```
    pub fn max_streams(mut self, limit: usize) -> Self {
        self.max_streams = limit;
        self
    }

    /// Serves the built-in object `chatter.introspect` ([`crate::introspect`]), which lists
    /// the objects this peer serves with their methods, describes them, answers pings and
    /// reports [`PeerStats`] (default true; the `chatter` command-line tool uses it).
    ///
    /// On by default: a description tells a connected client nothing it could not learn
    /// by trying names (an unknown object or method gets its own failure), and calls stay
    /// behind the same gate (TLS client certificates) as every other object. It costs a
    /// peer nothing until it is called: it is not a registry entry but made on demand when
    /// a call names `chatter.introspect` and the registry has nothing under that name
    /// (measured with a counting allocator over 100 peers made from accepted connections,
    /// each hosting one object: 0 bytes and 0 allocations more per peer, next to about
    /// 1,570 bytes in 8 allocations; it used to be a registry entry of 66 bytes in 3
    /// allocations, and a write lock per connection), and nothing on the lookup of other
    /// objects. Turn it off for a server whose interface should not be listed to whoever
    /// connects, or whose counters should stay private (with [`serve`](crate::serve),
    /// each connection's peer reports only its own): this option is the only switch
    /// (unregistering `chatter.introspect` does not turn it off). An object the
    /// application [registers](crate::Peer::register) as `chatter.introspect` takes the
    /// built-in one's place while registered.
    ///
    /// ```
    /// use chatter_rpc::PeerOptions;
    /// let options = PeerOptions::default().introspection(false);
    /// # let _ = options;
    /// ```
    pub fn introspection(mut self, serve: bool) -> Self {
        self.introspection = serve;
        self
    }
}

/// What a signal sent while the outbox is full ([`PeerOptions::max_queued_signals`]) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WhenFull {
    /// Wait for room (the default): the signal's future resolves once the signal is
    /// queued. If its TTL runs out first, it fails with
    /// [`SignalError::Expired`](crate::SignalError::Expired) (and is counted in
    /// [`PeerStats::signals_expired`]), never queued.
    #[default]
    Wait,
    /// Refuse it with [`SignalError::OutboxFull`](crate::SignalError::OutboxFull) (counted
    /// in [`PeerStats::signals_rejected`]).
    Error,
    /// Drop the oldest queued signal (counted in [`PeerStats::signals_dropped`]; an
    /// acknowledged one is also reported as
    /// [`PeerEvent::SignalDropped`](crate::PeerEvent::SignalDropped)) to make room.
    DropOldest,
}

/// Counters of a [`Peer`](crate::Peer), from [`Peer::stats`](crate::Peer::stats). They
/// count over the peer's life, across the connections of a reconnecting peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerStats {
    /// Connections established (1 for a peer made from a connection).
    pub connects: u64,
    /// Signals that went into the outbox: through a reconnecting peer or with
    /// [`PeerOptions::acknowledged_signals`], every signal accepted; otherwise those that
    /// could not go to the connection at once (flow control).
    pub signals_queued: u64,
    /// Signals handed to a connection (re-sends included).
    pub signals_sent: u64,
    /// Signals re-sent after a reconnect.
    pub signals_resent: u64,
    /// Acknowledged signals the receiver acknowledged as handled.
    pub signals_acknowledged: u64,
    /// Signals dropped on this side because their TTL ran out before they could be
    /// handed to a connection (flow control, no connection) or while they waited for room
    /// in a full outbox, and acknowledged signals the receiver reported as expired: never
    /// delivered late.
    pub signals_expired: u64,
    /// Signals dropped from a full outbox ([`WhenFull::DropOldest`]), or left in the
    /// outbox when the peer closed.
    pub signals_dropped: u64,
    /// Signals refused because the outbox was full ([`WhenFull::Error`]).
    pub signals_rejected: u64,
    /// Acknowledged signals the receiver could not handle (no such object or method, bad
    /// arguments, metadata over its limit, a panicking handler).
    pub signals_failed_remotely: u64,
    /// Signals received whose handler ran.
    pub signals_delivered: u64,
    /// Signals received but dropped because their TTL ran out before a handler slot was
    /// free.
    pub signals_expired_on_arrival: u64,
    /// Signals received for an unknown object or method, with bad arguments, with
    /// metadata over [`max_metadata_bytes`](PeerOptions::max_metadata_bytes), or whose
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

/// The counters behind [`PeerStats`], one set per peer (each also a `metrics` counter
/// with the `metrics` feature: see [`telemetry`](crate::telemetry)).
#[derive(Debug)]
pub(crate) struct Stats {
    pub(crate) connects: Counter,
    pub(crate) signals_queued: Counter,
    pub(crate) signals_sent: Counter,
    pub(crate) signals_resent: Counter,
    pub(crate) signals_acknowledged: Counter,
    pub(crate) signals_expired: Counter,
    pub(crate) signals_dropped: Counter,
    pub(crate) signals_rejected: Counter,
    pub(crate) signals_failed_remotely: Counter,
    pub(crate) signals_delivered: Counter,
    /// Signals delivered by handlers the receive task started itself.
    pub(crate) signals_delivered_inline: ReaderCounter,
    pub(crate) signals_expired_on_arrival: Counter,
    pub(crate) signals_failed: Counter,
    pub(crate) calls_received: ReaderCounter,
    pub(crate) handler_panics: Counter,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            connects: Counter::new("connects"),
            signals_queued: Counter::new("signals_queued"),
            signals_sent: Counter::new("signals_sent"),
            signals_resent: Counter::new("signals_resent"),
            signals_acknowledged: Counter::new("signals_acknowledged"),
            signals_expired: Counter::new("signals_expired"),
            signals_dropped: Counter::new("signals_dropped"),
            signals_rejected: Counter::new("signals_rejected"),
            signals_failed_remotely: Counter::new("signals_failed_remotely"),
            signals_delivered: Counter::new("signals_delivered"),
            // The same metric as `signals_delivered` (`PeerStats` sums the two).
            signals_delivered_inline: ReaderCounter::new("signals_delivered"),
            signals_expired_on_arrival: Counter::new("signals_expired_on_arrival"),
            signals_failed: Counter::new("signals_failed"),
            calls_received: ReaderCounter::new("calls_received"),
            handler_panics: Counter::new("handler_panics"),
        }
    }
}

/// A counter of [`Stats`], bumped with [`bump`]; with the `metrics` feature, also the
/// `metrics` counter of its field (taken from the recorder installed when the peer was
/// made).
pub(crate) struct Counter {
    value: AtomicU64,
    #[cfg(feature = "metrics")]
    metric: metrics::Counter,
}

impl Counter {
    /// The counter of the [`PeerStats`] field `field`.
    fn new(field: &'static str) -> Counter {
        let _ = field;
        Counter {
            value: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            metric: metrics::counter!(crate::telemetry::counter_name(field)),
        }
    }

    pub(crate) fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

/// A counter that only the receive task bumps (once per message), so it needs no locked
/// read-modify-write: a plain load and store is exact. Measured: 3% more signals per
/// second than `fetch_add` (`onecore`, 7 alternated runs). A reconnecting peer's link
/// starts the next connection's receive task only after the previous one ended, so there
/// is one writer at a time.
pub(crate) struct ReaderCounter {
    value: AtomicU64,
    #[cfg(feature = "metrics")]
    metric: metrics::Counter,
}

impl ReaderCounter {
    /// The counter of the [`PeerStats`] field `field`.
    fn new(field: &'static str) -> ReaderCounter {
        let _ = field;
        ReaderCounter {
            value: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            metric: metrics::counter!(crate::telemetry::counter_name(field)),
        }
    }

    /// Counts one. Only the receive task may call this (two writers could lose counts).
    #[inline]
    pub(crate) fn bump(&self) {
        let n = self.value.load(Ordering::Relaxed);
        self.value.store(n.wrapping_add(1), Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.metric.increment(1);
    }

    pub(crate) fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for ReaderCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

impl Stats {
    pub(crate) fn snapshot(&self) -> PeerStats {
        let l = Counter::get;
        PeerStats {
            connects: l(&self.connects),
            signals_queued: l(&self.signals_queued),
            signals_sent: l(&self.signals_sent),
            signals_resent: l(&self.signals_resent),
            signals_acknowledged: l(&self.signals_acknowledged),
            signals_expired: l(&self.signals_expired),
            signals_dropped: l(&self.signals_dropped),
            signals_rejected: l(&self.signals_rejected),
            signals_failed_remotely: l(&self.signals_failed_remotely),
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

pub(crate) fn bump(counter: &Counter) {
    counter.value.fetch_add(1, Ordering::Relaxed);
    #[cfg(feature = "metrics")]
    counter.metric.increment(1);
}
