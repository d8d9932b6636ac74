//! The link of a [`Peer`]: what makes its connections. A peer made from a connection has
//! a plain link (that connection; it never reconnects). A reconnecting peer's link is a
//! [`Supervisor`]: it connects to an address, makes a connection part ([`Inner`]) for each
//! connection, and reconnects with [`Backoff`] after the connection drops, as its
//! [`ReconnectOptions`] say.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chatter_core::{connect, Address, AddressError, CloseCause, CloseCode, Options};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::store::{self, Store};

use super::events::{ConnectionState, PeerEvent};
use super::options::{bump, PeerOptions};
use super::outbox::{Item, Outbox};
use super::signals::{run_sender, sweep};
use super::{Inner, Peer, PeerState, Queue, MAX_DURATION};

/// How a peer makes its connections.
pub(crate) enum Link {
    /// One connection, given when the peer was made (the [`Peer`](super::Peer) holds its
    /// [`Inner`]); it never reconnects.
    Plain,
    /// Connects to an address and reconnects (boxed: a plain peer does not carry it).
    Reconnecting(Box<Supervisor>),
}

/// The state of a reconnecting link, shared by its supervisor task and the peer.
pub(crate) struct Supervisor {
    address: Address,
    options: Options,
    reconnect: ReconnectOptions,
    /// The connection as the supervisor last published it.
    pub(crate) current: watch::Sender<Current>,
    /// Set to stop the supervisor (close, shutdown, or the last handle dropped).
    stop: watch::Sender<bool>,
    /// Outgoing calls in progress (for graceful shutdown).
    pub(crate) calls: AtomicUsize,
    pub(crate) calls_idle: Notify,
}

/// What a reconnecting link publishes about its connection.
#[derive(Clone)]
pub(crate) struct Current {
    pub(crate) inner: Option<Arc<Inner>>,
    pub(crate) generation: u64,
    pub(crate) state: ConnectionState,
    pub(crate) last_error: String,
    /// Why the last connection closed.
    cause: Option<CloseCause>,
}

impl Supervisor {
    /// Stops reconnecting (and, if the peer is dropped, closes the connection).
    pub(crate) fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// The peer closed for good.
    pub(crate) fn closed_for_good(&self) {
        self.current.send_modify(|c| {
            c.inner = None;
            c.state = ConnectionState::Closed;
        });
    }

    /// Waits until the peer is closed; the cause of its last connection's close.
    pub(crate) async fn closed(&self) -> CloseCause {
        let mut current = self.current.subscribe();
        let closed = current
            .wait_for(|c| c.state == ConnectionState::Closed)
            .await
            .map(|c| c.cause.clone());
        closed.ok().flatten().unwrap_or(CloseCause::Local)
    }
}

/// Why a reconnecting [`Peer`](crate::Peer) could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReconnectError {
    /// The address does not parse, or needs a feature this build lacks (`tls://` without
    /// `tls`: [`AddressError::TlsNotCompiledIn`]).
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The signal store could not be opened or read.
    #[error("signal store: {0}")]
    Store(String),
    /// A store was given ([`ReconnectOptions::store`]) to a build without the
    /// `persistence` feature.
    #[error(
        "cannot open the signal store {}: persistence support is not compiled in: enable \
         the `persistence` feature of chatter-rpc",
        path.display()
    )]
    PersistenceNotCompiledIn {
        /// The store's path.
        path: PathBuf,
    },
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

/// Settings of a reconnecting [`Peer`](crate::Peer)'s link, beyond the connection's
/// [`Options`](crate::Options) and the [`PeerOptions`].
///
/// ```
/// use std::time::Duration;
/// use chatter_rpc::{Backoff, ReconnectOptions};
///
/// let options = ReconnectOptions::default()
///     .backoff(Backoff::exponential(Duration::from_millis(10), Duration::from_secs(5)))
///     .window(64)
///     .store("/var/lib/myapp/outbox.sqlite"); // persistent signals (feature `persistence`)
/// # let _ = options;
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReconnectOptions {
    pub(crate) backoff: Backoff,
    pub(crate) window: Option<usize>,
    pub(crate) store: Option<PathBuf>,
    pub(crate) on_connect: Vec<OnConnect>,
}

