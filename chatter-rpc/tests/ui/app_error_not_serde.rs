use chatter_rpc::remote;

// Neither serde trait; nor `Debug`, `Display` or `Error`, which chatter does not need.
pub enum CalcError {
    DivisionByZero,
}

#[remote]
pub trait Calc {
    async fn div(&self, a: i64, b: i64) -> Result<i64, CalcError>;
}

fn main() {}
