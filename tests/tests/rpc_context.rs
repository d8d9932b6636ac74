//! Per-call context (issue 17, item 2): what a handler learns about its caller, metadata
//! with limits on both sides, trace context across nested calls, and plain calls left
//! byte for byte as they were.

use std::time::Duration;

use chatter_core::{connect, listen, Options, SendOptions};
use chatter_rpc::{
    remote, AckError, CallContext, CallError, Metadata, Peer, PeerOptions, SignalError, TraceParent,
};
use serde::{Deserialize, Serialize};
#[cfg(feature = "tls")]
use tests::pki;
use tokio::sync::mpsc;

/// What a handler saw in its context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    remote: String,
    local: String,
    object: String,
    method: String,
    signal: bool,
    metadata: Vec<(String, String)>,
    remaining_ms: u64,
    trace: Option<String>,
    /// The trace context a call made by this handler carries.
    child_trace: Option<String>,
    /// The DER of the caller's leaf certificate, on TLS.
    leaf: Option<Vec<u8>>,
}

impl Seen {
    fn now() -> Option<Seen> {
        let cx = CallContext::current()?;
        Some(Seen {
            remote: cx.remote_address().to_string(),
            local: cx.local_address().to_string(),
            object: cx.object().to_owned(),
            method: cx.method().to_owned(),
            signal: cx.is_signal(),
            metadata: cx
                .metadata()
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            remaining_ms: cx.remaining().as_millis() as u64,
            trace: cx.trace_parent().map(|t| t.to_string()),
            child_trace: cx.child_trace_parent().map(|t| t.to_string()),
            #[cfg(feature = "tls")]
            leaf: cx
                .peer_certificates()
                .map(|chain| chain[0].as_ref().to_vec()),
            #[cfg(not(feature = "tls"))]
            leaf: None,
        })
    }
}

#[remote]
pub trait Probe {
    /// The context as this handler sees it, after `wait_ms` (on the paused clock).
    async fn seen(&self, wait_ms: u64) -> Option<Seen>;
    /// Calls `seen` on the other side of the connection it came in on, from inside this
    /// handler; returns both contexts.
    async fn nested(&self) -> (Option<Seen>, Option<Seen>);
    #[signal]
    async fn note(&self);
}

#[derive(Clone)]
struct Handler {
    /// The peer this object is registered on (for `nested`).
    peer: Option<Peer>,
    notes: mpsc::UnboundedSender<Option<Seen>>,
}

impl Probe for Handler {
    async fn seen(&self, wait_ms: u64) -> Option<Seen> {
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        Seen::now()
    }

    async fn nested(&self) -> (Option<Seen>, Option<Seen>) {
        let mine = Seen::now();
        let peer = self.peer.as_ref().expect("a peer for nested calls");
        let theirs = ProbeClient::new(peer, "back")
            .seen(0)
            .await
            .expect("nested call");
        (mine, theirs)
    }

    async fn note(&self) {
        let _ = self.notes.send(Seen::now());
    }
}

struct Pair {
    client: Peer,
    server: Peer,
    probe: ProbeClient,
    notes: mpsc::UnboundedReceiver<Option<Seen>>,
    back_notes: mpsc::UnboundedReceiver<Option<Seen>>,
    _listener: chatter_core::Server,
}

