//! [`Peer`]: one end of an RPC connection. Hosts objects, makes calls, sends signals.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use chatter_core::proto::IdBuildHasher;
use chatter_core::{
    CloseCause, Connection, ConnectionClosed, Conversation, Event, Msg, SendError, SendOptions,
};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore, SemaphorePermit};
use tokio::time::Instant;

use crate::service::{CatchUnwind, Dispatch, HandlerFuture, Handlers, Service};
use crate::wire::{self, FailureKind, Incoming, Name, Payload};

mod reliable;
mod shutdown;

pub(crate) use reliable::{AckSink, Hooks};

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
    /// at least 1). Further requests wait for a slot until their deadline or TTL.
    pub fn max_concurrent_handlers(mut self, limit: usize) -> Self {
        self.max_concurrent_handlers = limit.clamp(1, Semaphore::MAX_PERMITS);
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
}

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
            handlers: Semaphore::new(options.max_concurrent_handlers),
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
        self.inner.stats.snapshot()
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
    /// Running call handler tasks (for graceful close).
    active: AtomicUsize,
    idle: Notify,
    handlers: Semaphore,
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
struct Pending {
    closed: Option<CloseCause>,
    calls: HashMap<u64, Slot, IdBuildHasher>,
}

/// The state of one outgoing call. The outcome is handed over in the slot itself (the
/// caller's future polls it), not through a channel: no allocation per call.
enum Slot {
    /// The caller waits; wake it when the outcome arrives.
    Waiting(Waker),
    /// The outcome, not yet taken by the caller (it may have arrived before the caller
    /// registered: it raced the send's return). With `then_abandon`, the reply is still to
    /// come and end the conversation: the slot stays `Abandoned` once the outcome is taken.
    Arrived {
        outcome: Outcome,
        then_abandon: bool,
    },
    /// The caller gave up (dropped or deadline); the reply still ends the conversation.
    Abandoned,
}

/// How an outgoing call ended, as seen by the receive task.
#[derive(Debug)]
pub(crate) enum Outcome {
    Reply(Bytes),
    Deadline,
    Lost(CloseCause),
    /// The request was never handed to the connection.
    NotSent(CloseCause),
    Protocol(String),
}

#[derive(Default)]
struct InFlight {
    closing: bool,
    /// Set by a graceful shutdown: new calls are refused with "shutting down".
    shutting_down: bool,
    /// Dropping the sender cancels the handler.
    calls: HashMap<u64, oneshot::Sender<()>, IdBuildHasher>,
}

/// The receive task's memo of the object it looked up last: most connections talk to one
/// object, and a hit skips the lock, the SipHash of the name, the map probe and the
/// reference count updates. Valid while `Inner::objects_generation` is unchanged; holds the
/// object only while the receive task handles one batch of messages (it is cleared before
/// the task waits for the next), so that unregistering an object still drops it.
#[derive(Default)]
struct LastObject {
    generation: u64,
    name: String,
    service: Option<Arc<dyn Service>>,
}

/// An object found by a lookup: borrowed from the receive task's memo, or owned.
enum Found<'a> {
    Memo(&'a dyn Service),
    Owned(Arc<dyn Service>),
}

impl std::ops::Deref for Found<'_> {
    type Target = dyn Service;

    fn deref(&self) -> &Self::Target {
        match self {
            Found::Memo(service) => *service,
            Found::Owned(service) => &**service,
        }
    }
}

#[derive(Default)]
struct Queued {
    count: AtomicUsize,
    drained: Notify,
}

/// Something the outbox task sends: a signal (with its expiry) or a control message.
struct Outgoing {
    payload: Bytes,
    options: SendOptions,
    /// Signals only: drop (and count) if not handed over by then.
    expires: Option<Instant>,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) signals_sent: AtomicU64,
    signals_expired: AtomicU64,
    pub(crate) signals_rejected: AtomicU64,
    signals_delivered: AtomicU64,
    /// Signals delivered by handlers the receive task started itself.
    signals_delivered_inline: ReaderCounter,
    signals_expired_on_arrival: AtomicU64,
    signals_failed: AtomicU64,
    calls_received: ReaderCounter,
    handler_panics: AtomicU64,
}

