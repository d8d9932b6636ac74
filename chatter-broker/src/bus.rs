//! The client side: [`connect`] to a broker under a name, and [`Bus::peer`] to address
//! the others.

use std::ops::Deref;
use std::time::Duration;

use chatter_core::{ConnectError, Options, ToAddress};
use chatter_rpc::__private::{ClientCore, Method};
use chatter_rpc::stream::Receiver;
use chatter_rpc::{
    CallError, Peer, PeerOptions, ReconnectError, ReconnectOptions, Sent, SignalError,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::introspect::BrokerApiClient;
use crate::subscription::{Delivery, Presence, PublishError, PublishReport, SubscribeError};
use crate::{RegisterError, SubscribeOptions, Subscription, BROKER_OBJECT};

static PUBLISH: Method = Method {
    name: "publish",
    wire: b"\xa7publish",
};
static SUBSCRIBE: Method = Method {
    name: "subscribe",
    wire: b"\xa9subscribe",
};

/// How to connect to a broker ([`connect_with`]).
///
/// ```
/// use chatter_broker::BusOptions;
/// use chatter_rpc::PeerOptions;
///
/// // Evict a stale connection that still holds our name (after a crash, say).
/// let options = BusOptions::new().take_over(true).peer(PeerOptions::default());
/// # let _ = options;
/// ```
#[derive(Clone, Default)]
pub struct BusOptions {
    connection: Options,
    peer: PeerOptions,
    take_over: bool,
    credential: Option<String>,
    local_buffer: Option<usize>,
    reconnect: Option<ReconnectOptions>,
}

impl std::fmt::Debug for BusOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusOptions")
            .field("connection", &self.connection)
            .field("peer", &self.peer)
            .field("take_over", &self.take_over)
            .field("credential", &self.credential.as_ref().map(|_| "…"))
            .field("local_buffer", &self.local_buffer)
            .field("reconnect", &self.reconnect)
            .finish()
    }
}

impl BusOptions {
    /// The defaults: chatter-core's and chatter-rpc's default options, and a name held by
    /// another connected peer is refused.
    pub fn new() -> Self {
        BusOptions::default()
    }

    /// The connection's options (TLS, windows, keepalive, …).
    pub fn connection(mut self, options: Options) -> Self {
        self.connection = options;
        self
    }

    /// The options of the [`Peer`] made on the connection.
    pub fn peer(mut self, options: PeerOptions) -> Self {
        self.peer = options;
        self
    }

    /// Take the name over when another connected peer holds it: the broker disconnects
    /// that peer (its routed calls fail with [`CallError::PeerLost`]) and gives the name
    /// to this one. Off by default: the name is refused with [`RegisterError::NameTaken`].
    pub fn take_over(mut self, yes: bool) -> Self {
        self.take_over = yes;
        self
    }

    /// A credential to present to the broker before anything else, for its access control
    /// ([`AccessControl::credential`](crate::AccessControl::credential)): the connection
    /// then has the identity it stands for. An unknown credential fails the connect with
    /// [`BusError::Authenticate`] ([`CallError::PermissionDenied`]). Send it over TLS only.
    pub fn credential(mut self, token: &str) -> Self {
        self.credential = Some(token.to_owned());
        self
    }

    /// The in-memory pipe of an in-process client
    /// ([`Broker::connect_local_with`](crate::Broker::connect_local_with)): at most this
    /// many bytes wait in each direction (default [`LOCAL_BUFFER`](crate::LOCAL_BUFFER),
    /// 64 KiB), where a socket's kernel buffers would hold them: the broker's process holds
    /// up to twice this per in-process client on top of what it holds per connection
    /// (crate docs, *Memory*). A larger pipe lets a writer run further ahead of its
    /// reader; it was measured no faster for small messages. Not used over a socket.
    pub fn local_buffer(mut self, bytes: usize) -> Self {
        self.local_buffer = Some(bytes.max(1));
        self
    }

