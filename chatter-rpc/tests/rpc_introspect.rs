//! Introspection: the descriptions `#[remote]` records (every method shape and option),
//! the built-in `chatter.introspect` object, hand-written services without a description,
//! and the option that turns it off.

mod common;

use chatter_rpc::__private::{Dispatch, Handlers};
use chatter_rpc::introspect::shape::{Content, Shape};
use chatter_rpc::introspect::{
    describe, IntrospectClient, IntrospectError, MethodKind, ObjectSummary, OBJECT,
};
use chatter_rpc::{remote, CallError, Peer, PeerOptions, Service};
use common::{connections, within};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct NotFound;

pub type Res<T> = Result<T, NotFound>;

/// Every shape a method can take.
///
/// Second paragraph.
#[remote]
pub trait Shapes {
    /// A call with an application error.
    async fn get(&self, key: u32, fallback: Option<Vec<u8>>) -> Result<String, NotFound>;
    #[idempotent]
    async fn put(&self, key: u32, value: std::collections::HashMap<String, (i64, bool)>);
    #[result]
    async fn alias(&self) -> Res<u8>;
    #[plain]
    async fn plain(&self) -> Result<u8, String>;
    async fn r#type(&self) -> [u8; 4];
    #[signal]
    async fn note(&self, text: String);
    #[signal(ttl = "2m", persistent)]
    async fn audit(&self, text: String);
}

struct S;

impl Shapes for S {
    async fn get(&self, _key: u32, _fallback: Option<Vec<u8>>) -> Result<String, NotFound> {
        Err(NotFound)
    }
    async fn put(&self, mut key: u32, _value: std::collections::HashMap<String, (i64, bool)>) {
        key += 1;
        let _ = key;
    }
    async fn alias(&self) -> Res<u8> {
        Ok(1)
    }
    async fn plain(&self) -> Result<u8, String> {
        Ok(1)
    }
    async fn r#type(&self) -> [u8; 4] {
        [0; 4]
    }
    async fn note(&self, _text: String) {}
    async fn audit(&self, _text: String) {}
}

/// A service written by hand: no description.
struct Raw;

impl Service for Raw {
    fn __dispatch(&self, _method: &[u8], _args: &[u8], _handlers: &mut Handlers) -> Dispatch {
        Dispatch::NoSuchMethod
    }
}

#[test]
fn remote_records_every_method_shape() {
    let d = ShapesServer::new(S).description().expect("described");
    assert_eq!(d.name, "Shapes");
    assert_eq!(
        d.docs,
        "Every shape a method can take.\n\nSecond paragraph."
    );
    let m = |name: &str| {
        d.methods
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    };
    let names: Vec<&str> = d.methods.iter().map(|m| &*m.name).collect();
    assert_eq!(
        names,
        ["get", "put", "alias", "plain", "type", "note", "audit"]
    );

    let get = m("get");
    assert_eq!(get.kind, MethodKind::Call);
    assert_eq!(get.docs, "A call with an application error.");
    let args: Vec<(&str, &str)> = get.args.iter().map(|a| (&*a.name, &*a.ty)).collect();
    assert_eq!(args, [("key", "u32"), ("fallback", "Option<Vec<u8>>")]);
    assert_eq!(
        (&*get.returns, get.error.as_deref()),
        ("String", Some("NotFound"))
    );
    assert!(!get.idempotent);

    let put = m("put");
    assert!(put.idempotent);
    assert_eq!(put.args[0].name, "key");
    assert_eq!(
        put.args[1].ty,
        "std::collections::HashMap<String, (i64, bool)>"
    );
    assert_eq!((&*put.returns, put.error.as_deref()), ("()", None));

    let alias = m("alias");
    assert_eq!(alias.returns, "<Res<u8> as Result>::Ok");
    assert_eq!(alias.error.as_deref(), Some("<Res<u8> as Result>::Err"));
    let plain = m("plain");
    assert_eq!(
        (&*plain.returns, plain.error.as_deref()),
        ("Result<u8, String>", None)
    );
    assert_eq!(m("type").returns, "[u8; 4]");

    let note = m("note");
    assert_eq!(note.kind, MethodKind::Signal);
    assert_eq!((note.ttl_ms, note.persistent), (None, false));
    let audit = m("audit");
    assert_eq!((audit.ttl_ms, audit.persistent), (Some(120_000), true));

    assert!(Raw.description().is_none());
    assert!(describe(&Raw).is_none());
    // The static description has no shapes: they are traced when asked.
    assert!(d.shapes.is_empty());
}

