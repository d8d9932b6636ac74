use chatter_rpc::remote;

#[remote]
pub trait Calc {
    #[signal(retries = 3)]
    async fn tick(&self, n: u32);
}

fn main() {}
