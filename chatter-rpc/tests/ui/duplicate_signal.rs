use chatter_rpc::remote;

#[remote]
pub trait Calc {
    #[signal]
    #[signal(ttl = "1s")]
    async fn tick(&self, n: u32);
}

fn main() {}
