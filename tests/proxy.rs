//! A fault-injecting TCP proxy for tests: forwards `127.0.0.1:port` to a target and can
//! cut, stall or delay the connections going through it, at chosen points (now, after a
//! number of bytes) or at random points drawn from a seeded generator (so a failing run
//! can be replayed with the same seed).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use tests::proxy::Proxy;
//! let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let proxy = Proxy::start(upstream.local_addr().unwrap()).await;
//! proxy.cut_randomly(42, 100, 1_000); // each connection dies after 100..=1000 bytes
//! println!("connect to {}", proxy.address());
//! # }
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does to the bytes it forwards.
#[derive(Debug, Clone, Default)]
struct Faults {
    /// Bumped by `cut_all`: every connection older than this is cut.
    cut_epoch: u64,
    /// Stop forwarding (without closing) while true.
    stalled: bool,
    /// Wait this long before forwarding each chunk.
    delay: Duration,
    /// Refuse (accept and close at once) new connections while true.
    refuse: bool,
    /// Cut each connection after a budget of forwarded bytes (both directions), drawn from
    /// `min..=max` with a seeded generator; or a fixed budget.
    budget: Option<(u64, u64)>,
    /// Stall (instead of cutting) when the budget is used up.
    stall_at_budget: bool,
}

/// A running proxy. Dropping it stops accepting and cuts every connection.
#[derive(Debug)]
pub struct Proxy {
    address: SocketAddr,
    faults: watch::Sender<Faults>,
    rng: Arc<Mutex<u64>>,
    accepted: Arc<AtomicUsize>,
    forwarded: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.faults.send_modify(|f| f.cut_epoch += 1);
    }
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("proxy address");
        let (faults, _) = watch::channel(Faults::default());
        let rng = Arc::new(Mutex::new(0x9e37_79b9_7f4a_7c15));
        let accepted = Arc::new(AtomicUsize::new(0));
        let forwarded = Arc::new(AtomicU64::new(0));
        let task = {
            let faults = faults.clone();
            let rng = rng.clone();
            let accepted = accepted.clone();
            let forwarded = forwarded.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let now = faults.borrow().clone();
                    if now.refuse {
                        drop(client);
                        continue;
                    }
                    let budget = now.budget.map(|(min, max)| {
                        let mut state = rng.lock().unwrap_or_else(PoisonError::into_inner);
                        min + next_random(&mut state) % (max - min + 1)
                    });
                    tokio::spawn(relay(
                        client,
                        target,
                        faults.subscribe(),
                        budget,
                        forwarded.clone(),
                    ));
                }
            })
        };
        Proxy {
            address,
            faults,
            rng,
            accepted,
            forwarded,
            task,
        }
    }

    /// `tcp://127.0.0.1:port`, for `connect`.
    pub fn address(&self) -> String {
        format!("tcp://{}", self.address)
    }

    /// Connections accepted so far (refused ones included).
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Bytes forwarded so far (both directions).
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// Cuts every current connection now (new ones are forwarded).
    pub fn cut_all(&self) {
        self.faults.send_modify(|f| f.cut_epoch += 1);
    }

    /// Stops (or resumes) forwarding on every connection, without closing any.
    pub fn stall(&self, stalled: bool) {
        self.faults.send_modify(|f| f.stalled = stalled);
    }

    /// Delays every forwarded chunk by `delay` (zero: no delay).
    pub fn delay(&self, delay: Duration) {
        self.faults.send_modify(|f| f.delay = delay);
    }

    /// Closes new connections at once while `refuse` is true.
    pub fn refuse(&self, refuse: bool) {
        self.faults.send_modify(|f| f.refuse = refuse);
    }

    /// Cuts each new connection after exactly `bytes` forwarded bytes (both directions).
    pub fn cut_after(&self, bytes: u64) {
        self.faults.send_modify(|f| {
            f.budget = Some((bytes, bytes));
            f.stall_at_budget = false;
        });
    }

    /// Stalls each new connection (forwarding nothing more, closing nothing) after exactly
    /// `bytes` forwarded bytes.
    pub fn stall_after(&self, bytes: u64) {
        self.faults.send_modify(|f| {
            f.budget = Some((bytes, bytes));
            f.stall_at_budget = true;
        });
    }

    /// Cuts each new connection after a random number of forwarded bytes in `min..=max`,
    /// drawn from a generator seeded with `seed`.
    pub fn cut_randomly(&self, seed: u64, min: u64, max: u64) {
        *self.rng.lock().unwrap_or_else(PoisonError::into_inner) = seed | 1;
        self.faults.send_modify(|f| {
            f.budget = Some((min, max.max(min)));
            f.stall_at_budget = false;
        });
    }

    /// No budget for new connections: forward everything.
    pub fn heal(&self) {
        self.faults.send_modify(|f| {
            f.budget = None;
            f.stalled = false;
            f.refuse = false;
            f.delay = Duration::ZERO;
        });
    }
}

/// xorshift64*.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Forwards one connection until either side closes, a cut, or the budget runs out.
async fn relay(
    client: TcpStream,
    target: SocketAddr,
    mut faults: watch::Receiver<Faults>,
    budget: Option<u64>,
    forwarded: Arc<AtomicU64>,
) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let epoch = faults.borrow_and_update().cut_epoch;
    let budget = Arc::new(Mutex::new(budget));
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, faults.clone(), budget.clone(), forwarded.clone());
    let down = pump(sr, cw, faults.clone(), budget, forwarded);
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = faults.wait_for(|f| f.cut_epoch != epoch) => {}
    }
    // Dropping both halves of both sockets closes them.
}

/// What a pump does next.
enum Step {
    Forward(usize),
    CutAfter(usize),
    StallAfter(usize),
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut faults: watch::Receiver<Faults>,
    budget: Arc<Mutex<Option<u64>>>,
    forwarded: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 4096];
    loop {
        if faults.wait_for(|f| !f.stalled).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let (delay, stall_at_budget) = {
            let f = faults.borrow();
            (f.delay, f.stall_at_budget)
        };
        let step = {
            let mut left = budget.lock().unwrap_or_else(PoisonError::into_inner);
            match left.as_mut() {
                None => Step::Forward(n),
                Some(b) if (n as u64) < *b => {
                    *b -= n as u64;
                    Step::Forward(n)
                }
                Some(b) => {
                    let k = *b as usize;
                    *b = 0;
                    if stall_at_budget {
                        Step::StallAfter(k)
                    } else {
                        Step::CutAfter(k)
                    }
                }
            }
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let k = match step {
            Step::Forward(k) | Step::CutAfter(k) | Step::StallAfter(k) => k,
        };
        if to.write_all(&buf[..k]).await.is_err() {
            return;
        }
        forwarded.fetch_add(k as u64, Ordering::Relaxed);
        match step {
            Step::Forward(_) => {}
            Step::CutAfter(_) => return,
            Step::StallAfter(_) => {
                // Hold both sockets open, forward nothing, until cut.
                std::future::pending::<()>().await;
            }
        }
    }
}
