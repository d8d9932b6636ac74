//! `chatter-rpc`: a `#[remote]` trait with `add(i32, i32) -> i32`, `echo(Bytes) -> Bytes`
//! (serialized as MessagePack bin, never element by element) and a signal for one-way.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use chatter_core::listen;
use chatter_rpc::{serve, Peer, PeerOptions};

use crate::core::{options, scheme};
use crate::harness::{
    connect_loop, connect_task, drive_calls, idle_rss, run_connections, share, Done, LocalFuture,
    Measured, ServerInfo,
};
use crate::raw::request;
use crate::tls::Tls;
use crate::workload::{Kind, Spec};

#[chatter_rpc::remote]
pub trait Bench {
    async fn add(&self, a: i32, b: i32) -> i32;
    async fn echo(&self, data: Bytes) -> Bytes;
    #[signal(ttl = "60s")]
    async fn note(&self, a: i32, b: i32);
}

struct Impl {
    done: Arc<Done>,
}

impl Bench for Impl {
    async fn add(&self, a: i32, b: i32) -> i32 {
        a.wrapping_add(b)
    }

    async fn echo(&self, data: Bytes) -> Bytes {
        data
    }

    async fn note(&self, _a: i32, _b: i32) {
        self.done.add(1);
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
        .expect("listen (chatter-rpc)");
        let counter = done.clone();
        let server = serve(listener, PeerOptions::default(), move |peer: &Peer| {
            peer.register(
                "bench",
                BenchServer::from_arc(Arc::new(Impl {
                    done: counter.clone(),
                })),
            );
        });
        let addr = server.addresses()[0].to_string();
        let info = ServerInfo { addr, done };
        (info, Box::new(server) as Box<dyn Any>)
    })
}

async fn open(addr: &str, tls: Option<&Tls>) -> (Peer, BenchClient) {
    let conn = chatter_core::connect(addr, options(tls, false))
        .await
        .expect("connect (chatter-rpc)");
    let peer = Peer::new(conn);
    let client = BenchClient::new(&peer, "bench");
    (peer, client)
}

/// `n` calls of `add` (`spec.payload == 0`) or `echo`, at most `window` in flight.
async fn calls(
    spec: &Spec,
    client: &BenchClient,
    window: usize,
    n: u64,
    payload: &Bytes,
) -> Vec<u32> {
    if spec.payload == 0 {
        drive_calls(n, window, |i| {
            let call = client.add(i as i32, 2);
            async move {
                let sum = call.await.expect("add (chatter-rpc)");
                debug_assert_eq!(sum, (i as i32).wrapping_add(2));
            }
        })
        .await
    } else {
        drive_calls(n, window, |_| {
            let call = client.echo(payload.clone());
            let len = payload.len();
            async move {
                let back = call.await.expect("echo (chatter-rpc)");
                assert_eq!(back.len(), len);
            }
        })
        .await
    }
}

pub fn client(spec: Spec, info: ServerInfo, tls: Option<Tls>) -> LocalFuture<Measured> {
    Box::pin(async move {
        let req = request(&spec);
        match spec.kind {
            Kind::Calls => {
                let mut jobs = Vec::new();
                for i in 0..spec.conns {
                    let (peer, client) = open(&info.addr, tls.as_ref()).await;
                    let req = req.clone();
                    let n = share(spec.total, spec.conns, i);
                    jobs.push(move |barrier: Arc<tokio::sync::Barrier>| async move {
                        let _peer = peer;
                        calls(&spec, &client, spec.window, spec.warmup, &req).await;
                        barrier.wait().await;
                        calls(&spec, &client, spec.window, n, &req).await
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
                let (peer, client) = open(&info.addr, tls.as_ref()).await;
                let start = Instant::now();
                for i in 0..spec.total {
                    // While flow control holds signals back and the outbox is full, the
                    // signal's future waits for room (`WhenFull::Wait`, the default).
                    if let Err(e) = client.note(1, 2).await {
                        panic!("signal (chatter-rpc): {e}");
                    }
                    // A producer loop lets the connection's driver move bytes now and then.
                    if i % 256 == 255 {
                        tokio::task::yield_now().await;
                    }
                }
                let end = info.done.wait().await;
                let stats = peer.stats();
                assert_eq!(stats.signals_expired, 0, "signals expired");
                Measured {
                    ops: spec.total,
                    elapsed: end - start,
                    ..Measured::default()
                }
            }
            Kind::Connect => {
                let addr: chatter_core::Address = info.addr.parse().expect("server address");
                let options = options(tls.as_ref(), false);
                connect_task(async move {
                    connect_loop(spec.warmup, spec.total, |i| {
                        let options = options.clone();
                        let addr = &addr;
                        async move {
                            let conn = chatter_core::connect_early(addr, options)
                                .await
                                .expect("connect (chatter-rpc)");
                            let peer = Peer::new(conn);
                            let client = BenchClient::new(&peer, "bench");
                            let sum = client.add(i as i32, 2).await.expect("add (chatter-rpc)");
                            assert_eq!(sum, (i as i32).wrapping_add(2));
                        }
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
                        let (peer, client) = open(&info.addr, None).await;
                        calls(&spec, &client, 1, 1, &req).await;
                        conns.push((peer, client));
                    }
                    Box::new(conns) as Box<dyn Any>
                })
                .await
            }
        }
    })
}
