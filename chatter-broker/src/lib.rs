//! # chatter-broker
//!
//! A broker for chatter RPC: peers connect to it, register a name, and call each other's
//! objects through it by name, with every chatter guarantee intact: deadlines,
//! cancellation when a call is dropped, typed errors and panics, signal TTLs, streams and
//! flow control end to end.
//!
//! ```
//! use chatter_broker::{Broker, BrokerOptions};
//! use chatter_rpc::{remote, CallError};
//!
//! #[derive(Debug, serde::Serialize, serde::Deserialize)]
//! pub enum CalcError { DivisionByZero }
//!
//! #[remote]
//! pub trait Calculator {
//!     async fn add(&self, a: i64, b: i64) -> i64;
//!     async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError>;
//! }
//!
//! struct Calc;
//! impl Calculator for Calc {
//!     async fn add(&self, a: i64, b: i64) -> i64 { a + b }
//!     async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError> {
//!         a.checked_div(b).ok_or(CalcError::DivisionByZero)
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = Broker::listen("tcp://127.0.0.1:0", BrokerOptions::default()).await?;
//! let address = &broker.addresses()[0];
//!
//! // A peer that serves a calculator under the name "calc-1"…
//! let calc = chatter_broker::connect(address, "calc-1").await?;
//! calc.register("calc", CalculatorServer::new(Calc));
//!
//! // …and one that calls it through the broker, as over a direct connection.
//! let bus = chatter_broker::connect(address, "app").await?;
//! let client = CalculatorClient::new(&bus.peer("calc-1"), "calc");
//! assert_eq!(client.add(2, 3).await?, 5);
//! assert!(matches!(client.div(1, 0).await, Err(CallError::App { error: CalcError::DivisionByZero, .. })));
//! # Ok(()) }
//! ```
//!
//! ## How it works
//!
//! The broker relays chatter-core *conversations*, not decoded values: a call addressed to
//! `calc-1/calc` (what `bus.peer("calc-1")` makes a client address) opens a conversation on
//! the connection of the peer registered as `calc-1`, as a call of `calc`; everything said
//! in either conversation is forwarded to the other. The broker rewrites only the object
//! name, the relative durations (deadline, TTL: shortened by the time the message waited
//! in the broker) and the call ids in cancels and stream envelopes; arguments, results,
//! errors and stream items pass as bytes. `docs/design/broker.md` in the repository has
//! the whole design. The broker tells its peers, subscriptions and counters through its
//! own object ([`BrokerApi`]) and chatter-rpc's `chatter.introspect`.
//!
//! - **Names**: one per connection, at most [`BrokerOptions::max_name_len`] bytes, without
//!   `/`, `*` (which makes `name/object` a broadcast) or control characters. A name held by a connected peer is refused
//!   ([`RegisterError::NameTaken`]) unless the newcomer asks to take it over
//!   ([`BusOptions::take_over`]), which disconnects the holder. A name is free again once
//!   its connection closed.
//! - **Failures**: a call to a name nobody holds fails at once with
//!   [`CallError::NoSuchPeer`](chatter_rpc::CallError::NoSuchPeer); when the callee's
//!   connection closes before it answered, with
//!   [`CallError::PeerLost`](chatter_rpc::CallError::PeerLost). When a caller disconnects,
//!   its calls are cancelled at their callees. A signal to an unknown name is dropped; an
//!   acknowledged one (`PeerOptions::acknowledged_signals`) is acknowledged as failed.
//!   Acknowledgements of signals travel back to their senders, so
//!   `Sent::acknowledged` means that the handler at the named peer finished.
//! - **Publish/subscribe**: [`Bus::publish`] a value on a `/`-separated topic,
//!   [`Bus::subscribe`] with an MQTT-style pattern (`+`, `#`) and receive `(topic, value)`
//!   in publish order; a slow subscriber drops, ends or holds publishers back, as its
//!   [`SlowSubscriber`] policy says. [`Bus::publish_acked`] reports who got it,
//!   [`Bus::presence`] who comes and goes, and a signal through `bus.peer("sensor-*")`
//!   reaches every matching peer.
//! - **Access control**: [`BrokerOptions::access_control`] restricts, per identity (a TLS
//!   client certificate's CN, or a [`BusOptions::credential`]), which names a peer may
//!   register, which peers it may call and which topics it may publish and subscribe to
//!   ([`AccessControl`], [`Rules`]).
//! - **Memory**: a message's flow-control credit goes back to its sender only once the
//!   broker has handed it to the destination's connection, so per connection the broker
//!   holds at most: the connection's `receive_window` of its input (wherever it waits:
//!   [`BrokerStats::held_bytes`]), plus chatter-core's own buffers (read buffer ≤
//!   2 × (`max_frame_size` + 4) + 64 KiB, output ≤ `send_buffer` + one message), plus a
//!   route of about 300 bytes for each conversation it opened (at most `max_conversations`
//!   of them, chatter-core's limit on what a peer may open). The options are the
//!   [`BrokerOptions::connection`] ones. Every task is per connection (a reader and a
//!   writer), none per message.
//! - **In-process clients**: [`Broker::connect_local`] gives a [`Bus`] in the broker's own
//!   process over an in-memory pipe instead of a socket (and [`Broker::in_process`] a
//!   broker with no listener at all). The pipe goes through the broker's accept path, so
//!   such a client is indistinguishable from a socket client: same handshake, limits
//!   (`max_connections` counts it), routing, flow control and disconnects, and the
//!   broker's close ends it. Each adds at most 2 × [`BusOptions::local_buffer`] (default
//!   [`LOCAL_BUFFER`], 64 KiB) to the memory above. A routed round trip between two
//!   in-process clients is measured 2.2-3.8 times faster than over a Unix socket
//!   (`examples/local_bench.rs`).
//! - **Reconnecting buses**: with [`BusOptions::reconnect`], a bus reconnects after its
//!   connection drops (a broker restart, a network cut) and claims its name again on each
//!   new connection *before* it sends anything else there (chatter-rpc's
//!   `ReconnectOptions::on_connect` hook, after presenting its credential again): no
//!   queued signal or waiting call reaches a restarted broker from a nameless peer. A
//!   refused name (still held by the old, not yet noticed dead connection) counts as a
//!   failed attempt and is retried per the backoff, or the holder is evicted with
//!   [`BusOptions::take_over`]. Subscriptions subscribe again by themselves on the new
//!   connection ([`Subscription::recv`]): what was published in between is lost, and
//!   [`Subscription::resubscribed`] counts the gaps.
//!
//! ```
//! use std::time::Duration;
//! use chatter_broker::{Broker, BrokerOptions, BusOptions};
//! use chatter_rpc::ReconnectOptions;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = Broker::listen("tcp://127.0.0.1:0", BrokerOptions::default()).await?;
//! let address = broker.addresses()[0].clone();
//! // In the broker's process, without a socket:
//! let local = broker.connect_local("local-1").await?;
//! // Elsewhere, staying connected (and named) across broker restarts:
//! let remote = chatter_broker::connect_with(
//!     &address,
//!     "remote-1",
//!     BusOptions::new().reconnect(ReconnectOptions::default()),
//! )
//! .await?;
//! assert!(remote.wait_connected(Duration::from_secs(5)).await);
//! assert_eq!(broker.names(), ["local-1", "remote-1"]);
//! # drop(local); Ok(()) }
//! ```

