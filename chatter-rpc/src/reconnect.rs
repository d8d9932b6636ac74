//! [`ReconnectingPeer`]: a client peer that keeps itself connected, with a signal outbox
//! that survives disconnects (and, with a store, crashes).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use chatter_core::{connect, Address, AddressError, CloseCause, Options, SendOptions, ToAddress};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use crate::error::{CallError, SignalError};
use crate::outbox::{Delivery, Item, Outbox, Sent, SignalId};
use crate::peer::{Outcome, Peer, PeerOptions, MAX_DURATION};
use crate::service::{Dispatch, Handlers, Service};
use crate::store::{self, Store};
use crate::wire::{self, AckStatus};

/// What a generated `{Trait}Client` calls through: a [`Peer`] (one connection) or a
/// [`ReconnectingPeer`]. `{Trait}Client::new` takes either (by reference or by value).
///
/// ```
/// use chatter_rpc::{Peer, ReconnectingPeer, Target};
///
/// fn describe(target: &Target) -> &'static str {
///     match target {
///         Target::Peer(_) => "one connection",
///         Target::Reconnecting(_) => "reconnects by itself",
///         _ => "something else",
///     }
/// }
/// # let _ = describe;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Target {
    /// One connection.
    Peer(Peer),
    /// A peer that reconnects by itself.
    Reconnecting(ReconnectingPeer),
}

impl Target {
    pub(crate) fn peer_options(&self) -> &PeerOptions {
        match self {
            Target::Peer(p) => p.options(),
            Target::Reconnecting(p) => &p.shared.peer_options,
        }
    }
}

impl From<&Peer> for Target {
    fn from(p: &Peer) -> Self {
        Target::Peer(p.clone())
    }
}

impl From<Peer> for Target {
    fn from(p: Peer) -> Self {
        Target::Peer(p)
    }
}

impl From<&ReconnectingPeer> for Target {
    fn from(p: &ReconnectingPeer) -> Self {
        Target::Reconnecting(p.clone())
    }
}

impl From<ReconnectingPeer> for Target {
    fn from(p: ReconnectingPeer) -> Self {
        Target::Reconnecting(p)
    }
}

/// When to try again after a connection dropped or an attempt failed: exponential backoff
/// with jitter.
///
/// The delay before attempt *n* (counting failures since the last successful connection,
/// from 0) is `min(max, initial * 2^n)`, then multiplied by a random factor in
/// `[1 - jitter, 1 + jitter]` so that many clients of one restarted server do not come
/// back in lockstep.
///
/// ```
/// use std::time::Duration;
/// use chatter_rpc::Backoff;
///
/// let patient = Backoff::exponential(Duration::from_millis(50), Duration::from_secs(10))
///     .jitter(0.3)
///     .max_attempts(20);
/// let once = Backoff::never(); // no reconnect: the first disconnect closes the peer
/// # let _ = (patient, once);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    jitter: f64,
    max_attempts: Option<u32>,
}

impl Default for Backoff {
    /// 100 ms doubling up to 30 s, ±20 % jitter, unlimited attempts.
    fn default() -> Self {
        Backoff::exponential(Duration::from_millis(100), Duration::from_secs(30))
    }
}

impl Backoff {
    /// `initial` doubling up to `max`, ±20 % jitter, unlimited attempts.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            jitter: 0.2,
            max_attempts: None,
        }
    }

    /// Never reconnect: when the first connection drops (or the first attempt fails), the
    /// peer closes.
    pub fn never() -> Self {
        Backoff {
            max_attempts: Some(0),
            ..Backoff::default()
        }
    }

    /// The jitter fraction, clamped to `0.0..=1.0` (0 = exact delays).
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        self
    }

    /// Give up (and close the peer) after this many consecutive failed attempts.
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// The delay before the next attempt after `failures` consecutive failures, or `None`
    /// to give up.
    fn delay(&self, failures: u32, rng: &mut u64) -> Option<Duration> {
        if self.max_attempts.is_some_and(|max| failures >= max) {
            return None;
        }
        let base = self
            .initial
            .saturating_mul(1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX))
            .min(self.max);
        // xorshift64*: plenty for spreading reconnects.
        *rng ^= *rng >> 12;
        *rng ^= *rng << 25;
        *rng ^= *rng >> 27;
        let unit = (rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
        let factor = 1.0 + self.jitter * (2.0 * unit - 1.0);
        let jittered = Duration::try_from_secs_f64(base.as_secs_f64() * factor.max(0.0));
        Some(jittered.unwrap_or(MAX_DURATION).min(MAX_DURATION))
    }
}

