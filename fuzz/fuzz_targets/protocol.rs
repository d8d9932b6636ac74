//! The sans-IO protocol core: arbitrary bytes from "the peer", cut into arbitrary chunks,
//! fed to a `Protocol`, with timers, flow-control releases and our own sends in between.
//!
//! Input: a control byte, a seed byte, then the peer's bytes.
//! - control bit 0: a valid hello goes before the peer's bytes, so the fuzzer spends its
//!   time on the open state (without it, the handshake itself is fuzzed);
//! - bit 1: time advances between chunks (0 to 32 s) and `handle_timeout` runs;
//! - bit 2: each received message's credit is released once it was taken;
//! - bit 3: this side sends too: it answers messages that pass it the turn, and opens a
//!   conversation (some with a timeout) after each chunk;
//! - bit 4: this side closes the connection at the end.
//! - The seed picks the chunk sizes (0: one chunk).
//!
//! Invariants checked, beyond "no panic":
//! - after `handle_input`, what is left of the input is one incomplete frame (or nothing,
//!   once closed);
//! - once closed, it stays closed, reports exactly one `Closed` event, nothing after it,
//!   no deadline, and writes nothing more;
//! - `Connected` comes at most once, and before any message;
//! - everything written is well-formed frames: our hello first, at most one close, last;
//! - output stays within 2 × input + 2 KiB + 64 bytes per timer run, release and send;
//! - without time, releases or sends, how the input is cut changes nothing: the same
//!   events, and the same frames written (close reasons aside: a stranger's close quotes the
//!   first bytes it had received when it closed).

#![no_main]

use std::mem::discriminant;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use chatter_core::proto::frame::{decode_frame, Frame, Hello, LENGTH_PREFIX};
use chatter_core::proto::{Config, Event, Message, Protocol, SendArgs};
use chatter_core::{CloseCause, CloseCode, ProtocolError};
use libfuzzer_sys::fuzz_target;

const HELLO_FIRST: u8 = 1 << 0;
const TIME: u8 = 1 << 1;
const RELEASE: u8 = 1 << 2;
const SEND: u8 = 1 << 3;
const CLOSE: u8 = 1 << 4;

/// Output allowed on top of twice the input: our hello and one close frame (its reason is
/// cut to 1 KiB).
const OUTPUT_SLACK: usize = 2048;
/// Output allowed per timer run (a ping), release (a window frame) and send (a message
/// with a 1-byte payload).
const OUTPUT_PER_ACTION: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&[control, seed], peer)) = data.split_first_chunk::<2>() else {
        return;
    };
    let mut wire = Vec::new();
    if control & HELLO_FIRST != 0 {
        let config = Config::default();
        let mut hello = BytesMut::new();
        Frame::Hello(Hello {
            max_frame_size: config.max_frame_size,
            receive_window: config.receive_window,
        })
        .encode(&mut hello);
        wire.extend_from_slice(&hello);
    }
    wire.extend_from_slice(peer);

    let cut = run(&wire, control, seed);
    if control & (TIME | RELEASE | SEND) == 0 && seed != 0 {
        let whole = run(&wire, control, 0);
        assert_eq!(
            cut.events, whole.events,
            "events depend on how the input is cut"
        );
        // Pongs are coalesced: one answers the pings of everything handed out before it,
        // so how many go out depends on when output is taken, and one still owed when a
        // protocol error closes the connection is dropped. Everything else must match.
        let no_pongs = |frames: &[Frame]| -> Vec<Frame> {
            frames
                .iter()
                .filter(|f| !matches!(f, Frame::Pong))
                .cloned()
                .collect()
        };
        assert_eq!(
            no_pongs(&cut.frames),
            no_pongs(&whole.frames),
            "output depends on how the input is cut"
        );
    }
});

/// What a run produced, in a form two runs can be compared by.
struct Trace {
    events: Vec<String>,
    frames: Vec<Frame>,
}

fn run(wire: &[u8], control: u8, seed: u8) -> Trace {
    let start = Instant::now();
    let mut now = start;
    let mut rng = Rng::new(seed);
    let mut p = Protocol::new(Config::default(), now);
    let mut obs = Observer::default();
    let mut actions = 0;
    let mut rest = wire;
    let mut buf = BytesMut::new();

    obs.step(&mut p);
    while !rest.is_empty() {
        let n = if seed == 0 {
            rest.len()
        } else {
            rng.chunk().min(rest.len())
        };
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        buf.extend_from_slice(chunk);
        obs.fed += chunk.len();

        p.handle_input(now, &mut buf);
        check_leftover(&p, &buf);
        let taken = obs.step(&mut p);

        if control & RELEASE != 0 {
            for cost in taken.iter().map(|m| m.cost) {
                p.release(cost);
                actions += 1;
            }
        }
        if control & SEND != 0 {
            for m in taken.iter().filter(|m| m.token && !m.last) {
                let args = SendArgs {
                    conversation: Some(m.conversation),
                    last: rng.bit(),
                    token: rng.bit(),
                    timeout: None,
                };
                let _ = p.send(now, args, b"\xc0");
                actions += 1;
            }
            let args = SendArgs {
                conversation: None,
                last: false,
                token: true,
                timeout: rng.bit().then(|| Duration::from_millis(rng.below(5_000))),
            };
            let _ = p.send(now, args, b"\xc0");
            actions += 1;
        }
        if control & TIME != 0 {
            now += Duration::from_millis(rng.below(32_000));
            p.handle_timeout(now);
            actions += 1;
        }
        obs.step(&mut p);
    }
    if control & CLOSE != 0 {
        p.close(CloseCode::Normal, "fuzz");
        assert!(p.is_closed(), "close() did not close");
    }
    obs.step(&mut p);
    if p.is_closed() {
        assert!(obs.closed, "closed without a Closed event");
    }
    let limit = 2 * obs.fed + OUTPUT_SLACK + OUTPUT_PER_ACTION * actions;
    assert!(
        obs.written.len() <= limit,
        "{} bytes written for {} read and {actions} actions",
        obs.written.len(),
        obs.fed
    );
    Trace {
        events: obs.events,
        frames: check_output(&obs.written),
    }
}

