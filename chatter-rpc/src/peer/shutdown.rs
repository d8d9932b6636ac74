//! Graceful shutdown of a [`Peer`].

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{lock, Inner, Peer};

impl Peer {
    /// Shuts down gracefully: from now on, calls from the other side are refused with
    /// [`CallError::ShuttingDown`](crate::CallError::ShuttingDown) and calls made through
    /// this peer fail with the same error; calls already running get up to `grace` to
    /// finish and send their replies; queued signals get what is left of `grace` to reach
    /// the connection. Then the peer closes as with [`close`](Self::close) (handlers still
    /// running are cancelled).
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
    /// assert!(accepted.connection().is_closed());
    /// # drop(client); Ok(()) }
    /// ```
    pub async fn shutdown(&self, grace: Duration) {
        let deadline = tokio::time::Instant::now() + grace.min(super::MAX_DURATION);
        self.inner.begin_shutdown();
        let _ = tokio::time::timeout_at(deadline, self.inner.wait_idle()).await;
        let _ = tokio::time::timeout_at(deadline, self.flush_signals()).await;
        self.inner.close_gracefully().await;
    }

    /// True once [`shutdown`](Self::shutdown) started.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.hooks.is_shutting_down()
    }
}

impl Inner {
    /// Refuse new calls (both directions); running ones continue.
    pub(crate) fn begin_shutdown(&self) {
        self.hooks.shutting_down.store(true, Ordering::Release);
        let mut inflight = lock(&self.inflight);
        inflight.closing = true;
        inflight.shutting_down = true;
    }

    /// Waits until no call handler runs.
    async fn wait_idle(&self) {
        super::until_zero(&self.active, &self.idle).await;
    }
}
