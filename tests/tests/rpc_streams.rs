//! Typed streams end to end (issue 16, items 2 and 3): generated clients over TCP and Unix
//! sockets, with the semantics `docs/design/streams.md` states.
//!
//! - items arrive in order, each exactly once, and the stream ends with `None`; a typed
//!   application error before the stream opens is `CallError::App`; a producer that panics
//!   ends the stream with `StreamError::RemotePanic`; a lost connection with
//!   `StreamError::ConnectionLost`;
//! - dropping either end stops the other: the callee's `Sender` fails with `Closed` when
//!   the caller drops its result `Receiver`, the caller's `Sender` when the callee drops its
//!   argument `Receiver` (or its handler stops because the caller dropped the result);
//!   a caller that drops its `Sender` ends the callee's stream normally;
//! - the call's deadline covers opening the stream, not the stream after it opened (result
//!   or argument stream); the reader's idle timeout ends a silent stream (paused clock);
//! - flow control is per stream: an unread stream stalls only itself, with at most its
//!   window held, while other streams, calls and signals on the connection keep flowing;
//!   `max_streams` bounds the streams of a connection; a stream moves far more bytes than
//!   a frame can hold.
//!
//! No test waits for time to pass as synchronisation: each waits for the event it needs
//! (an item, a reply, a probe's report), under a hang guard.

use std::sync::Arc;
use std::time::Duration;

use chatter_rpc::stream::{self, Receiver, StreamError};
use chatter_rpc::{remote, serve, CallError, Options, Peer, PeerOptions, ReconnectOptions};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tests::proxy::Proxy;
use tests::{pair_with, Transport};
use tokio::sync::{mpsc, watch};

/// The transports every test runs over.
const TRANSPORTS: [Transport; 2] = [Transport::Tcp, Transport::Unix];

/// The most numbers `numbers` streams; more is its typed error, before the stream opens.
const LIMIT: u64 = 1_000_000;

/// A hang guard only: fires when a test that should complete does not.
const HANG_GUARD: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FeedError {
    /// Asked for more than [`LIMIT`] numbers.
    TooMany(u64),
    /// The argument stream failed (its error, as text).
    Broken(String),
}

impl std::fmt::Display for FeedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FeedError::TooMany(n) => write!(f, "{n} numbers is more than {LIMIT}"),
            FeedError::Broken(e) => write!(f, "argument stream failed: {e}"),
        }
    }
}

/// An alias of `Result`, for a `#[result]` method returning a stream.
pub type Res<T> = Result<T, FeedError>;

/// A chunk of bytes, as MessagePack bin (not an array of numbers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk(#[serde(with = "serde_bytes")] pub Vec<u8>);

#[remote]
pub trait Feeds {
    /// Server streaming: `count` numbers from `from` on; above [`LIMIT`], the typed error
    /// before the stream opens.
    async fn numbers(&self, from: u64, count: u64) -> Result<Receiver<u64>, FeedError>;
    /// `numbers` through a `#[result]` alias.
    #[result]
    async fn aliased(&self, from: u64, count: u64) -> Res<Receiver<u64>>;
    /// `after` numbers, then the producer panics.
    async fn panicky(&self, after: u64) -> Receiver<u64>;
    /// Sends 0, then waits until its reader is gone (`Sender::closed`) and tries to send
    /// again; reports both on the probe.
    async fn watched(&self) -> Receiver<u64>;
    /// Numbers for as long as someone reads.
    async fn endless(&self) -> stream::Receiver<u64>;
    /// Client streaming: the sum of the argument stream, which must end normally (its
    /// error is reported on the probe, and returned).
    async fn sum(&self, items: Receiver<u64>) -> Result<u64, FeedError>;
    /// `sum`, with an idle timeout of `idle_ms` on the argument stream.
    async fn sum_within(&self, idle_ms: u64, items: Receiver<u64>) -> Result<u64, FeedError>;
    /// Reads `n` items of the argument stream, then drops it.
    async fn take(&self, n: u64, items: Receiver<u64>) -> Vec<u64>;
    /// Both ways: each line back, upper-cased, until the input ends.
    async fn echo(&self, input: Receiver<String>) -> Receiver<String>;
    /// Waits `ms` before it returns a stream of one item.
    async fn slow_open(&self, ms: u64) -> Receiver<u64>;
    /// Opens at once, sends 7 after `ms`, then ends.
    async fn late_item(&self, ms: u64) -> Receiver<u64>;
    /// `total` bytes of [`pattern`], in chunks of `chunk` bytes.
    async fn download(&self, total: u64, chunk: u64) -> Receiver<Chunk>;
    /// How many bytes arrived, and whether they were [`pattern`] (`Bytes` items: MessagePack
    /// bin, as `Chunk`s are).
    async fn upload(&self, data: Receiver<bytes::Bytes>) -> (u64, bool);
    /// Chunks of `size` bytes without end, counting on the probe each one its producer
    /// handed over.
    async fn counted(&self, size: u64) -> Receiver<Chunk>;
    /// Items that are the application's own results: `Ok(i)` for `0..n`, `Err` for 3.
    async fn results(&self, n: u64) -> Receiver<Result<u64, FeedError>>;
    /// Panics before it returns a stream.
    async fn panics_first(&self) -> Receiver<u64>;
    /// Both ways, or the typed error before the stream opens (when `fail`), without
    /// reading the argument stream.
    async fn doubled(&self, fail: bool, input: Receiver<u64>) -> Result<Receiver<u64>, FeedError>;
    /// Waits until the test opens the gate, then counts the chunks of `items`.
    async fn hold(&self, items: Receiver<Chunk>) -> u64;
    /// Returns 1: an ordinary call beside the streams.
    async fn ping(&self) -> u64;
    /// Reports `n`: a signal beside the streams.
    #[signal]
    async fn note(&self, n: u64);
}

/// What the callee reports to the test.
#[derive(Debug, PartialEq)]
enum Report {
    /// `watched`: `Sender::closed` resolved.
    Closed,
    /// `watched`: the send after that failed with `Closed`, handing the item back.
    SendFailed(u64),
    /// `note`: the signal arrived.
    Note(u64),
    /// `sum`: the argument stream failed.
    InputFailed(StreamError),
}

