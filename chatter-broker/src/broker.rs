//! [`Broker`]: accepts connections, keeps the registry of names, and runs one relay
//! ([`Link`]) per connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chatter_core::{Address, CloseCode, ListenError, Options, Server, ToAddress};
use tokio::task::JoinHandle;

use crate::envelope::ROUTE_SEPARATOR;
use crate::pubsub::{Publication, Topics, PRESENCE_PREFIX};
use crate::relay::{lock, Link};
use crate::{AccessControl, Presence, RegisterError};

/// A broker's settings.
///
/// ```
/// use std::time::Duration;
/// use chatter_broker::BrokerOptions;
/// use chatter_core::Options;
///
/// let options = BrokerOptions::new()
///     .connection(Options::default().receive_window(1 << 20).keepalive(
///         Duration::from_secs(5),
///         Duration::from_secs(5),
///     ))
///     .max_name_len(64);
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    connection: Options,
    max_name_len: usize,
    max_routes_per_peer: usize,
    slow_peer_timeout: Option<Duration>,
    pub(crate) max_topic_len: usize,
    pub(crate) max_subscriptions_per_peer: usize,
    pub(crate) max_subscription_queue: usize,
    pub(crate) max_backpressure_queue: usize,
    pub(crate) access: Option<AccessControl>,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions::new()
    }
}

impl BrokerOptions {
    /// The defaults: chatter-core's default [`Options`] for every connection, names of up
    /// to 255 bytes.
    pub fn new() -> Self {
        BrokerOptions {
            connection: Options::default(),
            max_name_len: 255,
            max_routes_per_peer: 32_768,
            slow_peer_timeout: None,
            max_topic_len: 1024,
            max_subscriptions_per_peer: 64,
            max_subscription_queue: 1 << 20,
            max_backpressure_queue: 16 << 20,
            access: None,
        }
    }

    /// The options of the listener and of every accepted connection. Their
    /// `receive_window` is what the broker holds at most of each peer's input (see the
    /// crate docs for the whole bound), their `max_connections` how many peers it takes.
    pub fn connection(mut self, options: Options) -> Self {
        self.connection = options;
        self
    }

    /// The longest peer name accepted, in bytes (default 255).
    pub fn max_name_len(mut self, bytes: usize) -> Self {
        self.max_name_len = bytes;
        self
    }

    /// The most conversations relayed through one peer's connection at once (default
    /// 32 768): a routed call (or stream) to a peer that has this many is answered
    /// *peer busy* ([`CallError::PeerBusy`](chatter_rpc::CallError::PeerBusy)) instead of
    /// opening one more. Keep it at most the peers' own `max_conversations` (chatter-core's
    /// limit on what the other side may open, 65 536 by default), which a peer enforces by
    /// closing the connection, and at most the `max_conversations` of the broker's own
    /// connections: chatter-core holds the conversations a side opens to that limit too,
    /// and a relayed call beyond it would wait in the peer's queue, ahead of everything
    /// queued for that peer after it.
    pub fn max_routes_per_peer(mut self, routes: usize) -> Self {
        self.max_routes_per_peer = routes;
        self
    }

