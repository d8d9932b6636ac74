//! `raw`: tokio + tokio-util `LengthDelimitedCodec` framed echo, no serialization. The
//! physical limit of this stack. Over TLS: the same echo through tokio-rustls.

use std::any::Any;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::codec::{Framed, FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::harness::{
    connect_loop, connect_task, idle_rss, nanos, run_connections, share, take_credit, Done,
    LocalFuture, Measured, ServerInfo, Tasks,
};
use crate::tls::{Tls, SERVER_NAME};
use crate::workload::{Kind, Spec};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Reader = FramedRead<Box<dyn AsyncRead + Unpin>, LengthDelimitedCodec>;
type Writer = FramedWrite<Box<dyn AsyncWrite + Unpin>, LengthDelimitedCodec>;

/// The request of a call: `add(i32, i32)` as 8 raw bytes, or the payload.
pub fn request(spec: &Spec) -> Bytes {
    if spec.payload == 0 {
        let mut b = Vec::with_capacity(8);
        b.extend_from_slice(&1i32.to_le_bytes());
        b.extend_from_slice(&2i32.to_le_bytes());
        Bytes::from(b)
    } else {
        Bytes::from(vec![0xA5; spec.payload])
    }
}

pub fn server(
    spec: Spec,
    done: Arc<Done>,
    tls: Option<Tls>,
) -> LocalFuture<(ServerInfo, Box<dyn Any>)> {
    Box::pin(async move {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the raw listener");
        let addr = listener.local_addr().expect("local address").to_string();
        let acceptor = tls.map(|t| TlsAcceptor::from(t.rustls_server));
        let counter = done.clone();
        let tasks = Tasks::of(spec.kind);
        // One per measured case, aborted with the case's server; one task per accepted
        // connection, which only the bench's own clients open (the case's `conns`, or one at
        // a time for the connect workload), each ending with its connection.
        let accept = tasks.spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.expect("accept");
                stream.set_nodelay(true).expect("TCP_NODELAY");
                let acceptor = acceptor.clone();
                let counter = counter.clone();
                tasks.spawn(async move {
                    let io: Box<dyn Io> = match acceptor {
                        Some(a) => Box::new(a.accept(stream).await.expect("TLS accept")),
                        None => Box::new(stream),
                    };
                    let framed = Framed::new(io, LengthDelimitedCodec::new());
                    if spec.kind == Kind::OneWay {
                        count(framed, &counter).await
                    } else if spec.raw_batched {
                        echo_batched(framed).await
                    } else {
                        echo(framed).await
                    }
                });
            }
        });
        let info = ServerInfo { addr, done };
        (info, Box::new(accept) as Box<dyn Any>)
    })
}

/// Echoes every frame as it comes, the idiomatic way: `send` (write and flush) per frame.
async fn echo(mut framed: Framed<Box<dyn Io>, LengthDelimitedCodec>) {
    while let Some(Ok(frame)) = framed.next().await {
        if framed.send(frame.freeze()).await.is_err() {
            return;
        }
    }
}

/// Echoes every frame; replies to everything that arrived together in one write.
async fn echo_batched(mut framed: Framed<Box<dyn Io>, LengthDelimitedCodec>) {
    while let Some(Ok(frame)) = framed.next().await {
        if framed.feed(frame.freeze()).await.is_err() {
            return;
        }
        while let Some(Some(Ok(frame))) = framed.next().now_or_never() {
            if framed.feed(frame.freeze()).await.is_err() {
                return;
            }
        }
        if SinkExt::<Bytes>::flush(&mut framed).await.is_err() {
            return;
        }
    }
}

async fn count(mut framed: Framed<Box<dyn Io>, LengthDelimitedCodec>, done: &Done) {
    while let Some(Ok(_)) = framed.next().await {
        done.add(1);
    }
}

async fn open(addr: &str, tls: Option<&Tls>) -> (Reader, Writer) {
    let stream = TcpStream::connect(addr).await.expect("connect (raw)");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let (r, w): (Box<dyn AsyncRead + Unpin>, Box<dyn AsyncWrite + Unpin>) = match tls {
        Some(t) => {
            let name = rustls_pki_types::ServerName::try_from(SERVER_NAME).expect("server name");
            let s = TlsConnector::from(t.rustls_client.clone())
                .connect(name, stream)
                .await
                .expect("TLS connect (raw)");
            let (r, w) = tokio::io::split(s);
            (Box::new(r), Box::new(w))
        }
        None => {
            let (r, w) = stream.into_split();
            (Box::new(r), Box::new(w))
        }
    };
    (
        FramedRead::new(r, LengthDelimitedCodec::new()),
        FramedWrite::new(w, LengthDelimitedCodec::new()),
    )
}