/// A counter that only the receive task bumps (once per message), so it needs no locked
/// read-modify-write: a plain load and store is exact. Measured: 3% more signals per
/// second than `fetch_add` (`onecore`, 7 alternated runs).
#[derive(Debug, Default)]
pub(crate) struct ReaderCounter(AtomicU64);

impl ReaderCounter {
    /// Counts one. Only the receive task may call this (two writers could lose counts).
    fn bump(&self) {
        let n = self.0.load(Ordering::Relaxed);
        self.0.store(n.wrapping_add(1), Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Stats {
    fn snapshot(&self) -> PeerStats {
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
        }
    }
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Inner {
    /// Sends a request and waits for its outcome. The caller's future owns a guard: if it is
    /// dropped before the outcome, the callee is told to cancel.
    pub(crate) fn call<'a>(
        self: &'a Arc<Self>,
        payload: impl AsRef<[u8]> + Send + 'a,
        deadline: Duration,
    ) -> impl Future<Output = Outcome> + Send + 'a {
        // Sent before the future is made, so that the future does not hold the request:
        // its buffer goes back to the pool now, not when the reply comes. Callers call
        // this in the first poll of their own future, so calls are still sent when first
        // polled.
        let start = match self.try_start_call(payload.as_ref(), deadline) {
            Ok(id) => Start::Sent(CallGuard {
                inner: self,
                id,
                armed: true,
            }),
            // Rare (the peer's window is full). Boxed so that its timer and wait state do
            // not make every call future larger: callers move these futures around.
            Err(SendError::WouldBlock) => Start::Wait(Box::pin(async move {
                let send = self
                    .conn
                    .send_bytes(payload.as_ref(), call_options(deadline));
                match tokio::time::timeout(deadline, send).await {
                    Ok(Ok(conv)) => Ok(conv),
                    Ok(Err(e)) => Err(send_failure(e)),
                    Err(_) => Err(Outcome::Deadline),
                }
            })),
            Err(e) => Start::Wait(Box::pin(std::future::ready(Err(send_failure(e))))),
        };
        async move {
            let mut guard = match start {
                Start::Sent(guard) => guard,
                Start::Wait(wait) => match wait.await {
                    Ok(conv) => CallGuard {
                        inner: self,
                        id: conv.first_id(),
                        armed: true,
                    },
                    Err(outcome) => return outcome,
                },
            };
            let id = guard.id;
            let outcome = std::future::poll_fn(|cx| self.poll_outcome(id, cx)).await;
            guard.armed = false;
            outcome
        }
    }

    /// Sends a request now if the peer's window has room: returns its pending slot id, to
    /// poll with [`poll_outcome`](Self::poll_outcome) and, if the caller gives up, to
    /// [`abandon_call`](Self::abandon_call). Fails with [`SendError::WouldBlock`] when the
    /// window has no room now (then use [`call`](Self::call)).
    pub(crate) fn try_start_call(
        &self,
        payload: &[u8],
        deadline: Duration,
    ) -> Result<u64, SendError> {
        self.conn
            .try_send(payload, call_options(deadline))
            .map(|conv| conv.first_id())
    }

    /// Takes the outcome of call `id` if it arrived, else registers (or refreshes) the
    /// caller's waker.
    pub(crate) fn poll_outcome(&self, id: u64, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut pending = lock(&self.pending);
        let closed = pending.closed.clone();
        match pending.calls.entry(id) {
            Entry::Occupied(mut slot) => match slot.get_mut() {
                Slot::Waiting(waker) => {
                    if !waker.will_wake(cx.waker()) {
                        *waker = cx.waker().clone();
                    }
                    Poll::Pending
                }
                Slot::Arrived { then_abandon, .. } => {
                    let outcome = if *then_abandon {
                        std::mem::replace(slot.get_mut(), Slot::Abandoned)
                    } else {
                        slot.remove()
                    };
                    let Slot::Arrived { outcome, .. } = outcome else {
                        unreachable!("matched as arrived")
                    };
                    Poll::Ready(outcome)
                }
                // Only the caller abandons its slot, and then it does not poll any more.
                Slot::Abandoned => Poll::Ready(Outcome::Lost(closed.unwrap_or(CloseCause::Local))),
            },
            Entry::Vacant(slot) => match closed {
                Some(cause) => Poll::Ready(Outcome::Lost(cause)),
                None => {
                    slot.insert(Slot::Waiting(cx.waker().clone()));
                    Poll::Pending
                }
            },
        }
    }

    /// The outbox, started on first use.
    fn outbox(&self) -> &mpsc::UnboundedSender<Outgoing> {
        self.outbox.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            self.runtime.spawn(run_outbox(
                self.conn.clone(),
                rx,
                self.queued.clone(),
                self.stats.clone(),
                self.hooks.tracked.clone(),
            ));
            tx
        })
    }

    /// Hands a message to the connection now if it has credit, else to the outbox.
    pub(crate) fn send_soon(&self, payload: Payload, options: SendOptions) {
        match self.conn.try_send(&payload, options) {
            Err(SendError::WouldBlock) => {
                let _ = self.outbox().send(Outgoing {
                    payload: payload.into_bytes(),
                    options,
                    expires: None,
                });
            }
            Err(e) => tracing::debug!("chatter-rpc: dropping a control message: {e}"),
            Ok(_) => {}
        }
    }

    /// Sends a signal without waiting: directly when nothing is queued before it and the
    /// connection has credit, else through the outbox (dropped if `ttl` runs out first).
    pub(crate) fn signal(
        &self,
        payload: Payload,
        ttl: Duration,
    ) -> Result<(), crate::error::SignalError> {
        use crate::error::SignalError;
        if self.queued.count.load(Ordering::Acquire) == 0 {
            match self.conn.try_send(&payload, SendOptions::new()) {
                Ok(_) => {
                    bump(&self.stats.signals_sent);
                    return Ok(());
                }
                Err(SendError::WouldBlock) => {}
                Err(SendError::Closed(cause)) => return Err(SignalError::ConnectionLost(cause)),
                Err(e) => return Err(SignalError::TooLarge(e.to_string())),
            }
        }
        if ttl.is_zero() {
            bump(&self.stats.signals_expired);
            lock(&self.hooks.tracked).expired_unsent(&payload);
            return Ok(());
        }
        if self.queued.count.load(Ordering::Acquire) >= self.options.max_queued_signals {
            bump(&self.stats.signals_rejected);
            return Err(SignalError::OutboxFull);
        }
        self.queued.count.fetch_add(1, Ordering::AcqRel);
        let item = Outgoing {
            payload: payload.into_bytes(),
            options: SendOptions::new(),
            expires: Some(after(ttl)),
        };
        if self.outbox().send(item).is_err() {
            self.queued.count.fetch_sub(1, Ordering::AcqRel);
            let cause = self.conn.close_cause().unwrap_or(CloseCause::Local);
            return Err(SignalError::ConnectionLost(cause));
        }
        Ok(())
    }

    async fn close_gracefully(&self) {
        {
            let mut inflight = lock(&self.inflight);
            inflight.closing = true;
            self.closing.store(true, Ordering::Release);
            inflight.calls.clear();
        }
        let _ = tokio::time::timeout(CLOSE_GRACE, until_zero(&self.active, &self.idle)).await;
        self.conn.close().await;
    }

    fn on_message<'a>(
        self: &'a Arc<Self>,
        msg: Msg,
        last: &mut LastObject,
        slot: &mut Option<SemaphorePermit<'a>>,
        handlers: &mut Handlers,
    ) {
        if msg.conversation.is_owner() {
            self.on_reply(msg);
        } else {
            self.on_request(msg, last, slot, handlers);
        }
    }

    /// A handler slot for a handler run inline: the one the receive task kept from the
    /// previous inline handler of this batch, or a free one.
    fn inline_slot<'a>(
        &'a self,
        slot: &mut Option<SemaphorePermit<'a>>,
    ) -> Option<SemaphorePermit<'a>> {
        slot.take().or_else(|| self.handlers.try_acquire().ok())
    }

    fn on_reply(&self, msg: Msg) {
        let outcome = if msg.last {
            Outcome::Reply(msg.payload)
        } else {
            Outcome::Protocol("the callee answered without ending the call".into())
        };
        self.settle(msg.conversation.first_id(), outcome);
    }

    fn on_timeout(&self, conv: Conversation) {
        if conv.is_owner() {
            self.settle(conv.first_id(), Outcome::Deadline);
        }
    }

    /// Delivers an outcome to the waiting caller.
    fn settle(&self, id: u64, outcome: Outcome) {
        let mut pending = lock(&self.pending);
        let is_reply = matches!(outcome, Outcome::Reply(_));
        match pending.calls.entry(id) {
            Entry::Occupied(mut slot) => match slot.get() {
                Slot::Waiting(_) => {
                    let arrived = Slot::Arrived {
                        outcome,
                        // Not a reply: the reply will still come and end the conversation.
                        then_abandon: !is_reply,
                    };
                    let Slot::Waiting(waker) = std::mem::replace(slot.get_mut(), arrived) else {
                        unreachable!("matched as waiting")
                    };
                    drop(pending);
                    waker.wake();
                }
                Slot::Abandoned if is_reply => {
                    slot.remove();
                }
                Slot::Abandoned => {}
                Slot::Arrived { .. } => {
                    // The first outcome wins; a reply after it ends the conversation.
                    if let Slot::Arrived { then_abandon, .. } = slot.get_mut() {
                        if is_reply {
                            *then_abandon = false;
                        }
                    }
                }
            },
            Entry::Vacant(slot) => {
                slot.insert(Slot::Arrived {
                    outcome,
                    then_abandon: !is_reply,
                });
            }
        }
    }

    /// A message in a conversation the other side opened. Only the receive task calls this
    /// (it bumps [`ReaderCounter`]s).
    fn on_request<'a>(
        self: &'a Arc<Self>,
        msg: Msg,
        last: &mut LastObject,
        slot: &mut Option<SemaphorePermit<'a>>,
        handlers: &mut Handlers,
    ) {
        let conv = msg.conversation;
        let open = msg.token && !msg.last;
        match wire::decode_incoming(&msg.payload) {
            Ok(Incoming::Call {
                deadline,
                object,
                method,
                args,
            }) if open && msg.first => {
                self.stats.calls_received.bump();
                // Fast path: with a handler slot free now, start the handler right here. One
                // that completes on its first poll (most do) is answered without a task, a
                // timer, a cancel channel or the `inflight` lock; one that waits continues in
                // a task. While closing, the slow path below refuses the call.
                if !deadline.is_zero() && !self.is_closing() {
                    if let Some(permit) = self.inline_slot(slot) {
                        if let Err(refusal) =
                            self.start_call(object, method, args, Some(last), handlers)
                        {
                            *slot = Some(permit);
                            self.reply(conv, refusal);
                            return;
                        }
                        let mut cx = Context::from_waker(Waker::noop());
                        match Pin::new(&mut CatchUnwind(handlers.call_mut())).poll(&mut cx) {
                            Poll::Ready(result) => {
                                *slot = Some(permit);
                                let reply = self.handler_result(result);
                                self.reply(conv, reply);
                            }
                            Poll::Pending => {
                                let handler = CatchUnwind(handlers.take_call());
                                let mut inflight = lock(&self.inflight);
                                if inflight.closing {
                                    // A graceful close began meanwhile: cancel.
                                    drop((inflight, handler, permit));
                                    let cancelled =
                                        wire::encode_failure(FailureKind::Cancelled, "closing");
                                    self.reply(conv, cancelled);
                                    return;
                                }
                                let (tx, rx) = oneshot::channel();
                                inflight.calls.insert(conv.first_id(), tx);
                                drop(inflight);
                                // The task gives the slot back when the handler is done.
                                permit.forget();
                                self.active.fetch_add(1, Ordering::AcqRel);
                                let deadline = after(deadline);
                                tokio::spawn(finish_call(
                                    self.clone(),
                                    conv,
                                    handler,
                                    deadline,
                                    rx,
                                ));
                            }
                        }
                        return;
                    }
                }
                // The cancel channel is made only for handlers that continue in a task.
                let rx = {
                    let mut inflight = lock(&self.inflight);
                    if inflight.closing {
                        let refusal = if inflight.shutting_down {
                            wire::encode_failure(FailureKind::ShuttingDown, "shutting down")
                        } else {
                            wire::encode_failure(FailureKind::Cancelled, "closing")
                        };
                        drop(inflight);
                        self.reply(conv, refusal);
                        return;
                    }
                    let (tx, rx) = oneshot::channel();
                    inflight.calls.insert(conv.first_id(), tx);
                    rx
                };
                self.active.fetch_add(1, Ordering::AcqRel);
                let deadline = after(deadline);
                tokio::spawn(run_call(self.clone(), conv, msg.payload, deadline, rx));
            }
            Ok(Incoming::Signal {
                ttl,
                object,
                method,
                args,
            }) if msg.last => {
                // Fast path, as for calls: unordered signals with a free handler slot start
                // here, and only a handler that waits gets a task.
                if !self.options.ordered_signals && !ttl.is_zero() {
                    if let Some(permit) = self.inline_slot(slot) {
                        if !self.start_signal(object, method, args, Some(last), handlers) {
                            *slot = Some(permit);
                            return;
                        }
                        self.stats.signals_delivered_inline.bump();
                        let mut cx = Context::from_waker(Waker::noop());
                        match Pin::new(&mut CatchUnwind(handlers.signal_mut())).poll(&mut cx) {
                            Poll::Ready(result) => {
                                *slot = Some(permit);
                                self.signal_result(result, object, method);
                            }
                            Poll::Pending => {
                                let handler = CatchUnwind(handlers.take_signal());
                                permit.forget();
                                let (inner, object, method) =
                                    (self.clone(), object.0.to_vec(), method.0.to_vec());
                                tokio::spawn(async move {
                                    let result = handler.await;
                                    inner.handlers.add_permits(1);
                                    inner.signal_result(result, Name(&object), Name(&method));
                                });
                            }
                        }
                        return;
                    }
                }
                let expires = after(ttl);
                self.spawn_signal(run_signal(self.clone(), msg.payload, expires));
            }
            Ok(Incoming::Reliable { .. }) if msg.last => self.on_reliable(msg.payload),
            Ok(Incoming::Ack {
                stream,
                seq,
                status,
            }) if msg.last => {
                self.hooks.on_ack(stream, seq, status);
            }
            Ok(Incoming::Cancel { call }) if msg.last => {
                // Dropping the sender wakes the handler task, which drops the handler.
                lock(&self.inflight).calls.remove(&call);
            }
            Ok(other) => {
                let what = format!("misplaced envelope {other:?}");
                self.protocol_error(conv, open, &what);
            }
            Err(e) => self.protocol_error(conv, open, &e.0),
        }
    }

    /// Finds the object and method of a call and puts its handler in `handlers`, or
    /// returns the failure reply that says why it cannot run.
    fn start_call(
        &self,
        object: Name<'_>,
        method: Name<'_>,
        args: &[u8],
        last: Option<&mut LastObject>,
        handlers: &mut Handlers,
    ) -> Result<(), Payload> {
        let Some(service) = self.lookup_with(object, last) else {
            return Err(wire::encode_failure(
                FailureKind::NoSuchObject,
                &object.to_string(),
            ));
        };
        let dispatch = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            service.__dispatch(method.as_bytes(), args, handlers)
        }));
        if matches!(dispatch, Ok(Dispatch::Signal) | Err(_)) {
            // A handler that will not run: drop it (and what it holds) now.
            handlers.clear();
        }
        match dispatch {
            Ok(Dispatch::Call) => Ok(()),
            Ok(Dispatch::Signal) => {
                let what = format!("`{method}` is a signal: send it, do not call it");
                Err(wire::encode_failure(FailureKind::Protocol, &what))
            }
            Ok(Dispatch::NoSuchMethod) => Err(wire::encode_failure(
                FailureKind::NoSuchMethod,
                &method.to_string(),
            )),
            Ok(Dispatch::BadArguments(what)) => {
                Err(wire::encode_failure(FailureKind::BadArguments, &what))
            }
            Err(panic) => {
                bump(&self.stats.handler_panics);
                let message = crate::service::panic_message(panic.as_ref());
                Err(wire::encode_failure(FailureKind::RemotePanic, &message))
            }
        }
    }

    /// Finds the object and method of a signal and starts its handler; counts and logs why
    /// when it cannot run. The caller counts the delivery.
    fn start_signal(
        &self,
        object: Name<'_>,
        method: Name<'_>,
        args: &[u8],
        last: Option<&mut LastObject>,
        handlers: &mut Handlers,
    ) -> bool {
        let failed = |why: &str| self.signal_failed(object, method, why);
        let Some(service) = self.lookup_with(object, last) else {
            failed("no such object");
            return false;
        };
        let dispatch = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            service.__dispatch(method.as_bytes(), args, handlers)
        }));
        if matches!(dispatch, Ok(Dispatch::Call) | Err(_)) {
            // A handler that will not run: drop it (and what it holds) now.
            handlers.clear();
        }
        match dispatch {
            Ok(Dispatch::Signal) => return true,
            Ok(Dispatch::Call) => failed("the method is a call, not a signal"),
            Ok(Dispatch::NoSuchMethod) => failed("no such method"),
            Ok(Dispatch::BadArguments(what)) => failed(&what),
            Err(_) => {
                bump(&self.stats.handler_panics);
                failed("argument decoding panicked");
            }
        }
        false
    }

    /// Counts and logs a signal that could not be delivered.
    #[cold]
    #[inline(never)]
    fn signal_failed(&self, object: Name<'_>, method: Name<'_>, why: &str) {
        tracing::warn!("chatter-rpc: signal `{object}.{method}` not delivered: {why}");
        bump(&self.stats.signals_failed);
    }

    /// Counts a signal handler that panicked.
    fn signal_result(&self, result: Result<(), String>, object: Name<'_>, method: Name<'_>) {
        if let Err(message) = result {
            bump(&self.stats.handler_panics);
            self.signal_failed(object, method, &format!("handler panicked: {message}"));
        }
    }

    /// The reply for a handler's outcome (its encoded reply, or the message of its panic).
    fn handler_result(&self, result: Result<Payload, String>) -> Payload {
        result.unwrap_or_else(|message| {
            bump(&self.stats.handler_panics);
            wire::encode_failure(FailureKind::RemotePanic, &message)
        })
    }

    fn protocol_error(&self, conv: Conversation, open: bool, what: &str) {
        tracing::warn!("chatter-rpc: protocol error from peer: {what}");
        if open {
            self.reply(conv, wire::encode_failure(FailureKind::Protocol, what));
        }
    }

    fn reply(&self, conv: Conversation, payload: Payload) {
        self.send_soon(payload, SendOptions::new().conversation(conv));
    }

    fn lookup(&self, object: &str) -> Option<Arc<dyn Service>> {
        read(&self.objects).get(object).cloned()
    }

    /// [`lookup`](Self::lookup) of a name as it arrived (not UTF-8: no such object).
    pub(crate) fn lookup_name(&self, object: Name<'_>) -> Option<Arc<dyn Service>> {
        self.lookup(std::str::from_utf8(object.as_bytes()).ok()?)
    }

    /// [`lookup_name`](Self::lookup_name) through the receive task's memo, when there is
    /// one.
    fn lookup_with<'a>(
        &self,
        object: Name<'_>,
        last: Option<&'a mut LastObject>,
    ) -> Option<Found<'a>> {
        let Some(last) = last else {
            return self.lookup_name(object).map(Found::Owned);
        };
        let generation = self.objects_generation.load(Ordering::Acquire);
        let hit = last.generation == generation && last.name.as_bytes() == object.as_bytes();
        if !hit || last.service.is_none() {
            let object = std::str::from_utf8(object.as_bytes()).ok()?;
            let service = self.lookup(object)?;
            last.generation = generation;
            last.name.clear();
            last.name.push_str(object);
            last.service = Some(service);
        }
        last.service.as_deref().map(Found::Memo)
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

