use chatter_rpc::remote;

#[remote]
pub trait Calc {
    async fn add(&mut self, a: i64, b: i64) -> i64;
}

fn main() {}
