//! One module per suite.

pub mod channels;
pub mod fuse;
pub mod meta;
pub mod storage;