/// What a full outbox does with one more signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WhenFull {
    /// Refuse it with [`SignalError::OutboxFull`] (the default).
    #[default]
    Error,
    /// Drop the oldest queued signal (reported as [`PeerEvent::SignalDropped`]) to make
    /// room.
    DropOldest,
    /// Wait for room: the signal's future resolves once the signal is queued. If its TTL
    /// runs out first, it fails with [`SignalError::Expired`] (and is counted as expired),
    /// never queued.
    Wait,
}

/// Settings of a [`ReconnectingPeer`] beyond the connection's [`Options`] and the
/// [`PeerOptions`].
///
/// ```
/// use std::time::Duration;
/// use chatter_rpc::{Backoff, ReconnectOptions, WhenFull};
///
/// let options = ReconnectOptions::default()
///     .backoff(Backoff::exponential(Duration::from_millis(10), Duration::from_secs(5)))
///     .outbox_capacity(10_000)
///     .when_full(WhenFull::DropOldest)
///     .store("/var/lib/myapp/outbox.sqlite"); // persistent signals
/// # let _ = options;
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReconnectOptions {
    backoff: Backoff,
    outbox_capacity: Option<usize>,
    window: Option<usize>,
    when_full: WhenFull,
    store: Option<PathBuf>,
}

impl ReconnectOptions {
    /// When to reconnect (default [`Backoff::default`]).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How many signals may wait for their acknowledgement (default
    /// [`PeerOptions::max_queued_signals`], 1024).
    pub fn outbox_capacity(mut self, signals: usize) -> Self {
        self.outbox_capacity = Some(signals.max(1));
        self
    }

    /// How many signals may be sent and not yet acknowledged on a connection (default
    /// 128). A smaller window re-sends less after a cut; a larger one keeps more signals
    /// in flight on slow links.
    pub fn window(mut self, signals: usize) -> Self {
        self.window = Some(signals.max(1));
        self
    }

    /// What a full outbox does (default [`WhenFull::Error`]).
    pub fn when_full(mut self, policy: WhenFull) -> Self {
        self.when_full = policy;
        self
    }

    /// Stores *persistent* signals (methods marked `#[signal(persistent)]`, or any signal
    /// sent through a generated client's `persistent()`) in this SQLite file: each
    /// is written before its send completes and deleted only when the receiver
    /// acknowledged it (or its TTL ran out). Signals still in the file are loaded and
    /// re-sent when a peer is started on it again, for example after a crash of the
    /// process. Other signals stay in memory (they are lost with the process), but the
    /// store keeps the sender's stream id, so a restarted sender continues its stream and
    /// the receiver keeps discarding duplicates. Without a store, every signal is in
    /// memory only.
    ///
    /// Cost: each persistent send and each of its acknowledgements is one synced SQLite
    /// transaction on the calling task's thread (WAL journal, `synchronous = FULL`: durable against a crash of
    /// the process and of the machine), so persistent signals are bounded by the disk's
    /// sync rate. A signal's TTL keeps counting while the process is down (wall clock):
    /// one that ran out meanwhile is dropped and counted at the next start.
    pub fn store(mut self, path: impl Into<PathBuf>) -> Self {
        self.store = Some(path.into());
        self
    }
}

/// Where a [`ReconnectingPeer`] stands.
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
    /// Closed (by [`close`](ReconnectingPeer::close), a shutdown, or because the backoff
    /// gave up).
    Closed,
}

/// Something that happened to a [`ReconnectingPeer`], from [`ReconnectingPeer::events`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum PeerEvent {
    /// A connection is up (objects are registered on it; queued signals are being sent).
    Connected {
        /// The address connected to.
        remote: Address,
    },
    /// The connection dropped.
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
    /// A signal's TTL ran out: it was dropped, never delivered late.
    SignalExpired {
        /// The signal.
        id: SignalId,
        /// True when a copy was sent on a connection that was lost before its
        /// acknowledgement came back: the receiver may have handled it.
        maybe_delivered: bool,
    },
    /// A signal was dropped from a full outbox ([`WhenFull::DropOldest`]) or because the
    /// peer closed without a store.
    SignalDropped {
        /// The signal.
        id: SignalId,
        /// As for [`PeerEvent::SignalExpired`].
        maybe_delivered: bool,
    },
    /// The receiver could not handle a signal (no such object or method, bad arguments,
    /// a panicking handler).
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

/// Counters of a [`ReconnectingPeer`], from [`ReconnectingPeer::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReconnectStats {
    /// Connections established.
    pub connects: u64,
    /// Signals accepted into the outbox.
    pub signals_queued: u64,
    /// Signals handed to a connection (re-sends included).
    pub signals_sent: u64,
    /// Re-sends after a reconnect.
    pub signals_resent: u64,
    /// Signals the receiver acknowledged as handled.
    pub signals_acknowledged: u64,
    /// Signals whose TTL ran out (here or at the receiver).
    pub signals_expired: u64,
    /// Signals dropped from a full outbox or at close.
    pub signals_dropped: u64,
    /// Signals the receiver could not handle.
    pub signals_failed: u64,
    /// Signals refused because the outbox was full.
    pub signals_rejected: u64,
}

