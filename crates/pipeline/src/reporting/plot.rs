//! PNG charts of a run, drawn with plotters: training curves ([`line_chart`]) and a
//! confusion-matrix heat map with a colour scale ([`confusion_matrix_png`]).
//!
//! Text is set in DejaVu Sans, embedded in the binary (`assets/fonts/`, licence beside it) and
//! registered with plotters' `ab_glyph` text backend, so nothing is read from the system at run
//! time and a chart looks the same on every machine. Images are drawn into an in-memory RGB
//! buffer, encoded as PNG in memory and written with [`atomic_write`]: a chart exists whole or
//! not at all.
//!
//! Bad data never panics: NaN and infinite values are skipped (a line is broken around them),
//! an empty chart says "no data", and a ragged confusion matrix is read with missing cells as 0.
//! plotters asserts on NaN axis bounds, loops forever on an axis whose span overflows `f64`, and
//! overflows `i32` on values far outside its axis, so every range handed to it is built here
//! from the data with a finite, non-zero span that holds every value drawn.

use std::path::Path;
use std::sync::OnceLock;

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder, Rgb};
use plotters::coord::ranged1d::SegmentValue;
use plotters::coord::types::{RangedCoordf64, RangedCoordusize};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle, FontTransform};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::features::store::atomic_write;

/// One named curve of a [`line_chart`]: `values[i]` is the value at epoch `i + 1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// One value per epoch; NaN, infinite and absurdly large (beyond +-1e300) values are left
    /// out of the chart.
    pub values: Vec<f64>,
}

/// Width of a [`line_chart`] image, in pixels.
pub const LINE_CHART_WIDTH: u32 = 900;
/// Height of a [`line_chart`] image, in pixels.
pub const LINE_CHART_HEIGHT: u32 = 540;
/// Width of a [`confusion_matrix_png`] image up to [`CONFUSION_MATRIX_FIXED_CLASSES`] classes.
pub const CONFUSION_MATRIX_WIDTH: u32 = 780;
/// Height of a [`confusion_matrix_png`] image up to [`CONFUSION_MATRIX_FIXED_CLASSES`] classes.
pub const CONFUSION_MATRIX_HEIGHT: u32 = 680;
/// Up to this many classes a confusion matrix has the fixed size above; past it the image grows
/// so that each cell keeps about [`MIN_CELL`] pixels.
pub const CONFUSION_MATRIX_FIXED_CLASSES: usize = 40;
/// More classes than this are not drawn as a grid (the image would be tens of megapixels): the
/// chart says how many there are instead.
pub const CONFUSION_MATRIX_MAX_CLASSES: usize = 300;

/// Series colours, in order (matplotlib's "tab10": distinct, and readable on white). Series
/// `i` gets `PALETTE[i % PALETTE.len()]`.
pub const PALETTE: [Rgb<u8>; 10] = [
    Rgb([31, 119, 180]),
    Rgb([255, 127, 14]),
    Rgb([44, 160, 44]),
    Rgb([214, 39, 40]),
    Rgb([148, 103, 189]),
    Rgb([140, 86, 75]),
    Rgb([227, 119, 194]),
    Rgb([127, 127, 127]),
    Rgb([188, 189, 34]),
    Rgb([23, 190, 207]),
];

/// The colour of series `i` in a [`line_chart`].
pub fn series_colour(i: usize) -> Rgb<u8> {
    PALETTE[i % PALETTE.len()]
}

const TEXT: RGBColor = RGBColor(33, 37, 41);
const MUTED_TEXT: RGBColor = RGBColor(90, 96, 102);
const AXIS: RGBColor = RGBColor(120, 124, 128);
const GRID: RGBColor = RGBColor(228, 230, 234);
const LEGEND_BORDER: RGBColor = RGBColor(200, 203, 207);

/// The family name the embedded font is registered under; plotters' own defaults (mesh labels,
/// legend) ask for "sans-serif" too, so they find it.
const FONT: &str = "sans-serif";
const TITLE_SIZE: f64 = 24.0;
const LABEL_SIZE: f64 = 16.0;
const DESC_SIZE: f64 = 18.0;
const LINE_WIDTH: u32 = 3;
/// Point markers are drawn on every value of a curve up to this many epochs (they show where
/// the measurements are); longer curves get a marker only on an isolated value, which would
/// otherwise be invisible.
const MARKER_EPOCHS: usize = 30;
/// About how many y ticks a line chart gets (plotters' hint).
const Y_TICKS: usize = 7;
/// Line-chart x coordinates per epoch (see [`draw_line_chart`]).
const X_UNIT: i64 = 100;
/// Values of larger magnitude are left out like infinities: a span between two of them could
/// overflow `f64`, and no loss or accuracy is that large.
const MAX_PLOTTED: f64 = 1e300;
/// Smallest pixel side of a confusion-matrix cell that the image grows to keep.
const MIN_CELL: u32 = 12;

/// DejaVu Sans 2.37 (Debian's `fonts-dejavu-core`), under the licence in `assets/fonts/LICENSE`.
static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// What a drawing step returns: plotters' errors, boxed, are turned into [`Error::Io`] naming
/// the chart's path by [`render_png`].
type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;
type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Registers the embedded font with plotters once per process.
fn register_embedded_font() -> std::result::Result<(), &'static str> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok =
        *REGISTERED.get_or_init(|| register_font(FONT, FontStyle::Normal, DEJAVU_SANS).is_ok());
    if ok {
        Ok(())
    } else {
        Err("the embedded font could not be read")
    }
}

/// Draws a `size` image with `draw` on a white background, encodes it as PNG in memory and
/// writes it atomically to `path`.
fn render_png(path: &Path, size: (u32, u32), draw: impl FnOnce(&Area) -> DrawResult) -> Result<()> {
    let fail = |message: String| Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(format!("drawing the chart: {message}")),
    };
    register_embedded_font().map_err(|e| fail(e.to_string()))?;
    let (w, h) = size;
    let mut rgb = vec![255u8; w as usize * h as usize * 3];
    {
        let backend = BitMapBackend::with_buffer_and_format(&mut rgb, size)
            .map_err(|e| fail(e.to_string()))?;
        let root = backend.into_drawing_area();
        draw(&root).map_err(|e| fail(e.to_string()))?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    let mut png = Vec::new();
    PngEncoder::new(&mut png)
        .write_image(&rgb, w, h, ExtendedColorType::Rgb8)
        .map_err(|e| fail(e.to_string()))?;
    atomic_write(path, &png)
}

