//! [`Server`]: accepts peers and hands out their connections.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
#[cfg(feature = "tls")]
use tokio_rustls::TlsAcceptor;

use crate::address::LazyAddress;
use crate::connection::{Handle, PeerCertificates, Side, Transport};
use crate::error::{CloseCause, CloseCode, ListenError};
#[cfg(feature = "tls")]
use crate::error::{InvalidOptions, ProtocolError};
use crate::proto::frame::Frame;
use crate::transport::{has_user_timeout, set_user_timeout, unix_address};
use crate::{Address, Connection, LogLimit, Options};

/// How many handshaken connections wait for [`Server::accept`]; beyond it each waits for
/// room in a task of its own (see [`Handoff`]).
const ACCEPT_QUEUE: usize = 128;

/// How many handshake failures [`Server::next_rejection`] holds; further ones are only
/// logged until the application takes some.
const REJECTION_QUEUE: usize = 64;

/// How many peers refused for the connection limit are told why at once; beyond that they
/// are disconnected without a close frame.
const REFUSALS_AT_ONCE: usize = 64;

/// How long a refused peer has to take its close frame.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// A peer that connected but failed the TLS or chatter handshake and was disconnected.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Rejection {
    /// Where the peer connected from.
    pub remote: Address,
    /// Why it was disconnected.
    pub cause: CloseCause,
}

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
    incoming: tokio::sync::Mutex<mpsc::Receiver<Queued>>,
    rejections: tokio::sync::Mutex<mpsc::Receiver<Rejection>>,
    rejected: Arc<Rejections>,
    tracked: Arc<Tracked>,
    limits: Arc<Limits>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    unix_paths: Vec<PathBuf>,
    /// The accept path of transports handed in by [`accept_over`](Self::accept_over):
    /// the listeners' own, without TLS.
    handed: AcceptContext,
    /// Set by [`on_accept`](Self::on_accept).
    on_accept: Arc<OnceLock<OnAccept>>,
}

/// What [`Server::on_accept`] hands connections to.
struct OnAccept(Box<dyn Fn(Connection) + Send + Sync>);

impl std::fmt::Debug for OnAccept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnAccept")
    }
}

