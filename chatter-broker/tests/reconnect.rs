//! Reconnecting buses (`BusOptions::reconnect`): the name is claimed again on every new
//! connection before anything else goes out on it, across a broker restart on the same
//! address, a dropped connection, and a name still held by someone else; subscriptions
//! subscribe again by themselves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chatter_broker::{
    Broker, BrokerOptions, Bus, BusError, BusOptions, RegisterError, Subscription,
};
use chatter_core::Address;
use chatter_rpc::stream::StreamError;
use chatter_rpc::{
    remote, Backoff, CallError, ConnectionState, Events, PeerEvent, ReconnectOptions,
};
use tokio::sync::mpsc;

#[remote]
pub trait Desk {
    async fn add(&self, a: i64, b: i64) -> i64;
    #[signal(ttl = "30s")]
    async fn note(&self, text: String);
}

struct D(mpsc::UnboundedSender<String>);

impl Desk for D {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }
    async fn note(&self, text: String) {
        let _ = self.0.send(text);
    }
}

/// A broker on a TCP port of its own, and its address.
async fn tcp_broker() -> (Broker, Address) {
    let broker = Broker::listen("tcp://127.0.0.1:0", BrokerOptions::default())
        .await
        .expect("listen");
    let address = broker.addresses()[0].clone();
    (broker, address)
}

/// A new peer calls `name`'s desk through the broker at `address`: `a + b` comes back.
async fn assert_reaches(address: &Address, name: &str, a: i64, b: i64) {
    let caller = chatter_broker::connect(address, "app")
        .await
        .expect("caller");
    let desk = DeskClient::new(&caller.peer(name), "desk");
    assert_eq!(
        within(desk.add(a, b)).await.expect("reaches the bus"),
        a + b
    );
}

/// A desk, and what its `note`s receive. Unbounded: one message per note the test sends.
fn desk() -> (DeskServer<D>, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (DeskServer::new(D(tx)), rx)
}

fn fast() -> ReconnectOptions {
    let backoff =
        Backoff::exponential(Duration::from_millis(5), Duration::from_millis(50)).jitter(0.0);
    ReconnectOptions::default().backoff(backoff)
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("in time")
}

/// The next event that `pick` recognises, skipping others (failing on a give-up).
async fn next<T>(events: &mut Events, mut pick: impl FnMut(&PeerEvent) -> Option<T>) -> T {
    within(async {
        loop {
            let event = events.next().await.expect("the peer is alive");
            if let Some(found) = pick(&event) {
                return found;
            }
            if let PeerEvent::GaveUp { last_error } = event {
                panic!("gave up: {last_error}");
            }
        }
    })
    .await
}

fn connected(event: &PeerEvent) -> Option<()> {
    matches!(event, PeerEvent::Connected { .. }).then_some(())
}

fn disconnected(event: &PeerEvent) -> Option<()> {
    matches!(event, PeerEvent::Disconnected { .. }).then_some(())
}

/// A Unix socket path of its own for each test.
fn socket_path(test: &str) -> std::path::PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "chatter-reconnect-{}-{test}-{n}.sock",
        std::process::id()
    ))
}

