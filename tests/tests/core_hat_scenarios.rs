//! The hat.chatter test suite's scenarios (REFERENCE.md §1.6), over TCP and Unix sockets.

use std::time::Duration;

use chatter_core::{
    connect, listen, Address, AddressError, CloseCause, CloseCode, ConnectError, ListenError,
    Options, ProtocolError, SendError, SendOptions,
};
use tests::{all_transports, assert_delivers, pair, pair_with, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

all_transports!(
    addresses_are_reported_on_both_ends,
    server_close_closes_accepted_connections_and_later_connects_fail,
    one_shot_send_and_receive_carry_flags_and_owner,
    send_and_receive_after_close_fail_clearly,
    conversation_timeout_sequence,
    closing_with_a_full_receive_side_is_prompt_and_the_peer_sees_it,
    native_values_roundtrip,
    a_value_nested_without_end_is_a_decode_error_not_a_crash,
);

// test_connect (first half): connecting before anyone listens fails.
#[tokio::test]
async fn connect_before_listen_fails() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("tcp://{}", listener.local_addr().unwrap());
    drop(listener);
    let err = connect(&addr, Options::default()).await.unwrap_err();
    assert!(matches!(err, ConnectError::Io { .. }), "{err}");
    assert!(err.to_string().contains(&addr), "{err}");

    let path = tests::unix_path();
    let err = connect(format!("unix://{}", path.display()), Options::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Io { .. }), "{err}");
}

// test_connect (second half) and the docs example: addresses reported on both ends.
async fn addresses_are_reported_on_both_ends(t: Transport) {
    let (server, client, accepted) = pair(t).await;
    let addr = &server.addresses()[0];
    assert_eq!(client.remote_address(), addr);
    assert_eq!(accepted.local_address(), addr);
    if t == Transport::Tcp {
        assert!(matches!(addr, Address::Tcp { port, .. } if *port != 0));
        assert_eq!(accepted.remote_address(), client.local_address());
    }
    server.close().await;
}

// test_connect, test_listen, test_example_docs: server close closes accepted connections.
async fn server_close_closes_accepted_connections_and_later_connects_fail(t: Transport) {
    let (server, client, accepted) = pair(t).await;
    let addr = server.addresses()[0].clone();
    server.close().await;
    assert!(server.is_closed());
    assert!(server.accept().await.is_none());
    assert!(accepted.closed().await.is_local());
    match client.closed().await {
        CloseCause::Peer { code, reason } => {
            assert_eq!(code, CloseCode::GoingAway);
            assert_eq!(reason, "server closing");
        }
        other => panic!("client saw {other:?}"),
    }
    let err = connect(&addr, t.client_options(Options::default()))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Io { .. }), "{err}");
}

#[tokio::test]
async fn connections_survive_server_close_when_asked() {
    let options = Options::default().close_connections_with_server(false);
    let (server, client, accepted) = pair_with(Transport::Tcp, options, Options::default()).await;
    server.close().await;
    assert_delivers(&client, &accepted, "still here").await;
}

// test_wrong_address: a missing port and an unknown scheme fail connect and listen.
#[tokio::test]
async fn bad_addresses_are_rejected_by_connect_and_listen() {
    for addr in [
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:1234x",
        "tcp+sbs://127.0.0.1:1234",
        "127.0.0.1:80",
        "unix://",
    ] {
        let c = connect(addr, Options::default()).await.unwrap_err();
        assert!(matches!(c, ConnectError::Address(_)), "{addr}: {c}");
        let l = listen(addr, Options::default()).await.unwrap_err();
        assert!(matches!(l, ListenError::Address(_)), "{addr}: {l}");
    }
    let err = connect("tcp://127.0.0.1", Options::default())
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        ConnectError::Address(AddressError::MissingPort { .. })
    ));
    let err = listen("udp://127.0.0.1:5", Options::default())
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        ListenError::Address(AddressError::UnknownScheme { .. })
    ));
}

// test_send_receive: one-shot message, flags and owner on both sides.
async fn one_shot_send_and_receive_carry_flags_and_owner(t: Transport) {
    let (_server, client, accepted) = pair(t).await;
    let conv = client.send(&123u32, SendOptions::new()).await.unwrap();
    assert!(conv.is_owner());
    let msg = accepted.receive().await.unwrap();
    assert_eq!(msg.decode::<u32>().unwrap(), 123);
    assert!(!msg.conversation.is_owner());
    assert_eq!(msg.conversation.first_id(), conv.first_id());
    assert!(msg.first && msg.last && msg.token);
}