/// The connection limit and what it refused.
#[derive(Debug)]
struct Limits {
    max: usize,
    /// One permit per connection held, from accept until its task ends.
    connections: Arc<Semaphore>,
    /// One permit per refusal being written.
    refusals: Arc<Semaphore>,
    refused: AtomicU64,
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
        let mut held = HeldQueue {
            queue: tokio::select! {
                guard = self.incoming.lock() => guard,
                _ = stop.wait_for(|&s| s) => return None,
            },
            stop: &self.stop,
        };
        tokio::select! {
            // The close first: after it, `accept` returns `None` even with connections
            // queued (`held` drains them).
            biased;
            _ = stop.wait_for(|&s| s) => None,
            queued = held.queue.recv() => queued.map(|q| q.conn),
        }
    }

    /// Hands every connection whose handshake completes from now on to `on_accept`,
    /// instead of queueing it for [`accept`](Self::accept).
    ///
    /// `on_accept` is called in the connection's own task, the moment its handshake
    /// completed: with [`Connection::attach`] it starts the connection's receive loop in
    /// that task, so that a first request that came with the peer's hello is answered in
    /// the same round, without a task or a wake-up in between. It must not block (the
    /// connection moves no bytes meanwhile). A panic in it closes that connection.
    ///
    /// Connections queued before are still returned by `accept`. Only the first function
    /// set is kept: returns `false` (and drops `on_accept`) if one was set before.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use chatter_core::{connect, listen, Connection, Options, SendOptions};
    ///
    /// async fn echo(conn: Connection) {
    ///     while let Ok(msg) = conn.receive().await {
    ///         let answer = SendOptions::new().conversation(msg.conversation);
    ///         let _ = conn.send_bytes(&msg.payload, answer).await;
    ///     }
    /// }
    ///
    /// let server = listen("tcp://127.0.0.1:0", Options::default()).await?;
    /// server.on_accept(|conn| conn.clone().attach(echo(conn)));
    /// let client = connect(&server.addresses()[0], Options::default()).await?;
    /// client.send("echo?", SendOptions::new().last(false)).await?;
    /// assert_eq!(client.receive().await?.decode::<String>()?, "echo?");
    /// # Ok(()) }
    /// ```
    pub fn on_accept<F>(&self, on_accept: F) -> bool
    where
        F: Fn(Connection) + Send + Sync + 'static,
    {
        self.on_accept.set(OnAccept(Box::new(on_accept))).is_ok()
    }

    /// The next peer that failed its handshake (logged at warn level either way), or `None`
    /// once the server is closed. At most 64 wait to be taken; failures beyond that are
    /// only logged.
    pub async fn next_rejection(&self) -> Option<Rejection> {
        let mut stop = self.stop.subscribe();
        let mut rejections = tokio::select! {
            guard = self.rejections.lock() => guard,
            _ = stop.wait_for(|&s| s) => return None,
        };
        tokio::select! {
            r = rejections.recv() => r,
            _ = stop.wait_for(|&s| s) => None,
        }
    }

    /// How many peers were refused because the server was at
    /// [`Options::max_connections`].
    pub fn refused(&self) -> u64 {
        self.limits.refused.load(Ordering::Relaxed)
    }

    /// How many peers failed their handshake (each is logged, and queued for
    /// [`next_rejection`](Self::next_rejection) if there is room). Past the first 8, only the
    /// 16th, 32nd, 64th, ... are logged at warn level, the rest at debug level.
    pub fn rejected(&self) -> u64 {
        self.rejected.count.count()
    }

    /// How many connections the server holds now, counting those still in their handshake,
    /// those closing (until their task ended), and handshaken ones waiting for
    /// [`accept`](Self::accept), closed or not.
    pub fn connections(&self) -> usize {
        self.limits.max - self.limits.connections.available_permits()
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
        // Not `lock().await`: an `accept` future that is kept but never polled again would
        // hold the queue forever. Whoever holds it drains it when it lets go (`HeldQueue`).
        if let Ok(mut incoming) = self.incoming.try_lock() {
            drain(&mut incoming);
        }
        let conns = self.tracked.take();
        for conn in &conns {
            conn.start_close(CloseCode::GoingAway, "server closing");
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
        let tls = match &address {
            Address::Tls { .. } => Some(tls_acceptor(&address, &options)?),
            _ => None,
        };
        let mut bound = Vec::new();
        match &address {
            Address::Tcp { host, port } | Address::Tls { host, port } => {
                let mut last = None;
                let resolved = tokio::net::lookup_host((host.as_str(), *port))
                    .await
                    .map_err(io_error)?;
                for addr in resolved {
                    match TcpListener::bind(addr)
                        .await
                        .and_then(|l| with_backlog(l, &options))
                    {
                        Ok(listener) => bound.push(Bound::Tcp(listener)),
                        Err(e) => last = Some(e),
                    }
                }
                if bound.is_empty() {
                    return Err(io_error(last.unwrap_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, "host name resolved to no address")
                    })));
                }
            }
            Address::Unix { path } => bound.push(Bound::Unix {
                listener: bind_unix(path)
                    .and_then(|l| with_backlog(l, &options))
                    .map_err(io_error)?,
                path: Some(path.clone()),
            }),
        }
        Server::start(bound, tls, options).map_err(io_error)
    }

    /// Serves chatter on a TCP listener the application bound itself (to pass it a socket
    /// from systemd, or to choose socket options chatter does not set). TLS when `options`
    /// has `Options::tls_server` settings; its addresses are then `tls://`.
    /// chatter sets `TCP_NODELAY` and `TCP_USER_TIMEOUT` on the listener, so that accepted
    /// sockets inherit them, and `TCP_DEFER_ACCEPT` when [`Options::tcp_defer_accept`] asks
    /// for it. Must be called within a tokio runtime.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use chatter_core::{connect, Options, Server};
    ///
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    /// let server = Server::from_tcp_listener(listener, Options::default())?;
    /// let client = connect(&server.addresses()[0], Options::default()).await?;
    /// # drop(client); Ok(()) }
    /// ```
    pub fn from_tcp_listener(
        listener: TcpListener,
        options: Options,
    ) -> Result<Server, ListenError> {
        let name = listener.local_addr().map_or_else(
            |_| "a TCP listener".to_owned(),
            |a| Address::from(a).to_string(),
        );
        options.validate()?;
        #[cfg(feature = "tls")]
        let tls = match &options.tls_server {
            Some(tls) => Some(TlsAcceptor::from(tls.config()?)),
            None => None,
        };
        #[cfg(not(feature = "tls"))]
        let tls = None;
        Server::start(vec![Bound::Tcp(listener)], tls, options).map_err(|source| ListenError::Io {
            address: name,
            source,
        })
    }

    /// Serves chatter on a Unix socket listener the application bound itself. The socket
    /// file stays the application's: it is not removed when the server closes. Must be
    /// called within a tokio runtime.
    pub fn from_unix_listener(
        listener: UnixListener,
        options: Options,
    ) -> Result<Server, ListenError> {
        options.validate()?;
        Server::start(
            vec![Bound::Unix {
                listener,
                path: None,
            }],
            None,
            options,
        )
        .map_err(|source| ListenError::Io {
            address: "a Unix socket listener".to_owned(),
            source,
        })
    }

    /// Starts accepting on listeners already bound.
    fn start(bound: Vec<Bound>, tls: Option<TlsAcceptor>, options: Options) -> io::Result<Server> {
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let (rejected, rejections) = mpsc::channel(REJECTION_QUEUE);
        let rejected = Arc::new(Rejections {
            queue: rejected,
            count: LogLimit::default(),
        });
        let (stop, _) = watch::channel(false);
        let tracked = Arc::new(Tracked {
            enabled: options.bind_connections,
            connections: Mutex::default(),
        });
        let limits = Arc::new(Limits {
            max: options.max_connections,
            connections: Arc::new(Semaphore::new(options.max_connections)),
            refusals: Arc::new(Semaphore::new(REFUSALS_AT_ONCE)),
            refused: AtomicU64::new(0),
        });
        let is_tls = tls.is_some();
        let on_accept = Arc::new(OnceLock::new());
        let ctx = AcceptContext {
            limits: limits.clone(),
            options,
            on_accept: on_accept.clone(),
            tx,
            rejected: rejected.clone(),
            tls,
            tracked: tracked.clone(),
            stop: stop.subscribe(),
        };
        let mut addresses = Vec::new();
        let mut tasks = Vec::new();
        let mut unix_paths = Vec::new();
        for listener in bound {
            match listener {
                Bound::Tcp(listener) => {
                    let local = listener.local_addr()?;
                    addresses.push(if is_tls {
                        Address::Tls {
                            host: local.ip().to_string(),
                            port: local.port(),
                        }
                    } else {
                        local.into()
                    });
                    let listener = TcpAcceptor::new(listener, local, &ctx.options);
                    // One accept loop per bound listener (the addresses a host name
                    // resolved to, or the one listener handed in): not driven by peers.
                    tasks.push(tokio::spawn(accept_loop(listener, ctx.clone())));
                }
                Bound::Unix { listener, path } => {
                    addresses.push(match &path {
                        Some(path) => Address::Unix { path: path.clone() },
                        None => unix_address(listener.local_addr().ok()),
                    });
                    unix_paths.extend(path);
                    // One accept loop per bound listener, as above.
                    tasks.push(tokio::spawn(accept_loop(listener, ctx.clone())));
                }
            }
        }
        Ok(Server {
            addresses,
            incoming: tokio::sync::Mutex::new(rx),
            rejections: tokio::sync::Mutex::new(rejections),
            rejected,
            tracked,
            limits,
            stop,
            tasks: Mutex::new(tasks),
            unix_paths,
            handed: AcceptContext { tls: None, ..ctx },
            on_accept,
        })
    }
}

