//! One module per suite.

pub mod channels;
pub mod fuse;
pub mod meta;
pub mod relay;
pub mod storage;
