//! The broker end to end: real TCP connections on 127.0.0.1, a broker, a callee registered
//! under a name and a caller that reaches it through the broker.

use std::time::Duration;

mod common;

use chatter_broker::{Broker, BrokerOptions, Bus, BusError, BusOptions, RegisterError};
use chatter_core::Options;
use chatter_rpc::stream;
use chatter_rpc::{CallError, PeerOptions};
use common::{calc, CalcError, CalculatorClient, CalculatorServer, Probe};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// A broker, a callee `calc-1` serving `calc`, and a caller `app`.
struct Setup {
    broker: Broker,
    callee: Bus,
    caller: Bus,
    probe: Probe,
}

async fn setup() -> Setup {
    setup_with(BrokerOptions::default(), BusOptions::new()).await
}

async fn setup_with(options: BrokerOptions, callee_options: BusOptions) -> Setup {
    let broker = Broker::listen("tcp://127.0.0.1:0", options)
        .await
        .expect("listen");
    let address = broker.addresses()[0].clone();
    let (calc, probe) = calc();
    let callee = chatter_broker::connect_unnamed(&address, callee_options)
        .await
        .expect("callee connects");
    callee.register("calc", CalculatorServer::new(calc));
    callee
        .claim("calc-1", false)
        .await
        .expect("callee registers");
    let caller = chatter_broker::connect(&address, "app")
        .await
        .expect("caller connects");
    Setup {
        broker,
        callee,
        caller,
        probe,
    }
}

impl Setup {
    fn calc(&self) -> CalculatorClient {
        CalculatorClient::new(&self.caller.peer("calc-1"), "calc")
    }
}

/// Long enough for anything that should happen at once, short against every default.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    timeout(Duration::from_secs(10), f).await.expect("in time")
}

#[tokio::test]
async fn routed_call_returns_the_result() {
    let s = setup().await;
    assert_eq!(within(s.calc().add(2, 3)).await.expect("call"), 5);
    assert_eq!(s.broker.names(), ["app", "calc-1"]);
    // Many at once, over the one connection each side has to the broker.
    let calc = s.calc();
    let calls = (0..100).map(|i| {
        let calc = calc.clone();
        tokio::spawn(async move { calc.add(i, 1).await })
    });
    for (i, call) in calls.enumerate() {
        let sum = within(call).await.expect("task").expect("call");
        assert_eq!(sum, i as i64 + 1);
    }
    let stats = s.broker.stats();
    assert_eq!((stats.held_bytes, stats.queued), (0, 0), "{stats:?}");
}

#[tokio::test]
async fn typed_errors_and_panics_come_through() {
    let s = setup().await;
    match within(s.calc().div(1, 0)).await {
        Err(CallError::App { error, remote }) => {
            assert_eq!(error, CalcError::DivisionByZero);
            assert_eq!(remote.message, "division by zero");
        }
        other => panic!("expected the app error, got {other:?}"),
    }
    match within(s.calc().boom()).await {
        Err(CallError::RemotePanic { message }) => {
            assert!(message.contains("the calculator exploded"), "{message}")
        }
        other => panic!("expected a remote panic, got {other:?}"),
    }
    // The callee keeps serving.
    assert_eq!(within(s.calc().add(1, 1)).await.expect("call"), 2);
}

#[tokio::test]
async fn a_signal_reaches_the_named_peer() {
    let mut s = setup().await;
    within(
        s.calc()
            .with_ttl(Duration::from_secs(2))
            .note("hello".into()),
    )
    .await
    .expect("queued");
    assert_eq!(within(s.probe.notes.recv()).await.as_deref(), Some("hello"));
}

