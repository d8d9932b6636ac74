//! The Rust peer the Python client (`python/`) is tested and benchmarked against, and the
//! server its README talks to. It stays up until its standard input closes (or it is
//! killed), serving:
//!
//! - `main`: a TCP listener (`--listen ADDR`, default `tcp://127.0.0.1:0`) with the
//!   `calculator`, `test` and `bench` objects and default options;
//! - `unix`, `tls`: the same objects over a Unix socket and over TLS (a certificate for
//!   `localhost` and 127.0.0.1, signed by a CA generated at start-up and written to the
//!   file printed as `ca`);
//! - `small`: the same objects plus `gate` (one for all its connections), with a 64 KiB receive window, two handler slots
//!   and an outbox of 16 signals (flow-control tests);
//! - `bad:NAME`: raw listeners that break the protocol in one way each (see `BAD`).
//!
//! It prints one `NAME ADDRESS` line per listener, then `ready`.
//!
//! Run with `cargo run --example py_peer` (add `-- --listen tcp://127.0.0.1:7000` for a
//! fixed port).

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chatter_core::tls::ServerTls;
use chatter_core::{listen, Options, SendOptions};
use chatter_rpc::{remote, serve, CallError, Peer, PeerOptions, RpcServer};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};

/// The calculator of `examples/calculator.rs`, without the callback.
#[remote]
pub trait Calculator {
    async fn add(&self, a: i64, b: i64) -> i64;
    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError>;
    async fn slow_square(&self, x: i64, millis: u64) -> i64;
    #[signal(ttl = "5s")]
    async fn log(&self, line: String);
    async fn logged(&self) -> u64;
}

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
pub enum CalcError {
    #[error("division by zero")]
    DivisionByZero,
}

/// An error with a cause, to test the context chain.
#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("{outer}")]
pub struct ChainError {
    outer: String,
    #[source]
    inner: Inner,
}

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("{0}")]
pub struct Inner(String);

/// What the Python tests call.
#[remote]
pub trait Test {
    async fn echo(&self, s: String) -> String;
    /// A string of `n` bytes.
    async fn blob(&self, n: u64) -> String;
    async fn nothing(&self) -> u64;
    async fn panic(&self, msg: String) -> i64;
    async fn fail(&self, outer: String, inner: String) -> Result<(), ChainError>;
    /// Sleeps; counts the handlers started, finished and dropped before finishing.
    async fn sleep(&self, ms: u64) -> u64;
    /// Waits (at most `ms`) until `n` sleep handlers were dropped; returns how many were.
    async fn wait_dropped(&self, n: u64, ms: u64) -> u64;
    #[signal(ttl = "10s")]
    async fn bump(&self, n: u64);
    /// Waits (at most `ms`) until the bumps add up to `n`; returns the sum.
    async fn wait_count(&self, n: u64, ms: u64) -> u64;
    /// Calls the Python object `py` and describes the outcome.
    async fn py_add(&self, a: i64, b: i64) -> String;
    async fn py_fail(&self, msg: String) -> String;
    async fn py_crash(&self) -> String;
    async fn py_slow(&self, ms: u64, deadline_ms: u64) -> String;
    async fn py_missing(&self) -> String;
    async fn py_no_object(&self) -> String;
    /// Sends the signal `note(text)` to `py` with a TTL.
    async fn py_note(&self, text: String, ttl_ms: u64) -> String;
    /// Calls `py.context_seen()` and sends it the signal `note(text)`, both with the
    /// metadata `key: value` and the trace context `trace` (envelope kinds 9 and 10).
    async fn py_context(&self, key: String, value: String, trace: String) -> String;
    /// Starts sending `n` `put` signals of `size` bytes to `py` (in a task).
    async fn flood(&self, n: u64, size: u64);
    async fn flood_status(&self) -> FloodStatus;
    /// Waits (at most `ms`) for the flood to finish.
    async fn wait_flood(&self, ms: u64) -> FloodStatus;
    /// Closes this connection (after the reply is queued).
    async fn close_me(&self);
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct FloodStatus {
    sent: u64,
    queued: u64,
    max_queued: u64,
    done: bool,
    errors: u64,
}

/// What the Python side serves as `py`.
#[remote]
pub trait PyObj {
    async fn add(&self, a: i64, b: i64) -> i64;
    async fn fail(&self, msg: String) -> Result<i64, String>;
    async fn crash(&self) -> i64;
    async fn slow(&self, ms: u64) -> i64;
    #[signal]
    async fn note(&self, text: String);
    #[signal(ttl = "60s")]
    async fn put(&self, i: u64, data: String);
    /// What the Python handler's context holds.
    async fn context_seen(&self) -> String;
}

#[remote]
pub trait PyMissing {
    async fn missing(&self) -> i64;
}

/// For the benchmark.
#[remote]
pub trait Bench {
    async fn add(&self, a: i64, b: i64) -> i64;
    #[signal(ttl = "60s")]
    async fn count(&self, n: u64);
    async fn counted(&self) -> u64;
    /// Waits (at most `ms`) until the count reaches `n`.
    async fn wait_counted(&self, n: u64, ms: u64) -> u64;
}

/// A slow consumer: each `hold` waits for a permit from `open`.
#[remote]
pub trait Gate {
    #[signal(ttl = "60s")]
    async fn hold(&self, i: u64, data: String);
    async fn open(&self, n: u64);
    async fn passed(&self) -> u64;
    async fn wait_passed(&self, n: u64, ms: u64) -> u64;
}

struct Calc {
    logged: AtomicU64,
}

impl Calculator for Calc {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a.wrapping_add(b)
    }
    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError> {
        a.checked_div(b).ok_or(CalcError::DivisionByZero)
    }
    async fn slow_square(&self, x: i64, millis: u64) -> i64 {
        tokio::time::sleep(Duration::from_millis(millis)).await;
        x.wrapping_mul(x)
    }
    async fn log(&self, line: String) {
        println!("log: {line}");
        self.logged.fetch_add(1, Ordering::Relaxed);
    }
    async fn logged(&self) -> u64 {
        self.logged.load(Ordering::Relaxed)
    }
}

