//! Streams through the runtime API that `#[remote]` generates code against, with a
//! hand-written service: result streams, argument streams, both, cancellation and flow
//! control, over TCP on 127.0.0.1. (The generated API is tested in `tests/rpc_streams.rs`.)

mod common;

use std::sync::Arc;
use std::time::Duration;

use chatter_core::Options;
use chatter_rpc::__private::{
    decode_args, decode_no_args, ClientCore, Dispatch, Handlers, Method, StreamReply,
};
use chatter_rpc::stream::{self, Receiver, StreamError};
use chatter_rpc::{CallError, Peer, PeerOptions, Service};
use common::{connections, within};
use tokio::sync::Notify;

/// `count(n) -> Receiver<u32>` (0..n), `sum(Receiver<u64>) -> u64`,
/// `echo(Receiver<String>) -> Receiver<String>`, `forever() -> Receiver<u32>` (items
/// until cancelled; `gone` is notified when its sender sees the reader gone),
/// `refuse() -> Result<Receiver<u32>, String>` (an application error).
struct Streams {
    gone: Arc<Notify>,
}

impl Service for Streams {
    fn __dispatch(&self, method: &[u8], args: &[u8], handlers: &mut Handlers) -> Dispatch {
        match method {
            b"count" => {
                let n: u32 = match decode_args("count", args, 1, |r| r.arg()) {
                    Ok(n) => n,
                    Err(d) => return d,
                };
                handlers.stream(async move {
                    StreamReply::open(Receiver::from_stream(futures::stream::iter(0..n)))
                })
            }
            b"sum" => {
                if let Err(d) = decode_no_args("sum", args) {
                    return d;
                }
                let mut input = handlers.input::<u64>();
                handlers.stream(async move {
                    let mut sum = 0u64;
                    while let Some(item) = input.recv().await {
                        match item {
                            Ok(v) => sum += v,
                            Err(e) => {
                                return StreamReply::reply(chatter_rpc::__private::reply_app_error(
                                    &e.to_string(),
                                    None,
                                ))
                            }
                        }
                    }
                    StreamReply::reply(chatter_rpc::__private::reply_ok(&sum))
                })
            }
            b"echo" => {
                if let Err(d) = decode_no_args("echo", args) {
                    return d;
                }
                let mut input = handlers.input::<String>();
                handlers.stream(async move {
                    let (tx, rx) = stream::channel(4);
                    tokio::spawn(async move {
                        while let Some(Ok(line)) = input.recv().await {
                            if tx.send(line.to_uppercase()).await.is_err() {
                                break;
                            }
                        }
                    });
                    StreamReply::open(rx)
                })
            }
            b"forever" => {
                let gone = self.gone.clone();
                handlers.stream(async move {
                    let (tx, rx) = stream::channel(4);
                    tokio::spawn(async move {
                        let mut i = 0u32;
                        while tx.send(i).await.is_ok() {
                            i += 1;
                        }
                        gone.notify_one();
                    });
                    StreamReply::open(rx)
                })
            }
            b"slow" => {
                let delay: u64 = match decode_args("slow", args, 1, |r| r.arg()) {
                    Ok(n) => n,
                    Err(d) => return d,
                };
                let gone = self.gone.clone();
                handlers.stream(async move {
                    // Opens after `delay` s; item 1 at once, item 2 ten minutes later.
                    tokio::time::sleep(Duration::from_secs(delay)).await;
                    let (tx, rx) = stream::channel(4);
                    tokio::spawn(async move {
                        if tx.send(1u32).await.is_ok() {
                            tokio::select! {
                                () = tokio::time::sleep(Duration::from_secs(600)) => {
                                    let _ = tx.send(2).await;
                                    tx.closed().await;
                                }
                                () = tx.closed() => {}
                            }
                        }
                        gone.notify_one();
                    });
                    StreamReply::open(rx)
                })
            }
            b"panics" => handlers.stream(async move {
                let (tx, rx) = stream::channel(4);
                tokio::spawn(async move {
                    tx.send(7u32).await.unwrap();
                    panic!("the producer broke");
                });
                StreamReply::open(rx)
            }),
            b"refuse" => handlers.stream(async move {
                StreamReply::reply(chatter_rpc::__private::reply_app_error(
                    &"no".to_string(),
                    None,
                ))
            }),
            _ => Dispatch::NoSuchMethod,
        }
    }
}

const COUNT: Method = Method {
    name: "count",
    wire: b"\xa5count",
};
const SUM: Method = Method {
    name: "sum",
    wire: b"\xa3sum",
};
const ECHO: Method = Method {
    name: "echo",
    wire: b"\xa4echo",
};
const FOREVER: Method = Method {
    name: "forever",
    wire: b"\xa7forever",
};
const SLOW: Method = Method {
    name: "slow",
    wire: b"\xa4slow",
};
const PANICS: Method = Method {
    name: "panics",
    wire: b"\xa6panics",
};
const REFUSE: Method = Method {
    name: "refuse",
    wire: b"\xa6refuse",
};

struct Setup {
    client: ClientCore,
    gone: Arc<Notify>,
    _peers: (Peer, Peer),
}

