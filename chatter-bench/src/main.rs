//! chatter-bench: chatter-core and chatter-rpc side by side with a raw framed TCP echo and
//! tarpc, on the workloads of issue 5. See `BENCHMARKS.md` at the workspace root.
//!
//! ```text
//! cargo run --release -p chatter-bench -- [--quick] [--runs N] [--only latency,pipelined,...]
//!     [--systems raw,tarpc,core,rpc] [--layouts split,onecore] [--out DIR]
//! ```
//!
//! `throttle` (in `--only`, and run by default) is not one of the issue's workloads: it
//! measures chatter-core's bandwidth throttle, achieved against set rate, in a table of its
//! own (`throttle.md`; see `throttle.rs`).
//!
//! Every measurement runs in a fresh child process (this binary with `--child`), so peak
//! RSS, allocator state and sockets of one measurement never leak into the next. In the
//! child, server and client are two current-thread tokio runtimes on two threads, pinned
//! per layout, talking over 127.0.0.1. The parent runs the systems alternately, `--runs`
//! times, and reports medians and ratios.

mod broker;
#[cfg(feature = "busrt")]
mod busrt_sys;
mod core;
mod harness;
mod raw;
mod report;
mod rpc;
mod streams;
mod tarpc_sys;
mod throttle;
mod tls;
mod workload;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{cpu_count, percentile, Layout, Measured};
use report::{Results, Sample};
use workload::{System, Workload};

struct Args {
    quick: bool,
    raw_batched: bool,
    /// chatter-rpc's stream window at the reader for the stream workloads (`None`: default).
    stream_window: Option<u64>,
    runs: usize,
    workloads: Vec<Workload>,
    /// Whether to measure the throttle (chatter-core only).
    throttle: bool,
    /// Whether to compare chatter-broker with BUS/RT (`--only broker`; `broker.rs`).
    broker: bool,
    systems: Vec<System>,
    layouts: Vec<Layout>,
    out: std::path::PathBuf,
}

