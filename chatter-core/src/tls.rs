//! TLS for `tls://host:port` addresses: rustls with the `ring` provider.
//!
//! A server needs a [`ServerTls`] (its certificate chain and key, and optionally the CAs
//! whose client certificates it requires or accepts); a client needs a [`ClientTls`] (the
//! CAs it trusts, optionally the server name to verify and its own certificate). Pass them
//! with [`Options::tls_server`](crate::Options::tls_server) and
//! [`Options::tls_client`](crate::Options::tls_client). Once connected,
//! [`Connection::peer_certificates`](crate::Connection::peer_certificates) tells who the peer
//! is.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use chatter_core::tls::{ClientTls, ServerTls};
//! use chatter_core::{connect, listen, Options};
//!
//! let server_tls = ServerTls::from_pem_files("server.crt", "server.key")?
//!     .require_client_certificates_pem_file("clients-ca.crt")?;
//! let server = listen("tls://0.0.0.0:7443", Options::default().tls_server(server_tls)).await?;
//!
//! let client_tls = ClientTls::from_ca_pem_file("ca.crt")?
//!     .client_certificate_pem_files("client.crt", "client.key")?;
//! let conn = connect("tls://server.example:7443", Options::default().tls_client(client_tls)).await?;
//! let server_chain = conn.peer_certificates().expect("TLS connections have peer certificates");
//! # let _ = (server, server_chain); Ok(()) }
//! ```

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
pub use rustls_pki_types::CertificateDer;
use rustls_pki_types::{PrivateKeyDer, ServerName, UnixTime};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// PEM input could not be read or parsed.
    #[error("cannot read {what}: {message}")]
    Pem {
        /// What was being read (for example "certificate chain from server.crt").
        what: String,
        /// The parser's or file system's message.
        message: String,
    },
    /// PEM input held no certificate.
    #[error("no certificate found in {what}")]
    NoCertificate {
        /// What was being read.
        what: String,
    },
    /// rustls refused the configuration (for example a key that does not match the certificate).
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client certificate verifier could not be built (for example no usable CA).
    #[error("invalid client certificate authorities: {0}")]
    ClientVerifier(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs_from(what: &str, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: what.to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what: what.to_string(),
        });
    }
    Ok(certs)
}

fn key_from(what: &str, bytes: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| TlsError::Pem {
        what: what.to_string(),
        message: e.to_string(),
    })
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Pem {
        what: format!("{what} from {}", path.display()),
        message: e.to_string(),
    })
}

