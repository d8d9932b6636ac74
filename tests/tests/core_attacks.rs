//! Hostile peers against a real chatter-core server: what an attacker with a raw TCP socket
//! can make a connection hold, and how long it can hold it.
//!
//! Each attack asserts three things:
//!
//! 1. the server drops the attacker within the documented time (keepalive interval +
//!    timeout + close linger, the close linger, the refusal timeout, …), and
//!    [`Server::connections`] falls back;
//! 2. the attacker's connection ([`Connection::buffered`] of the server's end) stays within
//!    the bound documented on [`Buffered`], computed from the options of the test;
//! 3. a well-behaved client is served meanwhile (a request/reply round trip).
//!
//! The tests run on tokio's paused clock: time advances only when every task waits, and
//! loopback I/O within one runtime is effectively immediate, so the elapsed (virtual) times
//! are exact and the tests are fast. One caveat: when the runtime parks with only I/O ready,
//! tokio still moves the paused clock to the next timer, so a test keeps a 1 ms timer
//! running ([`watch`]) while it measures, and the figures are exact to a millisecond or
//! two. Filling the kernel's socket buffers takes real time, but does not depend on the
//! clock; [`HANG_GUARD`] only stops a hung test.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chatter_core::proto::frame::{Frame, Hello, MessageHeader, FLAG_LAST, FLAG_OWNER};
use chatter_core::{
    connect, listen, Address, Buffered, CloseCause, CloseCode, ConnectError, Connection, Options,
    ProtocolError, SendOptions, Server,
};
use tests::{assert_delivers, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

/// What the server application sends to an attacker in the tests where it sends.
const MESSAGE: usize = 64 * 1024;

/// The driver's read chunk (`READ_CHUNK` in chatter-core/src/connection.rs): the read
/// buffer of a connection that receives small frames.
const READ_CHUNK: usize = 16 * 1024;

/// The room a connection makes at once for a large frame whose length prefix arrived
/// (`LARGE_FRAME_START` in chatter-core/src/connection.rs); beyond it, twice what arrived.
const LARGE_FRAME_START: usize = 64 * 1024;

/// The ping flood of attack 2: about 1.4 million pings. (64 MiB takes 15 s of real time in
/// a debug build, for the same figures.)
const PING_FLOOD: usize = 8 << 20;

/// A hang guard only: every test finishes in far less virtual time than this. On the paused
/// clock it fires as soon as a hung test leaves every task waiting.
const HANG_GUARD: Duration = Duration::from_secs(600);

// Attack 1: a peer that handshakes, floods messages and pings, never reads, while the
// server application sends to it.
#[tokio::test(start_paused = true)]
async fn non_reading_flooder_is_cut_off_by_keepalive_and_its_output_stays_bounded() {
    timeout(HANG_GUARD, async {
        let limits = Limits::default().short_keepalive();
        let server = limits.listen().await;
        let mut attacker = handshake(&server, Hello { max_frame_size: 1 << 30, receive_window: 1 << 30 }).await;
        let victim = accept_from(&server, &attacker).await;
        let peak = watch(&victim);
        let app = send_until_closed(&victim, MESSAGE);

        // As many messages as the server's receive window takes, then 1 MiB of pings.
        let mut flood = BytesMut::new();
        let per_message = MESSAGE as u64 + 64 + 16;
        for id in 1..=u64::from(limits.receive_window) / per_message {
            message(id, &[7; MESSAGE]).encode(&mut flood);
        }
        while flood.len() < 5 * (1 << 20) {
            Frame::Ping.encode(&mut flood);
        }
        attacker.write_all(&flood).await.expect("the server reads everything");
        let quiet = Instant::now();

        assert_served(&server).await;

        let cause = victim.closed().await;
        assert!(matches!(cause, CloseCause::KeepaliveTimeout), "{cause:?}");
        wait_until(|| server.connections() == 0).await;
        let cut_off = quiet.elapsed();
        let (sent, app_peak) = app.await.expect("app");
        let peak = max(peak.await.expect("watch"), app_peak);
        eprintln!("attack 1: {sent} messages of {MESSAGE} B sent, cut off after {cut_off:?}, peak {peak:?}");

        assert!(cut_off <= limits.keepalive_cut_off(), "cut off after {cut_off:?}");
        limits.assert_within(peak, MESSAGE);
        assert!(peak.output >= limits.send_buffer as usize, "the attack never filled the output: {peak:?}");
        assert!(peak.received > 0, "the flood never reached the server: {peak:?}");
    })
    .await
    .expect("hang guard");
}

// Attack 1, continued: the same peer keeps sending a ping now and then, so keepalive (which
// counts any arriving byte as a sign of life) never fires.
#[tokio::test(start_paused = true)]
async fn non_reader_that_keeps_pinging_is_cut_off() {
    timeout(HANG_GUARD, async {
        let limits = Limits::default().short_keepalive();
        let server = limits.listen().await;
        let mut attacker = handshake(&server, Hello { max_frame_size: 1 << 30, receive_window: 1 << 30 }).await;
        let victim = accept_from(&server, &attacker).await;
        let peak = watch(&victim);
        let app = send_until_closed(&victim, MESSAGE);
        wait_until(|| victim.buffered().output >= limits.send_buffer as usize).await;
        let stalled = Instant::now();
        assert_served(&server).await;

        let mut ping = BytesMut::new();
        Frame::Ping.encode(&mut ping);
        let give_up = stalled + 10 * limits.keepalive_cut_off();
        while !victim.is_closed() && Instant::now() < give_up {
            if attacker.write_all(&ping).await.is_err() {
                break;
            }
            sleep(Duration::from_millis(500)).await;
        }
        let held = stalled.elapsed();
        let cause = victim.close_cause();
        let peak = peak.await.expect("watch");
        eprintln!("attack 1b: output stalled, pinged every 500 ms: {cause:?} after {held:?}, peak {peak:?}");
        limits.assert_within(peak, MESSAGE);
        assert!(cause.is_some(), "still open {held:?} after its output stalled");
        assert!(held <= limits.keepalive_cut_off(), "held {held:?}");
        drop(app);
    })
    .await
    .expect("hang guard");
}

// Attack 2: a ping flood from a peer that never reads.
#[tokio::test(start_paused = true)]
async fn ping_flood_from_a_non_reader_holds_one_pong_and_others_are_served() {
    timeout(HANG_GUARD, async {
        let limits = Limits::default().short_keepalive();
        let server = limits.listen().await;
        let mut attacker = handshake(&server, Hello { max_frame_size: 1 << 20, receive_window: 1 << 20 }).await;
        let victim = accept_from(&server, &attacker).await;
        let peak = watch(&victim);

        let mut pings = BytesMut::new();
        while pings.len() < PING_FLOOD {
            Frame::Ping.encode(&mut pings);
        }
        let flooding = Arc::new(AtomicBool::new(true));
        let served = tokio::spawn({
            let addr = server.addresses()[0].clone();
            let flooding = flooding.clone();
            async move {
                let client = connect(&addr, Options::default()).await.expect("connect");
                (client, flooding.load(Ordering::SeqCst))
            }
        });
        let start = std::time::Instant::now();
        attacker.write_all(&pings).await.expect("the server reads everything");
        flooding.store(false, Ordering::SeqCst);
        let flood_time = start.elapsed();
        let quiet = Instant::now();
        let (client, during_flood) = served.await.expect("client");
        let accepted = server.accept().await.expect("accept");
        assert_delivers(&client, &accepted, "request").await;
        assert_delivers(&accepted, &client, "reply").await;

        victim.closed().await;
        wait_until(|| server.connections() == 1).await;
        let cut_off = quiet.elapsed();
        let peak = peak.await.expect("watch");
        eprintln!(
            "attack 2: {} MiB of pings in {flood_time:?} (real), a client connected during the flood: {during_flood}, cut off {cut_off:?} after, peak {peak:?}",
            pings.len() >> 20
        );
        assert!(during_flood, "the well-behaved client connected only after the flood");
        // One pong (6 bytes), a window frame and the close frame at most: no message.
        assert!(peak.output <= 64, "{peak:?}");
        limits.assert_within(peak, 0);
        assert!(cut_off <= limits.keepalive_cut_off(), "cut off after {cut_off:?}");
    })
    .await
    .expect("hang guard");
}

// Attack 3: a hello announcing the largest window and frame size, then silence, while the
// server application sends as fast as it can.
#[tokio::test(start_paused = true)]
async fn huge_announced_window_does_not_grow_the_output_past_send_buffer() {
    timeout(HANG_GUARD, async {
        let limits = Limits::default().short_keepalive();
        let server = limits.listen().await;
        let attacker = handshake(
            &server,
            Hello {
                max_frame_size: u32::MAX,
                receive_window: u32::MAX,
            },
        )
        .await;
        let quiet = Instant::now();
        let victim = accept_from(&server, &attacker).await;
        let peak = watch(&victim);
        let large = 4 * MESSAGE;
        let app = send_until_closed(&victim, large);

        assert_served(&server).await;

        let cause = victim.closed().await;
        assert!(matches!(cause, CloseCause::KeepaliveTimeout), "{cause:?}");
        wait_until(|| server.connections() == 0).await;
        let cut_off = quiet.elapsed();
        let (sent, app_peak) = app.await.expect("app");
        let peak = max(peak.await.expect("watch"), app_peak);
        eprintln!(
            "attack 3: {sent} messages of {large} B sent, cut off after {cut_off:?}, peak {peak:?}"
        );
        limits.assert_within(peak, large);
        assert!(peak.output >= limits.send_buffer as usize, "{peak:?}");
        assert!(
            cut_off <= limits.keepalive_cut_off(),
            "cut off after {cut_off:?}"
        );
        drop(attacker);
    })
    .await
    .expect("hang guard");
}

// Attack 4: a length prefix announcing a frame of max_frame_size, then a few bytes at a time.
#[tokio::test(start_paused = true)]
async fn announced_large_frame_dripped_slowly_holds_only_what_arrived() {
    timeout(HANG_GUARD, async {
        let limits = Limits::default().short_keepalive();
        let server = limits.listen().await;
        let mut attacker = handshake(&server, Hello { max_frame_size: 1 << 20, receive_window: 1 << 20 }).await;
        let victim = accept_from(&server, &attacker).await;
        let peak = watch(&victim);

        attacker
            .write_all(&limits.max_frame_size.to_be_bytes())
            .await
            .expect("write");
        let mut header = BytesMut::new();
        message(1, &[]).encode(&mut header);
        let mut sent = header.len() - 4;
        attacker.write_all(&header[4..]).await.expect("write");
        let mut peak_read = 0;
        let mut growth = Vec::new();
        // 48 KiB, 1 KiB every 100 ms: each piece is a sign of life for keepalive.
        let mut last_byte = Instant::now();
        for _ in 0..48 {
            attacker.write_all(&[0; 1024]).await.expect("write");
            last_byte = Instant::now();
            sent += 1024;
            sleep(Duration::from_millis(100)).await;
            let read = victim.buffered().read;
            peak_read = peak_read.max(read);
            growth.push((sent, read));
            // The buffer grows (at most doubling) with what arrived, from one read chunk.
            assert!(read <= (2 * sent).max(LARGE_FRAME_START) + READ_CHUNK, "read buffer {read} B after {sent} B of the frame");
        }
        assert_served(&server).await;
        assert!(!victim.is_closed(), "a slow frame is no protocol error");

        let cause = victim.closed().await;
        assert!(matches!(cause, CloseCause::KeepaliveTimeout), "{cause:?}");
        wait_until(|| server.connections() == 0).await;
        // Measured from the attacker's last write. When the runtime parks with only I/O
        // ready, the paused clock still jumps to the next timer: without `watch`'s 1 ms
        // timer the server saw pieces up to one 100 ms pacing step late (2.3 s here).
        let cut_off = last_byte.elapsed();
        eprintln!(
            "attack 4: {sent} B of a {} B frame, peak read buffer {peak_read} B, cut off {cut_off:?} after the last byte; (sent, read buffer): {growth:?}",
            limits.max_frame_size
        );
        let peak = peak.await.expect("watch");
        assert!(peak.read <= (2 * sent).max(LARGE_FRAME_START) + READ_CHUNK, "{peak:?}");
        limits.assert_within(peak, 0);
        assert!(cut_off <= limits.keepalive_cut_off(), "cut off after {cut_off:?}");
    })
    .await
    .expect("hang guard");
}

// Attack 5: more connections than max_connections.
#[tokio::test(start_paused = true)]
async fn connections_beyond_the_limit_are_refused_with_busy_until_some_close() {
    timeout(HANG_GUARD, async {
        const LIMIT: usize = 4;
        let limits = Limits { max_connections: LIMIT, ..Limits::default() };
        let server = limits.listen().await;
        let addr = server.addresses()[0].clone();

        // Two handshake (the server application keeps their connections), two never say
        // anything (they hold a slot for the handshake timeout).
        let opened = Instant::now();
        let mut handshaken = Vec::new();
        let mut accepted = Vec::new();
        for _ in 0..2 {
            let attacker = handshake(&server, Hello { max_frame_size: 1 << 20, receive_window: 1 << 20 }).await;
            accepted.push(accept_from(&server, &attacker).await);
            handshaken.push(attacker);
        }
        let mut silent = Vec::new();
        for _ in 0..2 {
            silent.push(TcpStream::connect(socket_addr(&server)).await.expect("connect"));
        }
        wait_until(|| server.connections() == LIMIT).await;

        let start = Instant::now();
        let mut refused = TcpStream::connect(socket_addr(&server)).await.expect("the kernel accepts");
        let bytes = read_to_end(&mut refused).await;
        let dropped_after = start.elapsed();
        let expected = format!("server at its connection limit of {LIMIT} connections; try again later");
        assert_eq!(frames(&bytes), [Frame::Close(CloseCode::Busy, expected.clone())]);
        assert_eq!(bytes[5..7], [0x05, 0x04], "close frame, wire code 4");
        assert_eq!(server.refused(), 1);
        assert_eq!(server.connections(), LIMIT);

        match connect(&addr, Options::default()).await {
            Err(ConnectError::Handshake { cause: CloseCause::Peer { code: CloseCode::Busy, reason }, .. }) => {
                assert_eq!(reason, expected);
            }
            other => panic!("a client beyond the limit got {other:?}"),
        }
        assert_eq!(server.refused(), 2);

        // One attacker that handshook and one that never did go away: two more fit.
        let start = Instant::now();
        drop(handshaken.remove(0));
        drop(silent.remove(0));
        wait_until(|| server.connections() == LIMIT - 2).await;
        let released_after = start.elapsed();
        assert!(accepted[0].is_closed());
        let mut clients = Vec::new();
        for _ in 0..2 {
            let client = connect(&addr, Options::default()).await.expect("room again");
            let served = server.accept().await.expect("accept");
            assert_delivers(&client, &served, "request").await;
            assert_delivers(&served, &client, "reply").await;
            clients.push((client, served));
        }
        assert_eq!(server.connections(), LIMIT);
        assert_eq!(server.refused(), 2);

        // The silent one is dropped at its handshake timeout; it does not hang up, so the
        // close linger runs out too.
        let left = server.next_rejection().await.expect("rejection");
        assert!(matches!(left.cause, CloseCause::Io(_)), "the silent one that left: {left:?}");
        let timed_out = server.next_rejection().await.expect("rejection");
        assert!(
            matches!(timed_out.cause, CloseCause::Protocol(ProtocolError::HandshakeTimeout)),
            "{timed_out:?}"
        );
        wait_until(|| server.connections() == LIMIT - 1).await;
        let silent_held = opened.elapsed();
        eprintln!(
            "attack 5: refused peer dropped after {dropped_after:?}, slots released {released_after:?} after the peers left, a silent peer held its slot {silent_held:?}"
        );
        assert!(dropped_after <= Duration::from_secs(1), "refusal timeout");
        assert!(released_after <= SLACK, "{released_after:?}");
        assert!(silent_held <= limits.handshake_timeout + limits.close_linger + SLACK, "{silent_held:?}");
        drop((handshaken, silent, clients));
    })
    .await
    .expect("hang guard");
}

// Attack 5, with `tcp_defer_accept` (Linux): peers that connect and say nothing stay in the
// kernel and take no slot, so those that speak are served.
#[cfg(target_os = "linux")]
#[tokio::test(start_paused = true)]
async fn with_defer_accept_silent_peers_take_no_slot() {
    timeout(HANG_GUARD, async {
        const LIMIT: usize = 2;
        let limits = Limits {
            max_connections: LIMIT,
            ..Limits::default()
        };
        let server = listen("tcp://127.0.0.1:0", limits.options().tcp_defer_accept(true))
            .await
            .expect("listen");
        let addr = server.addresses()[0].clone();
        let mut silent = Vec::new();
        for _ in 0..LIMIT + 1 {
            silent.push(
                TcpStream::connect(socket_addr(&server))
                    .await
                    .expect("connect"),
            );
        }
        // Without the option the three would hold both slots and the third be refused; the
        // clients below would be refused too.
        let mut clients = Vec::new();
        for _ in 0..LIMIT {
            let client = connect(&addr, Options::default()).await.expect("a slot");
            let served = server.accept().await.expect("accept");
            assert_delivers(&client, &served, "request").await;
            clients.push((client, served));
        }
        assert_eq!(server.connections(), LIMIT);
        assert_eq!(server.refused(), 0);

        // One byte is enough for the kernel to hand a connection over: at the limit, it is
        // refused with busy.
        let mut speaking = silent.pop().expect("one");
        speaking.write_all(&[0]).await.expect("write");
        let bytes = read_to_end(&mut speaking).await;
        assert!(
            matches!(frames(&bytes)[..], [Frame::Close(CloseCode::Busy, _)]),
            "{bytes:?}"
        );
        assert_eq!(server.refused(), 1);
        drop((silent, clients));
    })
    .await
    .expect("hang guard");
}

// A peer that reads the server's close but keeps its own side open holds nothing: once the
// close frame and the FIN are out and nothing waits to be read, the server closes the
// socket without waiting for the peer's end of stream (PROTOCOL.md §10) or the linger.
#[tokio::test(start_paused = true)]
async fn a_closing_side_does_not_wait_for_the_peers_end_of_stream() {
    timeout(HANG_GUARD, async {
        let limits = Limits::default();
        let server = limits.listen().await;
        let mut peer = handshake(
            &server,
            Hello {
                max_frame_size: 1 << 20,
                receive_window: 1 << 20,
            },
        )
        .await;
        let conn = accept_from(&server, &peer).await;
        let start = Instant::now();
        conn.close().await;
        // The hello, then the close frame, then the end of stream: no reset.
        let bytes = read_to_end(&mut peer).await;
        let frames = frames(&bytes);
        assert!(
            matches!(
                frames[..],
                [Frame::Hello(_), Frame::Close(CloseCode::Normal, _)]
            ),
            "{frames:?}"
        );
        wait_until(|| server.connections() == 0).await;
        let released = start.elapsed();
        assert!(
            released < limits.close_linger,
            "held {released:?} for a peer that keeps its side open"
        );
        // The peer's side is still open: it may still write (into the void) without harm.
        let _ = peer.write_all(b"late").await;
        drop(peer);
    })
    .await
    .expect("hang guard");
}

// ... unless what it sent is still in its kernel, unsent (a peer that does not read): then
// it waits out the linger and resets, so that the kernel does not keep the bytes either.
#[tokio::test(start_paused = true)]
async fn a_closing_side_with_output_its_kernel_could_not_send_waits_the_linger_then_resets() {
    timeout(HANG_GUARD, async {
        let limits = Limits::default();
        let server = limits.listen().await;
        // A peer with a small receive buffer that reads nothing after the hello.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let mut peer = socket.connect(socket_addr(&server)).await.expect("connect");
        let mut hello = BytesMut::new();
        Frame::Hello(Hello {
            max_frame_size: 1 << 20,
            receive_window: 1 << 20,
        })
        .encode(&mut hello);
        peer.write_all(&hello).await.expect("hello");
        let conn = accept_from(&server, &peer).await;
        // More than the peer's window, less than the server's kernel takes at once: all of
        // it leaves chatter's buffers, part of it stays unsent in the kernel.
        conn.send_bytes(&[1u8; 12 * 1024], SendOptions::new())
            .await
            .expect("send");
        wait_until(|| conn.buffered().output == 0).await;
        let start = Instant::now();
        conn.close().await;
        wait_until(|| server.connections() == 0).await;
        let released = start.elapsed();
        assert!(
            released >= limits.close_linger,
            "let go after {released:?}, leaving unsent bytes to the kernel"
        );
        assert!(released <= limits.close_linger + SLACK, "{released:?}");
        // The peer reads what was sent, then learns of the reset: the rest was dropped.
        let mut buf = vec![0u8; 64 * 1024];
        let end = loop {
            match peer.read(&mut buf).await {
                Ok(0) => break None,
                Ok(_) => {}
                Err(e) => break Some(e.kind()),
            }
        };
        assert_eq!(end, Some(std::io::ErrorKind::ConnectionReset));
    })
    .await
    .expect("hang guard");
}

// Attack 6: the server closes a connection whose peer never reads and has MiBs queued.
#[tokio::test(start_paused = true)]
async fn close_with_unflushed_output_finishes_within_close_linger() {
    timeout(HANG_GUARD, async {
        let limits = Limits::default();
        let server = limits.listen().await;
        let mut attacker = handshake(&server, Hello { max_frame_size: 1 << 30, receive_window: 1 << 30 }).await;
        let victim = accept_from(&server, &attacker).await;
        let peak = watch(&victim);
        let app = send_until_closed(&victim, MESSAGE);
        wait_until(|| victim.buffered().output >= limits.send_buffer as usize).await;
        assert_served(&server).await;

        let start = Instant::now();
        victim.close().await;
        let close_took = start.elapsed();
        wait_until(|| server.connections() == 0).await;
        let task_ended = start.elapsed();
        let (sent, app_peak) = app.await.expect("app");
        let peak = max(peak.await.expect("watch"), app_peak);

        // The attacker may read what the kernel holds, then learns of the reset.
        let mut received = 0usize;
        let mut buf = vec![0; 1 << 20];
        let end = loop {
            match attacker.read(&mut buf).await {
                Ok(0) => break "end of stream".to_string(),
                Ok(n) => received += n,
                Err(e) => break e.to_string(),
            }
        };
        eprintln!(
            "attack 6: {sent} messages of {MESSAGE} B sent, close() took {close_took:?}, task ended after {task_ended:?}, peak {peak:?}; the attacker read {received} B then {end}"
        );
        assert!(close_took <= limits.close_linger + SLACK, "close() took {close_took:?}");
        assert!(task_ended <= limits.close_linger + SLACK, "{task_ended:?}");
        limits.assert_within(peak, MESSAGE);
        assert!(received < sent * (MESSAGE + 64), "the unsent output was dropped");
    })
    .await
    .expect("hang guard");
}

// Attack 7a: a length prefix of 2^32 - 1 after the handshake.
#[tokio::test(start_paused = true)]
async fn oversized_length_prefix_is_a_protocol_error_without_allocation() {
    timeout(HANG_GUARD, async {
        let limits = Limits::default();
        let server = limits.listen().await;
        let mut attacker = handshake(
            &server,
            Hello {
                max_frame_size: 1 << 20,
                receive_window: 1 << 20,
            },
        )
        .await;
        let victim = accept_from(&server, &attacker).await;
        let peak = watch(&victim);

        let start = Instant::now();
        attacker
            .write_all(&u32::MAX.to_be_bytes())
            .await
            .expect("write");
        attacker.write_all(&[0xc1; 1000]).await.expect("write");
        let cause = victim.closed().await;
        let expected = ProtocolError::FrameTooLarge {
            size: u32::MAX.into(),
            max: limits.max_frame_size,
        };
        assert!(
            matches!(&cause, CloseCause::Protocol(e) if *e == expected),
            "{cause:?}"
        );
        let bytes = read_to_end(&mut attacker).await;
        let frames = frames(&bytes);
        assert!(
            matches!(frames.first(), Some(Frame::Hello(_))),
            "{frames:?}"
        );
        assert_eq!(
            frames[1..],
            [Frame::Close(CloseCode::ProtocolError, expected.to_string())]
        );
        wait_until(|| server.connections() == 0).await;
        let cut_off = start.elapsed();
        let peak = peak.await.expect("watch");
        eprintln!(
            "attack 7a: closed with {:?} after {cut_off:?}, peak {peak:?}",
            expected.to_string()
        );
        assert!(peak.read <= READ_CHUNK, "{peak:?}");
        limits.assert_within(peak, 0);
        // The attacker reads the close frame but does not hang up: held for the linger.
        assert!(cut_off <= limits.close_linger + SLACK, "{cut_off:?}");
        assert_served(&server).await;
    })
    .await
    .expect("hang guard");
}

// Attack 7b: an HTTP request, and garbage, instead of a hello.
#[tokio::test(start_paused = true)]
async fn http_and_garbage_instead_of_a_hello_are_refused_at_once() {
    timeout(HANG_GUARD, async {
        let limits = Limits::default();
        let server = limits.listen().await;
        for first in [
            &b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"[..],
            &[
                0x00, 0x00, 0x00, 0x08, 0xc1, 0xc1, 0xc1, 0xc1, 0xc1, 0xc1, 0xc1, 0xc1,
            ],
        ] {
            let start = Instant::now();
            let mut attacker = TcpStream::connect(socket_addr(&server))
                .await
                .expect("connect");
            attacker.write_all(first).await.expect("write");
            let bytes = read_to_end(&mut attacker).await;
            let frames = frames(&bytes);
            // The server answers a hello with its own (PROTOCOL.md §4): a stranger gets
            // the close frame alone.
            match &frames[..] {
                [Frame::Close(CloseCode::ProtocolError, reason)] => {
                    assert!(
                        reason.starts_with("peer does not speak chatter"),
                        "{reason}"
                    )
                }
                other => panic!("{other:?}"),
            }
            let rejection = server.next_rejection().await.expect("rejection");
            assert!(
                matches!(
                    rejection.cause,
                    CloseCause::Protocol(ProtocolError::NotChatter { .. })
                ),
                "{rejection:?}"
            );
            wait_until(|| server.connections() == 0).await;
            let cut_off = start.elapsed();
            eprintln!(
                "attack 7b: {:?}… refused after {cut_off:?}",
                String::from_utf8_lossy(&first[..4])
            );
            // The attacker reads the close frame but does not hang up: held for the linger.
            assert!(cut_off <= limits.close_linger + SLACK, "{cut_off:?}");
        }
        assert_served(&server).await;
    })
    .await
    .expect("hang guard");
}

/// How late a deadline may be observed: the 1 ms polling step of [`wait_until`].
const SLACK: Duration = Duration::from_millis(5);

/// The options of a test, kept as numbers so that bounds are computed from them.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_frame_size: u32,
    receive_window: u32,
    send_buffer: u32,
    keepalive: Option<(Duration, Duration)>,
    close_linger: Duration,
    handshake_timeout: Duration,
    max_connections: usize,
}

