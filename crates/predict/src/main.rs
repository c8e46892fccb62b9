//! `predict`: labels new images with a trained backbone + head and writes a CSV.

fn main() -> std::process::ExitCode {
    pipeline::cli::main(
        "predict",
        "label new images with a trained head (writes a CSV of labels and probabilities)",
        |config| {
            println!("{}", pipeline::inference::predict::run(config)?);
            Ok(())
        },
    )
}
