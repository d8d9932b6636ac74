use chatter_rpc::remote;

#[remote]
pub struct Calc;

fn main() {}
