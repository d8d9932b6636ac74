use chatter_rpc::remote;

#[remote]
pub trait Calc {
    fn add(&self, a: i64, b: i64) -> i64;
    async fn sub(&mut self, a: i64, b: i64) -> i64;
    #[signal(ttl = "forever")]
    async fn tick(&self, n: u32) -> u32;
    async fn new(&self) -> u8;
}

fn main() {}
