//! `evaluate`: scores a trained head on a labelled dataset (a label CSV + images, or a
//! class-per-folder tree, sub-folders included) and writes what it found: accuracy, per-class
//! precision / recall / F1 and the confusion matrix, printed and written beside the
//! predictions.
//!
//! The images are labelled exactly as `predict` labels them ([`TrainedRun`], [`score`]: the
//! run's feature store, backbone and head). The dataset's labels are matched to the run's
//! classes by name (as integers when both sides are all integers, so `1.0` is class `1`); a
//! label the run was not trained on is an error naming it and its rows or folder, before any
//! image is read. The numbers come from [`ConfusionMatrix`], the same code that scores
//! training runs.
//!
//! Written to `[evaluate] output`: `predictions.csv` (predict's columns plus the true label),
//! `metrics.json`, `per_class.csv`, `confusion_matrix.csv` (tables built as polars DataFrames
//! and written with polars' CSV writer), `confusion_matrix.png` and `report.md`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use polars::prelude::Column;
use serde::{Deserialize, Serialize};

use crate::config::{Config, DataConfig};
use crate::data::dataset::{match_classes, Dataset};
use crate::error::{Error, IoContext, LabelPlace, Result, UnknownLabel};
use crate::features::store::atomic_write;
use crate::inference::predict::{
    choose_run_as, predicted_classes, prediction_columns, score, table, write_csv, TrainedRun,
};
use crate::reporting::plot::confusion_matrix_png;
use crate::reporting::report::markdown_rule;
use crate::training::metrics::{ConfusionMatrix, Metrics};

/// Names of the files an evaluation writes into `[evaluate] output`.
pub const PREDICTIONS_FILE: &str = "predictions.csv";
/// See [`PREDICTIONS_FILE`].
pub const METRICS_FILE: &str = "metrics.json";
/// See [`PREDICTIONS_FILE`].
pub const PER_CLASS_FILE: &str = "per_class.csv";
/// See [`PREDICTIONS_FILE`].
pub const CONFUSION_CSV_FILE: &str = "confusion_matrix.csv";
/// See [`PREDICTIONS_FILE`].
pub const CONFUSION_PNG_FILE: &str = "confusion_matrix.png";
/// See [`PREDICTIONS_FILE`].
pub const REPORT_FILE: &str = "report.md";

/// `metrics.json` of an evaluation: what was scored, by which run, and the numbers
/// ([`Metrics`]: `accuracy`, `per_class`, `macro_f1`, `confusion_matrix`, flattened in).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    /// The head run that labelled the images.
    pub run: PathBuf,
    /// The label CSV or the class-folder tree.
    pub dataset: PathBuf,
    /// The run's classes: the order of `per_class` and of the matrix's rows and columns.
    pub classes: Vec<String>,
    /// Images scored.
    pub images: usize,
    /// Images left out because they could not be read (`[data] on_bad_image = "skip"`).
    pub skipped: Vec<String>,
    #[serde(flatten)]
    pub metrics: Metrics,
}

/// What an evaluation did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub evaluation: Evaluation,
    /// Distinct images whose features came from the feature store.
    pub from_store: usize,
    /// Distinct images run through the backbone.
    pub computed: usize,
    pub seconds: f64,
    /// The folder the results were written to.
    pub output: PathBuf,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = &self.evaluation;
        writeln!(
            f,
            "evaluate: {} images of {} scored with {} in {:.1} s ({} from the store, {} computed){}",
            e.images,
            e.dataset.display(),
            e.run.display(),
            self.seconds,
            self.from_store,
            self.computed,
            match e.skipped.len() {
                0 => String::new(),
                n => format!("; {n} unreadable images skipped"),
            }
        )?;
        write!(f, "{}", metrics_text(e, Style::Terminal))?;
        write!(f, "results in {}", self.output.display())
    }
}

