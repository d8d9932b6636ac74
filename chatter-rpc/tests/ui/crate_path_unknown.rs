use chatter_rpc::remote;

// The path given with `crate` is the one the generated code uses.
#[remote(crate = "not_chatter")]
pub trait Calculator {
    async fn add(&self, a: i64, b: i64) -> i64;
}

fn main() {}
