//! Introspection: what a peer serves, asked over the wire.
//!
//! `#[remote]` records a static [`InterfaceDescription`] of each trait (its name, doc
//! comments and methods: calls and signals, argument names and types, return and error
//! types), which the generated `{Trait}Server` gives through
//! [`Service::description`], and [`describe`] completes
//! with the [`Shape`] of each type, traced when asked. Every [`Peer`](crate::Peer)
//! serves the built-in object [`OBJECT`] (`chatter.introspect`, an [`Introspect`], made on
//! first use: no cost to a peer until then) unless
//! [`PeerOptions::introspection`](crate::PeerOptions::introspection) turns it off (an
//! object the application registers under that name takes its place): it lists
//! the objects the peer serves, describes each, answers pings and reports the peer's
//! counters. The `chatter` command-line tool (`chatter-cli`) is its main user; its wire
//! form is in `PROTOCOL.md` ("Introspection").
//!
//! ```
//! use chatter_rpc::introspect::{IntrospectClient, MethodKind, OBJECT};
//! use chatter_rpc::{remote, serve, listen, connect, Options, Peer, PeerOptions};
//!
//! #[remote]
//! pub trait Greeter {
//!     /// Says hello.
//!     async fn hello(&self, name: String) -> String;
//! }
//! struct G;
//! impl Greeter for G {
//!     async fn hello(&self, name: String) -> String { format!("hello {name}") }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = serve(listen("tcp://127.0.0.1:0", Options::default()).await?,
//!     PeerOptions::default(), |peer: &Peer| { peer.register("greeter", GreeterServer::new(G)); });
//! let peer = Peer::new(connect(&server.addresses()[0], Options::default()).await?);
//! let introspect = IntrospectClient::new(&peer, OBJECT);
//! let objects = introspect.list().await?;
//! assert_eq!(objects.iter().map(|o| o.object.as_str()).collect::<Vec<_>>(),
//!            ["chatter.introspect", "greeter"]);
//! let greeter = introspect.describe("greeter".into()).await?;
//! assert_eq!(greeter.name, "Greeter");
//! let hello = &greeter.methods[0];
//! assert_eq!((&*hello.name, hello.kind, &*hello.returns), ("hello", MethodKind::Call, "String"));
//! assert_eq!((&*hello.args[0].name, &*hello.args[0].ty), ("name", "String"));
//! assert_eq!(hello.docs, "Says hello.");
//! # Ok(()) }
//! ```
//!
//! # How types are described
//!
//! Each type is named **as written in the trait** (`Vec<Point>`, `Option<u64>`), and the
//! description's [`shapes`](InterfaceDescription::shapes) give each name its **shape,
//! derived from serde** ([`shape`]): primitives with their width, options, sequences,
//! tuples, maps, structs with their fields and enums with every variant and its content,
//! as they travel (field and variant names after `rename_all`), recursive types by
//! reference. Why serde and not a schema of our own: `#[remote]` sees only the tokens of the
//! trait (the fields of `Point` live in another item, possibly in another crate), so a
//! schema would need a derive of ours or a dependency such as schemars on every type users
//! send, a new requirement, and one that can disagree with what serde writes. Tracing the
//! `Deserialize` every argument type already has needs nothing more and describes the
//! wire exactly. Its limit: types whose `Deserialize` validates or decides by what arrives
//! (untagged enums, `flatten`) cannot be traced and are described by name alone
//! ([`Shape::Opaque`]). Shapes are traced when the introspection
//! object is first asked for a description of a trait, not before, and then kept for the
//! process (one copy per trait, in a `static` of the generated server): a peer pays
//! nothing for them.
//!
//! ```
//! use chatter_rpc::introspect::{describe, shape::{Content, Shape}};
//! use chatter_rpc::remote;
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! pub enum Figure { Circle { r: f64 }, Square(f64), Empty }
//!
//! #[remote]
//! pub trait Geometry {
//!     async fn area(&self, figure: Figure) -> f64;
//! }
//! struct G;
//! impl Geometry for G {
//!     async fn area(&self, figure: Figure) -> f64 { 0.0 }
//! }
//!
//! let description = describe(&GeometryServer::new(G)).expect("described");
//! let Some(Shape::Enum { name, variants, .. }) = description.shape("Figure") else {
//!     panic!("an enum");
//! };
//! assert_eq!(name, "Figure");
//! let names: Vec<_> = variants.iter().map(|v| v.name.as_str()).collect();
//! assert_eq!(names, ["Circle", "Square", "Empty"]);
//! assert_eq!(variants[2].content, Content::Unit);
//! assert_eq!(description.shape("f64"), Some(&Shape::F64));
//! ```

