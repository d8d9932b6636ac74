use chatter_rpc::remote;

#[remote]
pub trait Counter {
    // `#[result]` on a type that is not a `Result`.
    #[result]
    async fn count(&self) -> u64;
}

fn main() {}
