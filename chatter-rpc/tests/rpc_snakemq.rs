//! The snakeMQ RPC scenarios (REFERENCE.md §2.3 and §2.5), mapped onto chatter-rpc.

mod common;

use std::time::Duration;

use chatter_rpc::{remote, CallError};
use common::{pair, within, CalcError};

#[remote]
pub trait Partial {
    async fn add(&self, a: i64, b: i64) -> i64;
    async fn missing(&self) -> ();
}

/// `test_regular_call`: an OK result is returned and an exception result is re-raised
/// (here: a typed app error); nothing stays pending afterwards.
#[tokio::test(start_paused = true)]
async fn regular_call_ok_and_raising() {
    let p = pair().await;
    assert_eq!(p.calc.add(3, 8).await.unwrap(), 11);
    let err = p.calc.div(1, 0).await.unwrap_err();
    assert_eq!(err.into_app(), Some(CalcError::DivisionByZero));
    // The peer still answers: no state was left behind by the error.
    assert_eq!(p.calc.add(1, 2).await.unwrap(), 3);
}

/// `test_call_missing_method__sends_NoMethodError`.
#[tokio::test(start_paused = true)]
async fn missing_method() {
    let p = pair().await;
    let partial = PartialClient::new(&p.client, "calc");
    assert_eq!(partial.add(1, 1).await.unwrap(), 2);
    let err = partial.missing().await.unwrap_err();
    assert!(matches!(err, CallError::NoSuchMethod { .. }), "{err:?}");
}

/// `test_call_timeout_not_connected`: a call while not connected fails at once (snakeMQ
/// waits for a reconnect; chatter-rpc has no reconnect yet and says the connection is gone).
#[tokio::test(start_paused = true)]
async fn call_while_not_connected() {
    let p = pair().await;
    p.server.close().await;
    p.client.closed().await;
    let start = tokio::time::Instant::now();
    let err = p.calc.add(1, 1).await.unwrap_err();
    assert!(matches!(err, CallError::ConnectionLost(_)), "{err:?}");
    assert_eq!(start.elapsed(), Duration::ZERO);
}

/// `test_call_timeout_partial_call`: the request was sent but the reply never comes; the
/// call fails at its deadline and a late reply is discarded.
#[tokio::test(start_paused = true)]
async fn call_whose_reply_never_comes() {
    let mut p = pair().await;
    let err = p
        .calc
        .with_deadline(Duration::from_secs(2))
        .wait("never".into())
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::DeadlineExceeded), "{err:?}");
    assert!(err.is_outcome_unknown());
    // The callee dropped the handler on its own deadline; its late reply (deadline
    // exceeded) is discarded and later calls are unaffected.
    assert_eq!(within(p.probe.dropped.recv()).await.unwrap(), "never");
    assert_eq!(p.calc.add(2, 2).await.unwrap(), 4);
}