impl Server {
    /// A server without a listener: it accepts only the transports handed to it with
    /// [`accept_over`](Self::accept_over) (peers in the same process, over in-memory
    /// pipes). Its [`addresses`](Self::addresses) are empty. Must be called within a tokio
    /// runtime.
    ///
    /// ```
    /// use chatter_core::{Options, Server};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let server = Server::in_process(Options::default().max_connections(16))?;
    /// assert!(server.addresses().is_empty());
    /// # Ok(()) }
    /// ```
    pub fn in_process(options: Options) -> Result<Server, ListenError> {
        options.validate()?;
        Server::start(Vec::new(), None, options).map_err(|source| ListenError::Io {
            address: "an in-process server".to_owned(),
            source,
        })
    }

    /// Accepts a connection over `io`, a byte stream the application opened (the other
    /// end of a `tokio::io::duplex` pipe whose near end goes to
    /// [`connect_over`](crate::connect_over), say), through the same path as a socket
    /// accepted by a listener: the chatter handshake and its timeout, the server's
    /// options and limits ([`Options::max_connections`] counts it; beyond the limit it is
    /// refused with [`CloseCode::Busy`]), then [`accept`](Self::accept); closing the
    /// server closes it. `local` and `remote` are the addresses the connection reports.
    /// Never TLS, even on a `tls://` server: the stream is the application's. A closed
    /// server drops `io` (the other end reads the end of stream).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use chatter_core::{connect_over, listen, Address, Options};
    ///
    /// let server = listen("tcp://127.0.0.1:0", Options::default()).await?;
    /// let (near, far) = tokio::io::duplex(64 * 1024);
    /// let here = Address::Unix { path: "in-process".into() };
    /// server.accept_over(far, server.addresses()[0].clone(), here.clone());
    /// let client = connect_over(near, here, server.addresses()[0].clone(), Options::default()).await?;
    /// assert_eq!(server.connections(), 1);
    /// # drop(client); Ok(()) }
    /// ```
    pub fn accept_over<S>(&self, io: S, local: Address, remote: Address)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        if self.is_closed() {
            return;
        }
        let ctx = &self.handed;
        let io = crate::over::Opened(io);
        let addrs = (LazyAddress::ready(local), LazyAddress::ready(remote));
        match ctx.limits.connections.clone().try_acquire_owned() {
            // Bounded by `max_connections`, as a listener's: the permit moves into the
            // connection's driver.
            Ok(permit) => start(io, addrs, None, ctx, permit),
            Err(_) => refuse(io, addrs.1.get(), ctx),
        }
    }
}

