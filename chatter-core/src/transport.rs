//! Opening transports: [`connect`] and [`listen`].

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
#[cfg(feature = "tls")]
use tokio_rustls::TlsConnector;

use crate::address::LazyAddress;
use crate::connection::{first_wake_after, Side};
use crate::error::{CloseCause, ConnectError, ListenError};
#[cfg(feature = "tls")]
use crate::error::{InvalidOptions, ProtocolError};
use crate::server::Server;
use crate::{Address, Connection, Options, ToAddress};

/// Connects to a peer and completes the chatter handshake.
///
/// `address` is `tcp://host:port`, `tls://host:port` (with `Options::tls_client`, feature `tls`) or
/// `unix:///path`. Fails with a clear [`ConnectError`]
/// when the address is malformed (or `tls://` in a build without the `tls` feature:
/// [`AddressError::TlsNotCompiledIn`](crate::AddressError::TlsNotCompiledIn)), nothing listens there, connecting takes longer than
/// [`Options::connect_timeout`], or the peer does not speak chatter.
///
/// ```no_run
/// # async fn demo() -> Result<(), chatter_core::ConnectError> {
/// let conn = chatter_core::connect("tcp://127.0.0.1:7000", Default::default()).await?;
/// # let _ = conn; Ok(()) }
/// ```
pub async fn connect(
    address: impl ToAddress,
    options: Options,
) -> Result<Connection, ConnectError> {
    let (conn, address) = open(address, options).await?;
    conn.handshake()
        .await
        .map_err(|cause| handshake_failed(&address, cause))?;
    Ok(conn)
}

/// Connects like [`connect`], but returns as soon as the transport is open (on `tls://`,
/// once the TLS handshake completed) and this side's hello is queued, without waiting a
/// round trip for the peer's hello.
///
/// Messages sent before the peer's hello arrives go out right behind this side's hello,
/// as long as their costs add up to at most
/// [`EARLY_CREDIT`](crate::proto::EARLY_CREDIT) (4 KiB: a first request, typically);
/// later ones wait for the peer's hello. This saves the handshake's round trip on a
/// short-lived connection: connect, one call, close. The price is where errors show: a
/// peer that does not speak chatter, or refuses the connection, is reported as the
/// connection's [`close_cause`](Connection::close_cause) (and by `send` and `receive`)
/// instead of by this function.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use chatter_core::{connect_early, listen, Options, SendOptions};
///
/// let server = listen("tcp://127.0.0.1:0", Options::default()).await?;
/// let client = connect_early(&server.addresses()[0], Options::default()).await?;
/// // Sent at once, with the hello.
/// client.send("ping?", SendOptions::new().last(false)).await?;
/// let peer = server.accept().await.expect("open");
/// let request = peer.receive().await?;
/// peer.send("pong!", SendOptions::new().conversation(request.conversation)).await?;
/// assert_eq!(client.receive().await?.decode::<String>()?, "pong!");
/// # Ok(()) }
/// ```
pub async fn connect_early(
    address: impl ToAddress,
    options: Options,
) -> Result<Connection, ConnectError> {
    open(address, options).await.map(|(conn, _)| conn)
}

