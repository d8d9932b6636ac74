//! Backpressure from RPC handlers back to the sender (issue 15, items 1 and 3), end to end
//! over TCP on 127.0.0.1, tried as a user and as an attacker would.
//!
//! What the design promises (`chatter-rpc/src/peer/backlog.rs`), and what these tests hold
//! it to:
//!
//! - a received call or signal holds its flow-control credit until its handler finished,
//!   or it was dropped by its deadline, TTL or a cancel; one that finds no free handler slot
//!   waits in a backlog. So what a connection holds for its peer
//!   ([`Buffered::received`](chatter_core::Buffered::received), frame body + 64 bytes per
//!   message) stays within the receiver's `receive_window`, and so does the backlog
//!   ([`PeerStats::requests_waiting`]);
//! - a sender out of credit waits: its sends neither fail nor grow the receiver;
//! - a freed slot goes to the oldest waiting call before any waiting signal;
//! - a waiting call whose deadline passes is answered "deadline exceeded", a waiting signal
//!   whose TTL passes is dropped and counted, a cancelled waiting call is removed, and each
//!   gives its credit back at once;
//! - answers to a peer that does not read hold the credit of the request they answer;
//! - nothing is lost: every signal the sender accepted is handled or counted.
//!
//! Memory is asserted as bounds, never as RSS: the flow-control counters, and for what they
//! do not cover, the heap bytes live on the test's thread ([`Counting`]: the runtime of a
//! `#[tokio::test]` runs every task of the test, both peers included, on that thread).
//!
//! The tests run on tokio's paused clock: time moves only while every task waits, so a
//! handler that "takes 2 s" costs no real time. When the runtime parks with only I/O
//! ready, tokio still moves the paused clock to the next timer, so a test keeps a timer
//! running while it measures ([`watch`], as in `core_attacks.rs`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use chatter_core::{connect, Connection, Msg, Options, SendError, SendOptions, Server};
use chatter_rpc::{remote, CallError, Peer, PeerOptions, SignalError};
use serde::Serialize;
use tests::{pair_with, wait_until, Transport};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep, timeout, Instant};

/// The object name the receiving peer hosts [`Worker`] under.
const OBJECT: &str = "work";

/// How long a slow signal handler takes (virtual time).
const HANDLER: Duration = Duration::from_secs(2);

/// The padding of a slow signal: the 16 KiB signals of the slow-consumer case.
const PAD: usize = 16 * 1024;

/// The receiver's window in most tests: 16 slow signals.
const WINDOW: u32 = 256 * 1024;

/// Flow-control bytes charged per message on top of its frame body.
const OVERHEAD: u64 = 64;

/// At least what a slow signal costs (its padding + 64: the rest of the envelope and the
/// message header only add), so `window / SIGNAL_COST` is at least how many fit.
const SIGNAL_COST: u64 = PAD as u64 + OVERHEAD;

/// At most how many slow signals the sender puts in a receiver's window: signals go only
/// while half the window stays free after them (`SendOptions::reserve`), so that calls and
/// replies always find room.
fn signals_fit(window: u32) -> u64 {
    (u64::from(window) - u64::from(window) / 2) / SIGNAL_COST
}

/// How long a measurement tolerates beyond an exact figure: the watch timer's period and
/// a loopback round trip.
const SLACK: Duration = Duration::from_millis(20);

/// A hang guard only: on the paused clock it fires as soon as a hung test leaves every task
/// waiting.
const HANG_GUARD: Duration = Duration::from_secs(3600);

#[remote]
pub trait Work {
    /// A slow consumer: takes [`HANDLER`], then records `seq` as handled.
    #[signal(ttl = "1h")]
    async fn slow(&self, seq: u64, pad: String);
    /// Records `seq` at once.
    #[signal(ttl = "1h")]
    async fn tick(&self, seq: u64);
    /// Records `tag` as started, sleeps `ms`, returns `tag`.
    async fn sleep(&self, tag: u64, ms: u64) -> u64;
    /// Records `tag` as started, waits until the test opens the gate, returns `tag`.
    async fn hold(&self, tag: u64) -> u64;
    /// Returns `size` bytes at once: completes on its first poll, as most handlers do.
    async fn big(&self, size: u64) -> String;
    /// Returns `size` bytes after yielding once.
    async fn big_later(&self, size: u64) -> String;
    /// Returns 1.
    async fn ping(&self) -> u64;
}

/// What the test observes of the receiving side's handlers.
#[derive(Debug)]
struct Probe {
    /// Sequence numbers of `slow` signals, in the order their handlers finished.
    handled: Mutex<Vec<u64>>,
    /// `(seq, start, end)` of each `slow` handler.
    spans: Mutex<Vec<(u64, Instant, Instant)>>,
    /// `slow` handlers running now, and the most that ran at once.
    running: AtomicUsize,
    most_running: AtomicUsize,
    /// Tags of the `sleep` and `hold` handlers that started, in order.
    started: Mutex<Vec<u64>>,
    /// `tick` signals handled.
    ticks: AtomicU64,
    /// `big` and `big_later` handlers that made their reply.
    replies_made: AtomicU64,
    /// `hold` takes a permit; the test adds them.
    gate: Semaphore,
}

impl Probe {
    fn new() -> Arc<Probe> {
        Arc::new(Probe {
            handled: Mutex::default(),
            spans: Mutex::default(),
            running: AtomicUsize::new(0),
            most_running: AtomicUsize::new(0),
            started: Mutex::default(),
            ticks: AtomicU64::new(0),
            replies_made: AtomicU64::new(0),
            gate: Semaphore::new(0),
        })
    }

    fn handled(&self) -> u64 {
        lock(&self.handled).len() as u64
    }

    fn started(&self) -> Vec<u64> {
        lock(&self.started).clone()
    }
}

#[derive(Clone)]
struct Worker(Arc<Probe>);

impl Work for Worker {
    async fn slow(&self, seq: u64, _pad: String) {
        let p = &self.0;
        let now = p.running.fetch_add(1, Ordering::AcqRel) + 1;
        p.most_running.fetch_max(now, Ordering::AcqRel);
        let start = Instant::now();
        sleep(HANDLER).await;
        p.running.fetch_sub(1, Ordering::AcqRel);
        lock(&p.spans).push((seq, start, Instant::now()));
        lock(&p.handled).push(seq);
    }

    async fn tick(&self, _seq: u64) {
        self.0.ticks.fetch_add(1, Ordering::AcqRel);
    }

    async fn sleep(&self, tag: u64, ms: u64) -> u64 {
        lock(&self.0.started).push(tag);
        sleep(Duration::from_millis(ms)).await;
        tag
    }

    async fn hold(&self, tag: u64) -> u64 {
        lock(&self.0.started).push(tag);
        self.0
            .gate
            .acquire()
            .await
            .expect("the gate is never closed")
            .forget();
        tag
    }

    async fn big(&self, size: u64) -> String {
        self.0.replies_made.fetch_add(1, Ordering::AcqRel);
        "x".repeat(size as usize)
    }

    async fn big_later(&self, size: u64) -> String {
        tokio::task::yield_now().await;
        self.0.replies_made.fetch_add(1, Ordering::AcqRel);
        "x".repeat(size as usize)
    }