/// The bus sends a signal and a call to itself, by name, while the broker is down. Both go
/// out on the new connection only after the name is claimed there, so both arrive: with
/// the name claimed later, the broker would answer *no such peer*.
#[tokio::test]
async fn a_broker_restarted_on_the_same_unix_path_gets_the_name_back_before_anything_else() {
    let path = socket_path("restart");
    let address = Address::Unix { path: path.clone() };
    let broker = Broker::listen(&address, BrokerOptions::default())
        .await
        .expect("listen");
    let bus = chatter_broker::connect_unnamed(&address, BusOptions::new().reconnect(fast()))
        .await
        .expect("starts");
    let (server, mut notes) = desk();
    bus.register("desk", server);
    within(bus.claim("x", false)).await.expect("claims");
    assert_eq!(broker.names(), ["x"]);
    let me = DeskClient::new(&bus.peer("x"), "desk");
    assert_eq!(within(me.add(2, 3)).await.expect("call to itself"), 5);

    let mut events = bus.events();
    broker.close().await;
    next(&mut events, disconnected).await;
    assert_ne!(bus.state(), ConnectionState::Connected);
    // While the broker is down: a signal waits in the outbox, a call for a connection.
    drop(within(me.note("queued".into())).await.expect("queued"));
    // One task, for the call that waits for the connection.
    let call = tokio::spawn({
        let me = me.clone();
        async move { me.add(1, 1).await }
    });

    let broker = Broker::listen(&address, BrokerOptions::default())
        .await
        .expect("listen again");
    next(&mut events, connected).await;
    // Connected means named: the hook ran first.
    assert_eq!(broker.names(), ["x"]);
    assert_eq!(
        within(call).await.expect("task").expect("the waiting call"),
        2
    );
    assert_eq!(within(notes.recv()).await.as_deref(), Some("queued"));
    assert_eq!(broker.stats().no_such_peer, 0);
    bus.close().await;
    broker.close().await;
    let _ = std::fs::remove_file(&path);
}

/// Two reconnecting buses on a fixed TCP port: after the restart each finds the other by
/// name again.
#[tokio::test]
async fn two_reconnecting_buses_find_each_other_after_a_restart_on_the_same_port() {
    let (broker, address) = tcp_broker().await;
    let mut buses = Vec::new();
    let mut all_events = Vec::new();
    for name in ["calc-1", "app"] {
        let bus = chatter_broker::connect_with(&address, name, BusOptions::new().reconnect(fast()))
            .await
            .expect("starts");
        bus.register("desk", desk().0);
        assert!(bus.wait_connected(Duration::from_secs(20)).await);
        all_events.push(bus.events());
        buses.push(bus);
    }
    assert_eq!(broker.names(), ["app", "calc-1"]);
    broker.close().await;
    for events in &mut all_events {
        next(events, disconnected).await;
    }
    let broker = Broker::listen(&address, BrokerOptions::default())
        .await
        .expect("the same port again");
    for events in &mut all_events {
        next(events, connected).await;
    }
    assert_eq!(broker.names(), ["app", "calc-1"]);
    let (calc, app) = (&buses[0], &buses[1]);
    let to_calc = DeskClient::new(&app.peer("calc-1"), "desk");
    assert_eq!(within(to_calc.add(20, 22)).await.expect("app → calc-1"), 42);
    let to_app = DeskClient::new(&calc.peer("app"), "desk");
    assert_eq!(within(to_app.add(1, 2)).await.expect("calc-1 → app"), 3);
    for bus in &buses {
        bus.close().await;
    }
}

/// A dropped connection (the broker stays up): the bus reconnects and claims its name
/// again; a claim the broker refused is not what it claims.
#[tokio::test]
async fn a_dropped_connection_reconnects_under_the_same_name() {
    let (broker, address) = tcp_broker().await;
    let bus = chatter_broker::connect_with(&address, "pump-1", BusOptions::new().reconnect(fast()))
        .await
        .expect("starts");
    bus.register("desk", desk().0);
    assert!(bus.wait_connected(Duration::from_secs(20)).await);
    match within(bus.claim("pump-2", false)).await {
        Err(BusError::Refused(RegisterError::AlreadyRegistered { name })) => {
            assert_eq!(name, "pump-1")
        }
        other => panic!("expected AlreadyRegistered, got {other:?}"),
    }
    let mut events = bus.events();
    bus.connection().expect("connected").close().await;
    next(&mut events, disconnected).await;
    next(&mut events, connected).await;
    assert_eq!(broker.names(), ["pump-1"]);
    assert_reaches(&address, "pump-1", 1, 1).await;
    bus.close().await;
}