/// How a call began: sent (the guard owns its pending slot), or waiting to be sent.
enum Start<'a> {
    Sent(CallGuard<'a>),
    Wait(Pin<Box<dyn Future<Output = Result<Conversation, Outcome>> + Send + 'a>>),
}

/// Tells the callee to cancel a call whose future was dropped.
struct CallGuard<'a> {
    inner: &'a Inner,
    id: u64,
    armed: bool,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.abandon_call(self.id);
        }
    }
}

impl Inner {
    /// The caller of call `id` gave up before taking its outcome: tells the callee to
    /// cancel, and keeps the slot until the reply ends the conversation.
    pub(crate) fn abandon_call(&self, id: u64) {
        let mut pending = lock(&self.pending);
        let closed = pending.closed.is_some();
        let mut slot = match pending.calls.entry(id) {
            Entry::Occupied(slot) => slot,
            // Sent, but the caller's future was dropped before its first poll registered
            // the slot: abandon it as the reply has yet to end the conversation.
            Entry::Vacant(slot) => {
                if !closed {
                    slot.insert(Slot::Abandoned);
                    drop(pending);
                    self.send_soon(wire::encode_cancel(id), SendOptions::new());
                }
                return;
            }
        };
        match slot.get() {
            Slot::Waiting(_) => {
                *slot.get_mut() = Slot::Abandoned;
                drop(pending);
                self.send_soon(wire::encode_cancel(id), SendOptions::new());
            }
            // The outcome arrived but was not taken; the reply may still have to come.
            Slot::Arrived {
                then_abandon: true, ..
            } => *slot.get_mut() = Slot::Abandoned,
            Slot::Arrived { .. } => {
                slot.remove();
            }
            Slot::Abandoned => {}
        }
    }
}

