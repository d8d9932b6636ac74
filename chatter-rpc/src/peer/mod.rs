//! [`Peer`]: one end of RPC connections. Hosts objects, makes calls, sends signals.
//!
//! A peer is two parts:
//!
//! - [`PeerState`], which exists once per peer: the object registry, options, counters,
//!   the shutdown flag, and (in a [`Queue`] made on first use) the signal outbox with
//!   its store and the event subscribers;
//! - its *link* (`link.rs`), which makes connections: one given connection that never
//!   reconnects ([`Peer::new`]), or a supervisor that connects to an address and
//!   reconnects with backoff ([`Peer::reconnecting`]). For each connection the link makes
//!   an [`Inner`]: the connection, the calls this side waits for, the handlers running
//!   for the other side, and the receive task. It points at the peer's state.
//!
//! The other modules: `calls.rs` (calls this side makes), `signals.rs` (signals this side
//! sends, through the outbox in `outbox.rs`), `serve.rs` and `reliable.rs` (the serving
//! path: what the other side sends), `events.rs`, `options.rs`, `shutdown.rs`.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, Weak};
use std::time::Duration;

use chatter_core::proto::IdBuildHasher;
use chatter_core::{CloseCause, CloseCode, Connection, Options, SendError, SendOptions, ToAddress};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::time::Instant;

use crate::first_inline::FirstInline;
use crate::service::Service;
use crate::store::Store;
use crate::wire::{self, FailureKind, Payload};

mod backlog;
mod calls;
mod dedup;
mod events;
mod link;
mod options;
mod outbox;
mod reliable;
mod serve;
mod shutdown;
mod signals;
mod streams;

use backlog::{Kind, Slots};
pub(crate) use calls::Outcome;
use calls::{Pending, Slot};
use events::Subscribers;
pub use events::{ConnectionState, Events, PeerEvent, EVENTS_KEPT};
pub(crate) use link::random_u64;
use link::Link;
pub use link::{Backoff, ReconnectError, ReconnectOptions};
pub(crate) use options::bump;
use options::Stats;
pub use options::{PeerOptions, PeerStats, WhenFull};
use outbox::{Delivery, Item, Outbox};
pub use outbox::{Sent, SignalId};
use serve::{run_reader, Answer};
pub(crate) use signals::Attempt;

/// One end of RPC connections: hosts objects, makes calls, sends signals.
///
/// A peer hosts objects registered under names ([`register`](Self::register)) and is what
/// generated clients call through (`{Trait}Client::new(&peer, "name")`). Both ends of a
/// connection are peers, so both can host objects and call the other at the same time.
///
/// Its *link* makes its connections:
///
/// - [`Peer::new`] / [`Peer::with_options`] wrap one connection (from
///   [`connect`](crate::connect) or a listener's `accept`). The peer closes with it and
///   never reconnects.
/// - [`Peer::reconnecting`] connects to an address in the background and reconnects
///   after the connection drops, with [`Backoff`]. Calls made while disconnected wait
///   for a connection within their deadline; signals are acknowledged and re-sent after a
///   reconnect. See [`Peer::reconnecting`].
///
/// Everything else is the same for both: registered objects are served on every
/// connection, and the counters ([`stats`](Self::stats)), the signal outbox
/// ([`queued`](Self::queued), [`flush`](Self::flush)), the [`events`](Self::events) and
/// the [`shutdown`](Self::shutdown) belong to the peer, not to one connection.
///
/// `Peer` is cheap to clone. The peer closes when [`close`](Self::close) or
/// [`shutdown`](Self::shutdown) is called, when the last `Peer` clone (and the last
/// client made from it) is dropped, or, for a peer made from a connection, when the other
/// side closes it.
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
///
/// Migrating from `ReconnectingPeer` (chatter-rpc before one `Peer`):
/// `ReconnectingPeer::new(address, options, peer_options, reconnect)` is now
/// [`Peer::reconnecting`] with the same arguments; `ReconnectStats` is part of
/// [`PeerStats`] (its `signals_failed` is [`PeerStats::signals_failed_remotely`]);
/// `ReconnectOptions::outbox_capacity` and `when_full` are [`PeerOptions::max_queued_signals`]
/// and [`PeerOptions::when_full`]; `peer()` is [`connection`](Self::connection);
/// `Peer::flush_signals` is [`flush`](Self::flush); and generated clients take a `&Peer`.
pub struct Peer {
    pub(crate) state: Arc<PeerState>,
    /// The one connection of a peer made from a connection (calls and signals go straight
    /// to it); `None` for a reconnecting peer, whose connections come and go.
    pub(crate) plain: Option<Arc<Inner>>,
    /// The route prefix of a handle made by [`routed`](Self::routed): clients made from
    /// it address `{route}/{object}`. `None` for every other handle.
    route: Option<Arc<str>>,
    /// Counted in [`PeerState::handles`]: the peer closes when the last such handle goes
    /// (see the `Drop`). False on a handle pinned to one connection of a reconnecting
    /// peer ([`pinned`](Self::pinned)), which owns nothing.
    owns: bool,
}

