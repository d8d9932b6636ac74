//! The callee the broker tests share: a calculator with calls, a typed error, a panic, a
//! handler that waits until released, a signal and both kinds of stream, and the probe
//! through which a test sees its handlers.
#![allow(dead_code)] // each test file uses part of it

use std::sync::Arc;

use chatter_rpc::remote;
use chatter_rpc::stream::{self, Receiver};
use tokio::sync::{mpsc, Notify};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum CalcError {
    DivisionByZero,
}

impl std::fmt::Display for CalcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("division by zero")
    }
}

#[remote]
pub trait Calculator {
    async fn add(&self, a: i64, b: i64) -> i64;
    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError>;
    async fn boom(&self) -> i64;
    /// Waits until released; tells the probe when it starts and when it is dropped.
    async fn wait(&self) -> i64;
    #[signal(ttl = "5s")]
    async fn note(&self, text: String);
    /// A result stream: 0, 1, …, n − 1.
    async fn count(&self, n: u32) -> Receiver<u32>;
    /// An argument stream, added up.
    async fn sum(&self, input: Receiver<u32>) -> u64;
}

/// What the test sees of the callee's handlers.
pub struct Probe {
    pub started: mpsc::UnboundedReceiver<()>,
    pub dropped: mpsc::UnboundedReceiver<()>,
    pub notes: mpsc::UnboundedReceiver<String>,
    pub release: Arc<Notify>,
}

pub struct Calc {
    started: mpsc::UnboundedSender<()>,
    dropped: mpsc::UnboundedSender<()>,
    notes: mpsc::UnboundedSender<String>,
    release: Arc<Notify>,
}

pub fn calc() -> (Calc, Probe) {
    // Unbounded: test probes, one message per handler the test itself starts (a few
    // hundred at most), read by the test.
    let (started_tx, started) = mpsc::unbounded_channel();
    let (dropped_tx, dropped) = mpsc::unbounded_channel();
    let (notes_tx, notes) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let calc = Calc {
        started: started_tx,
        dropped: dropped_tx,
        notes: notes_tx,
        release: release.clone(),
    };
    (
        calc,
        Probe {
            started,
            dropped,
            notes,
            release,
        },
    )
}

/// Sends on drop: the handler's future was dropped (cancelled, deadline, finished).
pub struct OnDrop(mpsc::UnboundedSender<()>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

impl Calculator for Calc {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }
    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError> {
        a.checked_div(b).ok_or(CalcError::DivisionByZero)
    }
    async fn boom(&self) -> i64 {
        panic!("the calculator exploded")
    }
    async fn wait(&self) -> i64 {
        let _guard = OnDrop(self.dropped.clone());
        let _ = self.started.send(());
        self.release.notified().await;
        42
    }
    async fn note(&self, text: String) {
        let _ = self.notes.send(text);
    }
    async fn count(&self, n: u32) -> Receiver<u32> {
        let (tx, rx) = stream::channel(4);
        tokio::spawn(async move {
            for i in 0..n {
                if tx.send(i).await.is_err() {
                    break;
                }
            }
        });
        rx
    }
    async fn sum(&self, mut input: Receiver<u32>) -> u64 {
        let mut sum = 0;
        while let Some(Ok(i)) = input.recv().await {
            sum += u64::from(i);
        }
        sum
    }
}
