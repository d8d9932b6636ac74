use chatter_rpc::remote;
use serde::Deserialize;

#[derive(Deserialize)]
pub struct Point {
    pub x: i32,
    pub y: i32,
}

#[remote]
pub trait Geometry {
    async fn norm(&self, point: Point) -> f64;
}

fn main() {}
