use chatter_rpc::remote;

#[remote]
pub trait Logs {
    // A signal is one message: it cannot carry a stream.
    #[signal]
    async fn lines(&self, lines: chatter_rpc::stream::Receiver<String>);
}

fn main() {}
