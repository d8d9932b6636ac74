//! Process-level plumbing: CPU pinning, the two current-thread runtimes, memory figures
//! from `/proc/self/status`, latency recording and the measured-phase drivers shared by
//! the systems.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{Notify, Semaphore};

/// Where the client and server threads run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Server thread on CPU 1, client thread on CPU 0.
    Split,
    /// Both threads on CPU 0: the framework's own CPU cost per operation.
    OneCore,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Split => "split",
            Layout::OneCore => "onecore",
        }
    }

    pub fn parse(s: &str) -> Option<Layout> {
        match s {
            "split" => Some(Layout::Split),
            "onecore" => Some(Layout::OneCore),
            _ => None,
        }
    }

    fn cpus(self) -> (usize, usize) {
        match self {
            Layout::Split => (0, 1),
            Layout::OneCore => (0, 0),
        }
    }
}

/// The number of CPUs this process may run on.
pub fn cpu_count() -> usize {
    // SAFETY: `set` is a plain bit set that sched_getaffinity fills in.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            libc::CPU_COUNT(&set) as usize
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// Pins the calling thread to one CPU.
pub fn pin_to(cpu: usize) {
    // SAFETY: `set` is a plain bit set; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity to CPU {cpu} failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Raises the soft limit of open files to the hard limit (idle opens thousands of sockets).
pub fn raise_nofile() {
    // SAFETY: plain struct filled in by getrlimit, passed back to setrlimit.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Returns freed heap memory to the kernel, so an RSS delta counts only live memory.
pub fn malloc_trim() {
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A field of `/proc/self/status` in bytes (`VmRSS`, `VmHWM`).
pub fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb * 1024)
        })
        .unwrap_or(0)
}

/// Resets the peak RSS (`VmHWM`) to the current RSS.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// What the server hands the client: where to connect and what it counts.
#[derive(Clone)]
pub struct ServerInfo {
    pub addr: String,
    pub done: Arc<Done>,
}

/// Counts one-way messages at the receiver and records when the last one arrived.
pub struct Done {
    count: AtomicU64,
    target: AtomicU64,
    at: Mutex<Option<Instant>>,
    notify: Notify,
}

impl Done {
    pub fn new(target: u64) -> Arc<Done> {
        Arc::new(Done {
            count: AtomicU64::new(0),
            target: AtomicU64::new(target),
            at: Mutex::new(None),
            notify: Notify::new(),
        })
    }

    /// Counts `n` received messages.
    pub fn add(&self, n: u64) {
        let total = self.count.fetch_add(n, Ordering::Relaxed) + n;
        if total == self.target.load(Ordering::Relaxed) {
            *self.at.lock().expect("done lock") = Some(Instant::now());
            self.notify.notify_one();
        }
    }

    /// Waits until the target count was reached; returns when it was.
    pub async fn wait(&self) -> Instant {
        loop {
            if let Some(at) = *self.at.lock().expect("done lock") {
                return at;
            }
            self.notify.notified().await;
        }
    }
}

pub type LocalFuture<T> = Pin<Box<dyn Future<Output = T>>>;
/// Builds the server on the server thread; returns what the client needs and a value the
/// server thread keeps alive until the process exits.
pub type ServerFn = Box<dyn FnOnce() -> LocalFuture<(ServerInfo, Box<dyn Any>)> + Send>;
/// Runs the client on the client thread.
pub type ClientFn = Box<dyn FnOnce(ServerInfo) -> LocalFuture<Measured> + Send>;

/// What one measurement produced.
#[derive(Debug, Default)]
pub struct Measured {
    /// Operations completed in the measured phase.
    pub ops: u64,
    /// Bytes of payload moved per operation (for MB/s), 0 when not a payload workload.
    pub bytes_per_op: u64,
    /// Wall time of the measured phase.
    pub elapsed: Duration,
    /// Latency of each operation in nanoseconds (empty when it does not apply).
    pub latencies: Vec<u32>,
    /// Resident bytes per connection (idle workload only).
    pub rss_per_conn: Option<f64>,
    /// The slowest stream's items over the fair share (`stream-fanout` only).
    pub min_share: Option<f64>,
    /// CPU time of the whole process (both ends) in the measured phase (stream workloads).
    pub cpu: Option<Duration>,
}

/// CPU time this process used so far, all threads (`CLOCK_PROCESS_CPUTIME_ID`): unlike
/// wall time, hardly affected by other processes on a busy host.
pub fn process_cpu() -> Duration {
    // SAFETY: `ts` is a plain struct that clock_gettime fills in.
    unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts);
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a current-thread tokio runtime")
}