/// Opens the transport and starts the connection's driver (which queues the hello).
async fn open(
    address: impl ToAddress,
    options: Options,
) -> Result<(Connection, Address), ConnectError> {
    let address = address.to_address()?;
    options.validate()?;
    // The address is only formatted for an error: it costs as much as a system call.
    let name = &address;
    let conn = match &address {
        Address::Tcp { host, port } => {
            let (stream, remote) = within(&options, name, tcp_connect(host, *port)).await?;
            set_user_timeout(&stream, &options);
            // SAFETY: the stream goes to the connection's driver below, which releases the
            // name (`Driver::finish`, run before the driver and its socket are dropped)
            // before the socket closes.
            #[allow(unsafe_code)]
            let local = unsafe { SocketName::new(stream.as_raw_fd()) };
            let addrs = (
                LazyAddress::name(local, false),
                LazyAddress::socket(remote, false),
            );
            Connection::start(stream, addrs, None, &options, Side::Connecting)
        }
        #[cfg(not(feature = "tls"))]
        Address::Tls { .. } => return Err(address.tls_not_compiled_in().into()),
        #[cfg(feature = "tls")]
        Address::Tls { host, port } => {
            let tls = options.tls_client.as_ref().ok_or_else(|| {
                InvalidOptions(format!(
                    "{name} is a TLS address: pass TLS settings with Options::tls_client"
                ))
            })?;
            let server_name = tls.name_for(host).map_err(InvalidOptions)?;
            let connector = TlsConnector::from(tls.config()?);
            let (stream, remote) = within(&options, name, tcp_connect(host, *port)).await?;
            set_user_timeout(&stream, &options);
            let addrs = io_result(name, tcp_addresses(&stream, remote, true))?;
            let handshake = connector.connect(server_name, stream);
            let stream = match timed(&options, options.proto.handshake_timeout, handshake).await {
                Some(Ok(stream)) => stream,
                Some(Err(e)) => return Err(handshake_failed(name, CloseCause::Tls(e.to_string()))),
                None => {
                    return Err(handshake_failed(
                        name,
                        CloseCause::Protocol(ProtocolError::HandshakeTimeout),
                    ))
                }
            };
            let certs = stream.get_ref().1.peer_certificates().map(<[_]>::to_vec);
            Connection::start(stream, addrs, certs, &options, Side::Connecting)
        }
        Address::Unix { path } => {
            let stream = within(&options, name, UnixStream::connect(path)).await?;
            let local = LazyAddress::ready(unix_address(stream.local_addr().ok()));
            let remote = LazyAddress::ready(address.clone());
            Connection::start(stream, (local, remote), None, &options, Side::Connecting)
        }
    };
    Ok((conn, address))
}

/// Applies [`Options::tcp_user_timeout`] (Linux only; a failure is only logged: the
/// connection works without it). Returns whether the socket has the setting now.
pub(crate) fn set_user_timeout<S: std::os::fd::AsFd>(socket: &S, options: &Options) -> bool {
    #[cfg(target_os = "linux")]
    if let Some(timeout) = options.tcp_user_timeout {
        if let Err(e) = socket2::SockRef::from(socket).set_tcp_user_timeout(Some(timeout)) {
            tracing::debug!(error = %e, "could not set TCP_USER_TIMEOUT");
            return false;
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (socket, options);
    true
}

/// Sets `TCP_DEFER_ACCEPT` on a listener (Linux only; a failure is only logged: the
/// listener works without it). The kernel then completes `accept` only once the client's
/// first bytes arrived, which in chatter is always the client's hello (PROTOCOL.md §4: the
/// server says nothing first). The server is woken once per connection instead of twice
/// (the connect, then the hello), and a peer that connects and says nothing costs the
/// kernel a pending connection for up to `seconds` (then it is accepted, and the handshake
/// timeout applies) instead of costing the server a task and buffers.
///
/// socket2 has no setter for this option, hence the one `unsafe` block of chatter-core.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn set_defer_accept<S: std::os::fd::AsRawFd>(listener: &S, seconds: u64) {
    let value = libc::c_int::try_from(seconds.max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: `listener` owns an open descriptor for the duration of the call; `value` is a
    // live `c_int` and its size is the length passed, as TCP_DEFER_ACCEPT expects.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&value).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let error = io::Error::last_os_error();
        tracing::debug!(%error, "could not set TCP_DEFER_ACCEPT");
    }
}

/// How many bytes of a TCP socket's output (its FIN included) the kernel has not sent yet
/// (Linux `SIOCOUTQNSD`); `None` when it cannot tell. Sent but unacknowledged bytes are not
/// counted: the kernel retransmits those after the socket is closed, within the user
/// timeout, as for any close; unsent ones would wait there for a peer that does not read.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn unsent<S: std::os::fd::AsRawFd>(socket: &S) -> Option<usize> {
    /// `linux/sockios.h`, the same on every architecture; not in the libc crate.
    const SIOCOUTQNSD: libc::Ioctl = 0x894B;
    let mut unsent: libc::c_int = 0;
    // SAFETY: `socket` owns an open descriptor for the duration of the call, and
    // SIOCOUTQNSD writes one `c_int` to the live local it is given.
    let rc = unsafe {
        libc::ioctl(
            socket.as_raw_fd(),
            SIOCOUTQNSD,
            std::ptr::from_mut(&mut unsent),
        )
    };
    if rc == 0 {
        usize::try_from(unsent).ok()
    } else {
        None
    }
}

