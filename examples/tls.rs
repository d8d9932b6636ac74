//! Mutual TLS: a server and a client that verify each other's certificates.
//!
//! Run with `cargo run --example tls`. The certificates are generated at start-up (a CA, a
//! server certificate for `localhost` and a client certificate); in production you would
//! load PEM files with `ServerTls::from_pem_files` and `ClientTls::from_ca_pem_file`.

use chatter_core::tls::{ClientTls, ServerTls};
use chatter_core::{connect, listen, Options, SendOptions};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

struct Pem {
    cert: String,
    key: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (ca, server_id, client_id) = make_certificates()?;

    // The server presents its certificate and requires clients signed by the CA.
    let server_tls = ServerTls::from_pem(server_id.cert.as_bytes(), server_id.key.as_bytes())?
        .require_client_certificates(ca.as_bytes())?;
    let server = listen(
        "tls://127.0.0.1:0",
        Options::default().tls_server(server_tls),
    )
    .await?;
    println!("server: listening on {}", server.addresses()[0]);

    // The client trusts the CA, verifies the name "localhost", and presents its own certificate.
    let client_tls = ClientTls::from_ca_pem(ca.as_bytes())?
        .server_name("localhost")
        .client_certificate_pem(client_id.cert.as_bytes(), client_id.key.as_bytes())?;
    let client = connect(
        &server.addresses()[0],
        Options::default().tls_client(client_tls),
    )
    .await?;
    let accepted = server.accept().await.expect("server is open");

    // Each side can tell who the other is from its certificate chain (DER, leaf first).
    let client_chain = accepted.peer_certificates().expect("mutual TLS");
    let server_chain = client.peer_certificates().expect("TLS");
    println!(
        "server: the client presented {} certificate(s), leaf {} bytes",
        client_chain.len(),
        client_chain[0].len()
    );
    println!(
        "client: the server presented {} certificate(s), leaf {} bytes",
        server_chain.len(),
        server_chain[0].len()
    );

    let conv = client
        .send("hello over mutual TLS", SendOptions::new().last(false))
        .await?;
    let request = accepted.receive().await?;
    println!("server: received {:?}", request.decode::<String>()?);
    accepted
        .send(
            "hello, verified client",
            SendOptions::new().conversation(request.conversation),
        )
        .await?;
    let reply = client.receive().await?;
    assert_eq!(reply.conversation, conv);
    println!("client: received {:?}", reply.decode::<String>()?);

    // A client without a certificate is turned away, with a clear error on both sides.
    let anonymous = ClientTls::from_ca_pem(ca.as_bytes())?.server_name("localhost");
    match connect(
        &server.addresses()[0],
        Options::default().tls_client(anonymous),
    )
    .await
    {
        Ok(_) => println!("client without certificate: unexpectedly accepted"),
        Err(e) => println!("client without certificate: {e}"),
    }
    if let Some(rejection) = server.next_rejection().await {
        println!("server: rejected {}: {}", rejection.remote, rejection.cause);
    }

    client.close().await;
    server.close().await;
    Ok(())
}

/// A CA, and a server and a client certificate signed by it.
fn make_certificates() -> Result<(String, Pem, Pem), rcgen::Error> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "example CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issue = |name: &str, usage| -> Result<Pem, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    };
    let server = issue("localhost", ExtendedKeyUsagePurpose::ServerAuth)?;
    let client = issue("example-client", ExtendedKeyUsagePurpose::ClientAuth)?;
    Ok((ca.pem(), server, client))
}