#[derive(Clone)]
struct Feeder {
    reports: mpsc::UnboundedSender<Report>,
    /// Chunks `counted` handed over.
    counted: Arc<watch::Sender<u64>>,
    /// `hold` waits for a permit before it reads.
    gate: Arc<tokio::sync::Semaphore>,
}

impl Feeds for Feeder {
    async fn numbers(&self, from: u64, count: u64) -> Result<Receiver<u64>, FeedError> {
        if count > LIMIT {
            return Err(FeedError::TooMany(count));
        }
        Ok(Receiver::from_stream(futures::stream::iter(
            from..from + count,
        )))
    }

    async fn aliased(&self, from: u64, count: u64) -> Res<Receiver<u64>> {
        self.numbers(from, count).await
    }

    async fn panicky(&self, after: u64) -> Receiver<u64> {
        Receiver::from_stream(futures::stream::iter(0..).map(move |i| {
            if i == after {
                panic!("the producer gave up at {i}");
            }
            i
        }))
    }

    async fn watched(&self) -> Receiver<u64> {
        let (tx, rx) = stream::channel(4);
        let reports = self.reports.clone();
        tokio::spawn(async move {
            tx.send(0).await.expect("the reader is there at first");
            tx.closed().await;
            let _ = reports.send(Report::Closed);
            if let Err(stream::Closed(item)) = tx.send(1).await {
                let _ = reports.send(Report::SendFailed(item));
            }
        });
        rx
    }

    async fn endless(&self) -> Receiver<u64> {
        Receiver::from_stream(futures::stream::iter(0..))
    }

    async fn sum(&self, mut items: Receiver<u64>) -> Result<u64, FeedError> {
        let mut sum = 0;
        while let Some(item) = items.recv().await {
            match item {
                Ok(item) => sum += item,
                Err(e) => {
                    let _ = self.reports.send(Report::InputFailed(e.clone()));
                    return Err(FeedError::Broken(e.to_string()));
                }
            }
        }
        Ok(sum)
    }

    async fn sum_within(&self, idle_ms: u64, mut items: Receiver<u64>) -> Result<u64, FeedError> {
        items.set_idle_timeout(Some(Duration::from_millis(idle_ms)));
        self.sum(items).await
    }

    async fn take(&self, n: u64, mut items: Receiver<u64>) -> Vec<u64> {
        let mut got = Vec::new();
        while (got.len() as u64) < n {
            match items.recv().await {
                Some(Ok(item)) => got.push(item),
                _ => break,
            }
        }
        got
    }

    async fn echo(&self, input: Receiver<String>) -> Receiver<String> {
        // Until the input ends, or fails.
        let lines = input.take_while(|line| std::future::ready(line.is_ok()));
        Receiver::from_stream(
            lines.filter_map(|line| std::future::ready(line.ok().map(|line| line.to_uppercase()))),
        )
    }

    async fn slow_open(&self, ms: u64) -> Receiver<u64> {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Receiver::from_stream(futures::stream::iter([1]))
    }

    async fn late_item(&self, ms: u64) -> Receiver<u64> {
        Receiver::from_stream(futures::stream::once(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            7
        }))
    }

    async fn download(&self, total: u64, chunk: u64) -> Receiver<Chunk> {
        let chunks = (0..total).step_by(chunk as usize);
        Receiver::from_stream(futures::stream::iter(chunks).map(move |start| {
            let end = (start + chunk).min(total);
            Chunk(pattern(start, end))
        }))
    }

    async fn upload(&self, mut data: Receiver<bytes::Bytes>) -> (u64, bool) {
        let (mut length, mut intact) = (0, true);
        while let Some(chunk) = data.recv().await {
            let Ok(bytes) = chunk else {
                return (length, false);
            };
            let end = length + bytes.len() as u64;
            intact &= bytes == pattern(length, end);
            length = end;
        }
        (length, intact)
    }

    async fn counted(&self, size: u64) -> Receiver<Chunk> {
        let counted = self.counted.clone();
        Receiver::from_stream(futures::stream::repeat(()).map(move |()| {
            counted.send_modify(|n| *n += 1);
            Chunk(vec![0x5a; size as usize])
        }))
    }

    async fn results(&self, n: u64) -> Receiver<Result<u64, FeedError>> {
        Receiver::from_stream(futures::stream::iter(0..n).map(|i| match i {
            3 => Err(FeedError::Broken(format!("item {i}"))),
            i => Ok(i),
        }))
    }

    async fn panics_first(&self) -> Receiver<u64> {
        panic!("no stream today")
    }

    async fn doubled(&self, fail: bool, input: Receiver<u64>) -> Result<Receiver<u64>, FeedError> {
        if fail {
            return Err(FeedError::TooMany(0));
        }
        let doubled = input.take_while(|i| std::future::ready(i.is_ok()));
        Ok(Receiver::from_stream(
            doubled.filter_map(|i| std::future::ready(i.ok().map(|i| 2 * i))),
        ))
    }

    async fn hold(&self, mut items: Receiver<Chunk>) -> u64 {
        self.gate.acquire().await.expect("never closed").forget();
        let mut n = 0;
        while let Some(Ok(_)) = items.recv().await {
            n += 1;
        }
        n
    }

    async fn ping(&self) -> u64 {
        1
    }

    async fn note(&self, n: u64) {
        let _ = self.reports.send(Report::Note(n));
    }
}

/// Bytes `start..end` of an endless pattern that a shifted or repeated chunk breaks:
/// byte `i` is `i % 251`. Copied from one period, so that the 64 MiB tests spend their
/// time in the streams, not here (tests build without optimisations).
fn pattern(start: u64, end: u64) -> Vec<u8> {
    const PERIOD: usize = 251;
    static CYCLE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    // Two periods: any offset has a whole period after it.
    let cycle = CYCLE.get_or_init(|| (0..2 * PERIOD).map(|i| (i % PERIOD) as u8).collect());
    let mut out = Vec::with_capacity((end - start) as usize);
    let mut at = start;
    while at < end {
        let offset = (at % PERIOD as u64) as usize;
        let n = (PERIOD as u64).min(end - at) as usize;
        out.extend_from_slice(&cycle[offset..offset + n]);
        at += n as u64;
    }
    out
}

