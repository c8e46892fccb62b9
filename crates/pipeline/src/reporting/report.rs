//! The study's comparison table: one [`ModelRow`] per trained model, rendered as Markdown (for
//! the report file) or as aligned plain text (for the terminal), and the [`winner`].
//!
//! Both renderings use the same cells: accuracies as percentages with 2 decimals, macro F1 as
//! a 0..1 fraction with 4 decimals, seconds and images per second with 1 decimal. A value that
//! is not finite (a model that was never evaluated) is shown as `-` rather than `NaN%`.

use serde::{Deserialize, Serialize};

/// One model's line in the comparison table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRow {
    /// Display name, e.g. "CNN baseline" or "VGG16 + linear head".
    pub model: String,
    /// Accuracy on the training split, 0..1.
    pub train_accuracy: f64,
    /// Accuracy on the validation split, 0..1.
    pub val_accuracy: f64,
    /// Macro F1 on the validation split, 0..1.
    pub val_macro_f1: f64,
    /// Wall-clock training time, in seconds.
    pub train_seconds: f64,
    /// Inference throughput, in images per second.
    pub images_per_second: f64,
}

/// Column headers, in display order.
const HEADERS: [&str; 6] = [
    "Model",
    "Train acc",
    "Val acc",
    "Val macro F1",
    "Train time (s)",
    "Images/s",
];

/// The text of each cell of a row, in [`HEADERS`] order (the model name unescaped).
fn cells(row: &ModelRow) -> [String; 6] {
    [
        row.model.clone(),
        percent(row.train_accuracy),
        percent(row.val_accuracy),
        fixed(row.val_macro_f1, 4),
        fixed(row.train_seconds, 1),
        fixed(row.images_per_second, 1),
    ]
}

fn percent(fraction: f64) -> String {
    if fraction.is_finite() {
        format!("{:.2}%", fraction * 100.0)
    } else {
        "-".to_string()
    }
}

fn fixed(value: f64, decimals: usize) -> String {
    if value.is_finite() {
        format!("{value:.decimals$}")
    } else {
        "-".to_string()
    }
}

/// Width of each column: the widest of the header and every cell, in characters (not bytes,
/// so a non-ASCII model name does not break the alignment).
fn widths(table: &[[String; 6]]) -> [usize; 6] {
    let mut w = HEADERS.map(|h| h.chars().count());
    for row in table {
        for (w, cell) in w.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    w
}

/// Pads `text` to `width` characters: on the right for the model column, on the left (right
/// alignment) for the numeric ones.
fn pad(text: &str, width: usize, column: usize) -> String {
    if column == 0 {
        format!("{text:<width$}")
    } else {
        format!("{text:>width$}")
    }
}

/// The Markdown rule under a table's header for columns of `widths`: the first column
/// left-aligned, the others right-aligned (numbers), with a newline.
pub(crate) fn markdown_rule(widths: &[usize]) -> String {
    let rule: Vec<String> = widths
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            if i == 0 {
                "-".repeat(w + 2)
            } else {
                format!("{}:", "-".repeat(w + 1))
            }
        })
        .collect();
    format!("|{}|\n", rule.join("|"))
}

/// A GitHub-flavoured Markdown table, one line per row plus header and alignment lines, every
/// line ending in `\n`. Columns are padded so the raw text reads as a table too; numbers are
/// right-aligned. A `|` in a model name is escaped.
pub fn markdown_table(rows: &[ModelRow]) -> String {
    let table: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            let mut c = cells(r);
            // A raw `|` would end the cell; a line break would end the table.
            c[0] = c[0].replace('|', "\\|").replace(['\n', '\r'], " ");
            c
        })
        .collect();
    let w = widths(&table);

    let line = |cells: &[String]| {
        let inner: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| pad(c, w[i], i))
            .collect();
        format!("| {} |\n", inner.join(" | "))
    };
    let mut out = line(&HEADERS.map(String::from));
    out.push_str(&markdown_rule(&w));
    for row in &table {
        out.push_str(&line(row));
    }
    out
}

/// A plain-text table for the terminal: a header, a line of dashes under each column, then one
/// line per row, columns separated by two spaces, numbers right-aligned, no trailing spaces.
/// Every line ends in `\n`.
pub fn terminal_table(rows: &[ModelRow]) -> String {
    let table: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            let mut c = cells(r);
            c[0] = c[0].replace(['\n', '\r', '\t'], " ");
            c
        })
        .collect();
    let w = widths(&table);

    let line = |cells: &[String]| {
        let inner: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| pad(c, w[i], i))
            .collect();
        // Only the model column is left-aligned, and it is never last, so trimming removes
        // nothing but would-be trailing spaces (there are none unless names end in spaces).
        format!("{}\n", inner.join("  ").trim_end())
    };
    let mut out = line(&HEADERS.map(String::from));
    out.push_str(&line(&w.map(|w| "-".repeat(w))));
    for row in &table {
        out.push_str(&line(row));
    }
    out
}

