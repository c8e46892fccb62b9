//! The `extract` binary's integration tests, in one test executable (as ripgrep's
//! `tests/tests.rs`): the command line and the store through the binary, bad inputs under
//! memory limits, a fresh clone fetching its data, and the CUDA launcher script.

mod cli;
mod fresh_clone;
mod inputs;
mod launcher;
mod shard;
