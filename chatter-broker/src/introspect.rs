//! The broker's own object, `chatter.broker`, as a remote trait ([`BrokerApi`]), and what
//! the broker says about itself: [`BrokerStats`], [`PeerInfo`], and chatter-rpc's
//! `chatter.introspect` (so that `chatter list` and `chatter describe` work against a
//! broker).

use std::sync::OnceLock;

use chatter_rpc::introspect::InterfaceDescription;
use serde::{Deserialize, Serialize};

use crate::{BrokerStats, RegisterError, SlowSubscriber};

/// The broker's own object, served under [`BROKER_OBJECT`](crate::BROKER_OBJECT) on every
/// connection to a broker. The broker answers these calls itself; call them with the
/// generated [`BrokerApiClient`] (publish and subscribe have their own methods on
/// [`Bus`](crate::Bus), since their values are typed by the caller):
///
/// ```
/// use chatter_broker::{Broker, BrokerApiClient, BROKER_OBJECT};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let broker = Broker::listen("tcp://127.0.0.1:0", Default::default()).await?;
/// # let address = &broker.addresses()[0];
/// let bus = chatter_broker::connect(address, "ops").await?;
/// let _temps = bus.subscribe::<f64>("sensors/#").await?;
/// let control = BrokerApiClient::new(&bus, BROKER_OBJECT);
/// let peers = control.peers().await?;
/// assert_eq!(peers[0].name.as_deref(), Some("ops"));
/// assert_eq!(peers[0].subscriptions[0].pattern, "sensors/#");
/// assert_eq!(control.stats().await?.connections, 1);
/// # Ok(()) }
/// ```
#[chatter_rpc::remote]
pub trait BrokerApi {
    /// Registers this connection under `name`; with `take_over`, a connected peer that
    /// holds it is disconnected. Once per connection.
    async fn register(&self, name: String, take_over: bool) -> Result<(), RegisterError>;
    /// Presents a credential for the broker's access control; answers the identity it
    /// stands for (`""` from a broker without access control).
    async fn authenticate(&self, credential: String) -> String;
    /// The broker's counters now.
    async fn stats(&self) -> BrokerStats;
    /// Every connection to the broker, with its name, identity, queues and
    /// subscriptions, sorted by name (unnamed ones last).
    async fn peers(&self) -> Vec<PeerInfo>;
}

/// One connection to a broker ([`BrokerApi::peers`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PeerInfo {
    /// The name it registered, if any.
    pub name: Option<String>,
    /// Its address as the broker sees it.
    pub address: String,
    /// Its identity for the access control, if it has one.
    pub identity: Option<String>,
    /// Messages waiting in the broker for this connection's flow-control credit.
    pub queued: u64,
    /// Conversations relayed through this connection now.
    pub routes: u64,
    /// Its subscriptions.
    pub subscriptions: Vec<SubscriptionInfo>,
}

/// One subscription ([`PeerInfo::subscriptions`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SubscriptionInfo {
    /// Its pattern.
    pub pattern: String,
    /// Its policy for when the subscriber is slow.
    pub policy: SlowSubscriber,
    /// Publications waiting for the subscriber's credit now.
    pub queued: u64,
    /// Their bytes (topic, value and 64 each).
    pub queued_bytes: u64,
    /// Publications delivered so far.
    pub delivered: u64,
    /// Publications dropped so far (policy, expiry).
    pub dropped: u64,
}

/// Stands in for the broker when its description is generated: never served (the broker
/// answers `chatter.broker` at the connection level).
struct Described;

impl BrokerApi for Described {
    async fn register(&self, _: String, _: bool) -> Result<(), RegisterError> {
        Ok(())
    }
    async fn authenticate(&self, _: String) -> String {
        String::new()
    }
    async fn stats(&self) -> BrokerStats {
        BrokerStats::default()
    }
    async fn peers(&self) -> Vec<PeerInfo> {
        Vec::new()
    }
}

/// `chatter.broker`'s description, made once.
pub(crate) fn description() -> Option<&'static InterfaceDescription> {
    static DESCRIPTION: OnceLock<Option<InterfaceDescription>> = OnceLock::new();
    DESCRIPTION
        .get_or_init(|| chatter_rpc::introspect::describe(&BrokerApiServer::new(Described)))
        .as_ref()
}

/// An entry of `chatter.introspect`'s `list` (chatter-rpc's `ObjectSummary`).
#[derive(Serialize)]
pub(crate) struct Summary {
    pub(crate) object: &'static str,
    pub(crate) interface: Option<String>,
    pub(crate) methods: Vec<String>,
}

/// An entry of `chatter.introspect`'s `stats` (chatter-rpc's `PeerCounter`).
#[derive(Serialize)]
pub(crate) struct Counter {
    pub(crate) name: &'static str,
    pub(crate) value: u64,
}

/// `chatter.introspect`'s `describe` error (chatter-rpc's `IntrospectError`).
#[derive(Serialize)]
pub(crate) enum DescribeError {
    NoSuchObject { object: String, known: Vec<String> },
}
