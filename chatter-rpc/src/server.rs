//! [`serve`]: accept connections and serve objects on each.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chatter_core::proto::IdBuildHasher;
use chatter_core::{Address, Connection, Server};
use tokio::task::JoinHandle;

use crate::peer::{lock, Peer, PeerOptions};

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
    // The peers of open connections (at most the listener's `max_connections`), each
    // removed by its receive task when its connection ended: a map, not a list pruned at
    // each accept, which cost a pass over every open connection per accept and kept
    // closed peers until the next one.
    let peers: Arc<Mutex<Peers>> = Arc::default();
    let shutting_down = Arc::new(AtomicBool::new(false));
    // Starts a peer for each handshaken connection: called in the connection's own task
    // (the listener's `on_accept`), where the peer's receive loop then runs too, so that
    // a first call that came with the hello is answered in the same round.
    let start = {
        let peers = peers.clone();
        let shutting_down = shutting_down.clone();
        let next_id = AtomicU64::new(0);
        Arc::new(move |conn: Connection| {
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            let forget = Forget {
                peers: Arc::downgrade(&peers),
                id,
            };
            // Set up before its receive loop starts: the objects `setup` registers are
            // there for the peer's first message, and the peer is listed before its end
            // can remove it.
            Peer::with_setup_and_end(
                conn,
                options.clone(),
                |peer| {
                    setup(peer);
                    // Held here, the peer lives as long as its connection.
                    let mut list = lock(&peers);
                    list.insert(id, peer.clone());
                    // Read under the lock `shutdown` takes its list of peers with: either
                    // this peer is in that list, or the flag was set before it was taken.
                    let late = shutting_down.load(Ordering::Acquire);
                    drop(list);
                    if late {
                        // Accepted during a graceful shutdown: refuse its calls clearly.
                        peer.begin_shutdown();
                    }
                },
                Some(forget),
            );
        })
    };
    let handed = {
        let start = start.clone();
        listener.on_accept(move |conn| start(conn))
    };
    if !handed {
        tracing::warn!(
            "serve: the listener already hands its connections to an on_accept function; \
             serving only those it queues for accept"
        );
    }
    // Connections the listener queued before `on_accept` was set (or all of them, if it
    // was set before).
    let accept = {
        let listener = listener.clone();
        tokio::spawn(async move {
            while let Some(conn) = listener.accept().await {
                start(conn);
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

/// The peers of a server's open connections, by the order they were accepted in.
type Peers = HashMap<u64, Peer, IdBuildHasher>;

/// What the receive task of a server's peer does when its connection ended: takes the
/// peer off the server's list. A struct rather than a boxed closure (the only thing a
/// peer's end ever runs): no allocation per connection for it.
pub(crate) struct Forget {
    peers: Weak<Mutex<Peers>>,
    id: u64,
}

impl Forget {
    pub(crate) fn run(self) {
        if let Some(list) = self.peers.upgrade() {
            // Dropped after the lock is released.
            let peer = lock(&list).remove(&self.id);
            drop(peer);
        }
    }
}

/// A running [`serve`] loop.
pub struct RpcServer {
    listener: Arc<Server>,
    accept: JoinHandle<()>,
    peers: Arc<Mutex<Peers>>,
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

    /// The peers of the connections open now (a snapshot), to call clients back: each is
    /// the [`Peer`] `setup` was given. A peer is in it from before its first message until
    /// its connection ended.
    ///
    /// ```
    /// use chatter_rpc::{listen, serve, Options, Peer, PeerOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = serve(listen("tcp://127.0.0.1:0", Options::default()).await?,
    ///     PeerOptions::default(), |_: &Peer| {});
    /// let client = Peer::new(chatter_rpc::connect(&server.addresses()[0], Options::default()).await?);
    /// while server.peers().is_empty() {
    ///     tokio::task::yield_now().await;
    /// }
    /// assert_eq!(server.peers().len(), 1);
    /// # drop(client); Ok(()) }
    /// ```
    pub fn peers(&self) -> Vec<Peer> {
        lock(&self.peers).values().cloned().collect()
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
        let peers = self.peers();
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