/// A counter and something to wait on until it reaches a value.
#[derive(Default)]
struct Counter {
    value: AtomicU64,
    changed: Notify,
}

impl Counter {
    fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
    fn get(&self) -> u64 {
        self.value.load(Ordering::SeqCst)
    }
    async fn wait(&self, n: u64, ms: u64) -> u64 {
        let _ = tokio::time::timeout(Duration::from_millis(ms), async {
            loop {
                let changed = self.changed.notified();
                if self.get() >= n {
                    return;
                }
                changed.await;
            }
        })
        .await;
        self.get()
    }
}

struct TestObj {
    peer: Peer,
    py: PyObjClient,
    dropped: Arc<Counter>,
    bumps: Counter,
    flood: Arc<Mutex<FloodStatus>>,
    flood_done: Arc<Notify>,
}

/// Counts a sleep handler dropped before it finished.
struct DropGuard(Arc<Counter>, bool);

impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.add(1);
        }
    }
}

fn describe<T: std::fmt::Debug, E: std::fmt::Debug>(r: Result<T, CallError<E>>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(CallError::App { error, remote }) => {
            format!("app {error:?} / {} / {:?}", remote.message, remote.chain)
        }
        Err(CallError::DeadlineExceeded) => "deadline".into(),
        Err(CallError::RemotePanic { message }) => format!("panic {message}"),
        Err(CallError::NoSuchMethod { method, .. }) => format!("no such method {method}"),
        Err(CallError::NoSuchObject { object }) => format!("no such object {object}"),
        Err(CallError::BadArguments { what }) => format!("bad arguments {what}"),
        Err(e) => format!("other {e}"),
    }
}

