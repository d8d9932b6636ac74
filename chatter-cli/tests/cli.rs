//! The `chatter` binary against real servers in this process: TCP, a Unix socket, mutual
//! TLS with the repository's test PKI, and a peer with introspection off. Output is piped,
//! so every command prints JSON lines. `subscribe` and `publish` (a broker's) are in
//! `pubsub.rs`.

use std::ffi::OsStr;
use std::fmt::Debug;
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chatter_rpc::stream::{channel, Receiver};
use chatter_rpc::tls::ServerTls;
use chatter_rpc::{listen, remote, serve, Options, Peer, PeerOptions, RpcServer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
pub enum CalcError {
    #[error("division by zero")]
    DivisionByZero,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Point {
    x: i64,
    y: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Figure {
    Circle { r: f64 },
    Square(f64),
    Empty,
}

/// A calculator.
#[remote]
pub trait Calc {
    /// Adds two numbers.
    async fn add(&self, a: i64, b: i64) -> i64;
    /// Divides, or fails with a typed error.
    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError>;
    /// Mirrors a point.
    async fn mirror(&self, p: Point) -> Point;
    /// Takes its time.
    async fn sleep(&self, millis: u64);
    /// Counts a line.
    #[signal(ttl = "5s")]
    async fn log(&self, line: String);
    /// How many lines arrived.
    async fn logged(&self) -> u64;
    /// The area of a figure (a circle's is 3 r², roughly), times `scale`.
    async fn area(&self, figure: Figure, scale: f64) -> f64;
}

struct Calculator {
    logged: Arc<AtomicU64>,
}

impl Calc for Calculator {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }
    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError> {
        a.checked_div(b).ok_or(CalcError::DivisionByZero)
    }
    async fn mirror(&self, p: Point) -> Point {
        Point { x: p.y, y: p.x }
    }
    async fn sleep(&self, millis: u64) {
        tokio::time::sleep(Duration::from_millis(millis)).await;
    }
    async fn log(&self, _line: String) {
        self.logged.fetch_add(1, Ordering::SeqCst);
    }
    async fn logged(&self) -> u64 {
        self.logged.load(Ordering::SeqCst)
    }
    async fn area(&self, figure: Figure, scale: f64) -> f64 {
        scale
            * match figure {
                Figure::Circle { r } => 3.0 * r * r,
                Figure::Square(side) => side * side,
                Figure::Empty => 0.0,
            }
    }
}

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
pub enum FeedError {
    #[error("no such feed")]
    NoSuchFeed,
}

/// Streams.
#[remote]
pub trait Feeds {
    /// The numbers from 0 to n - 1.
    async fn numbers(&self, n: u64) -> Receiver<u64>;
    /// Points, one every 10 ms, until the reader goes.
    async fn endless(&self) -> Receiver<Point>;
    /// How many `endless` streams saw their reader go.
    async fn cancelled(&self) -> u64;
    /// Only the feed "a" exists.
    async fn open(&self, name: String) -> Result<Receiver<u64>, FeedError>;
    /// Opens, then sends nothing for a minute.
    async fn silent(&self) -> Receiver<u64>;
    /// Sums an argument stream.
    async fn sum(&self, items: Receiver<u64>) -> u64;
    /// Each item of an argument stream, doubled.
    async fn doubled(&self, items: Receiver<i64>) -> Receiver<i64>;
    /// Sums an argument stream, telling the tests how it went (`Tally`).
    async fn tally(&self, items: Receiver<u64>) -> u64;
    /// The points of an argument stream whose `x` is `at`.
    async fn plot(&self, at: i64, points: Receiver<Point>) -> u64;
}

/// What the tests see of `Feeds::tally`: the items it read and how its stream ended.
#[derive(Default)]
struct Tally {
    seen: AtomicU64,
    /// "ended" (normally), "failed", or "dropped" (the handler was cancelled).
    outcome: std::sync::Mutex<Option<&'static str>>,
}

impl Tally {
    fn end(&self, how: &'static str) {
        let mut outcome = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        outcome.get_or_insert(how);
    }

    fn outcome(&self) -> Option<&'static str> {
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Records "dropped" unless the tally ended first.
struct TallyGuard(Arc<Tally>);

impl Drop for TallyGuard {
    fn drop(&mut self) {
        self.0.end("dropped");
    }
}

struct FeedServer {
    cancelled: Arc<AtomicU64>,
    tally: Arc<Tally>,
}

impl Feeds for FeedServer {
    async fn numbers(&self, n: u64) -> Receiver<u64> {
        let (tx, rx) = channel(16);
        tokio::spawn(async move {
            for i in 0..n {
                if tx.send(i).await.is_err() {
                    break;
                }
            }
        });
        rx
    }
    async fn endless(&self) -> Receiver<Point> {
        let (tx, rx) = channel(1);
        let cancelled = self.cancelled.clone();
        tokio::spawn(async move {
            for i in 0.. {
                if tx.send(Point { x: i, y: -i }).await.is_err() {
                    cancelled.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        rx
    }
    async fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::SeqCst)
    }
    async fn open(&self, name: String) -> Result<Receiver<u64>, FeedError> {
        if name != "a" {
            return Err(FeedError::NoSuchFeed);
        }
        Ok(self.numbers(2).await)
    }
    async fn silent(&self) -> Receiver<u64> {
        let (tx, rx) = channel(1);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(tx);
        });
        rx
    }
    async fn sum(&self, mut items: Receiver<u64>) -> u64 {
        let mut sum = 0;
        while let Some(Ok(item)) = items.recv().await {
            sum += item;
        }
        sum
    }
    async fn doubled(&self, mut items: Receiver<i64>) -> Receiver<i64> {
        let (tx, rx) = channel(4);
        tokio::spawn(async move {
            while let Some(Ok(item)) = items.recv().await {
                if tx.send(item * 2).await.is_err() {
                    break;
                }
            }
        });
        rx
    }
    async fn plot(&self, at: i64, mut points: Receiver<Point>) -> u64 {
        let mut count = 0;
        while let Some(Ok(point)) = points.recv().await {
            count += u64::from(point.x == at);
        }
        count
    }
    async fn tally(&self, mut items: Receiver<u64>) -> u64 {
        let guard = TallyGuard(self.tally.clone());
        let mut sum = 0;
        loop {
            match items.recv().await {
                Some(Ok(item)) => {
                    sum += item;
                    guard.0.seen.fetch_add(1, Ordering::SeqCst);
                }
                Some(Err(_)) => {
                    guard.0.end("failed");
                    break;
                }
                None => {
                    guard.0.end("ended");
                    break;
                }
            }
        }
        sum
    }
}

/// The servers every test talks to, started once.
struct Servers {
    tcp: String,
    unix: String,
    tls: String,
    no_introspection: String,
    tally: Arc<Tally>,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    _servers: Vec<RpcServer>,
    _runtime: tokio::runtime::Runtime,
}

fn servers() -> &'static Servers {
    static SERVERS: OnceLock<Servers> = OnceLock::new();
    SERVERS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let logged = Arc::new(AtomicU64::new(0));
        let cancelled = Arc::new(AtomicU64::new(0));
        let tally = Arc::new(Tally::default());
        let pki = tests::pki();
        let dir = std::env::temp_dir().join(format!("chatter-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write PEM");
            path
        };
        let ca = write("ca.pem", &pki.ca.cert_pem);
        let cert = write("client.pem", &pki.client.cert_pem);
        let key = write("client-key.pem", &pki.client.key_pem);
        let (servers, addresses) = runtime.block_on(async {
            let mut servers = Vec::new();
            let mut addresses = Vec::new();
            let tls = ServerTls::from_pem(
                pki.server.cert_pem.as_bytes(),
                pki.server.key_pem.as_bytes(),
            )
            .expect("server TLS")
            .require_client_certificates(pki.ca.cert_pem.as_bytes())
            .expect("client CA");
            let unix = format!("unix://{}", tests::unix_path().display());
            let setups = [
                ("tcp://127.0.0.1:0".to_owned(), Options::default(), true),
                (unix, Options::default(), true),
                (
                    "tls://127.0.0.1:0".to_owned(),
                    Options::default().tls_server(tls),
                    true,
                ),
                ("tcp://127.0.0.1:0".to_owned(), Options::default(), false),
            ];
            for (address, options, introspection) in setups {
                let listener = listen(address, options).await.expect("listen");
                let logged = logged.clone();
                let cancelled = cancelled.clone();
                let tally = tally.clone();
                let options = PeerOptions::default().introspection(introspection);
                let server = serve(listener, options, move |peer: &Peer| {
                    let calc = Calculator {
                        logged: logged.clone(),
                    };
                    peer.register("calc", CalcServer::new(calc));
                    let feeds = FeedServer {
                        cancelled: cancelled.clone(),
                        tally: tally.clone(),
                    };
                    peer.register("feeds", FeedsServer::new(feeds));
                });
                addresses.push(server.addresses()[0].to_string());
                servers.push(server);
            }
            (servers, addresses)
        });
        let tls = addresses[2].replace("tls://127.0.0.1", "tls://localhost");
        Servers {
            tcp: addresses[0].clone(),
            unix: addresses[1].clone(),
            tls,
            no_introspection: addresses[3].clone(),
            tally,
            ca,
            cert,
            key,
            _servers: servers,
            _runtime: runtime,
        }
    })
}

