//! Spans of calls on both sides (issue 17, item 3), in a test binary of their own: a
//! subscriber set for one test only sees callsites that no other test of the process
//! registered first without it.

use chatter_core::{connect, listen, Options};
use chatter_rpc::{remote, Peer, PeerOptions, TraceParent};

#[remote]
pub trait Probe {
    async fn seen(&self, wait_ms: u64) -> u64;
}

struct Handler;

impl Probe for Handler {
    async fn seen(&self, wait_ms: u64) -> u64 {
        if wait_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
        }
        wait_ms
    }
}

struct Pair {
    client: Peer,
    _server: Peer,
    probe: ProbeClient,
    _listener: chatter_core::Server,
}

async fn pair() -> Pair {
    pair_with(PeerOptions::default()).await
}

async fn pair_with(server_options: PeerOptions) -> Pair {
    let listener = listen("tcp://127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let conn = connect(&listener.addresses()[0], Options::default())
        .await
        .unwrap();
    let server = Peer::with_options(listener.accept().await.unwrap(), server_options);
    server.register("probe", ProbeServer::new(Handler));
    let client = Peer::new(conn);
    let probe = ProbeClient::new(&client, "probe");
    Pair {
        client,
        _server: server,
        probe,
        _listener: listener,
    }
}

/// Each span's name and fields, in creation order (its id is its index + 1).
type Spans = Vec<(String, std::collections::BTreeMap<String, String>)>;

/// A subscriber that keeps every span's name and fields (spans of issue 17, item 3).
#[derive(Default, Clone)]
struct Capture {
    spans: std::sync::Arc<std::sync::Mutex<Spans>>,
}

struct Fields<'a>(&'a mut std::collections::BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut fields = std::collections::BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut spans = self.spans.lock().unwrap();
        spans.push((attrs.metadata().name().to_owned(), fields));
        tracing::span::Id::from_u64(spans.len() as u64)
    }
    fn record(&self, id: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut spans = self.spans.lock().unwrap();
        let (_, fields) = &mut spans[id.into_u64() as usize - 1];
        values.record(&mut Fields(fields));
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(start_paused = true)]
async fn call_spans_on_both_sides_share_the_trace_id() {
    let capture = Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());
    let p = pair().await;
    let root: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        .parse()
        .unwrap();
    p.probe.with_trace_parent(root).seen(0).await.unwrap();
    // A call that fails, and a signal.
    let ghost = ProbeClient::new(&p.client, "ghost");
    assert!(ghost.seen(0).await.is_err());
    let spans = capture.spans.lock().unwrap().clone();
    let find = |name: &str, object: &str| {
        spans
            .iter()
            .find(|(n, f)| n == name && f.get("object").map(String::as_str) == Some(object))
            .unwrap_or_else(|| panic!("no {name} span for {object}: {spans:#?}"))
            .1
            .clone()
    };
    let call = find("call", "probe");
    let handle = find("handle", "probe");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    assert_eq!(call["trace_id"], trace_id);
    assert_eq!(handle["trace_id"], trace_id);
    assert_eq!(call["span_id"], "00f067aa0ba902b7");
    assert_eq!(handle["parent_id"], call["span_id"]);
    assert_ne!(handle["span_id"], call["span_id"]);
    assert_eq!(
        (call["method"].as_str(), handle["method"].as_str()),
        ("seen", "seen")
    );
    assert_eq!(call["conversation"], handle["conversation"]);
    assert_eq!(
        (call["outcome"].as_str(), handle["outcome"].as_str()),
        ("ok", "ok")
    );
    assert!(call.contains_key("duration_us") && handle.contains_key("duration_us"));
    assert_eq!(handle["kind"], "call");
    assert_eq!(
        handle["peer"],
        p.client.connection().unwrap().local_address().to_string()
    );
    // A span per connection (chatter-core), for each end, naming both addresses.
    let conn = p.client.connection().unwrap();
    let (local, remote) = (
        conn.local_address().to_string(),
        conn.remote_address().to_string(),
    );
    let ends: Vec<_> = spans
        .iter()
        .filter(|(n, _)| n == "connection")
        .map(|(_, f)| {
            (
                f["side"].as_str(),
                f["local"].as_str(),
                f["remote"].as_str(),
            )
        })
        .collect();
    assert!(ends.contains(&("connected", &local, &remote)), "{ends:?}");
    assert!(ends.contains(&("accepted", &remote, &local)), "{ends:?}");
    let failed = find("call", "ghost");
    assert_eq!(failed["outcome"], "no_such_object");
    assert!(!failed.contains_key("trace_id"), "no trace without one");
    // Refused before a handler started: the callee's span says so.
    let refused = find("handle", "ghost");
    assert_eq!(refused["outcome"], "no_such_object");
    assert_eq!(refused["conversation"], failed["conversation"]);

    // (In this test: a subscriber set for one test misses callsites another test of the
    // process registered first.) Handlers that continue in a task, and one that waited
    // for the only handler slot (the backlog), have their spans too, ended the same way.
    let one = pair_with(PeerOptions::default().max_concurrent_handlers(1)).await;
    let before = capture.spans.lock().unwrap().len();
    let (slow, queued) = tokio::join!(one.probe.seen(1000), one.probe.seen(0));
    assert_eq!((slow.unwrap(), queued.unwrap()), (1000, 0));
    let spans = capture.spans.lock().unwrap()[before..].to_vec();
    let handles: Vec<_> = spans.iter().filter(|(n, _)| n == "handle").collect();
    assert_eq!(handles.len(), 2, "{spans:#?}");
    for (_, fields) in handles {
        assert_eq!(fields["outcome"], "ok", "{fields:?}");
        assert_eq!(fields["kind"], "call");
        assert!(fields.contains_key("duration_us"));
        assert!(fields.contains_key("conversation"));
    }
}