    async fn ping(&self) -> u64 {
        1
    }
}

// 1. A slow consumer.

/// The slow-consumer case: one handler slot, a signal handler that takes 2 s, a
/// sender firing 16 KiB signals. The receiver holds at most its window and the sender stays
/// no further ahead than the window and its outbox; every signal is handled, in order.
#[tokio::test(start_paused = true)]
async fn slow_consumer_holds_at_most_its_window_and_loses_nothing() {
    const SIGNALS: u64 = 64;
    const QUEUED: usize = 4;
    let s = setup(
        WINDOW,
        PeerOptions::default().max_concurrent_handlers(1),
        PeerOptions::default().max_queued_signals(QUEUED),
    )
    .await;
    let accepted = Arc::new(AtomicU64::new(0));
    let watch = watch(
        &s.receiver,
        Duration::from_millis(10),
        lag(&accepted, &s.probe),
    );
    let flood = tokio::spawn(flood(
        s.sender.clone(),
        s.work.clone(),
        0..SIGNALS,
        accepted.clone(),
    ));
    timeout(HANG_GUARD, flood)
        .await
        .expect("hang")
        .expect("flood");
    let probe = s.probe.clone();
    wait_until(|| probe.handled() == SIGNALS).await;
    let peaks = watch.finish().await;

    let fit = signals_fit(WINDOW);
    assert!(
        peaks.held <= u64::from(WINDOW) / 2 + SIGNAL_COST,
        "{peaks:?}"
    );
    assert!(peaks.waiting <= fit, "{peaks:?}");
    // The backlog did form, and was accounted for: the sender was held back by the
    // receiver's handlers, not by something else.
    assert!(peaks.waiting >= fit / 2, "{peaks:?}");
    assert!(peaks.held >= fit / 2 * SIGNAL_COST, "{peaks:?}");
    // Accepted but not handled: in the receiver's window, in the sender's outbox, running.
    assert!(peaks.lag <= fit + QUEUED as u64 + 2, "{peaks:?}");
    // Memory of both peers together: read buffers (2 × window), output, the outbox and a
    // few decoded signals.
    let heap = 4 * i64::from(WINDOW) + (QUEUED as i64 + 4) * PAD as i64 + 256 * 1024;
    assert!(peaks.heap <= heap, "{peaks:?}, bound {heap}");

    assert_eq!(*lock(&s.probe.handled), (0..SIGNALS).collect::<Vec<_>>());
    let (sent, received) = (s.sender.stats(), s.receiver.stats());
    assert_eq!(sent.signals_sent, SIGNALS, "{sent:?}");
    assert_eq!(sent.signals_expired, 0, "{sent:?}");
    assert_eq!(received.signals_delivered, SIGNALS, "{received:?}");
    assert_eq!(
        received.signals_expired_on_arrival + received.signals_failed,
        0
    );
    assert_eq!(s.probe.most_running.load(Ordering::Acquire), 1);
    assert_eq!(
        s.receiver
            .connection()
            .expect("its connection")
            .buffered()
            .received,
        0
    );
    assert_eq!(received.requests_waiting, 0);
}

/// The sender's half of the slow-consumer case: a signal's future waits for room (within
/// its TTL) instead of failing, on a plain `Peer` as on a reconnecting one, and the sender
/// stays within the receiver's window plus its outbox.
#[tokio::test(start_paused = true)]
async fn slow_consumer_makes_the_signal_future_wait_not_fail() {
    const SIGNALS: u64 = 48;
    const QUEUED: usize = 4;
    let s = setup(
        WINDOW,
        PeerOptions::default().max_concurrent_handlers(1),
        PeerOptions::default().max_queued_signals(QUEUED),
    )
    .await;
    let accepted = Arc::new(AtomicU64::new(0));
    let watch = watch(
        &s.receiver,
        Duration::from_millis(10),
        lag(&accepted, &s.probe),
    );
    let pad = "s".repeat(PAD);
    for seq in 0..SIGNALS {
        let sent = timeout(HANG_GUARD, s.work.slow(seq, pad.clone()))
            .await
            .expect("hang");
        if let Err(e) = sent {
            panic!("signal {seq} failed instead of waiting: {e:?}");
        }
        accepted.fetch_add(1, Ordering::AcqRel);
    }
    let probe = s.probe.clone();
    wait_until(|| probe.handled() == SIGNALS).await;
    let peaks = watch.finish().await;
    let fit = u64::from(WINDOW) / SIGNAL_COST;
    assert!(peaks.lag <= fit + QUEUED as u64 + 2, "{peaks:?}");
    assert!(peaks.held <= u64::from(WINDOW), "{peaks:?}");
    assert_eq!(*lock(&s.probe.handled), (0..SIGNALS).collect::<Vec<_>>());
    assert_eq!(s.sender.stats().signals_rejected, 0);
}

// 2. A flood of slow calls.

/// The attack: a flood of calls to a slow method with a 49-day deadline on one
/// connection. What waits is held within the window; every call completes.
#[tokio::test(start_paused = true)]
async fn flood_of_slow_calls_with_49_day_deadlines_is_held_within_the_window() {
    const CALLS: u64 = 2000;
    const SLOTS: usize = 8;
    const WINDOW: u32 = 64 * 1024;
    const HANDLER_MS: u64 = 100;
    let s = setup(
        WINDOW,
        PeerOptions::default().max_concurrent_handlers(SLOTS),
        PeerOptions::default(),
    )
    .await;
    let work = s.work.with_deadline(Duration::from_secs(49 * 86_400));
    let watch = watch(&s.receiver, Duration::from_millis(10), no_lag());
    let start = Instant::now();
    let mut calls = JoinSet::new();
    for tag in 0..CALLS {
        calls.spawn(work.sleep(tag, HANDLER_MS));
    }
    let mut done = Vec::new();
    while let Some(outcome) = timeout(HANG_GUARD, calls.join_next()).await.expect("hang") {
        done.push(outcome.expect("task").expect("a slow call completes"));
    }
    let elapsed = start.elapsed();
    let peaks = watch.finish().await;

    done.sort_unstable();
    assert_eq!(done, (0..CALLS).collect::<Vec<_>>());
    assert!(peaks.held <= u64::from(WINDOW), "{peaks:?}");
    assert!(
        peaks.waiting <= u64::from(WINDOW) / MIN_CALL_COST,
        "{peaks:?}"
    );
    assert!(peaks.waiting > 0, "the backlog never formed: {peaks:?}");
    // The handlers ran SLOTS at a time, back to back.
    let rounds = Duration::from_millis(CALLS / SLOTS as u64 * HANDLER_MS);
    assert!(elapsed >= rounds, "{elapsed:?}");
    assert!(elapsed <= rounds + Duration::from_secs(1), "{elapsed:?}");
    let received = s.receiver.stats();
    assert_eq!(received.calls_received, CALLS, "{received:?}");
    assert_eq!(received.requests_waiting, 0);
    assert_eq!(
        s.receiver
            .connection()
            .expect("its connection")
            .buffered()
            .received,
        0
    );
}