/// A listener bound before the server starts.
enum Bound {
    Tcp(TcpListener),
    /// `path`: the socket file this server created, removed when it closes.
    Unix {
        listener: UnixListener,
        path: Option<PathBuf>,
    },
}

/// Sets the listen backlog of a listener chatter bound ([`Options::listen_backlog`]):
/// tokio binds with 128. Listening again on a listening socket only changes its backlog.
fn with_backlog<L: std::os::fd::AsFd>(listener: L, options: &Options) -> io::Result<L> {
    // `validate` keeps the backlog within an i32.
    let backlog = i32::try_from(options.listen_backlog).unwrap_or(i32::MAX);
    socket2::SockRef::from(&listener).listen(backlog)?;
    Ok(listener)
}

/// Binds a Unix socket at `path`, replacing a stale socket file: one left by a process
/// that exited without removing it (a crash), which nothing listens on any more. A socket
/// someone still listens on is an error that says so; a file that is not a socket is never
/// removed.
fn bind_unix(path: &std::path::Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let is_socket =
                std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_socket());
            if !is_socket {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "the path exists and is not a socket",
                ));
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Err(c) if c.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "replacing a stale socket file");
                    std::fs::remove_file(path)?;
                    UnixListener::bind(path)
                }
                Ok(_) => Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening on this socket",
                )),
                Err(_) => Err(e),
            }
        }
        other => other,
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
            conn.start_close(CloseCode::GoingAway, "server closing");
        }
        self.remove_socket_files();
    }
}

