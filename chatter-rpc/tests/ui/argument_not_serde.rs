use chatter_rpc::remote;

// Neither `Serialize` nor `Deserialize`.
pub struct Point {
    pub x: i32,
    pub y: i32,
}

#[remote]
pub trait Geometry {
    async fn area(&self, corner: Point, scale: f64) -> f64;
}

fn main() {}
