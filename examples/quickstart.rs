//! A server and a client in one process, exchanging a few conversations.
//!
//! Run with `cargo run --example quickstart`.

use std::time::Duration;

use chatter_core::{connect, listen, Options, SendOptions};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Add(i64, i64),
    Countdown(u32),
    Note(String),
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = listen("tcp://127.0.0.1:0", Options::default()).await?;
    let address = server.addresses()[0].clone();
    println!("server: listening on {address}");

    let serving = tokio::spawn(async move {
        while let Some(conn) = server.accept().await {
            println!("server: accepted {}", conn.remote_address());
            tokio::spawn(async move {
                while let Ok(msg) = conn.receive().await {
                    let request: Request = match msg.decode() {
                        Ok(r) => r,
                        Err(e) => {
                            // Expected below: the client's last message is not a Request.
                            println!("server: ignoring a message that is not a Request ({e})");
                            continue;
                        }
                    };
                    println!(
                        "server: received {request:?} (first={}, token={})",
                        msg.first, msg.token
                    );
                    let reply = SendOptions::new().conversation(msg.conversation);
                    let sent = match request {
                        Request::Add(a, b) => conn.send(&(a + b), reply).await,
                        // A one-shot message ended its conversation: there is nothing to answer.
                        Request::Note(text) => {
                            println!("server: note from the client: {text:?} (last={})", msg.last);
                            continue;
                        }
                        // A longer conversation: several messages keeping the turn, then the last.
                        Request::Countdown(n) => {
                            for i in (1..=n).rev() {
                                conn.send(&i, reply.last(false).token(false)).await?;
                            }
                            conn.send(&0u32, reply).await
                        }
                    };
                    if let Err(e) = sent {
                        println!("server: cannot reply: {e}");
                    }
                }
                Ok::<_, chatter_core::SendError>(())
            });
        }
    });

    let client = connect(&address, Options::default()).await?;
    println!("client: connected from {}", client.local_address());

    // A request/reply conversation: the request passes the turn, the reply ends it.
    let conv = client
        .send(
            &Request::Add(2, 3),
            SendOptions::new()
                .last(false)
                .timeout(Duration::from_secs(5)),
        )
        .await?;
    let reply = client.receive().await?;
    assert_eq!(reply.conversation, conv);
    println!(
        "client: 2 + 3 = {} (last={})",
        reply.decode::<i64>()?,
        reply.last
    );

    // A multi-message conversation.
    let conv = client
        .send(&Request::Countdown(3), SendOptions::new().last(false))
        .await?;
    loop {
        let msg = client.receive().await?;
        assert_eq!(msg.conversation, conv);
        println!(
            "client: countdown {} (last={})",
            msg.decode::<u32>()?,
            msg.last
        );
        if msg.last {
            break;
        }
    }

    // A one-shot message: first and last at once; the conversation ends with it.
    client
        .send(
            &Request::Note("hello from the client".into()),
            SendOptions::new(),
        )
        .await?;

    // A message the server cannot decode as a Request: it reports the error and does not
    // answer, so the conversation times out.
    let silent = client
        .send(
            &"anyone?",
            SendOptions::new()
                .last(false)
                .timeout(Duration::from_millis(200)),
        )
        .await?;
    let timed_out = client.next_timeout().await?;
    println!(
        "client: no answer to that one, as intended: conversation {} timed out ({})",
        silent.first_id(),
        timed_out == silent
    );

    client.close().await;
    println!("client: closed ({})", client.closed().await);
    serving.abort();
    Ok(())
}