/// A name someone else holds when the bus reconnects: the attempt fails clearly and is
/// retried, and the bus gets its name once the holder is gone.
#[tokio::test]
async fn a_name_held_at_reconnect_is_reported_and_retried_until_free() {
    let (broker, address) = tcp_broker().await;
    let bus = chatter_broker::connect_with(&address, "calc-1", BusOptions::new().reconnect(fast()))
        .await
        .expect("starts");
    let (server, _notes) = desk();
    bus.register("desk", server);
    assert!(bus.wait_connected(Duration::from_secs(20)).await);
    let mut events = bus.events();
    // Someone takes the name over: the broker disconnects the bus, which reconnects and
    // finds its name taken.
    let squatter =
        chatter_broker::connect_with(&address, "calc-1", BusOptions::new().take_over(true))
            .await
            .expect("takes over");
    next(&mut events, disconnected).await;
    let error = next(&mut events, |e| match e {
        PeerEvent::OnConnectFailed { error, .. } => Some(error.clone()),
        _ => None,
    })
    .await;
    assert!(
        error.contains("the name `calc-1` is held by another connected peer"),
        "{error}"
    );
    let last_error = next(&mut events, |e| match e {
        PeerEvent::Reconnecting { last_error, .. } => Some(last_error.clone()),
        _ => None,
    })
    .await;
    assert!(last_error.contains("is held by another"), "{last_error}");
    assert_eq!(broker.names(), ["calc-1"]);
    squatter.close().await;
    next(&mut events, connected).await;
    assert_eq!(broker.names(), ["calc-1"]);
    assert_reaches(&address, "calc-1", 3, 4).await;
    bus.close().await;
}

/// With `take_over`, a reconnecting bus evicts whoever holds its name.
#[tokio::test]
async fn a_reconnecting_bus_with_take_over_evicts_the_holder() {
    let (broker, address) = tcp_broker().await;
    let options = BusOptions::new().take_over(true).reconnect(fast());
    let bus = chatter_broker::connect_with(&address, "calc-1", options)
        .await
        .expect("starts");
    assert!(bus.wait_connected(Duration::from_secs(20)).await);
    let mut events = bus.events();
    let squatter =
        chatter_broker::connect_with(&address, "calc-1", BusOptions::new().take_over(true))
            .await
            .expect("takes over");
    next(&mut events, disconnected).await;
    next(&mut events, connected).await;
    let cause = within(squatter.closed()).await;
    assert!(cause.to_string().contains("taken over"), "{cause}");
    assert_eq!(broker.names(), ["calc-1"]);
    bus.close().await;
}

/// The reconnect policy applies to refusals: after `max_attempts` refused names, the bus
/// gives up, with the refusal as its last error.
#[tokio::test]
async fn a_name_refused_on_every_attempt_gives_up_as_the_backoff_says() {
    let (_broker, address) = tcp_broker().await;
    let _holder = chatter_broker::connect(&address, "calc-1")
        .await
        .expect("holder");
    let reconnect = ReconnectOptions::default().backoff(
        Backoff::exponential(Duration::from_millis(5), Duration::from_millis(5)).max_attempts(2),
    );
    let bus =
        chatter_broker::connect_with(&address, "calc-1", BusOptions::new().reconnect(reconnect))
            .await
            .expect("starts");
    let mut events = bus.events();
    let last_error = within(async {
        loop {
            if let Some(PeerEvent::GaveUp { last_error }) = events.next().await {
                break last_error;
            }
        }
    })
    .await;
    assert!(last_error.contains("is held by another"), "{last_error}");
    within(bus.closed()).await;
    assert_eq!(bus.state(), ConnectionState::Closed);
    // A call on it fails at once, as on any closed reconnecting peer.
    let calc = DeskClient::new(&bus.peer("calc-1"), "desk");
    assert!(matches!(
        within(calc.add(1, 1)).await,
        Err(CallError::NotConnected { .. })
    ));
}

