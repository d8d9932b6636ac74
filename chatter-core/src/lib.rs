//! # chatter-core
//!
//! Conversations over TCP, TLS and Unix sockets: the transport layer of the chatter RPC
//! framework.
//!
//! Peers exchange messages (MessagePack payloads in length-delimited frames) grouped into
//! *conversations*. Every message carries `first`, `last` and `token` flags: the side that
//! holds the token may send, `token` passes the turn, `last` ends the conversation. These
//! rules are enforced: sending out of turn is an error returned to the caller, and a peer
//! that breaks them is disconnected with a protocol error. A message may carry a timeout:
//! if the peer stays silent in that conversation for that long, [`Connection::next_timeout`]
//! reports it.
//!
//! Connections also keep themselves honest: a handshake rejects peers that speak something
//! else, keepalive pings detect a vanished peer, flow control bounds the memory a fast
//! sender can make a slow receiver use, and every close carries its [`CloseCause`].
//!
//! ```
//! use chatter_core::{connect, listen, Options, SendOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = listen("tcp://127.0.0.1:0", Options::default()).await?;
//! let client = connect(&server.addresses()[0], Options::default()).await?;
//! let peer = server.accept().await.expect("server is open");
//!
//! // The client asks, passing the turn; the server answers and ends the conversation.
//! let conv = client.send("ping?", SendOptions::new().last(false)).await?;
//! let request = peer.receive().await?;
//! assert!(request.first && request.token && !request.last);
//! peer.send("pong!", SendOptions::new().conversation(request.conversation)).await?;
//!
//! let reply = client.receive().await?;
//! assert_eq!(reply.conversation, conv);
//! assert_eq!(reply.decode::<String>()?, "pong!");
//! client.close().await;
//! server.close().await;
//! # Ok(()) }
//! ```
//!
//! Each connection has a task of its own, its driver, which moves its bytes. A server
//! that answers each connection from a receive loop can run that loop in the same task:
//! [`Server::on_accept`] hands it each connection the moment its handshake completes, and
//! [`Connection::attach`] runs the loop beside the driver, which saves a task per
//! connection and the scheduler's rounds between the two (chatter-rpc serves so).
//!
//! The protocol logic is a sans-IO state machine in [`proto`]; `PROTOCOL.md` in this crate
//! describes the wire format byte by byte. Payloads sent with [`Connection::send`] are
//! MessagePack written by [`codec`] (the `chatter-msgpack` crate), which writes what
//! rmp-serde writes and refuses values nested without end.
//!
//! ## Cargo features
//!
//! - **`tls`** (default): `tls://` addresses and the `tls` module (rustls
//!   with the ring provider). Without it the crate needs neither rustls nor ring (nor a
//!   C compiler for ring), and [`connect`] and [`listen`] refuse a `tls://` address with
//!   [`AddressError::TlsNotCompiledIn`]; [`Address::check_supported`] tells in advance.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
// Audited exceptions, in `transport.rs`: `set_defer_accept` and `unsent` (a socket option
// and an ioctl socket2 lacks), and `SocketName` (a descriptor borrowed under a lock that its
// socket's owner takes before closing it).
#![deny(unsafe_code)]

mod address;
pub mod codec;
mod connection;
pub mod error;
mod joint;
mod log_limit;
mod options;
mod over;
pub mod proto;
mod server;
mod throttle;
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub mod tls;
mod transport;

pub use address::{Address, ToAddress};
pub use connection::{Buffered, Connection, Conversation, Event, Msg, SendOptions};
pub use error::{
    AddressError, CloseCause, CloseCode, ConnectError, ConnectionClosed, DecodeError,
    InvalidOptions, ListenError, ProtocolError, SendError,
};
pub use log_limit::LogLimit;
pub use options::Options;
pub use over::connect_over;
pub use proto::Keepalive;
pub use server::{Rejection, Server};
pub use throttle::{Rate, Throttle};
pub use transport::{connect, connect_early, listen};
