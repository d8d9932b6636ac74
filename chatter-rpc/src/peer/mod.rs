//! [`Peer`]: one end of an RPC connection. Hosts objects, makes calls, sends signals.

use std::collections::HashMap;
use std::fmt;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use chatter_core::proto::IdBuildHasher;
use chatter_core::{CloseCause, Connection};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use crate::service::Service;
use crate::wire::{self, FailureKind};

mod backlog;
mod calls;
mod options;
mod reliable;
mod serve;
mod shutdown;
mod signals;

use backlog::{Kind, Slots};
pub(crate) use calls::Outcome;
use calls::{Pending, Slot};
pub(crate) use options::{bump, Stats};
pub use options::{PeerOptions, PeerStats};
pub(crate) use reliable::{AckSink, Hooks};
use serve::{run_reader, Answer};
use signals::{Outgoing, Queued};

/// One end of an RPC connection.
///
/// A peer wraps a chatter-core [`Connection`] and owns its receive side. It hosts objects
/// registered under names ([`register`](Self::register)) and is what generated clients
/// call through (`{Trait}Client::new(&peer, "name")`). Both ends of a connection are
/// peers, so both can host objects and call the other at the same time.
///
/// `Peer` is cheap to clone. The connection closes when [`close`](Self::close) is called,
/// when the other side closes it, or when the last `Peer` clone (and the last client made
/// from it) is dropped.
///
/// ```
/// use chatter_rpc::{Peer, PeerOptions};
/// use chatter_core::{connect, listen, Options};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let server = listen("tcp://127.0.0.1:0", Options::default()).await?;
/// let a = Peer::new(connect(&server.addresses()[0], Options::default()).await?);
/// let b = Peer::with_options(server.accept().await.expect("open"), PeerOptions::default());
/// // register objects on `b` (a `{Trait}Server`), call them from `a` (a `{Trait}Client`)…
/// a.close().await;
/// assert!(b.closed().await.to_string().contains("closed by peer"));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Peer {
    pub(crate) inner: Arc<Inner>,
    _owner: Arc<Owner>,
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("connection", &self.inner.conn)
            .field("objects", &self.objects())
            .finish_non_exhaustive()
    }
}

impl Peer {
    /// Wraps a connection with default options. Must be called inside a tokio runtime: it
    /// starts the peer's receive task.
    pub fn new(connection: Connection) -> Self {
        Peer::with_options(connection, PeerOptions::default())
    }

    /// Wraps a connection. Must be called inside a tokio runtime.
    pub fn with_options(connection: Connection, options: PeerOptions) -> Self {
        let inner = Arc::new(Inner {
            conn: connection.clone(),
            slots: Slots::new(options.max_concurrent_handlers, options.ordered_signals),
            answers: OnceLock::new(),
            options,
            objects: RwLock::new(HashMap::new()),
            objects_generation: AtomicU64::new(0),
            pending: Mutex::new(Pending::default()),
            inflight: Mutex::new(InFlight::default()),
            closing: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            outbox: OnceLock::new(),
            runtime: tokio::runtime::Handle::current(),
            queued: Arc::new(Queued::default()),
            stats: Arc::new(Stats::default()),
            shutdown: Notify::new(),
            hooks: Hooks::default(),
        });
        tokio::spawn(run_reader(inner.clone()));
        Peer {
            _owner: Arc::new(Owner(inner.clone())),
            inner,
        }
    }

    /// Hosts `object` under `name`, replacing (and returning true for) an object already
    /// registered under it. Calls already running on the old object finish.
    pub fn register(&self, name: impl Into<String>, object: impl Service) -> bool {
        let mut objects = write(&self.inner.objects);
        let replaced = objects.insert(name.into(), Arc::new(object)).is_some();
        self.inner.objects_changed();
        replaced
    }

    /// Stops hosting the object under `name`; returns whether there was one.
    pub fn unregister(&self, name: &str) -> bool {
        let mut objects = write(&self.inner.objects);
        let removed = objects.remove(name).is_some();
        self.inner.objects_changed();
        removed
    }

    /// The names of the hosted objects, sorted.
    pub fn objects(&self) -> Vec<String> {
        let mut names: Vec<String> = read(&self.inner.objects).keys().cloned().collect();
        names.sort();
        names
    }

    /// The underlying connection (for its addresses or close cause). Do not receive from
    /// it: the peer owns the receive side.
    pub fn connection(&self) -> &Connection {
        &self.inner.conn
    }

    /// This peer's options.
    pub fn options(&self) -> &PeerOptions {
        &self.inner.options
    }

    /// A snapshot of the peer's counters.
    pub fn stats(&self) -> PeerStats {
        let mut stats = self.inner.stats.snapshot();
        stats.requests_waiting = self.inner.slots.waiting() as u64;
        stats
    }

    /// Waits until every signal accepted so far was handed to the connection or dropped
    /// because its TTL ran out.
    pub async fn flush_signals(&self) {
        let q = &self.inner.queued;
        until_zero(&q.count, &q.drained).await;
    }