fn rgb(c: Rgb<u8>) -> RGBColor {
    RGBColor(c.0[0], c.0[1], c.0[2])
}

fn text_style(size: f64, colour: RGBColor) -> TextStyle<'static> {
    (FONT, size).into_font().color(&colour)
}

/// `text` cut to at most `max` characters, with an ellipsis marking a cut.
fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let keep: String = text.chars().take(max.saturating_sub(1)).collect();
        format!("{keep}…")
    }
}

// ---------------------------------------------------------------------------------------------
// Line chart
// ---------------------------------------------------------------------------------------------

/// Draws `series` against the epoch (1..=n, n being the longest series) and writes a PNG of
/// [`LINE_CHART_WIDTH`] x [`LINE_CHART_HEIGHT`] to `path`, with `x_label` and `y_label` as the
/// axis titles.
///
/// The y axis is fitted to the finite values with a small margin (or centred on the value when
/// they are all equal), with round ticks. Each series gets its own colour
/// ([`series_colour`]) and a legend entry; the legend goes in the corner of the plot where it
/// hides the fewest data.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    render_png(path, (LINE_CHART_WIDTH, LINE_CHART_HEIGHT), |root| {
        draw_line_chart(root, title.trim(), x_label.trim(), y_label.trim(), series)
    })
}

fn draw_line_chart(
    root: &Area,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> DrawResult {
    let epochs = series.iter().map(|s| s.values.len()).max().unwrap_or(0);
    let data_range = value_range(series.iter().flat_map(|s| s.values.iter().copied()));
    let (y_min, y_max) = data_range.unwrap_or((0.0, 1.0));
    // The ticks the mesh will draw (the same call with the same hint), to size their labels.
    let y_ticks = RangedCoordf64::from(y_min..y_max).key_points(Y_TICKS);
    let y_format = TickFormat::new(&y_ticks);
    // The x axis counts hundredths of an epoch, so that it can be padded by a fraction of an
    // epoch while its ticks are plotters' integer ticks over 1..=epochs (whole epochs, round
    // steps). A one-epoch chart still needs an x range: centre the point.
    let x_ticks: Vec<i64> = match epochs {
        0 => Vec::new(),
        _ => RangedCoordusize::from(1..epochs)
            .key_points(10)
            .into_iter()
            .map(|e| e as i64 * X_UNIT)
            .collect(),
    };
    let (x_min, x_max) = if epochs <= 1 {
        (0, 2 * X_UNIT)
    } else {
        let pad = ((epochs - 1) as i64 * X_UNIT * 3 / 100).max(1);
        (X_UNIT - pad, epochs as i64 * X_UNIT + pad)
    };

    // The y label area fits the widest tick label next to the rotated axis title.
    let label_style = text_style(LABEL_SIZE, TEXT);
    let mut tick_w = 0;
    for v in &y_ticks {
        tick_w = tick_w.max(
            root.estimate_text_size(&y_format.label(*v), &label_style)?
                .0,
        );
    }
    let mut chart = ChartBuilder::on(root)
        .caption(title, text_style(TITLE_SIZE, TEXT))
        .margin(16)
        .margin_right(32)
        .x_label_area_size(64)
        .y_label_area_size(tick_w + 52)
        .build_cartesian_2d((x_min..x_max).with_key_points(x_ticks), y_min..y_max)?;
    chart
        .configure_mesh()
        .y_labels(Y_TICKS)
        .max_light_lines(0)
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&|v| (v / X_UNIT).to_string())
        .y_label_formatter(&|v| y_format.label(*v))
        .label_style(label_style.clone())
        .axis_desc_style(text_style(DESC_SIZE, TEXT))
        .bold_line_style(GRID)
        .axis_style(AXIS)
        .draw()?;

    for (i, s) in series.iter().enumerate() {
        let colour = rgb(series_colour(i));
        let runs: Vec<Vec<(i64, f64)>> = finite_runs(&s.values)
            .into_iter()
            .map(|run| {
                run.into_iter()
                    .map(|(e, v)| (e as i64 * X_UNIT, v))
                    .collect()
            })
            .collect();
        let name = match s.name.trim() {
            "" => format!("series {}", i + 1),
            name => truncate(name, 32),
        };
        chart
            .draw_series(
                runs.iter()
                    .filter(|run| run.len() > 1)
                    .map(|run| PathElement::new(run.clone(), colour.stroke_width(LINE_WIDTH))),
            )?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(LINE_WIDTH))
            });
        chart.draw_series(
            runs.iter()
                .filter(|run| run.len() == 1 || epochs <= MARKER_EPOCHS)
                .flatten()
                .map(|&p| Circle::new(p, 4, colour.filled())),
        )?;
    }

    if data_range.is_none() {
        let centre = ((x_min + x_max) / 2, (y_min + y_max) / 2.0);
        let style = text_style(DESC_SIZE, MUTED_TEXT).pos(Pos::new(HPos::Center, VPos::Center));
        chart
            .plotting_area()
            .draw(&Text::new("no data", centre, style))?;
    }

    if !series.is_empty() {
        let x_range = (x_min as f64 / X_UNIT as f64, x_max as f64 / X_UNIT as f64);
        let corner = legend_corner(series, x_range, (y_min, y_max));
        chart
            .configure_series_labels()
            .position(corner)
            .margin(14)
            .legend_area_size(32)
            .label_font(label_style)
            .background_style(WHITE.mix(0.92))
            .border_style(LEGEND_BORDER)
            .draw()?;
    }
    Ok(())
}