/// With `CHATTER_BENCH_PENDING_TIMER` set in the environment, each runtime keeps an
/// hour-long sleep pending: a baseline that has a timer armed, as every chatter connection
/// has (its keepalive, the handshake deadline, a call's deadline). tokio then parks with a
/// timeout, which costs the kernel an hrtimer per park (BENCHMARKS.md, "Ninth round").
fn keep_a_timer_pending_if_asked(local: &tokio::task::LocalSet) {
    if std::env::var_os("CHATTER_BENCH_PENDING_TIMER").is_some() {
        // Spawned into the set, so the sleep is made (and registered) inside the runtime.
        local.spawn_local(async { tokio::time::sleep(Duration::from_secs(3600)).await });
    }
}

/// Runs `server` and `client` as two current-thread runtimes on two threads pinned
/// according to `layout`, and returns the client's measurement. The server thread is left
/// running: the caller (a child process doing one measurement) exits afterwards.
pub fn run_pair(layout: Layout, server: ServerFn, client: ClientFn) -> Measured {
    let (server_cpu, client_cpu) = layout.cpus();
    let (info_tx, info_rx) = std::sync::mpsc::channel::<ServerInfo>();
    std::thread::Builder::new()
        .name("bench-server".into())
        .spawn(move || {
            pin_to(server_cpu);
            let rt = runtime();
            let local = tokio::task::LocalSet::new();
            keep_a_timer_pending_if_asked(&local);
            local.block_on(&rt, async move {
                let (info, keep) = server().await;
                info_tx
                    .send(info)
                    .expect("hand the server info to the client");
                std::future::pending::<()>().await;
                drop(keep);
            });
        })
        .expect("spawn the server thread");
    let info = info_rx.recv().expect("the server thread started");
    std::thread::Builder::new()
        .name("bench-client".into())
        .spawn(move || {
            pin_to(client_cpu);
            let rt = runtime();
            let local = tokio::task::LocalSet::new();
            keep_a_timer_pending_if_asked(&local);
            local.block_on(&rt, client(info))
        })
        .expect("spawn the client thread")
        .join()
        .expect("the client thread panicked")
}

/// Runs `total` calls made by `call`, at most `window` at once, and returns each call's
/// latency in nanoseconds. With a window of 1 the calls run one after the other.
///
/// The window is `window` workers, each a loop that makes one call after another, as a
/// service with that many concurrent tasks would. Each call's future lives in its worker's
/// state, so the harness costs a wake-up per call but no allocation and no move of the
/// call's future, which with one future per call (a `FuturesUnordered` push each) cost
/// about 800 instructions per call, half of a raw echo. tarpc and chatter-rpc
/// both run on this driver.
pub async fn drive_calls<F, Fut>(total: u64, window: usize, call: F) -> Vec<u32>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    let latencies = RefCell::new(Vec::with_capacity(total as usize));
    if window <= 1 {
        for i in 0..total {
            let t = Instant::now();
            call(i).await;
            latencies.borrow_mut().push(nanos(t));
        }
        return latencies.into_inner();
    }
    let next = Cell::new(0u64);
    let worker = || async {
        loop {
            let i = next.get();
            if i >= total {
                return;
            }
            next.set(i + 1);
            let t = Instant::now();
            call(i).await;
            latencies.borrow_mut().push(nanos(t));
        }
    };
    let workers = window.min(total as usize);
    let mut running: FuturesUnordered<_> = (0..workers).map(|_| worker()).collect();
    while running.next().await.is_some() {}
    drop(running);
    latencies.into_inner()
}

/// Waits for a permit of `credit`, then takes every other free one too, up to `left` in
/// all: how a writer with a window of calls in flight sends all it may at once. Returns
/// how many it took.
pub async fn take_credit(credit: &Semaphore, left: u64) -> u64 {
    credit.acquire().await.expect("credit").forget();
    let more = (credit.available_permits() as u64).min(left.saturating_sub(1));
    if more > 0 {
        credit
            .try_acquire_many(more as u32)
            .expect("credit")
            .forget();
    }
    more + 1
}

/// Nanoseconds since `t`, saturated to u32 (4.3 s).
pub fn nanos(t: Instant) -> u32 {
    t.elapsed().as_nanos().min(u32::MAX as u128) as u32
}

/// Splits `total` operations over `conns` connections.
pub fn share(total: u64, conns: usize, i: usize) -> u64 {
    let conns = conns as u64;
    total / conns + u64::from((i as u64) < total % conns)
}

