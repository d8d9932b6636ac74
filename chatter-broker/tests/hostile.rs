//! The broker attacked as a hostile peer (or a client written from the documents alone)
//! would: envelopes built by hand over plain chatter-core connections, with wrong argument
//! types, invalid names, topics and patterns, references to nothing, limits pushed, and
//! subscribers that never read. Every offence gets a clear answer (or is dropped, for a
//! one-shot nobody may answer), the broker's own counters stay within what
//! docs/SECURITY.md states, and a well-behaved client is served meanwhile.

mod common;

use std::time::Duration;

use chatter_broker::{AccessControl, Broker, BrokerOptions, BrokerStats, PeerInfo, Rules};
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