/// Two peers over `transport`: `client` calls the [`Feeder`] that `server` hosts.
struct Setup {
    _listener: chatter_core::Server,
    server: Peer,
    feeds: FeedsClient,
    reports: mpsc::UnboundedReceiver<Report>,
    /// How many chunks `counted` handed over.
    counted: watch::Receiver<u64>,
    /// Opens `hold`.
    gate: Arc<tokio::sync::Semaphore>,
}

async fn setup(transport: Transport) -> Setup {
    setup_with(
        transport,
        PeerOptions::default(),
        PeerOptions::default(),
        Options::default(),
    )
    .await
}

async fn setup_with(
    transport: Transport,
    client_options: PeerOptions,
    server_options: PeerOptions,
    connection: Options,
) -> Setup {
    // No keepalive: the paused clock may jump past it while only I/O is pending.
    let connection = connection.no_keepalive();
    let (listener, client, accepted) = pair_with(transport, connection.clone(), connection).await;
    let (tx, reports) = mpsc::unbounded_channel();
    let (counter, counted) = watch::channel(0);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let server = Peer::with_options(accepted, server_options);
    server.register(
        "feeds",
        FeedsServer::new(Feeder {
            reports: tx,
            counted: Arc::new(counter),
            gate: gate.clone(),
        }),
    );
    let client = Peer::with_options(client, client_options);
    let feeds = FeedsClient::new(&client, "feeds");
    Setup {
        _listener: listener,
        server,
        feeds,
        reports,
        counted,
        gate,
    }
}

/// Awaits `f` under the hang guard.
async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(HANG_GUARD, f)
        .await
        .expect("the test hung")
}

/// Every item of `rx` until it ends: the items, and the error it ended with, if any.
async fn drain<T>(rx: &mut Receiver<T>) -> (Vec<T>, Option<StreamError>) {
    let mut items = Vec::new();
    while let Some(item) = rx.recv().await {
        match item {
            Ok(item) => items.push(item),
            Err(e) => return (items, Some(e)),
        }
    }
    (items, None)
}

// Server streaming.

#[tokio::test]
async fn items_arrive_in_order_exactly_once_then_the_stream_ends() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let mut rx = within(s.feeds.numbers(10, 5_000)).await.expect("opened");
        let (items, error) = within(drain(&mut rx)).await;
        assert_eq!(error, None, "{transport:?}");
        assert_eq!(items, (10..5_010).collect::<Vec<_>>(), "{transport:?}");
        // Ended for good.
        assert!(rx.recv().await.is_none());

        // An empty stream ends at once; a `Receiver` is a `futures::Stream` too.
        let rx = within(s.feeds.numbers(0, 0)).await.expect("opened");
        assert_eq!(within(rx.collect::<Vec<_>>()).await, []);
    }
}

#[tokio::test]
async fn a_typed_error_before_the_stream_opens_is_the_calls_error() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        match within(s.feeds.numbers(0, LIMIT + 1)).await {
            Err(CallError::App { error, remote }) => {
                assert_eq!(error, FeedError::TooMany(LIMIT + 1));
                assert_eq!(
                    remote.message,
                    format!("{} numbers is more than {LIMIT}", LIMIT + 1)
                );
            }
            other => panic!("{transport:?}: expected the application error, got {other:?}"),
        }
        // The connection still serves.
        assert_eq!(within(s.feeds.ping()).await.expect("ping"), 1);
    }
}

#[tokio::test]
async fn a_result_alias_returns_a_stream_or_its_error() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let rx = within(s.feeds.aliased(5, 3)).await.expect("opened");
        let items: Vec<_> = within(rx.collect::<Vec<_>>()).await;
        assert_eq!(items, [Ok(5), Ok(6), Ok(7)], "{transport:?}");
        assert!(matches!(
            within(s.feeds.aliased(0, LIMIT + 1)).await,
            Err(CallError::App {
                error: FeedError::TooMany(_),
                ..
            })
        ));
    }
}

#[tokio::test]
async fn a_producer_that_panics_ends_the_stream_with_remote_panic() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let mut rx = within(s.feeds.panicky(3)).await.expect("opened");
        let (items, error) = within(drain(&mut rx)).await;
        assert_eq!(items, [0, 1, 2], "{transport:?}");
        match error {
            Some(StreamError::RemotePanic(message)) => {
                assert!(message.contains("gave up at 3"), "{message}")
            }
            other => panic!("{transport:?}: expected RemotePanic, got {other:?}"),
        }
        assert!(rx.recv().await.is_none(), "the error ends the stream");
        assert_eq!(within(s.feeds.ping()).await.expect("ping"), 1);
    }
}

#[tokio::test]
async fn dropping_the_result_receiver_closes_the_callees_sender() {
    for transport in TRANSPORTS {
        let mut s = setup(transport).await;
        let mut rx = within(s.feeds.watched()).await.expect("opened");
        assert_eq!(within(rx.recv()).await, Some(Ok(0)));
        drop(rx);
        assert_eq!(within(s.reports.recv()).await, Some(Report::Closed));
        assert_eq!(within(s.reports.recv()).await, Some(Report::SendFailed(1)));

        // An endless producer is stopped too: the connection keeps serving.
        let mut rx = within(s.feeds.endless()).await.expect("opened");
        assert_eq!(within(rx.recv()).await, Some(Ok(0)));
        drop(rx);
        assert_eq!(within(s.feeds.ping()).await.expect("ping"), 1);
    }
}

// Client streaming.

