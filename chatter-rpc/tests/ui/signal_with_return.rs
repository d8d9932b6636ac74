use chatter_rpc::remote;

#[remote]
pub trait Calc {
    #[signal]
    async fn tick(&self, n: u32) -> u32;
}

fn main() {}