impl Clone for Peer {
    fn clone(&self) -> Self {
        if self.owns {
            // As `Arc::clone`: a new handle is made from one that holds the count up, so
            // the count cannot reach zero meanwhile, and nothing is ordered by it.
            self.state.handles.fetch_add(1, Ordering::Relaxed);
        }
        Peer {
            state: self.state.clone(),
            plain: self.plain.clone(),
            route: self.route.clone(),
            owns: self.owns,
        }
    }
}

/// The last user-held handle closes the peer (its receive task closes a plain peer's
/// connection; a reconnecting peer's supervisor stops). A count in the peer's state
/// rather than a reference-counted owner object: one allocation less per peer, that is
/// per connection a server accepts.
impl Drop for Peer {
    fn drop(&mut self) {
        if !self.owns || self.state.handles.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        if let Some(inner) = &self.plain {
            inner.shutdown.notify_one();
        }
        if let Link::Reconnecting(supervisor) = &self.state.link {
            supervisor.stop();
        }
    }
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("connection", &self.connection())
            .field("state", &self.state())
            .field("objects", &self.objects())
            .field("queued", &self.queued())
            .finish_non_exhaustive()
    }
}

impl Peer {
    /// Wraps a connection with default options. Must be called inside a tokio runtime: it
    /// starts the peer's receive task.
    pub fn new(connection: Connection) -> Self {
        Peer::with_options(connection, PeerOptions::default())
    }

    /// Wraps a connection. Must be called inside a tokio runtime. The peer's link is this
    /// one connection: it never reconnects.
    pub fn with_options(connection: Connection, options: PeerOptions) -> Self {
        Peer::with_setup(connection, options, |_| {})
    }

    /// [`with_options`](Self::with_options), with `setup` run on the peer before its
    /// receive task starts: objects it registers are there for the first message (what
    /// [`serve`](crate::serve) needs; registering after `with_options` returns races the
    /// peer's first messages on a multi-threaded runtime).
    pub(crate) fn with_setup(
        connection: Connection,
        options: PeerOptions,
        setup: impl FnOnce(&Peer),
    ) -> Self {
        Peer::with_setup_and_end(connection, options, setup, None)
    }

    /// [`with_setup`](Self::with_setup), with `on_end` run by the receive task when it
    /// ends (after the connection closed and everything waiting on it was told).
    pub(crate) fn with_setup_and_end(
        connection: Connection,
        options: PeerOptions,
        setup: impl FnOnce(&Peer),
        on_end: Option<OnEnd>,
    ) -> Self {
        let acknowledged = options.acknowledged_signals;
        let stream = if acknowledged {
            link::random_u64() | 1
        } else {
            0
        };
        // No queue yet: it is made when a first signal is queued or events are subscribed.
        // No `start_connection` either: a new outbox's cursor is 0 already, and its `live`
        // is read only by a reconnecting link's sweep.
        let state = Arc::new(PeerState::new(options, Link::Plain, stream, None));
        bump(&state.stats.connects);
        let inner = Inner::new(state.clone(), connection, 1, on_end);
        let peer = Peer::owning(state, Some(inner.clone()));
        setup(&peer);
        // The receive loop runs until the connection closed; it keeps what it needs.
        inner.attach_reader();
        peer
    }

