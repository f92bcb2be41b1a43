//! One module per suite.

pub mod meta;
