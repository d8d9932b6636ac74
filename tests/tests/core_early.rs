//! `connect_early`: a client's first messages travel with its hello (PROTOCOL.md §4.1), and
//! what `connect` would report as an error shows as the connection's close cause.

use chatter_core::{
    connect_early, listen, CloseCause, CloseCode, Options, ProtocolError, SendOptions,
};
use tests::Transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TRANSPORTS: &[Transport] = Transport::ALL;

#[tokio::test(start_paused = true)]
async fn a_request_sent_before_the_servers_hello_is_answered() {
    for &transport in TRANSPORTS {
        let server = listen(
            transport.listen_address(),
            transport.server_options(Options::default()),
        )
        .await
        .expect("listen");
        let client = connect_early(
            &server.addresses()[0],
            transport.client_options(Options::default()),
        )
        .await
        .expect("connect_early");
        // Queued before the server's hello could have arrived: it goes with ours.
        let conv = client
            .send(&("echo", 1u32), SendOptions::new().last(false))
            .await
            .expect("early send");
        // A second message too large for the early credit waits for the hello, then goes.
        let big = vec![7u8; 8000];
        let sender = {
            let client = client.clone();
            let big = big.clone();
            tokio::spawn(async move { client.send_bytes(&big, SendOptions::new()).await })
        };
        let peer = server.accept().await.expect("accept");
        let request = peer.receive().await.expect("request");
        assert_eq!(
            request.decode::<(String, u32)>().unwrap(),
            ("echo".into(), 1)
        );
        peer.send(&2u32, SendOptions::new().conversation(request.conversation))
            .await
            .expect("reply");
        let reply = client.receive().await.expect("reply");
        assert_eq!(reply.conversation, conv);
        assert_eq!(reply.decode::<u32>().unwrap(), 2);
        sender
            .await
            .unwrap()
            .expect("the large message went after the hello");
        assert_eq!(&peer.receive().await.expect("large").payload[..], &big[..]);
        client.close().await;
        server.close().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_server_that_does_not_speak_chatter_is_the_close_cause() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stranger = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
        sink
    });
    let client = connect_early(format!("tcp://127.0.0.1:{port}"), Options::default())
        .await
        .expect("the transport opens");
    // The early message is queued; the answer is the protocol error.
    client
        .send_bytes(b"\xa2hi", SendOptions::new())
        .await
        .expect("queued early");
    let err = client.receive().await.expect_err("not chatter");
    assert!(
        matches!(
            err.0,
            CloseCause::Protocol(ProtocolError::NotChatter { .. })
        ),
        "{err}"
    );
    assert!(client.close_cause().is_some());
    drop(client);
    // What the stranger received: our hello and the early message, then our close frame.
    let received = stranger.await.unwrap();
    assert!(received.starts_with(b"\x00\x00\x00\x15\x95\x00\xa7chatter"));
}

#[tokio::test(start_paused = true)]
async fn a_busy_server_is_the_close_cause() {
    let server = listen("tcp://127.0.0.1:0", Options::default().max_connections(1))
        .await
        .expect("listen");
    let first = connect_early(&server.addresses()[0], Options::default())
        .await
        .expect("first");
    let _held = server.accept().await.expect("accept");
    let second = connect_early(&server.addresses()[0], Options::default())
        .await
        .expect("the transport opens");
    let cause = second.closed().await;
    assert!(
        matches!(&cause, CloseCause::Peer { code: CloseCode::Busy, reason } if reason.contains("limit of 1")),
        "{cause}"
    );
    assert_eq!(server.refused(), 1);
    drop(first);
}
