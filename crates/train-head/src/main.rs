//! `train-head`: trains the configured classifier head on the cached features, then writes the
//! run's metrics, plots and the comparison report.

fn main() -> std::process::ExitCode {
    pipeline::cli::main(
        "train-head",
        "train a classifier head on the cached backbone features",
        |config| {
            let outcome = pipeline::training::study::train_head(config)?;
            println!("\n{}", outcome.table);
            println!(
                "run: {} (report.md, metrics.json, plots)",
                outcome.dir.display()
            );
            Ok(())
        },
    )
}
