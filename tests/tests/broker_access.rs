//! The broker's access control with identities from TLS client certificates: the
//! certificate's common name is the identity whose rules apply.
#![cfg(feature = "tls")]

use chatter_broker::{AccessControl, Broker, BrokerOptions, BusError, BusOptions, Rules};
use chatter_core::Options;
use chatter_rpc::CallError;
use tests::pki;

#[tokio::test]
async fn a_client_certificates_common_name_is_its_identity() {
    let pki = pki();
    let client_b = pki.ca.client("dashboards");
    let server_tls = pki
        .server_tls()
        .require_client_certificates(pki.ca.cert_pem.as_bytes())
        .expect("mTLS");
    let access = AccessControl::new()
        // `test-client` is the CN of the shared PKI's client certificate.
        .identity(
            "test-client",
            Rules::none().register("sensor-*").publish("sensors/#"),
        )
        .identity("dashboards", Rules::none().subscribe("sensors/#"));
    let options = BrokerOptions::new()
        .connection(Options::default().tls_server(server_tls))
        .access_control(access);
    let broker = Broker::listen("tls://127.0.0.1:0", options)
        .await
        .expect("listen");
    let address = &broker.addresses()[0];
    let with = |cert: &tests::Identity| {
        let tls = pki
            .client_tls()
            .client_certificate_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes())
            .expect("client certificate");
        BusOptions::new().connection(Options::default().tls_client(tls))
    };

    let sensor = chatter_broker::connect_with(address, "sensor-1", with(&pki.client))
        .await
        .expect("its certificate allows sensor-*");
    match chatter_broker::connect_with(address, "sensor-2", with(&client_b)).await {
        Err(BusError::Register(CallError::PermissionDenied { what })) => {
            assert!(what.contains("identity `dashboards`"), "{what}")
        }
        other => panic!("{other:?}"),
    }
    let dashboard = chatter_broker::connect_unnamed(address, with(&client_b))
        .await
        .expect("connect");
    let mut readings = dashboard
        .subscribe::<f64>("sensors/#")
        .await
        .expect("allowed");
    match sensor.subscribe::<f64>("sensors/#").await {
        Err(CallError::PermissionDenied { what }) => {
            assert!(what.contains("identity `test-client`"), "{what}")
        }
        other => panic!("{other:?}"),
    }
    sensor.publish("sensors/1/temp", &20.5).await.expect("sent");
    let (topic, value) = readings.recv().await.expect("open").expect("item");
    assert_eq!((topic.as_str(), value), ("sensors/1/temp", 20.5));
    assert_eq!(broker.stats().denied, 2);
}