// test_send_receive (end): send and receive after close fail with the cause.
async fn send_and_receive_after_close_fail_clearly(t: Transport) {
    let (_server, client, accepted) = pair(t).await;
    client.send("before", SendOptions::new()).await.unwrap();
    client.close().await;
    let err = client.send("after", SendOptions::new()).await.unwrap_err();
    assert!(matches!(err, SendError::Closed(CloseCause::Local)), "{err}");
    assert!(matches!(
        client.receive().await.unwrap_err().0,
        CloseCause::Local
    ));
    // The peer still gets what was sent before the close, then the close.
    assert_eq!(
        accepted
            .receive()
            .await
            .unwrap()
            .decode::<String>()
            .unwrap(),
        "before"
    );
    let err = accepted.receive().await.unwrap_err();
    assert!(
        matches!(
            err.0,
            CloseCause::Peer {
                code: CloseCode::Normal,
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(
        accepted.send("x", SendOptions::new()).await,
        Err(SendError::Closed(_))
    ));
}

// test_conversation_timeout: the reply cancels the timer; two sends, exactly one timeout.
async fn conversation_timeout_sequence(t: Transport) {
    let (_server, client, accepted) = pair(t).await;
    let conv = client
        .send(
            &1,
            SendOptions::new()
                .last(false)
                .timeout(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    let req = accepted.receive().await.unwrap();
    accepted
        .send(
            &2,
            SendOptions::new()
                .conversation(req.conversation)
                .last(false),
        )
        .await
        .unwrap();
    let reply = client.receive().await.unwrap();
    assert_eq!(reply.conversation, conv);

    let short = Duration::from_millis(1);
    let more = SendOptions::new()
        .conversation(conv)
        .last(false)
        .timeout(short);
    client.send(&3, more.token(false)).await.unwrap();
    client.send(&4, more).await.unwrap();
    let started = Instant::now();
    assert_eq!(client.next_timeout().await.unwrap(), conv);
    assert!(started.elapsed() >= short);
    // The first timer was replaced, not added: nothing else fires.
    let second = tokio::time::timeout(Duration::from_secs(60), client.next_timeout()).await;
    assert!(second.is_err(), "a second timeout fired: {second:?}");
}

// test_connection_close_when_queue_blocking.
async fn closing_with_a_full_receive_side_is_prompt_and_the_peer_sees_it(t: Transport) {
    let small = Options::default().receive_window(2048).max_frame_size(1024);
    let (_server, client, accepted) = pair_with(t, Options::default(), small).await;
    // Fill the client's receive window; the client reads one message and no more.
    while accepted.try_send(&[0u8; 200], SendOptions::new()).is_ok() {}
    client.receive().await.unwrap();
    let sender = tokio::spawn(async move {
        let err = accepted
            .send_bytes(&[0u8; 200], SendOptions::new())
            .await
            .unwrap_err();
        (err, accepted.closed().await)
    });
    tokio::task::yield_now().await;
    assert!(!sender.is_finished(), "the sender waits for credit");
    let started = Instant::now();
    client.close().await;
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "close waited for the linger timeout"
    );
    let (err, cause) = sender.await.unwrap();
    assert!(
        matches!(err, SendError::Closed(CloseCause::Peer { .. })),
        "{err}"
    );
    assert!(
        matches!(
            cause,
            CloseCause::Peer {
                code: CloseCode::Normal,
                ..
            }
        ),
        "{cause}"
    );
}

// test_send_receive_native_data: any serde value round-trips.
async fn native_values_roundtrip(t: Transport) {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Reading {
        sensor: String,
        values: Vec<f64>,
        ok: bool,
    }
    let (_server, client, accepted) = pair(t).await;
    let r = Reading {
        sensor: "t1".into(),
        values: vec![1.5, -2.0],
        ok: true,
    };
    client.send(&r, SendOptions::new()).await.unwrap();
    assert_eq!(
        accepted
            .receive()
            .await
            .unwrap()
            .decode::<Reading>()
            .unwrap(),
        r
    );
    client.send_bytes(b"raw", SendOptions::new()).await.unwrap();
    let msg = accepted.receive().await.unwrap();
    assert_eq!(&msg.payload[..], b"raw");
    let err = msg.decode::<Reading>().unwrap_err();
    assert!(err.to_string().contains("Reading"), "{err}");
}

// Not in hat.chatter: rmp-serde does not count the nesting of `{variant: content}` enums, so
// decoding a recursive enum from a peer's bytes could recurse until the stack overflowed and
// abort the process. `Msg::decode` refuses values nested deeper than `codec::MAX_DEPTH`.
async fn a_value_nested_without_end_is_a_decode_error_not_a_crash(t: Transport) {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    enum Expr {
        Leaf(i32),
        Neg(Box<Expr>),
    }
    let (_server, client, accepted) = pair(t).await;
    let shallow = Expr::Neg(Box::new(Expr::Neg(Box::new(Expr::Leaf(7)))));
    client.send(&shallow, SendOptions::new()).await.unwrap();
    let msg = accepted.receive().await.unwrap();
    assert_eq!(msg.decode::<Expr>().unwrap(), shallow);

    // {"Neg": {"Neg": ... }} 50,000 levels deep: 250 KB, within the default frame size.
    let mut bomb = [0x81, 0xa3, b'N', b'e', b'g'].repeat(50_000);
    bomb.extend_from_slice(&[0x81, 0xa4, b'L', b'e', b'a', b'f', 0x07]);
    client.send_bytes(&bomb, SendOptions::new()).await.unwrap();
    let msg = accepted.receive().await.unwrap();
    let err = msg.decode::<Expr>().unwrap_err();
    assert!(
        matches!(
            err.source,
            chatter_core::codec::DecodeError::DepthLimitExceeded
        ),
        "{err}"
    );
    assert!(err.to_string().contains("Expr"), "{err}");

    // The forms that used to make the fast decoder hand the whole input to rmp-serde (which
    // then overflowed the stack and aborted the process): 200,000 levels behind a `bin`,
    // and behind an array header claiming 2^32-1 elements. Refused, on this thread's stack.
    let deep = [0x81, 0xa3, b'N', b'e', b'g'].repeat(200_000);
    for prefix in [&[0xc4, 0x01, 0x00][..], &[0xdd, 0xff, 0xff, 0xff, 0xff][..]] {
        let bomb = [prefix, &deep].concat();
        client.send_bytes(&bomb, SendOptions::new()).await.unwrap();
        let msg = accepted.receive().await.unwrap();
        assert!(msg.decode::<Expr>().is_err());
        assert!(msg.decode::<Vec<Expr>>().is_err());
        // As any value, the bin is a complete one (trailing bytes are ignored, as
        // rmp-serde does); the array cannot have 2^32-1 elements in 1 MB.
        let any = msg.decode::<serde::de::IgnoredAny>();
        assert_eq!(any.is_ok(), prefix[0] == 0xc4, "{any:?}");
    }
    assert_delivers(&client, &accepted, "still here").await;
}

// test_invalid_communication: garbage from a raw TCP client closes that connection with a
// protocol error; the server keeps serving everyone else.
#[tokio::test(start_paused = true)]
async fn garbage_bytes_close_that_connection_and_the_server_keeps_serving() {
    let server = listen("tcp://127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let Address::Tcp { port, .. } = server.addresses()[0] else {
        unreachable!()
    };

    for garbage in [
        &[1u8, 2, 3, 4][..],
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    ] {
        let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        raw.write_all(garbage).await.unwrap();
        let mut got = Vec::new();
        raw.read_to_end(&mut got).await.unwrap();
        // A close frame that says why, and no hello: the server answers only a hello
        // with its own (PROTOCOL.md §4).
        let text = String::from_utf8_lossy(&got);
        assert!(
            got.starts_with(&[0, 0, 0]) && got[4..6] == [0x93, 0x05],
            "{got:02x?}"
        );
        assert!(text.contains("peer does not speak chatter"), "{text}");
    }

    // A peer that completes the handshake and then sends garbage: its accepted connection
    // closes with the protocol error.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    raw.write_all(&hello()).await.unwrap();
    let accepted = server.accept().await.unwrap();
    raw.write_all(&[0, 0, 0, 2, 0x91, 0x3f]).await.unwrap();
    match accepted.closed().await {
        CloseCause::Protocol(ProtocolError::Malformed(m)) => {
            assert!(m.contains("unknown frame kind 63"), "{m}")
        }
        other => panic!("{other:?}"),
    }

    // Everyone else is still served.
    let client = connect(&server.addresses()[0], Options::default())
        .await
        .unwrap();
    let accepted = server.accept().await.unwrap();
    assert_delivers(&client, &accepted, "fine").await;
}

#[tokio::test(start_paused = true)]
async fn connecting_to_something_that_is_not_chatter_fails_the_handshake() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("tcp://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap();
        let _ = s.read_to_end(&mut Vec::new()).await;
    });
    let err = connect(&addr, Options::default()).await.unwrap_err();
    match &err {
        ConnectError::Handshake {
            cause: CloseCause::Protocol(ProtocolError::NotChatter { first_bytes }),
            ..
        } => {
            assert!(first_bytes.starts_with(b"HTTP/1.1"));
        }
        other => panic!("{other}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_is_cut_off_after_the_handshake_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("tcp://{}", listener.local_addr().unwrap());
    let _silent = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await;
        drop(s);
    });
    let options = Options::default().handshake_timeout(Duration::from_secs(3));
    let started = Instant::now();
    let err = connect(&addr, options).await.unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Handshake {
                cause: CloseCause::Protocol(ProtocolError::HandshakeTimeout),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(started.elapsed().as_secs(), 3);
}

// The server side of the handshake deadline: a client that connects and never sends its
// hello hears nothing from the server (it answers only a hello, PROTOCOL.md §4) until the
// deadline, then a close frame instead of a hello, and is reported as a rejection.
#[tokio::test(start_paused = true)]
async fn a_client_that_never_says_hello_is_cut_off_at_the_deadline() {
    let options = Options::default().handshake_timeout(Duration::from_secs(3));
    let server = listen("tcp://127.0.0.1:0", options).await.unwrap();
    let Address::Tcp { port, .. } = server.addresses()[0] else {
        unreachable!()
    };
    let started = Instant::now();
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut got = Vec::new();
    raw.read_to_end(&mut got).await.unwrap();
    assert_eq!(started.elapsed().as_secs(), 3, "cut off at the deadline");
    let text = String::from_utf8_lossy(&got);
    assert!(
        got[4..7] == [0x93, 0x05, 0x01],
        "a close frame, code 1: {got:02x?}"
    );
    assert!(text.ends_with("handshake timed out"), "{text}");
    let rejection = server.next_rejection().await.unwrap();
    assert!(
        matches!(
            rejection.cause,
            CloseCause::Protocol(ProtocolError::HandshakeTimeout)
        ),
        "{rejection:?}"
    );
}

// test_ping_timeout: a raw TCP peer that never answers pings.
#[tokio::test(start_paused = true)]
async fn keepalive_timeout_against_a_peer_that_never_answers() {
    let options = Options::default().keepalive(Duration::from_secs(1), Duration::from_secs(1));
    let server = listen("tcp://127.0.0.1:0", options).await.unwrap();
    let Address::Tcp { port, .. } = server.addresses()[0] else {
        unreachable!()
    };
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    raw.write_all(&hello()).await.unwrap();
    let accepted = server.accept().await.unwrap();
    let started = Instant::now();
    assert!(matches!(
        accepted.closed().await,
        CloseCause::KeepaliveTimeout
    ));
    assert_eq!(
        started.elapsed().as_secs(),
        2,
        "ping after 1 s of silence, 1 s to answer"
    );
    // The raw peer received a ping and a close frame saying why.
    let mut got = Vec::new();
    raw.read_to_end(&mut got).await.unwrap();
    assert!(
        got.windows(6).any(|w| w == [0, 0, 0, 2, 0x91, 0x02]),
        "{got:02x?}"
    );
    assert!(String::from_utf8_lossy(&got).contains("keepalive timeout"));
}

#[tokio::test(start_paused = true)]
async fn keepalive_keeps_a_quiet_but_healthy_connection_open() {
    let options = Options::default().keepalive(Duration::from_secs(1), Duration::from_secs(1));
    let (_server, client, accepted) = pair_with(Transport::Tcp, options.clone(), options).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!client.is_closed() && !accepted.is_closed());
    assert_delivers(&client, &accepted, "alive").await;
}

#[tokio::test(start_paused = true)]
async fn a_slow_consumer_does_not_trip_keepalive_on_either_side() {
    let options = Options::default()
        .keepalive(Duration::from_secs(1), Duration::from_secs(1))
        .receive_window(4096)
        .max_frame_size(2048);
    let (_server, client, accepted) = pair_with(Transport::Tcp, options.clone(), options).await;
    // The client fills the server's window; the server does not read for a minute.
    let producer = tokio::spawn({
        let client = client.clone();
        async move {
            for i in 0..1000u32 {
                client.send(&i, SendOptions::new()).await?;
            }
            Ok::<_, SendError>(())
        }
    });
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!client.is_closed() && !accepted.is_closed());
    for i in 0..1000u32 {
        assert_eq!(
            accepted.receive().await.unwrap().decode::<u32>().unwrap(),
            i
        );
    }
    producer.await.unwrap().unwrap();
}

/// A valid hello from a raw peer.
fn hello() -> Vec<u8> {
    vec![
        0, 0, 0, 0x15, 0x95, 0x00, 0xa7, b'c', b'h', b'a', b't', b't', b'e', b'r', 0x01, 0xce, 0,
        0x40, 0, 0, 0xce, 0, 0x80, 0, 0,
    ]
}

#[tokio::test(start_paused = true)]
async fn close_with_tells_the_peer_why() {
    let (_server, client, accepted) = pair(Transport::Tcp).await;
    client
        .close_with(CloseCode::ProtocolError, "bad RPC envelope")
        .await;
    match accepted.closed().await {
        CloseCause::Peer { code, reason } => {
            assert_eq!(code, CloseCode::ProtocolError);
            assert_eq!(reason, "bad RPC envelope");
        }
        other => panic!("{other:?}"),
    }
    assert!(client.closed().await.is_local());
}