    /// Disconnect a peer that gives back no flow-control credit for this long while
    /// messages wait for it (default `None`: never). Such a peer holds what waits for it,
    /// and so its senders' windows: a caller that stops reading its replies holds its
    /// callees' windows, and their replies to everyone else wait behind. BUS/RT's policy
    /// (it disconnects a client whose queue is full), with time instead of a queue size.
    /// A callee whose handlers are all busy for longer takes no new requests for as long,
    /// and would be disconnected too: set it above your longest handler.
    pub fn slow_peer_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.slow_peer_timeout = timeout;
        self
    }

    /// The longest topic or subscription pattern accepted, in bytes (default 1024). It
    /// also bounds what a subscription's pattern costs in the broker's topic trie: about
    /// 500 bytes per level no other pattern shares, so up to about 500 × this many bytes
    /// for a pattern of empty levels (docs/SECURITY.md).
    pub fn max_topic_len(mut self, bytes: usize) -> Self {
        self.max_topic_len = bytes;
        self
    }

    /// The most subscriptions one connection may hold at once (default 64); one more is
    /// refused with [`SubscribeError::TooManySubscriptions`](crate::SubscribeError::TooManySubscriptions).
    pub fn max_subscriptions_per_peer(mut self, subscriptions: usize) -> Self {
        self.max_subscriptions_per_peer = subscriptions;
        self
    }

    /// The most bytes a subscription with a drop or end policy may have waiting for its
    /// subscriber (default 1 MiB): a subscriber's
    /// [`SubscribeOptions::queue_bytes`](crate::SubscribeOptions::queue_bytes) is capped to
    /// it. Each waiting publication counts its topic, its value and 64 bytes.
    pub fn max_subscription_queue(mut self, bytes: usize) -> Self {
        self.max_subscription_queue = bytes;
        self
    }

    /// The most bytes of publications that may wait for one subscription with the
    /// [`Backpressure`](crate::SlowSubscriber::Backpressure) policy (default 16 MiB, twice
    /// the default receive window): its publishers are held back by their credit well
    /// before, but credit does not bound the broker's own publications (presence), a
    /// publisher that disconnects and comes back, or the copies of one publication in many
    /// subscriptions. Beyond it the subscription ends ([`StreamError::Lagged`]). Keep it
    /// above the publishers' `receive_window`, or backpressure turns into ending.
    ///
    /// [`StreamError::Lagged`]: chatter_rpc::stream::StreamError::Lagged
    pub fn max_backpressure_queue(mut self, bytes: usize) -> Self {
        self.max_backpressure_queue = bytes;
        self
    }

    /// Restricts what each peer may do, by its identity ([`AccessControl`]). Without it
    /// (the default) every peer may register any free name, call any peer, and publish and
    /// subscribe to any topic.
    pub fn access_control(mut self, access: AccessControl) -> Self {
        self.access = Some(access);
        self
    }

    /// The connections' options (`local.rs`).
    pub(crate) fn connection_options(&self) -> &Options {
        &self.connection
    }
}

/// A snapshot of a broker's counters ([`Broker::stats`]).
///
/// ```
/// use chatter_broker::{Broker, BrokerOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = Broker::listen("tcp://127.0.0.1:0", BrokerOptions::default()).await?;
/// let _bus = chatter_broker::connect(&broker.addresses()[0], "a").await?;
/// let stats = broker.stats();
/// assert_eq!((stats.connections, stats.names), (1, 1));
/// assert_eq!(stats.held_bytes, 0); // nothing waits in the broker
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct BrokerStats {
    /// Connections open now.
    pub connections: u64,
    /// Names registered now.
    pub names: u64,
    /// Flow-control bytes of messages the broker has taken from its connections and not
    /// yet forwarded (or dropped): what it holds of its peers' input. At most the sum of
    /// the connections' `receive_window`s.
    pub held_bytes: u64,
    /// Messages waiting for their destination's credit now (part of `held_bytes`, plus
    /// the broker's own answers).
    pub queued: u64,
    /// Messages forwarded (and answers sent) since the start.
    pub forwarded: u64,
    /// Requests for a name nobody holds.
    pub no_such_peer: u64,
    /// Routed calls refused because their peer had
    /// [`BrokerOptions::max_routes_per_peer`] conversations open.
    pub busy: u64,
    /// Peers disconnected by [`BrokerOptions::slow_peer_timeout`].
    pub slow_peers_closed: u64,
    /// Signals whose TTL ran out while they waited in the broker.
    pub signals_expired: u64,
    /// Messages dropped because their conversation's other side was gone (or, for an
    /// ack, the signal's sender), or that the broker could not route and could not
    /// answer.
    pub discarded: u64,
    /// Subscriptions open now.
    pub subscriptions: u64,
    /// Publications taken (valid topic) since the start.
    pub publications: u64,
    /// Copies of publications delivered to subscribers (handed to their connections).
    pub deliveries: u64,
    /// Copies dropped by a subscription's policy because its subscriber was too slow (an
    /// expired one counts in `signals_expired`).
    pub dropped_deliveries: u64,
    /// Signals sent to a name pattern (`sensor-*`).
    pub broadcasts: u64,
    /// Bytes of publications waiting in subscriptions' queues now (each counts its topic,
    /// its value and 64), for their subscribers' stream credit. A drop or end policy keeps
    /// it under the subscription's `queue_bytes`; `Backpressure` under the publishers'
    /// windows (it is then part of `held_bytes` too).
    pub queued_publication_bytes: u64,
    /// Requests refused by the [`AccessControl`] (calls, signals, registrations,
    /// publications, subscriptions, unknown credentials).
    pub denied: u64,
}

