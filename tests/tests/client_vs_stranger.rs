//! chatter's client side (`connect`, `connect_early`, `Peer`, `#[remote]` clients) against
//! a *server* written from `chatter-core/PROTOCOL.md` and `chatter-rpc/PROTOCOL.md` alone:
//! a raw `TcpStream` with a hand-written MessagePack encoder and decoder, no chatter code.
//! It does what the documents allow a server to do (a late hello, hello and reply in one
//! write, small limits, late window frames, pings, calls and signals to the client, replies
//! out of order, every failure kind and close code) and what a broken server may do (wrong
//! hello, silence, garbage, replies nobody asked for, too much credit, not reading,
//! vanishing), and checks that every caller gets the documented outcome, in time.
//!
//! Bounds: every task a test spawns is one per connect or call the test itself makes (a
//! handful, counted in the test), awaited by it or dropped with its runtime; the stranger
//! is never served by a spawned task per message.

use std::time::Duration;

use chatter_core::{
    connect, connect_early, CloseCause, CloseCode, ConnectError, Options, ProtocolError,
};
use chatter_rpc::stream::Receiver;
use chatter_rpc::{remote, CallError, Peer, PeerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout, Instant};

/// Only stops a hung test: on the paused clock it fires once every task waits.
const HANG_GUARD: Duration = Duration::from_secs(600);

#[remote]
pub trait Calc {
    async fn add(&self, a: i64, b: i64) -> i64;
    async fn echo(&self, s: String) -> String;
    /// Sleeps `ms` on the (paused) clock.
    async fn wait(&self, ms: u64) -> u64;
    #[signal]
    async fn note(&self, n: u64);
}

#[derive(Clone)]
struct Local {
    /// The notes (signals) the stranger sends: unbounded, as a test's stranger sends a
    /// fixed handful and the test reads them all.
    notes: mpsc::UnboundedSender<u64>,
}

impl Calc for Local {
    async fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }
    async fn echo(&self, s: String) -> String {
        s
    }
    async fn wait(&self, ms: u64) -> u64 {
        sleep(Duration::from_millis(ms)).await;
        ms
    }
    async fn note(&self, n: u64) {
        let _ = self.notes.send(n);
    }
}

// ---- a MessagePack subset, written from the spec -------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum V {
    Nil,
    Bool(bool),
    Int(i128),
    Str(String),
    Bin(Vec<u8>),
    Arr(Vec<V>),
    Map(Vec<(V, V)>),
}

impl V {
    fn uint(&self) -> u64 {
        match self {
            V::Int(i) => *i as u64,
            other => panic!("expected an integer, got {other:?}"),
        }
    }
    fn str(&self) -> &str {
        match self {
            V::Str(s) => s,
            other => panic!("expected a string, got {other:?}"),
        }
    }
    fn arr(&self) -> &[V] {
        match self {
            V::Arr(a) => a,
            other => panic!("expected an array, got {other:?}"),
        }
    }
}

fn enc(out: &mut Vec<u8>, v: &V) {
    match v {
        V::Nil => out.push(0xc0),
        V::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
        V::Int(i) if *i >= 0 => {
            let u = *i as u64;
            if u < 128 {
                out.push(u as u8)
            } else if u < 256 {
                out.extend([0xcc, u as u8])
            } else if u < 65536 {
                out.push(0xcd);
                out.extend((u as u16).to_be_bytes())
            } else if u < 1 << 32 {
                out.push(0xce);
                out.extend((u as u32).to_be_bytes())
            } else {
                out.push(0xcf);
                out.extend(u.to_be_bytes())
            }
        }
        V::Int(i) => {
            out.push(0xd3);
            out.extend((*i as i64).to_be_bytes())
        }
        V::Str(s) => {
            let n = s.len();
            if n < 32 {
                out.push(0xa0 | n as u8)
            } else if n < 256 {
                out.extend([0xd9, n as u8])
            } else {
                out.push(0xda);
                out.extend((n as u16).to_be_bytes())
            }
            out.extend(s.as_bytes())
        }
        V::Bin(b) => {
            out.push(0xc5);
            out.extend((b.len() as u16).to_be_bytes());
            out.extend(b)
        }
        V::Arr(a) => {
            if a.len() < 16 {
                out.push(0x90 | a.len() as u8)
            } else {
                out.push(0xdc);
                out.extend((a.len() as u16).to_be_bytes())
            }
            a.iter().for_each(|v| enc(out, v))
        }
        V::Map(m) => {
            out.push(0x80 | m.len() as u8);
            for (k, v) in m {
                enc(out, k);
                enc(out, v)
            }
        }
    }
}

fn pack(v: &V) -> Vec<u8> {
    let mut out = Vec::new();
    enc(&mut out, v);
    out
}

fn dec(b: &[u8], p: &mut usize) -> V {
    let take = |p: &mut usize, n: usize| -> &[u8] {
        let s = &b[*p..*p + n];
        *p += n;
        s
    };
    let be = |s: &[u8]| s.iter().fold(0u64, |a, x| a << 8 | *x as u64);
    let m = take(p, 1)[0];
    match m {
        0x00..=0x7f => V::Int(m as i128),
        0x80..=0x8f => V::Map((0..m & 0x0f).map(|_| (dec(b, p), dec(b, p))).collect()),
        0x90..=0x9f => V::Arr((0..m & 0x0f).map(|_| dec(b, p)).collect()),
        0xa0..=0xbf => V::Str(String::from_utf8(take(p, (m & 0x1f) as usize).to_vec()).unwrap()),
        0xc0 => V::Nil,
        0xc2 => V::Bool(false),
        0xc3 => V::Bool(true),
        0xc4..=0xc6 => {
            let w = 1 << (m - 0xc4);
            let n = be(take(p, w)) as usize;
            V::Bin(take(p, n).to_vec())
        }
        0xcc..=0xcf => {
            let w = 1 << (m - 0xcc);
            V::Int(be(take(p, w)) as i128)
        }
        0xd0..=0xd3 => {
            let w = 1 << (m - 0xd0);
            let u = be(take(p, w));
            let shift = 64 - 8 * w as u32;
            V::Int((((u << shift) as i64) >> shift) as i128)
        }
        0xd9..=0xdb => {
            let w = 1 << (m - 0xd9);
            let n = be(take(p, w)) as usize;
            V::Str(String::from_utf8(take(p, n).to_vec()).unwrap())
        }
        0xdc | 0xdd => {
            let n = be(take(p, if m == 0xdc { 2 } else { 4 }));
            V::Arr((0..n).map(|_| dec(b, p)).collect())
        }
        0xde | 0xdf => {
            let n = be(take(p, if m == 0xde { 2 } else { 4 }));
            V::Map((0..n).map(|_| (dec(b, p), dec(b, p))).collect())
        }
        0xe0..=0xff => V::Int((m as i8) as i128),
        other => panic!("marker {other:#x} not in this subset"),
    }
}

/// A message's cost (§8.1): its body as it travelled, plus 64.
fn cost(f: &Frame) -> u64 {
    pack(&V::Arr(f.header.clone())).len() as u64 + f.payload.len() as u64 + 64
}

fn unpack(b: &[u8]) -> V {
    let mut p = 0;
    let v = dec(b, &mut p);
    assert_eq!(p, b.len(), "trailing bytes after a payload");
    v
}

fn int(i: i64) -> V {
    V::Int(i as i128)
}
fn st(x: &str) -> V {
    V::Str(x.into())
}

// ---- frames (chatter-core PROTOCOL.md §2-§5) -----------------------------------------

fn frame(header: &[V], payload: &[u8]) -> Vec<u8> {
    let mut body = pack(&V::Arr(header.to_vec()));
    body.extend(payload);
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

fn hello(max_frame_size: u64, receive_window: u64) -> Vec<u8> {
    frame(
        &[
            int(0),
            st("chatter"),
            int(1),
            V::Int(max_frame_size as i128),
            V::Int(receive_window as i128),
        ],
        &[],
    )
}

fn ping() -> Vec<u8> {
    frame(&[int(2)], &[])
}

fn window(credit: u64) -> Vec<u8> {
    frame(&[int(4), V::Int(credit as i128)], &[])
}

fn close(code: u64, reason: &str) -> Vec<u8> {
    frame(&[int(5), V::Int(code as i128), st(reason)], &[])
}

const OWNER: u64 = 1;
const TOKEN: u64 = 2;
const LAST: u64 = 4;

#[derive(Debug)]
struct Frame {
    header: Vec<V>,
    payload: Vec<u8>,
}

impl Frame {
    fn kind(&self) -> u64 {
        self.header[0].uint()
    }
    fn id(&self) -> u64 {
        self.header[1].uint()
    }
    fn first(&self) -> u64 {
        self.header[2].uint()
    }
    fn flags(&self) -> u64 {
        self.header[3].uint()
    }
    fn envelope(&self) -> V {
        unpack(&self.payload)
    }
}

/// The stranger: one accepted connection, spoken to in raw bytes.
struct Stranger {
    stream: TcpStream,
    /// The id of the next message this side sends (§5.1).
    next_id: u64,
    /// The client's limits, from its hello.
    client_hello: Vec<V>,
}

impl Stranger {
    async fn accept(listener: &TcpListener) -> Self {
        let (stream, _) = listener.accept().await.expect("accept");
        // Without it, Nagle holds small writes for the client's delayed ACK (40 ms of
        // real time), which the paused clock would fill with jumps to the next timer.
        stream.set_nodelay(true).expect("nodelay");
        Stranger {
            stream,
            next_id: 1,
            client_hello: Vec::new(),
        }
    }

    /// The next frame, `None` at the end of the stream (or a reset).
    async fn read(&mut self) -> Option<Frame> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).await.ok()?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        self.stream.read_exact(&mut body).await.ok()?;
        let mut p = 0;
        let header = match dec(&body, &mut p) {
            V::Arr(a) => a,
            other => panic!("header is not an array: {other:?}"),
        };
        Some(Frame {
            header,
            payload: body[p..].to_vec(),
        })
    }

    /// The next message, skipping pongs and window frames and answering pings (the
    /// client's keepalive pings after 20 s of silence, which the paused clock reaches).
    async fn message(&mut self) -> Frame {
        loop {
            let f = self
                .read()
                .await
                .expect("a message, not the end of the stream");
            match f.kind() {
                1 => return f,
                2 => self.write(&frame(&[int(3)], &[])).await,
                3 | 4 => continue,
                _ => panic!("expected a message, got {f:?}"),
            }
        }
    }

    /// The client's hello (§4), checked.
    async fn client_hello(&mut self) {
        let h = self.read().await.expect("the client's hello");
        assert_eq!(h.kind(), 0, "first frame: {h:?}");
        assert_eq!(h.header[1].str(), "chatter");
        assert_eq!(h.header[2].uint(), 1);
        assert!(h.payload.is_empty());
        self.client_hello = h.header;
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// A message frame with the next id.
    fn msg(&mut self, first: Option<u64>, flags: u64, payload: &V) -> Vec<u8> {
        let id = self.next_id;
        self.next_id += 1;
        let first = first.unwrap_or(id);
        frame(
            &[
                int(1),
                V::Int(id as i128),
                V::Int(first as i128),
                V::Int(flags as i128),
            ],
            &pack(payload),
        )
    }

    /// The reply that ends the call opened by `call` (flags token | last).
    fn reply(&mut self, call: &Frame, envelope: V) -> Vec<u8> {
        assert_eq!(call.flags(), OWNER | TOKEN, "a call passes the turn");
        assert_eq!(call.first(), call.id(), "a call opens a conversation");
        self.msg(Some(call.id()), TOKEN | LAST, &envelope)
    }

    /// Reads the next call and checks its object and method; returns it and its args.
    async fn call(&mut self, method: &str) -> (Frame, Vec<V>) {
        let f = self.message().await;
        let e = f.envelope();
        let e = e.arr();
        assert_eq!(e[0].uint(), 0, "a call envelope: {e:?}");
        assert_eq!(e[1].str(), "calc");
        assert_eq!(e[2].str(), method);
        let args = match &e[4] {
            V::Arr(a) => a.clone(),
            V::Nil => Vec::new(),
            other => panic!("args {other:?}"),
        };
        (f, args)
    }
}

async fn bind() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = format!("tcp://{}", listener.local_addr().unwrap());
    (listener, address)
}

/// A `Peer` connected with `connect` to a stranger that answers the hello with the given
/// limits.
async fn connected(max_frame_size: u64, receive_window: u64) -> (Peer, CalcClient, Stranger) {
    let (listener, address) = bind().await;
    let client = tokio::spawn(async move { connect(address, Options::default()).await });
    let mut stranger = Stranger::accept(&listener).await;
    stranger.client_hello().await;
    stranger.write(&hello(max_frame_size, receive_window)).await;
    let peer = Peer::new(client.await.unwrap().expect("connect"));
    let calc = CalcClient::new(&peer, "calc").with_deadline(Duration::from_secs(60));
    (peer, calc, stranger)
}

/// What the client's connection ended with, as its `Peer` reports it.
async fn cause(peer: &Peer) -> CloseCause {
    timeout(Duration::from_secs(30), peer.closed())
        .await
        .expect("the connection closes")
}

