//! `throttle`: chatter-core's bandwidth throttle (issue 14), the rate one connection
//! achieves against the rate set. Not one of the workloads of issue 5: chatter-core only,
//! reported in a table of its own (`throttle.md`).
//!
//! The client sends 64 KiB one-shot messages as fast as the connection accepts them
//! (`send_bytes` waits on the peer's window) for a fixed time; the server counts the payload
//! bytes it receives and when. Either the client's connection has a send throttle or the
//! server's a receive throttle, at the default burst. The bucket starts full, so the
//! receiver sees the burst first and then the rate. The achieved rate is measured over the
//! second half of the run, from the first receipt after half time to the last one before
//! the deadline: by then the burst is spent, and so are the tokens the bucket earned while
//! the burst was still on its way (on a loaded host that takes tens of ms, and a slope
//! from the end of the burst came out 5-15% high at 100 MB/s). The rate with the burst is
//! all bytes received by the deadline over the whole time, against the bucket's limit
//! (burst + rate × time) / time.

use std::any::Any;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chatter_core::{connect, listen, Connection, Event, Options, Rate, SendOptions, Throttle};

use crate::harness::{self, Done, Layout, LocalFuture, Measured, ServerInfo};
use crate::report::median;
use crate::workload::PAYLOAD;

/// Which end of the connection is throttled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The sender's `send` rate.
    Send,
    /// The receiver's `receive` rate.
    Receive,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Send => "send",
            Direction::Receive => "receive",
        }
    }

    fn parse(s: &str) -> Option<Direction> {
        match s {
            "send" => Some(Direction::Send),
            "receive" => Some(Direction::Receive),
            _ => None,
        }
    }
}

/// One throttle setting measured.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub direction: Direction,
    /// The rate set, bytes per second (`Rate::new`, default burst).
    pub rate: u64,
}

pub const CASES: [Case; 4] = [
    Case {
        direction: Direction::Send,
        rate: 1_000_000,
    },
    Case {
        direction: Direction::Send,
        rate: 10_000_000,
    },
    Case {
        direction: Direction::Send,
        rate: 100_000_000,
    },
    Case {
        direction: Direction::Receive,
        rate: 10_000_000,
    },
];

/// How long each case sends.
pub fn duration(quick: bool) -> Duration {
    Duration::from_millis(if quick { 500 } else { 1_000 })
}

/// One measurement, as the child reports it. Rates in bytes (of payload) per second.
#[derive(Debug, Clone, Copy)]
pub struct Achieved {
    /// Over the second half of the run, after the burst.
    pub steady: f64,
    /// Everything received by the deadline over the whole time.
    pub with_burst: f64,
}

impl Achieved {
    pub fn line(&self) -> String {
        format!("THROTTLE {} {}", self.steady, self.with_burst)
    }

    pub fn parse(line: &str) -> Option<Achieved> {
        let mut f = line
            .strip_prefix("THROTTLE ")?
            .split(' ')
            .map(str::parse::<f64>);
        Some(Achieved {
            steady: f.next()?.ok()?,
            with_burst: f.next()?.ok()?,
        })
    }
}

/// Payload bytes received so far, after each batch of messages, and when.
type Arrivals = Arc<Mutex<Vec<(Instant, u64)>>>;

/// The options of one end: the throttle of `case` if it is that end's.
fn options(case: Case, end: Direction) -> Options {
    if case.direction != end {
        return Options::default();
    }
    let rate = Some(Rate::new(case.rate));
    Options::default().throttle(match end {
        Direction::Send => Throttle {
            send: rate,
            receive: None,
        },
        Direction::Receive => Throttle {
            send: None,
            receive: rate,
        },
    })
}

fn server(case: Case, arrivals: Arrivals) -> LocalFuture<(ServerInfo, Box<dyn Any>)> {
    Box::pin(async move {
        let listener = listen("tcp://127.0.0.1:0", options(case, Direction::Receive))
            .await
            .expect("listen (chatter-core)");
        let addr = listener.addresses()[0].to_string();
        let listener = Arc::new(listener);
        let accept = {
            let listener = listener.clone();
            tokio::task::spawn_local(async move {
                while let Some(conn) = listener.accept().await {
                    tokio::task::spawn_local(count(conn, arrivals.clone()));
                }
            })
        };
        let info = ServerInfo {
            addr,
            done: Done::new(0),
        };
        (info, Box::new((listener, accept)) as Box<dyn Any>)
    })
}

/// Takes messages in batches and logs the running byte count after each batch.
async fn count(conn: Connection, arrivals: Arrivals) {
    let mut events = Vec::new();
    let mut bytes = 0;
    while conn.next_events(&mut events, 64).await.is_ok() {
        for event in events.drain(..) {
            if let Event::Message(msg) = event {
                bytes += msg.payload.len() as u64;
            }
        }
        let now = Instant::now();
        arrivals.lock().expect("arrivals").push((now, bytes));
    }
}

