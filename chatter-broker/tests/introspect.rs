//! The broker's introspection: its peers, their subscriptions and queues, its counters,
//! and chatter-rpc's `chatter.introspect` for its own object.

use chatter_broker::{
    AccessControl, Broker, BrokerApiClient, BrokerOptions, BusOptions, Rules, SlowSubscriber,
    SubscribeOptions, BROKER_OBJECT,
};
use chatter_rpc::introspect::{IntrospectClient, IntrospectError, OBJECT};
use chatter_rpc::CallError;

#[tokio::test]
async fn the_broker_tells_its_peers_subscriptions_and_counters() {
    let broker = Broker::listen("tcp://127.0.0.1:0", BrokerOptions::default())
        .await
        .expect("listen");
    let address = &broker.addresses()[0];
    let ops = chatter_broker::connect(address, "ops").await.expect("ops");
    let sensor = chatter_broker::connect(address, "sensor-1")
        .await
        .expect("sensor");
    let anonymous = chatter_broker::connect_unnamed(address, BusOptions::new())
        .await
        .expect("unnamed");
    let _slow = anonymous
        .subscribe_with::<u32>(
            "t/#",
            SubscribeOptions::new().policy(SlowSubscriber::DropNewest),
        )
        .await
        .expect("subscribe");
    let mut fast = ops.subscribe::<u32>("t/+").await.expect("subscribe");
    for i in 0..3u32 {
        sensor.publish("t/x", &i).await.expect("publish");
    }
    for i in 0..3u32 {
        assert_eq!(fast.recv().await.expect("open").expect("item").1, i);
    }

    let control = BrokerApiClient::new(&ops, BROKER_OBJECT);
    let peers = control.peers().await.expect("peers");
    let names: Vec<Option<&str>> = peers.iter().map(|p| p.name.as_deref()).collect();
    assert_eq!(names, [Some("ops"), Some("sensor-1"), None]);
    let ops_info = &peers[0];
    assert_eq!(ops_info.subscriptions.len(), 1);
    assert_eq!(ops_info.subscriptions[0].pattern, "t/+");
    assert_eq!(ops_info.subscriptions[0].delivered, 3);
    assert_eq!(peers[2].subscriptions[0].policy, SlowSubscriber::DropNewest);
    assert!(peers
        .iter()
        .all(|p| p.identity.is_none() && !p.address.is_empty()));

    let stats = control.stats().await.expect("stats");
    assert_eq!(
        (stats.connections, stats.names, stats.subscriptions),
        (3, 2, 2)
    );
    assert_eq!(stats.publications, 3);
    // The stats call itself was held (and not yet forwarded) when it was answered.
    assert_eq!(stats.deliveries, broker.stats().deliveries);

    // chatter-rpc's introspection object, as `chatter list` / `describe` use it.
    let introspect = IntrospectClient::new(&ops, OBJECT);
    let list = introspect.list().await.expect("list");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].object, BROKER_OBJECT);
    assert_eq!(list[0].interface.as_deref(), Some("BrokerApi"));
    assert_eq!(
        list[0].methods,
        ["register", "authenticate", "stats", "peers"]
    );
    let description = introspect
        .describe(BROKER_OBJECT.to_owned())
        .await
        .expect("describe");
    assert!(description.methods.iter().any(|m| m.name == "peers"));
    assert!(
        description.shape("Vec<PeerInfo>").is_some(),
        "shapes are traced"
    );
    match introspect.describe("nothing".to_owned()).await {
        Err(CallError::App {
            error: IntrospectError::NoSuchObject { object, known },
            ..
        }) => assert_eq!(
            (object.as_str(), known),
            ("nothing", vec![BROKER_OBJECT.to_owned()])
        ),
        other => panic!("{other:?}"),
    }
    let counters = introspect.stats().await.expect("stats");
    assert!(counters
        .iter()
        .any(|c| c.name == "publications" && c.value == 3));
    introspect.ping().await.expect("ping");
}

#[tokio::test]
async fn only_identities_allowed_to_introspect_see_the_peers() {
    let access = AccessControl::new()
        .credential("ops", "ops")
        .identity("ops", Rules::none().introspect())
        .anonymous(Rules::none().register("*"));
    let broker = Broker::listen(
        "tcp://127.0.0.1:0",
        BrokerOptions::new().access_control(access),
    )
    .await
    .expect("listen");
    let address = &broker.addresses()[0];
    let ops = chatter_broker::connect_unnamed(address, BusOptions::new().credential("ops"))
        .await
        .expect("ops");
    let other = chatter_broker::connect(address, "other")
        .await
        .expect("other");
    let peers = BrokerApiClient::new(&ops, BROKER_OBJECT)
        .peers()
        .await
        .expect("allowed");
    assert_eq!(peers.len(), 2);
    assert_eq!(peers[1].identity.as_deref(), Some("ops"));
    for denied in [
        BrokerApiClient::new(&other, BROKER_OBJECT)
            .peers()
            .await
            .map(|_| ()),
        BrokerApiClient::new(&other, BROKER_OBJECT)
            .stats()
            .await
            .map(|_| ()),
        IntrospectClient::new(&other, OBJECT)
            .stats()
            .await
            .map(|_| ()),
    ] {
        assert!(
            matches!(denied, Err(CallError::PermissionDenied { .. })),
            "{denied:?}"
        );
    }
    assert_eq!(broker.stats().denied, 3);
}

#[tokio::test]
async fn an_answer_too_large_for_the_callers_frames_fails_instead_of_hanging() {
    let broker = Broker::listen("tcp://127.0.0.1:0", BrokerOptions::default())
        .await
        .expect("listen");
    let address = &broker.addresses()[0];
    let crowd = chatter_broker::connect(address, "crowd")
        .await
        .expect("crowd");
    let mut subscriptions = Vec::new();
    for i in 0..20 {
        let pattern = format!("{}/{i}", "p".repeat(200));
        subscriptions.push(crowd.subscribe::<u32>(&pattern).await.expect("subscribe"));
    }
    let small = chatter_core::Options::default()
        .max_frame_size(2048)
        .receive_window(64 * 1024);
    let ops = chatter_broker::connect_with(address, "ops", BusOptions::new().connection(small))
        .await
        .expect("ops");
    match BrokerApiClient::new(&ops, BROKER_OBJECT).peers().await {
        Err(CallError::Protocol(why)) => assert!(why.contains("could not be sent"), "{why}"),
        other => panic!("{other:?}"),
    }
}
