//! Fault injection on the close and teardown paths of chatter-core: hostile peers (a raw
//! `TcpStream` speaking PROTOCOL.md's frames) and applications that close at awkward
//! moments. What is checked is what README, docs/SECURITY.md and PROTOCOL.md §10 promise:
//! every connection ends within `close_linger` whatever the peer does, nothing it held
//! (task, socket, buffers, the counters of [`Connection::buffered`]) outlives that, the
//! close cause is the right one, and what was received before a close is delivered.
//!
//! The tests run on tokio's paused clock, over 127.0.0.1 port 0.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chatter_core::proto::frame::{
    CloseCode, Frame, Hello, MessageHeader, FLAG_LAST, FLAG_OWNER, FLAG_TOKEN,
};
use chatter_core::{
    connect, connect_early, listen, Address, CloseCause, ConnectionClosed, Options, SendError,
    SendOptions, Server,
};
use tests::wait_until;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// The linger the tests configure (the default).
const LINGER: Duration = Duration::from_secs(2);

/// Timer granularity and scheduling on the paused clock.
const SLACK: Duration = Duration::from_millis(50);

/// Only stops a hung test: on the paused clock it fires once every task waits.
const HANG_GUARD: Duration = Duration::from_secs(600);

fn options() -> Options {
    Options::default().close_linger(LINGER)
}

async fn server() -> Server {
    listen("tcp://127.0.0.1:0", options())
        .await
        .expect("listen")
}

fn socket_addr(server: &Server) -> SocketAddr {
    match &server.addresses()[0] {
        Address::Tcp { host, port } => format!("{host}:{port}").parse().expect("an IP"),
        other => panic!("not TCP: {other}"),
    }
}

fn encode(frames: &[Frame]) -> BytesMut {
    let mut bytes = BytesMut::new();
    for frame in frames {
        frame.encode(&mut bytes);
    }
    bytes
}

fn hello() -> Frame {
    Frame::Hello(Hello {
        max_frame_size: 1 << 20,
        receive_window: 1 << 20,
    })
}

/// A one-shot message from the raw peer (it owns the conversation).
fn message(id: u64, payload: &[u8]) -> Frame {
    let header = MessageHeader {
        id,
        first: id,
        flags: FLAG_OWNER | FLAG_LAST,
    };
    Frame::Message(header, Bytes::copy_from_slice(payload))
}

/// A request from the raw peer: it opens a conversation and passes the turn.
fn request(id: u64, payload: &[u8]) -> Frame {
    let header = MessageHeader {
        id,
        first: id,
        flags: FLAG_OWNER | FLAG_TOKEN,
    };
    Frame::Message(header, Bytes::copy_from_slice(payload))
}

fn close(code: CloseCode, reason: &str) -> Frame {
    Frame::Close(code, reason.to_string())
}

/// Decodes a byte stream into frames; panics on a partial or malformed frame.
fn frames(mut bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let (prefix, rest) = bytes.split_first_chunk::<4>().expect("a length prefix");
        let len = u32::from_be_bytes(*prefix) as usize;
        let (body, rest) = rest.split_at(len);
        frames.push(Frame::decode(Bytes::copy_from_slice(body)).expect("a frame"));
        bytes = rest;
    }
    frames
}

/// The complete frames at the start of `bytes`.
fn parsed(mut bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Some((prefix, rest)) = bytes.split_first_chunk::<4>() {
        let len = u32::from_be_bytes(*prefix) as usize;
        if rest.len() < len {
            break;
        }
        let (body, rest) = rest.split_at(len);
        frames.push(Frame::decode(Bytes::copy_from_slice(body)).expect("a frame"));
        bytes = rest;
    }
    frames
}

/// Reads until end of stream or an error; returns what arrived and how it ended.
async fn read_all(stream: &mut TcpStream) -> (Vec<u8>, Option<std::io::ErrorKind>) {
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return (bytes, None),
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) => return (bytes, Some(e.kind())),
        }
    }
}

/// A raw peer with a small receive buffer that sends its hello and then reads nothing.
async fn non_reader(server: &Server) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut peer = socket.connect(socket_addr(server)).await.expect("connect");
    // A window far larger than what the server can buffer: only the kernel stops it.
    let hello = Frame::Hello(Hello {
        max_frame_size: 1 << 30,
        receive_window: 1 << 30,
    });
    peer.write_all(&encode(&[hello])).await.expect("hello");
    peer
}

