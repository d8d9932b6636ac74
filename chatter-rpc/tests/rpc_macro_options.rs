//! `#[remote]` options a user reaches for: `#[result]` for a `Result` alias, `#[plain]`
//! for a `Result` sent as a value, raw identifiers as method names, and
//! `#[remote(crate = "..")]` when chatter-rpc is reached through another path.

mod common;

use chatter_rpc::{remote, CallError, Peer};
use common::{connections, within};
use serde::{Deserialize, Serialize};

/// Reached through this module instead of `::chatter_rpc`, as with a renamed dependency.
mod shim {
    pub use chatter_rpc::*;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("no entry {0}")]
pub struct Missing(u32);

pub type Res<T> = Result<T, Missing>;

#[remote(crate = "crate::shim")]
pub trait Store {
    /// An alias of `Result`: `#[result]` makes `Missing` the application error.
    #[result]
    async fn get(&self, key: u32) -> Res<String>;
    /// A `Result` sent as a value, `Err` and all.
    #[plain]
    async fn parse(&self, text: String) -> Result<i64, String>;
    /// A raw identifier: on the wire as `type`.
    async fn r#type(&self) -> String;
}

struct Memory;

impl Store for Memory {
    async fn get(&self, key: u32) -> Res<String> {
        match key {
            1 => Ok("one".into()),
            other => Err(Missing(other)),
        }
    }

    async fn parse(&self, text: String) -> Result<i64, String> {
        text.parse().map_err(|e| format!("{e}"))
    }

    async fn r#type(&self) -> String {
        "memory".into()
    }
}

#[tokio::test(start_paused = true)]
async fn result_alias_plain_result_raw_names_and_a_crate_path() {
    let (client_conn, server_conn) = connections(Default::default()).await;
    let server = Peer::new(server_conn);
    server.register("store", StoreServer::new(Memory));
    let client = Peer::new(client_conn);
    let store = StoreClient::new(&client, "store");

    // `#[result]`: the alias's `Err` arrives as the typed application error.
    assert_eq!(within(store.get(1)).await.unwrap(), "one");
    match within(store.get(7)).await {
        Err(CallError::App { error, remote }) => {
            assert_eq!(error, Missing(7));
            assert_eq!(remote.message, "no entry 7");
        }
        other => panic!("expected the application error, got {other:?}"),
    }

    // `#[plain]`: the `Result` is the return value, so the call succeeds with an `Err`.
    assert_eq!(within(store.parse("42".into())).await.unwrap(), Ok(42));
    let parsed: Result<i64, String> = within(store.parse("x".into())).await.unwrap();
    assert!(parsed.unwrap_err().contains("invalid digit"));

    assert_eq!(within(store.r#type()).await.unwrap(), "memory");
}

/// The wire name of `r#type` is `type`: a peer written in another language calls it so.
#[tokio::test(start_paused = true)]
async fn a_raw_identifier_goes_on_the_wire_without_r_hash() {
    use chatter_core::SendOptions;
    let (raw, server_conn) = connections(Default::default()).await;
    let server = Peer::new(server_conn);
    server.register("store", StoreServer::new(Memory));
    // [0, "store", "type", 5, nil]
    let call = b"\x95\x00\xa5store\xa4type\x05\xc0";
    let conv = raw
        .send_bytes(call, SendOptions::new().last(false))
        .await
        .unwrap();
    let reply = within(raw.receive()).await.unwrap();
    assert_eq!(reply.conversation, conv);
    assert_eq!(reply.payload.as_ref(), b"\x92\x00\xa6memory");
}
