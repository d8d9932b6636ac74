//! Fault injection on chatter-rpc's close paths: calls and signals in flight when either
//! side closes, a handler that panics because of the close, and a reconnecting peer
//! dropped while it reconnects. Every caller gets a clear error within the documented
//! time (`Peer::close`: cancelled handlers' replies for at most 5 s, then the connection's
//! close linger), and nothing hangs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatter_core::{connect, listen, Options, Server};
use chatter_rpc::{remote, CallError, CloseCause, Peer, PeerOptions, ReconnectOptions};
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout, Instant};

/// Only stops a hung test: on the paused clock it fires once every task waits.
const HANG_GUARD: Duration = Duration::from_secs(600);

/// `Peer::close`'s grace for cancelled handlers (`CLOSE_GRACE`) plus the default linger.
const CLOSE_BOUND: Duration = Duration::from_secs(7);

#[remote]
pub trait Work {
    /// Sleeps `ms` (on the paused clock), then returns it.
    async fn wait(&self, ms: u64) -> u64;
    /// Calls `wait(ms)` on the caller's side of the connection and panics if that fails.
    async fn relay(&self, ms: u64) -> u64;
    /// Sleeps `ms`, then counts the note.
    #[signal]
    async fn note(&self, ms: u64);
}

#[derive(Clone)]
struct Handler {
    started: mpsc::UnboundedSender<&'static str>,
    /// The peer the handler is registered on, for `relay`.
    peer: Option<Peer>,
    notes: Arc<AtomicU64>,
}

impl Work for Handler {
    async fn wait(&self, ms: u64) -> u64 {
        let _ = self.started.send("wait");
        sleep(Duration::from_millis(ms)).await;
        ms
    }

    async fn relay(&self, ms: u64) -> u64 {
        let _ = self.started.send("relay");
        let peer = self.peer.as_ref().expect("a peer");
        WorkClient::new(peer, "back")
            .wait(ms)
            .await
            .expect("the nested call")
    }

    async fn note(&self, ms: u64) {
        let _ = self.started.send("note");
        sleep(Duration::from_millis(ms)).await;
        self.notes.fetch_add(1, Ordering::Relaxed);
    }
}

struct Pair {
    client: Peer,
    server: Peer,
    work: WorkClient,
    started: mpsc::UnboundedReceiver<&'static str>,
    notes: Arc<AtomicU64>,
    _listener: Server,
}

/// A raw peer accepted on `listener` that has sent its hello, announcing `size` as both
/// its `max_frame_size` and its `receive_window`, and nothing else.
async fn raw_callee(listener: &tokio::net::TcpListener, size: u32) -> tokio::net::TcpStream {
    use chatter_core::proto::frame::{Frame, Hello};
    use tokio::io::AsyncWriteExt;
    let (mut stream, _) = listener.accept().await.expect("accept");
    let mut out = bytes::BytesMut::new();
    Frame::Hello(Hello {
        max_frame_size: size,
        receive_window: size,
    })
    .encode(&mut out);
    stream.write_all(&out).await.expect("hello");
    stream
}

async fn pair(server_options: PeerOptions) -> Pair {
    let listener = listen("tcp://127.0.0.1:0", Options::default())
        .await
        .expect("listen");
    let conn = connect(&listener.addresses()[0], Options::default())
        .await
        .expect("connect");
    let accepted = listener.accept().await.expect("accept");
    let client = Peer::new(conn);
    let server = Peer::with_options(accepted, server_options);
    let (tx, started) = mpsc::unbounded_channel();
    let notes = Arc::new(AtomicU64::new(0));
    server.register(
        "work",
        WorkServer::new(Handler {
            started: tx.clone(),
            peer: Some(server.clone()),
            notes: notes.clone(),
        }),
    );
    client.register(
        "back",
        WorkServer::new(Handler {
            started: tx,
            peer: None,
            notes: notes.clone(),
        }),
    );
    let work = WorkClient::new(&client, "work").with_deadline(Duration::from_secs(300));
    Pair {
        client,
        server,
        work,
        started,
        notes,
        _listener: listener,
    }
}

// The callee closes with calls running and one waiting for a handler slot: as documented
// on `Peer::close`, each caller gets `Cancelled` at once (no caller waits for its deadline).
#[tokio::test(start_paused = true)]
async fn calls_in_flight_when_the_callee_closes_are_cancelled() {
    timeout(HANG_GUARD, async {
        let mut p = pair(PeerOptions::default().max_concurrent_handlers(3)).await;
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let work = p.work.clone();
                tokio::spawn(async move { work.wait(100_000).await })
            })
            .collect();
        for _ in 0..3 {
            assert_eq!(p.started.recv().await, Some("wait"));
        }
        let start = Instant::now();
        p.server.close().await;
        assert!(start.elapsed() <= CLOSE_BOUND, "{:?}", start.elapsed());
        for call in calls {
            let result = call.await.expect("caller");
            assert!(matches!(result, Err(CallError::Cancelled)), "{result:?}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        let cause = p.client.closed().await;
        assert!(matches!(cause, CloseCause::Peer { .. }), "{cause:?}");
    })
    .await
    .expect("hang guard");
}