const USAGE: &str =
    "usage: chatter-bench [--quick] [--raw-per-frame] [--stream-window BYTES] [--runs N] [--only WORKLOAD,...] \
[--systems raw,tarpc,core,rpc] [--layouts split,onecore] [--out DIR]
workloads: latency, pipelined, fanin, payload, signals, idle, tls-pipelined, tls-payload,
connect, stream-items, stream-bytes, stream-fanout, throttle (chatter-core's bandwidth throttle, achieved against set rate: a table of its own),
broker (chatter-broker vs BUS/RT, issue 18 item 8: a table of its own, not run by default; BUS/RT needs --features busrt)";

fn list<T>(value: Option<String>, what: &str, parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
    let value = value.unwrap_or_else(|| panic!("{what} needs a value\n{USAGE}"));
    value
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| parse(s).unwrap_or_else(|| panic!("unknown {what} {s:?}\n{USAGE}")))
        .collect()
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Args {
    let mut args = Args {
        quick: false,
        raw_batched: true,
        stream_window: None,
        runs: 0,
        workloads: workload::ALL.to_vec(),
        throttle: true,
        broker: false,
        systems: workload::SYSTEMS.to_vec(),
        layouts: vec![Layout::Split, Layout::OneCore],
        out: "target/bench".into(),
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => args.quick = true,
            "--raw-per-frame" => args.raw_batched = false,
            "--stream-window" => {
                args.stream_window = Some(
                    it.next()
                        .and_then(|n| n.parse().ok())
                        .filter(|&n| n >= 1024)
                        .unwrap_or_else(|| {
                            panic!("--stream-window needs bytes (>= 1024)\n{USAGE}")
                        }),
                )
            }
            "--runs" => {
                args.runs = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .unwrap_or_else(|| panic!("--runs needs a positive number\n{USAGE}"))
            }
            "--only" => {
                let names = list(it.next(), "workload", |s| Some(s.to_string()));
                args.throttle = names.iter().any(|s| s == "throttle");
                args.broker = names.iter().any(|s| s == "broker");
                args.workloads = names
                    .iter()
                    .filter(|s| *s != "throttle" && *s != "broker")
                    .map(|s| {
                        Workload::parse(s)
                            .unwrap_or_else(|| panic!("unknown workload {s:?}\n{USAGE}"))
                    })
                    .collect();
            }
            "--systems" => args.systems = list(it.next(), "system", System::parse),
            "--layouts" => args.layouts = list(it.next(), "layout", Layout::parse),
            "--out" => args.out = it.next().expect("--out needs a directory").into(),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if args.runs == 0 {
        args.runs = if args.quick { 1 } else { 3 };
    }
    // Keep the canonical order whatever order they were given in.
    args.systems
        .sort_by_key(|s| workload::SYSTEMS.iter().position(|x| x == s));
    args
}

fn main() {
    let mut argv = std::env::args().skip(1).peekable();
    if argv.peek().map(String::as_str) == Some("--child") {
        argv.next();
        if argv.peek().map(String::as_str) == Some("throttle") {
            argv.next();
            throttle::child(argv);
        } else if argv.peek().map(String::as_str) == Some("broker") {
            argv.next();
            broker::child(argv);
        } else {
            child(argv);
        }
        return;
    }
    if argv.peek().map(String::as_str) == Some("--broker-host") {
        argv.next();
        broker::host(argv);
        return;
    }
    let mut args = parse_args(argv);
    let cpus = cpu_count();
    if cpus < 2 && args.layouts.contains(&Layout::Split) {
        eprintln!("only {cpus} CPU available: running the onecore layout only");
        args.layouts.retain(|&l| l == Layout::OneCore);
    }
    let started = Instant::now();
    let mut results = Results::default();
    for &layout in &args.layouts {
        for &w in &args.workloads {
            for run in 0..args.runs {
                for &s in args.systems.iter().filter(|s| s.runs(w)) {
                    match run_child(layout, w, s, &args) {
                        Ok(sample) => {
                            eprintln!(
                                "{:>8} {:>13} {:>12} run {}: {}",
                                layout.name(),
                                w.name(),
                                s.name(),
                                run + 1,
                                sample.describe(w)
                            );
                            results.add(layout, w, s, sample);
                        }
                        Err(e) => eprintln!(
                            "{:>8} {:>13} {:>12} run {}: FAILED: {e}",
                            layout.name(),
                            w.name(),
                            s.name(),
                            run + 1
                        ),
                    }
                }
            }
        }
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    std::fs::create_dir_all(&args.out).expect("create the output directory");
    if !args.workloads.is_empty() {
        let md = report::markdown(&results, &args.layouts, &args.systems, args.runs, &command);
        let svg = report::svg(&results, &args.layouts, &args.systems);
        println!("{md}");
        std::fs::write(args.out.join("results.md"), &md).expect("write results.md");
        std::fs::write(args.out.join("bench-ratios.svg"), &svg).expect("write bench-ratios.svg");
        eprintln!(
            "wrote {} and {}",
            args.out.join("results.md").display(),
            args.out.join("bench-ratios.svg").display(),
        );
    }
    if args.throttle && args.systems.contains(&System::Core) {
        let md = run_throttle(&args, &command);
        println!("{md}");
        std::fs::write(args.out.join("throttle.md"), &md).expect("write throttle.md");
        eprintln!("wrote {}", args.out.join("throttle.md").display());
    } else if args.throttle {
        eprintln!("throttle measures chatter-core only: not run, core is not in --systems");
    }
    if args.broker {
        let md = broker::run(&args.layouts, args.runs, &command, |a| {
            child_output(a, args.quick)
        });
        println!("{md}");
        std::fs::write(args.out.join("broker.md"), &md).expect("write broker.md");
        eprintln!("wrote {}", args.out.join("broker.md").display());
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
}

/// Measures chatter-core's throttle: every case once per run, on the first layout.
fn run_throttle(args: &Args, command: &str) -> String {
    let layout = args.layouts[0];
    let mut results: Vec<(throttle::Case, Vec<throttle::Achieved>)> =
        throttle::CASES.iter().map(|&c| (c, Vec::new())).collect();
    for run in 0..args.runs {
        for (case, samples) in &mut results {
            let what = format!(
                "{:>8} {:>13} {:>12} run {}",
                layout.name(),
                "throttle",
                format!("{} {} MB/s", case.direction.name(), case.rate / 1_000_000),
                run + 1
            );
            let out =
                child_output(&throttle::child_args(*case, layout), args.quick).and_then(|out| {
                    out.lines()
                        .find_map(throttle::Achieved::parse)
                        .ok_or_else(|| format!("no THROTTLE line in {out:?}"))
                });
            match out {
                Ok(a) => {
                    eprintln!(
                        "{what}: {:.3} MB/s after the burst ({:.3} of the rate), {:.3} MB/s with it",
                        a.steady / 1e6,
                        a.steady / case.rate as f64,
                        a.with_burst / 1e6
                    );
                    samples.push(a);
                }
                Err(e) => eprintln!("{what}: FAILED: {e}"),
            }
        }
    }
    throttle::markdown(&results, layout, args.quick, command)
}

/// Runs one measurement in a child process and parses its result line.
fn run_child(layout: Layout, w: Workload, s: System, args: &Args) -> Result<Sample, String> {
    let mut child_args: Vec<String> = ["--child", w.name(), s.name(), layout.name()]
        .map(String::from)
        .to_vec();
    if !args.raw_batched {
        child_args.push("--raw-per-frame".into());
    }
    if let Some(window) = args.stream_window {
        child_args.extend(["--stream-window".into(), window.to_string()]);
    }
    let out = child_output(&child_args, args.quick)?;
    out.lines()
        .find_map(Sample::parse)
        .ok_or_else(|| format!("no RESULT line in {out:?}"))
}

/// Runs this binary with `args` (and `--quick`) and returns what it printed.
fn child_output(args: &[String], quick: bool) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.args(args);
    if quick {
        cmd.arg("--quick");
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawn the child: {e}"))?;
    let limit = Duration::from_secs(if quick { 60 } else { 300 });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("timed out after {} s", limit.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout.read_to_string(&mut out).map_err(|e| e.to_string())?;
    }
    if !status.success() {
        return Err(format!("child exited with {status}"));
    }
    Ok(out)
}

/// The child: one measurement, printed as a `RESULT` line.
fn child(mut argv: impl Iterator<Item = String>) {
    let mut next = |what: &str| {
        argv.next()
            .unwrap_or_else(|| panic!("--child needs {what}"))
    };
    let w = Workload::parse(&next("a workload")).expect("workload");
    let s = System::parse(&next("a system")).expect("system");
    let layout = Layout::parse(&next("a layout")).expect("layout");
    let flags: Vec<String> = argv.collect();
    let quick = flags.iter().any(|f| f == "--quick");
    let mut spec = workload::Spec {
        raw_batched: !flags.iter().any(|f| f == "--raw-per-frame"),
        ..w.spec(quick)
    };
    // `--total N` overrides the measured count: two counts under callgrind give the
    // instructions per operation as a difference, free of start-up costs.
    if let Some(n) = flags
        .iter()
        .position(|f| f == "--total")
        .and_then(|i| flags.get(i + 1))
        .and_then(|n| n.parse().ok())
    {
        spec.total = n;
    }
    // `--payload N` overrides the item size (stream workloads: try other chunk sizes).
    if let Some(n) = flags
        .iter()
        .position(|f| f == "--payload")
        .and_then(|i| flags.get(i + 1))
        .and_then(|n| n.parse().ok())
    {
        spec.payload = n;
    }
    // `--stream-window N`: chatter-rpc's stream window at the reader, in bytes.
    if let Some(n) = flags
        .iter()
        .position(|f| f == "--stream-window")
        .and_then(|i| flags.get(i + 1))
        .and_then(|n| n.parse().ok())
    {
        spec.stream_window = n;
    }
    harness::raise_nofile();
    let tls = spec.tls.then(tls::Tls::generate);
    let done = harness::Done::new(spec.total);
    let server_tls = tls.clone();
    let stream = spec.kind == workload::Kind::Stream;
    let server: harness::ServerFn = match s {
        System::Raw if stream => Box::new(move || streams::raw_server(done)),
        System::Rpc if stream => Box::new(move || streams::rpc_server(done)),
        System::Raw => Box::new(move || raw::server(spec, done, server_tls)),
        System::Core => Box::new(move || core::server(spec, done, server_tls)),
        System::Rpc => Box::new(move || rpc::server(spec, done, server_tls)),
        System::Tarpc => Box::new(move || tarpc_sys::server(spec, done, server_tls)),
    };
    let client: harness::ClientFn = match s {
        System::Raw if stream => Box::new(move |info| streams::raw_client(spec, info)),
        System::Rpc if stream => Box::new(move |info| streams::rpc_client(spec, info)),
        System::Raw => Box::new(move |info| raw::client(spec, info, tls)),
        System::Core => Box::new(move |info| core::client(spec, info, tls)),
        System::Rpc => Box::new(move |info| rpc::client(spec, info, tls)),
        System::Tarpc => Box::new(move |info| tarpc_sys::client(spec, info, tls)),
    };
    harness::reset_peak_rss();
    let mut m: Measured = harness::run_pair(layout, server, client);
    let peak = harness::proc_status_bytes("VmHWM");
    m.latencies.sort_unstable();
    let secs = m.elapsed.as_secs_f64();
    let sample = Sample {
        ops_per_s: m.ops as f64 / secs,
        mb_per_s: (m.ops * m.bytes_per_op) as f64 / secs / 1e6,
        p50_ns: percentile(&m.latencies, 50.0) as f64,
        p99_ns: percentile(&m.latencies, 99.0) as f64,
        peak_rss: peak as f64,
        rss_per_conn: m.rss_per_conn.unwrap_or(0.0),
        min_share: m.min_share.unwrap_or(f64::NAN),
        cpu_ns_per_op: m
            .cpu
            .map_or(f64::NAN, |c| c.as_nanos() as f64 / m.ops.max(1) as f64),
    };
    println!("{}", sample.line());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // The server thread and its connections are left as they are: exit at once.
    std::process::exit(0);
}