/// An invalid address is refused when the bus is made.
#[tokio::test]
async fn a_reconnecting_bus_refuses_a_bad_address_at_once() {
    match chatter_broker::connect_with("nonsense", "x", BusOptions::new().reconnect(fast())).await {
        Err(BusError::Reconnect(_)) => {}
        other => panic!("expected a reconnect error, got {other:?}"),
    }
    let _ = Bus::clone;
}

/// Under access control, a reconnecting bus presents its credential again on each new
/// connection before it claims its name: a restarted broker knows who it is first.
#[tokio::test]
async fn a_reconnecting_bus_presents_its_credential_again_before_its_name() {
    use chatter_broker::{AccessControl, Rules};
    let access = || {
        AccessControl::new()
            .credential("sensor-token", "sensors")
            .identity("sensors", Rules::none().register("sensor-*"))
    };
    let path = socket_path("credential");
    let address = Address::Unix { path: path.clone() };
    let options = || BrokerOptions::new().access_control(access());
    let broker = Broker::listen(&address, options()).await.expect("listen");
    let bus = chatter_broker::connect_with(
        &address,
        "sensor-1",
        BusOptions::new()
            .credential("sensor-token")
            .reconnect(fast()),
    )
    .await
    .expect("starts");
    assert!(bus.wait_connected(Duration::from_secs(20)).await);
    assert_eq!(broker.names(), ["sensor-1"]);
    let mut events = bus.events();
    broker.close().await;
    next(&mut events, disconnected).await;
    let broker = Broker::listen(&address, options())
        .await
        .expect("listen again");
    next(&mut events, connected).await;
    assert_eq!(broker.names(), ["sensor-1"]);
    bus.close().await;
    broker.close().await;
    let _ = std::fs::remove_file(&path);
}

/// A subscriber on a Unix path for the subscription tests: a broker, and a reconnecting
/// bus named `watcher` on it, connected.
async fn watcher(test: &str) -> (std::path::PathBuf, Address, Broker, Bus) {
    let path = socket_path(test);
    let address = Address::Unix { path: path.clone() };
    let broker = Broker::listen(&address, BrokerOptions::default())
        .await
        .expect("listen");
    let bus =
        chatter_broker::connect_with(&address, "watcher", BusOptions::new().reconnect(fast()))
            .await
            .expect("starts");
    assert!(bus.wait_connected(Duration::from_secs(20)).await);
    (path, address, broker, bus)
}

/// Publishes 2, 3, … on `counts/b` from `publisher` (each acknowledged by the broker)
/// until `readings` has an item: the first publication of the new subscription, whenever
/// it began. No sleep: the publications are what the subscriber waits for. Returns the
/// item, and the number whose publication was on its way when it came (dropped then: it
/// may or may not have reached the broker).
async fn publish_until_received(
    publisher: &Bus,
    readings: &mut Subscription<u32>,
) -> (String, u32, u32) {
    within(async {
        let recv = readings.recv();
        tokio::pin!(recv);
        let mut n = 2u32;
        loop {
            tokio::select! {
                item = &mut recv => {
                    let (topic, value) = item.expect("open").expect("an item");
                    return (topic, value, n);
                }
                report = publisher.publish_acked("counts/b", &n) => {
                    report.expect("published");
                    n += 1;
                }
            }
        }
    })
    .await
}