    /// The pipe's size for an in-process client (`local.rs`).
    pub(crate) fn local_buffer_bytes(&self) -> usize {
        self.local_buffer.unwrap_or(crate::LOCAL_BUFFER)
    }

    /// The connection's options (`local.rs`).
    pub(crate) fn connection_options(&self) -> &Options {
        &self.connection
    }

    /// Whether the name is to be taken over (`local.rs`).
    pub(crate) fn takes_over(&self) -> bool {
        self.take_over
    }

    /// Stay connected: the bus's peer is a reconnecting one
    /// ([`Peer::reconnecting`](chatter_rpc::Peer::reconnecting)) that connects again after
    /// its connection drops (a broker restart, a network cut), following
    /// `options`' backoff, and **claims its name again on every new connection** before
    /// anything else is sent on it: before queued and stored signals are (re-)sent and
    /// before calls waiting for the connection go out, so a restarted broker knows the
    /// name again before the peer's first message (the [`credential`](Self::credential),
    /// if any, is presented again just before). [`connect_with`] then returns at once,
    /// without waiting for the first connection: [`Bus::wait_connected`](chatter_rpc::Peer::wait_connected)
    /// waits until connected *and* named.
    ///
    /// A name refused on a new connection (most often [`RegisterError::NameTaken`]: the
    /// broker has not yet noticed the old connection dead, which keepalive notices within
    /// its interval + timeout) closes that connection and counts as a failed attempt:
    /// reported as [`PeerEvent::OnConnectFailed`](chatter_rpc::PeerEvent::OnConnectFailed)
    /// and retried after the backoff, or, with [`take_over`](Self::take_over), the stale
    /// holder is disconnected and the name taken at once. Hooks of `options`'
    /// [`on_connect`](ReconnectOptions::on_connect) run after the name is claimed.
    /// Subscriptions ([`Bus::subscribe`], [`Bus::presence`]) subscribe again by themselves,
    /// with the same pattern and options, once a new connection is there: publications
    /// made while disconnected are lost ([`Subscription::recv`] and
    /// [`Subscription::resubscribed`] say how an application learns of the gap).
    /// Not used by in-process clients, whose pipe drops only with the broker.
    ///
    /// ```
    /// use std::time::Duration;
    /// use chatter_broker::{Broker, BusOptions};
    /// use chatter_rpc::{Backoff, ReconnectOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let broker = Broker::listen("tcp://127.0.0.1:0", Default::default()).await?;
    /// # let address = &broker.addresses()[0];
    /// let reconnect = ReconnectOptions::default()
    ///     .backoff(Backoff::exponential(Duration::from_millis(50), Duration::from_secs(5)));
    /// let bus = chatter_broker::connect_with(address, "pump-1", BusOptions::new().reconnect(reconnect)).await?;
    /// assert!(bus.wait_connected(Duration::from_secs(5)).await);
    /// assert_eq!(broker.names(), ["pump-1"]);
    /// # Ok(()) }
    /// ```
    pub fn reconnect(mut self, options: ReconnectOptions) -> Self {
        self.reconnect = Some(options);
        self
    }

    /// Whether the bus is to reconnect ([`reconnect`](Self::reconnect)).
    pub(crate) fn reconnects(&self) -> bool {
        self.reconnect.is_some()
    }

