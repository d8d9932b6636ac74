//! Issue 18, item 8: chatter's broker (`chatter-broker`) side by side with BUS/RT's (the
//! `busrt` crate 0.5.6, built with chatter-bench's `busrt` feature), in one run, on the same
//! transports (Unix socket and TCP on 127.0.0.1), with 100-byte payloads.
//!
//! ```text
//! cargo run --release -p chatter-bench --features busrt -- --only broker [--runs N] [--quick]
//!     [--layouts split,onecore]
//! ```
//!
//! Every measurement is a child process (`--child broker SYSTEM TRANSPORT CASE LAYOUT`), as
//! for the other workloads. The child starts the broker in a process of its own (this
//! binary with `--broker-host SYSTEM TRANSPORT CPU`: one current-thread tokio runtime,
//! pinned), as a deployment runs `busrtd` or the `chatter-broker` binary, and runs every
//! client of the case on one current-thread runtime in its own process, pinned per layout
//! (`split`: broker on CPU 1, clients on CPU 0; `onecore`: both on CPU 0). The broker host
//! answers `stat` on its standard input with its resident memory (after `malloc_trim`) and
//! its CPU time, so that a case can report the broker's memory per peer and the broker's
//! and the clients' CPU time per message apart.
//!
//! Cases (each with a warm-up before the measured phase):
//!
//! - `send`: one sender to one named receiver, fire and forget, rate at the receiver (first
//!   send to last receipt). BUS/RT: `send` with `QoS::No`; chatter: a `#[signal]` through
//!   the broker (`bus.peer("b")`), which waits for room when flow control holds it back.
//! - `send-confirmed`: one at a time, each waiting for its confirmation. BUS/RT: `send` with
//!   `QoS::RealtimeProcessed` (the broker's ack that the frame is in the receiver's queue;
//!   what BUS/RT's own benchmark calls `send.qos.processed`); chatter: a call returning `()`
//!   (the reply comes from the receiver after its handler ran: end to end, not the broker's).
//! - `rpc-1`, `rpc-256`: an echo of 100 bytes through the broker, 1 and 256 in flight on
//!   one caller connection. BUS/RT: `RpcClient::call` with `QoS::RealtimeProcessed` (as its
//!   benchmark's `rpc.call`) to a client whose `RpcHandlers` echo the params; chatter: a
//!   `#[remote]` generated client on `bus.peer("s")`.
//! - `pub-1`, `pub-16`: one publisher, fire and forget, to 1 and 16 subscribers of the
//!   topic; messages delivered per second (all subscribers together), first publish to last
//!   receipt. BUS/RT: `publish` with `QoS::No`, subscribers `subscribe` the exact topic;
//!   chatter: `bus.publish(topic, &bytes)` (a signal to the broker), subscribers
//!   `subscribe_with::<Bytes>(topic)` with `SlowSubscriber::Backpressure` (lossless: the
//!   default drops the oldest beyond 256 KiB, and every row here counts every message).
//! - `memory`: the broker process's RSS delta with 1,000 idle peers connected and registered
//!   under a name, per peer (`malloc_trim` before each reading; lower is better).

use std::any::Any;
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatter_broker::{Broker, BrokerOptions, Bus, SlowSubscriber, SubscribeOptions};
use tokio::sync::Notify;

use crate::harness::{
    drive_calls, malloc_trim, nanos, percentile, pin_to, proc_status_bytes, process_cpu,
    raise_nofile, Layout,
};
use crate::report::median;

/// Application payload of every message and call.
pub const PAYLOAD: usize = 100;

/// Whether chatter-broker has pub/sub (`Bus::publish` / `Bus::subscribe`); before it had,
/// chatter's pub rows were reported as not built.
pub const CHATTER_PUBSUB: bool = true;

/// The topic of the pub cases.
pub const TOPIC: &str = "bench/t";

/// Whether this build has BUS/RT (`--features busrt`).
pub const BUSRT_BUILT: bool = cfg!(feature = "busrt");

/// A broker under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sys {
    Chatter,
    /// BUS/RT at its defaults (a queue of 8,192 frames per client in the broker).
    Busrt,
    /// BUS/RT with the broker's queue per client raised to [`BIG_QUEUE`] frames
    /// (`Broker::set_queue_size`), for the one-way rows only: at its default, its broker
    /// disconnects a receiver that falls 8,192 frames behind an unpaced sender.
    BusrtBigQueue,
}

pub const SYSTEMS: [Sys; 3] = [Sys::Chatter, Sys::Busrt, Sys::BusrtBigQueue];

/// The broker's queue per client of [`Sys::BusrtBigQueue`], in frames.
pub const BIG_QUEUE: usize = 1 << 20;

