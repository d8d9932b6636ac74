//! Two sans-IO endpoints stepped against each other in virtual time.

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};

use super::*;

/// Two endpoints and a virtual clock.
struct Pair {
    now: Instant,
    a: Protocol,
    b: Protocol,
}

impl Pair {
    fn new() -> Self {
        Self::with(Config::default(), Config::default())
    }

    fn with(a: Config, b: Config) -> Self {
        let now = Instant::now();
        let mut pair = Pair {
            now,
            a: Protocol::new(a, now),
            b: Protocol::accepting(b, now),
        };
        pair.flush();
        assert!(matches!(pair.a.poll_event(), Some(Event::Connected(_))));
        assert!(matches!(pair.b.poll_event(), Some(Event::Connected(_))));
        pair
    }

    /// Delivers everything in flight, both ways, until both are quiet.
    fn flush(&mut self) {
        loop {
            let mut wire = BytesMut::new();
            self.a.take_output(&mut wire);
            let moved_ab = !wire.is_empty();
            self.b.handle_input(self.now, &mut wire);
            let mut wire = BytesMut::new();
            self.b.take_output(&mut wire);
            let moved_ba = !wire.is_empty();
            self.a.handle_input(self.now, &mut wire);
            if !moved_ab && !moved_ba {
                return;
            }
        }
    }

    /// Sends `n` one-byte messages from `a` to `b`, delivered as they go (b takes none).
    fn burst_of_tiny_messages(&mut self, n: usize) {
        for i in 0..n {
            self.a
                .send(self.now, SendArgs::new(), &[7])
                .expect("within the window");
            if i % 1000 == 999 {
                self.flush();
            }
        }
        self.flush();
    }

    /// Advances the clock, firing timers on both sides as they fall due.
    fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        loop {
            let next = [self.a.poll_timeout(), self.b.poll_timeout()]
                .into_iter()
                .flatten()
                .filter(|&t| t <= end)
                .min();
            let Some(t) = next else { break };
            self.now = self.now.max(t);
            self.a.handle_timeout(self.now);
            self.b.handle_timeout(self.now);
            self.flush();
        }
        self.now = end;
    }
}

fn events(p: &mut Protocol) -> Vec<Event> {
    std::iter::from_fn(|| p.poll_event()).collect()
}

fn messages(p: &mut Protocol) -> Vec<Message> {
    events(p)
        .into_iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m),
            _ => None,
        })
        .collect()
}

fn timeouts(p: &mut Protocol) -> Vec<ConversationId> {
    events(p)
        .into_iter()
        .filter_map(|e| match e {
            Event::Timeout(c) => Some(c),
            _ => None,
        })
        .collect()
}

fn closed(p: &mut Protocol) -> Option<CloseCause> {
    events(p).into_iter().find_map(|e| match e {
        Event::Closed(c) => Some(c),
        _ => None,
    })
}

fn open(last: bool, token: bool) -> SendArgs {
    SendArgs {
        last,
        token,
        ..SendArgs::new()
    }
}

fn reply(conversation: ConversationId, last: bool, token: bool) -> SendArgs {
    SendArgs {
        conversation: Some(conversation),
        last,
        token,
        timeout: None,
    }
}

#[test]
fn one_shot_message_carries_flags_and_owner() {
    let mut p = Pair::new();
    let conv = p.a.send(p.now, SendArgs::new(), b"\x01").unwrap();
    assert_eq!(
        conv,
        ConversationId {
            owner: true,
            first: 1
        }
    );
    p.flush();
    let got = messages(&mut p.b);
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(
        m.conversation,
        ConversationId {
            owner: false,
            first: 1
        }
    );
    assert!(m.first && m.last && m.token);
    // One-shot conversations leave no state behind: continuing it is refused.
    assert_eq!(
        p.b.send(p.now, reply(m.conversation, true, true), b""),
        Err(SendRefused::Ended)
    );
}

#[test]
fn token_passing_conversation_works_both_ways() {
    let mut p = Pair::new();
    // a opens and keeps the turn for two messages, then passes it.
    let c = p.a.send(p.now, open(false, false), b"1").unwrap();
    p.a.send(p.now, reply(c, false, true), b"2").unwrap();
    p.flush();
    let got = messages(&mut p.b);
    assert_eq!(got.len(), 2);
    assert!(got[0].first && !got[0].token && !got[0].last);
    assert!(!got[1].first && got[1].token && !got[1].last);
    let cb = got[0].conversation;
    // a may not send now; b may.
    assert_eq!(
        p.a.send(p.now, reply(c, false, true), b"x"),
        Err(SendRefused::NotYourTurn)
    );
    p.b.send(p.now, reply(cb, false, true), b"3").unwrap();
    p.flush();
    let got = messages(&mut p.a);
    assert_eq!(got[0].conversation, c);
    assert!(got[0].token && !got[0].first);
    // a ends it; nobody may send afterwards.
    p.a.send(p.now, reply(c, true, true), b"4").unwrap();
    p.flush();
    assert!(messages(&mut p.b)[0].last);
    assert_eq!(
        p.a.send(p.now, reply(c, true, true), b""),
        Err(SendRefused::Ended)
    );
    assert_eq!(
        p.b.send(p.now, reply(cb, true, true), b""),
        Err(SendRefused::Ended)
    );
    assert!(p.a.is_open() && p.b.is_open());
}

#[test]
fn both_sides_open_conversations_with_the_same_first_id() {
    let mut p = Pair::new();
    let ca = p.a.send(p.now, open(false, true), b"from a").unwrap();
    let cb = p.b.send(p.now, open(false, true), b"from b").unwrap();
    assert_eq!((ca.first, cb.first), (1, 1));
    p.flush();
    let at_b = messages(&mut p.b).remove(0);
    let at_a = messages(&mut p.a).remove(0);
    assert_eq!(
        at_b.conversation,
        ConversationId {
            owner: false,
            first: 1
        }
    );
    assert_ne!(at_b.conversation, cb);
    // Each answers the other's conversation; the answers land where they belong.
    p.b.send(p.now, reply(at_b.conversation, true, true), b"b answers")
        .unwrap();
    p.a.send(p.now, reply(at_a.conversation, true, true), b"a answers")
        .unwrap();
    p.flush();
    let m = messages(&mut p.a).remove(0);
    assert_eq!((m.conversation, &m.payload[..]), (ca, &b"b answers"[..]));
    let m = messages(&mut p.b).remove(0);
    assert_eq!((m.conversation, &m.payload[..]), (cb, &b"a answers"[..]));
}