#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
#![forbid(unsafe_code)]

mod access;
mod broker;
mod bus;
mod envelope;
mod introspect;
mod local;
mod pubsub;
mod reconnect;
mod relay;
mod subscription;

pub use access::{AccessControl, Rules};
pub use broker::{Broker, BrokerOptions, BrokerStats};

/// Entry points for the fuzz targets (`fuzz/fuzz_targets/broker_envelope.rs`): not part of
/// the API.
#[doc(hidden)]
pub mod __fuzz {
    /// Reads an opening message's envelope as the broker does, and when it routes,
    /// everything the relay then takes from the payload: the method, a plain call's
    /// arguments, the head rewritten for the callee (or for a broadcast), and the
    /// arguments of the broker's own `publish`, `subscribe` and `authenticate` with the
    /// topic and pattern checks and access rules they go through. Must never panic.
    pub fn route_envelope(payload: &[u8]) {
        if let Ok(crate::envelope::Envelope::Request(request)) = crate::envelope::parse(payload) {
            let _ = request.is_call();
            let _ = request.method(payload);
            let _ = request.args(payload);
            let _ = request.rewritten_head(payload, Some(7));
            let _ = request.rewritten_head(payload, None);
            let _ = request.plain_head(payload);
            let _ = payload.get(request.tail()..);
            if let Some((_, args)) = request.window_and_args(payload) {
                if let Ok((topic, (a, b))) = crate::envelope::publish_args(args) {
                    let _ = args.get(a..b);
                    let _ = crate::pubsub::check_topic(topic, 1024);
                    let _ = crate::pubsub::matches("a/+/#", topic);
                }
                if let Ok((pattern, _)) = crate::envelope::subscribe_args(args) {
                    if crate::pubsub::check_pattern(&pattern, 1024).is_ok() {
                        let _ = crate::access::covers("a/+/#", &pattern);
                        let _ = crate::access::covers(&pattern, "a/+/#");
                    }
                }
                let _ = chatter_core::codec::decode::<(String,)>(args);
            }
        }
    }

