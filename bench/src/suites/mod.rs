//! One module per suite.

pub mod meta;
pub mod storage;
