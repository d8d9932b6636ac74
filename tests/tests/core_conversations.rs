//! Conversation rules and flow control, end to end over TCP and Unix sockets.

use std::time::Duration;

use chatter_core::{Connection, Event, Options, SendError, SendOptions, Server};
use tests::{all_transports, pair, pair_with, Transport};

all_transports!(
    out_of_turn_and_after_last_sends_are_rejected,
    token_passing_works_both_ways,
    both_sides_open_conversations_concurrently,
    a_fast_producer_keeps_memory_bounded_and_loses_nothing,
    next_event_delivers_messages_and_timeouts,
    held_credit_stops_the_sender_until_released,
    credit_released_with_an_empty_take_reaches_the_sender,
);

async fn out_of_turn_and_after_last_sends_are_rejected(t: Transport) {
    let (_server, client, accepted) = pair(t).await;
    let conv = client
        .send(&"q", SendOptions::new().last(false))
        .await
        .unwrap();
    // The token went to the peer: the opener may not send.
    let err = client
        .send(&"again", SendOptions::new().conversation(conv))
        .await
        .unwrap_err();
    assert!(
        matches!(err, SendError::NotYourTurn(c) if c == conv),
        "{err}"
    );
    assert!(err.to_string().contains("not our turn"), "{err}");

    let req = accepted.receive().await.unwrap();
    accepted
        .send(&"a", SendOptions::new().conversation(req.conversation))
        .await
        .unwrap();
    // After `last`, neither side may send.
    let err = accepted
        .send(&"late", SendOptions::new().conversation(req.conversation))
        .await
        .unwrap_err();
    assert!(matches!(err, SendError::ConversationEnded(_)), "{err}");
    client.receive().await.unwrap();
    let err = client
        .send(&"late", SendOptions::new().conversation(conv))
        .await
        .unwrap_err();
    assert!(matches!(err, SendError::ConversationEnded(_)), "{err}");

    // A conversation of one connection cannot be used on another.
    let err = accepted
        .send(&"x", SendOptions::new().conversation(conv))
        .await
        .unwrap_err();
    assert!(matches!(err, SendError::WrongConnection(_)), "{err}");
    // None of this broke the connection.
    client
        .send(&"still fine", SendOptions::new())
        .await
        .unwrap();
    assert_eq!(
        accepted
            .receive()
            .await
            .unwrap()
            .decode::<String>()
            .unwrap(),
        "still fine"
    );
}

async fn token_passing_works_both_ways(t: Transport) {
    let (_server, client, accepted) = pair(t).await;
    // The server opens this one: it sends twice keeping the token, then passes it.
    let conv = accepted
        .send(&0, SendOptions::new().last(false).token(false))
        .await
        .unwrap();
    accepted
        .send(&1, SendOptions::new().conversation(conv).last(false))
        .await
        .unwrap();
    let m0 = client.receive().await.unwrap();
    let m1 = client.receive().await.unwrap();
    assert!(m0.first && !m0.token && !m0.last);
    assert!(!m1.first && m1.token && !m1.last);
    assert_eq!(m0.conversation, m1.conversation);
    // Ping-pong ten turns, then the client ends it.
    let at_client = m1.conversation;
    for i in 2..12 {
        let (from, to, c) = if i % 2 == 0 {
            (&client, &accepted, at_client)
        } else {
            (&accepted, &client, conv)
        };
        from.send(&i, SendOptions::new().conversation(c).last(false))
            .await
            .unwrap();
        let m = to.receive().await.unwrap();
        assert_eq!(m.decode::<i32>().unwrap(), i);
        assert!(m.token && !m.last && !m.first);
    }
    client
        .send(&99, SendOptions::new().conversation(at_client))
        .await
        .unwrap();
    let end = accepted.receive().await.unwrap();
    assert!(end.last);
    assert_eq!(end.conversation, conv);
}