#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    queued: AtomicU64,
    sent: AtomicU64,
    resent: AtomicU64,
    acknowledged: AtomicU64,
    expired: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    rejected: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Why a [`ReconnectingPeer`] could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReconnectError {
    /// The address does not parse.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The signal store could not be opened or read.
    #[error("signal store: {0}")]
    Store(String),
}

/// The connection as the supervisor last published it.
#[derive(Clone)]
struct Link {
    peer: Option<Peer>,
    generation: u64,
    state: ConnectionState,
    last_error: String,
}

struct Shared {
    address: Address,
    options: Options,
    peer_options: PeerOptions,
    reconnect: ReconnectOptions,
    capacity: usize,
    stream: u64,
    objects: Mutex<HashMap<String, Arc<dyn Service>>>,
    link: watch::Sender<Link>,
    subscribers: Mutex<Vec<mpsc::UnboundedSender<PeerEvent>>>,
    outbox: Mutex<Outbox>,
    /// Something was queued, or the connection changed.
    changed: Notify,
    /// Something left the outbox.
    room: Notify,
    store: Option<Mutex<Store>>,
    calls: AtomicUsize,
    calls_idle: Notify,
    shutting_down: AtomicBool,
    stop: watch::Sender<bool>,
    counters: Counters,
}

/// A client peer that connects to an address and reconnects by itself.
///
/// - **Reconnects** after the connection drops, with [`Backoff`] (exponential, jitter,
///   optionally giving up). [`events`](Self::events) and [`state`](Self::state) show
///   what happens. Objects [`register`](Self::register)ed on it are served on every new
///   connection without user code.
/// - **Calls** through its clients made while disconnected wait for a connection within
///   their deadline, then fail with [`CallError::NotConnected`]. A call whose request
///   was sent but whose reply was lost with the connection fails with
///   [`CallError::OutcomeUnknown`]: calls are sent at most once, except methods marked
///   `#[idempotent]`, which are re-sent on the next connection (within the deadline).
/// - **Signals** go through a bounded outbox ([`ReconnectOptions::outbox_capacity`]),
///   in send order, and stay there until the receiver *acknowledged* them (after the
///   handler finished), so a signal lost in a dropped connection is re-sent on the next;
///   the receiver discards duplicates by id. A signal whose TTL runs out while it waits
///   is dropped and reported (counter and [`PeerEvent::SignalExpired`]); the receiver
///   likewise never starts a handler after the TTL. With a
///   [`store`](ReconnectOptions::store), persistent signals survive a crash of the
///   process. The returned [`Sent`] can wait for the acknowledgement.
///
/// ```
/// use std::time::Duration;
/// use chatter_rpc::{
///     listen, remote, serve, Options, Peer, PeerOptions, ReconnectOptions, ReconnectingPeer,
/// };
///
/// #[remote]
/// pub trait Greeter {
///     #[idempotent]
///     async fn hello(&self, name: String) -> String;
///     #[signal(ttl = "10s")]
///     async fn note(&self, text: String);
/// }
///
/// struct G;
/// impl Greeter for G {
///     async fn hello(&self, name: String) -> String { format!("hello {name}") }
///     async fn note(&self, _text: String) {}
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let server = serve(listen("tcp://127.0.0.1:0", Options::default()).await?,
///     PeerOptions::default(), |peer: &Peer| { peer.register("greeter", GreeterServer::new(G)); });
///
/// let peer = ReconnectingPeer::new(
///     &server.addresses()[0], Options::default(), PeerOptions::default(),
///     ReconnectOptions::default(),
/// )?;
/// let greeter = GreeterClient::new(&peer, "greeter");
/// assert_eq!(greeter.hello("you".into()).await?, "hello you");
/// let sent = greeter.note("remember this".into()).await?;
/// sent.acknowledged(Duration::from_secs(5)).await?; // the handler ran
/// peer.shutdown(Duration::from_secs(5)).await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ReconnectingPeer {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

/// Dropped with the last user-held handle: stops the background tasks.
struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = self.0.stop.send(true);
    }
}

impl fmt::Debug for ReconnectingPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReconnectingPeer")
            .field("address", &self.shared.address)
            .field("state", &self.state())
            .field("queued", &self.queued())
            .finish_non_exhaustive()
    }
}