/// Evaluates the configured run on `[evaluate]`'s dataset and writes the results.
pub fn run(config: &Config) -> Result<Summary> {
    let start = Instant::now();
    let e = &config.evaluate;
    if !e.has_dataset() {
        return Err(Error::InvalidValue {
            key: "evaluate".into(),
            message: "name the labelled dataset to score: `evaluate.csv` (a label CSV; its \
                      images in `evaluate.images`) or `evaluate.root` (one folder per class)"
                .into(),
        });
    }
    let trained = TrainedRun::open(choose_run_as(
        config,
        e.run.as_deref(),
        "evaluate.run",
        "evaluate",
    )?)?;
    let dataset = Dataset::load(&dataset_config(config, &trained.config))?;
    let classes = trained.metrics.classes.clone();
    // Before any image is read: every label must be one of the run's classes.
    let truth = true_classes(&dataset, &trained, e.root.is_some())?;
    let scored = score(config, &trained, &dataset, "evaluate")?;

    let mut rows: Vec<(String, Vec<f32>)> = Vec::with_capacity(dataset.samples.len());
    let mut targets = Vec::with_capacity(dataset.samples.len());
    let mut skipped = Vec::new();
    for ((sample, probs), &target) in dataset.samples.iter().zip(scored.probabilities).zip(&truth) {
        match probs {
            Some(p) => {
                rows.push((sample.id.clone(), p));
                targets.push(target);
            }
            None => skipped.push(sample.id.clone()),
        }
    }
    if rows.is_empty() {
        return Err(Error::EmptyDataset(dataset.source.clone()));
    }
    let predicted = predicted_classes(&rows, classes.len());
    let mut matrix = ConfusionMatrix::new(classes.len());
    matrix.update(&predicted, &targets);
    if matrix.ignored() > 0 {
        // Both sides are run class indices by construction; anything else is a bug, not a
        // number to report.
        return Err(Error::Table {
            table: "confusion matrix".into(),
            message: format!(
                "{} predictions fell outside the run's classes",
                matrix.ignored()
            ),
        });
    }
    let evaluation = Evaluation {
        run: trained.dir.clone(),
        dataset: dataset.source.clone(),
        classes,
        images: rows.len(),
        skipped,
        metrics: matrix.compute(),
    };
    let columns = Columns {
        image: dataset_config(config, &trained.config).image_column,
        label: trained.config.data.label_column.clone(),
    };
    write_results(&e.output, &evaluation, &columns, &rows, &targets)?;
    Ok(Summary {
        evaluation,
        from_store: scored.from_store,
        computed: scored.computed,
        seconds: start.elapsed().as_secs_f64(),
        output: e.output.clone(),
    })
}

/// The `[data]`-like description of `[evaluate]`'s dataset: its CSV (images in
/// `evaluate.images`, else `[data] images`, else the CSV's folder) or class-folder tree, the
/// columns (`evaluate.*_column`, else those the run was trained with), every row (no
/// `limit`), the classes found in it; file limits, bad-image handling and the fetched source
/// as `[data]` says.
fn dataset_config(config: &Config, trained: &Config) -> DataConfig {
    let e = &config.evaluate;
    let images = e.csv.as_ref().map(|csv| {
        e.images
            .clone()
            .or_else(|| config.data.images.clone())
            .unwrap_or_else(|| csv.parent().map(Path::to_path_buf).unwrap_or_default())
    });
    DataConfig {
        csv: e.csv.clone(),
        images,
        root: e.root.clone(),
        image_column: e
            .image_column
            .clone()
            .unwrap_or_else(|| trained.data.image_column.clone()),
        label_column: e
            .label_column
            .clone()
            .unwrap_or_else(|| trained.data.label_column.clone()),
        limit: None,
        classes: None,
        ..config.data.clone()
    }
}

/// Each sample's class among the run's classes. Labels the run does not know are one error
/// naming each with the CSV lines or the folder it occurs in.
fn true_classes(dataset: &Dataset, run: &TrainedRun, folders: bool) -> Result<Vec<usize>> {
    let known = &run.metrics.classes;
    let map = match_classes(known, &dataset.classes);
    let mut unknown = Vec::new();
    for (class, name) in dataset.classes.iter().enumerate() {
        if map[class].is_some() {
            continue;
        }
        let lines: Vec<usize> = dataset
            .samples
            .iter()
            .filter(|s| s.label == Some(class))
            .map(|s| s.line)
            .collect();
        if lines.is_empty() {
            // An empty class folder labels nothing.
            continue;
        }
        unknown.push(UnknownLabel {
            label: name.clone(),
            at: if folders {
                LabelPlace::Folder(dataset.source.join(name))
            } else {
                LabelPlace::Lines(lines)
            },
        });
    }
    if !unknown.is_empty() {
        return Err(Error::UnknownClasses {
            dataset: dataset.source.clone(),
            run: run.dir.clone(),
            known: known.clone(),
            unknown,
        });
    }
    dataset
        .samples
        .iter()
        .map(|s| {
            s.label
                .and_then(|l| map.get(l).copied().flatten())
                .ok_or_else(|| Error::BadRow {
                    path: dataset.source.clone(),
                    line: s.line,
                    message: format!("`{}` has no label", s.id),
                })
        })
        .collect()
}

