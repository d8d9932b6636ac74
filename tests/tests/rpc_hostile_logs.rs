//! What chatter-rpc's receive loop (and chatter-core's server, for handshake failures) does
//! around its logging when a peer misbehaves, checked
//! with `tracing` subscribers of this file's own, in a test binary of their own (as
//! `rpc_spans.rs`: a callsite's interest is cached per process, so a subscriber set for
//! one test only sees callsites no other test registered first without it).
//!
//! No test waits for time to pass as synchronisation: each waits for a condition it needs
//! (the paused clock only advances when every task waits).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatter_core::{connect, listen, CloseCause, CloseCode, Options, SendOptions};
use chatter_rpc::{remote, serve, CallError, Peer, PeerOptions};
use tests::{pair, wait_until, Transport};
use tokio::time::timeout;

/// A hang guard only: on the paused clock it fires as soon as a hung test leaves every
/// task waiting.
const HANG_GUARD: Duration = Duration::from_secs(3600);

/// The `message` of an event.
struct Message(Option<String>);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

/// A subscriber that panics, once, on the first event whose message is `message`: a
/// stand-in for any code the receive loop calls that panics (a subscriber, a metrics
/// recorder, a bug of the loop's own).
#[derive(Clone)]
struct PanicOn {
    message: &'static str,
    fired: Arc<AtomicBool>,
}

impl OnEvent for PanicOn {
    fn event(&self, event: &tracing::Event<'_>) {
        let mut message = Message(None);
        event.record(&mut message);
        if message.0.as_deref() == Some(self.message) && !self.fired.swap(true, Ordering::SeqCst) {
            panic!("the subscriber panics on purpose");
        }
    }
}

/// What a test subscriber does with an event; [`Subscriber`] makes it a subscriber that
/// records no spans.
trait OnEvent: Send + Sync + 'static {
    fn event(&self, event: &tracing::Event<'_>);
}

/// A `tracing` subscriber that hands each event to its [`OnEvent`].
struct Subscriber<T>(T);