/// The same flood with a 5 s deadline: what cannot run in time is answered "deadline
/// exceeded" at its deadline, nothing hangs, nothing starts late, and every byte of credit
/// comes back.
#[tokio::test(start_paused = true)]
async fn flood_of_slow_calls_past_their_deadline_is_answered_and_released() {
    const CALLS: u64 = 2000;
    const SLOTS: usize = 8;
    const WINDOW: u32 = 64 * 1024;
    const DEADLINE: Duration = Duration::from_secs(5);
    let s = setup(
        WINDOW,
        PeerOptions::default().max_concurrent_handlers(SLOTS),
        PeerOptions::default(),
    )
    .await;
    let work = s.work.with_deadline(DEADLINE);
    let watch = watch(&s.receiver, Duration::from_millis(1), no_lag());
    let start = Instant::now();
    let mut calls = JoinSet::new();
    for tag in 0..CALLS {
        calls.spawn(work.sleep(tag, 1000));
    }
    let (mut ok, mut late) = (0u64, 0u64);
    while let Some(outcome) = timeout(HANG_GUARD, calls.join_next()).await.expect("hang") {
        match outcome.expect("task") {
            Ok(_) => ok += 1,
            Err(CallError::DeadlineExceeded) => late += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    let elapsed = start.elapsed();
    let receiver = s.receiver.clone();
    wait_until(|| receiver.stats().requests_waiting == 0).await;
    let peaks = watch.finish().await;

    assert_eq!(ok + late, CALLS);
    assert!(elapsed <= DEADLINE + SLACK, "{elapsed:?}");
    // SLOTS handlers of 1 s each within the deadline.
    let in_time = SLOTS as u64 * DEADLINE.as_secs();
    assert!(ok <= in_time, "{ok} completed");
    assert!(ok >= in_time - SLOTS as u64, "{ok} completed");
    assert!(peaks.held <= u64::from(WINDOW), "{peaks:?}");
    assert!(peaks.waiting > 0, "the backlog never formed: {peaks:?}");
    // Nothing started after its deadline: at most one more round than completed.
    let started = s.probe.started().len() as u64;
    assert!(
        started <= ok + SLOTS as u64,
        "{started} started, {ok} completed"
    );
    // Everything that waited was answered and given back.
    let receiver = s.receiver.clone();
    wait_until(|| {
        receiver
            .connection()
            .expect("its connection")
            .buffered()
            .received
            == 0
    })
    .await;
    assert_eq!(s.work.ping().await.expect("still serving"), 1);
}

// 3. Calls get through while signals back up.

/// A backlog of slow signals within the window: a call made now runs as soon as the
/// running handler finished, ahead of every waiting signal.
#[tokio::test(start_paused = true)]
async fn a_call_overtakes_a_backlog_of_slow_signals() {
    // As many as the sender puts in the window (`signals_fit`): all of them wait there.
    const SIGNALS: u64 = 6;
    let s = setup(
        WINDOW,
        PeerOptions::default().max_concurrent_handlers(1),
        PeerOptions::default(),
    )
    .await;
    let pad = "s".repeat(PAD);
    for seq in 0..SIGNALS {
        s.work
            .slow(seq, pad.clone())
            .await
            .expect("within the window");
    }
    let receiver = s.receiver.clone();
    wait_until(|| receiver.stats().requests_waiting == SIGNALS - 1).await;
    assert_eq!(s.probe.running.load(Ordering::Acquire), 1);

    let watch = watch(&s.receiver, Duration::from_millis(1), no_lag());
    let start = Instant::now();
    assert_eq!(s.work.ping().await.expect("ping"), 1);
    let elapsed = start.elapsed();
    let backlog = s.receiver.stats().requests_waiting;
    let handled = s.probe.handled();
    watch.finish().await;
    assert!(elapsed <= HANDLER + SLACK, "the call waited {elapsed:?}");
    assert!(handled <= 1, "{handled} signals ran before the call");
    assert!(backlog >= SIGNALS - 2, "{backlog} signals still waiting");
    let probe = s.probe.clone();
    wait_until(|| probe.handled() == SIGNALS).await;
}

/// The sender keeps the receiver's window full of slow signals (more wait in its outbox):
/// a call still gets through within one handler's time. The receiver puts calls first; the
/// sender must not let signals take the whole window either (`SendOptions::reserve`).
#[tokio::test(start_paused = true)]
async fn a_call_gets_through_while_signals_fill_the_window() {
    const SIGNALS: u64 = 64;
    const QUEUED: usize = 4;
    // A window of exactly 16 signals: without a reserve, no room would be left over for a
    // call.
    let window = 16 * slow_signal_cost().await as u32;
    let s = setup(
        window,
        PeerOptions::default().max_concurrent_handlers(1),
        PeerOptions::default().max_queued_signals(QUEUED),
    )
    .await;
    let accepted = Arc::new(AtomicU64::new(0));
    let flood = tokio::spawn(flood(
        s.sender.clone(),
        s.work.clone(),
        0..SIGNALS,
        accepted.clone(),
    ));
    // The signals' part of the receiver's window is full (half: they keep the rest free)
    // and more signals wait at the sender.
    let (receiver, accepted_now) = (s.receiver.clone(), accepted.clone());
    wait_until(|| {
        receiver
            .connection()
            .expect("its connection")
            .buffered()
            .received
            == u64::from(window) / 2
            && accepted_now.load(Ordering::Acquire) >= 8 + QUEUED as u64
    })
    .await;

    let watch = watch(&s.receiver, Duration::from_millis(1), no_lag());
    let start = Instant::now();
    let handled_before = s.probe.handled();
    let patient = s.work.with_deadline(Duration::from_secs(600));
    assert_eq!(patient.ping().await.expect("ping"), 1);
    let elapsed = start.elapsed();
    let handled = s.probe.handled() - handled_before;
    watch.finish().await;
    assert!(
        elapsed <= HANDLER + SLACK,
        "the call waited {elapsed:?}, behind {handled} slow signals"
    );
    timeout(HANG_GUARD, flood)
        .await
        .expect("hang")
        .expect("flood");
    let probe = s.probe.clone();
    wait_until(|| probe.handled() == SIGNALS).await;
}

/// What one slow signal costs the receiver (frame body + 64), measured: sent while the
/// receiver's only slot is taken, it waits holding exactly its credit.
async fn slow_signal_cost() -> u64 {
    let s = setup(
        WINDOW,
        PeerOptions::default().max_concurrent_handlers(1),
        PeerOptions::default(),
    )
    .await;
    let blocker = tokio::spawn(s.work.hold(1));
    let probe = s.probe.clone();
    wait_until(|| probe.started() == [1]).await;
    let before = s
        .receiver
        .connection()
        .expect("its connection")
        .buffered()
        .received;
    s.work.slow(0, "s".repeat(PAD)).await.expect("signal");
    let receiver = s.receiver.clone();
    wait_until(|| receiver.stats().requests_waiting == 1).await;
    let cost = s
        .receiver
        .connection()
        .expect("its connection")
        .buffered()
        .received
        - before;
    s.probe.gate.add_permits(1);
    blocker.await.expect("task").expect("blocker");
    cost
}

// 4. A waiting call's deadline passes.

/// Sent by hand, without a local timeout: the answer the callee gives a call whose
/// deadline passes while it waits for a slot is "deadline exceeded", at the deadline (not
/// after the backlog), and the call's credit comes back then.
#[tokio::test(start_paused = true)]
async fn a_waiting_call_is_answered_at_its_deadline_and_its_credit_given_back() {
    const DEADLINE: Duration = Duration::from_secs(3);
    let (_server, raw, receiver, probe) = raw_setup(
        WINDOW,
        PeerOptions::default().max_concurrent_handlers(1),
        Options::default(),
    )
    .await;
    let blocker = raw_call(&raw, "hold", Duration::from_secs(3600), (1u64,)).await;
    let p = probe.clone();
    wait_until(|| p.started() == [1]).await;
    let held_by_blocker = receiver
        .connection()
        .expect("its connection")
        .buffered()
        .received;

    let watch = watch(&receiver, Duration::from_millis(1), no_lag());
    let start = Instant::now();
    let waiting = raw_call(&raw, "sleep", DEADLINE, (2u64, 0u64)).await;
    let r = receiver.clone();
    wait_until(|| r.stats().requests_waiting == 1).await;
    assert!(
        receiver
            .connection()
            .expect("its connection")
            .buffered()
            .received
            > held_by_blocker
    );

    let reply = timeout(HANG_GUARD, raw.receive())
        .await
        .expect("hang")
        .expect("reply");
    let elapsed = start.elapsed();
    assert_eq!(reply.conversation, waiting);
    assert_eq!(failure_kind(&reply), Some(DEADLINE_EXCEEDED));
    assert!(
        elapsed >= DEADLINE && elapsed <= DEADLINE + SLACK,
        "{elapsed:?}"
    );
    assert_eq!(receiver.stats().requests_waiting, 0);
    assert_eq!(
        receiver
            .connection()
            .expect("its connection")
            .buffered()
            .received,
        held_by_blocker
    );
    watch.finish().await;

    // The blocker still completes; the expired call never ran.
    probe.gate.add_permits(1);
    let reply = timeout(HANG_GUARD, raw.receive())
        .await
        .expect("hang")
        .expect("reply");
    assert_eq!(reply.conversation, blocker);
    assert_eq!(ok_value(&reply), Some(1));
    assert_eq!(probe.started(), [1]);
    let r = receiver.clone();
    wait_until(|| r.connection().expect("its connection").buffered().received == 0).await;
}

/// A waiting signal whose TTL passes is dropped and counted, its credit given back at once.
#[tokio::test(start_paused = true)]
async fn waiting_signals_whose_ttl_passes_are_dropped_counted_and_released() {
    // Within the signals' half of the window (`signals_fit`), beside the blocking call.
    const SIGNALS: u64 = 6;
    const TTL: Duration = Duration::from_secs(1);
    let s = setup(
        WINDOW,
        PeerOptions::default().max_concurrent_handlers(1),
        PeerOptions::default(),
    )
    .await;
    let blocker = tokio::spawn(s.work.hold(1));
    let probe = s.probe.clone();
    wait_until(|| probe.started() == [1]).await;
    let held_by_blocker = s
        .receiver
        .connection()
        .expect("its connection")
        .buffered()
        .received;

    let short = s.work.with_ttl(TTL);
    let pad = "s".repeat(PAD);
    let start = Instant::now();
    for seq in 0..SIGNALS {
        short
            .slow(seq, pad.clone())
            .await
            .expect("within the window");
    }
    let receiver = s.receiver.clone();
    wait_until(|| receiver.stats().requests_waiting == SIGNALS).await;
    let watch = watch(&s.receiver, Duration::from_millis(1), no_lag());
    wait_until(|| receiver.stats().signals_expired_on_arrival == SIGNALS).await;
    let elapsed = start.elapsed();
    watch.finish().await;
    assert!(elapsed <= TTL + SLACK, "{elapsed:?}");
    assert_eq!(s.receiver.stats().requests_waiting, 0);
    assert_eq!(
        s.receiver
            .connection()
            .expect("its connection")
            .buffered()
            .received,
        held_by_blocker
    );

    s.probe.gate.add_permits(1);
    assert_eq!(blocker.await.expect("task").expect("blocker"), 1);
    assert_eq!(s.probe.handled(), 0, "an expired signal ran");
    let stats = s.receiver.stats();
    assert_eq!(
        stats.signals_delivered + stats.signals_expired_on_arrival,
        SIGNALS
    );
}

/// A call made while the callee holds the whole window waits for credit *within* its
/// deadline: it fails at its deadline, counted from when it was made, however late the
/// credit came (not a full deadline after it was finally sent).
#[tokio::test(start_paused = true)]
async fn a_call_waiting_for_credit_still_ends_at_its_deadline() {
    const WINDOW: u32 = 16 * 1024;
    const DEADLINE: Duration = Duration::from_secs(5);
    const CREDIT_BACK: Duration = Duration::from_secs(3);
    let s = setup(
        WINDOW,
        PeerOptions::default().max_concurrent_handlers(1),
        PeerOptions::default(),
    )
    .await;
    let blocker = tokio::spawn(s.work.hold(1));
    let probe = s.probe.clone();
    wait_until(|| probe.started() == [1]).await;
    // Tiny signals with a 3 s TTL take the rest of the window; when they expire, their
    // credit comes back.
    let short = s.work.with_ttl(CREDIT_BACK);
    let start = Instant::now();
    let mut seq = 0;
    while s.sender.stats().signals_sent == seq {
        short.tick(seq).await.expect("queued");
        seq += 1;
    }
    let watch = watch(&s.receiver, Duration::from_millis(1), no_lag());
    let call = s.work.with_deadline(DEADLINE).sleep(2, 0).await;
    let elapsed = start.elapsed();
    watch.finish().await;
    assert!(
        matches!(call, Err(CallError::DeadlineExceeded)),
        "{call:?} after {elapsed:?}"
    );
    assert!(
        elapsed <= DEADLINE + SLACK,
        "the call failed after {elapsed:?}"
    );
    s.probe.gate.add_permits(1);
    assert_eq!(blocker.await.expect("task").expect("blocker"), 1);
}

// 5. A cancelled waiting call.

/// Dropping a call's future while the call waits for a slot removes it from the backlog:
/// its credit comes back and its handler never runs.
#[tokio::test(start_paused = true)]
async fn a_cancelled_waiting_call_is_removed_and_its_credit_given_back() {
    let s = setup(
        WINDOW,
        PeerOptions::default().max_concurrent_handlers(1),
        PeerOptions::default(),
    )
    .await;
    let blocker = tokio::spawn(s.work.hold(1));
    let probe = s.probe.clone();
    wait_until(|| probe.started() == [1]).await;
    let held_by_blocker = s
        .receiver
        .connection()
        .expect("its connection")
        .buffered()
        .received;

    let waiting = tokio::spawn(s.work.sleep(2, 0));
    let receiver = s.receiver.clone();
    wait_until(|| receiver.stats().requests_waiting == 1).await;
    assert!(
        s.receiver
            .connection()
            .expect("its connection")
            .buffered()
            .received
            > held_by_blocker
    );
    waiting.abort();
    assert!(waiting.await.expect_err("aborted").is_cancelled());
    wait_until(|| receiver.stats().requests_waiting == 0).await;
    assert_eq!(
        s.receiver
            .connection()
            .expect("its connection")
            .buffered()
            .received,
        held_by_blocker
    );

    s.probe.gate.add_permits(1);
    assert_eq!(blocker.await.expect("task").expect("blocker"), 1);
    assert_eq!(s.work.ping().await.expect("ping"), 1);
    assert_eq!(s.probe.started(), [1], "the cancelled call ran");
    assert_eq!(
        s.receiver
            .connection()
            .expect("its connection")
            .buffered()
            .received,
        0
    );
}

// 6. A client that never reads.

/// A client that calls a method returning 256 KiB and never takes the replies (a raw
/// connection with a window of one reply): the server holds at most one reply per handler
/// slot, its connection stays within its documented bound, and another client is served.
/// The handler completes on its first poll, as most handlers do.
#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_holds_one_reply_per_slot_inline_handler() {
    never_reading_client("big").await;
}

/// [`a_client_that_never_reads_holds_one_reply_per_slot_inline_handler`] with a handler that
/// yields first, so that its reply is sent from a task holding the slot.
#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_holds_one_reply_per_slot_task_handler() {
    never_reading_client("big_later").await;
}