impl ReconnectingPeer {
    /// Starts a peer that connects to `address` (in the background: this returns at once)
    /// and stays connected. Must be called inside a tokio runtime. Fails only for an
    /// address that does not parse or a store that cannot be opened.
    pub fn new(
        address: impl ToAddress,
        options: Options,
        peer_options: PeerOptions,
        reconnect: ReconnectOptions,
    ) -> Result<ReconnectingPeer, ReconnectError> {
        let address = address.to_address()?;
        let mut outbox = Outbox {
            next_seq: 1,
            ..Outbox::default()
        };
        let mut stream = random_u64();
        let mut loaded_expired = Vec::new();
        let store = match &reconnect.store {
            None => None,
            Some(path) => {
                let (mut db, loaded) = Store::open(path, stream).map_err(ReconnectError::Store)?;
                stream = loaded.stream;
                outbox.next_seq = loaded.next_seq;
                let now = Instant::now();
                for s in loaded.signals {
                    let left = store::wall_ms_remaining(s.expires_ms).min(MAX_DURATION);
                    if left.is_zero() {
                        db.delete(s.seq);
                        loaded_expired.push(s.seq);
                        continue;
                    }
                    outbox.items.push_back(Item {
                        seq: s.seq,
                        payload: Bytes::from(s.payload),
                        expires: now + left,
                        // A previous run may have sent it.
                        sent_gen: Some(0),
                        persistent: true,
                        ack: None,
                    });
                }
                Some(Mutex::new(db))
            }
        };
        let capacity = reconnect
            .outbox_capacity
            .unwrap_or(peer_options.max_queued_signals)
            .max(1);
        let (stop, _) = watch::channel(false);
        let (link, _) = watch::channel(Link {
            peer: None,
            generation: 0,
            state: ConnectionState::Connecting,
            last_error: "not connected yet".into(),
        });
        let shared = Arc::new(Shared {
            address,
            options,
            peer_options,
            reconnect,
            capacity,
            stream,
            objects: Mutex::default(),
            link,
            subscribers: Mutex::default(),
            outbox: Mutex::new(outbox),
            changed: Notify::new(),
            room: Notify::new(),
            store,
            calls: AtomicUsize::new(0),
            calls_idle: Notify::new(),
            shutting_down: AtomicBool::new(false),
            stop,
            counters: Counters::default(),
        });
        for seq in loaded_expired {
            bump(&shared.counters.expired);
            let id = shared.id(seq);
            tracing::info!("chatter-rpc: stored signal {id} expired while the process was down");
        }
        let (acks_tx, acks_rx) = mpsc::unbounded_channel();
        tokio::spawn(supervise(shared.clone(), acks_tx));
        tokio::spawn(receive_acks(shared.clone(), acks_rx));
        tokio::spawn(sweep(shared.clone()));
        Ok(ReconnectingPeer {
            _owner: Arc::new(Owner(shared.clone())),
            shared,
        })
    }

    /// Hosts `object` under `name` on every connection (the current one and each after a
    /// reconnect); returns true if it replaced an object registered under that name.
    pub fn register(&self, name: impl Into<String>, object: impl Service) -> bool {
        let name = name.into();
        let object: Arc<dyn Service> = Arc::new(object);
        let mut objects = lock(&self.shared.objects);
        if let Some(peer) = &self.shared.link.borrow().peer {
            peer.register(name.clone(), SharedService(object.clone()));
        }
        objects.insert(name, object).is_some()
    }

    /// Stops hosting the object under `name`; returns whether there was one.
    pub fn unregister(&self, name: &str) -> bool {
        let mut objects = lock(&self.shared.objects);
        if let Some(peer) = &self.shared.link.borrow().peer {
            peer.unregister(name);
        }
        objects.remove(name).is_some()
    }

    /// The current connection's peer, if connected.
    pub fn peer(&self) -> Option<Peer> {
        self.shared.link.borrow().peer.clone()
    }

    /// Where the peer stands now.
    pub fn state(&self) -> ConnectionState {
        self.shared.link.borrow().state
    }