/// Encodes a message frame by hand, to act as a misbehaving peer.
fn raw_message(id: u64, first: u64, flags: u8) -> BytesMut {
    let mut out = BytesMut::new();
    frame::encode_message(&mut out, MessageHeader { id, first, flags }, b"");
    out
}

fn assert_protocol_error(p: &mut Protocol, check: impl Fn(&ProtocolError) -> bool) {
    match closed(p) {
        Some(CloseCause::Protocol(e)) if check(&e) => {}
        other => panic!("expected a matching protocol error, got {other:?}"),
    }
    let mut out = BytesMut::new();
    p.take_output(&mut out);
    let body = frame::decode_frame(&mut out, u32::MAX).unwrap().unwrap();
    assert!(matches!(
        Frame::decode(body).unwrap(),
        Frame::Close(CloseCode::ProtocolError, _)
    ));
}

#[test]
fn peer_sending_out_of_turn_is_a_protocol_error() {
    let mut p = Pair::new();
    // b opens a conversation and passes the token to a; then b sends in it again.
    p.b.send(p.now, open(false, true), b"").unwrap();
    p.flush();
    let _ = events(&mut p.a);
    let mut wire = raw_message(2, 1, FLAG_OWNER);
    p.a.handle_input(p.now, &mut wire);
    assert_protocol_error(&mut p.a, |e| {
        matches!(
            e,
            ProtocolError::OutOfTurn {
                first: 1,
                opened_by_peer: true
            }
        )
    });
}

#[test]
fn peer_sending_after_last_or_in_unknown_conversation_is_a_protocol_error() {
    let mut p = Pair::new();
    p.b.send(p.now, SendArgs::new(), b"").unwrap();
    p.flush();
    let _ = events(&mut p.a);
    // b continues the one-shot conversation 1 it already ended.
    let mut wire = raw_message(2, 1, FLAG_OWNER | FLAG_LAST);
    p.a.handle_input(p.now, &mut wire);
    assert_protocol_error(&mut p.a, |e| {
        matches!(e, ProtocolError::UnknownConversation { first: 1, .. })
    });

    let mut p = Pair::new();
    // A reply in a conversation a never opened.
    let mut wire = raw_message(1, 7, FLAG_LAST);
    p.a.handle_input(p.now, &mut wire);
    assert_protocol_error(&mut p.a, |e| {
        matches!(
            e,
            ProtocolError::UnknownConversation {
                first: 7,
                opened_by_peer: false
            }
        )
    });
}

#[test]
fn message_ids_must_follow_in_sequence() {
    let mut p = Pair::new();
    let mut wire = raw_message(5, 5, FLAG_OWNER | FLAG_LAST);
    p.a.handle_input(p.now, &mut wire);
    assert_protocol_error(&mut p.a, |e| {
        *e == ProtocolError::BadMessageId {
            got: 5,
            expected: 1,
        }
    });
}

#[test]
fn conversation_timeout_follows_hat_chatter_rules() {
    // REFERENCE.md §1.6 test_conversation_timeout.
    let mut p = Pair::new();
    let c =
        p.a.send(
            p.now,
            SendArgs {
                timeout: Some(Duration::from_secs(1)),
                ..open(false, true)
            },
            b"",
        )
        .unwrap();
    p.flush();
    let at_b = messages(&mut p.b).remove(0);
    // The reply (not last) cancels the timer and does not re-arm it.
    p.b.send(p.now, reply(at_b.conversation, false, true), b"")
        .unwrap();
    p.flush();
    assert_eq!(messages(&mut p.a)[0].conversation, c);
    p.advance(Duration::from_secs(5));
    assert!(timeouts(&mut p.a).is_empty());
    // Two sends with short timeouts: the second replaces the first; exactly one fires.
    let short = Duration::from_millis(1);
    p.a.send(
        p.now,
        SendArgs {
            conversation: Some(c),
            last: false,
            token: false,
            timeout: Some(short),
        },
        b"",
    )
    .unwrap();
    p.a.send(
        p.now,
        SendArgs {
            conversation: Some(c),
            last: false,
            token: true,
            timeout: Some(short),
        },
        b"",
    )
    .unwrap();
    assert!(
        timeouts(&mut p.a).is_empty(),
        "nothing fires before time passes"
    );
    p.advance(Duration::from_millis(10));
    assert_eq!(timeouts(&mut p.a), vec![c]);
    p.advance(Duration::from_secs(10));
    assert!(timeouts(&mut p.a).is_empty());
}

#[test]
fn last_messages_never_arm_a_timeout_and_later_sends_replace_it() {
    let mut p = Pair::new();
    let t = Some(Duration::from_millis(5));
    p.a.send(
        p.now,
        SendArgs {
            timeout: t,
            ..SendArgs::new()
        },
        b"",
    )
    .unwrap();
    let c =
        p.a.send(
            p.now,
            SendArgs {
                timeout: t,
                ..open(false, false)
            },
            b"",
        )
        .unwrap();
    // A follow-up with `last` cancels the timer and sets none.
    p.a.send(
        p.now,
        SendArgs {
            conversation: Some(c),
            last: true,
            token: true,
            timeout: t,
        },
        b"",
    )
    .unwrap();
    p.advance(Duration::from_secs(1));
    assert!(timeouts(&mut p.a).is_empty());
    assert_eq!(
        p.a.poll_timeout(),
        Some(p.now - Duration::from_secs(1) + Duration::from_secs(20))
    );
}

