//! Reliable delivery end to end, over TCP through the fault-injecting proxy: reconnects,
//! calls across disconnects, the signal outbox (order, TTL, full policies), acknowledged
//! sends, persistent signals across a SIGKILL of the sender, graceful shutdown.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chatter_rpc::{
    connect, listen, serve, AckError, Backoff, CallError, ConnectionState, Options, Peer,
    PeerEvent, PeerOptions, ReconnectOptions, RpcServer, SignalError, SignalId, WhenFull,
};
use tests::numbers::{NumbersClient, NumbersServer, Recorder};
use tests::proxy::Proxy;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;

/// A server hosting `rec` as "numbers"; every accepted peer is also sent to the channel.
async fn numbers_server(
    options: PeerOptions,
    rec: Recorder,
) -> (RpcServer, SocketAddr, mpsc::UnboundedReceiver<Peer>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let listener = listen("tcp://127.0.0.1:0", Options::default())
        .await
        .expect("listen");
    let server = serve(listener, options, move |peer: &Peer| {
        peer.register("numbers", NumbersServer::new(rec.clone()));
        let _ = tx.send(peer.clone());
    });
    let addr = server.addresses()[0]
        .to_string()
        .trim_start_matches("tcp://")
        .parse()
        .expect("a socket address");
    (server, addr, rx)
}

fn fast() -> Backoff {
    Backoff::exponential(Duration::from_millis(10), Duration::from_millis(100)).jitter(0.0)
}

fn reconnecting(address: &str, deadline: Duration, options: ReconnectOptions) -> Peer {
    reconnecting_with(
        address,
        PeerOptions::default().default_deadline(deadline),
        options,
    )
}

fn reconnecting_with(address: &str, peer: PeerOptions, options: ReconnectOptions) -> Peer {
    Peer::reconnecting(address, Options::default(), peer, options).expect("a valid address")
}

async fn next_event(events: &mut chatter_rpc::Events) -> PeerEvent {
    tokio::time::timeout(Duration::from_secs(60), events.next())
        .await
        .expect("an event in time")
        .expect("the peer is alive")
}

#[tokio::test(start_paused = true)]
async fn reconnects_and_serves_registered_objects_again() {
    let (server, addr, mut accepted) =
        numbers_server(PeerOptions::default(), Recorder::default()).await;
    let proxy = Proxy::start(addr).await;
    let rp = reconnecting(
        &proxy.address(),
        Duration::from_secs(5),
        ReconnectOptions::default().backoff(fast()),
    );
    let mut events = rp.events();
    rp.register("client-numbers", NumbersServer::new(Recorder::default()));
    assert!(matches!(
        next_event(&mut events).await,
        PeerEvent::Connected { .. }
    ));
    assert_eq!(rp.state(), ConnectionState::Connected);
    let numbers = NumbersClient::new(&rp, "numbers");
    assert_eq!(numbers.echo(1).await.expect("call"), 1);
    let first = accepted.recv().await.expect("accepted");
    let back = NumbersClient::new(&first, "client-numbers");
    assert_eq!(back.echo(10).await.expect("callback"), 10);

    proxy.cut_all();
    assert!(matches!(
        next_event(&mut events).await,
        PeerEvent::Disconnected { .. }
    ));
    match next_event(&mut events).await {
        PeerEvent::Reconnecting { attempt, delay, .. } => {
            assert_eq!(attempt, 1);
            assert_eq!(delay, Duration::from_millis(10));
        }
        other => panic!("expected Reconnecting, got {other:?}"),
    }
    assert!(matches!(
        next_event(&mut events).await,
        PeerEvent::Connected { .. }
    ));
    // The object registered on the reconnecting peer is served on the new connection.
    let second = accepted.recv().await.expect("accepted again");
    let back = NumbersClient::new(&second, "client-numbers");
    assert_eq!(back.echo(20).await.expect("callback after reconnect"), 20);
    assert_eq!(numbers.echo(2).await.expect("call after reconnect"), 2);
    assert_eq!(rp.stats().connects, 2);
    rp.close().await;
    assert_eq!(rp.state(), ConnectionState::Closed);
    server.close().await;
}