/// The TLS acceptor of a `tls://` [`Server::bind`]: its settings, or an error.
#[cfg(feature = "tls")]
fn tls_acceptor(address: &Address, options: &Options) -> Result<TlsAcceptor, ListenError> {
    match &options.tls_server {
        Some(tls) => Ok(TlsAcceptor::from(tls.config()?)),
        None => Err(InvalidOptions(format!(
            "{address} is a TLS address: pass TLS settings with Options::tls_server"
        ))
        .into()),
    }
}

/// Without the `tls` feature a `tls://` address is refused.
#[cfg(not(feature = "tls"))]
fn tls_acceptor(address: &Address, _: &Options) -> Result<TlsAcceptor, ListenError> {
    Err(address.tls_not_compiled_in().into())
}

/// Without the `tls` feature no server has a TLS acceptor: `Option<TlsAcceptor>` is always
/// `None`.
#[cfg(not(feature = "tls"))]
type TlsAcceptor = std::convert::Infallible;

#[derive(Clone)]
struct AcceptContext {
    limits: Arc<Limits>,
    options: Options,
    tx: mpsc::Sender<Queued>,
    rejected: Arc<Rejections>,
    tls: Option<TlsAcceptor>,
    tracked: Arc<Tracked>,
    stop: watch::Receiver<bool>,
    on_accept: Arc<OnceLock<OnAccept>>,
}

impl std::fmt::Debug for AcceptContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcceptContext")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// An accepted transport and its local and remote address.
type Accepted<S> = (S, (LazyAddress, LazyAddress));

trait Listener: Send + 'static {
    type Io: Transport;
    fn accept(
        &self,
        options: &Options,
    ) -> impl Future<Output = io::Result<Accepted<Self::Io>>> + Send;
}

/// A TCP listener and its address, which is every accepted connection's local address
/// unless the listener is bound to a wildcard address (`0.0.0.0`, `::`).
struct TcpAcceptor {
    listener: TcpListener,
    local: Option<SocketAddr>,
    /// Whether accepted sockets come with the listener's `TCP_NODELAY` and
    /// `TCP_USER_TIMEOUT` (they do on Linux): `UNKNOWN` until the first one is checked.
    inherits: AtomicU8,
}

const UNKNOWN: u8 = 0;
const INHERITED: u8 = 1;
const NOT_INHERITED: u8 = 2;

impl TcpAcceptor {
    /// Sets the options every accepted socket needs on the listener itself: where
    /// accepted sockets inherit them, that saves two system calls per connection.
    fn new(listener: TcpListener, local: SocketAddr, options: &Options) -> Self {
        let local = (!local.ip().is_unspecified()).then_some(local);
        let set = socket2::SockRef::from(&listener)
            .set_tcp_nodelay(true)
            .is_ok()
            && set_user_timeout(&listener, options);
        // The client speaks first (its hello), so the kernel may hold a connection until
        // its bytes are there.
        #[cfg(target_os = "linux")]
        if options.tcp_defer_accept {
            crate::transport::set_defer_accept(
                &listener,
                options.proto.handshake_timeout.as_secs(),
            );
        }
        TcpAcceptor {
            listener,
            local,
            inherits: AtomicU8::new(if set { UNKNOWN } else { NOT_INHERITED }),
        }
    }

    /// Gives an accepted socket `TCP_NODELAY` and `TCP_USER_TIMEOUT`, unless it inherited
    /// them from the listener (checked on the first one).
    fn configure(&self, stream: &tokio::net::TcpStream, options: &Options) -> io::Result<()> {
        match self.inherits.load(Ordering::Relaxed) {
            INHERITED => return Ok(()),
            UNKNOWN => {
                let inherited =
                    stream.nodelay().unwrap_or(false) && has_user_timeout(stream, options);
                let state = if inherited { INHERITED } else { NOT_INHERITED };
                self.inherits.store(state, Ordering::Relaxed);
                if inherited {
                    return Ok(());
                }
            }
            _ => {}
        }
        stream.set_nodelay(true)?;
        set_user_timeout(stream, options);
        Ok(())
    }
}