fn guard<F: std::future::Future>(f: F) -> tokio::time::Timeout<F> {
    timeout(HANG_GUARD, f)
}

// ---- what a conforming server may do ---------------------------------------------------

// §4: the server MAY answer the hello late, and MAY send its hello and its first reply in
// one write. `connect_early` puts the call right behind the client's hello.
#[tokio::test(start_paused = true)]
async fn late_hello_that_arrives_with_the_reply_in_one_write() {
    guard(async {
        let (listener, address) = bind().await;
        let conn = connect_early(address, Options::default())
            .await
            .expect("connect_early returns with the transport open");
        let peer = Peer::new(conn);
        let calc = CalcClient::new(&peer, "calc");
        let call = tokio::spawn(async move { calc.add(2, 3).await });
        let mut s = Stranger::accept(&listener).await;
        s.client_hello().await;
        let (c, args) = s.call("add").await;
        assert_eq!(args, vec![int(2), int(3)]);
        sleep(Duration::from_secs(5)).await;
        let mut out = hello(4096, 8192);
        out.extend(s.reply(&c, V::Arr(vec![int(0), int(5)])));
        s.write(&out).await;
        assert_eq!(call.await.unwrap().expect("the early call"), 5);
    })
    .await
    .expect("no hang");
}

// §4: `connect` waits for the hello; 9 s is within the 10 s handshake timeout.
#[tokio::test(start_paused = true)]
async fn connect_waits_for_a_hello_sent_late_within_the_handshake_timeout() {
    guard(async {
        let (listener, address) = bind().await;
        let client = tokio::spawn(async move { connect(address, Options::default()).await });
        let mut s = Stranger::accept(&listener).await;
        s.client_hello().await;
        sleep(Duration::from_secs(9)).await;
        s.write(&hello(4096, 8192)).await;
        let peer = Peer::new(client.await.unwrap().expect("connect"));
        let calc = CalcClient::new(&peer, "calc");
        let call = tokio::spawn(async move { calc.echo("hi".into()).await });
        let (c, args) = s.call("echo").await;
        assert_eq!(args, vec![st("hi")]);
        let r = s.reply(&c, V::Arr(vec![int(0), st("hi")]));
        s.write(&r).await;
        assert_eq!(call.await.unwrap().unwrap(), "hi");
    })
    .await
    .expect("no hang");
}

// §2, §6.3: a request too large for the server's small limits fails at once with a clear
// error, puts nothing on the wire, and the connection keeps working.
#[tokio::test(start_paused = true)]
async fn a_call_too_large_for_a_small_server_fails_clearly_and_the_connection_lives() {
    guard(async {
        let (peer, calc, mut s) = connected(128, 192).await;
        let big = calc.echo("x".repeat(300)).await;
        match &big {
            Err(CallError::BadArguments { what }) | Err(CallError::Protocol(what))
                if what.contains("128") => {}
            other => panic!("expected a clear size error naming the limit, got {other:?}"),
        }
        let call = tokio::spawn({
            let calc = calc.clone();
            async move { calc.echo("small".into()).await }
        });
        let (c, args) = s.call("echo").await;
        assert_eq!(args, vec![st("small")], "the large call never went out");
        let r = s.reply(&c, V::Arr(vec![int(0), st("small")]));
        s.write(&r).await;
        assert_eq!(call.await.unwrap().unwrap(), "small");
        assert!(peer.connection().map(|c| !c.is_closed()).unwrap_or(false));
    })
    .await
    .expect("no hang");
}

// §8.2: with a small window the client waits for credit; a window frame sent late lets the
// waiting call go.
#[tokio::test(start_paused = true)]
async fn calls_wait_for_a_window_frame_sent_late() {
    guard(async {
        let (_peer, calc, mut s) = connected(128, 256).await;
        let calls: Vec<_> = (0..4)
            .map(|i| {
                let calc = calc.clone();
                tokio::spawn(async move { calc.add(i, i).await })
            })
            .collect();
        let mut got = Vec::new();
        // Read what the credit allows; the rest must wait.
        while let Ok(f) = timeout(Duration::from_secs(5), s.message()).await {
            got.push(f);
        }
        assert!(
            !got.is_empty() && got.len() < 4,
            "credit for some calls only, got {}",
            got.len()
        );
        // Answer what came, then give credit back, late.
        for c in std::mem::take(&mut got) {
            let args = c.envelope().arr()[4].arr().to_vec();
            let sum = args[0].uint() as i64 + args[1].uint() as i64;
            let r = s.reply(&c, V::Arr(vec![int(0), int(sum)]));
            s.write(&r).await;
            got.push(c);
        }
        sleep(Duration::from_secs(3)).await;
        let n = got.len();
        let cost: u64 = got
            .iter()
            .map(|f| pack(&V::Arr(f.header.clone())).len() as u64 + f.payload.len() as u64 + 64)
            .sum();
        s.write(&window(cost)).await;
        for _ in n..4 {
            let c = s.message().await;
            let args = c.envelope().arr()[4].arr().to_vec();
            let sum = args[0].uint() as i64 + args[1].uint() as i64;
            let r = s.reply(&c, V::Arr(vec![int(0), int(sum)]));
            s.write(&r).await;
            // Credit for the next one.
            let cost = pack(&V::Arr(c.header.clone())).len() as u64 + c.payload.len() as u64 + 64;
            s.write(&window(cost)).await;
        }
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), 2 * i as i64);
        }
    })
    .await
    .expect("no hang");
}

// §9: the client answers the server's pings.
#[tokio::test(start_paused = true)]
async fn the_client_answers_pings() {
    guard(async {
        let (_peer, _calc, mut s) = connected(4096, 8192).await;
        for _ in 0..3 {
            s.write(&ping()).await;
            let f = s.read().await.expect("a pong");
            assert_eq!(f.header, vec![int(3)], "pong");
        }
    })
    .await
    .expect("no hang");
}

// chatter-core §1 (both sides may open conversations) and chatter-rpc's envelopes: the
// server calls and signals objects the client serves, over the same connection.
#[tokio::test(start_paused = true)]
async fn the_server_calls_and_signals_the_client() {
    guard(async {
        let (peer, _calc, mut s) = connected(4096, 8192).await;
        let (tx, mut notes) = mpsc::unbounded_channel();
        peer.register("calc", CalcServer::new(Local { notes: tx }));

        let call = s.msg(
            None,
            OWNER | TOKEN,
            &V::Arr(vec![
                int(0),
                st("calc"),
                st("add"),
                int(1000),
                V::Arr(vec![int(2), int(40)]),
            ]),
        );
        s.write(&call).await;
        let r = s.message().await;
        assert_eq!((r.first(), r.flags()), (1, TOKEN | LAST), "{r:?}");
        assert_eq!(r.envelope(), V::Arr(vec![int(0), int(42)]));

        let sig = s.msg(
            None,
            OWNER | TOKEN | LAST,
            &V::Arr(vec![
                int(1),
                st("calc"),
                st("note"),
                int(1000),
                V::Arr(vec![int(7)]),
            ]),
        );
        s.write(&sig).await;
        assert_eq!(notes.recv().await, Some(7));

        let nope = s.msg(
            None,
            OWNER | TOKEN,
            &V::Arr(vec![int(0), st("calc"), st("nope"), int(1000), V::Nil]),
        );
        s.write(&nope).await;
        let r = s.message().await;
        assert_eq!(r.first(), 3);
        assert_eq!(r.envelope(), V::Arr(vec![int(2), int(4), st("nope")]));
    })
    .await
    .expect("no hang");
}

// chatter-core §6: replies in any order; each reaches its caller.
#[tokio::test(start_paused = true)]
async fn replies_out_of_order_reach_their_callers() {
    guard(async {
        let (_peer, calc, mut s) = connected(4096, 8192).await;
        let a = tokio::spawn({
            let calc = calc.clone();
            async move { calc.add(1, 1).await }
        });
        let (ca, _) = s.call("add").await;
        let b = tokio::spawn({
            let calc = calc.clone();
            async move { calc.add(2, 2).await }
        });
        let (cb, _) = s.call("add").await;
        let rb = s.reply(&cb, V::Arr(vec![int(0), int(4)]));
        let ra = s.reply(&ca, V::Arr(vec![int(0), int(2)]));
        let mut both = rb;
        both.extend(ra);
        s.write(&both).await;
        assert_eq!(a.await.unwrap().unwrap(), 2);
        assert_eq!(b.await.unwrap().unwrap(), 4);
    })
    .await
    .expect("no hang");
}

// chatter-rpc "Callee → caller replies": each failure kind maps to its `CallError`, an
// unknown kind to `Protocol` with the message kept; the connection stays open.
#[tokio::test(start_paused = true)]
async fn every_failure_kind_reaches_the_caller_as_its_error() {
    guard(async {
        let (peer, calc, mut s) = connected(4096, 8192).await;
        for kind in (1..=15).chain([16, 99]) {
            let call = tokio::spawn({
                let calc = calc.clone();
                async move { calc.add(1, 2).await }
            });
            let (c, _) = s.call("add").await;
            let text = format!("text {kind}");
            let r = s.reply(&c, V::Arr(vec![int(2), int(kind), st(&text)]));
            s.write(&r).await;
            let err = call.await.unwrap().expect_err("a failure");
            let ok = match (kind, &err) {
                (1, CallError::DeadlineExceeded) => true,
                (2, CallError::Cancelled) => true,
                // The message is the object or method name (a conforming callee's is
                // the one called); the caller reports the names it called.
                (3, CallError::NoSuchObject { object }) => object == "calc",
                (4, CallError::NoSuchMethod { object, method }) => {
                    object == "calc" && method == "add"
                }
                (5, CallError::BadArguments { what }) => what == &text,
                (6, CallError::RemotePanic { message }) => message == &text,
                (7, CallError::Protocol(what)) => what == &text,
                (8, CallError::ShuttingDown) => true,
                (9, CallError::MetadataTooLarge { what }) => what.contains(&text),
                (10, CallError::TooManyStreams { what }) => what == &text,
                (11, CallError::NoSuchPeer { peer }) => peer == &text,
                (12, CallError::PeerLost { what }) => what == &text,
                (13, CallError::PeerBusy { what }) => what == &text,
                (14, CallError::Protocol(what)) => what.contains(&text),
                (15, CallError::PermissionDenied { what }) => what == &text,
                (16 | 99, CallError::Protocol(what)) => {
                    what.contains(&format!("unknown failure kind {kind}")) && what.contains(&text)
                }
                _ => false,
            };
            assert!(ok, "failure kind {kind} gave {err:?}");
        }
        assert!(peer.connection().map(|c| !c.is_closed()).unwrap_or(false));
    })
    .await
    .expect("no hang");
}

// chatter-rpc "cancellation": dropping a call sends `[2, call]`; the server's late
// `cancelled` reply ends the conversation and is discarded, the connection lives.
#[tokio::test(start_paused = true)]
async fn a_dropped_call_is_cancelled_and_the_late_reply_discarded() {
    guard(async {
        let (_peer, calc, mut s) = connected(4096, 8192).await;
        let call = tokio::spawn({
            let calc = calc.clone();
            async move { calc.add(1, 2).await }
        });
        let (c, _) = s.call("add").await;
        call.abort();
        let cancel = s.message().await;
        assert_eq!(cancel.flags() & (OWNER | LAST), OWNER | LAST, "{cancel:?}");
        assert_eq!(
            cancel.envelope(),
            V::Arr(vec![int(2), V::Int(c.id() as i128)])
        );
        let r = s.reply(&c, V::Arr(vec![int(2), int(2), st("cancelled")]));
        s.write(&r).await;
        let next = tokio::spawn({
            let calc = calc.clone();
            async move { calc.add(3, 4).await }
        });
        let (c, _) = s.call("add").await;
        let r = s.reply(&c, V::Arr(vec![int(0), int(7)]));
        s.write(&r).await;
        assert_eq!(next.await.unwrap().unwrap(), 7);
    })
    .await
    .expect("no hang");
}

// chatter-core §10: each close code, with its reason, reaches the caller of a call in
// flight; unknown codes are numbers, not errors.
#[tokio::test(start_paused = true)]
async fn each_close_code_and_reason_reaches_the_caller() {
    guard(async {
        for (code, want) in [
            (0, CloseCode::Normal),
            (1, CloseCode::ProtocolError),
            (2, CloseCode::KeepaliveTimeout),
            (3, CloseCode::GoingAway),
            (4, CloseCode::Busy),
            (77, CloseCode::Other(77)),
        ] {
            let (peer, calc, mut s) = connected(4096, 8192).await;
            let call = tokio::spawn(async move { calc.add(1, 2).await });
            let _ = s.call("add").await;
            s.write(&close(code, &format!("reason {code}"))).await;
            s.stream.shutdown().await.unwrap();
            let err = call.await.unwrap().expect_err("the close");
            match &err {
                CallError::ConnectionLost(CloseCause::Peer { code: got, reason })
                    if *got == want && reason == &format!("reason {code}") => {}
                other => panic!("close code {code}: {other:?}"),
            }
            assert!(matches!(cause(&peer).await, CloseCause::Peer { .. }));
            // The client sends nothing after a close frame: it ends its stream.
            assert!(s.read().await.is_none());
        }
    })
    .await
    .expect("no hang");
}