impl Default for Limits {
    /// chatter-core's documented defaults (keepalive 20 s + 20 s).
    fn default() -> Self {
        Limits {
            max_frame_size: 4 << 20,
            receive_window: 8 << 20,
            send_buffer: 1 << 20,
            keepalive: Some((Duration::from_secs(20), Duration::from_secs(20))),
            close_linger: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 10_000,
        }
    }
}

impl Limits {
    fn short_keepalive(mut self) -> Self {
        self.keepalive = Some((Duration::from_secs(1), Duration::from_secs(1)));
        self
    }

    fn options(&self) -> Options {
        let options = Options::default()
            .max_frame_size(self.max_frame_size)
            .receive_window(self.receive_window)
            .send_buffer(self.send_buffer)
            .close_linger(self.close_linger)
            .handshake_timeout(self.handshake_timeout)
            .max_connections(self.max_connections);
        match self.keepalive {
            Some((interval, timeout)) => options.keepalive(interval, timeout),
            None => options.no_keepalive(),
        }
    }

    async fn listen(&self) -> Server {
        listen("tcp://127.0.0.1:0", self.options())
            .await
            .expect("listen")
    }

    /// How long after its last byte a peer that does not answer pings is held: a ping after
    /// the interval, the timeout, then the close linger (documented; after a keepalive
    /// timeout the connection is in fact dropped at once).
    fn keepalive_cut_off(&self) -> Duration {
        let (interval, timeout) = self.keepalive.expect("keepalive on");
        interval + timeout + self.close_linger + SLACK
    }

