use chatter_rpc::remote;

#[remote]
pub trait Calc {
    #[inline]
    async fn add(&self, a: i64, b: i64) -> i64;
}

fn main() {}
