//! The slow-consumer case of issue 15, measured: a receiver whose signal handler takes 2 s,
//! with one handler slot, fed 16 KiB signals by a plain `Peer` as fast as it accepts them.
//!
//! Prints, once a second: signals the sender had accepted, signals handled, the bytes of
//! flow-control credit the receiving connection holds (`Connection::buffered().received`),
//! and the process's resident memory (sender and receiver both live in it). The sender's
//! signal futures wait for room in its outbox (`WhenFull::Wait`, the default); one that is
//! refused (`SignalError::OutboxFull`, only with `WhenFull::Error`) waits for the outbox to
//! drain and tries again, as a user would.
//!
//! ```sh
//! cargo run --release -p chatter-bench --bin slow_consumer -- [SECONDS] [HANDLERS]
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chatter_core::{connect, listen, Options};
use chatter_rpc::{serve, Peer, PeerOptions, SignalError};

#[chatter_rpc::remote]
pub trait Sink {
    #[signal(ttl = "600s")]
    async fn put(&self, data: Vec<u8>);
}

struct Slow {
    handled: Arc<AtomicU64>,
}

impl Sink for Slow {
    async fn put(&self, _data: Vec<u8>) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.handled.fetch_add(1, Ordering::Relaxed);
    }
}

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(15);
    let handlers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);

    let handled = Arc::new(AtomicU64::new(0));
    let accepted_peers = Arc::new(std::sync::Mutex::new(Vec::<Peer>::new()));
    let listener = listen("tcp://127.0.0.1:0", Options::default()).await?;
    let server = {
        let handled = handled.clone();
        let accepted_peers = accepted_peers.clone();
        serve(
            listener,
            PeerOptions::default().max_concurrent_handlers(handlers),
            move |peer: &Peer| {
                peer.register(
                    "sink",
                    SinkServer::new(Slow {
                        handled: handled.clone(),
                    }),
                );
                accepted_peers
                    .lock()
                    .expect("not poisoned")
                    .push(peer.clone());
            },
        )
    };
    let client = Peer::new(connect(&server.addresses()[0], Options::default()).await?);
    let sink = SinkClient::new(&client, "sink");

    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let sender = {
        let (accepted, refused, client) = (accepted.clone(), refused.clone(), client.clone());
        tokio::spawn(async move {
            let data = vec![0x5au8; 16 * 1024];
            loop {
                match sink.put(data.clone()).await {
                    Ok(_) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(SignalError::OutboxFull) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        client.flush().await;
                    }
                    Err(e) => {
                        eprintln!("signal failed: {e}");
                        return;
                    }
                }
            }
        })
    };

    println!("seconds accepted handled refused held_bytes rss_mib");
    let start = Instant::now();
    let (mut peak_held, mut peak_rss) = (0u64, 0f64);
    for _ in 0..seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let held: u64 = accepted_peers
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|p| p.connection().map_or(0, |c| c.buffered().received))
            .sum();
        let rss = rss_mib();
        peak_held = peak_held.max(held);
        peak_rss = peak_rss.max(rss);
        println!(
            "{:.0} {} {} {} {} {:.1}",
            start.elapsed().as_secs_f64(),
            accepted.load(Ordering::Relaxed),
            handled.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed),
            held,
            rss
        );
    }
    sender.abort();
    println!(
        "summary: {seconds} s, {handlers} handler(s): accepted {} handled {} refused {} peak_held_bytes {peak_held} peak_rss_mib {peak_rss:.1}",
        accepted.load(Ordering::Relaxed),
        handled.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    std::process::exit(0);
}