/// The p-th percentile (0..=100) of `sorted` latencies, in nanoseconds.
pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Runs the per-connection jobs concurrently, each as its own task: every job warms up,
/// waits at a barrier, then does its measured share. Returns the measured phase's wall
/// time and all latencies.
pub async fn run_connections<J, Fut>(jobs: Vec<J>) -> (Duration, Vec<u32>)
where
    J: FnOnce(Arc<tokio::sync::Barrier>) -> Fut,
    Fut: Future<Output = Vec<u32>> + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(jobs.len() + 1));
    let handles: Vec<_> = jobs
        .into_iter()
        .map(|job| tokio::task::spawn_local(job(barrier.clone())))
        .collect();
    barrier.wait().await;
    let start = Instant::now();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.expect("a connection task panicked"));
    }
    (start.elapsed(), all)
}

/// Where a workload's application code runs on its thread's current-thread runtime.
///
/// Most workloads run it in the thread's `LocalSet` (on `block_on`, and `spawn_local`
/// for the server's tasks). The connect workload runs it as tasks of the runtime itself
/// (`tokio::spawn`), for every system: a library's own tasks (chatter's connection
/// drivers, chatter-rpc's receive tasks, tarpc's dispatch) are runtime tasks, and one of
/// them waking code in the `LocalSet` makes the current-thread scheduler poll its I/O
/// driver once more (a zero-timeout `epoll_wait`) before it gets to the `block_on`
/// future, which a raw echo, woken by its sockets alone, never pays. Run as runtime tasks,
/// application and library wake each other as tasks of one run queue (BENCHMARKS.md,
/// "Third round").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tasks {
    Local,
    Runtime,
}

impl Tasks {
    /// Runtime tasks for the connect workload, the `LocalSet` for the others.
    pub fn of(kind: crate::workload::Kind) -> Tasks {
        match kind {
            crate::workload::Kind::Connect => Tasks::Runtime,
            _ => Tasks::Local,
        }
    }

    /// Spawns `task` where this says. Callers bound what they spawn: an accept loop per
    /// measured case and a task per connection the bench's own clients open.
    pub fn spawn<F>(self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self {
            Tasks::Local => tokio::task::spawn_local(task),
            Tasks::Runtime => tokio::spawn(task),
        }
    }
}

/// Runs a connect workload's client loop as a runtime task (see [`Tasks`]).
pub async fn connect_task<F>(client: F) -> Measured
where
    F: Future<Output = Measured> + Send + 'static,
{
    // One per connect run, awaited here.
    tokio::spawn(client)
        .await
        .expect("the connect loop panicked")
}

/// The connect workload: `warmup` then `total` connections one after the other, each made
/// by `one` (connect, one call, close); the rate is connections per second, the latency
/// that of a whole connection.
pub async fn connect_loop<F, Fut>(warmup: u64, total: u64, one: F) -> Measured
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = ()>,
{
    for i in 0..warmup {
        one(i).await;
    }
    // One after the other, as `drive_calls` with a window of 1 (whose other branch would
    // keep this future from being `Send`: see `connect_task`).
    let mut latencies = Vec::with_capacity(total as usize);
    let start = Instant::now();
    for i in 0..total {
        let t = Instant::now();
        one(i).await;
        latencies.push(nanos(t));
    }
    Measured {
        ops: total,
        elapsed: start.elapsed(),
        latencies,
        ..Measured::default()
    }
}

/// Measures the RSS cost of `n` connections opened by `open` (both ends in this process):
/// the VmRSS delta after opening them, divided by `n`. `open` makes one round trip on each
/// connection, so both ends are established and have been used once.
pub async fn idle_rss<F, Fut>(n: usize, open: F) -> Measured
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Box<dyn Any>>,
{
    // Let the server settle, then give freed memory back so the delta counts live memory.
    tokio::time::sleep(Duration::from_millis(50)).await;
    malloc_trim();
    let before = proc_status_bytes("VmRSS");
    let start = Instant::now();
    let keep = open().await;
    let elapsed = start.elapsed();
    // Let the server finish whatever it does after accepting (first reads, peers' tasks).
    tokio::time::sleep(Duration::from_millis(300)).await;
    malloc_trim();
    let after = proc_status_bytes("VmRSS");
    drop(keep);
    Measured {
        ops: n as u64,
        elapsed,
        rss_per_conn: Some(after.saturating_sub(before) as f64 / n as f64),
        ..Measured::default()
    }
}
