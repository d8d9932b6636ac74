//! Addresses as URLs: `tcp://host:port`, `tls://host:port` and `unix:///path/to/socket`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::OnceLock;

use crate::error::AddressError;
use crate::transport::SocketName;

/// Where to connect or listen.
///
/// ```
/// use chatter_core::Address;
///
/// let tcp: Address = "tcp://127.0.0.1:7000".parse()?;
/// assert_eq!(tcp, Address::Tcp { host: "127.0.0.1".into(), port: 7000 });
/// let unix: Address = "unix:///run/app.sock".parse()?;
/// assert_eq!(unix.to_string(), "unix:///run/app.sock");
/// assert!("tcp://127.0.0.1".parse::<Address>().is_err()); // no port
/// # Ok::<(), chatter_core::AddressError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Address {
    /// `tcp://host:port`; IPv6 hosts in brackets (`tcp://[::1]:7000`).
    Tcp {
        /// Host name or IP address, without brackets.
        host: String,
        /// Port; 0 asks the system for a free one when listening.
        port: u16,
    },
    /// `tls://host:port`: TCP with TLS (see the `tls` module). It parses in every build;
    /// connecting and listening need the `tls` feature ([`Address::check_supported`]).
    Tls {
        /// Host name or IP address, without brackets; the default TLS server name.
        host: String,
        /// Port; 0 asks the system for a free one when listening.
        port: u16,
    },
    /// `unix://PATH`, for example `unix:///tmp/app.sock`. An unnamed socket (the client
    /// end of a Unix connection) has an empty path.
    Unix {
        /// The socket's path.
        path: PathBuf,
    },
}

impl Address {
    /// Whether this build of chatter-core can connect to and listen on the address, as
    /// [`connect`](crate::connect) and [`listen`](crate::listen) would decide: a `tls://`
    /// address needs the `tls` feature. Useful to refuse a configured address at start-up
    /// rather than at the first connection attempt.
    ///
    /// ```
    /// use chatter_core::{Address, AddressError};
    ///
    /// let tls: Address = "tls://example.com:7443".parse()?;
    /// match tls.check_supported() {
    ///     Ok(()) => assert!(cfg!(feature = "tls")),
    ///     Err(AddressError::TlsNotCompiledIn { .. }) => assert!(!cfg!(feature = "tls")),
    ///     Err(e) => panic!("{e}"),
    /// }
    /// # Ok::<(), AddressError>(())
    /// ```
    pub fn check_supported(&self) -> Result<(), AddressError> {
        match self {
            #[cfg(not(feature = "tls"))]
            Address::Tls { .. } => Err(self.tls_not_compiled_in()),
            _ => Ok(()),
        }
    }

    /// The error for a `tls://` address in a build without TLS.
    #[cfg(not(feature = "tls"))]
    pub(crate) fn tls_not_compiled_in(&self) -> AddressError {
        AddressError::TlsNotCompiledIn {
            address: self.to_string(),
        }
    }
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(address: &str) -> Result<Self, AddressError> {
        let malformed = |reason: &str| AddressError::Malformed {
            address: address.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = address
            .split_once("://")
            .ok_or_else(|| malformed("expected scheme://…, for example tcp://127.0.0.1:7000"))?;
        match scheme.to_ascii_lowercase().as_str() {
            "tcp" => {
                let (host, port) = split_host_port(address, rest)?;
                Ok(Address::Tcp { host, port })
            }
            "unix" => {
                if rest.is_empty() {
                    return Err(malformed("missing socket path"));
                }
                Ok(Address::Unix {
                    path: PathBuf::from(rest),
                })
            }
            "tls" => {
                let (host, port) = split_host_port(address, rest)?;
                Ok(Address::Tls { host, port })
            }
            _ => Err(AddressError::UnknownScheme {
                address: address.to_string(),
                scheme: scheme.to_string(),
            }),
        }
    }
}

fn split_host_port(address: &str, rest: &str) -> Result<(String, u16), AddressError> {
    let malformed = |reason: &str| AddressError::Malformed {
        address: address.to_string(),
        reason: reason.to_string(),
    };
    let missing_port = || AddressError::MissingPort {
        address: address.to_string(),
    };
    if rest.contains(['/', '?', '#', '@']) {
        return Err(malformed("expected only host:port after tcp://"));
    }
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| malformed("unclosed '[' in IPv6 host"))?;
        match after.strip_prefix(':') {
            Some(port) => (host, port),
            None if after.is_empty() => return Err(missing_port()),
            None => return Err(malformed("expected ':' after ']'")),
        }
    } else {
        let (host, port) = rest.rsplit_once(':').ok_or_else(missing_port)?;
        if host.contains(':') {
            return Err(malformed(
                "IPv6 hosts must be in brackets, e.g. tcp://[::1]:7000",
            ));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(malformed("missing host"));
    }
    if port.is_empty() {
        return Err(missing_port());
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| malformed("port must be a number from 0 to 65535"))?;
    Ok((host.to_string(), port))
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp://[{host}]:{port}")
            }
            Address::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Address::Tls { host, port } if host.contains(':') => {
                write!(f, "tls://[{host}]:{port}")
            }
            Address::Tls { host, port } => write!(f, "tls://{host}:{port}"),
            Address::Unix { path } => write!(f, "unix://{}", path.display()),
        }
    }
}