impl Sys {
    pub fn name(self) -> &'static str {
        match self {
            Sys::Chatter => "chatter",
            Sys::Busrt => "busrt",
            Sys::BusrtBigQueue => "busrt-q1m",
        }
    }

    fn is_busrt(self) -> bool {
        self != Sys::Chatter
    }

    /// Whether this system has a row for `case`.
    fn runs(self, case: Case) -> bool {
        self != Sys::BusrtBigQueue || matches!(case, Case::Send | Case::Pub1 | Case::Pub16)
    }

    pub fn parse(s: &str) -> Option<Sys> {
        SYSTEMS.into_iter().find(|x| x.name() == s)
    }
}

/// How clients reach the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unix,
    Tcp,
}

pub const TRANSPORTS: [Transport; 2] = [Transport::Unix, Transport::Tcp];

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Unix => "unix",
            Transport::Tcp => "tcp",
        }
    }

    pub fn parse(s: &str) -> Option<Transport> {
        TRANSPORTS.into_iter().find(|x| x.name() == s)
    }

    /// A socket path of its own for this process (Unix only).
    pub fn unix_path(sys: Sys) -> String {
        format!(
            "/tmp/chatter-bench-{}-{}.sock",
            sys.name(),
            std::process::id()
        )
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    Send,
    SendConfirmed,
    Rpc1,
    Rpc256,
    Pub1,
    Pub16,
    Memory,
}

pub const CASES: [Case; 7] = [
    Case::Send,
    Case::SendConfirmed,
    Case::Rpc1,
    Case::Rpc256,
    Case::Pub1,
    Case::Pub16,
    Case::Memory,
];

/// The size of a case.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    /// Messages sent, calls made or values published in the measured phase; peers for
    /// `memory`.
    pub total: u64,
    pub warmup: u64,
    /// Calls in flight (rpc) or subscribers (pub).
    pub width: usize,
}

impl Case {
    pub fn name(self) -> &'static str {
        match self {
            Case::Send => "send",
            Case::SendConfirmed => "send-confirmed",
            Case::Rpc1 => "rpc-1",
            Case::Rpc256 => "rpc-256",
            Case::Pub1 => "pub-1",
            Case::Pub16 => "pub-16",
            Case::Memory => "memory",
        }
    }

    pub fn parse(s: &str) -> Option<Case> {
        CASES.into_iter().find(|x| x.name() == s)
    }

    /// The row's label in the table.
    pub fn label(self) -> &'static str {
        match self {
            Case::Send => "one-to-one send (busrt QoS::No / chatter signal)",
            Case::SendConfirmed => {
                "one-to-one send, confirmed, 1 at a time (busrt QoS::RealtimeProcessed / chatter call -> ())"
            }
            Case::Rpc1 => "RPC echo, 1 in flight",
            Case::Rpc256 => "RPC echo, 256 in flight",
            Case::Pub1 => "publish to 1 subscriber (delivered)",
            Case::Pub16 => "publish to 16 subscribers (delivered)",
            Case::Memory => "broker memory per idle peer (1,000 peers)",
        }
    }

    /// The unit of the headline figure, and whether more is better.
    pub fn metric(self) -> (&'static str, bool) {
        match self {
            Case::Send | Case::SendConfirmed | Case::Pub1 | Case::Pub16 => ("kmsgs/s", true),
            Case::Rpc1 | Case::Rpc256 => ("kcalls/s", true),
            Case::Memory => ("KB/peer", false),
        }
    }

    pub fn is_pubsub(self) -> bool {
        matches!(self, Case::Pub1 | Case::Pub16)
    }

    pub fn size(self, quick: bool) -> Size {
        let q = |full: u64, small: u64| if quick { small } else { full };
        match self {
            Case::Send => Size {
                total: q(1_000_000, 10_000),
                warmup: q(50_000, 1_000),
                width: 1,
            },
            Case::SendConfirmed | Case::Rpc1 => Size {
                total: q(20_000, 500),
                warmup: q(2_000, 50),
                width: 1,
            },
            Case::Rpc256 => Size {
                total: q(300_000, 5_000),
                warmup: q(20_000, 500),
                width: 256,
            },
            Case::Pub1 => Size {
                total: q(1_000_000, 10_000),
                warmup: q(50_000, 1_000),
                width: 1,
            },
            Case::Pub16 => Size {
                total: q(50_000, 1_000),
                warmup: q(5_000, 100),
                width: 16,
            },
            Case::Memory => Size {
                total: q(1_000, 100),
                warmup: 0,
                width: 1,
            },
        }
    }
}

