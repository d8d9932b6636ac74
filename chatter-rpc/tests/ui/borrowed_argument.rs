use chatter_rpc::remote;

#[remote]
pub trait Calc {
    async fn greet(&self, name: &str) -> String;
}

fn main() {}
