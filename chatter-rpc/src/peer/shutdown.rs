//! Graceful shutdown of a [`Peer`].

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::link::Link;
use super::{lock, until_zero, Inner, Peer, MAX_DURATION};

impl Peer {
    /// Shuts down gracefully: from now on, calls from the other side are refused with
    /// [`CallError::ShuttingDown`](crate::CallError::ShuttingDown), and calls and signals
    /// made through this peer fail with the same error; calls already running (both ways)
    /// get up to `grace` to finish and send their replies; queued signals get what is left
    /// of `grace` to reach the connection (acknowledged ones: to be acknowledged; with a
    /// store, the rest stay stored for the next start; without one, they are dropped and
    /// reported). Then the peer closes as with [`close`](Self::close) (handlers still
    /// running are cancelled), and a reconnecting peer stops reconnecting.
    ///
    /// ```
    /// use std::time::Duration;
    /// use chatter_rpc::{connect, listen, Options, Peer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = listen("tcp://127.0.0.1:0", Options::default()).await?;
    /// let client = Peer::new(connect(&server.addresses()[0], Options::default()).await?);
    /// let accepted = Peer::new(server.accept().await.expect("open"));
    /// accepted.shutdown(Duration::from_secs(5)).await;
    /// assert!(accepted.connection().expect("its connection").is_closed());
    /// # drop(client); Ok(()) }
    /// ```
    pub async fn shutdown(&self, grace: Duration) {
        let deadline = Instant::now() + grace.min(MAX_DURATION);
        let current = self.current();
        self.begin_shutdown();
        if let Link::Reconnecting(sv) = &self.state.link {
            let calls_done = until_zero(&sv.calls, &sv.calls_idle);
            let _ = tokio::time::timeout_at(deadline, calls_done).await;
        }
        if let Some(inner) = &current {
            let _ = tokio::time::timeout_at(deadline, inner.wait_idle()).await;
        }
        let _ = tokio::time::timeout_at(deadline, self.flush()).await;
        if let Link::Reconnecting(sv) = &self.state.link {
            sv.stop();
        }
        if let Some(inner) = current {
            inner.close_gracefully().await;
        }
        if let Link::Reconnecting(_) = &self.state.link {
            self.state.finish(None);
        }
    }

    /// True once [`shutdown`](Self::shutdown) started (or a reconnecting peer was
    /// closed).
    pub fn is_shutting_down(&self) -> bool {
        self.state.is_shutting_down()
    }

    /// Refuse new calls (both directions) and signals; running ones continue.
    pub(crate) fn begin_shutdown(&self) {
        self.state.shutting_down.store(true, Ordering::Release);
        if let Some(inner) = self.current() {
            inner.begin_shutdown();
        }
    }
}

impl Inner {
    /// Refuse new calls from the other side; running ones continue.
    pub(crate) fn begin_shutdown(&self) {
        let mut inflight = lock(&self.inflight);
        inflight.closing = true;
        inflight.shutting_down = true;
    }

    /// Waits until no call handler runs.
    async fn wait_idle(&self) {
        until_zero(&self.active, &self.idle).await;
    }
}
