//! The stream workloads of issue 16 (`stream-items`, `stream-bytes`, `stream-fanout`):
//! items flow from the server to the client, which reads them as fast as they come.
//!
//! - **raw**: the client asks with one frame (how many items, of what size); the server
//!   writes that many length-delimited frames of the size (`LengthDelimitedCodec`, fed into
//!   a `FramedWrite` that writes every 64 KiB, flushed at the end) and the client reads them
//!   (`FramedRead` with a 64 KiB buffer, each frame split off it without a copy). One framed stream
//!   per connection: for `stream-fanout` the same bytes in one stream (raw TCP has no
//!   multiplexing to be fair or unfair about).
//! - **chatter-rpc**: a hand-written [`Service`] through the runtime API the `#[remote]`
//!   macro generates code against (`chatter_rpc::__private`, as
//!   `chatter-rpc/tests/stream_runtime.rs` does): `send(count, size) -> Receiver<Bytes>`,
//!   a result stream of `count` `Bytes` items of `size` bytes (MessagePack `bin`), read
//!   by [`ClientCore::call_stream_plain`]. Default `PeerOptions` (256 KiB stream window)
//!   except `max_streams`, raised from 64 to 128 on the server so that 100 streams fit.
//!
//! Every item is counted and its length checked; the clock runs from the end of the warm-up
//! items to the last measured item.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use chatter_core::listen;
use chatter_rpc::__private::{decode_args, ClientCore, Dispatch, Handlers, Method, StreamReply};
use chatter_rpc::stream::Receiver;
use chatter_rpc::{serve, Peer, PeerOptions, Service};
use futures::{SinkExt, StreamExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::core::options;
use crate::harness::{process_cpu, Done, LocalFuture, Measured, ServerInfo};
use crate::workload::Spec;

/// The items every stream carries: `size` bytes of 0xA5.
fn item(size: usize) -> Bytes {
    Bytes::from(vec![0xA5; size])
}

/// What the client asks for: `count` items of `size` bytes.
fn request(count: u64, size: usize) -> Bytes {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&count.to_le_bytes());
    b.extend_from_slice(&(size as u64).to_le_bytes());
    Bytes::from(b)
}

pub fn raw_server(done: Arc<Done>) -> LocalFuture<(ServerInfo, Box<dyn Any>)> {
    Box::pin(async move {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the raw listener");
        let addr = listener.local_addr().expect("local address").to_string();
        let accept = tokio::task::spawn_local(async move {
            loop {
                let (stream, _) = listener.accept().await.expect("accept");
                stream.set_nodelay(true).expect("TCP_NODELAY");
                tokio::task::spawn_local(raw_send(stream));
            }
        });
        let info = ServerInfo { addr, done };
        (info, Box::new(accept) as Box<dyn Any>)
    })
}

/// Reads the request, then writes its frames.
async fn raw_send(stream: TcpStream) {
    let (r, w) = stream.into_split();
    let mut rd = FramedRead::new(r, LengthDelimitedCodec::new());
    let mut wr = FramedWrite::new(w, LengthDelimitedCodec::new());
    // Writes of about 64 KiB, not FramedWrite's default 8 KiB (two 4 KiB frames).
    wr.set_backpressure_boundary(64 * 1024);
    let Some(Ok(req)) = rd.next().await else {
        return;
    };
    let count = u64::from_le_bytes(req[..8].try_into().expect("count"));
    let size = u64::from_le_bytes(req[8..16].try_into().expect("size")) as usize;
    let frame = item(size);
    for _ in 0..count {
        if wr.feed(frame.clone()).await.is_err() {
            return;
        }
    }
    let _ = SinkExt::<Bytes>::flush(&mut wr).await;
    // Keep the connection until the client is done reading.
    let _ = rd.next().await;
}

pub fn raw_client(spec: Spec, info: ServerInfo) -> LocalFuture<Measured> {
    Box::pin(async move {
        let stream = TcpStream::connect(&info.addr).await.expect("connect (raw)");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let (r, w) = stream.into_split();
        // Reads of up to 64 KiB: FramedRead's default 8 KiB buffer would take two 4 KiB
        // frames per read (chatter-core reads in larger blocks).
        let mut rd = FramedRead::with_capacity(r, LengthDelimitedCodec::new(), 64 * 1024);
        let mut wr = FramedWrite::new(w, LengthDelimitedCodec::new());
        wr.send(request(spec.warmup + spec.total, spec.payload))
            .await
            .expect("send (raw)");
        async fn read(
            rd: &mut FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
            n: u64,
            size: usize,
        ) {
            for _ in 0..n {
                let frame = rd.next().await.expect("a frame (raw)").expect("read (raw)");
                assert_eq!(frame.len(), size);
            }
        }
        read(&mut rd, spec.warmup, spec.payload).await;
        let (start, cpu) = (Instant::now(), process_cpu());
        read(&mut rd, spec.total, spec.payload).await;
        Measured {
            ops: spec.total,
            bytes_per_op: spec.payload as u64,
            elapsed: start.elapsed(),
            cpu: Some(process_cpu() - cpu),
            ..Measured::default()
        }
    })
}

/// The streaming service: `send(count: u64, size: u64) -> Receiver<Bytes>`.
struct Streams;

const SEND: Method = Method {
    name: "send",
    wire: b"\xa4send",
};

