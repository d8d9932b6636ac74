//! chatter-rpc: a client that survives a server restart. A reconnecting `Peer`
//! (`Peer::reconnecting`) keeps reconnecting while the server is down; a call made meanwhile waits for the reconnect
//! (within its deadline), and signals sent meanwhile wait in the outbox and are delivered,
//! in order, once the server is back. Each signal's `Sent` says when the server's handler
//! finished with it.
//!
//! Run with `cargo run --example reconnect`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatter_rpc::{
    listen, remote, serve, Backoff, Options, Peer, PeerEvent, PeerOptions, ReconnectOptions,
    RpcServer,
};

#[remote]
pub trait Journal {
    /// How many lines this server instance has written. Safe to re-send.
    #[idempotent]
    async fn lines(&self) -> u64;
    /// Which server instance answers.
    #[idempotent]
    async fn instance(&self) -> u32;
    /// Writes a line; no reply; dropped (and reported) if not delivered within 30 s.
    #[signal(ttl = "30s")]
    async fn write(&self, line: String);
}

struct Book {
    instance: u32,
    lines: Arc<AtomicU64>,
}

impl Journal for Book {
    async fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    async fn instance(&self) -> u32 {
        self.instance
    }

    async fn write(&self, line: String) {
        self.lines.fetch_add(1, Ordering::Relaxed);
        println!("  [server #{}] {line}", self.instance);
    }
}

/// Starts server instance `instance` on `address` (port 0 picks one).
async fn start(address: &str, instance: u32) -> Result<RpcServer, Box<dyn std::error::Error>> {
    let lines = Arc::new(AtomicU64::new(0));
    let listener = listen(address, Options::default()).await?;
    let server = serve(
        listener,
        PeerOptions::default().ordered_signals(true),
        move |peer: &Peer| {
            let book = Book {
                instance,
                lines: lines.clone(),
            };
            peer.register("journal", JournalServer::new(book));
        },
    );
    println!("server #{instance} listening on {}", server.addresses()[0]);
    Ok(server)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = start("tcp://127.0.0.1:0", 1).await?;
    let address = server.addresses()[0].to_string();

    let peer = Peer::reconnecting(
        &address,
        Options::default(),
        PeerOptions::default().default_deadline(Duration::from_secs(5)),
        ReconnectOptions::default().backoff(Backoff::exponential(
            Duration::from_millis(50),
            Duration::from_secs(1),
        )),
    )?;
    let mut events = peer.events();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                PeerEvent::Connected { remote } => println!("client: connected to {remote}"),
                PeerEvent::Disconnected { cause } => println!("client: disconnected ({cause})"),
                PeerEvent::Reconnecting { attempt, delay, .. } => {
                    println!("client: reconnect attempt {attempt} in {delay:?}")
                }
                other => println!("client: {other:?}"),
            }
        }
    });
    let journal = JournalClient::new(&peer, "journal");

    journal
        .write("first line".into())
        .await?
        .acknowledged(Duration::from_secs(5))
        .await?;
    println!("client: server #1 has {} line(s)", journal.lines().await?);

    println!("-- server #1 shuts down --");
    server.shutdown(Duration::from_secs(1)).await;
    drop(server);

    // While the server is down: signals queue up, a call waits for the reconnect.
    let mut sent = Vec::new();
    for n in 1..=3 {
        sent.push(
            journal
                .write(format!("written while the server was down ({n})"))
                .await?,
        );
    }
    println!("client: {} signal(s) waiting in the outbox", peer.queued());
    let call = tokio::spawn(journal.instance());
    tokio::time::sleep(Duration::from_millis(300)).await; // the downtime, for the demo

    println!("-- server #2 starts on the same address --");
    let server = start(&address, 2).await?;
    for s in sent {
        s.acknowledged(Duration::from_secs(5)).await?;
    }
    println!("client: the queued signals were handled by server #2, in order");
    println!(
        "client: the call made during the downtime was answered by server #{}",
        call.await??
    );
    println!("client: server #2 has {} line(s)", journal.lines().await?);
    println!("client: stats {:?}", peer.stats());

    peer.shutdown(Duration::from_secs(1)).await;
    server.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
