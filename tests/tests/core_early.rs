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

/// A server's side of a pipe that records how many bytes each write took.
struct Recorder {
    io: tokio::io::DuplexStream,
    writes: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
}

impl tokio::io::AsyncRead for Recorder {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Recorder {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        // Locked across the write, so that a reader on another thread that read these
        // bytes finds them recorded.
        let writes = std::sync::Arc::clone(&self.writes);
        let mut writes = writes.lock().unwrap();
        let polled = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = polled {
            writes.push(n);
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Reads one length-prefixed frame (PROTOCOL.md §3), prefix included.
async fn read_frame(io: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    let mut frame = vec![0u8; 4];
    io.read_exact(&mut frame).await.expect("a length prefix");
    let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
    frame.resize(4 + len, 0);
    io.read_exact(&mut frame[4..]).await.expect("a frame");
    frame
}

/// A client's hello and one request behind it, as `connect_early` sends them.
async fn hello_and_request() -> Vec<u8> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("tcp://{}", listener.local_addr().unwrap());
    let client = connect_early(address, Options::default())
        .await
        .expect("connect_early");
    client
        .send(&("echo", 1u32), SendOptions::new().last(false))
        .await
        .expect("early send");
    let (mut raw, _) = listener.accept().await.unwrap();
    let mut bytes = read_frame(&mut raw).await;
    bytes.extend(read_frame(&mut raw).await);
    bytes
}

/// Where the server's application answers from.
#[derive(Debug, Clone, Copy)]
enum Answerer {
    /// The runtime's `block_on` future itself.
    BlockOn,
    /// A task of the runtime (`tokio::spawn`).
    Task,
    /// A task an accept-loop task spawns for the connection: two hops from the driver.
    TaskPerConnection,
    /// A task of a `LocalSet` (`spawn_local`).
    Local,
    /// A future an accept-loop task attaches to the connection's own task
    /// (`Connection::attach`).
    Attached,
    /// A future the server's `on_accept` attaches, in the connection's own task.
    OnAccept,
}

/// Answers the request; returns the connection, open (a close would add its close frame to
/// the writes).
async fn answer(peer: chatter_core::Connection) -> chatter_core::Connection {
    let request = peer.receive().await.expect("request");
    peer.send(&2u32, SendOptions::new().conversation(request.conversation))
        .await
        .expect("answer");
    peer
}

/// Answers, then keeps the connection open until the client's end goes.
async fn answer_and_wait(peer: chatter_core::Connection) {
    answer(peer).await.closed().await;
}

/// A server answering a hello that came with a request holds its own hello back until the
/// application answered, and both leave in one write (one segment, one wake-up of the
/// client), wherever the application answers from: on a current-thread runtime, and on a
/// multi-threaded one with one worker (where a task woken by the driver goes into the
/// worker's LIFO slot, and the driver, waking itself, to the back of its queue).
#[test]
fn the_servers_hello_and_first_answer_leave_in_one_write() {
    let current_thread = [
        Answerer::BlockOn,
        Answerer::Task,
        Answerer::TaskPerConnection,
        Answerer::Local,
        Answerer::Attached,
        Answerer::OnAccept,
    ]
    .map(|a| (false, a));
    let multi_thread = [
        Answerer::Task,
        Answerer::TaskPerConnection,
        Answerer::Attached,
        Answerer::OnAccept,
    ]
    .map(|a| (true, a));
    for (multi, answerer) in current_thread.into_iter().chain(multi_thread) {
        let rt = if multi {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let sent = hello_and_request().await;
            let server = chatter_core::Server::in_process(Options::default()).expect("server");
            let here = chatter_core::Address::Unix {
                path: "in-process".into(),
            };
            let (mut near, far) = tokio::io::duplex(64 * 1024);
            let writes = std::sync::Arc::default();
            let recorder = Recorder {
                io: far,
                writes: std::sync::Arc::clone(&writes),
            };
            server.accept_over(recorder, here.clone(), here);
            let server = std::sync::Arc::new(server);
            // The application waits for connections before the client's bytes arrive, as
            // a server's accept loop does.
            let mut _open = None;
            match answerer {
                Answerer::BlockOn => {
                    near.write_all(&sent).await.expect("hello and request");
                    _open = Some(answer(server.accept().await.expect("accept")).await);
                }
                Answerer::Task => {
                    let server = server.clone();
                    tokio::spawn(
                        async move { answer_and_wait(server.accept().await.unwrap()).await },
                    );
                }
                Answerer::TaskPerConnection => {
                    let server = server.clone();
                    tokio::spawn(async move {
                        while let Some(peer) = server.accept().await {
                            tokio::spawn(answer_and_wait(peer));
                        }
                    });
                }
                Answerer::Attached => {
                    let server = server.clone();
                    tokio::spawn(async move {
                        while let Some(peer) = server.accept().await {
                            peer.clone().attach(answer_and_wait(peer));
                        }
                    });
                }
                Answerer::OnAccept => {
                    server.on_accept(|peer| peer.clone().attach(answer_and_wait(peer)));
                }
                Answerer::Local => {
                    let server = server.clone();
                    tokio::task::spawn_local(async move {
                        answer_and_wait(server.accept().await.unwrap()).await
                    });
                }
            }
            if !matches!(answerer, Answerer::BlockOn) {
                tokio::task::yield_now().await;
                near.write_all(&sent).await.expect("hello and request");
            }
            let hello = read_frame(&mut near).await;
            let reply = read_frame(&mut near).await;
            let writes = writes.lock().unwrap().clone();
            assert_eq!(
                writes.first(),
                Some(&(hello.len() + reply.len())),
                "{answerer:?} (multi-threaded: {multi}): the writes were {writes:?}, hello {} \
                 and answer {} bytes",
                hello.len(),
                reply.len()
            );
        });
    }
}