#[tokio::test]
async fn the_callee_sums_an_argument_stream_that_the_caller_ends_by_dropping_its_sender() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let (tx, rx) = stream::channel(8);
        let feed = async move {
            for i in 1..=10_000u64 {
                tx.send(i).await.expect("the callee reads");
            }
            // `tx` is dropped here: the callee's stream ends with `None`.
        };
        let (sum, ()) = within(async { tokio::join!(s.feeds.sum(rx), feed) }).await;
        assert_eq!(sum.expect("summed"), 10_000 * 10_001 / 2, "{transport:?}");

        // Nothing to sum: the stream ends at once.
        let (tx, rx) = stream::channel::<u64>(1);
        drop(tx);
        assert_eq!(within(s.feeds.sum(rx)).await.expect("summed"), 0);
    }
}

#[tokio::test]
async fn the_callee_dropping_its_argument_stream_fails_the_callers_sender() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let (tx, rx) = stream::channel(4);
        let feed = async move {
            let mut next = 0u64;
            loop {
                match tx.send(next).await {
                    Ok(()) => next += 1,
                    Err(stream::Closed(item)) => break (next, item),
                }
            }
        };
        let (taken, (sent, refused)) =
            within(async { tokio::join!(s.feeds.take(3, rx), feed) }).await;
        assert_eq!(taken.expect("taken"), [0, 1, 2], "{transport:?}");
        assert!(sent >= 3, "{transport:?}: {sent}");
        assert_eq!(refused, sent, "the refused item is handed back");
    }
}

/// On the paused clock, so that a hang fails at once (virtual time) instead of after the
/// guard's minute.
#[tokio::test(start_paused = true)]
async fn a_callers_producer_that_panics_fails_the_callees_argument_stream() {
    for transport in TRANSPORTS {
        let mut s = setup(transport).await;
        let items = Receiver::from_stream(futures::stream::iter(1..).map(|i| {
            if i == 4 {
                panic!("the caller's producer gave up at {i}");
            }
            i
        }));
        match within(s.feeds.sum(items)).await {
            Err(CallError::App {
                error: FeedError::Broken(_),
                ..
            }) => {}
            other => panic!("{transport:?}: expected the broken stream, got {other:?}"),
        }
        match within(s.reports.recv()).await {
            Some(Report::InputFailed(StreamError::RemotePanic(what))) => {
                assert!(what.contains("gave up at 4"), "{transport:?}: {what}")
            }
            other => panic!("{transport:?}: expected RemotePanic, got {other:?}"),
        }
    }
}

// Both ways.

#[tokio::test]
async fn bidirectional_echo() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let (tx, input) = stream::channel(2);
        let mut output = within(s.feeds.echo(input)).await.expect("opened");
        // One line at a time: each answer comes back before the next line goes.
        for line in ["alpha", "beta", "gamma"] {
            tx.send(line.to_owned()).await.expect("sent");
            assert_eq!(
                within(output.recv()).await,
                Some(Ok(line.to_uppercase())),
                "{transport:?}"
            );
        }
        drop(tx);
        assert_eq!(within(output.recv()).await, None, "{transport:?}");

        // The caller drops the result stream: the callee's handler stops, and with it its
        // reading of the argument stream, so the caller's sender fails.
        let (tx, input) = stream::channel(2);
        let mut output = within(s.feeds.echo(input)).await.expect("opened");
        tx.send("one".to_owned()).await.expect("sent");
        assert_eq!(within(output.recv()).await, Some(Ok("ONE".to_owned())));
        drop(output);
        let refused = within(async {
            loop {
                if let Err(stream::Closed(line)) = tx.send("more".to_owned()).await {
                    break line;
                }
            }
        })
        .await;
        assert_eq!(refused, "more", "{transport:?}");
    }
}

#[tokio::test]
async fn application_errors_mid_stream_are_items() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let rx = within(s.feeds.results(5)).await.expect("opened");
        let items: Vec<_> = within(rx.collect::<Vec<_>>()).await;
        let broken = Err(FeedError::Broken("item 3".into()));
        assert_eq!(
            items,
            [Ok(Ok(0)), Ok(Ok(1)), Ok(Ok(2)), Ok(broken), Ok(Ok(4))],
            "{transport:?}"
        );
    }
}

#[tokio::test]
async fn many_streams_at_once_each_arrive_whole_and_in_order() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let streams = (0..50u64).map(|n| {
            let feeds = s.feeds.clone();
            async move {
                let mut rx = feeds.numbers(n * 1_000, 1_000).await.expect("opened");
                drain(&mut rx).await
            }
        });
        let all = within(futures::future::join_all(streams)).await;
        for (n, (items, error)) in (0..).zip(all) {
            assert_eq!(error, None, "{transport:?}: stream {n}");
            let expected: Vec<u64> = (n * 1_000..(n + 1) * 1_000).collect();
            assert!(items == expected, "{transport:?}: stream {n}");
        }
    }
}

#[tokio::test]
async fn a_handler_that_panics_before_its_stream_opens_is_remote_panic() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        match within(s.feeds.panics_first()).await {
            Err(CallError::RemotePanic { .. }) => {}
            other => panic!("{transport:?}: expected RemotePanic, got {other:?}"),
        }
        assert_eq!(within(s.feeds.ping()).await.expect("ping"), 1);
    }
}

#[tokio::test]
async fn an_item_larger_than_the_window_ends_the_stream_with_an_error() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        // One chunk of 1.2 MiB against the default window of 1 MiB.
        let mut rx = within(s.feeds.download(1200 * 1024, 1200 * 1024))
            .await
            .expect("opened");
        let (items, error) = within(drain(&mut rx)).await;
        assert!(items.is_empty(), "{transport:?}");
        match error {
            // Said once: not "stream protocol error: stream protocol error: ..".
            Some(StreamError::Protocol(what)) => assert!(
                what.contains("cannot fit") && !what.starts_with("stream protocol error"),
                "{transport:?}: {what}"
            ),
            other => panic!("{transport:?}: expected a protocol error, got {other:?}"),
        }
        assert_eq!(within(s.feeds.ping()).await.expect("ping"), 1);

        // The same in an argument stream: the callee's reader gets an error, not a short
        // stream that looks complete (`upload` says `false` on an error).
        let (tx, rx) = stream::channel(1);
        tx.send(bytes::Bytes::from(vec![0; 1200 * 1024]))
            .await
            .expect("queued");
        drop(tx);
        assert_eq!(
            within(s.feeds.upload(rx)).await.expect("answered"),
            (0, false),
            "{transport:?}"
        );
    }
}