/// The best model: highest validation accuracy, ties broken by higher validation macro F1,
/// remaining ties by the earlier row. Rows whose validation accuracy is NaN are not
/// candidates (a NaN macro F1 only loses ties). `None` when there is no candidate.
pub fn winner(rows: &[ModelRow]) -> Option<&ModelRow> {
    let key = |r: &ModelRow| {
        let f1 = if r.val_macro_f1.is_nan() {
            f64::NEG_INFINITY
        } else {
            r.val_macro_f1
        };
        (r.val_accuracy, f1)
    };
    let mut best: Option<&ModelRow> = None;
    for row in rows.iter().filter(|r| !r.val_accuracy.is_nan()) {
        // Strictly greater, so the first of equal rows stays.
        if best.is_none_or(|b| key(row) > key(b)) {
            best = Some(row);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(model: &str, train: f64, val: f64, f1: f64, secs: f64, ips: f64) -> ModelRow {
        ModelRow {
            model: model.to_string(),
            train_accuracy: train,
            val_accuracy: val,
            val_macro_f1: f1,
            train_seconds: secs,
            images_per_second: ips,
        }
    }

    fn study() -> Vec<ModelRow> {
        vec![
            row("CNN baseline", 0.95123, 0.8, 0.79456, 123.44, 456.78),
            row("VGG16 + linear head", 0.9987, 0.90376, 0.9012, 61.26, 88.0),
        ]
    }

    #[test]
    fn markdown_table_exact() {
        let expected = "\
| Model               | Train acc | Val acc | Val macro F1 | Train time (s) | Images/s |
|---------------------|----------:|--------:|-------------:|---------------:|---------:|
| CNN baseline        |    95.12% |  80.00% |       0.7946 |          123.4 |    456.8 |
| VGG16 + linear head |    99.87% |  90.38% |       0.9012 |           61.3 |     88.0 |
";
        assert_eq!(markdown_table(&study()), expected);
    }

    #[test]
    fn terminal_table_exact() {
        let expected = "\
Model                Train acc  Val acc  Val macro F1  Train time (s)  Images/s
-------------------  ---------  -------  ------------  --------------  --------
CNN baseline            95.12%   80.00%        0.7946           123.4     456.8
VGG16 + linear head     99.87%   90.38%        0.9012            61.3      88.0
";
        assert_eq!(terminal_table(&study()), expected);
    }

    #[test]
    fn empty_tables_have_only_headers() {
        assert_eq!(
            terminal_table(&[]),
            "Model  Train acc  Val acc  Val macro F1  Train time (s)  Images/s\n\
             -----  ---------  -------  ------------  --------------  --------\n"
        );
        assert_eq!(markdown_table(&[]).lines().count(), 2);
    }

    #[test]
    fn markdown_escapes_pipes_and_shows_missing_values() {
        let rows = [row("a|b", f64::NAN, 1.0, 1.0, 0.0, f64::INFINITY)];
        let expected = "\
| Model | Train acc | Val acc | Val macro F1 | Train time (s) | Images/s |
|-------|----------:|--------:|-------------:|---------------:|---------:|
| a\\|b  |         - | 100.00% |       1.0000 |            0.0 |        - |
";
        assert_eq!(markdown_table(&rows), expected);
    }

    #[test]
    fn winner_by_accuracy_then_f1_then_order() {
        let rows = study();
        assert_eq!(
            winner(&rows).map(|r| r.model.as_str()),
            Some("VGG16 + linear head")
        );

        let tie = [
            row("first", 0.0, 0.9, 0.80, 0.0, 0.0),
            row("better f1", 0.0, 0.9, 0.85, 0.0, 0.0),
            row("same again", 0.0, 0.9, 0.85, 0.0, 0.0),
            row("worse", 0.0, 0.8, 0.99, 0.0, 0.0),
        ];
        assert_eq!(winner(&tie).map(|r| r.model.as_str()), Some("better f1"));

        let nan = [
            row("nan", 0.0, f64::NAN, 1.0, 0.0, 0.0),
            row("ok", 0.0, 0.1, f64::NAN, 0.0, 0.0),
        ];
        assert_eq!(winner(&nan).map(|r| r.model.as_str()), Some("ok"));
        assert!(winner(&[]).is_none());
        assert!(winner(&nan[..1]).is_none());
    }

    #[test]
    fn rows_round_trip_through_json() {
        let rows = study();
        let json = serde_json::to_string(&rows).expect("serialise");
        let back: Vec<ModelRow> = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back, rows);
    }
}