/// The finite points of a series as runs of consecutive epochs: `(epoch, value)` with epochs
/// counted from 1. A value that is not plotted (NaN, infinite, beyond [`MAX_PLOTTED`]) ends a
/// run, so the line is broken around it.
fn finite_runs(values: &[f64]) -> Vec<Vec<(usize, f64)>> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    for (i, &v) in values.iter().enumerate() {
        if plotted(v) {
            run.push((i + 1, v));
        } else if !run.is_empty() {
            runs.push(std::mem::take(&mut run));
        }
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

fn plotted(v: f64) -> bool {
    v.is_finite() && v.abs() <= MAX_PLOTTED
}

/// The y range to show for `values`: the plotted values' span plus 8% on each side; for a
/// single distinct value, that value +- 10% of it (+- 1 for 0). The span is at least a
/// billionth of the values' magnitude (and 1e-200), so plotters' tick search stays finite.
/// `None` if no value is plotted.
fn value_range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) =
        values
            .filter(|&v| plotted(v))
            .fold(None, |acc: Option<(f64, f64)>, v| match acc {
                None => Some((v, v)),
                Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
            })?;
    let (lo, hi) = if hi > lo {
        let m = (hi - lo) * 0.08;
        (lo - m, hi + m)
    } else {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo - pad, hi + pad)
    };
    let min_span = (lo.abs().max(hi.abs()) * 1e-9).max(1e-200);
    if hi - lo < min_span {
        let mid = lo / 2.0 + hi / 2.0;
        Some((mid - min_span / 2.0, mid + min_span / 2.0))
    } else {
        Some((lo, hi))
    }
}

/// How tick values are written: as many decimals as the tick step needs, or in scientific
/// notation for very large or very fine ticks.
#[derive(Debug, PartialEq)]
enum TickFormat {
    Fixed(usize),
    Scientific(usize),
}

impl TickFormat {
    fn new(ticks: &[f64]) -> Self {
        let step = ticks
            .windows(2)
            .map(|w| (w[1] - w[0]).abs())
            .fold(f64::INFINITY, f64::min);
        let largest = ticks.iter().fold(0f64, |m, v| m.max(v.abs()));
        if !(step.is_finite() && step > 0.0) {
            // One tick (or none): its own magnitude decides.
            return if largest >= 1e5 || (largest > 0.0 && largest < 1e-4) {
                TickFormat::Scientific(2)
            } else {
                TickFormat::Fixed(2)
            };
        }
        if largest >= 1e5 || step < 1e-4 {
            let digits = (largest / step).log10().ceil().clamp(1.0, 6.0) as usize;
            TickFormat::Scientific(digits)
        } else {
            TickFormat::Fixed((-step.log10() - 1e-9).ceil().clamp(0.0, 12.0) as usize)
        }
    }

    fn label(&self, v: f64) -> String {
        match *self {
            // Avoid "-0.00" for a tick that is zero up to rounding.
            TickFormat::Fixed(d) if v.abs() < 0.5 * 10f64.powi(-(d as i32)) => {
                format!("{:.d$}", 0.0)
            }
            TickFormat::Fixed(d) => format!("{v:.d$}"),
            TickFormat::Scientific(_) if v == 0.0 => "0".to_string(),
            TickFormat::Scientific(d) => format!("{v:.d$e}"),
        }
    }
}

/// Where along an axis a legend box sits, as a share of the plot: its start and end.
fn band(at: Side, size: f64) -> (f64, f64) {
    match at {
        Side::Low => (0.0, size),
        Side::Middle => (0.5 - size / 2.0, 0.5 + size / 2.0),
        Side::High => (1.0 - size, 1.0),
    }
}

#[derive(Clone, Copy)]
enum Side {
    Low,
    Middle,
    High,
}

/// The place in the plot where the legend hides the fewest data: points and line samples are
/// counted in a box about the legend's size at each corner and edge middle (ties: top right,
/// top left, bottom right, bottom left, then the middles of the right, left, top and bottom
/// edges).
fn legend_corner(series: &[Series], x: (f64, f64), y: (f64, f64)) -> SeriesLabelPosition {
    use SeriesLabelPosition as P;
    use Side::{High, Low, Middle};
    // The legend's share of the plot area: rows of ~24 px in ~390 px, names ~9 px a letter
    // in ~760 px.
    let longest = series
        .iter()
        .map(|s| s.name.chars().count().min(32))
        .max()
        .unwrap_or(0);
    let w = ((longest as f64 * 9.0 + 80.0) / 760.0).min(1.0);
    let h = ((series.len() as f64 * 24.0 + 30.0) / 390.0).min(1.0);
    let unit = |v: f64, (lo, hi): (f64, f64)| (v - lo) / (hi - lo);
    let mut samples = Vec::new();
    for run in series.iter().flat_map(|s| finite_runs(&s.values)) {
        let run: Vec<(f64, f64)> = run
            .into_iter()
            .map(|(e, v)| (unit(e as f64, x), unit(v, y)))
            .collect();
        samples.extend(run.iter().copied());
        for pair in run.windows(2) {
            let ((x0, y0), (x1, y1)) = (pair[0], pair[1]);
            samples.extend((1..8).map(|k| {
                let t = f64::from(k) / 8.0;
                (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t)
            }));
        }
    }
    let covered = |across: Side, up: Side| {
        let ((u0, u1), (v0, v1)) = (band(across, w), band(up, h));
        samples
            .iter()
            .filter(|&&(u, v)| (u0..=u1).contains(&u) && (v0..=v1).contains(&v))
            .count()
    };
    [
        (P::UpperRight, High, High),
        (P::UpperLeft, Low, High),
        (P::LowerRight, High, Low),
        (P::LowerLeft, Low, Low),
        (P::MiddleRight, High, Middle),
        (P::MiddleLeft, Low, Middle),
        (P::UpperMiddle, Middle, High),
        (P::LowerMiddle, Middle, Low),
    ]
    .into_iter()
    .min_by_key(|&(_, across, up)| covered(across, up))
    .map_or(P::UpperRight, |(place, _, _)| place)
}

// ---------------------------------------------------------------------------------------------
// Confusion matrix
// ---------------------------------------------------------------------------------------------

/// The pixel size of the confusion matrix of `classes` classes: [`CONFUSION_MATRIX_WIDTH`] x
/// [`CONFUSION_MATRIX_HEIGHT`] up to [`CONFUSION_MATRIX_FIXED_CLASSES`] classes, then larger
/// so that cells stay readable; a chart of more than [`CONFUSION_MATRIX_MAX_CLASSES`] classes
/// only says so, at the fixed size.
pub fn confusion_matrix_size(classes: usize) -> (u32, u32) {
    if classes > CONFUSION_MATRIX_MAX_CLASSES {
        return (CONFUSION_MATRIX_WIDTH, CONFUSION_MATRIX_HEIGHT);
    }
    // The grid of the fixed-size image is about 480 px square; grow it by what more classes
    // need.
    let grid = MIN_CELL * classes as u32;
    let extra = grid.saturating_sub(MIN_CELL * CONFUSION_MATRIX_FIXED_CLASSES as u32);
    (
        CONFUSION_MATRIX_WIDTH + extra,
        CONFUSION_MATRIX_HEIGHT + extra,
    )
}

