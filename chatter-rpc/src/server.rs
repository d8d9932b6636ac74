//! [`serve`]: accept connections and serve objects on each.

use std::fmt;
use std::sync::Arc;

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
    let accept = {
        let listener = listener.clone();
        tokio::spawn(async move {
            while let Some(conn) = listener.accept().await {
                let peer = Peer::with_options(conn, options.clone());
                setup(&peer);
                // The peer lives as long as its connection.
                tokio::spawn(async move {
                    peer.closed().await;
                });
            }
        })
    };
    RpcServer { listener, accept }
}

/// A running [`serve`] loop.
pub struct RpcServer {
    listener: Arc<Server>,
    accept: JoinHandle<()>,
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
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
