//! `tarpc`: the same service with tarpc's serde transport (bincode over
//! `LengthDelimitedCodec`), TCP_NODELAY on both ends. tarpc has no one-way calls: the
//! one-way workload is a call returning `()`, 256 in flight.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{Future, StreamExt};
use tarpc::context;
use tarpc::server::{BaseChannel, Channel};
use tokio::net::{TcpListener, TcpStream};
use tokio_serde::formats::Bincode;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::harness::{
    connect_loop, connect_task, drive_calls, idle_rss, run_connections, share, Done, LocalFuture,
    Measured, ServerInfo, Tasks,
};
use crate::raw::request;
use crate::tls::Tls;
use crate::workload::{Kind, Spec};

#[tarpc::service]
pub trait Bench {
    async fn add(a: i32, b: i32) -> i32;
    async fn echo(data: Bytes) -> Bytes;
    async fn note(a: i32, b: i32);
}

#[derive(Clone)]
struct Impl {
    done: Arc<Done>,
}

impl Bench for Impl {
    async fn add(self, _: context::Context, a: i32, b: i32) -> i32 {
        a.wrapping_add(b)
    }

    async fn echo(self, _: context::Context, data: Bytes) -> Bytes {
        data
    }

    async fn note(self, _: context::Context, _a: i32, _b: i32) {
        self.done.add(1);
    }
}

async fn spawn(fut: impl Future<Output = ()> + Send + 'static) {
    tokio::spawn(fut);
}

pub fn server(
    spec: Spec,
    done: Arc<Done>,
    _tls: Option<Tls>,
) -> LocalFuture<(ServerInfo, Box<dyn Any>)> {
    Box::pin(async move {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the tarpc listener");
        let addr = listener.local_addr().expect("local address").to_string();
        let service = Impl { done: done.clone() };
        // One per measured case, aborted with the case's server; one channel task per
        // accepted connection (the bench's own clients only), ending with it.
        let accept = Tasks::of(spec.kind).spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.expect("accept");
                stream.set_nodelay(true).expect("TCP_NODELAY");
                let framed = Framed::new(stream, LengthDelimitedCodec::new());
                let transport = tarpc::serde_transport::new(framed, Bincode::default());
                let channel = BaseChannel::with_defaults(transport);
                tokio::spawn(channel.execute(service.clone().serve()).for_each(spawn));
            }
        });
        let info = ServerInfo { addr, done };
        (info, Box::new(accept) as Box<dyn Any>)
    })
}

async fn open(addr: &str) -> BenchClient {
    let stream = TcpStream::connect(addr).await.expect("connect (tarpc)");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let framed = Framed::new(stream, LengthDelimitedCodec::new());
    let transport = tarpc::serde_transport::new(framed, Bincode::default());
    BenchClient::new(tarpc::client::Config::default(), transport).spawn()
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
            let client = client.clone();
            async move {
                let sum = client
                    .add(context::current(), i as i32, 2)
                    .await
                    .expect("add (tarpc)");
                debug_assert_eq!(sum, (i as i32).wrapping_add(2));
            }
        })
        .await
    } else {
        drive_calls(n, window, |_| {
            let client = client.clone();
            let data = payload.clone();
            async move {
                let len = data.len();
                let back = client
                    .echo(context::current(), data)
                    .await
                    .expect("echo (tarpc)");
                assert_eq!(back.len(), len);
            }
        })
        .await
    }
}

pub fn client(spec: Spec, info: ServerInfo, _tls: Option<Tls>) -> LocalFuture<Measured> {
    Box::pin(async move {
        let req = request(&spec);
        match spec.kind {
            Kind::Calls => {
                let mut jobs = Vec::new();
                for i in 0..spec.conns {
                    let client = open(&info.addr).await;
                    let req = req.clone();
                    let n = share(spec.total, spec.conns, i);
                    jobs.push(move |barrier: Arc<tokio::sync::Barrier>| async move {
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
                let client = open(&info.addr).await;
                let start = Instant::now();
                drive_calls(spec.total, 256, |_| {
                    let client = client.clone();
                    async move {
                        client
                            .note(context::current(), 1, 2)
                            .await
                            .expect("note (tarpc)");
                    }
                })
                .await;
                let end = info.done.wait().await;
                Measured {
                    ops: spec.total,
                    elapsed: end - start,
                    ..Measured::default()
                }
            }
            Kind::Connect => {
                let addr = info.addr.clone();
                connect_task(async move {
                    connect_loop(spec.warmup, spec.total, |i| {
                        let addr = &addr;
                        async move {
                            let client = open(addr).await;
                            let sum = client
                                .add(context::current(), i as i32, 2)
                                .await
                                .expect("add (tarpc)");
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
                        let client = open(&info.addr).await;
                        calls(&spec, &client, 1, 1, &req).await;
                        conns.push(client);
                    }
                    Box::new(conns) as Box<dyn Any>
                })
                .await
            }
        }
    })
}
