//! Errors, split by layer and by operation.
//!
//! A connection ends for exactly one [`CloseCause`]; every operation on a closed connection
//! reports that cause. Operations have their own error types ([`SendError`],
//! [`ConnectError`], …) that wrap it, so a caller can match on what went wrong with *this*
//! operation without losing why the connection ended.

use std::fmt;
use std::io;
use std::sync::Arc;

pub use crate::proto::frame::CloseCode;
use crate::Conversation;

/// Why a connection ended. Every operation on a closed connection reports it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CloseCause {
    /// This side closed the connection ([`Connection::close`](crate::Connection::close), all
    /// handles dropped, or its server closed).
    #[error("connection closed locally")]
    Local,
    /// The peer closed the connection with a close frame.
    #[error("connection closed by peer ({code:?}): {reason}")]
    Peer {
        /// The peer's close code.
        code: CloseCode,
        /// The peer's reason, as it sent it, cut to its first 1024 bytes (at a character
        /// boundary): a peer cannot make every error that reports the close carry megabytes.
        reason: String,
    },
    /// The peer did not answer a keepalive ping in time, or took none of this side's
    /// output for keepalive's interval + timeout.
    #[error("keepalive timeout: the peer did not answer a ping in time")]
    KeepaliveTimeout,
    /// The peer broke the protocol (or never spoke it).
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// The TLS handshake failed (untrusted or expired certificate, wrong name, missing
    /// client certificate, a peer that does not speak TLS, …). Only on `tls://`
    /// connections, which need the `tls` feature.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The transport failed, including a peer that vanished without a close frame.
    #[error("I/O error: {0}")]
    Io(Arc<io::Error>),
}

impl CloseCause {
    /// Classifies a transport error: TLS failures (alerts, bad records) get their own cause.
    pub(crate) fn io(err: io::Error) -> Self {
        #[cfg(feature = "tls")]
        if let Some(tls) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            return CloseCause::Tls(tls.to_string());
        }
        CloseCause::Io(Arc::new(err))
    }

    /// True when this side closed the connection on purpose.
    pub fn is_local(&self) -> bool {
        matches!(self, CloseCause::Local)
    }
}

/// A violation of the wire protocol, by the peer or (in a hello) by a stranger.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The first bytes were not a chatter hello.
    #[error("peer does not speak chatter (first bytes: {})", hex_preview(.first_bytes))]
    NotChatter {
        /// Up to 16 of the first bytes received.
        first_bytes: Vec<u8>,
    },
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {peer}, this side speaks {ours}")]
    UnsupportedVersion {
        /// The peer's version.
        peer: u64,
        /// Ours.
        ours: u64,
    },
    /// The handshake did not complete within the handshake timeout.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// A frame longer than the configured maximum.
    #[error("frame of {size} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// The announced frame length.
        size: u64,
        /// The configured maximum.
        max: u32,
    },
    /// A frame that cannot be decoded.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A frame that is valid on its own but not at this point.
    #[error("unexpected frame: {0}")]
    Unexpected(String),
    /// A message whose id is not the next one.
    #[error("message id {got} where {expected} was expected")]
    BadMessageId {
        /// What the peer sent.
        got: u64,
        /// The next id in sequence.
        expected: u64,
    },
    /// A message in a conversation that does not exist or already ended.
    #[error("message in unknown or ended conversation (first id {first}, opened by {})", owner_name(*.opened_by_peer))]
    UnknownConversation {
        /// The conversation's first message id.
        first: u64,
        /// True when the peer claims to own the conversation.
        opened_by_peer: bool,
    },
    /// The peer sent in a conversation while this side held the token.
    #[error("peer sent out of turn in conversation (first id {first}, opened by {})", owner_name(*.opened_by_peer))]
    OutOfTurn {
        /// The conversation's first message id.
        first: u64,
        /// True when the peer owns the conversation.
        opened_by_peer: bool,
    },
    /// The peer sent more unconsumed data than this side's receive window allows.
    #[error("peer exceeded the receive window ({used} bytes in use, window {window})")]
    WindowExceeded {
        /// Bytes the peer had outstanding.
        used: u64,
        /// The window this side announced.
        window: u32,
    },
    /// The peer opened more concurrent conversations than allowed.
    #[error("peer opened more than {limit} concurrent conversations")]
    TooManyConversations {
        /// The configured limit.
        limit: usize,
    },
}

fn owner_name(opened_by_peer: bool) -> &'static str {
    if opened_by_peer {
        "peer"
    } else {
        "us"
    }
}

fn hex_preview(bytes: &[u8]) -> String {
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let text: String = bytes
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect();
    format!("{} {text:?}", hex.join(" "))
}

/// The connection is closed; carries the cause. Returned by receiving operations.
#[derive(Debug, Clone, thiserror::Error)]
#[error("connection closed: {0}")]
pub struct ConnectionClosed(pub CloseCause);

