use chatter_rpc::remote;

#[remote]
pub trait Calc {
    #[signal(ttl = "soon")]
    async fn tick(&self, n: u32);
}

fn main() {}