#[tokio::test]
async fn an_unknown_name_fails_at_once() {
    let s = setup().await;
    let nobody = CalculatorClient::new(&s.caller.peer("calc-9"), "calc")
        .with_deadline(Duration::from_secs(3600));
    match within(nobody.add(1, 2)).await {
        Err(CallError::NoSuchPeer { peer }) => assert_eq!(peer, "calc-9"),
        other => panic!("expected NoSuchPeer, got {other:?}"),
    }
    assert_eq!(s.broker.stats().no_such_peer, 1);
    // An object the named peer does not host is the callee's answer, as directly.
    let wrong = CalculatorClient::new(&s.caller.peer("calc-1"), "abacus");
    assert!(matches!(
        within(wrong.add(1, 2)).await,
        Err(CallError::NoSuchObject { .. })
    ));
}

#[tokio::test]
async fn a_name_held_by_a_connected_peer_is_refused_or_taken_over() {
    let s = setup().await;
    let address = s.broker.addresses()[0].clone();
    match chatter_broker::connect(&address, "calc-1").await {
        Err(BusError::Refused(RegisterError::NameTaken { name })) => assert_eq!(name, "calc-1"),
        other => panic!("expected NameTaken, got {other:?}"),
    }
    match chatter_broker::connect(&address, "a/b").await {
        Err(BusError::Refused(RegisterError::InvalidName { .. })) => {}
        other => panic!("expected InvalidName, got {other:?}"),
    }
    match s.caller.claim("other", false).await {
        Err(BusError::Refused(RegisterError::AlreadyRegistered { name })) => {
            assert_eq!(name, "app")
        }
        other => panic!("expected AlreadyRegistered, got {other:?}"),
    }
    // The original holder still serves.
    assert_eq!(within(s.calc().add(1, 2)).await.expect("call"), 3);

    // Taking over disconnects the holder and gives the name to the newcomer.
    let usurper =
        chatter_broker::connect_with(&address, "calc-1", BusOptions::new().take_over(true))
            .await
            .expect("take over");
    let cause = within(s.callee.closed()).await;
    assert!(cause.to_string().contains("taken over"), "{cause}");
    // The newcomer serves nothing yet: the call reaches it, not the old holder.
    assert!(matches!(
        within(s.calc().add(1, 2)).await,
        Err(CallError::NoSuchObject { .. })
    ));
    drop(usurper);
}

#[tokio::test]
async fn the_callees_disconnect_fails_the_call_in_flight() {
    let mut s = setup().await;
    let calc = s.calc().with_deadline(Duration::from_secs(3600));
    let call = tokio::spawn(async move { calc.wait().await });
    within(s.probe.started.recv())
        .await
        .expect("handler started");
    // Cut off, not closed gracefully (which answers running calls with `Cancelled`).
    let conn = s.callee.connection().expect("connected");
    conn.close().await;
    match within(call).await.expect("task") {
        Err(e @ CallError::PeerLost { .. }) => {
            assert!(e.to_string().contains("calc-1"), "{e}");
            assert!(e.is_outcome_unknown());
        }
        other => panic!("expected PeerLost, got {other:?}"),
    }
    // And the name is free again.
    match within(s.calc().add(1, 1)).await {
        Err(CallError::NoSuchPeer { .. }) => {}
        other => panic!("expected NoSuchPeer, got {other:?}"),
    }
}

#[tokio::test]
async fn dropping_the_call_cancels_the_handler() {
    let mut s = setup().await;
    let calc = s.calc().with_deadline(Duration::from_secs(3600));
    let call = tokio::spawn(async move { calc.wait().await });
    within(s.probe.started.recv())
        .await
        .expect("handler started");
    call.abort();
    // The cancel went through the broker, with the call's id on the callee's connection.
    within(s.probe.dropped.recv())
        .await
        .expect("handler dropped");
    // The callee's `cancelled` reply found no caller: nothing is left in the broker.
    assert_eq!(within(s.calc().add(1, 1)).await.expect("call"), 2);
}