/// Sends for `time`, then works out the rates from what the server logged.
async fn client(
    case: Case,
    time: Duration,
    info: ServerInfo,
    arrivals: Arrivals,
) -> Option<Achieved> {
    let conn = connect(&info.addr, options(case, Direction::Send))
        .await
        .expect("connect (chatter-core)");
    let payload = Bytes::from(vec![0xA5; PAYLOAD]);
    let start = Instant::now();
    let deadline = start + time;
    let send = async {
        loop {
            conn.send_bytes(&payload, SendOptions::new())
                .await
                .expect("send (core)");
        }
    };
    tokio::select! {
        _ = send => {}
        () = tokio::time::sleep_until(deadline.into()) => {}
    }
    // Let the server log what it received just before the deadline.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let log = arrivals.lock().expect("arrivals").clone();
    let before: Vec<_> = log.into_iter().filter(|&(t, _)| t <= deadline).collect();
    let &(t1, total) = before.last()?;
    let &(t0, b0) = before.iter().find(|&&(t, _)| t >= start + time / 2)?;
    let steady = if t1 > t0 {
        (total - b0) as f64 / (t1 - t0).as_secs_f64()
    } else {
        f64::NAN
    };
    Some(Achieved {
        steady,
        with_burst: total as f64 / time.as_secs_f64(),
    })
}

/// The child: `--child throttle DIRECTION BYTES_PER_S LAYOUT [--quick]`; prints a
/// `THROTTLE` line.
pub fn child(mut argv: impl Iterator<Item = String>) {
    let mut next = |what: &str| {
        argv.next()
            .unwrap_or_else(|| panic!("--child throttle needs {what}"))
    };
    let direction = Direction::parse(&next("a direction")).expect("direction");
    let rate = next("a rate").parse().expect("rate in bytes per second");
    let layout = Layout::parse(&next("a layout")).expect("layout");
    let quick = argv.any(|f| f == "--quick");
    let case = Case { direction, rate };
    let arrivals = Arrivals::default();
    let result = Arc::new(Mutex::new(None));
    let server_arrivals = arrivals.clone();
    let slot = result.clone();
    harness::run_pair(
        layout,
        Box::new(move || server(case, server_arrivals)),
        Box::new(move |info| {
            Box::pin(async move {
                *slot.lock().expect("result") = client(case, duration(quick), info, arrivals).await;
                Measured::default()
            })
        }),
    );
    let achieved = result
        .lock()
        .expect("result")
        .expect("too little received to measure a rate");
    println!("{}", achieved.line());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(0);
}

/// The child's arguments for `case`.
pub fn child_args(case: Case, layout: Layout) -> Vec<String> {
    vec![
        "--child".into(),
        "throttle".into(),
        case.direction.name().into(),
        case.rate.to_string(),
        layout.name().into(),
    ]
}

/// The table: medians over the runs of each case.
pub fn markdown(
    results: &[(Case, Vec<Achieved>)],
    layout: Layout,
    quick: bool,
    command: &str,
) -> String {
    let time = duration(quick).as_secs_f64();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "chatter-core's throttle, achieved against set rate: 64 KiB one-shot messages sent as \
         fast as the connection accepts them for {time:.1} s per run, counted at the receiver \
         (payload bytes; MB = 10^6 bytes), at the default burst (a tenth of a second's worth). \
         Achieved: over the second half of each run, after the burst. With burst: all bytes \
         received over the whole run, against the bucket's limit (burst + set × {time:.1} s) \
         / {time:.1} s. Medians of the runs; layout `{}`.\n\nCommand: `{command}`\n",
        layout.name()
    );
    let _ = writeln!(
        md,
        "| throttle | set MB/s | burst KB | achieved MB/s | achieved/set | with burst MB/s | with burst/limit | runs (achieved MB/s) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---|");
    for (case, samples) in results {
        let set = case.rate as f64;
        let burst = Rate::new(case.rate).burst_bytes() as f64;
        let limit = (burst + set * time) / time;
        let steady = median(samples.iter().map(|a| a.steady).collect());
        let with_burst = median(samples.iter().map(|a| a.with_burst).collect());
        let all: Vec<String> = samples
            .iter()
            .map(|a| format!("{:.3}", a.steady / 1e6))
            .collect();
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} |",
            case.direction.name(),
            set / 1e6,
            burst / 1e3,
            steady / 1e6,
            steady / set,
            with_burst / 1e6,
            with_burst / limit,
            all.join(", "),
        );
    }
    md
}