#[tokio::test]
async fn both_ways_with_a_typed_error_before_opening_closes_the_callers_sender() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let (tx, input) = stream::channel(2);
        match within(s.feeds.doubled(true, input)).await {
            Err(CallError::App { error, .. }) => assert_eq!(error, FeedError::TooMany(0)),
            other => panic!("{transport:?}: expected the application error, got {other:?}"),
        }
        // The call is over: nobody reads the argument stream any more.
        let refused = within(async {
            let mut i = 0;
            loop {
                if let Err(stream::Closed(item)) = tx.send(i).await {
                    break item;
                }
                i += 1;
            }
        })
        .await;
        assert!(
            refused < 10,
            "{transport:?}: {refused} items went to a finished call"
        );

        let (tx, input) = stream::channel(2);
        let mut output = within(s.feeds.doubled(false, input)).await.expect("opened");
        tx.send(21).await.expect("sent");
        assert_eq!(within(output.recv()).await, Some(Ok(42)), "{transport:?}");
    }
}

/// Another version of [`Feeds`]: its `sum` takes an extra argument the callee does not
/// expect, its `numbers` a count of another type; `ping` streams here but not there,
/// `endless` there but not here, `missing` is nowhere, and `results` has items of another
/// type.
#[remote]
pub trait FeedsV2 {
    async fn sum(&self, label: String, items: Receiver<u64>) -> Result<u64, FeedError>;
    async fn numbers(&self, from: u64, count: String) -> Result<Receiver<u64>, FeedError>;
    async fn ping(&self) -> Receiver<u64>;
    async fn endless(&self) -> u64;
    async fn missing(&self) -> Receiver<u64>;
    /// Items of another type than the callee sends.
    async fn results(&self, n: u64) -> Receiver<String>;
}

#[tokio::test]
async fn a_stream_call_with_arguments_the_callee_cannot_read_is_refused() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let v2 = FeedsV2Client::new(s.feeds.peer(), "feeds");
        match within(v2.numbers(0, "many".into())).await {
            Err(CallError::BadArguments { .. }) => {}
            other => panic!("{transport:?}: expected BadArguments, got {other:?}"),
        }
        let (tx, items) = stream::channel(2);
        match within(v2.sum("label".into(), items)).await {
            Err(CallError::BadArguments { .. }) => {}
            other => panic!("{transport:?}: expected BadArguments, got {other:?}"),
        }
        // The refused call's argument stream has no reader.
        let refused = within(async {
            let mut i = 0;
            loop {
                if tx.send(i).await.is_err() {
                    break i;
                }
                i += 1;
            }
        })
        .await;
        assert!(
            refused < 10,
            "{transport:?}: {refused} items sent into a refused call"
        );
        assert_eq!(within(s.feeds.ping()).await.expect("ping"), 1);
    }
}

#[tokio::test]
async fn versions_that_disagree_about_streams_fail_clearly() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let v2 = FeedsV2Client::new(s.feeds.peer(), "feeds");
        // A stream call of a method that returns a value.
        match within(v2.ping()).await {
            Err(CallError::Protocol(what)) => assert!(what.contains("has no stream"), "{what}"),
            other => panic!("{transport:?}: expected a protocol error, got {other:?}"),
        }
        // An ordinary call of a method that returns a stream.
        match within(v2.endless()).await {
            Err(CallError::Protocol(what)) => assert!(what.contains("has a stream"), "{what}"),
            other => panic!("{transport:?}: expected a protocol error, got {other:?}"),
        }
        match within(v2.missing()).await {
            Err(CallError::NoSuchMethod { .. }) => {}
            other => panic!("{transport:?}: expected NoSuchMethod, got {other:?}"),
        }
        // Items that do not decode: the stream ends with BadItem, then None.
        let mut rx = within(v2.results(1_000_000)).await.expect("opened");
        match within(rx.recv()).await {
            Some(Err(StreamError::BadItem(_))) => {}
            other => panic!("{transport:?}: expected BadItem, got {other:?}"),
        }
        assert_eq!(within(rx.recv()).await, None, "{transport:?}");
        let nobody = FeedsClient::new(s.feeds.peer(), "nobody");
        match within(nobody.endless()).await {
            Err(CallError::NoSuchObject { .. }) => {}
            other => panic!("{transport:?}: expected NoSuchObject, got {other:?}"),
        }
        assert_eq!(within(s.feeds.ping()).await.expect("ping"), 1);
    }
}

// Failures.

#[tokio::test]
async fn a_lost_connection_ends_the_stream_with_connection_lost() {
    // Unix: the callee's connection closes under its peer mid-stream.
    let s = setup(Transport::Unix).await;
    let mut rx = within(s.feeds.endless()).await.expect("opened");
    for i in 0..10 {
        assert_eq!(within(rx.recv()).await, Some(Ok(i)));
    }
    let connection = s.server.connection().expect("connected");
    tokio::spawn(async move { connection.close().await });
    let error = loop {
        match within(rx.recv()).await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("a lost connection ends the stream with an error, not None"),
        }
    };
    assert!(matches!(error, StreamError::ConnectionLost(_)), "{error:?}");
    assert!(rx.recv().await.is_none());

    // TCP, through a reconnecting peer: the connection is cut under it; the stream is not
    // resumed on the next connection, it fails.
    let listener = chatter_rpc::listen("tcp://127.0.0.1:0", Options::default())
        .await
        .expect("listen");
    let (tx, _reports) = mpsc::unbounded_channel();
    let feeder = Feeder {
        reports: tx,
        counted: Arc::new(watch::channel(0).0),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let server = serve(listener, PeerOptions::default(), move |peer: &Peer| {
        peer.register("feeds", FeedsServer::new(feeder.clone()));
    });
    let target = server.addresses()[0]
        .to_string()
        .trim_start_matches("tcp://")
        .parse()
        .expect("a socket address");
    let proxy = Proxy::start(target).await;
    let peer = Peer::reconnecting(
        proxy.address(),
        Options::default(),
        PeerOptions::default(),
        ReconnectOptions::default(),
    )
    .expect("a valid address");
    let feeds = FeedsClient::new(&peer, "feeds");
    let mut rx = within(feeds.endless()).await.expect("opened");
    for i in 0..10 {
        assert_eq!(within(rx.recv()).await, Some(Ok(i)));
    }
    proxy.cut_all();
    let error = loop {
        match within(rx.recv()).await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("a lost connection ends the stream with an error, not None"),
        }
    };
    assert!(matches!(error, StreamError::ConnectionLost(_)), "{error:?}");
}

