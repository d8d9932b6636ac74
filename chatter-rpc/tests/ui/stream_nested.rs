use chatter_rpc::remote;

#[remote]
pub trait Feeds {
    // Streams inside other types: the macro cannot carry them.
    async fn many(&self, feeds: Vec<chatter_rpc::stream::Receiver<u64>>) -> u64;
    async fn maybe(&self) -> Option<chatter_rpc::stream::Receiver<u64>>;
}

fn main() {}
