//! What the built-in `chatter.introspect` object costs a peer, measured with a counting
//! allocator: 100 peers made from accepted connections, each hosting one object, with
//! introspection on and off. The object is made on first use, so it costs nothing until
//! then (it used to be a registry entry per peer: 66 bytes in 3 allocations, measured
//! by this test before the change).
//!
//! Its own test binary: the counting allocator is global.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use chatter_rpc::introspect::{IntrospectClient, OBJECT};
use chatter_rpc::{connect, listen, remote, Options, Peer, PeerOptions};

struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method hands the call to `System` unchanged and returns its result; the
// counting only touches atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[remote]
pub trait Echo {
    async fn echo(&self, x: u64) -> u64;
}

struct E;

impl Echo for E {
    async fn echo(&self, x: u64) -> u64 {
        x
    }
}

const PEERS: usize = 100;

/// Live bytes and allocations per peer of making `PEERS` peers from accepted
/// connections, each hosting one object (the connections themselves not counted).
async fn per_peer(introspection: bool) -> (f64, f64) {
    let server = listen("tcp://127.0.0.1:0", Options::default())
        .await
        .expect("listen");
    let address = server.addresses()[0].clone();
    let mut clients = Vec::new();
    let mut accepted = Vec::new();
    for _ in 0..PEERS {
        clients.push(
            connect(&address, Options::default())
                .await
                .expect("connect"),
        );
        accepted.push(server.accept().await.expect("accept"));
    }
    let options = PeerOptions::default().introspection(introspection);
    let (live, count) = (
        LIVE.load(Ordering::SeqCst),
        ALLOCATIONS.load(Ordering::SeqCst),
    );
    let mut peers = Vec::new();
    for connection in accepted {
        let peer = Peer::with_options(connection, options.clone());
        peer.register("echo", EchoServer::new(E));
        peers.push(peer);
    }
    let bytes = (LIVE.load(Ordering::SeqCst) - live) as f64 / PEERS as f64;
    let allocations = (ALLOCATIONS.load(Ordering::SeqCst) - count) as f64 / PEERS as f64;
    drop(peers);
    drop(clients);
    (bytes, allocations)
}

#[test]
fn introspection_costs_a_peer_nothing_until_used() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // Warm up (lazy statics, the runtime's first allocations).
        per_peer(true).await;
        per_peer(false).await;
        let (off_bytes, off_allocations) = per_peer(false).await;
        let (on_bytes, on_allocations) = per_peer(true).await;
        println!(
            "per peer: introspection off {off_bytes:.1} bytes in {off_allocations:.2} \
             allocations, on {on_bytes:.1} bytes in {on_allocations:.2}"
        );
        assert_eq!(on_allocations, off_allocations);
        assert_eq!(on_bytes, off_bytes);

        // And it answers all the same.
        let server = listen("tcp://127.0.0.1:0", Options::default())
            .await
            .expect("listen");
        let address = server.addresses()[0].clone();
        let client = Peer::new(
            connect(&address, Options::default())
                .await
                .expect("connect"),
        );
        let served = Peer::new(server.accept().await.expect("accept"));
        served.register("echo", EchoServer::new(E));
        let listed = IntrospectClient::new(&client, OBJECT)
            .list()
            .await
            .expect("list");
        let names: Vec<&str> = listed.iter().map(|o| o.object.as_str()).collect();
        assert_eq!(names, [OBJECT, "echo"]);
    });
}
