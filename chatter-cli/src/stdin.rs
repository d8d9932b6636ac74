//! `--stdin`: the items of a method's argument stream, read from stdin as JSON lines.
//!
//! A thread of its own reads stdin (a blocking read that nothing can cancel: on a thread
//! it does not keep the process from exiting, as tokio's stdin would keep the runtime from
//! shutting down) and sends each line's value into the stream, waiting while the stream is
//! full. At the end of stdin it drops the stream's sender, which ends the stream normally.
//! A line that is not JSON is an error, and then the sender is handed back instead of
//! dropped: the caller keeps it until the connection is closed, so that the callee never
//! sees a normal end of a stream that was cut short.

use chatter_rpc::stream::{self, Receiver, Sender};
use serde_json::Value;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::error::CliError;

/// The items in flight between the reading thread and the connection.
const CAPACITY: usize = 16;

/// How the reading thread ended: the number of items sent, or an error and the sender
/// it kept.
type Outcome = Result<u64, (CliError, Sender<Value>)>;

/// The reading thread's outcome, once it has one.
#[derive(Debug)]
pub(crate) struct StdinFeed {
    outcome: Option<oneshot::Receiver<Outcome>>,
}

impl StdinFeed {
    /// Starts reading stdin into a new stream: the stream's receiving end goes to the
    /// call.
    pub(crate) fn start() -> (StdinFeed, Receiver<Value>) {
        let (tx, rx) = stream::channel(CAPACITY);
        let (done, outcome) = oneshot::channel();
        let handle = Handle::current();
        std::thread::spawn(move || {
            let lines = std::io::stdin().lines();
            let _ = done.send(feed(&handle, lines, tx));
        });
        (
            StdinFeed {
                outcome: Some(outcome),
            },
            rx,
        )
    }

    /// Waits until reading stdin fails: the error, and the stream's sender to keep until
    /// the connection is closed (`None` if the reading thread died). Never resolves once
    /// the stream has ended normally.
    pub(crate) async fn failed(&mut self) -> (CliError, Option<Sender<Value>>) {
        let Some(outcome) = &mut self.outcome else {
            return std::future::pending().await;
        };
        let result = outcome.await;
        self.outcome = None;
        match result {
            Ok(Ok(_)) => std::future::pending().await,
            Ok(Err((error, tx))) => (error, Some(tx)),
            Err(_) => (CliError::new("reading stdin failed"), None),
        }
    }
}

/// Sends each non-blank line of `lines` as one JSON value into `tx`; stops early, ending
/// the stream normally, when the callee stops reading.
fn feed(
    handle: &Handle,
    lines: impl Iterator<Item = std::io::Result<String>>,
    tx: Sender<Value>,
) -> Outcome {
    let mut sent = 0;
    for (number, line) in lines.enumerate() {
        let line = match line {
            Ok(line) => line,
            Err(e) => return Err((CliError::new(format!("cannot read stdin: {e}")), tx)),
        };
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let value: Value = match serde_json::from_str(text) {
            Ok(value) => value,
            Err(e) => {
                let error = CliError::new(format!(
                    "stdin line {} is not JSON: {e}: {text}",
                    number + 1
                ))
                .hint("--stdin takes one JSON value per line, each an item of the stream")
                .hint(format!(
                    "the call was cancelled after {sent} item{}",
                    if sent == 1 { "" } else { "s" }
                ));
                return Err((error, tx));
            }
        };
        if handle.block_on(tx.send(value)).is_err() {
            break;
        }
        sent += 1;
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> impl Iterator<Item = std::io::Result<String>> + '_ {
        text.lines().map(|l| Ok(l.to_owned()))
    }

    #[test]
    fn lines_become_items_and_the_end_ends_the_stream() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (tx, mut rx) = stream::channel(CAPACITY);
        let sent = feed(runtime.handle(), lines("1\n\n  {\"a\": 2}\n\"x\"\n"), tx);
        assert!(matches!(sent, Ok(3)), "{sent:?}");
        let mut items = Vec::new();
        runtime.block_on(async {
            while let Some(item) = rx.recv().await {
                items.push(item.expect("an item"));
            }
        });
        assert_eq!(
            items,
            [
                serde_json::json!(1),
                serde_json::json!({"a": 2}),
                serde_json::json!("x")
            ]
        );
    }

    #[test]
    fn a_line_that_is_not_json_keeps_the_stream_open() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (tx, rx) = stream::channel(CAPACITY);
        let Err((error, held)) = feed(runtime.handle(), lines("1\nnope\n2\n"), tx) else {
            panic!("not an error");
        };
        let text = error.to_string();
        assert!(text.contains("stdin line 2 is not JSON"), "{text}");
        assert!(text.contains("cancelled after 1 item"), "{text}");
        // The sender is held: the stream has not ended.
        assert!(!held.is_closed());
        drop(rx);
        assert!(held.is_closed());
    }
}