#[test]
fn no_timeout_fires_after_close() {
    let mut p = Pair::new();
    p.a.send(
        p.now,
        SendArgs {
            timeout: Some(Duration::from_millis(200)),
            ..open(false, true)
        },
        b"",
    )
    .unwrap();
    p.a.close(CloseCode::Normal, "bye");
    p.flush();
    p.advance(Duration::from_millis(400));
    let evs = events(&mut p.a);
    assert!(
        matches!(evs.as_slice(), [Event::Closed(CloseCause::Local)]),
        "{evs:?}"
    );
    assert_eq!(p.a.poll_timeout(), None);
    assert!(
        matches!(closed(&mut p.b), Some(CloseCause::Peer { code: CloseCode::Normal, reason }) if reason == "bye")
    );
}

#[test]
fn keepalive_pings_a_quiet_peer_and_closes_when_it_never_answers() {
    let keepalive = Keepalive {
        interval: Duration::from_secs(2),
        timeout: Duration::from_secs(1),
    };
    let config = Config {
        keepalive: Some(keepalive),
        ..Config::default()
    };
    let mut p = Pair::with(
        config.clone(),
        Config {
            keepalive: None,
            ..Config::default()
        },
    );
    // b answers pings: a stays open through many intervals.
    p.advance(Duration::from_secs(30));
    assert!(p.a.is_open() && p.b.is_open());

    // A peer that never answers: feed a's output nowhere.
    let now = Instant::now();
    let mut a = Protocol::new(config, now);
    let mut hello = BytesMut::new();
    Frame::Hello(Hello {
        max_frame_size: 1 << 20,
        receive_window: 1 << 20,
    })
    .encode(&mut hello);
    a.handle_input(now, &mut hello);
    assert_eq!(a.poll_timeout(), Some(now + Duration::from_secs(2)));
    a.handle_timeout(now + Duration::from_secs(2));
    let mut out = BytesMut::new();
    a.take_output(&mut out);
    assert!(
        out.ends_with(&[0, 0, 0, 2, 0x91, 0x02]),
        "a ping went out: {out:02x?}"
    );
    assert_eq!(a.poll_timeout(), Some(now + Duration::from_secs(3)));
    a.handle_timeout(now + Duration::from_secs(3));
    assert!(matches!(closed(&mut a), Some(CloseCause::KeepaliveTimeout)));
}

#[test]
fn a_slow_consumer_is_not_a_dead_peer() {
    let keepalive = Keepalive {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
    };
    let config = Config {
        keepalive: Some(keepalive),
        receive_window: 1024,
        max_frame_size: 1024,
        ..Config::default()
    };
    let mut p = Pair::with(config.clone(), config);
    // a fills b's window; b never consumes.
    let mut sent = 0;
    while p.a.send(p.now, SendArgs::new(), &[0u8; 100]).is_ok() {
        sent += 1;
    }
    p.flush();
    assert!(sent > 0);
    assert_eq!(
        p.a.send(p.now, SendArgs::new(), &[0u8; 100]),
        Err(SendRefused::NoCredit)
    );
    p.advance(Duration::from_secs(60));
    assert!(
        p.a.is_open() && p.b.is_open(),
        "keepalive kept working while the window was full"
    );
}

#[test]
fn flow_control_blocks_the_sender_until_the_receiver_consumes() {
    let config = Config {
        receive_window: 1640,
        max_frame_size: 800,
        ..Config::default()
    };
    let mut p = Pair::with(config.clone(), config);
    let mut sent = 0;
    while p.a.send(p.now, SendArgs::new(), &[7u8; 95]).is_ok() {
        sent += 1;
    }
    assert_eq!(
        sent, 10,
        "10 messages costing 100 + 64 bytes fill a 1640-byte window"
    );
    p.flush();
    let got = messages(&mut p.b);
    assert_eq!(got.len(), 10);
    assert!(got.iter().all(|m| m.cost == 164));
    // Consuming under a quarter of the window returns nothing yet…
    p.b.release(got[0].cost);
    p.b.release(got[1].cost);
    p.flush();
    assert!(events(&mut p.a).is_empty());
    // …a quarter does, and the blocked sender hears about it.
    p.b.release(got[2].cost);
    p.flush();
    assert!(matches!(events(&mut p.a).as_slice(), [Event::Writable]));
    let mut more = 0;
    while p.a.send(p.now, SendArgs::new(), &[7u8; 95]).is_ok() {
        more += 1;
    }
    assert_eq!(more, 3);
}

#[test]
fn a_reserve_keeps_part_of_the_window_for_other_sends() {
    let config = Config {
        receive_window: 1640,
        max_frame_size: 800,
        ..Config::default()
    };
    let mut p = Pair::with(config.clone(), config);
    assert_eq!(p.a.peer_window(), 1640);
    // Messages costing 164 bytes with half the window (820) reserved: 4 fit (656 + 820 =
    // 1476 <= 1640), the fifth would leave less than the reserve.
    let mut sent = 0;
    while p
        .a
        .send_reserving(p.now, SendArgs::new(), &[7u8; 95], 820)
        .is_ok()
    {
        sent += 1;
    }
    assert_eq!(sent, 5, "the fifth leaves 820, exactly the reserve");
    // Sends without a reserve still have the rest of the window.
    let mut urgent = 0;
    while p.a.send(p.now, SendArgs::new(), &[7u8; 95]).is_ok() {
        urgent += 1;
    }
    assert_eq!(urgent, 5);
    // A refused reserved send is woken by credit like any refused send.
    p.flush();
    let got = messages(&mut p.b);
    for m in &got {
        p.b.release(m.cost);
    }
    p.flush();
    assert!(matches!(events(&mut p.a).as_slice(), [Event::Writable]));
}

#[test]
fn with_nothing_in_flight_a_reserve_does_not_stop_a_large_message() {
    let config = Config {
        receive_window: 4096,
        max_frame_size: 3000,
        ..Config::default()
    };
    let mut p = Pair::with(config.clone(), config);
    // 2900 + reserve 2048 exceeds the window, but the whole window is free.
    assert!(p
        .a
        .send_reserving(p.now, SendArgs::new(), &[1u8; 2900], 2048)
        .is_ok());
    // Now something is in flight: a small message with the same reserve waits.
    assert!(matches!(
        p.a.send_reserving(p.now, SendArgs::new(), &[1u8; 10], 2048),
        Err(SendRefused::NoCredit)
    ));
}