/// The column names of the predictions CSV.
struct Columns {
    /// The image column: the dataset's CSV column (the run's, for folders).
    image: String,
    /// The run's label column: the predicted label; `true_<label>` holds the true one.
    label: String,
}

/// Writes every result file into `out` (created if needed).
fn write_results(
    out: &Path,
    evaluation: &Evaluation,
    columns: &Columns,
    rows: &[(String, Vec<f32>)],
    targets: &[usize],
) -> Result<()> {
    std::fs::create_dir_all(out).at(out)?;
    let classes = &evaluation.classes;
    let metrics = &evaluation.metrics;
    let name_of = |c: usize| classes.get(c).map_or("", String::as_str);

    // predict's columns, with the true label right after the predicted one.
    let mut cols = prediction_columns(&columns.image, &columns.label, classes, rows)?;
    cols.insert(
        2,
        Column::new(
            format!("true_{}", columns.label).into(),
            targets.iter().map(|&t| name_of(t)).collect::<Vec<_>>(),
        ),
    );
    write_csv(
        table(rows.len(), cols, "predictions")?,
        &out.join(PREDICTIONS_FILE),
    )?;

    let per_class = |f: fn(&crate::training::metrics::ClassMetrics) -> f64| -> Vec<f64> {
        metrics.per_class.iter().map(f).collect()
    };
    let per_class_table = table(
        classes.len(),
        vec![
            Column::new("class".into(), classes.clone()),
            Column::new("precision".into(), per_class(|m| m.precision)),
            Column::new("recall".into(), per_class(|m| m.recall)),
            Column::new("f1".into(), per_class(|m| m.f1)),
            Column::new(
                "support".into(),
                metrics
                    .per_class
                    .iter()
                    .map(|m| m.support as u64)
                    .collect::<Vec<u64>>(),
            ),
        ],
        "per-class metrics",
    )?;
    write_csv(per_class_table, &out.join(PER_CLASS_FILE))?;

    // Rows: true class; one `pred_<class>` column per predicted class.
    let mut matrix_cols = vec![Column::new("true".into(), classes.clone())];
    for (p, class) in classes.iter().enumerate() {
        matrix_cols.push(Column::new(
            format!("pred_{class}").into(),
            metrics
                .confusion_matrix
                .iter()
                .map(|row| row.get(p).copied().unwrap_or(0) as u64)
                .collect::<Vec<u64>>(),
        ));
    }
    write_csv(
        table(classes.len(), matrix_cols, "confusion matrix")?,
        &out.join(CONFUSION_CSV_FILE),
    )?;

    let json_path = out.join(METRICS_FILE);
    let json = serde_json::to_vec_pretty(evaluation).map_err(|e| Error::Table {
        table: "evaluation metrics".into(),
        message: e.to_string(),
    })?;
    atomic_write(&json_path, &json)?;

    confusion_matrix_png(
        &out.join(CONFUSION_PNG_FILE),
        &format!("evaluation: {} images", evaluation.images),
        classes,
        &metrics.confusion_matrix,
    )?;
    let report = format!(
        "# Evaluation\n\nRun `{}` on `{}`: {} images{}.\n\n{}\n![confusion matrix]({CONFUSION_PNG_FILE})\n",
        evaluation.run.display(),
        evaluation.dataset.display(),
        evaluation.images,
        match evaluation.skipped.len() {
            0 => String::new(),
            n => format!(" ({n} unreadable images skipped)"),
        },
        metrics_text(evaluation, Style::Markdown)
    );
    atomic_write(&out.join(REPORT_FILE), report.as_bytes())
}

