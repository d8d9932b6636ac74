//! [`Server`]: accepts peers and hands out their connections.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::connection::Handle;
use crate::error::{CloseCode, ListenError};
use crate::transport::unix_address;
use crate::{Address, Connection, Options};

/// How many handshaken connections wait for [`Server::accept`] before handshakes pause.
const ACCEPT_QUEUE: usize = 128;

/// A listening endpoint. Accepted connections have completed the handshake; peers that
/// fail it are disconnected (and logged) without disturbing anyone else.
///
/// Closing the server (or dropping it) stops accepting and, unless
/// [`Options::close_connections_with_server`] was turned off, closes every connection it
/// accepted; their peers see [`CloseCode::GoingAway`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use chatter_core::{connect, listen, Options};
///
/// let server = listen("tcp://127.0.0.1:0", Options::default()).await?;
/// let client = connect(&server.addresses()[0], Options::default()).await?;
/// let accepted = server.accept().await.expect("open");
/// assert_eq!(accepted.remote_address(), client.local_address());
/// server.close().await;
/// assert!(client.closed().await.to_string().contains("server closing"));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Server {
    addresses: Vec<Address>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<Connection>>,
    tracked: Arc<Tracked>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    unix_paths: Vec<PathBuf>,
}

/// The accepted connections a server closes along with itself.
#[derive(Debug, Default)]
struct Tracked {
    enabled: bool,
    connections: Mutex<Vec<Weak<Handle>>>,
}

impl Tracked {
    fn add(&self, conn: &Connection) {
        if self.enabled {
            let mut list = self
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if list.len() >= 64 && list.len().is_power_of_two() {
                list.retain(|w| w.strong_count() > 0);
            }
            list.push(conn.downgrade());
        }
    }

    fn take(&self) -> Vec<Connection> {
        let mut list = self
            .connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        list.drain(..)
            .filter_map(|w| w.upgrade().map(Connection::from_handle))
            .collect()
    }
}

impl Server {
    /// The addresses the server is bound to, with port 0 resolved to the actual port.
    pub fn addresses(&self) -> &[Address] {
        &self.addresses
    }

    /// The next accepted connection, or `None` once the server is closed.
    pub async fn accept(&self) -> Option<Connection> {
        let mut stop = self.stop.subscribe();
        if *stop.borrow() {
            return None;
        }
        let mut incoming = tokio::select! {
            guard = self.incoming.lock() => guard,
            _ = stop.wait_for(|&s| s) => return None,
        };
        tokio::select! {
            conn = incoming.recv() => conn,
            _ = stop.wait_for(|&s| s) => None,
        }
    }

    /// True once [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        *self.stop.borrow()
    }

    /// Stops accepting and, by default, closes the accepted connections. Returns when the
    /// listeners are closed (later connects fail) and the connections have closed.
    pub async fn close(&self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for task in tasks {
            let _ = task.await;
        }
        if let Ok(mut incoming) = self.incoming.try_lock() {
            incoming.close();
            while incoming.try_recv().is_ok() {}
        }
        let conns = self.tracked.take();
        for conn in &conns {
            conn.close_with(CloseCode::GoingAway, "server closing");
        }
        for conn in &conns {
            conn.closed().await;
        }
        self.remove_socket_files();
    }

    fn remove_socket_files(&self) {
        for path in &self.unix_paths {
            let _ = std::fs::remove_file(path);
        }
    }

    pub(crate) async fn bind(address: Address, options: Options) -> Result<Server, ListenError> {
        let name = address.to_string();
        let io_error = |source| ListenError::Io {
            address: name.clone(),
            source,
        };
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let (stop, _) = watch::channel(false);
        let tracked = Arc::new(Tracked {
            enabled: options.bind_connections,
            connections: Mutex::default(),
        });
        let mut addresses = Vec::new();
        let mut tasks = Vec::new();
        let mut unix_paths = Vec::new();
        let ctx = AcceptContext {
            options,
            tx,
            tracked: tracked.clone(),
            stop: stop.subscribe(),
        };
        match &address {
            Address::Tcp { host, port } => {
                let mut last = None;
                let resolved = tokio::net::lookup_host((host.as_str(), *port))
                    .await
                    .map_err(io_error)?;
                for addr in resolved {
                    match TcpListener::bind(addr).await {
                        Ok(listener) => {
                            addresses.push(listener.local_addr().map_err(io_error)?.into());
                            tasks.push(tokio::spawn(accept_loop(listener, ctx.clone())));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                if addresses.is_empty() {
                    return Err(io_error(last.unwrap_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, "host name resolved to no address")
                    })));
                }
            }
            Address::Unix { path } => {
                let listener = UnixListener::bind(path).map_err(io_error)?;
                addresses.push(address.clone());
                unix_paths.push(path.clone());
                tasks.push(tokio::spawn(accept_loop(listener, ctx.clone())));
            }
        }
        Ok(Server {
            addresses,
            incoming: tokio::sync::Mutex::new(rx),
            tracked,
            stop,
            tasks: Mutex::new(tasks),
            unix_paths,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for task in self
            .tasks
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
        for conn in self.tracked.take() {
            conn.close_with(CloseCode::GoingAway, "server closing");
        }
        self.remove_socket_files();
    }
}

#[derive(Clone)]
struct AcceptContext {
    options: Options,
    tx: mpsc::Sender<Connection>,
    tracked: Arc<Tracked>,
    stop: watch::Receiver<bool>,
}

trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, Address, Address)>> + Send;
}

impl Listener for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<(Self::Io, Address, Address)> {
        let (stream, remote) = TcpListener::accept(self).await?;
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?.into();
        Ok((stream, local, remote.into()))
    }
}

impl Listener for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<(Self::Io, Address, Address)> {
        let (stream, remote) = UnixListener::accept(self).await?;
        let local = unix_address(stream.local_addr().ok());
        Ok((stream, local, unix_address(Some(remote))))
    }
}

async fn accept_loop<L: Listener>(listener: L, mut ctx: AcceptContext) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.stop.wait_for(|&s| s) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((io, local, remote)) => {
                let conn = Connection::start(io, local, remote, &ctx.options);
                ctx.tracked.add(&conn);
                let tx = ctx.tx.clone();
                tokio::spawn(async move {
                    match conn.handshake().await {
                        // If the server closed meanwhile, the connection is dropped (closed).
                        Ok(()) => drop(tx.send(conn).await),
                        Err(cause) => tracing::warn!(
                            remote = %conn.remote_address(),
                            %cause,
                            "rejected connection: handshake failed"
                        ),
                    }
                });
            }
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = ctx.stop.wait_for(|&s| s) => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
}
