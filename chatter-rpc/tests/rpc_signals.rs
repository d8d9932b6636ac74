//! Signals end to end: delivery, TTL expiry on the sending side (flow control) and on the
//! receiving side (no free handler slot), never delivered late, always counted.

mod common;

use std::time::Duration;

use chatter_core::Options;
use chatter_rpc::{Peer, PeerOptions, SignalError, WhenFull};
use common::{pair, pair_with, within, Calc, CalculatorClient, CalculatorServer};

#[tokio::test(start_paused = true)]
async fn signals_are_delivered_in_order() {
    let mut p = pair().await;
    for v in 1..=5 {
        p.calc.record(v).await.unwrap();
    }
    for v in 1..=5 {
        assert_eq!(within(p.probe.recorded.recv()).await.unwrap(), v);
    }
    p.calc.note("hello".into()).await.unwrap();
    assert_eq!(within(p.probe.notes.recv()).await.unwrap(), "hello");
    assert_eq!(p.client.stats().signals_sent, 6);
    assert_eq!(p.server.stats().signals_delivered, 6);
}

#[tokio::test(start_paused = true)]
async fn sending_a_signal_never_waits_for_the_handler() {
    let mut p = pair_with(
        PeerOptions::default().max_concurrent_handlers(1),
        Options::default(),
    )
    .await;
    let busy = tokio::spawn(p.calc.wait("busy".into()));
    assert_eq!(within(p.probe.started.recv()).await.unwrap(), "busy");
    // The callee's only handler slot is taken; sending returns at once all the same
    // (`record` is not async: there is nothing to wait for).
    p.calc.record(7).await.unwrap();
    p.probe.release.notify_waiters();
    busy.await.unwrap().unwrap();
    assert_eq!(within(p.probe.recorded.recv()).await.unwrap(), 7);
}

/// The receiver reads nothing, so flow control holds the later signals back; their TTL runs
/// out in the outbox, and they are dropped and counted, never sent late.
#[tokio::test(start_paused = true)]
async fn signal_whose_ttl_expires_before_delivery_is_dropped_and_counted() {
    let listen_options = Options::default().max_frame_size(2048).receive_window(4096);
    let (client_conn, server_conn) = common::connections(listen_options).await;
    let client = Peer::new(client_conn);
    let calc = CalculatorClient::new(&client, "calc").with_ttl(Duration::from_secs(1));
    let text = "x".repeat(1000);
    for i in 0..10 {
        calc.note(format!("{i} {text}")).await.unwrap();
    }
    assert!(client.stats().signals_sent < 10, "{:?}", client.stats());
    client.flush().await;
    let stats = client.stats();
    assert!(stats.signals_expired > 0, "{stats:?}");
    assert_eq!(stats.signals_sent + stats.signals_expired, 10, "{stats:?}");

    // Now the server starts serving: exactly the signals that were sent arrive, in order.
    let server = Peer::new(server_conn);
    let (calc_impl, mut probe) = Calc::new();
    server.register("calc", CalculatorServer::new(calc_impl));
    for i in 0..stats.signals_sent {
        let note = within(probe.notes.recv()).await.unwrap();
        assert!(note.starts_with(&format!("{i} ")), "{i}: {}", &note[..8]);
    }
    // A call round trip flushes anything else in flight; nothing late arrives.
    assert_eq!(calc.add(1, 1).await.unwrap(), 2);
    tokio::task::yield_now().await;
    assert!(probe.notes.try_recv().is_err());
    assert_eq!(server.stats().signals_delivered, stats.signals_sent);
}

/// A signal that reaches the callee but cannot start before its TTL (no free handler slot)
/// is dropped and counted on the callee.
#[tokio::test(start_paused = true)]
async fn signal_expiring_at_the_callee_is_not_delivered_late() {
    let mut p = pair_with(
        PeerOptions::default().max_concurrent_handlers(1),
        Options::default(),
    )
    .await;
    let busy = tokio::spawn(p.calc.wait("busy".into()));
    assert_eq!(within(p.probe.started.recv()).await.unwrap(), "busy");
    p.calc.note("too late".into()).await.unwrap(); // ttl = "1s" from the trait
                                                   // Virtual time: everything due within 2 s runs before this returns.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(p.server.stats().signals_expired_on_arrival, 1);
    p.probe.release.notify_waiters();
    busy.await.unwrap().unwrap();
    assert_eq!(p.calc.add(1, 1).await.unwrap(), 2);
    assert!(p.probe.notes.try_recv().is_err());
    assert_eq!(p.server.stats().signals_delivered, 0);
}

#[tokio::test(start_paused = true)]
async fn signal_on_a_closed_connection_fails() {
    let p = pair().await;
    p.client.close().await;
    let err = p.calc.record(1).await.unwrap_err();
    assert!(matches!(err, SignalError::ConnectionLost(_)), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn full_outbox_rejects_and_counts() {
    let listen_options = Options::default().max_frame_size(2048).receive_window(4096);
    let (client_conn, _server_conn) = common::connections(listen_options).await;
    let client = Peer::with_options(
        client_conn,
        PeerOptions::default()
            .max_queued_signals(2)
            .when_full(WhenFull::Error),
    );
    let calc = CalculatorClient::new(&client, "calc");
    let text = "x".repeat(1000);
    let mut rejected = 0;
    for _ in 0..10 {
        match calc.note(text.clone()).await {
            Ok(_sent) => {}
            Err(SignalError::OutboxFull) => rejected += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(rejected > 0);
    assert_eq!(client.stats().signals_rejected, rejected);
}

#[chatter_rpc::remote]
pub trait Fragile {
    #[signal]
    async fn crash(&self, message: String);
    async fn alive(&self) -> bool;
}

struct Crashy;

impl Fragile for Crashy {
    async fn crash(&self, message: String) {
        panic!("{message}")
    }
    async fn alive(&self) -> bool {
        true
    }
}

#[tokio::test(start_paused = true)]
async fn panicking_signal_handler_is_counted_and_the_peer_keeps_serving() {
    let (client_conn, server_conn) = common::connections(Options::default()).await;
    let server = Peer::new(server_conn);
    server.register("fragile", FragileServer::new(Crashy));
    let client = FragileClient::new(&Peer::new(client_conn), "fragile");
    client.crash("signal boom".into()).await.unwrap();
    // Calls after the signal are answered; the signal's handler ran (and panicked) first
    // or concurrently, so wait for the counter through a few round trips.
    assert!(client.alive().await.unwrap());
    within(async {
        while server.stats().handler_panics == 0 {
            assert!(client.alive().await.unwrap());
        }
    })
    .await;
    let stats = server.stats();
    assert_eq!((stats.handler_panics, stats.signals_failed), (1, 1));
}

#[test]
fn handles_are_send_and_sync() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<Peer>();
    check::<CalculatorClient>();
    check::<CalculatorServer<Calc>>();
}

#[tokio::test(start_paused = true)]
async fn signal_futures_stay_small() {
    // As call futures: awaiting moves a future, so its size is a cost per signal. The
    // reconnecting path's wait state is boxed so plain signals do not carry it.
    let mut p = pair().await;
    let signal = p.calc.record(9);
    let size = std::mem::size_of_val(&signal);
    println!("signal future: {size} bytes");
    assert!(size <= 128, "a signal future takes {size} bytes");
    signal.await.unwrap();
    assert_eq!(within(p.probe.recorded.recv()).await.unwrap(), 9);
}