    /// The options of a reconnecting bus, for `reconnect.rs`.
    pub(crate) fn into_reconnecting(self) -> crate::reconnect::Parts {
        crate::reconnect::Parts {
            reconnect: self.reconnect.unwrap_or_default(),
            connection: self.connection,
            peer: self.peer,
            take_over: self.take_over,
            credential: self.credential,
        }
    }
}

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// The connection to the broker could not be opened.
    #[error("cannot connect to the broker: {0}")]
    Connect(#[from] ConnectError),
    /// The broker refused the name.
    #[error("the broker refused the name: {0}")]
    Refused(RegisterError),
    /// Registering failed for another reason (the connection dropped, the other side is
    /// not a chatter broker, the access control does not allow the name, …).
    #[error("registering with the broker failed: {0}")]
    Register(CallError<RegisterError>),
    /// The broker did not take the credential ([`BusOptions::credential`]).
    #[error("the broker refused the credential: {0}")]
    Authenticate(CallError),
    /// A reconnecting bus ([`BusOptions::reconnect`]) could not be started: the address
    /// does not parse, or the signal store cannot be opened.
    #[error("cannot start a reconnecting bus: {0}")]
    Reconnect(#[from] ReconnectError),
}

/// A [`Peer`] connected to a broker: it serves the objects registered on it to every peer
/// of the broker (under its name), and [`peer`](Self::peer) addresses the others.
///
/// Derefs to its [`Peer`], so `bus.register(…)`, `bus.stats()` and `bus.close()` are the
/// peer's.
///
/// ```
/// use chatter_broker::Broker;
/// use chatter_rpc::{remote, CallError};
///
/// #[remote]
/// pub trait Greeter {
///     async fn hello(&self, name: String) -> String;
/// }
/// struct G;
/// impl Greeter for G {
///     async fn hello(&self, name: String) -> String { format!("hello {name}") }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let broker = Broker::listen("tcp://127.0.0.1:0", Default::default()).await?;
/// # let address = &broker.addresses()[0];
/// let server = chatter_broker::connect(address, "greeter-1").await?;
/// server.register("greeter", GreeterServer::new(G));
///
/// let client = chatter_broker::connect(address, "client-7").await?;
/// let greeter = GreeterClient::new(&client.peer("greeter-1"), "greeter");
/// assert_eq!(greeter.hello("you".into()).await?, "hello you");
///
/// let nobody = GreeterClient::new(&client.peer("greeter-9"), "greeter");
/// assert!(matches!(nobody.hello("?".into()).await, Err(CallError::NoSuchPeer { .. })));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Bus {
    peer: Peer,
    /// The broker's own object, for publish and subscribe.
    broker: ClientCore,
    /// The name a reconnecting bus claims on each new connection (`reconnect.rs`); `None`
    /// for a bus on one connection.
    reclaim: Option<std::sync::Arc<crate::reconnect::Reclaim>>,
    /// A reconnecting bus's connections, on which its subscriptions subscribe again
    /// (`reconnect.rs`); `None` for a bus on one connection.
    connections: Option<std::sync::Arc<crate::reconnect::Connections>>,
}

/// Connects to the broker at `address` and registers this peer as `name`, refusing a name
/// another connected peer holds ([`connect_with`] and [`BusOptions::take_over`] to take
/// it over). Objects registered on the returned [`Bus`] are served to the broker's peers
/// under that name.
///
/// Calls may arrive as soon as the name is registered; to have objects in place before,
/// use [`connect_unnamed`], register them, then [`Bus::claim`] the name.
pub async fn connect(address: impl ToAddress, name: &str) -> Result<Bus, BusError> {
    connect_with(address, name, BusOptions::default()).await
}

/// [`connect`] with options.
pub async fn connect_with(
    address: impl ToAddress,
    name: &str,
    options: BusOptions,
) -> Result<Bus, BusError> {
    if options.reconnects() {
        return crate::reconnect::start(address, Some(name), options.into_reconnecting());
    }
    let take_over = options.take_over;
    connect_unnamed(address, options)
        .await?
        .named(name, take_over)
        .await
}

