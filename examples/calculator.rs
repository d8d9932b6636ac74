//! chatter-rpc: a remote calculator. Server and client in one process: calls, a typed
//! error with its remote context, a per-call deadline, a signal, and a callback from the
//! server to the client over the same connection.
//!
//! Run with `cargo run --example calculator`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatter_rpc::{connect, listen, remote, serve, CallError, Options, Peer, PeerOptions};
use serde::{Deserialize, Serialize};

/// The calculator's own error type: it reaches the caller as this same type.
#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
pub enum CalcError {
    #[error("division by zero")]
    DivisionByZero,
}

/// The remote interface. `#[remote]` generates `CalculatorClient` and `CalculatorServer`.
#[remote]
pub trait Calculator {
    /// Adds two numbers.
    async fn add(&self, a: i64, b: i64) -> i64;
    /// Divides, or fails with a typed error.
    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError>;
    /// Takes its time.
    async fn slow_square(&self, x: i64, millis: u64) -> i64;
    /// Fire-and-forget: no reply, dropped if not delivered within 5 s.
    #[signal(ttl = "5s")]
    async fn log(&self, line: String);
    /// How many log lines arrived.
    async fn logged(&self) -> u64;
}

/// The client hosts this, so the server can call back.
#[remote]
pub trait Console {
    async fn print(&self, text: String);
}

struct Calc {
    logged: AtomicU64,
    /// Calls back the client on this connection.
    console: ConsoleClient,
}

impl Calculator for Calc {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }

    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError> {
        a.checked_div(b).ok_or(CalcError::DivisionByZero)
    }

    async fn slow_square(&self, x: i64, millis: u64) -> i64 {
        tokio::time::sleep(Duration::from_millis(millis)).await;
        x * x
    }

    async fn log(&self, line: String) {
        self.logged.fetch_add(1, Ordering::Relaxed);
        // A call from the server to the client, over the same connection.
        let _ = self.console.print(format!("[server log] {line}")).await;
    }

    async fn logged(&self) -> u64 {
        self.logged.load(Ordering::Relaxed)
    }
}

struct Stdout;

impl Console for Stdout {
    async fn print(&self, text: String) {
        println!("client console: {text}");
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listener = listen("tcp://127.0.0.1:0", Options::default()).await?;
    let server = serve(listener, PeerOptions::default(), |peer: &Peer| {
        let calc = Calc {
            logged: AtomicU64::new(0),
            console: ConsoleClient::new(peer, "console"),
        };
        peer.register("calculator", CalculatorServer::from_arc(Arc::new(calc)));
    });
    println!("server: serving on {}", server.addresses()[0]);

    let peer = Peer::new(connect(&server.addresses()[0], Options::default()).await?);
    peer.register("console", ConsoleServer::new(Stdout));
    let calc = CalculatorClient::new(&peer, "calculator");

    println!("add(2, 3) = {}", calc.add(2, 3).await?);
    println!("div(7, 2) = {}", calc.div(7, 2).await?);

    match calc.div(1, 0).await {
        Err(CallError::App { error, remote }) => {
            println!("div(1, 0) failed with the typed error {error:?} (remote says: {remote})")
        }
        other => println!("div(1, 0) = {other:?}?"),
    }

    let hurried = calc.with_deadline(Duration::from_millis(50));
    match hurried.slow_square(4, 1_000).await {
        Err(CallError::DeadlineExceeded) => {
            println!("slow_square(4) with a 50 ms deadline: deadline exceeded")
        }
        other => println!("slow_square(4) = {other:?}?"),
    }
    println!("slow_square(5) = {}", calc.slow_square(5, 10).await?);

    calc.log("hello from the client".into()).await?;
    calc.log("and again".into()).await?;
    // Calls and signals travel in order on one connection, but handlers run concurrently:
    // wait until both signal handlers have run.
    while calc.logged().await? < 2 {
        tokio::task::yield_now().await;
    }
    println!("the server received {} log lines", calc.logged().await?);

    match CalculatorClient::new(&peer, "abacus").add(1, 1).await {
        Err(e @ CallError::NoSuchObject { .. }) => println!("calling an unknown object: {e}"),
        other => println!("abacus: {other:?}?"),
    }

    peer.close().await;
    server.close().await;
    println!("closed");
    Ok(())
}