#[tokio::test]
async fn a_callers_disconnect_cancels_its_calls() {
    let mut s = setup().await;
    let calc = s.calc().with_deadline(Duration::from_secs(3600));
    let _call = tokio::spawn(async move { calc.wait().await });
    within(s.probe.started.recv())
        .await
        .expect("handler started");
    s.caller.close().await;
    within(s.probe.dropped.recv())
        .await
        .expect("handler dropped");
    // The callee's answer to the cancel had nobody to go to; the broker dropped it and
    // serves the next caller.
    let address = s.broker.addresses()[0].clone();
    let next = chatter_broker::connect(&address, "app-2")
        .await
        .expect("connects");
    let calc = CalculatorClient::new(&next.peer("calc-1"), "calc");
    assert_eq!(within(calc.add(2, 2)).await.expect("call"), 4);
    assert!(s.broker.stats().discarded >= 1);
}

#[tokio::test(start_paused = true)]
async fn the_deadline_holds_through_the_broker() {
    let mut s = setup().await;
    let start = tokio::time::Instant::now();
    let err = s
        .calc()
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
    // The callee got the deadline too, and dropped the handler when it passed.
    s.probe.dropped.recv().await.expect("handler dropped");
}

/// A callee that never finishes its handlers stops taking requests; the broker then holds
/// at most the caller's window of them, and the caller waits.
#[tokio::test]
async fn a_slow_callee_does_not_make_the_broker_buffer_without_bound() {
    const WINDOW: u32 = 64 * 1024;
    let small = Options::default()
        .receive_window(WINDOW)
        .max_frame_size(WINDOW - 64);
    let options = BrokerOptions::new().connection(small.clone());
    let callee_options = BusOptions::new()
        .connection(small)
        .peer(PeerOptions::default().max_concurrent_handlers(1));
    let mut s = setup_with(options, callee_options).await;
    let calc = s.calc().with_deadline(Duration::from_secs(3600));
    // One handler runs and never ends; everything after it waits at the callee, then in
    // the broker, then at the caller.
    let first = tokio::spawn({
        let calc = calc.clone();
        async move { calc.wait().await }
    });
    within(s.probe.started.recv())
        .await
        .expect("handler started");
    let text = "x".repeat(1000);
    let mut sent = 0;
    let mut stalled = false;
    for _ in 0..2000 {
        let note = calc.with_ttl(Duration::from_secs(3600)).note(text.clone());
        match timeout(Duration::from_millis(200), note).await {
            Ok(result) => {
                result.expect("signal queued");
                sent += 1;
            }
            Err(_) => {
                stalled = true;
                break;
            }
        }
    }
    let held = s.broker.stats().held_bytes;
    assert!(
        held > 0,
        "the broker holds nothing: the test did not fill it"
    );
    assert!(
        held <= u64::from(WINDOW) * 2,
        "the broker holds {held} bytes, over its windows ({WINDOW} per connection)"
    );
    assert!(
        stalled || s.caller.queued() > 0,
        "the caller never had to wait ({sent} signals sent)"
    );
    // Released, everything drains: the broker gives its credit back.
    s.probe.release.notify_waiters();
    assert_eq!(within(first).await.expect("task").expect("call"), 42);
    s.probe.release.notify_one();
    within(async {
        while s.broker.stats().held_bytes > 0 {
            s.probe.notes.recv().await;
        }
    })
    .await;
}

