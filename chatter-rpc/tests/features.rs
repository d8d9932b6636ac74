//! What a build without an optional feature does when asked for it: a clear error at once,
//! never a panic, a silent fallback or an endless reconnect loop.

use chatter_core::ListenError;
#[cfg(not(all(feature = "tls", feature = "persistence")))]
use chatter_rpc::ReconnectError;
#[cfg(not(feature = "tls"))]
use chatter_rpc::{
    chatter_core::{AddressError, ConnectError},
    connect,
};
use chatter_rpc::{listen, Options, Peer, PeerOptions, ReconnectOptions};

/// Without `tls`, `tls://` is refused by `connect`, `listen` and `Peer::reconnecting`.
#[cfg(not(feature = "tls"))]
#[tokio::test]
async fn tls_addresses_are_refused_without_the_tls_feature() {
    let not_compiled_in = |address: &str| AddressError::TlsNotCompiledIn {
        address: address.into(),
    };
    match connect("tls://127.0.0.1:7443", Options::default()).await {
        Err(ConnectError::Address(e)) => {
            assert_eq!(e, not_compiled_in("tls://127.0.0.1:7443"));
            assert!(
                e.to_string().contains(
                    "TLS support is not compiled in: enable the `tls` feature of chatter-rpc"
                ),
                "{e}"
            );
        }
        other => panic!("expected TlsNotCompiledIn, got {other:?}"),
    }
    match listen("tls://127.0.0.1:0", Options::default()).await {
        Err(ListenError::Address(e)) => assert_eq!(e, not_compiled_in("tls://127.0.0.1:0")),
        other => panic!("expected TlsNotCompiledIn, got {other:?}"),
    }
    let peer = Peer::reconnecting(
        "tls://127.0.0.1:7443",
        Options::default(),
        PeerOptions::default(),
        ReconnectOptions::default(),
    );
    match peer {
        Err(ReconnectError::Address(e)) => assert_eq!(e, not_compiled_in("tls://127.0.0.1:7443")),
        Err(e) => panic!("expected TlsNotCompiledIn, got {e}"),
        Ok(_) => panic!("a tls:// peer started without TLS"),
    }
}

/// With `tls`, the same addresses get as far as asking for TLS settings.
#[cfg(feature = "tls")]
#[tokio::test]
async fn tls_addresses_are_usable_with_the_tls_feature() {
    let refused = listen("tls://127.0.0.1:0", Options::default()).await;
    assert!(
        matches!(refused, Err(ListenError::Options(_))),
        "{refused:?}"
    );
}

/// Without `persistence`, a store is refused when the peer is made: the signals meant
/// for it are never silently kept in memory only.
#[cfg(not(feature = "persistence"))]
#[tokio::test]
async fn a_store_is_refused_without_the_persistence_feature() {
    let path = std::env::temp_dir().join("chatter-no-persistence.sqlite");
    let peer = Peer::reconnecting(
        "tcp://127.0.0.1:7000",
        Options::default(),
        PeerOptions::default(),
        ReconnectOptions::default().store(&path),
    );
    match peer {
        Err(ReconnectError::PersistenceNotCompiledIn { path: refused }) => {
            assert_eq!(refused, path);
            let message = ReconnectError::PersistenceNotCompiledIn { path: refused }.to_string();
            assert!(
                message.contains(
                    "persistence support is not compiled in: enable the `persistence` feature \
                     of chatter-rpc"
                ),
                "{message}"
            );
        }
        Err(e) => panic!("expected PersistenceNotCompiledIn, got {e}"),
        Ok(_) => panic!("a peer with a store started without persistence"),
    }
    assert!(!path.exists(), "nothing was created");
}

/// With `persistence`, the same options open the store.
#[cfg(feature = "persistence")]
#[tokio::test]
async fn a_store_opens_with_the_persistence_feature() {
    let path =
        std::env::temp_dir().join(format!("chatter-persistence-{}.sqlite", std::process::id()));
    let peer = Peer::reconnecting(
        "tcp://127.0.0.1:9",
        Options::default(),
        PeerOptions::default(),
        ReconnectOptions::default().store(&path),
    )
    .expect("a store opens");
    peer.close().await;
    drop(peer);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