/// A subscription of a reconnecting bus outlives a broker restart: `recv` does not end
/// while the bus reconnects, subscribes again on the new connection with the same
/// pattern, counts it, and goes on in publish order, without the application
/// subscribing again.
#[tokio::test]
async fn a_reconnecting_buses_subscription_subscribes_again_after_a_broker_restart() {
    let (path, address, broker, bus) = watcher("subscribe").await;
    let mut readings = within(bus.subscribe::<u32>("counts/#"))
        .await
        .expect("subscribes");
    within(bus.publish("counts/a", &1u32))
        .await
        .expect("published");
    let (topic, value) = within(readings.recv()).await.expect("open").expect("item");
    assert_eq!((topic.as_str(), value), ("counts/a", 1));
    assert_eq!(readings.resubscribed(), 0);

    let mut events = bus.events();
    broker.close().await;
    next(&mut events, disconnected).await;
    // While the broker is down, `recv` waits (it does not end with `ConnectionLost`); a
    // `recv` dropped while it waits leaves the next one to go on.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), readings.recv())
            .await
            .is_err(),
        "recv returned while the broker was down"
    );
    let broker = Broker::listen(&address, BrokerOptions::default())
        .await
        .expect("listen again");
    next(&mut events, connected).await;
    let publisher = chatter_broker::connect(&address, "counter")
        .await
        .expect("publisher");
    let (topic, first, sent) = publish_until_received(&publisher, &mut readings).await;
    assert_eq!(topic, "counts/b");
    // `sent` itself, when its publication was on its way as the item came.
    assert!((2..=sent).contains(&first), "{first} not in 2..={sent}");
    assert_eq!(readings.resubscribed(), 1);
    assert_eq!(readings.missed(), 0);
    // In order, from the new subscription on: every later publication, none lost (but
    // `sent`, whose acknowledged publication was dropped when the first item came, may
    // or may not have reached the broker).
    let last = sent + 20;
    for n in sent + 1..=last {
        within(publisher.publish("counts/b", &n))
            .await
            .expect("published");
    }
    let mut expected = first + 1;
    while expected <= last {
        let (_, value) = within(readings.recv()).await.expect("open").expect("item");
        assert!(
            value == expected || (expected == sent && value == sent + 1),
            "got {value}, expected {expected}"
        );
        expected = value + 1;
    }
    assert_eq!(broker.stats().subscriptions, 1);
    assert_eq!(readings.resubscribed(), 1);
    bus.close().await;
    broker.close().await;
    let _ = std::fs::remove_file(&path);
}

/// Presence subscribes again too, and begins again with a fresh snapshot of who is online
/// at the new broker: the bus itself (named again before it subscribes), then newcomers.
#[tokio::test]
async fn presence_subscribes_again_with_a_fresh_snapshot_after_a_restart() {
    let (path, address, broker, bus) = watcher("presence").await;
    let mut presence = within(bus.presence()).await.expect("subscribes");
    let (_, me) = within(presence.recv()).await.expect("open").expect("item");
    assert_eq!((me.peer.as_str(), me.online), ("watcher", true));

    let mut events = bus.events();
    broker.close().await;
    next(&mut events, disconnected).await;
    let broker = Broker::listen(&address, BrokerOptions::default())
        .await
        .expect("listen again");
    // The old broker may have told of departures before it closed: those come before the
    // gap. The first item after it is the new snapshot's.
    let first = within(async {
        loop {
            let (_, p) = presence.recv().await.expect("open").expect("item");
            if presence.resubscribed() > 0 {
                break p;
            }
        }
    })
    .await;
    assert_eq!((first.peer.as_str(), first.online), ("watcher", true));
    assert_eq!(presence.resubscribed(), 1);
    let pump = chatter_broker::connect(&address, "pump-2")
        .await
        .expect("pump");
    let (_, joined) = within(presence.recv()).await.expect("open").expect("item");
    assert_eq!((joined.peer.as_str(), joined.online), ("pump-2", true));
    pump.close().await;
    let (_, left) = within(presence.recv()).await.expect("open").expect("item");
    assert_eq!((left.peer.as_str(), left.online), ("pump-2", false));
    bus.close().await;
    broker.close().await;
    let _ = std::fs::remove_file(&path);
}