impl Test for TestObj {
    async fn echo(&self, s: String) -> String {
        s
    }
    async fn blob(&self, n: u64) -> String {
        "x".repeat(n as usize)
    }
    async fn nothing(&self) -> u64 {
        42
    }
    async fn panic(&self, msg: String) -> i64 {
        panic!("{msg}")
    }
    async fn fail(&self, outer: String, inner: String) -> Result<(), ChainError> {
        Err(ChainError {
            outer,
            inner: Inner(inner),
        })
    }
    async fn sleep(&self, ms: u64) -> u64 {
        let mut guard = DropGuard(self.dropped.clone(), false);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        guard.1 = true;
        ms
    }
    async fn wait_dropped(&self, n: u64, ms: u64) -> u64 {
        self.dropped.wait(n, ms).await
    }
    async fn bump(&self, n: u64) {
        self.bumps.add(n);
    }
    async fn wait_count(&self, n: u64, ms: u64) -> u64 {
        self.bumps.wait(n, ms).await
    }
    async fn py_add(&self, a: i64, b: i64) -> String {
        describe(self.py.add(a, b).await)
    }
    async fn py_fail(&self, msg: String) -> String {
        describe(self.py.fail(msg).await)
    }
    async fn py_crash(&self) -> String {
        describe(self.py.crash().await)
    }
    async fn py_slow(&self, ms: u64, deadline_ms: u64) -> String {
        let py = self.py.with_deadline(Duration::from_millis(deadline_ms));
        describe(py.slow(ms).await)
    }
    async fn py_missing(&self) -> String {
        describe(PyMissingClient::new(&self.peer, "py").missing().await)
    }
    async fn py_no_object(&self) -> String {
        describe(PyObjClient::new(&self.peer, "nobody").add(1, 2).await)
    }
    async fn py_note(&self, text: String, ttl_ms: u64) -> String {
        let py = self.py.with_ttl(Duration::from_millis(ttl_ms));
        match py.note(text).await {
            Ok(_) => "queued".into(),
            Err(e) => format!("error {e}"),
        }
    }
    async fn py_context(&self, key: String, value: String, trace: String) -> String {
        let py = self
            .py
            .with_metadata(&key, &value)
            .with_metadata("traceparent", &trace);
        if let Err(e) = py.note("with context".into()).await {
            return format!("error {e}");
        }
        describe(py.context_seen().await)
    }
    async fn flood(&self, n: u64, size: u64) {
        let (py, peer, status, done) = (
            self.py.clone(),
            self.peer.clone(),
            self.flood.clone(),
            self.flood_done.clone(),
        );
        *status.lock().unwrap() = FloodStatus::default();
        tokio::spawn(async move {
            let data = "y".repeat(size as usize);
            for i in 0..n {
                let ok = py.put(i, data.clone()).await.is_ok();
                let queued = peer.queued() as u64;
                let mut s = status.lock().unwrap();
                s.sent += 1;
                s.errors += u64::from(!ok);
                s.queued = queued;
                s.max_queued = s.max_queued.max(queued);
            }
            peer.flush().await;
            let mut s = status.lock().unwrap();
            s.queued = peer.queued() as u64;
            s.done = true;
            done.notify_waiters();
        });
    }
    async fn flood_status(&self) -> FloodStatus {
        let mut s = self.flood.lock().unwrap().clone();
        s.queued = self.peer.queued() as u64;
        s
    }
    async fn wait_flood(&self, ms: u64) -> FloodStatus {
        let _ = tokio::time::timeout(Duration::from_millis(ms), async {
            loop {
                let done = self.flood_done.notified();
                if self.flood.lock().unwrap().done {
                    return;
                }
                done.await;
            }
        })
        .await;
        self.flood.lock().unwrap().clone()
    }
    async fn close_me(&self) {
        let peer = self.peer.clone();
        tokio::spawn(async move {
            // Let the reply go out first: it is queued before the close frame.
            tokio::task::yield_now().await;
            peer.close().await;
        });
    }
}

struct BenchObj {
    counted: Counter,
}

impl Bench for BenchObj {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a.wrapping_add(b)
    }
    async fn count(&self, n: u64) {
        self.counted.add(n);
    }
    async fn counted(&self) -> u64 {
        self.counted.get()
    }
    async fn wait_counted(&self, n: u64, ms: u64) -> u64 {
        self.counted.wait(n, ms).await
    }
}

struct GateObj {
    permits: Semaphore,
    passed: Counter,
}

impl Gate for GateObj {
    async fn hold(&self, _i: u64, _data: String) {
        if let Ok(permit) = self.permits.acquire().await {
            permit.forget();
        }
        self.passed.add(1);
    }
    async fn open(&self, n: u64) {
        self.permits.add_permits(n as usize);
    }
    async fn passed(&self) -> u64 {
        self.passed.get()
    }
    async fn wait_passed(&self, n: u64, ms: u64) -> u64 {
        self.passed.wait(n, ms).await
    }
}

fn register(peer: &Peer, gate: Option<&Arc<GateObj>>) {
    peer.register(
        "calculator",
        CalculatorServer::new(Calc {
            logged: AtomicU64::new(0),
        }),
    );
    peer.register(
        "test",
        TestServer::new(TestObj {
            peer: peer.clone(),
            py: PyObjClient::new(peer, "py"),
            dropped: Arc::new(Counter::default()),
            bumps: Counter::default(),
            flood: Arc::default(),
            flood_done: Arc::default(),
        }),
    );
    peer.register(
        "bench",
        BenchServer::new(BenchObj {
            counted: Counter::default(),
        }),
    );
    if let Some(gate) = gate {
        peer.register("gate", GateServer::from_arc(gate.clone()));
    }
}

