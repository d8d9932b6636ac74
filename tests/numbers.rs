//! The remote trait of the reliable-delivery tests, shared by the test process and the
//! `reliable-sender` binary.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chatter_rpc::remote;
use tokio::sync::{Notify, Semaphore};

/// What the reliable-delivery tests call and signal.
#[remote]
pub trait Numbers {
    /// Records `n` (the receiver keeps every number in handling order).
    #[signal(ttl = "60s")]
    async fn number(&self, n: u64);
    /// Like `number`, but persistent: with a store, on disk before the send completes.
    #[signal(ttl = "60s", persistent)]
    async fn durable(&self, n: u64);
    /// Sleeps `ms` (on the tokio clock), then records `n` like `number`.
    #[signal(ttl = "60s")]
    async fn paced(&self, n: u64, ms: u64);
    /// Sleeps `ms` (on the tokio clock), then returns how many times it was called.
    async fn slow(&self, ms: u64) -> u64;
    /// Like `slow`, but may be re-sent when its outcome is unknown.
    #[idempotent]
    async fn slow_idempotent(&self, ms: u64) -> u64;
    /// Returns `n`.
    async fn echo(&self, n: u64) -> u64;
}

/// A [`Numbers`] that records what it handled. Clones share the record.
#[derive(Clone, Default)]
pub struct Recorder {
    /// Every number, in handling order.
    pub handled: Arc<Mutex<Vec<u64>>>,
    /// Calls of `slow` and `slow_idempotent`.
    pub calls: Arc<Mutex<u64>>,
    /// When set, each `number` handler takes a permit first (the test hands them out).
    pub gate: Option<Arc<Semaphore>>,
    /// Notified (one permit each) when a `number` handler starts, before the gate.
    pub entered: Arc<Notify>,
    /// Gets each number when its handler starts, before the gate.
    pub arrivals: Option<tokio::sync::mpsc::UnboundedSender<u64>>,
    /// Gets each number of `paced` once it was recorded.
    pub recorded: Option<tokio::sync::mpsc::UnboundedSender<u64>>,
    /// Notified (one permit each) when `slow` or `slow_idempotent` starts.
    pub started: Arc<Notify>,
}

impl Recorder {
    /// The numbers handled so far.
    pub fn handled(&self) -> Vec<u64> {
        self.handled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn slow_impl(&self, ms: u64) -> u64 {
        let n = {
            let mut calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
            *calls += 1;
            *calls
        };
        self.started.notify_one();
        tokio::time::sleep(Duration::from_millis(ms)).await;
        n
    }
}

impl Numbers for Recorder {
    async fn number(&self, n: u64) {
        self.entered.notify_one();
        if let Some(arrivals) = &self.arrivals {
            let _ = arrivals.send(n);
        }
        if let Some(gate) = &self.gate {
            if let Ok(permit) = gate.acquire().await {
                permit.forget();
            }
        }
        self.handled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(n);
    }

    async fn durable(&self, n: u64) {
        self.number(n).await;
    }

    async fn paced(&self, n: u64, ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.handled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(n);
        if let Some(recorded) = &self.recorded {
            let _ = recorded.send(n);
        }
    }

    async fn slow(&self, ms: u64) -> u64 {
        self.slow_impl(ms).await
    }

    async fn slow_idempotent(&self, ms: u64) -> u64 {
        self.slow_impl(ms).await
    }

    async fn echo(&self, n: u64) -> u64 {
        n
    }
}