#[test]
fn describe_traces_a_shape_for_every_type_named() {
    let d = describe(&ShapesServer::new(S)).expect("described");
    let keys: Vec<&str> = d.shapes.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "()",
            "<Res<u8> as Result>::Err",
            "<Res<u8> as Result>::Ok",
            "NotFound",
            "Option<Vec<u8>>",
            "Result<u8, String>",
            "String",
            "[u8; 4]",
            "std::collections::HashMap<String, (i64, bool)>",
            "u32",
        ]
    );
    let not_found = Shape::Struct {
        name: "NotFound".into(),
        content: Content::Unit,
    };
    assert_eq!(d.shape("NotFound"), Some(&not_found));
    assert_eq!(d.shape("<Res<u8> as Result>::Err"), Some(&not_found));
    assert_eq!(d.shape("<Res<u8> as Result>::Ok"), Some(&Shape::U8));
    assert_eq!(
        d.shape("[u8; 4]"),
        Some(&Shape::Tuple {
            items: vec![Shape::U8; 4]
        })
    );
    let Some(Shape::Map { key, value }) = d.shape("std::collections::HashMap<String, (i64, bool)>")
    else {
        panic!("a map: {:?}", d.shapes);
    };
    assert_eq!(
        (&**key, &**value),
        (
            &Shape::Str,
            &Shape::Tuple {
                items: vec![Shape::I64, Shape::Bool]
            }
        )
    );
    // `#[plain]`: the `Result` is a value, an enum of two variants.
    let Some(Shape::Enum { name, variants }) = d.shape("Result<u8, String>") else {
        panic!("an enum: {:?}", d.shapes);
    };
    assert_eq!(name, "Result");
    assert_eq!(
        variants.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["Ok", "Err"]
    );
    // Deterministic.
    assert_eq!(describe(&ShapesServer::new(S)), Some(d));
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Figure {
    Circle { r: f64 },
    Square(f64),
}

/// Streams name their item types.
#[remote]
pub trait Streamed {
    async fn figures(&self, every: u64) -> chatter_rpc::stream::Receiver<Figure>;
    async fn total(&self, items: chatter_rpc::stream::Receiver<u16>) -> Result<u64, NotFound>;
}

struct Figures;

impl Streamed for Figures {
    async fn figures(&self, _every: u64) -> chatter_rpc::stream::Receiver<Figure> {
        chatter_rpc::stream::channel(1).1
    }
    async fn total(&self, _items: chatter_rpc::stream::Receiver<u16>) -> Result<u64, NotFound> {
        Ok(0)
    }
}