    /// Starts a peer that connects to `address` and stays connected: its link reconnects
    /// after the connection drops, with [`ReconnectOptions::backoff`]. It connects in the
    /// background: this returns at once. Must be called inside a tokio runtime. Fails
    /// only for an address that does not parse (or is `tls://` in a build without the
    /// `tls` feature) or a store that cannot be opened (or, without the `persistence`
    /// feature, any store).
    ///
    /// - **Reconnects** after the connection drops, with [`Backoff`] (exponential, jitter,
    ///   optionally giving up). [`events`](Self::events) and [`state`](Self::state) show
    ///   what happens. Objects [`register`](Self::register)ed on it are served on every
    ///   connection.
    /// - **Calls** through its clients made while disconnected wait for a connection
    ///   within their deadline, then fail with
    ///   [`CallError::NotConnected`](crate::CallError::NotConnected). A call whose request
    ///   was sent but whose reply was lost with the connection fails with
    ///   [`CallError::OutcomeUnknown`](crate::CallError::OutcomeUnknown): calls are sent
    ///   at most once, except methods marked `#[idempotent]`, which are re-sent on the
    ///   next connection (within the deadline).
    /// - **Signals** are always acknowledged: they go through the outbox
    ///   ([`PeerOptions::max_queued_signals`]) in send order and stay there until the
    ///   receiver *acknowledged* them (after the handler finished), so a signal lost in a
    ///   dropped connection is re-sent on the next; the receiver discards duplicates by
    ///   id. A signal whose TTL runs out while it waits is dropped and reported (counter
    ///   and [`PeerEvent::SignalExpired`]); the receiver likewise never starts a handler
    ///   after the TTL. With a [`store`](ReconnectOptions::store), persistent signals
    ///   survive a crash of the process. The returned [`Sent`] can wait for the
    ///   acknowledgement.
    ///
    /// ```
    /// use std::time::Duration;
    /// use chatter_rpc::{listen, remote, serve, Options, Peer, PeerOptions, ReconnectOptions};
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
    /// let peer = Peer::reconnecting(
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
    pub fn reconnecting(
        address: impl ToAddress,
        options: Options,
        peer_options: PeerOptions,
        reconnect: ReconnectOptions,
    ) -> Result<Peer, ReconnectError> {
        let state =
            link::start_reconnecting(address.to_address()?, options, peer_options, reconnect)?;
        Ok(Peer::owning(state, None))
    }

    /// A handle on this same peer whose clients address their object as `{route}/{object}`
    /// instead of `object`: for a broker that relays calls to the peer registered under
    /// the name `route` (chatter-broker's `Bus::peer` makes these). Calls, signals and
    /// streams of clients made from the handle go over this peer's connection as usual;
    /// objects, counters, events and closing are those of this peer. Routes do not nest:
    /// the handle's route replaces this one's.
    ///
    /// Nothing is added per call: the object's name is joined with the route once, when
    /// a client is made (`{Trait}Client::new(&handle, object)`).
    ///
    /// ```
    /// use chatter_rpc::{connect, listen, Options, Peer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = listen("tcp://127.0.0.1:0", Options::default()).await?;
    /// let peer = Peer::new(connect(&server.addresses()[0], Options::default()).await?);
    /// let calc_1 = peer.routed("calc-1");
    /// assert_eq!(calc_1.route(), Some("calc-1"));
    /// assert_eq!(peer.route(), None);
    /// // `CalculatorClient::new(&calc_1, "calc")` calls the object `calc-1/calc`.
    /// # Ok(()) }
    /// ```
    pub fn routed(&self, route: &str) -> Peer {
        let mut handle = self.clone();
        handle.route = Some(route.into());
        handle
    }

    /// The route prefix of a handle made by [`routed`](Self::routed); `None` otherwise.
    pub fn route(&self) -> Option<&str> {
        self.route.as_deref()
    }

    /// Hosts `object` under `name` on every connection of this peer, replacing (and
    /// returning true for) an object already registered under it. Calls already running
    /// on the old object finish. An object registered as `chatter.introspect` takes the
    /// place of the built-in one ([`PeerOptions::introspection`]) while registered.
    pub fn register(&self, name: impl Into<String>, object: impl Service) -> bool {
        let mut objects = write(&self.state.objects);
        let replaced = objects.insert(name.into(), Arc::new(object)).is_some();
        self.state.objects_changed();
        replaced
    }

    /// Stops hosting the object under `name`; returns whether there was one.
    pub fn unregister(&self, name: &str) -> bool {
        let mut objects = write(&self.state.objects);
        let removed = objects.remove(name).is_some();
        self.state.objects_changed();
        removed
    }

    /// The names of the hosted objects, sorted (with the built-in `chatter.introspect`
    /// unless [`PeerOptions::introspection`] is off).
    pub fn objects(&self) -> Vec<String> {
        let objects = read(&self.state.objects);
        let mut names: Vec<String> = objects.keys().cloned().collect();
        if crate::introspect::serves_builtin(&self.state, &objects) {
            names.push(crate::introspect::OBJECT.to_owned());
        }
        drop(objects);
        names.sort();
        names
    }

    /// The current connection (for its addresses or close cause): for a peer made from a
    /// connection, that connection (also once it closed); for a reconnecting peer, the
    /// live one, `None` while disconnected. Do not receive from it: the peer owns the
    /// receive side.
    pub fn connection(&self) -> Option<Connection> {
        self.current().map(|inner| inner.conn.clone())
    }

    /// This peer's options.
    pub fn options(&self) -> &PeerOptions {
        &self.state.options
    }

    /// A snapshot of the peer's counters.
    pub fn stats(&self) -> PeerStats {
        let mut stats = self.state.stats.snapshot();
        if let Some(inner) = self.current() {
            stats.requests_waiting = inner.slots.waiting() as u64;
        }
        stats
    }

