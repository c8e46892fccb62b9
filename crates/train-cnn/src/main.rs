//! `train-cnn`: trains the from-scratch CNN baseline on the images of the study's split, then
//! writes the run's metrics, plots and the comparison report.

fn main() -> std::process::ExitCode {
    pipeline::cli::main(
        "train-cnn",
        "train the from-scratch CNN baseline on the images",
        |config| {
            let outcome = pipeline::training::study::train_cnn(config)?;
            println!("\n{}", outcome.table);
            println!(
                "run: {} (report.md, metrics.json, plots)",
                outcome.dir.display()
            );
            Ok(())
        },
    )
}
