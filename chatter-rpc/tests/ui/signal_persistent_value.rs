use chatter_rpc::remote;

#[remote]
pub trait Journal {
    #[signal(ttl = "5s", persistent = true)]
    async fn write(&self, line: String);
}

fn main() {}
