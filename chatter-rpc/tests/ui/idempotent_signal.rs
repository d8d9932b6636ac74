use chatter_rpc::remote;

#[remote]
pub trait Calc {
    #[signal]
    #[idempotent]
    async fn tick(&self, n: u32);
    #[idempotent(always)]
    async fn get(&self) -> u32;
}

fn main() {}