#[test]
fn credit_released_twice_is_not_given_back_twice() {
    let mut p = Pair::new();
    p.a.send(p.now, SendArgs::new(), &[7u8; 100]).unwrap();
    p.flush();
    let got = messages(&mut p.b);
    assert_eq!(p.b.received_unreleased(), got[0].cost as u64);
    p.b.release(got[0].cost);
    p.b.release(got[0].cost);
    p.b.release(u32::MAX);
    assert_eq!(p.b.received_unreleased(), 0);
    // Were the extra releases counted, the window frame would exceed a's window and a
    // would close with a protocol error.
    p.flush();
    p.advance(Duration::from_secs(1));
    assert!(!p.a.is_closed() && !p.b.is_closed());
}

#[test]
fn held_back_credit_never_blocks_a_maximum_size_message() {
    // A window barely larger than the maximum frame: credit must come back almost at once.
    let config = Config {
        receive_window: 1000,
        max_frame_size: 900,
        ..Config::default()
    };
    let mut p = Pair::with(config.clone(), config);
    for _ in 0..10 {
        p.a.send(p.now, SendArgs::new(), &[1u8; 95]).unwrap();
        p.flush();
        let m = messages(&mut p.b).remove(0);
        p.b.release(m.cost);
        p.flush();
        let _ = events(&mut p.a);
    }
    // Everything was consumed: a maximum-size message must fit.
    p.a.send(p.now, SendArgs::new(), &[2u8; 895]).unwrap();
}

#[test]
fn credit_is_charged_by_the_real_body_length() {
    // A peer that encodes its header with wider integers than needed is charged what it
    // sent, and gets exactly that back.
    let config = Config {
        receive_window: 256,
        max_frame_size: 256,
        ..Config::default()
    };
    let mut p = Pair::with(config, Config::default());
    let mut wire = BytesMut::new();
    // [1, id=1 as uint16, first=1 as uint16, flags 0x07] + 3 payload bytes: 11-byte body.
    wire.put_slice(
        &[
            0, 0, 0, 11, 0x94, 0x01, 0xcd, 0, 1, 0xcd, 0, 1, 0x07, 1, 2, 3,
        ][..],
    );
    wire.truncate(4 + 11);
    p.a.handle_input(p.now, &mut wire);
    let m = messages(&mut p.a).remove(0);
    assert_eq!(m.cost, 11 + MESSAGE_OVERHEAD);
}

#[test]
fn a_hello_with_unusable_limits_is_refused() {
    let now = Instant::now();
    let mut p = Protocol::new(Config::default(), now);
    let mut wire = BytesMut::new();
    Frame::Hello(Hello {
        max_frame_size: 0,
        receive_window: 1 << 20,
    })
    .encode(&mut wire);
    p.handle_input(now, &mut wire);
    assert!(matches!(
        closed(&mut p),
        Some(CloseCause::Protocol(ProtocolError::Malformed(m))) if m.contains("at least 64")
    ));
}