#[test]
fn stream_item_types_have_shapes_and_receivers_none() {
    let d = describe(&StreamedServer::new(Figures)).expect("described");
    let keys: Vec<&str> = d.shapes.keys().map(String::as_str).collect();
    assert_eq!(keys, ["Figure", "NotFound", "u16", "u64"]);
    let Some(Shape::Enum { variants, .. }) = d.shape("Figure") else {
        panic!("an enum: {:?}", d.shapes);
    };
    assert_eq!(variants.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_builtin_object_lists_and_describes_what_the_peer_serves() {
    let (client_conn, server_conn) = connections(Default::default()).await;
    let server = Peer::new(server_conn);
    server.register("shapes", ShapesServer::new(S));
    server.register("raw", Raw);
    let client = Peer::with_options(client_conn, PeerOptions::default().introspection(false));
    let introspect = IntrospectClient::new(&client, OBJECT);

    let list = within(introspect.list()).await.expect("list");
    let names: Vec<&str> = list.iter().map(|o| o.object.as_str()).collect();
    assert_eq!(names, [OBJECT, "raw", "shapes"]);
    let raw: &ObjectSummary = &list[1];
    assert_eq!((raw.interface.as_deref(), raw.methods.len()), (None, 0));
    assert_eq!(list[2].interface.as_deref(), Some("Shapes"));
    assert_eq!(list[2].methods.len(), 7);

    let shapes = within(introspect.describe("shapes".into()))
        .await
        .expect("describe");
    assert_eq!(shapes, describe(&ShapesServer::new(S)).expect("described"));
    assert_eq!(shapes.shape("u32"), Some(&Shape::U32));
    // The introspection object describes itself.
    let own = within(introspect.describe(OBJECT.into()))
        .await
        .expect("describe");
    assert_eq!(own.name, "Introspect");

    match within(introspect.describe("nothing".into())).await {
        Err(CallError::App {
            error: IntrospectError::NoSuchObject { object, known },
            remote,
        }) => {
            assert_eq!(object, "nothing");
            assert_eq!(known, [OBJECT, "raw", "shapes"]);
            assert!(remote.message.contains("raw, shapes"), "{remote}");
        }
        other => panic!("{other:?}"),
    }
    match within(introspect.describe("raw".into())).await {
        Err(CallError::App {
            error: IntrospectError::NotDescribed { object },
            ..
        }) => assert_eq!(object, "raw"),
        other => panic!("{other:?}"),
    }

    within(introspect.ping()).await.expect("ping");
    let stats = within(introspect.stats()).await.expect("stats");
    let calls = stats
        .iter()
        .find(|c| c.name == "calls_received")
        .expect("calls_received");
    // list, four describes, ping, and this call.
    assert_eq!(calls.value, 7);

    // The client turned it off for itself: nothing to introspect there.
    assert_eq!(client.objects(), Vec::<String>::new());
    let back = IntrospectClient::new(&server, OBJECT);
    assert!(matches!(
        within(back.list()).await,
        Err(CallError::NoSuchObject { .. })
    ));

    // It is no registry entry: unregistering finds nothing and does not turn it off
    // (the option does).
    assert!(!server.unregister(OBJECT));
    within(introspect.ping()).await.expect("still there");

    // An object the application registers under its name wins while registered.
    assert!(!server.register(OBJECT, ShapesServer::new(S)));
    assert_eq!(server.objects().iter().filter(|o| *o == OBJECT).count(), 1);
    assert!(matches!(
        within(introspect.ping()).await,
        Err(CallError::NoSuchMethod { .. })
    ));
    assert!(server.unregister(OBJECT));
    within(introspect.ping())
        .await
        .expect("the built-in one again");
}

/// Methods with streams.
#[remote]
pub trait Streams {
    async fn ticks(&self, every_ms: u64) -> chatter_rpc::stream::Receiver<u64>;
    async fn feed(&self, from: u32) -> Result<chatter_rpc::stream::Receiver<String>, NotFound>;
    async fn upload(&self, name: String, chunks: chatter_rpc::stream::Receiver<Vec<u8>>) -> u64;
    async fn echo(
        &self,
        lines: chatter_rpc::stream::Receiver<String>,
    ) -> chatter_rpc::stream::Receiver<String>;
}

struct St;

impl Streams for St {
    async fn ticks(&self, _every_ms: u64) -> chatter_rpc::stream::Receiver<u64> {
        chatter_rpc::stream::channel(1).1
    }
    async fn feed(&self, _from: u32) -> Result<chatter_rpc::stream::Receiver<String>, NotFound> {
        Err(NotFound)
    }
    async fn upload(&self, _name: String, _chunks: chatter_rpc::stream::Receiver<Vec<u8>>) -> u64 {
        0
    }
    async fn echo(
        &self,
        lines: chatter_rpc::stream::Receiver<String>,
    ) -> chatter_rpc::stream::Receiver<String> {
        lines
    }
}

#[test]
fn stream_methods_are_described_with_their_item_types() {
    let d = StreamsServer::new(St).description().expect("described");
    let m = |name: &str| d.methods.iter().find(|m| m.name == name).expect(name);
    let ticks = m("ticks");
    assert_eq!(ticks.kind, MethodKind::Stream);
    assert_eq!(ticks.result_stream.as_deref(), Some("u64"));
    assert_eq!(ticks.argument_stream(), None);
    let feed = m("feed");
    assert_eq!(feed.kind, MethodKind::Stream);
    assert_eq!(
        (feed.result_stream.as_deref(), feed.error.as_deref()),
        (Some("String"), Some("NotFound"))
    );
    let upload = m("upload");
    assert_eq!(upload.kind, MethodKind::Stream);
    assert_eq!(upload.result_stream, None);
    assert_eq!(upload.argument_stream(), Some("Vec<u8>"));
    assert_eq!(upload.args[0].stream, None);
    assert_eq!(&*upload.returns, "u64");
    let echo = m("echo");
    assert_eq!(
        (echo.result_stream.as_deref(), echo.argument_stream()),
        (Some("String"), Some("String"))
    );
}