/// A non-reading peer (see [`non_reader`]) and its accepted connection, which wrote more
/// than the peer's window: the driver handed it all to the kernel, which holds what the
/// peer has no room for.
async fn output_left_in_the_kernel(server: &Server) -> (TcpStream, chatter_core::Connection) {
    let peer = non_reader(server).await;
    let conn = server.accept().await.expect("accept");
    // More than the peer's window, less than the server's kernel takes at once.
    conn.send_bytes(&[1u8; 12 * 1024], SendOptions::new())
        .await
        .expect("send");
    wait_until(|| conn.buffered().output == 0).await;
    (peer, conn)
}

fn assert_nothing_buffered(conn: &chatter_core::Connection) {
    let b = conn.buffered();
    assert_eq!(
        (b.read, b.received, b.output, b.output_room),
        (0, 0, 0, 0),
        "a finished connection still counts buffers: {b:?}"
    );
}

// Once `close` returned the driver is gone, and with it its buffers: `buffered` must not
// keep reporting the last read and write buffers it saw.
#[tokio::test(start_paused = true)]
async fn a_finished_connection_reports_no_buffers() {
    timeout(HANG_GUARD, async {
        let server = server().await;
        let client = connect(&server.addresses()[0], options())
            .await
            .expect("connect");
        let accepted = server.accept().await.expect("accept");
        client
            .send_bytes(&[7u8; 3000], SendOptions::new())
            .await
            .expect("send");
        accepted.receive().await.expect("receive");
        accepted.close().await;
        client.close().await;
        assert_nothing_buffered(&accepted);
        assert_nothing_buffered(&client);
    })
    .await
    .expect("hang guard");
}

// A peer that stops reading while we have output: the close frame cannot be sent, the
// linger fires and resets, `close` returns by then, and the output the driver dropped is
// no longer counted.
#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_when_we_close_is_reset_at_the_linger_and_nothing_stays_counted()
{
    timeout(HANG_GUARD, async {
        let server = server().await;
        let mut peer = non_reader(&server).await;
        let conn = server.accept().await.expect("accept");
        let sender = {
            let conn = conn.clone();
            tokio::spawn(async move {
                let payload = vec![0x55u8; 64 * 1024];
                let mut sent = 0usize;
                while conn.send_bytes(&payload, SendOptions::new()).await.is_ok() {
                    sent += 1;
                }
                sent
            })
        };
        wait_until(|| conn.buffered().output >= 256 * 1024).await;
        let start = Instant::now();
        conn.close().await;
        let took = start.elapsed();
        assert!(took >= LINGER && took <= LINGER + SLACK, "{took:?}");
        let sent = sender.await.expect("sender");
        assert!(sent > 0);
        assert!(matches!(conn.close_cause(), Some(CloseCause::Local)));
        assert_nothing_buffered(&conn);
        wait_until(|| server.connections() == 0).await;
        let (_, end) = read_all(&mut peer).await;
        assert_eq!(end, Some(std::io::ErrorKind::ConnectionReset));
    })
    .await
    .expect("hang guard");
}

// Messages that arrived before the peer's close are delivered, and taking them after the
// close gives their credit back as before it: `buffered().received` falls to 0.
#[tokio::test(start_paused = true)]
async fn messages_taken_after_the_peers_close_are_no_longer_counted() {
    timeout(HANG_GUARD, async {
        let server = server().await;
        let mut peer = TcpStream::connect(socket_addr(&server))
            .await
            .expect("connect");
        peer.write_all(&encode(&[hello()])).await.expect("hello");
        let conn = server.accept().await.expect("accept");
        let frames_out = [
            message(1, b"one"),
            message(2, &[2u8; 2000]),
            message(3, b"three"),
            close(CloseCode::Normal, "bye"),
        ];
        peer.write_all(&encode(&frames_out)).await.expect("write");
        let cause = conn.closed().await;
        assert!(
            matches!(&cause, CloseCause::Peer { code: CloseCode::Normal, reason } if reason == "bye"),
            "{cause:?}"
        );
        assert!(conn.buffered().received > 0);
        for expected in [&b"one"[..], &[2u8; 2000][..], &b"three"[..]] {
            let msg = conn.receive().await.expect("delivered after the close");
            assert_eq!(&msg.payload[..], expected);
        }
        assert!(matches!(
            conn.receive().await,
            Err(ConnectionClosed(CloseCause::Peer { .. }))
        ));
        assert_eq!(conn.buffered().received, 0, "{:?}", conn.buffered());
        drop(peer);
    })
    .await
    .expect("hang guard");
}

