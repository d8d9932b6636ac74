//! `chatter subscribe` and `chatter publish` against a real broker in this process (one per
//! test, so that its counters are the test's own). Output is piped, so the commands print
//! JSON lines. Nothing waits a fixed time: a publication is sent once the broker counts
//! the subscription (`Broker::stats().subscriptions`) or the subscriber printed a line.

use std::ffi::OsStr;
use std::fmt::Debug;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use chatter_broker::{Broker, BrokerOptions};
use serde_json::{json, Value};

/// A broker listening on 127.0.0.1, with the runtime that runs it.
struct TestBroker {
    broker: Broker,
    url: String,
    runtime: tokio::runtime::Runtime,
}

impl TestBroker {
    fn start() -> TestBroker {
        TestBroker::listen("tcp://127.0.0.1:0".to_owned())
    }

    fn listen(address: String) -> TestBroker {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let broker = runtime
            .block_on(Broker::listen(address.as_str(), BrokerOptions::default()))
            .expect("listen");
        let url = broker.addresses()[0].to_string();
        TestBroker {
            broker,
            url,
            runtime,
        }
    }

    /// Waits until the broker holds `n` subscriptions.
    fn wait_for_subscriptions(&self, n: u64) {
        wait_until(&format!("{n} subscriptions"), || {
            self.broker.stats().subscriptions == n
        });
    }

    /// A peer connected to the broker in this process, registered as `name`.
    fn named(&self, name: &str) -> chatter_broker::Bus {
        self.runtime
            .block_on(chatter_broker::connect(&self.url, name))
            .expect("connect a named peer")
    }
}

/// Polls `done` for up to 20 s.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

fn chatter<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chatter"))
        .args(args)
        .output()
        .expect("run chatter")
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `chatter args` and expects success: its stdout.
fn ok<S: AsRef<OsStr> + Debug>(args: &[S]) -> String {
    let out = chatter(args);
    let (stdout, stderr) = texts(&out);
    assert!(
        out.status.success(),
        "chatter {args:?} failed:\n{stderr}\n{stdout}"
    );
    stdout
}

/// Runs `chatter args` and expects exit status 1: its stderr.
fn fails<S: AsRef<OsStr> + Debug>(args: &[S]) -> String {
    let out = chatter(args);
    let (stdout, stderr) = texts(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "chatter {args:?}:\n{stderr}\n{stdout}"
    );
    assert!(stdout.is_empty(), "nothing on stdout: {stdout}");
    stderr
}

/// A `chatter subscribe` running in the background, its stdout read line by line. Killed
/// after a minute if a test hangs, and when dropped.
struct Subscriber {
    child: Arc<Mutex<Child>>,
    stdout: BufReader<ChildStdout>,
    stderr: ChildStderr,
    _watchdog: mpsc::Sender<()>,
}

impl Subscriber {
    fn spawn<S: AsRef<OsStr>>(args: &[S]) -> Subscriber {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatter"))
            .arg("subscribe")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run chatter subscribe");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let stderr = child.stderr.take().expect("stderr");
        let child = Arc::new(Mutex::new(child));
        let (watchdog, expired) = mpsc::channel::<()>();
        let watched = child.clone();
        thread::spawn(move || {
            // Disconnected (the subscriber was dropped) ends the watch; a timeout kills.
            if let Err(mpsc::RecvTimeoutError::Timeout) =
                expired.recv_timeout(Duration::from_secs(60))
            {
                let _ = watched.lock().unwrap_or_else(|e| e.into_inner()).kill();
            }
        });
        Subscriber {
            child,
            stdout,
            stderr,
            _watchdog: watchdog,
        }
    }

    /// The next line of stdout (without its newline); `None` at the end.
    fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line).expect("read stdout") {
            0 => None,
            _ => Some(line.trim_end_matches('\n').to_owned()),
        }
    }

    fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id()
    }

    /// Reads the rest of stdout and stderr, and waits for the exit.
    fn finish(mut self) -> (ExitStatus, Vec<String>, String) {
        let mut lines = Vec::new();
        while let Some(line) = self.line() {
            lines.push(line);
        }
        let mut stderr = String::new();
        self.stderr
            .read_to_string(&mut stderr)
            .expect("read stderr");
        let status = self
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .wait()
            .expect("wait");
        (status, lines, stderr)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.lock().unwrap_or_else(|e| e.into_inner()).kill();
    }
}

