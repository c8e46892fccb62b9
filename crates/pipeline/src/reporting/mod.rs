//! What a run leaves behind: its directory (resolved config, weights, `metrics.json`), the
//! charts, and the comparison report.

pub(crate) mod plot;
pub(crate) mod report;
pub mod runs;

pub use plot::{
    confusion_matrix_png, confusion_matrix_size, line_chart, Series, LINE_CHART_HEIGHT,
    LINE_CHART_WIDTH,
};
pub use report::{markdown_table, terminal_table, winner, ModelRow};