// chatter-core §10: messages before the close frame are delivered: a reply and the close
// in one write give the caller its value.
#[tokio::test(start_paused = true)]
async fn a_reply_right_before_the_close_is_delivered() {
    guard(async {
        let (peer, calc, mut s) = connected(4096, 8192).await;
        let call = tokio::spawn(async move { calc.add(1, 2).await });
        let (c, _) = s.call("add").await;
        let mut out = s.reply(&c, V::Arr(vec![int(0), int(3)]));
        out.extend(close(3, "server closing"));
        s.write(&out).await;
        s.stream.shutdown().await.unwrap();
        assert_eq!(call.await.unwrap().unwrap(), 3);
        assert!(matches!(
            cause(&peer).await,
            CloseCause::Peer {
                code: CloseCode::GoingAway,
                ..
            }
        ));
    })
    .await
    .expect("no hang");
}

// ---- what a broken or hostile server may do -------------------------------------------

/// The protocol error that closed the connection under a call; panics on any other error.
fn lost_to_protocol_error(err: &CallError) -> &ProtocolError {
    match err {
        CallError::ConnectionLost(CloseCause::Protocol(e)) => e,
        other => panic!("expected the connection lost to a protocol error, got {other:?}"),
    }
}

/// The protocol error a failed handshake reports; panics on any other error.
fn handshake_protocol_error(err: &ConnectError) -> &ProtocolError {
    match err {
        ConnectError::Handshake {
            cause: CloseCause::Protocol(e),
            ..
        } => e,
        other => panic!("expected a protocol error in the handshake, got {other:?}"),
    }
}

async fn handshake_error(answer: Vec<u8>) -> (ConnectError, Option<Frame>) {
    let (listener, address) = bind().await;
    let client = tokio::spawn(async move { connect(address, Options::default()).await });
    let mut s = Stranger::accept(&listener).await;
    s.client_hello().await;
    s.write(&answer).await;
    let err = client.await.unwrap().expect_err("the handshake fails");
    let closing = s.read().await;
    (err, closing)
}

fn assert_close_1(f: Option<Frame>, text: &str) {
    let f = f.expect("a close frame");
    assert_eq!(f.kind(), 5, "{f:?}");
    assert_eq!(f.header[1].uint(), 1, "{f:?}");
    assert!(f.header[2].str().contains(text), "{f:?}");
}

// §4: a hello of another version, another magic, or garbage.
#[tokio::test(start_paused = true)]
async fn wrong_hellos_fail_connect_clearly() {
    guard(async {
        let v2 = frame(&[int(0), st("chatter"), int(2), int(4096), int(8192)], &[]);
        let (err, f) = handshake_error(v2).await;
        assert!(
            matches!(
                handshake_protocol_error(&err),
                ProtocolError::UnsupportedVersion { .. }
            ),
            "{err:?}"
        );
        assert_close_1(f, "version 2");

        // §4: the version is checked before the limits are counted.
        let (err, f) = handshake_error(frame(&[int(0), st("chatter"), int(2)], &[])).await;
        assert!(
            matches!(
                handshake_protocol_error(&err),
                ProtocolError::UnsupportedVersion { .. }
            ),
            "{err:?}"
        );
        assert_close_1(f, "version 2");
        // ...and a version-1 hello without them is a first frame that does not decode.
        let (err, _) = handshake_error(frame(&[int(0), st("chatter"), int(1)], &[])).await;
        assert!(
            matches!(
                handshake_protocol_error(&err),
                ProtocolError::NotChatter { .. }
            ),
            "{err:?}"
        );

        let magic = frame(&[int(0), st("chatty"), int(1), int(4096), int(8192)], &[]);
        let (err, f) = handshake_error(magic).await;
        assert!(
            matches!(
                handshake_protocol_error(&err),
                ProtocolError::NotChatter { .. }
            ),
            "{err:?}"
        );
        assert_close_1(f, "does not speak chatter");

        let (err, f) = handshake_error(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()).await;
        assert!(
            matches!(
                handshake_protocol_error(&err),
                ProtocolError::NotChatter { .. }
            ),
            "{err:?}"
        );
        assert_close_1(f, "does not speak chatter");

        let small = hello(63, 8192);
        let (err, f) = handshake_error(small).await;
        assert!(
            matches!(handshake_protocol_error(&err), ProtocolError::Malformed(_)),
            "{err:?}"
        );
        assert_close_1(f, "at least 64");

        let (err, f) = handshake_error(ping()).await;
        assert!(
            matches!(handshake_protocol_error(&err), ProtocolError::Unexpected(_)),
            "{err:?}"
        );
        assert_close_1(f, "expected hello, got ping");

        // §10: a close frame instead of the hello is the server's close.
        let (err, _) = handshake_error(close(4, "full")).await;
        assert!(
            matches!(
                &err,
                ConnectError::Handshake {
                    cause: CloseCause::Peer {
                        code: CloseCode::Busy,
                        ..
                    },
                    ..
                }
            ),
            "{err:?}"
        );
    })
    .await
    .expect("no hang");
}

// §4: no hello at all: `connect` fails after the handshake timeout (10 s), with a close
// frame for the silent server; `connect_early`'s calls fail then too.
#[tokio::test(start_paused = true)]
async fn a_server_that_never_says_hello_is_cut_off_by_the_handshake_timeout() {
    guard(async {
        let (listener, address) = bind().await;
        let start = Instant::now();
        let client = tokio::spawn({
            let address = address.clone();
            async move { connect(address, Options::default()).await }
        });
        let mut s = Stranger::accept(&listener).await;
        s.client_hello().await;
        let err = client.await.unwrap().expect_err("no hello");
        let took = start.elapsed();
        assert!(
            matches!(
                handshake_protocol_error(&err),
                ProtocolError::HandshakeTimeout
            ),
            "{err:?}"
        );
        assert!(
            took >= Duration::from_secs(10) && took < Duration::from_secs(11),
            "{took:?}"
        );
        assert_close_1(s.read().await, "handshake timed out");

        let start = Instant::now();
        let peer = Peer::new(connect_early(address, Options::default()).await.unwrap());
        let calc = CalcClient::new(&peer, "calc");
        let call = tokio::spawn(async move { calc.add(1, 2).await });
        let mut s = Stranger::accept(&listener).await;
        s.client_hello().await;
        let _ = s.call("add").await;
        let err = call.await.unwrap().expect_err("no hello");
        assert!(
            matches!(
                &err,
                CallError::ConnectionLost(CloseCause::Protocol(ProtocolError::HandshakeTimeout))
            ),
            "{err:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(11));
    })
    .await
    .expect("no hang");
}

// chatter-core §6.4: a reply in a conversation the client never opened is a protocol error
// that closes the connection; the call in flight fails with it.
#[tokio::test(start_paused = true)]
async fn a_reply_nobody_asked_for_closes_with_a_protocol_error() {
    guard(async {
        let (peer, calc, mut s) = connected(4096, 8192).await;
        let call = tokio::spawn(async move { calc.add(1, 2).await });
        let _ = s.call("add").await;
        let stray = s.msg(Some(99), TOKEN | LAST, &V::Arr(vec![int(0), int(3)]));
        s.write(&stray).await;
        let err = call.await.unwrap().expect_err("the connection closed");
        assert!(
            matches!(
                lost_to_protocol_error(&err),
                ProtocolError::UnknownConversation { .. }
            ),
            "{err:?}"
        );
        assert!(matches!(cause(&peer).await, CloseCause::Protocol(_)));
        assert_close_1(s.read().await, "unknown or ended conversation");
    })
    .await
    .expect("no hang");
}

// chatter-rpc "The caller keeps the conversation until the reply arrives": a reply after
// the deadline is discarded, not a protocol error.
#[tokio::test(start_paused = true)]
async fn a_reply_after_the_deadline_is_discarded() {
    guard(async {
        let (_peer, calc, mut s) = connected(4096, 8192).await;
        let start = Instant::now();
        let call = tokio::spawn({
            let calc = calc.with_deadline(Duration::from_secs(1));
            async move { calc.add(1, 2).await }
        });
        let (c, e) = {
            let f = s.message().await;
            let e = f.envelope();
            (f, e)
        };
        assert_eq!(e.arr()[3].uint(), 1000, "deadline_ms");
        let err = call.await.unwrap().expect_err("deadline");
        assert!(matches!(err, CallError::DeadlineExceeded), "{err:?}");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_millis(1100),
            "{took:?}"
        );
        sleep(Duration::from_secs(1)).await;
        let r = s.reply(&c, V::Arr(vec![int(0), int(3)]));
        s.write(&r).await;
        let next = tokio::spawn(async move { calc.add(5, 5).await });
        let (c, _) = s.call("add").await;
        let r = s.reply(&c, V::Arr(vec![int(0), int(10)]));
        s.write(&r).await;
        assert_eq!(next.await.unwrap().unwrap(), 10);
    })
    .await
    .expect("no hang");
}

// chatter-rpc "What a caller does with a reply it cannot use": wrong value type, unknown
// status, a reply without `last`; the connection stays open.
#[tokio::test(start_paused = true)]
async fn replies_the_caller_cannot_use_fail_the_call_only() {
    guard(async {
        let (peer, calc, mut s) = connected(4096, 8192).await;

        let call = tokio::spawn({
            let calc = calc.clone();
            async move { calc.add(1, 2).await }
        });
        let (c, _) = s.call("add").await;
        let r = s.reply(&c, V::Arr(vec![int(0), st("three")]));
        s.write(&r).await;
        let err = call.await.unwrap().expect_err("bad reply");
        assert!(matches!(err, CallError::BadReply { .. }), "{err:?}");

        let call = tokio::spawn({
            let calc = calc.clone();
            async move { calc.add(1, 2).await }
        });
        let (c, _) = s.call("add").await;
        let r = s.reply(&c, V::Arr(vec![int(7), int(3)]));
        s.write(&r).await;
        let err = call.await.unwrap().expect_err("unknown status");
        assert!(
            matches!(&err, CallError::Protocol(w) if w.contains("unknown reply status 7")),
            "{err:?}"
        );

        let call = tokio::spawn({
            let calc = calc.clone();
            async move { calc.add(1, 2).await }
        });
        let (c, _) = s.call("add").await;
        let r = s.msg(Some(c.id()), TOKEN, &V::Arr(vec![int(0), int(3)]));
        s.write(&r).await;
        let err = call.await.unwrap().expect_err("no last");
        assert!(
            matches!(&err, CallError::Protocol(w) if w.contains("without ending the call")),
            "{err:?}"
        );

        let call = tokio::spawn({
            let calc = calc.clone();
            async move { calc.add(1, 2).await }
        });
        let (c, _) = s.call("add").await;
        let r = s.reply(&c, V::Arr(vec![int(0), int(3)]));
        s.write(&r).await;
        assert_eq!(call.await.unwrap().unwrap(), 3);
        assert!(peer.connection().map(|c| !c.is_closed()).unwrap_or(false));
    })
    .await
    .expect("no hang");
}

// chatter-core §2: a frame above the client's max_frame_size is refused from its prefix.
#[tokio::test(start_paused = true)]
async fn an_oversized_frame_closes_with_frame_too_large() {
    guard(async {
        let (peer, calc, mut s) = connected(4096, 8192).await;
        let call = tokio::spawn(async move { calc.add(1, 2).await });
        let _ = s.call("add").await;
        s.write(&0x0100_0000u32.to_be_bytes()).await;
        let err = call.await.unwrap().expect_err("closed");
        assert!(
            matches!(
                lost_to_protocol_error(&err),
                ProtocolError::FrameTooLarge { .. }
            ),
            "{err:?}"
        );
        assert!(matches!(cause(&peer).await, CloseCause::Protocol(_)));
        assert_close_1(s.read().await, "exceeds the maximum");
    })
    .await
    .expect("no hang");
}

// chatter-core §8.2: a window frame beyond the announced window is a protocol error.
#[tokio::test(start_paused = true)]
async fn more_credit_than_announced_closes_with_a_protocol_error() {
    guard(async {
        let (peer, calc, mut s) = connected(4096, 8192).await;
        let call = tokio::spawn(async move { calc.add(1, 2).await });
        let _ = s.call("add").await;
        // The call's cost came back and one byte more.
        s.write(&window(1000)).await;
        let err = call.await.unwrap().expect_err("closed");
        assert!(
            matches!(
                &err,
                CallError::ConnectionLost(CloseCause::Protocol(ProtocolError::Unexpected(w)))
                    if w.contains("exceeds the announced window of 8192")
            ),
            "{err:?}"
        );
        assert!(matches!(cause(&peer).await, CloseCause::Protocol(_)));
        assert_close_1(s.read().await, "exceeds the announced window");
    })
    .await
    .expect("no hang");
}

