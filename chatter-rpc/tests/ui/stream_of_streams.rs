use chatter_rpc::remote;

#[remote]
pub trait Feeds {
    // A stream's items and an application error are values: neither can hold a stream.
    async fn nested(
        &self,
    ) -> Result<chatter_rpc::stream::Receiver<chatter_rpc::stream::Receiver<u8>>, String>;
    async fn failing(&self) -> Result<u8, chatter_rpc::stream::Receiver<String>>;
}

fn main() {}
