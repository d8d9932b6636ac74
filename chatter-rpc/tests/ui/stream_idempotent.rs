use chatter_rpc::remote;

#[remote]
pub trait Feeds {
    // A call that opens a stream is never re-sent.
    #[idempotent]
    async fn numbers(&self, from: u64) -> chatter_rpc::stream::Receiver<u64>;
}

fn main() {}
