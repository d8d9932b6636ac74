use chatter_rpc::remote;

#[remote]
pub trait Calc {
    async fn add<T>(&self, a: T, b: T) -> i64;
}

fn main() {}
