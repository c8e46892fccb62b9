//! The pipeline library's integration tests, in one binary (as ripgrep's `tests/tests.rs`), so
//! that candle and polars are linked into one test executable instead of one per file. Each
//! module is one area; `common` holds the fixtures they share.

mod common;

mod backbone;
mod block5;
mod efficientnet;
mod evaluate;
mod extract;
mod fetch;
mod heads;
mod inputs;
mod shard;
mod store;
mod study;
mod train_grad_ops;
mod train_grad_reference;
mod train_pipeline;
mod views;
