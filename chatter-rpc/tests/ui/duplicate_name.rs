use chatter_rpc::remote;

#[remote]
pub trait Calc {
    async fn add(&self, a: i64, b: i64) -> i64;
    async fn add(&self, a: u8) -> u8;
}

fn main() {}