async fn setup(server_options: PeerOptions) -> Setup {
    let (client_conn, server_conn) = connections(Options::default()).await;
    let server = Peer::with_options(server_conn, server_options);
    let gone = Arc::new(Notify::new());
    server.register("s", Streams { gone: gone.clone() });
    let client = Peer::new(client_conn);
    Setup {
        client: ClientCore::new(&client, "s"),
        gone,
        _peers: (client, server),
    }
}

fn none() -> Option<Receiver<()>> {
    None
}

#[tokio::test]
async fn a_result_stream_delivers_every_item_in_order_then_ends() {
    let s = setup(PeerOptions::default()).await;
    let mut rx =
        within(
            s.client
                .call_stream_plain::<u32, _, _>(&COUNT, 1, |w| w.arg(&10_000u32), none()),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(item) = within(rx.recv()).await {
        got.push(item.unwrap());
    }
    assert_eq!(got, (0..10_000).collect::<Vec<_>>());
}

#[tokio::test]
async fn an_argument_stream_reaches_the_handler_and_its_reply_comes_back() {
    let s = setup(PeerOptions::default()).await;
    let (tx, rx) = stream::channel(8);
    let feed = tokio::spawn(async move {
        for i in 1..=5_000u64 {
            tx.send(i).await.unwrap();
        }
    });
    let sum = within(
        s.client
            .call_input::<u64, String, _, _>(&SUM, 0, |_| Ok(()), rx),
    )
    .await
    .unwrap();
    assert_eq!(sum, 5_000 * 5_001 / 2);
    feed.await.unwrap();
}

#[tokio::test]
async fn both_ways_at_once() {
    let s = setup(PeerOptions::default()).await;
    let (tx, input) = stream::channel(8);
    let mut out =
        within(
            s.client
                .call_stream_plain::<String, _, _>(&ECHO, 0, |_| Ok(()), Some(input)),
        )
        .await
        .unwrap();
    for word in ["a", "bc", "def"] {
        tx.send(word.to_string()).await.unwrap();
        assert_eq!(within(out.recv()).await, Some(Ok(word.to_uppercase())));
    }
    drop(tx);
    assert_eq!(within(out.recv()).await, None);
}

#[tokio::test]
async fn dropping_the_reader_stops_the_writer() {
    let s = setup(PeerOptions::default()).await;
    let mut rx = within(
        s.client
            .call_stream_plain::<u32, _, _>(&FOREVER, 0, |_| Ok(()), none()),
    )
    .await
    .unwrap();
    assert_eq!(within(rx.recv()).await, Some(Ok(0)));
    drop(rx);
    within(s.gone.notified()).await;
}

#[tokio::test]
async fn an_application_error_before_the_stream_opens_is_typed() {
    let s = setup(PeerOptions::default()).await;
    let err = within(
        s.client
            .call_stream::<u32, String, _, _>(&REFUSE, 0, |_| Ok(()), none()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, CallError::App { ref error, .. } if error == "no"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_slow_reader_stalls_only_its_own_stream() {
    let s = setup(PeerOptions::default().stream_window(4096)).await;
    // Never read: its writer stops at the window.
    let _stalled = within(
        s.client
            .call_stream_plain::<u32, _, _>(&FOREVER, 0, |_| Ok(()), none()),
    )
    .await
    .unwrap();
    let mut rx =
        within(
            s.client
                .call_stream_plain::<u32, _, _>(&COUNT, 1, |w| w.arg(&1000u32), none()),
        )
        .await
        .unwrap();
    let mut n = 0;
    while let Some(item) = within(rx.recv()).await {
        assert_eq!(item.unwrap(), n);
        n += 1;
    }
    assert_eq!(n, 1000);
}

#[tokio::test]
async fn a_stream_call_beyond_max_streams_is_refused() {
    let s = setup(PeerOptions::default().max_streams(1)).await;
    let _first = within(
        s.client
            .call_stream_plain::<u32, _, _>(&FOREVER, 0, |_| Ok(()), none()),
    )
    .await
    .unwrap();
    let err = within(
        s.client
            .call_stream_plain::<u32, _, _>(&FOREVER, 0, |_| Ok(()), none()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, CallError::TooManyStreams { .. }), "{err:?}");
}

#[tokio::test]
async fn a_lost_connection_ends_the_stream_with_an_error() {
    let s = setup(PeerOptions::default()).await;
    let mut rx = within(
        s.client
            .call_stream_plain::<u32, _, _>(&FOREVER, 0, |_| Ok(()), none()),
    )
    .await
    .unwrap();
    assert_eq!(within(rx.recv()).await, Some(Ok(0)));
    s._peers.1.close().await;
    let mut end = None;
    while let Some(item) = within(rx.recv()).await {
        if let Err(e) = item {
            end = Some(e);
        }
    }
    assert!(
        matches!(end, Some(StreamError::ConnectionLost(_))),
        "{end:?}"
    );
    let _ = Duration::ZERO;
}

#[tokio::test(start_paused = true)]
async fn the_deadline_covers_opening_only() {
    let s = setup(PeerOptions::default()).await;
    let client = s.client.with_deadline(Duration::from_secs(1));
    let late = client.call_stream_plain::<u32, _, _>(&SLOW, 1, |w| w.arg(&5u64), none());
    assert!(matches!(
        within(late).await,
        Err(CallError::DeadlineExceeded)
    ));
    // Opened within the deadline: the second item ten minutes later still arrives.
    let mut rx = within(client.call_stream_plain::<u32, _, _>(&SLOW, 1, |w| w.arg(&0u64), none()))
        .await
        .unwrap();
    assert_eq!(within(rx.recv()).await, Some(Ok(1)));
    let second = tokio::time::timeout(Duration::from_secs(700), rx.recv()).await;
    assert_eq!(second.unwrap(), Some(Ok(2)));
}

#[tokio::test(start_paused = true)]
async fn an_idle_stream_ends_with_an_error_and_stops_its_writer() {
    let s = setup(PeerOptions::default()).await;
    let mut rx =
        within(
            s.client
                .call_stream_plain::<u32, _, _>(&SLOW, 1, |w| w.arg(&0u64), none()),
        )
        .await
        .unwrap();
    rx.set_idle_timeout(Some(Duration::from_secs(60)));
    assert_eq!(within(rx.recv()).await, Some(Ok(1)));
    let start = tokio::time::Instant::now();
    let idle = tokio::time::timeout(Duration::from_secs(120), rx.recv()).await;
    assert_eq!(idle.unwrap(), Some(Err(StreamError::IdleTimeout)));
    assert!(start.elapsed() >= Duration::from_secs(60));
    assert_eq!(within(rx.recv()).await, None);
    within(s.gone.notified()).await;
}

#[tokio::test]
async fn a_writer_that_panics_ends_the_stream_with_an_error() {
    let s = setup(PeerOptions::default()).await;
    let mut rx = within(
        s.client
            .call_stream_plain::<u32, _, _>(&PANICS, 0, |_| Ok(()), none()),
    )
    .await
    .unwrap();
    assert_eq!(within(rx.recv()).await, Some(Ok(7)));
    let end = within(rx.recv()).await;
    assert!(
        matches!(end, Some(Err(StreamError::RemotePanic(_)))),
        "{end:?}"
    );
    assert_eq!(within(rx.recv()).await, None);
}

/// A reader written from PROTOCOL.md ("Streams"): the stream call `count(5000)` by hand
/// with a window of 4 KiB. The callee puts the items it has ready into one message
/// (`[3, item, ...]`), never has more outstanding than the reader granted (each message
/// costs its payload plus 64 per item), and resumes on each grant `[15, call, bytes]`.
#[tokio::test]
async fn a_writer_batches_ready_items_within_the_readers_credit() {
    use chatter_core::SendOptions;
    const N: u32 = 5000;
    const WINDOW: u64 = 4096;
    let (raw, server_conn) = connections(Options::default()).await;
    let server = Peer::new(server_conn);
    server.register(
        "s",
        Streams {
            gone: Arc::new(Notify::new()),
        },
    );
    // [12, "s", "count", 10000 ms, 4096, [5000]]
    let call = b"\x96\x0c\xa1s\xa5count\xcd\x27\x10\xcd\x10\x00\x91\xcd\x13\x88";
    let conv = raw
        .send_bytes(call, SendOptions::new().last(false))
        .await
        .unwrap();
    let opening = within(raw.receive()).await.unwrap();
    assert_eq!(
        (opening.payload.as_ref(), opening.last),
        (&b"\x92\x00\xc0"[..], false)
    );
    let (mut granted, mut spent, mut next, mut messages) = (WINDOW, 0u64, 0u32, 0u32);
    loop {
        let msg = within(raw.receive()).await.unwrap();
        assert_eq!(msg.conversation, conv);
        if msg.last {
            assert_eq!(msg.payload.as_ref(), b"\x91\x04", "the end");
            break;
        }
        let values: Vec<u32> = chatter_msgpack::decode(&msg.payload).unwrap();
        let (kind, items) = values.split_first().unwrap();
        assert_eq!(*kind, 3, "items: {:x?}", msg.payload);
        assert!(!items.is_empty());
        for item in items {
            assert_eq!(*item, next, "in order, each once");
            next += 1;
        }
        messages += 1;
        spent += msg.payload.len() as u64 + 64 * items.len() as u64;
        assert!(
            spent <= granted,
            "{spent} bytes sent against {granted} granted"
        );
        // An item costs at most 2 + 3 + 64: with less than that left, the writer waits.
        if granted - spent < 200 {
            let mut grant = Vec::new();
            chatter_msgpack::encode(&mut grant, &(15u8, conv.first_id(), WINDOW)).unwrap();
            raw.send_bytes(&grant, SendOptions::new()).await.unwrap();
            granted += WINDOW;
        }
    }
    assert_eq!(next, N);
    // About 60 items fit each 4 KiB grant: one message per grant or so, not per item.
    assert!(messages < N / 10, "{messages} messages for {N} items");
}