#[test]
fn close_reasons_are_cut_to_fit_the_peer() {
    let small = Config {
        max_frame_size: 64,
        receive_window: 64,
        ..Config::default()
    };
    let mut p = Pair::with(Config::default(), small);
    let long = "é".repeat(100);
    p.a.close(CloseCode::Normal, &long);
    p.flush();
    match closed(&mut p.b) {
        Some(CloseCause::Peer { reason, .. }) => {
            assert!(!reason.is_empty() && reason.len() <= 48 && long.starts_with(&reason));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_slowly_arriving_large_frame_keeps_the_connection_alive() {
    let keepalive = Keepalive {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
    };
    let config = Config {
        keepalive: Some(keepalive),
        ..Config::default()
    };
    let mut p = Pair::with(config, Config::default());
    let mut wire = BytesMut::new();
    frame::encode_message(
        &mut wire,
        MessageHeader {
            id: 1,
            first: 1,
            flags: FLAG_OWNER | FLAG_LAST,
        },
        &[0u8; 1000],
    );
    // One chunk every 1.5 s: more than interval + timeout would pass between whole frames.
    let mut buf = BytesMut::new();
    for chunk in wire.chunks(100) {
        p.now += Duration::from_millis(1500);
        buf.put_slice(chunk);
        p.a.handle_input(p.now, &mut buf);
        p.a.handle_timeout(p.now);
        assert!(p.a.is_open());
        let mut out = BytesMut::new();
        p.a.take_output(&mut out); // pings go nowhere: the peer is busy sending
    }
    assert_eq!(messages(&mut p.a).len(), 1);
}

#[test]
fn a_peer_ignoring_the_window_is_a_protocol_error() {
    let config = Config {
        receive_window: 8192,
        max_frame_size: 8192,
        ..Config::default()
    };
    let mut p = Pair::with(config, Config::default());
    let mut wire = BytesMut::new();
    for id in 1..=3 {
        frame::encode_message(
            &mut wire,
            MessageHeader {
                id,
                first: id,
                flags: FLAG_OWNER | FLAG_LAST,
            },
            &[0u8; 3000],
        );
    }
    p.a.handle_input(p.now, &mut wire);
    assert_protocol_error(&mut p.a, |e| {
        matches!(e, ProtocolError::WindowExceeded { window: 8192, .. })
    });
}

#[test]
fn limits_announced_below_the_early_credit_still_accept_that_much() {
    // A window and frame limit of 256 still take 4096 bytes: a peer may have sent that
    // much early, before it knew them. One byte of cost more is an error.
    let config = Config {
        receive_window: 256,
        max_frame_size: 256,
        ..Config::default()
    };
    let mut p = Pair::with(config, Config::default());
    let mut wire = BytesMut::new();
    // 4032 bytes of body: 5 of header and 4027 of payload, cost exactly 4096.
    frame::encode_message(
        &mut wire,
        MessageHeader {
            id: 1,
            first: 1,
            flags: FLAG_OWNER | FLAG_LAST,
        },
        &[0u8; 4027],
    );
    p.a.handle_input(p.now, &mut wire);
    assert_eq!(messages(&mut p.a).len(), 1);
    assert!(p.a.is_open());
    frame::encode_message(
        &mut wire,
        MessageHeader {
            id: 2,
            first: 2,
            flags: FLAG_OWNER | FLAG_LAST,
        },
        &[],
    );
    p.a.handle_input(p.now, &mut wire);
    assert_protocol_error(&mut p.a, |e| {
        matches!(e, ProtocolError::WindowExceeded { window: 4096, .. })
    });
}

#[test]
fn a_client_sends_early_messages_behind_its_hello() {
    let now = Instant::now();
    let small = Config {
        receive_window: 256,
        max_frame_size: 256,
        ..Config::default()
    };
    let mut client = Protocol::new(Config::default(), now);
    let mut server = Protocol::accepting(small, now);
    // Before the server's hello: messages up to the early credit go out with the hello.
    let conv = client
        .send(
            now,
            SendArgs {
                last: false,
                ..SendArgs::new()
            },
            &[1u8; 2000],
        )
        .unwrap();
    client.send(now, SendArgs::new(), &[2u8; 1900]).unwrap();
    // 2005 + 64 + 1905 + 64 = 4038: 58 bytes of early credit are left.
    assert_eq!(
        client.send(now, SendArgs::new(), &[3u8; 100]),
        Err(SendRefused::NoCredit)
    );
    let mut wire = BytesMut::new();
    client.take_output(&mut wire);
    server.handle_input(now, &mut wire);
    assert!(matches!(server.poll_event(), Some(Event::Connected(_))));
    let got = messages(&mut server);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].conversation.first, conv.first);
    assert_eq!(&got[1].payload[..], &[2u8; 1900][..]);

    // The server's hello: the client learns it overspent a 256-byte window by 3782 bytes.
    server.take_output(&mut wire);
    client.handle_input(now, &mut wire);
    let events = events(&mut client);
    assert!(matches!(events[..], [Event::Connected(_), Event::Writable]));
    assert_eq!(
        client.send(now, SendArgs::new(), &[3u8; 200]),
        Err(SendRefused::TooLarge {
            size: 205,
            max: 192
        })
    );
    assert_eq!(
        client.send(now, SendArgs::new(), &[3u8; 10]),
        Err(SendRefused::NoCredit),
        "no credit until the server consumed the early messages"
    );
    // Consuming them pays the deficit back first; the credit never exceeds the window.
    for m in got {
        server.release(m.cost);
    }
    server.take_output(&mut wire);
    client.handle_input(now, &mut wire);
    assert!(client.is_open(), "{:?}", closed(&mut client));
    client.send(now, SendArgs::new(), &[3u8; 10]).unwrap();
    client.take_output(&mut wire);
    server.handle_input(now, &mut wire);
    assert_eq!(messages(&mut server).len(), 1);
    assert!(server.is_open());
}

#[test]
fn messages_too_large_for_the_peer_are_refused_locally() {
    let small = Config {
        receive_window: 128,
        max_frame_size: 128,
        ..Config::default()
    };
    let mut p = Pair::with(Config::default(), small);
    assert_eq!(
        p.a.send(p.now, SendArgs::new(), &[0u8; 200]),
        Err(SendRefused::TooLarge {
            size: 205,
            max: 128 - MESSAGE_OVERHEAD
        })
    );
    assert!(p.a.is_open());
}

#[test]
fn oversized_frames_close_with_a_protocol_error() {
    let config = Config {
        max_frame_size: 8192,
        receive_window: 8192,
        ..Config::default()
    };
    let mut p = Pair::with(config, Config::default());
    let mut wire = BytesMut::new();
    wire.put_u32(1 << 30);
    p.a.handle_input(p.now, &mut wire);
    assert_protocol_error(&mut p.a, |e| {
        *e == ProtocolError::FrameTooLarge {
            size: 1 << 30,
            max: 8192,
        }
    });
}

#[test]
fn strangers_are_told_apart_from_chatter_peers() {
    let now = Instant::now();
    type Check = fn(&ProtocolError) -> bool;
    let cases: [(&[u8], Check); 6] = [
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            |e| matches!(e, ProtocolError::NotChatter { first_bytes } if first_bytes.starts_with(b"GET / HTTP")),
        ),
        (&[1, 2, 3, 4], |e| {
            matches!(e, ProtocolError::NotChatter { .. })
        }),
        // A whole frame that is not a hello: its bytes, length prefix included.
        (
            &[0, 0, 0, 3, 0x93, 0, 0xa1],
            |e| matches!(e, ProtocolError::NotChatter { first_bytes } if first_bytes[..] == [0, 0, 0, 3, 0x93, 0, 0xa1]),
        ),
        // A chatter hello of version 2.
        (
            &[
                0, 0, 0, 13, 0x95, 0, 0xa7, b'c', b'h', b'a', b't', b't', b'e', b'r', 2, 1, 1,
            ],
            |e| *e == ProtocolError::UnsupportedVersion { peer: 2, ours: 1 },
        ),
        // A version 2 hello that dropped or changed the fields after the version
        // (PROTOCOL.md §4: the version is checked before they are read): its version is
        // named, not taken for a stranger's bytes.
        (
            &[
                0, 0, 0, 11, 0x93, 0, 0xa7, b'c', b'h', b'a', b't', b't', b'e', b'r', 2,
            ],
            |e| *e == ProtocolError::UnsupportedVersion { peer: 2, ours: 1 },
        ),
        (
            &[
                0, 0, 0, 12, 0x94, 0, 0xa7, b'c', b'h', b'a', b't', b't', b'e', b'r', 2, 0x80,
            ],
            |e| *e == ProtocolError::UnsupportedVersion { peer: 2, ours: 1 },
        ),
    ];
    for (bytes, check) in cases {
        let mut p = Protocol::new(Config::default(), now);
        let mut wire = BytesMut::from(bytes);
        p.handle_input(now, &mut wire);
        match closed(&mut p) {
            Some(CloseCause::Protocol(e)) if check(&e) => {}
            other => panic!("{bytes:02x?}: {other:?}"),
        }
    }
    // Something other than a hello first, from a chatter peer.
    let mut p = Protocol::new(Config::default(), now);
    let mut wire = BytesMut::new();
    Frame::Ping.encode(&mut wire);
    p.handle_input(now, &mut wire);
    assert!(matches!(
        closed(&mut p),
        Some(CloseCause::Protocol(ProtocolError::Unexpected(_)))
    ));
}