/// Connects to the broker without a name: the peer can call the broker's peers, and
/// serves nothing until it [`claim`](Bus::claim)s a name. Register objects between the
/// two, and no call can find the name before its objects are there:
///
/// ```
/// use chatter_broker::{Broker, BusOptions};
/// use chatter_rpc::remote;
///
/// #[remote]
/// pub trait Clock {
///     async fn now(&self) -> u64;
/// }
/// struct C;
/// impl Clock for C {
///     async fn now(&self) -> u64 { 42 }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let broker = Broker::listen("tcp://127.0.0.1:0", Default::default()).await?;
/// # let address = &broker.addresses()[0];
/// let bus = chatter_broker::connect_unnamed(address, BusOptions::new()).await?;
/// bus.register("clock", ClockServer::new(C));
/// bus.claim("clock-1", false).await?;
/// assert_eq!(broker.names(), ["clock-1"]);
/// # Ok(()) }
/// ```
pub async fn connect_unnamed(
    address: impl ToAddress,
    options: BusOptions,
) -> Result<Bus, BusError> {
    if options.reconnects() {
        return crate::reconnect::start(address, None, options.into_reconnecting());
    }
    let conn = chatter_core::connect(address, options.connection.clone()).await?;
    Bus::on_connection(conn, options).await
}

impl Bus {
    /// A [`Peer`] handle that addresses the peer registered as `name` through the broker:
    /// generated clients made from it (`{Trait}Client::new(&bus.peer(name), object)`)
    /// call `object` on that peer, with deadlines, cancellation, typed errors and signal
    /// TTLs as on a direct connection. A call to a name nobody holds fails at once with
    /// [`CallError::NoSuchPeer`]; one whose callee disconnects before answering, with
    /// [`CallError::PeerLost`].
    pub fn peer(&self, name: &str) -> Peer {
        self.peer.routed(name)
    }

    /// Registers this connection as `name` with the broker (once per connection: a second
    /// name is refused with [`RegisterError::AlreadyRegistered`], the same name again is
    /// fine). With `take_over`, a connected peer holding the name is disconnected. On a
    /// reconnecting bus ([`BusOptions::reconnect`]) the call waits for a connection (within
    /// the peer's default deadline), and a name claimed is claimed again on every new
    /// connection; a claim that fails leaves the name claimed before, if any.
    pub async fn claim(&self, name: &str, take_over: bool) -> Result<(), BusError> {
        match &self.reclaim {
            Some(reclaim) => reclaim.claim(&self.peer, name, take_over).await,
            None => crate::reconnect::register(&self.peer, name, take_over).await,
        }
    }

    /// This bus once it [`claim`](Self::claim)ed `name`; closed if that fails (what
    /// `connect_with` and `Broker::connect_local_with` do after connecting).
    pub(crate) async fn named(self, name: &str, take_over: bool) -> Result<Bus, BusError> {
        match self.claim(name, take_over).await {
            Ok(()) => Ok(self),
            Err(e) => {
                self.close().await;
                Err(e)
            }
        }
    }

    /// Publishes `value` on `topic` (`/`-separated levels, for example `sensors/7/temp`):
    /// every subscription whose pattern matches gets `(topic, value)`, each in the order
    /// the broker took the publications. Fire and forget, as a signal: it is sent with the
    /// peer's default signal TTL ([`publish_ttl`](Self::publish_ttl) to choose one), and a
    /// publication still waiting for a subscriber when its TTL runs out is dropped for
    /// that subscriber. Returns once the publication is on its way (it waits for the
    /// connection's flow control, as a signal does); an invalid topic is dropped by the
    /// broker ([`publish_acked`](Self::publish_acked) says why).
    ///
    /// ```
    /// use chatter_broker::Broker;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let broker = Broker::listen("tcp://127.0.0.1:0", Default::default()).await?;
    /// # let address = &broker.addresses()[0];
    /// let dashboard = chatter_broker::connect(address, "dashboard").await?;
    /// let mut readings = dashboard.subscribe::<f64>("sensors/+/temp").await?;
    ///
    /// let sensor = chatter_broker::connect(address, "sensor-7").await?;
    /// sensor.publish("sensors/7/temp", &21.5).await?;
    ///
    /// let (topic, value) = readings.recv().await.unwrap()?;
    /// assert_eq!((topic.as_str(), value), ("sensors/7/temp", 21.5));
    /// # Ok(()) }
    /// ```
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<Sent, SignalError> {
        self.publish_via(&self.broker, topic, value).await
    }