/// How one run ended.
#[derive(Debug, Clone)]
enum Run {
    Done(Outcome),
    /// The system lacks the case (chatter's pub/sub before it landed).
    NotBuilt,
    /// A receiver was disconnected, or the child failed.
    Failed(String),
}

/// What one measurement produced.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Operations per second (messages delivered, calls), or bytes per peer (`memory`).
    pub value: f64,
    /// The broker process's CPU time per operation in the measured phase, ns.
    pub broker_cpu_ns: f64,
    /// The clients' process's CPU time per operation (every client together), ns.
    pub clients_cpu_ns: f64,
    /// Median latency per call (calls and confirmed sends; NaN otherwise), ns.
    pub p50_ns: f64,
}

impl Outcome {
    fn line(&self) -> String {
        format!(
            "BROKER {} {} {} {}",
            self.value, self.broker_cpu_ns, self.clients_cpu_ns, self.p50_ns
        )
    }

    fn parse(line: &str) -> Option<Run> {
        let rest = line.strip_prefix("BROKER ")?;
        if rest == "-" {
            return Some(Run::NotBuilt);
        }
        if let Some(why) = rest.strip_prefix("! ") {
            return Some(Run::Failed(why.to_string()));
        }
        let mut f = rest.split(' ').map(str::parse::<f64>);
        Some(Run::Done(Outcome {
            value: f.next()?.ok()?,
            broker_cpu_ns: f.next()?.ok()?,
            clients_cpu_ns: f.next()?.ok()?,
            p50_ns: f.next()?.ok()?,
        }))
    }

    /// The headline figure in the unit of [`Case::metric`].
    /// (ops/s or bytes per peer, both in thousands).
    pub fn headline(&self, _case: Case) -> f64 {
        self.value / 1e3
    }
}

// ---------------------------------------------------------------------------------------
// The broker host process.

/// `--broker-host SYSTEM TRANSPORT CPU`: runs one broker until its standard input closes;
/// prints `ADDR address`, then answers each `stat` line with `STAT rss_bytes cpu_ns`.
pub fn host(mut argv: impl Iterator<Item = String>) {
    let mut next = |what: &str| {
        argv.next()
            .unwrap_or_else(|| panic!("--broker-host needs {what}"))
    };
    let sys = Sys::parse(&next("a system")).expect("system");
    let transport = Transport::parse(&next("a transport")).expect("transport");
    let cpu: usize = next("a CPU").parse().expect("CPU");
    raise_nofile();
    pin_to(cpu);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a current-thread tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let (addr, keep) = match sys {
            Sys::Chatter => chatter_listen(transport).await,
            Sys::Busrt => busrt_listen(transport, None).await,
            Sys::BusrtBigQueue => busrt_listen(transport, Some(BIG_QUEUE)).await,
        };
        println!("ADDR {addr}");
        let _ = std::io::stdout().flush();
        // One per broker host process: answers `stat` until its stdin closes (the parent
        // stopped or died), then ends the process.
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                if line.trim() == "stat" {
                    // CPU time first: the trim is not the broker's work.
                    let cpu = process_cpu().as_nanos();
                    malloc_trim();
                    let rss = proc_status_bytes("VmRSS");
                    println!("STAT {rss} {cpu}");
                    let _ = std::io::stdout().flush();
                }
            }
            if transport == Transport::Unix {
                let _ = std::fs::remove_file(Transport::unix_path(sys));
            }
            std::process::exit(0);
        });
        std::future::pending::<()>().await;
        drop(keep);
    });
}

async fn chatter_listen(transport: Transport) -> (String, Box<dyn Any>) {
    let address = match transport {
        Transport::Unix => {
            let path = Transport::unix_path(Sys::Chatter);
            let _ = std::fs::remove_file(&path);
            format!("unix://{path}")
        }
        Transport::Tcp => "tcp://127.0.0.1:0".to_string(),
    };
    let broker = Broker::listen(address.as_str(), BrokerOptions::default())
        .await
        .expect("listen (chatter-broker)");
    let addr = broker.addresses()[0].to_string();
    (addr, Box::new(broker))
}

#[cfg(feature = "busrt")]
async fn busrt_listen(transport: Transport, queue: Option<usize>) -> (String, Box<dyn Any>) {
    crate::busrt_sys::listen(transport, queue).await
}

#[cfg(not(feature = "busrt"))]
async fn busrt_listen(_: Transport, _: Option<usize>) -> (String, Box<dyn Any>) {
    panic!("this chatter-bench was built without the `busrt` feature")
}

/// The broker host, seen from the measuring child.
pub struct Host {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub addr: String,
}