    /// Waits until connected (true) or until `timeout` passed or the peer closed (false).
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut link = self.shared.link.subscribe();
        let wait = async {
            link.wait_for(|l| {
                matches!(
                    l.state,
                    ConnectionState::Connected | ConnectionState::Closed
                )
            })
            .await
            .map(|l| l.state == ConnectionState::Connected)
        };
        matches!(tokio::time::timeout(timeout, wait).await, Ok(Ok(true)))
    }

    /// Subscribes to connection and signal events from now on.
    pub fn events(&self) -> Events {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.shared.subscribers).push(tx);
        Events { rx }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ReconnectStats {
        let c = &self.shared.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ReconnectStats {
            connects: l(&c.connects),
            signals_queued: l(&c.queued),
            signals_sent: l(&c.sent),
            signals_resent: l(&c.resent),
            signals_acknowledged: l(&c.acknowledged),
            signals_expired: l(&c.expired),
            signals_dropped: l(&c.dropped),
            signals_failed: l(&c.failed),
            signals_rejected: l(&c.rejected),
        }
    }

    /// Signals in the outbox (sent or not, waiting for their acknowledgement).
    pub fn queued(&self) -> usize {
        lock(&self.shared.outbox).items.len()
    }

    /// This peer's signal stream id (the `stream` of its [`SignalId`]s).
    pub fn stream_id(&self) -> u64 {
        self.shared.stream
    }

    /// The peer's options.
    pub fn options(&self) -> &PeerOptions {
        &self.shared.peer_options
    }

    /// Waits until the outbox has room for one more signal (signal futures do this
    /// themselves under [`WhenFull::Wait`]).
    pub async fn wait_for_room(&self) {
        loop {
            let mut room = pin!(self.shared.room.notified());
            room.as_mut().enable();
            if lock(&self.shared.outbox).items.len() < self.shared.capacity {
                return;
            }
            room.await;
        }
    }

    /// Waits until the outbox is empty: every signal acknowledged, expired or dropped.
    pub async fn flush(&self) {
        loop {
            let mut room = pin!(self.shared.room.notified());
            room.as_mut().enable();
            if lock(&self.shared.outbox).items.is_empty() {
                return;
            }
            room.await;
        }
    }

    /// Shuts down gracefully: new calls and signals are refused with "shutting down";
    /// calls in flight get up to `grace` to finish; queued signals get what is left of
    /// `grace` to be acknowledged (with a store, the rest stay stored for the next start;
    /// without one, they are dropped and reported); then the connection closes.
    pub async fn shutdown(&self, grace: Duration) {
        let sh = &self.shared;
        let deadline = Instant::now() + grace.min(MAX_DURATION);
        sh.shutting_down.store(true, Ordering::Release);
        let calls_done = crate::peer::until_zero(&sh.calls, &sh.calls_idle);
        let _ = tokio::time::timeout_at(deadline, calls_done).await;
        let _ = tokio::time::timeout_at(deadline, self.flush()).await;
        let peer = self.peer();
        let _ = sh.stop.send(true);
        if let Some(peer) = peer {
            let left = deadline.saturating_duration_since(Instant::now());
            peer.shutdown(left).await;
        }
        sh.finish();
    }

    /// Closes now: calls in flight fail, queued signals stay stored (with a store) or are
    /// dropped and reported (without).
    pub async fn close(&self) {
        let sh = &self.shared;
        sh.shutting_down.store(true, Ordering::Release);
        let peer = self.peer();
        let _ = sh.stop.send(true);
        if let Some(peer) = peer {
            peer.close().await;
        }
        sh.finish();
    }

    /// A call through this peer (generated clients call this).
    pub(crate) async fn call(
        &self,
        payload: Bytes,
        deadline: Duration,
        idempotent: bool,
    ) -> Result<Bytes, CallError> {
        let sh = &self.shared;
        if sh.shutting_down.load(Ordering::Acquire) {
            return Err(CallError::ShuttingDown);
        }
        sh.calls.fetch_add(1, Ordering::AcqRel);
        let _active = ActiveCall(sh);
        let until = Instant::now() + deadline;
        let work = async {
            let mut link = sh.link.subscribe();
            let mut dead = 0;
            loop {
                let wait = async {
                    loop {
                        {
                            let l = link.borrow_and_update();
                            if let Some(p) = &l.peer {
                                if l.generation != dead && !p.connection().is_closed() {
                                    return Ok((p.clone(), l.generation));
                                }
                            }
                            if l.state == ConnectionState::Closed {
                                return Err(l.last_error.clone());
                            }
                        }
                        if link.changed().await.is_err() {
                            return Err("the peer is closed".to_string());
                        }
                    }
                };
                let (peer, generation) = match tokio::time::timeout_at(until, wait).await {
                    Ok(Ok(p)) => p,
                    Ok(Err(last_error)) => return Err(CallError::NotConnected { last_error }),
                    Err(_) => {
                        let last_error = sh.link.borrow().last_error.clone();
                        return Err(CallError::NotConnected { last_error });
                    }
                };
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(CallError::DeadlineExceeded);
                }
                let request = wire::rewrite_deadline(&payload, left)
                    .map_err(|e| CallError::BadArguments { what: e.0 })?;
                match peer.inner.call(&request, left).await {
                    Outcome::Reply(reply) => return Ok(reply),
                    Outcome::Deadline => return Err(CallError::DeadlineExceeded),
                    Outcome::Protocol(what) => return Err(CallError::Protocol(what)),
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

    /// Queues a signal (generated clients call this). Ready at once, except under
    /// [`WhenFull::Wait`] with a full outbox: then it waits for room, at most `ttl`.
    pub(crate) async fn signal(
        &self,
        payload: Bytes,
        ttl: Duration,
        persistent: bool,
    ) -> Result<Sent, SignalError> {
        let sh = &self.shared;
        let expires = Instant::now() + ttl;
        loop {
            let mut room = pin!(sh.room.notified());
            room.as_mut().enable();
            match self.try_signal(&payload, expires, persistent) {
                Err(SignalError::OutboxFull) if sh.reconnect.when_full == WhenFull::Wait => {}
                done => return done,
            }
            if tokio::time::timeout_at(expires, room).await.is_err() {
                bump(&sh.counters.expired);
                return Err(SignalError::Expired);
            }
        }
    }

    /// Queues a signal if the outbox has room (or makes room, under
    /// [`WhenFull::DropOldest`]).
    fn try_signal(
        &self,
        payload: &Bytes,
        expires: Instant,
        persistent: bool,
    ) -> Result<Sent, SignalError> {
        let sh = &self.shared;
        if sh.shutting_down.load(Ordering::Acquire) {
            return Err(SignalError::ShuttingDown);
        }
        if sh.link.borrow().state == ConnectionState::Closed {
            let last_error = sh.link.borrow().last_error.clone();
            return Err(SignalError::NotConnected(last_error));
        }
        let mut evicted = None;
        let (seq, rx) = {
            let mut outbox = lock(&sh.outbox);
            if outbox.items.len() >= sh.capacity {
                match sh.reconnect.when_full {
                    WhenFull::Error => {
                        bump(&sh.counters.rejected);
                        return Err(SignalError::OutboxFull);
                    }
                    // `signal` waits for room and tries again.
                    WhenFull::Wait => return Err(SignalError::OutboxFull),
                    WhenFull::DropOldest => evicted = outbox.items.pop_front(),
                }
            }
            let seq = outbox.next_seq;
            let persistent = persistent && sh.store.is_some();
            if let Some(store) = &sh.store {
                let mut store = lock(store);
                let stored = if persistent {
                    let left = expires.saturating_duration_since(Instant::now());
                    store.insert(seq, payload, store::wall_ms_after(left))
                } else {
                    store.reserve(seq)
                };
                if let Err(e) = stored {
                    // Nothing was queued: put an evicted signal back where it was.
                    if let Some(item) = evicted.take() {
                        outbox.items.push_front(item);
                    }
                    return Err(SignalError::Store(e));
                }
            }
            let (tx, rx) = oneshot::channel();
            outbox.next_seq += 1;
            outbox.items.push_back(Item {
                seq,
                payload: payload.clone(),
                expires,
                sent_gen: None,
                persistent,
                ack: Some(tx),
            });
            (seq, rx)
        };
        bump(&sh.counters.queued);
        if let Some(mut item) = evicted {
            let maybe_delivered = item.sent_gen.is_some();
            item.settle(Delivery::Dropped { maybe_delivered });
            bump(&sh.counters.dropped);
            sh.emit(PeerEvent::SignalDropped {
                id: sh.id(item.seq),
                maybe_delivered,
            });
            sh.forget(&item);
        }
        sh.changed.notify_waiters();
        Ok(Sent::tracked(sh.id(seq), rx))
    }
}

/// Counts a running call (for graceful shutdown).
struct ActiveCall<'a>(&'a Shared);

impl Drop for ActiveCall<'_> {
    fn drop(&mut self) {
        if self.0.calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.calls_idle.notify_waiters();
        }
    }
}

