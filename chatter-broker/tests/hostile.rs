//! The broker attacked as a hostile peer (or a client written from the documents alone)
//! would: envelopes built by hand over plain chatter-core connections, with wrong argument
//! types, invalid names, topics and patterns, references to nothing, limits pushed, and
//! subscribers that never read. Every offence gets a clear answer (or is dropped, for a
//! one-shot nobody may answer), the broker's own counters stay within what
//! docs/SECURITY.md states, and a well-behaved client is served meanwhile.

mod common;

use std::time::Duration;

use chatter_broker::{AccessControl, Broker, BrokerOptions, BrokerStats, PeerInfo};
use chatter_core::{Connection, Msg, Options, SendOptions};
use chatter_msgpack::{self as msgpack, Reader};
use common::{calc, CalculatorClient, CalculatorServer};
use tokio::time::timeout;

const BROKER: &str = "chatter.broker";

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    timeout(Duration::from_secs(10), f).await.expect("in time")
}

async fn listen(options: BrokerOptions) -> Broker {
    Broker::listen("tcp://127.0.0.1:0", options)
        .await
        .expect("listen")
}

async fn raw(broker: &Broker) -> Connection {
    chatter_core::connect(&broker.addresses()[0], Options::default())
        .await
        .expect("connect")
}

fn encoded<T: serde::Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    msgpack::encode(&mut out, value).expect("encodes");
    out
}

/// `[kind, object, method, ms, …extra, args]` with `args` (and `extra`) encoded already.
fn request(
    kind: u64,
    object: &str,
    method: &str,
    ms: u64,
    extra: &[&[u8]],
    args: &[u8],
) -> Vec<u8> {
    let mut p = Vec::new();
    msgpack::write_array_len(&mut p, 5 + extra.len() as u32);
    msgpack::write_uint(&mut p, kind);
    msgpack::write_str(&mut p, object);
    msgpack::write_str(&mut p, method);
    msgpack::write_uint(&mut p, ms);
    for e in extra {
        p.extend_from_slice(e);
    }
    p.extend_from_slice(args);
    p
}

/// A plain call of the broker's `method`, deadline 5 s.
fn call(method: &str, args: &[u8]) -> Vec<u8> {
    request(0, BROKER, method, 5000, &[], args)
}

/// A stream call of the broker's `method`, deadline 5 s.
fn stream_call(method: &str, window: u64, args: &[u8]) -> Vec<u8> {
    let mut w = Vec::new();
    msgpack::write_uint(&mut w, window);
    request(12, BROKER, method, 5000, &[&w], args)
}

/// Sends a request (it passes the turn) and returns the broker's first message in its
/// conversation.
async fn ask(conn: &Connection, payload: &[u8]) -> Msg {
    let conv = conn
        .send_bytes(payload, SendOptions::new().last(false))
        .await
        .expect("sent");
    let reply = within(conn.receive()).await.expect("answered");
    assert_eq!(reply.conversation, conv, "{payload:x?}");
    reply
}

/// What a reply says, in a form a test compares.
#[derive(Debug, PartialEq, Eq)]
enum Said {
    /// `[0, …]`.
    Ok,
    /// `[1, [message, []], {"Variant": …}]`: the variant.
    App(String),
    /// `[2, kind, message]`.
    Failure(u64),
}

fn said(payload: &[u8]) -> Said {
    let mut r = Reader::new(payload);
    r.read_array_len().expect("an array");
    match r.read_uint().expect("a status") {
        0 => Said::Ok,
        1 => {
            r.skip_value(16).expect("message");
            r.read_map_len().expect("an error variant");
            Said::App(r.read_str().expect("its name").to_owned())
        }
        2 => Said::Failure(r.read_uint().expect("a kind")),
        other => panic!("status {other}"),
    }
}

