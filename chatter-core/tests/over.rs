//! Connections over a byte stream the application opened (`connect_over`,
//! `Server::accept_over`): in-memory pipes through a server's accept path, with its
//! handshake, limits and close.

use std::time::Duration;

use chatter_core::{
    connect_over, listen, Address, CloseCause, CloseCode, ConnectError, Options, ProtocolError,
    SendOptions, Server,
};

fn here(name: &str) -> Address {
    Address::Unix { path: name.into() }
}

/// A pipe handed to `server`, and the connection over its near end.
async fn pipe(server: &Server, options: Options) -> Result<chatter_core::Connection, ConnectError> {
    let (near, far) = tokio::io::duplex(16 * 1024);
    server.accept_over(far, here("server"), here("client"));
    connect_over(near, here("client"), here("server"), options).await
}

#[tokio::test]
async fn a_handed_pipe_is_accepted_like_a_socket() {
    let server = Server::in_process(Options::default()).expect("server");
    let client = pipe(&server, Options::default()).await.expect("connects");
    let accepted = server.accept().await.expect("accepted");
    assert_eq!(client.remote_address(), &here("server"));
    assert_eq!(accepted.remote_address(), &here("client"));
    let conv = client
        .send("ping?", SendOptions::new().last(false))
        .await
        .expect("sent");
    let request = accepted.receive().await.expect("request");
    assert_eq!(request.decode::<String>().expect("text"), "ping?");
    let reply = SendOptions::new().conversation(request.conversation);
    accepted.send("pong!", reply).await.expect("reply");
    let answer = client.receive().await.expect("reply");
    assert_eq!(answer.conversation, conv);
    assert_eq!(answer.decode::<String>().expect("text"), "pong!");
    assert_eq!(server.connections(), 1);
}

#[tokio::test]
async fn handed_pipes_and_sockets_share_the_connection_limit() {
    let server = listen("tcp://127.0.0.1:0", Options::default().max_connections(2))
        .await
        .expect("listen");
    let _first = pipe(&server, Options::default()).await.expect("first");
    let _second = chatter_core::connect(&server.addresses()[0], Options::default())
        .await
        .expect("second");
    match pipe(&server, Options::default()).await {
        Err(ConnectError::Handshake {
            cause: CloseCause::Peer { code, reason },
            ..
        }) => {
            assert_eq!(code, CloseCode::Busy);
            assert!(reason.contains("connection limit"), "{reason}");
        }
        other => panic!("expected a busy refusal, got {other:?}"),
    }
    assert_eq!(server.refused(), 1);
}

#[tokio::test]
async fn closing_the_server_closes_handed_connections_and_refuses_new_ones() {
    let server = Server::in_process(Options::default()).expect("server");
    let client = pipe(&server, Options::default()).await.expect("connects");
    let _accepted = server.accept().await.expect("accepted");
    server.close().await;
    match client.closed().await {
        CloseCause::Peer { code, .. } => assert_eq!(code, CloseCode::GoingAway),
        other => panic!("expected going away, got {other:?}"),
    }
    match pipe(&server, Options::default()).await {
        Err(ConnectError::Handshake { .. }) => {}
        other => panic!("expected a failed handshake, got {other:?}"),
    }
}

#[tokio::test]
async fn unusable_options_are_refused_before_anything_starts() {
    let (near, _far) = tokio::io::duplex(1024);
    let bad = Options::default().max_frame_size(0);
    match connect_over(near, here("a"), here("b"), bad.clone()).await {
        Err(ConnectError::Options(_)) => {}
        other => panic!("expected invalid options, got {other:?}"),
    }
    assert!(Server::in_process(bad).is_err());
}

/// A peer that never answers the hello: the handshake timeout holds over a pipe too.
#[tokio::test(start_paused = true)]
async fn a_silent_other_end_times_the_handshake_out() {
    let (near, _silent) = tokio::io::duplex(1024);
    let options = Options::default().handshake_timeout(Duration::from_secs(3));
    let start = tokio::time::Instant::now();
    match connect_over(near, here("a"), here("b"), options).await {
        Err(ConnectError::Handshake {
            cause: CloseCause::Protocol(ProtocolError::HandshakeTimeout),
            ..
        }) => {}
        other => panic!("expected a handshake timeout, got {other:?}"),
    }
    assert_eq!(start.elapsed(), Duration::from_secs(3));
}
