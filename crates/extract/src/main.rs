//! `extract`: caches frozen-backbone features of the configured dataset under `[extract] out`.

fn main() -> std::process::ExitCode {
    pipeline::cli::main(
        "extract",
        "run the frozen backbone over the dataset and cache its features",
        |config| {
            println!("{}", pipeline::extract::run(config)?);
            Ok(())
        },
    )
}