/// A running broker: peers connect to it, register names, and call each other through it.
///
/// ```
/// use chatter_broker::{Broker, BrokerOptions};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = Broker::listen("tcp://127.0.0.1:0", BrokerOptions::default()).await?;
/// let calc = chatter_broker::connect(&broker.addresses()[0], "calc-1").await?;
/// assert_eq!(broker.names(), ["calc-1"]);
/// calc.close().await;
/// broker.close().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Broker {
    state: Arc<BrokerState>,
    server: Arc<Server>,
    accept: JoinHandle<()>,
}

impl Broker {
    /// Listens on `address` (`tcp://`, `unix://`, or `tls://` with a server TLS
    /// configuration in the options) and serves every connection accepted there.
    pub async fn listen(
        address: impl ToAddress,
        options: BrokerOptions,
    ) -> Result<Broker, ListenError> {
        let server = chatter_core::listen(address, options.connection.clone()).await?;
        Ok(Broker::serve(server, options))
    }

    /// Serves the connections `server` accepts (for a listener made some other way). The
    /// connections' options are the server's; `options.connection` is not used.
    pub fn serve(server: Server, options: BrokerOptions) -> Broker {
        let state = Arc::new(BrokerState {
            names: Mutex::default(),
            links: Mutex::default(),
            topics: Mutex::default(),
            options,
            counters: Counters::default(),
        });
        let server = Arc::new(server);
        // One per broker; aborted when the `Broker` is dropped.
        let accept = tokio::spawn({
            let (server, state) = (server.clone(), state.clone());
            async move {
                while let Some(conn) = server.accept().await {
                    let link = Link::new(conn, state.clone());
                    state.counters.connections.fetch_add(1, Ordering::Relaxed);
                    // One per accepted connection: the listener's `max_connections`
                    // (`BrokerOptions::connection`, default 10,000) bounds them, and each
                    // ends with its connection (at the latest `close_linger` after the
                    // close), after failing or cancelling what it relayed.
                    tokio::spawn(link.run());
                }
            }
        });
        Broker {
            state,
            server,
            accept,
        }
    }

    /// The addresses the broker listens on (with the actual port for a port 0).
    pub fn addresses(&self) -> &[Address] {
        self.server.addresses()
    }

    /// The names registered now, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.state.names)
            .keys()
            .map(|n| n.to_string())
            .collect();
        names.sort();
        names
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> BrokerStats {
        self.state.stats()
    }

    /// Stops accepting and closes every connection (code *going away*): their peers'
    /// routed calls fail. Returns when the connections are closed.
    pub async fn close(&self) {
        self.accept.abort();
        self.server.close().await;
    }

