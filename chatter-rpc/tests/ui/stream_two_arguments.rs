use chatter_rpc::remote;

#[remote]
pub trait Mixer {
    // Two argument streams: a call carries at most one.
    async fn mix(
        &self,
        left: chatter_rpc::stream::Receiver<f32>,
        right: chatter_rpc::stream::Receiver<f32>,
    ) -> chatter_rpc::stream::Receiver<f32>;
}

fn main() {}