    /// [`publish`](Self::publish) with a TTL of its own.
    pub async fn publish_ttl<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<Sent, SignalError> {
        self.publish_via(&self.broker.with_ttl(ttl), topic, value)
            .await
    }

    async fn publish_via<T: Serialize + ?Sized>(
        &self,
        broker: &ClientCore,
        topic: &str,
        value: &T,
    ) -> Result<Sent, SignalError> {
        broker
            .signal(&PUBLISH, None, false, 2, |w| {
                w.arg(topic)?;
                w.arg(value)
            })
            .await
    }

    /// Publishes `value` on `topic` and waits until every subscription that matched it
    /// had it delivered (handed to its subscriber's connection) or dropped: the report
    /// says how many matched, how many got it, and who did not. It waits for the slowest
    /// subscriber (bounded by the peer's default deadline), so it is for what matters,
    /// not for a stream of readings.
    ///
    /// ```
    /// use chatter_broker::Broker;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let broker = Broker::listen("tcp://127.0.0.1:0", Default::default()).await?;
    /// # let address = &broker.addresses()[0];
    /// let bus = chatter_broker::connect(address, "controller").await?;
    /// let _alarms = bus.subscribe::<String>("alarms/#").await?;
    /// let report = bus.publish_acked("alarms/boiler", &"overheat").await?;
    /// assert_eq!((report.subscribers, report.delivered), (1, 1));
    /// # Ok(()) }
    /// ```
    pub async fn publish_acked<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<PublishReport, CallError<PublishError>> {
        self.broker
            .call::<PublishReport, PublishError, _>(&PUBLISH, 2, |w| {
                w.arg(topic)?;
                w.arg(value)
            })
            .await
    }