/// Waits until the broker's counters satisfy `ok` (they change as its tasks run).
async fn until(broker: &Broker, ok: impl Fn(&BrokerStats) -> bool) -> BrokerStats {
    within(async {
        loop {
            let stats = broker.stats();
            if ok(&stats) {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
}

/// A bus that serves `calc` as `name`, and a client of it through the broker: the
/// well-behaved client every attack must leave served.
async fn bystander(broker: &Broker, name: &str) -> (chatter_broker::Bus, CalculatorClient) {
    let address = broker.addresses()[0].clone();
    let bus = chatter_broker::connect(&address, name).await.expect("bus");
    let (calc, _probe) = calc();
    bus.register("calc", CalculatorServer::new(calc));
    let client = CalculatorClient::new(&bus.peer(name), "calc");
    (bus, client)
}

/// Every request of the broker's own with wrong arguments, a wrong kind, an invalid name,
/// pattern or topic, or a deadline already over, is answered with the failure or
/// application error chatter-rpc's PROTOCOL.md ("The broker", "Durations") gives; nothing
/// is registered or subscribed by them, their credit all comes back, and a bystander is
/// served meanwhile (its calls to itself go through the broker too).
#[tokio::test]
async fn the_brokers_own_methods_answer_every_bad_request_clearly() {
    let broker = listen(BrokerOptions::default()).await;
    let (_bus, good) = bystander(&broker, "good").await;
    let hostile = raw(&broker).await;
    let long = "n".repeat(256);
    let deep_bad = format!("{}#/x", "a/".repeat(100));
    let huge = "t".repeat(1025);
    let bad_utf8: &[u8] = &[0x92, 0xa2, 0xff, 0xfe, 0x01];
    let mut options_bogus = Vec::new();
    msgpack::write_array_len(&mut options_bogus, 2);
    msgpack::write_str(&mut options_bogus, "a");
    options_bogus.extend_from_slice(&encoded(&std::collections::BTreeMap::from([(
        "policy", "bogus",
    )])));
    let mut options_negative = Vec::new();
    msgpack::write_array_len(&mut options_negative, 2);
    msgpack::write_str(&mut options_negative, "a");
    msgpack::write_map_len(&mut options_negative, 1);
    msgpack::write_str(&mut options_negative, "queue_bytes");
    msgpack::write_sint(&mut options_negative, -1);
    use Said::{App, Failure};
    let cases: Vec<(&str, Vec<u8>, Said)> = vec![
        // register(name: str, take_over: bool)
        ("register()", call("register", &encoded(&())), Failure(5)),
        (
            "register(7, true)",
            call("register", &encoded(&(7, true))),
            Failure(5),
        ),
        (
            "register(\"x\")",
            call("register", &encoded(&("x",))),
            Failure(5),
        ),
        (
            "register(\"x\", 1)",
            call("register", &encoded(&("x", 1))),
            Failure(5),
        ),
        (
            "register(bad utf-8)",
            call("register", &[0x92, 0xa2, 0xff, 0xfe, 0xc2]),
            Failure(5),
        ),
        (
            "register empty",
            call("register", &encoded(&("", false))),
            App("InvalidName".into()),
        ),
        (
            "register a/b",
            call("register", &encoded(&("a/b", false))),
            App("InvalidName".into()),
        ),
        (
            "register NUL",
            call("register", &encoded(&("a\0b", false))),
            App("InvalidName".into()),
        ),
        (
            "register 256 bytes",
            call("register", &encoded(&(&long, false))),
            App("InvalidName".into()),
        ),
        // A name with `*` could never be called: a call to `x*/…` is a broadcast.
        (
            "register x*",
            call("register", &encoded(&("sensor-*", false))),
            App("InvalidName".into()),
        ),
        (
            "register as a stream call",
            stream_call("register", 100, &encoded(&("x", false))),
            Failure(7),
        ),
        (
            "register, deadline 0",
            request(0, BROKER, "register", 0, &[], &encoded(&("late", false))),
            Failure(1),
        ),
        // authenticate(credential: str)
        (
            "authenticate()",
            call("authenticate", &encoded(&())),
            Failure(5),
        ),
        (
            "authenticate(5)",
            call("authenticate", &encoded(&(5,))),
            Failure(5),
        ),
        (
            "authenticate(junk)",
            call("authenticate", &encoded(&("junk",))),
            Said::Ok,
        ),
        // subscribe(pattern, options?)
        (
            "subscribe as a call",
            call("subscribe", &encoded(&("a",))),
            Failure(7),
        ),
        (
            "subscribe()",
            stream_call("subscribe", 4096, &encoded(&())),
            Failure(5),
        ),
        (
            "subscribe(5)",
            stream_call("subscribe", 4096, &encoded(&(5,))),
            Failure(5),
        ),
        (
            "subscribe(a, b, c)",
            stream_call("subscribe", 4096, &encoded(&("a", "b", "c"))),
            Failure(5),
        ),
        (
            "subscribe(bad utf-8)",
            stream_call("subscribe", 4096, &[0x91, 0xa2, 0xff, 0xfe]),
            Failure(5),
        ),
        (
            "subscribe(a, \"x\")",
            stream_call("subscribe", 4096, &encoded(&("a", "x"))),
            Failure(5),
        ),
        (
            "subscribe policy bogus",
            stream_call("subscribe", 4096, &options_bogus),
            Failure(5),
        ),
        (
            "subscribe queue_bytes -1",
            stream_call("subscribe", 4096, &options_negative),
            Failure(5),
        ),
        (
            "subscribe ''",
            stream_call("subscribe", 4096, &encoded(&("",))),
            App("InvalidPattern".into()),
        ),
        (
            "subscribe a+",
            stream_call("subscribe", 4096, &encoded(&("a+",))),
            App("InvalidPattern".into()),
        ),
        (
            "subscribe # not last",
            stream_call("subscribe", 4096, &encoded(&(&deep_bad,))),
            App("InvalidPattern".into()),
        ),
        (
            "subscribe NUL",
            stream_call("subscribe", 4096, &encoded(&("a/\0",))),
            App("InvalidPattern".into()),
        ),
        (
            "subscribe 1025 bytes",
            stream_call("subscribe", 4096, &encoded(&(&huge,))),
            App("InvalidPattern".into()),
        ),
        (
            "subscribe, deadline 0",
            request(12, BROKER, "subscribe", 0, &[&[0x10]], &encoded(&("a",))),
            Failure(1),
        ),
        // publish(topic, value), acknowledged
        ("publish()", call("publish", &encoded(&())), Failure(5)),
        ("publish(t)", call("publish", &encoded(&("t",))), Failure(5)),
        (
            "publish(5, 1)",
            call("publish", &encoded(&(5, 1))),
            Failure(5),
        ),
        (
            "publish(bad utf-8, 1)",
            call("publish", bad_utf8),
            Failure(5),
        ),
        (
            "publish, trailing bytes",
            call("publish", &[0x92, 0xa1, 0x74, 0x01, 0x01]),
            Failure(5),
        ),
        (
            "publish on $broker",
            call("publish", &encoded(&("$broker/presence/x", 1))),
            App("InvalidTopic".into()),
        ),
        (
            "publish on a/+",
            call("publish", &encoded(&("a/+", 1))),
            App("InvalidTopic".into()),
        ),
        (
            "publish on ''",
            call("publish", &encoded(&("", 1))),
            App("InvalidTopic".into()),
        ),
        (
            "publish on NUL",
            call("publish", &encoded(&("a\0", 1))),
            App("InvalidTopic".into()),
        ),
        (
            "publish on 1025 bytes",
            call("publish", &encoded(&(&huge, 1))),
            App("InvalidTopic".into()),
        ),
        (
            "publish as a stream call",
            stream_call("publish", 100, &encoded(&("t", 1))),
            Failure(7),
        ),
        (
            "publish, deadline 0",
            request(0, BROKER, "publish", 0, &[], &encoded(&("t", 1))),
            Failure(1),
        ),
        // the rest of the broker's object, and routing
        (
            "stats(junk)",
            call("stats", &encoded(&("junk", 1))),
            Said::Ok,
        ),
        ("no such method", call("nope", &encoded(&())), Failure(4)),
        (
            "no such object",
            request(0, "nope", "x", 5000, &[], &encoded(&())),
            Failure(3),
        ),
        (
            "no such peer",
            request(0, "ghost/calc", "add", 5000, &[], &encoded(&(1, 2))),
            Failure(11),
        ),
        (
            "a call to a name pattern",
            request(0, "go*/calc", "add", 5000, &[], &encoded(&(1, 2))),
            Failure(7),
        ),
        (
            "negative duration",
            vec![0x95, 0x00, 0xa1, 0x78, 0xa1, 0x79, 0xd0, 0x80, 0x90],
            Failure(7),
        ),
        (
            "float duration",
            vec![0x95, 0x00, 0xa1, 0x78, 0xa1, 0x79, 0xca, 0, 0, 0, 0, 0x90],
            Failure(7),
        ),
        (
            "kind 99",
            vec![0x95, 0x63, 0xa1, 0x78, 0xa1, 0x79, 0x01, 0x90],
            Failure(7),
        ),
        (
            "kind 2^64-1",
            vec![
                0x92, 0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
            Failure(7),
        ),
        (
            "a map, not an array",
            encoded(&std::collections::BTreeMap::from([(0, 1)])),
            Failure(7),
        ),
    ];
    for (what, payload, expected) in &cases {
        let reply = ask(&hostile, payload).await;
        assert!(reply.last, "{what}: the answer ends the conversation");
        assert_eq!(&said(&reply.payload), expected, "{what}");
        // The bystander, between every two offences.
        assert_eq!(
            within(good.add(2, 3)).await.expect("served"),
            5,
            "after {what}"
        );
    }
    assert_eq!(
        broker.names(),
        ["good"],
        "nothing registered by the offences"
    );
    let stats = until(&broker, |s| s.held_bytes == 0 && s.queued == 0).await;
    assert_eq!(stats.subscriptions, 0, "{stats:?}");
}

/// `[kind, call, …]` one-shots (cancel, grant, argument stream) and acks that name nothing
/// of the sender's are dropped, not answered and not fatal; grants that overflow a
/// subscription's credit saturate; a subscription still delivers after all of it.
#[tokio::test]
async fn references_to_nothing_are_dropped_and_grants_saturate() {
    let broker = listen(BrokerOptions::default()).await;
    let (_bus, good) = bystander(&broker, "good").await;
    let hostile = raw(&broker).await;
    let sub = ask(
        &hostile,
        &stream_call("subscribe", 4096, &encoded(&("t/#",))),
    )
    .await;
    assert_eq!(said(&sub.payload), Said::Ok);
    let call = sub.conversation.first_id();
    let before = broker.stats().discarded;
    let one_shots: Vec<Vec<u8>> = vec![
        encoded(&(2, 987_654u64)),       // cancel, unknown call
        encoded(&(2, u64::MAX)),         // cancel, the largest id
        encoded(&(15, 987_654u64, 100)), // grant, unknown call
        encoded(&(14, 987_654u64)),      // argument stream opening, as a one-shot
        encoded(&(4, 31u64, 1, 0)),      // ack, unknown stream
        encoded(&(15, call, u64::MAX)),  // grants that overflow the credit
        encoded(&(15, call, u64::MAX)),
        encoded(&(14, call)), // an argument stream for a subscription
    ];
    for payload in &one_shots {
        hostile
            .send_bytes(payload, SendOptions::new())
            .await
            .expect("sent");
    }
    // Nothing answers them: the next message this connection gets is its publication.
    let publish = call_publish("t/1", 7);
    hostile
        .send_bytes(&publish, SendOptions::new())
        .await
        .expect("sent");
    let item = within(hostile.receive()).await.expect("item");
    assert_eq!(item.conversation, sub.conversation);
    assert_eq!(
        &item.payload[..],
        &[0x92, 0x03, 0x92, 0xa3, b't', b'/', b'1', 0x07]
    );
    assert_eq!(within(good.add(1, 1)).await.expect("served"), 2);
    let stats = until(&broker, |s| s.held_bytes == 0).await;
    assert!(
        stats.discarded >= before + 6,
        "the one-shots naming nothing are counted: {stats:?}"
    );
    assert_eq!(stats.subscriptions, 1);
}

/// `publish(topic, value)` as a signal, TTL 5 s.
fn call_publish(topic: &str, value: u64) -> Vec<u8> {
    request(1, BROKER, "publish", 5000, &[], &encoded(&(topic, value)))
}

/// A peer that subscribes and cancels in a tight loop (pipelined, without waiting for the
/// answers), then fills its subscriptions to the limit and asks one more, leaves nothing
/// behind: the subscriptions it cancelled are gone, the one over the limit is refused with
/// `TooManySubscriptions`, and its close takes the rest.
#[tokio::test]
async fn subscribing_and_cancelling_in_a_loop_leaves_nothing_behind() {
    let broker = listen(BrokerOptions::default().max_subscriptions_per_peer(8)).await;
    let (_bus, good) = bystander(&broker, "good").await;
    let hostile = raw(&broker).await;
    const ROUNDS: usize = 300;
    let subscribe = stream_call("subscribe", 4096, &encoded(&("churn/+",)));
    for _ in 0..ROUNDS {
        let conv = hostile
            .send_bytes(&subscribe, SendOptions::new().last(false))
            .await
            .expect("sent");
        hostile
            .send_bytes(&encoded(&(2, conv.first_id())), SendOptions::new())
            .await
            .expect("sent");
    }
    // Each gets its opening and then its end (failure 2, `last`), in that order.
    let mut ended = 0;
    while ended < ROUNDS {
        let msg = within(hostile.receive()).await.expect("answers");
        if msg.last {
            assert_eq!(said(&msg.payload), Said::Failure(2));
            ended += 1;
        } else {
            assert_eq!(said(&msg.payload), Said::Ok);
        }
    }
    assert_eq!(broker.stats().subscriptions, 0);
    for i in 0..8 {
        let sub = ask(
            &hostile,
            &stream_call("subscribe", 4096, &encoded(&(format!("k/{i}"),))),
        )
        .await;
        assert_eq!(said(&sub.payload), Said::Ok);
    }
    let over = ask(&hostile, &subscribe).await;
    assert_eq!(
        said(&over.payload),
        Said::App("TooManySubscriptions".into())
    );
    assert!(over.last);
    assert_eq!(broker.stats().subscriptions, 8);
    assert_eq!(within(good.add(1, 1)).await.expect("served"), 2);
    hostile.close().await;
    let stats = until(&broker, |s| s.subscriptions == 0 && s.connections == 1).await;
    assert_eq!(stats.queued_publication_bytes, 0, "{stats:?}");
}

/// The peers the broker knows, as `peers()` tells them (asked by hand).
async fn peers(conn: &Connection) -> Vec<PeerInfo> {
    let reply = ask(conn, &call("peers", &encoded(&()))).await;
    let (status, peers): (u8, Vec<PeerInfo>) =
        msgpack::decode(&reply.payload).expect("a peer list");
    assert_eq!(status, 0);
    peers
}

/// Subscribers that never read and never grant, one per policy that queues, each asking
/// for far more `queue_bytes` than the broker allows: a publisher floods them, and what
/// waits for each stays within the broker's `max_subscription_queue` (docs/SECURITY.md,
/// "publications waiting for one of its subscriptions"), by the broker's own counters;
/// the publisher is never held up, and a bystander is served.
#[tokio::test]
async fn never_reading_subscribers_hold_no_more_than_the_brokers_cap() {
    const CAP: usize = 16 * 1024;
    let broker = listen(BrokerOptions::default().max_subscription_queue(CAP)).await;
    let (_bus, good) = bystander(&broker, "good").await;
    let publisher = raw(&broker).await;
    let mut subscribers = Vec::new();
    for policy in ["drop_oldest", "drop_newest", "end"] {
        let conn = raw(&broker).await;
        let mut args = Vec::new();
        msgpack::write_array_len(&mut args, 2);
        msgpack::write_str(&mut args, "flood/#");
        msgpack::write_map_len(&mut args, 2);
        msgpack::write_str(&mut args, "policy");
        msgpack::write_str(&mut args, policy);
        msgpack::write_str(&mut args, "queue_bytes");
        msgpack::write_uint(&mut args, u64::MAX);
        // A window of two items: then it never grants (nor reads beyond the opening).
        let opening = ask(&conn, &stream_call("subscribe", 2 * (64 + 200), &args)).await;
        assert_eq!(said(&opening.payload), Said::Ok, "{policy}");
        subscribers.push((policy, conn));
    }
    let value = "v".repeat(100);
    for i in 0..1000 {
        let p = request(
            1,
            BROKER,
            "publish",
            60_000,
            &[],
            &encoded(&(format!("flood/{i}"), &value)),
        );
        publisher
            .send_bytes(&p, SendOptions::new())
            .await
            .expect("the publisher is never held up");
    }
    // An acknowledged publication nobody subscribed to, after the flood: the broker takes
    // a connection's messages in order, so its report means the flood was taken.
    let report = ask(&publisher, &call("publish", &encoded(&("barrier", 1)))).await;
    assert_eq!(said(&report.payload), Said::Ok);
    let stats = broker.stats();
    assert!(
        stats.queued_publication_bytes <= 2 * CAP as u64,
        "two queueing subscriptions of at most {CAP} bytes: {stats:?}"
    );
    for info in peers(&publisher).await {
        for sub in info.subscriptions {
            assert!(sub.queued_bytes <= CAP as u64, "{sub:?}");
        }
    }
    assert!(stats.dropped_deliveries > 1000, "{stats:?}");
    assert_eq!(within(good.add(2, 2)).await.expect("served"), 4);
    // The `end` subscriber's stream ended with failure 14, after its two items.
    let (_, end) = &subscribers[2];
    let mut last = None;
    while last.is_none() {
        let msg = within(end.receive()).await.expect("items, then the end");
        if msg.last {
            last = Some(said(&msg.payload));
        }
    }
    assert_eq!(last, Some(Said::Failure(14)));
}

/// Patterns and topics at the length limit made of empty levels (1025 of them): matched,
/// delivered and removed like any other, no deep recursion trouble.
#[tokio::test]
async fn the_deepest_patterns_and_topics_work() {
    let broker = listen(BrokerOptions::default()).await;
    let conn = raw(&broker).await;
    let deep = "/".repeat(1024);
    let mut hash = "/".repeat(1022);
    hash.push('#');
    let mut plus = "+/".repeat(511);
    plus.push('+');
    for pattern in [&deep, &hash] {
        let sub = ask(
            &conn,
            &stream_call("subscribe", 1 << 20, &encoded(&(pattern,))),
        )
        .await;
        assert_eq!(said(&sub.payload), Said::Ok);
    }
    let sub = ask(
        &conn,
        &stream_call("subscribe", 1 << 20, &encoded(&(&plus,))),
    )
    .await;
    assert_eq!(said(&sub.payload), Said::Ok);
    let publisher = raw(&broker).await;
    let report = ask(&publisher, &call("publish", &encoded(&(&deep, 1)))).await;
    let (status, report): (u8, chatter_broker::PublishReport) =
        msgpack::decode(&report.payload).expect("a report");
    assert_eq!((status, report.subscribers, report.delivered), (0, 2, 2));
    let topic = "a/".repeat(511) + "a";
    let report = ask(&publisher, &call("publish", &encoded(&(&topic, 1)))).await;
    let (_, report): (u8, chatter_broker::PublishReport) =
        msgpack::decode(&report.payload).expect("a report");
    assert_eq!((report.subscribers, report.delivered), (1, 1));
    conn.close().await;
    until(&broker, |s| s.subscriptions == 0 && s.connections == 1).await;
}

/// With `max_topic_len` raised (an operator's choice), one peer's pattern and topic of
/// 200,000 empty levels: subscribed, matched, delivered and removed with its connection.
/// (The topic trie recursed once per level: this overflowed the stack and aborted the
/// whole broker.)
#[tokio::test]
async fn a_pattern_deeper_than_any_stack_does_not_abort_the_broker() {
    let broker = listen(BrokerOptions::default().max_topic_len(1 << 20)).await;
    let conn = raw(&broker).await;
    let deep = "/".repeat(200_000);
    let sub = ask(
        &conn,
        &stream_call("subscribe", 1 << 20, &encoded(&(&deep,))),
    )
    .await;
    assert_eq!(said(&sub.payload), Said::Ok);
    let publisher = raw(&broker).await;
    let report = ask(&publisher, &call("publish", &encoded(&(&deep, 1)))).await;
    let (status, report): (u8, chatter_broker::PublishReport) =
        msgpack::decode(&report.payload).expect("a report");
    assert_eq!((status, report.subscribers, report.delivered), (0, 1, 1));
    conn.close().await;
    until(&broker, |s| s.subscriptions == 0 && s.connections == 1).await;
}

/// A reliable signal `[3, stream, seq, object, method, ttl, args]`, TTL 5 s.
fn reliable(stream: u64, seq: u64, object: &str, method: &str, args: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    msgpack::write_array_len(&mut p, 7);
    msgpack::write_uint(&mut p, 3);
    msgpack::write_uint(&mut p, stream);
    msgpack::write_uint(&mut p, seq);
    msgpack::write_str(&mut p, object);
    msgpack::write_str(&mut p, method);
    msgpack::write_uint(&mut p, 5000);
    p.extend_from_slice(args);
    p
}

/// Under access control, what a peer's rules deny is refused in every form it can take
/// (call: failure 15; reliable signal: acked *failed*; signal: dropped), each counted in
/// `denied`; junk and unknown credentials do not change who a connection is; and what
/// its rules allow still works.
#[tokio::test]
async fn denials_of_every_kind_are_clear_counted_and_change_nothing() {
    let access = AccessControl::parse(
        "credential good-token writer   # the only credential\n\
         identity writer publish w/#\n\
         identity writer subscribe w/#\n\
         identity writer call svc\n",
    )
    .expect("rules");
    let broker = listen(BrokerOptions::default().access_control(access)).await;
    let conn = raw(&broker).await;
    let anonymous: Vec<(&str, Vec<u8>)> = vec![
        ("register", call("register", &encoded(&("x", false)))),
        (
            "subscribe",
            stream_call("subscribe", 4096, &encoded(&("w/#",))),
        ),
        ("publish", call("publish", &encoded(&("w/1", 1)))),
        ("stats", call("stats", &encoded(&()))),
        ("peers", call("peers", &encoded(&()))),
        (
            "introspect stats",
            request(0, "chatter.introspect", "stats", 5000, &[], &encoded(&())),
        ),
        ("call", request(0, "svc/obj", "m", 5000, &[], &encoded(&()))),
    ];
    for (what, payload) in &anonymous {
        let reply = ask(&conn, payload).await;
        assert_eq!(said(&reply.payload), Said::Failure(15), "anonymous {what}");
    }
    let mut count = anonymous.len() as u64;
    assert_eq!(broker.stats().denied, count);

    let who = ask(&conn, &call("authenticate", &encoded(&("good-token",)))).await;
    let (status, identity): (u8, String) = msgpack::decode(&who.payload).expect("an identity");
    assert_eq!((status, identity.as_str()), (0, "writer"));
    // Junk, and an unknown credential: refused, and the connection is still `writer`.
    let junk = ask(&conn, &call("authenticate", &encoded(&(7,)))).await;
    assert_eq!(said(&junk.payload), Said::Failure(5));
    let unknown = ask(&conn, &call("authenticate", &encoded(&("bad-token",)))).await;
    assert_eq!(said(&unknown.payload), Said::Failure(15));
    count += 1;
    let mut backpressure = Vec::new();
    msgpack::write_array_len(&mut backpressure, 2);
    msgpack::write_str(&mut backpressure, "w/#");
    msgpack::write_map_len(&mut backpressure, 1);
    msgpack::write_str(&mut backpressure, "policy");
    msgpack::write_str(&mut backpressure, "backpressure");
    let refused = ask(&conn, &stream_call("subscribe", 4096, &backpressure)).await;
    assert_eq!(said(&refused.payload), Said::Failure(15), "backpressure");
    count += 1;
    let wide = ask(&conn, &stream_call("subscribe", 4096, &encoded(&("#",)))).await;
    assert_eq!(said(&wide.payload), Said::Failure(15), "wider than allowed");
    count += 1;
    let sub = ask(&conn, &stream_call("subscribe", 4096, &encoded(&("w/#",)))).await;
    assert_eq!(said(&sub.payload), Said::Ok, "allowed");
    let publish = ask(&conn, &call("publish", &encoded(&("x/1", 1)))).await;
    assert_eq!(
        said(&publish.payload),
        Said::Failure(15),
        "publish elsewhere"
    );
    count += 1;

    // Reliable signals: denied ones acked failed (2), allowed ones acked (0).
    let acks = [
        (reliable(5, 1, BROKER, "publish", &encoded(&("x/1", 1))), 2),
        (reliable(5, 2, "other/obj", "m", &encoded(&())), 2),
        (reliable(5, 3, BROKER, "publish", &encoded(&("w/1", 1))), 0),
    ];
    count += 2;
    let mut item = None;
    for (payload, status) in acks {
        conn.send_bytes(&payload, SendOptions::new())
            .await
            .expect("sent");
        loop {
            let msg = within(conn.receive()).await.expect("an ack");
            if msg.conversation == sub.conversation {
                item = Some(msg);
                continue;
            }
            let (kind, stream, _seq, got): (u8, u64, u64, u64) =
                msgpack::decode(&msg.payload).expect("an ack");
            assert_eq!((kind, stream, got), (4, 5, status));
            break;
        }
    }
    // A plain signal that is denied is dropped: the next item is the allowed one after it.
    conn.send_bytes(&call_publish("x/2", 2), SendOptions::new())
        .await
        .expect("sent");
    count += 1;
    conn.send_bytes(&call_publish("w/2", 2), SendOptions::new())
        .await
        .expect("sent");
    let mut topics = Vec::new();
    if let Some(item) = item {
        topics.push(item.payload.to_vec());
    }
    while topics.len() < 2 {
        let msg = within(conn.receive()).await.expect("items");
        assert_eq!(msg.conversation, sub.conversation);
        topics.push(msg.payload.to_vec());
    }
    assert_eq!(
        topics,
        [
            vec![0x92, 0x03, 0x92, 0xa3, b'w', b'/', b'1', 0x01],
            vec![0x92, 0x03, 0x92, 0xa3, b'w', b'/', b'2', 0x02]
        ]
    );
    assert_eq!(broker.stats().denied, count);
}

/// A rule file with a mistake is refused with the line named, never half-read.
#[test]
fn malformed_rule_files_are_refused_with_their_line() {
    for (text, line) in [
        ("identity x publish a/#/b", 1),
        ("identity x subscribe a+", 1),
        ("# fine\nidentity x", 2),
        ("credential lonely", 1),
        ("credential a b c", 1),
        ("identity x subscribe + extra", 1),
        ("identity x publish", 1),
        ("anonymous register", 1),
        ("anonymous frobnicate x", 1),
        ("\n\nbogus", 3),
        ("identity x introspect please", 1),
        // After a `#` pattern, a comment needs its own `#`.
        ("identity x subscribe # everything", 1),
    ] {
        match AccessControl::parse(text) {
            Err(why) => assert!(why.starts_with(&format!("line {line}:")), "{text:?}: {why}"),
            Ok(_) => panic!("{text:?} was accepted"),
        }
    }
    assert!(AccessControl::parse("identity x subscribe # # everything\n\n# a comment\n").is_ok());
}

/// A broadcast to a pattern that matches 40 peers that never read: each destination gets
/// at most 1 024 messages queued (docs/SECURITY.md, "broadcast copies waiting for one
/// destination"), the copies beyond are dropped and counted, the sender is not held up,
/// and a bystander is served.
#[tokio::test]
async fn a_broadcast_to_peers_that_never_read_is_bounded_per_destination() {
    let broker = listen(BrokerOptions::default()).await;
    let (_bus, good) = bystander(&broker, "good").await;
    let small = Options::default().max_frame_size(2048).receive_window(4096);
    let mut silent = Vec::new();
    for i in 0..40 {
        let conn = chatter_core::connect(&broker.addresses()[0], small.clone())
            .await
            .expect("connect");
        let reply = ask(
            &conn,
            &call("register", &encoded(&(format!("n-{i}"), false))),
        )
        .await;
        assert_eq!(said(&reply.payload), Said::Ok);
        silent.push(conn); // and never read again
    }
    let sender = raw(&broker).await;
    const SIGNALS: u64 = 3000;
    for i in 0..SIGNALS {
        let signal = request(1, "n-*/obj", "m", 60_000, &[], &encoded(&(i,)));
        within(sender.send_bytes(&signal, SendOptions::new()))
            .await
            .expect("the sender is not held up");
    }
    // Taken in order: once this is answered, every broadcast before it was.
    let barrier = ask(&sender, &call("publish", &encoded(&("barrier", 1)))).await;
    assert_eq!(said(&barrier.payload), Said::Ok);
    let stats = broker.stats();
    assert_eq!(stats.broadcasts, SIGNALS);
    let mut seen = 0;
    for peer in peers(&sender).await {
        if peer.name.as_deref().is_some_and(|n| n.starts_with("n-")) {
            assert!(peer.queued <= 1024, "{peer:?}");
            seen += 1;
        }
    }
    assert_eq!(seen, 40);
    assert!(
        stats.discarded >= 40 * (SIGNALS - 1024 - 100),
        "copies beyond the backlog are dropped and counted: {stats:?}"
    );
    assert_eq!(within(good.add(3, 4)).await.expect("served"), 7);
    drop(silent);
}

/// Reliable signals on 1 025 streams to one destination: the 1 025th (stream, destination)
/// pair is over the broker's limit of 1 024 per connection and acked *failed* at once by
/// the broker; the others reach the callee and are acked by it.
#[tokio::test]
async fn reliable_signal_streams_beyond_the_limit_are_acked_failed() {
    let broker = listen(BrokerOptions::default()).await;
    let (_bus, good) = bystander(&broker, "good").await;
    let sender = raw(&broker).await;
    for stream in 1..=1025u64 {
        let signal = reliable(stream, 1, "good/calc", "note", &encoded(&("x",)));
        sender
            .send_bytes(&signal, SendOptions::new())
            .await
            .expect("sent");
    }
    let mut failed = Vec::new();
    for _ in 0..1025 {
        let msg = within(sender.receive()).await.expect("an ack");
        let (kind, stream, seq, status): (u8, u64, u64, u64) =
            msgpack::decode(&msg.payload).expect("an ack");
        assert_eq!((kind, seq), (4, 1));
        if status != 0 {
            failed.push((stream, status));
        }
    }
    assert_eq!(failed, [(1025, 2)]);
    assert_eq!(within(good.add(1, 2)).await.expect("served"), 3);
}

/// A subscriber whose frames are small (2 KiB; chatter-core allows down to 64 bytes):
/// publications that waited for its credit go out in batches that fit its frames, and
/// one publication larger than its frames is dropped and told as `missed`. (Batches
/// gathered up to 8 KiB whatever the subscriber's frames: each was refused as too large
/// and its items lost, silently: 102 of these 103 publications.)
#[tokio::test]
async fn a_subscriber_with_small_frames_gets_every_publication_or_is_told() {
    let broker = listen(BrokerOptions::default()).await;
    let small = Options::default()
        .max_frame_size(2048)
        .receive_window(1 << 20);
    let subscriber = chatter_core::connect(&broker.addresses()[0], small)
        .await
        .expect("connect");
    // A window for one item: the rest wait in the broker until the grant below.
    let sub = ask(
        &subscriber,
        &stream_call("subscribe", 300, &encoded(&("s/#",))),
    )
    .await;
    assert_eq!(said(&sub.payload), Said::Ok);
    let publisher = raw(&broker).await;
    let value = "v".repeat(100);
    for i in 0..100u64 {
        let p = request(
            1,
            BROKER,
            "publish",
            60_000,
            &[],
            &encoded(&(format!("s/{i}"), &value)),
        );
        publisher
            .send_bytes(&p, SendOptions::new())
            .await
            .expect("sent");
    }
    // One larger than the subscriber's frames, then one more small one.
    let large = "L".repeat(4000);
    let p = request(
        1,
        BROKER,
        "publish",
        60_000,
        &[],
        &encoded(&("s/large", &large)),
    );
    publisher
        .send_bytes(&p, SendOptions::new())
        .await
        .expect("sent");
    let p = request(
        1,
        BROKER,
        "publish",
        60_000,
        &[],
        &encoded(&("s/after", &value)),
    );
    publisher
        .send_bytes(&p, SendOptions::new())
        .await
        .expect("sent");
    let barrier = ask(&publisher, &call("publish", &encoded(&("barrier", 1)))).await;
    assert_eq!(said(&barrier.payload), Said::Ok);
    let grant = encoded(&(15, sub.conversation.first_id(), 1u64 << 30));
    subscriber
        .send_bytes(&grant, SendOptions::new())
        .await
        .expect("sent");
    let mut topics = Vec::new();
    let mut missed = 0;
    while !topics.iter().any(|t: &String| t == "s/after") {
        let msg = within(subscriber.receive()).await.expect("items");
        assert_eq!(msg.conversation, sub.conversation);
        assert!(
            !msg.last,
            "the subscription goes on: {:?}",
            said(&msg.payload)
        );
        let mut r = Reader::new(&msg.payload);
        let n = r.read_array_len().expect("an array");
        assert_eq!(r.read_uint().expect("kind"), 3);
        for _ in 1..n {
            let len = r.read_array_len().expect("an item");
            topics.push(r.read_str().expect("topic").to_owned());
            r.skip_value(16).expect("value");
            if len == 3 {
                missed += r.read_uint().expect("missed");
            }
        }
    }
    let expected: Vec<String> = (0..100)
        .map(|i| format!("s/{i}"))
        .chain(["s/after".to_owned()])
        .collect();
    assert_eq!(topics, expected, "every publication that fits, in order");
    assert_eq!(missed, 1, "the one too large for the frames is told");
    let stats = broker.stats();
    assert_eq!(
        (stats.dropped_deliveries, stats.queued_publication_bytes),
        (1, 0),
        "{stats:?}"
    );
}

/// A callee (by hand) answers a routed call with a reply larger than the caller's frames:
/// the caller gets a failure at once instead of waiting for its deadline, and the broker
/// keeps no route for the call.
#[tokio::test]
async fn a_reply_too_large_for_the_callers_frames_fails_the_call_at_once() {
    let broker = listen(BrokerOptions::default()).await;
    let callee = raw(&broker).await;
    let registered = ask(&callee, &call("register", &encoded(&("big", false)))).await;
    assert_eq!(said(&registered.payload), Said::Ok);
    let small = Options::default()
        .max_frame_size(2048)
        .receive_window(1 << 20);
    let caller = chatter_core::connect(&broker.addresses()[0], small)
        .await
        .expect("connect");
    let plain = request(0, "big/obj", "m", 600_000, &[], &encoded(&()));
    let conv = caller
        .send_bytes(&plain, SendOptions::new().last(false))
        .await
        .expect("sent");
    let routed = within(callee.receive()).await.expect("the call");
    let reply = encoded(&(0, "x".repeat(4000)));
    callee
        .send_bytes(&reply, SendOptions::new().conversation(routed.conversation))
        .await
        .expect("the callee's frames take it");
    let answer = within(caller.receive())
        .await
        .expect("an answer, not a wait");
    assert_eq!(answer.conversation, conv);
    assert!(answer.last);
    assert_eq!(said(&answer.payload), Said::Failure(7));

    // A result stream whose item is too large: the caller's stream fails, the callee's
    // handler is cancelled.
    let mut window = Vec::new();
    msgpack::write_uint(&mut window, 1 << 20);
    let stream = request(12, "big/obj", "s", 600_000, &[&window], &encoded(&()));
    let conv = caller
        .send_bytes(&stream, SendOptions::new().last(false))
        .await
        .expect("sent");
    let routed = within(callee.receive()).await.expect("the stream call");
    let at = SendOptions::new()
        .conversation(routed.conversation)
        .last(false)
        .token(false);
    callee
        .send_bytes(&[0x92, 0x00, 0xc0], at)
        .await
        .expect("opening");
    let item = encoded(&(3, "x".repeat(4000)));
    callee.send_bytes(&item, at).await.expect("item");
    let opening = within(caller.receive()).await.expect("the opening");
    assert_eq!(
        (opening.conversation, said(&opening.payload)),
        (conv, Said::Ok)
    );
    let end = within(caller.receive())
        .await
        .expect("a failure, not a wait");
    assert_eq!(end.conversation, conv);
    assert!(end.last);
    assert_eq!(said(&end.payload), Said::Failure(7));
    let cancel = within(callee.receive()).await.expect("a cancel");
    let (kind, id): (u8, u64) = msgpack::decode(&cancel.payload).expect("[2, call]");
    assert_eq!((kind, id), (2, routed.conversation.first_id()));
    // The callee ends its side, as a handler does when cancelled.
    let done = SendOptions::new()
        .conversation(routed.conversation)
        .last(true);
    callee
        .send_bytes(&envelope_failure(2), done)
        .await
        .expect("end");
    let barrier = ask(&callee, &call("stats", &encoded(&()))).await;
    assert_eq!(said(&barrier.payload), Said::Ok);
    let peers = peers(&callee).await;
    assert!(peers.iter().all(|p| p.routes == 0), "{peers:?}");
}

/// `[2, kind, "…"]`.
fn envelope_failure(kind: u64) -> Vec<u8> {
    encoded(&(2, kind, "failed"))
}

/// A presence subscription whose snapshot alone overflows it (policy `end`, a queue of 1
/// byte, a window of one item) while 30 names are registered: it ends with failure 14 in
/// the middle of its snapshot (under the broker's names lock), and nothing is stuck: names
/// still come and go, a bystander is served.
#[tokio::test]
async fn a_presence_snapshot_that_overflows_an_end_subscription_ends_it_cleanly() {
    let broker = listen(BrokerOptions::default()).await;
    let (_bus, good) = bystander(&broker, "good").await;
    let mut named = Vec::new();
    for i in 0..30 {
        let conn = raw(&broker).await;
        let reply = ask(
            &conn,
            &call("register", &encoded(&(format!("p-{i}"), false))),
        )
        .await;
        assert_eq!(said(&reply.payload), Said::Ok);
        named.push(conn);
    }
    let watcher = raw(&broker).await;
    let mut args = Vec::new();
    msgpack::write_array_len(&mut args, 2);
    msgpack::write_str(&mut args, "$broker/presence/+");
    msgpack::write_map_len(&mut args, 2);
    msgpack::write_str(&mut args, "policy");
    msgpack::write_str(&mut args, "end");
    msgpack::write_str(&mut args, "queue_bytes");
    msgpack::write_uint(&mut args, 1);
    let opening = ask(&watcher, &stream_call("subscribe", 120, &args)).await;
    assert_eq!(said(&opening.payload), Said::Ok);
    let end = within(async {
        loop {
            let msg = watcher.receive().await.expect("items, then the end");
            if msg.last {
                return msg;
            }
        }
    })
    .await;
    assert_eq!(said(&end.payload), Said::Failure(14));
    // Names still come and go; the bystander is served.
    named.pop().expect("one").close().await;
    let newcomer = raw(&broker).await;
    let reply = ask(&newcomer, &call("register", &encoded(&("p-new", false)))).await;
    assert_eq!(said(&reply.payload), Said::Ok);
    assert_eq!(within(good.add(5, 5)).await.expect("served"), 10);
    let stats = until(&broker, |s| s.subscriptions == 0 && s.names == 31).await;
    assert_eq!(stats.queued_publication_bytes, 0, "{stats:?}");
}

/// A window of 0 (`[12, …, window 0, …]`): the subscription is made, and every publication
/// costs more than the whole window, so it is dropped and counted (PROTOCOL.md: "an item
/// that costs more than the subscriber's whole window is dropped"), even after grants:
/// nothing waits in the broker for a subscriber that cannot take it.
#[tokio::test]
async fn a_subscription_with_a_zero_window_holds_nothing() {
    let broker = listen(BrokerOptions::default()).await;
    let conn = raw(&broker).await;
    let sub = ask(&conn, &stream_call("subscribe", 0, &encoded(&("z/#",)))).await;
    assert_eq!(said(&sub.payload), Said::Ok);
    let grant = encoded(&(15, sub.conversation.first_id(), 1u64 << 20));
    conn.send_bytes(&grant, SendOptions::new())
        .await
        .expect("sent");
    let publisher = raw(&broker).await;
    for i in 0..10u64 {
        let p = call_publish("z/1", i);
        publisher
            .send_bytes(&p, SendOptions::new())
            .await
            .expect("sent");
    }
    let report = ask(&publisher, &call("publish", &encoded(&("z/2", 1)))).await;
    let (_, report): (u8, chatter_broker::PublishReport) =
        msgpack::decode(&report.payload).expect("a report");
    assert_eq!((report.subscribers, report.delivered), (1, 0));
    let stats = broker.stats();
    assert_eq!(
        (stats.dropped_deliveries, stats.queued_publication_bytes),
        (11, 0),
        "{stats:?}"
    );
}

/// A reliable signal larger than its destination's frames: acked *failed* at once, so that
/// its sender does not send it again and again until its TTL (it was dropped silently).
#[tokio::test]
async fn a_reliable_signal_too_large_for_its_destination_is_acked_failed() {
    let broker = listen(BrokerOptions::default()).await;
    let small = Options::default()
        .max_frame_size(2048)
        .receive_window(1 << 20);
    let tiny = chatter_core::connect(&broker.addresses()[0], small)
        .await
        .expect("connect");
    let reply = ask(&tiny, &call("register", &encoded(&("tiny", false)))).await;
    assert_eq!(said(&reply.payload), Said::Ok);
    let sender = raw(&broker).await;
    let big = reliable(9, 300, "tiny/obj", "m", &encoded(&("x".repeat(4000),)));
    sender
        .send_bytes(&big, SendOptions::new())
        .await
        .expect("sent");
    let ack = within(sender.receive()).await.expect("an ack");
    let (kind, stream, seq, status): (u8, u64, u64, u64) =
        msgpack::decode(&ack.payload).expect("[4, stream, seq, status]");
    assert_eq!((kind, stream, seq, status), (4, 9, 300, 2));
    // A small one still goes through.
    let small = reliable(9, 301, "tiny/obj", "m", &encoded(&("x",)));
    sender
        .send_bytes(&small, SendOptions::new())
        .await
        .expect("sent");
    let got = within(tiny.receive()).await.expect("the small one");
    assert!(got.first && got.last);
}

/// A caller's argument-stream item larger than the callee's frames: the callee's stream
/// fails (`[2, 7, …]`, `last`) instead of going on without the item (its handler would
/// have computed on what was left), and the rest of that stream is dropped.
#[tokio::test]
async fn an_argument_item_too_large_for_the_callees_frames_fails_its_stream() {
    let broker = listen(BrokerOptions::default()).await;
    let small = Options::default()
        .max_frame_size(2048)
        .receive_window(1 << 20);
    let callee = chatter_core::connect(&broker.addresses()[0], small)
        .await
        .expect("connect");
    let registered = ask(&callee, &call("register", &encoded(&("sum", false)))).await;
    assert_eq!(said(&registered.payload), Said::Ok);
    let caller = raw(&broker).await;
    let plain = request(0, "sum/obj", "sum", 600_000, &[], &encoded(&((),)));
    let call_conv = caller
        .send_bytes(&plain, SendOptions::new().last(false))
        .await
        .expect("sent");
    let routed = within(callee.receive()).await.expect("the call");
    assert!(routed.first);
    // `[14, call]` opens the argument stream; the caller keeps the turn.
    let stream_conv = caller
        .send_bytes(
            &encoded(&(14, call_conv.first_id())),
            SendOptions::new().last(false).token(false),
        )
        .await
        .expect("sent");
    let opened = within(callee.receive())
        .await
        .expect("the stream's opening");
    let (kind, id): (u8, u64) = msgpack::decode(&opened.payload).expect("[14, call]");
    assert_eq!((kind, id), (14, routed.conversation.first_id()));
    let at = SendOptions::new()
        .conversation(stream_conv)
        .last(false)
        .token(false);
    caller
        .send_bytes(&encoded(&(3, 1)), at)
        .await
        .expect("a small item");
    caller
        .send_bytes(&encoded(&(3, "x".repeat(4000))), at)
        .await
        .expect("a large item");
    caller
        .send_bytes(&encoded(&(3, 2)), at)
        .await
        .expect("a small item after it");
    let first = within(callee.receive()).await.expect("the first item");
    assert_eq!(&first.payload[..], &[0x92, 0x03, 0x01]);
    let failed = within(callee.receive()).await.expect("the stream fails");
    assert_eq!(failed.conversation, opened.conversation);
    assert!(failed.last);
    assert_eq!(said(&failed.payload), Said::Failure(7));
    // The item after it is not delivered: the callee's next message is the broker's
    // answer to this.
    let barrier = ask(&callee, &call("stats", &encoded(&()))).await;
    assert_eq!(said(&barrier.payload), Said::Ok);
}