/// An address that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddressError {
    /// Not of the form `scheme://rest`.
    #[error("malformed address {address:?}: {reason}")]
    Malformed {
        /// The address as given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A scheme other than `tcp`, `tls` or `unix`.
    #[error(
        "unknown scheme {scheme:?} in address {address:?} (expected tcp://, tls:// or unix://)"
    )]
    UnknownScheme {
        /// The address as given.
        address: String,
        /// The scheme found.
        scheme: String,
    },
    /// A `tcp://` or `tls://` address without a port.
    #[error("address {address:?} has no port (expected tcp://host:port)")]
    MissingPort {
        /// The address as given.
        address: String,
    },
    /// A `tls://` address, in a build without the `tls` feature (returned by
    /// [`connect`](crate::connect), [`listen`](crate::listen) and
    /// [`Address::check_supported`](crate::Address::check_supported); the address parses).
    #[error(
        "cannot use {address}: TLS support is not compiled in: enable the `tls` feature of \
         chatter-rpc (or of chatter-core, when using it directly)"
    )]
    TlsNotCompiledIn {
        /// The address.
        address: String,
    },
}

/// Options that contradict each other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid options: {0}")]
pub struct InvalidOptions(pub String);

/// Why [`connect`](crate::connect) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The address is unusable.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The options are unusable.
    #[error(transparent)]
    Options(#[from] InvalidOptions),
    /// The TLS configuration is unusable.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The transport could not be opened (refused, unreachable, …).
    #[error("cannot connect to {address}: {source}")]
    Io {
        /// The address connected to.
        address: String,
        /// The transport's error.
        source: io::Error,
    },
    /// Connecting took longer than the connect timeout.
    #[error("connecting to {address} timed out")]
    Timeout {
        /// The address connected to.
        address: String,
    },
    /// The transport opened, but the TLS or chatter handshake failed.
    #[error("handshake with {address} failed: {cause}")]
    Handshake {
        /// The address connected to.
        address: String,
        /// Why the connection ended during the handshake.
        cause: CloseCause,
    },
}

/// Why [`listen`](crate::listen) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// The address is unusable.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The options are unusable.
    #[error(transparent)]
    Options(#[from] InvalidOptions),
    /// The TLS configuration is unusable.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Binding failed (address in use, permission denied, …).
    #[error("cannot listen on {address}: {source}")]
    Io {
        /// The address bound to.
        address: String,
        /// The transport's error.
        source: io::Error,
    },
}

/// Why a send failed. Nothing was sent when this is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The connection is closed.
    #[error("connection closed: {0}")]
    Closed(CloseCause),
    /// The other side holds the token in this conversation.
    #[error("not our turn in {0}: the peer holds the token")]
    NotYourTurn(Conversation),
    /// The conversation ended (a `last` message was sent or received) or never existed.
    #[error("{0} has ended")]
    ConversationEnded(Conversation),
    /// The conversation belongs to another connection.
    #[error("{0} belongs to another connection")]
    WrongConnection(Conversation),
    /// The message is larger than the peer accepts.
    #[error(
        "message of {size} bytes exceeds the {max} bytes the peer accepts (its max_frame_size, or its receive_window less 64)"
    )]
    TooLarge {
        /// The frame body size.
        size: usize,
        /// The largest body the peer accepts: its `max_frame_size`, or its
        /// `receive_window` less 64 if that is smaller.
        max: u32,
    },
    /// The value could not be encoded.
    #[error("cannot encode the message: {0}")]
    Encode(#[from] chatter_msgpack::EncodeError),
    /// [`Connection::try_send`](crate::Connection::try_send) would have had to wait for the
    /// peer to consume data.
    #[error("the peer's receive window is full")]
    WouldBlock,
}

/// A payload that does not decode as the requested type.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode the message payload as {type_name}: {source}")]
pub struct DecodeError {
    /// The requested type.
    pub type_name: &'static str,
    /// The decoder's error.
    #[source]
    pub source: chatter_msgpack::DecodeError,
}

impl fmt::Display for crate::Conversation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "conversation {} (opened by {})",
            self.first_id(),
            if self.is_owner() { "us" } else { "peer" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_error<T: std::error::Error + Send + Sync + 'static>() {}

    #[test]
    fn errors_are_send_sync_static() {
        assert_error::<CloseCause>();
        assert_error::<ProtocolError>();
        assert_error::<ConnectionClosed>();
        assert_error::<AddressError>();
        assert_error::<ConnectError>();
        assert_error::<ListenError>();
        assert_error::<SendError>();
        assert_error::<DecodeError>();
    }

    #[test]
    fn not_chatter_shows_what_arrived() {
        let e = ProtocolError::NotChatter {
            first_bytes: b"GET / HTTP/1.1\r\n".to_vec(),
        };
        assert_eq!(
            e.to_string(),
            "peer does not speak chatter (first bytes: 47 45 54 20 2f 20 48 54 54 50 2f 31 2e 31 0d 0a \"GET / HTTP/1.1..\")"
        );
    }
}