fn roots_from(what: &str, ca_pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from(what, ca_pem)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// How a TLS server treats client certificates.
#[derive(Debug, Clone)]
enum ClientAuth {
    None,
    Optional(Arc<RootCertStore>),
    Required(Arc<RootCertStore>),
}

/// TLS settings of a server: its identity and its client-certificate policy.
#[derive(Clone)]
pub struct ServerTls {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    client_auth: ClientAuth,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("chain_len", &self.chain.len())
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// The certificate chain (leaf first) and private key, as PEM.
    pub fn from_pem(cert_chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, TlsError> {
        Ok(Self::from_der(
            certs_from("certificate chain", cert_chain_pem)?,
            key_from("private key", key_pem)?,
        ))
    }

    /// The certificate chain (leaf first) and private key, from PEM files.
    pub fn from_pem_files(
        cert_chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let (cert_chain, key) = (cert_chain.as_ref(), key.as_ref());
        Ok(Self::from_der(
            certs_from(
                &format!("certificate chain from {}", cert_chain.display()),
                &read("certificate chain", cert_chain)?,
            )?,
            key_from(
                &format!("private key from {}", key.display()),
                &read("private key", key)?,
            )?,
        ))
    }

    /// The certificate chain (leaf first) and private key, already decoded.
    pub fn from_der(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Self {
        ServerTls {
            chain,
            key: Arc::new(key),
            client_auth: ClientAuth::None,
        }
    }

    /// Mutual TLS: refuse clients without a certificate signed by one of these CAs (PEM).
    pub fn require_client_certificates(mut self, ca_pem: &[u8]) -> Result<Self, TlsError> {
        self.client_auth =
            ClientAuth::Required(Arc::new(roots_from("client CA certificates", ca_pem)?));
        Ok(self)
    }

    /// [`require_client_certificates`](Self::require_client_certificates) from a PEM file.
    pub fn require_client_certificates_pem_file(
        self,
        ca: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let pem = read("client CA certificates", ca.as_ref())?;
        self.require_client_certificates(&pem)
    }

    /// Accept clients without a certificate, but verify the certificate of clients that
    /// present one against these CAs (PEM).
    pub fn accept_client_certificates(mut self, ca_pem: &[u8]) -> Result<Self, TlsError> {
        self.client_auth =
            ClientAuth::Optional(Arc::new(roots_from("client CA certificates", ca_pem)?));
        Ok(self)
    }

    pub(crate) fn config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.client_auth {
            ClientAuth::None => builder.with_no_client_auth(),
            ClientAuth::Optional(roots) | ClientAuth::Required(roots) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider);
                let verifier = match self.client_auth {
                    ClientAuth::Optional(_) => verifier.allow_unauthenticated(),
                    _ => verifier,
                };
                let verifier = verifier
                    .build()
                    .map_err(|e| TlsError::ClientVerifier(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        Ok(Arc::new(builder.with_single_cert(
            self.chain.clone(),
            self.key.clone_key(),
        )?))
    }
}

/// TLS settings of a client: whom it trusts, which name it verifies, who it is.
#[derive(Clone)]
pub struct ClientTls {
    roots: Option<Arc<RootCertStore>>,
    server_name: Option<String>,
    identity: Option<(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("verifies_server", &self.roots.is_some())
            .field("server_name", &self.server_name)
            .field("has_client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl ClientTls {
    /// Trust servers whose certificate chains up to one of these CAs (PEM).
    pub fn from_ca_pem(ca_pem: &[u8]) -> Result<Self, TlsError> {
        Ok(ClientTls {
            roots: Some(Arc::new(roots_from("CA certificates", ca_pem)?)),
            server_name: None,
            identity: None,
        })
    }

    /// [`from_ca_pem`](Self::from_ca_pem) from a PEM file.
    pub fn from_ca_pem_file(ca: impl AsRef<Path>) -> Result<Self, TlsError> {
        Self::from_ca_pem(&read("CA certificates", ca.as_ref())?)
    }

    /// **Insecure**: accept any server certificate, so anyone on the path can impersonate
    /// the server. For tests and debugging only; every connection logs a warning.
    pub fn insecure_skip_server_verification() -> Self {
        ClientTls {
            roots: None,
            server_name: None,
            identity: None,
        }
    }

    /// The name to verify in the server's certificate (default: the host of the address).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Present this certificate chain and key (PEM) to servers that ask for one.
    pub fn client_certificate_pem(
        mut self,
        cert_chain_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, TlsError> {
        self.identity = Some((
            certs_from("client certificate chain", cert_chain_pem)?,
            Arc::new(key_from("client private key", key_pem)?),
        ));
        Ok(self)
    }

    /// [`client_certificate_pem`](Self::client_certificate_pem) from PEM files.
    pub fn client_certificate_pem_files(
        self,
        cert_chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let chain = read("client certificate chain", cert_chain.as_ref())?;
        let key = read("client private key", key.as_ref())?;
        self.client_certificate_pem(&chain, &key)
    }

    pub(crate) fn name_for(&self, host: &str) -> Result<ServerName<'static>, String> {
        let name = self.server_name.as_deref().unwrap_or(host);
        ServerName::try_from(name.to_string())
            .map_err(|_| format!("{name:?} is not a valid TLS server name"))
    }

    pub(crate) fn config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.roots {
            Some(roots) => builder.with_root_certificates(roots.clone()),
            None => {
                tracing::warn!(
                    "TLS server verification is disabled (insecure_skip_server_verification): \
                     the server is not authenticated"
                );
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NoServerVerification(provider)))
            }
        };
        Ok(Arc::new(match &self.identity {
            Some((chain, key)) => builder.with_client_auth_cert(chain.clone(), key.clone_key())?,
            None => builder.with_no_client_auth(),
        }))
    }
}

/// Accepts any server certificate, still checking that the handshake is signed by it.
#[derive(Debug)]
struct NoServerVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoServerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
