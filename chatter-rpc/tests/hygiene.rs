//! Generated code is hygienic: it compiles without the prelude and with user items named
//! like everything it uses (`Result`, `Ok`, `Box`, `Future`, …) in scope.

#[no_implicit_prelude]
mod hostile {
    #![allow(dead_code, non_camel_case_types)]

    pub struct Result;
    pub struct Ok;
    pub struct Err;
    pub struct Option;
    pub struct Some;
    pub struct None;
    pub struct Box;
    pub struct Arc;
    pub struct Send;
    pub struct Sync;
    pub struct Future;
    pub struct Clone;
    pub struct Duration;
    pub struct String;
    pub struct Dispatch;
    pub struct Peer;
    pub struct CallError;
    pub struct fmt;
    pub mod core {}
    pub mod std {}
    pub mod serde {}

    #[::chatter_rpc::remote]
    pub trait Hostile {
        #[idempotent]
        async fn plain(&self, a: i64) -> i64;
        async fn fallible(&self, a: i64) -> ::std::result::Result<i64, ::std::string::String>;
        async fn nothing(&self);
        #[signal(ttl = "2s")]
        async fn ping(&self, n: u32);
    }

    pub struct Impl;

    impl Hostile for Impl {
        async fn plain(&self, a: i64) -> i64 {
            a
        }
        async fn fallible(&self, a: i64) -> ::std::result::Result<i64, ::std::string::String> {
            ::std::result::Result::Err(::std::format!("{a}"))
        }
        async fn nothing(&self) {}
        async fn ping(&self, _n: u32) {}
    }
}

#[tokio::test]
async fn hostile_scope_still_works() {
    use hostile::{HostileClient, HostileServer, Impl};
    let listener = chatter_core::listen("tcp://127.0.0.1:0", Default::default())
        .await
        .unwrap();
    let conn = chatter_core::connect(&listener.addresses()[0], Default::default())
        .await
        .unwrap();
    let server = chatter_rpc::Peer::new(listener.accept().await.unwrap());
    server.register("h", HostileServer::new(Impl));
    let client = HostileClient::new(&chatter_rpc::Peer::new(conn), "h");
    assert_eq!(client.plain(4).await.unwrap(), 4);
    assert_eq!(
        client.fallible(5).await.unwrap_err().into_app().unwrap(),
        "5"
    );
    client.nothing().await.unwrap();
    client.ping(1).await.unwrap();
}
