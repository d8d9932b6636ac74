//! # chatter-rpc
//!
//! Remote objects, calls and signals over chatter conversations.
//!
//! Annotate a trait with [`#[remote]`](remote), implement it, register the implementation
//! on a [`Peer`] (or [`serve`] it on every accepted connection), and call it from the other
//! side through the generated client:
//!
//! ```
//! use std::time::Duration;
//! use chatter_rpc::{remote, serve, CallError, Peer, PeerOptions};
//! use chatter_core::{connect, listen, Options};
//!
//! #[derive(Debug, serde::Serialize, serde::Deserialize)]
//! pub enum CalcError { DivisionByZero }
//!
//! #[remote]
//! pub trait Calculator {
//!     async fn add(&self, a: i64, b: i64) -> i64;
//!     async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError>;
//!     #[signal(ttl = "5s")]
//!     async fn log(&self, line: String);
//! }
//!
//! struct Calc;
//!
//! impl Calculator for Calc {
//!     async fn add(&self, a: i64, b: i64) -> i64 { a + b }
//!     async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError> {
//!         a.checked_div(b).ok_or(CalcError::DivisionByZero)
//!     }
//!     async fn log(&self, line: String) { println!("log: {line}"); }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = listen("tcp://127.0.0.1:0", Options::default()).await?;
//! let server = serve(listener, PeerOptions::default(), |peer: &Peer| {
//!     peer.register("calc", CalculatorServer::new(Calc));
//! });
//!
//! let peer = Peer::new(connect(&server.addresses()[0], Options::default()).await?);
//! let calc = CalculatorClient::new(&peer, "calc");
//! assert_eq!(calc.add(2, 3).await?, 5);
//! assert!(matches!(
//!     calc.div(1, 0).await,
//!     Err(CallError::App { error: CalcError::DivisionByZero, .. })
//! ));
//! calc.log("done".into()).await?;
//! // Per-call deadline:
//! assert_eq!(calc.with_deadline(Duration::from_secs(1)).add(1, 1).await?, 2);
//! peer.close().await;
//! # Ok(()) }
//! ```
//!
//! ## Semantics
//!
//! - **Calls** map onto chatter conversations: the request opens a conversation and passes
//!   the turn to the callee, the reply ends it. Every call has a deadline
//!   ([`PeerOptions::default_deadline`], overridable per client with `with_deadline`). It
//!   travels as a relative duration; the caller fails with [`CallError::DeadlineExceeded`]
//!   when it passes, and the callee drops the handler's future when it passes on its side.
//!   Dropping the call's future cancels the call: a cancel message makes the callee drop
//!   the handler's future. A request that finds no flow-control credit waits for it
//!   within the call's deadline; the peer does not queue calls.
//! - **Signals** are one-message conversations without a reply. A signal's future only
//!   queues it: the signal goes to the connection at once when nothing is queued before
//!   it and flow control has credit, or else into the peer's outbox, which hands signals
//!   to the connection in order as credit comes back. The outbox is bounded
//!   ([`PeerOptions::max_queued_signals`], 1024 by default); a signal sent while it is
//!   full follows [`PeerOptions::when_full`]: by default ([`WhenFull::Wait`]) the
//!   signal's future *waits* for room, within the signal's TTL, and fails with
//!   [`SignalError::Expired`] (counted in [`PeerStats::signals_expired`]) if the TTL runs
//!   out first; [`WhenFull::Error`] refuses it with [`SignalError::OutboxFull`],
//!   [`WhenFull::DropOldest`] drops the oldest queued signal. So a sender that is out of
//!   credit slows down to the receiver's pace instead of failing or growing: the
//!   sender's memory for signals is at most *outbox capacity × largest signal* (the
//!   encoded size of its arguments plus the envelope's names and a few bytes). A signal
//!   not handed to the connection before its TTL runs out is dropped and counted
//!   ([`PeerStats::signals_expired`]); the callee likewise drops a signal that cannot
//!   start before its TTL ([`PeerStats::signals_expired_on_arrival`]). A signal is never
//!   delivered late.
//! - **Errors** are typed: [`CallError<E>`] carries the callee's `E` as the same type, with
//!   the callee's [`RemoteContext`] (`Display` and `source()` chain), and separates every
//!   framework failure. A panicking handler produces [`CallError::RemotePanic`]; the callee
//!   keeps serving.
//! - **Concurrency and backpressure**: the callee runs at most
//!   [`PeerOptions::max_concurrent_handlers`] handlers at once per connection (a handler
//!   that completes on its first poll runs in the receive loop, which runs in the
//!   connection's own task beside its driver (`chatter_core::Connection::attach`); others
//!   get a task, so a handler must not block before its first `.await`). A
//!   call or signal that finds every slot taken waits, in arrival order, and a freed slot
//!   goes to the oldest waiting call before any signal. Each received request holds its
//!   flow-control credit until its handler finished or it was dropped (deadline, TTL,
//!   cancel): the sender can be no more than the connection's `receive_window` ahead of
//!   the handlers, and then waits. A reply waits for send credit while its handler slot
//!   stays taken, so a caller that does not read its replies stalls only its own calls.
//!   The bound per connection on the callee, whatever the caller does: requests held ≤
//!   `receive_window` (counted as frame body + 64 bytes each, about twice that in memory
//!   for the smallest requests), plus what the running handlers hold and return
//!   (`max_concurrent_handlers` × the largest reply), plus chatter-core's own buffers
//!   (`docs/SECURITY.md`).
//! - **Symmetry**: both ends of a connection are [`Peer`]s; either can host objects and
//!   call the other.
//! - **Links**: a [`Peer`] made from a connection ([`Peer::new`]) closes with it; one
//!   made with [`Peer::reconnecting`] reconnects by itself, makes calls wait for a
//!   reconnect within their deadline ([`CallError::NotConnected`],
//!   [`CallError::OutcomeUnknown`], `#[idempotent]` methods re-sent), keeps signals in
//!   the outbox until the receiver's handler finished (acknowledged; optionally
//!   persistent on disk), and reports the ones whose TTL ran out. Both serve the objects
//!   registered on them on every connection, and share one API. Peers and servers shut
//!   down gracefully (`shutdown(grace)`).
//!
//! The wire format of the RPC envelopes is described in `PROTOCOL.md` in this crate.
//!
//! ## Cargo features
//!
//! - **`tls`** (default): `tls://` addresses and the re-exported `tls` module (chatter-core's
//!   `tls` feature: rustls with the ring provider). Without it, connecting to or listening
//!   on a `tls://` address fails with
//!   [`AddressError::TlsNotCompiledIn`](chatter_core::AddressError::TlsNotCompiledIn), and
//!   [`Peer::reconnecting`] refuses one at once.
//! - **`persistence`** (off by default): the SQLite store of persistent signals
//!   ([`ReconnectOptions::store`]), through rusqlite, which compiles SQLite from C. Without
//!   it, [`Peer::reconnecting`] refuses a store with
//!   [`ReconnectError::PersistenceNotCompiledIn`]; everything else, including reliable
//!   in-memory delivery of signals by a reconnecting peer, works the same.
//! - **`metrics`** (off by default): the [`PeerStats`] counters and the latency histograms
//!   `chatter_rpc_call_duration_seconds` (caller) and `chatter_rpc_handler_duration_seconds`
//!   (callee), labelled by object, method and outcome, through the `metrics` facade (any
//!   recorder: a Prometheus exporter, ...); the names are in [`telemetry`]. Without it,
//!   nothing is timed or counted twice: the timers are empty and their calls vanish.
//!
//! With neither (`default-features = false`), chatter-rpc builds from Rust sources alone:
//! plain TCP and Unix sockets, no rustls, ring or SQLite.

