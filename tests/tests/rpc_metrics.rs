//! chatter-rpc's metrics (the `metrics` feature): the `PeerStats` counters and the call
//! and handler duration histograms, read back from a recorder of the test's own.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatter_rpc::telemetry::{CALL_DURATION, COUNTERS, HANDLER_DURATION};
use chatter_rpc::{connect, listen, remote, CallError, Options, Peer};
use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

/// A metric's name and labels, as `name{k=v,...}` with the labels sorted.
fn id(key: &Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

#[derive(Default)]
struct Count(AtomicU64);

impl CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Values(Mutex<Vec<f64>>);

impl HistogramFn for Values {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

/// Every counter and histogram registered, by [`id`].
#[derive(Default)]
struct Capture {
    counters: Mutex<BTreeMap<String, Arc<Count>>>,
    histograms: Mutex<BTreeMap<String, Arc<Values>>>,
}

impl Capture {
    fn counter(&self, name: &str) -> u64 {
        let counters = self.counters.lock().unwrap();
        counters
            .get(&format!("{name}{{}}"))
            .map_or(0, |c| c.0.load(Ordering::Relaxed))
    }

    fn histogram(&self, id: &str) -> Vec<f64> {
        let histograms = self.histograms.lock().unwrap();
        histograms
            .get(id)
            .map(|h| h.0.lock().unwrap().clone())
            .unwrap_or_default()
    }
}

impl Recorder for Capture {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.counters.lock().unwrap();
        Counter::from_arc(counters.entry(id(key)).or_default().clone())
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut histograms = self.histograms.lock().unwrap();
        Histogram::from_arc(histograms.entry(id(key)).or_default().clone())
    }
}

#[remote]
pub trait Timed {
    /// Sleeps `ms` (on the paused clock), then answers.
    async fn wait(&self, ms: u64) -> u64;
    /// Fails with an application error.
    async fn refuse(&self) -> Result<(), String>;
    #[signal]
    async fn note(&self);
}

struct Handler;

impl Timed for Handler {
    async fn wait(&self, ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
    }
    async fn refuse(&self) -> Result<(), String> {
        Err("no".to_owned())
    }
    async fn note(&self) {}
}

// The recorder is this thread's (the test runtime runs on it): it sees the peers made
// here, and nothing from other tests.
#[tokio::test(start_paused = true)]
async fn counters_mirror_peer_stats_and_durations_are_recorded() {
    let capture = Capture::default();
    let _guard = metrics::set_default_local_recorder(&capture);

    let listener = listen("tcp://127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let conn = connect(&listener.addresses()[0], Options::default())
        .await
        .unwrap();
    let server = Peer::new(listener.accept().await.unwrap());
    server.register("timed", TimedServer::new(Handler));
    let client = Peer::new(conn);
    let timed = TimedClient::new(&client, "timed");

    assert_eq!(timed.wait(0).await.unwrap(), 0);
    assert_eq!(timed.wait(1500).await.unwrap(), 1500);
    assert!(matches!(timed.refuse().await, Err(CallError::App { .. })));
    timed.note().await.unwrap();
    // The signal's handler ran once `calls` below is answered (one connection, in order).
    let _ = timed.wait(0).await;

    // Counters: one per `PeerStats` field, each what the stats say (summed over the two
    // peers of this process).
    let (c, s) = (client.stats(), server.stats());
    assert_eq!(capture.counter("chatter_rpc_calls_received_total"), 4);
    assert_eq!(
        capture.counter("chatter_rpc_calls_received_total"),
        c.calls_received + s.calls_received
    );
    assert_eq!(
        capture.counter("chatter_rpc_signals_delivered_total"),
        c.signals_delivered + s.signals_delivered
    );
    assert_eq!(capture.counter("chatter_rpc_signals_delivered_total"), 1);
    assert_eq!(
        capture.counter("chatter_rpc_connects_total"),
        c.connects + s.connects
    );
    assert_eq!(COUNTERS.len(), 14, "every PeerStats counter has a metric");
    for (_, name) in COUNTERS {
        assert!(
            capture
                .counters
                .lock()
                .unwrap()
                .contains_key(&format!("{name}{{}}")),
            "{name} registered"
        );
    }

    // Histograms: per object, method and outcome; the slow call took its 1.5 s.
    let calls = capture.histogram(&format!(
        "{CALL_DURATION}{{method=wait,object=timed,outcome=ok}}"
    ));
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(calls.iter().any(|&d| (1.5..1.6).contains(&d)), "{calls:?}");
    let handlers = capture.histogram(&format!(
        "{HANDLER_DURATION}{{kind=call,method=wait,object=timed,outcome=ok}}"
    ));
    assert_eq!(handlers.len(), 3, "{handlers:?}");
    // One handler completed in place (zero time on the paused clock), one in a task.
    assert!(handlers.contains(&0.0), "{handlers:?}");
    assert!(handlers.iter().any(|&d| d >= 1.5), "{handlers:?}");
    let refused = capture.histogram(&format!(
        "{CALL_DURATION}{{method=refuse,object=timed,outcome=app_error}}"
    ));
    assert_eq!(refused.len(), 1);
    let app_error = capture.histogram(&format!(
        "{HANDLER_DURATION}{{kind=call,method=refuse,object=timed,outcome=app_error}}"
    ));
    assert_eq!(app_error.len(), 1);
    let signals = capture.histogram(&format!(
        "{HANDLER_DURATION}{{kind=signal,method=note,object=timed,outcome=ok}}"
    ));
    assert_eq!(signals.len(), 1);
}