pub mod shape;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, Weak};

use serde::{Deserialize, Serialize};

use crate::peer::PeerState;
use crate::{remote, Service};
use shape::Shape;

/// The name under which every peer serves its [`Introspect`] object (unless
/// [`PeerOptions::introspection`](crate::PeerOptions::introspection) is off).
pub const OBJECT: &str = "chatter.introspect";

/// What `#[remote]` records about a trait: its name, docs and methods.
///
/// Static in generated code (borrowed strings), owned once received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InterfaceDescription {
    /// The trait's name, for example `Calculator`.
    pub name: Cow<'static, str>,
    /// The trait's doc comment (empty without one).
    #[serde(default)]
    pub docs: Cow<'static, str>,
    /// The methods, in declaration order.
    pub methods: Cow<'static, [MethodDescription]>,
    /// The [`Shape`] of each type the methods name, keyed by the type as written: each
    /// argument's `ty` (an argument stream's item type instead), each method's `returns`
    /// (but not a `Receiver<T>`: its `result_stream` instead), `error` and
    /// `result_stream`. Empty in the static description `#[remote]` records ([`describe`]
    /// and the introspection object trace them when asked); left out of the wire form when
    /// empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub shapes: BTreeMap<String, Shape>,
}

impl InterfaceDescription {
    /// The shape of the type written `ty` (as in [`ArgDescription::ty`]), if
    /// [`shapes`](Self::shapes) has it.
    pub fn shape(&self, ty: &str) -> Option<&Shape> {
        self.shapes.get(ty)
    }
}

/// The description of `service` with the [`shapes`](InterfaceDescription::shapes) of its
/// types traced (what the introspection object answers); `None` for a service without a
/// description.
///
/// The shapes are traced on the first call for a trait (running each type's `Deserialize`
/// a few times over sample values, within bounds) and kept for the process's lifetime in a
/// `static` of the generated server: per trait, not per peer, and nothing until asked.
pub fn describe(service: &dyn Service) -> Option<InterfaceDescription> {
    let mut description = service.description()?.clone();
    if let Some(shapes) = service.__shapes() {
        description.shapes = shapes.0.clone();
    }
    Some(description)
}

/// One method of an [`InterfaceDescription`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct MethodDescription {
    /// The name on the wire (a raw identifier without `r#`).
    pub name: Cow<'static, str>,
    /// Call, signal, or stream (a call with a result or argument stream).
    pub kind: MethodKind,
    /// The doc comment (empty without one).
    #[serde(default)]
    pub docs: Cow<'static, str>,
    /// The arguments after `&self`, in order.
    pub args: Cow<'static, [ArgDescription]>,
    /// The type of the value a call returns (`T` of `-> T` or `-> Result<T, E>`), `()` for
    /// none and for signals.
    pub returns: Cow<'static, str>,
    /// The application error type (`E` of `-> Result<T, E>`), if the method has one.
    #[serde(default)]
    pub error: Option<Cow<'static, str>>,
    /// `#[idempotent]`: a reconnecting caller may send the call again.
    #[serde(default)]
    pub idempotent: bool,
    /// A signal's `#[signal(ttl = "..")]` in milliseconds; `None` when the sender's
    /// default applies (and for calls).
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    /// `#[signal(persistent)]`.
    #[serde(default)]
    pub persistent: bool,
    /// The item type `T` of a method returning a stream (`-> Receiver<T>` or
    /// `-> Result<Receiver<T>, E>`, whose `returns` is then the `Receiver<T>` as written);
    /// `None` otherwise. Left out of the wire form when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_stream: Option<Cow<'static, str>>,
}