/// A connected socket's descriptor, kept to ask the socket its own address
/// (`getsockname`) only if someone asks for it: most short connections never do, and the
/// system call is a measurable part of opening one.
///
/// The descriptor is used only while it is here, under this lock; the socket's owner
/// takes it out ([`release`](Self::release)) before it closes the socket, so it is never
/// used once closed (and perhaps reused for another file).
#[derive(Debug)]
pub(crate) struct SocketName {
    fd: std::sync::Mutex<Option<std::os::fd::RawFd>>,
}

impl SocketName {
    /// # Safety
    ///
    /// `fd` must stay open until [`release`](Self::release) is called or this value is
    /// dropped, whichever comes first.
    #[allow(unsafe_code)]
    pub(crate) unsafe fn new(fd: std::os::fd::RawFd) -> Self {
        SocketName {
            fd: std::sync::Mutex::new(Some(fd)),
        }
    }

    /// The socket's own address, or `None` once released or if the socket cannot tell.
    #[allow(unsafe_code)]
    pub(crate) fn resolve(&self) -> Option<SocketAddr> {
        let fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the descriptor is here, so it is open (the promise of `new`), and it
        // stays open while this lock is held: `release` takes the lock first.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw((*fd)?) };
        socket2::SockRef::from(&fd).local_addr().ok()?.as_socket()
    }

    /// Forgets the descriptor: the socket may be closed once this returns.
    pub(crate) fn release(&self) {
        self.fd.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Whether a socket has the [`Options::tcp_user_timeout`] that [`set_user_timeout`] sets.
pub(crate) fn has_user_timeout(stream: &TcpStream, options: &Options) -> bool {
    #[cfg(target_os = "linux")]
    if let Some(timeout) = options.tcp_user_timeout {
        let got = socket2::SockRef::from(stream).tcp_user_timeout();
        return matches!(got, Ok(Some(t)) if t.as_millis() == timeout.as_millis());
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (stream, options);
    true
}

fn handshake_failed(address: &Address, cause: CloseCause) -> ConnectError {
    ConnectError::Handshake {
        address: address.to_string(),
        cause,
    }
}

fn io_result<T>(address: &Address, r: io::Result<T>) -> Result<T, ConnectError> {
    r.map_err(|source| ConnectError::Io {
        address: address.to_string(),
        source,
    })
}

/// Runs a transport-level connect within the connect timeout.
async fn within<T>(
    options: &Options,
    address: &Address,
    fut: impl Future<Output = io::Result<T>>,
) -> Result<T, ConnectError> {
    match timed(options, options.connect_timeout, fut).await {
        Some(r) => io_result(address, r),
        None => Err(ConnectError::Timeout {
            address: address.to_string(),
        }),
    }
}

/// Runs `fut` for at most `limit`, as `tokio::time::timeout` does (`None` when the time
/// ran out), with its timer first armed no later than the connection's driver will first
/// arm its own (`first_wake_after`; else the handshake timeout, its first deadline), and
/// moved to the real limit if it fires before `fut` is done.
///
/// Why: arming a timer earlier than the runtime's next wake-up makes tokio unpark its
/// driver (an eventfd write and one more `epoll_wait`). With the connect's timer at, say,
/// 10 s and the driver's first at 2 s, every connection paid that once; with the connect's
/// timer at 2 s, the driver's (armed later, for later) does not move the wake-up earlier.
async fn timed<T>(options: &Options, limit: Duration, fut: impl Future<Output = T>) -> Option<T> {
    let start = Instant::now();
    let first = first_wake_after(options).unwrap_or(options.proto.handshake_timeout);
    let end = start + limit;
    let mut fut = pin!(fut);
    let mut sleep = pin!(tokio::time::sleep_until(start + first.min(limit)));
    poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        while sleep.as_mut().poll(cx).is_ready() {
            if sleep.deadline() >= end {
                return Poll::Ready(None);
            }
            sleep.as_mut().reset(end);
        }
        Poll::Pending
    })
    .await
}

/// Connects to the first address `host` resolves to that accepts; returns the stream and
/// that address (the stream's peer address).
async fn tcp_connect(host: &str, port: u16) -> io::Result<(TcpStream, SocketAddr)> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok((stream, addr));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, "host name resolved to no address")
    }))
}