    /// Subscribes to the topics that match `pattern`: `/`-separated levels, where `+`
    /// stands for any one level and a last `#` for any number of levels (none included),
    /// as in MQTT: `sensors/+/temp`, `sensors/#`, `#`. Patterns that begin with a
    /// wildcard do not match the broker's own topics, which begin with `$`
    /// ([`presence`](Self::presence)). Default options: a slow subscriber loses the
    /// oldest publications beyond 256 KiB ([`subscribe_with`](Self::subscribe_with)).
    ///
    /// Values are decoded as `T`; publishers of other shapes on matching topics give
    /// this subscription [`StreamError::BadItem`](chatter_rpc::stream::StreamError::BadItem)
    /// items.
    ///
    /// On a reconnecting bus ([`BusOptions::reconnect`]) the call waits for a connection
    /// (within the peer's default deadline), and the subscription subscribes again after
    /// each reconnect ([`Subscription::recv`]).
    pub async fn subscribe<T: DeserializeOwned + Send + 'static>(
        &self,
        pattern: &str,
    ) -> Result<Subscription<T>, CallError<SubscribeError>> {
        self.subscribe_with(pattern, SubscribeOptions::default())
            .await
    }

    /// [`subscribe`](Self::subscribe) with options: what the broker does when this
    /// subscriber falls behind ([`SlowSubscriber`](crate::SlowSubscriber)) and how much
    /// it keeps for it.
    pub async fn subscribe_with<T: DeserializeOwned + Send + 'static>(
        &self,
        pattern: &str,
        options: SubscribeOptions,
    ) -> Result<Subscription<T>, CallError<SubscribeError>> {
        // Read before the call: the subscription is on this connection or a later one.
        let again = self
            .connections
            .as_ref()
            .map(|c| (c.clone(), c.generation()));
        let rx = subscribe_on(&self.broker, pattern, &options).await?;
        let again = again.map(|(connections, generation)| {
            crate::subscription::Again::new(connections, options, generation)
        });
        Ok(Subscription::new(pattern.to_owned(), rx, again))
    }

    /// Presence: every peer registered with the broker now (online), then each one that
    /// registers (online) or whose connection closes (offline), in the broker's order.
    /// The subscription to `$broker/presence/+`. On a reconnecting bus it subscribes again
    /// after a reconnect and begins again with a snapshot of who is online: the first item
    /// `recv` returns once [`Subscription::resubscribed`] grew is the snapshot's first.
    /// Forget who was online before then: peers that left during the gap are not told as
    /// offline.
    ///
    /// ```
    /// use chatter_broker::Broker;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let broker = Broker::listen("tcp://127.0.0.1:0", Default::default()).await?;
    /// # let address = &broker.addresses()[0];
    /// let monitor = chatter_broker::connect(address, "monitor").await?;
    /// let mut presence = monitor.presence().await?;
    /// let (_, me) = presence.recv().await.unwrap()?;
    /// assert_eq!((me.peer.as_str(), me.online), ("monitor", true));
    ///
    /// let pump = chatter_broker::connect(address, "pump-1").await?;
    /// assert_eq!(presence.recv().await.unwrap()?.1.peer, "pump-1");
    /// pump.close().await;
    /// let (_, gone) = presence.recv().await.unwrap()?;
    /// assert_eq!((gone.peer.as_str(), gone.online), ("pump-1", false));
    /// # Ok(()) }
    /// ```
    pub async fn presence(&self) -> Result<Subscription<Presence>, CallError<SubscribeError>> {
        self.subscribe_with("$broker/presence/+", SubscribeOptions::default())
            .await
    }

    fn from_peer(peer: Peer) -> Bus {
        Bus::reconnecting_or_not(peer, None)
    }

    /// The peer itself (also reachable through `Deref`).
    pub fn as_peer(&self) -> &Peer {
        &self.peer
    }

    /// A bus on `conn`, a new connection to a broker (a socket's, or an in-process pipe's:
    /// `local.rs`), authenticated with the options' credential.
    pub(crate) async fn on_connection(
        conn: chatter_core::Connection,
        options: BusOptions,
    ) -> Result<Bus, BusError> {
        let bus = Bus::from_peer(Peer::with_options(conn, options.peer));
        if let Some(token) = options.credential {
            let broker = BrokerApiClient::new(&bus.peer, BROKER_OBJECT);
            if let Err(e) = broker.authenticate(token).await {
                bus.close().await;
                return Err(BusError::Authenticate(e));
            }
        }
        Ok(bus)
    }

    /// A reconnecting bus on `peer`, which claims `reclaim`'s name on each connection
    /// (`reconnect.rs`).
    pub(crate) fn reconnecting(
        peer: Peer,
        reclaim: std::sync::Arc<crate::reconnect::Reclaim>,
        connections: std::sync::Arc<crate::reconnect::Connections>,
    ) -> Bus {
        let mut bus = Bus::reconnecting_or_not(peer, Some(reclaim));
        bus.connections = Some(connections);
        bus
    }

    fn reconnecting_or_not(
        peer: Peer,
        reclaim: Option<std::sync::Arc<crate::reconnect::Reclaim>>,
    ) -> Bus {
        let broker = ClientCore::new(&peer, BROKER_OBJECT);
        Bus {
            peer,
            broker,
            reclaim,
            connections: None,
        }
    }
}

/// The broker's `subscribe(pattern, options)` through `broker` (the bus's client, or one
/// pinned to a new connection, for a subscription subscribing again).
pub(crate) async fn subscribe_on<T: DeserializeOwned + Send + 'static>(
    broker: &ClientCore,
    pattern: &str,
    options: &SubscribeOptions,
) -> Result<Receiver<Delivery<T>>, CallError<SubscribeError>> {
    broker
        .call_stream::<Delivery<T>, SubscribeError, _, ()>(
            &SUBSCRIBE,
            2,
            |w| {
                w.arg(pattern)?;
                w.arg(options)
            },
            None,
        )
        .await
}

impl Deref for Bus {
    type Target = Peer;

    fn deref(&self) -> &Peer {
        &self.peer
    }
}