async fn never_reading_client(method: &str) {
    const REPLY: u64 = 256 * 1024;
    const CALLS: u64 = 64;
    const SLOTS: usize = 4;
    let attacker_options = Options::default()
        .receive_window(REPLY as u32 + 4096)
        .max_frame_size(REPLY as u32 + 1024);
    let (server, raw, receiver, probe) = raw_setup_with(
        Options::default(),
        PeerOptions::default().max_concurrent_handlers(SLOTS),
        attacker_options,
    )
    .await;
    let watch = watch(&receiver, Duration::from_millis(1), no_lag());
    for _ in 0..CALLS {
        raw_call(&raw, method, Duration::from_secs(3600), (REPLY,)).await;
    }
    let r = receiver.clone();
    wait_until(|| r.stats().calls_received == CALLS).await;
    settle().await;

    // Another client is served meanwhile.
    let other = connect(&server.addresses()[0], Options::default())
        .await
        .expect("connect");
    let other_server = Peer::new(server.accept().await.expect("accept"));
    other_server.register(OBJECT, WorkServer::new(Worker(probe.clone())));
    let other = WorkClient::new(&Peer::new(other), OBJECT);
    assert_eq!(other.ping().await.expect("served"), 1);
    settle().await;
    let peaks = watch.finish().await;

    // One reply fits the attacker's window; each slot may hold one more.
    let made = probe.replies_made.load(Ordering::Acquire);
    assert!(
        made <= 1 + SLOTS as u64,
        "{made} replies made for a client that reads none"
    );
    let bound = u64::from(DEFAULT_WINDOW) + u64::from(DEFAULT_SEND_BUFFER) + REPLY + 1200;
    assert!(peaks.buffered <= bound, "{peaks:?}, bound {bound}");
    // The heap: what the connection holds, one reply per slot and the one in flight (the
    // attacker holds it, on this thread too), and their encodings.
    let heap = peaks.buffered as i64 + 2 * (SLOTS as i64 + 2) * REPLY as i64 + 512 * 1024;
    assert!(peaks.heap <= heap, "{peaks:?}, bound {heap}");
    assert!(receiver.stats().requests_waiting >= CALLS - 2 - SLOTS as u64);

    // The attacker leaves: everything is released.
    drop(raw);
    let r = receiver.clone();
    wait_until(|| r.connection().expect("its connection").is_closed()).await;
}