impl Listener for TcpAcceptor {
    type Io = tokio::net::TcpStream;
    async fn accept(&self, options: &Options) -> io::Result<Accepted<Self::Io>> {
        let (stream, remote) = self.listener.accept().await?;
        self.configure(&stream, options)?;
        // The peer's address comes with `accept`, and the local one is the listener's
        // unless it listens on a wildcard address: no getsockname or getpeername.
        let local = match self.local {
            Some(local) => local,
            None => stream.local_addr()?,
        };
        let addrs = (
            LazyAddress::socket(local, false),
            LazyAddress::socket(remote, false),
        );
        Ok((stream, addrs))
    }
}

impl Listener for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self, _: &Options) -> io::Result<Accepted<Self::Io>> {
        let (stream, remote) = UnixListener::accept(self).await?;
        let local = unix_address(stream.local_addr().ok());
        let addrs = (
            LazyAddress::ready(local),
            LazyAddress::ready(unix_address(Some(remote))),
        );
        Ok((stream, addrs))
    }
}

async fn accept_loop<L: Listener>(listener: L, ctx: AcceptContext) {
    // One wait for the stop for the whole loop, not one per connection (each would
    // register with the watch anew), and `biased`: no random draw per connection either.
    let mut stop = ctx.stop.clone();
    let mut stopped = pin!(async move {
        let _ = stop.wait_for(|&s| s).await;
    });
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stopped => return,
            accepted = listener.accept(&ctx.options) => accepted,
        };
        match accepted {
            Ok((io, addrs)) => match ctx.limits.connections.clone().try_acquire_owned() {
                // Bounded by `max_connections`: the permit moves into the connection's driver
                // and is released when it ends.
                Ok(permit) => match ctx.tls {
                    None => start(io, addrs, None, &ctx, permit),
                    // One task per connection for the TLS handshake: it holds the
                    // connection's permit, so at most `max_connections` at once, and ends
                    // by the handshake timeout.
                    #[cfg(feature = "tls")]
                    Some(_) => drop(tokio::spawn(establish_tls(io, addrs, ctx.clone(), permit))),
                    #[cfg(not(feature = "tls"))]
                    Some(never) => match never {},
                },
                Err(_) => refuse(io, addrs.1.get(), &ctx),
            },
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
}

/// Tells a peer beyond the connection limit why it is disconnected: a close frame with
/// [`CloseCode::Busy`], written by a task that lives at most [`REFUSAL_TIMEOUT`] (and of
/// which at most [`REFUSALS_AT_ONCE`] run). On TLS, and when too many refusals are under
/// way, the peer is disconnected without a word.
fn refuse<S: Transport>(mut io: S, remote: &Address, ctx: &AcceptContext) {
    let refused = ctx.limits.refused.fetch_add(1, Ordering::Relaxed) + 1;
    if refused.is_power_of_two() {
        tracing::warn!(%remote, refused, limit = ctx.limits.max, "connection refused: server at its connection limit");
    }
    if ctx.tls.is_some() {
        return;
    }
    let Ok(permit) = ctx.limits.refusals.clone().try_acquire_owned() else {
        return;
    };
    let mut close = BytesMut::new();
    let reason = format!(
        "server at its connection limit of {} connections; try again later",
        ctx.limits.max
    );
    Frame::Close(CloseCode::Busy, reason).encode(&mut close);
    // Bounded: at most REFUSALS_AT_ONCE of these run (the permit), each for at most
    // REFUSAL_TIMEOUT, holding one close frame; a peer that never reads is dropped then.
    tokio::spawn(async move {
        let write = async {
            io.write_all(&close).await?;
            io.shutdown().await
        };
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT, write).await;
        drop(permit);
    });
}

