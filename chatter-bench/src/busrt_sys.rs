//! BUS/RT's side of the broker comparison (`broker.rs`): the `busrt` crate 0.5.6 with its
//! features `broker` (the broker, Unix and TCP servers), `ipc` (the async client over a
//! socket) and `rpc` (its RPC layer). Built only with chatter-bench's `busrt` feature.
//!
//! Everything is at BUS/RT's defaults (`ServerConfig::default()`, `ipc::Config::new`: 8 KiB
//! buffers, a 10 µs write-buffer TTL, queues of 8,192 frames, a 1 s timeout), as chatter's
//! side is at chatter-broker's.

use std::any::Any;
use std::sync::Arc;
use std::time::Instant;

use busrt::broker::{Broker, ServerConfig};
use busrt::client::AsyncClient;
use busrt::ipc::{Client, Config};
use busrt::rpc::{Rpc, RpcClient, RpcEvent, RpcHandlers, RpcResult};
use busrt::{async_trait, Frame, QoS};

use crate::broker::{
    memory, one_by_one, Case, Host, Outcome, Phase, Size, Sys, Tally, Transport, PAYLOAD, TOPIC,
};
use crate::harness::drive_calls;

/// Starts BUS/RT's broker on `transport`; returns the address its clients connect to.
pub async fn listen(transport: Transport, queue: Option<usize>) -> (String, Box<dyn Any>) {
    let mut broker = Broker::new();
    if let Some(frames) = queue {
        broker.set_queue_size(frames);
    }
    let addr = match transport {
        Transport::Unix => {
            let path = Transport::unix_path(Sys::Busrt);
            broker
                .spawn_unix_server(&path, ServerConfig::default())
                .await
                .expect("listen (busrt, unix)");
            path
        }
        Transport::Tcp => {
            // spawn_tcp_server binds the address it is given and does not say which port
            // it got for port 0: take a free port first.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let addr = format!("127.0.0.1:{port}");
            broker
                .spawn_tcp_server(&addr, ServerConfig::default())
                .await
                .expect("listen (busrt, tcp)");
            addr
        }
    };
    (addr, Box::new(broker))
}

async fn client(addr: &str, name: &str) -> Client {
    Client::connect(&Config::new(addr, name))
        .await
        .unwrap_or_else(|e| panic!("connect {name} to busrt: {e}"))
}

/// Pings `c` every half timeout, as BUS/RT's `RpcClient` does for its client: its broker
/// drops a client that sent nothing for 1.25 timeouts (1.25 s by default), so a client that
/// only receives must ping.
fn keep_alive(c: Client) -> Arc<tokio::sync::Mutex<Client>> {
    let c = Arc::new(tokio::sync::Mutex::new(c));
    let pinged = c.clone();
    // One per receive-only client of the case; ends when a ping fails (the client closed).
    tokio::task::spawn_local(async move {
        loop {
            tokio::time::sleep(busrt::DEFAULT_TIMEOUT / 2).await;
            if pinged.lock().await.ping().await.is_err() {
                return;
            }
        }
    });
    c
}

/// A client named `name` whose every incoming frame is counted in `tally`, subscribed to
/// `topic` if given, and pinged.
async fn sink(
    addr: &str,
    name: &str,
    tally: &Arc<Tally>,
    topic: Option<&str>,
) -> Arc<tokio::sync::Mutex<Client>> {
    let mut c = client(addr, name).await;
    if let Some(topic) = topic {
        c.subscribe(topic, QoS::Processed)
            .await
            .expect("subscribe (busrt)")
            .expect("a confirmation")
            .await
            .expect("the broker's ack")
            .expect("subscribed (busrt)");
    }
    let rx = c.take_event_channel().expect("event channel");
    let tally = tally.clone();
    let name = name.to_string();
    // One per receiving client of the case; ends when the client's event channel closes
    // (its connection ended).
    tokio::task::spawn_local(async move {
        let mut got = 0u64;
        while let Ok(frame) = rx.recv().await {
            debug_assert_eq!(frame.payload().len(), PAYLOAD);
            got += 1;
            tally.add(1);
        }
        // The client's reader ended: the broker closed the connection (BUS/RT disconnects
        // a client whose queue of 8,192 frames is full).
        tally.fail(format!(
            "busrt receiver {name} was disconnected by the broker after {got} messages \
             (BUS/RT disconnects a client whose queue of 8,192 frames is full)"
        ));
    });
    keep_alive(c)
}

struct Echo;

#[async_trait]
impl RpcHandlers for Echo {
    async fn handle_call(&self, event: RpcEvent) -> RpcResult {
        Ok(Some(event.payload().to_vec()))
    }

    async fn handle_frame(&self, _frame: Frame) {}
}