impl Host {
    fn start(sys: Sys, transport: Transport, cpu: usize) -> Host {
        let exe = std::env::current_exe().expect("current exe");
        // One broker host process per measured case: `stop` closes its stdin and waits for
        // it (killing it after 2 s), and it exits by itself if this process dies first.
        let mut child = Command::new(exe)
            .args([
                "--broker-host",
                sys.name(),
                transport.name(),
                &cpu.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the broker host");
        let stdin = child.stdin.take().expect("host stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("host stdout"));
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("read the broker address");
        let addr = line
            .trim()
            .strip_prefix("ADDR ")
            .unwrap_or_else(|| panic!("the broker host said {line:?}"))
            .to_string();
        Host {
            child,
            stdin,
            stdout,
            addr,
        }
    }

    /// The broker process's resident bytes (after `malloc_trim`) and CPU time so far.
    pub fn stat(&mut self) -> (u64, Duration) {
        writeln!(self.stdin, "stat").expect("ask the broker host");
        self.stdin.flush().expect("ask the broker host");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read the broker host's answer");
        let mut f = line
            .trim()
            .strip_prefix("STAT ")
            .unwrap_or_else(|| panic!("the broker host said {line:?}"))
            .split(' ')
            .map(|x| x.parse::<u64>().expect("a number"));
        let rss = f.next().expect("rss");
        let cpu = f.next().expect("cpu");
        (rss, Duration::from_nanos(cpu))
    }

    fn stop(mut self) {
        drop(self.stdin);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Measuring.

/// Counts messages at the receivers and records when a target count was reached.
pub struct Tally {
    count: AtomicU64,
    target: AtomicU64,
    at: Mutex<Option<Instant>>,
    /// Why the expected count can never arrive (a receiver was disconnected).
    failed: Mutex<Option<String>>,
    notify: Notify,
}

impl Tally {
    pub fn new() -> Arc<Tally> {
        Arc::new(Tally {
            count: AtomicU64::new(0),
            target: AtomicU64::new(u64::MAX),
            at: Mutex::new(None),
            failed: Mutex::new(None),
            notify: Notify::new(),
        })
    }

    /// A receiver is gone: [`Tally::wait`] fails with `why`.
    pub fn fail(&self, why: String) {
        self.failed.lock().expect("tally lock").get_or_insert(why);
        self.notify.notify_one();
    }

    pub fn add(&self, n: u64) {
        let total = self.count.fetch_add(n, Ordering::Relaxed) + n;
        if total >= self.target.load(Ordering::Relaxed) {
            let mut at = self.at.lock().expect("tally lock");
            if at.is_none() {
                *at = Some(Instant::now());
                self.notify.notify_one();
            }
        }
    }

    /// From now on, [`Tally::wait`] waits for `count` messages in all.
    pub fn expect(&self, count: u64) {
        *self.at.lock().expect("tally lock") = None;
        self.target.store(count, Ordering::Relaxed);
        if self.count.load(Ordering::Relaxed) >= count {
            *self.at.lock().expect("tally lock") = Some(Instant::now());
        }
    }

    /// Waits until the expected count arrived; returns when it did. When a receiver was
    /// disconnected instead, prints `BROKER ! why` (the run failed) and exits.
    pub async fn wait(&self) -> Instant {
        loop {
            if let Some(at) = *self.at.lock().expect("tally lock") {
                return at;
            }
            if let Some(why) = self.failed.lock().expect("tally lock").clone() {
                println!("BROKER ! {why}");
                let _ = std::io::stdout().flush();
                std::process::exit(0);
            }
            self.notify.notified().await;
        }
    }
}

/// A measured phase: CPU times of both processes at its start.
pub struct Phase {
    start: Instant,
    broker_cpu: Duration,
    clients_cpu: Duration,
}

impl Phase {
    pub fn begin(host: &mut Host) -> Phase {
        let (_, broker_cpu) = host.stat();
        Phase {
            clients_cpu: process_cpu(),
            broker_cpu,
            start: Instant::now(),
        }
    }

    /// Ends the phase at `end` after `ops` operations.
    pub fn end(self, host: &mut Host, end: Instant, ops: u64, mut latencies: Vec<u32>) -> Outcome {
        let clients_cpu = process_cpu() - self.clients_cpu;
        let (_, broker_cpu) = host.stat();
        let broker_cpu = broker_cpu - self.broker_cpu;
        latencies.sort_unstable();
        let per = |d: Duration| d.as_nanos() as f64 / ops.max(1) as f64;
        Outcome {
            value: ops as f64 / (end - self.start).as_secs_f64(),
            broker_cpu_ns: per(broker_cpu),
            clients_cpu_ns: per(clients_cpu),
            p50_ns: if latencies.is_empty() {
                f64::NAN
            } else {
                percentile(&latencies, 50.0) as f64
            },
        }
    }
}

/// Runs `n` one-at-a-time operations made by `op` and returns their latencies.
pub async fn one_by_one<F, Fut>(n: u64, op: F) -> Vec<u32>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut latencies = Vec::with_capacity(n as usize);
    for i in 0..n {
        let t = Instant::now();
        op(i).await;
        latencies.push(nanos(t));
    }
    latencies
}

/// The memory case's reading: the broker's RSS delta per peer after `open` connected and
/// registered `n` peers (which it returns, to keep them connected until the reading).
pub async fn memory<F, Fut>(host: &mut Host, n: u64, open: F) -> Outcome
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Box<dyn Any>>,
{
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (before, cpu0) = host.stat();
    let keep = open().await;
    // Let the broker finish whatever follows a registration.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (after, cpu1) = host.stat();
    drop(keep);
    Outcome {
        value: after.saturating_sub(before) as f64 / n as f64,
        broker_cpu_ns: (cpu1 - cpu0).as_nanos() as f64 / n as f64,
        clients_cpu_ns: f64::NAN,
        p50_ns: f64::NAN,
    }
}

/// `--child broker SYSTEM TRANSPORT CASE LAYOUT [--quick]`: one measurement, printed as a
/// `BROKER` line (`BROKER -` when the system lacks the case).
pub fn child(mut argv: impl Iterator<Item = String>) {
    let mut next = |what: &str| {
        argv.next()
            .unwrap_or_else(|| panic!("--child broker needs {what}"))
    };
    let sys = Sys::parse(&next("a system")).expect("system");
    let transport = Transport::parse(&next("a transport")).expect("transport");
    let case = Case::parse(&next("a case")).expect("case");
    let layout = Layout::parse(&next("a layout")).expect("layout");
    let quick = argv.any(|f| f == "--quick");
    if sys == Sys::Chatter && case.is_pubsub() && !CHATTER_PUBSUB {
        println!("BROKER -");
        return;
    }
    raise_nofile();
    let (broker_cpu, clients_cpu) = match layout {
        Layout::Split => (1, 0),
        Layout::OneCore => (0, 0),
    };
    let mut host = Host::start(sys, transport, broker_cpu);
    pin_to(clients_cpu);
    let size = case.size(quick);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a current-thread tokio runtime");
    let local = tokio::task::LocalSet::new();
    let outcome = local.block_on(&rt, async {
        match sys {
            Sys::Chatter => chatter_case(case, size, &mut host).await,
            Sys::Busrt | Sys::BusrtBigQueue => busrt_case(case, size, &mut host).await,
        }
    });
    println!("{}", outcome.line());
    let _ = std::io::stdout().flush();
    host.stop();
    std::process::exit(0);
}

#[cfg(feature = "busrt")]
async fn busrt_case(case: Case, size: Size, host: &mut Host) -> Outcome {
    crate::busrt_sys::run(case, size, host).await
}

#[cfg(not(feature = "busrt"))]
async fn busrt_case(_: Case, _: Size, _: &mut Host) -> Outcome {
    panic!("this chatter-bench was built without the `busrt` feature")
}

// ---------------------------------------------------------------------------------------
// chatter's side.

#[chatter_rpc::remote]
pub trait BrokerBench {
    async fn echo(&self, data: Bytes) -> Bytes;
    async fn deliver(&self, data: Bytes);
    #[signal(ttl = "60s")]
    async fn note(&self, data: Bytes);
}

struct Sink {
    tally: Arc<Tally>,
}

impl BrokerBench for Sink {
    async fn echo(&self, data: Bytes) -> Bytes {
        data
    }

    async fn deliver(&self, _data: Bytes) {
        self.tally.add(1);
    }

    async fn note(&self, _data: Bytes) {
        self.tally.add(1);
    }
}

async fn bus(addr: &str, name: &str) -> Bus {
    chatter_broker::connect(addr, name)
        .await
        .unwrap_or_else(|e| panic!("connect {name} to chatter-broker: {e}"))
}

/// A peer named `name` serving [`BrokerBench`] as `bench`.
async fn chatter_sink(addr: &str, name: &str, tally: &Arc<Tally>) -> Bus {
    let b = chatter_broker::connect_unnamed(addr, chatter_broker::BusOptions::new())
        .await
        .expect("connect to chatter-broker");
    b.register(
        "bench",
        BrokerBenchServer::from_arc(Arc::new(Sink {
            tally: tally.clone(),
        })),
    );
    b.claim(name, false).await.expect("register a name");
    b
}

async fn chatter_case(case: Case, size: Size, host: &mut Host) -> Outcome {
    let addr = host.addr.clone();
    let payload = Bytes::from(vec![0xee; PAYLOAD]);
    let tally = Tally::new();
    match case {
        Case::Send => {
            let _b = chatter_sink(&addr, "b", &tally).await;
            let a = bus(&addr, "a").await;
            let client = BrokerBenchClient::new(&a.peer("b"), "bench");
            let send = |n: u64| {
                let client = &client;
                let payload = &payload;
                async move {
                    for i in 0..n {
                        client
                            .note(payload.clone())
                            .await
                            .expect("signal (chatter)");
                        if i % 256 == 255 {
                            tokio::task::yield_now().await;
                        }
                    }
                }
            };
            tally.expect(size.warmup);
            send(size.warmup).await;
            tally.wait().await;
            tally.expect(size.warmup + size.total);
            let phase = Phase::begin(host);
            send(size.total).await;
            let end = tally.wait().await;
            phase.end(host, end, size.total, Vec::new())
        }
        Case::SendConfirmed => {
            let _b = chatter_sink(&addr, "b", &tally).await;
            let a = bus(&addr, "a").await;
            let client = BrokerBenchClient::new(&a.peer("b"), "bench");
            let op = |_| async {
                client
                    .deliver(payload.clone())
                    .await
                    .expect("deliver (chatter)")
            };
            one_by_one(size.warmup, op).await;
            let phase = Phase::begin(host);
            let latencies = one_by_one(size.total, op).await;
            phase.end(host, Instant::now(), size.total, latencies)
        }
        Case::Rpc1 | Case::Rpc256 => {
            let _s = chatter_sink(&addr, "s", &tally).await;
            let c = bus(&addr, "c").await;
            let client = BrokerBenchClient::new(&c.peer("s"), "bench");
            let call = |_| {
                let call = client.echo(payload.clone());
                async move {
                    let back = call.await.expect("echo (chatter)");
                    assert_eq!(back.len(), PAYLOAD);
                }
            };
            drive_calls(size.warmup, size.width, call).await;
            let phase = Phase::begin(host);
            let latencies = drive_calls(size.total, size.width, call).await;
            phase.end(host, Instant::now(), size.total, latencies)
        }
        Case::Pub1 | Case::Pub16 => {
            // Lossless, as every row here counts every message: with the default policy
            // (drop the oldest beyond 256 KiB) a publisher this fast would lose some.
            let options = SubscribeOptions::new().policy(SlowSubscriber::Backpressure);
            let mut subscribers = Vec::with_capacity(size.width);
            for i in 0..size.width {
                let s = bus(&addr, &format!("sub-{i}")).await;
                let mut sub = s
                    .subscribe_with::<Bytes>(TOPIC, options.clone())
                    .await
                    .expect("subscribe (chatter)");
                let tally = tally.clone();
                // One per subscriber of the case (1 or 16), ending with its subscription.
                tokio::task::spawn_local(async move {
                    let mut got = 0u64;
                    while let Some(item) = sub.recv().await {
                        match item {
                            Ok((_, value)) => {
                                debug_assert_eq!(value.len(), PAYLOAD);
                                got += 1;
                                tally.add(1);
                            }
                            Err(e) => {
                                tally.fail(format!(
                                    "chatter subscription sub-{i} failed after {got} messages: {e}"
                                ));
                                return;
                            }
                        }
                    }
                    tally.fail(format!(
                        "chatter subscription sub-{i} ended after {got} messages"
                    ));
                });
                subscribers.push(s);
            }
            let n = size.width as u64;
            let p = bus(&addr, "p").await;
            let publish = |count: u64| {
                let (p, payload) = (&p, &payload);
                async move {
                    for i in 0..count {
                        p.publish(TOPIC, payload).await.expect("publish (chatter)");
                        if i % 256 == 255 {
                            tokio::task::yield_now().await;
                        }
                    }
                }
            };
            tally.expect(size.warmup * n);
            publish(size.warmup).await;
            tally.wait().await;
            tally.expect((size.warmup + size.total) * n);
            let phase = Phase::begin(host);
            publish(size.total).await;
            let end = tally.wait().await;
            phase.end(host, end, size.total * n, Vec::new())
        }
        Case::Memory => {
            let n = size.total;
            memory(host, n, || async move {
                let mut peers = Vec::with_capacity(n as usize);
                for i in 0..n {
                    peers.push(bus(&addr, &format!("idle-{i}")).await);
                }
                Box::new(peers) as Box<dyn Any>
            })
            .await
        }
    }
}

// ---------------------------------------------------------------------------------------
// The parent: runs the children, prints and writes the table.

type Key = (&'static str, &'static str, &'static str, &'static str);

/// Every run, by layout, transport, case and system.
#[derive(Default)]
struct Results {
    runs: std::collections::BTreeMap<Key, Vec<Run>>,
}

impl Results {
    fn get(&self, l: Layout, t: Transport, c: Case, s: Sys) -> &[Run] {
        self.runs
            .get(&(l.name(), t.name(), c.name(), s.name()))
            .map_or(&[], Vec::as_slice)
    }

    fn med(&self, l: Layout, t: Transport, c: Case, s: Sys, f: impl Fn(&Outcome) -> f64) -> f64 {
        median(
            self.get(l, t, c, s)
                .iter()
                .filter_map(|r| match r {
                    Run::Done(o) => Some(f(o)),
                    _ => None,
                })
                .collect(),
        )
    }

    fn not_built(&self, l: Layout, t: Transport, c: Case, s: Sys) -> bool {
        let v = self.get(l, t, c, s);
        !v.is_empty() && v.iter().all(|r| matches!(r, Run::NotBuilt))
    }

    /// The failed runs' reasons.
    fn failures(&self, l: Layout, t: Transport, c: Case, s: Sys) -> Vec<&str> {
        self.get(l, t, c, s)
            .iter()
            .filter_map(|r| match r {
                Run::Failed(why) => Some(why.as_str()),
                _ => None,
            })
            .collect()
    }
}

/// Runs every case `runs` times, the systems alternately, and returns the Markdown report.
pub fn run(
    layouts: &[Layout],
    runs: usize,
    command: &str,
    child_output: impl Fn(&[String]) -> Result<String, String>,
) -> String {
    let systems: Vec<Sys> = SYSTEMS
        .into_iter()
        .filter(|&s| !s.is_busrt() || BUSRT_BUILT)
        .collect();
    if !BUSRT_BUILT {
        eprintln!("broker: built without `--features busrt`: chatter's broker only");
    }
    let mut results = Results::default();
    for &layout in layouts {
        for transport in TRANSPORTS {
            for case in CASES {
                for run in 0..runs {
                    for &sys in systems.iter().filter(|s| s.runs(case)) {
                        let args: Vec<String> = [
                            "--child",
                            "broker",
                            sys.name(),
                            transport.name(),
                            case.name(),
                            layout.name(),
                        ]
                        .map(String::from)
                        .to_vec();
                        let what = format!(
                            "{:>8} {:>5} {:>14} {:>8} run {}",
                            layout.name(),
                            transport.name(),
                            case.name(),
                            sys.name(),
                            run + 1
                        );
                        let run = child_output(&args)
                            .and_then(|out| {
                                out.lines()
                                    .find_map(Outcome::parse)
                                    .ok_or_else(|| format!("no BROKER line in {out:?}"))
                            })
                            .unwrap_or_else(Run::Failed);
                        match &run {
                            Run::Done(o) => eprintln!(
                                "{what}: {:.1} {}, broker CPU {:.0} ns/op, clients CPU {:.0} ns/op, p50 {:.1} µs",
                                o.headline(case),
                                case.metric().0,
                                o.broker_cpu_ns,
                                o.clients_cpu_ns,
                                o.p50_ns / 1e3
                            ),
                            Run::NotBuilt => eprintln!("{what}: not built yet"),
                            Run::Failed(why) => eprintln!("{what}: FAILED: {why}"),
                        }
                        results
                            .runs
                            .entry((layout.name(), transport.name(), case.name(), sys.name()))
                            .or_default()
                            .push(run);
                    }
                }
            }
        }
    }
    markdown(&results, layouts, runs, command)
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn markdown(r: &Results, layouts: &[Layout], runs: usize, command: &str) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Broker: chatter-broker vs BUS/RT (busrt 0.5.6). Medians of {runs} run(s), the \
         systems alternately; ratios are chatter over BUS/RT's better configuration; {PAYLOAD}-byte payloads; broker in its own process (one \
         current-thread runtime), every client in another.\n\nCommand: `{command}`\n"
    );
    for &l in layouts {
        let _ = writeln!(md, "### Layout `{}`\n", l.name());
        let _ = writeln!(
            md,
            "| transport | row | metric | chatter | busrt | busrt, queue 2^20 | chatter/busrt (best) | ahead? | CPU µs/op chatter (broker + clients) | CPU µs/op busrt (best) | CPU chatter/busrt |"
        );
        let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|");
        for t in TRANSPORTS {
            for c in CASES {
                let (unit, higher) = c.metric();
                let cell = |s: Sys| {
                    if r.get(l, t, c, s).is_empty() {
                        return "–".to_string();
                    }
                    if r.not_built(l, t, c, s) {
                        return "not built yet".to_string();
                    }
                    let mut v = fmt(r.med(l, t, c, s, |o| o.headline(c)));
                    let failed = r.failures(l, t, c, s).len();
                    if failed > 0 {
                        let _ = write!(v, " ({failed} of {} runs failed)", r.get(l, t, c, s).len());
                    }
                    v
                };
                // BUS/RT's better figure of the two configurations.
                let value = |s: Sys| r.med(l, t, c, s, |o| o.value);
                let (best, best_sys) = [Sys::Busrt, Sys::BusrtBigQueue]
                    .into_iter()
                    .map(|s| (value(s), s))
                    .filter(|(v, _)| !v.is_nan())
                    .fold((f64::NAN, Sys::Busrt), |acc, (v, s)| {
                        let better = acc.0.is_nan() || if higher { v > acc.0 } else { v < acc.0 };
                        if better {
                            (v, s)
                        } else {
                            acc
                        }
                    });
                let ratio = value(Sys::Chatter) / best;
                let (ratio_s, ahead) = if ratio.is_nan() || ratio.is_infinite() {
                    ("–".to_string(), "–")
                } else {
                    let ahead = if higher { ratio > 1.0 } else { ratio < 1.0 };
                    (format!("{ratio:.2}x"), if ahead { "yes" } else { "**no**" })
                };
                let cpu = |s: Sys| r.med(l, t, c, s, |o| o.broker_cpu_ns + o.clients_cpu_ns) / 1e3;
                let (cpu_c, cpu_b) = if c == Case::Memory {
                    (f64::NAN, f64::NAN)
                } else {
                    (cpu(Sys::Chatter), cpu(best_sys))
                };
                let unit = if higher {
                    unit.to_string()
                } else {
                    format!("{unit} (lower is better)")
                };
                let _ = writeln!(
                    md,
                    "| {} | {} | {unit} | {} | {} | {} | {ratio_s} | {ahead} | {} | {} | {} |",
                    t.name(),
                    c.label(),
                    cell(Sys::Chatter),
                    cell(Sys::Busrt),
                    cell(Sys::BusrtBigQueue),
                    fmt(cpu_c),
                    fmt(cpu_b),
                    if cpu_c.is_nan() || cpu_b.is_nan() {
                        "–".to_string()
                    } else {
                        format!("{:.2}x", cpu_c / cpu_b)
                    },
                );
            }
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "### Details (medians; CPU time per operation of the measured phase: the broker's \
         process and the clients' process apart; p50 per call or confirmed send)\n"
    );
    let _ = writeln!(
        md,
        "| layout | transport | case | system | headline | broker CPU ns/op | clients CPU ns/op | p50 µs | runs (headline) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---:|---:|---:|---:|---|");
    for &l in layouts {
        for t in TRANSPORTS {
            for c in CASES {
                for s in SYSTEMS {
                    let all = r.get(l, t, c, s);
                    if all.is_empty() || r.not_built(l, t, c, s) {
                        continue;
                    }
                    let runs: Vec<String> = all
                        .iter()
                        .map(|run| match run {
                            Run::Done(o) => fmt(o.headline(c)),
                            Run::NotBuilt => "not built".into(),
                            Run::Failed(_) => "failed".into(),
                        })
                        .collect();
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} | {} {} | {} | {} | {} | {} |",
                        l.name(),
                        t.name(),
                        c.name(),
                        s.name(),
                        fmt(r.med(l, t, c, s, |o| o.headline(c))),
                        c.metric().0,
                        fmt(r.med(l, t, c, s, |o| o.broker_cpu_ns)),
                        fmt(r.med(l, t, c, s, |o| o.clients_cpu_ns)),
                        fmt(r.med(l, t, c, s, |o| o.p50_ns / 1e3)),
                        runs.join(", "),
                    );
                }
            }
        }
    }
    let mut first = true;
    for &l in layouts {
        for t in TRANSPORTS {
            for c in CASES {
                for s in SYSTEMS {
                    for why in r.failures(l, t, c, s) {
                        if first {
                            let _ = writeln!(md, "\n### Failed runs\n");
                            first = false;
                        }
                        let _ = writeln!(
                            md,
                            "- {} {} {} {}: {why}",
                            l.name(),
                            t.name(),
                            c.name(),
                            s.name()
                        );
                    }
                }
            }
        }
    }
    md
}