#[tokio::test(start_paused = true)]
async fn call_while_disconnected_waits_for_the_reconnect_within_its_deadline() {
    let (server, addr, _accepted) =
        numbers_server(PeerOptions::default(), Recorder::default()).await;
    let proxy = Proxy::start(addr).await;
    proxy.refuse(true);
    let rp = reconnecting(
        &proxy.address(),
        Duration::from_secs(1),
        ReconnectOptions::default().backoff(fast()),
    );
    let numbers = NumbersClient::new(&rp, "numbers");
    let start = Instant::now();
    let err = numbers.echo(1).await.expect_err("nothing to connect to");
    assert!(matches!(err, CallError::NotConnected { .. }), "{err:?}");
    assert!(err.to_string().contains("not connected"), "{err}");
    assert_eq!(start.elapsed(), Duration::from_secs(1));

    // A call made while disconnected succeeds if the connection comes back in time.
    let call = tokio::spawn(numbers.with_deadline(Duration::from_secs(5)).echo(2));
    tokio::task::yield_now().await;
    proxy.refuse(false);
    assert_eq!(call.await.expect("task").expect("call after reconnect"), 2);

    // With `Backoff::never()`, the peer gives up and calls fail at once.
    proxy.refuse(true);
    let once = reconnecting(
        &proxy.address(),
        Duration::from_secs(30),
        ReconnectOptions::default().backoff(Backoff::never()),
    );
    let mut events = once.events();
    assert!(matches!(
        next_event(&mut events).await,
        PeerEvent::GaveUp { .. }
    ));
    assert_eq!(once.state(), ConnectionState::Closed);
    let start = Instant::now();
    let err = NumbersClient::new(&once, "numbers")
        .echo(3)
        .await
        .expect_err("closed");
    assert!(matches!(err, CallError::NotConnected { .. }), "{err:?}");
    assert!(err.to_string().contains("gave up"), "{err}");
    assert_eq!(start.elapsed(), Duration::ZERO);
    let refused = NumbersClient::new(&once, "numbers").number(4).await;
    assert!(
        matches!(refused, Err(SignalError::NotConnected(_))),
        "{refused:?}"
    );
    server.close().await;
}

#[tokio::test(start_paused = true)]
async fn lost_reply_is_outcome_unknown_unless_the_method_is_idempotent() {
    let rec = Recorder::default();
    let (server, addr, _accepted) = numbers_server(PeerOptions::default(), rec.clone()).await;
    let proxy = Proxy::start(addr).await;
    let rp = reconnecting(
        &proxy.address(),
        Duration::from_secs(10),
        ReconnectOptions::default().backoff(fast()),
    );
    let numbers = NumbersClient::new(&rp, "numbers");

    let call = tokio::spawn(numbers.slow(1_000));
    rec.started.notified().await;
    proxy.cut_all();
    let err = call.await.expect("task").expect_err("the reply was lost");
    assert!(matches!(err, CallError::OutcomeUnknown(_)), "{err:?}");
    assert!(err.is_outcome_unknown());
    assert!(err.to_string().contains("outcome unknown"), "{err}");
    assert_eq!(
        *rec.calls.lock().expect("lock"),
        1,
        "at most once: not re-sent"
    );

    let call = tokio::spawn(numbers.slow_idempotent(1_000));
    rec.started.notified().await;
    proxy.cut_all();
    let n = call
        .await
        .expect("task")
        .expect("re-sent after the reconnect");
    assert_eq!(n, 3, "the idempotent call ran again on the new connection");
    server.close().await;
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Cut(u64),
    Stall(u64),
    Delay(u64),
    None,
}