// 7. Ordered signals.

/// With `ordered_signals`, slow signals run one at a time in arrival order, the backlog is
/// bounded by the window as before, and calls still run in the other slots meanwhile.
#[tokio::test(start_paused = true)]
async fn ordered_slow_signals_run_one_at_a_time_in_order_within_the_window() {
    const SIGNALS: u64 = 40;
    // Within the signals' half of the window (`signals_fit`).
    const FIRST: u64 = 6;
    const QUEUED: usize = 4;
    let s = setup(
        WINDOW,
        PeerOptions::default()
            .ordered_signals(true)
            .max_concurrent_handlers(4),
        PeerOptions::default().max_queued_signals(QUEUED),
    )
    .await;
    let accepted = Arc::new(AtomicU64::new(0));
    let watch = watch(
        &s.receiver,
        Duration::from_millis(10),
        lag(&accepted, &s.probe),
    );
    // A backlog within the window: a call takes a free slot at once, whatever waits in
    // the signal lane.
    let first = flood(s.sender.clone(), s.work.clone(), 0..FIRST, accepted.clone());
    assert_eq!(timeout(HANG_GUARD, first).await.expect("hang"), 0);
    let receiver = s.receiver.clone();
    wait_until(|| receiver.stats().requests_waiting == FIRST - 1).await;
    let start = Instant::now();
    assert_eq!(s.work.ping().await.expect("ping"), 1);
    assert!(start.elapsed() <= SLACK, "{:?}", start.elapsed());
    // Then more than the window holds.
    let rest = flood(
        s.sender.clone(),
        s.work.clone(),
        FIRST..SIGNALS,
        accepted.clone(),
    );
    timeout(HANG_GUARD, rest).await.expect("hang");
    let probe = s.probe.clone();
    wait_until(|| probe.handled() == SIGNALS).await;
    let peaks = watch.finish().await;

    assert_eq!(*lock(&s.probe.handled), (0..SIGNALS).collect::<Vec<_>>());
    assert_eq!(s.probe.most_running.load(Ordering::Acquire), 1);
    let spans = lock(&s.probe.spans).clone();
    for pair in spans.windows(2) {
        let ((a, _, a_end), (b, b_start, _)) = (pair[0], pair[1]);
        assert!(b_start >= a_end, "signal {b} started before {a} ended");
    }
    let fit = signals_fit(WINDOW);
    assert!(
        peaks.held <= u64::from(WINDOW) / 2 + SIGNAL_COST,
        "{peaks:?}"
    );
    assert!(peaks.waiting <= fit, "{peaks:?}");
    assert!(
        peaks.waiting >= fit / 2,
        "the backlog never filled: {peaks:?}"
    );
    assert!(peaks.lag <= fit + QUEUED as u64 + 2, "{peaks:?}");
    assert_eq!(
        s.receiver
            .connection()
            .expect("its connection")
            .buffered()
            .received,
        0
    );
}

