//! Connection and server settings.

use std::time::Duration;

use crate::error::InvalidOptions;
use crate::proto::{Config, Keepalive};
use crate::throttle::Throttle;
#[cfg(feature = "tls")]
use crate::tls::{ClientTls, ServerTls};

/// Settings for [`connect`](crate::connect) and [`listen`](crate::listen).
///
/// The defaults suit most services: 4 MiB maximum frame, 8 MiB receive window, 1 MiB send
/// buffer, a
/// ping after 20 s of silence with 20 s to answer, 10 s to connect and 10 s to complete the
/// handshake, 2 s to finish closing, and at most 10,000 connections per server. What a
/// peer can make a connection hold is bounded by these options (see
/// [`Buffered`](crate::Buffered) and `docs/SECURITY.md`).
///
/// ```
/// use std::time::Duration;
/// use chatter_core::Options;
///
/// let options = Options::default()
///     .keepalive(Duration::from_secs(5), Duration::from_secs(2))
///     .receive_window(1 << 20)
///     .max_frame_size(256 * 1024);
/// # let _ = options;
/// ```
#[derive(Debug, Clone)]
pub struct Options {
    pub(crate) proto: Config,
    pub(crate) connect_timeout: Duration,
    pub(crate) close_linger: Duration,
    pub(crate) tcp_user_timeout: Option<Duration>,
    pub(crate) tcp_defer_accept: bool,
    pub(crate) max_connections: usize,
    pub(crate) listen_backlog: u32,
    pub(crate) throttle: Throttle,
    pub(crate) bind_connections: bool,
    #[cfg(feature = "tls")]
    pub(crate) tls_server: Option<ServerTls>,
    #[cfg(feature = "tls")]
    pub(crate) tls_client: Option<ClientTls>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            proto: Config::default(),
            connect_timeout: Duration::from_secs(10),
            close_linger: Duration::from_secs(2),
            tcp_user_timeout: Some(Duration::from_secs(30)),
            tcp_defer_accept: false,
            max_connections: 10_000,
            listen_backlog: 1024,
            throttle: Throttle::NONE,
            bind_connections: true,
            #[cfg(feature = "tls")]
            tls_server: None,
            #[cfg(feature = "tls")]
            tls_client: None,
        }
    }
}

impl Options {
    /// The largest frame body accepted from the peer (default 4 MiB). Longer frames are a
    /// protocol error, detected before anything is allocated for them.
    pub fn max_frame_size(mut self, bytes: u32) -> Self {
        self.proto.max_frame_size = bytes;
        self
    }

    /// How many bytes of received, unconsumed messages a connection buffers (default 8 MiB);
    /// each message counts its frame body plus 64 bytes of overhead. A peer that has this
    /// much outstanding waits until the application receives. Must be at least
    /// `max_frame_size + 64`.
    pub fn receive_window(mut self, bytes: u32) -> Self {
        self.proto.receive_window = bytes;
        self
    }