/// How [`metrics_text`] lays out its tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// Columns separated by two spaces, numbers right-aligned.
    Terminal,
    /// GitHub-flavoured Markdown tables.
    Markdown,
}

/// Accuracy and macro F1, the per-class table and the confusion matrix, as text.
fn metrics_text(e: &Evaluation, style: Style) -> String {
    let m = &e.metrics;
    let correct: usize = (0..m.confusion_matrix.len())
        .map(|c| m.confusion_matrix[c].get(c).copied().unwrap_or(0))
        .sum();
    let mut out = format!(
        "accuracy {:.2}% ({correct} of {}), macro F1 {:.4}\n\n",
        100.0 * m.accuracy,
        e.images,
        m.macro_f1
    );
    let mut per_class = vec![["class", "precision", "recall", "F1", "support"]
        .map(String::from)
        .to_vec()];
    for (name, c) in e.classes.iter().zip(&m.per_class) {
        per_class.push(vec![
            name.clone(),
            format!("{:.4}", c.precision),
            format!("{:.4}", c.recall),
            format!("{:.4}", c.f1),
            c.support.to_string(),
        ]);
    }
    out.push_str(&grid(&per_class, style));
    out.push_str("\nconfusion matrix (rows: true class, columns: predicted)\n\n");
    let mut header = vec!["true \\ predicted".to_string()];
    header.extend(e.classes.iter().cloned());
    let mut matrix = vec![header];
    for (name, row) in e.classes.iter().zip(&m.confusion_matrix) {
        let mut line = vec![name.clone()];
        line.extend(row.iter().map(usize::to_string));
        matrix.push(line);
    }
    out.push_str(&grid(&matrix, style));
    out
}