/// Signals whose handlers finish at once (run inline by the receive task) give their
/// credit back with the receive task's next take: the sender never waits for a timer, and
/// a stream of them far beyond the window flows through in no (virtual) time.
#[tokio::test(start_paused = true)]
async fn credit_given_back_by_the_receive_task_reaches_the_sender_without_a_timer() {
    const SIGNALS: u64 = 5000;
    const WINDOW: u32 = 16 * 1024;
    let s = setup(WINDOW, PeerOptions::default(), PeerOptions::default()).await;
    let watch = watch(&s.receiver, Duration::from_millis(1), no_lag());
    let start = Instant::now();
    for seq in 0..SIGNALS {
        // As in `flood`: today a full outbox refuses the signal.
        while let Err(e) = s.work.tick(seq).await {
            assert!(matches!(e, SignalError::OutboxFull), "{e:?}");
            s.sender.flush().await;
        }
    }
    let probe = s.probe.clone();
    let delivered = timeout(
        Duration::from_secs(5),
        wait_until(|| probe.ticks.load(Ordering::Acquire) == SIGNALS),
    )
    .await;
    let elapsed = start.elapsed();
    watch.finish().await;
    let ticks = s.probe.ticks.load(Ordering::Acquire);
    assert!(delivered.is_ok(), "stalled: {ticks} of {SIGNALS} delivered");
    assert!(elapsed <= SLACK, "the sender waited {elapsed:?} for credit");
}

// Attacks.

/// Cancels for ids the peer never used change nothing: the call that waits is not
/// cancelled, the cancels' credit comes back, and the peer keeps serving.
#[tokio::test(start_paused = true)]
async fn cancels_for_ids_never_used_change_nothing() {
    const CANCELS: u64 = 5000;
    let (_server, raw, receiver, probe) = raw_setup(
        WINDOW,
        PeerOptions::default().max_concurrent_handlers(1),
        Options::default(),
    )
    .await;
    let blocker = raw_call(&raw, "hold", Duration::from_secs(3600), (1u64,)).await;
    let p = probe.clone();
    wait_until(|| p.started() == [1]).await;
    let waiting = raw_call(&raw, "sleep", Duration::from_secs(3600), (2u64, 0u64)).await;
    let r = receiver.clone();
    wait_until(|| r.stats().requests_waiting == 1).await;
    let held = receiver
        .connection()
        .expect("its connection")
        .buffered()
        .received;

    let watch = watch(&receiver, Duration::from_millis(1), no_lag());
    let used = [blocker.first_id(), waiting.first_id()];
    let mut sent = 0;
    for id in (0..).map(|i: u64| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) {
        if sent == CANCELS {
            break;
        }
        if !used.contains(&id) {
            raw.send(&(2u8, id), SendOptions::new())
                .await
                .expect("cancel");
            sent += 1;
        }
    }
    // The cancels came in and went: what is held is what was held before.
    barrier(&raw, &receiver).await;
    watch.finish().await;
    assert_eq!(
        receiver
            .connection()
            .expect("its connection")
            .buffered()
            .received,
        held
    );
    assert_eq!(receiver.stats().requests_waiting, 1);

    probe.gate.add_permits(1);
    let mut replies = [recv(&raw).await, recv(&raw).await];
    replies.sort_by_key(|m| m.conversation.first_id());
    let mut expected = [(blocker, 1), (waiting, 2)];
    expected.sort_by_key(|(c, _)| c.first_id());
    for (reply, (conv, value)) in replies.iter().zip(expected) {
        assert_eq!(reply.conversation, conv);
        assert_eq!(ok_value(reply), Some(value));
    }
    assert_eq!(probe.started(), [1, 2]);
    let r = receiver.clone();
    wait_until(|| r.connection().expect("its connection").buffered().received == 0).await;
}

/// A cancel naming a *signal* that waits for a slot (its conversation id is the peer's to
/// name): either the signal still runs or it is dropped and counted; in both cases its
/// credit comes back.
#[tokio::test(start_paused = true)]
async fn a_cancel_naming_a_waiting_signal_neither_loses_it_nor_its_credit() {
    let (_server, raw, receiver, probe) = raw_setup(
        WINDOW,
        PeerOptions::default().max_concurrent_handlers(1),
        Options::default(),
    )
    .await;
    let blocker = raw_call(&raw, "hold", Duration::from_secs(3600), (1u64,)).await;
    let p = probe.clone();
    wait_until(|| p.started() == [1]).await;
    let held_by_blocker = receiver
        .connection()
        .expect("its connection")
        .buffered()
        .received;
    let signal = raw
        .send(
            &(1u8, OBJECT, "tick", 3_600_000u64, (7u64,)),
            SendOptions::new(),
        )
        .await
        .expect("signal");
    let r = receiver.clone();
    wait_until(|| r.stats().requests_waiting == 1).await;
    raw.send(&(2u8, signal.first_id()), SendOptions::new())
        .await
        .expect("cancel");
    barrier(&raw, &receiver).await;

    probe.gate.add_permits(1);
    let reply = recv(&raw).await;
    assert_eq!(reply.conversation, blocker);
    ping_raw(&raw).await;
    let r = receiver.clone();
    let released = timeout(
        Duration::from_secs(10),
        wait_until(|| r.connection().expect("its connection").buffered().received == 0),
    )
    .await;
    let stats = receiver.stats();
    let barriers = 1;
    let outcomes = probe.ticks.load(Ordering::Acquire)
        + (stats.signals_expired_on_arrival - barriers)
        + stats.signals_failed;
    let held = receiver
        .connection()
        .expect("its connection")
        .buffered()
        .received;
    assert!(
        outcomes == 1 && released.is_ok(),
        "the signal ended {outcomes} times (handled or counted: {stats:?}); {held} bytes still \
         held with nothing running or waiting (a request costs {held_by_blocker})"
    );
}

/// One reliable signal sent again and again while its first copy waits for a slot: it runs
/// once, every copy is acknowledged with its outcome once it ran, and the copies that wait
/// are held within the window.
#[tokio::test(start_paused = true)]
async fn duplicate_reliable_signals_run_once_and_are_held_within_the_window() {
    const COPIES: u64 = 1000;
    const WINDOW: u32 = 32 * 1024;
    const STREAM: u64 = 0x6261_636b_7072_6573; // unique in this process: the table is shared
    let (_server, raw, receiver, probe) = raw_setup(
        WINDOW,
        PeerOptions::default().max_concurrent_handlers(1),
        Options::default(),
    )
    .await;
    let blocker = raw_call(&raw, "hold", Duration::from_secs(3600), (1u64,)).await;
    let p = probe.clone();
    wait_until(|| p.started() == [1]).await;

    let watch = watch(&receiver, Duration::from_millis(1), no_lag());
    let attacker = raw.clone();
    let copies = tokio::spawn(async move {
        let copy = (3u8, STREAM, 1u64, OBJECT, "tick", 3_600_000u64, (9u64,));
        for _ in 0..COPIES {
            attacker
                .send(&copy, SendOptions::new())
                .await
                .expect("copy");
        }
    });
    // The window fills with copies; the sender waits.
    let r = receiver.clone();
    wait_until(|| {
        r.connection().expect("its connection").buffered().received + 2048 >= u64::from(WINDOW)
    })
    .await;
    settle().await;
    assert!(
        !copies.is_finished(),
        "all {COPIES} copies sent into a {WINDOW}-byte window"
    );
    assert_eq!(receiver.stats().requests_waiting, 1);

    probe.gate.add_permits(1);
    timeout(HANG_GUARD, copies)
        .await
        .expect("hang")
        .expect("task");
    let mut acks = 0;
    while acks < COPIES {
        let msg = recv(&raw).await;
        if msg.conversation == blocker {
            assert_eq!(ok_value(&msg), Some(1));
            continue;
        }
        let (kind, stream, seq, status): (u8, u64, u64, u8) = msg.decode().expect("an ack");
        assert_eq!((kind, stream, seq, status), (4, STREAM, 1, 0));
        acks += 1;
    }
    let peaks = watch.finish().await;
    assert_eq!(probe.ticks.load(Ordering::Acquire), 1);
    assert!(peaks.held <= u64::from(WINDOW), "{peaks:?}");
    assert!(peaks.waiting <= 1, "{peaks:?}");
    let r = receiver.clone();
    wait_until(|| r.connection().expect("its connection").buffered().received == 0).await;
}

