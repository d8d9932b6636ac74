//! Streams through a reconnecting peer, over TCP through the fault-injecting proxy: a stream
//! lives on one connection and fails clearly when it drops (no silent resume), and stream
//! calls made after the reconnect work again.

use std::net::SocketAddr;
use std::time::Duration;

use chatter_rpc::stream::{self, Receiver, StreamError};
use chatter_rpc::{
    listen, remote, serve, Backoff, Options, Peer, PeerEvent, PeerOptions, ReconnectOptions,
    RpcServer,
};
use tests::proxy::Proxy;

#[remote]
pub trait Ticker {
    /// 0, 1, 2, … until the reader goes away.
    async fn ticks(&self) -> Receiver<u64>;
    /// The number of items of `items`.
    async fn count(&self, items: Receiver<u64>) -> u64;
}

struct Ticks;

impl Ticker for Ticks {
    async fn ticks(&self) -> Receiver<u64> {
        let (tx, rx) = stream::channel(4);
        tokio::spawn(async move {
            let mut i = 0;
            while tx.send(i).await.is_ok() {
                i += 1;
            }
        });
        rx
    }

    async fn count(&self, mut items: Receiver<u64>) -> u64 {
        let mut n = 0;
        while let Some(Ok(_)) = items.recv().await {
            n += 1;
        }
        n
    }
}

async fn server() -> (RpcServer, SocketAddr) {
    let listener = listen("tcp://127.0.0.1:0", Options::default())
        .await
        .expect("listen");
    let server = serve(listener, PeerOptions::default(), |peer: &Peer| {
        peer.register("ticker", TickerServer::new(Ticks));
    });
    let addr = server.addresses()[0]
        .to_string()
        .trim_start_matches("tcp://")
        .parse()
        .expect("a socket address");
    (server, addr)
}

async fn connected(events: &mut chatter_rpc::Events) {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .expect("an event in time")
            .expect("the peer is alive");
        if matches!(event, PeerEvent::Connected { .. }) {
            return;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_connection_fails_the_stream_and_a_new_stream_works_after_the_reconnect() {
    let (_server, addr) = server().await;
    let proxy = Proxy::start(addr).await;
    let backoff = Backoff::exponential(Duration::from_millis(10), Duration::from_millis(100));
    let peer = Peer::reconnecting(
        proxy.address(),
        Options::default(),
        PeerOptions::default(),
        ReconnectOptions::default().backoff(backoff.jitter(0.0)),
    )
    .expect("a valid address");
    let mut events = peer.events();
    connected(&mut events).await;
    let ticker = TickerClient::new(&peer, "ticker");

    let mut ticks = ticker.ticks().await.expect("the stream opens");
    for expected in 0..10 {
        assert_eq!(ticks.recv().await, Some(Ok(expected)));
    }
    proxy.cut_all();
    // The items already buffered may still come, then the error, then nothing.
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(60), ticks.recv()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(other) => break other,
            Err(_) => panic!("the stream neither ended nor failed"),
        }
    };
    assert!(
        matches!(end, Some(Err(StreamError::ConnectionLost(_)))),
        "{end:?}"
    );
    assert_eq!(ticks.recv().await, None);

    // A client stream cut the same way: its sender learns the reader is gone.
    connected(&mut events).await;
    let (tx, rx) = stream::channel(4);
    let call = tokio::spawn({
        let ticker = ticker.clone();
        async move { ticker.count(rx).await }
    });
    tx.send(1).await.expect("the first item goes");
    proxy.cut_all();
    let refused = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if tx.send(2).await.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(
        refused.is_ok(),
        "the sender kept taking items after the cut"
    );
    assert!(call.await.expect("no panic").is_err());

    // After the reconnect, a new stream call works; nothing is resumed.
    connected(&mut events).await;
    let mut ticks = ticker.ticks().await.expect("the stream opens again");
    assert_eq!(ticks.recv().await, Some(Ok(0)));
}