/// A client peer hosting "back" and a server peer hosting "probe", over TCP.
async fn pair(client_options: PeerOptions, server_options: PeerOptions) -> Pair {
    let listener = listen("tcp://127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let conn = connect(&listener.addresses()[0], Options::default())
        .await
        .unwrap();
    let accepted = listener.accept().await.unwrap();
    let client = Peer::with_options(conn, client_options);
    let server = Peer::with_options(accepted, server_options);
    let (tx, notes) = mpsc::unbounded_channel();
    let (back_tx, back_notes) = mpsc::unbounded_channel();
    server.register(
        "probe",
        ProbeServer::new(Handler {
            peer: Some(server.clone()),
            notes: tx,
        }),
    );
    client.register(
        "back",
        ProbeServer::new(Handler {
            peer: None,
            notes: back_tx,
        }),
    );
    let probe = ProbeClient::new(&client, "probe");
    Pair {
        client,
        server,
        probe,
        notes,
        back_notes,
        _listener: listener,
    }
}

#[tokio::test(start_paused = true)]
async fn a_handler_sees_its_caller_the_deadline_left_and_the_metadata() {
    assert!(CallContext::current().is_none(), "none outside a handler");
    let p = pair(PeerOptions::default(), PeerOptions::default()).await;
    let probe = p
        .probe
        .with_deadline(Duration::from_secs(10))
        .with_metadata("user", "ada")
        .with_metadata("tenant", "7")
        .with_metadata("user", "again");
    let seen = probe.seen(4000).await.unwrap().expect("a context");
    let conn = p.client.connection().unwrap();
    assert_eq!(seen.remote, conn.local_address().to_string());
    assert_eq!(seen.local, conn.remote_address().to_string());
    assert_eq!(
        (seen.object.as_str(), seen.method.as_str()),
        ("probe", "seen")
    );
    assert!(!seen.signal);
    assert_eq!(
        seen.metadata,
        [("user", "ada"), ("tenant", "7"), ("user", "again")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
    );
    // 10 s deadline, 4 s slept on the paused clock.
    assert_eq!(seen.remaining_ms, 6000);
    assert_eq!(seen.trace, None);
    assert_eq!(seen.leaf, None, "no certificates over TCP");

    // Without metadata: the context is there, empty.
    let plain = p.probe.seen(0).await.unwrap().expect("a context");
    assert!(plain.metadata.is_empty());
    assert_eq!(plain.remaining_ms, 30_000);
    assert!(CallContext::current().is_none());
}

#[tokio::test(start_paused = true)]
async fn signal_handlers_see_their_context_too() {
    let mut p = pair(PeerOptions::default(), PeerOptions::default()).await;
    p.probe.with_metadata("k", "v").note().await.unwrap();
    let seen = p.notes.recv().await.unwrap().expect("a context");
    assert!(seen.signal);
    assert_eq!(seen.method, "note");
    assert_eq!(seen.metadata, [("k".to_owned(), "v".to_owned())]);
    assert_eq!(seen.remaining_ms, 30_000, "the default TTL");
    p.probe.note().await.unwrap();
    let seen = p.notes.recv().await.unwrap().expect("a context");
    assert!(seen.metadata.is_empty());
    drop(p.back_notes);
}

#[tokio::test(start_paused = true)]
async fn a_nested_call_carries_the_trace_on_with_the_handler_as_parent() {
    let p = pair(PeerOptions::default(), PeerOptions::default()).await;
    let root: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        .parse()
        .unwrap();
    let (mine, theirs) = p.probe.with_trace_parent(root).nested().await.unwrap();
    let (mine, theirs) = (mine.unwrap(), theirs.unwrap());
    assert_eq!(mine.trace.as_deref(), Some(root.to_string().as_str()));
    let child: TraceParent = mine.child_trace.unwrap().parse().unwrap();
    assert_eq!(child.trace_id(), root.trace_id());
    assert_ne!(
        child.parent_id(),
        root.parent_id(),
        "the handler's own span"
    );
    // The nested call went back over the same connection and carried it.
    assert_eq!(theirs.trace, Some(child.to_string()));
    assert_eq!(theirs.object, "back");

    // Without a trace, nothing is invented (start_traces is off by default).
    let (mine, theirs) = p.probe.nested().await.unwrap();
    assert_eq!((mine.unwrap().trace, theirs.unwrap().trace), (None, None));
}

#[tokio::test(start_paused = true)]
async fn a_traceparent_given_as_metadata_is_the_trace_context_and_a_bad_one_is_ignored() {
    let p = pair(PeerOptions::default(), PeerOptions::default()).await;
    let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let seen = p
        .probe
        .with_metadata("traceparent", good)
        .seen(0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.trace.as_deref(), Some(good));
    assert!(seen.metadata.is_empty());
    let seen = p
        .probe
        .with_metadata("traceparent", "00-nonsense")
        .seen(0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.trace, None);
}

#[tokio::test(start_paused = true)]
async fn metadata_over_the_limit_fails_clearly_on_either_side() {
    // This side's limit: refused before sending.
    let small = PeerOptions::default().max_metadata_bytes(64);
    let mut p = pair(small, PeerOptions::default().max_metadata_bytes(100)).await;
    let big = "x".repeat(80);
    let err = p.probe.with_metadata("k", &big).seen(0).await.unwrap_err();
    let CallError::MetadataTooLarge { what } = &err else {
        panic!("{err:?}");
    };
    assert!(what.contains("over this side's limit of 64"), "{what}");
    let err = p.probe.with_metadata("k", &big).note().await.unwrap_err();
    assert!(
        matches!(err, SignalError::MetadataTooLarge { .. }),
        "{err:?}"
    );

    // The callee's limit (100) is lower than the caller's (8 KiB).
    let p2 = pair(
        PeerOptions::default(),
        PeerOptions::default().max_metadata_bytes(100),
    )
    .await;
    let big = "y".repeat(120);
    let err = p2.probe.with_metadata("k", &big).seen(0).await.unwrap_err();
    let CallError::MetadataTooLarge { what } = &err else {
        panic!("{err:?}");
    };
    assert!(what.contains("refused by the callee"), "{what}");
    assert!(what.contains("over the limit of 100"), "{what}");
    // A signal over it is dropped and counted; the connection keeps serving.
    p2.probe.with_metadata("k", &big).note().await.unwrap();
    assert_eq!(p2.probe.seen(0).await.unwrap().unwrap().method, "seen");
    assert_eq!(p2.server.stats().signals_failed, 1);
    // Just under the limit is fine.
    let fits = "z".repeat(90);
    let seen = p2
        .probe
        .with_metadata("k", &fits)
        .seen(0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.metadata[0].1, fits);
    assert!(p.notes.try_recv().is_err());
}

/// An acknowledged signal whose metadata is over the receiver's (lower) limit: the
/// receiver acknowledges it *failed*, so the sender learns it at once and does not keep
/// it. Before the fix the receiver dropped it without an acknowledgement: the sender
/// waited until its TTL (here the wait for the acknowledgement timed out).
#[tokio::test(start_paused = true)]
async fn an_acknowledged_signal_over_the_receivers_metadata_limit_fails_at_the_sender() {
    let p = pair(
        PeerOptions::default().acknowledged_signals(true),
        PeerOptions::default().max_metadata_bytes(100),
    )
    .await;
    let big = "y".repeat(120);
    let sent = p.probe.with_metadata("k", &big).note().await.unwrap();
    assert_eq!(
        sent.acknowledged(Duration::from_secs(60)).await,
        Err(AckError::Failed)
    );
    assert_eq!(p.client.stats().signals_failed_remotely, 1);
    assert_eq!(p.server.stats().signals_failed, 1);
    // The connection keeps serving, and a signal that fits is handled.
    let sent = p.probe.with_metadata("k", "v").note().await.unwrap();
    sent.acknowledged(Duration::from_secs(60)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_plain_call_is_byte_for_byte_what_it_was_and_metadata_uses_kind_9() {
    let listener = listen("tcp://127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let conn = connect(&listener.addresses()[0], Options::default())
        .await
        .unwrap();
    let raw = listener.accept().await.unwrap();
    let peer = Peer::with_options(
        conn,
        PeerOptions::default().default_deadline(Duration::from_millis(1500)),
    );
    let probe = ProbeClient::new(&peer, "calc");
    let call = tokio::spawn(probe.seen(3));
    let msg = raw.receive().await.unwrap();
    // [0, "calc", "seen", 1500, [3]]: PROTOCOL.md's call, unchanged.
    assert_eq!(
        &msg.payload[..],
        b"\x95\x00\xa4calc\xa4seen\xcd\x05\xdc\x91\x03"
    );
    raw.send_bytes(
        b"\x92\x00\xc0",
        SendOptions::new().conversation(msg.conversation),
    )
    .await
    .unwrap();
    assert_eq!(call.await.unwrap().unwrap(), None);

    let call = tokio::spawn(probe.with_metadata("a", "b").seen(3));
    let msg = raw.receive().await.unwrap();
    // [9, "calc", "seen", 1500, {"a": "b"}, [3]]
    assert_eq!(
        &msg.payload[..],
        b"\x96\x09\xa4calc\xa4seen\xcd\x05\xdc\x81\xa1a\xa1b\x91\x03"
    );
    raw.send_bytes(
        b"\x92\x00\xc0",
        SendOptions::new().conversation(msg.conversation),
    )
    .await
    .unwrap();
    assert_eq!(call.await.unwrap().unwrap(), None);

    // A signal with metadata: kind 10.
    probe.with_metadata("a", "b").note().await.unwrap();
    let msg = raw.receive().await.unwrap();
    assert_eq!(&msg.payload[..3], b"\x96\x0a\xa4");
}

#[cfg(feature = "tls")]
#[tokio::test]
async fn a_handler_sees_the_callers_tls_certificate_chain() {
    let pki = pki();
    let tls = pki
        .server_tls()
        .require_client_certificates(pki.ca.cert_pem.as_bytes())
        .unwrap();
    let listener = listen("tls://127.0.0.1:0", Options::default().tls_server(tls))
        .await
        .unwrap();
    let client_tls = pki
        .client_tls()
        .client_certificate_pem(
            pki.client.cert_pem.as_bytes(),
            pki.client.key_pem.as_bytes(),
        )
        .unwrap();
    let conn = connect(
        &listener.addresses()[0],
        Options::default().tls_client(client_tls),
    )
    .await
    .unwrap();
    let server = Peer::new(listener.accept().await.unwrap());
    let (tx, _notes) = mpsc::unbounded_channel();
    server.register(
        "probe",
        ProbeServer::new(Handler {
            peer: None,
            notes: tx,
        }),
    );
    let client = Peer::new(conn);
    let seen = ProbeClient::new(&client, "probe")
        .seen(0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.leaf.as_deref(), Some(&pki.client.cert_der[..]));
}

#[tokio::test(start_paused = true)]
async fn reliable_signals_carry_their_metadata_as_kind_11() {
    let listener = listen("tcp://127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let address = listener.addresses()[0].clone();
    let (tx, mut notes) = mpsc::unbounded_channel();
    let server = chatter_rpc::serve(listener, PeerOptions::default(), move |peer: &Peer| {
        peer.register(
            "probe",
            ProbeServer::new(Handler {
                peer: None,
                notes: tx.clone(),
            }),
        );
    });
    let peer = Peer::reconnecting(
        &address,
        Options::default(),
        PeerOptions::default(),
        chatter_rpc::ReconnectOptions::default(),
    )
    .unwrap();
    let probe = ProbeClient::new(&peer, "probe").with_metadata("m", "1");
    let sent = probe.note().await.unwrap();
    sent.acknowledged(Duration::from_secs(5)).await.unwrap();
    let seen = notes.recv().await.unwrap().expect("a context");
    assert_eq!(seen.metadata, [("m".to_owned(), "1".to_owned())]);
    // A reconnecting peer's calls carry theirs too (re-encoded with the time left).
    let seen = probe.seen(0).await.unwrap().unwrap();
    assert_eq!(seen.metadata, [("m".to_owned(), "1".to_owned())]);
    peer.shutdown(Duration::from_secs(1)).await;
    drop(server);
    let _ = Metadata::new();
}
