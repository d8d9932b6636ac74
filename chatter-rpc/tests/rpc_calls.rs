//! End-to-end calls over TCP on 127.0.0.1: values, typed errors, every framework failure,
//! panics, cancellation, deadlines, concurrency and symmetric peers.

mod common;

use std::future::Future;
use std::time::Duration;

use chatter_core::Options;
use chatter_rpc::{remote, serve, CallError, Peer, PeerOptions};
use common::{
    connections, pair, pair_with, within, Calc, CalcError, CalculatorClient, CalculatorServer,
};
use tokio::time::Instant;

/// The calculator as an older or newer client sees it: methods the server lacks and
/// methods whose types disagree with the server's.
#[remote]
pub trait Mismatched {
    /// The server's `add` takes integers.
    async fn add(&self, a: String, b: String) -> i64;
    /// The server has no `sub`.
    async fn sub(&self, a: i64, b: i64) -> i64;
    /// The server's `div` returns `Result<i64, _>`.
    async fn div(&self, a: i64, b: i64) -> Result<String, CalcError>;
}

/// Names of 32 bytes and more take a longer MessagePack string header than short ones,
/// both method names (which `#[remote]` encodes at compile time) and object names (which
/// clients encode when made).
#[remote]
pub trait LongNames {
    async fn a_method_whose_name_is_longer_than_thirty_one_bytes(&self, x: u32) -> u32;
    #[signal]
    async fn a_signal_whose_name_is_also_longer_than_thirty_one_bytes(&self, x: u32);
}

struct Long(tokio::sync::mpsc::UnboundedSender<u32>);

impl LongNames for Long {
    async fn a_method_whose_name_is_longer_than_thirty_one_bytes(&self, x: u32) -> u32 {
        x + 1
    }

    async fn a_signal_whose_name_is_also_longer_than_thirty_one_bytes(&self, x: u32) {
        let _ = self.0.send(x);
    }
}

#[tokio::test(start_paused = true)]
async fn long_object_and_method_names_reach_their_handlers() {
    let (client_conn, server_conn) = connections(Options::default()).await;
    let server = Peer::new(server_conn);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let object = "an object whose name is longer than 31 bytes, and then some more".repeat(5);
    assert!(object.len() > 255, "exercises the two-byte length header");
    server.register(object.clone(), LongNamesServer::new(Long(tx)));
    let client = Peer::new(client_conn);
    let long = LongNamesClient::new(&client, &object);
    assert_eq!(long.object(), object);
    let got = long.a_method_whose_name_is_longer_than_thirty_one_bytes(41);
    assert_eq!(within(got).await.unwrap(), 42);
    long.a_signal_whose_name_is_also_longer_than_thirty_one_bytes(7)
        .await
        .unwrap();
    assert_eq!(within(rx.recv()).await, Some(7));
}

#[tokio::test(start_paused = true)]
async fn call_returns_value() {
    let p = pair().await;
    assert_eq!(p.calc.add(2, 3).await.unwrap(), 5);
    assert_eq!(p.calc.add(-7, 7).await.unwrap(), 0);
}

#[tokio::test(start_paused = true)]
async fn app_error_arrives_typed_with_remote_context() {
    let p = pair().await;
    assert_eq!(p.calc.div(7, 2).await.unwrap(), 3);

    let err = p.calc.div(1, 0).await.unwrap_err();
    let CallError::App { error, remote } = err else {
        panic!("expected an app error, got {err:?}");
    };
    assert_eq!(error, CalcError::DivisionByZero);
    assert_eq!(remote.message, "division by zero");
    assert!(remote.chain.is_empty());

    let err = p.calc.div(i64::MIN, -1).await.unwrap_err();
    let CallError::App { error, remote } = err else {
        panic!("expected an app error, got {err:?}");
    };
    assert!(matches!(error, CalcError::Overflow { ref op, .. } if op == "div"));
    assert_eq!(remote.message, "overflow in div");
    assert_eq!(
        remote.chain,
        vec!["-9223372036854775808 / -1 does not fit in i64".to_string()]
    );
    assert!(remote
        .to_string()
        .contains("caused by: -9223372036854775808"));
}