    /// The bounds documented on [`Buffered`], for an application whose largest message has
    /// `largest` bytes of payload.
    fn assert_within(&self, peak: Buffered, largest: usize) {
        let read = 2 * (self.max_frame_size as usize + 4) + LARGE_FRAME_START;
        let output = self.send_buffer as usize + largest + 64;
        assert!(
            peak.read <= read,
            "read buffer {} > {read}: {peak:?}",
            peak.read
        );
        assert!(
            peak.received <= u64::from(self.receive_window),
            "received {} > {}: {peak:?}",
            peak.received,
            self.receive_window
        );
        assert!(
            peak.output <= output,
            "output {} > {output}: {peak:?}",
            peak.output
        );
    }
}

/// Connects a raw socket to `server` and sends `hello`; reads nothing.
async fn handshake(server: &Server, hello: Hello) -> TcpStream {
    let mut stream = TcpStream::connect(socket_addr(server))
        .await
        .expect("connect");
    let mut bytes = BytesMut::new();
    Frame::Hello(hello).encode(&mut bytes);
    stream.write_all(&bytes).await.expect("hello");
    stream
}

/// The server's end of `attacker`'s connection.
async fn accept_from(server: &Server, attacker: &TcpStream) -> Connection {
    let conn = server.accept().await.expect("accept");
    let local = attacker.local_addr().expect("address");
    assert_eq!(
        *conn.remote_address(),
        Address::Tcp {
            host: local.ip().to_string(),
            port: local.port()
        }
    );
    conn
}