fn chatter<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chatter"))
        .args(args)
        .output()
        .expect("run chatter")
}

/// Runs `chatter args` with `input` on its stdin.
fn chatter_with_stdin<S: AsRef<OsStr>>(args: &[S], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatter"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run chatter");
    if let Some(mut stdin) = child.stdin.take() {
        // It may exit before reading it all (a line that is not JSON).
        let _ = stdin.write_all(input.as_bytes());
    }
    child.wait_with_output().expect("run chatter")
}

/// The JSON lines of a successful run's stdout.
fn json_lines(out: &Output) -> Vec<Value> {
    let (stdout, stderr) = texts(out);
    assert!(out.status.success(), "failed:\n{stderr}\n{stdout}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Runs `chatter args` and expects success: its stdout lines as JSON.
fn ok<S: AsRef<OsStr> + Debug>(args: &[S]) -> Vec<Value> {
    let out = chatter(args);
    let (stdout, stderr) = texts(&out);
    assert!(
        out.status.success(),
        "chatter {args:?} failed:\n{stderr}\n{stdout}"
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Runs `chatter args` and expects exit status 1: its stderr and stdout.
fn fails<S: AsRef<OsStr> + Debug>(args: &[S]) -> (String, String) {
    let out = chatter(args);
    let (stdout, stderr) = texts(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "chatter {args:?}:\n{stderr}\n{stdout}"
    );
    (stderr, stdout)
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_command_has_help_with_examples() {
    for command in [
        "list",
        "describe",
        "call",
        "emit",
        "watch",
        "subscribe",
        "publish",
        "ping",
        "stats",
    ] {
        let out = chatter(&[command, "--help"]);
        let (stdout, _) = texts(&out);
        assert!(out.status.success(), "{command} --help");
        assert!(stdout.contains("Example"), "{command} --help:\n{stdout}");
        assert!(stdout.contains("chatter "), "{command} --help:\n{stdout}");
    }
    let out = chatter(&["--help"]);
    assert!(texts(&out).0.contains("Examples:"));
    // A command line that does not parse: clap's status 2.
    assert_eq!(chatter(&["call"]).status.code(), Some(2));
}

#[test]
fn list_shows_the_objects_and_their_methods() {
    let s = servers();
    let objects = ok(&["list", &s.tcp]);
    assert_eq!(objects.len(), 3, "{objects:?}");
    assert_eq!(
        objects[0],
        json!({"object": "calc", "interface": "Calc",
               "methods": ["add", "div", "mirror", "sleep", "log", "logged", "area"]})
    );
    assert_eq!(objects[1]["object"], "chatter.introspect");
    // Stream methods are named as such.
    assert_eq!(objects[2]["object"], "feeds");
    assert_eq!(
        objects[2]["streams"],
        json!(["numbers", "endless", "open", "silent", "sum", "doubled", "tally", "plot"])
    );
    // Over a Unix socket as well.
    assert_eq!(ok(&["list", &s.unix]).len(), 3);
}

#[test]
fn describe_gives_arguments_types_and_docs() {
    let s = servers();
    let described = ok(&["describe", &s.tcp, "calc"]);
    let calc = &described[0];
    assert_eq!(calc["object"], "calc");
    assert_eq!(calc["name"], "Calc");
    assert_eq!(calc["docs"], "A calculator.");
    let div = &calc["methods"][1];
    assert_eq!(div["name"], "div");
    assert_eq!(div["kind"], "call");
    assert_eq!(
        div["args"],
        json!([{"name": "a", "type": "i64"}, {"name": "b", "type": "i64"}])
    );
    assert_eq!(div["returns"], "i64");
    assert_eq!(div["error"], "CalcError");
    assert_eq!(div["docs"], "Divides, or fails with a typed error.");
    let log = &calc["methods"][4];
    assert_eq!(
        (&log["kind"], &log["ttl_ms"]),
        (&json!("signal"), &json!(5000))
    );

    let (stderr, _) = fails(&["describe", &s.tcp, "calculator"]);
    assert!(stderr.contains("has no object `calculator`"), "{stderr}");
    assert!(
        stderr.contains("objects there: calc, chatter.introspect"),
        "{stderr}"
    );
}

#[test]
fn describe_shows_the_shapes_of_structs_and_enums() {
    let s = servers();
    let calc = &ok(&["describe", &s.tcp, "calc"])[0];
    let shapes = &calc["shapes"];
    assert_eq!(
        shapes["Point"],
        json!({"kind": "struct", "name": "Point", "content": {"kind": "struct", "fields": [
            {"name": "x", "shape": {"kind": "i64"}},
            {"name": "y", "shape": {"kind": "i64"}}]}})
    );
    assert_eq!(
        shapes["Figure"]["variants"],
        json!([
            {"name": "Circle", "content": {"kind": "struct", "fields": [
                {"name": "r", "shape": {"kind": "f64"}}]}},
            {"name": "Square", "content": {"kind": "newtype", "item": {"kind": "f64"}}},
            {"name": "Empty", "content": {"kind": "unit"}}])
    );
    assert_eq!(shapes["i64"], json!({"kind": "i64"}));
    assert_eq!(shapes["CalcError"]["kind"], "enum");

    // For a person: under each method, the shapes that say more than the type names.
    let out = chatter(&["describe", &s.tcp, "calc", "--pretty"]);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stderr}");
    for line in [
        "  call    area(figure: Figure, scale: f64) -> f64\n      \
         The area of a figure (a circle's is 3 r², roughly), times `scale`.\n      \
         figure: Figure = Circle { r: f64 } | Square(f64) | Empty\n",
        "      p: Point { x: i64, y: i64 }\n      returns: Point { x: i64, y: i64 }\n",
        "      error: CalcError = DivisionByZero\n",
    ] {
        assert!(stdout.contains(line), "{line}\nnot in:\n{stdout}");
    }
    // `add(a: i64, b: i64)`: nothing to add.
    assert!(
        stdout.contains("  call    add(a: i64, b: i64) -> i64\n      Adds two numbers.\n\n"),
        "{stdout}"
    );
}

#[test]
fn arguments_that_do_not_fit_show_the_shape_expected() {
    let s = servers();
    let figure = "figure: Figure = Circle { r: f64 } | Square(f64) | Empty";
    let example = r#"calc.area '{"Circle":{"r":0.0}}' 0.0"#;
    // The callee refuses a variant it does not have: the shape and a call that fits.
    let (stderr, _) = fails(&["call", &s.tcp, "calc.area", r#"{"Triangle": 1}"#, "2"]);
    assert!(
        stderr.contains("the arguments do not fit calc.area"),
        "{stderr}"
    );
    assert!(stderr.contains(figure), "{stderr}");
    assert!(
        stderr.contains(&format!("for example: chatter call {} {example}", s.tcp)),
        "{stderr}"
    );
    // The example fits, and so does each kind of variant.
    assert_eq!(
        ok(&[
            "call",
            &s.tcp,
            "calc.area",
            r#"{"Circle":{"r":0.0}}"#,
            "0.0"
        ]),
        [json!(0.0)]
    );
    assert_eq!(
        ok(&["call", &s.tcp, "calc.area", r#"{"Circle": {"r": 2}}"#, "1"]),
        [json!(12.0)]
    );
    assert_eq!(
        ok(&["call", &s.tcp, "calc.area", r#"{"Square": 3}"#, "2"]),
        [json!(18.0)]
    );
    assert_eq!(
        ok(&["call", &s.tcp, "calc.area", r#""Empty""#, "2"]),
        [json!(0.0)]
    );
    // A struct without one of its fields.
    let (stderr, _) = fails(&["call", &s.tcp, "calc.mirror", r#"{"x": 1}"#]);
    assert!(stderr.contains("p: Point { x: i64, y: i64 }"), "{stderr}");
    assert!(
        stderr.contains(r#"calc.mirror '{"x":0,"y":0}'"#),
        "{stderr}"
    );
    // Too few arguments, and one that is not JSON: the shapes as well.
    let (stderr, _) = fails(&["call", &s.tcp, "calc.area", r#""Empty""#]);
    assert!(stderr.contains("takes 2 arguments, 1 given"), "{stderr}");
    assert!(stderr.contains(figure), "{stderr}");
    let (stderr, _) = fails(&["call", &s.tcp, "calc.area", "Empty", "1"]);
    assert!(stderr.contains("is not JSON"), "{stderr}");
    assert!(stderr.contains(figure), "{stderr}");
    // Plain arguments have no shape to add.
    let (stderr, _) = fails(&["call", &s.tcp, "calc.add", "1", r#""two""#]);
    assert!(!stderr.contains("for example"), "{stderr}");
}

#[test]
fn call_translates_json_both_ways() {
    let s = servers();
    assert_eq!(ok(&["call", &s.tcp, "calc.add", "2", "3"]), [json!(5)]);
    assert_eq!(ok(&["call", &s.tcp, "calc.add", "-2", "-3"]), [json!(-5)]);
    assert_eq!(
        ok(&["call", &s.tcp, "calc.mirror", r#"{"x": 1, "y": 2}"#]),
        [json!({"x": 2, "y": 1})]
    );
    assert_eq!(ok(&["call", &s.unix, "calc.sleep", "1"]), [json!(null)]);
}

#[test]
fn a_remote_error_is_printed_readably_and_as_json() {
    let s = servers();
    let (stderr, stdout) = fails(&["call", &s.tcp, "calc.div", "1", "0"]);
    assert!(
        stderr.contains("calc.div failed (CalcError): division by zero"),
        "{stderr}"
    );
    let error: Value = serde_json::from_str(stdout.trim()).expect("JSON");
    assert_eq!(
        error,
        json!({"error": "DivisionByZero", "message": "division by zero", "chain": []})
    );
}

#[test]
fn mistakes_are_explained() {
    let s = servers();
    let (stderr, _) = fails(&["call", &s.tcp, "calc.sub", "1", "2"]);
    assert!(stderr.contains("has no method `sub`"), "{stderr}");
    assert!(
        stderr.contains("add, div, mirror, sleep, log, logged, area"),
        "{stderr}"
    );

    let (stderr, _) = fails(&["call", &s.tcp, "nothing.add", "1", "2"]);
    assert!(stderr.contains("has no object `nothing`"), "{stderr}");
    assert!(stderr.contains("calc, chatter.introspect"), "{stderr}");

    // Bad JSON: which argument, what it should be, how to quote.
    let (stderr, _) = fails(&["call", &s.tcp, "calc.add", "1", "two"]);
    assert!(
        stderr.contains("argument 2 (b: i64) is not JSON"),
        "{stderr}"
    );
    assert!(stderr.contains("add(a: i64, b: i64) -> i64"), "{stderr}");

    // JSON that does not fit: the callee's decoder says why, the description what fits.
    let (stderr, _) = fails(&["call", &s.tcp, "calc.add", "1", r#""two""#]);
    assert!(
        stderr.contains("the arguments do not fit calc.add"),
        "{stderr}"
    );
    assert!(
        stderr.contains("it takes add(a: i64, b: i64) -> i64"),
        "{stderr}"
    );

    let (stderr, _) = fails(&["call", &s.tcp, "calc.add", "1"]);
    assert!(
        stderr.contains("`add` takes 2 arguments, 1 given"),
        "{stderr}"
    );

    let (stderr, _) = fails(&["call", &s.tcp, "calc.log", r#""x""#]);
    assert!(stderr.contains("is a signal"), "{stderr}");
    assert!(stderr.contains("chatter emit"), "{stderr}");

    let (stderr, _) = fails(&["call", &s.tcp, "calc", "1"]);
    assert!(stderr.contains("is not OBJECT.METHOD"), "{stderr}");

    let (stderr, _) = fails(&["call", &s.tcp, "calc.sleep", "2000", "--deadline", "100ms"]);
    assert!(stderr.contains("no reply within 100ms"), "{stderr}");
}

#[test]
fn emit_sends_a_signal_and_waits_for_its_handler() {
    let s = servers();
    let before = ok(&["call", &s.tcp, "calc.logged"])[0]
        .as_u64()
        .expect("a count");
    assert_eq!(
        ok(&["emit", &s.tcp, "calc.log", r#""hello""#]),
        [json!({"sent": true, "acknowledged": true})]
    );
    ok(&[
        "emit",
        &s.tcp,
        "calc.log",
        r#""again""#,
        "--ttl",
        "2s",
        "--no-ack",
    ]);
    // The second was not acknowledged: wait for it to arrive.
    let mut after = 0;
    for _ in 0..100 {
        after = ok(&["call", &s.tcp, "calc.logged"])[0]
            .as_u64()
            .expect("a count");
        if after >= before + 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(after >= before + 2, "{before} -> {after}");

    let (stderr, _) = fails(&["emit", &s.tcp, "calc.add", "1", "2"]);
    assert!(stderr.contains("is a call, not a signal"), "{stderr}");
}

#[test]
fn ping_and_stats() {
    let s = servers();
    let lines = ok(&["ping", &s.tcp, "-c", "3", "-i", "10ms"]);
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[2]["seq"], 3);
    assert!(lines[0]["time_ms"].as_f64().is_some());
    assert_eq!(lines[3]["received"], 3);

    let stats = ok(&["stats", &s.tcp]);
    // Its own connection's peer: the stats call itself is the first call it received.
    assert_eq!(stats[0]["calls_received"], 1, "{stats:?}");
    assert_eq!(stats[0]["connects"], 1);
    assert!(stats[0]["handler_panics"].is_u64());
}

#[test]
fn describe_shows_streams() {
    let s = servers();
    let feeds = &ok(&["describe", &s.tcp, "feeds"])[0];
    let numbers = &feeds["methods"][0];
    assert_eq!(
        (&numbers["kind"], &numbers["result_stream"]),
        (&json!("stream"), &json!("u64"))
    );
    let sum = &feeds["methods"][5];
    assert_eq!(sum["args"][0]["stream"], "u64");
    assert_eq!(sum["result_stream"], Value::Null);
}

#[test]
fn watch_prints_one_json_line_per_item() {
    let s = servers();
    let items = ok(&["watch", &s.tcp, "feeds.numbers", "3"]);
    assert_eq!(items, [json!(0), json!(1), json!(2)]);
    assert!(ok(&["watch", &s.unix, "feeds.numbers", "0"]).is_empty());
    // Without introspection, all the same.
    let items = ok(&["watch", &s.no_introspection, "feeds.numbers", "2"]);
    assert_eq!(items, [json!(0), json!(1)]);
    let items = ok(&["watch", &s.tcp, "feeds.open", "\"a\""]);
    assert_eq!(items, [json!(0), json!(1)]);
}

#[test]
fn watch_count_stops_and_cancels_the_stream() {
    let s = servers();
    let before = ok(&["call", &s.tcp, "feeds.cancelled"])[0]
        .as_u64()
        .expect("u64");
    let items = ok(&["watch", &s.tcp, "feeds.endless", "--count", "3"]);
    assert_eq!(
        items,
        [
            json!({"x": 0, "y": 0}),
            json!({"x": 1, "y": -1}),
            json!({"x": 2, "y": -2})
        ]
    );
    // The server's producer sees its reader go.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = ok(&["call", &s.tcp, "feeds.cancelled"])[0]
            .as_u64()
            .expect("u64");
        if now > before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the stream was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn watch_failures_are_explained() {
    let s = servers();
    // A typed error before the stream opens.
    let (stderr, _) = fails(&["watch", &s.tcp, "feeds.open", "\"b\""]);
    assert!(stderr.contains("feeds.open failed (FeedError)"), "{stderr}");
    assert!(stderr.contains("NoSuchFeed"), "{stderr}");
    // No item within the idle timeout: a stream error.
    let (stderr, _) = fails(&["watch", &s.tcp, "feeds.silent", "--idle-timeout", "200ms"]);
    assert!(
        stderr.contains("the stream failed after 0 items"),
        "{stderr}"
    );
    assert!(stderr.contains("--idle-timeout"), "{stderr}");
    // An unknown method.
    let (stderr, _) = fails(&["watch", &s.tcp, "feeds.nope"]);
    assert!(stderr.contains("has no method `nope`"), "{stderr}");
    assert!(stderr.contains("numbers"), "{stderr}");
    // Arguments that do not fit.
    let (stderr, _) = fails(&["watch", &s.tcp, "feeds.numbers"]);
    assert!(stderr.contains("takes 1 argument, 0 given"), "{stderr}");
}

#[test]
fn the_wrong_command_for_a_method_names_the_right_one() {
    let s = servers();
    let (stderr, _) = fails(&["call", &s.tcp, "feeds.numbers", "3"]);
    assert!(stderr.contains("returns a stream of u64"), "{stderr}");
    assert!(stderr.contains("chatter watch"), "{stderr}");
    let (stderr, _) = fails(&["watch", &s.tcp, "calc.add", "1", "2"]);
    assert!(
        stderr.contains("returns one value, not a stream"),
        "{stderr}"
    );
    assert!(stderr.contains("chatter call"), "{stderr}");
    let (stderr, _) = fails(&["watch", &s.tcp, "calc.log", "\"x\""]);
    assert!(stderr.contains("chatter emit"), "{stderr}");
    // Argument streams: from stdin, and only with --stdin.
    for command in ["call", "watch"] {
        let (stderr, _) = fails(&[command, &s.tcp, "feeds.sum"]);
        assert!(
            stderr.contains("takes a stream of u64 as its argument `items`"),
            "{command}: {stderr}"
        );
        assert!(stderr.contains("--stdin"), "{command}: {stderr}");
    }
    let (stderr, _) = fails(&["watch", &s.tcp, "feeds.sum", "--stdin"]);
    assert!(stderr.contains("returns one value"), "{stderr}");
    let (stderr, _) = fails(&["call", &s.tcp, "calc.add", "1", "2", "--stdin"]);
    assert!(stderr.contains("takes no argument stream"), "{stderr}");
    // Without introspection the peer's answer says it.
    let (stderr, _) = fails(&["watch", &s.no_introspection, "calc.add", "1", "2"]);
    assert!(stderr.contains("chatter call"), "{stderr}");
    let (stderr, _) = fails(&["call", &s.no_introspection, "feeds.numbers", "3"]);
    assert!(stderr.contains("chatter watch"), "{stderr}");
}

#[test]
fn stdin_lines_are_an_argument_stream() {
    let s = servers();
    let sum = |input: &str| {
        json_lines(&chatter_with_stdin(
            &["call", &s.tcp, "feeds.sum", "--stdin"],
            input,
        ))
    };
    assert_eq!(sum("1\n2\n\n39\n"), [json!(42)]);
    assert_eq!(sum(""), [json!(0)]);
    // Over a Unix socket, and with a method that streams back.
    assert_eq!(
        json_lines(&chatter_with_stdin(
            &["call", &s.unix, "feeds.sum", "--stdin"],
            "5\n"
        )),
        [json!(5)]
    );
    // Items that are structs, and an ordinary argument beside the stream.
    let plot = chatter_with_stdin(
        &["call", &s.tcp, "feeds.plot", "1", "--stdin"],
        "{\"x\": 1, \"y\": 2}\n{\"x\": 2, \"y\": 2}\n{\"x\": 1, \"y\": 0}\n",
    );
    assert_eq!(json_lines(&plot), [json!(2)]);
    // The wrong number of arguments: the shape of the items and what to write.
    let out = chatter_with_stdin(&["call", &s.tcp, "feeds.plot", "--stdin"], "");
    let (_, stderr) = texts(&out);
    assert!(
        stderr.contains("takes 1 argument besides its argument stream, 0 given"),
        "{stderr}"
    );
    assert!(
        stderr.contains("points: Point { x: i64, y: i64 }"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "for example: chatter call {} feeds.plot 0 --stdin",
            s.tcp
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(r#"with stdin lines like: {"x":0,"y":0}"#),
        "{stderr}"
    );
    let doubled = chatter_with_stdin(&["watch", &s.tcp, "feeds.doubled", "--stdin"], "1\n-2\n3\n");
    assert_eq!(json_lines(&doubled), [json!(2), json!(-4), json!(6)]);
}

#[test]
fn a_bad_stdin_line_fails_the_call_instead_of_ending_the_stream() {
    let s = servers();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatter"))
        .args(["call", &s.tcp, "feeds.tally", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run chatter");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"1\n2\n").expect("write");
    stdin.flush().expect("flush");
    // The callee has read both items: its handler runs, reading its argument stream.
    wait_until("the callee reads two items", || {
        s.tally.seen.load(Ordering::SeqCst) >= 2
    });
    stdin.write_all(b"three\n4\n").expect("write");
    drop(stdin);
    let out = child.wait_with_output().expect("run chatter");
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}\n{stdout}");
    assert!(stderr.contains("stdin line 3 is not JSON"), "{stderr}");
    assert!(stderr.contains("cancelled after 2 items"), "{stderr}");
    assert!(stdout.is_empty(), "no reply printed: {stdout}");
    // The callee's stream failed (or its handler was dropped): it did not end normally,
    // which would have made the callee act on a cut input (here, reply with 3).
    wait_until("the callee's stream to end", || s.tally.outcome().is_some());
    assert_ne!(s.tally.outcome(), Some("ended"));
}

/// Polls `done` (the callee runs in this process) for up to 10 s.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn mutual_tls_with_the_test_pki() {
    let s = servers();
    let (ca, cert, key) = (
        s.ca.to_str().expect("path"),
        s.cert.to_str().expect("path"),
        s.key.to_str().expect("path"),
    );
    let tls = |args: &[&str]| -> Vec<String> {
        args.iter()
            .copied()
            .chain(["--ca", ca, "--cert", cert, "--key", key])
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        ok(&tls(&["call", &s.tls, "calc.add", "20", "22"])),
        [json!(42)]
    );
    assert_eq!(ok(&tls(&["list", &s.tls])).len(), 3);
    // The name in the certificate, given explicitly for an IP address.
    let by_ip = s.tls.replace("localhost", "127.0.0.1");
    ok(&tls(&[
        "ping",
        &by_ip,
        "-c",
        "1",
        "--server-name",
        "localhost",
    ]));

    // Without a client certificate, the server refuses the handshake.
    let (stderr, _) = fails(&["list", &s.tls, "--ca", ca]);
    assert!(stderr.contains("error:"), "{stderr}");
    // Without --ca: told what to pass.
    let (stderr, _) = fails(&["list", &s.tls]);
    assert!(stderr.contains("--ca FILE"), "{stderr}");
    // TLS options on a plain URL.
    let (stderr, _) = fails(&["list", &s.tcp, "--ca", ca]);
    assert!(stderr.contains("not a tls:// URL"), "{stderr}");
}

#[test]
fn without_introspection_calls_work_and_list_explains() {
    let s = servers();
    let (stderr, _) = fails(&["list", &s.no_introspection]);
    assert!(
        stderr.contains("does not serve chatter.introspect"),
        "{stderr}"
    );
    // Unchecked, but still a call; its errors come from the callee.
    assert_eq!(
        ok(&["call", &s.no_introspection, "calc.add", "1", "2"]),
        [json!(3)]
    );
    let (stderr, _) = fails(&["call", &s.no_introspection, "calc.nope"]);
    assert!(stderr.contains("has no method `nope`"), "{stderr}");
    let out = chatter(&["ping", &s.no_introspection, "-c", "1"]);
    assert!(out.status.success());
    assert!(texts(&out).1.contains("is off there"));
}

#[test]
fn connection_problems_say_what_to_do() {
    // Nothing listens: bind a port, then free it.
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port();
    let (stderr, _) = fails(&["list", &format!("tcp://127.0.0.1:{port}")]);
    assert!(stderr.contains("connection refused"), "{stderr}");
    assert!(stderr.contains("is the server running"), "{stderr}");

    // Something that is not a chatter server.
    let http = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = http.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for stream in http.incoming().flatten() {
            let mut stream = stream;
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        }
    });
    let (stderr, _) = fails(&["list", &format!("tcp://127.0.0.1:{port}")]);
    assert!(stderr.contains("is not a chatter server"), "{stderr}");

    let (stderr, _) = fails(&["list", "http://127.0.0.1:80"]);
    assert!(stderr.contains("unknown scheme"), "{stderr}");
    let (stderr, _) = fails(&["list", "unix:///nonexistent/chatter.sock"]);
    assert!(stderr.contains("no socket at"), "{stderr}");
}

#[test]
fn a_signal_the_receiver_cannot_handle_is_reported() {
    // Without introspection nothing is checked before sending: the receiver's
    // acknowledgement says it could not run it.
    let s = servers();
    let (stderr, _) = fails(&["emit", &s.no_introspection, "calc.nope", "1"]);
    assert!(
        stderr.contains("the receiver could not handle the signal"),
        "{stderr}"
    );
    assert!(stderr.contains("no such object or method"), "{stderr}");
}
