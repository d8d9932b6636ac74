//! Certificates generated at start-up: a CA and a server certificate for `localhost`, as
//! chatter settings and as rustls configurations for the raw TLS echo.

use std::sync::Arc;

use chatter_core::tls::{ClientTls, ServerTls};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Everything both ends need for TLS.
#[derive(Clone)]
pub struct Tls {
    pub chatter_server: ServerTls,
    pub chatter_client: ClientTls,
    pub rustls_server: Arc<rustls::ServerConfig>,
    pub rustls_client: Arc<rustls::ClientConfig>,
}

pub const SERVER_NAME: &str = "localhost";

impl Tls {
    pub fn generate() -> Tls {
        let ca_key = KeyPair::generate().expect("generate the CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "chatter-bench CA");
        let ca = ca_params.self_signed(&ca_key).expect("self-sign the CA");

        let key = KeyPair::generate().expect("generate the server key");
        let mut params =
            CertificateParams::new(vec![SERVER_NAME.to_string()]).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, SERVER_NAME);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .expect("sign the server certificate");

        let chain = vec![cert.der().clone(), ca.der().clone()];
        let key_der = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));

        let chatter_server = ServerTls::from_der(chain.clone(), key_der());
        let chatter_client = ClientTls::from_ca_pem(ca.pem().as_bytes())
            .expect("chatter client TLS settings")
            .server_name(SERVER_NAME);

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let rustls_server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key_der())
            .expect("rustls server config");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.der().to_vec()))
            .expect("add the CA to the roots");
        let rustls_client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Tls {
            chatter_server,
            chatter_client,
            rustls_server: Arc::new(rustls_server),
            rustls_client: Arc::new(rustls_client),
        }
    }
}