/// A bus that does not reconnect keeps the old behaviour: its subscription ends with
/// `ConnectionLost` when the broker goes away, then `None`.
#[tokio::test]
async fn a_plain_buses_subscription_still_ends_with_connection_lost() {
    let (broker, address) = tcp_broker().await;
    let bus = chatter_broker::connect(&address, "plain")
        .await
        .expect("connects");
    let mut readings = within(bus.subscribe::<u32>("counts/#"))
        .await
        .expect("subscribes");
    broker.close().await;
    match within(readings.recv()).await {
        Some(Err(StreamError::ConnectionLost(_))) => {}
        other => panic!("expected ConnectionLost, got {other:?}"),
    }
    assert!(within(readings.recv()).await.is_none());
    assert_eq!(readings.resubscribed(), 0);
}

/// A broker that refuses the subscription on the new connection (here: a restarted
/// broker that allows no subscription) ends it with an error that says so, and why;
/// the bus itself stays connected and named.
#[tokio::test]
async fn a_subscription_refused_after_a_reconnect_ends_with_the_refusal() {
    let (path, address, broker, bus) = watcher("refused").await;
    let mut readings = within(bus.subscribe::<u32>("counts/#"))
        .await
        .expect("subscribes");
    let mut events = bus.events();
    broker.close().await;
    next(&mut events, disconnected).await;
    let broker = Broker::listen(
        &address,
        BrokerOptions::default().max_subscriptions_per_peer(0),
    )
    .await
    .expect("listen again");
    match within(readings.recv()).await {
        Some(Err(StreamError::ConnectionLost(why))) => {
            assert!(
                why.contains("refused to subscribe to `counts/#` again"),
                "{why}"
            );
            assert!(why.contains("holds 0 subscriptions"), "{why}");
        }
        other => panic!("expected the refusal, got {other:?}"),
    }
    assert!(within(readings.recv()).await.is_none());
    assert_eq!(readings.resubscribed(), 0);
    assert_eq!(broker.names(), ["watcher"]);
    bus.close().await;
    broker.close().await;
    let _ = std::fs::remove_file(&path);
}

/// No connection will come back once the bus is closed or dropped: a subscription
/// waiting for one ends with `ConnectionLost`, as on a plain bus.
#[tokio::test]
async fn a_subscription_ends_when_its_reconnecting_bus_is_closed_or_dropped() {
    let (path, address, broker, closed) = watcher("closed").await;
    let dropped =
        chatter_broker::connect_with(&address, "dropped", BusOptions::new().reconnect(fast()))
            .await
            .expect("starts");
    assert!(dropped.wait_connected(Duration::from_secs(20)).await);
    let mut a = within(closed.subscribe::<u32>("a")).await.expect("a");
    let mut b = within(dropped.subscribe::<u32>("b")).await.expect("b");
    // The futures of `recv` stay `Send` (for a subscriber task).
    fn send<F: Send>(f: F) -> F {
        f
    }
    let mut events = (closed.events(), dropped.events());
    broker.close().await;
    next(&mut events.0, disconnected).await;
    next(&mut events.1, disconnected).await;
    // Both wait for a connection when the bus goes.
    let (a_end, ()) =
        within(async { tokio::join!(send(a.recv()), async { closed.close().await }) }).await;
    let (b_end, ()) = within(async { tokio::join!(send(b.recv()), async { drop(dropped) }) }).await;
    for end in [a_end, b_end] {
        match end {
            Some(Err(StreamError::ConnectionLost(_))) => {}
            other => panic!("expected ConnectionLost, got {other:?}"),
        }
    }
    assert!(within(a.recv()).await.is_none());
    assert!(within(b.recv()).await.is_none());
    let _ = std::fs::remove_file(&path);
}

