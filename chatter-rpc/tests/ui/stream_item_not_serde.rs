use chatter_rpc::remote;
use chatter_rpc::stream::Receiver;

pub struct Frame(pub Vec<u8>);

#[remote]
pub trait Video {
    // A stream's items travel through serde.
    async fn frames(&self, camera: u32) -> Receiver<Frame>;
}

fn main() {}