/// Completes the TLS handshake of an accepted transport, then starts its connection.
#[cfg(feature = "tls")]
async fn establish_tls<S: Transport>(
    io: S,
    (local, remote): (LazyAddress, LazyAddress),
    ctx: AcceptContext,
    permit: OwnedSemaphorePermit,
) {
    let Some(acceptor) = &ctx.tls else {
        return start(io, (local, remote), None, &ctx, permit);
    };
    let (local, remote) = (local.tls(), remote.tls());
    let timeout = ctx.options.proto.handshake_timeout;
    match tokio::time::timeout(timeout, acceptor.accept(io)).await {
        Ok(Ok(stream)) => {
            let certs = stream.get_ref().1.peer_certificates().map(<[_]>::to_vec);
            start(stream, (local, remote), certs, &ctx, permit);
        }
        Ok(Err(e)) => reject(&ctx.rejected, remote.get(), CloseCause::Tls(e.to_string())),
        Err(_) => {
            let cause = CloseCause::Protocol(ProtocolError::HandshakeTimeout);
            reject(&ctx.rejected, remote.get(), cause);
        }
    }
}

/// Starts the connection of an accepted transport (after its TLS handshake, if any). No
/// task waits for its chatter handshake: its driver hands it to [`Server::accept`] when
/// the handshake completed, or reports the rejection ([`Handoff`]).
fn start<S: Transport>(
    io: S,
    addrs: (LazyAddress, LazyAddress),
    certs: PeerCertificates,
    ctx: &AcceptContext,
    permit: OwnedSemaphorePermit,
) {
    let side = Side::Accepting {
        permit: Some(permit),
        handoff: Some(Handoff {
            queue: ctx.tx.clone(),
            rejected: ctx.rejected.clone(),
            on_accept: ctx.on_accept.clone(),
            stop: ctx.stop.clone(),
        }),
    };
    let conn = Connection::start(io, addrs, certs, &ctx.options, side);
    ctx.tracked.add(&conn);
    if *ctx.stop.borrow() {
        // The server closed meanwhile (it closes what it tracked once its accept loops
        // ended; a TLS handshake may end later).
        conn.start_close(CloseCode::GoingAway, "server closing");
    }
}

/// The accept queue as an [`accept`](Server::accept) holds it. `close` drains the queue
/// only if it can take it at once; a waiter that held it then (a task about to be polled,
/// or an `accept` future kept but not polled, then dropped) drains it when it lets go,
/// polled again or not, so queued connections and their `max_connections` slots do not
/// wait for the `Server` to be dropped.
struct HeldQueue<'a> {
    queue: tokio::sync::MutexGuard<'a, mpsc::Receiver<Queued>>,
    stop: &'a watch::Sender<bool>,
}

impl Drop for HeldQueue<'_> {
    fn drop(&mut self) {
        if *self.stop.borrow() {
            drain(&mut self.queue);
        }
    }
}

/// Closes the accept queue and drops what waits in it: each queued connection closes and
/// gives back its `max_connections` slot.
fn drain(queue: &mut mpsc::Receiver<Queued>) {
    queue.close();
    while queue.try_recv().is_ok() {}
}

/// Where an accepted connection goes once its handshake is over: into the queue of
/// [`Server::accept`], or, if it failed, into the rejections.
pub(crate) struct Handoff {
    queue: mpsc::Sender<Queued>,
    rejected: Arc<Rejections>,
    on_accept: Arc<OnceLock<OnAccept>>,
    /// The server's close: the queue itself is closed only if no `accept` held it then.
    stop: watch::Receiver<bool>,
}

/// A handshaken connection waiting for [`Server::accept`], with its `max_connections`
/// slot: a connection whose driver ended meanwhile (its peer sent messages and closed)
/// still counts until it is taken, so that the connections waiting are bounded as the
/// open ones are.
#[derive(Debug)]
pub(crate) struct Queued {
    conn: Connection,
    _slot: Option<Arc<OwnedSemaphorePermit>>,
}