#[test]
fn subscribe_prints_what_publish_sends_with_topics_and_wildcards() {
    let b = TestBroker::start();
    let temps = Subscriber::spawn(&[&b.url, "sensors/+/temp", "--count", "3"]);
    let everything = Subscriber::spawn(&[&b.url, "#", "--count", "4"]);
    b.wait_for_subscriptions(2);
    // Each `publish` returns once the broker took its publication: they reach the
    // subscribers in this order.
    let published = ok(&["publish", &b.url, "sensors/7/temp", "21.5"]);
    assert_eq!(
        published,
        "{\"topic\":\"sensors/7/temp\",\"published\":true}\n"
    );
    ok(&["publish", &b.url, "sensors/7/humidity", "0.4"]);
    ok(&[
        "publish",
        &b.url,
        "sensors/8/temp",
        r#"{"ok": true, "c": -1}"#,
    ]);
    ok(&["publish", &b.url, "sensors/9/temp", r#""warm""#]);

    let (status, lines, stderr) = temps.finish();
    assert!(status.success(), "{stderr}");
    assert_eq!(
        lines,
        [
            r#"{"topic":"sensors/7/temp","value":21.5}"#,
            r#"{"topic":"sensors/8/temp","value":{"c":-1,"ok":true}}"#,
            r#"{"topic":"sensors/9/temp","value":"warm"}"#,
        ]
    );
    // Piped: nothing else, not even the note a terminal gets.
    assert!(stderr.is_empty(), "{stderr}");
    let (status, lines, stderr) = everything.finish();
    assert!(status.success(), "{stderr}");
    let topics: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).expect("JSON")["topic"].clone())
        .collect();
    assert_eq!(
        topics,
        [
            "sensors/7/temp",
            "sensors/7/humidity",
            "sensors/8/temp",
            "sensors/9/temp"
        ]
    );
}

