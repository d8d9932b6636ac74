//! `chatter-broker`: runs a broker until interrupted.

use std::process::ExitCode;

use chatter_broker::{Broker, BrokerOptions};
use chatter_core::Options;
use clap::Parser;

/// A chatter broker: peers connect, register names, and call each other through it.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Where to listen: tcp://HOST:PORT, unix:PATH (or unix://PATH), or tls://HOST:PORT (with --tls-cert and
    /// --tls-key). Repeat for several.
    #[arg(long, required = true)]
    listen: Vec<String>,
    /// The server certificate chain (PEM) for tls:// addresses.
    #[cfg(feature = "tls")]
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The server's private key (PEM) for tls:// addresses.
    #[cfg(feature = "tls")]
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Each connection's receive window, in bytes: what the broker holds at most of one
    /// peer's input.
    #[arg(long, default_value_t = 8 << 20)]
    receive_window: u32,
    /// The longest peer name accepted, in bytes.
    #[arg(long, default_value_t = 255)]
    max_name_len: usize,
    /// The most conversations relayed through one peer's connection at once; calls beyond
    /// fail with "peer busy". At most the peers' own limit (65536 by default).
    #[arg(long, default_value_t = 32_768)]
    max_routes_per_peer: usize,
    /// Disconnect a peer that takes no message for this many seconds while messages wait
    /// for it (off when not given).
    #[arg(long, value_name = "SECONDS")]
    slow_peer_timeout: Option<u64>,
    /// Require TLS client certificates signed by this CA (PEM) on tls:// addresses; a
    /// certificate's common name is its peer's identity for --access.
    #[cfg(feature = "tls")]
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    client_ca: Option<std::path::PathBuf>,
    /// Access control rules, one per line: `identity NAME register|call GLOB`, `identity
    /// NAME publish|subscribe PATTERN`, `identity NAME introspect|all`, `credential TOKEN
    /// IDENTITY`, `anonymous …` (chatter_broker::AccessControl::parse). Without it every
    /// peer may do everything.
    #[arg(long, value_name = "FILE")]
    access: Option<std::path::PathBuf>,
    /// The most subscriptions one connection may hold.
    #[arg(long, default_value_t = 64)]
    max_subscriptions_per_peer: usize,
    /// The most bytes of publications waiting for one subscriber (drop and end policies).
    #[arg(long, default_value_t = 1 << 20)]
    max_subscription_queue: usize,
    /// Linux: the kernel hands a TCP connection to the broker only once the client's first
    /// bytes arrived (TCP_DEFER_ACCEPT), so peers that connect and say nothing take no
    /// connection slot. For an exposed broker; costs some first-reply latency.
    #[arg(long)]
    defer_accept: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatter-broker: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    #[allow(unused_mut)]
    let mut connection = Options::default()
        .receive_window(args.receive_window)
        .tcp_defer_accept(args.defer_accept);
    #[cfg(feature = "tls")]
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let mut tls = chatter_core::tls::ServerTls::from_pem_files(cert, key)?;
        if let Some(ca) = &args.client_ca {
            tls = tls.require_client_certificates_pem_file(ca)?;
        }
        connection = connection.tls_server(tls);
    }
    let mut options = BrokerOptions::new()
        .connection(connection)
        .max_name_len(args.max_name_len)
        .max_routes_per_peer(args.max_routes_per_peer)
        .slow_peer_timeout(args.slow_peer_timeout.map(std::time::Duration::from_secs))
        .max_subscriptions_per_peer(args.max_subscriptions_per_peer)
        .max_subscription_queue(args.max_subscription_queue);
    if let Some(path) = &args.access {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let access = chatter_broker::AccessControl::parse(&text)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        options = options.access_control(access);
    }
    let mut brokers = Vec::new();
    for address in &args.listen {
        // `unix:PATH` for `unix://PATH`.
        let address = match address.strip_prefix("unix:") {
            Some(path) if !path.starts_with("//") => format!("unix://{path}"),
            _ => address.clone(),
        };
        let broker = Broker::listen(address.as_str(), options.clone()).await?;
        for a in broker.addresses() {
            println!("chatter-broker listening on {a}");
        }
        brokers.push(broker);
    }
    tokio::signal::ctrl_c().await?;
    for broker in &brokers {
        broker.close().await;
    }
    Ok(())
}
