//! `Connection::attach`: a future run in the connection's own task, beside its driver.

use chatter_core::{connect_over, Address, Connection, Options, SendOptions, Server};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// A server and a client connected to it over an in-memory pipe (no system I/O: on the
/// paused clock, time moves only when every task waits for a timer); the server's end
/// of the connection.
async fn pair() -> (Server, Connection, Connection) {
    let server = Server::in_process(Options::default()).expect("server");
    let (near, far) = tokio::io::duplex(64 * 1024);
    let name = || Address::Unix {
        path: "in-process".into(),
    };
    server.accept_over(far, name(), name());
    let client = connect_over(near, name(), name(), Options::default())
        .await
        .expect("connect");
    let accepted = server.accept().await.expect("accept");
    (server, client, accepted)
}

/// Answers every request with its own payload until the connection closes.
async fn echo(conn: Connection) {
    while let Ok(msg) = conn.receive().await {
        let answer = SendOptions::new().conversation(msg.conversation);
        if conn.send_bytes(&msg.payload, answer).await.is_err() {
            return;
        }
    }
}

async fn call(client: &Connection, text: &str) -> String {
    client
        .send(text, SendOptions::new().last(false))
        .await
        .expect("request");
    client
        .receive()
        .await
        .expect("answer")
        .decode::<String>()
        .expect("a string")
}

fn alive() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

#[tokio::test(start_paused = true)]
async fn an_attached_future_runs_without_a_task_of_its_own_and_ends_with_the_connection() {
    let (_server, client, accepted) = pair().await;
    let before = alive();
    let (done_tx, done) = oneshot::channel();
    accepted.clone().attach(async move {
        echo(accepted).await;
        let _ = done_tx.send(());
    });
    assert_eq!(alive(), before, "no task spawned for the attached future");
    let start = Instant::now();
    assert_eq!(call(&client, "one").await, "one");
    assert_eq!(call(&client, "two").await, "two");
    assert_eq!(Instant::now(), start, "an answer waited for a timer");
    client.close().await;
    done.await.expect("the attached future ran to its end");
}

#[tokio::test(start_paused = true)]
async fn a_second_attached_future_and_one_attached_after_the_end_run_in_tasks() {
    let (_server, client, accepted) = pair().await;
    accepted.clone().attach(echo(accepted.clone()));
    // The second one runs too, in a task of its own.
    let (second_tx, second) = oneshot::channel();
    accepted.attach(async move {
        let _ = second_tx.send(());
    });
    second.await.expect("the second attached future ran");
    assert_eq!(call(&client, "still").await, "still");

    client.close().await;
    accepted.closed().await;
    // The connection's task ended with the echo: a late future still runs.
    let (late_tx, late) = oneshot::channel();
    accepted.attach(async move {
        let _ = late_tx.send(());
    });
    late.await.expect("the future attached after the end ran");
}

#[tokio::test(start_paused = true)]
async fn a_panicking_attached_future_leaves_the_connection_working() {
    let (_server, client, accepted) = pair().await;
    let (polled_tx, polled) = oneshot::channel();
    accepted.attach(async move {
        let _ = polled_tx.send(());
        panic!("the attached future fails");
    });
    polled.await.expect("the attached future was polled");
    // The driver goes on, woken as before (no timer needed to move the answer): the
    // connection still answers, from another task now.
    tokio::spawn(echo(accepted.clone()));
    let start = Instant::now();
    assert_eq!(call(&client, "after").await, "after");
    assert_eq!(Instant::now(), start, "the answer waited for a timer");
    assert!(!accepted.is_closed());
}