/// Sends `n` fire-and-forget messages (`QoS::No`), yielding every 256 as chatter's side.
async fn send_no(a: &mut Client, to: &str, payload: &[u8], n: u64, publish: bool) {
    for i in 0..n {
        let sent = if publish {
            a.publish(to, payload.into(), QoS::No).await
        } else {
            a.send(to, payload.into(), QoS::No).await
        };
        sent.expect("send (busrt)");
        if i % 256 == 255 {
            tokio::task::yield_now().await;
        }
    }
}

/// The QoS of BUS/RT's calls: its fastest for the case, measured here. One in flight,
/// `RealtimeProcessed` (as BUS/RT's own `rpc.call` benchmark; the broker acks the request,
/// and every frame is flushed at once): 6.5k calls/s against 4.3-5.9k with `Processed`,
/// `Realtime` or `No`. 256 in flight, `No` (no ack; frames wait up to the 10 µs buffer
/// TTL to go out together): 190k against 40k (`RealtimeProcessed`), 36k (`Realtime`) and
/// 142k (`Processed`). `BUSRT_RPC_QOS=rp|p|rt|no` overrides it.
fn rpc_qos(window: usize) -> QoS {
    match std::env::var("BUSRT_RPC_QOS").as_deref() {
        Ok("no") => QoS::No,
        Ok("p") => QoS::Processed,
        Ok("rt") => QoS::Realtime,
        Ok("rp") => QoS::RealtimeProcessed,
        _ if window > 1 => QoS::No,
        _ => QoS::RealtimeProcessed,
    }
}

pub async fn run(case: Case, size: Size, host: &mut Host) -> Outcome {
    let addr = host.addr.clone();
    let payload = vec![0xee_u8; PAYLOAD];
    let tally = Tally::new();
    match case {
        Case::Send => {
            let _b = sink(&addr, "b", &tally, None).await;
            let mut a = client(&addr, "a").await;
            tally.expect(size.warmup);
            send_no(&mut a, "b", &payload, size.warmup, false).await;
            tally.wait().await;
            tally.expect(size.warmup + size.total);
            let phase = Phase::begin(host);
            send_no(&mut a, "b", &payload, size.total, false).await;
            let end = tally.wait().await;
            phase.end(host, end, size.total, Vec::new())
        }
        Case::SendConfirmed => {
            let _b = sink(&addr, "b", &tally, None).await;
            let a = tokio::sync::Mutex::new(client(&addr, "a").await);
            let op = |_| async {
                let confirm = a
                    .lock()
                    .await
                    .send("b", payload.as_slice().into(), QoS::RealtimeProcessed)
                    .await
                    .expect("send (busrt)")
                    .expect("a confirmation");
                confirm
                    .await
                    .expect("the broker's ack")
                    .expect("delivered (busrt)");
            };
            one_by_one(size.warmup, op).await;
            let phase = Phase::begin(host);
            let latencies = one_by_one(size.total, op).await;
            phase.end(host, Instant::now(), size.total, latencies)
        }
        Case::Rpc1 | Case::Rpc256 => {
            let _s = RpcClient::new(client(&addr, "s").await, Echo);
            let c = RpcClient::new0(client(&addr, "c").await);
            let qos = rpc_qos(size.width);
            let call = |_| async {
                let back = c
                    .call("s", "echo", payload.as_slice().into(), qos)
                    .await
                    .expect("echo (busrt)");
                assert_eq!(back.payload().len(), PAYLOAD);
            };
            drive_calls(size.warmup, size.width, call).await;
            let phase = Phase::begin(host);
            let latencies = drive_calls(size.total, size.width, call).await;
            phase.end(host, Instant::now(), size.total, latencies)
        }
        Case::Pub1 | Case::Pub16 => {
            let mut subscribers = Vec::with_capacity(size.width);
            for i in 0..size.width {
                subscribers.push(sink(&addr, &format!("sub-{i}"), &tally, Some(TOPIC)).await);
            }
            let n = size.width as u64;
            let mut p = client(&addr, "p").await;
            tally.expect(size.warmup * n);
            send_no(&mut p, TOPIC, &payload, size.warmup, true).await;
            tally.wait().await;
            tally.expect((size.warmup + size.total) * n);
            let phase = Phase::begin(host);
            send_no(&mut p, TOPIC, &payload, size.total, true).await;
            let end = tally.wait().await;
            phase.end(host, end, size.total * n, Vec::new())
        }
        Case::Memory => {
            let n = size.total;
            memory(host, n, || async move {
                let mut clients = Vec::with_capacity(n as usize);
                for i in 0..n {
                    // Pinged, or the broker would drop them after 1.25 s.
                    clients.push(keep_alive(client(&addr, &format!("idle-{i}")).await));
                }
                Box::new(clients) as Box<dyn Any>
            })
            .await
        }
    }
}
