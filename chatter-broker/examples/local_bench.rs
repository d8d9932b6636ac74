//! In-process clients against Unix-socket clients of one broker: routed calls per second
//! with 1 and 256 in flight, and one-way signals per second, 100-byte payloads, for
//! several in-process pipe sizes.
//!
//! `cargo run --release -p chatter-broker --example local_bench [seconds per row] [row]`
//! (`row`: only the rows whose name contains it, e.g. `default` or `Unix`)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatter_broker::{Broker, BrokerOptions, Bus, BusOptions};
use chatter_rpc::remote;

#[remote]
pub trait Echo {
    async fn echo(&self, data: String) -> u32;
    #[signal(ttl = "60s")]
    async fn note(&self, data: String);
}

struct E(Arc<AtomicU64>);

impl Echo for E {
    async fn echo(&self, data: String) -> u32 {
        data.len() as u32
    }
    async fn note(&self, _data: String) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// A callee `echo-1` and a caller, both in-process (`local_buffer` bytes) or both over the
/// broker's Unix socket (`None`).
async fn pair(broker: &Broker, local_buffer: Option<usize>) -> (Bus, Bus, Arc<AtomicU64>) {
    let notes = Arc::new(AtomicU64::new(0));
    let (callee, caller) = match local_buffer {
        Some(bytes) => {
            let options = BusOptions::new().local_buffer(bytes);
            let callee = broker
                .connect_local_unnamed(options.clone())
                .await
                .expect("callee");
            let caller = broker
                .connect_local_with("app", options)
                .await
                .expect("caller");
            (callee, caller)
        }
        None => {
            let address = &broker.addresses()[0];
            let callee = chatter_broker::connect_unnamed(address, BusOptions::new())
                .await
                .expect("callee");
            let caller = chatter_broker::connect(address, "app")
                .await
                .expect("caller");
            (callee, caller)
        }
    };
    callee.register("echo", EchoServer::new(E(notes.clone())));
    callee.claim("echo-1", false).await.expect("claims");
    (callee, caller, notes)
}

/// Calls per second with `in_flight` callers looping for `secs`.
async fn calls(client: &EchoClient, in_flight: usize, secs: f64) -> f64 {
    let payload = "x".repeat(100);
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..in_flight)
        .map(|_| {
            let (client, payload, done) = (client.clone(), payload.clone(), done.clone());
            // `in_flight` of them (at most 256), each ending at `until`.
            tokio::spawn(async move {
                while Instant::now() < until {
                    client.echo(payload.clone()).await.expect("call");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let start = Instant::now();
    for task in tasks {
        task.await.expect("task");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// One-way signals per second, sent as fast as the flow control lets them, counted when
/// handled.
async fn signals(client: &EchoClient, notes: &AtomicU64, secs: f64) -> f64 {
    let payload = "x".repeat(100);
    let before = notes.load(Ordering::Relaxed);
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    while Instant::now() < until {
        for _ in 0..64 {
            drop(client.note(payload.clone()).await.expect("signal"));
        }
        sent += 64;
    }
    while notes.load(Ordering::Relaxed) - before < sent {
        tokio::task::yield_now().await;
    }
    sent as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let path =
            std::env::temp_dir().join(format!("chatter-local-bench-{}.sock", std::process::id()));
        let address = format!("unix://{}", path.display());
        println!("| transport | calls/s, 1 in flight | calls/s, 256 in flight | signals/s |");
        println!("|---|---:|---:|---:|");
        let rows: [(&str, Option<usize>); 4] = [
            ("Unix socket", None),
            ("in-process, 64 KiB pipe (default)", Some(64 * 1024)),
            ("in-process, 256 KiB pipe", Some(256 * 1024)),
            ("in-process, 1 MiB pipe", Some(1024 * 1024)),
        ];
        let only = std::env::args().nth(2).unwrap_or_default();
        for (name, buffer) in rows.into_iter().filter(|(name, _)| name.contains(&only)) {
            let broker = Broker::listen(&address, BrokerOptions::default())
                .await
                .expect("listen");
            let (callee, caller, notes) = pair(&broker, buffer).await;
            let client = EchoClient::new(&caller.peer("echo-1"), "echo");
            // Warm up.
            calls(&client, 16, secs / 4.0).await;
            let one = calls(&client, 1, secs).await;
            let many = calls(&client, 256, secs).await;
            let sent = signals(&client, &notes, secs).await;
            println!("| {name} | {one:.0} | {many:.0} | {sent:.0} |");
            caller.close().await;
            callee.close().await;
            broker.close().await;
        }
    });
}
