use chatter_rpc::remote;

pub struct Point {
    pub x: i32,
    pub y: i32,
}

pub struct Color(pub u32);

#[remote]
pub trait Canvas {
    async fn plot(&self, at: Point, size: u32, color: Color);
}

fn main() {}