    /// Where the peer's link stands now. A peer made from a connection is
    /// [`Connected`](ConnectionState::Connected) until it closes.
    pub fn state(&self) -> ConnectionState {
        match (&self.state.link, &self.plain) {
            (Link::Reconnecting(s), _) => s.current.borrow().state,
            (Link::Plain, Some(inner)) if !inner.conn.is_closed() => ConnectionState::Connected,
            (Link::Plain, _) => ConnectionState::Closed,
        }
    }

    /// Waits until connected (true) or until `timeout` passed or the peer closed (false).
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let Link::Reconnecting(supervisor) = &self.state.link else {
            return self.state() == ConnectionState::Connected;
        };
        let mut current = supervisor.current.subscribe();
        let wait = async {
            current
                .wait_for(|c| {
                    matches!(
                        c.state,
                        ConnectionState::Connected | ConnectionState::Closed
                    )
                })
                .await
                .map(|c| c.state == ConnectionState::Connected)
        };
        matches!(tokio::time::timeout(timeout, wait).await, Ok(Ok(true)))
    }

    /// Subscribes to connection and signal events from now on.
    pub fn events(&self) -> Events {
        self.state.queue().events.subscribe()
    }

    /// Signals in the outbox: waiting for flow-control credit or a connection, or sent and
    /// waiting for their acknowledgement.
    pub fn queued(&self) -> usize {
        self.state.queued.load(Ordering::Acquire)
    }

    /// This peer's signal stream id (the `stream` of its [`SignalId`]s); 0 if its signals
    /// are not acknowledged.
    pub fn stream_id(&self) -> u64 {
        self.state.stream
    }

    /// Waits until the outbox has room for one more signal (signal futures do this
    /// themselves under [`WhenFull::Wait`], the default).
    pub async fn wait_for_room(&self) {
        let state = &self.state;
        let queue = state.queue();
        loop {
            let mut room = pin!(queue.room.notified());
            room.as_mut().enable();
            if state.queued.load(Ordering::Acquire) < state.capacity() {
                return;
            }
            room.await;
        }
    }

    /// Waits until the outbox is empty: every signal accepted so far was handed to the
    /// connection (or, if acknowledged, acknowledged), or dropped because its TTL ran out
    /// or the peer closed.
    pub async fn flush(&self) {
        // Without a queue, nothing was ever queued.
        if let Some(queue) = self.state.queue.get() {
            until_zero(&self.state.queued, &queue.room).await;
        }
    }

    /// Closes now. For a peer made from a connection: running call handlers are
    /// cancelled (their callers get [`CallError::Cancelled`](crate::CallError::Cancelled)),
    /// their replies are sent (for at most 5 s), then the connection closes; calls this
    /// side is waiting for fail with
    /// [`CallError::ConnectionLost`](crate::CallError::ConnectionLost). A reconnecting
    /// peer also stops reconnecting and refuses new calls and signals with "shutting
    /// down"; its queued signals stay stored (with a store) or are dropped and reported.
    pub async fn close(&self) {
        let current = self.current();
        if let Link::Reconnecting(supervisor) = &self.state.link {
            self.state.shutting_down.store(true, Ordering::Release);
            supervisor.stop();
        }
        if let Some(inner) = current {
            inner.close_gracefully().await;
        }
        if let Link::Reconnecting(_) = &self.state.link {
            self.state.finish(None);
        }
    }

    /// Waits until the peer is closed and returns why: the close cause of its connection
    /// (of the last one, for a reconnecting peer; [`CloseCause::Local`] if it never
    /// connected).
    pub async fn closed(&self) -> CloseCause {
        match (&self.state.link, &self.plain) {
            (Link::Reconnecting(supervisor), _) => supervisor.closed().await,
            (Link::Plain, Some(inner)) => inner.conn.closed().await,
            (Link::Plain, None) => CloseCause::Local,
        }
    }

    /// Why a signal cannot be queued: the link is closed for good.
    pub(crate) fn closed_link(&self) -> Option<crate::SignalError> {
        match (&self.state.link, &self.plain) {
            (Link::Reconnecting(supervisor), _) => {
                let current = supervisor.current.borrow();
                (current.state == ConnectionState::Closed)
                    .then(|| crate::SignalError::NotConnected(current.last_error.clone()))
            }
            (Link::Plain, Some(inner)) => inner
                .conn
                .close_cause()
                .map(crate::SignalError::ConnectionLost),
            (Link::Plain, None) => None,
        }
    }

    /// The current connection's part of the peer, if there is one.
    pub(crate) fn current(&self) -> Option<Arc<Inner>> {
        match (&self.state.link, &self.plain) {
            (Link::Reconnecting(_), Some(pinned)) => Some(pinned.clone()),
            (Link::Reconnecting(supervisor), _) => supervisor.current.borrow().inner.clone(),
            (Link::Plain, plain) => plain.clone(),
        }
    }
}