/// A flood of the smallest signals there are, waiting for a slot: the backlog's memory per
/// entry stays in proportion to what each is charged (body + 64 bytes), so the window
/// still bounds the memory.
#[tokio::test(start_paused = true)]
async fn a_flood_of_tiny_signals_costs_memory_in_proportion_to_the_window() {
    const WINDOW: u32 = 1024 * 1024;
    let (_server, raw, receiver, probe) = raw_setup(
        WINDOW,
        PeerOptions::default().max_concurrent_handlers(1),
        Options::default(),
    )
    .await;
    raw_call(&raw, "hold", Duration::from_secs(3600), (1u64,)).await;
    let p = probe.clone();
    wait_until(|| p.started() == [1]).await;
    let held_before = receiver
        .connection()
        .expect("its connection")
        .buffered()
        .received;

    let watch = watch(&receiver, Duration::from_millis(1), no_lag());
    let sent = fill_window(&raw, &receiver, |seq| {
        (1u8, OBJECT, "tick", 3_600_000u64, (seq,))
    })
    .await;
    let peaks = watch.finish().await;
    let held = receiver
        .connection()
        .expect("its connection")
        .buffered()
        .received
        - held_before;
    let waiting = receiver.stats().requests_waiting;
    assert_eq!(waiting, sent);
    assert!(held <= u64::from(WINDOW));
    assert!(held >= u64::from(WINDOW) / 2, "{held} held");
    // Measured: about 320 heap bytes per waiting signal charged 93. A spawned task per
    // waiting request (what the backlog replaced) costs over 1 KiB.
    assert!(
        peaks.heap <= 6 * held as i64,
        "{waiting} waiting signals charged {held} bytes take {} heap bytes ({} each)",
        peaks.heap,
        peaks.heap / waiting as i64
    );
    assert_eq!(probe.ticks.load(Ordering::Acquire), 0);
}

/// Small messages that wait for a slot must not keep alive the buffers of the messages
/// they arrived with, once those were given back: an allocation held by received messages
/// stays within about twice the credit it is charged (`SHARE_AT_LEAST` in chatter-core,
/// docs/SECURITY.md: "the allocations behind them ≤ 2 × receive_window").
#[tokio::test(start_paused = true)]
async fn waiting_tiny_signals_do_not_pin_the_buffers_of_released_messages() {
    const WINDOW: u32 = 256 * 1024;
    const PAIRS: u64 = 600;
    const FILLER: usize = 8 * 1024;
    let (_server, raw, receiver, probe) = raw_setup(
        WINDOW,
        PeerOptions::default().max_concurrent_handlers(1),
        Options::default(),
    )
    .await;
    raw_call(&raw, "hold", Duration::from_secs(3600), (1u64,)).await;
    let p = probe.clone();
    wait_until(|| p.started() == [1]).await;

    let base = tests::heap::heap_live();
    let watch = watch(&receiver, Duration::from_millis(1), no_lag());
    // A large message first, so that the read buffer grows to its kept size.
    let filler = "f".repeat(FILLER);
    let large = "L".repeat(48 * 1024);
    raw.send(
        &(1u8, OBJECT, "slow", 0u64, (0u64, &large)),
        SendOptions::new(),
    )
    .await
    .expect("large");
    // Each tiny signal waits for the slot; each filler expires on arrival (TTL 0) and is
    // given back at once.
    for seq in 0..PAIRS {
        raw.send(
            &(1u8, OBJECT, "slow", 0u64, (seq, &filler)),
            SendOptions::new(),
        )
        .await
        .expect("filler");
        raw.send(
            &(1u8, OBJECT, "tick", 3_600_000u64, (seq,)),
            SendOptions::new(),
        )
        .await
        .expect("tiny");
    }
    let r = receiver.clone();
    wait_until(|| r.stats().requests_waiting == PAIRS).await;
    settle().await;
    let peaks = watch.finish().await;
    let held = receiver
        .connection()
        .expect("its connection")
        .buffered()
        .received;
    assert_eq!(receiver.stats().signals_expired_on_arrival, PAIRS + 1);
    // Once they ran, what they kept is freed: it was theirs.
    probe.gate.add_permits(1);
    let p = probe.clone();
    wait_until(|| p.ticks.load(Ordering::Acquire) == PAIRS).await;
    settle().await;
    let after = tests::heap::heap_live() - base;
    // The backlog's own entries (see the test above) plus twice what is charged.
    let bound = 6 * held as i64 + 2 * i64::from(WINDOW);
    assert!(
        peaks.heap <= bound,
        "{PAIRS} waiting tiny signals charged {held} bytes kept {} heap bytes (bound {bound}); \
         {after} once they ran",
        peaks.heap
    );
}

// Helpers.

/// Two peers over TCP: `receiver` (the accepted side, hosting a [`Worker`]) with a window of
/// `window` bytes, and `sender`, with `work` a client of the receiver's object.
struct Setup {
    _server: Server,
    sender: Peer,
    receiver: Peer,
    work: WorkClient,
    probe: Arc<Probe>,
}

async fn setup(window: u32, receiver: PeerOptions, sender: PeerOptions) -> Setup {
    let (server, client, accepted) = pair_with(
        Transport::Tcp,
        receiver_options(window),
        Options::default().no_keepalive(),
    )
    .await;
    let probe = Probe::new();
    let receiver = Peer::with_options(accepted, receiver);
    receiver.register(OBJECT, WorkServer::new(Worker(probe.clone())));
    let sender = Peer::with_options(client, sender);
    let work = WorkClient::new(&sender, OBJECT);
    Setup {
        _server: server,
        sender,
        receiver,
        work,
        probe,
    }
}

/// A receiver's connection options: `window`, frames of up to a quarter of it, and no
/// keepalive (the paused clock may jump past it while only I/O is pending).
fn receiver_options(window: u32) -> Options {
    Options::default()
        .receive_window(window)
        .max_frame_size(window / 4)
        .no_keepalive()
}

/// A receiving peer and a raw chatter-core connection to it (the attacker, which builds
/// its envelopes by hand as PROTOCOL.md describes).
async fn raw_setup(
    window: u32,
    receiver: PeerOptions,
    attacker: Options,
) -> (Server, Connection, Peer, Arc<Probe>) {
    raw_setup_with(receiver_options(window), receiver, attacker).await
}

