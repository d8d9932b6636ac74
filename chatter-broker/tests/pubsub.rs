//! Publish/subscribe, presence and broadcast through a broker, end to end over TCP on
//! 127.0.0.1.

use std::time::Duration;

use chatter_broker::{
    Broker, BrokerOptions, Bus, BusOptions, Presence, PublishError, SlowSubscriber, SubscribeError,
    SubscribeOptions, Subscription,
};
use chatter_core::Options;
use chatter_rpc::stream::StreamError;
use chatter_rpc::{remote, CallError, PeerOptions};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// Long enough for anything that should happen at once, short against every default.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    timeout(Duration::from_secs(10), f).await.expect("in time")
}

async fn broker() -> Broker {
    broker_with(BrokerOptions::default()).await
}

async fn broker_with(options: BrokerOptions) -> Broker {
    Broker::listen("tcp://127.0.0.1:0", options)
        .await
        .expect("listen")
}

async fn bus(broker: &Broker, name: &str) -> Bus {
    chatter_broker::connect(&broker.addresses()[0], name)
        .await
        .expect("connect")
}

/// A peer whose result streams have a small window, so that it falls behind quickly.
async fn small_window_bus(broker: &Broker, name: &str) -> Bus {
    let options = BusOptions::new().peer(PeerOptions::default().stream_window(4 * 1024));
    chatter_broker::connect_with(&broker.addresses()[0], name, options)
        .await
        .expect("connect")
}

/// A reading: its sequence number and 100 bytes of payload.
type Reading = (u32, String);

fn reading(seq: u32) -> Reading {
    (seq, "x".repeat(100))
}

async fn next<T: serde::de::DeserializeOwned + Send + 'static>(
    sub: &mut Subscription<T>,
) -> (String, T) {
    within(sub.recv())
        .await
        .expect("subscription open")
        .expect("an item")
}

#[tokio::test]
async fn subscribers_get_what_their_patterns_match_in_publish_order() {
    let broker = broker().await;
    let a = bus(&broker, "a").await;
    let b = bus(&broker, "b").await;
    let c = bus(&broker, "c").await;
    let mut temps = a.subscribe::<Reading>("sensors/+/temp").await.expect("a");
    let mut all = b.subscribe::<Reading>("sensors/#").await.expect("b");
    let mut other = c.subscribe::<Reading>("other/#").await.expect("c");
    assert_eq!(broker.stats().subscriptions, 3);

    let publisher = bus(&broker, "sensor").await;
    let topics = [
        "sensors/1/temp",
        "sensors/2/humidity",
        "sensors/2/temp",
        "sensors",
    ];
    for seq in 0..300 {
        let topic = topics[seq as usize % topics.len()];
        publisher
            .publish(topic, &reading(seq))
            .await
            .expect("publish");
    }
    publisher
        .publish("other/end", &reading(999))
        .await
        .expect("publish");

    for seq in 0..300u32 {
        let topic = topics[seq as usize % topics.len()];
        if topic.ends_with("/temp") {
            let (got_topic, (got, _)) = next(&mut temps).await;
            assert_eq!((got_topic.as_str(), got), (topic, seq));
        }
        // `sensors/#` matches everything here, `sensors` itself too (as in MQTT).
        let (got_topic, (got, payload)) = next(&mut all).await;
        assert_eq!((got_topic.as_str(), got), (topic, seq));
        assert_eq!(payload.len(), 100);
    }
    // Nothing that did not match reached `other/#` before its own publication.
    assert_eq!(
        next(&mut other).await,
        ("other/end".to_owned(), reading(999))
    );
    assert_eq!((temps.missed(), all.missed(), other.missed()), (0, 0, 0));
    let stats = broker.stats();
    assert_eq!(stats.publications, 301);
    assert_eq!(stats.deliveries, 150 + 300 + 1);
}