impl Shared {
    fn id(&self, seq: u64) -> SignalId {
        SignalId {
            stream: self.stream,
            seq,
        }
    }

    fn emit(&self, event: PeerEvent) {
        lock(&self.subscribers).retain(|s| s.send(event.clone()).is_ok());
    }

    /// Deletes a signal from the store and announces the room (after the signal's outcome
    /// was counted and reported, so that `flush` returns with everything accounted for).
    fn forget(&self, item: &Item) {
        if let (true, Some(store)) = (item.persistent, &self.store) {
            lock(store).delete(item.seq);
        }
        self.room.notify_waiters();
    }

    fn expire(&self, seq: u64) {
        let Some(mut item) = lock(&self.outbox).take(seq) else {
            return;
        };
        let maybe_delivered = item.sent_gen.is_some();
        item.settle(Delivery::Expired { maybe_delivered });
        bump(&self.counters.expired);
        self.emit(PeerEvent::SignalExpired {
            id: self.id(seq),
            maybe_delivered,
        });
        self.forget(&item);
    }

    fn on_ack(&self, seq: u64, status: u8) {
        let Some(mut item) = lock(&self.outbox).take(seq) else {
            return; // a duplicate acknowledgement
        };
        match AckStatus::from_u8(status) {
            Some(AckStatus::Handled) => {
                bump(&self.counters.acknowledged);
                item.settle(Delivery::Handled);
            }
            Some(AckStatus::Expired) => {
                bump(&self.counters.expired);
                item.settle(Delivery::Expired {
                    maybe_delivered: false,
                });
                self.emit(PeerEvent::SignalExpired {
                    id: self.id(seq),
                    maybe_delivered: false,
                });
            }
            Some(AckStatus::Failed) | None => {
                bump(&self.counters.failed);
                item.settle(Delivery::Failed);
                self.emit(PeerEvent::SignalFailed { id: self.id(seq) });
            }
        }
        self.forget(&item);
    }

