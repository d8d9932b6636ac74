//! Shared helpers for the workspace's integration tests (in `tests/tests/`).

#![warn(missing_docs)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use chatter_core::{connect, listen, Connection, Options, Server};

/// The transports every end-to-end scenario runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `tcp://127.0.0.1:0`
    Tcp,
    /// `unix://` a fresh path in the temp directory
    Unix,
}

impl Transport {
    /// A fresh address to listen on.
    pub fn listen_address(self) -> String {
        match self {
            Transport::Tcp => "tcp://127.0.0.1:0".to_string(),
            Transport::Unix => format!("unix://{}", unix_path().display()),
        }
    }
}

/// A socket path nobody else uses.
pub fn unix_path() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "chatter-test-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A listening server, a connected client and the server's end of that connection.
pub async fn pair_with(
    transport: Transport,
    server_options: Options,
    client_options: Options,
) -> (Server, Connection, Connection) {
    let server = listen(transport.listen_address(), server_options)
        .await
        .expect("listen");
    let client = connect(&server.addresses()[0], client_options)
        .await
        .expect("connect");
    let accepted = server.accept().await.expect("accept");
    (server, client, accepted)
}

/// [`pair_with`] default options.
pub async fn pair(transport: Transport) -> (Server, Connection, Connection) {
    pair_with(transport, Options::default(), Options::default()).await
}

/// Runs a scenario `async fn name(t: Transport)` as one test per transport.
#[macro_export]
macro_rules! both_transports {
    ($($name:ident),* $(,)?) => {
        mod tcp {
            $(#[tokio::test(start_paused = true)]
            async fn $name() {
                super::$name($crate::Transport::Tcp).await
            })*
        }
        mod unix {
            $(#[tokio::test(start_paused = true)]
            async fn $name() {
                super::$name($crate::Transport::Unix).await
            })*
        }
    };
}
