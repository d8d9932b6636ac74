//! The broker over every transport (TCP, Unix sockets, TLS with the test PKI): a routed
//! call and a routed signal, and the name refused on each.

use chatter_broker::{Broker, BrokerOptions, BusError, BusOptions, RegisterError};
use chatter_core::Options;
use chatter_rpc::remote;
use tests::Transport;
use tokio::sync::mpsc;

#[remote]
pub trait Echo {
    async fn echo(&self, text: String) -> String;
    #[signal]
    async fn tell(&self, text: String);
}

/// Tells the test each signal it handled (unbounded: one per signal the test sends).
struct E(mpsc::UnboundedSender<String>);

impl Echo for E {
    async fn echo(&self, text: String) -> String {
        text
    }
    async fn tell(&self, text: String) {
        let _ = self.0.send(text);
    }
}

#[tokio::test]
async fn routed_calls_and_signals_over_every_transport() {
    for &transport in Transport::ALL {
        let options = BrokerOptions::new().connection(transport.server_options(Options::default()));
        let broker = Broker::listen(transport.listen_address(), options)
            .await
            .unwrap_or_else(|e| panic!("{transport:?}: listen: {e}"));
        let address = broker.addresses()[0].clone();
        let bus_options =
            || BusOptions::new().connection(transport.client_options(Options::default()));

        let (told, mut heard) = mpsc::unbounded_channel();
        let server = chatter_broker::connect_unnamed(&address, bus_options())
            .await
            .unwrap_or_else(|e| panic!("{transport:?}: connect: {e}"));
        server.register("echo", EchoServer::new(E(told)));
        server.claim("echo-1", false).await.expect("claim");

        let client = chatter_broker::connect_with(&address, "client", bus_options())
            .await
            .expect("client connects");
        let echo = EchoClient::new(&client.peer("echo-1"), "echo");
        assert_eq!(
            echo.echo("hi".into()).await.expect("call"),
            "hi",
            "{transport:?}"
        );
        echo.tell("there".into()).await.expect("signal queued");
        assert_eq!(
            heard.recv().await.as_deref(),
            Some("there"),
            "{transport:?}"
        );

        match chatter_broker::connect_with(&address, "echo-1", bus_options()).await {
            Err(BusError::Refused(RegisterError::NameTaken { .. })) => {}
            other => panic!("{transport:?}: expected NameTaken, got {other:?}"),
        }
        broker.close().await;
    }
}
