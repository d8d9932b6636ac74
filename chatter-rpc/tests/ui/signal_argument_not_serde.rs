use chatter_rpc::remote;

pub struct Line(pub String);

#[remote]
pub trait Log {
    #[signal]
    async fn write(&self, level: u8, line: Line);
}

fn main() {}