/// Listens for peers; see [`Server`].
///
/// `tcp://host:0` binds a free port; [`Server::addresses`] reports the one chosen. A host
/// name that resolves to several addresses binds each of them.
/// `tls://host:port` needs `Options::tls_server` settings, and a build with the `tls`
/// feature: without it, it is refused with
/// [`AddressError::TlsNotCompiledIn`](crate::AddressError::TlsNotCompiledIn).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), chatter_core::ListenError> {
/// let server = chatter_core::listen("tcp://127.0.0.1:0", Default::default()).await?;
/// assert_ne!(server.addresses()[0].to_string(), "tcp://127.0.0.1:0");
/// # Ok(()) }
/// ```
pub async fn listen(address: impl ToAddress, options: Options) -> Result<Server, ListenError> {
    let address = address.to_address()?;
    options.validate()?;
    Server::bind(address, options).await
}

/// The local and remote address of a TCP stream connected to `remote` under TLS, as
/// `tls://` URLs, formatted when first asked for. Costs one `getsockname` (a plain TCP
/// client asks its socket only when asked, through [`SocketName`]; a TLS handshake costs
/// far more than the system call).
#[cfg(feature = "tls")]
pub(crate) fn tcp_addresses(
    stream: &TcpStream,
    remote: SocketAddr,
    tls: bool,
) -> io::Result<(LazyAddress, LazyAddress)> {
    Ok((
        LazyAddress::socket(stream.local_addr()?, tls),
        LazyAddress::socket(remote, tls),
    ))
}

