use chatter_rpc::remote;

#[remote]
pub trait Feeds {
    // #[plain] sends the whole `Result` as a value, and a stream is not a value.
    #[plain]
    async fn numbers(&self, from: u64) -> Result<chatter_rpc::stream::Receiver<u64>, String>;
}

fn main() {}
