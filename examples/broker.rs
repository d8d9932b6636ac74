//! chatter-broker: peers that know each other only by name. A broker, two sensors that
//! register as `sensor-1` and `sensor-2` and serve their readings, and a controller that
//! calls a named sensor through the broker: a call, a typed error, a signal, a deadline,
//! a name nobody holds, a refused duplicate name, and a sensor that goes away mid-call.
//!
//! Run with `cargo run --example broker`. (The broker can also run on its own:
//! `cargo run -p chatter-broker -- --listen tcp://127.0.0.1:7000`.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatter_broker::{Broker, BrokerOptions, BusError};
use chatter_rpc::{remote, CallError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
pub enum SensorError {
    #[error("the sensor is not calibrated")]
    NotCalibrated,
}

#[remote]
pub trait Sensor {
    /// The current reading, in tenths of a degree.
    async fn read(&self) -> Result<i64, SensorError>;
    /// Takes a long time (to show deadlines and disconnects).
    async fn calibrate(&self, seconds: u64);
    /// Fire-and-forget.
    #[signal(ttl = "2s")]
    async fn blink(&self, times: u32);
}

struct Thermometer {
    reading: Option<i64>,
    blinks: Arc<AtomicU64>,
}

impl Sensor for Thermometer {
    async fn read(&self) -> Result<i64, SensorError> {
        self.reading.ok_or(SensorError::NotCalibrated)
    }
    async fn calibrate(&self, seconds: u64) {
        tokio::time::sleep(Duration::from_secs(seconds)).await;
    }
    async fn blink(&self, times: u32) {
        self.blinks.fetch_add(u64::from(times), Ordering::Relaxed);
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = Broker::listen("tcp://127.0.0.1:0", BrokerOptions::default()).await?;
    let address = broker.addresses()[0].clone();
    println!("broker on {address}");

    // Two sensors: each connects, registers its object, then claims its name.
    let blinks = Arc::new(AtomicU64::new(0));
    let mut sensors = Vec::new();
    for (name, reading) in [("sensor-1", Some(215)), ("sensor-2", None)] {
        let bus = chatter_broker::connect(&address, name).await?;
        bus.register(
            "sensor",
            SensorServer::new(Thermometer {
                reading,
                blinks: blinks.clone(),
            }),
        );
        sensors.push(bus);
    }
    println!("registered: {:?}", broker.names());

    // The controller calls sensors by name, with the generated client.
    let controller = chatter_broker::connect(&address, "controller").await?;
    let sensor_1 = SensorClient::new(&controller.peer("sensor-1"), "sensor");
    let sensor_2 = SensorClient::new(&controller.peer("sensor-2"), "sensor");
    println!("sensor-1 reads {}", sensor_1.read().await?);
    match sensor_2.read().await {
        Err(CallError::App { error, remote }) => println!("sensor-2: {error:?} ({remote})"),
        other => println!("sensor-2: unexpected {other:?}"),
    }

    // A signal; the broker forwards it before the call that follows (one queue per
    // destination), and both handlers finish at once here.
    sensor_1.blink(3).await?;
    sensor_1.read().await?;
    println!("blinks: {}", blinks.load(Ordering::Relaxed));

    // The deadline holds through the broker.
    let quick = sensor_1.with_deadline(Duration::from_millis(200));
    println!("calibrate in 200 ms: {:?}", quick.calibrate(10).await);

    // Names: nobody is `sensor-3`; `sensor-1` is taken.
    let sensor_3 = SensorClient::new(&controller.peer("sensor-3"), "sensor");
    println!("sensor-3: {:?}", sensor_3.read().await);
    match chatter_broker::connect(&address, "sensor-1").await {
        Err(BusError::Refused(why)) => println!("a second sensor-1: refused ({why})"),
        other => println!("a second sensor-1: unexpected {other:?}"),
    }

    // sensor-2 goes away in the middle of a call: the call fails, it does not hang.
    let long = tokio::spawn(async move { sensor_2.calibrate(60).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    if let Some(conn) = sensors[1].connection() {
        conn.close().await;
    }
    println!("sensor-2 vanished mid-call: {:?}", long.await?);

    let stats = broker.stats();
    println!(
        "broker: {} forwarded, {} for unknown names, {} bytes held now",
        stats.forwarded, stats.no_such_peer, stats.held_bytes
    );
    broker.close().await;
    Ok(())
}