    /// Ping after `interval` without receiving anything; close with
    /// [`CloseCause::KeepaliveTimeout`](crate::CloseCause::KeepaliveTimeout) when nothing
    /// arrives within `timeout` of the ping, and also when output waited `interval` +
    /// `timeout` without the peer taking a byte of it (a peer that keeps sending but never
    /// reads).
    pub fn keepalive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.proto.keepalive = Some(Keepalive { interval, timeout });
        self
    }

    /// Turns keepalive off: a silent peer is never declared dead.
    pub fn no_keepalive(mut self) -> Self {
        self.proto.keepalive = None;
        self
    }

    /// How long the peer has to complete the handshake (default 10 s). On `tls://` this
    /// bounds the TLS handshake and, separately, the chatter handshake after it.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.proto.handshake_timeout = timeout;
        self
    }

    /// How long [`connect`](crate::connect) waits for the transport to open (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a closing connection has to finish (default 2 s): to write what it still
    /// has queued, then to read and discard what the peer still sends (it closes as soon as
    /// the peer ended its side or a read finds nothing, PROTOCOL.md §10). When the time is up the
    /// connection is dropped whatever is left, with a reset on TCP if output was still
    /// unsent, so a peer that stops reading cannot hold a connection (its task, socket and
    /// buffers) open. After a keepalive timeout the connection is dropped at once.
    pub fn close_linger(mut self, linger: Duration) -> Self {
        self.close_linger = linger;
        self
    }

    /// How many bytes of output may wait to be written to the peer before sends wait
    /// (default 1 MiB), on top of the peer's flow control: the peer's window says what *it*
    /// agrees to buffer, this says what *this side* buffers for it. A peer that announces
    /// a huge window and never reads makes this side hold at most this much plus one
    /// message. The buffers that held output above 64 KiB are kept for the next while
    /// such messages go on, and freed once the connection has written nothing above
    /// 64 KiB for 1 s. Must be at least 64.
    pub fn send_buffer(mut self, bytes: u32) -> Self {
        self.proto.send_buffer = bytes;
        self
    }

    /// On TCP (and TLS over TCP), how long sent data may stay unacknowledged by the peer's
    /// kernel before the kernel drops the connection (Linux `TCP_USER_TIMEOUT`; default
    /// 30 s; `None` keeps the system default, which can be many minutes). It also bounds how
    /// long the kernel keeps a closed connection's unsent bytes for a peer that stopped
    /// reading. Ignored on other systems and on Unix sockets.
    pub fn tcp_user_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.tcp_user_timeout = timeout;
        self
    }

    /// For [`listen`](crate::listen) on TCP (and TLS over TCP): whether the kernel keeps
    /// each new connection until the client's first bytes arrived (Linux
    /// `TCP_DEFER_ACCEPT`, set to the handshake timeout; default off; ignored elsewhere).
    /// A chatter client always speaks first (its hello), so nothing waits for it; what it
    /// changes:
    ///
    /// - a peer that connects and sends nothing takes no connection slot, task or buffer:
    ///   the kernel holds it as a pending connection (within the listen backlog) and
    ///   hands it over only after about the handshake timeout (rounded up to the kernel's
    ///   SYN-ACK retransmissions: 15 s for 10 s), when the handshake timeout starts;
    /// - the server wakes once per connection instead of twice, which saves CPU (1-4% per
    ///   short connection in `chatter-bench --only connect`, both ends on one core), but
    ///   its own setup of the connection no longer overlaps the client's, which adds to
    ///   the first reply's latency (4-10% fewer sequential connections per second with
    ///   client and server on two idle cores).
    ///
    /// Worth it for an exposed server (docs/SECURITY.md).
    ///
    /// ```
    /// let options = chatter_core::Options::default().tcp_defer_accept(true);
    /// # let _ = options;
    /// ```
    pub fn tcp_defer_accept(mut self, defer: bool) -> Self {
        self.tcp_defer_accept = defer;
        self
    }

    /// For [`listen`](crate::listen): how many connections the kernel keeps waiting for
    /// the server to accept them (the socket's listen backlog; default 1024, capped by the
    /// system's limit, `net.core.somaxconn` on Linux). Beyond it the kernel drops a new
    /// connection's SYN and the client retries after a second: with the 128 the standard
    /// library and tokio use, a burst of a few hundred connections (clients reconnecting
    /// after a restart) waits that second. Listeners handed in by the application keep
    /// their own backlog. Must be at least 1.
    ///
    /// ```
    /// let options = chatter_core::Options::default().listen_backlog(4096);
    /// # let _ = options;
    /// ```
    pub fn listen_backlog(mut self, backlog: u32) -> Self {
        self.listen_backlog = backlog;
        self
    }

    /// For [`listen`](crate::listen): how many connections the server holds at once,
    /// counting those still in their handshake (default 10,000). A peer that connects
    /// beyond the limit gets a close frame with [`CloseCode::Busy`](crate::CloseCode::Busy)
    /// and is disconnected (on `tls://`, disconnected without one); the server counts it
    /// in [`Server::refused`](crate::Server::refused). Must be at least 1.
    pub fn max_connections(mut self, limit: usize) -> Self {
        self.max_connections = limit;
        self
    }

    /// How many conversations the peer may hold open at once (default 65,536). Each costs
    /// about 40 bytes here (more in the layer above, e.g. a call in progress), so the
    /// default bounds that state at a few MiB per connection; beyond it, the peer's next
    /// conversation is a protocol error.
    ///
    /// It is also the most this side opens at once: the peer's limit is not announced, so
    /// a send that would open one more conversation waits until one of those it opened
    /// ended (as a send waits for flow-control credit), rather than exceed a peer that has
    /// the same limit and lose the connection. Keep it the same on both sides.
    pub fn max_conversations(mut self, limit: usize) -> Self {
        self.proto.max_conversations = limit;
        self
    }

    /// Whether closing a [`Server`](crate::Server) also closes the connections it accepted
    /// (default true).
    pub fn close_connections_with_server(mut self, yes: bool) -> Self {
        self.bind_connections = yes;
        self
    }

    /// Bandwidth limits for each connection (default none); change them on a live
    /// connection with [`Connection::set_throttle`](crate::Connection::set_throttle).
    pub fn throttle(mut self, throttle: Throttle) -> Self {
        self.throttle = throttle;
        self
    }

    /// TLS settings for [`listen`](crate::listen) on a `tls://` address.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls_server(mut self, tls: ServerTls) -> Self {
        self.tls_server = Some(tls);
        self
    }

    /// TLS settings for [`connect`](crate::connect) to a `tls://` address.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls_client(mut self, tls: ClientTls) -> Self {
        self.tls_client = Some(tls);
        self
    }

    pub(crate) fn validate(&self) -> Result<(), InvalidOptions> {
        const MIN: u32 = crate::proto::MIN_LIMIT;
        if self.proto.max_frame_size < MIN {
            return Err(InvalidOptions(format!(
                "max_frame_size must be at least {MIN} bytes"
            )));
        }
        let overhead = crate::proto::MESSAGE_OVERHEAD;
        if (self.proto.receive_window as u64) < self.proto.max_frame_size as u64 + overhead as u64 {
            return Err(InvalidOptions(format!(
                "receive_window ({}) must be at least max_frame_size ({}) + {overhead} (the \
                 per-message overhead), or a maximum-size message could never be sent",
                self.proto.receive_window, self.proto.max_frame_size
            )));
        }
        if let Some(k) = self.proto.keepalive {
            if k.interval.is_zero() || k.timeout.is_zero() {
                return Err(InvalidOptions(
                    "keepalive interval and timeout must be non-zero (use no_keepalive to disable)"
                        .into(),
                ));
            }
        }
        if self.listen_backlog == 0 || self.listen_backlog > i32::MAX as u32 {
            return Err(InvalidOptions(
                "listen_backlog must be between 1 and 2^31 - 1".into(),
            ));
        }
        if self.proto.send_buffer < MIN {
            return Err(InvalidOptions(format!(
                "send_buffer must be at least {MIN} bytes"
            )));
        }
        if self.max_connections == 0 {
            return Err(InvalidOptions("max_connections must be at least 1".into()));
        }
        if self.proto.max_conversations == 0 {
            return Err(InvalidOptions(
                "max_conversations must be at least 1".into(),
            ));
        }
        Ok(())
    }
}