impl From<std::net::SocketAddr> for Address {
    fn from(addr: std::net::SocketAddr) -> Self {
        Address::Tcp {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }
}

/// A connection's address, formatted only when asked for: most short connections never
/// ask, and turning an IP address into a string is a measurable part of opening one.
#[derive(Debug)]
pub(crate) struct LazyAddress {
    source: Source,
    address: OnceLock<Address>,
}

#[derive(Debug)]
enum Source {
    /// The address is in `address` from the start.
    Ready,
    /// A TCP socket address (`tls://` when the flag is set).
    Socket(SocketAddr, bool),
    /// A connected TCP socket's own address, asked of the socket (`getsockname`) only when
    /// first needed (`tls://` when the flag is set).
    Name(SocketName, bool),
}

impl LazyAddress {
    /// A TCP socket address: `tcp://` or, with `tls`, `tls://`.
    pub(crate) fn socket(addr: SocketAddr, tls: bool) -> Self {
        LazyAddress {
            source: Source::Socket(addr, tls),
            address: OnceLock::new(),
        }
    }

    /// A TCP socket's own address, asked of it when first needed. Its owner calls
    /// [`release`](Self::release) before the socket is closed (see [`SocketName`]).
    pub(crate) fn name(name: SocketName, tls: bool) -> Self {
        LazyAddress {
            source: Source::Name(name, tls),
            address: OnceLock::new(),
        }
    }

    /// An address already known in full.
    pub(crate) fn ready(address: Address) -> Self {
        LazyAddress {
            source: Source::Ready,
            address: OnceLock::from(address),
        }
    }

    /// The same socket address under `tls://`.
    #[cfg(feature = "tls")]
    pub(crate) fn tls(self) -> Self {
        match self.source {
            Source::Socket(addr, _) => LazyAddress::socket(addr, true),
            _ => self,
        }
    }

    pub(crate) fn get(&self) -> &Address {
        self.address.get_or_init(|| {
            let (addr, tls) = match &self.source {
                Source::Socket(addr, tls) => (*addr, *tls),
                // Unknown only if asked after `release(false)`, which nothing does (the
                // owner releases without resolving when no one is left to ask), or if the
                // socket cannot tell: the unspecified address, rather than a panic.
                Source::Name(name, tls) => (
                    name.resolve()
                        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
                    *tls,
                ),
                Source::Ready => unreachable!("a ready address is set when it is made"),
            };
            let host = addr.ip().to_string();
            let port = addr.port();
            if tls {
                Address::Tls { host, port }
            } else {
                Address::Tcp { host, port }
            }
        })
    }

    /// Called by the owner of the socket before it closes it: resolves the address first
    /// if it may still be asked for (`keep`), then forgets the socket.
    pub(crate) fn release(&self, keep: bool) {
        let Source::Name(name, _) = &self.source else {
            return;
        };
        // Resolved before the release, not under its lock: `get` takes that lock inside
        // the `OnceLock`'s initialisation, and the reverse order could deadlock.
        if keep {
            self.get();
        }
        name.release();
    }
}

/// Anything [`connect`](crate::connect) and [`listen`](crate::listen) accept as an address:
/// strings (parsed as URLs) and [`Address`] values.
pub trait ToAddress {
    /// Parses or copies the address.
    fn to_address(&self) -> Result<Address, AddressError>;
}

impl ToAddress for Address {
    fn to_address(&self) -> Result<Address, AddressError> {
        Ok(self.clone())
    }
}

impl ToAddress for str {
    fn to_address(&self) -> Result<Address, AddressError> {
        self.parse()
    }
}

impl ToAddress for String {
    fn to_address(&self) -> Result<Address, AddressError> {
        self.parse()
    }
}

/// A socket address is a `tcp://` address.
///
/// ```
/// use chatter_core::{Address, ToAddress};
/// let addr: std::net::SocketAddr = "127.0.0.1:7000".parse().unwrap();
/// assert_eq!(addr.to_address().unwrap().to_string(), "tcp://127.0.0.1:7000");
/// ```
impl ToAddress for std::net::SocketAddr {
    fn to_address(&self) -> Result<Address, AddressError> {
        Ok(Address::from(*self))
    }
}

impl<T: ToAddress + ?Sized> ToAddress for &T {
    fn to_address(&self) -> Result<Address, AddressError> {
        (**self).to_address()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_addresses_parse_and_print_back() {
        for a in [
            "tcp://127.0.0.1:7000",
            "tcp://localhost:0",
            "tcp://[::1]:9",
            "tls://example.com:7443",
            "unix:///tmp/x.sock",
            "unix://relative.sock",
        ] {
            assert_eq!(a.parse::<Address>().unwrap().to_string(), a);
        }
        assert_eq!(
            "TCP://h:1".parse::<Address>().unwrap(),
            Address::Tcp {
                host: "h".into(),
                port: 1
            }
        );
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        let err = |a: &str| a.parse::<Address>().unwrap_err();
        assert!(matches!(
            err("tcp://127.0.0.1"),
            AddressError::MissingPort { .. }
        ));
        assert!(matches!(
            err("tcp://127.0.0.1:"),
            AddressError::MissingPort { .. }
        ));
        assert!(matches!(
            err("tcp://[::1]"),
            AddressError::MissingPort { .. }
        ));
        assert!(matches!(
            err("udp://127.0.0.1:1"),
            AddressError::UnknownScheme { .. }
        ));
        assert!(matches!(
            err("tls://127.0.0.1"),
            AddressError::MissingPort { .. }
        ));
        for a in [
            "127.0.0.1:80",
            "tcp://:80",
            "tcp://h:99999",
            "tcp://h:x",
            "tcp://::1:5",
            "tcp://h:1/p",
            "unix://",
            "",
        ] {
            assert!(
                matches!(err(a), AddressError::Malformed { .. }),
                "{a}: {:?}",
                err(a)
            );
        }
        assert_eq!(
            err("tcp://127.0.0.1").to_string(),
            "address \"tcp://127.0.0.1\" has no port (expected tcp://host:port)"
        );
    }
}
