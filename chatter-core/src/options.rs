//! Connection and server settings.

use std::time::Duration;

use crate::error::InvalidOptions;
use crate::proto::{Config, Keepalive};
use crate::tls::{ClientTls, ServerTls};

/// Settings for [`connect`](crate::connect) and [`listen`](crate::listen).
///
/// The defaults suit most services: 4 MiB maximum frame, 8 MiB receive window, a ping after
/// 20 s of silence with 20 s to answer, 10 s to connect and 10 s to complete the handshake.
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
    pub(crate) bind_connections: bool,
    pub(crate) tls_server: Option<ServerTls>,
    pub(crate) tls_client: Option<ClientTls>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            proto: Config::default(),
            connect_timeout: Duration::from_secs(10),
            close_linger: Duration::from_secs(2),
            bind_connections: true,
            tls_server: None,
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
    /// arrives within `timeout` of the ping.
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

    /// How long a closing connection waits for the peer to acknowledge the close before
    /// dropping the socket (default 2 s).
    pub fn close_linger(mut self, linger: Duration) -> Self {
        self.close_linger = linger;
        self
    }

    /// How many conversations the peer may hold open at once (default 2^20).
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

    /// TLS settings for [`listen`](crate::listen) on a `tls://` address.
    pub fn tls_server(mut self, tls: ServerTls) -> Self {
        self.tls_server = Some(tls);
        self
    }

    /// TLS settings for [`connect`](crate::connect) to a `tls://` address.
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
        if self.proto.max_conversations == 0 {
            return Err(InvalidOptions(
                "max_conversations must be at least 1".into(),
            ));
        }
        Ok(())
    }
}