// The caller closes its own peer while its calls wait: each fails with `ConnectionLost`
// naming the local close, and the callee's handlers are not left running for nothing.
#[tokio::test(start_paused = true)]
async fn calls_in_flight_when_the_caller_closes_fail_with_connection_lost() {
    timeout(HANG_GUARD, async {
        let mut p = pair(PeerOptions::default()).await;
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let work = p.work.clone();
                tokio::spawn(async move { work.wait(100_000).await })
            })
            .collect();
        for _ in 0..3 {
            assert_eq!(p.started.recv().await, Some("wait"));
        }
        let start = Instant::now();
        p.client.close().await;
        for call in calls {
            let result = call.await.expect("caller");
            assert!(
                matches!(result, Err(CallError::ConnectionLost(CloseCause::Local))),
                "{result:?}"
            );
        }
        let cause = p.server.closed().await;
        assert!(matches!(cause, CloseCause::Peer { .. }), "{cause:?}");
        assert!(start.elapsed() <= CLOSE_BOUND, "{:?}", start.elapsed());
        // A call after the close fails at once.
        let late = p.work.wait(1).await;
        assert!(
            matches!(late, Err(CallError::ConnectionLost(_))),
            "{late:?}"
        );
    })
    .await
    .expect("hang guard");
}

// A handler that panics because of the close (its nested call back to the caller fails
// when the caller closes): the panic is caught and counted, the callee's side ends, and
// the caller's call fails with `ConnectionLost`.
#[tokio::test(start_paused = true)]
async fn a_handler_that_panics_during_the_close() {
    timeout(HANG_GUARD, async {
        let mut p = pair(PeerOptions::default()).await;
        let call = {
            let work = p.work.clone();
            tokio::spawn(async move { work.relay(100_000).await })
        };
        assert_eq!(p.started.recv().await, Some("relay"));
        assert_eq!(p.started.recv().await, Some("wait"));
        let start = Instant::now();
        p.client.close().await;
        let result = call.await.expect("caller");
        assert!(
            matches!(result, Err(CallError::ConnectionLost(_))),
            "{result:?}"
        );
        p.server.closed().await;
        let stats = p.server.stats();
        assert!(start.elapsed() <= CLOSE_BOUND, "{:?}", start.elapsed());
        // Let the handler's task see the lost nested call.
        timeout(Duration::from_secs(10), async {
            while p.server.stats().handler_panics == 0 {
                sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the handler's panic was not caught and counted: {stats:?}"));
    })
    .await
    .expect("hang guard");
}

// Signals in flight when the receiver closes: one runs, the rest wait for the one handler
// slot. None hangs the close; those that will not run are counted as failed.
#[tokio::test(start_paused = true)]
async fn signals_in_flight_when_the_receiver_closes_are_accounted_for() {
    timeout(HANG_GUARD, async {
        let mut p = pair(PeerOptions::default().max_concurrent_handlers(1)).await;
        for _ in 0..5 {
            p.work
                .with_ttl(Duration::from_secs(60))
                .note(100_000)
                .await
                .expect("sent");
        }
        assert_eq!(p.started.recv().await, Some("note"));
        // Every signal has arrived: the one handler runs the first, four wait.
        timeout(Duration::from_secs(10), async {
            while p.server.stats().requests_waiting < 4 {
                sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("arrived");
        let start = Instant::now();
        p.server.close().await;
        assert!(start.elapsed() <= CLOSE_BOUND, "{:?}", start.elapsed());
        p.client.closed().await;
        let stats = p.server.stats();
        assert_eq!(
            p.notes.load(Ordering::Relaxed),
            0,
            "the running one is not done yet"
        );
        assert_eq!(stats.signals_delivered, 1, "{stats:?}");
        assert_eq!(
            stats.signals_failed, 4,
            "signals unaccounted for: {stats:?}"
        );
        assert_eq!(stats.requests_waiting, 0, "{stats:?}");
        // The running handler is not cancelled (only calls are): once it is done, no
        // request holds credit on the closed connection any more.
        while p.notes.load(Ordering::Relaxed) == 0 {
            sleep(Duration::from_secs(1)).await;
        }
        let conn = p.server.connection().expect("its connection");
        assert_eq!(conn.buffered().received, 0, "{:?}", p.server.stats());
    })
    .await
    .expect("hang guard");
}

// A reconnecting peer dropped while it reconnects (nothing listens at its address): its
// tasks end, none keeps trying.
#[tokio::test(start_paused = true)]
async fn a_reconnecting_peer_dropped_while_it_reconnects_leaves_no_task() {
    timeout(HANG_GUARD, async {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("address").port()
        };
        let metrics = tokio::runtime::Handle::current().metrics();
        let before = metrics.num_alive_tasks();
        let peer = Peer::reconnecting(
            format!("tcp://127.0.0.1:{port}"),
            Options::default(),
            PeerOptions::default(),
            ReconnectOptions::default(),
        )
        .expect("a reconnecting peer");
        sleep(Duration::from_secs(3)).await;
        assert!(metrics.num_alive_tasks() > before);
        drop(peer);
        timeout(Duration::from_secs(60), async {
            while metrics.num_alive_tasks() > before {
                sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} tasks outlive the dropped peer",
                metrics.num_alive_tasks() - before
            )
        });
    })
    .await
    .expect("hang guard");
}

// A hostile callee answers the calls of a peer with a close frame of a megabyte of reason:
// each waiting caller's `ConnectionLost` carries the close cause, so without a cut on the
// reason they would hold a copy each (20 callers, 40 MiB). Each holds at most 1 KiB.
#[tokio::test(start_paused = true)]
async fn a_huge_close_reason_is_not_copied_to_every_waiting_caller() {
    use bytes::BytesMut;
    use chatter_core::proto::frame::{CloseCode, Frame};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    timeout(HANG_GUARD, async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (go, ready) = tokio::sync::oneshot::channel::<()>();
        let hostile = tokio::spawn(async move {
            let mut stream = raw_callee(&listener, 1 << 20).await;
            ready.await.expect("go");
            let mut out = BytesMut::new();
            Frame::Close(CloseCode::GoingAway, "x".repeat(1 << 20)).encode(&mut out);
            stream.write_all(&out).await.expect("close");
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink).await;
        });
        let conn = connect(format!("tcp://{addr}"), Options::default())
            .await
            .expect("connect");
        let peer = Peer::new(conn);
        let work = WorkClient::new(&peer, "work").with_deadline(Duration::from_secs(300));
        let calls: Vec<_> = (0..20)
            .map(|_| {
                let work = work.clone();
                tokio::spawn(async move { work.wait(1).await })
            })
            .collect();
        // Every call task runs (and sends) before this one goes on.
        tokio::task::yield_now().await;
        go.send(()).expect("the hostile callee waits");
        for call in calls {
            match call.await.expect("caller") {
                Err(CallError::ConnectionLost(CloseCause::Peer { reason, .. })) => {
                    assert!(
                        reason.capacity() <= 1024,
                        "a caller holds {} bytes",
                        reason.capacity()
                    )
                }
                other => panic!("{other:?}"),
            }
        }
        drop(peer);
        hostile.await.expect("hostile callee");
    })
    .await
    .expect("hang guard");
}

// A call blocked on the callee's flow-control window (a callee that announced the
// smallest window and reads nothing) when the caller closes: it fails with
// `ConnectionLost` at once, and the close does not wait for the callee.
#[tokio::test(start_paused = true)]
async fn a_call_blocked_on_flow_control_when_the_caller_closes() {
    timeout(HANG_GUARD, async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let silent = tokio::spawn(async move {
            // Reads nothing; keeps the socket until the test ends.
            raw_callee(&listener, 4096).await
        });
        let conn = connect(format!("tcp://{addr}"), Options::default())
            .await
            .expect("connect");
        let _stream = silent.await.expect("silent callee");
        let peer = Peer::new(conn.clone());
        let work = WorkClient::new(&peer, "work").with_deadline(Duration::from_secs(300));
        // Each request costs about 100 bytes of the 4096 (a quarter kept for replies):
        // the later ones wait for credit that never comes.
        let calls: Vec<_> = (0..60)
            .map(|_| {
                let work = work.clone();
                tokio::spawn(async move { work.wait(1).await })
            })
            .collect();
        tokio::task::yield_now().await;
        let start = Instant::now();
        peer.close().await;
        for call in calls {
            let result = call.await.expect("caller");
            assert!(
                matches!(result, Err(CallError::ConnectionLost(CloseCause::Local))),
                "{result:?}"
            );
        }
        assert!(start.elapsed() <= CLOSE_BOUND, "{:?}", start.elapsed());
        assert!(conn.is_closed());
    })
    .await
    .expect("hang guard");
}