    /// The server whose accept path the broker serves (in-process clients are handed to
    /// it: `local.rs`).
    pub(crate) fn server(&self) -> &Server {
        &self.server
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// What the links of one broker share.
#[derive(Debug)]
pub(crate) struct BrokerState {
    names: Mutex<HashMap<Arc<str>, Arc<Link>>>,
    /// Every open connection (registered or not), by address, for introspection.
    links: Mutex<HashMap<usize, Weak<Link>>>,
    /// Every subscription. Locked after `names` when both are.
    pub(crate) topics: Mutex<Topics>,
    pub(crate) options: BrokerOptions,
    pub(crate) counters: Counters,
}

impl BrokerState {
    /// See [`BrokerOptions::slow_peer_timeout`].
    pub(crate) fn slow_peer_timeout(&self) -> Option<Duration> {
        self.options.slow_peer_timeout
    }

    /// See [`BrokerOptions::max_routes_per_peer`].
    pub(crate) fn max_routes_per_peer(&self) -> usize {
        self.options.max_routes_per_peer
    }

    /// The live link registered as `name`.
    pub(crate) fn lookup(&self, name: &str) -> Option<Arc<Link>> {
        lock(&self.names)
            .get(name)
            .filter(|link| !link.is_closed())
            .cloned()
    }

    /// Registers `link` as `name`; with `take_over`, a connected peer holding the name
    /// loses it and is disconnected.
    pub(crate) fn register(
        &self,
        link: &Arc<Link>,
        name: &str,
        take_over: bool,
    ) -> Result<(), RegisterError> {
        self.check_name(name)?;
        let mut names = lock(&self.names);
        let mut own = lock(&link.name);
        if let Some(current) = &*own {
            return if &**current == name {
                Ok(())
            } else {
                Err(RegisterError::AlreadyRegistered {
                    name: current.to_string(),
                })
            };
        }
        let name: Arc<str> = name.into();
        if let Some(holder) = names.get(&name).filter(|l| !l.is_closed()) {
            if !take_over {
                return Err(RegisterError::NameTaken {
                    name: name.to_string(),
                });
            }
            let holder = holder.clone();
            *lock(&holder.name) = None;
            let reason = format!("the name `{name}` was taken over by another connection");
            // At most one per connection that registers (a connection holds one name, and
            // the holder taken over is closed), so `max_connections` bounds these too;
            // each ends within the holder's `close_linger`.
            tokio::spawn(
                async move { holder.conn.close_with(CloseCode::GoingAway, &reason).await },
            );
        }
        let joined = !names.contains_key(&name);
        names.insert(name.clone(), link.clone());
        *own = Some(name.clone());
        drop(own);
        if joined {
            self.announce(&name, true);
        }
        Ok(())
    }

    /// Runs `f` on the registered names, with no name registered or unregistered
    /// meanwhile.
    pub(crate) fn with_names(&self, f: impl FnOnce(&mut dyn Iterator<Item = &str>)) {
        let names = lock(&self.names);
        // Closing links included: their `offline` follows under this lock, so a snapshot
        // that left them out would show an `offline` without its `online`.
        f(&mut names.keys().map(|n| &**n));
    }

    /// The live links whose names match `pattern` (`*` stands for any characters).
    pub(crate) fn matching_names(&self, pattern: &str) -> Vec<Arc<Link>> {
        lock(&self.names)
            .iter()
            .filter(|(n, l)| !l.is_closed() && glob(pattern, n))
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// The presence publication for `name`.
    pub(crate) fn presence(&self, name: &str, online: bool) -> Publication {
        let topic = format!("{PRESENCE_PREFIX}{name}");
        let mut encoded = Vec::with_capacity(topic.len() + 5);
        chatter_msgpack::write_str(&mut encoded, &topic);
        let mut value = Vec::new();
        let presence = Presence {
            peer: name.to_owned(),
            online,
        };
        if chatter_core::codec::encode(&mut value, &presence).is_err() {
            value = vec![0xc0];
        }
        Publication {
            topic: encoded.into(),
            value: value.into(),
            // Presence does not expire: a subscriber that lags loses it by its policy.
            expires: tokio::time::Instant::now() + Duration::from_secs(365 * 24 * 3600),
            held: None,
            acked: None,
        }
    }

    /// Publishes `name`'s presence (called with the names lock held, so that it is
    /// ordered with the snapshot a new presence subscriber gets).
    fn announce(&self, name: &str, online: bool) {
        let topic = format!("{PRESENCE_PREFIX}{name}");
        let mut subs = Vec::new();
        lock(&self.topics).matching(&topic, &mut subs);
        if subs.is_empty() {
            return;
        }
        let publication = self.presence(name, online);
        for sub in subs {
            sub.push(&publication);
        }
    }

    /// Keeps `link` in the list of connections ([`BrokerApi::peers`](crate::BrokerApi::peers)).
    pub(crate) fn opened(&self, link: &Arc<Link>) {
        lock(&self.links).insert(Arc::as_ptr(link) as usize, Arc::downgrade(link));
    }

    /// Every open connection.
    pub(crate) fn links(&self) -> Vec<Arc<Link>> {
        lock(&self.links)
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// The counters now.
    pub(crate) fn stats(&self) -> BrokerStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BrokerStats {
            connections: get(&c.connections),
            names: lock(&self.names).len() as u64,
            held_bytes: get(&c.held_bytes),
            queued: get(&c.queued),
            forwarded: get(&c.forwarded),
            no_such_peer: get(&c.no_such_peer),
            busy: get(&c.busy),
            slow_peers_closed: get(&c.slow_peers_closed),
            signals_expired: get(&c.signals_expired),
            discarded: get(&c.discarded),
            subscriptions: lock(&self.topics).len() as u64,
            publications: get(&c.publications),
            deliveries: get(&c.deliveries),
            dropped_deliveries: get(&c.dropped_deliveries),
            broadcasts: get(&c.broadcasts),
            queued_publication_bytes: get(&c.queued_publications),
            denied: get(&c.denied),
        }
    }

    /// Forgets `link`'s name (if it still holds it).
    pub(crate) fn unregister(&self, link: &Arc<Link>) {
        let mut names = lock(&self.names);
        lock(&self.links).remove(&(Arc::as_ptr(link) as usize));
        let name = lock(&link.name).clone();
        if let Some(name) = name {
            if names.get(&name).is_some_and(|l| Arc::ptr_eq(l, link)) {
                names.remove(&name);
                self.announce(&name, false);
            }
        }
        self.counters.connections.fetch_sub(1, Ordering::Relaxed);
    }

    fn check_name(&self, name: &str) -> Result<(), RegisterError> {
        let invalid = |reason: String| RegisterError::InvalidName {
            name: name.to_owned(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("empty".into()));
        }
        if name.len() > self.options.max_name_len {
            return Err(invalid(format!(
                "{} bytes, over the broker's limit of {}",
                name.len(),
                self.options.max_name_len
            )));
        }
        if name.contains(ROUTE_SEPARATOR) || name.chars().any(char::is_control) {
            return Err(invalid(format!(
                "contains `{ROUTE_SEPARATOR}` or a control character"
            )));
        }
        // A `*` in the peer part of `peer/object` makes a request a broadcast (signals) or
        // a refused call, so a peer registered under such a name could never be called:
        // refuse it rather than let it wait for calls that cannot reach it.
        if name.contains('*') {
            return Err(invalid(
                "contains `*`, which makes `name/object` a name pattern (broadcast)".into(),
            ));
        }
        Ok(())
    }
}

/// The broker's counters ([`BrokerStats`]).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connections: AtomicU64,
    pub(crate) held_bytes: AtomicU64,
    pub(crate) queued: AtomicU64,
    pub(crate) forwarded: AtomicU64,
    pub(crate) no_such_peer: AtomicU64,
    pub(crate) busy: AtomicU64,
    pub(crate) slow_peers_closed: AtomicU64,
    pub(crate) signals_expired: AtomicU64,
    pub(crate) discarded: AtomicU64,
    pub(crate) publications: AtomicU64,
    pub(crate) deliveries: AtomicU64,
    pub(crate) dropped_deliveries: AtomicU64,
    pub(crate) broadcasts: AtomicU64,
    pub(crate) queued_publications: AtomicU64,
    pub(crate) denied: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn held(&self, bytes: u64) {
        self.held_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn released(&self, bytes: u64) {
        self.held_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub(crate) fn add_queued_publications(&self, bytes: u64) {
        self.queued_publications.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn remove_queued_publications(&self, bytes: u64) {
        self.queued_publications.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Whether `name` matches `pattern`, in which `*` stands for any characters (none
/// included).
pub(crate) fn glob(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return pattern == name;
    };
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn name_patterns() {
        assert!(glob("sensor-*", "sensor-1"));
        assert!(glob("sensor-*", "sensor-"));
        assert!(!glob("sensor-*", "sensors"));
        assert!(glob("*", "anything"));
        assert!(glob("*-1", "pump-1"));
        assert!(!glob("*-1", "pump-2"));
        assert!(glob("a*b*c", "a-b-c"));
        assert!(glob("a*b*c", "abc"));
        assert!(!glob("a*b*c", "acb"));
        assert!(!glob("ab*ba", "aba"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
    }
}