// A client's hello, an early message and its close frame in one write (`connect_early`, a
// send and a close before the driver ran): the handshake completed, so the server hands
// the connection to its application, which gets the message and then the peer's close.
#[tokio::test(start_paused = true)]
async fn hello_early_message_and_close_in_one_write_are_delivered() {
    timeout(HANG_GUARD, async {
        let server = server().await;
        let client = connect_early(&server.addresses()[0], options())
            .await
            .expect("connect");
        client
            .send_bytes(b"fire and forget", SendOptions::new())
            .await
            .expect("early send");
        client.close().await;
        let accepted = timeout(Duration::from_secs(5), server.accept())
            .await
            .expect("the connection is handed over")
            .expect("open");
        let msg = accepted.receive().await.expect("the early message");
        assert_eq!(&msg.payload[..], b"fire and forget");
        assert!(matches!(
            accepted.receive().await,
            Err(ConnectionClosed(CloseCause::Peer {
                code: CloseCode::Normal,
                ..
            }))
        ));
    })
    .await
    .expect("hang guard");
}

// The same from a raw peer: hello, a request and a close frame in one write.
#[tokio::test(start_paused = true)]
async fn raw_hello_request_and_close_in_one_write_are_delivered() {
    timeout(HANG_GUARD, async {
        let server = server().await;
        let mut peer = TcpStream::connect(socket_addr(&server))
            .await
            .expect("connect");
        let out = [
            hello(),
            request(1, b"question"),
            close(CloseCode::GoingAway, "leaving"),
        ];
        peer.write_all(&encode(&out)).await.expect("write");
        let accepted = timeout(Duration::from_secs(5), server.accept())
            .await
            .expect("the connection is handed over")
            .expect("open");
        let msg = accepted.receive().await.expect("the request");
        assert_eq!(&msg.payload[..], b"question");
        // Answering it fails with the peer's close, not a hang.
        let reply = accepted
            .send_bytes(b"answer", SendOptions::new().conversation(msg.conversation))
            .await;
        assert!(
            matches!(
                reply,
                Err(SendError::Closed(CloseCause::Peer {
                    code: CloseCode::GoingAway,
                    ..
                }))
            ),
            "{reply:?}"
        );
        // The peer gets the server's hello and nothing else (no close frame back).
        let (bytes, end) = read_all(&mut peer).await;
        assert_eq!(end, None);
        assert!(
            matches!(frames(&bytes)[..], [Frame::Hello(_)]),
            "{:?}",
            frames(&bytes)
        );
        wait_until(|| server.connections() == 0).await;
    })
    .await
    .expect("hang guard");
}

