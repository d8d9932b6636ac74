use chatter_rpc::remote;

#[remote]
pub trait Calc {
    async fn with_deadline(&self, seconds: u64) -> u64;
}

fn main() {}