async fn both_sides_open_conversations_concurrently(t: Transport) {
    let (_server, client, accepted) = pair(t).await;
    const N: u32 = 200;
    // Both sides open N conversations at once and answer each other's.
    let run = |me: chatter_core::Connection, name: &'static str| async move {
        let mut mine = std::collections::HashMap::new();
        for i in 0..N {
            let c = me
                .send(&(name, i), SendOptions::new().last(false))
                .await
                .unwrap();
            mine.insert(c, i);
        }
        let mut answered = 0;
        let mut got_answers = 0;
        while answered < N || got_answers < N {
            let m = me.receive().await.unwrap();
            if m.first {
                let (from, i): (String, u32) = m.decode().unwrap();
                assert_ne!(from, name);
                me.send(&i, SendOptions::new().conversation(m.conversation))
                    .await
                    .unwrap();
                answered += 1;
            } else {
                let i: u32 = m.decode().unwrap();
                assert_eq!(
                    mine.remove(&m.conversation),
                    Some(i),
                    "answer landed in its own conversation"
                );
                got_answers += 1;
            }
        }
        assert!(mine.is_empty());
    };
    tokio::join!(run(client, "client"), run(accepted, "server"));
}

async fn a_fast_producer_keeps_memory_bounded_and_loses_nothing(t: Transport) {
    const WINDOW: u32 = 64 * 1024;
    const N: u32 = 5_000;
    let consumer_options = Options::default()
        .receive_window(WINDOW)
        .max_frame_size(WINDOW / 2);
    let (_server, producer, consumer) = pair_with(t, consumer_options, Options::default()).await;
    let payload = vec![0xabu8; 1000];

    // Without a reader, the producer runs out of credit after one window's worth.
    let mut sent = 0u32;
    while producer
        .try_send(&message(sent, &payload), SendOptions::new())
        .is_ok()
    {
        sent += 1;
    }
    // Each message costs its body (a 5-byte header and the payload) plus 64 bytes.
    let cost = message(0, &payload).len() as u32 + 5 + 64;
    assert!(
        sent * cost <= WINDOW && (sent + 1) * cost > WINDOW,
        "{sent} messages outstanding"
    );
    assert!(matches!(
        producer.try_send(&message(sent, &payload), SendOptions::new()),
        Err(SendError::WouldBlock)
    ));

    // A producer that waits for credit and a slow consumer: everything arrives, in order.
    let feeder = tokio::spawn({
        let producer = producer.clone();
        let payload = payload.clone();
        async move {
            for i in sent..N {
                producer
                    .send_bytes(&message(i, &payload), SendOptions::new())
                    .await
                    .unwrap();
            }
        }
    });
    for i in 0..N {
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await; // a slow consumer
        }
        let m = consumer.receive().await.unwrap();
        assert_eq!(u32::from_be_bytes(m.payload[..4].try_into().unwrap()), i);
        assert_eq!(&m.payload[4..], &payload[..]);
    }
    feeder.await.unwrap();
}

/// A producer that filled a 64 KiB window with 1,000-byte messages, and a consumer that took
/// them all holding their credit: the pair, the messages taken, how many, and the payload.
async fn window_held(
    t: Transport,
    fill: u8,
) -> (Server, Connection, Connection, Vec<Event>, u32, Vec<u8>) {
    const WINDOW: u32 = 64 * 1024;
    let consumer_options = Options::default()
        .receive_window(WINDOW)
        .max_frame_size(WINDOW / 2);
    let (server, producer, consumer) = pair_with(t, consumer_options, Options::default()).await;
    let payload = vec![fill; 1000];
    let mut sent = 0u32;
    while producer
        .try_send(&message(sent, &payload), SendOptions::new())
        .is_ok()
    {
        sent += 1;
    }
    let mut events = Vec::new();
    while events.len() < sent as usize {
        consumer
            .next_events_holding(&mut events, 64, 0)
            .await
            .unwrap();
    }
    (server, producer, consumer, events, sent, payload)
}

