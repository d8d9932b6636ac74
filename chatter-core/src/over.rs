//! Connections over a byte stream the application opened itself ([`connect_over`],
//! [`Server::accept_over`](crate::Server::accept_over)): an in-memory pipe
//! (`tokio::io::duplex`) for peers in one process, or any other `AsyncRead + AsyncWrite`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::address::LazyAddress;
use crate::connection::{Side, Transport};
use crate::error::ConnectError;
use crate::{Address, Connection, Options};

/// Starts a connection over `io`, a byte stream already open to a chatter peer (the other
/// end of a `tokio::io::duplex` pipe handed to [`Server::accept_over`](crate::Server::accept_over),
/// say), and completes the handshake, as [`connect`](crate::connect) does over a socket:
/// the same options, limits, keepalive and flow control. `local` and `remote` are the
/// connection's addresses as it reports them (and as errors name it); nothing connects to
/// them. TLS options are not used: wrap `io` in TLS first if it needs it.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use chatter_core::{connect_over, Address, Options, SendOptions, Server};
///
/// let server = Server::in_process(Options::default())?;
/// let (near, far) = tokio::io::duplex(64 * 1024);
/// let here = Address::Unix { path: "in-process".into() };
/// server.accept_over(far, here.clone(), here.clone());
/// let client = connect_over(near, here.clone(), here, Options::default()).await?;
/// let peer = server.accept().await.expect("open");
/// client.send("hi", SendOptions::new()).await?;
/// assert_eq!(peer.receive().await?.decode::<String>()?, "hi");
/// # Ok(()) }
/// ```
pub async fn connect_over<S>(
    io: S,
    local: Address,
    remote: Address,
    options: Options,
) -> Result<Connection, ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    options.validate()?;
    let name = remote.to_string();
    let addrs = (LazyAddress::ready(local), LazyAddress::ready(remote));
    let conn = Connection::start(Opened(io), addrs, None, &options, Side::Connecting);
    conn.handshake()
        .await
        .map_err(|cause| ConnectError::Handshake {
            address: name,
            cause,
        })?;
    Ok(conn)
}

/// A byte stream the application opened: a [`Transport`] with the default behaviour (no
/// reset on abort; the write side is shut down after the peer's end of stream).
pub(crate) struct Opened<S>(pub(crate) S);

impl<S: AsyncRead + Unpin> AsyncRead for Opened<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Opened<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for Opened<S> {}