#[test]
fn count_stops_and_cancels_the_subscription_at_the_broker() {
    let b = TestBroker::start();
    let one = Subscriber::spawn(&[&b.url, "t", "--count", "1"]);
    b.wait_for_subscriptions(1);
    ok(&["publish", &b.url, "t", "[1, 2]"]);
    let (status, lines, stderr) = one.finish();
    assert!(status.success(), "{stderr}");
    assert_eq!(lines, [r#"{"topic":"t","value":[1,2]}"#]);
    // The broker dropped it: publications on `t` now reach nobody.
    b.wait_for_subscriptions(0);
    let report = ok(&["publish", &b.url, "t", "3", "--ack"]);
    assert_eq!(
        report,
        "{\"subscribers\":0,\"delivered\":0,\"missed\":[]}\n"
    );
}

#[test]
fn publish_ack_prints_the_report() {
    let b = TestBroker::start();
    let report = ok(&["publish", &b.url, "alarms/boiler", r#""overheat""#, "--ack"]);
    assert_eq!(
        report,
        "{\"subscribers\":0,\"delivered\":0,\"missed\":[]}\n"
    );

    let mut alarms = Subscriber::spawn(&[&b.url, "alarms/#"]);
    b.wait_for_subscriptions(1);
    let report = ok(&["publish", &b.url, "alarms/boiler", r#""overheat""#, "--ack"]);
    assert_eq!(
        report,
        "{\"subscribers\":1,\"delivered\":1,\"missed\":[]}\n"
    );
    assert_eq!(
        alarms.line().as_deref(),
        Some(r#"{"topic":"alarms/boiler","value":"overheat"}"#)
    );
    // For a person.
    let report = ok(&["publish", &b.url, "alarms", "1", "--ack", "--pretty"]);
    assert_eq!(report, "delivered to 1 of 1 subscriber\n");
    assert_eq!(
        alarms.line().as_deref(),
        Some(r#"{"topic":"alarms","value":1}"#)
    );
    let said = ok(&["publish", &b.url, "alarms", "2", "--pretty", "--ttl", "5s"]);
    assert_eq!(said, "published on alarms: the broker took it\n");
}

#[test]
fn bad_patterns_topics_and_values_are_explained() {
    let b = TestBroker::start();
    let stderr = fails(&["subscribe", &b.url, "a/#/b"]);
    assert!(
        stderr.contains("`a/#/b` is not a valid pattern: `#` can only be the last level"),
        "{stderr}"
    );
    assert!(stderr.contains("hint: a pattern is a topic"), "{stderr}");
    assert!(stderr.contains("sensors/+/temp"), "{stderr}");

    // A topic with a wildcard: the broker refuses it; --ack says why.
    let stderr = fails(&["publish", &b.url, "a/+", "1"]);
    assert!(
        stderr.contains("refused the publication on `a/+`"),
        "{stderr}"
    );
    assert!(stderr.contains("--ack"), "{stderr}");
    let stderr = fails(&["publish", &b.url, "a/+", "1", "--ack"]);
    assert!(
        stderr.contains("`a/+` is not a valid topic: a topic cannot contain `+` or `#`"),
        "{stderr}"
    );
    // A value that is not JSON, before connecting.
    let stderr = fails(&["publish", &b.url, "a", "hello"]);
    assert!(stderr.contains("the value is not JSON"), "{stderr}");
    assert!(stderr.contains(r#"'"hello"'"#), "{stderr}");
    assert_eq!(b.broker.stats().publications, 0);

    // No pattern, and no --presence: a command line that does not parse.
    assert_eq!(chatter(&["subscribe", &b.url]).status.code(), Some(2));
    assert_eq!(
        chatter(&["subscribe", &b.url, "x", "--presence"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        chatter(&["subscribe", &b.url, "x", "--policy", "sometimes"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn presence_lists_the_peers_then_who_comes_and_goes() {
    let b = TestBroker::start();
    let pump = b.named("pump-1");
    let mut presence = Subscriber::spawn(&[&b.url, "--presence", "--count", "3"]);
    // The names registered when it subscribed come first.
    assert_eq!(
        presence.line().as_deref(),
        Some(r#"{"topic":"$broker/presence/pump-1","value":{"online":true,"peer":"pump-1"}}"#)
    );
    let valve = b.named("valve-2");
    assert_eq!(
        presence.line().as_deref(),
        Some(r#"{"topic":"$broker/presence/valve-2","value":{"online":true,"peer":"valve-2"}}"#)
    );
    b.runtime.block_on(pump.close());
    let (status, lines, stderr) = presence.finish();
    assert!(status.success(), "{stderr}");
    assert_eq!(
        lines,
        [r#"{"topic":"$broker/presence/pump-1","value":{"online":false,"peer":"pump-1"}}"#]
    );

    // For a person: who, and whether online. The CLI's own connection has no name, so it
    // is not among them.
    let (status, lines, stderr) =
        Subscriber::spawn(&[&b.url, "--presence", "--count", "1", "--pretty"]).finish();
    assert!(status.success(), "{stderr}");
    assert_eq!(lines, ["valve-2  online"]);
    assert!(
        stderr.contains("subscribed to $broker/presence/+"),
        "{stderr}"
    );
    drop(valve);
}

#[test]
fn a_subscriber_that_falls_behind_with_policy_end_is_told_why() {
    let b = TestBroker::start();
    // Its stdout is not read until the end: it blocks writing, stops reading from the
    // broker, and the broker's queue for it (1000 bytes) overflows.
    let lagging = Subscriber::spawn(&[&b.url, "big/#", "--policy", "end", "--queue-bytes", "1000"]);
    b.wait_for_subscriptions(1);
    let publisher = b
        .runtime
        .block_on(chatter_broker::connect_unnamed(&b.url, Default::default()))
        .expect("connect");
    let big = "x".repeat(100_000);
    // Far more than its stream window (1 MiB) and a pipe hold.
    b.runtime.block_on(async {
        for i in 0..40 {
            publisher
                .publish(&format!("big/{i}"), &big)
                .await
                .expect("publish");
        }
    });
    b.wait_for_subscriptions(0);
    let (status, lines, stderr) = lagging.finish();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(lines.len() < 40, "{} lines", lines.len());
    assert!(
        stderr.contains("the broker ended the subscription to `big/#` after"),
        "{stderr}"
    );
    assert!(stderr.contains("fell behind"), "{stderr}");
    assert!(stderr.contains("raise --queue-bytes"), "{stderr}");
}

#[test]
fn drops_show_as_missed_and_ctrl_c_ends_cleanly() {
    let b = TestBroker::start();
    // Drops the oldest beyond 1000 bytes; its stdout is not read until all is published.
    let mut behind = Subscriber::spawn(&[&b.url, "#", "--queue-bytes", "1000"]);
    b.wait_for_subscriptions(1);
    let publisher = b
        .runtime
        .block_on(chatter_broker::connect_unnamed(&b.url, Default::default()))
        .expect("connect");
    let big = "x".repeat(100_000);
    b.runtime.block_on(async {
        for i in 0..40 {
            publisher
                .publish(&format!("big/{i}"), &big)
                .await
                .expect("publish");
        }
        publisher
            .publish("last", &json!({"end": true}))
            .await
            .expect("publish");
    });
    wait_until("the broker to take every publication", || {
        b.broker.stats().publications == 41
    });
    assert!(b.broker.stats().dropped_deliveries > 0);
    // Read up to the last publication (the newest: drop-oldest keeps it).
    let mut received = 0;
    let mut missed = 0;
    loop {
        let line = behind.line().expect("a line");
        let item: Value = serde_json::from_str(&line).expect("JSON");
        received += 1;
        if let Some(n) = item.get("missed") {
            missed += n.as_u64().expect("a count");
            assert!(n.as_u64() > Some(0));
        }
        if item["topic"] == "last" {
            assert_eq!(item["value"], json!({"end": true}));
            break;
        }
        assert_eq!(item["value"].as_str().map(str::len), Some(100_000));
    }
    // Every publication arrived or was counted missed.
    assert_eq!(
        received + missed,
        41,
        "{received} received, {missed} missed"
    );
    assert!(missed > 0);

    // Ctrl-C: a clean end, status 0.
    let kill = Command::new("kill")
        .args(["-INT", &behind.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success());
    let (status, lines, stderr) = behind.finish();
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(lines.is_empty(), "{lines:?}");
    b.wait_for_subscriptions(0);
}

#[test]
fn a_peer_that_is_not_a_broker_is_explained() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let server = runtime.block_on(async {
        let listener = chatter_rpc::listen("tcp://127.0.0.1:0", Default::default())
            .await
            .expect("listen");
        chatter_rpc::serve(listener, Default::default(), |_: &chatter_rpc::Peer| {})
    });
    let url = server.addresses()[0].to_string();
    let stderr = fails(&["subscribe", &url, "#"]);
    assert!(stderr.contains("is not a chatter broker"), "{stderr}");
    assert!(stderr.contains("chatter-broker --listen"), "{stderr}");
    let stderr = fails(&["publish", &url, "t", "1", "--ack"]);
    assert!(stderr.contains("is not a chatter broker"), "{stderr}");
    let stderr = fails(&["publish", &url, "t", "1"]);
    assert!(stderr.contains("a chatter broker?"), "{stderr}");
    drop(server);
}

#[test]
fn a_broker_that_goes_away_ends_the_subscription_with_an_error() {
    let b = TestBroker::start();
    let mut sub = Subscriber::spawn(&[&b.url, "t"]);
    b.wait_for_subscriptions(1);
    ok(&["publish", &b.url, "t", "1"]);
    assert_eq!(sub.line().as_deref(), Some(r#"{"topic":"t","value":1}"#));
    b.runtime.block_on(b.broker.close());
    let (status, lines, stderr) = sub.finish();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(lines.is_empty());
    assert!(
        stderr.contains("the connection to the broker at") && stderr.contains("after 1 message:"),
        "{stderr}"
    );
}

#[test]
fn a_broker_on_a_unix_socket() {
    let b = TestBroker::listen(format!("unix://{}", tests::unix_path().display()));
    assert!(b.url.starts_with("unix://"), "{}", b.url);
    let sub = Subscriber::spawn(&[&b.url, "a/#", "--count", "1"]);
    b.wait_for_subscriptions(1);
    let report = ok(&["publish", &b.url, "a/b", "null", "--ack"]);
    assert_eq!(
        report,
        "{\"subscribers\":1,\"delivered\":1,\"missed\":[]}\n"
    );
    let (status, lines, stderr) = sub.finish();
    assert!(status.success(), "{stderr}");
    assert_eq!(lines, [r#"{"topic":"a/b","value":null}"#]);
}