#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
// One `unsafe` block, allowed where it is: `CallContext::current` reads the request a
// handler polled in place serves through a thread-local pointer (see `context.rs`), so
// that the common case pays two stores for its context (measured: +8% instructions per
// call and +19% per signal with a reference-counted swap instead).
#![deny(unsafe_code)]

mod client;
mod context;
mod error;
mod first_inline;
pub mod introspect;
mod peer;
mod server;
mod service;
mod store;
pub mod stream;
pub mod telemetry;
mod values;
mod wire;

/// TLS settings for `tls://` addresses: [`chatter_core::tls`].
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub use chatter_core::tls;
/// The transport layer, re-exported so that `chatter-rpc` is the only chatter dependency an
/// application needs.
pub use chatter_core::{self, connect, listen, Address, CloseCause, Connection, Options, Server};
pub use chatter_macros::remote;
pub use context::{CallContext, InvalidTraceParent, Metadata, TraceParent};
pub use error::{AckError, CallError, RemoteContext, SignalError};
pub use peer::{
    Backoff, ConnectionState, Events, Peer, PeerEvent, PeerOptions, PeerStats, ReconnectError,
    ReconnectOptions, Sent, SignalId, WhenFull, EVENTS_KEPT,
};
pub use server::{serve, RpcServer};
pub use service::Service;

/// What `#[remote]`-generated code refers to. Not a public API: it may change in any
/// release.
#[doc(hidden)]
pub mod __private {
    pub use crate::client::{ClientCore, Method};
    pub use crate::introspect::build::*;
    pub use crate::introspect::shape::{
        ProbeTraced, ProbeUntraced, ShapeCache, ShapeList, ShapeProbe,
    };
    pub use crate::introspect::{ArgDescription, InterfaceDescription, MethodDescription};
    pub use crate::service::{
        reply_app_error, reply_ok, BoxFuture, Ctx, CtxDisplay, CtxError, CtxNone, Dispatch,
        Handlers, RemoteResult, StreamReply,
    };
    pub use crate::values::{
        decode_args, decode_no_args, ArgError, ArgsReader, ArgsWriter, Receivable, Sendable,
    };
    pub use crate::wire::Payload;
    pub use ::bytes::Bytes;
    pub use ::core::clone::Clone;
    pub use ::core::convert::{Infallible, Into};
    pub use ::core::fmt;
    pub use ::core::future::Future;
    pub use ::core::marker::{Send, Sync};
    pub use ::core::option::Option::{self, None, Some};
    pub use ::core::result::Result::{self, Err, Ok};
    pub use ::core::time::Duration;
    pub use ::serde;
    pub use ::std::boxed::Box;
    pub use ::std::string::String;
    pub use ::std::sync::Arc;
}

/// Entry points for the fuzz targets in `fuzz/` at the repository root, which can reach
/// only public items. Not a public API: it may change or go away in any release.
#[doc(hidden)]
pub mod __fuzz {
    /// Decodes `payload` as a caller-to-callee envelope; true if it is one.
    pub fn decode_incoming(payload: &[u8]) -> bool {
        crate::wire::decode_incoming(payload, 8192).is_ok()
    }

    /// Decodes `payload` as a reply envelope; true if it is one.
    pub fn decode_reply(payload: &[u8]) -> bool {
        crate::wire::decode_reply(payload).is_ok()
    }
}