/// `n` echo calls with at most `window` in flight; the latency of each. Batched: requests
/// that may go together are written together, otherwise each is sent (written and
/// flushed) on its own.
async fn pipeline(
    rd: &mut Reader,
    wr: &mut Writer,
    window: usize,
    n: u64,
    req: &Bytes,
    batched: bool,
) -> Vec<u32> {
    let mut lat = Vec::with_capacity(n as usize);
    if window <= 1 {
        for _ in 0..n {
            let t = Instant::now();
            wr.send(req.clone()).await.expect("send (raw)");
            let reply = rd.next().await.expect("reply (raw)").expect("read (raw)");
            assert_eq!(reply.len(), req.len());
            lat.push(nanos(t));
        }
        return lat;
    }
    let sent_at = RefCell::new(VecDeque::with_capacity(window));
    let credit = Semaphore::new(window);
    let writer = async {
        let mut sent = 0;
        while sent < n {
            if !batched {
                credit.acquire().await.expect("credit").forget();
                sent_at.borrow_mut().push_back(Instant::now());
                wr.send(req.clone()).await.expect("send (raw)");
                sent += 1;
                continue;
            }
            let batch = take_credit(&credit, n - sent).await;
            for _ in 0..batch {
                sent_at.borrow_mut().push_back(Instant::now());
                wr.feed(req.clone()).await.expect("send (raw)");
            }
            SinkExt::<Bytes>::flush(&mut *wr)
                .await
                .expect("flush (raw)");
            sent += batch;
        }
    };
    let reader = async {
        for _ in 0..n {
            let reply = rd.next().await.expect("reply (raw)").expect("read (raw)");
            debug_assert_eq!(reply.len(), req.len());
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
                    let (mut rd, mut wr) = open(&info.addr, tls.as_ref()).await;
                    let req = req.clone();
                    let n = share(spec.total, spec.conns, i);
                    jobs.push(move |barrier: Arc<tokio::sync::Barrier>| async move {
                        pipeline(
                            &mut rd,
                            &mut wr,
                            spec.window,
                            spec.warmup,
                            &req,
                            spec.raw_batched,
                        )
                        .await;
                        barrier.wait().await;
                        pipeline(&mut rd, &mut wr, spec.window, n, &req, spec.raw_batched).await
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
                let (_rd, mut wr) = open(&info.addr, tls.as_ref()).await;
                let start = Instant::now();
                for _ in 0..spec.total {
                    if spec.raw_batched {
                        wr.feed(req.clone()).await.expect("send (raw)");
                    } else {
                        wr.send(req.clone()).await.expect("send (raw)");
                    }
                }
                SinkExt::<Bytes>::flush(&mut wr).await.expect("flush (raw)");
                let end = info.done.wait().await;
                Measured {
                    ops: spec.total,
                    elapsed: end - start,
                    ..Measured::default()
                }
            }
            Kind::Connect => {
                let addr: std::net::SocketAddr = info.addr.parse().expect("server address");
                connect_task(async move {
                    connect_loop(spec.warmup, spec.total, |_| async {
                        let stream = TcpStream::connect(addr).await.expect("connect (raw)");
                        stream.set_nodelay(true).expect("TCP_NODELAY");
                        let mut framed = Framed::new(stream, LengthDelimitedCodec::new());
                        framed.send(req.clone()).await.expect("send (raw)");
                        let reply = framed
                            .next()
                            .await
                            .expect("reply (raw)")
                            .expect("read (raw)");
                        assert_eq!(reply.len(), req.len());
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
                        let (mut rd, mut wr) = open(&info.addr, None).await;
                        pipeline(&mut rd, &mut wr, 1, 1, &req, false).await;
                        conns.push((rd, wr));
                    }
                    Box::new(conns) as Box<dyn Any>
                })
                .await
            }
        }
    })
}