#[tokio::test(start_paused = true)]
async fn no_such_object() {
    let p = pair().await;
    let ghost = CalculatorClient::new(&p.client, "ghost");
    let err = ghost.add(1, 2).await.unwrap_err();
    assert!(
        matches!(&err, CallError::NoSuchObject { object } if object == "ghost"),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn no_such_method() {
    let p = pair().await;
    let old = MismatchedClient::new(&p.client, "calc");
    let err = old.sub(1, 2).await.unwrap_err();
    assert!(
        matches!(&err, CallError::NoSuchMethod { object, method } if object == "calc" && method == "sub"),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn bad_arguments_say_what_failed() {
    let p = pair().await;
    let wrong = MismatchedClient::new(&p.client, "calc");
    let err = wrong.add("1".into(), "2".into()).await.unwrap_err();
    let CallError::BadArguments { what } = &err else {
        panic!("expected bad arguments, got {err:?}");
    };
    assert!(what.contains("`add`"), "{what}");
    assert!(what.contains("i64"), "{what}");
}

/// A value whose `Serialize` fails (decoding one always works).
#[derive(Debug)]
pub struct Unencodable;

impl serde::Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom(
            "this value refuses to be encoded",
        ))
    }
}

impl<'de> serde::Deserialize<'de> for Unencodable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| Unencodable)
    }
}

#[remote]
pub trait Picky {
    async fn take(&self, value: Unencodable) -> u32;
}

#[tokio::test(start_paused = true)]
async fn arguments_that_cannot_be_encoded_fail_the_call_before_it_is_sent() {
    let p = pair().await;
    let picky = PickyClient::new(&p.client, "calc");
    let err = within(picky.take(Unencodable)).await.unwrap_err();
    let CallError::BadArguments { what } = &err else {
        panic!("expected bad arguments, got {err:?}");
    };
    assert!(what.contains("refuses to be encoded"), "{what}");
    // Nothing reached the callee, and the connection still works.
    assert_eq!(p.calc.add(1, 2).await.unwrap(), 3);
    assert_eq!(p.server.stats().calls_received, 1);
}

#[tokio::test(start_paused = true)]
async fn calls_wait_for_room_when_the_callee_window_is_full() {
    // A 4 KiB window holds about 40 of these calls: the others wait for credit.
    let listen_options = Options::default().max_frame_size(2048).receive_window(4096);
    let p = pair_with(PeerOptions::default(), listen_options).await;
    let calls: Vec<_> = (0..300i64)
        .map(|i| tokio::spawn(p.calc.add(i, 1)))
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(within(call).await.unwrap().unwrap(), i as i64 + 1);
    }
    assert_eq!(p.server.stats().calls_received, 300);
}

