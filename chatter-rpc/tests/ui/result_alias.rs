use chatter_rpc::remote;

#[remote]
pub trait Files {
    // An alias of `Result`: the macro cannot see its error type.
    async fn size(&self, path: String) -> std::io::Result<u64>;
}

fn main() {}
