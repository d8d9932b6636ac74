use chatter_rpc::remote;
use chatter_rpc::stream::Receiver;

// An alias that hides the stream: #[remote] sees only `Feed`.
pub type Feed = Result<Receiver<u64>, String>;
// An alias whose `Ok` is written in the signature works.
pub type Res<T> = Result<T, String>;

#[remote]
pub trait Feeds {
    #[result]
    async fn hidden(&self) -> Feed;
    #[result]
    async fn seen(&self) -> Res<Receiver<u64>>;
}

fn main() {}
