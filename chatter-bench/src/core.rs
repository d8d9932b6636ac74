//! `chatter-core`: raw conversations. A call is a request sent with `last(false)` (passing
//! the turn) and a reply in its conversation that ends it; a one-way message is a one-shot
//! message. Payloads are raw bytes (`send_bytes`), as in the raw echo.

use std::any::Any;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use chatter_core::{
    connect, connect_early, listen, Address, Connection, Event, Options, SendOptions,
};
use tokio::sync::Semaphore;

use crate::harness::{
    connect_loop, connect_task, idle_rss, nanos, run_connections, share, take_credit, Done,
    LocalFuture, Measured, ServerInfo,
};
use crate::raw::request;
use crate::tls::Tls;
use crate::workload::{Kind, Spec};

/// Options for both ends: the defaults, plus TLS when asked. With `CHATTER_BENCH_LEAN` set
/// in the environment, without keepalive and `TCP_USER_TIMEOUT`: what those two hardening
/// defaults cost a connection (BENCHMARKS.md, "Ninth round").
pub fn options(tls: Option<&Tls>, server: bool) -> Options {
    let mut options = Options::default();
    if std::env::var_os("CHATTER_BENCH_LEAN").is_some() {
        options = options.no_keepalive().tcp_user_timeout(None);
    }
    match tls {
        Some(t) if server => options.tls_server(t.chatter_server.clone()),
        Some(t) => options.tls_client(t.chatter_client.clone()),
        None => options,
    }
}

pub fn scheme(tls: bool) -> &'static str {
    if tls {
        "tls"
    } else {
        "tcp"
    }
}

pub fn server(
    spec: Spec,
    done: Arc<Done>,
    tls: Option<Tls>,
) -> LocalFuture<(ServerInfo, Box<dyn Any>)> {
    Box::pin(async move {
        let listener = listen(
            format!("{}://127.0.0.1:0", scheme(spec.tls)),
            options(tls.as_ref(), true),
        )
        .await
        .expect("listen (chatter-core)");
        let addr = listener.addresses()[0].to_string();
        let listener = Arc::new(listener);
        let counter = done.clone();
        // Each connection is served by a receive loop in its own task, started the moment
        // its handshake completes (the way chatter-rpc's `serve` runs its peers); it ends
        // with its connection.
        listener.on_accept(move |conn| conn.clone().attach(serve(conn, counter.clone())));
        let info = ServerInfo { addr, done };
        (info, Box::new(listener) as Box<dyn Any>)
    })
}

/// Answers every request in its conversation with the request's bytes; counts one-shot
/// messages. Takes messages in batches (`next_events`), as a receive loop that keeps up
/// with its peer does (chatter-rpc's does too).
async fn serve(conn: Connection, done: Arc<Done>) {
    let mut events = Vec::new();
    while conn.next_events(&mut events, 64).await.is_ok() {
        for event in events.drain(..) {
            let Event::Message(msg) = event else {
                continue;
            };
            if msg.last {
                done.add(1);
                continue;
            }
            let reply = SendOptions::new().conversation(msg.conversation);
            if conn.send_bytes(&msg.payload, reply).await.is_err() {
                return;
            }
        }
    }
}

async fn open(addr: &str, tls: Option<&Tls>) -> Connection {
    connect(addr, options(tls, false))
        .await
        .expect("connect (chatter-core)")
}

/// `n` calls with at most `window` in flight; the latency of each. The server answers in
/// order, so replies match the requests first in, first out.
async fn pipeline(conn: &Connection, window: usize, n: u64, req: &Bytes) -> Vec<u32> {
    let mut lat = Vec::with_capacity(n as usize);
    let request = SendOptions::new().last(false);
    if window <= 1 {
        for _ in 0..n {
            let t = Instant::now();
            let conv = conn.send_bytes(req, request).await.expect("send (core)");
            let reply = conn.receive().await.expect("reply (core)");
            assert_eq!(reply.conversation, conv);
            assert_eq!(reply.payload.len(), req.len());
            lat.push(nanos(t));
        }
        return lat;
    }
    let sent_at = RefCell::new(VecDeque::with_capacity(window));
    let credit = Semaphore::new(window);
    // Credit is taken as raw's batched writer takes it: once a permit is free, every free
    // permit at once, so the harness costs the same per call for both.
    let writer = async {
        let mut sent = 0;
        while sent < n {
            let batch = take_credit(&credit, n - sent).await;
            for _ in 0..batch {
                sent_at.borrow_mut().push_back(Instant::now());
                conn.send_bytes(req, request).await.expect("send (core)");
            }
            sent += batch;
        }
    };
    let reader = async {
        for _ in 0..n {
            let reply = conn.receive().await.expect("reply (core)");
            debug_assert_eq!(reply.payload.len(), req.len());
            let t = sent_at.borrow_mut().pop_front().expect("a call in flight");
            lat.push(nanos(t));
            credit.add_permits(1);
        }
    };
    tokio::join!(writer, reader);
    lat
}

pub fn client(spec: Spec, info: ServerInfo, tls: Option<Tls>) -> LocalFuture<Measured> {
    Box::pin(async move {
        let req = request(&spec);
        match spec.kind {
            Kind::Calls => {
                let mut jobs = Vec::new();
                for i in 0..spec.conns {
                    let conn = open(&info.addr, tls.as_ref()).await;
                    let req = req.clone();
                    let n = share(spec.total, spec.conns, i);
                    jobs.push(move |barrier: Arc<tokio::sync::Barrier>| async move {
                        pipeline(&conn, spec.window, spec.warmup, &req).await;
                        barrier.wait().await;
                        pipeline(&conn, spec.window, n, &req).await
                    });
                }
                let (elapsed, latencies) = run_connections(jobs).await;
                Measured {
                    ops: spec.total,
                    bytes_per_op: spec.payload as u64,
                    elapsed,
                    latencies,
                    rss_per_conn: None,
                    min_share: None,
                    cpu: None,
                }
            }
            Kind::OneWay => {
                let conn = open(&info.addr, tls.as_ref()).await;
                let start = Instant::now();
                for i in 0..spec.total {
                    conn.send_bytes(&req, SendOptions::new())
                        .await
                        .expect("send (core)");
                    // A producer loop lets the connection's driver move bytes now and then.
                    if i % 256 == 255 {
                        tokio::task::yield_now().await;
                    }
                }
                let end = info.done.wait().await;
                Measured {
                    ops: spec.total,
                    elapsed: end - start,
                    ..Measured::default()
                }
            }
            Kind::Connect => {
                let addr: Address = info.addr.parse().expect("server address");
                let options = options(tls.as_ref(), false);
                let request = SendOptions::new().last(false);
                connect_task(async move {
                    connect_loop(spec.warmup, spec.total, |_| async {
                        let conn = connect_early(&addr, options.clone())
                            .await
                            .expect("connect (chatter-core)");
                        let conv = conn.send_bytes(&req, request).await.expect("send (core)");
                        let reply = conn.receive().await.expect("reply (core)");
                        assert_eq!(reply.conversation, conv);
                        assert_eq!(reply.payload.len(), req.len());
                    })
                    .await
                })
                .await
            }
            Kind::Stream => unreachable!("streams.rs runs the stream workloads"),
            Kind::Idle => {
                idle_rss(spec.conns, || async {
                    let mut conns = Vec::with_capacity(spec.conns);
                    for _ in 0..spec.conns {
                        let conn = open(&info.addr, None).await;
                        pipeline(&conn, 1, 1, &req).await;
                        conns.push(conn);
                    }
                    Box::new(conns) as Box<dyn Any>
                })
                .await
            }
        }
    })
}