// A peer that sends a close frame and then more messages, pings and a second close frame,
// and keeps its side open: the first close counts, nothing after it is delivered or
// answered (no pong, no window, no close frame back), and the connection ends at once.
#[tokio::test(start_paused = true)]
async fn input_after_the_peers_close_frame_is_discarded() {
    timeout(HANG_GUARD, async {
        let server = server().await;
        let mut peer = TcpStream::connect(socket_addr(&server))
            .await
            .expect("connect");
        peer.write_all(&encode(&[hello()])).await.expect("hello");
        let conn = server.accept().await.expect("accept");
        let start = Instant::now();
        let out = [
            message(1, b"before"),
            close(CloseCode::Other(77), "first"),
            message(2, b"after"),
            Frame::Ping,
            Frame::Window(1 << 30),
            close(CloseCode::ProtocolError, "second"),
            Frame::Ping,
        ];
        peer.write_all(&encode(&out)).await.expect("write");
        let msg = conn.receive().await.expect("before");
        assert_eq!(&msg.payload[..], b"before");
        let end = conn.receive().await;
        assert!(
            matches!(&end, Err(ConnectionClosed(CloseCause::Peer { code: CloseCode::Other(77), reason })) if reason == "first"),
            "{end:?}"
        );
        // Keeps writing after the close, while the server tears down.
        for _ in 0..10 {
            if peer.write_all(&encode(&[Frame::Ping])).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        wait_until(|| server.connections() == 0).await;
        assert!(start.elapsed() < LINGER, "{:?}", start.elapsed());
        let (bytes, _) = read_all(&mut peer).await;
        assert!(matches!(frames(&bytes)[..], [Frame::Hello(_)]), "{:?}", frames(&bytes));
    })
    .await
    .expect("hang guard");
}

// Close frames that break the rules: a reason that is not UTF-8, and one larger than the
// frame limit. Both are protocol errors, answered with a close frame of code 1; neither
// panics.
#[tokio::test(start_paused = true)]
async fn malformed_close_frames_are_protocol_errors() {
    timeout(HANG_GUARD, async {
        let server = listen("tcp://127.0.0.1:0", options().max_frame_size(64 * 1024))
            .await
            .expect("listen");
        // [5, 0, <str8 of 2 bytes: ff fe>]
        let bad_utf8: &[u8] = &[0x93, 0x05, 0x00, 0xd9, 0x02, 0xff, 0xfe];
        // [5, 0, <str32 of 1 MiB>]
        let mut huge = vec![0x93, 0x05, 0x00, 0xdb];
        huge.extend_from_slice(&(1u32 << 20).to_be_bytes());
        huge.extend(std::iter::repeat_n(b'x', 1 << 20));
        for body in [bad_utf8.to_vec(), huge] {
            let mut peer = TcpStream::connect(socket_addr(&server))
                .await
                .expect("connect");
            peer.write_all(&encode(&[hello()])).await.expect("hello");
            let conn = server.accept().await.expect("accept");
            let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(&body);
            let _ = peer.write_all(&bytes).await;
            let cause = conn.closed().await;
            assert!(matches!(cause, CloseCause::Protocol(_)), "{cause:?}");
            let (got, _) = read_all(&mut peer).await;
            let got = frames(&got);
            assert!(
                matches!(
                    &got[..],
                    [Frame::Hello(_), Frame::Close(CloseCode::ProtocolError, _)]
                ),
                "{got:?}"
            );
            wait_until(|| server.connections() == 0).await;
        }
    })
    .await
    .expect("hang guard");
}

// Both sides close at the same moment: each sees its own close, and neither waits the
// linger for the other.
#[tokio::test(start_paused = true)]
async fn simultaneous_close_ends_both_sides_without_the_linger() {
    timeout(HANG_GUARD, async {
        let server = server().await;
        let client = connect(&server.addresses()[0], options())
            .await
            .expect("connect");
        let accepted = server.accept().await.expect("accept");
        let start = Instant::now();
        tokio::join!(client.close(), accepted.close());
        assert!(start.elapsed() < LINGER, "{:?}", start.elapsed());
        assert!(matches!(client.close_cause(), Some(CloseCause::Local)));
        assert!(matches!(accepted.close_cause(), Some(CloseCause::Local)));
        wait_until(|| server.connections() == 0).await;
    })
    .await
    .expect("hang guard");
}

// `close` from several tasks at once, with a `receive` and a send blocked on flow control
// waiting: every close returns, the waiters wake with the local close, and the peer sees
// one close frame.
#[tokio::test(start_paused = true)]
async fn concurrent_closes_wake_every_waiter() {
    timeout(HANG_GUARD, async {
        let server = server().await;
        let mut peer = TcpStream::connect(socket_addr(&server))
            .await
            .expect("connect");
        // The smallest window: the second 4 KiB message waits for credit.
        let small = Frame::Hello(Hello {
            max_frame_size: 4096,
            receive_window: 4096,
        });
        peer.write_all(&encode(&[small])).await.expect("hello");
        let conn = server.accept().await.expect("accept");
        conn.send_bytes(&[1u8; 3000], SendOptions::new())
            .await
            .expect("first");
        let blocked = {
            let conn = conn.clone();
            tokio::spawn(async move { conn.send_bytes(&[2u8; 3000], SendOptions::new()).await })
        };
        let receiving = {
            let conn = conn.clone();
            tokio::spawn(async move { conn.receive().await.map(|m| m.payload) })
        };
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished());
        let closers: Vec<_> = (0..5)
            .map(|_| {
                let conn = conn.clone();
                tokio::spawn(async move { conn.close().await })
            })
            .collect();
        for closer in closers {
            closer.await.expect("close returns");
        }
        assert!(matches!(
            blocked.await.expect("send task"),
            Err(SendError::Closed(CloseCause::Local))
        ));
        assert!(matches!(
            receiving.await.expect("receive task"),
            Err(ConnectionClosed(CloseCause::Local))
        ));
        let (bytes, _) = read_all(&mut peer).await;
        let got = frames(&bytes);
        assert!(
            matches!(
                &got[..],
                [
                    Frame::Hello(_),
                    Frame::Message(..),
                    Frame::Close(CloseCode::Normal, _)
                ]
            ),
            "{got:?}"
        );
    })
    .await
    .expect("hang guard");
}

