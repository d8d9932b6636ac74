//! A caller holds no more calls unanswered on one connection than its chatter-core
//! `max_conversations`: the callee's limit is not announced (chatter-core PROTOCOL.md
//! §6.4), and one call over it is a protocol error that closes the connection. With the
//! same limit on both sides (the default, 65,536), calls beyond it wait for an answer, as
//! they wait for credit, instead of losing the connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatter_core::{connect, listen, Options};
use chatter_rpc::{remote, Peer};
use tokio::time::sleep;

#[remote]
pub trait Slow {
    /// Sleeps `ms` (on the paused clock), then returns it.
    async fn wait(&self, ms: u64) -> u64;
}

#[derive(Clone, Default)]
struct Counting {
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

impl Slow for Counting {
    async fn wait(&self, ms: u64) -> u64 {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        sleep(Duration::from_millis(ms)).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        ms
    }
}

#[tokio::test(start_paused = true)]
async fn calls_beyond_the_conversation_limit_wait_instead_of_closing_the_connection() {
    const LIMIT: usize = 4;
    let options = Options::default().max_conversations(LIMIT);
    let listener = listen("tcp://127.0.0.1:0", options.clone())
        .await
        .expect("listen");
    let conn = connect(&listener.addresses()[0], options)
        .await
        .expect("connect");
    let accepted = listener.accept().await.expect("accept");
    let caller = Peer::new(conn);
    let callee = Peer::new(accepted);
    let counting = Counting::default();
    callee.register("slow", SlowServer::new(counting.clone()));

    let slow = SlowClient::new(&caller, "slow").with_deadline(Duration::from_secs(60));
    let calls: Vec<_> = (0..3 * LIMIT as u64)
        .map(|i| {
            let slow = slow.clone();
            tokio::spawn(async move { slow.wait(1000 + i).await })
        })
        .collect();
    for (i, call) in calls.into_iter().enumerate() {
        let answer = call.await.expect("caller task");
        assert_eq!(answer.expect("answered"), 1000 + i as u64);
    }
    assert_eq!(counting.most.load(Ordering::SeqCst), LIMIT);
    let conn = caller.connection().expect("connected");
    assert!(conn.close_cause().is_none(), "still open");
}
