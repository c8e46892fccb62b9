//! `evaluate`: scores a trained head on a labelled dataset (`[evaluate] csv` or `root`) and
//! prints and writes accuracy, per-class precision/recall/F1 and the confusion matrix.

fn main() -> std::process::ExitCode {
    pipeline::cli::main(
        "evaluate",
        "score a trained head on a labelled dataset (a label CSV or class folders): accuracy, \
         per-class precision/recall/F1, confusion matrix",
        |config| {
            println!("{}", pipeline::inference::evaluate::run(config)?);
            Ok(())
        },
    )
}