/// How a request is sent: it opens a conversation, passes the turn to the callee and
/// times out at the call's deadline.
fn call_options(deadline: Duration) -> SendOptions {
    SendOptions::new().last(false).timeout(deadline)
}

fn send_failure(e: SendError) -> Outcome {
    match e {
        SendError::Closed(cause) => Outcome::NotSent(cause),
        other => Outcome::Protocol(other.to_string()),
    }
}

/// How many events the receive task takes from the connection at once.
const READ_BATCH: usize = 64;

async fn run_reader(inner: Arc<Inner>) {
    let mut closing = false;
    // Events are taken in batches: one connection lock and one wake-up registration (here
    // and for the shutdown signal) per batch, not per message.
    // Grows with the batches actually seen: an idle connection keeps a small one.
    let mut events = Vec::new();
    let mut last = LastObject::default();
    // Boxes for the handlers run inline, reused from one to the next.
    let mut handlers = Handlers::new();
    let cause = loop {
        let batch = if closing {
            inner.conn.next_events(&mut events, READ_BATCH).await
        } else {
            tokio::select! {
                batch = inner.conn.next_events(&mut events, READ_BATCH) => batch,
                () = inner.shutdown.notified() => {
                    closing = true;
                    let inner = inner.clone();
                    tokio::spawn(async move { inner.close_gracefully().await });
                    continue;
                }
            }
        };
        let full = match batch {
            Ok(n) => n == READ_BATCH,
            Err(ConnectionClosed(cause)) => break cause,
        };
        // A handler slot taken for an inline handler is kept for the next one of the
        // batch (giving a tokio semaphore permit back takes its waiter lock), and given
        // back before waiting for the next batch.
        let mut slot = None;
        // Calls or replies (anything but one-shot messages such as signals) in the batch.
        let mut calls = false;
        for event in events.drain(..) {
            match event {
                Event::Message(msg) => {
                    calls |= !(msg.first && msg.last);
                    inner.on_message(msg, &mut last, &mut slot, &mut handlers);
                }
                Event::Timeout(conv) => inner.on_timeout(conv),
                _ => {}
            }
        }
        drop(slot);
        last.service = None;
        if full && calls {
            // More calls or replies wait. Let the connection's driver write this batch's
            // replies (and the callers woken here send new calls) before handling the
            // rest, so that the other side can work meanwhile: without it, with both
            // sides on their own CPU, a deep pipeline turns into stop-and-go (measured:
            // pipelined calls, split layout, -40%). Signals need no such turn.
            tokio::task::yield_now().await;
        }
    };
    inner.finish(cause);
}