/// Draws `matrix` (`matrix[true][predicted]` counts) as a heat map and writes it as a PNG of
/// [`confusion_matrix_size`] to `path`: darker blue for larger counts with a colour scale
/// beside the grid, the count written in each cell that can hold it, class names along both
/// axes, "true" on the vertical axis and "predicted" on the horizontal one.
///
/// The number of classes is the largest of `classes.len()`, the row count and the longest row;
/// missing cells count as 0 and a class without a name is labelled by its index.
pub fn confusion_matrix_png(
    path: &Path,
    title: &str,
    classes: &[String],
    matrix: &[Vec<usize>],
) -> Result<()> {
    let n = classes
        .len()
        .max(matrix.len())
        .max(matrix.iter().map(Vec::len).max().unwrap_or(0));
    render_png(path, confusion_matrix_size(n), |root| {
        draw_confusion_matrix(root, title.trim(), classes, matrix, n)
    })
}

/// The colour of a cell holding `t` (0..1) of the largest count: a white-to-navy blue ramp
/// (matplotlib's "Blues" end points, through a middle blue).
fn heat_colour(t: f64) -> RGBColor {
    const STOPS: [[f64; 3]; 3] = [
        [247.0, 251.0, 255.0],
        [107.0, 174.0, 214.0],
        [8.0, 48.0, 107.0],
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let (a, b, u) = if t < 0.5 {
        (STOPS[0], STOPS[1], t * 2.0)
    } else {
        (STOPS[1], STOPS[2], (t - 0.5) * 2.0)
    };
    let mix = |i: usize| (a[i] + (b[i] - a[i]) * u).round() as u8;
    RGBColor(mix(0), mix(1), mix(2))
}

/// Where the parts of a confusion matrix go in the area left of its colour scale: a square
/// grid with the row names and "true" on its left, the column names and "predicted" below it.
#[derive(Debug)]
struct MatrixLayout {
    /// Text size of the class names; under [`MIN_TEXT`] when the cells are too small for them.
    name_size: f64,
    /// Column names are turned to read upwards when one is wider than its cell.
    vertical: bool,
    /// Label area sizes, left of and below the grid.
    left: u32,
    bottom: u32,
    /// Margins around grid and labels; they centre the square grid in the area.
    margin_left: u32,
    margin_right: u32,
    margin_top: u32,
    margin_bottom: u32,
    /// Side of one cell, in pixels.
    cell: f64,
}

/// Smallest text size drawn: class names or counts that would be smaller are left out.
const MIN_TEXT: f64 = 7.0;
const MATRIX_MARGIN: u32 = 12;
/// Width of the colour scale beside a confusion matrix, its labels included.
const SCALE_WIDTH: u32 = 100;

/// Lays out a confusion matrix of `names` in `area`. The class names' size follows the cells
/// (at most [`LABEL_SIZE`], 75% of a cell), and the cells follow the space the names leave, so
/// the two are settled in a few rounds (names only shrink, so cells only grow).
fn matrix_layout(
    area: &Area,
    names: &[String],
) -> std::result::Result<MatrixLayout, Box<dyn std::error::Error>> {
    let (w, h) = area.dim_in_pixel();
    let n = names.len().max(1) as f64;
    let mut name_size = LABEL_SIZE;
    let mut round = 0;
    loop {
        let (mut names_w, mut names_h) = (0, 0);
        if name_size >= MIN_TEXT {
            for name in names {
                let (nw, nh) = area.estimate_text_size(name, &text_style(name_size, TEXT))?;
                names_w = names_w.max(nw);
                names_h = names_h.max(nh);
            }
        }
        let left = names_w + 48;
        let side = |bottom: u32| {
            let free_w = w.saturating_sub(2 * MATRIX_MARGIN + left);
            let free_h = h.saturating_sub(2 * MATRIX_MARGIN + bottom);
            free_w.min(free_h)
        };
        let flat_bottom = names_h + 44;
        let vertical = f64::from(names_w) > f64::from(side(flat_bottom)) / n - 8.0;
        let bottom = if vertical { names_w + 44 } else { flat_bottom };
        let side = side(bottom);
        let cell = f64::from(side) / n;
        let fits = (cell * 0.75).min(LABEL_SIZE);
        round += 1;
        if fits >= name_size - 0.01 || round == 4 {
            let slack_x = w.saturating_sub(2 * MATRIX_MARGIN + left + side);
            let slack_y = h.saturating_sub(2 * MATRIX_MARGIN + bottom + side);
            return Ok(MatrixLayout {
                name_size,
                vertical,
                left,
                bottom,
                margin_left: MATRIX_MARGIN + slack_x / 2,
                margin_right: MATRIX_MARGIN + slack_x - slack_x / 2,
                margin_top: MATRIX_MARGIN + slack_y / 2,
                margin_bottom: MATRIX_MARGIN + slack_y - slack_y / 2,
                cell,
            });
        }
        name_size = fits;
    }
}

fn draw_confusion_matrix(
    root: &Area,
    title: &str,
    classes: &[String],
    matrix: &[Vec<usize>],
    n: usize,
) -> DrawResult {
    let titled = root
        .margin(14, 0, 0, 0)
        .titled(title, text_style(TITLE_SIZE, TEXT))?;
    let message = match n {
        0 => Some("no data".to_string()),
        n if n > CONFUSION_MATRIX_MAX_CLASSES => Some(format!(
            "{n} classes: too many to draw (at most {CONFUSION_MATRIX_MAX_CLASSES})"
        )),
        _ => None,
    };
    if let Some(message) = message {
        let (w, h) = titled.dim_in_pixel();
        let style = text_style(DESC_SIZE, MUTED_TEXT).pos(Pos::new(HPos::Center, VPos::Center));
        titled.draw(&Text::new(message, (w as i32 / 2, h as i32 / 3), style))?;
        return Ok(());
    }

    let names: Vec<String> = (0..n)
        .map(|i| match classes.get(i).map(|s| s.trim()) {
            Some(s) if !s.is_empty() => truncate(s, 20),
            _ => i.to_string(),
        })
        .collect();
    let count = |t: usize, p: usize| matrix.get(t).and_then(|r| r.get(p)).copied().unwrap_or(0);
    let max = (0..n)
        .flat_map(|t| (0..n).map(move |p| (t, p)))
        .map(|(t, p)| count(t, p))
        .max()
        .unwrap_or(0);

    let (w, _) = titled.dim_in_pixel();
    let (grid_area, scale_area) = titled.split_horizontally(w.saturating_sub(SCALE_WIDTH));
    let lay = matrix_layout(&grid_area, &names)?;
    let show_names = lay.name_size >= MIN_TEXT;
    let name_style = text_style(lay.name_size, TEXT);

    // Segmented axes over the n classes 0..=n-1: cell `i` spans Exact(i)..Exact(i + 1), its
    // label sits at CenterOf(i). Row `t` (true class) is drawn from the top: y runs upwards,
    // so it sits at n - 1 - t.
    let mut chart = ChartBuilder::on(&grid_area)
        .margin_left(lay.margin_left)
        .margin_right(lay.margin_right)
        .margin_top(lay.margin_top)
        .margin_bottom(lay.margin_bottom)
        .x_label_area_size(lay.bottom)
        .y_label_area_size(lay.left)
        .build_cartesian_2d((0..n - 1).into_segmented(), (0..n - 1).into_segmented())?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(n)
        .y_labels(n)
        .x_desc("predicted")
        .y_desc("true")
        // Column names are drawn below, by hand: plotters centres a turned x label on its tick,
        // half of it inside the grid.
        .x_label_formatter(&|_| String::new())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(row) if show_names => names
                .get(n - 1 - (*row).min(n - 1))
                .cloned()
                .unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_style(name_style.clone())
        .axis_desc_style(text_style(DESC_SIZE, TEXT))
        .axis_style(AXIS)
        .draw()?;

    // One text size for every count: the largest (up to 20 px) at which the largest count fits
    // a cell with some air; counts are left out when that is under MIN_TEXT.
    let count_size = {
        let size = (lay.cell * 0.4).min(20.0);
        let (tw, _) = root.estimate_text_size(&max.to_string(), &text_style(size, TEXT))?;
        if f64::from(tw) > lay.cell - 8.0 {
            size * (lay.cell - 8.0) / f64::from(tw.max(1))
        } else {
            size
        }
    };
    let gap = if lay.cell >= 16.0 { 2 } else { 0 };
    for t in 0..n {
        for p in 0..n {
            let c = count(t, p);
            let frac = if max == 0 { 0.0 } else { c as f64 / max as f64 };
            let row = n - 1 - t;
            let corners = [
                (SegmentValue::Exact(p), SegmentValue::Exact(row)),
                (SegmentValue::Exact(p + 1), SegmentValue::Exact(row + 1)),
            ];
            chart.draw_series([Rectangle::new(corners.clone(), heat_colour(frac).filled())])?;
            if gap > 0 {
                chart.draw_series([Rectangle::new(corners, WHITE.stroke_width(gap))])?;
            }
            if count_size >= MIN_TEXT {
                // White on the dark half of the ramp, dark ink on the pale half.
                let ink = if frac > 0.5 { WHITE } else { TEXT };
                let style = text_style(count_size, ink).pos(Pos::new(HPos::Center, VPos::Center));
                let centre = (SegmentValue::CenterOf(p), SegmentValue::CenterOf(row));
                chart.draw_series([Text::new(c.to_string(), centre, style)])?;
            }
        }
    }

    // Column names under their cells, on `root` (whose coordinates are the image's pixels):
    // level and centred, or turned to read upwards and ending just under the grid.
    if show_names {
        let (xs, ys) = chart.plotting_area().get_pixel_range();
        let style = if lay.vertical {
            name_style
                .transform(FontTransform::Rotate270)
                .pos(Pos::new(HPos::Right, VPos::Center))
        } else {
            name_style.pos(Pos::new(HPos::Center, VPos::Top))
        };
        for (i, name) in names.iter().enumerate() {
            let x = xs.start + ((i as f64 + 0.5) * lay.cell) as i32;
            root.draw(&Text::new(name.as_str(), (x, ys.end + 10), style.clone()))?;
        }
    }

    draw_colour_scale(&scale_area, max, &lay)
}

/// The colour scale beside a confusion matrix: the heat ramp from 0 (bottom) to `max` (top)
/// with count ticks, its ends level with the grid's (same top margin, same space below).
fn draw_colour_scale(area: &Area, max: usize, lay: &MatrixLayout) -> DrawResult {
    let mut scale = ChartBuilder::on(area)
        .margin_top(lay.margin_top)
        .margin_bottom(lay.margin_bottom)
        .margin_left(8)
        .margin_right(8)
        .x_label_area_size(lay.bottom)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0..1usize, 0..max.max(1))?;
    scale
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_labels(6)
        .set_tick_mark_size(LabelAreaPosition::Right, 4)
        .label_style(text_style(LABEL_SIZE - 2.0, TEXT))
        .axis_style(AXIS)
        .draw()?;
    // The ramp, one pixel row at a time, in the plot area's own pixels.
    let bar = scale.plotting_area().strip_coord_spec();
    let (w, h) = bar.dim_in_pixel();
    let (w, h) = (w as i32, h as i32);
    for y in 0..h {
        let t = 1.0 - f64::from(y) / f64::from((h - 1).max(1));
        bar.draw(&Rectangle::new(
            [(0, y), (w, y + 1)],
            heat_colour(t).filled(),
        ))?;
    }
    bar.draw(&Rectangle::new([(0, 0), (w - 1, h - 1)], LEGEND_BORDER))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::RgbImage;
    use std::path::PathBuf;

    /// A fresh directory under the system temp dir, unique to this process and test.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pipeline-plot-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    fn decode(path: &Path) -> RgbImage {
        image::open(path).expect("decode png").to_rgb8()
    }

    fn series(name: &str, values: &[f64]) -> Series {
        Series {
            name: name.into(),
            values: values.to_vec(),
        }
    }

    fn as_rgb(c: RGBColor) -> Rgb<u8> {
        Rgb([c.0, c.1, c.2])
    }

    /// Pixels of exactly colour `c` inside the box `x0..x1` x `y0..y1`.
    fn count_in(img: &RgbImage, c: Rgb<u8>, (x0, y0, x1, y1): (u32, u32, u32, u32)) -> usize {
        img.enumerate_pixels()
            .filter(|(x, y, p)| (x0..x1).contains(x) && (y0..y1).contains(y) && **p == c)
            .count()
    }

    fn count(img: &RgbImage, c: Rgb<u8>) -> usize {
        count_in(img, c, (0, 0, img.width(), img.height()))
    }

    /// The bounding box (x0, y0, x1, y1), exclusive ends, of the pixels of colour `c` left of
    /// a confusion matrix's colour scale.
    fn grid_bbox(img: &RgbImage, c: Rgb<u8>) -> (u32, u32, u32, u32) {
        let mut b = (u32::MAX, u32::MAX, 0, 0);
        for (x, y, p) in img.enumerate_pixels() {
            if *p == c && x < img.width() - SCALE_WIDTH {
                b = (b.0.min(x), b.1.min(y), b.2.max(x + 1), b.3.max(y + 1));
            }
        }
        assert!(b.0 < b.2, "no pixel of {c:?}");
        b
    }

    /// The columns holding at least one pixel of colour `c`.
    fn columns_with(img: &RgbImage, c: Rgb<u8>) -> Vec<u32> {
        (0..img.width())
            .filter(|&x| (0..img.height()).any(|y| *img.get_pixel(x, y) == c))
            .collect()
    }

    fn decaying(n: usize, scale: f64, tau: f64, floor: f64) -> Vec<f64> {
        (0..n)
            .map(|e| scale * (-(e as f64) / tau).exp() + floor)
            .collect()
    }

    #[test]
    fn line_chart_draws_each_series_and_its_legend_in_its_colour() {
        let dir = temp_dir("two-series");
        let path = dir.join("loss.png");
        let train = decaying(30, 1.2, 8.0, 0.05);
        let val = decaying(30, 1.1, 10.0, 0.2);
        let all = [series("train", &train), series("validation", &val)];
        line_chart(&path, "head loss", "epoch", "loss", &all).expect("line chart");
        let img = decode(&path);
        let (w, h) = (LINE_CHART_WIDTH, LINE_CHART_HEIGHT);
        assert_eq!(img.dimensions(), (w, h));
        // Both curves are drawn, long, in their own colours; no third colour.
        for i in 0..2 {
            assert!(count(&img, series_colour(i)) > 1000, "series {i}");
            let cols = columns_with(&img, series_colour(i));
            assert!(cols.len() > w as usize / 2, "series {i} spans the plot");
        }
        assert_eq!(count(&img, series_colour(2)), 0);
        // Both start high on the left (the first fifth of the image, its upper half) ...
        for i in 0..2 {
            assert!(count_in(&img, series_colour(i), (0, 0, w / 5, h / 2)) > 20);
        }
        // ... and the legend goes top right, where decaying curves leave room: both samples.
        for i in 0..2 {
            let legend = count_in(&img, series_colour(i), (w - 260, 30, w, 140));
            assert!(legend >= 40, "legend sample of series {i}: {legend} pixels");
        }
        // Nothing but the file is left behind.
        let entries: Vec<_> = std::fs::read_dir(&dir).expect("read dir").collect();
        assert_eq!(entries.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn legend_goes_where_the_data_is_not() {
        let flat = |v: f64| vec![series("a", &[v; 20])];
        // A line along the top leaves the bottom free; one along the bottom, the top.
        assert_eq!(
            legend_corner(&flat(1.0), (0.5, 20.5), (0.0, 1.05)),
            SeriesLabelPosition::LowerRight
        );
        assert_eq!(
            legend_corner(&flat(0.0), (0.5, 20.5), (-0.05, 1.0)),
            SeriesLabelPosition::UpperRight
        );
        // Rising from bottom left to top right: the top left is free.
        let rising: Vec<f64> = (0..20).map(|e| e as f64 / 19.0).collect();
        assert_eq!(
            legend_corner(&[series("a", &rising)], (0.5, 20.5), (-0.05, 1.05)),
            SeriesLabelPosition::UpperLeft
        );
        // Lines along the top and the bottom leave only the middle free.
        let both = [series("a", &[1.0; 20]), series("b", &[0.0; 20])];
        assert_eq!(
            legend_corner(&both, (0.5, 20.5), (-0.05, 1.05)),
            SeriesLabelPosition::MiddleRight
        );
    }

    #[test]
    fn nan_breaks_the_line() {
        let dir = temp_dir("nan-gap");
        let columns = |values: &[f64]| {
            let path = dir.join("gap.png");
            line_chart(&path, "gap", "epoch", "loss", &[series("s", values)]).expect("chart");
            columns_with(&decode(&path), series_colour(0))
        };
        // 40 epochs: no markers, so only the lines colour the columns.
        let mut values = vec![1.0; 40];
        let whole = columns(&values);
        let widest_gap = |cols: &[u32]| cols.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        assert!(widest_gap(&whole) <= 1, "an unbroken line has no gap");
        values[20] = f64::NAN;
        values[21] = f64::INFINITY;
        let broken = columns(&values);
        // Two of 39 epoch steps missing on each side of the hole: ~3/39 of ~800 px.
        assert!(widest_gap(&broken) > 40, "gap {}", widest_gap(&broken));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_chart_without_data_says_so() {
        let dir = temp_dir("no-data");
        let dark_in_centre = |s: &[Series]| {
            let path = dir.join("c.png");
            line_chart(&path, "t", "epoch", "loss", s).expect("chart");
            let img = decode(&path);
            let (cx, cy) = (img.width() / 2, img.height() / 2);
            img.enumerate_pixels()
                .filter(|(x, y, p)| {
                    x.abs_diff(cx) < 120 && y.abs_diff(cy) < 40 && p.0.iter().all(|&v| v < 140)
                })
                .count()
        };
        assert!(dark_in_centre(&[series("nan", &[f64::NAN; 4])]) > 30);
        assert!(dark_in_centre(&[]) > 30);
        // A chart with data has no such text there (its line runs along the bottom).
        assert_eq!(dark_in_centre(&[series("low", &[0.0, 0.0, 1.0])]), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn line_chart_edge_cases_do_not_panic() {
        let dir = temp_dir("edge-cases");
        let many: Vec<Series> = (0..12)
            .map(|i| series(&format!("s{i}"), &[i as f64, 1.0]))
            .collect();
        let long_run = decaying(1000, 1.0, 200.0, 0.1);
        let cases: Vec<(&str, Vec<Series>)> = vec![
            ("none", vec![]),
            ("empty", vec![series("empty", &[])]),
            ("one-point", vec![series("one", &[0.5])]),
            ("all-equal", vec![series("flat", &[2.0; 12])]),
            ("all-zero", vec![series("zero", &[0.0; 3])]),
            (
                "nan",
                vec![series(
                    "gaps",
                    &[1.0, f64::NAN, 0.8, 0.7, f64::INFINITY, 0.5],
                )],
            ),
            ("all-nan", vec![series("nan", &[f64::NAN; 4])]),
            ("huge", vec![series("huge", &[-f64::MAX, f64::MAX, 1.0])]),
            ("near-max", vec![series("near", &[-1e300, 1e300])]),
            ("tiny-span", vec![series("tiny", &[1.0, 1.0 + 1e-15, 1.0])]),
            ("subnormal", vec![series("sub", &[0.0, 1e-310, 5e-324])]),
            (
                "no-name",
                vec![series("", &[1.0, 2.0]), series("  ", &[2.0, 1.0])],
            ),
            (
                "long-name",
                vec![series(&"a very long series name ".repeat(10), &[1.0, 2.0])],
            ),
            ("unicode", vec![series("validação ✓ 検証", &[1.0, 2.0])]),
            ("many", many),
            ("long-run", vec![series("long", &long_run)]),
        ];
        for (name, s) in cases {
            let path = dir.join(format!("{name}.png"));
            line_chart(&path, name, "epoch", "value", &s).expect(name);
            let img = decode(&path);
            assert_eq!(
                img.dimensions(),
                (LINE_CHART_WIDTH, LINE_CHART_HEIGHT),
                "{name}"
            );
            // The legend sample alone is a 24 x 3 line; drawn data add to it.
            let drawn = !["none", "empty", "all-nan"].contains(&name);
            let pixels = count(&img, series_colour(0));
            assert_eq!(pixels > 100, drawn, "{name}: {pixels} pixels");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn write_errors_name_the_path() {
        let dir = temp_dir("error");
        let blocker = dir.join("file");
        std::fs::write(&blocker, b"x").expect("write");
        // The parent of the target is a file, so the directory cannot be created.
        let path = blocker.join("chart.png");
        match line_chart(&path, "t", "x", "y", &[]) {
            Err(Error::Io { path: p, .. }) => assert!(p.starts_with(&blocker)),
            other => panic!("expected an I/O error, got {other:?}"),
        }
        match confusion_matrix_png(&path, "t", &[], &[vec![1]]) {
            Err(Error::Io { path: p, .. }) => assert!(p.starts_with(&blocker)),
            other => panic!("expected an I/O error, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ticks_are_labelled_with_the_decimals_they_need() {
        let labels = |ticks: &[f64]| -> Vec<String> {
            let f = TickFormat::new(ticks);
            ticks.iter().map(|&v| f.label(v)).collect()
        };
        assert_eq!(
            labels(&[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
            ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
        );
        assert_eq!(labels(&[0.2, 0.25, 0.3]), ["0.20", "0.25", "0.30"]);
        assert_eq!(labels(&[-10.0, 0.0, 10.0]), ["-10", "0", "10"]);
        // Zero up to rounding is "0.0", never "-0.0".
        assert_eq!(labels(&[-1e-17, 0.1]), ["0.0", "0.1"]);
        assert_eq!(labels(&[0.0, 5e299, 1e300]), ["0", "5.0e299", "1.0e300"]);
        assert_eq!(labels(&[1e-6, 2e-6]), ["1.0e-6", "2.0e-6"]);
        assert_eq!(labels(&[0.5]), ["0.50"]);
        // plotters' ticks over the ranges a chart uses.
        let ticks = RangedCoordf64::from(-0.05..1.05).key_points(Y_TICKS);
        assert_eq!(labels(&ticks), ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
    }

    #[test]
    fn value_ranges_hold_the_data_with_a_finite_span() {
        assert_eq!(value_range([f64::NAN].into_iter()), None);
        assert_eq!(value_range([f64::INFINITY, 2e300].into_iter()), None);
        assert_eq!(value_range([0.0, 0.0].into_iter()), Some((-1.0, 1.0)));
        assert_eq!(value_range([2.0].into_iter()), Some((1.8, 2.2)));
        let (lo, hi) = value_range([0.0, 1.0, f64::NAN].into_iter()).expect("range");
        assert!((lo + 0.08).abs() < 1e-12 && (hi - 1.08).abs() < 1e-12);
        for values in [
            vec![-1e300, 1e300],
            vec![1.0, 1.0 + 1e-15],
            vec![0.0, 5e-324],
            vec![1e-250, 2e-250],
        ] {
            let (lo, hi) = value_range(values.iter().copied()).expect("range");
            let span = hi - lo;
            assert!(span.is_finite() && span > 0.0, "{values:?}");
            assert!(values.iter().all(|v| (lo..=hi).contains(v)), "{values:?}");
            // plotters finds ticks for it (and returns).
            assert!(!RangedCoordf64::from(lo..hi).key_points(Y_TICKS).is_empty());
        }
    }

    #[test]
    fn confusion_matrix_shades_cells_by_count() {
        let dir = temp_dir("confusion");
        let path = dir.join("cm.png");
        let classes = vec!["ambulance".to_string(), "car".to_string()];
        let matrix = vec![vec![50, 3], vec![0, 40]];
        confusion_matrix_png(&path, "head validation", &classes, &matrix).expect("matrix");
        let img = decode(&path);
        assert_eq!(img.dimensions(), confusion_matrix_size(2));
        assert_eq!(
            img.dimensions(),
            (CONFUSION_MATRIX_WIDTH, CONFUSION_MATRIX_HEIGHT)
        );
        // Each cell is a large solid patch of its shade: true 0 / predicted 0 top left, true
        // 1 / predicted 1 bottom right, 3 top right, 0 bottom left.
        let shade = |c: usize| as_rgb(heat_colour(c as f64 / 50.0));
        for c in [50, 40, 3, 0] {
            assert!(count(&img, shade(c)) > 20_000, "cell {c}");
        }
        let cell = |c: usize| {
            let (x0, y0, x1, y1) = grid_bbox(&img, shade(c));
            ((x0 + x1) / 2, (y0 + y1) / 2)
        };
        let (tl, br, tr, bl) = (cell(50), cell(40), cell(3), cell(0));
        assert!(tl.0 < tr.0 && tl.1 < bl.1, "{tl:?} {tr:?} {bl:?}");
        assert!(br.0 > bl.0 && br.1 > tr.1, "{br:?} {tr:?} {bl:?}");
        // The count of the dark cell is written in white, the pale one's in dark ink.
        let near = |(cx, cy): (u32, u32), pred: &dyn Fn(&Rgb<u8>) -> bool| {
            img.enumerate_pixels()
                .filter(|(x, y, p)| x.abs_diff(cx) < 30 && y.abs_diff(cy) < 20 && pred(p))
                .count()
        };
        assert!(near(tl, &|p| p.0.iter().all(|&v| v > 230)) > 10);
        assert!(near(bl, &|p| p.0.iter().all(|&v| v < 100)) > 10);
        // The colour scale right of the grid runs through the whole ramp, end to end.
        let strip = (img.width() - SCALE_WIDTH, 0, img.width(), img.height());
        let mut shades = std::collections::HashSet::new();
        for (x, y, p) in img.enumerate_pixels() {
            if x >= strip.0 && (0..=100).any(|k| as_rgb(heat_colour(f64::from(k) / 100.0)) == *p) {
                shades.insert((y, *p));
            }
        }
        let distinct: std::collections::HashSet<_> = shades.iter().map(|(_, p)| *p).collect();
        assert!(distinct.len() > 60, "{} ramp shades", distinct.len());
        let ends = |t: f64| distinct.contains(&as_rgb(heat_colour(t)));
        assert!(
            ends(0.01) && ends(0.99),
            "the scale reaches both ends of the ramp"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn confusion_matrix_size_is_fixed_then_grows() {
        let fixed = (CONFUSION_MATRIX_WIDTH, CONFUSION_MATRIX_HEIGHT);
        for n in [0, 1, 2, 10, CONFUSION_MATRIX_FIXED_CLASSES] {
            assert_eq!(confusion_matrix_size(n), fixed, "{n}");
        }
        let (w, h) = confusion_matrix_size(CONFUSION_MATRIX_FIXED_CLASSES + 10);
        assert_eq!((w, h), (fixed.0 + 10 * MIN_CELL, fixed.1 + 10 * MIN_CELL));
        let (w, h) = confusion_matrix_size(CONFUSION_MATRIX_MAX_CLASSES);
        assert!(w < 5000 && h < 5000);
        assert_eq!(
            confusion_matrix_size(CONFUSION_MATRIX_MAX_CLASSES + 1),
            fixed
        );
        assert_eq!(confusion_matrix_size(usize::MAX), fixed);
    }

    #[test]
    fn confusion_matrix_edge_cases_do_not_panic() {
        let dir = temp_dir("confusion-edges");
        let named = |n: usize, f: &dyn Fn(usize) -> String| (0..n).map(f).collect::<Vec<_>>();
        let square = |n: usize, f: &dyn Fn(usize, usize) -> usize| {
            (0..n)
                .map(|t| (0..n).map(|p| f(t, p)).collect())
                .collect::<Vec<Vec<usize>>>()
        };
        type Case = (&'static str, Vec<String>, Vec<Vec<usize>>);
        let cases: Vec<Case> = vec![
            ("empty", vec![], vec![]),
            ("names-only", vec!["a".into(), "b".into()], vec![]),
            ("zeros", vec!["a".into(), "b".into()], square(2, &|_, _| 0)),
            ("one", vec!["only".into()], vec![vec![7]]),
            ("ragged", vec!["a".into()], vec![vec![1, 2, 3], vec![4]]),
            (
                "blank-and-long-names",
                vec!["".into(), "  ".into(), "x".repeat(200), "名前 ✓".into()],
                square(4, &|t, p| t + p),
            ),
            ("huge-count", vec![], vec![vec![usize::MAX, 1], vec![0, 2]]),
            (
                "forty",
                named(40, &|i| format!("class number {i}")),
                square(40, &|t, p| t * p * 97),
            ),
            (
                "sixty",
                named(60, &|i| format!("c{i}")),
                square(60, &|t, p| t ^ p),
            ),
            (
                "most",
                vec![],
                square(CONFUSION_MATRIX_MAX_CLASSES, &|t, p| usize::from(t == p)),
            ),
            (
                "too-many",
                vec![],
                square(CONFUSION_MATRIX_MAX_CLASSES + 1, &|_, _| 1),
            ),
        ];
        for (name, classes, matrix) in cases {
            let path = dir.join(format!("{name}.png"));
            confusion_matrix_png(&path, name, &classes, &matrix).expect(name);
            let n = classes
                .len()
                .max(matrix.len())
                .max(matrix.iter().map(Vec::len).max().unwrap_or(0));
            let img = decode(&path);
            assert_eq!(img.dimensions(), confusion_matrix_size(n), "{name}");
            // A drawn grid has the zero shade where a cell is 0, and the darkest one for the
            // largest count.
            if (1..=CONFUSION_MATRIX_MAX_CLASSES).contains(&n) {
                let cell = |t: usize, p: usize| matrix.get(t).and_then(|r| r.get(p)).copied();
                let cells: Vec<usize> = (0..n)
                    .flat_map(|t| (0..n).map(move |p| (t, p)))
                    .map(|(t, p)| cell(t, p).unwrap_or(0))
                    .collect();
                let has_zero = cells.contains(&0);
                let grid = (0, 0, img.width() - SCALE_WIDTH, img.height());
                let pale = count_in(&img, as_rgb(heat_colour(0.0)), grid);
                assert_eq!(pale > 0, has_zero, "{name}: zero shade");
                if cells.iter().any(|&c| c > 0) {
                    assert!(count(&img, as_rgb(heat_colour(1.0))) > 0, "{name}: darkest");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