#[tokio::test]
async fn bad_patterns_topics_and_too_many_subscriptions_are_refused_clearly() {
    let broker = broker_with(BrokerOptions::new().max_subscriptions_per_peer(2)).await;
    let bus = bus(&broker, "app").await;
    for bad in ["", "a/#/b", "a/b+", "sensors/te#"] {
        match bus.subscribe::<u32>(bad).await {
            Err(CallError::App {
                error: SubscribeError::InvalidPattern { pattern, .. },
                ..
            }) => assert_eq!(pattern, bad),
            other => panic!("pattern {bad:?}: {other:?}"),
        }
    }
    let _one = bus.subscribe::<u32>("a").await.expect("first");
    let _two = bus.subscribe::<u32>("b/+").await.expect("second");
    match bus.subscribe::<u32>("c").await {
        Err(CallError::App {
            error: SubscribeError::TooManySubscriptions { limit: 2 },
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    for bad in ["", "a/+", "a/#", "with\ncontrol"] {
        match bus.publish_acked(bad, &1u32).await {
            Err(CallError::App {
                error: PublishError::InvalidTopic { topic, .. },
                ..
            }) => assert_eq!(topic, bad),
            other => panic!("topic {bad:?}: {other:?}"),
        }
    }
    // A fire-and-forget publication on a bad topic is dropped, and nothing else breaks.
    bus.publish("a/#", &1u32).await.expect("sent");
    assert_eq!(
        bus.publish_acked("a", &2u32).await.expect("ok").delivered,
        1
    );
}

/// A slow subscriber (a small stream window, reading nothing yet) subscribed to
/// `readings` with `options`, and `n` readings published while it does not read: returns
/// once a fast subscriber has them all, so that the broker took every one (and the
/// publisher was never held up).
struct Lagging {
    broker: Broker,
    lagging: Subscription<Reading>,
    _buses: Vec<Bus>,
}

async fn lagging(options: SubscribeOptions, n: u32) -> Lagging {
    let broker = broker().await;
    let slow = small_window_bus(&broker, "slow").await;
    let fast = bus(&broker, "fast").await;
    let lagging = slow
        .subscribe_with::<Reading>("readings", options)
        .await
        .expect("slow subscribes");
    let mut keeping_up = fast.subscribe::<Reading>("readings").await.expect("fast");
    let publisher = bus(&broker, "sensor").await;
    within(async {
        for seq in 0..n {
            publisher
                .publish("readings", &reading(seq))
                .await
                .expect("publish");
        }
    })
    .await;
    for seq in 0..n {
        assert_eq!(next(&mut keeping_up).await.1 .0, seq);
    }
    Lagging {
        broker,
        lagging,
        _buses: vec![slow, fast, publisher],
    }
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_loses_the_oldest_and_holds_no_one_up() {
    const N: u32 = 2000;
    const QUEUE: usize = 8 * 1024;
    let Lagging {
        broker,
        mut lagging,
        _buses,
    } = lagging(
        SubscribeOptions::new()
            .policy(SlowSubscriber::DropOldest)
            .queue_bytes(QUEUE),
        N,
    )
    .await;
    let stats = broker.stats();
    assert!(
        stats.queued_publication_bytes <= QUEUE as u64,
        "{} bytes wait for the slow subscriber, over its queue_bytes {QUEUE}",
        stats.queued_publication_bytes
    );
    assert_eq!(
        stats.held_bytes, 0,
        "publishers' credit is not held by a dropping subscriber"
    );
    assert!(
        stats.dropped_deliveries > 0,
        "the test did not fill the slow queue"
    );

    // What the slow one gets: in order, the newest kept, and told how many it lost.
    let mut received = 0u64;
    let mut last = None;
    while last != Some(N - 1) {
        let (_, (seq, _)) = next(&mut lagging).await;
        assert!(last.is_none_or(|l| seq > l), "{seq} after {last:?}");
        last = Some(seq);
        received += 1;
    }
    assert!(lagging.missed() > 0);
    assert_eq!(received + lagging.missed(), u64::from(N));
    assert_eq!(broker.stats().queued_publication_bytes, 0);
}

#[tokio::test]
async fn drop_newest_keeps_the_oldest() {
    const N: u32 = 2000;
    let Lagging {
        broker,
        mut lagging,
        _buses,
    } = lagging(
        SubscribeOptions::new()
            .policy(SlowSubscriber::DropNewest)
            .queue_bytes(8 * 1024),
        N,
    )
    .await;
    // It read nothing while they were published: it keeps the oldest, without a gap,
    // and is told (with the items it gets) how many it lost.
    let mut received = 0u32;
    while u64::from(received) + lagging.missed() < u64::from(N) {
        let (_, (seq, _)) = next(&mut lagging).await;
        assert_eq!(seq, received);
        received += 1;
    }
    assert!(received < N);
    assert!(lagging.missed() > 0, "the queue never filled");
    assert!(broker.stats().dropped_deliveries > 0);
}

#[tokio::test]
async fn the_end_policy_ends_a_lagging_subscription_with_a_clear_error() {
    let Lagging {
        broker,
        mut lagging,
        _buses,
    } = lagging(
        SubscribeOptions::new()
            .policy(SlowSubscriber::End)
            .queue_bytes(4 * 1024),
        500,
    )
    .await;
    let mut expected = 0;
    loop {
        match within(lagging.recv()).await {
            Some(Ok((_, (seq, _)))) => {
                assert_eq!(seq, expected, "in order and without a gap until the end");
                expected += 1;
            }
            Some(Err(StreamError::Lagged(why))) => {
                assert!(why.contains("queue_bytes"), "{why}");
                break;
            }
            other => panic!("after {expected} items: {other:?}"),
        }
    }
    assert!(expected < 500);
    assert!(
        within(lagging.recv()).await.is_none(),
        "the subscription ended"
    );
    assert_eq!(broker.stats().subscriptions, 1);
}

#[tokio::test]
async fn backpressure_holds_publishers_within_their_window_and_loses_nothing() {
    const WINDOW: u32 = 64 * 1024;
    const N: u32 = 3000;
    let small = Options::default()
        .receive_window(WINDOW)
        .max_frame_size(WINDOW - 64);
    let broker = broker_with(BrokerOptions::new().connection(small)).await;
    let slow = small_window_bus(&broker, "slow").await;
    let mut careful = slow
        .subscribe_with::<Reading>(
            "readings",
            SubscribeOptions::new().policy(SlowSubscriber::Backpressure),
        )
        .await
        .expect("slow");
    let publisher = bus(&broker, "sensor").await;
    let mut sent = 0;
    let mut stalled = false;
    while sent < N {
        match timeout(
            Duration::from_millis(200),
            publisher.publish("readings", &reading(sent)),
        )
        .await
        {
            Ok(result) => {
                result.expect("publish");
                sent += 1;
            }
            Err(_) => {
                stalled = true;
                break;
            }
        }
    }
    assert!(stalled, "the publisher was never held up ({sent} sent)");
    let held = broker.stats().held_bytes;
    assert!(
        held > 0 && held <= u64::from(WINDOW),
        "the broker holds {held} bytes"
    );
    // The subscriber reads: everything arrives, in order, and the publisher goes on.
    let rest = tokio::spawn(async move {
        for seq in sent..N {
            publisher
                .publish("readings", &reading(seq))
                .await
                .expect("publish");
        }
        publisher
    });
    for seq in 0..N {
        assert_eq!(next(&mut careful).await.1 .0, seq);
    }
    assert_eq!(careful.missed(), 0);
    within(rest).await.expect("publisher");
}

#[tokio::test]
async fn an_acknowledged_publication_reports_who_got_it() {
    let broker = broker().await;
    let a = bus(&broker, "a").await;
    let b = small_window_bus(&broker, "b").await;
    let mut sa = a.subscribe::<Reading>("news/#").await.expect("a");
    let options = SubscribeOptions::new()
        .policy(SlowSubscriber::DropNewest)
        .queue_bytes(1024);
    let _sb = b
        .subscribe_with::<Reading>("news/+", options)
        .await
        .expect("b");
    let publisher = bus(&broker, "editor").await;
    let report = publisher
        .publish_acked("news/today", &reading(0))
        .await
        .expect("published");
    assert_eq!((report.subscribers, report.delivered), (2, 2));
    assert!(report.missed.is_empty());
    let report = publisher
        .publish_acked("nobody/listens", &reading(1))
        .await
        .expect("published");
    assert_eq!((report.subscribers, report.delivered), (0, 0));

    // `b` stops reading: once its window and queue are full, it misses publications,
    // and the report names it. (A copy that waits in its queue would keep the report
    // waiting until it is delivered, dropped or the call's deadline passes.)
    for seq in 2..200 {
        publisher
            .publish("news/today", &reading(seq))
            .await
            .expect("published");
    }
    for seq in 0..200 {
        if seq != 1 {
            assert_eq!(next(&mut sa).await.1 .0, seq);
        }
    }
    let report = publisher
        .publish_acked("news/today", &reading(200))
        .await
        .expect("published");
    assert_eq!((report.subscribers, report.delivered), (2, 1));
    assert_eq!(report.missed, ["b"]);
    assert_eq!(next(&mut sa).await.1 .0, 200);
}

#[tokio::test]
async fn presence_tells_who_is_there_who_comes_and_who_goes() {
    let broker = broker().await;
    let _early = bus(&broker, "early").await;
    let monitor = bus(&broker, "monitor").await;
    let mut presence = monitor.presence().await.expect("presence");
    let mut now = vec![next(&mut presence).await.1, next(&mut presence).await.1];
    now.sort_by(|a, b| a.peer.cmp(&b.peer));
    let online = |peer: &str| Presence {
        peer: peer.into(),
        online: true,
    };
    assert_eq!(now, [online("early"), online("monitor")]);

    let late = bus(&broker, "late").await;
    let (topic, joined) = next(&mut presence).await;
    assert_eq!(
        (topic.as_str(), joined),
        ("$broker/presence/late", online("late"))
    );
    late.close().await;
    let (_, left) = next(&mut presence).await;
    assert_eq!(
        left,
        Presence {
            peer: "late".into(),
            online: false
        }
    );
    // `#` does not see the broker's own topics.
    let all = bus(&broker, "all").await;
    let mut everything = all.subscribe::<Presence>("#").await.expect("#");
    let _again = bus(&broker, "again").await;
    assert_eq!(next(&mut presence).await.1, online("all"));
    assert_eq!(next(&mut presence).await.1, online("again"));
    all.publish(
        "marker",
        &Presence {
            peer: "m".into(),
            online: true,
        },
    )
    .await
    .expect("publish");
    assert_eq!(next(&mut everything).await.0, "marker");
}

#[remote]
pub trait Sensor {
    #[signal(ttl = "5s")]
    async fn calibrate(&self, offset: i32);
    async fn read(&self) -> i32;
}

struct Probe {
    name: &'static str,
    seen: mpsc::UnboundedSender<(&'static str, i32)>,
}

impl Sensor for Probe {
    async fn calibrate(&self, offset: i32) {
        let _ = self.seen.send((self.name, offset));
    }
    async fn read(&self) -> i32 {
        7
    }
}

#[tokio::test]
async fn a_signal_to_a_name_pattern_reaches_every_match_but_the_sender() {
    let broker = broker().await;
    // Unbounded: a test probe, a handful of messages, read by the test.
    let (seen, mut heard) = mpsc::unbounded_channel();
    let mut peers = Vec::new();
    for name in ["sensor-1", "sensor-2", "pump-1", "sensor-self"] {
        let peer = bus(&broker, name).await;
        peer.register(
            "sensor",
            SensorServer::new(Probe {
                name,
                seen: seen.clone(),
            }),
        );
        peers.push(peer);
    }
    let sender = &peers[3];
    let all_sensors = SensorClient::new(&sender.peer("sensor-*"), "sensor");
    all_sensors.calibrate(5).await.expect("broadcast sent");
    // A marker signal to one peer: when it arrived, so had the broadcast before it.
    SensorClient::new(&sender.peer("pump-1"), "sensor")
        .calibrate(0)
        .await
        .expect("sent");
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(within(heard.recv()).await.expect("a signal"));
    }
    got.sort();
    assert_eq!(got, [("pump-1", 0), ("sensor-1", 5), ("sensor-2", 5)]);
    assert_eq!(broker.stats().broadcasts, 1);
    // A call cannot go to many.
    match all_sensors.read().await {
        Err(CallError::Protocol(why)) => assert!(why.contains("pattern"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_subscription_ends_with_its_subscriber_or_when_dropped() {
    let broker = broker().await;
    let a = bus(&broker, "a").await;
    let b = bus(&broker, "b").await;
    let sa = a.subscribe::<u32>("t").await.expect("a");
    let mut sb = b.subscribe::<u32>("t").await.expect("b");
    assert_eq!(broker.stats().subscriptions, 2);
    drop(sa);
    let publisher = bus(&broker, "p").await;
    // The cancel travels to the broker before the next publication is matched.
    within(async {
        while broker.stats().subscriptions != 1 {
            publisher
                .publish_acked("nothing", &0u32)
                .await
                .expect("barrier");
        }
    })
    .await;
    b.close().await;
    within(async {
        while broker.stats().subscriptions != 0 {
            publisher
                .publish_acked("nothing", &0u32)
                .await
                .expect("barrier");
        }
    })
    .await;
    assert!(matches!(
        within(sb.recv()).await,
        Some(Err(StreamError::ConnectionLost(_))) | None
    ));
    let report = publisher.publish_acked("t", &1u32).await.expect("ok");
    assert_eq!(report.subscribers, 0);
}

#[tokio::test]
async fn a_publication_of_the_wrong_type_is_an_error_item_not_the_end() {
    let broker = broker().await;
    let subscriber = bus(&broker, "s").await;
    let mut numbers = subscriber.subscribe::<u32>("n").await.expect("subscribe");
    let publisher = bus(&broker, "p").await;
    publisher.publish("n", &1u32).await.expect("publish");
    publisher
        .publish("n", &"not a number")
        .await
        .expect("publish");
    publisher.publish("n", &3u32).await.expect("publish");
    assert_eq!(next(&mut numbers).await.1, 1);
    assert!(matches!(
        within(numbers.recv()).await,
        Some(Err(StreamError::BadItem(_)))
    ));
    assert_eq!(next(&mut numbers).await.1, 3);
}

#[tokio::test]
async fn a_backpressure_subscription_that_never_reads_is_ended_at_its_cap() {
    // Presence publications hold no publisher's credit: only the cap bounds them.
    const CAP: usize = 4 * 1024;
    let broker = broker_with(BrokerOptions::new().max_backpressure_queue(CAP)).await;
    let watcher = small_window_bus(&broker, "watcher").await;
    let mut presence = watcher
        .subscribe_with::<Presence>(
            "$broker/presence/+",
            SubscribeOptions::new().policy(SlowSubscriber::Backpressure),
        )
        .await
        .expect("subscribe");
    let mut ended = false;
    for i in 0..200 {
        let peer = bus(&broker, &format!("peer-{i}")).await;
        peer.close().await;
        assert!(broker.stats().queued_publication_bytes <= CAP as u64);
        if broker.stats().subscriptions == 0 {
            ended = true;
            break;
        }
    }
    assert!(ended, "the subscription was never ended");
    loop {
        match within(presence.recv()).await {
            Some(Ok(_)) => continue,
            Some(Err(StreamError::Lagged(why))) => {
                assert!(why.contains("max_backpressure_queue"), "{why}");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
}