impl MethodDescription {
    /// The argument stream's item type, if one of the arguments is a stream (see
    /// [`ArgDescription::stream`]).
    pub fn argument_stream(&self) -> Option<&str> {
        self.args.iter().find_map(|a| a.stream.as_deref())
    }
}

/// Whether a method is a call, a signal or a stream call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum MethodKind {
    /// Answered with a reply (`call` on the wire).
    Call,
    /// One-way, with a TTL (`signal`).
    Signal,
    /// A call with a stream: it returns a stream
    /// ([`result_stream`](MethodDescription::result_stream)), takes one
    /// ([`ArgDescription::stream`]), or both (`stream`; a stream call on the wire).
    Stream,
    /// A kind this version does not know (a newer peer's).
    #[serde(other)]
    Unknown,
}

/// One argument of a [`MethodDescription`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ArgDescription {
    /// The argument's name as written (a pattern other than a name, as written).
    pub name: Cow<'static, str>,
    /// Its Rust type as written in the trait, for example `Vec<u8>`.
    #[serde(rename = "type")]
    pub ty: Cow<'static, str>,
    /// The item type `T` when the argument is a stream (`Receiver<T>`), which travels
    /// beside the call and not in its arguments array; `None` otherwise. Left out of the
    /// wire form when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<Cow<'static, str>>,
}

/// One entry of [`Introspect::list`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ObjectSummary {
    /// The name the object is registered under.
    pub object: String,
    /// Its trait's name; `None` for a [`Service`] without a description.
    #[serde(default)]
    pub interface: Option<String>,
    /// Its methods' names, in declaration order (empty without a description).
    #[serde(default)]
    pub methods: Vec<String>,
    /// The names of those `methods` that are [`MethodKind::Stream`] (called with a stream
    /// call), in the same order. Left out of the wire form when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub streams: Vec<String>,
}

/// One counter of [`Introspect::stats`]: a field of [`PeerStats`](crate::PeerStats).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PeerCounter {
    /// The field's name, for example `calls_received`.
    pub name: String,
    /// Its value.
    pub value: u64,
}

/// Why [`Introspect::describe`] has no description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum IntrospectError {
    /// Nothing is registered under this name.
    #[error("no object `{object}` (this peer serves: {})", known.join(", "))]
    NoSuchObject {
        /// The name asked for.
        object: String,
        /// The names this peer serves, sorted.
        known: Vec<String>,
    },
    /// The object is a hand-written [`Service`] without a description.
    #[error("object `{object}` has no description (not made by #[remote])")]
    NotDescribed {
        /// The name asked for.
        object: String,
    },
}

/// What a peer serves and how it is doing: the built-in object every peer serves as
/// `chatter.introspect`, unless `PeerOptions::introspection(false)`.
///
/// Call it through [`IntrospectClient`], with the name [`OBJECT`].
#[remote(crate = "crate")]
pub trait Introspect {
    /// The objects this peer serves, sorted by name, with their interface and method
    /// names.
    async fn list(&self) -> Vec<ObjectSummary>;
    /// The description of the object registered as `object`.
    async fn describe(&self, object: String) -> Result<InterfaceDescription, IntrospectError>;
    /// The counters of the peer that serves this connection (for a server made with
    /// `serve`, each connection has its own peer).
    async fn stats(&self) -> Vec<PeerCounter>;
    /// Answers at once: a round trip through the serving path.
    async fn ping(&self);
}

/// The built-in [`Introspect`] object of `peer`, if `object` names it and the peer's
/// options serve it: made on demand, when a lookup of `object` missed the peer's registry
/// (so an object the application registered under [`OBJECT`] wins). It holds only a
/// `Weak` to the peer: a peer costs nothing for it until it is called.
pub(crate) fn builtin(peer: &Arc<PeerState>, object: &str) -> Option<Arc<dyn Service>> {
    if peer.options.introspection && object == OBJECT {
        Some(Arc::new(IntrospectServer::new(Builtin {
            peer: Arc::downgrade(peer),
        })))
    } else {
        None
    }
}