impl Service for Streams {
    fn __dispatch(&self, method: &[u8], args: &[u8], handlers: &mut Handlers) -> Dispatch {
        match method {
            b"send" => {
                let (count, size): (u64, u64) =
                    match decode_args("send", args, 2, |r| Ok((r.arg()?, r.arg()?))) {
                        Ok(a) => a,
                        Err(d) => return d,
                    };
                handlers.stream(async move {
                    let items = futures::stream::repeat(item(size as usize)).take(count as usize);
                    StreamReply::open(Receiver::from_stream(items))
                })
            }
            _ => Dispatch::NoSuchMethod,
        }
    }
}

pub fn rpc_server(done: Arc<Done>) -> LocalFuture<(ServerInfo, Box<dyn Any>)> {
    Box::pin(async move {
        let listener = listen("tcp://127.0.0.1:0", options(None, true))
            .await
            .expect("listen (chatter-rpc)");
        // 64 streams per connection by default: stream-fanout needs 100.
        let server = serve(
            listener,
            PeerOptions::default().max_streams(128),
            |peer: &Peer| {
                peer.register("streams", Streams);
            },
        );
        let addr = server.addresses()[0].to_string();
        let info = ServerInfo { addr, done };
        (info, Box::new(server) as Box<dyn Any>)
    })
}

/// Opens one stream of `count` items of `size` bytes.
async fn open_stream(client: &ClientCore, count: u64, size: usize) -> Receiver<Bytes> {
    client
        .call_stream_plain::<Bytes, _, ()>(
            &SEND,
            2,
            |w| {
                w.arg(&count)?;
                w.arg(&(size as u64))
            },
            None,
        )
        .await
        .expect("open a stream (chatter-rpc)")
}

pub fn rpc_client(spec: Spec, info: ServerInfo) -> LocalFuture<Measured> {
    Box::pin(async move {
        let conn = chatter_core::connect(info.addr.as_str(), options(None, false))
            .await
            .expect("connect (chatter-rpc)");
        let mut peer_options = PeerOptions::default();
        if spec.stream_window > 0 {
            peer_options = peer_options.stream_window(spec.stream_window);
        }
        let peer = Peer::with_options(conn, peer_options);
        let client = ClientCore::new(&peer, "streams");
        let m = if spec.streams == 1 {
            one_stream(&spec, &client).await
        } else {
            fanout(&spec, &client).await
        };
        drop(peer);
        m
    })
}

async fn one_stream(spec: &Spec, client: &ClientCore) -> Measured {
    let mut rx = open_stream(client, spec.warmup + spec.total, spec.payload).await;
    async fn read(rx: &mut Receiver<Bytes>, n: u64, size: usize) {
        for _ in 0..n {
            let item = rx
                .recv()
                .await
                .expect("an item")
                .expect("an item (chatter-rpc)");
            assert_eq!(item.len(), size);
        }
    }
    read(&mut rx, spec.warmup, spec.payload).await;
    let (start, cpu) = (Instant::now(), process_cpu());
    read(&mut rx, spec.total, spec.payload).await;
    Measured {
        ops: spec.total,
        bytes_per_op: spec.payload as u64,
        elapsed: start.elapsed(),
        cpu: Some(process_cpu() - cpu),
        ..Measured::default()
    }
}

/// `spec.streams` endless streams, each read by a task of its own; measured from the
/// `warmup`-th item (all streams together) to the `warmup + total`-th. The slowest
/// stream's share is its items over the fair share (measured items / streams).
async fn fanout(spec: &Spec, client: &ClientCore) -> Measured {
    let n = spec.streams;
    let opening = (0..n).map(|_| open_stream(client, u64::MAX, spec.payload));
    let streams = futures::future::join_all(opening).await;
    let counts: Rc<Vec<Cell<u64>>> = Rc::new((0..n).map(|_| Cell::new(0)).collect());
    let sum = Rc::new(Cell::new(0u64));
    // When the sum of items reached each mark, and every stream's count then: taken by
    // the reader that reached it (the waiting task may run much later).
    let marks = [spec.warmup, spec.warmup + spec.total];
    type Snap = (Instant, std::time::Duration, Vec<u64>);
    let snaps: Rc<RefCell<Vec<Snap>>> = Rc::default();
    let notify = Rc::new(Notify::new());
    for (i, mut rx) in streams.into_iter().enumerate() {
        let (counts, sum, snaps, notify) =
            (counts.clone(), sum.clone(), snaps.clone(), notify.clone());
        let size = spec.payload;
        tokio::task::spawn_local(async move {
            while let Some(item) = rx.recv().await {
                let item = item.expect("an item (chatter-rpc)");
                assert_eq!(item.len(), size);
                counts[i].set(counts[i].get() + 1);
                sum.set(sum.get() + 1);
                if marks.contains(&sum.get()) {
                    let (now, cpu) = (Instant::now(), process_cpu());
                    snaps
                        .borrow_mut()
                        .push((now, cpu, counts.iter().map(Cell::get).collect()));
                    notify.notify_one();
                }
            }
            panic!("an endless stream ended");
        });
    }
    while snaps.borrow().len() < 2 {
        notify.notified().await;
    }
    let snaps = snaps.borrow();
    let ((start, cpu0, before), (end, cpu1, after)) = (&snaps[0], &snaps[1]);
    let elapsed = *end - *start;
    let got: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let total: u64 = got.iter().sum();
    let slowest = got.iter().copied().min().unwrap_or(0);
    Measured {
        ops: total,
        bytes_per_op: spec.payload as u64,
        elapsed,
        min_share: Some(slowest as f64 / (total as f64 / n as f64)),
        cpu: Some(*cpu1 - *cpu0),
        ..Measured::default()
    }
}