// A peer that resets right after our close frame reached it: `close` returns at once,
// with the cause it had.
#[tokio::test(start_paused = true)]
async fn a_peer_that_resets_after_our_close() {
    timeout(HANG_GUARD, async {
        let server = server().await;
        let mut peer = TcpStream::connect(socket_addr(&server))
            .await
            .expect("connect");
        peer.write_all(&encode(&[hello()])).await.expect("hello");
        let conn = server.accept().await.expect("accept");
        // Unread input on the peer's side makes its close a reset.
        conn.send_bytes(b"unread", SendOptions::new())
            .await
            .expect("send");
        let start = Instant::now();
        let closing = {
            let conn = conn.clone();
            tokio::spawn(async move { conn.close().await })
        };
        // Reads until the close frame arrived.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !parsed(&got).iter().any(|f| matches!(f, Frame::Close(..))) {
            let n = peer.read(&mut buf).await.expect("read");
            assert!(n > 0, "end of stream before the close frame");
            got.extend_from_slice(&buf[..n]);
        }
        peer.set_zero_linger().expect("SO_LINGER");
        peer.write_all(&encode(&[message(1, b"late")])).await.ok();
        drop(peer);
        closing.await.expect("close returns");
        assert!(start.elapsed() < LINGER, "{:?}", start.elapsed());
        assert!(matches!(conn.close_cause(), Some(CloseCause::Local)));
        wait_until(|| server.connections() == 0).await;
    })
    .await
    .expect("hang guard");
}

// A peer that half-closes (FIN) without a close frame while it reads nothing and the
// server's output waits for it: an I/O error, and the output left in the kernel is
// dropped with a reset, not left to an orphaned socket that the peer may keep alive for
// as long as it likes.
#[tokio::test(start_paused = true)]
async fn a_peer_that_half_closes_without_a_close_frame_while_output_waits_is_reset() {
    timeout(HANG_GUARD, async {
        let server = server().await;
        let (mut peer, conn) = output_left_in_the_kernel(&server).await;
        peer.shutdown().await.expect("FIN");
        let cause = conn.closed().await;
        assert!(
            matches!(&cause, CloseCause::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof),
            "{cause:?}"
        );
        wait_until(|| server.connections() == 0).await;
        let (_, end) = read_all(&mut peer).await;
        assert_eq!(end, Some(std::io::ErrorKind::ConnectionReset));
    })
    .await
    .expect("hang guard");
}

// The same with a close frame and a FIN: the peer closed properly but reads nothing, and
// what the server had written before it learnt of the close waits in its kernel. The
// driver may end at the peer's end of stream, but not leave those bytes to the kernel.
#[tokio::test(start_paused = true)]
async fn a_peer_that_closes_and_reads_nothing_does_not_leave_our_output_in_the_kernel() {
    timeout(HANG_GUARD, async {
        let server = server().await;
        let (mut peer, conn) = output_left_in_the_kernel(&server).await;
        peer.write_all(&encode(&[close(CloseCode::Normal, "done")]))
            .await
            .expect("close");
        peer.shutdown().await.expect("FIN");
        let start = Instant::now();
        assert!(matches!(conn.closed().await, CloseCause::Peer { .. }));
        wait_until(|| server.connections() == 0).await;
        assert!(start.elapsed() <= LINGER + SLACK, "{:?}", start.elapsed());
        let (_, end) = read_all(&mut peer).await;
        assert_eq!(end, Some(std::io::ErrorKind::ConnectionReset));
    })
    .await
    .expect("hang guard");
}

// The client's side of the same: a server whose hello, first message and close frame
// arrive in one read. The handshake completed, so `connect` succeeds, and the message is
// delivered before the server's close.
#[tokio::test(start_paused = true)]
async fn connect_succeeds_when_the_servers_hello_message_and_close_arrive_together() {
    timeout(HANG_GUARD, async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let raw_server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while parsed(&got).is_empty() {
                let n = stream.read(&mut buf).await.expect("read");
                assert!(n > 0, "no hello");
                got.extend_from_slice(&buf[..n]);
            }
            let out = [
                hello(),
                message(1, b"welcome"),
                close(CloseCode::GoingAway, "maintenance"),
            ];
            stream.write_all(&encode(&out)).await.expect("write");
            read_all(&mut stream).await
        });
        let client = connect(format!("tcp://{addr}"), options())
            .await
            .expect("the handshake completed");
        let msg = client.receive().await.expect("the server's message");
        assert_eq!(&msg.payload[..], b"welcome");
        let end = client.receive().await;
        assert!(
            matches!(&end, Err(ConnectionClosed(CloseCause::Peer { code: CloseCode::GoingAway, reason })) if reason == "maintenance"),
            "{end:?}"
        );
        // After its hello the client sent nothing: no close frame back.
        drop(client);
        let (bytes, _) = raw_server.await.expect("raw server");
        assert!(bytes.is_empty(), "{:?}", frames(&bytes));
    })
    .await
    .expect("hang guard");
}