/// Whether `peer` serves the built-in object: on, and no object of the application
/// registered under its name.
pub(crate) fn serves_builtin(
    peer: &PeerState,
    objects: &crate::first_inline::FirstInline<String, Arc<dyn Service>>,
) -> bool {
    peer.options.introspection && !objects.contains_key(OBJECT)
}

/// The built-in object, standing for itself in its own list (a `Weak` that points
/// nowhere does not allocate).
fn builtin_service() -> Arc<dyn Service> {
    Arc::new(IntrospectServer::new(Builtin { peer: Weak::new() }))
}

/// The [`Introspect`] of one peer (weak: the peer's serving tasks hold it while it
/// answers).
struct Builtin {
    peer: Weak<PeerState>,
}

impl Builtin {
    /// The registered objects, sorted by name.
    fn objects(&self) -> Vec<(String, Arc<dyn Service>)> {
        let Some(peer) = self.peer.upgrade() else {
            return Vec::new();
        };
        let objects = peer.objects.read().unwrap_or_else(PoisonError::into_inner);
        let mut list: Vec<_> = objects
            .iter()
            .map(|(name, service)| (name.clone(), service.clone()))
            .collect();
        if serves_builtin(&peer, &objects) {
            list.push((OBJECT.to_owned(), builtin_service()));
        }
        list.sort_by(|a, b| a.0.cmp(&b.0));
        list
    }
}