#[tokio::test]
async fn streams_go_through_both_ways() {
    let s = setup().await;
    // A result stream larger than the caller's stream window: credit goes back through
    // the broker (`[15, call, bytes]` rewritten to the callee's call id).
    let mut items = within(s.calc().count(20_000)).await.expect("stream opens");
    let mut expected = 0;
    while let Some(item) = within(items.recv()).await {
        assert_eq!(item.expect("item"), expected);
        expected += 1;
    }
    assert_eq!(expected, 20_000);
    // An argument stream: `[14, call]` opens its own conversation through the broker.
    let (tx, rx) = stream::channel(4);
    let feed = tokio::spawn(async move {
        for i in 0..1000u32 {
            if tx.send(i).await.is_err() {
                break;
            }
        }
    });
    assert_eq!(within(s.calc().sum(rx)).await.expect("sum"), 999 * 1000 / 2);
    within(feed).await.expect("feeder");
    let stats = s.broker.stats();
    assert_eq!((stats.held_bytes, stats.queued), (0, 0), "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn a_signal_that_outlives_its_ttl_in_the_broker_is_dropped() {
    const WINDOW: u32 = 16 * 1024;
    let small = Options::default()
        .receive_window(WINDOW)
        .max_frame_size(WINDOW - 64);
    let callee_options = BusOptions::new()
        .connection(small)
        .peer(PeerOptions::default().max_concurrent_handlers(1));
    let mut s = setup_with(BrokerOptions::default(), callee_options).await;
    let calc = s.calc().with_deadline(Duration::from_secs(3600));
    let first = tokio::spawn({
        let calc = calc.clone();
        async move { calc.wait().await }
    });
    s.probe.started.recv().await.expect("handler started");
    // Fill the callee's window with signals it cannot start, so that later ones wait in
    // the broker; each has a 1 s TTL.
    let text = "y".repeat(1000);
    for _ in 0..40 {
        calc.with_ttl(Duration::from_secs(1))
            .note(text.clone())
            .await
            .expect("queued");
    }
    let waiting = async {
        while s.broker.stats().queued == 0 {
            tokio::task::yield_now().await;
        }
    };
    within(waiting).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.probe.release.notify_one();
    assert_eq!(first.await.expect("task").expect("call"), 42);
    // Whatever waited in the broker for more than its TTL never reaches the handler.
    let expired = async {
        while s.broker.stats().signals_expired == 0 {
            tokio::task::yield_now().await;
        }
    };
    within(expired).await;
    assert_eq!(s.broker.stats().queued, 0);
}

/// A peer that speaks chatter-core but sends envelopes the broker cannot route: each is
/// answered (when it passed the turn) or dropped, and the broker keeps serving.
#[tokio::test]
async fn garbage_envelopes_are_answered_or_dropped_never_fatal() {
    use chatter_core::SendOptions;
    let s = setup().await;
    let raw = chatter_core::connect(&s.broker.addresses()[0], Options::default())
        .await
        .expect("connects");
    let request = || SendOptions::new().last(false);
    let cases: [&[u8]; 5] = [
        // not MessagePack at all, a bare integer, an unknown kind, a call with too few
        // elements, a call whose duration is negative: answered (they pass the turn)
        b"\xc1",
        &[0x05],
        &[0x92, 0x63, 0x00],
        &[0x93, 0x00, 0xa1, 0x78, 0xa1, 0x79],
        &[0x95, 0x00, 0xa3, 0x61, 0x2f, 0x62, 0xa1, 0x6d, 0xff, 0xc0],
    ];
    for payload in cases {
        let conv = raw.send_bytes(payload, request()).await.expect("sent");
        let reply = within(raw.receive()).await.expect("answered");
        assert_eq!(reply.conversation, conv);
        assert!(reply.last);
        // `[2, 7, "…"]`: a protocol failure.
        assert_eq!(&reply.payload[..3], &[0x93, 0x02, 0x07], "{payload:x?}");
    }
    // One-shots nobody may answer: a cancel of a call that does not exist, garbage, an ack
    // for a stream nobody sent. Dropped.
    for payload in [
        &[0x92, 0x02, 0x07][..],
        b"\xc1",
        &[0x94, 0x04, 0x01, 0x01, 0x00],
    ] {
        raw.send_bytes(payload, SendOptions::new())
            .await
            .expect("sent");
    }
    // Still serving, this connection and the others.
    assert_eq!(within(s.calc().add(1, 2)).await.expect("call"), 3);
    let ping = [0x95, 0x00, 0xa3, 0x61, 0x2f, 0x62, 0xa1, 0x6d, 0x05, 0xc0]; // a/b.m()
    let conv = raw.send_bytes(&ping, request()).await.expect("sent");
    let reply = within(raw.receive()).await.expect("answered");
    assert_eq!(reply.conversation, conv);
    // `[2, 11, "a"]`: nobody is `a`.
    assert_eq!(&reply.payload[..], &[0x93, 0x02, 0x0b, 0xa1, 0x61]);
    let stats = s.broker.stats();
    assert!(stats.discarded >= 3, "{stats:?}");
}

/// A result stream whose callee vanishes ends with `ConnectionLost` naming the peer (the
/// broker's failure 12 inside the stream); it does not hang.
#[tokio::test]
async fn a_stream_whose_callee_vanishes_ends_with_an_error() {
    let s = setup().await;
    let mut items = within(s.calc().count(u32::MAX))
        .await
        .expect("stream opens");
    assert_eq!(within(items.recv()).await.map(Result::ok), Some(Some(0)));
    let conn = s.callee.connection().expect("connected");
    conn.close().await;
    let error = within(async {
        loop {
            match items.recv().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => break e,
                None => panic!("the stream ended without an error"),
            }
        }
    })
    .await;
    assert!(
        matches!(&error, chatter_rpc::stream::StreamError::ConnectionLost(m) if m.contains("calc-1")),
        "{error:?}"
    );
}

