//! In-process clients (`Broker::connect_local`): the same behaviour as socket clients,
//! over in-memory pipes, alone and mixed with TCP and Unix socket clients.

use std::time::Duration;

mod common;

use chatter_broker::{Broker, BrokerOptions, Bus, BusError, BusOptions, RegisterError};
use chatter_core::{CloseCause, CloseCode, ConnectError, Options};
use chatter_rpc::stream;
use chatter_rpc::{CallError, PeerOptions};
use common::{CalcError, CalculatorClient, CalculatorServer, Probe};
use tokio::time::timeout;

/// The shared callee, as a server.
fn calc() -> (CalculatorServer<common::Calc>, Probe) {
    let (calc, probe) = common::calc();
    (CalculatorServer::new(calc), probe)
}

/// Long enough for anything that should happen at once, short against every default.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    timeout(Duration::from_secs(10), f).await.expect("in time")
}

/// A callee named `name` serving `calc`, registered before the name is claimed.
async fn local_callee(broker: &Broker, name: &str, options: BusOptions) -> (Bus, Probe) {
    let bus = broker
        .connect_local_unnamed(options)
        .await
        .expect("connects");
    let (server, probe) = calc();
    bus.register("calc", server);
    bus.claim(name, false).await.expect("claims");
    (bus, probe)
}

