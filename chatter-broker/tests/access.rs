//! Access control: identities from credentials, and what each may register, call,
//! publish and subscribe to. (Identities from TLS client certificates: the `tests` crate,
//! `broker_access.rs`.)

use std::time::Duration;

use chatter_broker::{AccessControl, Broker, BrokerOptions, Bus, BusError, BusOptions, Rules};
use chatter_rpc::{remote, CallError};
use tokio::sync::mpsc;
use tokio::time::timeout;

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    timeout(Duration::from_secs(10), f).await.expect("in time")
}

#[remote]
pub trait Device {
    async fn status(&self) -> String;
    #[signal(ttl = "5s")]
    async fn reset(&self, code: u32);
}

struct Probe {
    name: &'static str,
    resets: mpsc::UnboundedSender<(&'static str, u32)>,
}

impl Device for Probe {
    async fn status(&self) -> String {
        format!("{} ok", self.name)
    }
    async fn reset(&self, code: u32) {
        let _ = self.resets.send((self.name, code));
    }
}

fn access() -> AccessControl {
    AccessControl::new()
        .credential("sensor-token", "sensors")
        .credential("dashboard-token", "dashboard")
        .credential("ops-token", "ops")
        .identity(
            "sensors",
            Rules::none().register("sensor-*").publish("sensors/#"),
        )
        .identity(
            "dashboard",
            Rules::none()
                .register("dashboard")
                .subscribe("sensors/#")
                .call("sensor-*"),
        )
        .identity("ops", Rules::all())
}

async fn connect(broker: &Broker, name: &str, token: &str) -> Result<Bus, BusError> {
    let options = BusOptions::new().credential(token);
    chatter_broker::connect_with(&broker.addresses()[0], name, options).await
}

fn denied<T: std::fmt::Debug, E: std::fmt::Debug>(result: Result<T, CallError<E>>, what: &str) {
    match result {
        Err(CallError::PermissionDenied { what: why }) => {
            assert!(why.contains(what), "{why:?} should mention {what:?}")
        }
        other => panic!("{what}: expected a denial, got {other:?}"),
    }
}

#[tokio::test]
async fn each_identity_does_what_its_rules_allow_and_nothing_else() {
    let broker = Broker::listen(
        "tcp://127.0.0.1:0",
        BrokerOptions::new().access_control(access()),
    )
    .await
    .expect("listen");
    // Unbounded: a test probe, a handful of signals, read by the test.
    let (resets, mut heard) = mpsc::unbounded_channel();
    let mut sensors = Vec::new();
    for name in ["sensor-1", "sensor-2"] {
        let options = BusOptions::new().credential("sensor-token");
        let bus = chatter_broker::connect_unnamed(&broker.addresses()[0], options)
            .await
            .expect("a sensor connects");
        bus.register(
            "device",
            DeviceServer::new(Probe {
                name,
                resets: resets.clone(),
            }),
        );
        bus.claim(name, false).await.expect("a sensor-* name");
        sensors.push(bus);
    }
    let ops = connect(&broker, "pump-1", "ops-token").await.expect("ops");
    ops.register(
        "device",
        DeviceServer::new(Probe {
            name: "pump-1",
            resets: resets.clone(),
        }),
    );
    let dashboard = connect(&broker, "dashboard", "dashboard-token")
        .await
        .expect("dashboard");

    // Names.
    match connect(&broker, "pump-2", "sensor-token").await {
        Err(BusError::Register(e)) => denied::<(), _>(Err(e), "register the name `pump-2`"),
        other => panic!("{other:?}"),
    }
    match connect(&broker, "x", "no-such-token").await {
        Err(BusError::Authenticate(CallError::PermissionDenied { what })) => {
            assert!(what.contains("credential"), "{what}")
        }
        other => panic!("{other:?}"),
    }

    // Calls: the dashboard may call sensors, not the pump; sensors may call nobody.
    let sensor_1 = DeviceClient::new(&dashboard.peer("sensor-1"), "device");
    assert_eq!(sensor_1.status().await.expect("allowed"), "sensor-1 ok");
    denied(
        DeviceClient::new(&dashboard.peer("pump-1"), "device")
            .status()
            .await,
        "call or signal the peer `pump-1`",
    );
    denied(
        DeviceClient::new(&sensors[0].peer("dashboard"), "device")
            .status()
            .await,
        "identity `sensors`",
    );
    // A broadcast reaches only the peers the sender may call; ops may call everyone.
    DeviceClient::new(&dashboard.peer("*"), "device")
        .reset(1)
        .await
        .expect("sent");
    DeviceClient::new(&ops.peer("sensor-2"), "device")
        .reset(2)
        .await
        .expect("sent");
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(within(heard.recv()).await.expect("a reset"));
    }
    got.sort();
    assert_eq!(got, [("sensor-1", 1), ("sensor-2", 1), ("sensor-2", 2)]);

    // Topics.
    let mut readings = dashboard
        .subscribe::<f64>("sensors/+/temp")
        .await
        .expect("within sensors/#");
    denied(dashboard.subscribe::<f64>("#").await, "subscribe to `#`");
    denied(
        dashboard.presence().await,
        "subscribe to `$broker/presence/+`",
    );
    denied(
        sensors[0].subscribe::<f64>("sensors/#").await,
        "subscribe to `sensors/#`",
    );
    denied(
        dashboard.publish_acked("sensors/1/temp", &1.0).await,
        "publish on `sensors/1/temp`",
    );
    sensors[0]
        .publish("alarms/fire", &99.0)
        .await
        .expect("sent, and dropped by the broker");
    sensors[0]
        .publish("sensors/1/temp", &21.5)
        .await
        .expect("allowed");
    assert_eq!(
        within(readings.recv()).await.expect("open").expect("item"),
        ("sensors/1/temp".to_owned(), 21.5)
    );
    // Nobody, not even ops, publishes on the broker's own topics.
    match ops.publish_acked("$broker/presence/fake", &1.0).await {
        Err(CallError::App { error, .. }) => assert!(error.to_string().contains("broker's own")),
        other => panic!("{other:?}"),
    }
    // Every denial above was counted: 2 names (one by credential), 2 calls, 1 broadcast
    // copy (pump-1), 3 subscriptions, 2 publications.
    assert_eq!(broker.stats().denied, 10);
}

#[tokio::test]
async fn anonymous_peers_get_the_anonymous_rules() {
    let broker = Broker::listen(
        "tcp://127.0.0.1:0",
        BrokerOptions::new()
            .access_control(access().anonymous(Rules::none().subscribe("sensors/#"))),
    )
    .await
    .expect("listen");
    let address = &broker.addresses()[0];
    let anonymous = chatter_broker::connect_unnamed(address, BusOptions::new())
        .await
        .expect("connecting is allowed");
    match anonymous.claim("anything", false).await {
        Err(BusError::Register(CallError::PermissionDenied { what })) => {
            assert!(what.contains("an anonymous peer"), "{what}")
        }
        other => panic!("{other:?}"),
    }
    let _ok = anonymous
        .subscribe::<f64>("sensors/7/temp")
        .await
        .expect("anonymous rules allow it");
    denied(
        anonymous.publish_acked("sensors/7/temp", &1.0).await,
        "publish",
    );
    // Without access control, a credential is accepted and means nothing.
    let open = Broker::listen("tcp://127.0.0.1:0", BrokerOptions::new())
        .await
        .expect("listen");
    let bus = connect(&open, "anyone", "whatever")
        .await
        .expect("open broker");
    bus.publish_acked("t", &1.0).await.expect("allowed");
}