impl ReconnectOptions {
    /// When to reconnect (default [`Backoff::default`]).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How many signals may be sent and not yet acknowledged on a connection (default
    /// 128). A smaller window re-sends less after a cut; a larger one keeps more signals
    /// in flight on slow links.
    pub fn window(mut self, signals: usize) -> Self {
        self.window = Some(signals.max(1));
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
    /// Needs the `persistence` feature (SQLite, compiled from C): without it,
    /// [`Peer::reconnecting`](crate::Peer::reconnecting) refuses a store with
    /// [`ReconnectError::PersistenceNotCompiledIn`] rather than keep the signals in memory
    /// only.
    ///
    /// Cost: each persistent send and each of its acknowledgements is one synced SQLite
    /// transaction on the thread of the task that sends it or receives the
    /// acknowledgement (WAL journal, `synchronous = FULL`: durable against a crash of the
    /// process and of the machine), so persistent signals are bounded by the disk's sync
    /// rate. A signal's TTL keeps counting while the process is down (wall clock): one
    /// that ran out meanwhile is dropped and counted at the next start.
    pub fn store(mut self, path: impl Into<PathBuf>) -> Self {
        self.store = Some(path.into());
        self
    }

    /// Runs `hook` on every new connection before the connection is used: before the
    /// peer counts as connected ([`Peer::wait_connected`](crate::Peer::wait_connected),
    /// [`PeerEvent::Connected`]), before queued and stored signals are sent or re-sent on
    /// it, and before calls waiting for a connection go out. What the hook needs the other
    /// side to know first goes here: chatter-broker's reconnecting `Bus` claims its name
    /// again this way.
    ///
    /// The hook gets a [`Peer`] handle *pinned to the new connection*: calls (and stream
    /// calls) made with clients of it go out on that connection at once (signals sent
    /// through it wait in the outbox like the peer's). Keep it only for the hook's
    /// duration: it does not follow later connections, and it does not keep the peer
    /// open. Incoming calls are served on the connection while the hook runs.
    ///
    /// When the hook fails, the connection is closed (code *normal*, the error as
    /// reason), the failure is reported ([`PeerEvent::OnConnectFailed`], then
    /// [`PeerEvent::Reconnecting`] with the error as `last_error`) and counted as a failed
    /// attempt: the next one follows [`backoff`](Self::backoff) and its `max_attempts`.
    /// Hooks added by several calls run in the order added, each after the previous one
    /// succeeded.
    ///
    /// ```
    /// use chatter_rpc::{Peer, ReconnectOptions};
    ///
    /// let options = ReconnectOptions::default().on_connect(|peer: Peer| async move {
    ///     // e.g. `SessionClient::new(&peer, "session").resume(token).await`
    ///     let _ = peer;
    ///     Ok::<(), std::convert::Infallible>(())
    /// });
    /// # let _ = options;
    /// ```
    pub fn on_connect<F, Fut, E>(mut self, hook: F) -> Self
    where
        F: Fn(Peer) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: fmt::Display,
    {
        self.on_connect.push(OnConnect::new(hook));
        self
    }

    /// [`on_connect`](Self::on_connect), but `hook` runs before the hooks added so far:
    /// for a layer that wraps a peer (chatter-broker's `Bus`) and takes the application's
    /// options, whose own first step must come before the application's hooks.
    pub fn on_connect_first<F, Fut, E>(mut self, hook: F) -> Self
    where
        F: Fn(Peer) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: fmt::Display,
    {
        self.on_connect.insert(0, OnConnect::new(hook));
        self
    }
}

/// What an on-connect hook's future resolves to, its error as text.
type HookFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A hook of [`ReconnectOptions::on_connect`]. Equal when it is the same hook (options are
/// compared for tests and for "did anything change").
#[derive(Clone)]
pub(crate) struct OnConnect(Arc<dyn Fn(Peer) -> HookFuture + Send + Sync>);

impl OnConnect {
    fn new<F, Fut, E>(hook: F) -> Self
    where
        F: Fn(Peer) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: fmt::Display,
    {
        OnConnect(Arc::new(move |peer| {
            let run = hook(peer);
            Box::pin(async move { run.await.map_err(|e| e.to_string()) })
        }))
    }
}

impl fmt::Debug for OnConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OnConnect(..)")
    }
}