#[tokio::test]
async fn a_lost_connection_fails_an_argument_stream_on_both_sides() {
    for transport in TRANSPORTS {
        let mut s = setup(transport).await;
        let (tx, items) = stream::channel(4);
        let call = tokio::spawn(s.feeds.sum(items));
        tx.send(1).await.expect("sent");
        let connection = s.server.connection().expect("connected");
        tokio::spawn(async move { connection.close().await });
        // The callee's handler sees its argument stream fail, or is dropped with the
        // connection as a call's handler is (then the probe's last sender goes with it).
        match within(s.reports.recv()).await {
            Some(Report::InputFailed(StreamError::ConnectionLost(_))) | None => {}
            other => panic!("{transport:?}: expected ConnectionLost, got {other:?}"),
        }
        // The caller's call fails, and its sender is refused.
        match within(call).await.expect("the call's task") {
            Err(CallError::ConnectionLost(_)) => {}
            other => panic!("{transport:?}: expected ConnectionLost, got {other:?}"),
        }
        let refused = within(async {
            let mut i = 0;
            loop {
                if tx.send(i).await.is_err() {
                    break i;
                }
                i += 1;
            }
        })
        .await;
        assert!(
            refused < 10,
            "{transport:?}: {refused} items sent into a lost call"
        );
    }
}

/// A callee that shuts down gracefully ends its open streams with an error once the grace
/// is over (a stream is not a call that finishes), and refuses new stream calls meanwhile.
#[tokio::test(start_paused = true)]
async fn a_callee_shutting_down_ends_its_streams_with_an_error() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let mut rx = within(s.feeds.endless()).await.expect("opened");
        assert_eq!(within(rx.recv()).await, Some(Ok(0)));
        let server = s.server.clone();
        let shutdown = tokio::spawn(async move { server.shutdown(Duration::from_secs(2)).await });
        // The shutdown task runs first (one thread, and it was scheduled before us).
        tokio::task::yield_now().await;
        assert!(s.server.is_shutting_down());
        match within(s.feeds.numbers(0, 1)).await {
            Err(CallError::ShuttingDown) => {}
            other => panic!("{transport:?}: expected ShuttingDown, got {other:?}"),
        }
        // Not read meanwhile: the stream waits for its reader, the grace runs out.
        let start = tokio::time::Instant::now();
        within(shutdown).await.expect("shut down");
        assert!(start.elapsed() <= Duration::from_secs(3), "{transport:?}");
        let (items, error) = within(drain(&mut rx)).await;
        assert!(
            items.iter().copied().eq(1..=items.len() as u64),
            "{transport:?}: in order"
        );
        match error {
            Some(StreamError::ConnectionLost(_) | StreamError::Cancelled) => {}
            other => panic!("{transport:?}: expected the stream to fail, got {other:?}"),
        }
    }
}

// Deadline and idle timeout (paused clock).

#[tokio::test(start_paused = true)]
async fn the_deadline_covers_opening_the_stream_but_not_the_stream() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let feeds = s.feeds.with_deadline(Duration::from_secs(1));
        // The handler takes 5 s to return its stream: past the deadline.
        match within(feeds.slow_open(5_000)).await {
            Err(CallError::DeadlineExceeded) => {}
            other => panic!("{transport:?}: expected DeadlineExceeded, got {other:?}"),
        }
        // Opened at once, its item comes 5 s later: the deadline no longer applies.
        let start = tokio::time::Instant::now();
        let mut rx = within(feeds.late_item(5_000)).await.expect("opened");
        assert_eq!(within(rx.recv()).await, Some(Ok(7)), "{transport:?}");
        assert!(start.elapsed() >= Duration::from_secs(5));
        assert_eq!(within(rx.recv()).await, None);

        // An argument stream fed for 2.5 s, past the 1 s deadline: the deadline covered
        // its opening only.
        let (tx, items) = stream::channel(1);
        let feed = async move {
            for i in 1..=5u64 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                tx.send(i).await.expect("the callee reads");
            }
        };
        let (sum, ()) = within(async { tokio::join!(feeds.sum(items), feed) }).await;
        assert_eq!(sum.expect("summed past the deadline"), 15, "{transport:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_idle_timeout_ends_a_silent_stream() {
    for transport in TRANSPORTS {
        let mut s = setup(transport).await;
        // Silent for 5 s, idle timeout 1 s.
        let mut rx = within(s.feeds.late_item(5_000)).await.expect("opened");
        rx.set_idle_timeout(Some(Duration::from_secs(1)));
        let start = tokio::time::Instant::now();
        assert_eq!(
            within(rx.recv()).await,
            Some(Err(StreamError::IdleTimeout)),
            "{transport:?}"
        );
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert_eq!(rx.recv().await, None);

        // The callee's own idle timeout on its argument stream: the caller goes silent,
        // the callee's stream ends with IdleTimeout, and the caller's sender is refused.
        let (tx, items) = stream::channel(1);
        tx.send(5).await.expect("sent");
        match within(s.feeds.sum_within(1_000, items)).await {
            Err(CallError::App {
                error: FeedError::Broken(_),
                ..
            }) => {}
            other => panic!("{transport:?}: expected the idle stream's error, got {other:?}"),
        }
        assert_eq!(
            within(s.reports.recv()).await,
            Some(Report::InputFailed(StreamError::IdleTimeout)),
            "{transport:?}"
        );
        assert!(within(tx.send(6)).await.is_err(), "{transport:?}");

        // An item within the timeout keeps the stream alive.
        let mut rx = within(s.feeds.late_item(200)).await.expect("opened");
        rx.set_idle_timeout(Some(Duration::from_secs(10)));
        assert_eq!(within(rx.recv()).await, Some(Ok(7)), "{transport:?}");
        assert_eq!(within(rx.recv()).await, None);
    }
}