fn socket_addr(server: &Server) -> SocketAddr {
    match &server.addresses()[0] {
        Address::Tcp { host, port } => format!("{host}:{port}").parse().expect("an IP address"),
        other => panic!("not TCP: {other}"),
    }
}

/// A one-shot message from the attacker.
fn message(id: u64, payload: &[u8]) -> Frame {
    let header = MessageHeader {
        id,
        first: id,
        flags: FLAG_OWNER | FLAG_LAST,
    };
    Frame::Message(header, Bytes::copy_from_slice(payload))
}

/// Decodes a byte stream into frames; panics on a partial or malformed frame.
fn frames(mut bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let (prefix, rest) = bytes.split_first_chunk::<4>().expect("a length prefix");
        let len = u32::from_be_bytes(*prefix) as usize;
        let (body, rest) = rest.split_at(len);
        frames.push(Frame::decode(Bytes::copy_from_slice(body)).expect("a frame"));
        bytes = rest;
    }
    frames
}

async fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.expect("read");
    bytes
}

/// A well-behaved client connects during the attack and gets a reply to its request.
async fn assert_served(server: &Server) {
    let client = connect(&server.addresses()[0], Options::default())
        .await
        .expect("a well-behaved client connects");
    let accepted = server.accept().await.expect("accept");
    assert_delivers(&client, &accepted, "request").await;
    assert_delivers(&accepted, &client, "reply").await;
    client.close().await;
    accepted.closed().await;
}