    /// Closes gracefully: running call handlers are cancelled (their callers get
    /// [`CallError::Cancelled`](crate::CallError::Cancelled)), their replies are sent (for
    /// at most 5 s), then the connection closes. Calls this side is waiting for fail with
    /// [`CallError::ConnectionLost`](crate::CallError::ConnectionLost).
    pub async fn close(&self) {
        self.inner.close_gracefully().await;
    }

    /// Waits until the connection is closed and returns why.
    pub async fn closed(&self) -> CloseCause {
        self.inner.conn.closed().await
    }
}

/// Dropped with the last user-held `Peer`: asks the receive task to close.
struct Owner(Arc<Inner>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.shutdown.notify_one();
    }
}

pub(crate) struct Inner {
    pub(crate) conn: Connection,
    pub(crate) options: PeerOptions,
    objects: RwLock<HashMap<String, Arc<dyn Service>>>,
    /// Bumped whenever `objects` changes; invalidates the receive task's [`LastObject`].
    objects_generation: AtomicU64,
    /// Calls this side made that wait for a reply, by conversation first id.
    pending: Mutex<Pending>,
    /// Call handlers running on this side, by the caller's conversation first id.
    inflight: Mutex<InFlight>,
    /// Set with `inflight.closing` by a close (a graceful shutdown sets
    /// `hooks.shutting_down` first): lets the call fast path skip the `inflight` lock.
    closing: AtomicBool,
    /// Calls accepted and not answered yet, other than those answered inline (for graceful
    /// close and shutdown).
    active: AtomicUsize,
    idle: Notify,
    /// Handler slots, and the requests waiting for one (`peer/backlog.rs`).
    slots: Slots,
    /// Answers waiting for send credit, each holding its request's credit; the task
    /// starts on first use.
    answers: OnceLock<mpsc::UnboundedSender<Answer>>,
    /// Messages waiting for flow-control credit; its task starts on first use, so that
    /// idle connections do not pay for it.
    outbox: OnceLock<mpsc::UnboundedSender<Outgoing>>,
    /// Where the outbox task starts (signals may be sent from outside the runtime).
    runtime: tokio::runtime::Handle,
    queued: Arc<Queued>,
    pub(crate) stats: Arc<Stats>,
    shutdown: Notify,
    /// Reliable delivery and graceful shutdown state (`peer/reliable.rs`, `peer/shutdown.rs`).
    pub(crate) hooks: Hooks,
}

#[derive(Default)]
struct InFlight {
    closing: bool,
    /// Set by a graceful shutdown: new calls are refused with "shutting down".
    shutting_down: bool,
    /// Dropping the sender cancels the handler.
    calls: HashMap<u64, oneshot::Sender<()>, IdBuildHasher>,
}

impl Inner {
    async fn close_gracefully(&self) {
        {
            let mut inflight = lock(&self.inflight);
            inflight.closing = true;
            self.closing.store(true, Ordering::Release);
            inflight.calls.clear();
        }
        // Calls waiting for a handler slot are cancelled as the running ones.
        let mut release = 0;
        for item in self.slots.drain(|item| matches!(item.kind, Kind::Call(_))) {
            if let Kind::Call(conv) = item.kind {
                let cancelled = wire::encode_failure(FailureKind::Cancelled, "closing");
                release += self.answer(conv, cancelled, item.credit);
                self.call_done();
            }
        }
        self.conn.release(release);
        let _ = tokio::time::timeout(CLOSE_GRACE, until_zero(&self.active, &self.idle)).await;
        self.conn.close().await;
    }

    /// True once a close or a graceful shutdown began: calls are refused.
    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire) || self.hooks.is_shutting_down()
    }

    /// Invalidates the receive task's memo; call after changing `objects`.
    fn objects_changed(&self) {
        self.objects_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The connection closed: fail waiting calls, cancel handlers, drop hosted objects
    /// (which may hold clients of this peer).
    fn finish(&self, cause: CloseCause) {
        let mut wakers = Vec::new();
        {
            let mut pending = lock(&self.pending);
            pending.closed = Some(cause.clone());
            // Waiting callers get the close cause; outcomes not yet taken stay for their
            // callers; abandoned calls are forgotten.
            pending.calls.retain(|_, slot| match slot {
                Slot::Waiting(_) => {
                    let lost = Slot::Arrived {
                        outcome: Outcome::Lost(cause.clone()),
                        then_abandon: false,
                    };
                    if let Slot::Waiting(waker) = std::mem::replace(slot, lost) {
                        wakers.push(waker);
                    }
                    true
                }
                Slot::Arrived { then_abandon, .. } => {
                    *then_abandon = false;
                    true
                }
                Slot::Abandoned => false,
            });
        }
        for waker in wakers {
            waker.wake();
        }
        {
            let mut inflight = lock(&self.inflight);
            inflight.closing = true;
            self.closing.store(true, Ordering::Release);
            inflight.calls.clear();
        }
        // Requests still waiting for a handler slot will not run: calls cannot be answered
        // any more (their callers learn of the close), signals are dropped and counted,
        // and reliable signals are left for the sender to re-send (it had no
        // acknowledgement), which keeps them in order across the reconnect.
        for item in self.slots.drain(|_| true) {
            match item.kind {
                Kind::Call(_) => self.call_done(),
                Kind::Signal => {
                    tracing::debug!("chatter-rpc: a received signal was dropped: the connection closed before a handler slot was free");
                    bump(&self.stats.signals_failed);
                }
                Kind::Reliable(admitted) => admitted.abandon(),
                Kind::Duplicate { .. } => {}
            }
        }
        write(&self.objects).clear();
        self.objects_changed();
        lock(&self.hooks.tracked).connection_lost(&cause);
    }
}