/// A subscription waiting for a connection ends once the bus gives up reconnecting.
#[tokio::test]
async fn a_subscription_ends_when_its_bus_gives_up_reconnecting() {
    let path = socket_path("gives-up");
    let address = Address::Unix { path: path.clone() };
    let broker = Broker::listen(&address, BrokerOptions::default())
        .await
        .expect("listen");
    let reconnect = ReconnectOptions::default().backoff(
        Backoff::exponential(Duration::from_millis(5), Duration::from_millis(5)).max_attempts(2),
    );
    let bus =
        chatter_broker::connect_with(&address, "watcher", BusOptions::new().reconnect(reconnect))
            .await
            .expect("starts");
    assert!(bus.wait_connected(Duration::from_secs(20)).await);
    let mut readings = within(bus.subscribe::<u32>("counts/#"))
        .await
        .expect("subscribes");
    broker.close().await;
    let _ = std::fs::remove_file(&path);
    match within(readings.recv()).await {
        Some(Err(StreamError::ConnectionLost(_))) => {}
        other => panic!("expected ConnectionLost, got {other:?}"),
    }
    assert_eq!(bus.state(), ConnectionState::Closed);
    assert!(within(readings.recv()).await.is_none());
    assert_eq!(readings.resubscribed(), 0);
}

/// A connection dropped while the broker stays up: the subscription is made again on the
/// same broker, which holds one subscription for it, not two.
#[tokio::test]
async fn a_subscription_subscribes_again_after_a_dropped_connection() {
    let (broker, address) = tcp_broker().await;
    let bus =
        chatter_broker::connect_with(&address, "watcher", BusOptions::new().reconnect(fast()))
            .await
            .expect("starts");
    assert!(bus.wait_connected(Duration::from_secs(20)).await);
    let mut readings = within(bus.subscribe::<u32>("counts/#"))
        .await
        .expect("subscribes");
    let publisher = chatter_broker::connect(&address, "counter")
        .await
        .expect("publisher");
    let mut events = bus.events();
    bus.connection().expect("connected").close().await;
    next(&mut events, disconnected).await;
    next(&mut events, connected).await;
    let (topic, _, _) = publish_until_received(&publisher, &mut readings).await;
    assert_eq!(topic, "counts/b");
    assert_eq!(readings.resubscribed(), 1);
    // The old connection's subscription went with it: the broker retires a closed
    // connection's subscriptions in the same step as it forgets its name, which the bus
    // had to get back before it subscribed again.
    assert_eq!(broker.stats().subscriptions, 1);
    bus.close().await;
    broker.close().await;
}

/// Access rules that changed while the bus was away: the restarted broker denies the
/// pattern, and the subscription ends with the denial.
#[tokio::test]
async fn a_subscription_denied_by_new_access_rules_ends_with_the_denial() {
    use chatter_broker::{AccessControl, Rules};
    let access = |rules: Rules| {
        AccessControl::new()
            .credential("watcher-token", "watchers")
            .identity("watchers", rules)
    };
    let path = socket_path("denied");
    let address = Address::Unix { path: path.clone() };
    let before = Rules::none().register("watcher").subscribe("counts/#");
    let broker = Broker::listen(
        &address,
        BrokerOptions::new().access_control(access(before)),
    )
    .await
    .expect("listen");
    let bus = chatter_broker::connect_with(
        &address,
        "watcher",
        BusOptions::new()
            .credential("watcher-token")
            .reconnect(fast()),
    )
    .await
    .expect("starts");
    assert!(bus.wait_connected(Duration::from_secs(20)).await);
    let mut readings = within(bus.subscribe::<u32>("counts/#"))
        .await
        .expect("subscribes");
    let mut events = bus.events();
    broker.close().await;
    next(&mut events, disconnected).await;
    let after = Rules::none().register("watcher").subscribe("other/#");
    let broker = Broker::listen(&address, BrokerOptions::new().access_control(access(after)))
        .await
        .expect("listen again");
    match within(readings.recv()).await {
        Some(Err(StreamError::ConnectionLost(why))) => {
            assert!(
                why.contains("refused to subscribe to `counts/#` again"),
                "{why}"
            );
            assert!(why.contains("permission denied"), "{why}");
        }
        other => panic!("expected the denial, got {other:?}"),
    }
    assert!(within(readings.recv()).await.is_none());
    assert_eq!(broker.names(), ["watcher"]);
    bus.close().await;
    broker.close().await;
    let _ = std::fs::remove_file(&path);
}
