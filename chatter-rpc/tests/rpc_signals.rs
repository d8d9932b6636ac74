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

/// A receiver whose only handler slot is taken, fed 1000-byte signals by a sender with
/// room for 4 in its outbox: received signals wait for the slot holding their credit, so
/// the sender runs out of credit. Returns the sender, the receiver, the receiver's probe,
/// the call holding the slot, and how many signals the sender accepted before a signal's
/// future had to wait.
async fn sender_out_of_credit() -> (
    Peer,
    Peer,
    common::Probe,
    tokio::task::JoinHandle<Result<String, chatter_rpc::CallError>>,
    usize,
) {
    let listen_options = Options::default().max_frame_size(2048).receive_window(4096);
    let (client_conn, server_conn) = common::connections(listen_options).await;
    let server = Peer::with_options(
        server_conn,
        PeerOptions::default().max_concurrent_handlers(1),
    );
    let (calc_impl, mut probe) = Calc::new();
    server.register("calc", CalculatorServer::new(calc_impl));
    let client = Peer::with_options(client_conn, PeerOptions::default().max_queued_signals(4));
    let calc = CalculatorClient::new(&client, "calc").with_ttl(Duration::from_secs(60));
    let busy = tokio::spawn(calc.wait("busy".into()));
    assert_eq!(within(probe.started.recv()).await.unwrap(), "busy");
    let text = "x".repeat(1000);
    let mut accepted = 0;
    loop {
        let send = calc.note(format!("{accepted} {text}"));
        match tokio::time::timeout(Duration::from_millis(100), send).await {
            Ok(sent) => {
                sent.unwrap();
                accepted += 1;
            }
            Err(_) => break, // waits for room
        }
        assert!(accepted < 100, "the outbox does not fill up");
    }
    (client, server, probe, busy, accepted)
}

/// A sender out of flow-control credit waits rather than fails or grows: its signals fill
/// the window and then its outbox up to its capacity, and the next signal's future waits
/// for room (`WhenFull::Wait`, the default), within its TTL: then it fails with `Expired`,
/// counted, never queued.
#[tokio::test(start_paused = true)]
async fn a_sender_out_of_credit_waits_for_room_within_the_ttl() {
    let (client, _server, _probe, _busy, accepted) = sender_out_of_credit().await;
    assert_eq!(client.queued(), 4, "the outbox holds its capacity, no more");
    assert!(accepted >= 4, "{accepted}");
    let calc = CalculatorClient::new(&client, "calc");
    let start = tokio::time::Instant::now();
    let late = calc
        .with_ttl(Duration::from_millis(300))
        .note("too late".into())
        .await;
    assert!(matches!(late, Err(SignalError::Expired)), "{late:?}");
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    let stats = client.stats();
    assert_eq!((stats.signals_expired, stats.signals_rejected), (1, 0));
    assert_eq!(client.queued(), 4);
}

/// After the sender waited (as above), the receiver's handler slot frees up: the waiting
/// signal is queued, and every accepted signal arrives, in order.
#[tokio::test(start_paused = true)]
async fn a_sender_that_waited_delivers_everything_once_the_receiver_catches_up() {
    let (client, server, mut probe, busy, accepted) = sender_out_of_credit().await;
    let calc = CalculatorClient::new(&client, "calc").with_ttl(Duration::from_secs(60));
    let waiting = tokio::spawn(calc.note(format!("{accepted} last")));
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished(), "waits while the outbox is full");
    probe.release.notify_waiters();
    busy.await.unwrap().unwrap();
    within(waiting).await.unwrap().unwrap();
    for i in 0..=accepted {
        let note = within(probe.notes.recv()).await.unwrap();
        assert!(note.starts_with(&format!("{i} ")), "{i}: {}", &note[..8]);
    }
    client.flush().await;
    assert_eq!(client.stats().signals_sent, accepted as u64 + 1);
    assert_eq!(server.stats().signals_delivered, accepted as u64 + 1);
}

/// A peer made from a connection reports its link as a reconnecting one does: connected,
/// then closed with a `Disconnected` event when the other side closes.
#[tokio::test(start_paused = true)]
async fn a_plain_peer_reports_its_state_and_its_disconnect() {
    let p = pair().await;
    let mut events = p.client.events();
    assert_eq!(p.client.state(), chatter_rpc::ConnectionState::Connected);
    assert!(p.client.wait_connected(Duration::from_secs(1)).await);
    assert_eq!(p.client.stats().connects, 1);
    p.server.close().await;
    let event = within(events.next()).await.expect("an event");
    assert!(
        matches!(event, chatter_rpc::PeerEvent::Disconnected { .. }),
        "{event:?}"
    );
    assert_eq!(p.client.state(), chatter_rpc::ConnectionState::Closed);
    assert!(p.client.connection().expect("its connection").is_closed());
    assert!(!p.client.wait_connected(Duration::from_secs(1)).await);
}
