//! Shared fixtures of the end-to-end RPC tests: a calculator trait and a pair of peers
//! connected over TCP on 127.0.0.1.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use chatter_core::{connect, listen, Options};
use chatter_rpc::{remote, Peer, PeerOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{0}")]
pub struct Detail(pub String);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum CalcError {
    #[error("division by zero")]
    DivisionByZero,
    #[error("overflow in {op}")]
    Overflow {
        op: String,
        #[source]
        detail: Detail,
    },
}

#[remote]
pub trait Calculator {
    /// Adds two numbers.
    async fn add(&self, a: i64, b: i64) -> i64;
    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError>;
    async fn explode(&self, message: String) -> u32;
    /// Takes no arguments.
    async fn answer(&self) -> i64;
    /// Announces that it started, then waits until released; records when its future is
    /// dropped.
    async fn wait(&self, tag: String) -> String;
    /// Sleeps (tests run on the paused clock), recording when its future is dropped.
    async fn sleep(&self, secs: u64) -> u64;
    #[signal]
    async fn record(&self, value: i64);
    #[signal(ttl = "1s")]
    async fn note(&self, text: String);
}

/// What the test can observe of a [`Calc`].
pub struct Probe {
    pub started: mpsc::UnboundedReceiver<String>,
    pub dropped: mpsc::UnboundedReceiver<String>,
    pub recorded: mpsc::UnboundedReceiver<i64>,
    pub notes: mpsc::UnboundedReceiver<String>,
    pub release: Arc<Notify>,
}

#[derive(Clone)]
pub struct Calc {
    started: mpsc::UnboundedSender<String>,
    dropped: mpsc::UnboundedSender<String>,
    recorded: mpsc::UnboundedSender<i64>,
    notes: mpsc::UnboundedSender<String>,
    release: Arc<Notify>,
}

impl Calc {
    pub fn new() -> (Calc, Probe) {
        let (started_tx, started) = mpsc::unbounded_channel();
        let (dropped_tx, dropped) = mpsc::unbounded_channel();
        let (recorded_tx, recorded) = mpsc::unbounded_channel();
        let (notes_tx, notes) = mpsc::unbounded_channel();
        let release = Arc::new(Notify::new());
        (
            Calc {
                started: started_tx,
                dropped: dropped_tx,
                recorded: recorded_tx,
                notes: notes_tx,
                release: release.clone(),
            },
            Probe {
                started,
                dropped,
                recorded,
                notes,
                release,
            },
        )
    }
}

/// Sends its tag when dropped before being disarmed.
struct DropGuard {
    tag: String,
    tx: mpsc::UnboundedSender<String>,
    armed: bool,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.tx.send(self.tag.clone());
        }
    }
}

impl Calculator for Calc {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }

    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError> {
        if b == 0 {
            return Err(CalcError::DivisionByZero);
        }
        a.checked_div(b).ok_or_else(|| CalcError::Overflow {
            op: "div".into(),
            detail: Detail(format!("{a} / {b} does not fit in i64")),
        })
    }

    async fn explode(&self, message: String) -> u32 {
        panic!("{message}")
    }

    async fn answer(&self) -> i64 {
        42
    }

    async fn wait(&self, tag: String) -> String {
        let mut guard = DropGuard {
            tag: tag.clone(),
            tx: self.dropped.clone(),
            armed: true,
        };
        let released = self.release.notified();
        let _ = self.started.send(tag.clone());
        released.await;
        guard.armed = false;
        tag
    }

    async fn sleep(&self, secs: u64) -> u64 {
        let mut guard = DropGuard {
            tag: format!("sleep {secs}"),
            tx: self.dropped.clone(),
            armed: true,
        };
        let _ = self.started.send(guard.tag.clone());
        tokio::time::sleep(Duration::from_secs(secs)).await;
        guard.armed = false;
        secs
    }

    async fn record(&self, value: i64) {
        let _ = self.recorded.send(value);
    }

    async fn note(&self, text: String) {
        let _ = self.notes.send(text);
    }
}

/// Two connected peers: `client` (connected) and `server` (accepted) over TCP on
/// 127.0.0.1, the server hosting a [`Calc`] as "calc".
pub struct Pair {
    pub client: Peer,
    pub server: Peer,
    pub probe: Probe,
    pub calc: CalculatorClient,
}

pub async fn pair() -> Pair {
    pair_with(PeerOptions::default(), Options::default()).await
}

pub async fn pair_with(server_options: PeerOptions, listen_options: Options) -> Pair {
    let (client_conn, server_conn) = connections(listen_options).await;
    let server = Peer::with_options(server_conn, server_options);
    let (calc, probe) = Calc::new();
    server.register("calc", CalculatorServer::new(calc));
    let client = Peer::new(client_conn);
    let calc = CalculatorClient::new(&client, "calc");
    Pair {
        client,
        server,
        probe,
        calc,
    }
}

/// A raw connected pair of chatter-core connections (client, server).
pub async fn connections(
    listen_options: Options,
) -> (chatter_core::Connection, chatter_core::Connection) {
    let listen_options = listen_options.close_connections_with_server(false);
    let listener = listen("tcp://127.0.0.1:0", listen_options)
        .await
        .expect("listen on 127.0.0.1");
    let client = connect(&listener.addresses()[0], Options::default())
        .await
        .expect("connect");
    let server = listener.accept().await.expect("accept");
    (client, server)
}

/// Awaits `f`, failing the test if it takes more than 10 s of (virtual) time: a missing
/// event fails instead of hanging.
pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("no result within 10 s (virtual clock)")
}