#[tokio::test(start_paused = true)]
async fn bad_reply_says_what_failed() {
    let p = pair().await;
    let wrong = MismatchedClient::new(&p.client, "calc");
    let err = wrong.div(4, 2).await.unwrap_err();
    assert!(
        matches!(&err, CallError::BadReply { what } if what.contains("String")),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn handler_panic_is_an_error_reply_and_the_peer_keeps_serving() {
    let p = pair().await;
    let err = p.calc.explode("kaboom".into()).await.unwrap_err();
    assert!(
        matches!(&err, CallError::RemotePanic { message } if message == "kaboom"),
        "{err:?}"
    );
    assert_eq!(p.calc.add(1, 1).await.unwrap(), 2);
    assert_eq!(p.server.stats().handler_panics, 1);
}

#[tokio::test(start_paused = true)]
async fn connection_lost_while_waiting() {
    let mut p = pair().await;
    let call = tokio::spawn(p.calc.wait("w".into()));
    assert_eq!(within(p.probe.started.recv()).await.unwrap(), "w");
    // Close the transport under the server peer, without a graceful RPC close.
    p.server.connection().expect("its connection").close().await;
    let err = call.await.unwrap().unwrap_err();
    assert!(matches!(err, CallError::ConnectionLost(_)), "{err:?}");
    // The server dropped the handler when the connection went away.
    assert_eq!(within(p.probe.dropped.recv()).await.unwrap(), "w");
}

#[tokio::test(start_paused = true)]
async fn callee_cancels_on_graceful_close() {
    let mut p = pair().await;
    let call = tokio::spawn(p.calc.wait("w".into()));
    assert_eq!(within(p.probe.started.recv()).await.unwrap(), "w");
    p.server.close().await;
    let err = call.await.unwrap().unwrap_err();
    assert!(matches!(err, CallError::Cancelled), "{err:?}");
    assert_eq!(within(p.probe.dropped.recv()).await.unwrap(), "w");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_call_future_cancels_the_handler() {
    let mut p = pair().await;
    let call = tokio::spawn(p.calc.wait("doomed".into()));
    assert_eq!(within(p.probe.started.recv()).await.unwrap(), "doomed");
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    // The callee dropped the handler's future (the guard inside it recorded that) …
    assert_eq!(within(p.probe.dropped.recv()).await.unwrap(), "doomed");
    // … and keeps serving.
    assert_eq!(p.calc.add(2, 2).await.unwrap(), 4);
}

#[tokio::test(start_paused = true)]
async fn deadline_exceeded_while_the_handler_sleeps() {
    let mut p = pair().await;
    let start = Instant::now();
    let err = p
        .calc
        .with_deadline(Duration::from_secs(1))
        .sleep(60)
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::DeadlineExceeded), "{err:?}");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    // The callee stops working on it once its copy of the deadline passes.
    assert_eq!(within(p.probe.dropped.recv()).await.unwrap(), "sleep 60");
    assert!(start.elapsed() < Duration::from_secs(60));
    // The default deadline still applies to other calls.
    assert_eq!(p.calc.sleep(1).await.unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn default_deadline_comes_from_peer_options() {
    let (client_conn, server_conn) = common::connections(Options::default()).await;
    let server = Peer::new(server_conn);
    let (calc, _probe) = Calc::new();
    server.register("calc", CalculatorServer::new(calc));
    let client = Peer::with_options(
        client_conn,
        PeerOptions::default().default_deadline(Duration::from_secs(2)),
    );
    let calc = CalculatorClient::new(&client, "calc");
    assert_eq!(calc.deadline(), Duration::from_secs(2));
    let err = calc.sleep(3).await.unwrap_err();
    assert!(matches!(err, CallError::DeadlineExceeded), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn slow_handler_does_not_block_others() {
    let mut p = pair().await;
    let slow = tokio::spawn(p.calc.wait("slow".into()));
    assert_eq!(within(p.probe.started.recv()).await.unwrap(), "slow");
    for i in 0..10 {
        assert_eq!(p.calc.add(i, 1).await.unwrap(), i + 1);
    }
    p.probe.release.notify_waiters();
    assert_eq!(slow.await.unwrap().unwrap(), "slow");
}

#[tokio::test(start_paused = true)]
async fn concurrent_handler_limit_is_per_connection() {
    let mut p = pair_with(
        PeerOptions::default().max_concurrent_handlers(1),
        Options::default(),
    )
    .await;
    let slow = tokio::spawn(p.calc.wait("slot".into()));
    assert_eq!(within(p.probe.started.recv()).await.unwrap(), "slot");
    // The only handler slot is taken: another call waits for it until its deadline.
    let err = p
        .calc
        .with_deadline(Duration::from_secs(1))
        .add(1, 1)
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::DeadlineExceeded), "{err:?}");
    p.probe.release.notify_waiters();
    assert_eq!(slow.await.unwrap().unwrap(), "slot");
    assert_eq!(p.calc.add(1, 1).await.unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn thousand_concurrent_calls_complete_with_correct_results() {
    let p = pair().await;
    let calls: Vec<_> = (0..1000i64)
        .map(|i| tokio::spawn(p.calc.add(i, i * 2)))
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), i as i64 * 3);
    }
    assert_eq!(p.server.stats().calls_received, 1000);
}

#[tokio::test(start_paused = true)]
async fn both_sides_call_each_other_over_one_connection() {
    let p = pair().await;
    let (calc, _probe) = Calc::new();
    p.client.register("calc", CalculatorServer::new(calc));
    let back = CalculatorClient::new(&p.server, "calc");
    let (a, b) = tokio::join!(p.calc.add(1, 2), back.add(10, 20));
    assert_eq!((a.unwrap(), b.unwrap()), (3, 30));
    // Interleaved, many at once, in both directions.
    let mut calls = Vec::new();
    for i in 0..50 {
        calls.push(tokio::spawn(p.calc.add(i, 1)));
        calls.push(tokio::spawn(back.add(i, 2)));
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
}

/// A server that registers a calculator on every connection it accepts.
async fn serve_calculators() -> chatter_rpc::RpcServer {
    let listener = chatter_core::listen("tcp://127.0.0.1:0", Options::default())
        .await
        .unwrap();
    serve(listener, PeerOptions::default(), |peer: &Peer| {
        let (calc, _probe) = Calc::new();
        peer.register("calc", CalculatorServer::new(calc));
    })
}

/// A client of `server` that made one call (`i + j`).
async fn calculator_client(server: &chatter_rpc::RpcServer, i: i64, j: i64) -> Peer {
    let conn = chatter_core::connect(&server.addresses()[0], Options::default())
        .await
        .unwrap();
    let peer = Peer::new(conn);
    let calc = CalculatorClient::new(&peer, "calc");
    assert_eq!(calc.add(i, j).await.unwrap(), i + j);
    peer
}

#[tokio::test(start_paused = true)]
async fn serve_hosts_objects_on_every_connection() {
    let server = serve_calculators().await;
    for i in 0..3 {
        calculator_client(&server, i, i).await.close().await;
    }
    server.close().await;
}

/// `serve` holds a peer from before its first message until its connection ended, and
/// lets go of it then, not at the next accept (`RpcServer::peers`).
#[tokio::test(start_paused = true)]
async fn serve_holds_each_peer_until_its_connection_ends() {
    let server = serve_calculators().await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(calculator_client(&server, i, 1).await);
    }
    assert_eq!(server.peers().len(), 3);
    // The server's handles are the peers of the open connections.
    for held in server.peers() {
        assert_eq!(held.state(), chatter_rpc::ConnectionState::Connected);
    }
    clients.remove(0).close().await;
    within(async {
        while server.peers().len() != 2 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    drop(clients);
    within(async {
        while !server.peers().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    server.close().await;
}

#[tokio::test(start_paused = true)]
async fn dropping_every_peer_handle_closes_the_connection() {
    let p = pair().await;
    let server = p.server.clone();
    drop(p.calc);
    drop(p.client);
    let cause = server.closed().await;
    assert!(cause.to_string().contains("closed by peer"), "{cause}");
}

/// `serve` runs `setup` before the peer reads anything: a call that arrives with the
/// client's hello (early) finds the objects `setup` registers, even on a multi-threaded
/// runtime where the peer's receive task could otherwise run while `setup` is still busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_call_never_overtakes_serve_setup() {
    use std::sync::mpsc;
    let listener = chatter_core::listen("tcp://127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let (release, released) = mpsc::channel::<()>();
    let released = std::sync::Mutex::new(released);
    let server = serve(listener, PeerOptions::default(), move |peer: &Peer| {
        // Waits until the test lets go (meanwhile the call has arrived), handing this
        // worker's queue to another thread as a slow setup in a real server would: a
        // receive task already spawned could run now.
        tokio::task::block_in_place(|| {
            let _ = released.lock().unwrap().recv();
        });
        let (calc, _probe) = Calc::new();
        peer.register("calc", CalculatorServer::new(calc));
    });
    let conn = chatter_core::connect_early(&server.addresses()[0], Options::default())
        .await
        .unwrap();
    let peer = Peer::new(conn);
    let calc = CalculatorClient::new(&peer, "calc");
    let call = tokio::spawn(async move { calc.add(2, 3).await });
    // Give a receive task that started too early every chance to answer "no such object"
    // (it would within a millisecond); with setup first, nothing is answered yet.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !call.is_finished(),
        "answered before setup: {:?}",
        call.await
    );
    release.send(()).unwrap();
    assert_eq!(call.await.unwrap().unwrap(), 5);
    server.close().await;
}

/// A peer written from PROTOCOL.md alone: raw chatter-core messages with hand-made
/// envelopes. Malformed requests get a protocol-error reply; the peer keeps serving.
#[tokio::test(start_paused = true)]
async fn raw_envelopes_from_protocol_md_and_malformed_requests() {
    use chatter_core::SendOptions;
    let (raw, server_conn) = common::connections(Options::default()).await;
    let server = Peer::new(server_conn);
    let (calc, _probe) = Calc::new();
    server.register("calc", CalculatorServer::new(calc));

    let request = SendOptions::new().last(false);
    for garbage in [&b"\x93\x09"[..], b"\xc1", b"\x95\x00\xa4calc"] {
        let conv = raw.send_bytes(garbage, request).await.unwrap();
        let reply = within(raw.receive()).await.unwrap();
        assert_eq!(reply.conversation, conv);
        assert!(reply.last);
        assert_eq!(&reply.payload[..3], b"\x93\x02\x07", "{:x?}", reply.payload);
    }
    // A garbage one-shot message has no reply (nobody may answer it) and breaks nothing.
    raw.send_bytes(b"\x01\x02", SendOptions::new())
        .await
        .unwrap();

    // add(2, 3) with a 1.5 s deadline, byte for byte as in PROTOCOL.md.
    let add = b"\x95\x00\xa4calc\xa3add\xcd\x05\xdc\x92\x02\x03";
    let conv = raw.send_bytes(add, request).await.unwrap();
    let reply = within(raw.receive()).await.unwrap();
    assert_eq!(reply.conversation, conv);
    assert_eq!(reply.payload.as_ref(), b"\x92\x00\x05");

    // Names that are not UTF-8 match nothing: the call is refused as for any unknown name
    // (the name shown lossily), and the peer keeps serving.
    let bad_object = b"\x95\x00\xa3c\xffl\xa3add\x05\x92\x02\x03";
    raw.send_bytes(bad_object, request).await.unwrap();
    let reply = within(raw.receive()).await.unwrap();
    // [2, 3 (no such object), "c\u{fffd}l"]
    assert_eq!(reply.payload.as_ref(), b"\x93\x02\x03\xa5c\xef\xbf\xbdl");
    let bad_method = b"\x95\x00\xa4calc\xa3a\xffd\x05\x92\x02\x03";
    raw.send_bytes(bad_method, request).await.unwrap();
    let reply = within(raw.receive()).await.unwrap();
    assert_eq!(&reply.payload[..3], b"\x93\x02\x04", "{:x?}", reply.payload);

    // Arguments (PROTOCOL.md, "Arguments"): none is nil, or `[]`; one is an array of one.
    let cases: [(&[u8], &[u8]); 6] = [
        (b"\x95\x00\xa4calc\xa6answer\x05\xc0", b"\x92\x00\x2a"),
        (b"\x95\x00\xa4calc\xa6answer\x05\x90", b"\x92\x00\x2a"),
        (b"\x95\x00\xa4calc\xa5sleep\x05\x91\x00", b"\x92\x00\x00"),
        // The application error of PROTOCOL.md: div(1, 0).
        (
            b"\x95\x00\xa4calc\xa3div\x05\x92\x01\x00",
            b"\x93\x01\x92\xb0division by zero\x90\xaeDivisionByZero",
        ),
        // A deadline of 0 has passed on arrival: answered at once, the handler not run.
        (
            b"\x95\x00\xa4calc\xa3add\x00\x92\x02\x03",
            b"\x93\x02\x01\xaadeadline 0",
        ),
        // A negative deadline is a malformed request.
        (b"\x95\x00\xa4calc\xa3add\xff\x92\x02\x03", b"\x93\x02\x07"),
    ];
    for (request_bytes, expected) in cases {
        let conv = raw.send_bytes(request_bytes, request).await.unwrap();
        let reply = within(raw.receive()).await.unwrap();
        assert_eq!(reply.conversation, conv);
        assert!(
            reply.last && reply.token,
            "a reply is sent with flags token | last"
        );
        assert_eq!(
            &reply.payload[..expected.len()],
            expected,
            "{request_bytes:x?} -> {:x?}",
            reply.payload
        );
    }
    // Wrong shapes are bad arguments (kind 5): a bare value for one argument, an argument
    // for none.
    for wrong in [
        &b"\x95\x00\xa4calc\xa5sleep\x05\x00"[..],
        b"\x95\x00\xa4calc\xa6answer\x05\x91\x01",
    ] {
        raw.send_bytes(wrong, request).await.unwrap();
        let reply = within(raw.receive()).await.unwrap();
        assert_eq!(&reply.payload[..3], b"\x93\x02\x05", "{:x?}", reply.payload);
    }

    // A deadline of u64::MAX ms is "forever", not an overflow.
    let forever = b"\x95\x00\xa4calc\xa3add\xcf\xff\xff\xff\xff\xff\xff\xff\xff\x92\x02\x03";
    raw.send_bytes(forever, request).await.unwrap();
    let reply = within(raw.receive()).await.unwrap();
    assert_eq!(reply.payload.as_ref(), b"\x92\x00\x05");
    assert!(server
        .connection()
        .expect("its connection")
        .close_cause()
        .is_none());
}

#[tokio::test(start_paused = true)]
async fn call_futures_stay_small() {
    // Call futures are moved around by every executor and combinator: their size is a cost
    // per call. The reconnecting path (large) is boxed so plain calls do not carry it.
    let p = pair().await;
    let call = p.calc.add(1, 2);
    let size = std::mem::size_of_val(&call);
    println!("call future: {size} bytes");
    assert!(size <= 128, "a call future takes {size} bytes");
    // Documented: call futures can be polled through `&mut` without pinning.
    fn unpin<F: Unpin>(f: F) -> F {
        f
    }
    assert_eq!(unpin(call).await.expect("reply"), 3);
}

#[tokio::test(start_paused = true)]
async fn a_call_dropped_before_it_is_polled_sends_nothing() {
    let p = pair().await;
    drop(p.calc.add(1, 2));
    // Calls are lazy: the next call is the first the callee sees.
    assert_eq!(p.calc.add(3, 4).await.unwrap(), 7);
    assert_eq!(p.server.stats().calls_received, 1);
}

#[tokio::test(start_paused = true)]
async fn a_call_dropped_while_it_waits_for_window_room_is_never_sent() {
    // A 2 KiB window takes about 20 of these calls; polled together before the callee
    // runs, the others wait for room.
    let listen_options = Options::default().max_frame_size(1024).receive_window(2048);
    let p = pair_with(PeerOptions::default(), listen_options).await;
    let mut calls: Vec<_> = (0..100i64).map(|i| Box::pin(p.calc.add(i, 1))).collect();
    let pending = std::future::poll_fn(|cx| {
        let mut pending = 0;
        for call in &mut calls {
            pending += usize::from(call.as_mut().poll(cx).is_pending());
        }
        std::task::Poll::Ready(pending)
    })
    .await;
    assert_eq!(pending, 100);
    // Keep 40 (some of them wait for room too), drop 60 that wait for room.
    calls.truncate(40);
    for (i, call) in calls.into_iter().enumerate() {
        assert_eq!(within(call).await.unwrap(), i as i64 + 1);
    }
    assert_eq!(
        p.server.stats().calls_received,
        40,
        "dropped calls were sent"
    );
}

/// Replies as large as the caller asks, at once or after a sleep.
#[remote]
pub trait Blobs {
    async fn blob(&self, n: u64, sleep_ms: u64) -> String;
    /// A stream method that fails before its stream opens, with an error of `n` bytes.
    async fn refuse(&self, n: u64) -> Result<chatter_rpc::stream::Receiver<u64>, String>;
}

struct Blob;

impl Blobs for Blob {
    async fn blob(&self, n: u64, sleep_ms: u64) -> String {
        if sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
        }
        "x".repeat(n as usize)
    }

    async fn refuse(&self, n: u64) -> Result<chatter_rpc::stream::Receiver<u64>, String> {
        Err("x".repeat(n as usize))
    }
}

/// chatter-rpc PROTOCOL.md: the callee answers every call exactly once. A reply larger
/// than the caller's frames (its `max_frame_size`) cannot be sent; the caller gets a
/// protocol failure in its place, at once, instead of nothing until its deadline (and a
/// conversation that stays open on both sides). Both the reply of a handler that finished
/// at once and that of one that ran in a task.
#[tokio::test(start_paused = true)]
async fn a_reply_larger_than_the_callers_frames_is_answered_with_a_failure() {
    let listener = chatter_rpc::listen(
        "tcp://127.0.0.1:0",
        Options::default().close_connections_with_server(false),
    )
    .await
    .unwrap();
    let small = Options::default()
        .max_frame_size(1024)
        .receive_window(1024 + 64);
    let client_conn = chatter_rpc::connect(&listener.addresses()[0], small)
        .await
        .unwrap();
    let server = Peer::new(listener.accept().await.unwrap());
    server.register("blobs", BlobsServer::new(Blob));
    let client = Peer::new(client_conn);
    let blobs = BlobsClient::new(&client, "blobs").with_deadline(Duration::from_secs(60));
    for sleep_ms in [0, 100] {
        let start = Instant::now();
        let err = within(blobs.blob(5000, sleep_ms)).await.unwrap_err();
        let CallError::Protocol(why) = &err else {
            panic!("expected a protocol failure, got {err:?}");
        };
        assert!(
            why.contains("exceeds the 1024 bytes the peer accepts"),
            "{why}"
        );
        assert!(start.elapsed() < Duration::from_secs(1), "answered at once");
        // The connection still serves.
        assert_eq!(
            within(blobs.blob(10, sleep_ms)).await.unwrap(),
            "x".repeat(10)
        );
    }
    // The reply of a stream call that does not open its stream (its application error).
    let err = within(blobs.refuse(5000)).await.unwrap_err();
    let CallError::Protocol(why) = &err else {
        panic!("expected a protocol failure, got {err:?}");
    };
    assert!(
        why.contains("exceeds the 1024 bytes the peer accepts"),
        "{why}"
    );
    match within(blobs.refuse(10)).await {
        Err(CallError::App { error, .. }) => assert_eq!(error, "x".repeat(10)),
        other => panic!("expected the application error, got {other:?}"),
    }
}

/// chatter-rpc PROTOCOL.md, "Malformed requests": a misplaced envelope (a signal, cancel or
/// ack that passes the turn instead of ending its conversation) is answered with a kind 7
/// failure *saying what was wrong*: which envelope it is and how it must be sent, not a
/// dump of the decoder's structures (names as lists of byte values).
#[tokio::test(start_paused = true)]
async fn a_misplaced_envelope_is_answered_with_what_was_wrong() {
    use chatter_core::SendOptions;
    let (raw, server_conn) = common::connections(Options::default()).await;
    let server = Peer::new(server_conn);
    let (calc, _probe) = Calc::new();
    server.register("calc", CalculatorServer::new(calc));
    let request = SendOptions::new().last(false);
    let cases: [(&[u8], &str); 3] = [
        // The signal `calc.record(1)` with a 1 s TTL, sent as a call (flags 03).
        (
            b"\x95\x01\xa4calc\xa6record\xcd\x03\xe8\x91\x01",
            "misplaced envelope: a signal (kind 1) is a one-shot message (flags 07 or 05), this one has flags 03",
        ),
        // Cancel of call 5.
        (
            b"\x92\x02\x05",
            "misplaced envelope: a cancel (kind 2) is a one-shot message (flags 07 or 05), this one has flags 03",
        ),
        // An ack.
        (
            b"\x94\x04\x07\x01\x00",
            "misplaced envelope: an ack (kind 4) is a one-shot message (flags 07 or 05), this one has flags 03",
        ),
    ];
    for (envelope, expected) in cases {
        let conv = raw.send_bytes(envelope, request).await.unwrap();
        let reply = within(raw.receive()).await.unwrap();
        assert_eq!(reply.conversation, conv);
        assert!(reply.last);
        let (status, kind, message): (u8, u8, String) =
            reply.decode().expect("a failure [2, kind, message]");
        assert_eq!((status, kind), (2, 7));
        assert_eq!(message, expected);
    }
}

/// Many short connections at once on a multi-threaded runtime, each served by a receive
/// loop running in its connection's own task (`serve` attaches it): every call is
/// answered, with handlers that finish at once and handlers that wait, and every peer
/// is forgotten once its connection ended. A wake-up lost between a driver and its
/// attached loop hangs a call (the test's timeout then fails it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_short_connections_at_once_are_all_answered_and_forgotten() {
    let listener = chatter_core::listen("tcp://127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let server = serve(listener, PeerOptions::default(), |peer: &Peer| {
        let (calc, _probe) = Calc::new();
        peer.register("calc", CalculatorServer::new(calc));
    });
    let address = server.addresses()[0].clone();
    // 200 client tasks, all joined below (within the test's timeout).
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..200i64 {
        let address = address.clone();
        clients.spawn(async move {
            let conn = chatter_core::connect_early(&address, Options::default())
                .await
                .expect("connect");
            let peer = Peer::new(conn);
            let calc = CalculatorClient::new(&peer, "calc");
            assert_eq!(calc.add(i, 1).await.expect("add"), i + 1);
            // Several calls in flight, and one whose handler waits (a task of its own).
            let (a, b, c) = tokio::join!(calc.div(i, 1), calc.add(i, i), calc.sleep(0));
            assert_eq!(a.expect("div"), i);
            assert_eq!(b.expect("add"), 2 * i);
            assert_eq!(c.expect("sleep"), 0);
        });
    }
    let all = async {
        while let Some(done) = clients.join_next().await {
            done.expect("a client failed");
        }
        // Every peer is forgotten once its connection ended.
        while !server.peers().is_empty() {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("every call answered and every peer forgotten");
}

/// A connection whose `setup` runs while a graceful shutdown takes its list of peers is
/// still shut down: its calls are refused, not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_peer_set_up_during_a_graceful_shutdown_refuses_calls() {
    let options = Options::default().close_connections_with_server(false);
    let listener = chatter_core::Server::in_process(options).unwrap();
    // One message: the test's only connection runs `setup` once.
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let (go_tx, go) = std::sync::mpsc::channel::<()>();
    let go = std::sync::Mutex::new(go);
    let name = || chatter_core::Address::Unix {
        path: "in-process".into(),
    };
    let (near, far) = tokio::io::duplex(64 * 1024);
    listener.accept_over(far, name(), name());
    let server = serve(listener, PeerOptions::default(), move |peer: &Peer| {
        let (calc, _probe) = Calc::new();
        peer.register("calc", CalculatorServer::new(calc));
        // Blocks this connection's task (a worker of its own) until the shutdown took
        // its list of peers.
        let _ = entered_tx.send(());
        let _ = go.lock().unwrap().recv();
    });
    // The server's hello leaves once `setup` returned. The test's one connect, awaited
    // below.
    let connecting = tokio::spawn(chatter_core::connect_over(
        near,
        name(),
        name(),
        Options::default(),
    ));
    entered.recv().await.expect("setup ran");
    server.shutdown(Duration::from_secs(1)).await;
    go_tx.send(()).unwrap();
    let client = Peer::new(connecting.await.unwrap().unwrap());
    let calc = CalculatorClient::new(&client, "calc");
    let result = within(calc.add(1, 2)).await;
    assert!(matches!(result, Err(CallError::ShuttingDown)), "{result:?}");
}
