//! TLS: verified peers, peer identity, and every failure as a clear error (issue 3).

use std::time::Duration;

use chatter_core::tls::{ClientTls, ServerTls};
use chatter_core::{
    connect, listen, Address, CloseCause, ConnectError, ListenError, Options, ProtocolError,
    Rejection, SendOptions, Server,
};
use tests::{assert_delivers, pki, Ca, Identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn server_tls(id: &Identity) -> ServerTls {
    ServerTls::from_pem(id.cert_pem.as_bytes(), id.key_pem.as_bytes()).unwrap()
}

async fn tls_server(tls: ServerTls) -> Server {
    listen("tls://127.0.0.1:0", Options::default().tls_server(tls))
        .await
        .unwrap()
}

fn port(server: &Server) -> u16 {
    match server.addresses()[0] {
        Address::Tls { port, .. } => port,
        ref other => panic!("not a TLS address: {other}"),
    }
}

fn tls_cause(err: &ConnectError) -> &str {
    match err {
        ConnectError::Handshake {
            cause: CloseCause::Tls(message),
            ..
        } => message,
        other => panic!("expected a TLS handshake failure, got {other:?}"),
    }
}

/// Connects with the shared test client settings, which must fail.
async fn refused_to_test_client(server: &Server) -> ConnectError {
    connect(
        &server.addresses()[0],
        Options::default().tls_client(pki().client_tls()),
    )
    .await
    .expect_err("the connection must be refused")
}

async fn rejection(server: &Server) -> Rejection {
    server.next_rejection().await.expect("server still open")
}

/// The server is still healthy: a well-configured client connects and talks.
async fn still_serves(server: &Server) {
    let client = connect(
        format!("tls://127.0.0.1:{}", port(server)),
        Options::default().tls_client(pki().client_tls()),
    )
    .await
    .unwrap();
    let accepted = server.accept().await.unwrap();
    assert_delivers(&client, &accepted, "ok?").await;
}

#[tokio::test]
async fn mutual_tls_exchange_where_each_side_reads_the_others_certificate() {
    let pki = pki();
    let tls = pki
        .server_tls()
        .require_client_certificates(pki.ca.cert_pem.as_bytes())
        .unwrap();
    let server = tls_server(tls).await;
    let client_tls = pki
        .client_tls()
        .client_certificate_pem(
            pki.client.cert_pem.as_bytes(),
            pki.client.key_pem.as_bytes(),
        )
        .unwrap();
    let client = connect(
        &server.addresses()[0],
        Options::default().tls_client(client_tls),
    )
    .await
    .unwrap();
    let accepted = server.accept().await.unwrap();

    let server_seen = client.peer_certificates().expect("server chain");
    assert_eq!(server_seen[0].as_ref(), &pki.server.cert_der[..]);
    let client_seen = accepted.peer_certificates().expect("client chain");
    assert_eq!(client_seen[0].as_ref(), &pki.client.cert_der[..]);
    assert!(matches!(client.remote_address(), Address::Tls { .. }));
    assert!(matches!(accepted.local_address(), Address::Tls { .. }));

    let conv = client
        .send(&"hello over TLS", SendOptions::new().last(false))
        .await
        .unwrap();
    let req = accepted.receive().await.unwrap();
    accepted
        .send(&42, SendOptions::new().conversation(req.conversation))
        .await
        .unwrap();
    let reply = client.receive().await.unwrap();
    assert_eq!(
        (reply.conversation, reply.decode::<i32>().unwrap()),
        (conv, 42)
    );
}

#[tokio::test]
async fn plain_tcp_connections_have_no_peer_certificates() {
    let (_server, client, accepted) = tests::pair(tests::Transport::Tcp).await;
    assert!(client.peer_certificates().is_none() && accepted.peer_certificates().is_none());
}

#[tokio::test]
async fn optional_client_certificates_are_verified_when_presented() {
    let pki = pki();
    let tls = pki
        .server_tls()
        .accept_client_certificates(pki.ca.cert_pem.as_bytes())
        .unwrap();
    let server = tls_server(tls).await;
    let addr = server.addresses()[0].clone();
    // Without a certificate: accepted, anonymous.
    let _anonymous = connect(&addr, Options::default().tls_client(pki.client_tls()))
        .await
        .unwrap();
    assert!(server.accept().await.unwrap().peer_certificates().is_none());
    // With one: accepted, identified.
    let with_cert = pki
        .client_tls()
        .client_certificate_pem(
            pki.client.cert_pem.as_bytes(),
            pki.client.key_pem.as_bytes(),
        )
        .unwrap();
    let _named = connect(&addr, Options::default().tls_client(with_cert))
        .await
        .unwrap();
    let seen = server.accept().await.unwrap();
    assert_eq!(
        seen.peer_certificates().unwrap()[0].as_ref(),
        &pki.client.cert_der[..]
    );
    // With one from an untrusted CA: refused.
    let stranger = Ca::new("stranger CA").client("mallory");
    let bad = pki
        .client_tls()
        .client_certificate_pem(stranger.cert_pem.as_bytes(), stranger.key_pem.as_bytes())
        .unwrap();
    assert!(connect(&addr, Options::default().tls_client(bad))
        .await
        .is_err());
    assert!(
        matches!(rejection(&server).await.cause, CloseCause::Tls(m) if m.contains("UnknownIssuer"))
    );
}

#[tokio::test]
async fn an_untrusted_server_certificate_is_refused() {
    let server = tls_server(server_tls(&Ca::new("another CA").server(&["localhost"]))).await;
    let err = refused_to_test_client(&server).await;
    assert!(tls_cause(&err).contains("UnknownIssuer"), "{err}");
    assert!(matches!(rejection(&server).await.cause, CloseCause::Tls(_)));
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused() {
    let server = tls_server(server_tls(&pki().ca.server(&["other.example"]))).await;
    let err = refused_to_test_client(&server).await;
    assert!(tls_cause(&err).contains("not valid for name"), "{err}");
    // The name defaults to the host in the URL: connecting by name works only if it matches.
    let by_name = ClientTls::from_ca_pem(pki().ca.cert_pem.as_bytes()).unwrap();
    let err = connect(
        format!("tls://localhost:{}", port(&server)),
        Options::default().tls_client(by_name),
    )
    .await
    .unwrap_err();
    assert!(tls_cause(&err).contains("not valid for name"), "{err}");
}

#[tokio::test]
async fn the_server_name_defaults_to_the_host_in_the_url() {
    let server = tls_server(pki().server_tls()).await;
    let tls = ClientTls::from_ca_pem(pki().ca.cert_pem.as_bytes()).unwrap();
    connect(
        format!("tls://127.0.0.1:{}", port(&server)),
        Options::default().tls_client(tls),
    )
    .await
    .expect("the certificate names 127.0.0.1");
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let server = tls_server(server_tls(&pki().ca.expired_server(&["localhost"]))).await;
    let err = refused_to_test_client(&server).await;
    assert!(tls_cause(&err).contains("certificate expired"), "{err}");
}

#[tokio::test]
async fn a_missing_client_certificate_is_refused_when_required() {
    let pki = pki();
    let tls = pki
        .server_tls()
        .require_client_certificates(pki.ca.cert_pem.as_bytes())
        .unwrap();
    let server = tls_server(tls).await;
    let err = refused_to_test_client(&server).await;
    // With TLS 1.3 the client learns it from the server's alert after its own handshake.
    let message = tls_cause(&err);
    assert!(message.contains("CertificateRequired"), "{err}");
    let cause = rejection(&server).await.cause;
    assert!(
        matches!(&cause, CloseCause::Tls(m) if m.contains("certificate")),
        "{cause}"
    );
    still_serves_with_client_cert(&server).await;
}

async fn still_serves_with_client_cert(server: &Server) {
    let pki = pki();
    let tls = pki
        .client_tls()
        .client_certificate_pem(
            pki.client.cert_pem.as_bytes(),
            pki.client.key_pem.as_bytes(),
        )
        .unwrap();
    connect(&server.addresses()[0], Options::default().tls_client(tls))
        .await
        .unwrap();
    assert!(server.accept().await.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_plaintext_client_at_a_tls_listener_fails_on_both_sides() {
    let server = tls_server(pki().server_tls()).await;
    let err = connect(
        format!("tcp://127.0.0.1:{}", port(&server)),
        Options::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ConnectError::Handshake { .. }), "{err}");
    let cause = rejection(&server).await.cause;
    assert!(matches!(&cause, CloseCause::Tls(_)), "{cause}");
    still_serves(&server).await;
}

#[tokio::test(start_paused = true)]
async fn a_tls_client_at_a_plaintext_listener_fails_on_both_sides() {
    let server = listen("tcp://127.0.0.1:0", Options::default())
        .await
        .unwrap();
    let Address::Tcp { port, .. } = server.addresses()[0] else {
        unreachable!()
    };
    let err = connect(
        format!("tls://127.0.0.1:{port}"),
        Options::default().tls_client(pki().client_tls()),
    )
    .await
    .unwrap_err();
    tls_cause(&err);
    let cause = rejection(&server).await.cause;
    assert!(
        matches!(
            cause,
            CloseCause::Protocol(ProtocolError::NotChatter { .. })
        ),
        "{cause}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_tls_handshake_that_never_completes_is_cut_off() {
    let options = Options::default()
        .handshake_timeout(Duration::from_secs(5))
        .tls_server(pki().server_tls());
    let server = listen("tls://127.0.0.1:0", options).await.unwrap();
    // A peer that opens TCP and says nothing.
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", port(&server)))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let r = rejection(&server).await;
    assert!(
        matches!(
            r.cause,
            CloseCause::Protocol(ProtocolError::HandshakeTimeout)
        ),
        "{:?}",
        r.cause
    );
    assert_eq!(started.elapsed().as_secs(), 5);
    let mut rest = Vec::new();
    let _ = silent.read_to_end(&mut rest).await; // disconnected
    still_serves(&server).await;

    // The other way round: a TLS client facing a server that never answers.
    let quiet = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("tls://{}", quiet.local_addr().unwrap());
    let _hold = tokio::spawn(async move {
        let (mut s, _) = quiet.accept().await.unwrap();
        let _ = s.read_to_end(&mut Vec::new()).await;
        let _ = s.shutdown().await;
    });
    let options = Options::default()
        .handshake_timeout(Duration::from_secs(5))
        .tls_client(pki().client_tls());
    let err = connect(&addr, options).await.unwrap_err();
    assert!(
        matches!(
            err,
            ConnectError::Handshake {
                cause: CloseCause::Protocol(ProtocolError::HandshakeTimeout),
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn skipping_verification_needs_the_insecure_option() {
    let server = tls_server(server_tls(&Ca::new("self-signed").server(&["whatever"]))).await;
    let client = connect(
        &server.addresses()[0],
        Options::default().tls_client(ClientTls::insecure_skip_server_verification()),
    )
    .await
    .expect("insecure client accepts any certificate");
    assert!(client.peer_certificates().is_some());
}

#[tokio::test]
async fn tls_addresses_need_tls_settings_and_bad_pem_is_a_clear_error() {
    let err = connect("tls://127.0.0.1:1", Options::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Options(_)), "{err}");
    assert!(err.to_string().contains("Options::tls_client"), "{err}");
    let err = listen("tls://127.0.0.1:0", Options::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ListenError::Options(_)), "{err}");

    let err = ServerTls::from_pem(b"not a certificate", b"").unwrap_err();
    assert!(err.to_string().contains("no certificate found"), "{err}");
    let err = ClientTls::from_ca_pem_file("/nonexistent/ca.pem").unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    // A key that does not match the certificate.
    let pki = pki();
    let mismatched = ServerTls::from_pem(
        pki.server.cert_pem.as_bytes(),
        pki.client.key_pem.as_bytes(),
    )
    .unwrap();
    let err = listen(
        "tls://127.0.0.1:0",
        Options::default().tls_server(mismatched),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ListenError::Tls(_)), "{err}");
}

#[tokio::test]
async fn pem_files_are_read_from_disk() {
    let pki = pki();
    let dir = std::env::temp_dir().join(format!("chatter-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (crt, key, ca) = (
        write("s.crt", &pki.server.cert_pem),
        write("s.key", &pki.server.key_pem),
        write("ca.crt", &pki.ca.cert_pem),
    );
    let (ccrt, ckey) = (
        write("c.crt", &pki.client.cert_pem),
        write("c.key", &pki.client.key_pem),
    );
    let server_tls = ServerTls::from_pem_files(&crt, &key)
        .unwrap()
        .require_client_certificates_pem_file(&ca)
        .unwrap();
    let server = tls_server(server_tls).await;
    let client_tls = ClientTls::from_ca_pem_file(&ca)
        .unwrap()
        .server_name("localhost")
        .client_certificate_pem_files(&ccrt, &ckey)
        .unwrap();
    connect(
        &server.addresses()[0],
        Options::default().tls_client(client_tls),
    )
    .await
    .unwrap();
    assert!(server.accept().await.unwrap().peer_certificates().is_some());
    std::fs::remove_dir_all(&dir).unwrap();
}
