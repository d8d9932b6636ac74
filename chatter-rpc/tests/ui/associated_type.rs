use chatter_rpc::remote;

#[remote]
pub trait Calc {
    type Output;
    async fn add(&self, a: i64, b: i64) -> i64;
}

fn main() {}