// Flow control.

/// The size of the chunks of the flow-control test: about a thousand bytes each against
/// the window.
const CHUNK: u64 = 1_000;

/// The stream window of the flow-control test.
const STREAM_WINDOW: u64 = 256 * 1024;

/// The client connection's receive window in the flow-control test: a quarter of the
/// stream window, so that one unread stream would stall the whole connection if its items
/// held connection credit.
const CONNECTION_WINDOW: u32 = 64 * 1024;

#[tokio::test]
async fn an_unread_stream_stalls_only_itself() {
    for transport in TRANSPORTS {
        let mut s = setup_with(
            transport,
            PeerOptions::default().stream_window(STREAM_WINDOW),
            PeerOptions::default().stream_window(STREAM_WINDOW),
            Options::default()
                .receive_window(CONNECTION_WINDOW)
                .max_frame_size(CONNECTION_WINDOW / 4),
        )
        .await;
        // A stream nobody reads. Its producer hands over chunks while the window has room:
        // beyond the connection's window, which it therefore does not hold.
        let mut unread = within(s.feeds.counted(CHUNK)).await.expect("opened");
        let beyond_connection = u64::from(CONNECTION_WINDOW) / CHUNK + 8;
        let mut counted = s.counted.clone();
        within(counted.wait_for(|n| *n >= beyond_connection))
            .await
            .expect("the producer is alive");

        // Another stream, many times its window, and calls, all flow.
        // 20 000 numbers cost about 1.5 MB against the window: six windows' worth.
        let mut other = within(s.feeds.numbers(0, 20_000)).await.expect("opened");
        let (items, error) = within(drain(&mut other)).await;
        assert_eq!((items.len(), error), (20_000, None), "{transport:?}");
        for _ in 0..10 {
            assert_eq!(within(s.feeds.ping()).await.expect("ping"), 1);
        }
        within(s.feeds.note(42)).await.expect("queued");
        assert_eq!(within(s.reports.recv()).await, Some(Report::Note(42)));

        // The unread stream's producer stayed within the window (plus the chunk pulled
        // while it waits for credit).
        let most = STREAM_WINDOW / (CHUNK + 64) + 2;
        let handed = *s.counted.borrow();
        assert!(handed <= most, "{transport:?}: {handed} chunks > {most}");

        // Its items are intact once read.
        for _ in 0..handed {
            let Some(Ok(Chunk(bytes))) = within(unread.recv()).await else {
                panic!("{transport:?}: the stalled stream resumes");
            };
            assert_eq!(bytes, vec![0x5a; CHUNK as usize]);
        }
    }
}

#[tokio::test]
async fn an_unread_argument_stream_stalls_only_itself() {
    for transport in TRANSPORTS {
        let s = setup_with(
            transport,
            PeerOptions::default().stream_window(STREAM_WINDOW),
            PeerOptions::default().stream_window(STREAM_WINDOW),
            Options::default()
                .receive_window(CONNECTION_WINDOW)
                .max_frame_size(CONNECTION_WINDOW / 4),
        )
        .await;
        // The caller's producer: 1 000 chunks (about four windows), counted as pulled.
        let (counter, mut pulled) = watch::channel(0u64);
        let chunks = futures::stream::iter(0..1_000).map(move |_| {
            counter.send_modify(|n| *n += 1);
            Chunk(vec![0xa5; CHUNK as usize])
        });
        let held = tokio::spawn(s.feeds.hold(Receiver::from_stream(chunks)));
        // The callee does not read: the caller sends beyond the connection's window, into
        // the stream's own.
        let beyond_connection = u64::from(CONNECTION_WINDOW) / CHUNK + 8;
        within(pulled.wait_for(|n| *n >= beyond_connection))
            .await
            .expect("the producer is alive");
        for _ in 0..10 {
            assert_eq!(within(s.feeds.ping()).await.expect("ping"), 1);
        }
        let mut other = within(s.feeds.numbers(0, 20_000)).await.expect("opened");
        let (items, error) = within(drain(&mut other)).await;
        assert_eq!((items.len(), error), (20_000, None), "{transport:?}");
        let most = STREAM_WINDOW / (CHUNK + 64) + 2;
        let sent = *pulled.borrow();
        assert!(sent <= most, "{transport:?}: {sent} chunks > {most}");

        // Once the callee reads, every chunk arrives.
        s.gate.add_permits(1);
        assert_eq!(
            within(held)
                .await
                .expect("the call's task")
                .expect("counted"),
            1_000
        );
    }
}

#[tokio::test]
async fn too_many_streams_is_refused() {
    for transport in TRANSPORTS {
        let options = PeerOptions::default().max_streams(2);
        let s = setup_with(transport, options.clone(), options, Options::default()).await;
        let first = within(s.feeds.endless()).await.expect("opened");
        let _second = within(s.feeds.endless()).await.expect("opened");
        match within(s.feeds.endless()).await {
            Err(CallError::TooManyStreams { .. }) => {}
            other => panic!("{transport:?}: expected TooManyStreams, got {other:?}"),
        }
        // Calls are not streams: they still go.
        assert_eq!(within(s.feeds.ping()).await.expect("ping"), 1);

        // A stream that ends frees its place, once both sides saw it end (the cancel
        // travels to the callee): within a few attempts, each a round trip.
        drop(first);
        let mut third = within(async {
            for _ in 0..100 {
                match s.feeds.endless().await {
                    Err(CallError::TooManyStreams { .. }) => continue,
                    other => return other,
                }
            }
            panic!("{transport:?}: the ended stream's place was never freed")
        })
        .await
        .expect("opened");
        assert_eq!(within(third.recv()).await, Some(Ok(0)));
    }
}