impl<T: OnEvent> tracing::Subscriber for Subscriber<T> {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        self.0.event(event);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The receive loop of a served peer panics (here in the subscriber, on the warning about
/// a malformed message). chatter-core catches it; the server must still take the peer off
/// its list, as it does when the connection ends, and the connection must close. Before
/// the fixes the end hook ran only at the loop's normal end (the peer stayed listed, and
/// held, for as long as the server ran), and the connection stayed open without the loop.
#[tokio::test(start_paused = true)]
async fn a_panic_in_the_receive_loop_still_takes_the_peer_off_the_servers_list() {
    let subscriber = PanicOn {
        message: "protocol error from peer",
        fired: Arc::default(),
    };
    let _guard = tracing::subscriber::set_default(Subscriber(subscriber.clone()));
    let listener = listen("tcp://127.0.0.1:0", Options::default())
        .await
        .expect("listen");
    let server = serve(listener, PeerOptions::default(), |_: &Peer| {});
    let raw = connect(&server.addresses()[0], Options::default())
        .await
        .expect("connect");
    wait_until(|| server.peers().len() == 1).await;
    // A one-shot message that is not MessagePack: logged, which panics in the loop.
    raw.send_bytes(b"\xc1", SendOptions::new())
        .await
        .expect("sent");
    wait_until(|| subscriber.fired.load(Ordering::SeqCst)).await;
    wait_until(|| server.peers().is_empty()).await;
    // And the connection is closed, saying why, instead of staying open with nobody
    // reading it.
    assert_going_away_after_a_panic(raw.closed().await);
    server.close().await;
}

/// `cause` is the close a peer whose receive loop panicked sends.
fn assert_going_away_after_a_panic(cause: CloseCause) {
    match cause {
        CloseCause::Peer {
            code: CloseCode::GoingAway,
            reason,
        } => assert!(reason.contains("receive loop panicked"), "{reason}"),
        other => panic!("expected the panicked peer's close, got {other:?}"),
    }
}

/// A service the raw side below never answers.
#[remote]
pub trait Silent {
    /// Never answered here.
    async fn never(&self) -> u64;
}

/// The receive loop of a calling peer panics while a call waits for its reply. Nothing
/// reads that connection any more, so the reply could never arrive: the call must fail at
/// once with the connection's close, not at its deadline (an hour here), and the other
/// side must learn of the close. Before the fix the call waited for its deadline and the
/// connection stayed open.
#[tokio::test(start_paused = true)]
async fn a_panic_in_the_receive_loop_fails_the_calls_waiting_on_it_at_once() {
    let subscriber = PanicOn {
        message: "protocol error from peer",
        fired: Arc::default(),
    };
    let _guard = tracing::subscriber::set_default(Subscriber(subscriber.clone()));
    let (_listener, conn, raw) = pair(Transport::Tcp).await;
    let caller = Peer::new(conn);
    let silent = SilentClient::new(&caller, "silent").with_deadline(HANG_GUARD);
    let call = tokio::spawn(async move { silent.never().await });
    // The call arrived (and is never answered); then a one-shot message that is not
    // MessagePack, which the caller's receive loop logs: the log panics.
    let request = timeout(HANG_GUARD, raw.receive())
        .await
        .expect("the call arrives")
        .expect("a message");
    assert!(!request.last, "a call, which waits for its reply");
    raw.send_bytes(b"\xc1", SendOptions::new())
        .await
        .expect("sent");
    let started = tokio::time::Instant::now();
    let outcome = timeout(HANG_GUARD, call)
        .await
        .expect("the call ends")
        .expect("the call's task did not panic");
    assert!(
        matches!(outcome, Err(CallError::ConnectionLost(_))),
        "{outcome:?}"
    );
    assert!(subscriber.fired.load(Ordering::SeqCst));
    // No timer had to fire (the paused clock did not move a second).
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_going_away_after_a_panic(raw.closed().await);
}

/// A service whose signals never end: each holds its handler slot.
#[remote]
pub trait Busy {
    /// Never returns.
    #[signal]
    async fn hold(&self);
}

struct Holds;

impl Busy for Holds {
    async fn hold(&self) {
        std::future::pending::<()>().await;
    }
}

/// The receive loop panics in its own end, after `finish` began (here in the subscriber,
/// on the log line about a signal that waited for a handler slot when the connection
/// closed). What `finish` had left to do must still be done: for a peer made from a
/// connection, tell the peer it is closed (its `Disconnected` event, its hosted objects
/// dropped, its queued signals settled). Before the fix `end_after_a_panic` saw `finish`
/// had begun (`pending.closed`) and did nothing: the peer never learnt of the close.
#[tokio::test(start_paused = true)]
async fn a_panic_in_the_receive_loops_end_still_finishes_the_peer() {
    let subscriber = PanicOn {
        message: "received signal dropped",
        fired: Arc::default(),
    };
    let _guard = tracing::subscriber::set_default(Subscriber(subscriber.clone()));
    let (_listener, conn, accepted) = pair(Transport::Tcp).await;
    let sender = Peer::new(conn);
    let receiver = Peer::with_options(accepted, PeerOptions::default().max_concurrent_handlers(1));
    receiver.register("busy", BusyServer::new(Holds));
    let mut events = receiver.events();
    let busy = BusyClient::new(&sender, "busy").with_ttl(HANG_GUARD);
    // The first holds the one slot, the second waits for it.
    busy.hold().await.expect("sent");
    busy.hold().await.expect("sent");
    wait_until(|| receiver.stats().requests_waiting == 1).await;
    sender.close().await;
    let disconnected = timeout(HANG_GUARD, async {
        loop {
            match events.next().await {
                Some(chatter_rpc::PeerEvent::Disconnected { .. }) => break,
                Some(_) => {}
                None => panic!("events ended without Disconnected"),
            }
        }
    })
    .await;
    assert!(
        subscriber.fired.load(Ordering::SeqCst),
        "the subscriber panicked"
    );
    disconnected.expect("the receiver learnt of the close");
    assert!(
        receiver.objects().iter().all(|o| o != "busy"),
        "{:?}",
        receiver.objects()
    );
}

/// What a [`CountWarnings`] subscriber saw.
#[derive(Default)]
struct Counted {
    /// Warning events of chatter-rpc.
    warnings: u64,
    /// The `suppressed` field of the last event that had one.
    suppressed: Option<u64>,
}

/// A subscriber that counts chatter-rpc's warnings (or, made by
/// [`of`](CountWarnings::of), another crate's).
#[derive(Clone)]
struct CountWarnings(Arc<std::sync::Mutex<Counted>>, &'static str);

impl Default for CountWarnings {
    fn default() -> Self {
        CountWarnings::of("chatter_rpc")
    }
}

impl CountWarnings {
    /// Counts the warnings whose target starts with `target`.
    fn of(target: &'static str) -> Self {
        CountWarnings(Arc::default(), target)
    }
    fn warnings(&self) -> u64 {
        self.0.lock().expect("not poisoned").warnings
    }
    fn suppressed(&self) -> Option<u64> {
        self.0.lock().expect("not poisoned").suppressed
    }
}

/// The `suppressed` field of an event.
struct Suppressed(Option<u64>);

impl tracing::field::Visit for Suppressed {
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        if field.name() == "suppressed" {
            self.0 = Some(value);
        }
    }
    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
}

impl OnEvent for CountWarnings {
    fn event(&self, event: &tracing::Event<'_>) {
        let meta = event.metadata();
        if *meta.level() != tracing::Level::WARN || !meta.target().starts_with(self.1) {
            return;
        }
        let mut suppressed = Suppressed(None);
        event.record(&mut suppressed);
        let mut counted = self.0.lock().expect("not poisoned");
        counted.warnings += 1;
        if suppressed.0.is_some() {
            counted.suppressed = suppressed.0;
        }
    }
}

/// A peer that sends a thousand malformed messages gets each one handled as before (a
/// one-shot one ignored, one that expects an answer answered with failure kind 7), but
/// logs only the first eight in full, then every power of two, and one summary of the
/// rest when its connection ends. Before the fix each one logged a warning: a peer could
/// flood the logs at the rate it sends.
#[tokio::test(start_paused = true)]
async fn a_flood_of_malformed_messages_logs_a_bounded_number_of_warnings() {
    const FLOOD: u64 = 1000;
    let counter = CountWarnings::default();
    let _guard = tracing::subscriber::set_default(Subscriber(counter.clone()));
    let listener = listen("tcp://127.0.0.1:0", Options::default())
        .await
        .expect("listen");
    let server = serve(listener, PeerOptions::default(), |_: &Peer| {});
    let raw = connect(&server.addresses()[0], Options::default())
        .await
        .expect("connect");
    for _ in 0..FLOOD - 1 {
        raw.send_bytes(b"\xc1", SendOptions::new())
            .await
            .expect("sent");
    }
    // The last one expects an answer: still answered with a protocol failure.
    let call = raw
        .send_bytes(b"\xc1", SendOptions::new().last(false))
        .await
        .expect("sent");
    let reply = timeout(HANG_GUARD, raw.receive())
        .await
        .expect("hang")
        .expect("a reply");
    assert_eq!(reply.conversation, call);
    let (two, seven, _what) = reply.decode::<(u8, u8, String)>().expect("[2, 7, what]");
    assert_eq!((two, seven), (2, 7));
    // 1-8, 16, 32, 64, 128, 256, 512.
    assert_eq!(counter.warnings(), 14);
    assert_eq!(counter.suppressed(), None);
    raw.close().await;
    wait_until(|| server.peers().is_empty()).await;
    assert_eq!(counter.warnings(), 15, "one summary");
    assert_eq!(counter.suppressed(), Some(FLOOD - 14));
    server.close().await;
}

/// A peer that fails its handshake again and again (here: speaks HTTP) is rejected each
/// time, and each is counted and queued for `next_rejection`, but only the first eight are
/// logged at warn level, then every power of two. Before the fix each one logged a
/// warning: a client reconnecting in a loop could flood the server's log.
#[tokio::test(start_paused = true)]
async fn handshake_failures_in_a_loop_log_a_bounded_number_of_warnings() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const FAILURES: u64 = 100;
    let counter = CountWarnings::of("chatter_core");
    let _guard = tracing::subscriber::set_default(Subscriber(counter.clone()));
    let server = listen("tcp://127.0.0.1:0", Options::default())
        .await
        .expect("listen");
    let chatter_core::Address::Tcp { host, port } = server.addresses()[0].clone() else {
        panic!("a TCP listener");
    };
    for _ in 0..FAILURES {
        let mut stranger = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .expect("connect");
        stranger
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("request");
        // The server closes it: read to the end.
        let mut answer = Vec::new();
        let _ = timeout(HANG_GUARD, stranger.read_to_end(&mut answer))
            .await
            .expect("closed by the server");
    }
    wait_until(|| server.rejected() == FAILURES).await;
    // 1-8, 16, 32, 64.
    assert_eq!(counter.warnings(), 11);
    let first = server.next_rejection().await.expect("queued");
    assert!(
        first.cause.to_string().to_lowercase().contains("chatter"),
        "{}",
        first.cause
    );
    server.close().await;
}