#[tokio::test(start_paused = true)]
async fn the_connection_ends_while_its_attached_future_still_runs() {
    let (_server, client, accepted) = pair().await;
    let (release_tx, release) = oneshot::channel::<()>();
    let (done_tx, done) = oneshot::channel();
    let conn = accepted.clone();
    accepted.attach(async move {
        let cause = conn.closed().await;
        // Not done yet when its connection ended.
        let _ = release.await;
        let _ = done_tx.send(cause);
    });
    client.close().await;
    // Both ends closed, the attached future still waiting.
    client.closed().await;
    accepted.closed().await;
    assert_eq!(
        accepted.buffered().total(),
        0,
        "the driver's buffers are gone"
    );
    release_tx
        .send(())
        .expect("the attached future is still there");
    let cause = done.await.expect("the attached future ended");
    assert!(
        matches!(cause, chatter_core::CloseCause::Peer { .. }),
        "{cause:?}"
    );
}

/// A client connected over an in-memory pipe to `server`.
async fn client_of(server: &Server) -> Connection {
    let (near, far) = tokio::io::duplex(64 * 1024);
    let name = || Address::Unix {
        path: "in-process".into(),
    };
    server.accept_over(far, name(), name());
    connect_over(near, name(), name(), Options::default())
        .await
        .expect("connect")
}

#[tokio::test(start_paused = true)]
async fn on_accept_gets_the_connections_handshaken_after_it_and_accept_the_earlier_ones() {
    let server = Server::in_process(Options::default()).expect("server");
    let early = client_of(&server).await;
    // The early client's handshake completes (its hello answered) before `on_accept`.
    early
        .send("queued", SendOptions::new())
        .await
        .expect("send");
    let queued = server
        .accept()
        .await
        .expect("the early connection is queued");
    assert!(server.on_accept(|conn| conn.clone().attach(echo(conn))));
    assert!(
        !server.on_accept(|_| panic!("not called")),
        "the first function is kept"
    );
    let late = client_of(&server).await;
    let start = Instant::now();
    assert_eq!(call(&late, "handed").await, "handed");
    assert_eq!(Instant::now(), start, "the answer waited for a timer");
    assert_eq!(
        queued
            .receive()
            .await
            .expect("message")
            .decode::<String>()
            .expect("text"),
        "queued"
    );
}

#[tokio::test(start_paused = true)]
async fn a_panicking_on_accept_closes_that_connection_only() {
    let server = Server::in_process(Options::default()).expect("server");
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    server.on_accept(move |conn| {
        // The first one attaches its loop, then fails: the loop's handle does not keep
        // the connection open.
        conn.clone().attach(echo(conn));
        if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            panic!("the first connection is refused by a bug");
        }
    });
    let first = client_of(&server).await;
    let cause = first.closed().await;
    assert!(
        matches!(cause, chatter_core::CloseCause::Peer { .. }),
        "{cause:?}"
    );
    let second = client_of(&server).await;
    assert_eq!(call(&second, "served").await, "served");
}