/// A CA and a certificate for `localhost` and 127.0.0.1 signed by it: (CA PEM, cert, key).
fn certificates() -> Result<(String, String, String), Box<dyn std::error::Error>> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "py_peer test CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}

/// The hello `[0, "chatter", version, max_frame_size, receive_window]` with a length prefix.
fn hello(version: u8, window: u32) -> Vec<u8> {
    let mut body = vec![0x95, 0x00, 0xa7];
    body.extend_from_slice(b"chatter");
    body.push(version);
    body.push(0xce);
    body.extend_from_slice(&(1u32 << 20).to_be_bytes());
    body.push(0xce);
    body.extend_from_slice(&window.to_be_bytes());
    framed(&body)
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// The raw misbehaviours: what each `bad:NAME` listener writes after accepting.
const BAD: &[&str] = &[
    "not_chatter",
    "bad_version",
    "silent",
    "mute",
    "oversized",
    "signed_id",
    "bad_id",
    "unknown_conversation",
    "window_overflow",
    "exceed_window",
    "truncated",
    "close_first",
    "ping",
];

async fn misbehave(name: &'static str, mut stream: TcpStream) -> std::io::Result<()> {
    let window = 1 << 21;
    let out: Vec<u8> = match name {
        "not_chatter" => b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
        "bad_version" => hello(2, window),
        "silent" => Vec::new(),
        "mute" => hello(1, window),
        // A length far above the client's max_frame_size, then nothing more.
        "oversized" => [hello(1, window), vec![0x7f, 0xff, 0xff, 0xff]].concat(),
        // id 1 written as int 8 (signed): malformed.
        "signed_id" => [
            hello(1, window),
            framed(&[0x94, 0x01, 0xd0, 0x01, 0x01, 0x07]),
        ]
        .concat(),
        // The first message carries id 2.
        "bad_id" => [
            hello(1, window),
            framed(&[0x94, 0x01, 0x02, 0x02, 0x07, 0xc0]),
        ]
        .concat(),
        // A non-owner message in a conversation the client never opened.
        "unknown_conversation" => [
            hello(1, window),
            framed(&[0x94, 0x01, 0x01, 0x05, 0x06, 0xc0]),
        ]
        .concat(),
        // Credit beyond the window this side announced.
        "window_overflow" => [hello(1, window), framed(&[0x92, 0x04, 0x01])].concat(),
        // 100 one-shot messages of 1000 bytes (cost 1070 each): beyond any window the
        // tests announce (64 KiB), and beyond the 4096-byte floor.
        "exceed_window" => {
            let mut out = hello(1, window);
            for id in 1..=100u8 {
                let mut body = vec![0x94, 0x01, id, id, 0x07];
                body.resize(1000, 0); // the payload is opaque to chatter-core
                out.extend(framed(&body));
            }
            out
        }
        // Half a frame, then the end of the stream.
        "truncated" => [hello(1, window), vec![0x00, 0x00, 0x00, 0x10, 0x94, 0x01]].concat(),
        // A close frame instead of a hello (a busy server).
        "close_first" => {
            let mut body = vec![0x93, 0x05, 0x04, 0xa4];
            body.extend_from_slice(b"busy");
            framed(&body)
        }
        // Two pings; once a pong arrives, a one-shot message `true` says so.
        "ping" => [
            hello(1, window),
            vec![0, 0, 0, 2, 0x91, 0x02, 0, 0, 0, 2, 0x91, 0x02],
        ]
        .concat(),
        _ => unreachable!(),
    };
    stream.write_all(&out).await?;
    if name == "ping" {
        return answer_pong(stream).await;
    }
    if name == "truncated" {
        stream.shutdown().await?;
    }
    // Read (and drop) whatever the client sends until it goes away.
    let mut buf = [0u8; 4096];
    while stream.read(&mut buf).await? > 0 {}
    Ok(())
}

/// Reads frames until a pong arrives, then sends a one-shot message `true`.
async fn answer_pong(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut told = false;
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 4 {
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if buf.len() < 4 + len {
                break;
            }
            let body: Vec<u8> = buf.drain(..4 + len).skip(4).collect();
            if body == [0x91, 0x03] && !told {
                told = true;
                stream
                    .write_all(&framed(&[0x94, 0x01, 0x01, 0x01, 0x07, 0xc3]))
                    .await?;
            }
        }
    }
}