/// Acknowledged (reliable) signals: the broker relays them and routes the receiver's ack
/// back to the sender, so `Sent::acknowledged` means "the handler finished" through the
/// broker too; two senders with the same stream id do not collide at the receiver.
#[tokio::test]
async fn acknowledged_signals_are_acknowledged_end_to_end() {
    use chatter_rpc::AckError;
    let mut s = setup().await;
    let address = s.broker.addresses()[0].clone();
    let acked = || BusOptions::new().peer(PeerOptions::default().acknowledged_signals(true));
    let a = chatter_broker::connect_with(&address, "a", acked())
        .await
        .expect("connects");
    let b = chatter_broker::connect_with(&address, "b", acked())
        .await
        .expect("connects");
    let to_calc = |bus: &Bus| CalculatorClient::new(&bus.peer("calc-1"), "calc");
    for i in 0..3 {
        for (bus, who) in [(&a, "a"), (&b, "b")] {
            let sent = within(to_calc(bus).note(format!("{who}{i}")))
                .await
                .expect("queued");
            within(sent.acknowledged(Duration::from_secs(5)))
                .await
                .expect("acknowledged: the handler ran");
        }
    }
    let mut heard = Vec::new();
    for _ in 0..6 {
        heard.push(within(s.probe.notes.recv()).await.expect("note"));
    }
    // Each sender's signals arrive once, in order: the receiver deduplicates per stream,
    // so a collision would have dropped one sender's signals as duplicates.
    assert_eq!(heard, ["a0", "b0", "a1", "b1", "a2", "b2"]);
    // A reliable signal to a name nobody holds is acked as failed at once.
    let nobody = CalculatorClient::new(&a.peer("calc-9"), "calc");
    let sent = within(nobody.note("lost".into())).await.expect("queued");
    assert!(matches!(
        within(sent.acknowledged(Duration::from_secs(5))).await,
        Err(AckError::Failed)
    ));
}

/// Two senders that chose the same stream id for their reliable signals: the receiver,
/// which hears both over its one connection to the broker, must not take the second
/// sender's signal for a duplicate of the first's. The broker gives the second another id
/// there, and each ack goes back to its sender with the sender's own id.
#[tokio::test]
async fn colliding_stream_ids_of_two_senders_are_told_apart() {
    use chatter_core::{Event, SendOptions};
    let mut s = setup().await;
    let address = s.broker.addresses()[0].clone();
    // `[3, 7, 1, "calc-1/calc", "note", 5000, [text]]`
    let signal = |text: u8| {
        let mut p = vec![0x97, 0x03, 0x07, 0x01, 0xab];
        p.extend_from_slice(b"calc-1/calc");
        p.push(0xa4);
        p.extend_from_slice(b"note");
        p.extend_from_slice(&[0xcd, 0x13, 0x88, 0x91, 0xa1, text]);
        p
    };
    let mut senders = Vec::new();
    for text in [b'x', b'y'] {
        let raw = chatter_core::connect(&address, Options::default())
            .await
            .expect("connects");
        raw.send_bytes(&signal(text), SendOptions::new())
            .await
            .expect("sent");
        senders.push(raw);
    }
    let mut heard = vec![
        within(s.probe.notes.recv()).await.expect("note"),
        within(s.probe.notes.recv()).await.expect("note"),
    ];
    heard.sort();
    assert_eq!(heard, ["x", "y"]);
    for raw in &senders {
        let Event::Message(ack) = within(raw.next_event()).await.expect("ack") else {
            panic!("not a message");
        };
        // `[4, 7, 1, 0]`: stream 7 (its own id), seq 1, handled.
        assert_eq!(&ack.payload[..], &[0x94, 0x04, 0x07, 0x01, 0x00]);
    }
}