async fn run_call(
    inner: Arc<Inner>,
    conv: Conversation,
    payload: Bytes,
    deadline: Instant,
    mut cancel: oneshot::Receiver<()>,
) {
    let work = async {
        let Ok(Incoming::Call {
            object,
            method,
            args,
            ..
        }) = wire::decode_incoming(&payload)
        else {
            return wire::encode_failure(FailureKind::Protocol, "envelope changed");
        };
        let Ok(_permit) = inner.handlers.acquire().await else {
            return wire::encode_failure(FailureKind::Cancelled, "closing");
        };
        let mut handlers = Handlers::new();
        match inner.start_call(object, method, args, None, &mut handlers) {
            Ok(()) => inner.handler_result(CatchUnwind(handlers.call_mut()).await),
            Err(refusal) => refusal,
        }
    };
    let reply = race_call(work, &mut cancel, deadline).await;
    send_call_reply(&inner, conv, reply).await;
}

/// Continues a call whose handler the fast path started and that did not finish on its
/// first poll; gives its handler slot back when done.
async fn finish_call(
    inner: Arc<Inner>,
    conv: Conversation,
    handler: CatchUnwind<HandlerFuture<Payload>>,
    deadline: Instant,
    mut cancel: oneshot::Receiver<()>,
) {
    let work = async { inner.handler_result(handler.await) };
    let reply = race_call(work, &mut cancel, deadline).await;
    inner.handlers.add_permits(1);
    send_call_reply(&inner, conv, reply).await;
}