    fn set_link(&self, f: impl FnOnce(&mut Link)) {
        self.link.send_modify(f);
        self.changed.notify_waiters();
    }

    /// After close or shutdown: drop what is left in memory (it stays in the store, if
    /// there is one) and mark the peer closed.
    fn finish(&self) {
        let left: Vec<Item> = lock(&self.outbox).items.drain(..).collect();
        for mut item in left {
            let maybe_delivered = item.sent_gen.is_some();
            item.settle(Delivery::Dropped { maybe_delivered });
            if !item.persistent {
                bump(&self.counters.dropped);
                self.emit(PeerEvent::SignalDropped {
                    id: self.id(item.seq),
                    maybe_delivered,
                });
            }
        }
        self.room.notify_waiters();
        // Objects may hold clients of this peer: let the cycle go.
        lock(&self.objects).clear();
        self.set_link(|l| {
            l.peer = None;
            l.state = ConnectionState::Closed;
        });
    }
}

/// Connects, serves, waits for the drop, backs off, again.
async fn supervise(sh: Arc<Shared>, acks: crate::peer::AckSink) {
    let mut stop = sh.stop.subscribe();
    let mut failures = 0u32;
    let mut rng = random_u64() | 1;
    let mut generation = 0u64;
    loop {
        if *stop.borrow() {
            break;
        }
        let attempt = tokio::select! {
            r = connect(&sh.address, sh.options.clone()) => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let last_error = match attempt {
            Ok(conn) => {
                failures = 0;
                generation += 1;
                let peer = Peer::with_options(conn, sh.peer_options.clone());
                peer.inner.hooks.set_ack_sink(acks.clone());
                let remote = peer.connection().remote_address().clone();
                {
                    let objects = lock(&sh.objects);
                    for (name, object) in objects.iter() {
                        peer.register(name.clone(), SharedService(object.clone()));
                    }
                    sh.set_link(|l| {
                        l.peer = Some(peer.clone());
                        l.generation = generation;
                        l.state = ConnectionState::Connected;
                    });
                }
                bump(&sh.counters.connects);
                sh.emit(PeerEvent::Connected { remote });
                let sender = tokio::spawn(send_queued(sh.clone(), peer.clone(), generation));
                let cause = tokio::select! {
                    cause = peer.closed() => Some(cause),
                    _ = stop.wait_for(|s| *s) => None,
                };
                sender.abort();
                let Some(cause) = cause else {
                    // Stopped: `close` or `shutdown` closes the peer; a dropped handle
                    // leaves it to close when its last clone goes.
                    break;
                };
                sh.set_link(|l| {
                    l.peer = None;
                    l.last_error = format!("connection lost: {cause}");
                });
                sh.emit(PeerEvent::Disconnected {
                    cause: cause.clone(),
                });
                format!("connection lost: {cause}")
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                format!("connect to {}: {e}", sh.address)
            }
        };
        if *stop.borrow() {
            // Closed or shut down on purpose: no reconnect (and no Reconnecting event).
            break;
        }
        let Some(delay) = sh.reconnect.backoff.delay(failures, &mut rng) else {
            sh.set_link(|l| {
                l.peer = None;
                l.state = ConnectionState::Closed;
                l.last_error = format!("gave up reconnecting: {last_error}");
            });
            sh.emit(PeerEvent::GaveUp { last_error });
            sh.finish();
            return;
        };
        let attempt = failures + 1;
        sh.set_link(|l| {
            l.peer = None;
            l.state = ConnectionState::Reconnecting { attempt };
            l.last_error = last_error.clone();
        });
        sh.emit(PeerEvent::Reconnecting {
            attempt,
            delay,
            last_error,
        });
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
}

/// Sends the outbox on one connection, in sequence order: first what was queued (or sent
/// on an earlier connection and not acknowledged), then whatever comes.
async fn send_queued(sh: Arc<Shared>, peer: Peer, generation: u64) {
    let window = sh.reconnect.window.unwrap_or(128);
    let mut next = 0u64;
    loop {
        let mut changed = pin!(sh.changed.notified());
        changed.as_mut().enable();
        let mut room = pin!(sh.room.notified());
        room.as_mut().enable();
        let (item, in_flight) = {
            let outbox = lock(&sh.outbox);
            // Everything before `next` was sent on this connection and awaits its ack.
            let in_flight = outbox.items.partition_point(|it| it.seq < next);
            let item = outbox
                .first_from(next)
                .map(|it| (it.seq, it.payload.clone(), it.expires, it.sent_gen));
            (item, in_flight)
        };
        if in_flight >= window {
            room.await;
            continue;
        }
        let Some((seq, payload, expires, sent_before)) = item else {
            changed.await;
            continue;
        };
        next = seq + 1;
        let now = Instant::now();
        if now >= expires {
            sh.expire(seq);
            continue;
        }
        let bytes = match wire::encode_reliable(sh.stream, seq, &payload, expires - now) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!("chatter-rpc: dropping a malformed queued signal: {e}");
                sh.on_ack(seq, AckStatus::Failed as u8);
                continue;
            }
        };
        let send = peer.inner.conn.send_bytes(&bytes, SendOptions::new());
        match tokio::time::timeout_at(expires, send).await {
            Ok(Ok(_)) => {
                bump(&sh.counters.sent);
                if sent_before.is_some() {
                    bump(&sh.counters.resent);
                }
                if let Some(it) = lock(&sh.outbox).get_mut(seq) {
                    it.sent_gen = Some(generation);
                }
            }
            Ok(Err(_)) => return, // the connection closed
            Err(_) => sh.expire(seq),
        }
    }
}