/// A peer with as many conversations open through the broker as the broker allows gets
/// no more: the next call fails with `PeerBusy` instead of the peer closing its
/// connection for too many conversations.
#[tokio::test]
async fn a_peer_at_its_route_limit_is_busy() {
    let mut s = setup_with(
        BrokerOptions::new().max_routes_per_peer(2),
        BusOptions::new(),
    )
    .await;
    let calc = s.calc().with_deadline(Duration::from_secs(3600));
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let calc = calc.clone();
        waiting.push(tokio::spawn(async move { calc.wait().await }));
        within(s.probe.started.recv())
            .await
            .expect("handler started");
    }
    match within(calc.add(1, 1)).await {
        Err(CallError::PeerBusy { what }) => assert!(what.contains("calc-1"), "{what}"),
        other => panic!("expected PeerBusy, got {other:?}"),
    }
    assert_eq!(s.broker.stats().busy, 1);
    // Once one ends, there is room again.
    s.probe.release.notify_one();
    let done = within(futures_first(waiting)).await;
    assert_eq!(done, 42);
    assert_eq!(within(calc.add(1, 1)).await.expect("call"), 2);
}

/// The value of whichever task finishes first.
async fn futures_first(tasks: Vec<tokio::task::JoinHandle<Result<i64, CallError>>>) -> i64 {
    // Unbounded: at most one value per task given.
    let (tx, mut rx) = mpsc::unbounded_channel();
    for task in tasks {
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Ok(Ok(v)) = task.await {
                let _ = tx.send(v);
            }
        });
    }
    rx.recv().await.expect("one finishes")
}

/// With `slow_peer_timeout`, a peer that gives back no credit while messages wait for it
/// is disconnected, and what waited is dropped (its senders' credit comes back).
#[tokio::test(start_paused = true)]
async fn a_peer_that_takes_nothing_is_disconnected_after_the_slow_peer_timeout() {
    const WINDOW: u32 = 16 * 1024;
    let small = Options::default()
        .receive_window(WINDOW)
        .max_frame_size(WINDOW - 64);
    let options = BrokerOptions::new().slow_peer_timeout(Some(Duration::from_secs(5)));
    let callee_options = BusOptions::new()
        .connection(small)
        .peer(PeerOptions::default().max_concurrent_handlers(1));
    let mut s = setup_with(options, callee_options).await;
    let calc = s.calc().with_deadline(Duration::from_secs(3600));
    let _first = tokio::spawn({
        let calc = calc.clone();
        async move { calc.wait().await }
    });
    s.probe.started.recv().await.expect("handler started");
    let text = "z".repeat(1000);
    for _ in 0..40 {
        calc.with_ttl(Duration::from_secs(3600))
            .note(text.clone())
            .await
            .expect("queued");
    }
    let cause = within(s.callee.closed()).await;
    assert!(cause.to_string().contains("slow_peer_timeout"), "{cause}");
    assert_eq!(s.broker.stats().slow_peers_closed, 1);
    // The caller is not stuck: its calls fail at once now (the peer is lost, or its name
    // already gone).
    match within(calc.add(1, 1)).await {
        Err(CallError::NoSuchPeer { .. } | CallError::PeerLost { .. }) => {}
        other => panic!("expected NoSuchPeer or PeerLost, got {other:?}"),
    }
}