/// Runs a call's work until it finishes, is cancelled or passes its deadline.
async fn race_call(
    work: impl Future<Output = Payload>,
    cancel: &mut oneshot::Receiver<()>,
    deadline: Instant,
) -> Payload {
    tokio::select! {
        biased;
        _ = cancel => wire::encode_failure(FailureKind::Cancelled, "cancelled"),
        () = tokio::time::sleep_until(deadline) => {
            wire::encode_failure(FailureKind::DeadlineExceeded, "deadline exceeded")
        }
        reply = work => reply,
    }
}

/// Sends a spawned call's reply and retires the call.
async fn send_call_reply(inner: &Arc<Inner>, conv: Conversation, reply: Payload) {
    lock(&inner.inflight).calls.remove(&conv.first_id());
    let options = SendOptions::new().conversation(conv);
    let sent = match inner.conn.try_send(&reply, options) {
        Err(SendError::WouldBlock) => inner.conn.send_bytes(&reply, options).await,
        other => other,
    };
    if let Err(e) = sent {
        tracing::debug!("chatter-rpc: reply not sent: {e}");
    }
    if inner.active.fetch_sub(1, Ordering::AcqRel) == 1 {
        inner.idle.notify_waiters();
    }
}

async fn run_signal(inner: Arc<Inner>, payload: Bytes, expires: Instant) {
    let Ok(Incoming::Signal {
        object,
        method,
        args,
        ..
    }) = wire::decode_incoming(&payload)
    else {
        return;
    };
    let permit = tokio::time::timeout_at(expires, inner.handlers.acquire()).await;
    let (Ok(Ok(_permit)), false) = (permit, Instant::now() > expires) else {
        bump(&inner.stats.signals_expired_on_arrival);
        return;
    };
    let mut handlers = Handlers::new();
    if inner.start_signal(object, method, args, None, &mut handlers) {
        bump(&inner.stats.signals_delivered);
        let result = CatchUnwind(handlers.signal_mut()).await;
        inner.signal_result(result, object, method);
    }
}

async fn run_outbox(
    conn: Connection,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    queued: Arc<Queued>,
    stats: Arc<Stats>,
    tracked: Arc<Mutex<reliable::Tracked>>,
) {
    while let Some(item) = rx.recv().await {
        let Some(expires) = item.expires else {
            let _ = conn.send_bytes(&item.payload, item.options).await;
            continue;
        };
        let expired = Instant::now() >= expires
            || match tokio::time::timeout_at(expires, conn.send_bytes(&item.payload, item.options))
                .await
            {
                Ok(Ok(_)) => {
                    bump(&stats.signals_sent);
                    false
                }
                Ok(Err(e)) => {
                    tracing::debug!("chatter-rpc: signal not sent: {e}");
                    false
                }
                Err(_) => true,
            };
        if expired {
            bump(&stats.signals_expired);
            lock(&tracked).expired_unsent(&item.payload);
        }
        if queued.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            queued.drained.notify_waiters();
        }
    }
}

/// `now + d`, saturating at a far future instead of overflowing (`d` may come from the
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
    use crate::service::reply_ok;
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