// A close frame's reason is for logs: a peer that sends one of megabytes (anything up to
// the frame limit decodes) does not make the connection keep it, nor copy it into every
// error that reports the close (`receive`, `send`, and chatter-rpc's failed calls each
// carry the cause). It is cut, at a character boundary, to the 1024 bytes this side's own
// reasons are cut to (PROTOCOL.md §10).
#[tokio::test(start_paused = true)]
async fn a_huge_close_reason_is_cut_before_the_application_sees_it() {
    timeout(HANG_GUARD, async {
        let server = server().await;
        for reason in ["é".repeat(1 << 20), "x".repeat(1025), "short".to_string()] {
            let mut peer = TcpStream::connect(socket_addr(&server))
                .await
                .expect("connect");
            peer.write_all(&encode(&[hello()])).await.expect("hello");
            let conn = server.accept().await.expect("accept");
            peer.write_all(&encode(&[close(CloseCode::Busy, &reason)]))
                .await
                .expect("close");
            let cause = conn.closed().await;
            let CloseCause::Peer { code, reason: got } = &cause else {
                panic!("{cause:?}");
            };
            assert_eq!(*code, CloseCode::Busy);
            assert!(got.len() <= 1024, "a reason of {} bytes kept", got.len());
            assert!(
                got.capacity() <= 1024,
                "{} bytes of capacity kept",
                got.capacity()
            );
            let expected = &reason[..reason.floor_char_boundary(1024)];
            assert_eq!(got, expected);
            let Err(SendError::Closed(CloseCause::Peer { reason: again, .. })) =
                conn.send_bytes(b"late", SendOptions::new()).await
            else {
                panic!("a send after the close");
            };
            assert_eq!(&again, got);
        }
    })
    .await
    .expect("hang guard");
}

// docs/SECURITY.md: handshaken connections waiting for `Server::accept` count against
// `max_connections`, so a server holds at most that many connections' buffers. A peer
// that handshakes, sends messages and closes leaves its connection (and the messages,
// which `accept` still delivers) waiting for the application; its driver ended, but the
// connection must keep counting until it is accepted, or a peer that repeats this while
// the application is slow to accept makes the server hold any number of them.
#[tokio::test(start_paused = true)]
async fn closed_connections_waiting_for_accept_count_against_max_connections() {
    const LIMIT: usize = 4;
    timeout(HANG_GUARD, async {
        let server = listen("tcp://127.0.0.1:0", options().max_connections(LIMIT))
            .await
            .expect("listen");
        let mut served = 0;
        for _ in 0..3 * LIMIT {
            let mut peer = TcpStream::connect(socket_addr(&server))
                .await
                .expect("connect");
            peer.write_all(&encode(&[hello()])).await.expect("hello");
            // The server's hello (or its refusal), then messages and a close frame.
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while parsed(&got).is_empty() {
                let n = peer.read(&mut buf).await.expect("read");
                assert!(n > 0, "end of stream before the server's first frame");
                got.extend_from_slice(&buf[..n]);
            }
            if matches!(parsed(&got)[0], Frame::Close(CloseCode::Busy, _)) {
                continue;
            }
            served += 1;
            let out = [message(1, &[9u8; 3000]), close(CloseCode::Normal, "bye")];
            peer.write_all(&encode(&out))
                .await
                .expect("messages and close");
            read_all(&mut peer).await;
            // Its driver ends; the connection waits for `accept`.
            wait_until(|| server.connections() <= served).await;
        }
        let mut waiting = 0;
        while let Ok(Some(conn)) = timeout(Duration::from_secs(1), server.accept()).await {
            let msg = conn.receive().await.expect("its message");
            assert_eq!(msg.payload.len(), 3000);
            waiting += 1;
        }
        assert_eq!(waiting, served);
        assert!(
            waiting <= LIMIT,
            "{waiting} connections held for accept with max_connections {LIMIT}"
        );
        assert!(server.refused() > 0);
        // Once taken, they no longer count.
        wait_until(|| server.connections() == 0).await;
    })
    .await
    .expect("hang guard");
}
