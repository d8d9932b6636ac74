//! Shared helpers for the workspace's integration tests (in `tests/tests/`).

#![warn(missing_docs)]

pub mod heap;
pub mod numbers;
pub mod proxy;

/// The README's examples, compiled and run as doctests so they stay true (in builds with
/// TLS, which one of them shows). Here rather than in chatter-rpc because the README also
/// shows chatter-broker, which depends on chatter-rpc.
#[cfg(all(doctest, feature = "tls"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
#[cfg(feature = "tls")]
use std::sync::OnceLock;

#[cfg(feature = "tls")]
use chatter_core::tls::{ClientTls, ServerTls};
use chatter_core::{connect, listen, Connection, Options, SendOptions, Server};
#[cfg(feature = "tls")]
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

/// Waits until `condition` holds, checking it every millisecond and yielding to the other
/// tasks in between. On tokio's paused clock the millisecond is virtual: the clock moves on
/// only while every task waits, so this costs no real time. Panics if the condition has
/// not held after an hour (of virtual time on a paused clock): a hang guard, not a timing
/// assertion.
pub async fn wait_until(mut condition: impl FnMut() -> bool) {
    let check = async {
        while !condition() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(3600), check)
        .await
        .expect("the condition held within the hang guard");
}

/// The transports every end-to-end scenario runs over (TLS with the `tls` feature).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `tcp://127.0.0.1:0`
    Tcp,
    /// `unix://` a fresh path in the temp directory
    Unix,
    /// `tls://127.0.0.1:0` with a test CA, server name `localhost`
    #[cfg(feature = "tls")]
    Tls,
}

impl Transport {
    /// Every transport of this build.
    pub const ALL: &'static [Transport] = &[
        Transport::Tcp,
        Transport::Unix,
        #[cfg(feature = "tls")]
        Transport::Tls,
    ];

    /// A fresh address to listen on.
    pub fn listen_address(self) -> String {
        match self {
            Transport::Tcp => "tcp://127.0.0.1:0".to_string(),
            Transport::Unix => format!("unix://{}", unix_path().display()),
            #[cfg(feature = "tls")]
            Transport::Tls => "tls://127.0.0.1:0".to_string(),
        }
    }

    /// `options` plus whatever a server on this transport needs.
    pub fn server_options(self, options: Options) -> Options {
        match self {
            #[cfg(feature = "tls")]
            Transport::Tls => options.tls_server(pki().server_tls()),
            _ => options,
        }
    }

    /// `options` plus whatever a client on this transport needs.
    pub fn client_options(self, options: Options) -> Options {
        match self {
            #[cfg(feature = "tls")]
            Transport::Tls => options.tls_client(pki().client_tls()),
            _ => options,
        }
    }
}

/// A socket path nobody else uses.
pub fn unix_path() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "chatter-test-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A listening server, a connected client and the server's end of that connection.
pub async fn pair_with(
    transport: Transport,
    server_options: Options,
    client_options: Options,
) -> (Server, Connection, Connection) {
    let server = listen(
        transport.listen_address(),
        transport.server_options(server_options),
    )
    .await
    .expect("listen");
    let client = connect(
        &server.addresses()[0],
        transport.client_options(client_options),
    )
    .await
    .expect("connect");
    let accepted = server.accept().await.expect("accept");
    (server, client, accepted)
}

/// [`pair_with`] default options.
pub async fn pair(transport: Transport) -> (Server, Connection, Connection) {
    pair_with(transport, Options::default(), Options::default()).await
}

/// Sends `text` as a one-shot message from `from` and asserts that `to` receives it: the
/// connection (or, after some fault, the server) still works.
pub async fn assert_delivers(from: &Connection, to: &Connection, text: &str) {
    from.send(text, SendOptions::new()).await.expect("send");
    let got: String = to
        .receive()
        .await
        .expect("receive")
        .decode()
        .expect("a string");
    assert_eq!(got, text);
}

#[cfg(feature = "tls")]
/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PEM.
    pub key_pem: String,
}

#[cfg(feature = "tls")]
/// A certificate authority that issues test certificates, generated at run time.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate, PEM.
    pub cert_pem: String,
}

#[cfg(feature = "tls")]
impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "tls")]
impl Ca {
    /// A fresh CA with the given common name.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("self-signed CA");
        Ca {
            cert_pem: cert.pem(),
            cert,
            key,
        }
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str]) -> Identity {
        self.issue(names, ExtendedKeyUsagePurpose::ServerAuth, false)
    }

    /// A client certificate with the given common name.
    pub fn client(&self, name: &str) -> Identity {
        self.issue(&[name], ExtendedKeyUsagePurpose::ClientAuth, false)
    }

    /// A server certificate for `names` that expired in 2020.
    pub fn expired_server(&self, names: &[&str]) -> Identity {
        self.issue(names, ExtendedKeyUsagePurpose::ServerAuth, true)
    }

    fn issue(&self, names: &[&str], usage: ExtendedKeyUsagePurpose, expired: bool) -> Identity {
        let key = KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        params.extended_key_usages = vec![usage];
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("signed");
        Identity {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
        }
    }
}

#[cfg(feature = "tls")]
/// The shared test PKI: one CA, a server certificate for `localhost` and `127.0.0.1`, and a
/// client certificate.
#[derive(Debug)]
pub struct Pki {
    /// The CA.
    pub ca: Ca,
    /// The server's identity.
    pub server: Identity,
    /// A client's identity.
    pub client: Identity,
}

#[cfg(feature = "tls")]
impl Pki {
    /// Server settings that present [`Pki::server`].
    pub fn server_tls(&self) -> ServerTls {
        ServerTls::from_pem(
            self.server.cert_pem.as_bytes(),
            self.server.key_pem.as_bytes(),
        )
        .expect("server TLS")
    }

    /// Client settings that trust [`Pki::ca`] and verify the name `localhost`.
    pub fn client_tls(&self) -> ClientTls {
        ClientTls::from_ca_pem(self.ca.cert_pem.as_bytes())
            .expect("client TLS")
            .server_name("localhost")
    }
}

#[cfg(feature = "tls")]
/// The shared test PKI, generated once per test binary.
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let ca = Ca::new("chatter test CA");
        let server = ca.server(&["localhost", "127.0.0.1"]);
        let client = ca.client("test-client");
        Pki { ca, server, client }
    })
}

/// Runs a scenario `async fn name(t: Transport)` as one test per transport (TCP, Unix, and
/// TLS with the `tls` feature of this crate, whose tests expand the macro).
#[macro_export]
macro_rules! all_transports {
    ($($name:ident),* $(,)?) => {
        $crate::all_transports!(@one tcp Tcp $($name),*);
        $crate::all_transports!(@one unix Unix $($name),*);
        #[cfg(feature = "tls")]
        $crate::all_transports!(@one tls Tls $($name),*);
    };
    (@one $module:ident $transport:ident $($name:ident),*) => {
        mod $module {
            $(#[tokio::test(start_paused = true)]
            async fn $name() {
                super::$name($crate::Transport::$transport).await
            })*
        }
    };
}