pub(crate) fn unix_address(addr: Option<tokio::net::unix::SocketAddr>) -> Address {
    Address::Unix {
        path: addr
            .and_then(|a| a.as_pathname().map(|p| p.to_path_buf()))
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AddressError;

    /// `unsent` counts what the kernel could not send yet (a peer that does not read), and
    /// nothing once the peer took it all.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn unsent_counts_what_a_peer_that_does_not_read_leaves_in_the_kernel() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut reader = socket.connect(addr).await.unwrap();
        let (writer, _) = listener.accept().await.unwrap();
        assert_eq!(unsent(&writer), Some(0));
        // Write until the kernel takes no more: the peer's window is full, the rest waits.
        let chunk = vec![7u8; 64 * 1024];
        let mut written = 0;
        loop {
            match writer.try_write(&chunk) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let waiting = unsent(&writer).expect("SIOCOUTQNSD");
        assert!(waiting > 0 && waiting < written, "{waiting} of {written}");
        // The peer reads everything: nothing is left unsent.
        let mut buf = vec![0u8; 64 * 1024];
        let mut read = 0;
        while read < written {
            read += reader.read(&mut buf).await.unwrap();
        }
        assert_eq!(unsent(&writer), Some(0));
    }

    /// A client's local address is asked of its socket only when wanted, and is still
    /// there after the connection closed and its driver let the socket go.
    #[tokio::test]
    async fn a_clients_local_address_is_there_while_open_and_after_the_close() {
        let server = listen("tcp://127.0.0.1:0", Options::default())
            .await
            .expect("listen");
        let asked_open = connect(&server.addresses()[0], Options::default())
            .await
            .expect("connect");
        let peer = server.accept().await.expect("accept");
        assert_eq!(asked_open.local_address(), peer.remote_address());
        assert!(matches!(asked_open.local_address(), Address::Tcp { port, .. } if *port != 0));

        let asked_closed = connect(&server.addresses()[0], Options::default())
            .await
            .expect("connect");
        let peer = server.accept().await.expect("accept");
        // Not asked before the close: `close` returns once the driver finished, which
        // released the socket (asking it first, since this handle could still ask).
        asked_closed.close().await;
        assert_eq!(asked_closed.local_address(), peer.remote_address());
        let Address::Tcp { host, port } = asked_closed.local_address() else {
            panic!("a tcp:// address");
        };
        assert_eq!((host.as_str(), *port != 0), ("127.0.0.1", true));
    }

    /// A socket tells the peer's end of stream once it arrived (the `EPOLLRDHUP` that tokio
    /// keeps), and not before: the receiving side of a close skips its last read on it.
    #[tokio::test]
    async fn a_socket_tells_the_peers_end_of_stream_once_it_arrived() {
        use crate::connection::Transport;
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        peer.write_all(b"hello").await.unwrap();
        ours.readable().await.unwrap();
        assert!(!ours.read_closed(), "data, but no end of stream yet");
        let mut buf = [0u8; 16];
        assert_eq!(ours.try_read(&mut buf).unwrap(), 5);
        // Nothing more: tokio forgets the readiness, so the wait below is for the FIN.
        let empty = ours.try_read(&mut buf).expect_err("nothing more to read");
        assert_eq!(empty.kind(), io::ErrorKind::WouldBlock);
        peer.shutdown().await.unwrap();
        ours.readable().await.unwrap();
        assert!(ours.read_closed(), "the peer's FIN arrived");

        let (mut a, b) = UnixStream::pair().unwrap();
        assert!(!b.read_closed());
        a.shutdown().await.unwrap();
        b.readable().await.unwrap();
        assert!(b.read_closed());
    }

    /// `timed` gives up at its limit and not before, whether its timer first fires before
    /// the limit (and is moved to it) or at it: a connect that takes longer than the
    /// driver's first wake-up (the linger, 2 s here) but less than the limit completes.
    #[tokio::test(start_paused = true)]
    async fn timed_ends_at_its_limit_whatever_its_first_arming() {
        let options = Options::default().close_linger(Duration::from_secs(2));
        let took = |after: u64| tokio::time::sleep(Duration::from_secs(after));
        let cases = [
            // (limit, the future's time, done)
            (10, 5, true),
            (10, 11, false),
            (3, 5, false),
            (1, 5, false),
            (2, 1, true),
        ];
        for (limit, after, done) in cases {
            let start = Instant::now();
            let out = timed(&options, Duration::from_secs(limit), took(after)).await;
            let elapsed = start.elapsed();
            assert_eq!(out.is_some(), done, "limit {limit} s, took {after} s");
            let expected = Duration::from_secs(if done { after } else { limit });
            assert_eq!(elapsed, expected, "limit {limit} s, took {after} s");
        }
        // Without a linger the first arming is the handshake timeout.
        let options = Options::default().close_linger(Duration::ZERO);
        let start = Instant::now();
        assert!(timed(&options, Duration::from_secs(30), took(20))
            .await
            .is_some());
        assert_eq!(start.elapsed(), Duration::from_secs(20));
    }

    /// Without the `tls` feature, a `tls://` address is a clear error from both ends,
    /// before anything is bound or connected; with it, the address is usable.
    #[tokio::test]
    async fn tls_addresses_need_the_tls_feature() {
        let address: Address = "tls://127.0.0.1:0"
            .parse()
            .expect("tls:// parses in every build");
        let connected = connect(&address, Options::default()).await;
        let listened = listen(&address, Options::default()).await;
        if cfg!(feature = "tls") {
            assert_eq!(address.check_supported(), Ok(()));
            // Usable, but not without TLS settings.
            assert!(
                matches!(connected, Err(ConnectError::Options(_))),
                "{connected:?}"
            );
            assert!(
                matches!(listened, Err(ListenError::Options(_))),
                "{listened:?}"
            );
            return;
        }
        let expected = AddressError::TlsNotCompiledIn {
            address: "tls://127.0.0.1:0".into(),
        };
        assert_eq!(address.check_supported(), Err(expected.clone()));
        match connected {
            Err(ConnectError::Address(e)) => assert_eq!(e, expected),
            other => panic!("expected TlsNotCompiledIn, got {other:?}"),
        }
        match listened {
            Err(ListenError::Address(e)) => assert_eq!(e, expected),
            other => panic!("expected TlsNotCompiledIn, got {other:?}"),
        }
        assert_eq!(
            expected.to_string(),
            "cannot use tls://127.0.0.1:0: TLS support is not compiled in: enable the `tls` \
             feature of chatter-rpc (or of chatter-core, when using it directly)"
        );
    }
}