/// Waits until `count` is zero. Whoever brings it to zero calls `zero.notify_waiters()`.
pub(crate) async fn until_zero(count: &AtomicUsize, zero: &Notify) {
    loop {
        let mut notified = pin!(zero.notified());
        notified.as_mut().enable();
        if count.load(Ordering::Acquire) == 0 {
            return;
        }
        notified.await;
    }
}

/// How long a graceful close waits for cancelled handlers to send their replies.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// network).
fn after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d.min(MAX_DURATION))
        .unwrap_or(now + Duration::from_secs(86_400))
}

/// Durations are capped at about 30 years: "forever" without risking clock overflow.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(30 * 365 * 86_400);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::service::{reply_ok, Dispatch, Handlers};
    use crate::wire::{self, FailureKind};
    use crate::wire::{decode_reply, decode_value, Reply};

    /// Answers every call with `value`; records its drop.
    struct Fixed {
        value: i32,
        dropped: Arc<AtomicBool>,
    }

    impl Service for Fixed {
        fn __dispatch(&self, _method: &[u8], _args: &[u8], handlers: &mut Handlers) -> Dispatch {
            let value = self.value;
            handlers.call(async move { reply_ok(&value) })
        }
    }

    impl Drop for Fixed {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::Release);
        }
    }

    /// Two connected peers, and the listener (dropping it closes the accepted side).
    async fn pair() -> (Peer, Peer, chatter_core::Server) {
        let options = chatter_core::Options::default();
        let server = chatter_core::listen("tcp://127.0.0.1:0", options.clone())
            .await
            .expect("listen");
        let a = chatter_core::connect(&server.addresses()[0], options)
            .await
            .expect("connect");
        let b = server.accept().await.expect("accept");
        (Peer::new(a), Peer::new(b), server)
    }

    /// Calls `object` through `caller` and returns the value, or the failure kind.
    async fn call(caller: &Peer, object: &str) -> Result<i32, Option<FailureKind>> {
        let request = wire::encode_request(wire::CALL, object, "get", Duration::from_secs(5), &())
            .expect("encode");
        let outcome = caller.inner.call(&request, Duration::from_secs(5)).await;
        let Outcome::Reply(reply) = outcome else {
            panic!("no reply: {outcome:?}");
        };
        match decode_reply(&reply).expect("reply") {
            Reply::Ok(v) => Ok(decode_value(v).expect("value")),
            Reply::Failure { kind, .. } => Err(kind.ok()),
            Reply::AppError { .. } => Err(None),
        }
    }

    #[tokio::test]
    async fn replacing_and_unregistering_objects_take_effect_on_the_next_call() {
        let (caller, callee, _server) = pair().await;
        let first_dropped = Arc::new(AtomicBool::new(false));
        let second_dropped = Arc::new(AtomicBool::new(false));
        callee.register(
            "o",
            Fixed {
                value: 1,
                dropped: first_dropped.clone(),
            },
        );
        assert_eq!(call(&caller, "o").await, Ok(1));
        assert_eq!(call(&caller, "o").await, Ok(1));
        assert!(callee.register(
            "o",
            Fixed {
                value: 2,
                dropped: second_dropped.clone(),
            },
        ));
        assert!(
            first_dropped.load(Ordering::Acquire),
            "replaced object dropped"
        );
        assert_eq!(call(&caller, "o").await, Ok(2));
        assert!(callee.unregister("o"));
        // The receive task's memo does not keep the object alive.
        assert!(
            second_dropped.load(Ordering::Acquire),
            "unregistered object dropped"
        );
        assert_eq!(
            call(&caller, "o").await,
            Err(Some(FailureKind::NoSuchObject))
        );
        assert_eq!(
            call(&caller, "other").await,
            Err(Some(FailureKind::NoSuchObject))
        );
    }

    #[tokio::test]
    async fn a_call_dropped_before_its_first_poll_leaves_no_pending_slot() {
        let (caller, callee, _server) = pair().await;
        callee.register(
            "o",
            Fixed {
                value: 7,
                dropped: Arc::default(),
            },
        );
        let request = wire::encode_request(wire::CALL, "o", "get", Duration::from_secs(5), &())
            .expect("encode");
        // The request is sent when the future is made; the future is never polled.
        drop(caller.inner.call(&request, Duration::from_secs(5)));
        // Replies come in order: once this call's reply is in, so is the dropped one's.
        assert_eq!(call(&caller, "o").await, Ok(7));
        let pending = lock(&caller.inner.pending);
        assert!(
            pending.calls.is_empty(),
            "{} pending slots left",
            pending.calls.len()
        );
    }
}