#[test]
fn the_server_answers_the_clients_hello_and_sends_nothing_before() {
    let now = Instant::now();
    let mut client = Protocol::new(Config::default(), now);
    let mut server = Protocol::accepting(Config::default(), now);
    let mut wire = BytesMut::new();
    server.take_output(&mut wire);
    assert!(wire.is_empty() && !server.has_output());
    assert_eq!(server.peer_window(), 0);
    // A send before the client's hello waits for it.
    assert_eq!(
        server.send(now, SendArgs::new(), b"\xc0"),
        Err(SendRefused::NoCredit)
    );
    client.take_output(&mut wire);
    server.handle_input(now, &mut wire);
    assert!(matches!(
        events(&mut server)[..],
        [Event::Connected(_), Event::Writable]
    ));
    server.send(now, SendArgs::new(), b"\xc0").unwrap();
    server.take_output(&mut wire);
    let mut frames = Vec::new();
    while let Some(body) = frame::decode_frame(&mut wire, u32::MAX).unwrap() {
        frames.push(Frame::decode(body).unwrap());
    }
    assert!(
        matches!(&frames[..], [Frame::Hello(_), Frame::Message(..)]),
        "{frames:?}"
    );
}

#[test]
fn a_server_whose_client_never_says_hello_closes_without_a_hello() {
    let now = Instant::now();
    let config = Config {
        handshake_timeout: Duration::from_secs(3),
        ..Config::default()
    };
    let mut server = Protocol::accepting(config, now);
    assert_eq!(server.poll_timeout(), Some(now + Duration::from_secs(3)));
    server.handle_timeout(now + Duration::from_secs(3));
    assert!(matches!(
        closed(&mut server),
        Some(CloseCause::Protocol(ProtocolError::HandshakeTimeout))
    ));
    let mut wire = BytesMut::new();
    server.take_output(&mut wire);
    let body = frame::decode_frame(&mut wire, u32::MAX).unwrap().unwrap();
    assert!(wire.is_empty(), "one frame only");
    assert!(matches!(
        Frame::decode(body).unwrap(),
        Frame::Close(CloseCode::ProtocolError, reason) if reason == "handshake timed out"
    ));
}

#[test]
fn a_handshake_that_never_completes_times_out() {
    let now = Instant::now();
    let mut p = Protocol::new(
        Config {
            handshake_timeout: Duration::from_secs(3),
            ..Config::default()
        },
        now,
    );
    assert_eq!(p.poll_timeout(), Some(now + Duration::from_secs(3)));
    p.handle_timeout(now + Duration::from_secs(2));
    assert!(!p.is_closed());
    p.handle_timeout(now + Duration::from_secs(3));
    assert!(matches!(
        closed(&mut p),
        Some(CloseCause::Protocol(ProtocolError::HandshakeTimeout))
    ));
}

#[test]
fn input_split_at_every_byte_decodes_the_same() {
    let mut p = Pair::new();
    let c = p.a.send(p.now, open(false, false), b"hello").unwrap();
    p.a.send(p.now, reply(c, true, true), b"world").unwrap();
    let mut wire = BytesMut::new();
    p.a.take_output(&mut wire);
    let mut buf = BytesMut::new();
    for b in wire {
        buf.put_u8(b);
        p.b.handle_input(p.now, &mut buf);
    }
    let got = messages(&mut p.b);
    assert_eq!(
        got.iter().map(|m| &m.payload[..]).collect::<Vec<_>>(),
        [&b"hello"[..], b"world"]
    );
    assert!(p.b.is_open());
}

#[test]
fn too_many_open_conversations_is_a_protocol_error() {
    let mut p = Pair::with(
        Config {
            max_conversations: 2,
            ..Config::default()
        },
        Config::default(),
    );
    for _ in 0..3 {
        p.b.send(p.now, open(false, true), b"").unwrap();
    }
    p.flush();
    assert!(matches!(
        closed(&mut p.a),
        Some(CloseCause::Protocol(ProtocolError::TooManyConversations {
            limit: 2
        }))
    ));
}

/// A side holds no more conversations it opened than it accepts from its peer
/// (`max_conversations`): one more waits, as for credit, and goes once one of them ended.
#[test]
fn opening_more_conversations_than_the_limit_waits_for_one_to_end() {
    let limited = Config {
        max_conversations: 2,
        ..Config::default()
    };
    let mut p = Pair::with(Config::default(), limited);
    let first = p.b.send(p.now, open(false, true), b"1").unwrap();
    p.b.send(p.now, open(false, true), b"2").unwrap();
    assert!(matches!(
        p.b.send(p.now, open(false, true), b"3"),
        Err(SendRefused::NoCredit)
    ));
    // One-shot messages open nothing: they go.
    p.b.send(p.now, SendArgs::new(), b"one-shot").unwrap();
    p.flush();
    let requests: Vec<_> = messages(&mut p.a).into_iter().filter(|m| !m.last).collect();
    assert_eq!(requests.len(), 2);
    assert!(p.a.is_open(), "the peer saw no more than the limit");
    // The peer ends the first: room for one more, and b is told.
    let reply = SendArgs {
        conversation: Some(requests[0].conversation),
        ..SendArgs::new()
    };
    p.a.send(p.now, reply, b"done").unwrap();
    p.flush();
    let got = events(&mut p.b);
    assert!(
        got.iter()
            .any(|e| matches!(e, Event::Message(m) if m.conversation == first)),
        "{got:?}"
    );
    assert!(got.iter().any(|e| matches!(e, Event::Writable)), "{got:?}");
    p.b.send(p.now, open(false, true), b"3").unwrap();
    assert!(matches!(
        p.b.send(p.now, open(false, true), b"4"),
        Err(SendRefused::NoCredit)
    ));
}