    /// Reads access control rules as the binary's `--access` file (operator input, but a
    /// parser all the same). Must never panic.
    pub fn access_rules(text: &[u8]) {
        if let Ok(text) = std::str::from_utf8(text) {
            let _ = crate::AccessControl::parse(text);
        }
    }

    /// Reads a certificate's common name as the access control does. Must never panic.
    pub fn common_name(der: &[u8]) {
        let _ = crate::access::common_name(der);
    }
}
pub use bus::{connect, connect_unnamed, connect_with, Bus, BusError, BusOptions};
pub use envelope::ROUTE_SEPARATOR;
pub use introspect::{BrokerApi, BrokerApiClient, BrokerApiServer, PeerInfo, SubscriptionInfo};
pub use local::LOCAL_BUFFER;
pub use subscription::{
    Presence, PublishError, PublishReport, SlowSubscriber, SubscribeError, SubscribeOptions,
    Subscription,
};

/// The name of the broker's own object ([`BrokerApi`]): it registers names, takes
/// credentials, publications and subscriptions, and tells the broker's counters and
/// peers.
pub const BROKER_OBJECT: &str = "chatter.broker";

/// Why the broker refused a name ([`BusError::Refused`]).
///
/// ```
/// use chatter_broker::{Broker, BusError, RegisterError};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let broker = Broker::listen("tcp://127.0.0.1:0", Default::default()).await?;
/// # let address = &broker.addresses()[0];
/// let _first = chatter_broker::connect(address, "pump-1").await?;
/// match chatter_broker::connect(address, "pump-1").await {
///     Err(BusError::Refused(RegisterError::NameTaken { name })) => assert_eq!(name, "pump-1"),
///     other => panic!("{other:?}"),
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// Another connected peer holds the name (connect with [`BusOptions::take_over`] to
    /// evict it).
    #[error("the name `{name}` is held by another connected peer")]
    NameTaken {
        /// The name asked for.
        name: String,
    },
    /// The name is not allowed.
    #[error("`{name}` is not a valid peer name: {reason}")]
    InvalidName {
        /// The name asked for.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// This connection registered another name already.
    #[error("this connection is registered as `{name}` already")]
    AlreadyRegistered {
        /// The name it holds.
        name: String,
    },
}