impl PartialEq for OnConnect {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Makes a reconnecting peer's state (loading its store) and starts its tasks.
pub(crate) fn start_reconnecting(
    address: Address,
    options: Options,
    peer_options: PeerOptions,
    reconnect: ReconnectOptions,
) -> Result<Arc<PeerState>, ReconnectError> {
    // Refused now rather than at every connection attempt.
    address.check_supported()?;
    let mut outbox = Outbox::default();
    let mut stream = random_u64() | 1;
    let mut loaded_expired = Vec::new();
    let store = match &reconnect.store {
        None => None,
        Some(path) => {
            let (mut db, loaded) = Store::open(path, stream)?;
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
            Some(db)
        }
    };
    let (stop, _) = watch::channel(false);
    let (current, _) = watch::channel(Current {
        inner: None,
        generation: 0,
        state: ConnectionState::Connecting,
        last_error: "not connected yet".into(),
        cause: None,
    });
    let link = Link::Reconnecting(Box::new(Supervisor {
        address,
        options,
        reconnect,
        current,
        stop,
        calls: AtomicUsize::new(0),
        calls_idle: Notify::new(),
    }));
    // Its signals always go through the outbox: the queue is made now.
    let queue = Queue::new(outbox, store);
    let state = Arc::new(PeerState::new(peer_options, link, stream, Some(queue)));
    for seq in loaded_expired {
        bump(&state.stats.signals_expired);
        let id = state.id(seq);
        tracing::info!(signal = %id, "stored signal expired while the process was down");
    }
    let Link::Reconnecting(supervisor) = &state.link else {
        unreachable!("made above")
    };
    // One of each per reconnecting peer; both end when it stops (close, shutdown, drop of
    // the last handle, or the backoff giving up).
    tokio::spawn(sweep(state.clone(), supervisor.stop.subscribe()));
    tokio::spawn(supervise(state.clone()));
    Ok(state)
}

/// Connects, serves, waits for the drop, backs off, again.
async fn supervise(state: Arc<PeerState>) {
    let Link::Reconnecting(sv) = &state.link else {
        return;
    };
    let mut stop = sv.stop.subscribe();
    let mut failures = 0u32;
    let mut rng = random_u64() | 1;
    let mut generation = 0u64;
    let window = sv.reconnect.window.unwrap_or(128);
    'supervise: loop {
        if *stop.borrow() {
            break;
        }
        let attempt = tokio::select! {
            r = connect(&sv.address, sv.options.clone()) => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let last_error = match attempt {
            Ok(conn) => 'connected: {
                generation += 1;
                let remote = conn.remote_address().clone();
                let (inner, mut reader) = Inner::start_with_reader(state.clone(), conn, generation);
                // The on-connect hooks run before anything of the peer's own is sent on
                // the connection, and before it is published for calls.
                match run_on_connect(&state, &inner, &mut stop).await {
                    Hooked::Done => {}
                    Hooked::Stopped => {
                        inner.shutdown.notify_one();
                        break 'supervise;
                    }
                    Hooked::Failed(error) => {
                        failures = failures.saturating_add(1);
                        let reason = format!("on-connect hook failed: {error}");
                        inner.conn.close_with(CloseCode::Normal, &reason).await;
                        // Its receive task ends once the connection closed and the hook's
                        // calls were told.
                        let _ = (&mut reader).await;
                        state.emit(PeerEvent::OnConnectFailed { remote, error });
                        break 'connected reason;
                    }
                }
                failures = 0;
                state.start_connection(generation);
                sv.current.send_modify(|c| {
                    c.inner = Some(inner.clone());
                    c.generation = generation;
                    c.state = ConnectionState::Connected;
                });
                bump(&state.stats.connects);
                state.emit(PeerEvent::Connected { remote });
                // One per connection, only one connection at a time: it ends when the
                // connection closes (and is aborted below when the link moves on).
                let sender = tokio::spawn(run_sender(inner.clone(), window));
                // The receive task ends once the connection closed and everything waiting
                // on it was told: only then does the next connection start.
                let stopped = tokio::select! {
                    _ = &mut reader => false,
                    _ = stop.wait_for(|s| *s) => true,
                };
                sender.abort();
                if stopped {
                    // `close` and `shutdown` close the connection themselves; for a peer
                    // whose last handle was dropped, this does.
                    inner.shutdown.notify_one();
                    break 'supervise;
                }
                let cause = inner.conn.close_cause().unwrap_or(CloseCause::Local);
                state.connection_lost();
                sv.current.send_modify(|c| {
                    c.inner = None;
                    c.last_error = format!("connection lost: {cause}");
                    c.cause = Some(cause.clone());
                });
                state.emit(PeerEvent::Disconnected {
                    cause: cause.clone(),
                });
                format!("connection lost: {cause}")
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                format!("connect to {}: {e}", sv.address)
            }
        };
        if *stop.borrow() {
            // Closed or shut down on purpose: no reconnect (and no Reconnecting event).
            break;
        }
        let Some(delay) = sv.reconnect.backoff.delay(failures, &mut rng) else {
            sv.current.send_modify(|c| {
                c.last_error = format!("gave up reconnecting: {last_error}");
            });
            state.emit(PeerEvent::GaveUp { last_error });
            state.finish(None);
            return;
        };
        let attempt = failures + 1;
        sv.current.send_modify(|c| {
            c.inner = None;
            c.state = ConnectionState::Reconnecting { attempt };
            c.last_error = last_error.clone();
        });
        state.queue().changed.notify_waiters();
        state.emit(PeerEvent::Reconnecting {
            attempt,
            delay,
            last_error,
        });
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    // Stopped: what is left is dropped (and stays stored), the objects go.
    state.finish(None);
}

/// How a new connection's on-connect hooks went.
enum Hooked {
    /// All succeeded (or there are none).
    Done,
    /// The peer was stopped meanwhile.
    Stopped,
    /// One failed, with this error.
    Failed(String),
}

/// Runs the [`ReconnectOptions::on_connect`] hooks on `inner`'s connection, in order.
async fn run_on_connect(
    state: &Arc<PeerState>,
    inner: &Arc<Inner>,
    stop: &mut watch::Receiver<bool>,
) -> Hooked {
    let Link::Reconnecting(sv) = &state.link else {
        return Hooked::Done;
    };
    for hook in &sv.reconnect.on_connect {
        let run = (hook.0)(Peer::pinned(state.clone(), inner.clone()));
        let result = tokio::select! {
            result = run => result,
            _ = stop.wait_for(|s| *s) => return Hooked::Stopped,
        };
        if let Err(error) = result {
            return Hooked::Failed(error);
        }
    }
    Hooked::Done
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
        check::<crate::Peer>();
        check::<crate::Sent>();
        check::<ReconnectError>();
    }
}