async fn receive_acks(sh: Arc<Shared>, mut acks: mpsc::UnboundedReceiver<(u64, u64, u8)>) {
    let mut stop = sh.stop.subscribe();
    loop {
        tokio::select! {
            ack = acks.recv() => match ack {
                Some((stream, seq, status)) if stream == sh.stream => sh.on_ack(seq, status),
                Some(_) => {}
                None => return,
            },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Drops signals whose TTL ran out, except those sent on the live connection: the
/// receiver decides about those (it acknowledges them as handled or expired).
async fn sweep(sh: Arc<Shared>) {
    let mut stop = sh.stop.subscribe();
    loop {
        let mut changed = pin!(sh.changed.notified());
        changed.as_mut().enable();
        let (generation, connected) = {
            let l = sh.link.borrow();
            (l.generation, l.peer.is_some())
        };
        let now = Instant::now();
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        for it in lock(&sh.outbox).items.iter() {
            if connected && it.sent_gen == Some(generation) {
                continue;
            }
            if it.expires <= now {
                due.push(it.seq);
            } else {
                next = Some(next.map_or(it.expires, |n| n.min(it.expires)));
            }
        }
        for seq in due {
            sh.expire(seq);
        }
        let far = now + Duration::from_secs(3600);
        tokio::select! {
            () = &mut changed => {}
            () = tokio::time::sleep_until(next.unwrap_or(far)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// One registered object, shared by the peers of successive connections.
struct SharedService(Arc<dyn Service>);

impl Service for SharedService {
    fn __dispatch(&self, method: &[u8], args: &[u8], handlers: &mut Handlers) -> Dispatch {
        self.0.__dispatch(method, args, handlers)
    }
}

pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    h.finish()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_jitters_and_gives_up() {
        let mut rng = 12345;
        let b =
            Backoff::exponential(Duration::from_millis(100), Duration::from_secs(1)).jitter(0.0);
        assert_eq!(b.delay(0, &mut rng), Some(Duration::from_millis(100)));
        assert_eq!(b.delay(3, &mut rng), Some(Duration::from_millis(800)));
        assert_eq!(b.delay(30, &mut rng), Some(Duration::from_secs(1)));
        let j = b.clone().jitter(0.5);
        for n in 0..100 {
            let d = j.delay(n % 4, &mut rng).expect("unlimited");
            let base = b.delay(n % 4, &mut rng).expect("unlimited");
            assert!(d >= base / 2 && d <= base * 3 / 2, "{d:?} vs {base:?}");
        }
        assert_eq!(Backoff::never().delay(0, &mut rng), None);
        let huge = Backoff::exponential(Duration::MAX, Duration::MAX).jitter(1.0);
        assert!(huge.delay(40, &mut rng).is_some(), "no overflow");
        let three = b.max_attempts(3);
        assert!(three.delay(2, &mut rng).is_some());
        assert_eq!(three.delay(3, &mut rng), None);
    }

    #[test]
    fn handles_are_send_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<ReconnectingPeer>();
        check::<Target>();
        check::<Sent>();
    }
}