// Large payloads.

/// Far more than a frame (chatter-core's default `max_frame_size` is 4 MiB).
const LARGE: u64 = 64 * 1024 * 1024;

/// A chunk of the large transfers: well within the default stream window of 1 MiB.
const LARGE_CHUNK: u64 = 64 * 1024;

#[tokio::test]
async fn a_stream_moves_far_more_than_a_frame() {
    for transport in TRANSPORTS {
        let s = setup(transport).await;
        let mut rx = within(s.feeds.download(LARGE, LARGE_CHUNK))
            .await
            .expect("opened");
        let mut length = 0u64;
        while let Some(chunk) = within(rx.recv()).await {
            let Chunk(bytes) = chunk.expect("an intact chunk");
            let end = length + bytes.len() as u64;
            assert!(
                bytes == pattern(length, end),
                "{transport:?}: bytes {length}..{end}"
            );
            length = end;
        }
        assert_eq!(length, LARGE, "{transport:?}");

        let (tx, rx) = stream::channel(4);
        let feed = async move {
            for start in (0..LARGE).step_by(LARGE_CHUNK as usize) {
                tx.send(bytes::Bytes::from(pattern(start, start + LARGE_CHUNK)))
                    .await
                    .expect("the callee reads");
            }
        };
        let (uploaded, ()) = within(async { tokio::join!(s.feeds.upload(rx), feed) }).await;
        assert_eq!(uploaded.expect("uploaded"), (LARGE, true), "{transport:?}");
    }
}

/// Generated stream code is hygienic: it compiles with user items named like what it uses
/// in scope and without the prelude (compiled only).
#[no_implicit_prelude]
#[allow(dead_code)]
mod hostile {
    pub struct Result;
    pub struct Ok;
    pub struct Err;
    pub struct Option;
    pub struct Some;
    pub struct None;
    pub struct Box;
    pub struct StreamReply;
    pub struct Sender;
    pub mod stream {}

    #[::chatter_rpc::remote]
    pub trait Hostile {
        async fn down(&self, n: u64) -> ::chatter_rpc::stream::Receiver<u64>;
        async fn up(&self, n: ::chatter_rpc::stream::Receiver<u64>) -> u64;
        async fn both(
            &self,
            a: u8,
            n: ::chatter_rpc::stream::Receiver<u64>,
        ) -> ::std::result::Result<::chatter_rpc::stream::Receiver<u64>, ::std::string::String>;
    }
}

/// Through `#[remote(crate = "..")]`, a stream is recognised by that path too (compiled
/// only).
#[allow(dead_code)]
mod renamed {
    mod rpc {
        pub use chatter_rpc::*;
    }

    #[chatter_rpc::remote(crate = "self::rpc")]
    pub trait Renamed {
        async fn down(&self) -> self::rpc::stream::Receiver<u64>;
        async fn up(&self, items: rpc::stream::Receiver<u64>) -> u64;
    }
}

/// Two peers over TCP whose `small` side announces frames of 4 KiB (the other keeps the
/// defaults): the client calls the [`Feeder`] the server hosts.
async fn small_frames(small_client: bool) -> (chatter_core::Server, Peer, FeedsClient) {
    let small = Options::default()
        .max_frame_size(4096)
        .receive_window(8192)
        .no_keepalive();
    let big = Options::default().no_keepalive();
    let (server_conn, client_conn) = if small_client {
        (big, small)
    } else {
        (small, big)
    };
    let (listener, client, accepted) = pair_with(Transport::Tcp, server_conn, client_conn).await;
    let (tx, _reports) = mpsc::unbounded_channel();
    let (counter, _counted) = watch::channel(0);
    let server = Peer::new(accepted);
    server.register(
        "feeds",
        FeedsServer::new(Feeder {
            reports: tx,
            counted: Arc::new(counter),
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
        }),
    );
    let feeds = FeedsClient::new(&Peer::new(client), "feeds");
    (listener, server, feeds)
}

/// chatter-core PROTOCOL.md §2: a side never sends a frame longer than the peer's
/// `max_frame_size`. A stream writer batches the items it has ready into one message
/// (chatter-rpc PROTOCOL.md, "Items"); those batches must fit the reader's frames, not
/// only its window: a reader that announced small frames saw its streams end with
/// "cancelled" as soon as items came faster than one per message. An item too large for
/// the reader's frames on its own ends the stream with a protocol error that says so.
#[tokio::test]
async fn batches_of_items_fit_a_reader_with_small_frames() {
    // A result stream to a caller with small frames: 20 000 numbers of 5 bytes each, all
    // ready at once (batches of up to 8 KiB).
    let (_listener, _server, feeds) = small_frames(true).await;
    let from = 1 << 20;
    let mut rx = within(feeds.numbers(from, 20_000)).await.expect("opened");
    let (items, error) = within(drain(&mut rx)).await;
    assert_eq!(error, None, "after {} items", items.len());
    assert_eq!(items, (from..from + 20_000).collect::<Vec<_>>());
    // One item larger than the caller's frames.
    let mut rx = within(feeds.download(5000, 5000)).await.expect("opened");
    match within(drain(&mut rx)).await {
        (items, Some(StreamError::Protocol(what))) => {
            assert!(items.is_empty());
            assert!(what.contains("cannot fit the reader's frames"), "{what}");
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
    assert_eq!(within(feeds.ping()).await.expect("ping"), 1);

    // An argument stream to a callee with small frames: 64 KiB in chunks of 100 bytes,
    // all ready at once.
    let (_listener, _server, feeds) = small_frames(false).await;
    let (tx, rx) = stream::channel(1024);
    for start in (0..64 * 1024).step_by(100) {
        let end = (start + 100).min(64 * 1024);
        tx.send(bytes::Bytes::from(pattern(start, end)))
            .await
            .expect("queued");
    }
    drop(tx);
    assert_eq!(
        within(feeds.upload(rx)).await.expect("answered"),
        (64 * 1024, true)
    );
}
