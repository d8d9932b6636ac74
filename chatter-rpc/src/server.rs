//! [`serve`]: accept connections and serve objects on each.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chatter_core::{Address, Server};
use tokio::task::JoinHandle;

use crate::peer::{Peer, PeerOptions};

/// Serves RPC on every connection `listener` accepts: each connection gets a [`Peer`]
/// with `options`, and `setup` registers that peer's objects (and may keep the peer to
/// call back the client). Returns at once; the accept loop runs as a task until
/// [`RpcServer::close`] or drop.
///
/// ```
/// use chatter_rpc::{serve, Peer, PeerOptions};
/// use chatter_core::{listen, Options};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let listener = listen("tcp://127.0.0.1:0", Options::default()).await?;
/// let server = serve(listener, PeerOptions::default(), |peer: &Peer| {
///     // peer.register("calculator", CalculatorServer::new(Calc));
///     let _ = peer;
/// });
/// println!("serving on {}", server.addresses()[0]);
/// server.close().await;
/// # Ok(()) }
/// ```
pub fn serve<F>(listener: Server, options: PeerOptions, setup: F) -> RpcServer
where
    F: Fn(&Peer) + Send + Sync + 'static,
{
    let listener = Arc::new(listener);
    let peers: Arc<Mutex<Vec<Peer>>> = Arc::default();
    let shutting_down = Arc::new(AtomicBool::new(false));
    let accept = {
        let listener = listener.clone();
        let peers = peers.clone();
        let shutting_down = shutting_down.clone();
        tokio::spawn(async move {
            while let Some(conn) = listener.accept().await {
                // Set up before its receive task starts: the objects `setup` registers are
                // there for the peer's first message.
                let peer = Peer::with_setup(conn, options.clone(), |peer| {
                    if shutting_down.load(Ordering::Acquire) {
                        // Accepted during a graceful shutdown: refuse its calls clearly.
                        peer.begin_shutdown();
                    }
                    setup(peer);
                });
                {
                    let mut peers = peers.lock().unwrap_or_else(PoisonError::into_inner);
                    peers.retain(|p| p.state() != crate::ConnectionState::Closed);
                    // Held here, the peer lives as long as its connection (closed ones
                    // are dropped at the next accept).
                    peers.push(peer);
                }
            }
        })
    };
    RpcServer {
        listener,
        accept,
        peers,
        shutting_down,
    }
}

/// A running [`serve`] loop.
pub struct RpcServer {
    listener: Arc<Server>,
    accept: JoinHandle<()>,
    peers: Arc<Mutex<Vec<Peer>>>,
    shutting_down: Arc<AtomicBool>,
}

impl fmt::Debug for RpcServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcServer")
            .field("addresses", &self.addresses())
            .finish_non_exhaustive()
    }
}

impl RpcServer {
    /// The addresses the listener is bound to.
    pub fn addresses(&self) -> &[Address] {
        self.listener.addresses()
    }

    /// Stops accepting and closes the listener (and, with chatter-core's default options,
    /// the connections it accepted).
    pub async fn close(&self) {
        self.accept.abort();
        self.listener.close().await;
    }

    /// Shuts down gracefully: every connection (and any accepted from now on) refuses new
    /// calls with [`CallError::ShuttingDown`](crate::CallError::ShuttingDown); calls in
    /// flight get up to `grace` to finish and reply; queued signals get what is left of
    /// it; then the connections and the listener close. See [`Peer::shutdown`].
    ///
    /// ```
    /// use std::time::Duration;
    /// use chatter_rpc::{listen, serve, Options, Peer, PeerOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = serve(listen("tcp://127.0.0.1:0", Options::default()).await?,
    ///     PeerOptions::default(), |_: &Peer| {});
    /// server.shutdown(Duration::from_secs(10)).await;
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::Release);
        let peers: Vec<Peer> = self
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for peer in &peers {
            peer.begin_shutdown();
        }
        let mut all = tokio::task::JoinSet::new();
        for peer in peers {
            all.spawn(async move { peer.shutdown(grace).await });
        }
        while all.join_next().await.is_some() {}
        self.accept.abort();
        self.listener.close().await;
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