impl Introspect for Builtin {
    async fn list(&self) -> Vec<ObjectSummary> {
        self.objects()
            .into_iter()
            .map(|(object, service)| (object, service.description()))
            .map(|(object, description)| ObjectSummary {
                object,
                interface: description.map(|d| d.name.to_string()),
                methods: description
                    .map(|d| d.methods.iter().map(|m| m.name.to_string()).collect())
                    .unwrap_or_default(),
                streams: description
                    .map(|d| {
                        d.methods
                            .iter()
                            .filter(|m| m.kind == MethodKind::Stream)
                            .map(|m| m.name.to_string())
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect()
    }

    async fn describe(&self, object: String) -> Result<InterfaceDescription, IntrospectError> {
        let objects = self.objects();
        match objects.iter().find(|(name, _)| *name == object) {
            Some((_, service)) => {
                describe(&**service).ok_or(IntrospectError::NotDescribed { object })
            }
            None => Err(IntrospectError::NoSuchObject {
                object,
                known: objects.into_iter().map(|(name, _)| name).collect(),
            }),
        }
    }

    async fn stats(&self) -> Vec<PeerCounter> {
        let Some(peer) = self.peer.upgrade() else {
            return Vec::new();
        };
        counters(&peer.stats.snapshot())
    }

    async fn ping(&self) {}
}

/// The fields of `stats` as named counters, in [`PeerStats`](crate::PeerStats)' order
/// (without the gauge `requests_waiting`, which belongs to a connection).
fn counters(stats: &crate::PeerStats) -> Vec<PeerCounter> {
    let fields = [
        ("connects", stats.connects),
        ("signals_queued", stats.signals_queued),
        ("signals_sent", stats.signals_sent),
        ("signals_resent", stats.signals_resent),
        ("signals_acknowledged", stats.signals_acknowledged),
        ("signals_expired", stats.signals_expired),
        ("signals_dropped", stats.signals_dropped),
        ("signals_rejected", stats.signals_rejected),
        ("signals_failed_remotely", stats.signals_failed_remotely),
        ("signals_delivered", stats.signals_delivered),
        (
            "signals_expired_on_arrival",
            stats.signals_expired_on_arrival,
        ),
        ("signals_failed", stats.signals_failed),
        ("calls_received", stats.calls_received),
        ("handler_panics", stats.handler_panics),
    ];
    fields
        .into_iter()
        .map(|(name, value)| PeerCounter {
            name: name.to_owned(),
            value,
        })
        .collect()
}

/// Builders of the static descriptions `#[remote]` generates (`const`, so that they can
/// make a `static`; the types are `#[non_exhaustive]`). Generated code only.
pub(crate) mod build {
    use std::borrow::Cow;
    use std::collections::BTreeMap;

    use super::{ArgDescription, InterfaceDescription, MethodDescription, MethodKind};

    /// A trait's description.
    pub const fn describe_interface(
        name: &'static str,
        docs: &'static str,
        methods: &'static [MethodDescription],
    ) -> InterfaceDescription {
        InterfaceDescription {
            name: Cow::Borrowed(name),
            docs: Cow::Borrowed(docs),
            methods: Cow::Borrowed(methods),
            shapes: BTreeMap::new(),
        }
    }

    /// A call's description.
    pub const fn describe_call(
        name: &'static str,
        docs: &'static str,
        args: &'static [ArgDescription],
        returns: &'static str,
        error: Option<&'static str>,
        idempotent: bool,
    ) -> MethodDescription {
        let call = (name, docs, args, returns, error, idempotent);
        described(MethodKind::Call, call, None)
    }

    /// A stream call's description: a method returning a stream of `result_stream`
    /// items, taking an argument stream (an argument made by [`describe_stream_arg`]), or
    /// both.
    pub const fn describe_stream(
        name: &'static str,
        docs: &'static str,
        args: &'static [ArgDescription],
        returns: &'static str,
        error: Option<&'static str>,
        idempotent: bool,
        result_stream: Option<&'static str>,
    ) -> MethodDescription {
        let call = (name, docs, args, returns, error, idempotent);
        described(MethodKind::Stream, call, result_stream)
    }

    /// A signal's description.
    pub const fn describe_signal(
        name: &'static str,
        docs: &'static str,
        args: &'static [ArgDescription],
        ttl_ms: Option<u64>,
        persistent: bool,
    ) -> MethodDescription {
        MethodDescription {
            name: Cow::Borrowed(name),
            kind: MethodKind::Signal,
            docs: Cow::Borrowed(docs),
            args: Cow::Borrowed(args),
            returns: Cow::Borrowed("()"),
            error: None,
            idempotent: false,
            ttl_ms,
            persistent,
            result_stream: None,
        }
    }

    /// An argument's description.
    pub const fn describe_arg(name: &'static str, ty: &'static str) -> ArgDescription {
        ArgDescription {
            name: Cow::Borrowed(name),
            ty: Cow::Borrowed(ty),
            stream: None,
        }
    }

    /// An argument stream's description: `ty` as written (`Receiver<T>`), `item` its `T`.
    pub const fn describe_stream_arg(
        name: &'static str,
        ty: &'static str,
        item: &'static str,
    ) -> ArgDescription {
        ArgDescription {
            name: Cow::Borrowed(name),
            ty: Cow::Borrowed(ty),
            stream: Some(Cow::Borrowed(item)),
        }
    }

    /// A call's or stream call's description: `(name, docs, args, returns, error,
    /// idempotent)`, and the result stream's item type.
    #[allow(clippy::type_complexity)]
    const fn described(
        kind: MethodKind,
        (name, docs, args, returns, error, idempotent): (
            &'static str,
            &'static str,
            &'static [ArgDescription],
            &'static str,
            Option<&'static str>,
            bool,
        ),
        result_stream: Option<&'static str>,
    ) -> MethodDescription {
        MethodDescription {
            name: Cow::Borrowed(name),
            kind,
            docs: Cow::Borrowed(docs),
            args: Cow::Borrowed(args),
            returns: Cow::Borrowed(returns),
            error: match error {
                Some(error) => Some(Cow::Borrowed(error)),
                None => None,
            },
            idempotent,
            ttl_ms: None,
            persistent: false,
            result_stream: match result_stream {
                Some(item) => Some(Cow::Borrowed(item)),
                None => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::wire;

    use crate::wire::protocol_doc::doc_block;

    #[test]
    fn the_protocol_examples_are_what_the_code_writes() {
        let request = wire::encode_request(wire::CALL, OBJECT, "list", Duration::from_secs(1), &())
            .expect("encode");
        assert_eq!(&request[..], doc_block("`list()` on `chatter.introspect`"));

        let list = vec![ObjectSummary {
            object: "calc".into(),
            interface: Some("Calc".into()),
            methods: vec!["add".into()],
            streams: Vec::new(),
        }];
        let reply = wire::encode_ok(&list).expect("encode");
        assert_eq!(&reply[..], doc_block("Its reply, one object"));

        // The description the built-in object answers: `describe` of a real server, its
        // `shapes` traced.
        let calc = describe(&CalcServer::new(C)).expect("described");
        let reply = wire::encode_ok(&calc).expect("encode");
        assert_eq!(&reply[..], doc_block("The reply of `describe(\"calc\")`"));
        // And it decodes back, owned.
        let wire::Reply::Ok(value) = wire::decode_reply(&reply).expect("reply") else {
            panic!("not ok");
        };
        let back: InterfaceDescription = wire::decode_value(value).expect("decodes");
        assert_eq!(back, calc);
        assert_eq!(back.shape("i64"), Some(&Shape::I64));

        // The shapes of a struct and of an enum.
        let mut bytes = Vec::new();
        wire::value(&mut bytes, &shape::trace::<Point>().expect("traced")).expect("encode");
        assert_eq!(bytes, doc_block("The shape of `struct Point"));
        let mut bytes = Vec::new();
        wire::value(&mut bytes, &shape::trace::<Op>().expect("traced")).expect("encode");
        assert_eq!(bytes, doc_block("The shape of `enum Op"));
    }

    #[remote(crate = "crate")]
    trait Calc {
        /// Adds.
        async fn add(&self, a: i64, b: i64) -> i64;
    }

    struct C;

    impl Calc for C {
        async fn add(&self, a: i64, b: i64) -> i64 {
            a + b
        }
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Point {
        x: f64,
        y: f64,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    enum Op {
        Neg,
        Scale(f64),
    }

    #[test]
    fn descriptions_skip_unknown_keys_and_default_missing_ones() {
        // A newer peer may add entries; an older one may lack the optional ones.
        #[derive(Serialize)]
        struct Newer {
            name: &'static str,
            kind: &'static str,
            args: [u8; 0],
            returns: &'static str,
            schema: &'static str,
        }
        let bytes = wire::encode_ok(&Newer {
            name: "watch",
            kind: "broadcast",
            args: [],
            returns: "u64",
            schema: "{}",
        })
        .expect("encode");
        let wire::Reply::Ok(value) = wire::decode_reply(&bytes).expect("reply") else {
            panic!("not ok");
        };
        let method: MethodDescription = wire::decode_value(value).expect("decodes");
        assert_eq!(method.kind, MethodKind::Unknown);
        assert_eq!(
            (&*method.docs, method.error, method.ttl_ms),
            ("", None, None)
        );
        assert_eq!(method.result_stream, None);
    }

    #[test]
    fn stream_methods_say_so_and_plain_ones_keep_their_wire_form() {
        static ARGS: [ArgDescription; 2] = [
            build::describe_arg("room", "String"),
            build::describe_stream_arg("lines", "Receiver<String>", "String"),
        ];
        let chat = build::describe_stream(
            "chat",
            "",
            &ARGS,
            "Receiver<Line>",
            Some("ChatError"),
            false,
            Some("Line"),
        );
        assert_eq!(chat.kind, MethodKind::Stream);
        assert_eq!(chat.argument_stream(), Some("String"));
        let bytes = wire::encode_ok(&chat).expect("encode");
        let wire::Reply::Ok(value) = wire::decode_reply(&bytes).expect("reply") else {
            panic!("not ok");
        };
        let back: MethodDescription = wire::decode_value(value).expect("decodes");
        assert_eq!(back, chat);
        // An argument without a stream has no `stream` key (the examples above check the
        // bytes of a method without streams: no `result_stream` either).
        let arg = wire::encode_ok(&ARGS[0]).expect("encode");
        assert_eq!(arg[2], 0x82, "two keys: name and type");
    }

    #[test]
    fn counters_name_every_counter_of_peer_stats() {
        let stats = crate::PeerStats {
            calls_received: 3,
            ..Default::default()
        };
        let counters = counters(&stats);
        assert_eq!(counters.len(), 14);
        assert!(counters.contains(&PeerCounter {
            name: "calls_received".into(),
            value: 3
        }));
    }
}
