//! `ReconnectOptions::on_connect`: the hooks run on each new connection before the peer
//! uses it (queued signals, waiting calls), and a failing hook is reported and retried
//! as the backoff says.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatter_rpc::{
    listen, remote, serve, Backoff, ConnectionState, Options, Peer, PeerEvent, PeerOptions,
    ReconnectOptions, RpcServer,
};
use tokio::sync::{mpsc, Notify};

#[remote]
pub trait Log {
    async fn hello(&self, who: String) -> u32;
    #[signal(ttl = "30s")]
    async fn note(&self, n: u32);
    async fn call(&self, n: u32) -> u32;
}

/// Records what arrives, in order.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>, Arc<Notify>);

impl Recorder {
    fn push(&self, what: String) {
        self.0.lock().expect("not poisoned").push(what);
        self.1.notify_waiters();
    }

    fn seen(&self) -> Vec<String> {
        self.0.lock().expect("not poisoned").clone()
    }

    /// Waits until `n` things arrived.
    async fn until(&self, n: usize) -> Vec<String> {
        loop {
            let changed = self.1.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let seen = self.seen();
            if seen.len() >= n {
                return seen;
            }
            changed.await;
        }
    }
}

impl Log for Recorder {
    async fn hello(&self, who: String) -> u32 {
        self.push(format!("hello {who}"));
        7
    }
    async fn note(&self, n: u32) {
        self.push(format!("note {n}"));
    }
    async fn call(&self, n: u32) -> u32 {
        self.push(format!("call {n}"));
        n
    }
}

async fn server(rec: Recorder) -> RpcServer {
    let listener = listen("tcp://127.0.0.1:0", Options::default())
        .await
        .expect("listen");
    serve(listener, PeerOptions::default(), move |peer: &Peer| {
        peer.register("log", LogServer::new(rec.clone()));
    })
}

fn fast() -> Backoff {
    Backoff::exponential(Duration::from_millis(10), Duration::from_millis(50)).jitter(0.0)
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("in time")
}

#[tokio::test]
async fn the_hook_runs_before_queued_signals_and_waiting_calls() {
    let rec = Recorder::default();
    let server = server(rec.clone()).await;
    let gate = Arc::new(Notify::new());
    // Unbounded: one message per connection the test makes (one).
    let (hooked_tx, mut hooked) = mpsc::unbounded_channel();
    let hook = {
        let gate = gate.clone();
        move |peer: Peer| {
            let (gate, hooked_tx) = (gate.clone(), hooked_tx.clone());
            async move {
                let _ = hooked_tx.send(());
                // Held until the test queued its signals and started its call.
                gate.notified().await;
                let answer = LogClient::new(&peer, "log").hello("hook".into()).await?;
                assert_eq!(answer, 7);
                Ok::<(), chatter_rpc::CallError>(())
            }
        }
    };
    let peer = Peer::reconnecting(
        &server.addresses()[0],
        Options::default(),
        PeerOptions::default(),
        ReconnectOptions::default().backoff(fast()).on_connect(hook),
    )
    .expect("valid");
    let mut events = peer.events();
    within(hooked.recv()).await.expect("the hook runs");
    // Connected, but not yet usable: the peer waits for its hook.
    assert_ne!(peer.state(), ConnectionState::Connected);
    let log = LogClient::new(&peer, "log");
    for n in 1..=3 {
        drop(within(log.note(n)).await.expect("queued"));
    }
    // One task, for the call that waits for the connection.
    let call = tokio::spawn({
        let log = log.clone();
        async move { log.call(9).await }
    });
    // Nothing went out before the hook's call.
    assert!(rec.seen().is_empty(), "{:?}", rec.seen());
    gate.notify_one();
    assert_eq!(within(call).await.expect("task").expect("call"), 9);
    let seen = within(rec.until(5)).await;
    assert_eq!(seen[0], "hello hook", "{seen:?}");
    let mut rest = seen[1..].to_vec();
    rest.sort();
    assert_eq!(rest, ["call 9", "note 1", "note 2", "note 3"]);
    loop {
        match within(events.next()).await.expect("alive") {
            PeerEvent::Connected { .. } => break,
            PeerEvent::OnConnectFailed { error, .. } => panic!("the hook failed: {error}"),
            _ => {}
        }
    }
    peer.close().await;
}

#[tokio::test]
async fn a_failing_hook_closes_the_connection_is_reported_and_retried() {
    let rec = Recorder::default();
    let server = server(rec.clone()).await;
    let attempts = Arc::new(AtomicU32::new(0));
    let hook = {
        let attempts = attempts.clone();
        move |_peer: Peer| {
            let n = attempts.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if n <= 2 {
                    Err(format!("not yet ({n})"))
                } else {
                    Ok(())
                }
            }
        }
    };
    let peer = Peer::reconnecting(
        &server.addresses()[0],
        Options::default(),
        PeerOptions::default(),
        ReconnectOptions::default().backoff(fast()).on_connect(hook),
    )
    .expect("valid");
    let mut events = peer.events();
    let mut failures = Vec::new();
    loop {
        match within(events.next()).await.expect("alive") {
            PeerEvent::OnConnectFailed { error, .. } => failures.push(error),
            PeerEvent::Reconnecting { last_error, .. } => {
                assert!(
                    last_error.contains("on-connect hook failed: not yet"),
                    "{last_error}"
                )
            }
            PeerEvent::Connected { .. } => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(failures, ["not yet (1)", "not yet (2)"]);
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(peer.state(), ConnectionState::Connected);
    assert_eq!(
        within(LogClient::new(&peer, "log").call(1))
            .await
            .expect("call"),
        1
    );
    peer.close().await;
}

#[tokio::test]
async fn a_hook_that_keeps_failing_gives_up_with_its_error() {
    let server = server(Recorder::default()).await;
    let peer = Peer::reconnecting(
        &server.addresses()[0],
        Options::default(),
        PeerOptions::default(),
        ReconnectOptions::default()
            .backoff(fast().max_attempts(2))
            .on_connect(|_peer: Peer| async { Err::<(), _>("refused for good") }),
    )
    .expect("valid");
    let mut events = peer.events();
    let mut failed = 0;
    loop {
        match within(events.next()).await.expect("alive") {
            PeerEvent::OnConnectFailed { error, .. } => {
                assert_eq!(error, "refused for good");
                failed += 1;
            }
            PeerEvent::GaveUp { last_error } => {
                assert!(last_error.contains("refused for good"), "{last_error}");
                break;
            }
            PeerEvent::Reconnecting { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(failed, 2);
    within(peer.closed()).await;
    assert_eq!(peer.state(), ConnectionState::Closed);
}

#[tokio::test]
async fn hooks_run_in_order_and_first_goes_first() {
    let rec = Recorder::default();
    let server = server(rec.clone()).await;
    let say = |who: &'static str| {
        move |peer: Peer| async move {
            LogClient::new(&peer, "log")
                .hello(who.into())
                .await
                .map(drop)
        }
    };
    let options = ReconnectOptions::default()
        .on_connect(say("b"))
        .on_connect(say("c"))
        .on_connect_first(say("a"));
    let peer = Peer::reconnecting(
        &server.addresses()[0],
        Options::default(),
        PeerOptions::default(),
        options,
    )
    .expect("valid");
    assert!(peer.wait_connected(Duration::from_secs(20)).await);
    assert_eq!(rec.seen(), ["hello a", "hello b", "hello c"]);
    peer.close().await;
}
