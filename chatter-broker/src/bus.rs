//! The client side: [`connect`] to a broker under a name, and [`Bus::peer`] to address
//! the others.

use std::ops::Deref;
use std::time::Duration;

use chatter_core::{ConnectError, Options, ToAddress};
use chatter_rpc::__private::{ClientCore, Method};
use chatter_rpc::{CallError, Peer, PeerOptions, Sent, SignalError};
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
}

impl std::fmt::Debug for BusOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusOptions")
            .field("connection", &self.connection)
            .field("peer", &self.peer)
            .field("take_over", &self.take_over)
            .field("credential", &self.credential.as_ref().map(|_| "…"))
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
    let take_over = options.take_over;
    let bus = connect_unnamed(address, options).await?;
    match bus.claim(name, take_over).await {
        Ok(()) => Ok(bus),
        Err(e) => {
            bus.close().await;
            Err(e)
        }
    }
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
    let conn = chatter_core::connect(address, options.connection).await?;
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
    /// fine). With `take_over`, a connected peer holding the name is disconnected.
    pub async fn claim(&self, name: &str, take_over: bool) -> Result<(), BusError> {
        let broker = BrokerApiClient::new(&self.peer, BROKER_OBJECT);
        match broker.register(name.to_owned(), take_over).await {
            Ok(()) => Ok(()),
            Err(CallError::App { error, .. }) => Err(BusError::Refused(error)),
            Err(e) => Err(BusError::Register(e)),
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
        let rx = self
            .broker
            .call_stream::<Delivery<T>, SubscribeError, _, ()>(
                &SUBSCRIBE,
                2,
                |w| {
                    w.arg(pattern)?;
                    w.arg(&options)
                },
                None,
            )
            .await?;
        Ok(Subscription::new(pattern.to_owned(), rx))
    }

    /// Presence: every peer registered with the broker now (online), then each one that
    /// registers (online) or whose connection closes (offline), in the broker's order.
    /// The subscription to `$broker/presence/+`.
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
        let broker = ClientCore::new(&peer, BROKER_OBJECT);
        Bus { peer, broker }
    }

    /// The peer itself (also reachable through `Deref`).
    pub fn as_peer(&self) -> &Peer {
        &self.peer
    }
}

impl Deref for Bus {
    type Target = Peer;

    fn deref(&self) -> &Peer {
        &self.peer
    }
}