/// The server application: sends `size`-byte messages to `conn` until it closes; returns
/// how many it sent and the peak of `conn.buffered()` right after each send.
fn send_until_closed(conn: &Connection, size: usize) -> JoinHandle<(usize, Buffered)> {
    let conn = conn.clone();
    tokio::spawn(async move {
        let payload = vec![0x55; size];
        let mut sent = 0;
        let mut peak = Buffered::default();
        while conn
            .send_bytes(&payload, chatter_core::SendOptions::new())
            .await
            .is_ok()
        {
            sent += 1;
            peak = max(peak, conn.buffered());
        }
        (sent, peak)
    })
}

/// Samples `conn.buffered()` every millisecond until the connection closed; returns the peak
/// of each part.
fn watch(conn: &Connection) -> JoinHandle<Buffered> {
    let conn = conn.clone();
    tokio::spawn(async move {
        let mut peak = Buffered::default();
        loop {
            peak = max(peak, conn.buffered());
            if conn.is_closed() {
                return max(peak, conn.buffered());
            }
            sleep(Duration::from_millis(1)).await;
        }
    })
}

fn max(a: Buffered, b: Buffered) -> Buffered {
    let mut m = a;
    m.read = a.read.max(b.read);
    m.received = a.received.max(b.received);
    m.output = a.output.max(b.output);
    m
}