/// Calls, typed errors, signals and streams of both kinds, from one in-process client to
/// another, through a broker that has no listener at all.
async fn exercise(caller: &Bus, callee: &str, probe: &mut Probe) {
    let calc = CalculatorClient::new(&caller.peer(callee), "calc");
    assert_eq!(within(calc.add(2, 3)).await.expect("call"), 5);
    match within(calc.div(1, 0)).await {
        Err(CallError::App { error, .. }) => assert_eq!(error, CalcError::DivisionByZero),
        other => panic!("expected the app error, got {other:?}"),
    }
    within(calc.note("hello".into())).await.expect("sent");
    assert_eq!(within(probe.notes.recv()).await.as_deref(), Some("hello"));
    // A result stream larger than the stream window: credit goes back through the broker.
    let mut items = within(calc.count(5_000)).await.expect("stream opens");
    let mut expected = 0;
    while let Some(item) = within(items.recv()).await {
        assert_eq!(item.expect("item"), expected);
        expected += 1;
    }
    assert_eq!(expected, 5_000);
    let (tx, rx) = stream::channel(4);
    // Feeds the argument stream; ends with it.
    let feed = tokio::spawn(async move {
        for i in 0..1000u32 {
            if tx.send(i).await.is_err() {
                break;
            }
        }
    });
    assert_eq!(within(calc.sum(rx)).await.expect("sum"), 999 * 1000 / 2);
    within(feed).await.expect("feeder");
    // Many calls at once over the one pipe each side has.
    let calls: Vec<_> = (0..200)
        .map(|i| {
            let calc = calc.clone();
            // One per call of the test.
            tokio::spawn(async move { calc.add(i, 1).await })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(
            within(call).await.expect("task").expect("call"),
            i as i64 + 1
        );
    }
}

#[tokio::test]
async fn in_process_clients_call_each_other_through_a_broker_without_a_socket() {
    let broker = Broker::in_process(BrokerOptions::default()).expect("broker");
    assert!(broker.addresses().is_empty());
    let (_callee, mut probe) = local_callee(&broker, "calc-1", BusOptions::new()).await;
    let caller = broker.connect_local("app").await.expect("caller");
    assert_eq!(broker.names(), ["app", "calc-1"]);
    exercise(&caller, "calc-1", &mut probe).await;
    let stats = broker.stats();
    assert_eq!(
        (stats.connections, stats.held_bytes, stats.queued),
        (2, 0, 0),
        "{stats:?}"
    );
    let conn = caller.connection().expect("connected");
    assert_eq!(conn.local_address().to_string(), "unix://in-process");
}

#[tokio::test]
async fn in_process_and_socket_clients_call_each_other() {
    let dir = std::env::temp_dir().join(format!("chatter-local-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let unix = format!("unix://{}", dir.join("broker.sock").display());
    let broker = Broker::listen(&unix, BrokerOptions::default())
        .await
        .expect("listen");
    let (local, mut local_probe) = local_callee(&broker, "local-calc", BusOptions::new()).await;
    // A socket callee, and socket and in-process callers.
    let remote = chatter_broker::connect_unnamed(&unix, BusOptions::new())
        .await
        .expect("socket callee");
    let (server, mut remote_probe) = calc();
    remote.register("calc", server);
    remote.claim("socket-calc", false).await.expect("claims");
    let socket_caller = chatter_broker::connect(&unix, "socket-app")
        .await
        .expect("socket caller");
    let local_caller = broker
        .connect_local("local-app")
        .await
        .expect("local caller");

    exercise(&socket_caller, "local-calc", &mut local_probe).await;
    exercise(&local_caller, "socket-calc", &mut remote_probe).await;
    // And each callee calls the other.
    let to_socket = CalculatorClient::new(&local.peer("socket-calc"), "calc");
    assert_eq!(within(to_socket.add(1, 1)).await.expect("call"), 2);
    let to_local = CalculatorClient::new(&remote.peer("local-calc"), "calc");
    assert_eq!(within(to_local.add(2, 2)).await.expect("call"), 4);
    let stats = broker.stats();
    assert_eq!((stats.connections, stats.held_bytes), (4, 0), "{stats:?}");
    broker.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn names_follow_the_same_rules_for_in_process_and_socket_clients() {
    let broker = Broker::listen("tcp://127.0.0.1:0", BrokerOptions::default())
        .await
        .expect("listen");
    let address = broker.addresses()[0].clone();
    let socket_holder = chatter_broker::connect(&address, "pump-1")
        .await
        .expect("socket registers");
    match broker.connect_local("pump-1").await {
        Err(BusError::Refused(RegisterError::NameTaken { name })) => assert_eq!(name, "pump-1"),
        other => panic!("expected NameTaken, got {other:?}"),
    }
    match broker.connect_local("a/b").await {
        Err(BusError::Refused(RegisterError::InvalidName { .. })) => {}
        other => panic!("expected InvalidName, got {other:?}"),
    }
    let local = broker.connect_local("valve-1").await.expect("registers");
    match local.claim("other", false).await {
        Err(BusError::Refused(RegisterError::AlreadyRegistered { name })) => {
            assert_eq!(name, "valve-1")
        }
        other => panic!("expected AlreadyRegistered, got {other:?}"),
    }
    match chatter_broker::connect(&address, "valve-1").await {
        Err(BusError::Refused(RegisterError::NameTaken { .. })) => {}
        other => panic!("expected NameTaken, got {other:?}"),
    }
    // An in-process client takes a socket client's name over, and the other way round.
    let usurper = broker
        .connect_local_with("pump-1", BusOptions::new().take_over(true))
        .await
        .expect("takes over");
    let cause = within(socket_holder.closed()).await;
    assert!(cause.to_string().contains("taken over"), "{cause}");
    let back = chatter_broker::connect_with(&address, "pump-1", BusOptions::new().take_over(true))
        .await
        .expect("takes back");
    let cause = within(usurper.closed()).await;
    assert!(cause.to_string().contains("taken over"), "{cause}");
    assert_eq!(broker.names(), ["pump-1", "valve-1"]);
    drop(back);
}

#[tokio::test]
async fn an_in_process_callees_disconnect_fails_the_call_and_a_callers_cancels() {
    let broker = Broker::in_process(BrokerOptions::default()).expect("broker");
    let (callee, mut probe) = local_callee(&broker, "calc-1", BusOptions::new()).await;
    let caller = broker.connect_local("app").await.expect("caller");
    let calc = CalculatorClient::new(&caller.peer("calc-1"), "calc")
        .with_deadline(Duration::from_secs(3600));

    // The caller's disconnect cancels its call at the callee.
    let other = broker.connect_local("app-2").await.expect("caller");
    let doomed = CalculatorClient::new(&other.peer("calc-1"), "calc")
        .with_deadline(Duration::from_secs(3600));
    // One per call the test makes.
    let _call = tokio::spawn(async move { doomed.wait().await });
    within(probe.started.recv()).await.expect("handler started");
    other.close().await;
    within(probe.dropped.recv()).await.expect("handler dropped");

    // The callee's connection cut (not a graceful close) fails the caller's call. One task
    // per call the test makes.
    let call = tokio::spawn({
        let calc = calc.clone();
        async move { calc.wait().await }
    });
    within(probe.started.recv()).await.expect("handler started");
    callee.connection().expect("connected").close().await;
    match within(call).await.expect("task") {
        Err(e @ CallError::PeerLost { .. }) => assert!(e.to_string().contains("calc-1"), "{e}"),
        other => panic!("expected PeerLost, got {other:?}"),
    }
    assert!(matches!(
        within(calc.add(1, 1)).await,
        Err(CallError::NoSuchPeer { .. })
    ));
    assert_eq!(broker.names(), ["app"]);
}

#[tokio::test]
async fn closing_the_broker_ends_its_in_process_clients() {
    let broker = Broker::listen("tcp://127.0.0.1:0", BrokerOptions::default())
        .await
        .expect("listen");
    let (callee, _probe) = local_callee(&broker, "calc-1", BusOptions::new()).await;
    let caller = broker.connect_local("app").await.expect("caller");
    let calc = CalculatorClient::new(&caller.peer("calc-1"), "calc")
        .with_deadline(Duration::from_secs(3600));
    // A call in flight when the broker closes fails, not hangs (one task, for this call).
    let call = tokio::spawn(async move { calc.wait().await });
    broker.close().await;
    for bus in [&callee, &caller] {
        match within(bus.closed()).await {
            CloseCause::Peer { code, .. } => assert_eq!(code, CloseCode::GoingAway),
            other => panic!("expected the broker's going away, got {other:?}"),
        }
    }
    assert!(within(call).await.expect("task").is_err());
    // A closed broker takes no new in-process clients.
    match broker.connect_local("late").await {
        Err(BusError::Connect(ConnectError::Handshake { .. })) => {}
        other => panic!("expected a failed handshake, got {other:?}"),
    }
}

#[tokio::test]
async fn in_process_clients_count_against_max_connections() {
    let options = BrokerOptions::new().connection(Options::default().max_connections(2));
    let broker = Broker::listen("tcp://127.0.0.1:0", options)
        .await
        .expect("listen");
    let address = broker.addresses()[0].clone();
    let _a = broker.connect_local("a").await.expect("first");
    let _b = chatter_broker::connect(&address, "b")
        .await
        .expect("second");
    for refused in [
        broker.connect_local("c").await,
        chatter_broker::connect(&address, "c").await,
    ] {
        match refused {
            Err(BusError::Connect(ConnectError::Handshake { cause, .. })) => {
                assert!(cause.to_string().contains("connection limit"), "{cause}")
            }
            other => panic!("expected a refusal for the limit, got {other:?}"),
        }
    }
    drop(_a);
    // Its slot comes back once its connection ended.
    within(async {
        loop {
            match broker.connect_local("c").await {
                Ok(bus) => break bus,
                Err(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await;
}

/// A callee that never finishes its handlers stops taking requests; the broker then holds
/// at most the caller's window of them, and the caller waits: the pipes' buffers add
/// nothing unbounded.
#[tokio::test]
async fn a_slow_in_process_callee_does_not_make_the_broker_buffer_without_bound() {
    const WINDOW: u32 = 64 * 1024;
    let small = Options::default()
        .receive_window(WINDOW)
        .max_frame_size(WINDOW - 64);
    let broker =
        Broker::in_process(BrokerOptions::new().connection(small.clone())).expect("broker");
    let callee_options = BusOptions::new()
        .connection(small.clone())
        .local_buffer(16 * 1024)
        .peer(PeerOptions::default().max_concurrent_handlers(1));
    let (_callee, mut probe) = local_callee(&broker, "calc-1", callee_options).await;
    let caller = broker
        .connect_local_with("app", BusOptions::new().connection(small))
        .await
        .expect("caller");
    let calc = CalculatorClient::new(&caller.peer("calc-1"), "calc")
        .with_deadline(Duration::from_secs(3600));
    // One task, for the call that holds the callee's only handler.
    let first = tokio::spawn({
        let calc = calc.clone();
        async move { calc.wait().await }
    });
    within(probe.started.recv()).await.expect("handler started");
    let text = "x".repeat(1000);
    let mut stalled = false;
    for _ in 0..2000 {
        let note = calc.with_ttl(Duration::from_secs(3600)).note(text.clone());
        match timeout(Duration::from_millis(200), note).await {
            Ok(result) => drop(result.expect("signal queued")),
            Err(_) => {
                stalled = true;
                break;
            }
        }
    }
    let held = broker.stats().held_bytes;
    assert!(
        held > 0,
        "the broker holds nothing: the test did not fill it"
    );
    assert!(
        held <= u64::from(WINDOW) * 2,
        "the broker holds {held} bytes, over its windows ({WINDOW} per connection)"
    );
    assert!(
        stalled || caller.queued() > 0,
        "the caller never had to wait"
    );
    probe.release.notify_waiters();
    assert_eq!(within(first).await.expect("task").expect("call"), 42);
    within(async {
        while broker.stats().held_bytes > 0 {
            probe.notes.recv().await;
        }
    })
    .await;
}

/// With the clock paused, an in-process setup is deterministic: the deadline of a routed
/// call holds to the millisecond of virtual time.
#[tokio::test(start_paused = true)]
async fn the_deadline_holds_between_in_process_clients() {
    let broker = Broker::in_process(BrokerOptions::default()).expect("broker");
    let (_callee, mut probe) = local_callee(&broker, "calc-1", BusOptions::new()).await;
    let caller = broker.connect_local("app").await.expect("caller");
    let calc = CalculatorClient::new(&caller.peer("calc-1"), "calc");
    let start = tokio::time::Instant::now();
    let err = calc
        .with_deadline(Duration::from_secs(2))
        .wait()
        .await
        .expect_err("the handler never finishes");
    assert!(matches!(err, CallError::DeadlineExceeded), "{err:?}");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    probe.dropped.recv().await.expect("handler dropped");
}

fn sensor_access() -> chatter_broker::AccessControl {
    use chatter_broker::{AccessControl, Rules};
    AccessControl::new()
        .credential("sensor-token", "sensors")
        .credential("dashboard-token", "dashboard")
        .identity(
            "sensors",
            Rules::none().register("sensor-*").publish("sensors/#"),
        )
        .identity(
            "dashboard",
            Rules::none().register("dashboard").subscribe("sensors/#"),
        )
}

/// An in-process client presents its credential as a socket client does, and publishes to
/// and subscribes with socket clients, under the broker's access control.
#[tokio::test]
async fn in_process_clients_authenticate_and_publish_and_subscribe_with_socket_clients() {
    let options = BrokerOptions::new().access_control(sensor_access());
    let broker = Broker::listen("tcp://127.0.0.1:0", options)
        .await
        .expect("listen");
    let address = broker.addresses()[0].clone();
    let dashboard = chatter_broker::connect_with(
        &address,
        "dashboard",
        BusOptions::new().credential("dashboard-token"),
    )
    .await
    .expect("socket dashboard");
    let mut readings = within(dashboard.subscribe::<f64>("sensors/+/temp"))
        .await
        .expect("subscribes");
    let sensor = broker
        .connect_local_with("sensor-1", BusOptions::new().credential("sensor-token"))
        .await
        .expect("in-process sensor");
    within(sensor.publish("sensors/1/temp", &21.5))
        .await
        .expect("published");
    let (topic, value) = within(readings.recv())
        .await
        .expect("open")
        .expect("a reading");
    assert_eq!((topic.as_str(), value), ("sensors/1/temp", 21.5));

    // And the other way round: an in-process subscriber, a socket publisher.
    let local_dashboard = broker
        .connect_local_unnamed(BusOptions::new().credential("dashboard-token"))
        .await
        .expect("in-process dashboard");
    let mut local_readings = within(local_dashboard.subscribe::<f64>("sensors/#"))
        .await
        .expect("subscribes");
    let socket_sensor = chatter_broker::connect_with(
        &address,
        "sensor-2",
        BusOptions::new().credential("sensor-token"),
    )
    .await
    .expect("socket sensor");
    within(socket_sensor.publish("sensors/2/temp", &19.0))
        .await
        .expect("published");
    let (topic, value) = within(local_readings.recv())
        .await
        .expect("open")
        .expect("a reading");
    assert_eq!((topic.as_str(), value), ("sensors/2/temp", 19.0));

    // The rules hold for in-process clients too.
    match broker
        .connect_local_with("pump-1", BusOptions::new().credential("sensor-token"))
        .await
    {
        Err(BusError::Register(CallError::PermissionDenied { .. })) => {}
        other => panic!("expected a denied name, got {other:?}"),
    }
    match broker
        .connect_local_with("sensor-3", BusOptions::new().credential("wrong"))
        .await
    {
        Err(BusError::Authenticate(CallError::PermissionDenied { .. })) => {}
        other => panic!("expected a refused credential, got {other:?}"),
    }
}
