//! In-process clients: a [`Bus`] whose connection to the broker is an in-memory pipe
//! (`tokio::io::duplex`) instead of a socket, handed to the broker's accept path
//! ([`Server::accept_over`](chatter_core::Server::accept_over)), so that everything else
//! (handshake, options and limits, flow control, routing, disconnects) is the socket's.

use std::path::PathBuf;

use chatter_core::{Address, ListenError, Server};

use crate::{Broker, BrokerOptions, Bus, BusError, BusOptions};

/// The default [`BusOptions::local_buffer`]: 64 KiB each way. Larger pipes (256 KiB,
/// 1 MiB) measured no faster for 100-byte calls and signals (`examples/local_bench.rs`),
/// and each in-process connection holds up to twice this much in its pipe.
pub const LOCAL_BUFFER: usize = 64 * 1024;

impl Broker {
    /// A broker without a listener, for in-process clients only
    /// ([`connect_local`](Self::connect_local)); [`addresses`](Self::addresses) is empty.
    /// `options.connection` applies to every in-process connection (its
    /// `max_connections` counts them). Must be called within a tokio runtime.
    ///
    /// ```
    /// use chatter_broker::{Broker, BrokerOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let broker = Broker::in_process(BrokerOptions::default())?;
    /// let _sensor = broker.connect_local("sensor-1").await?;
    /// assert_eq!(broker.names(), ["sensor-1"]);
    /// # Ok(()) }
    /// ```
    pub fn in_process(options: BrokerOptions) -> Result<Broker, ListenError> {
        let server = Server::in_process(options.connection_options().clone())?;
        Ok(Broker::serve(server, options))
    }

    /// Connects a client in this process, without a socket, and registers it as `name`:
    /// the [`Bus`] behaves exactly as one made by [`connect`](crate::connect) (routed
    /// calls, signals and streams to and from socket clients, name rules, flow control,
    /// disconnects; the broker's [`close`](Self::close) closes it), over an in-memory pipe
    /// of [`BusOptions::local_buffer`] bytes each way. The connection counts against the
    /// broker's `max_connections`.
    ///
    /// ```
    /// use chatter_broker::{Broker, BrokerOptions};
    /// use chatter_rpc::remote;
    ///
    /// #[remote]
    /// pub trait Thermometer {
    ///     async fn celsius(&self) -> f64;
    /// }
    /// struct T;
    /// impl Thermometer for T {
    ///     async fn celsius(&self) -> f64 { 21.5 }
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let broker = Broker::listen("tcp://127.0.0.1:0", BrokerOptions::default()).await?;
    /// // In this process, no socket:
    /// let thermo = broker.connect_local("thermo-1").await?;
    /// thermo.register("thermo", ThermometerServer::new(T));
    /// // Anywhere, over TCP:
    /// let app = chatter_broker::connect(&broker.addresses()[0], "app").await?;
    /// let client = ThermometerClient::new(&app.peer("thermo-1"), "thermo");
    /// assert_eq!(client.celsius().await?, 21.5);
    /// # Ok(()) }
    /// ```
    pub async fn connect_local(&self, name: &str) -> Result<Bus, BusError> {
        self.connect_local_with(name, BusOptions::default()).await
    }

    /// [`connect_local`](Self::connect_local) with options (as
    /// [`connect_with`](crate::connect_with)); their TLS settings are not used.
    pub async fn connect_local_with(
        &self,
        name: &str,
        options: BusOptions,
    ) -> Result<Bus, BusError> {
        let take_over = options.takes_over();
        self.connect_local_unnamed(options)
            .await?
            .named(name, take_over)
            .await
    }

    /// Connects a client in this process without a name (as
    /// [`connect_unnamed`](crate::connect_unnamed)): register its objects, then
    /// [`claim`](Bus::claim) one.
    ///
    /// ```
    /// use chatter_broker::{Broker, BusOptions};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let broker = Broker::in_process(Default::default())?;
    /// let bus = broker.connect_local_unnamed(BusOptions::new().local_buffer(64 * 1024)).await?;
    /// // bus.register(…);
    /// bus.claim("worker-1", false).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect_local_unnamed(&self, options: BusOptions) -> Result<Bus, BusError> {
        // Bounded: `local_buffer` bytes each way, which the connections' flow control
        // fills at most (writers wait for room).
        let (near, far) = tokio::io::duplex(options.local_buffer_bytes());
        let server = self.server();
        let broker_side = server
            .addresses()
            .first()
            .cloned()
            .unwrap_or_else(in_process_address);
        server.accept_over(far, broker_side.clone(), in_process_address());
        let connection = options.connection_options().clone();
        let conn =
            chatter_core::connect_over(near, in_process_address(), broker_side, connection).await?;
        Bus::on_connection(conn, options).await
    }
}

/// The address an in-process connection reports for its client end, and for the broker's
/// end when the broker has no listener: `unix://in-process`. Nothing listens there.
fn in_process_address() -> Address {
    Address::Unix {
        path: PathBuf::from("in-process"),
    }
}
