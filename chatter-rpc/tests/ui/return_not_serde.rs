use chatter_rpc::remote;

pub struct Point {
    pub x: i32,
    pub y: i32,
}

#[remote]
pub trait Geometry {
    async fn origin(&self) -> Point;
    async fn checked_origin(&self) -> Result<Point, String>;
}

fn main() {}
