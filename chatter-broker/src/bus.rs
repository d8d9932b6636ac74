//! The client side: [`connect`] to a broker under a name, and [`Bus::peer`] to address
//! the others.

use std::ops::Deref;

use chatter_core::{ConnectError, Options, ToAddress};
use chatter_rpc::{CallError, Peer, PeerOptions};

use crate::api::BrokerApiClient;
use crate::{RegisterError, BROKER_OBJECT};

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
#[derive(Debug, Clone, Default)]
pub struct BusOptions {
    connection: Options,
    peer: PeerOptions,
    take_over: bool,
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
    /// not a chatter broker, …).
    #[error("registering with the broker failed: {0}")]
    Register(CallError<RegisterError>),
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
    Ok(Bus {
        peer: Peer::with_options(conn, options.peer),
    })
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