impl Peer {
    /// The first handle of a new peer: it owns the peer (it is counted in `handles`).
    fn owning(state: Arc<PeerState>, plain: Option<Arc<Inner>>) -> Peer {
        state.handles.fetch_add(1, Ordering::Relaxed);
        Peer {
            state,
            plain,
            route: None,
            owns: true,
        }
    }

    /// A handle on a reconnecting peer pinned to one of its connections, for the
    /// [`ReconnectOptions::on_connect`](crate::ReconnectOptions::on_connect) hooks: its
    /// clients' calls go to `inner` (as a plain peer's go to its connection), and it owns
    /// nothing (dropping it closes nothing).
    pub(crate) fn pinned(state: Arc<PeerState>, inner: Arc<Inner>) -> Peer {
        Peer {
            state,
            plain: Some(inner),
            route: None,
            owns: false,
        }
    }

    /// A handle pinned to a connection is for calls: its signals go through the outbox,
    /// as the peer's own.
    pub(crate) fn unpinned(&self) -> Option<Peer> {
        match (&self.state.link, &self.plain) {
            (Link::Reconnecting(_), Some(_)) => {
                let mut handle = self.clone();
                handle.plain = None;
                Some(handle)
            }
            _ => None,
        }
    }
}

/// What a peer has once, whatever its link and however many connections it made.
pub(crate) struct PeerState {
    pub(crate) options: PeerOptions,
    /// Inline first entry: most peers host one object (a server's peer per connection,
    /// each registering the same one), and a one-entry map then allocates no table.
    pub(crate) objects: RwLock<FirstInline<String, Arc<dyn Service>>>,
    /// Bumped whenever `objects` changes; invalidates the receive task's memo.
    pub(crate) objects_generation: AtomicU64,
    pub(crate) stats: Stats,
    /// The user-held handles ([`Peer`]s that own the peer): the last one closes it.
    handles: AtomicUsize,
    pub(crate) link: Link,
    /// Signals are acknowledged (always so on a reconnecting link).
    pub(crate) acknowledged: bool,
    /// The link re-sends what a lost connection did not acknowledge (a reconnecting link).
    pub(crate) resends: bool,
    /// The stream id of acknowledged signals.
    pub(crate) stream: u64,
    /// The outbox and the event subscribers: see [`queue`](Self::queue).
    queue: OnceLock<Box<Queue>>,
    /// How many items the outbox holds (read without its lock by the signal fast path,
    /// `queued` and `flush`; written under it). 0 while there is no queue.
    pub(crate) queued: AtomicUsize,
    /// Set when a graceful shutdown started (or a reconnecting peer was closed): new
    /// outgoing calls and signals fail at once.
    pub(crate) shutting_down: AtomicBool,
    /// Where the peer's tasks start (signals may be sent from outside the runtime).
    pub(crate) runtime: tokio::runtime::Handle,
}

/// What a peer needs only once it queues a signal or someone subscribes to its events:
/// the signal outbox, its wake-ups and store, and the event subscribers. A reconnecting
/// peer has it from the start (its signals always go through the outbox); a peer made
/// from a connection gets it on first use ([`PeerState::queue`]). Boxed and made lazily
/// because most peers made from a connection never use it (their signals go straight to
/// the connection while it has credit, and nobody subscribes to their events): inline it
/// would add 160 bytes to every such peer, that is to every connection a server accepts.
pub(crate) struct Queue {
    pub(crate) outbox: Mutex<Outbox>,
    /// Something was queued, or the connection changed: wakes the sender.
    pub(crate) changed: Notify,
    /// Something left the outbox.
    pub(crate) room: Notify,
    /// Boxed: most peers have none, and inline it would add 120 bytes to every queue.
    pub(crate) store: Option<Box<Mutex<Store>>>,
    pub(crate) events: Subscribers,
}

impl Queue {
    pub(crate) fn new(outbox: Outbox, store: Option<Store>) -> Queue {
        Queue {
            outbox: Mutex::new(outbox),
            changed: Notify::new(),
            room: Notify::new(),
            store: store.map(|store| Box::new(Mutex::new(store))),
            events: Subscribers::default(),
        }
    }
}

