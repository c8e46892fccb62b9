//! The `extract` binary's integration tests, in one test executable (as ripgrep's
//! `tests/tests.rs`): the command line and the store through the binary, bad inputs under
//! memory limits, a fresh clone fetching its data, and the CUDA launcher script.

mod cli;
mod fresh_clone;
mod inputs;
mod launcher;
mod shard;

use std::path::PathBuf;

/// A generated dataset of `n` images, random weights and a pipeline.toml using them (input
/// `size` x `size`, batch `batch`, the CPU, store `features`).
pub fn setup_sized(test: &str, n: usize, size: u32, batch: usize) -> (PathBuf, PathBuf) {
    let dir = testkit::temp_dir(test);
    testkit::write_dataset(&dir, n);
    testkit::write_vgg_weights(&dir.join("w.safetensors"), |_, _| None);
    let config = dir.join("pipeline.toml");
    std::fs::write(
        &config,
        format!(
            "[data]\ncsv = \"labels.csv\"\nimages = \"images\"\nimage_column = \"file\"\n\
             label_column = \"class\"\n[backbone]\nweights = \"w.safetensors\"\n\
             [preprocess]\ninput_size = {size}\n[extract]\nbatch_size = {batch}\ndevice = \"cpu\"\n"
        ),
    )
    .expect("config");
    (dir, config)
}