async fn held_credit_stops_the_sender_until_released(t: Transport) {
    // The consumer takes every message but holds their credit.
    let (_server, producer, consumer, events, sent, payload) = window_held(t, 0xcd).await;
    let credits: Vec<u64> = events
        .iter()
        .map(|e| match e {
            Event::Message(m) => u64::from(m.credit()),
            other => panic!("{other:?}"),
        })
        .collect();
    let held: u64 = credits.iter().sum();
    assert!(held <= 64 * 1024);
    assert_eq!(consumer.buffered().received, held);
    // Nothing came back: the producer still may not send, however long it waits.
    let next = message(sent, &payload);
    let blocked = producer.send_bytes(&next, SendOptions::new());
    tokio::pin!(blocked);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut blocked)
            .await
            .is_err(),
        "sent while the consumer held all the credit"
    );
    // Released (one message at a time, as handlers finish), the send goes through.
    for credit in credits {
        consumer.release(credit);
    }
    assert_eq!(consumer.buffered().received, 0);
    blocked.await.unwrap();
    let m = consumer.receive().await.unwrap();
    assert_eq!(u32::from_be_bytes(m.payload[..4].try_into().unwrap()), sent);
}

/// Credit handed to `next_events_holding` is given back even when nothing waits to be
/// taken (the receive loop of chatter-rpc gives a batch's credit back with its next take,
/// which usually finds nothing yet): the window frame must reach the sender.
async fn credit_released_with_an_empty_take_reaches_the_sender(t: Transport) {
    let (_server, producer, consumer, _taken, sent, payload) = window_held(t, 0x11).await;
    let held = consumer.buffered().received;
    let next = message(sent, &payload);
    let blocked = tokio::spawn({
        let producer = producer.clone();
        async move { producer.send_bytes(&next, SendOptions::new()).await }
    });
    // Nothing is left to take: this take only gives the credit back, then waits.
    let mut more = Vec::new();
    let take = consumer.next_events_holding(&mut more, 64, held);
    let got = tokio::time::timeout(Duration::from_secs(10), take).await;
    assert!(
        matches!(got, Ok(Ok(1))),
        "the producer's next message arrives: {got:?}"
    );
    blocked.await.unwrap().unwrap();
}

fn message(i: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = i.to_be_bytes().to_vec();
    m.extend_from_slice(payload);
    m
}

async fn next_event_delivers_messages_and_timeouts(t: Transport) {
    let (_server, client, accepted) = pair(t).await;
    let conv = client
        .send(
            &"anyone?",
            SendOptions::new()
                .last(false)
                .timeout(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    accepted
        .send(&"unrelated", SendOptions::new())
        .await
        .unwrap();
    match client.next_event().await.unwrap() {
        Event::Message(m) => assert_eq!(m.decode::<String>().unwrap(), "unrelated"),
        other => panic!("{other:?}"),
    }
    match client.next_event().await.unwrap() {
        Event::Timeout(c) => assert_eq!(c, conv),
        other => panic!("{other:?}"),
    }
    // The conversation is still open after its timeout: the peer may answer late.
    let req = accepted.receive().await.unwrap();
    accepted
        .send(&"late", SendOptions::new().conversation(req.conversation))
        .await
        .unwrap();
    let m = client.receive().await.unwrap();
    assert_eq!(m.conversation, conv);
    assert!(m.last);
}

/// Each end's addresses are the other's, swapped, whether the server listens on one
/// address (its local address is then the listener's) or on all of them (then the
/// kernel's), and whether they are read before or after the connection closed.
#[tokio::test]
async fn addresses_match_across_the_two_ends() {
    use chatter_core::{connect, connect_early, listen, Address};
    for host in ["127.0.0.1", "0.0.0.0"] {
        let server = listen(format!("tcp://{host}:0"), Options::default())
            .await
            .unwrap();
        let port = match &server.addresses()[0] {
            Address::Tcp { port, .. } => *port,
            other => panic!("{other}"),
        };
        let target = format!("tcp://127.0.0.1:{port}");
        let client = connect(&target, Options::default()).await.unwrap();
        let peer = server.accept().await.unwrap();
        assert_eq!(client.remote_address().to_string(), target);
        assert_eq!(peer.local_address(), client.remote_address(), "{host}");
        assert_eq!(peer.remote_address(), client.local_address(), "{host}");

        let early = connect_early(&target, Options::default()).await.unwrap();
        let peer = server.accept().await.unwrap();
        early.close().await;
        peer.closed().await;
        assert_eq!(peer.local_address(), early.remote_address(), "{host}");
        assert_eq!(peer.remote_address(), early.local_address(), "{host}");
        assert_ne!(early.local_address(), client.local_address());
    }
}