/// A table of text cells (first row the header): first column left-aligned, the others
/// right-aligned, every line ending in `\n`.
fn grid(rows: &[Vec<String>], style: Style) -> String {
    let clean = |s: &str| match style {
        // A raw `|` would end a Markdown cell; a line break would end the table.
        Style::Markdown => s.replace('|', "\\|").replace(['\n', '\r'], " "),
        Style::Terminal => s.replace(['\n', '\r'], " "),
    };
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| clean(c)).collect())
        .collect();
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let cell = |i: usize, text: &str| {
        let w = width[i];
        if i == 0 {
            format!("{text:<w$}")
        } else {
            format!("{text:>w$}")
        }
    };
    let mut out = String::new();
    for (r, row) in rows.iter().enumerate() {
        let cells: Vec<String> = (0..columns)
            .map(|i| cell(i, row.get(i).map_or("", String::as_str)))
            .collect();
        match style {
            Style::Terminal => out.push_str(cells.join("  ").trim_end()),
            Style::Markdown => out.push_str(&format!("| {} |", cells.join(" | "))),
        }
        out.push('\n');
        if r == 0 && style == Style::Markdown {
            out.push_str(&markdown_rule(&width));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Image ids with their class probabilities.
    type Rows = Vec<(String, Vec<f32>)>;

    /// A tiny evaluation counted by hand: 6 images, 3 classes.
    ///
    /// (true, predicted): (a,a) (a,b) (b,b) (b,b) (c,a) (c,c)
    ///
    /// ```text
    ///        a  b  c | support
    ///   a [  1  1  0 ] 2
    ///   b [  0  2  0 ] 2
    ///   c [  1  0  1 ] 2
    ///   predicted: 2  3  1
    /// ```
    /// accuracy 4/6; a: P 1/2 R 1/2 F1 1/2; b: P 2/3 R 1 F1 4/5; c: P 1 R 1/2 F1 2/3;
    /// macro F1 (1/2 + 4/5 + 2/3) / 3 = 59/90.
    fn hand_counted() -> (Evaluation, Rows, Vec<usize>) {
        let classes: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let p = |v: [f32; 3]| v.to_vec();
        let rows = vec![
            ("x/1.png".to_string(), p([0.8, 0.1, 0.1])),
            ("x/2.png".to_string(), p([0.2, 0.7, 0.1])),
            ("y/3.png".to_string(), p([0.1, 0.6, 0.3])),
            ("y,4.png".to_string(), p([0.3, 0.4, 0.3])),
            ("z/5.png".to_string(), p([0.5, 0.2, 0.3])),
            ("z/6.png".to_string(), p([0.1, 0.1, 0.8])),
        ];
        let targets = vec![0, 0, 1, 1, 2, 2];
        let predicted = predicted_classes(&rows, 3);
        assert_eq!(predicted, [0, 1, 1, 1, 0, 2]);
        let mut cm = ConfusionMatrix::new(3);
        cm.update(&predicted, &targets);
        let evaluation = Evaluation {
            run: "runs/head-x".into(),
            dataset: "held-out".into(),
            classes,
            images: rows.len(),
            skipped: Vec::new(),
            metrics: cm.compute(),
        };
        (evaluation, rows, targets)
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn results_match_a_hand_count_in_every_file() {
        let (evaluation, rows, targets) = hand_counted();
        let m = &evaluation.metrics;
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(m.accuracy, 4.0 / 6.0));
        assert!(close(m.macro_f1, 59.0 / 90.0));
        assert_eq!(m.confusion_matrix, [[1, 1, 0], [0, 2, 0], [1, 0, 1]]);

        let out = std::env::temp_dir().join(format!("pipeline-eval-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let columns = Columns {
            image: "image".into(),
            label: "label".into(),
        };
        write_results(&out, &evaluation, &columns, &rows, &targets).expect("written");
        assert_eq!(
            read(&out.join(PREDICTIONS_FILE)),
            "image,label,true_label,prob_a,prob_b,prob_c\n\
             x/1.png,a,a,0.800000,0.100000,0.100000\n\
             x/2.png,b,a,0.200000,0.700000,0.100000\n\
             y/3.png,b,b,0.100000,0.600000,0.300000\n\
             \"y,4.png\",b,b,0.300000,0.400000,0.300000\n\
             z/5.png,a,c,0.500000,0.200000,0.300000\n\
             z/6.png,c,c,0.100000,0.100000,0.800000\n"
        );
        assert_eq!(
            read(&out.join(PER_CLASS_FILE)),
            "class,precision,recall,f1,support\n\
             a,0.500000,0.500000,0.500000,2\n\
             b,0.666667,1.000000,0.800000,2\n\
             c,1.000000,0.500000,0.666667,2\n"
        );
        assert_eq!(
            read(&out.join(CONFUSION_CSV_FILE)),
            "true,pred_a,pred_b,pred_c\na,1,1,0\nb,0,2,0\nc,1,0,1\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&read(&out.join(METRICS_FILE))).expect("json");
        assert_eq!(json["images"], 6);
        assert_eq!(json["classes"], serde_json::json!(["a", "b", "c"]));
        assert_eq!(
            json["confusion_matrix"],
            serde_json::json!([[1, 1, 0], [0, 2, 0], [1, 0, 1]])
        );
        assert!(close(
            json["accuracy"].as_f64().expect("accuracy"),
            4.0 / 6.0
        ));
        let back: Evaluation =
            serde_json::from_str(&read(&out.join(METRICS_FILE))).expect("reads back");
        assert_eq!(back.metrics, evaluation.metrics);
        let png = image::open(out.join(CONFUSION_PNG_FILE)).expect("png");
        assert_eq!(
            (png.width(), png.height()),
            crate::reporting::plot::confusion_matrix_size(3)
        );
        let report = read(&out.join(REPORT_FILE));
        assert!(
            report.contains("accuracy 66.67% (4 of 6), macro F1 0.6556")
                && report.contains("\n| b     |    0.6667 | 1.0000 | 0.8000 |       2 |\n")
                && report.contains("\n| c                | 1 | 0 | 1 |\n"),
            "{report}"
        );
        let _ = std::fs::remove_dir_all(&out);
    }

    #[test]
    fn the_terminal_text_has_the_numbers_and_the_matrix() {
        let (evaluation, _, _) = hand_counted();
        let text = metrics_text(&evaluation, Style::Terminal);
        assert!(
            text.starts_with("accuracy 66.67% (4 of 6), macro F1 0.6556\n"),
            "{text}"
        );
        assert!(
            text.contains("\nc         1.0000  0.5000  0.6667        2\n"),
            "{text}"
        );
        assert!(text.contains("\nc                 1  0  1\n"), "{text}");
        assert!(text.lines().all(|l| l == l.trim_end()), "{text}");
    }
}