/// Watches a protocol between steps and keeps what it reported.
#[derive(Default)]
struct Observer {
    fed: usize,
    written: Vec<u8>,
    /// Output length when the close was seen, after which nothing may be written.
    written_at_close: Option<usize>,
    events: Vec<String>,
    connected: bool,
    closed: bool,
}

impl Observer {
    /// Checks the state, takes output and events; returns the messages taken.
    fn step(&mut self, p: &mut Protocol) -> Vec<Message> {
        assert!(!(p.is_open() && p.is_closed()), "open and closed at once");
        if self.closed {
            assert!(p.is_closed(), "reopened after a Closed event");
        }
        if p.is_closed() {
            assert!(p.poll_timeout().is_none(), "a deadline after the close");
        }

        let mut out = BytesMut::new();
        p.take_output(&mut out);
        assert!(!p.has_output(), "output left after take_output");
        if let Some(at) = self.written_at_close {
            assert!(
                out.is_empty(),
                "{} bytes written after the close was seen",
                out.len()
            );
            assert_eq!(at, self.written.len());
        }
        self.written.extend_from_slice(&out);
        if p.is_closed() {
            self.written_at_close = Some(self.written.len());
        }

        let mut taken = Vec::new();
        while let Some(event) = p.poll_event() {
            assert!(!self.closed, "{event:?} after the Closed event");
            self.events.push(describe(&event));
            match event {
                Event::Connected(_) => {
                    assert!(!self.connected, "connected twice");
                    self.connected = true;
                }
                Event::Message(m) => {
                    assert!(self.connected, "a message before the handshake");
                    taken.push(m);
                }
                Event::Closed(_) => {
                    assert!(p.is_closed(), "a Closed event while not closed");
                    self.closed = true;
                }
                _ => {}
            }
        }
        taken
    }
}

/// After `handle_input`: nothing left once closed, else at most one incomplete frame.
fn check_leftover(p: &Protocol, buf: &BytesMut) {
    if p.is_closed() {
        assert!(buf.is_empty(), "{} bytes kept after the close", buf.len());
        return;
    }
    if let Some(prefix) = buf.first_chunk::<LENGTH_PREFIX>() {
        let len = u32::from_be_bytes(*prefix) as usize;
        assert!(
            buf.len() < LENGTH_PREFIX + len,
            "a complete frame of {len} bytes was left unread"
        );
    }
}

/// Splits what the protocol wrote into frames, checking that it is well-formed: our hello
/// first, frames that decode, at most one close and nothing after it. Close reasons are
/// blanked for the comparison of two runs.
fn check_output(written: &[u8]) -> Vec<Frame> {
    let mut buf = BytesMut::from(written);
    let mut frames = Vec::new();
    while !buf.is_empty() {
        let body = match decode_frame(&mut buf, u32::MAX) {
            Ok(Some(body)) => body,
            other => panic!("written bytes end in a partial frame: {other:?}"),
        };
        let frame = match Frame::decode(body) {
            Ok(frame) => frame,
            Err(e) => panic!("wrote a frame that does not decode: {e}"),
        };
        assert!(
            !matches!(frames.last(), Some(Frame::Close(..))),
            "{frame:?} written after a close"
        );
        if frames.is_empty() {
            assert!(
                matches!(frame, Frame::Hello(_)),
                "first frame {frame:?} is not a hello"
            );
        }
        frames.push(match frame {
            Frame::Close(code, _) => Frame::Close(code, String::new()),
            other => other,
        });
    }
    frames
}

/// An event as a string, equal for two runs that differ only in how the input was cut.
fn describe(event: &Event) -> String {
    match event {
        Event::Closed(CloseCause::Protocol(e @ ProtocolError::NotChatter { .. })) => {
            format!("Closed(Protocol({:?}))", discriminant(e))
        }
        other => format!("{other:?}"),
    }
}

/// xorshift: chunk sizes and choices from one seed byte, the same on every run.
struct Rng(u32);

impl Rng {
    fn new(seed: u8) -> Self {
        Rng(0x9e37_79b9 ^ ((u32::from(seed) << 8) | u32::from(seed)))
    }

    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }

    /// Mostly small chunks, to cut inside length prefixes and headers, sometimes large.
    fn chunk(&mut self) -> usize {
        let r = self.next();
        if r & 7 == 0 {
            (r >> 3) as usize % 4096 + 1
        } else {
            (r >> 3) as usize % 24 + 1
        }
    }

    fn bit(&mut self) -> bool {
        self.next() & 1 == 1
    }

    fn below(&mut self, n: u64) -> u64 {
        u64::from(self.next()) % n
    }
}
