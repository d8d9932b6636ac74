//! Sends persistent signals `durable(from..to)` through a reconnecting `Peer` with a store,
//! printing `stored N` once `send` returned for `N` (so the signal is on disk). Then waits
//! until every stored signal was acknowledged, prints `flushed`, and exits.
//!
//! Usage: `reliable-sender ADDRESS STORE FROM TO`. The crash test kills it with SIGKILL in
//! the middle and starts it again on the same store.

use std::io::Write;
use std::time::Duration;

use chatter_rpc::{Backoff, Options, Peer, PeerOptions, ReconnectOptions};
use tests::numbers::NumbersClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, address, store, from, to] = &args[..] else {
        return Err("usage: reliable-sender ADDRESS STORE FROM TO".into());
    };
    let (from, to): (u64, u64) = (from.parse()?, to.parse()?);
    let peer = Peer::reconnecting(
        address.as_str(),
        Options::default(),
        PeerOptions::default().max_queued_signals(100_000),
        ReconnectOptions::default()
            .store(store)
            .backoff(Backoff::exponential(
                Duration::from_millis(10),
                Duration::from_millis(200),
            )),
    )?;
    let numbers = NumbersClient::new(&peer, "numbers");
    let mut out = std::io::stdout().lock();
    for n in from..to {
        numbers.durable(n).await?;
        writeln!(out, "stored {n}")?;
        out.flush()?;
    }
    drop(out);
    tokio::time::timeout(Duration::from_secs(60), peer.flush()).await?;
    println!("flushed");
    peer.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