async fn raw_setup_with(
    server: Options,
    receiver: PeerOptions,
    attacker: Options,
) -> (Server, Connection, Peer, Arc<Probe>) {
    let (server, raw, accepted) = pair_with(Transport::Tcp, server, attacker).await;
    let probe = Probe::new();
    let receiver = Peer::with_options(accepted, receiver);
    receiver.register(OBJECT, WorkServer::new(Worker(probe.clone())));
    (server, raw, receiver, probe)
}

/// Sends `[0, object, method, deadline_ms, args]` in a new conversation passing the turn,
/// without a local timeout.
async fn raw_call<A: Serialize>(
    raw: &Connection,
    method: &str,
    deadline: Duration,
    args: A,
) -> chatter_core::Conversation {
    let envelope = (0u8, OBJECT, method, deadline.as_millis() as u64, args);
    raw.send(&envelope, SendOptions::new().last(false))
        .await
        .expect("send a call")
}

/// A call of `ping` by hand and its reply (needs a free handler slot).
async fn ping_raw(raw: &Connection) {
    let conv = raw_call(raw, "ping", Duration::from_secs(3600), ()).await;
    let reply = recv(raw).await;
    assert_eq!(reply.conversation, conv);
}

/// Sends a signal with TTL 0 by hand and waits until the receiver counted it as expired on
/// arrival: the receiver took everything sent before it (messages are taken in order),
/// whatever its handler slots are doing.
async fn barrier(raw: &Connection, receiver: &Peer) {
    let before = receiver.stats().signals_expired_on_arrival;
    raw.send(&(1u8, OBJECT, "tick", 0u64, (0u64,)), SendOptions::new())
        .await
        .expect("barrier");
    wait_until(|| receiver.stats().signals_expired_on_arrival > before).await;
}

async fn recv(raw: &Connection) -> Msg {
    timeout(HANG_GUARD, raw.receive())
        .await
        .expect("hang")
        .expect("a message")
}

/// The failure kind of a reply `[2, kind, message]`.
fn failure_kind(reply: &Msg) -> Option<u8> {
    match reply.decode::<(u8, u8, String)>() {
        Ok((2, kind, _)) => Some(kind),
        _ => None,
    }
}

/// The value of a reply `[0, value]`.
fn ok_value(reply: &Msg) -> Option<u64> {
    match reply.decode::<(u8, u64)>() {
        Ok((0, value)) => Some(value),
        _ => None,
    }
}

/// Failure kind 1 (PROTOCOL.md).
const DEADLINE_EXCEEDED: u8 = 1;

/// chatter-core's default `receive_window` and `send_buffer`.
const DEFAULT_WINDOW: u32 = 8 * 1024 * 1024;
const DEFAULT_SEND_BUFFER: u32 = 1024 * 1024;

/// At least what a call to `sleep(tag, ms)` with any deadline costs: 64 + the envelope
/// `[0, "work", "sleep", deadline_ms, [tag, ms]]` (20 bytes at the least).
const MIN_CALL_COST: u64 = OVERHEAD + 20;

/// Sends `signal(seq)` envelopes until the receiver's window is full (everything sent
/// arrived and the connection takes no more); returns how many were sent.
async fn fill_window<S: Serialize>(
    raw: &Connection,
    receiver: &Peer,
    signal: impl Fn(u64) -> S,
) -> u64 {
    let encode = |seq| {
        let mut bytes = Vec::new();
        chatter_core::codec::encode(&mut bytes, &signal(seq)).expect("encode");
        bytes
    };
    let mut sent = 0;
    loop {
        match raw.try_send(&encode(sent), SendOptions::new()) {
            Ok(_) => sent += 1,
            Err(SendError::WouldBlock) => {
                if receiver.stats().requests_waiting == sent {
                    settle().await;
                    if raw.try_send(&encode(sent), SendOptions::new()).is_err() {
                        return sent;
                    }
                    sent += 1;
                } else {
                    sleep(Duration::from_millis(1)).await;
                }
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

/// Sends slow signals `signals` of [`PAD`] bytes through `work` in order, as fast as
/// the sender takes them, counting each accepted one; returns how many times the sender
/// refused one. Today a plain peer's full outbox refuses a signal (`OutboxFull`) where
/// issue 15 has the future wait: this sender then waits until the outbox drained and sends
/// it again, as a user has to (once the future waits, that branch never runs).
async fn flood(
    sender: Peer,
    work: WorkClient,
    signals: std::ops::Range<u64>,
    accepted: Arc<AtomicU64>,
) -> u64 {
    let pad = "s".repeat(PAD);
    let mut refused = 0;
    for seq in signals {
        loop {
            match work.slow(seq, pad.clone()).await {
                Ok(_) => break,
                Err(SignalError::OutboxFull) => {
                    refused += 1;
                    sender.flush().await;
                }
                Err(e) => panic!("signal {seq}: {e:?}"),
            }
        }
        accepted.fetch_add(1, Ordering::AcqRel);
    }
    refused
}

/// How far the sender is ahead of the receiver's handlers: accepted, not yet handled.
fn lag(accepted: &Arc<AtomicU64>, probe: &Arc<Probe>) -> Box<dyn Fn() -> u64 + Send> {
    let (accepted, probe) = (accepted.clone(), probe.clone());
    Box::new(move || {
        accepted
            .load(Ordering::Acquire)
            .saturating_sub(probe.handled())
    })
}

fn no_lag() -> Box<dyn Fn() -> u64 + Send> {
    Box::new(|| 0)
}

/// The peaks of what a receiving peer held while watched.
#[derive(Debug, Default, Clone, Copy)]
struct Peaks {
    /// Flow-control bytes held (`buffered().received`).
    held: u64,
    /// Requests waiting for a handler slot.
    waiting: u64,
    /// Everything the connection buffers (`buffered().total()`).
    buffered: u64,
    /// How far the sender was ahead (see [`lag`]).
    lag: u64,
    /// Heap bytes live on this thread beyond those when the watch began.
    heap: i64,
}

/// A running watch: samples a receiving peer every `every` (virtual time) until finished.
struct Watch {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Peaks>,
}

impl Watch {
    async fn finish(self) -> Peaks {
        self.stop.store(true, Ordering::Release);
        self.task.await.expect("watch")
    }
}

fn watch(receiver: &Peer, every: Duration, lag: Box<dyn Fn() -> u64 + Send>) -> Watch {
    let receiver = receiver.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let base = tests::heap::heap_live();
    let task = tokio::spawn(async move {
        let mut peaks = Peaks::default();
        loop {
            let buffered = receiver.connection().expect("its connection").buffered();
            peaks.held = peaks.held.max(buffered.received);
            peaks.buffered = peaks.buffered.max(buffered.total());
            peaks.waiting = peaks.waiting.max(receiver.stats().requests_waiting);
            peaks.lag = peaks.lag.max(lag());
            peaks.heap = peaks.heap.max(tests::heap::heap_live() - base);
            if stopped.load(Ordering::Acquire) {
                return peaks;
            }
            sleep(every).await;
        }
    });
    Watch { stop, task }
}

/// Lets 100 ms of virtual time pass: whatever the peers would do with what they have, they
/// did (for asserting that something does *not* happen).
async fn settle() {
    sleep(Duration::from_millis(100)).await;
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[global_allocator]
static ALLOCATOR: tests::heap::Counting = tests::heap::Counting;
