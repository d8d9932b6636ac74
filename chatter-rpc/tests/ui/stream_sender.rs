use chatter_rpc::remote;

#[remote]
pub trait Sink {
    // A `Sender` argument: pass a `Receiver` instead.
    async fn subscribe(&self, to: chatter_rpc::stream::Sender<String>);
}

fn main() {}
