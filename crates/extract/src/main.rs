//! `extract`: stores frozen-backbone features of the configured dataset in the feature store
//! `[extract] out`; `extract --gc` deletes the store's unreferenced shards.

use pipeline::cli::Mode;

fn main() -> std::process::ExitCode {
    pipeline::cli::main_with_modes(
        "extract",
        "run the frozen backbone over the dataset and store its features",
        &[Mode::Gc],
        |config, mode| {
            match mode {
                Mode::Run => println!("{}", pipeline::features::extract::run(config)?),
                Mode::Gc => println!("{}", pipeline::features::extract::gc(config)?),
            }
            Ok(())
        },
    )
}