// chatter-core §9, §10: a server that stops reading while the client sends: keepalive
// (20 s + 20 s) ends the connection, every caller gets an error, nothing hangs.
#[tokio::test(start_paused = true)]
async fn a_server_that_stops_reading_is_cut_off_by_keepalive() {
    guard(async {
        let (peer, calc, s) = connected(4 << 20, 64 << 20).await;
        let calc = calc.with_deadline(Duration::from_secs(300));
        let start = Instant::now();
        let calls: Vec<_> = (0..64)
            .map(|_| {
                let calc = calc.clone();
                tokio::spawn(async move { calc.echo("x".repeat(1 << 20)).await })
            })
            .collect();
        for call in calls {
            let err = call.await.unwrap().expect_err("cut off");
            assert!(
                matches!(
                    &err,
                    CallError::ConnectionLost(CloseCause::KeepaliveTimeout)
                ),
                "{err:?}"
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(45),
            "{:?}",
            start.elapsed()
        );
        assert!(matches!(cause(&peer).await, CloseCause::KeepaliveTimeout));
        drop(s);
    })
    .await
    .expect("no hang");
}

// chatter-core §10: a server that vanishes without a close frame: each caller gets an
// error at once.
#[tokio::test(start_paused = true)]
async fn a_server_that_vanishes_mid_call_fails_every_caller_promptly() {
    guard(async {
        let (peer, calc, mut s) = connected(4096, 8192).await;
        let start = Instant::now();
        let calls: Vec<_> = (0..3)
            .map(|i| {
                let calc = calc.clone();
                tokio::spawn(async move { calc.add(i, i).await })
            })
            .collect();
        for _ in 0..3 {
            let _ = s.call("add").await;
        }
        drop(s);
        for call in calls {
            let err = call.await.unwrap().expect_err("vanished");
            assert!(
                matches!(&err, CallError::ConnectionLost(CloseCause::Io(_))),
                "{err:?}"
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        assert!(matches!(cause(&peer).await, CloseCause::Io(_)));
    })
    .await
    .expect("no hang");
}

// ---- more of what the documents allow ---------------------------------------------------

#[remote]
pub trait Streams {
    async fn count(&self, n: u64) -> Receiver<u64>;
    async fn sum(&self, items: Receiver<u64>) -> u64;
    async fn total_len(&self, items: Receiver<String>) -> u64;
}

// §4.1: early messages that cost more than the server's small window are a debt that its
// window frames pay back first; a message queued for the hello that the hello then makes
// too large fails clearly instead of waiting forever.
#[tokio::test(start_paused = true)]
async fn early_debt_is_paid_back_and_a_queued_message_too_large_for_the_hello_fails() {
    guard(async {
        let (listener, address) = bind().await;
        let peer = Peer::new(connect_early(address, Options::default()).await.unwrap());
        let calc = CalcClient::new(&peer, "calc").with_deadline(Duration::from_secs(60));
        // ~1 KiB each: the first three fit the 4096 bytes of early credit (with a quarter
        // of it free after each, chatter-rpc's reserve for calls), the fourth (1.5 KiB)
        // waits for the hello.
        let calls: Vec<_> = (0..4)
            .map(|i| {
                let calc = calc.clone();
                let arg = format!("{i}{}", "x".repeat(if i < 3 { 900 } else { 1500 }));
                tokio::spawn(async move { calc.echo(arg).await })
            })
            .collect();
        let mut s = Stranger::accept(&listener).await;
        s.client_hello().await;
        let mut early = Vec::new();
        let mut cost = 0;
        while let Ok(f) = timeout(Duration::from_secs(1), s.message()).await {
            cost += pack(&V::Arr(f.header.clone())).len() as u64 + f.payload.len() as u64 + 64;
            early.push(f);
        }
        assert_eq!(early.len(), 3, "three early calls fit 4096 bytes");
        // The server announces less than what already came: 1024 bytes of frames.
        let mut out = hello(1024, 1024 + 64);
        for c in &early {
            let arg = c.envelope().arr()[4].arr()[0].clone();
            out.extend(s.reply(c, V::Arr(vec![int(0), arg])));
        }
        // It consumed everything: it returns the whole cost. From its side the client's
        // credit is then its window, not above it.
        out.extend(window(cost));
        s.write(&out).await;
        let mut results = Vec::new();
        for call in calls {
            results.push(call.await.unwrap());
        }
        for (i, r) in results.iter().take(3).enumerate() {
            assert!(r.as_ref().unwrap().starts_with(&i.to_string()), "{r:?}");
        }
        match &results[3] {
            Err(CallError::BadArguments { what }) | Err(CallError::Protocol(what))
                if what.contains("1024") => {}
            other => panic!("the fourth call is too large for the hello: {other:?}"),
        }
        // The debt is paid and the window is whole: a small call goes through, nothing
        // was over-credited.
        let next = tokio::spawn({
            let calc = calc.clone();
            async move { calc.echo("small".into()).await }
        });
        let (c, _) = s.call("echo").await;
        let r = s.reply(&c, V::Arr(vec![int(0), st("small")]));
        s.write(&r).await;
        assert_eq!(next.await.unwrap().unwrap(), "small");
        assert!(peer.connection().map(|c| !c.is_closed()).unwrap_or(false));
    })
    .await
    .expect("no hang");
}

// §8.2: a server that announces a window smaller than its frames (SHOULD not, MAY): a
// message whose cost exceeds the window can never be sent and fails at once.
#[tokio::test(start_paused = true)]
async fn a_window_smaller_than_the_frames_fails_large_calls_at_once() {
    guard(async {
        let (_peer, calc, mut s) = connected(4096, 100).await;
        let err = calc.echo("y".repeat(60)).await.expect_err("never fits");
        match &err {
            CallError::BadArguments { what } | CallError::Protocol(what) if what.contains("36") => {
            }
            other => panic!("{other:?}"),
        }
        let call = tokio::spawn(async move { calc.add(1, 2).await });
        let (c, _) = s.call("add").await;
        let r = s.reply(&c, V::Arr(vec![int(0), int(3)]));
        s.write(&r).await;
        assert_eq!(call.await.unwrap().unwrap(), 3);
    })
    .await
    .expect("no hang");
}

// §4: a server written to the earlier revision sends its hello without waiting for the
// client's; §3.2: non-shortest integers, array 16 headers and extra header fields are
// accepted; §4: hello values above 2^32-1 are clamped.
#[tokio::test(start_paused = true)]
async fn an_eager_hello_and_unusual_encodings_are_accepted() {
    guard(async {
        let (listener, address) = bind().await;
        let client = tokio::spawn(async move { connect(address, Options::default()).await });
        let (stream, _) = listener.accept().await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut s = Stranger {
            stream,
            next_id: 1,
            client_hello: Vec::new(),
        };
        // Hello first, with u64 limits and two extension fields.
        let mut body = vec![0x97, 0x00, 0xa7];
        body.extend(b"chatter");
        body.extend([0xcf, 0, 0, 0, 0, 0, 0, 0, 1]); // version 1 as uint 64
        body.extend([0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        body.extend([0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        body.extend([0x81, 0xa1, 0x6e, 0xc3, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0]); // {"n": true}, 0.0
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend(body);
        s.write(&out).await;
        s.client_hello().await;
        let peer = Peer::new(client.await.unwrap().expect("connect"));
        let calc = CalcClient::new(&peer, "calc");
        let call = tokio::spawn({
            let calc = calc.clone();
            async move { calc.add(20, 22).await }
        });
        let (c, _) = s.call("add").await;
        // The reply: array 16 header with an extra nil field, id/first/flags as uint 64.
        let mut body = vec![0xdc, 0x00, 0x05, 0x01];
        body.extend([0xcf, 0, 0, 0, 0, 0, 0, 0, 1]);
        body.push(0xcf);
        body.extend(c.id().to_be_bytes());
        body.extend([0xcd, 0x00, 0x06, 0xc0]);
        body.extend(pack(&V::Arr(vec![int(0), int(42)])));
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend(body);
        // A ping with an extra field, as §12.8.
        out.extend([0, 0, 0, 3, 0x92, 0x02, 0xc0]);
        s.write(&out).await;
        assert_eq!(call.await.unwrap().unwrap(), 42);
        let f = s.read().await.unwrap();
        assert_eq!(f.header, vec![int(3)]);
    })
    .await
    .expect("no hang");
}

// chatter-rpc "Streams": a result stream from the stranger, items batched, then its end.
#[tokio::test(start_paused = true)]
async fn a_result_stream_from_the_server() {
    guard(async {
        let (peer, _calc, mut s) = connected(4096, 8192).await;
        let streams = StreamsClient::new(&peer, "calc");
        let reader = tokio::spawn(async move {
            let mut rx = streams.count(3).await.expect("the stream opens");
            let mut got = Vec::new();
            while let Some(item) = rx.recv().await {
                got.push(item.expect("an item"));
            }
            got
        });
        let c = s.message().await;
        let e = c.envelope();
        let e = e.arr();
        assert_eq!(e[0].uint(), 12, "a stream call: {e:?}");
        assert_eq!(e[2].str(), "count");
        assert!(e[4].uint() > 0, "the window");
        let mut out = s.msg(Some(c.id()), 0, &V::Arr(vec![int(0), V::Nil]));
        out.extend(s.msg(Some(c.id()), 0, &V::Arr(vec![int(3), int(0)])));
        out.extend(s.msg(Some(c.id()), 0, &V::Arr(vec![int(3), int(1), int(2)])));
        out.extend(s.msg(Some(c.id()), TOKEN | LAST, &V::Arr(vec![int(4)])));
        s.write(&out).await;
        assert_eq!(reader.await.unwrap(), vec![0, 1, 2]);
    })
    .await
    .expect("no hang");
}

// chatter-rpc "Streams", Credit: a server that sends beyond the window it was given: the
// reader fails the stream and the caller cancels the call; the connection lives.
#[tokio::test(start_paused = true)]
async fn a_result_stream_beyond_its_credit_fails_and_is_cancelled() {
    guard(async {
        let (peer, calc, mut s) = connected(1 << 20, 2 << 20).await;
        let streams = StreamsClient::new(&peer, "calc");
        let reader = tokio::spawn(async move {
            let mut rx = streams.count(3).await.expect("the stream opens");
            let mut got = Vec::new();
            while let Some(item) = rx.recv().await {
                got.push(item);
            }
            got
        });
        let c = s.message().await;
        let window_bytes = c.envelope().arr()[4].uint();
        let mut out = s.msg(Some(c.id()), 0, &V::Arr(vec![int(0), V::Nil]));
        // Items of ~1 KiB each, twice the window.
        let item = V::Bin(vec![7; 1000]);
        let n = (2 * window_bytes / 1000) as usize;
        for _ in 0..n {
            out.extend(s.msg(Some(c.id()), 0, &V::Arr(vec![int(3), item.clone()])));
        }
        s.write(&out).await;
        // The cancel for the call.
        let cancel = loop {
            let f = s.message().await;
            if f.first() == f.id() && f.flags() & LAST != 0 {
                break f;
            }
        };
        assert_eq!(
            cancel.envelope(),
            V::Arr(vec![int(2), V::Int(c.id() as i128)])
        );
        let r = s.msg(
            Some(c.id()),
            TOKEN | LAST,
            &V::Arr(vec![int(2), int(2), st("cancelled")]),
        );
        s.write(&r).await;
        let got = reader.await.unwrap();
        assert!(
            got.last().map(|r| r.is_err()).unwrap_or(false),
            "the stream ends with an error: {:?}",
            got.last()
        );
        let call = tokio::spawn(async move { calc.add(1, 2).await });
        let (c, _) = s.call("add").await;
        let r = s.reply(&c, V::Arr(vec![int(0), int(3)]));
        s.write(&r).await;
        assert_eq!(call.await.unwrap().unwrap(), 3);
    })
    .await
    .expect("no hang");
}

// chatter-rpc "Streams": a server that grants some argument-stream credit and then stops
// reading it: the client's sender waits (only that stream), other calls flow; the reply
// ends the call and the client ends its argument stream.
#[tokio::test(start_paused = true)]
async fn an_argument_stream_the_server_stops_reading_stalls_only_itself() {
    guard(async {
        let (peer, calc, mut s) = connected(4096, 8192).await;
        let streams = StreamsClient::new(&peer, "calc");
        let (tx, rx) = chatter_rpc::stream::channel::<u64>(16);
        let sending = tokio::spawn(async move {
            let mut sent = 0u64;
            while tx.send(sent).await.is_ok() {
                sent += 1;
            }
            sent
        });
        let call = tokio::spawn(async move { streams.sum(rx).await });
        let c = s.message().await;
        assert_eq!(c.envelope().arr()[0].uint(), 12);
        // Credit for ~3 items (each 3 + 64 bytes alone).
        let grant = s.msg(Some(c.id()), 0, &V::Arr(vec![int(5), int(201)]));
        s.write(&grant).await;
        let u = s.message().await;
        assert_eq!(u.flags(), OWNER, "U opens keeping the turn: {u:?}");
        assert_eq!(u.envelope(), V::Arr(vec![int(14), V::Int(c.id() as i128)]));
        let mut items = Vec::new();
        while let Ok(f) = timeout(Duration::from_secs(5), s.message()).await {
            assert_eq!(f.first(), u.id());
            let e = f.envelope();
            assert_eq!(e.arr()[0].uint(), 3);
            items.extend(e.arr()[1..].iter().map(V::uint));
        }
        assert!(
            !items.is_empty() && items.len() <= 3,
            "within the grant: {items:?}"
        );
        // Other calls are not held up.
        let other = tokio::spawn({
            let calc = calc.clone();
            async move { calc.add(1, 2).await }
        });
        let (oc, _) = s.call("add").await;
        let r = s.reply(&oc, V::Arr(vec![int(0), int(3)]));
        s.write(&r).await;
        assert_eq!(other.await.unwrap().unwrap(), 3);
        // The server answers the call without reading further.
        let sum: u64 = items.iter().sum();
        let r = s.msg(
            Some(c.id()),
            TOKEN | LAST,
            &V::Arr(vec![int(0), V::Int(sum as i128)]),
        );
        s.write(&r).await;
        assert_eq!(call.await.unwrap().unwrap(), sum);
        let end = s.message().await;
        assert_eq!(end.first(), u.id());
        assert_eq!(end.flags() & LAST, LAST, "{end:?}");
        assert!(sending.await.unwrap() >= items.len() as u64);
    })
    .await
    .expect("no hang");
}

// ---- more of what a broken server may do ------------------------------------------------

// §3.2, §5, §11: malformed or out-of-order frames after the handshake each close the
// connection with code 1 and a `malformed`/protocol reason, failing the call in flight.
#[tokio::test(start_paused = true)]
async fn malformed_frames_close_with_a_protocol_error() {
    guard(async {
        type Make = Box<dyn Fn(&mut Stranger, u64) -> Vec<u8>>;
        let cases: Vec<(&str, Make)> = vec![
            (
                "unknown flag",
                Box::new(|_s, c| {
                    let mut b = vec![0x94, 0x01, 0x01];
                    enc(&mut b, &V::Int(c as i128));
                    b.push(0x0e);
                    let mut out = (b.len() as u32).to_be_bytes().to_vec();
                    out.extend(b);
                    out
                }),
            ),
            (
                "signed id",
                Box::new(|_s, _c| vec![0, 0, 0, 6, 0x94, 0x01, 0xd0, 0x01, 0x01, 0x07]),
            ),
            (
                "byte after ping",
                Box::new(|_s, _c| vec![0, 0, 0, 3, 0x91, 0x02, 0x00]),
            ),
            ("kind 6", Box::new(|_s, _c| vec![0, 0, 0, 2, 0x91, 0x06])),
            ("empty body", Box::new(|_s, _c| vec![0, 0, 0, 0])),
            ("second hello", Box::new(|_s, _c| hello(4096, 8192))),
            (
                "id gap",
                Box::new(|s, c| {
                    s.next_id = 5;
                    s.msg(Some(c), TOKEN | LAST, &V::Arr(vec![int(0), int(3)]))
                }),
            ),
            (
                "truncated header",
                Box::new(|_s, _c| vec![0, 0, 0, 2, 0x95, 0x00]),
            ),
        ];
        for (name, make) in cases {
            let (peer, calc, mut s) = connected(4096, 8192).await;
            let call = tokio::spawn(async move { calc.add(1, 2).await });
            let (c, _) = s.call("add").await;
            let bad = make(&mut s, c.id());
            s.write(&bad).await;
            let err = call.await.unwrap().expect_err(name);
            assert!(
                matches!(&err, CallError::ConnectionLost(CloseCause::Protocol(_))),
                "{name}: {err:?}"
            );
            assert!(
                matches!(cause(&peer).await, CloseCause::Protocol(_)),
                "{name}"
            );
            let f = s.read().await.expect("a close frame");
            assert_eq!((f.kind(), f.header[1].uint()), (5, 1), "{name}: {f:?}");
        }
    })
    .await
    .expect("no hang");
}

// §10: a long close reason is cut to 1024 bytes; a close during a `connect_early` session
// before the hello reaches the caller.
#[tokio::test(start_paused = true)]
async fn close_instead_of_hello_reaches_early_callers_and_long_reasons_are_cut() {
    guard(async {
        let (listener, address) = bind().await;
        let peer = Peer::new(
            connect_early(address.clone(), Options::default())
                .await
                .unwrap(),
        );
        let calc = CalcClient::new(&peer, "calc");
        let call = tokio::spawn(async move { calc.add(1, 2).await });
        let mut s = Stranger::accept(&listener).await;
        s.client_hello().await;
        let _ = s.call("add").await;
        s.write(&close(4, "busy")).await;
        let err = call.await.unwrap().expect_err("refused");
        assert!(
            matches!(
                &err,
                CallError::ConnectionLost(CloseCause::Peer { code: CloseCode::Busy, reason })
                    if reason == "busy"
            ),
            "{err:?}"
        );

        let (peer, _calc, mut s) = connected(1 << 20, 2 << 20).await;
        s.write(&close(0, &"é".repeat(2000))).await;
        match cause(&peer).await {
            CloseCause::Peer { reason, .. } => {
                assert_eq!(reason.len(), 1024);
                assert!(reason.chars().all(|c| c == 'é'));
            }
            other => panic!("{other:?}"),
        }
    })
    .await
    .expect("no hang");
}

// §10: a server that accepts and vanishes during the handshake.
#[tokio::test(start_paused = true)]
async fn a_server_that_vanishes_during_the_handshake() {
    guard(async {
        let (listener, address) = bind().await;
        let client = tokio::spawn(async move { connect(address, Options::default()).await });
        let mut s = Stranger::accept(&listener).await;
        s.client_hello().await;
        drop(s);
        let err = client.await.unwrap().expect_err("vanished");
        assert!(
            matches!(
                &err,
                ConnectError::Handshake {
                    cause: CloseCause::Io(_),
                    ..
                }
            ),
            "{err:?}"
        );
    })
    .await
    .expect("no hang");
}

// chatter-rpc "What a caller does with a reply it cannot use": an application error for a
// method that declares none, and a known status with the wrong number of elements.
#[tokio::test(start_paused = true)]
async fn an_app_error_for_an_infallible_method_and_short_replies_fail_the_call_only() {
    guard(async {
        let (peer, calc, mut s) = connected(4096, 8192).await;
        for (reply, want) in [
            (
                V::Arr(vec![
                    int(1),
                    V::Arr(vec![st("boom"), V::Arr(vec![])]),
                    st("x"),
                ]),
                "app",
            ),
            (
                V::Arr(vec![int(0)]),
                "unknown reply status 0 with 1 elements",
            ),
            (
                V::Arr(vec![int(2), int(6)]),
                "unknown reply status 2 with 2 elements",
            ),
        ] {
            let call = tokio::spawn({
                let calc = calc.clone();
                async move { calc.add(1, 2).await }
            });
            let (c, _) = s.call("add").await;
            let r = s.reply(&c, reply);
            s.write(&r).await;
            let err = call.await.unwrap().expect_err("unusable");
            match (&err, want) {
                (CallError::BadReply { what }, "app") if what.contains("boom") => {}
                (CallError::Protocol(w), want) if w.contains(want) => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(peer.connection().map(|c| !c.is_closed()).unwrap_or(false));
    })
    .await
    .expect("no hang");
}

// A signal too large for the server fails at once with `SignalError::TooLarge`.
#[tokio::test(start_paused = true)]
async fn a_signal_too_large_for_a_small_server_fails_at_once() {
    guard(async {
        let (_peer, calc, _s) = connected(128, 192).await;
        let err = calc.note(u64::MAX).await;
        assert!(err.is_ok(), "a small signal: {err:?}");
        let big = CalcClient::new(&_peer, &"o".repeat(200));
        let err = big.note(1).await.expect_err("too large");
        assert!(
            matches!(&err, chatter_rpc::SignalError::TooLarge(w) if w.contains("128")),
            "{err:?}"
        );
    })
    .await
    .expect("no hang");
}

// §10: a server that half-closes (FIN) without a close frame, still reading: an I/O error
// for every caller, at once.
#[tokio::test(start_paused = true)]
async fn a_fin_without_a_close_frame_is_an_io_error() {
    guard(async {
        let (peer, calc, mut s) = connected(4096, 8192).await;
        let start = Instant::now();
        let call = tokio::spawn(async move { calc.add(1, 2).await });
        let _ = s.call("add").await;
        s.stream.shutdown().await.unwrap();
        let err = call.await.unwrap().expect_err("ended");
        assert!(
            matches!(&err, CallError::ConnectionLost(CloseCause::Io(_))),
            "{err:?}"
        );
        assert!(matches!(cause(&peer).await, CloseCause::Io(_)));
        assert!(start.elapsed() < Duration::from_secs(1));
        // The client sends no close frame for it: it just ends its stream.
        assert!(s.read().await.is_none());
    })
    .await
    .expect("no hang");
}

/// A `Peer` with the given client options, connected to a stranger with default limits,
/// serving `calc`.
async fn serving(options: Options) -> (Peer, Stranger, mpsc::UnboundedReceiver<u64>) {
    let (listener, address) = bind().await;
    let client = tokio::spawn(async move { connect(address, options).await });
    let mut s = Stranger::accept(&listener).await;
    s.client_hello().await;
    s.write(&hello(4 << 20, 8 << 20)).await;
    let peer = Peer::new(client.await.unwrap().expect("connect"));
    let (tx, notes) = mpsc::unbounded_channel();
    peer.register("calc", CalcServer::new(Local { notes: tx }));
    (peer, s, notes)
}

// chatter-core §8.3 with the client as the receiver: a server that calls the client and
// never sends beyond the window the client announced gets its credit back, at the latest
// when `receive_window − (max_frame_size + 64)` is held back, so it always progresses.
#[tokio::test(start_paused = true)]
async fn the_client_returns_credit_so_a_server_within_its_window_progresses() {
    guard(async {
        for (max_frame, window_size, size) in [(4096u32, 4160u32, 4000usize), (8192, 20000, 3000)] {
            let options = Options::default()
                .max_frame_size(max_frame)
                .receive_window(window_size);
            let (_peer, mut s, _notes) = serving(options).await;
            assert_eq!(s.client_hello[3].uint(), max_frame as u64);
            assert_eq!(s.client_hello[4].uint(), window_size as u64);
            let bound = (window_size - max_frame - 64) as u64;
            let mut credit = window_size as u64;
            let mut sent = Vec::new();
            let mut replies = 0;
            let total = 12;
            while replies < total {
                let payload = V::Arr(vec![
                    int(0),
                    st("calc"),
                    st("echo"),
                    int(60_000),
                    V::Arr(vec![st(&"z".repeat(size))]),
                ]);
                if sent.len() < total {
                    let m = s.msg(None, OWNER | TOKEN, &payload);
                    let c = m.len() as u64 - 4 + 64;
                    if c <= credit {
                        credit -= c;
                        sent.push(c);
                        s.write(&m).await;
                        continue;
                    }
                    s.next_id -= 1;
                }
                // Out of credit (or done sending): read a window frame or a reply.
                let f = s.read().await.expect("the client keeps the connection");
                match f.kind() {
                    4 => {
                        credit += f.header[1].uint();
                        assert!(credit <= window_size as u64, "over-credited");
                    }
                    1 => {
                        assert_eq!(f.flags(), TOKEN | LAST);
                        replies += 1;
                    }
                    2 => s.write(&frame(&[int(3)], &[])).await,
                    _ => panic!("{f:?}"),
                }
            }
            // All answered, so all consumed: at most `bound` is still held back.
            while let Ok(Some(f)) = timeout(Duration::from_secs(1), s.read()).await {
                if f.kind() == 4 {
                    credit += f.header[1].uint();
                }
            }
            assert!(
                window_size as u64 - credit <= bound,
                "held back {} > {bound}",
                window_size as u64 - credit
            );
        }
    })
    .await
    .expect("no hang");
}

// chatter-rpc envelopes as the client writes them: a signal's TTL (30 s by default) and
// flags, a method without arguments.
#[tokio::test(start_paused = true)]
async fn the_client_writes_signals_as_documented() {
    guard(async {
        let (_peer, calc, mut s) = connected(4096, 8192).await;
        calc.note(9).await.unwrap();
        let f = s.message().await;
        assert_eq!(f.flags(), OWNER | TOKEN | LAST);
        assert_eq!(f.first(), f.id());
        assert_eq!(
            f.envelope(),
            V::Arr(vec![
                int(1),
                st("calc"),
                st("note"),
                int(30_000),
                V::Arr(vec![int(9)])
            ])
        );
    })
    .await
    .expect("no hang");
}

// §10: a hello and a close in one write.
#[tokio::test(start_paused = true)]
async fn a_hello_and_a_close_in_one_write() {
    guard(async {
        let (listener, address) = bind().await;
        let client = tokio::spawn(async move { connect(address, Options::default()).await });
        let mut s = Stranger::accept(&listener).await;
        s.client_hello().await;
        let mut out = hello(4096, 8192);
        out.extend(close(3, "bye"));
        s.write(&out).await;
        // Either outcome is the server's close; today `connect` returns the connection.
        match client.await.unwrap() {
            Ok(conn) => {
                let c = conn.closed().await;
                assert!(
                    matches!(
                        c,
                        CloseCause::Peer {
                            code: CloseCode::GoingAway,
                            ..
                        }
                    ),
                    "{c:?}"
                );
            }
            Err(e) => assert!(
                matches!(
                    &e,
                    ConnectError::Handshake {
                        cause: CloseCause::Peer {
                            code: CloseCode::GoingAway,
                            ..
                        },
                        ..
                    }
                ),
                "{e:?}"
            ),
        }
    })
    .await
    .expect("no hang");
}

// §2, §10: against a server with the smallest frames (64 bytes), the client's own close
// reason is cut to fit, and a reply too large for it becomes a kind 7 failure that fits
// (chatter-rpc "Callee → caller replies"); a window frame of 0 is legal (§8.2).
#[tokio::test(start_paused = true)]
async fn with_64_byte_frames_the_clients_replies_and_close_fit() {
    guard(async {
        let (listener, address) = bind().await;
        let client = tokio::spawn(async move { connect(address, Options::default()).await });
        let mut s = Stranger::accept(&listener).await;
        s.client_hello().await;
        s.write(&hello(64, 256)).await;
        let peer = Peer::new(client.await.unwrap().expect("connect"));
        let (tx, _notes) = mpsc::unbounded_channel();
        peer.register("calc", CalcServer::new(Local { notes: tx }));
        s.write(&window(0)).await;

        let call = s.msg(
            None,
            OWNER | TOKEN,
            &V::Arr(vec![
                int(0),
                st("calc"),
                st("echo"),
                int(1000),
                V::Arr(vec![st(&"q".repeat(100))]),
            ]),
        );
        s.write(&call).await;
        let r = loop {
            let f = s.read().await.expect("the reply");
            if f.kind() == 1 {
                break f;
            }
        };
        assert!(cost(&r) - 64 <= 64, "the reply fits 64 bytes: {r:?}");
        let e = r.envelope();
        assert_eq!(e.arr()[0..2], [int(2), int(7)], "{e:?}");

        // A stray message: the client closes with code 1 and a reason cut to fit.
        let stray = s.msg(Some(99), TOKEN | LAST, &V::Nil);
        s.write(&stray).await;
        let mut len = [0u8; 4];
        loop {
            s.stream.read_exact(&mut len).await.unwrap();
            let n = u32::from_be_bytes(len) as usize;
            assert!(n <= 64, "a frame of {n} bytes to a peer that accepts 64");
            let mut body = vec![0; n];
            s.stream.read_exact(&mut body).await.unwrap();
            let mut p = 0;
            let h = dec(&body, &mut p);
            if h.arr()[0].uint() == 5 {
                assert_eq!(h.arr()[1].uint(), 1);
                assert!(h.arr()[2].str().starts_with("message in unknown"), "{h:?}");
                break;
            }
        }
        assert!(matches!(cause(&peer).await, CloseCause::Protocol(_)));
    })
    .await
    .expect("no hang");
}

// §2, §4: a first frame above 256 bytes is "not chatter", even a hello or a close.
#[tokio::test(start_paused = true)]
async fn a_first_frame_above_256_bytes_is_not_chatter() {
    guard(async {
        let long = frame(
            &[
                int(0),
                st("chatter"),
                int(1),
                int(4096),
                int(8192),
                st(&"e".repeat(250)),
            ],
            &[],
        );
        let (err, f) = handshake_error(long).await;
        assert!(
            matches!(
                handshake_protocol_error(&err),
                ProtocolError::NotChatter { .. }
            ),
            "{err:?}"
        );
        assert_close_1(f, "does not speak chatter");
    })
    .await
    .expect("no hang");
}

// chatter-rpc "Streams", Credit: a server that sends exactly what the reader granted,
// alone and in batches, and waits for `[15, call, bytes]` grants, gets its stream through;
// items after the call's deadline are fine (the deadline covers opening only).
#[tokio::test(start_paused = true)]
async fn a_result_stream_within_its_credit_gets_grants_and_finishes() {
    guard(async {
        let (listener, address) = bind().await;
        let client = tokio::spawn(async move { connect(address, Options::default()).await });
        let mut s = Stranger::accept(&listener).await;
        s.client_hello().await;
        s.write(&hello(4096, 8192)).await;
        let conn = client.await.unwrap().expect("connect");
        let peer = Peer::with_options(conn, PeerOptions::default().stream_window(1024));
        let streams = StreamsClient::new(&peer, "calc").with_deadline(Duration::from_secs(1));
        let total = 300u64;
        let reader = tokio::spawn(async move {
            let mut rx = streams.count(total).await.expect("the stream opens");
            let mut n = 0;
            while let Some(item) = rx.recv().await {
                assert_eq!(item.expect("an item"), n);
                n += 1;
            }
            n
        });
        let c = s.message().await;
        let window_bytes = c.envelope().arr()[4].uint();
        assert_eq!(window_bytes, 1024);
        let mut credit = window_bytes;
        let open = s.msg(Some(c.id()), 0, &V::Arr(vec![int(0), V::Nil]));
        s.write(&open).await;
        sleep(Duration::from_secs(5)).await;
        let mut next = 0u64;
        let mut grants = 0;
        while next < total {
            // One to three items per message.
            let batch = (next % 3 + 1).min(total - next);
            let mut env = vec![int(3)];
            env.extend((next..next + batch).map(|i| V::Int(i as i128)));
            let env = V::Arr(env);
            let item_cost = pack(&env).len() as u64 + 64 * batch;
            if item_cost <= credit {
                credit -= item_cost;
                let m = s.msg(Some(c.id()), 0, &env);
                s.write(&m).await;
                next += batch;
                continue;
            }
            // Out of credit: wait for a grant.
            let f = s.message().await;
            let e = f.envelope();
            assert_eq!(f.flags(), OWNER | TOKEN | LAST, "{f:?}");
            assert_eq!(e.arr()[0].uint(), 15, "{e:?}");
            assert_eq!(e.arr()[1].uint(), c.id());
            let g = e.arr()[2].uint();
            assert!(
                g >= window_bytes / 2,
                "grants in steps of at least half: {g}"
            );
            credit += g;
            assert!(credit <= window_bytes);
            grants += 1;
        }
        assert!(grants >= 10, "{grants}");
        let end = s.msg(Some(c.id()), TOKEN | LAST, &V::Arr(vec![int(4)]));
        s.write(&end).await;
        assert_eq!(reader.await.unwrap(), total);
    })
    .await
    .expect("no hang");
}

// chatter-rpc "cancellation", server to client: the server cancels its call of a slow
// method the client serves; the client answers `cancelled` at once, ending the call.
#[tokio::test(start_paused = true)]
async fn the_server_cancels_its_call_to_the_client() {
    guard(async {
        let (_peer, mut s, _notes) = serving(Options::default()).await;
        let start = Instant::now();
        let call = s.msg(
            None,
            OWNER | TOKEN,
            &V::Arr(vec![
                int(0),
                st("calc"),
                st("wait"),
                int(60_000),
                V::Arr(vec![int(30_000)]),
            ]),
        );
        s.write(&call).await;
        sleep(Duration::from_secs(1)).await;
        let cancel = s.msg(None, OWNER | TOKEN | LAST, &V::Arr(vec![int(2), int(1)]));
        s.write(&cancel).await;
        let r = s.message().await;
        assert_eq!((r.first(), r.flags()), (1, TOKEN | LAST), "{r:?}");
        let e = r.envelope();
        assert_eq!(e.arr()[0..2], [int(2), int(2)], "cancelled: {e:?}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    })
    .await
    .expect("no hang");
}

// chatter-core §9: partial frames count as traffic: a server that drips one frame a byte
// every 15 s is never cut off by keepalive (20 s + 20 s), and the frame then counts.
#[tokio::test(start_paused = true)]
async fn a_frame_dripped_slowly_keeps_the_connection_alive() {
    guard(async {
        let (peer, _calc, mut s) = connected(4096, 8192).await;
        // A ping with a long extension field, so that it has many bytes to drip.
        let mut body = vec![0x92, 0x02, 0xa8];
        body.extend(b"slowness");
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend(body);
        for b in bytes {
            s.write(&[b]).await;
            sleep(Duration::from_secs(15)).await;
            assert!(!peer.connection().unwrap().is_closed());
        }
        let f = s.read().await.expect("the pong");
        assert_eq!(f.header, vec![int(3)]);
        assert!(!peer.connection().unwrap().is_closed());
    })
    .await
    .expect("no hang");
}

// chatter-core §4.1: the early debt is exact: a window frame one byte beyond paying it
// back and restoring the announced window is a protocol error.
#[tokio::test(start_paused = true)]
async fn one_byte_of_credit_beyond_the_early_debt_is_a_protocol_error() {
    guard(async {
        let (listener, address) = bind().await;
        let peer = Peer::new(connect_early(address, Options::default()).await.unwrap());
        let calc = CalcClient::new(&peer, "calc");
        let call = tokio::spawn(async move { calc.echo("d".repeat(1000)).await });
        let mut s = Stranger::accept(&listener).await;
        s.client_hello().await;
        let (c, _) = s.call("echo").await;
        let early = cost(&c);
        assert!(early > 200);
        let mut out = hello(128, 200);
        out.extend(window(early));
        s.write(&out).await;
        // Paid back exactly: the client's credit is the window, 200. Not one more.
        s.write(&window(1)).await;
        let err = call.await.unwrap().expect_err("closed");
        assert!(
            matches!(
                &err,
                CallError::ConnectionLost(CloseCause::Protocol(ProtocolError::Unexpected(w)))
                    if w.contains("exceeds the announced window of 200")
            ),
            "{err:?}"
        );
    })
    .await
    .expect("no hang");
}

// chatter-rpc "Reliable signals" and `Peer::reconnecting` against the stranger: a server
// that vanishes with a call and an unacknowledged signal in flight. The call fails with
// `OutcomeUnknown` (not re-sent); the reconnecting peer connects again, re-sends the
// signal with the same stream and seq and less TTL, and the server's ack completes it.
#[tokio::test(start_paused = true)]
async fn a_reconnecting_client_resends_unacknowledged_signals_to_a_new_connection() {
    guard(async {
        let (listener, address) = bind().await;
        let peer = Peer::reconnecting(
            address.as_str(),
            Options::default(),
            chatter_rpc::PeerOptions::default(),
            chatter_rpc::ReconnectOptions::default(),
        )
        .expect("reconnecting");
        let calc = CalcClient::new(&peer, "calc").with_deadline(Duration::from_secs(60));
        let mut s = Stranger::accept(&listener).await;
        s.client_hello().await;
        s.write(&hello(4096, 8192)).await;

        let sent = calc.note(5).await.expect("queued");
        let sig = s.message().await;
        assert_eq!(sig.flags(), OWNER | TOKEN | LAST);
        let e = sig.envelope();
        let e = e.arr().to_vec();
        assert_eq!(e[0].uint(), 3, "a reliable signal: {e:?}");
        let (stream, seq, ttl) = (e[1].uint(), e[2].uint(), e[5].uint());
        assert_eq!(seq, 1);
        assert_eq!((e[3].str(), e[4].str()), ("calc", "note"));

        let call = tokio::spawn({
            let calc = calc.clone();
            async move { calc.add(1, 2).await }
        });
        let _ = s.call("add").await;
        sleep(Duration::from_secs(1)).await;
        drop(s);
        let err = call.await.unwrap().expect_err("lost");
        assert!(matches!(&err, CallError::OutcomeUnknown(_)), "{err:?}");

        let mut s = Stranger::accept(&listener).await;
        s.client_hello().await;
        s.write(&hello(4096, 8192)).await;
        let again = s.message().await;
        let e = again.envelope();
        let e = e.arr();
        assert_eq!(
            (e[0].uint(), e[1].uint(), e[2].uint()),
            (3, stream, seq),
            "{e:?}"
        );
        assert!(
            e[5].uint() < ttl,
            "the copy carries less TTL: {} vs {ttl}",
            e[5].uint()
        );
        let ack = s.msg(
            None,
            OWNER | TOKEN | LAST,
            &V::Arr(vec![
                int(4),
                V::Int(stream as i128),
                V::Int(seq as i128),
                int(0),
            ]),
        );
        s.write(&ack).await;
        sent.acknowledged(Duration::from_secs(10))
            .await
            .expect("acknowledged");

        let call = tokio::spawn(async move { calc.add(2, 2).await });
        let (c, _) = s.call("add").await;
        let r = s.reply(&c, V::Arr(vec![int(0), int(4)]));
        s.write(&r).await;
        assert_eq!(call.await.unwrap().unwrap(), 4);
    })
    .await
    .expect("no hang");
}

// chatter-core §10 (close code 4 instead of the hello: "trying again later may succeed")
// and `Peer::reconnecting`: the client tries again, and a call made meanwhile waits for the
// connection within its deadline.
#[tokio::test(start_paused = true)]
async fn a_reconnecting_client_tries_again_after_busy() {
    guard(async {
        let (listener, address) = bind().await;
        let peer = Peer::reconnecting(
            address.as_str(),
            Options::default(),
            chatter_rpc::PeerOptions::default(),
            chatter_rpc::ReconnectOptions::default(),
        )
        .expect("reconnecting");
        let calc = CalcClient::new(&peer, "calc").with_deadline(Duration::from_secs(60));
        let call = tokio::spawn(async move { calc.add(3, 4).await });
        for _ in 0..2 {
            let mut s = Stranger::accept(&listener).await;
            s.client_hello().await;
            s.write(&close(4, "server at its connection limit")).await;
            s.stream.shutdown().await.unwrap();
            assert!(s.read().await.is_none());
        }
        let mut s = Stranger::accept(&listener).await;
        s.client_hello().await;
        s.write(&hello(4096, 8192)).await;
        let (c, _) = s.call("add").await;
        let r = s.reply(&c, V::Arr(vec![int(0), int(7)]));
        s.write(&r).await;
        assert_eq!(call.await.unwrap().unwrap(), 7);
    })
    .await
    .expect("no hang");
}

// chatter-rpc "Streams": how a result stream from the stranger can end, and a stream
// call answered with a plain value; each reaches the reader as a clear outcome.
#[tokio::test(start_paused = true)]
async fn each_end_of_a_result_stream_reaches_the_reader() {
    guard(async {
        use chatter_rpc::stream::StreamError;
        let (peer, calc, mut s) = connected(4096, 8192).await;
        let ends: Vec<(V, &str)> = vec![
            (V::Arr(vec![int(2), int(6), st("boom")]), "panic"),
            (V::Arr(vec![int(2), int(2), st("stop")]), "cancelled"),
            (V::Arr(vec![int(2), int(14), st("slow")]), "lagged"),
            (V::Arr(vec![int(2), int(7), st("odd")]), "protocol"),
            (V::Arr(vec![int(2), int(8), st("closing")]), "any"),
            (V::Arr(vec![int(3), st("not a number")]), "bad item"),
        ];
        for (end, want) in ends {
            let streams = StreamsClient::new(&peer, "calc");
            let reader = tokio::spawn(async move {
                let mut rx = streams.count(1).await.expect("the stream opens");
                let mut got = Vec::new();
                while let Some(item) = rx.recv().await {
                    got.push(item);
                }
                got
            });
            let c = s.message().await;
            let mut out = s.msg(Some(c.id()), 0, &V::Arr(vec![int(0), V::Nil]));
            out.extend(s.msg(Some(c.id()), 0, &V::Arr(vec![int(3), int(0)])));
            let bad_item = want == "bad item";
            let flags = if bad_item { 0 } else { TOKEN | LAST };
            out.extend(s.msg(Some(c.id()), flags, &end));
            s.write(&out).await;
            if bad_item {
                // The reader fails the stream and the caller cancels the call.
                let cancel = s.message().await;
                assert_eq!(
                    cancel.envelope(),
                    V::Arr(vec![int(2), V::Int(c.id() as i128)])
                );
                let r = s.msg(
                    Some(c.id()),
                    TOKEN | LAST,
                    &V::Arr(vec![int(2), int(2), st("ok")]),
                );
                s.write(&r).await;
            }
            let got = reader.await.unwrap();
            assert_eq!(got[0], Ok(0), "{want}: {got:?}");
            let last = got.last().unwrap();
            let ok = match (want, last) {
                ("panic", Err(StreamError::RemotePanic(m))) => m.contains("boom"),
                ("cancelled", Err(StreamError::Cancelled)) => true,
                ("lagged", Err(StreamError::Lagged(m))) => m.contains("slow"),
                ("protocol", Err(StreamError::Protocol(m))) => m.contains("odd"),
                ("any", Err(_)) => true,
                ("bad item", Err(StreamError::BadItem(_))) => true,
                _ => false,
            };
            assert!(ok, "{want}: {got:?}");
        }
        // A stream call answered as a plain call: a value with `last` for a method whose
        // result is a stream.
        let streams = StreamsClient::new(&peer, "calc");
        let opened = tokio::spawn(async move { streams.count(1).await.map(|_| ()) });
        let c = s.message().await;
        let r = s.msg(Some(c.id()), TOKEN | LAST, &V::Arr(vec![int(0), int(5)]));
        s.write(&r).await;
        let err = opened.await.unwrap().expect_err("not a stream");
        assert!(
            matches!(&err, CallError::BadReply { what } if what.contains("not a stream")),
            "{err:?}"
        );
        // The connection lives.
        let call = tokio::spawn(async move { calc.add(1, 1).await });
        let (c, _) = s.call("add").await;
        let r = s.reply(&c, V::Arr(vec![int(0), int(2)]));
        s.write(&r).await;
        assert_eq!(call.await.unwrap().unwrap(), 2);
    })
    .await
    .expect("no hang");
}

// chatter-rpc "What a caller does with a reply it cannot use": after an answer without
// `last` (the callee keeps the turn), what the callee sends later in the conversation is
// ignored, and the connection stays open.
#[tokio::test(start_paused = true)]
async fn after_an_answer_without_last_later_messages_are_ignored() {
    guard(async {
        let (peer, calc, mut s) = connected(4096, 8192).await;
        let call = tokio::spawn({
            let calc = calc.clone();
            async move { calc.add(1, 2).await }
        });
        let (c, _) = s.call("add").await;
        let r = s.msg(Some(c.id()), 0, &V::Arr(vec![int(0), int(3)]));
        s.write(&r).await;
        let err = call.await.unwrap().expect_err("no last");
        assert!(matches!(&err, CallError::Protocol(_)), "{err:?}");
        let more = s.msg(Some(c.id()), 0, &V::Arr(vec![int(0), int(4)]));
        let end = s.msg(Some(c.id()), TOKEN | LAST, &V::Arr(vec![int(0), int(5)]));
        let mut out = more;
        out.extend(end);
        s.write(&out).await;
        let call = tokio::spawn(async move { calc.add(2, 2).await });
        let (c, _) = s.call("add").await;
        let r = s.reply(&c, V::Arr(vec![int(0), int(4)]));
        s.write(&r).await;
        assert_eq!(call.await.unwrap().unwrap(), 4);
        assert!(!peer.connection().unwrap().is_closed());
    })
    .await
    .expect("no hang");
}

// chatter-core §4.1: before the server's hello the client's largest message body is 4032
// (cost 4096, the whole early credit); one byte more waits for the hello.
#[tokio::test(start_paused = true)]
async fn the_early_limit_is_4032_bytes_of_body() {
    guard(async {
        for (n, early) in [(4008usize, true), (4009, false)] {
            let (listener, address) = bind().await;
            let peer = Peer::new(connect_early(address, Options::default()).await.unwrap());
            // The default deadline, 30 s: `cd 75 30`. Body: 5 bytes of header + 19 of
            // envelope around the string + the string.
            let calc = CalcClient::new(&peer, "calc");
            let arg = "b".repeat(n);
            let call = tokio::spawn(async move { calc.echo(arg).await });
            let mut s = Stranger::accept(&listener).await;
            s.client_hello().await;
            let first = timeout(Duration::from_secs(2), s.message()).await;
            assert_eq!(first.is_ok(), early, "body {}", 24 + n);
            s.write(&hello(8192, 16384)).await;
            let c = match first {
                Ok(c) => c,
                Err(_) => s.message().await,
            };
            assert_eq!(cost(&c) - 64, 24 + n as u64);
            let arg = c.envelope().arr()[4].arr()[0].clone();
            let r = s.reply(&c, V::Arr(vec![int(0), arg]));
            s.write(&r).await;
            assert_eq!(call.await.unwrap().unwrap().len(), n);
        }
    })
    .await
    .expect("no hang");
}

// chatter-core §2, §4.1: the client's effective frame limit is max(max_frame_size, 4096):
// a server's 4096-byte body is accepted by a client that announced 1024, 4097 is not.
#[tokio::test(start_paused = true)]
async fn the_clients_effective_frame_limit_is_at_least_4096() {
    guard(async {
        for (body, ok) in [(4096usize, true), (4097, false)] {
            let (listener, address) = bind().await;
            let options = Options::default().max_frame_size(1024).receive_window(8192);
            let client = tokio::spawn(async move { connect(address, options).await });
            let mut s = Stranger::accept(&listener).await;
            s.client_hello().await;
            assert_eq!(s.client_hello[3].uint(), 1024);
            s.write(&hello(4096, 8192)).await;
            let peer = Peer::new(client.await.unwrap().expect("connect"));
            let calc = CalcClient::new(&peer, "calc");
            let call = tokio::spawn(async move { calc.echo("?".into()).await });
            let (c, _) = s.call("echo").await;
            // Header 94 01 01 01 06 (5 bytes), envelope 92 00 da xx xx (5) + the string.
            let r = s.reply(&c, V::Arr(vec![int(0), st(&"r".repeat(body - 10))]));
            assert_eq!(r.len(), 4 + body);
            s.write(&r).await;
            let got = call.await.unwrap();
            if ok {
                assert_eq!(got.unwrap().len(), body - 10);
            } else {
                let err = got.expect_err("too large");
                assert!(
                    matches!(
                        lost_to_protocol_error(&err),
                        ProtocolError::FrameTooLarge { .. }
                    ),
                    "{err:?}"
                );
                assert_close_1(
                    s.read().await,
                    "frame of 4097 bytes exceeds the maximum of 4096",
                );
            }
        }
    })
    .await
    .expect("no hang");
}

// chatter-rpc "Streams": an argument-stream item too large for the server's frames cannot
// be sent: the client fails its argument stream (`[2, kind, message]` ending U), the call
// itself goes on, and the connection lives.
#[tokio::test(start_paused = true)]
async fn an_argument_item_too_large_for_the_server_fails_the_stream_only() {
    guard(async {
        let (peer, calc, mut s) = connected(128, 192).await;
        let streams = StreamsClient::new(&peer, "calc");
        let (tx, rx) = chatter_rpc::stream::channel::<String>(4);
        let sending = tokio::spawn(async move {
            let first = tx.send("small".into()).await.is_ok();
            let big = tx.send("L".repeat(300)).await;
            (first, big.is_ok())
        });
        let call = tokio::spawn(async move { streams.total_len(rx).await });
        let c = s.message().await;
        assert_eq!(c.envelope().arr()[0].uint(), 12);
        // The stranger consumes each message at once and returns its credit (§8.3: with
        // a 192-byte window the threshold is 1 byte), or the client would rightly wait.
        let mut grant = window(cost(&c));
        grant.extend(s.msg(Some(c.id()), 0, &V::Arr(vec![int(5), int(100_000)])));
        s.write(&grant).await;
        let u = s.message().await;
        s.write(&window(cost(&u))).await;
        assert_eq!(u.envelope(), V::Arr(vec![int(14), V::Int(c.id() as i128)]));
        let mut got = Vec::new();
        let end = loop {
            let f = s.message().await;
            s.write(&window(cost(&f))).await;
            assert_eq!(f.first(), u.id(), "{f:?}");
            let e = f.envelope();
            if f.flags() & LAST != 0 {
                break e;
            }
            got.extend(e.arr()[1..].iter().map(|v| v.str().to_owned()));
        };
        assert_eq!(got, vec!["small".to_owned()]);
        assert_eq!(
            end.arr()[0].uint(),
            2,
            "the argument stream failed: {end:?}"
        );
        let r = s.msg(Some(c.id()), TOKEN | LAST, &V::Arr(vec![int(0), int(5)]));
        s.write(&r).await;
        assert_eq!(call.await.unwrap().unwrap(), 5);
        let (first, big) = sending.await.unwrap();
        assert!(first);
        let _ = big;
        let next = tokio::spawn(async move { calc.add(1, 1).await });
        let (c, _) = s.call("add").await;
        let r = s.reply(&c, V::Arr(vec![int(0), int(2)]));
        s.write(&r).await;
        assert_eq!(next.await.unwrap().unwrap(), 2);
    })
    .await
    .expect("no hang");
}

// chatter-rpc "Streams", Credit: an argument-stream item that costs more than the whole
// window the server granted cannot be sent: the items before it arrive, then the client
// fails its argument stream instead of waiting for credit that cannot come.
#[tokio::test(start_paused = true)]
async fn an_argument_item_larger_than_the_granted_window_fails_the_stream_only() {
    guard(async {
        let (peer, calc, mut s) = connected(4096, 8192).await;
        let streams = StreamsClient::new(&peer, "calc");
        let (tx, rx) = chatter_rpc::stream::channel::<String>(4);
        let sending = tokio::spawn(async move {
            let first = tx.send("small".into()).await.is_ok();
            let _ = tx.send("W".repeat(300)).await;
            first
        });
        let call = tokio::spawn(async move { streams.total_len(rx).await });
        let c = s.message().await;
        let grant = s.msg(Some(c.id()), 0, &V::Arr(vec![int(5), int(200)]));
        s.write(&grant).await;
        let u = s.message().await;
        assert_eq!(u.envelope(), V::Arr(vec![int(14), V::Int(c.id() as i128)]));
        let mut got = Vec::new();
        let end = loop {
            let f = s.message().await;
            assert_eq!(f.first(), u.id(), "{f:?}");
            let e = f.envelope();
            if f.flags() & LAST != 0 {
                break e;
            }
            got.extend(e.arr()[1..].iter().map(|v| v.str().to_owned()));
            // 72 bytes read, less than half the window: no grant yet (and none could
            // make room for an item that costs more than the whole window).
        };
        assert_eq!(got, vec!["small".to_owned()]);
        assert_eq!(
            end.arr()[0].uint(),
            2,
            "the argument stream failed: {end:?}"
        );
        let r = s.msg(Some(c.id()), TOKEN | LAST, &V::Arr(vec![int(0), int(5)]));
        s.write(&r).await;
        assert_eq!(call.await.unwrap().unwrap(), 5);
        assert!(sending.await.unwrap());
        let next = tokio::spawn(async move { calc.add(1, 1).await });
        let (c, _) = s.call("add").await;
        let r = s.reply(&c, V::Arr(vec![int(0), int(2)]));
        s.write(&r).await;
        assert_eq!(next.await.unwrap().unwrap(), 2);
    })
    .await
    .expect("no hang");
}

// chatter-rpc "Streams": a server that refuses a stream call before granting (failure 10)
// gets no argument stream; one that stops reading (`[6]`) gets the end of `U` once it
// answers, and the client's sender learns that its reader is gone.
#[tokio::test(start_paused = true)]
async fn refusal_and_stop_of_an_argument_stream() {
    guard(async {
        let (peer, _calc, mut s) = connected(4096, 8192).await;
        let streams = StreamsClient::new(&peer, "calc");
        let (_tx, rx) = chatter_rpc::stream::channel::<u64>(4);
        let call = tokio::spawn({
            let streams = streams.clone();
            async move { streams.sum(rx).await }
        });
        let c = s.message().await;
        let r = s.msg(
            Some(c.id()),
            TOKEN | LAST,
            &V::Arr(vec![int(2), int(10), st("max")]),
        );
        s.write(&r).await;
        let err = call.await.unwrap().expect_err("refused");
        assert!(
            matches!(&err, CallError::TooManyStreams { what } if what == "max"),
            "{err:?}"
        );

        let (tx, rx) = chatter_rpc::stream::channel::<u64>(4);
        let sending = tokio::spawn(async move {
            let mut n = 0;
            while tx.send(n).await.is_ok() {
                n += 1;
            }
            n
        });
        let call = tokio::spawn(async move { streams.sum(rx).await });
        let c = s.message().await;
        // The refused call opened no U: this is the next call.
        assert_eq!(c.envelope().arr()[0].uint(), 12, "{:?}", c.envelope());
        let grant = s.msg(Some(c.id()), 0, &V::Arr(vec![int(5), int(1000)]));
        s.write(&grant).await;
        let u = s.message().await;
        assert_eq!(u.envelope(), V::Arr(vec![int(14), V::Int(c.id() as i128)]));
        let first = s.message().await;
        assert_eq!(first.first(), u.id());
        let mut out = s.msg(Some(c.id()), 0, &V::Arr(vec![int(6)]));
        out.extend(s.msg(Some(c.id()), TOKEN | LAST, &V::Arr(vec![int(0), int(0)])));
        s.write(&out).await;
        assert_eq!(call.await.unwrap().unwrap(), 0);
        let end = loop {
            let f = s.message().await;
            assert_eq!(f.first(), u.id(), "{f:?}");
            if f.flags() & LAST != 0 {
                break f;
            }
        };
        assert_eq!(end.envelope(), V::Arr(vec![int(4)]), "U ends normally");
        sending.await.unwrap();
    })
    .await
    .expect("no hang");
}

// chatter-rpc "Streams", Opening: for a method with an argument stream the callee's first
// grant opens the call and the deadline stops applying; without a grant the deadline
// fails the call.
#[tokio::test(start_paused = true)]
async fn an_argument_stream_call_is_open_from_the_first_grant() {
    guard(async {
        let (peer, _calc, mut s) = connected(4096, 8192).await;
        let streams = StreamsClient::new(&peer, "calc").with_deadline(Duration::from_secs(1));
        let (tx, rx) = chatter_rpc::stream::channel::<u64>(4);
        drop(tx);
        let call = tokio::spawn({
            let streams = streams.clone();
            async move { streams.sum(rx).await }
        });
        let c = s.message().await;
        assert_eq!(c.envelope().arr()[3].uint(), 1000);
        sleep(Duration::from_millis(500)).await;
        let grant = s.msg(Some(c.id()), 0, &V::Arr(vec![int(5), int(1000)]));
        s.write(&grant).await;
        let u = s.message().await;
        let end = s.message().await;
        assert_eq!(
            (end.first(), end.envelope()),
            (u.id(), V::Arr(vec![int(4)]))
        );
        sleep(Duration::from_secs(5)).await;
        let r = s.msg(Some(c.id()), TOKEN | LAST, &V::Arr(vec![int(0), int(0)]));
        s.write(&r).await;
        assert_eq!(call.await.unwrap().unwrap(), 0);

        let (_tx, rx) = chatter_rpc::stream::channel::<u64>(4);
        let start = Instant::now();
        let err = streams.sum(rx).await.expect_err("no grant");
        assert!(matches!(err, CallError::DeadlineExceeded), "{err:?}");
        assert!(start.elapsed() < Duration::from_millis(1100));
    })
    .await
    .expect("no hang");
}

// chatter-rpc "Streams": items before the stream opened (no `[0, nil]` first) are not a
// stream: the call fails with a protocol error at once, the connection lives.
#[tokio::test(start_paused = true)]
async fn items_before_the_stream_opened_fail_the_call() {
    guard(async {
        let (peer, calc, mut s) = connected(4096, 8192).await;
        let streams = StreamsClient::new(&peer, "calc");
        let opened = tokio::spawn(async move { streams.count(1).await.map(|_| ()) });
        let c = s.message().await;
        let item = s.msg(Some(c.id()), 0, &V::Arr(vec![int(3), int(0)]));
        s.write(&item).await;
        let err = opened.await.unwrap().expect_err("not opened");
        assert!(matches!(&err, CallError::Protocol(_)), "{err:?}");
        // The client gives the call up and cancels it; the server ends it.
        let cancel = s.message().await;
        assert_eq!(
            cancel.envelope(),
            V::Arr(vec![int(2), V::Int(c.id() as i128)])
        );
        let end = s.msg(Some(c.id()), TOKEN | LAST, &V::Arr(vec![int(4)]));
        s.write(&end).await;
        let call = tokio::spawn(async move { calc.add(1, 1).await });
        let (c, _) = s.call("add").await;
        let r = s.reply(&c, V::Arr(vec![int(0), int(2)]));
        s.write(&r).await;
        assert_eq!(call.await.unwrap().unwrap(), 2);
        assert!(!peer.connection().unwrap().is_closed());
    })
    .await
    .expect("no hang");
}

// chatter-rpc "Streams", Credit: the client returns the connection's credit for stream
// items once they are in the stream's buffer, so a server that honours the client's small
// connection window can fill an unread stream's (larger) window and still answer calls.
#[tokio::test(start_paused = true)]
async fn an_unread_result_stream_stalls_only_itself() {
    guard(async {
        let (listener, address) = bind().await;
        let options = Options::default().max_frame_size(4096).receive_window(8192);
        let client = tokio::spawn(async move { connect(address, options).await });
        let mut s = Stranger::accept(&listener).await;
        s.client_hello().await;
        s.write(&hello(4096, 65536)).await;
        let conn = client.await.unwrap().expect("connect");
        let peer = Peer::with_options(conn, PeerOptions::default().stream_window(64 * 1024));
        let streams = StreamsClient::new(&peer, "calc");
        let (opened_tx, opened_rx) = tokio::sync::oneshot::channel();
        let reader = tokio::spawn(async move {
            let rx = streams.count(50).await.expect("opens");
            let _ = opened_tx.send(());
            // Never reads: holds the receiver until the test ends.
            std::future::pending::<()>().await;
            drop(rx);
        });
        let c = s.message().await;
        let mut credit = 8192u64; // the client's connection window, from its hello
        let open = s.msg(Some(c.id()), 0, &V::Arr(vec![int(0), V::Nil]));
        credit -= open.len() as u64 - 4 + 64;
        s.write(&open).await;
        opened_rx.await.unwrap();
        let mut sent = 0;
        while sent < 50 {
            // 1000-byte items (bin, not the u64 `count` declares: items are decoded when
            // read, and this reader never reads).
            let m = s.msg(
                Some(c.id()),
                0,
                &V::Arr(vec![int(3), V::Bin(vec![sent as u8; 1000])]),
            );
            let m_cost = m.len() as u64 - 4 + 64;
            if m_cost <= credit {
                credit -= m_cost;
                s.write(&m).await;
                sent += 1;
                continue;
            }
            s.next_id -= 1;
            let f = s.read().await.expect("a window frame");
            match f.kind() {
                4 => credit += f.header[1].uint(),
                2 => s.write(&frame(&[int(3)], &[])).await,
                _ => panic!("{f:?}"),
            }
        }
        // The reader has read nothing; a call still gets through both ways.
        let calc = CalcClient::new(&peer, "calc");
        let call = tokio::spawn(async move { calc.add(20, 22).await });
        loop {
            let f = s.read().await.expect("frames");
            match f.kind() {
                4 => credit += f.header[1].uint(),
                1 => {
                    let r = s.reply(&f, V::Arr(vec![int(0), int(42)]));
                    assert!(r.len() as u64 - 4 + 64 <= credit, "credit for the reply");
                    s.write(&r).await;
                    break;
                }
                2 => s.write(&frame(&[int(3)], &[])).await,
                _ => panic!("{f:?}"),
            }
        }
        assert_eq!(call.await.unwrap().unwrap(), 42);
        reader.abort();
    })
    .await
    .expect("no hang");
}

// chatter-rpc "Reliable signals": the server's ack statuses reach the sender: 1 expired,
// 2 failed, an unknown status as failed; an ack for an unknown stream is ignored.
#[tokio::test(start_paused = true)]
async fn reliable_signal_acks_of_each_status_reach_the_sender() {
    guard(async {
        use chatter_rpc::AckError;
        let (listener, address) = bind().await;
        let peer = Peer::reconnecting(
            address.as_str(),
            Options::default(),
            PeerOptions::default(),
            chatter_rpc::ReconnectOptions::default(),
        )
        .expect("reconnecting");
        let calc = CalcClient::new(&peer, "calc");
        let mut s = Stranger::accept(&listener).await;
        s.client_hello().await;
        s.write(&hello(4096, 8192)).await;
        for status in [1u64, 2, 9] {
            let sent = calc.note(status).await.expect("queued");
            let f = s.message().await;
            let e = f.envelope();
            let (stream, seq) = (e.arr()[1].uint(), e.arr()[2].uint());
            let stray = s.msg(
                None,
                OWNER | TOKEN | LAST,
                &V::Arr(vec![
                    int(4),
                    V::Int((stream ^ 1) as i128),
                    V::Int(seq as i128),
                    int(0),
                ]),
            );
            let ack = s.msg(
                None,
                OWNER | TOKEN | LAST,
                &V::Arr(vec![
                    int(4),
                    V::Int(stream as i128),
                    V::Int(seq as i128),
                    V::Int(status as i128),
                ]),
            );
            let mut out = stray;
            out.extend(ack);
            s.write(&out).await;
            let got = sent.acknowledged(Duration::from_secs(10)).await;
            let ok = matches!(
                (status, &got),
                (1, Err(AckError::Expired { .. })) | (2 | 9, Err(AckError::Failed))
            );
            assert!(ok, "status {status}: {got:?}");
        }
    })
    .await
    .expect("no hang");
}

// chatter-core §10: the client closing towards a server that stopped reading finishes
// within the close linger (2 s; `Peer::close` adds at most 5 s for handlers, none here),
// and every caller fails.
#[tokio::test(start_paused = true)]
async fn closing_towards_a_server_that_stopped_reading_ends_within_the_linger() {
    guard(async {
        let (peer, calc, s) = connected(4 << 20, 64 << 20).await;
        let calls: Vec<_> = (0..32)
            .map(|_| {
                let calc = calc.clone();
                tokio::spawn(async move { calc.echo("x".repeat(1 << 20)).await })
            })
            .collect();
        // Until the client's output backs up (the kernel's buffers are full).
        let conn = peer.connection().unwrap();
        while conn.buffered().output < 512 * 1024 {
            tokio::task::yield_now().await;
        }
        let start = Instant::now();
        peer.close().await;
        assert!(
            start.elapsed() <= Duration::from_secs(7),
            "{:?}",
            start.elapsed()
        );
        for call in calls {
            let err = call.await.unwrap().expect_err("closed");
            assert!(matches!(&err, CallError::ConnectionLost(_)), "{err:?}");
        }
        drop(s);
    })
    .await
    .expect("no hang");
}