#[tokio::test(start_paused = true)]
async fn a_connection_handshaken_after_its_server_closed_is_not_handed_to_on_accept() {
    // Connections outlive their server, so one in its handshake at the close completes it.
    let options = Options::default().close_connections_with_server(false);
    let server = Server::in_process(options).expect("server");
    let handed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = handed.clone();
    server.on_accept(move |_| seen.store(true, std::sync::atomic::Ordering::SeqCst));
    let (near, far) = tokio::io::duplex(64 * 1024);
    let name = || Address::Unix {
        path: "in-process".into(),
    };
    server.accept_over(far, name(), name());
    server.close().await;
    // The client's hello arrives after the close; the server's connection is dropped.
    let client = connect_over(near, name(), name(), Options::default()).await;
    if let Ok(client) = client {
        client.closed().await;
    }
    assert!(!handed.load(std::sync::atomic::Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn a_connection_handshaken_after_its_server_closed_is_not_handed_to_on_accept_while_accept_waits(
) {
    // As above, with a task waiting in `accept` (holding the accept queue) at the close.
    let options = Options::default().close_connections_with_server(false);
    let server = std::sync::Arc::new(Server::in_process(options).expect("server"));
    let handed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = handed.clone();
    server.on_accept(move |_| seen.store(true, std::sync::atomic::Ordering::SeqCst));
    let waiting = {
        let server = server.clone();
        tokio::spawn(async move { server.accept().await.is_none() })
    };
    tokio::task::yield_now().await;
    let (near, far) = tokio::io::duplex(64 * 1024);
    let name = || Address::Unix {
        path: "in-process".into(),
    };
    server.accept_over(far, name(), name());
    server.close().await;
    let client = connect_over(near, name(), name(), Options::default()).await;
    if let Ok(client) = client {
        client.closed().await;
    }
    assert!(
        waiting.await.expect("accept"),
        "accept ended with the close"
    );
    assert!(!handed.load(std::sync::atomic::Ordering::SeqCst));
}

#[tokio::test(start_paused = true)]
async fn close_releases_a_connection_queued_behind_an_accept_that_holds_the_queue() {
    // An `accept` polled once holds the accept queue; the close cannot take it, so the
    // queued connection (and its `max_connections` slot) is released by that `accept`
    // when it sees the close.
    let server = Server::in_process(Options::default()).expect("server");
    let (waiting, client) = queue_one_behind_a_held_accept(&server).await;
    // The client's handshake completed after the server's: the connection is queued.
    assert_eq!(server.connections(), 1);
    server.close().await;
    client.closed().await;
    assert!(waiting.await.is_none(), "accept ends with the close");
    assert_eq!(
        server.connections(),
        0,
        "the queued connection's slot is released"
    );
}

#[tokio::test(start_paused = true)]
async fn close_releases_a_connection_queued_behind_an_accept_dropped_without_a_poll() {
    // As above, but the `accept` that holds the queue is dropped after the close without
    // being polled again (a `select!` whose other branch won, say). Before the fix the
    // queue was drained only by a poll that saw the close, so the queued connection kept
    // its `max_connections` slot until the `Server` was dropped (later `accept`s return
    // `None` at once without taking the queue).
    let server = Server::in_process(Options::default()).expect("server");
    let (waiting, client) = queue_one_behind_a_held_accept(&server).await;
    assert_eq!(server.connections(), 1);
    server.close().await;
    client.closed().await;
    drop(waiting);
    assert!(server.accept().await.is_none(), "closed");
    assert_eq!(
        server.connections(),
        0,
        "the queued connection's slot is released"
    );
}

/// Polls `fut` once: its output if it was ready, `None` if it is pending.
/// Polls an `accept` of `server` once (nothing to accept yet: it now holds the accept
/// queue), then connects a client whose connection is queued behind it. Returns the
/// waiting `accept` and the client.
async fn queue_one_behind_a_held_accept(
    server: &Server,
) -> (
    std::pin::Pin<Box<impl std::future::Future<Output = Option<Connection>> + '_>>,
    Connection,
) {
    let mut waiting = Box::pin(server.accept());
    assert!(
        futures_poll_once(waiting.as_mut()).await.is_none(),
        "nothing to accept yet"
    );
    let (near, far) = tokio::io::duplex(64 * 1024);
    let name = || Address::Unix {
        path: "in-process".into(),
    };
    server.accept_over(far, name(), name());
    let client = connect_over(near, name(), name(), Options::default())
        .await
        .expect("connect");
    (waiting, client)
}

async fn futures_poll_once<F: std::future::Future + Unpin>(mut fut: F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut fut).poll(cx) {
            std::task::Poll::Ready(out) => Some(out),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

/// Sets its flag when dropped.
struct DropFlag(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_future_attached_as_its_runtime_shuts_down_is_dropped_with_it() {
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let flag = DropFlag(dropped.clone());
    let kept = runtime.block_on(async move {
        let (server, client, accepted) = pair().await;
        // Attached, and not taken yet: the connection's task has not run since.
        let conn = accepted.clone();
        accepted.attach(async move {
            let _flag = flag;
            echo(conn).await;
        });
        (server, client)
    });
    drop(runtime);
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst),
        "the attached future (and the connection handle it holds) was kept"
    );
    drop(kept);
}