#[test]
fn events_come_out_in_order_and_messages_can_be_taken_apart() {
    let mut pair = Pair::new();
    // a: message, timeout of its request, message, then the close: in that order.
    pair.a.send(pair.now, SendArgs::new(), b"\x01").unwrap();
    let request = SendArgs {
        last: false,
        timeout: Some(Duration::from_millis(10)),
        ..SendArgs::new()
    };
    pair.b.send(pair.now, request, b"\x02").unwrap();
    pair.flush();
    pair.advance(Duration::from_millis(20));
    pair.a.send(pair.now, SendArgs::new(), b"\x03").unwrap();
    pair.a.close(CloseCode::Normal, "bye");
    pair.flush();
    let kinds: Vec<String> = events(&mut pair.b)
        .into_iter()
        .map(|e| match e {
            Event::Message(m) => format!("message {:02x}", m.payload[0]),
            Event::Timeout(_) => "timeout".into(),
            Event::Closed(_) => "closed".into(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        ["message 01", "timeout", "message 03", "closed"],
        "poll_event keeps the order"
    );

    // Taken apart, messages come out in order, and the other events in order.
    let mut pair = Pair::new();
    pair.a.send(pair.now, SendArgs::new(), b"\x01").unwrap();
    pair.a.send(pair.now, SendArgs::new(), b"\x02").unwrap();
    pair.a.close(CloseCode::Normal, "bye");
    pair.flush();
    let received = pair.b.messages_received();
    assert_eq!(received, 2);
    assert!(matches!(pair.b.poll_other_event(), Some(Event::Closed(_))));
    assert_eq!(pair.b.poll_other_event().map(|_| ()), None);
    let payloads: Vec<u8> = std::iter::from_fn(|| pair.b.poll_message())
        .map(|m| m.payload[0])
        .collect();
    assert_eq!(payloads, [1, 2]);
    assert!(pair.b.poll_event().is_none());
}

#[test]
fn a_run_of_message_frames_is_handled_in_order_up_to_an_error() {
    let mut p = Pair::new();
    // Two one-shot messages, one with an extra header field (decoded by the general
    // decoder), a message with an unknown flag, then one that must be discarded.
    let mut wire = raw_message(1, 1, FLAG_OWNER | FLAG_LAST);
    wire.extend_from_slice(b"\x00\x00\x00\x07\x95\x01\x02\x02\x05\xa1x");
    wire.extend_from_slice(&raw_message(3, 3, FLAG_OWNER | FLAG_LAST));
    wire.extend_from_slice(&raw_message(4, 4, 0x08));
    wire.extend_from_slice(&raw_message(5, 5, FLAG_OWNER | FLAG_LAST));
    p.a.handle_input(p.now, &mut wire);
    assert!(wire.is_empty());
    let mut ids = Vec::new();
    while let Some(m) = p.a.poll_message() {
        ids.push(m.conversation.first);
    }
    assert_eq!(ids, [1, 2, 3]);
    assert_protocol_error(&mut p.a, |e| matches!(e, ProtocolError::Malformed(_)));
}

/// xorshift64*: a deterministic stream of pseudo-random numbers for the mutation test.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[test]
fn mutated_input_never_panics_and_ends_open_or_with_a_protocol_error() {
    // Valid traffic (one-shot messages, conversations, replies) with random bytes
    // overwritten, inserted or cut, fed in random chunks: the receiver must never panic,
    // and must either stay open or close with a protocol error, never anything else.
    let (mut stayed_open, mut closed_on_error) = (0, 0);
    for seed in 1..=400u64 {
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut p = Pair::new();
        let mut wire = BytesMut::new();
        for i in 0..12u8 {
            let payload = vec![i; (next_random(&mut rng) % 300) as usize];
            p.a.send(p.now, open(false, true), &payload).unwrap();
            if next_random(&mut rng) % 2 == 0 {
                p.a.send(p.now, open(true, false), b"one-shot").unwrap();
            }
            p.a.take_output(&mut wire);
        }
        let mut bytes = wire.to_vec();
        for _ in 0..1 + next_random(&mut rng) % 4 {
            let at = (next_random(&mut rng) as usize) % bytes.len();
            match next_random(&mut rng) % 3 {
                0 => bytes[at] = next_random(&mut rng) as u8,
                1 => bytes.insert(at, next_random(&mut rng) as u8),
                _ => bytes.truncate(at.max(1)),
            }
        }
        let mut buf = BytesMut::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = 1 + (next_random(&mut rng) as usize) % rest.len().min(97);
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            p.b.handle_input(p.now, &mut buf);
        }
        match closed(&mut p.b) {
            None => {
                assert!(p.b.is_open(), "seed {seed}: neither open nor closed");
                stayed_open += 1;
            }
            Some(CloseCause::Protocol(_)) => closed_on_error += 1,
            Some(other) => panic!("seed {seed}: closed with {other:?}"),
        }
    }
    // Both outcomes happen (a cut tail leaves it open; a bad byte in a header closes it).
    assert!(
        stayed_open > 0 && closed_on_error > 0,
        "{stayed_open} {closed_on_error}"
    );
}

#[test]
fn pings_from_a_peer_that_never_reads_coalesce_into_one_pong() {
    let mut pair = Pair::new();
    let mut pings = BytesMut::new();
    for _ in 0..10_000 {
        Frame::Ping.encode(&mut pings);
    }
    // The driver's write buffer still holds output the peer has not read.
    let mut unwritten = BytesMut::from(&b"pending"[..]);
    pair.a.handle_input(pair.now, &mut pings.clone());
    pair.a.take_output(&mut unwritten);
    assert_eq!(
        &unwritten[..],
        b"pending",
        "no pong while earlier output waits"
    );
    pair.a.handle_input(pair.now, &mut pings);
    assert!(pair.a.has_output());
    // Once the earlier output was written, one pong answers all 20,000 pings.
    let mut wire = BytesMut::new();
    pair.a.take_output(&mut wire);
    let mut pong = BytesMut::new();
    Frame::Pong.encode(&mut pong);
    assert_eq!(wire, pong);
    pair.a.take_output(&mut wire);
    assert_eq!(wire, pong, "the pong is owed once");
    assert!(pair.a.is_open());
}

#[test]
fn sends_wait_while_the_send_buffer_is_full_whatever_the_peer_window() {
    let small = Config {
        send_buffer: 1000,
        ..Config::default()
    };
    let mut pair = Pair::with(small, Config::default());
    // The peer announced 8 MiB of window but reads nothing: this side stops queueing once
    // 1,000 bytes wait.
    let mut sent = 0;
    let mut wire = BytesMut::new();
    loop {
        match pair.a.send(pair.now, SendArgs::new(), &[7u8; 100]) {
            Ok(_) => sent += 1,
            Err(SendRefused::NoCredit) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(sent, 10, "ten 105-byte frames reach 1,000 bytes");
    // The driver takes the output but cannot write it: still full.
    pair.a.take_output(&mut wire);
    pair.a.handle_written(wire.len());
    assert!(events(&mut pair.a).is_empty());
    assert_eq!(
        pair.a.send(pair.now, SendArgs::new(), &[7u8; 100]),
        Err(SendRefused::NoCredit)
    );
    // Written: the sender hears it may go on, and can.
    pair.b.handle_input(pair.now, &mut wire);
    pair.a.handle_written(0);
    assert!(matches!(events(&mut pair.a)[..], [Event::Writable]));
    pair.a.send(pair.now, SendArgs::new(), &[7u8; 100]).unwrap();
    pair.flush();
    assert_eq!(messages(&mut pair.b).len(), 11);
    assert!(pair.a.is_open() && pair.b.is_open());
}

#[test]
fn window_frames_coalesce_while_the_output_is_not_taken() {
    let small = Config {
        send_buffer: 1000,
        receive_window: 8192,
        max_frame_size: 4096,
        ..Config::default()
    };
    let mut pair = Pair::with(Config::default(), small);
    // b's driver reports output that its peer is not reading.
    pair.b.handle_written(5000);
    let mut released = 0u64;
    for _ in 0..4 {
        // 4 × 569 bytes of cost pass b's threshold of 2,048 (a quarter of its window).
        for _ in 0..4 {
            pair.a.send(pair.now, SendArgs::new(), &[0u8; 500]).unwrap();
        }
        let mut wire = BytesMut::new();
        pair.a.take_output(&mut wire);
        pair.b.handle_input(pair.now, &mut wire);
        for m in messages(&mut pair.b) {
            released += m.cost as u64;
            pair.b.release(m.cost);
        }
        // Credit past the threshold, but no window frame queued: one is owed.
        assert_eq!(pair.b.output_len(), 0);
        assert!(pair.b.has_output());
        // a gets its credit back only when b's output moves again.
        let mut wire = BytesMut::new();
        pair.b.handle_written(5000);
        let mut congested = BytesMut::from(&[0u8; 2000][..]);
        pair.b.take_output(&mut congested);
        assert_eq!(congested.len(), 2000, "held back while 2,000 bytes wait");
        pair.b.handle_written(0);
        pair.b.take_output(&mut wire);
        let mut one = BytesMut::new();
        Frame::Window(released).encode(&mut one);
        assert_eq!(wire, one, "one frame carries all the credit");
        pair.a.handle_input(pair.now, &mut wire);
        released = 0;
        pair.b.handle_written(5000);
    }
    assert!(pair.a.is_open() && pair.b.is_open());
}

/// A burst of tiny messages grows the queue of received messages to hold them all (within
/// the window). Draining it keeps that room (traffic in bursts would otherwise regrow it
/// after each); once the connection is idle, at this side's keepalive ping or the peer's,
/// its memory goes back down to a small reserve, rather than staying at its peak for the
/// connection's life.
#[test]
fn the_received_message_queue_gives_back_a_bursts_memory_when_the_connection_is_idle() {
    const BURST: usize = 100_000;
    let keepalive = Keepalive {
        interval: Duration::from_secs(2),
        timeout: Duration::from_secs(1),
    };
    let config = Config {
        keepalive: Some(keepalive),
        ..Config::default()
    };
    for pinged_by_peer in [false, true] {
        let (a, b) = if pinged_by_peer {
            // Only the sender pings: b learns the connection is idle from a's ping.
            (
                config.clone(),
                Config {
                    keepalive: None,
                    ..Config::default()
                },
            )
        } else {
            (
                Config {
                    keepalive: None,
                    ..Config::default()
                },
                config.clone(),
            )
        };
        let mut p = Pair::with(a, b);
        p.burst_of_tiny_messages(BURST);
        assert_eq!(p.b.messages.len(), BURST);
        let mut taken = 0;
        while let Some(m) = p.b.poll_message() {
            p.b.release(m.cost);
            taken += 1;
        }
        assert_eq!(taken, BURST);
        // Drained: the room stays, for the next burst.
        assert!(p.b.messages.capacity() >= BURST);
        // Quiet for the keepalive interval: a ping goes one way or the other.
        p.advance(Duration::from_secs(3));
        assert!(p.a.is_open() && p.b.is_open());
        assert!(
            p.b.messages.capacity() <= MESSAGES_KEPT,
            "{} entries kept (pinged by the peer: {pinged_by_peer})",
            p.b.messages.capacity()
        );
    }
}

/// A peer that keeps the connection from going idle (here with keepalive off on both sides,
/// so no ping ever comes; a frame more often than the keepalive interval does the same)
/// cannot keep a burst's room in the queue of received messages either: input that finds
/// the queue drained gives it back, at most once a second.
#[test]
fn the_received_message_queue_gives_back_a_bursts_memory_on_input_without_keepalive() {
    const BURST: usize = 100_000;
    let config = Config {
        keepalive: None,
        ..Config::default()
    };
    let mut p = Pair::with(config.clone(), config);
    p.burst_of_tiny_messages(BURST);
    while let Some(m) = p.b.poll_message() {
        p.b.release(m.cost);
    }
    // Drained; input within the second keeps the room (the next burst may be on its way).
    p.a.send(p.now, SendArgs::new(), &[7]).expect("sent");
    p.flush();
    assert!(p.b.poll_message().is_some());
    assert!(p.b.messages.capacity() >= BURST);
    // A second later, the next input finds the queue drained and gives the room back.
    p.advance(Duration::from_secs(1));
    p.a.send(p.now, SendArgs::new(), &[7]).expect("sent");
    p.flush();
    assert!(
        p.b.messages.capacity() <= MESSAGES_KEPT,
        "{} entries kept",
        p.b.messages.capacity()
    );
    assert!(p.b.poll_message().is_some());
    assert!(p.a.is_open() && p.b.is_open());
}
