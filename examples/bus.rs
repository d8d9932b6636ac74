//! chatter-broker as a message bus: a broker, two sensors that publish their readings, a
//! dashboard that subscribes to all of them with a wildcard and watches who is online, and
//! a controller that calls one sensor by name and then recalibrates them all at once.
//!
//! Run with `cargo run --example bus`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatter_broker::{Broker, BrokerOptions, Bus};
use chatter_rpc::remote;
use serde::{Deserialize, Serialize};

/// What a sensor publishes on `sensors/{name}/temp`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reading {
    /// Which reading of this sensor it is.
    pub seq: u32,
    /// Degrees Celsius.
    pub celsius: f64,
}

#[remote]
pub trait Sensor {
    /// The calibration offset now, in hundredths of a degree.
    async fn offset(&self) -> i64;
    /// Sets the calibration offset (fire-and-forget).
    #[signal(ttl = "2s")]
    async fn calibrate(&self, offset: i64);
}

struct Thermometer {
    offset: Arc<AtomicI64>,
}

impl Sensor for Thermometer {
    async fn offset(&self) -> i64 {
        self.offset.load(Ordering::Relaxed)
    }
    async fn calibrate(&self, offset: i64) {
        self.offset.store(offset, Ordering::Relaxed);
    }
}

/// A sensor: registers as `name`, serves `sensor`, and publishes `count` readings.
async fn sensor(
    address: &str,
    name: &str,
    base: f64,
    count: u32,
) -> Result<Bus, Box<dyn std::error::Error>> {
    let offset = Arc::new(AtomicI64::new(0));
    let bus = chatter_broker::connect_unnamed(address, Default::default()).await?;
    bus.register(
        "sensor",
        SensorServer::new(Thermometer {
            offset: offset.clone(),
        }),
    );
    bus.claim(name, false).await?;
    let topic = format!("sensors/{name}/temp");
    let publisher = bus.clone();
    // One per sensor of this example, ending after `count` readings.
    tokio::spawn(async move {
        for seq in 0..count {
            let celsius =
                base + f64::from(seq) * 0.1 + offset.load(Ordering::Relaxed) as f64 / 100.0;
            if publisher
                .publish(&topic, &Reading { seq, celsius })
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    Ok(bus)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let broker = Broker::listen("tcp://127.0.0.1:0", BrokerOptions::default()).await?;
    let address = broker.addresses()[0].to_string();
    println!("broker listening on {address}");

    // The dashboard subscribes before the sensors start, with a wildcard for the sensor.
    let dashboard = chatter_broker::connect(&address, "dashboard").await?;
    let mut readings = dashboard.subscribe::<Reading>("sensors/+/temp").await?;
    let mut presence = dashboard.presence().await?;

    const COUNT: u32 = 5;
    let _kitchen = sensor(&address, "sensor-kitchen", 21.0, COUNT).await?;
    let _cellar = sensor(&address, "sensor-cellar", 12.0, COUNT).await?;

    // The controller asks one sensor by name, then recalibrates every sensor at once
    // (a signal to the name pattern `sensor-*`).
    let controller = chatter_broker::connect(&address, "controller").await?;
    let kitchen = SensorClient::new(&controller.peer("sensor-kitchen"), "sensor");
    println!(
        "controller: sensor-kitchen's offset is {}",
        kitchen.offset().await?
    );
    SensorClient::new(&controller.peer("sensor-*"), "sensor")
        .calibrate(-50)
        .await?;
    println!("controller: recalibrated sensor-* by -0.5 °C");

    let mut seen = 0;
    while seen < 2 * COUNT {
        let (topic, reading) = readings.recv().await.ok_or("the broker went away")??;
        println!(
            "dashboard: {topic:<28} #{} {:.2} °C",
            reading.seq, reading.celsius
        );
        seen += 1;
    }
    println!("dashboard: missed {} readings", readings.missed());

    // Who is online: everyone registered when the dashboard asked, then each change.
    let mut online = Vec::new();
    while online.len() < 4 {
        let (_, peer) = presence.recv().await.ok_or("the broker went away")??;
        online.push(peer.peer);
    }
    online.sort();
    println!("dashboard: online: {}", online.join(", "));
    let cellar = SensorClient::new(&controller.peer("sensor-cellar"), "sensor");
    println!(
        "controller: sensor-cellar's offset is now {}",
        cellar.offset().await?
    );
    println!("{:?}", broker.stats());
    Ok(())
}