/// RPC-level misbehaviour over valid frames: answers each call with a bad reply.
const BAD_RPC: &[&str] = &[
    "reply_unknown_status",
    "reply_not_array",
    "reply_unknown_failure",
    "reply_not_last",
];

async fn bad_rpc(name: &'static str) -> Result<String, Box<dyn std::error::Error>> {
    let server = listen("tcp://127.0.0.1:0", Options::default()).await?;
    let address = server.addresses()[0].to_string();
    tokio::spawn(async move {
        while let Some(conn) = server.accept().await {
            tokio::spawn(async move {
                while let Ok(msg) = conn.receive().await {
                    if !msg.first || msg.last {
                        continue;
                    }
                    let reply = SendOptions::new().conversation(msg.conversation);
                    let (payload, options): (&[u8], _) = match name {
                        "reply_unknown_status" => (&[0x92, 0x09, 0x01], reply),
                        "reply_not_array" => (&[0x05], reply),
                        "reply_unknown_failure" => (&[0x93, 0x02, 0x63, 0xa1, 0x78], reply),
                        "reply_not_last" => (&[0x92, 0x00, 0x05], reply.last(false)),
                        _ => unreachable!(),
                    };
                    let _ = conn.send_bytes(payload, options).await;
                }
            });
        }
    });
    Ok(address)
}

fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

// One thread: the Python tests and benchmark measure the client, and a single-threaded
// server keeps their timings comparable. (It was first chosen to avoid a race in `serve`,
// since fixed: a peer's setup now runs before its receive task starts.)
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut address = "tcp://127.0.0.1:0".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => address = args.next().ok_or("--listen needs an address")?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let mut servers: Vec<RpcServer> = Vec::new();
    let mut announce = |name: &str, server: RpcServer| {
        print_line(&format!("{name} {}", server.addresses()[0]));
        servers.push(server);
    };

    announce(
        "main",
        serve(
            listen(address.as_str(), Options::default()).await?,
            PeerOptions::default(),
            |peer: &Peer| register(peer, None),
        ),
    );

    let dir = std::env::temp_dir();
    let pid = std::process::id();
    let socket = dir.join(format!("py_peer_{pid}.sock"));
    let _ = std::fs::remove_file(&socket);
    announce(
        "unix",
        serve(
            listen(
                format!("unix://{}", socket.display()).as_str(),
                Options::default(),
            )
            .await?,
            PeerOptions::default(),
            |peer: &Peer| register(peer, None),
        ),
    );

    let (ca, cert, key) = certificates()?;
    let ca_file = dir.join(format!("py_peer_{pid}_ca.pem"));
    std::fs::write(&ca_file, ca)?;
    let tls = ServerTls::from_pem(cert.as_bytes(), key.as_bytes())?;
    announce(
        "tls",
        serve(
            listen("tls://127.0.0.1:0", Options::default().tls_server(tls)).await?,
            PeerOptions::default(),
            |peer: &Peer| register(peer, None),
        ),
    );
    print_line(&format!("ca {}", ca_file.display()));

    // One gate for every connection: a test fills it through one connection (whose
    // handler slots it then blocks) and opens it through another.
    let gate = Arc::new(GateObj {
        permits: Semaphore::new(0),
        passed: Counter::default(),
    });
    let small = Options::default()
        .max_frame_size(32 * 1024)
        .receive_window(64 * 1024);
    announce(
        "small",
        serve(
            listen("tcp://127.0.0.1:0", small).await?,
            PeerOptions::default()
                .max_concurrent_handlers(2)
                .max_queued_signals(16),
            move |peer: &Peer| register(peer, Some(&gate)),
        ),
    );

    for &name in BAD {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        print_line(&format!("bad:{name} tcp://{}", listener.local_addr()?));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(misbehave(name, stream));
            }
        });
    }
    for &name in BAD_RPC {
        print_line(&format!("bad:{name} {}", bad_rpc(name).await?));
    }
    print_line("ready");

    // Serve until standard input closes (the tests hold a pipe) or a signal ends us.
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    });
    let _ = stdin_closed.await;
    for server in &servers {
        server.close().await;
    }
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&ca_file);
    Ok(())
}
