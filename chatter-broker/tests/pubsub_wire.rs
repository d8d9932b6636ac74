//! Publish/subscribe spoken by hand, as a client written from chatter-rpc's PROTOCOL.md
//! ("The broker") would: the byte strings below are the document's examples (checked to be
//! there), sent over plain chatter-core connections.

use std::time::Duration;

use chatter_broker::{Broker, BrokerOptions};
use chatter_core::{Connection, Options, SendOptions};
use tokio::time::timeout;

const PROTOCOL: &str = include_str!("../../chatter-rpc/PROTOCOL.md");

/// The bytes of a hex example, after checking that PROTOCOL.md shows it.
fn example(hex: &str) -> Vec<u8> {
    assert!(PROTOCOL.contains(hex), "PROTOCOL.md does not show `{hex}`");
    hex.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect()
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    timeout(Duration::from_secs(10), f).await.expect("in time")
}

async fn raw(broker: &Broker) -> Connection {
    chatter_core::connect(&broker.addresses()[0], Options::default())
        .await
        .expect("connect")
}

#[tokio::test]
async fn a_subscription_by_hand_follows_protocol_md() {
    let broker = Broker::listen("tcp://127.0.0.1:0", BrokerOptions::default())
        .await
        .expect("listen");
    let subscriber = raw(&broker).await;
    let publisher = raw(&broker).await;

    // subscribe("t/+") as a stream call, window 4096, options left out.
    let subscribe = example(
        "96 0c ae 63 68 61 74 74 65 72 2e 62 72 6f 6b 65 72 a9 73 75 62 73 63 72 69 62 65 cd 27 10 cd 10 00 91 a3 74 2f 2b",
    );
    let conv = subscriber
        .send_bytes(&subscribe, SendOptions::new().last(false))
        .await
        .expect("sent");
    let opening = within(subscriber.receive()).await.expect("opening");
    assert_eq!(
        (opening.payload.as_ref(), opening.last),
        (&[0x92, 0x00, 0xc0][..], false)
    );
    assert_eq!(opening.conversation, conv);
    assert_eq!(broker.stats().subscriptions, 1);

    // publish("t/1", 7) as a signal with a 5 s TTL.
    let publish = example(
        "95 01 ae 63 68 61 74 74 65 72 2e 62 72 6f 6b 65 72 a7 70 75 62 6c 69 73 68 cd 13 88 92 a3 74 2f 31 07",
    );
    publisher
        .send_bytes(&publish, SendOptions::new())
        .await
        .expect("sent");
    let item = within(subscriber.receive()).await.expect("item");
    assert_eq!(item.payload.as_ref(), example("92 03 92 a3 74 2f 31 07"));
    assert_eq!(
        (item.conversation, item.last, item.token),
        (conv, false, false)
    );

    // 200 more, values 0..200 on `t/2`: within the window, granted by hand.
    const WINDOW: u64 = 4096;
    let mut spent = item.payload.len() as u64 + 64;
    let mut granted = WINDOW;
    for v in 0..200u32 {
        let mut p = Vec::new();
        chatter_msgpack::write_array_len(&mut p, 5);
        chatter_msgpack::write_uint(&mut p, 1);
        chatter_msgpack::write_str(&mut p, "chatter.broker");
        chatter_msgpack::write_str(&mut p, "publish");
        chatter_msgpack::write_uint(&mut p, 5000);
        chatter_msgpack::write_array_len(&mut p, 2);
        chatter_msgpack::write_str(&mut p, "t/2");
        chatter_msgpack::write_uint(&mut p, u64::from(v));
        publisher
            .send_bytes(&p, SendOptions::new())
            .await
            .expect("sent");
    }
    let mut next = 0u32;
    while next < 200 {
        let msg = within(subscriber.receive()).await.expect("items");
        assert_eq!(msg.conversation, conv);
        assert!(!msg.last);
        let mut r = chatter_msgpack::Reader::new(&msg.payload);
        let len = r.read_array_len().expect("an array");
        let kind = r.read_uint().expect("a kind");
        let items: Vec<(String, u64)> = (1..len)
            .map(|_| {
                assert_eq!(r.read_array_len().expect("an item"), 2, "[topic, value]");
                let topic = r.read_str().expect("topic").to_owned();
                (topic, r.read_uint().expect("value"))
            })
            .collect();
        assert!(r.remaining().is_empty());
        assert_eq!(kind, 3);
        for (topic, value) in &items {
            assert_eq!(
                (topic.as_str(), *value),
                ("t/2", u64::from(next)),
                "in publish order"
            );
            next += 1;
        }
        spent += msg.payload.len() as u64 + 64 * items.len() as u64;
        assert!(
            spent <= granted,
            "{spent} bytes sent against {granted} granted"
        );
        if granted - spent < WINDOW / 2 {
            // [15, call, bytes]
            let mut grant = Vec::new();
            chatter_msgpack::encode(&mut grant, &(15u8, conv.first_id(), WINDOW)).expect("grant");
            subscriber
                .send_bytes(&grant, SendOptions::new())
                .await
                .expect("sent");
            granted += WINDOW;
        }
    }

    // Cancel: [2, call]; the broker ends the stream with failure 2, `last`.
    let mut cancel = Vec::new();
    chatter_msgpack::encode(&mut cancel, &(2u8, conv.first_id())).expect("cancel");
    subscriber
        .send_bytes(&cancel, SendOptions::new())
        .await
        .expect("sent");
    let end = within(subscriber.receive()).await.expect("end");
    assert!(end.last);
    let (status, kind, _why): (u8, u8, String) =
        chatter_msgpack::decode(&end.payload).expect("failure");
    assert_eq!((status, kind), (2, 2));
    assert_eq!(broker.stats().subscriptions, 0);
}