#[tokio::test(start_paused = true)]
async fn no_call_hangs_past_its_deadline_whatever_the_cut_point() {
    let (server, addr, _accepted) =
        numbers_server(PeerOptions::default(), Recorder::default()).await;
    let proxy = Proxy::start(addr).await;
    let deadline = Duration::from_secs(2);
    let mut faults = vec![Fault::None];
    for bytes in [
        0, 1, 2, 7, 16, 31, 48, 64, 90, 128, 170, 256, 400, 700, 1_200,
    ] {
        faults.push(Fault::Cut(bytes));
        faults.push(Fault::Stall(bytes));
    }
    faults.extend([Fault::Delay(500), Fault::Delay(3_000)]);
    let mut oks = 0;
    let mut failures = HashSet::new();
    for fault in faults {
        proxy.heal();
        match fault {
            Fault::Cut(b) => proxy.cut_after(b),
            Fault::Stall(b) => proxy.stall_after(b),
            Fault::Delay(ms) => proxy.delay(Duration::from_millis(ms)),
            Fault::None => {}
        }
        let rp = reconnecting(
            &proxy.address(),
            deadline,
            ReconnectOptions::default().backoff(fast()),
        );
        let numbers = NumbersClient::new(&rp, "numbers");
        for method in 0..2 {
            let start = Instant::now();
            let call = async {
                if method == 0 {
                    numbers.echo(7).await
                } else {
                    numbers.slow_idempotent(10).await.map(|_| 7)
                }
            };
            let result = tokio::time::timeout(deadline * 5, call)
                .await
                .unwrap_or_else(|_| panic!("{fault:?}: the call hung past its deadline"));
            let took = start.elapsed();
            assert!(took <= deadline, "{fault:?}: returned after {took:?}");
            match result {
                Ok(v) => {
                    assert_eq!(v, 7);
                    oks += 1;
                }
                Err(e) => {
                    failures.insert(std::mem::discriminant(&e));
                }
            }
        }
        rp.close().await;
        proxy.cut_all();
    }
    assert!(oks >= 2, "calls without faults succeed");
    assert!(
        failures.len() >= 2,
        "the faults produced different failures"
    );
    server.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_signals_through_repeated_cuts_arrive_once_in_order_or_are_reported() {
    const N: u64 = 3_000;
    let rec = Recorder::default();
    let (server, addr, _accepted) =
        numbers_server(PeerOptions::default().ordered_signals(true), rec.clone()).await;
    let proxy = Proxy::start(addr).await;
    // A few hundred signals' (and acknowledgements') worth of bytes per connection: cuts
    // land everywhere, in the middle of frames too.
    proxy.cut_randomly(0x5eed, 5_000, 15_000);
    let rp = reconnecting_with(
        &proxy.address(),
        PeerOptions::default()
            .default_deadline(Duration::from_secs(5))
            .max_queued_signals(N as usize),
        ReconnectOptions::default().backoff(Backoff::exponential(
            Duration::from_millis(1),
            Duration::from_millis(20),
        )),
    );
    let mut events = rp.events();
    let numbers = NumbersClient::new(&rp, "numbers");
    let mut ids: HashMap<SignalId, u64> = HashMap::new();
    for n in 0..N {
        let sent = match n {
            // Already expired: must be reported, never delivered.
            n if n % 97 == 0 => numbers.with_ttl(Duration::ZERO).number(n).await,
            // Tight: delivered or reported, either way.
            n if n % 13 == 0 => numbers.with_ttl(Duration::from_millis(5)).number(n).await,
            n => numbers.number(n).await,
        }
        .expect("queued");
        ids.insert(sent.id().expect("tracked"), n);
    }
    if tokio::time::timeout(Duration::from_secs(20), rp.flush())
        .await
        .is_err()
    {
        panic!(
            "not flushed: {:?}, queued {}, state {:?}, connections {}, handled {}",
            rp.stats(),
            rp.queued(),
            rp.state(),
            proxy.connections(),
            rec.handled().len()
        );
    }

    let mut expired: HashMap<u64, bool> = HashMap::new();
    while let Some(event) = events.try_next() {
        match event {
            PeerEvent::SignalExpired {
                id,
                maybe_delivered,
            } => {
                expired.insert(ids[&id], maybe_delivered);
            }
            PeerEvent::SignalDropped { id, .. } | PeerEvent::SignalFailed { id } => {
                panic!("signal {} was dropped or failed", ids[&id])
            }
            _ => {}
        }
    }
    let handled = rec.handled();
    assert!(
        handled.windows(2).all(|w| w[0] < w[1]),
        "handled out of order or twice"
    );
    let handled_set: HashSet<u64> = handled.iter().copied().collect();
    for n in 0..N {
        match (handled_set.contains(&n), expired.get(&n)) {
            (true, Some(false)) => panic!("{n} was handled and reported as never delivered"),
            (false, None) => panic!("{n} was lost silently"),
            _ => {}
        }
        if n % 97 == 0 {
            assert!(!handled_set.contains(&n), "{n} was delivered after its TTL");
        }
    }
    let stats = rp.stats();
    assert_eq!(stats.signals_queued, N);
    assert_eq!(stats.signals_acknowledged + stats.signals_expired, N);
    // Handled but not acknowledged: only those reported "expired, maybe delivered".
    let maybe = expired.values().filter(|m| **m).count();
    assert!(stats.signals_acknowledged as usize <= handled.len());
    assert!(handled.len() - stats.signals_acknowledged as usize <= maybe);
    assert!(
        proxy.connections() >= 10,
        "only {} connections",
        proxy.connections()
    );
    assert!(stats.signals_resent > 0, "no signal was in flight at a cut");
    assert!(
        handled.len() as u64 > N * 8 / 10,
        "only {} handled",
        handled.len()
    );
    rp.close().await;
    server.close().await;
}

#[tokio::test(start_paused = true)]
async fn signals_whose_ttl_runs_out_while_disconnected_are_reported_not_delivered() {
    let rec = Recorder::default();
    let (server, addr, _accepted) = numbers_server(PeerOptions::default(), rec.clone()).await;
    let proxy = Proxy::start(addr).await;
    proxy.refuse(true);
    let rp = reconnecting(
        &proxy.address(),
        Duration::from_secs(5),
        ReconnectOptions::default().backoff(fast()),
    );
    let mut events = rp.events();
    let numbers = NumbersClient::new(&rp, "numbers");
    let short = numbers.with_ttl(Duration::from_secs(1));
    let a = short.number(1).await.expect("queued");
    let b = short.number(2).await.expect("queued");
    let c = numbers.number(3).await.expect("queued");
    let (a_id, b_id) = (a.id().expect("id"), b.id().expect("id"));
    assert_eq!(b_id.seq, a_id.seq + 1);
    assert_eq!(
        a.acknowledged(Duration::from_secs(10)).await,
        Err(AckError::Expired {
            maybe_delivered: false
        })
    );
    let mut reported = Vec::new();
    while reported.len() < 2 {
        if let PeerEvent::SignalExpired {
            id,
            maybe_delivered,
        } = next_event(&mut events).await
        {
            assert!(!maybe_delivered);
            reported.push(id);
        }
    }
    assert_eq!(reported, vec![a_id, b_id]);
    assert_eq!(rp.stats().signals_expired, 2);
    proxy.refuse(false);
    c.acknowledged(Duration::from_secs(30))
        .await
        .expect("delivered after the reconnect");
    assert_eq!(rec.handled(), vec![3]);
    drop(b);
    server.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_full_outbox_refuses_drops_the_oldest_or_waits_as_configured() {
    let rec = Recorder::default();
    let (server, addr, _accepted) = numbers_server(PeerOptions::default(), rec.clone()).await;
    let proxy = Proxy::start(addr).await;
    proxy.refuse(true);

    let capacity = |when_full| {
        PeerOptions::default()
            .default_deadline(Duration::from_secs(5))
            .max_queued_signals(2)
            .when_full(when_full)
    };
    let refusing = reconnecting_with(
        &proxy.address(),
        capacity(WhenFull::Error),
        ReconnectOptions::default().backoff(fast()),
    );
    let numbers = NumbersClient::new(&refusing, "numbers");
    numbers.number(1).await.expect("queued");
    numbers.number(2).await.expect("queued");
    assert!(matches!(
        numbers.number(3).await,
        Err(SignalError::OutboxFull)
    ));
    assert_eq!(refusing.stats().signals_rejected, 1);

    let dropping = reconnecting_with(
        &proxy.address(),
        capacity(WhenFull::DropOldest),
        ReconnectOptions::default().backoff(fast()),
    );
    let mut events = dropping.events();
    let numbers = NumbersClient::new(&dropping, "numbers");
    let first = numbers.number(10).await.expect("queued");
    let first_id = first.id().expect("id");
    numbers.number(11).await.expect("queued");
    let last = numbers
        .number(12)
        .await
        .expect("queued, dropping the oldest");
    assert_eq!(
        first.acknowledged(Duration::from_secs(1)).await,
        Err(AckError::Dropped {
            maybe_delivered: false
        })
    );
    loop {
        if let PeerEvent::SignalDropped {
            id,
            maybe_delivered,
        } = next_event(&mut events).await
        {
            assert_eq!((id, maybe_delivered), (first_id, false));
            break;
        }
    }

    // Waiting for room: the signal's future resolves once it is queued, or fails when
    // its TTL runs out first.
    let waiting = reconnecting_with(
        &proxy.address(),
        capacity(WhenFull::Wait),
        ReconnectOptions::default().backoff(fast()),
    );
    let numbers = NumbersClient::new(&waiting, "numbers");
    numbers.number(20).await.expect("queued");
    numbers.number(21).await.expect("queued");
    let start = tokio::time::Instant::now();
    assert!(matches!(
        numbers
            .with_ttl(Duration::from_millis(300))
            .number(22)
            .await,
        Err(SignalError::Expired)
    ));
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    assert_eq!(waiting.stats().signals_expired, 1);
    assert_eq!(waiting.stats().signals_rejected, 0);
    let blocked = tokio::spawn({
        let numbers = numbers.clone();
        async move { numbers.number(23).await }
    });
    let room = tokio::spawn({
        let refusing = refusing.clone();
        async move { refusing.wait_for_room().await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!blocked.is_finished(), "waits while the outbox is full");
    assert_eq!(waiting.queued(), 2);
    proxy.refuse(false);
    last.acknowledged(Duration::from_secs(30))
        .await
        .expect("delivered");
    room.await.expect("room after delivery");
    blocked
        .await
        .expect("the task")
        .expect("queued once there was room")
        .acknowledged(Duration::from_secs(30))
        .await
        .expect("delivered");
    refusing.flush().await;
    waiting.flush().await;
    let mut handled = rec.handled();
    handled.sort_unstable();
    assert_eq!(handled, vec![1, 2, 11, 12, 20, 21, 23]);
    server.close().await;
}

#[tokio::test(start_paused = true)]
async fn acknowledged_send_resolves_when_the_handler_finished() {
    let gate = Arc::new(Semaphore::new(0));
    let rec = Recorder {
        gate: Some(gate.clone()),
        ..Recorder::default()
    };
    let (server, addr, _accepted) = numbers_server(PeerOptions::default(), rec.clone()).await;
    let rp = reconnecting(
        &format!("tcp://{addr}"),
        Duration::from_secs(5),
        ReconnectOptions::default(),
    );
    let numbers = NumbersClient::new(&rp, "numbers");
    let sent = numbers.number(5).await.expect("queued");
    let mut ack = tokio::spawn(sent.acknowledged(Duration::from_secs(30)));
    rec.entered.notified().await;
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut ack)
            .await
            .is_err(),
        "acknowledged before the handler finished"
    );
    gate.add_permits(1);
    ack.await.expect("task").expect("acknowledged");
    assert_eq!(rec.handled(), vec![5]);

    // Through a plain peer, acknowledgements are not supported, and say so.
    let plain = Peer::new(
        connect(&format!("tcp://{addr}"), Options::default())
            .await
            .expect("connect"),
    );
    let sent = NumbersClient::new(&plain, "numbers")
        .number(6)
        .await
        .expect("sent");
    assert_eq!(sent.id(), None);
    assert_eq!(
        sent.acknowledged(Duration::from_secs(1)).await,
        Err(AckError::NotSupported)
    );
    server.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_plain_peer_with_acknowledged_signals_learns_each_outcome() {
    // The server side pushes signals to a connected client (which hosts the object):
    // a plain `Peer` with `acknowledged_signals(true)`, like libchirp's synchronous mode.
    let listener = listen("tcp://127.0.0.1:0", Options::default())
        .await
        .expect("listen");
    let client = Peer::new(
        connect(&listener.addresses()[0], Options::default())
            .await
            .expect("connect"),
    );
    let gate = Arc::new(Semaphore::new(1));
    let rec = Recorder {
        gate: Some(gate.clone()),
        ..Recorder::default()
    };
    client.register("numbers", NumbersServer::new(rec.clone()));
    let server = Peer::with_options(
        listener.accept().await.expect("accept"),
        PeerOptions::default().acknowledged_signals(true),
    );
    let numbers = NumbersClient::new(&server, "numbers");

    // Handled: resolves once the handler finished.
    let first = numbers.number(1).await.expect("sent");
    let id = first.id().expect("an acknowledged signal has an id");
    first
        .acknowledged(Duration::from_secs(5))
        .await
        .expect("handled");
    assert_eq!(rec.handled(), vec![1]);

    // The receiver cannot run it: no such object.
    let missing = NumbersClient::new(&server, "nothing")
        .number(2)
        .await
        .expect("sent");
    assert_eq!(missing.id().expect("id").seq, id.seq + 1);
    assert_eq!(
        missing.acknowledged(Duration::from_secs(5)).await,
        Err(AckError::Failed)
    );

    // The receiver goes away while its handler waits: the sender learns it, no hang.
    let pending = numbers.number(4).await.expect("sent");
    rec.entered.notified().await; // for 1
    rec.entered.notified().await; // for 4: started, held by the gate
    client.close().await;
    let lost = pending.acknowledged(Duration::from_secs(60)).await;
    assert!(
        matches!(lost, Err(AckError::ConnectionLost { .. })),
        "{lost:?}"
    );
    assert!(matches!(
        numbers.number(5).await,
        Err(SignalError::ConnectionLost(_))
    ));
    assert_eq!(rec.handled(), vec![1]);
}

#[tokio::test(start_paused = true)]
async fn a_plain_peers_acknowledged_signal_that_expires_unsent_is_reported() {
    // The receiver never reads (a bare connection), so flow control holds signals back
    // once its small window is used up; those still waiting when their TTL runs out are
    // dropped, and their senders learn it.
    let listener = listen(
        "tcp://127.0.0.1:0",
        Options::default()
            .max_frame_size(1024)
            .receive_window(8 * 1024),
    )
    .await
    .expect("listen");
    let sender = Peer::with_options(
        connect(&listener.addresses()[0], Options::default())
            .await
            .expect("connect"),
        PeerOptions::default().acknowledged_signals(true),
    );
    let _silent = listener.accept().await.expect("accept");
    let numbers = NumbersClient::new(&sender, "numbers").with_ttl(Duration::from_secs(1));
    let mut sent = Vec::new();
    for n in 0..200 {
        sent.push(numbers.number(n).await.expect("accepted"));
    }
    assert!(sender.stats().signals_sent < 200, "{:?}", sender.stats());
    let last = sent.pop().expect("sent");
    assert_eq!(
        last.acknowledged(Duration::from_secs(10)).await,
        Err(AckError::Expired {
            maybe_delivered: false
        })
    );
    assert!(sender.stats().signals_expired > 0, "{:?}", sender.stats());
}

#[tokio::test(start_paused = true)]
async fn acknowledged_send_fails_instead_of_hanging_when_the_receiver_dies() {
    let gate = Arc::new(Semaphore::new(0));
    let rec = Recorder {
        gate: Some(gate.clone()),
        ..Recorder::default()
    };
    let (server, addr, _accepted) = numbers_server(PeerOptions::default(), rec.clone()).await;
    let proxy = Proxy::start(addr).await;
    let rp = reconnecting(
        &proxy.address(),
        Duration::from_secs(5),
        ReconnectOptions::default().backoff(fast()),
    );
    let numbers = NumbersClient::new(&rp, "numbers");
    let sent = numbers
        .with_ttl(Duration::from_secs(20))
        .number(1)
        .await
        .expect("queued");
    rec.entered.notified().await; // received, handler not finished
                                  // The receiver dies before its handler finished, and does not come back.
    server.close().await;
    proxy.refuse(true);
    proxy.cut_all();
    let start = Instant::now();
    let result = sent.acknowledged(Duration::from_secs(600)).await;
    assert_eq!(
        result,
        Err(AckError::Expired {
            maybe_delivered: true
        })
    );
    assert!(
        start.elapsed() <= Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    assert!(rec.handled().is_empty());
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_lets_a_slow_call_finish_and_refuses_new_ones() {
    let rec = Recorder::default();
    let (server, addr, _accepted) = numbers_server(PeerOptions::default(), rec.clone()).await;
    let client = Peer::new(
        connect(&format!("tcp://{addr}"), Options::default())
            .await
            .expect("connect"),
    );
    let numbers = NumbersClient::new(&client, "numbers");
    let slow = tokio::spawn(numbers.slow(3_000));
    rec.started.notified().await;
    let start = Instant::now();
    let (_, late) = tokio::join!(server.shutdown(Duration::from_secs(10)), async {
        // Polled after the shutdown began.
        numbers.echo(1).await
    });
    assert_eq!(
        slow.await
            .expect("task")
            .expect("finished within the grace"),
        1
    );
    assert!(matches!(late, Err(CallError::ShuttingDown)), "{late:?}");
    assert!(late
        .expect_err("refused")
        .to_string()
        .contains("shutting down"));
    assert_eq!(
        start.elapsed(),
        Duration::from_secs(3),
        "waited for the slow call only"
    );
    client.closed().await;

    // A reconnecting peer: queued signals are delivered before it closes; then calls and
    // signals are refused.
    let rec = Recorder::default();
    let (server, addr, _accepted) = numbers_server(PeerOptions::default(), rec.clone()).await;
    let rp = reconnecting(
        &format!("tcp://{addr}"),
        Duration::from_secs(5),
        ReconnectOptions::default(),
    );
    let numbers = NumbersClient::new(&rp, "numbers");
    for n in 0..5 {
        numbers.number(n).await.expect("queued");
    }
    rp.shutdown(Duration::from_secs(5)).await;
    let mut handled = rec.handled();
    handled.sort_unstable();
    assert_eq!(handled, vec![0, 1, 2, 3, 4]);
    assert_eq!(rp.state(), ConnectionState::Closed);
    assert!(matches!(
        numbers.echo(1).await,
        Err(CallError::ShuttingDown)
    ));
    assert!(matches!(
        numbers.number(9).await,
        Err(SignalError::ShuttingDown)
    ));
    server.close().await;
}

#[tokio::test(start_paused = true)]
async fn ordered_signals_are_handled_one_at_a_time_in_send_order() {
    for ordered in [false, true] {
        let (recorded_tx, mut recorded) = mpsc::unbounded_channel();
        let rec = Recorder {
            recorded: Some(recorded_tx),
            ..Recorder::default()
        };
        let (server, addr, _accepted) =
            numbers_server(PeerOptions::default().ordered_signals(ordered), rec.clone()).await;
        let address = format!("tcp://{addr}");
        // Earlier signals take longer: handled concurrently, they finish in reverse.
        let plain = Peer::new(
            connect(&address, Options::default())
                .await
                .expect("connect"),
        );
        let numbers = NumbersClient::new(&plain, "numbers");
        for n in 0..5 {
            numbers.paced(n, 50 - 10 * n).await.expect("sent");
        }
        let rp = reconnecting(
            &address,
            Duration::from_secs(5),
            ReconnectOptions::default(),
        );
        let reliable = NumbersClient::new(&rp, "numbers");
        for n in 10..15 {
            reliable.paced(n, 50 - 10 * (n - 10)).await.expect("queued");
        }
        for _ in 0..10 {
            recorded.recv().await.expect("recorded");
        }
        rp.flush().await;
        let handled = rec.handled();
        let plain_order: Vec<u64> = handled.iter().copied().filter(|n| *n < 10).collect();
        let reliable_order: Vec<u64> = handled.iter().copied().filter(|n| *n >= 10).collect();
        if ordered {
            assert_eq!(plain_order, vec![0, 1, 2, 3, 4]);
            assert_eq!(reliable_order, vec![10, 11, 12, 13, 14]);
        } else {
            assert_eq!(plain_order, vec![4, 3, 2, 1, 0], "concurrent by default");
            assert_eq!(
                reliable_order,
                vec![14, 13, 12, 11, 10],
                "concurrent by default"
            );
        }
        rp.close().await;
        server.close().await;
    }
}

#[cfg(feature = "persistence")] // the SQLite store
/// A store path of this test process (removed with its journal files by `remove`).
fn temp_store(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("chatter-{name}-{}.sqlite", std::process::id()));
    remove_store(&path);
    path
}

#[cfg(feature = "persistence")] // the SQLite store
fn remove_store(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

#[cfg(feature = "persistence")] // the SQLite store
#[tokio::test(start_paused = true)]
async fn only_persistent_signals_are_stored_and_a_restarted_stream_is_not_taken_for_old() {
    let rec = Recorder::default();
    let (server, addr, _accepted) = numbers_server(PeerOptions::default(), rec.clone()).await;
    let proxy = Proxy::start(addr).await;
    let store = temp_store("mixed");
    let with_store = || ReconnectOptions::default().backoff(fast()).store(&store);

    // Run 1: one persistent signal, then plain ones; all delivered.
    let first = reconnecting(&proxy.address(), Duration::from_secs(5), with_store());
    let numbers = NumbersClient::new(&first, "numbers");
    numbers.durable(1).await.expect("stored");
    for n in 2..=5 {
        numbers.number(n).await.expect("queued");
    }
    first.flush().await;
    assert_eq!(first.stats().signals_acknowledged, 5);
    first.close().await;

    // Run 2, while the receiver is unreachable: a persistent and a plain signal wait,
    // then the peer closes (as a crash would end it).
    proxy.refuse(true);
    let second = reconnecting(&proxy.address(), Duration::from_secs(5), with_store());
    let stream = second.stream_id();
    let numbers = NumbersClient::new(&second, "numbers");
    numbers.durable(10).await.expect("stored");
    numbers.number(11).await.expect("queued");
    assert_eq!(second.queued(), 2);
    second.close().await;
    assert_eq!(
        second.stats().signals_dropped,
        1,
        "the plain signal is gone"
    );

    // Run 3: only the persistent signal was stored; it comes back, and the stream goes on
    // above every sequence number used before (run 1 used some without storing them), so
    // the receiver takes nothing new for a duplicate.
    proxy.refuse(false);
    let third = reconnecting(&proxy.address(), Duration::from_secs(5), with_store());
    assert_eq!(third.stream_id(), stream, "the stream id is stored");
    assert_eq!(third.queued(), 1);
    let numbers = NumbersClient::new(&third, "numbers");
    let durable = numbers.durable(12).await.expect("stored");
    let plain = numbers.number(13).await.expect("queued");
    for sent in [durable, plain] {
        sent.acknowledged(Duration::from_secs(30))
            .await
            .expect("handled, not discarded as a duplicate");
    }
    third.flush().await;
    assert_eq!(rec.handled(), vec![1, 2, 3, 4, 5, 10, 12, 13]);
    third.close().await;
    server.close().await;
    remove_store(&store);
}

#[cfg(feature = "persistence")] // the SQLite store
/// Reads the sender's stdout lines into a channel (on a thread: the pipe is blocking).
fn lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(feature = "persistence")] // the SQLite store
fn sender(address: &str, store: &std::path::Path, from: u64, to: u64) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_reliable-sender"))
        .args([
            address,
            &store.display().to_string(),
            &from.to_string(),
            &to.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the sender")
}

#[cfg(feature = "persistence")] // the SQLite store
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_signals_survive_sigkill_of_the_sender() {
    // The receiver handles 20 signals, then stalls until the sender was killed: whatever
    // was stored but not acknowledged by then must come back after the restart, once.
    let gate = Arc::new(Semaphore::new(20));
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let rec = Recorder {
        gate: Some(gate.clone()),
        arrivals: Some(arrivals_tx),
        ..Recorder::default()
    };
    let (server, addr, _accepted) =
        numbers_server(PeerOptions::default().ordered_signals(true), rec.clone()).await;
    let address = format!("tcp://{addr}");
    let store = temp_store("crash");

    let mut first = sender(&address, &store, 0, 400);
    let out = lines(&mut first);
    let mut stored = 0;
    while stored < 150 {
        let line = out
            .recv_timeout(Duration::from_secs(60))
            .expect("the sender reports progress");
        if let Some(n) = line.strip_prefix("stored ") {
            stored = n.parse().expect("a number");
        }
    }
    // Kill while the 21st signal is with the receiver (handled: 20, acknowledged: at most
    // 20; the rest is on the wire, or stored and not sent yet).
    for _ in 0..21 {
        tokio::time::timeout(Duration::from_secs(60), arrivals.recv())
            .await
            .expect("signals arrive")
            .expect("open");
    }
    first.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
    let status = first.wait().expect("reaped");
    assert!(!status.success(), "killed, not finished: {status:?}");
    assert_eq!(rec.handled().len(), 20, "the receiver was held at 20");
    gate.add_permits(100_000);

    // Restarted on the same store: sends new numbers; the stored ones come first.
    let mut second = sender(&address, &store, 1_000, 1_050);
    let out = lines(&mut second);
    let flushed = tokio::task::spawn_blocking(move || out.iter().any(|line| line == "flushed"))
        .await
        .expect("reader");
    assert!(flushed, "the restarted sender delivered everything");
    assert!(second.wait().expect("exit").success());

    let handled = rec.handled();
    assert!(
        handled.windows(2).all(|w| w[0] < w[1]),
        "in order, once: {handled:?}"
    );
    let old: Vec<u64> = handled.iter().copied().filter(|n| *n < 1_000).collect();
    let new: Vec<u64> = handled.iter().copied().filter(|n| *n >= 1_000).collect();
    // Everything reported as stored arrived (stores happen in order, so the numbers
    // stored before the kill are exactly 0..=m for some m >= 150).
    assert!(
        old.len() > 150,
        "only {} of the stored signals arrived",
        old.len()
    );
    assert_eq!(old, (0..old.len() as u64).collect::<Vec<_>>());
    assert_eq!(new, (1_000..1_050).collect::<Vec<_>>());
    // Acknowledged signals were deleted from the store: nothing is left to re-send.
    let reopened = Peer::reconnecting(
        &address,
        Options::default(),
        PeerOptions::default(),
        ReconnectOptions::default()
            .store(&store)
            .backoff(Backoff::never()),
    )
    .expect("the store opens");
    assert_eq!(reopened.queued(), 0);
    reopened.close().await;
    server.close().await;
    remove_store(&store);
}

#[tokio::test(start_paused = true)]
async fn a_peer_shut_down_on_purpose_does_not_reconnect() {
    let (_server, addr, _accepted) =
        numbers_server(PeerOptions::default(), Recorder::default()).await;
    let rp = reconnecting(
        &format!("tcp://{addr}"),
        Duration::from_secs(5),
        ReconnectOptions::default().backoff(fast()),
    );
    let mut events = rp.events();
    assert!(matches!(
        next_event(&mut events).await,
        PeerEvent::Connected { .. }
    ));
    rp.shutdown(Duration::from_secs(1)).await;
    // Whatever the shutdown reports, it is never a reconnect attempt (wait well past the
    // backoff's delays).
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(10), events.next()).await {
        assert!(
            !matches!(
                event,
                PeerEvent::Reconnecting { .. } | PeerEvent::Connected { .. }
            ),
            "{event:?} after shutdown"
        );
    }
}
