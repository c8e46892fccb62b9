//! `extract`: stores frozen-backbone features of the configured dataset in the feature store
//! `[extract] out`; `extract --shard K/N` does part K of N of it (one task of an array job);
//! `extract --gc` deletes the store's unreferenced shards.

use pipeline::cli::{Accepts, Mode};

fn main() -> std::process::ExitCode {
    pipeline::cli::main_for(
        "extract",
        "run the frozen backbone over the dataset and store its features",
        Accepts {
            modes: &[Mode::Gc],
            shard: true,
        },
        |config, args| {
            match args.mode {
                Mode::Run => println!(
                    "{}",
                    pipeline::features::extract::run_with(config, args.shard.as_deref())?
                ),
                Mode::Gc => println!("{}", pipeline::features::extract::gc(config)?),
            }
            Ok(())
        },
    )
}