impl PeerState {
    /// `queue`: given for a reconnecting peer, `None` (made on first use) for a peer
    /// made from a connection.
    fn new(options: PeerOptions, link: Link, stream: u64, queue: Option<Queue>) -> Self {
        let resends = matches!(link, Link::Reconnecting(_));
        let acknowledged = options.acknowledged_signals || resends;
        let queued = queue
            .as_ref()
            .map_or(0, |queue| lock(&queue.outbox).items.len());
        PeerState {
            resends,
            options,
            objects: RwLock::new(FirstInline::default()),
            objects_generation: AtomicU64::new(0),
            stats: Stats::default(),
            handles: AtomicUsize::new(0),
            link,
            acknowledged,
            stream,
            queued: AtomicUsize::new(queued),
            queue: queue.map(Box::new).map(OnceLock::from).unwrap_or_default(),
            shutting_down: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// The outbox and the event subscribers, made now if this is their first use.
    pub(crate) fn queue(&self) -> &Queue {
        self.queue
            .get_or_init(|| Box::new(Queue::new(Outbox::default(), None)))
    }

    /// Sends `event` to the subscribers (without a queue there are none).
    pub(crate) fn emit(&self, event: PeerEvent) {
        if let Some(queue) = self.queue.get() {
            queue.events.emit(event);
        }
    }

    /// The outbox's capacity.
    pub(crate) fn capacity(&self) -> usize {
        self.options.max_queued_signals
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Invalidates the receive tasks' memos; call after changing `objects`.
    fn objects_changed(&self) {
        self.objects_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The peer closed for good: settle what is left in the outbox (with `lost`, the
    /// cause of a connection that never comes back; without, dropped, and persistent
    /// signals stay in the store), drop the hosted objects (which may hold clients of this
    /// peer), and mark a reconnecting link closed.
    fn finish(&self, lost: Option<&CloseCause>) {
        if let Some(queue) = self.queue.get() {
            self.finish_queue(queue, lost);
        }
        write(&self.objects).clear();
        self.objects_changed();
        if let Link::Reconnecting(supervisor) = &self.link {
            supervisor.closed_for_good();
        }
    }

    /// [`finish`](Self::finish) for the outbox.
    fn finish_queue(&self, queue: &Queue, lost: Option<&CloseCause>) {
        let left: Vec<Item> = {
            let mut outbox = lock(&queue.outbox);
            let left = outbox.items.drain(..).collect();
            self.queued.store(0, Ordering::Release);
            left
        };
        for mut item in left {
            let maybe_delivered = item.maybe_delivered();
            item.settle(match lost {
                Some(cause) => Delivery::Lost(cause.clone()),
                None => Delivery::Dropped { maybe_delivered },
            });
            if item.persistent {
                continue;
            }
            bump(&self.stats.signals_dropped);
            if self.acknowledged {
                queue.events.emit(PeerEvent::SignalDropped {
                    id: self.id(item.seq),
                    maybe_delivered,
                });
            }
        }
        queue.room.notify_waiters();
        queue.changed.notify_waiters();
    }

    /// The receive task of `inner` ended: the connection is gone.
    fn connection_closed(&self, cause: &CloseCause) {
        if let Link::Plain = self.link {
            // A plain link's one connection: the peer is closed.
            self.finish(Some(cause));
            // Without a queue there are no subscribers: no copy of the cause for nobody.
            if let Some(queue) = self.queue.get() {
                queue.events.emit(PeerEvent::Disconnected {
                    cause: cause.clone(),
                });
            }
        }
        // A reconnecting link's supervisor learns it from the receive task's end.
    }
}

/// One connection of a peer: what lives and dies with it.
pub(crate) struct Inner {
    pub(crate) conn: Connection,
    /// The peer this connection belongs to.
    pub(crate) peer: Arc<PeerState>,
    /// Which of the peer's connections this is (from 1).
    pub(crate) generation: u64,
    /// Calls this side made that wait for a reply, by conversation first id.
    pending: Mutex<Pending>,
    /// Call handlers running on this side, by the caller's conversation first id.
    inflight: Mutex<InFlight>,
    /// Set with `inflight.closing` by a close (a graceful shutdown sets
    /// `peer.shutting_down` first): lets the call fast path skip the `inflight` lock.
    closing: AtomicBool,
    /// Set once [`finish`](Self::finish) ran to its end (`pending.closed` is set at its
    /// start): a receive loop that panicked inside it is finished by
    /// [`end_after_a_panic`](Self::end_after_a_panic).
    finished: AtomicBool,
    /// Calls accepted and not answered yet, other than those answered inline (for graceful
    /// close and shutdown).
    active: AtomicUsize,
    idle: Notify,
    /// Handler slots, and the requests waiting for one (`peer/backlog.rs`).
    slots: Slots,
    /// Answers waiting for send credit, each holding its request's credit; the task
    /// starts on first use.
    answers: OnceLock<mpsc::UnboundedSender<Answer>>,
    /// This connection part itself, for the answers task (which must not keep it alive).
    me: Weak<Inner>,
    /// Whether the task that sends this connection the outbox's signals was started.
    sender: OnceLock<()>,
    /// The peer's receive window once it is final (0 before): see
    /// [`peer_window`](Self::peer_window).
    peer_window: AtomicU64,
    /// Asks the receive task to close the connection.
    shutdown: Notify,
    /// This connection's streams, made on the first stream call either way (boxed: most
    /// connections have none).
    pub(super) streams: OnceLock<Box<streams::Streams>>,
    /// Run once by the receive task when it ends (the connection closed and everything
    /// waiting on it was told), or when it panicked or was dropped unfinished (see
    /// `serve::Reader`): [`serve`](crate::serve) forgets the peer then.
    pub(super) on_end: Mutex<Option<OnEnd>>,
    /// The limit on the warnings this connection's messages cause.
    warnings: chatter_core::LogLimit,
}

/// What [`Inner::on_end`] runs.
pub(crate) type OnEnd = crate::server::Forget;

#[derive(Default)]
struct InFlight {
    closing: bool,
    /// Set by a graceful shutdown: new calls are refused with "shutting down".
    shutting_down: bool,
    /// Dropping the sender cancels the handler.
    calls: HashMap<u64, oneshot::Sender<()>, IdBuildHasher>,
}

impl Inner {
    /// The part of `peer` for `connection`, with its receive task started; also returns
    /// the receive task (it ends once the connection closed and everything waiting on it
    /// was told).
    fn start_with_reader(
        peer: Arc<PeerState>,
        connection: Connection,
        generation: u64,
    ) -> (Arc<Inner>, tokio::task::JoinHandle<()>) {
        let inner = Inner::new(peer, connection, generation, None);
        let reader = inner.start_reader();
        (inner, reader)
    }

    /// Starts the receive task: one per connection (connections are bounded by the
    /// server's `max_connections` or by the application that makes them), it ends when the
    /// connection closed. What it holds is bounded by the receive window.
    fn start_reader(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(run_reader(self.clone()))
    }

    /// Starts the receive loop in the connection's own task, beside its driver
    /// ([`Connection::attach`]): no task of its own, and no round of the scheduler between
    /// the driver reading messages and the loop answering them. It ends when the
    /// connection closed; what it holds is bounded by the receive window.
    fn attach_reader(self: &Arc<Self>) {
        self.conn.attach(run_reader(self.clone()));
    }

    /// The part of `peer` for `connection`, its receive task not started yet; `on_end`
    /// for [`Inner::on_end`].
    fn new(
        peer: Arc<PeerState>,
        connection: Connection,
        generation: u64,
        on_end: Option<OnEnd>,
    ) -> Arc<Inner> {
        let shutting_down = peer.is_shutting_down();
        let inner = Arc::new_cyclic(|me| Inner {
            me: me.clone(),
            conn: connection,
            slots: Slots::new(
                peer.options.max_concurrent_handlers,
                peer.options.ordered_signals,
            ),
            answers: OnceLock::new(),
            peer,
            generation,
            pending: Mutex::new(Pending::default()),
            inflight: Mutex::new(InFlight::default()),
            closing: AtomicBool::new(false),
            finished: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            sender: OnceLock::new(),
            peer_window: AtomicU64::new(0),
            shutdown: Notify::new(),
            streams: OnceLock::new(),
            on_end: Mutex::new(on_end),
            warnings: chatter_core::LogLimit::default(),
        });
        if shutting_down {
            // Made during a graceful shutdown: refuse its calls clearly.
            inner.begin_shutdown();
        }
        inner
    }

    async fn close_gracefully(&self) {
        self.begin_close();
        self.finish_close().await;
    }

    /// The rest of a graceful close after [`begin_close`](Self::begin_close): waits (at
    /// most [`CLOSE_GRACE`]) for the cancelled handlers' replies, then closes.
    async fn finish_close(&self) {
        let _ = tokio::time::timeout(CLOSE_GRACE, until_zero(&self.active, &self.idle)).await;
        self.conn.close().await;
    }

    /// Closes now if no call handler runs: starts the connection's close (its end is seen
    /// by whoever receives from it, as any close is) and returns true. Otherwise refuses
    /// new calls and cancels the waiting ones as [`close_gracefully`](Self::close_gracefully)
    /// does, and returns false: the close is then left to
    /// [`finish_close`](Self::finish_close), which waits for the running handlers' replies.
    fn close_if_idle(&self) -> bool {
        self.begin_close();
        // No handler starts once `begin_close` set `closing`, so none can start between
        // this check and the close.
        if self.active.load(Ordering::Acquire) != 0 {
            return false;
        }
        // `close` starts the close when first polled, then waits for the transport to be
        // closed, which nobody needs to see here.
        let close = pin!(self.conn.close());
        let _ = close.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        true
    }

    /// The part of a graceful close that does not wait: new calls are refused, running
    /// handlers cancelled, calls waiting for a handler slot answered as cancelled.
    fn begin_close(&self) {
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
    }

    /// True once a close or a graceful shutdown began: calls are refused.
    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire) || self.peer.is_shutting_down()
    }

    /// The connection closed: fail waiting calls, cancel handlers, and tell the peer.
    fn finish(&self, cause: CloseCause) {
        let mut wakers = Vec::new();
        {
            let mut pending = lock(&self.pending);
            pending.closed = true;
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
        self.close_streams(&cause);
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
        let mut release = 0;
        for item in self.slots.drain(|_| true) {
            // Dropped with the item: `buffered().received` no longer counts its bytes.
            release += u64::from(item.credit);
            match item.kind {
                Kind::Call(_) => self.call_done(),
                Kind::Signal => {
                    tracing::debug!(
                        reason = "connection closed before a handler slot was free",
                        "received signal dropped"
                    );
                    bump(&self.peer.stats.signals_failed);
                }
                Kind::Reliable(admitted) => admitted.abandon(),
                Kind::Duplicate { .. } => {}
            }
        }
        self.conn.release(release);
        self.peer.connection_closed(&cause);
        self.finished.store(true, Ordering::Release);
    }

    /// The receive loop panicked (see `Reader` in `serve.rs`): closes the connection
    /// ([`CloseCode::GoingAway`], which the other side sees) and does what the loop's end
    /// does, so that calls waiting here fail now with the close rather than at their
    /// deadlines.
    pub(super) fn end_after_a_panic(&self) {
        self.conn
            .begin_close(CloseCode::GoingAway, "the RPC receive loop panicked");
        // Unless the loop's end had already done this. Not `pending.closed`, which `finish`
        // sets at its start: a loop that panicked inside `finish` (a subscriber, on the
        // line about a signal left waiting for a handler slot) left the rest undone, the
        // peer's `connection_closed` included. What it did is done again harmlessly.
        if !self.finished.load(Ordering::Acquire) {
            self.finish(self.close_cause());
        }
    }

    /// Why the connection closed, for calls that learn it after [`finish`](Self::finish)
    /// (which is given the same cause: the connection keeps the one it closed with).
    /// [`CloseCause::Local`] if it did not close, which `finish` having run rules out.
    pub(super) fn close_cause(&self) -> CloseCause {
        self.conn.close_cause().unwrap_or(CloseCause::Local)
    }

    /// The peer's receive window ([`Connection::peer_window`]), which outgoing calls and
    /// signals keep part of free for replies (`SendOptions::reserve`). Remembered once it
    /// is final (the peer's hello announced it), so that a send does not take the
    /// connection's lock an extra time for it.
    pub(crate) fn peer_window(&self) -> u64 {
        let known = self.peer_window.load(Ordering::Relaxed);
        if known != 0 {
            return known;
        }
        let window = self.conn.peer_window();
        // Until the hello arrived, the window is the early credit, and may grow.
        if window != u64::from(chatter_core::proto::EARLY_CREDIT) {
            self.peer_window.store(window, Ordering::Relaxed);
        }
        window
    }

    /// Hands a control message (a cancel) to the connection now if it has credit, else to
    /// the queue of answers (which goes ahead of signals waiting for credit).
    pub(crate) fn send_soon(&self, payload: Payload, options: SendOptions) {
        match self.conn.try_send(&payload, options) {
            Err(SendError::WouldBlock) => self.queue_holding(payload, options, 0),
            Err(e) => tracing::debug!(error = %e, "control message dropped"),
            Ok(_) => {}
        }
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

/// The instant `d` from now, capped (`d` may come from the network).
fn after(d: Duration) -> Instant {
    instant_after(Instant::now(), d)
}

/// The instant `d` after `at`, capped (`d` may come from the network).
pub(crate) fn instant_after(at: Instant, d: Duration) -> Instant {
    at.checked_add(d.min(MAX_DURATION))
        .unwrap_or(at + Duration::from_secs(86_400))
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

    fn inner(peer: &Peer) -> &Arc<Inner> {
        peer.plain.as_ref().expect("a plain peer")
    }

    /// Calls `object` through `caller` and returns the value, or the failure kind.
    async fn call(caller: &Peer, object: &str) -> Result<i32, Option<FailureKind>> {
        let request = wire::encode_request(wire::CALL, object, "get", Duration::from_secs(5), &())
            .expect("encode");
        let outcome = inner(caller).call(&request, Duration::from_secs(5)).await;
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
        drop(inner(&caller).call(&request, Duration::from_secs(5)));
        // Replies come in order: once this call's reply is in, so is the dropped one's.
        assert_eq!(call(&caller, "o").await, Ok(7));
        let pending = lock(&inner(&caller).pending);
        assert!(
            pending.calls.is_empty(),
            "{} pending slots left",
            pending.calls.len()
        );
    }
}
