//! Opening transports: [`connect`] and [`listen`].

use std::io;

use tokio::net::{TcpStream, UnixStream};

use crate::error::{ConnectError, ListenError};
use crate::server::Server;
use crate::{Address, Connection, Options, ToAddress};

/// Connects to a peer and completes the chatter handshake.
///
/// `address` is `tcp://host:port` or `unix:///path`. Fails with a clear [`ConnectError`]
/// when the address is malformed, nothing listens there, connecting takes longer than
/// [`Options::connect_timeout`], or the peer does not speak chatter.
///
/// ```no_run
/// # async fn demo() -> Result<(), chatter_core::ConnectError> {
/// let conn = chatter_core::connect("tcp://127.0.0.1:7000", Default::default()).await?;
/// # let _ = conn; Ok(()) }
/// ```
pub async fn connect(
    address: impl ToAddress,
    options: Options,
) -> Result<Connection, ConnectError> {
    let address = address.to_address()?;
    options.validate()?;
    let name = address.to_string();
    let opened = tokio::time::timeout(options.connect_timeout, open(&address, &options))
        .await
        .map_err(|_| ConnectError::Timeout {
            address: name.clone(),
        })?;
    let conn = opened.map_err(|source| ConnectError::Io {
        address: name.clone(),
        source,
    })?;
    conn.handshake()
        .await
        .map_err(|cause| ConnectError::Handshake {
            address: name,
            cause,
        })?;
    Ok(conn)
}

/// Listens for peers; see [`Server`].
///
/// `tcp://host:0` binds a free port; [`Server::addresses`] reports the one chosen. A host
/// name that resolves to several addresses binds each of them.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), chatter_core::ListenError> {
/// let server = chatter_core::listen("tcp://127.0.0.1:0", Default::default()).await?;
/// assert_ne!(server.addresses()[0].to_string(), "tcp://127.0.0.1:0");
/// # Ok(()) }
/// ```
pub async fn listen(address: impl ToAddress, options: Options) -> Result<Server, ListenError> {
    let address = address.to_address()?;
    options.validate()?;
    Server::bind(address, options).await
}

async fn open(address: &Address, options: &Options) -> io::Result<Connection> {
    match address {
        Address::Tcp { host, port } => {
            let mut last = None;
            for addr in tokio::net::lookup_host((host.as_str(), *port)).await? {
                match TcpStream::connect(addr).await {
                    Ok(stream) => {
                        stream.set_nodelay(true)?;
                        let local = stream.local_addr()?.into();
                        let remote = stream.peer_addr()?.into();
                        return Ok(Connection::start(stream, local, remote, options));
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "host name resolved to no address")
            }))
        }
        Address::Unix { path } => {
            let stream = UnixStream::connect(path).await?;
            let local = unix_address(stream.local_addr().ok());
            Ok(Connection::start(stream, local, address.clone(), options))
        }
    }
}

pub(crate) fn unix_address(addr: Option<tokio::net::unix::SocketAddr>) -> Address {
    Address::Unix {
        path: addr
            .and_then(|a| a.as_pathname().map(|p| p.to_path_buf()))
            .unwrap_or_default(),
    }
}