impl Handoff {
    /// Called by the connection's driver once, when the handshake completed (`Ok`) or the
    /// connection closed before that; `slot` is the connection's share of its
    /// `max_connections` permit, kept while it waits for `accept`.
    pub(crate) fn complete(
        self,
        conn: Connection,
        result: Result<(), CloseCause>,
        slot: Option<Arc<OwnedSemaphorePermit>>,
    ) {
        match result {
            // The server closed: dropping the connection closes it. `accept` returns
            // `None` from then on, and `on_accept` gets nothing more.
            Ok(()) if self.queue.is_closed() || *self.stop.borrow() => {}
            // Handed to the application's function.
            Ok(()) if self.on_accept.get().is_some() => {
                if let Some(on_accept) = self.on_accept.get() {
                    // A handle kept to close it should the function panic; its address
                    // is asked only then (it is made lazily).
                    let kept = conn.clone();
                    let handed = std::panic::AssertUnwindSafe(|| (on_accept.0)(conn));
                    if std::panic::catch_unwind(handed).is_err() {
                        let remote = kept.remote_address();
                        tracing::error!(%remote, "the server's on_accept function panicked");
                        // Closed even if the function kept a handle before it panicked
                        // (a future it attached, say).
                        kept.start_close(
                            CloseCode::GoingAway,
                            "the server failed to set up the connection",
                        );
                    }
                }
            }
            Ok(()) => match self.queue.try_send(Queued { conn, _slot: slot }) {
                Ok(()) => {}
                // The application is behind with `accept`: wait for room. At most one such
                // task per connection, and connections are bounded by `max_connections`
                // (the connection holds its permit until it is accepted); it ends when
                // the server is dropped.
                Err(mpsc::error::TrySendError::Full(queued)) => {
                    let queue = self.queue;
                    tokio::spawn(async move { drop(queue.send(queued).await) });
                }
                // The server closed meanwhile: dropping the connection closes it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            },
            Err(cause) => reject(&self.rejected, conn.remote_address(), cause),
        }
    }
}

/// Where a server's handshake failures go: the queue [`Server::next_rejection`] reads, and
/// their count, which limits what is logged.
#[derive(Debug)]
struct Rejections {
    queue: mpsc::Sender<Rejection>,
    count: LogLimit,
}

/// Counts a handshake failure, logs it, and queues it for [`Server::next_rejection`] if
/// there is room. Those the [`LogLimit`] admits (the first 8, then the 16th, 32nd, 64th,
/// ...) are logged at warn level, with the count so far, the others at debug level: a peer
/// that fails its handshake in a loop cannot flood the log.
fn reject(rejected: &Rejections, remote: &Address, cause: CloseCause) {
    if let Some(n) = rejected.count.admit() {
        tracing::warn!(%remote, %cause, rejected = n, "rejected connection: handshake failed");
    } else {
        let n = rejected.count.count();
        tracing::debug!(%remote, %cause, rejected = n, "rejected connection: handshake failed");
    }
    let _ = rejected.queue.try_send(Rejection {
        remote: remote.clone(),
        cause,
    });
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Accepted sockets have `TCP_NODELAY` and the user timeout, whether they inherited
    /// them from the listener (checked on the first) or got them one by one.
    #[tokio::test]
    async fn accepted_sockets_have_nodelay_and_the_user_timeout() {
        let options = Options::default().tcp_user_timeout(Some(Duration::from_secs(7)));
        for inherits in [UNKNOWN, NOT_INHERITED] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let local = listener.local_addr().unwrap();
            let acceptor = TcpAcceptor::new(listener, local, &options);
            acceptor.inherits.store(inherits, Ordering::Relaxed);
            for _ in 0..2 {
                let _client = tokio::net::TcpStream::connect(local).await.unwrap();
                let (stream, _) = acceptor.accept(&options).await.unwrap();
                assert!(stream.nodelay().unwrap());
                assert!(has_user_timeout(&stream, &options));
            }
            #[cfg(target_os = "linux")]
            if inherits == UNKNOWN {
                assert_eq!(acceptor.inherits.load(Ordering::Relaxed), INHERITED);
            }
        }
    }
}
