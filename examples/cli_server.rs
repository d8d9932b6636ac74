//! A server to try the `chatter` command-line tool on: a calculator, served until the
//! process is stopped (Ctrl-C), on the address given as the first argument
//! (`tcp://127.0.0.1:7000` by default; `unix:///tmp/calc.sock` works too).
//!
//! Run with `cargo run --example cli_server`, then in another terminal:
//!
//! ```text
//! chatter list tcp://127.0.0.1:7000
//! chatter describe tcp://127.0.0.1:7000 calc
//! chatter call tcp://127.0.0.1:7000 calc.add 2 3
//! chatter call tcp://127.0.0.1:7000 calc.area '{"Square": 2}'
//! chatter call tcp://127.0.0.1:7000 calc.div 1 0
//! chatter watch tcp://127.0.0.1:7000 calc.count 5 --count 3
//! chatter emit tcp://127.0.0.1:7000 calc.log '"hello"'
//! chatter ping tcp://127.0.0.1:7000
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chatter_rpc::stream::{self, Receiver};
use chatter_rpc::{listen, remote, serve, Options, Peer, PeerOptions};
use serde::{Deserialize, Serialize};

/// The calculator's error.
#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
pub enum CalcError {
    #[error("division by zero")]
    DivisionByZero,
}

/// A point, to show how a struct is written as JSON: `{"x": 1, "y": 2}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Point {
    pub x: f64,
    pub y: f64,
}

/// A figure, to show how an enum is written as JSON: `"Empty"`, `{"Square": 2}`,
/// `{"Circle": {"r": 1}}`.
#[derive(Debug, Serialize, Deserialize)]
pub enum Figure {
    Circle { r: f64 },
    Square(f64),
    Empty,
}

/// A calculator to try the `chatter` tool on.
#[remote]
pub trait Calculator {
    /// Adds two numbers.
    async fn add(&self, a: i64, b: i64) -> i64;
    /// Divides, or fails with a typed error (try dividing by zero).
    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError>;
    /// The distance of a point from the origin.
    async fn norm(&self, p: Point) -> f64;
    /// The area of a figure.
    async fn area(&self, figure: Figure) -> f64;
    /// Prints a line on the server's console.
    #[signal(ttl = "5s")]
    async fn log(&self, line: String);
    /// How many lines were logged.
    async fn logged(&self) -> u64;
    /// Counts from 1 to `to`, one number every 100 ms (a stream: `chatter watch`).
    async fn count(&self, to: u64) -> Receiver<u64>;
}

struct Calc {
    logged: AtomicU64,
}

impl Calculator for Calc {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }

    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError> {
        a.checked_div(b).ok_or(CalcError::DivisionByZero)
    }

    async fn norm(&self, p: Point) -> f64 {
        p.x.hypot(p.y)
    }

    async fn area(&self, figure: Figure) -> f64 {
        match figure {
            Figure::Circle { r } => std::f64::consts::PI * r * r,
            Figure::Square(side) => side * side,
            Figure::Empty => 0.0,
        }
    }

    async fn log(&self, line: String) {
        self.logged.fetch_add(1, Ordering::Relaxed);
        println!("log: {line}");
    }

    async fn logged(&self) -> u64 {
        self.logged.load(Ordering::Relaxed)
    }

    async fn count(&self, to: u64) -> Receiver<u64> {
        let (tx, rx) = stream::channel(1);
        tokio::spawn(async move {
            for i in 1..=to {
                // The reader went (for example `chatter watch --count`): stop.
                if tx.send(i).await.is_err() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        });
        rx
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tcp://127.0.0.1:7000".to_owned());
    let calc = Arc::new(Calc {
        logged: AtomicU64::new(0),
    });
    let listener = listen(address.as_str(), Options::default()).await?;
    let server = serve(listener, PeerOptions::default(), move |peer: &Peer| {
        peer.register("calc", CalculatorServer::from_arc(calc.clone()));
    });
    println!(
        "serving a calculator on {} (Ctrl-C stops)",
        server.addresses()[0]
    );
    std::future::pending::<()>().await;
    Ok(())
}
