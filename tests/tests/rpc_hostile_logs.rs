//! What chatter-rpc's receive loop does around its logging when a peer misbehaves, checked
//! with `tracing` subscribers of this file's own, in a test binary of their own (as
//! `rpc_spans.rs`: a callsite's interest is cached per process, so a subscriber set for
//! one test only sees callsites no other test registered first without it).
//!
//! No test waits for time to pass as synchronisation: each waits for a condition it needs
//! (the paused clock only advances when every task waits).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatter_core::{connect, listen, Options, SendOptions};
use chatter_rpc::{serve, Peer, PeerOptions};
use tokio::time::timeout;

/// A hang guard only: on the paused clock it fires as soon as a hung test leaves every
/// task waiting.
const HANG_GUARD: Duration = Duration::from_secs(3600);

/// Waits until `condition` holds, yielding to the other tasks.
async fn wait_until(mut condition: impl FnMut() -> bool) {
    timeout(HANG_GUARD, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the condition held before the hang guard");
}

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

impl tracing::Subscriber for PanicOn {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut message = Message(None);
        event.record(&mut message);
        if message.0.as_deref() == Some(self.message) && !self.fired.swap(true, Ordering::SeqCst) {
            panic!("the subscriber panics on purpose");
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The receive loop of a served peer panics (here in the subscriber, on the warning about
/// a malformed message). chatter-core catches it and keeps the connection going without
/// the loop; the server must still take the peer off its list, as it does when the
/// connection ends. Before the fix the end hook ran only at the loop's normal end: the
/// peer stayed listed (and held) for as long as the server ran.
#[tokio::test(start_paused = true)]
async fn a_panic_in_the_receive_loop_still_takes_the_peer_off_the_servers_list() {
    let subscriber = PanicOn {
        message: "protocol error from peer",
        fired: Arc::default(),
    };
    let _guard = tracing::subscriber::set_default(subscriber.clone());
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
    server.close().await;
}
