//! PNG charts of a run: training curves ([`line_chart`]) and a confusion-matrix heat map
//! ([`confusion_matrix_png`]).
//!
//! Everything is drawn here on an [`image::RgbImage`]: anti-aliased thick lines, rectangles,
//! and text from a small embedded 5x7 bitmap font (upper-case letters, digits and a few signs;
//! lower case is drawn as upper case). Nothing is read from the system at run time, so the
//! charts look the same on every machine and need no font packages. Files are encoded in
//! memory and written with [`atomic_write`], so a chart either exists whole or not at all.
//!
//! Bad data never panics: NaN and infinite values are skipped (a line is broken around them),
//! an empty chart says "NO DATA", and a ragged confusion matrix is read with missing cells as 0.

use std::io::Cursor;
use std::path::Path;

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder, Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::atomic_write;

/// One named curve of a [`line_chart`]: `values[i]` is the value at epoch `i + 1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// One value per epoch; NaN or infinite values are left out of the chart.
    pub values: Vec<f64>,
}

/// Width of a [`line_chart`] image, in pixels.
pub const LINE_CHART_WIDTH: u32 = 900;
/// Height of a [`line_chart`] image, in pixels.
pub const LINE_CHART_HEIGHT: u32 = 540;

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

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const TEXT: Rgb<u8> = Rgb([33, 37, 41]);
const MUTED_TEXT: Rgb<u8> = Rgb([90, 96, 102]);
const AXIS: Rgb<u8> = Rgb([120, 124, 128]);
const GRID: Rgb<u8> = Rgb([232, 234, 237]);
const LEGEND_BORDER: Rgb<u8> = Rgb([200, 203, 207]);

/// Scale of the title text (15x21-pixel glyphs).
const TITLE_SCALE: u32 = 3;
/// Scale of every other text (10x14-pixel glyphs).
const LABEL_SCALE: u32 = 2;
/// Width of a chart line, in pixels.
const LINE_WIDTH: f64 = 2.5;
/// Radius of the dot drawn for a point with no finite neighbour (it would be invisible as a
/// line).
const DOT_RADIUS: f64 = 3.5;

/// The colour of series `i` in a [`line_chart`].
pub fn series_colour(i: usize) -> Rgb<u8> {
    PALETTE[i % PALETTE.len()]
}

// ---------------------------------------------------------------------------------------------
// Line chart
// ---------------------------------------------------------------------------------------------

/// Draws `series` against the epoch (1..=n, n being the longest series) and writes a PNG of
/// [`LINE_CHART_WIDTH`] x [`LINE_CHART_HEIGHT`] to `path`.
///
/// The y axis is fitted to the finite values with a small margin (or centred on the value when
/// they are all equal), with "nice" round ticks. Each series gets its own colour and a legend
/// entry; the legend goes in the corner of the plot where it hides the fewest line pixels.
pub fn line_chart(path: &Path, title: &str, x_label: &str, series: &[Series]) -> Result<()> {
    let img = render_line_chart(title, x_label, series);
    write_png(path, &img)
}

/// The plot area of a line chart and the mapping from data to pixels.
struct Frame {
    left: f64,
    top: f64,
    right: f64,
    bottom: f64,
    x_min: f64,
    x_max: f64,
    y_min: f64,
    y_max: f64,
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        self.left + (x - self.x_min) / (self.x_max - self.x_min) * (self.right - self.left)
    }
    fn py(&self, y: f64) -> f64 {
        self.bottom - (y - self.y_min) / (self.y_max - self.y_min) * (self.bottom - self.top)
    }
}

fn render_line_chart(title: &str, x_label: &str, series: &[Series]) -> RgbImage {
    let (w, h) = (LINE_CHART_WIDTH, LINE_CHART_HEIGHT);
    let mut img = RgbImage::from_pixel(w, h, BACKGROUND);

    let epochs = series.iter().map(|s| s.values.len()).max().unwrap_or(0);
    let y_range = value_range(series.iter().flat_map(|s| s.values.iter().copied()));
    let (y_min, y_max) = y_range.unwrap_or((0.0, 1.0));
    let y_ticks = nice_ticks(y_min, y_max, 6);
    let y_labels: Vec<String> = y_ticks.values.iter().map(|&v| y_ticks.label(v)).collect();

    // The left margin fits the widest y tick label.
    let y_label_w = y_labels
        .iter()
        .map(|l| text_width(l, LABEL_SCALE))
        .max()
        .unwrap_or(0);
    // A one-epoch chart still needs an x range: centre the point.
    let (x_min, x_max) = if epochs <= 1 {
        (0.0, 2.0)
    } else {
        let pad = (epochs - 1) as f64 * 0.03;
        (1.0 - pad, epochs as f64 + pad)
    };
    let frame = Frame {
        left: f64::from(24 + y_label_w + 14),
        top: 72.0,
        right: f64::from(w - 32),
        bottom: f64::from(h - 84),
        x_min,
        x_max,
        y_min,
        y_max,
    };
    let (fl, ft, fr, fb) = (
        frame.left as i64,
        frame.top as i64,
        frame.right as i64,
        frame.bottom as i64,
    );

    // Title.
    let title = title.trim();
    let tw = text_width(title, TITLE_SCALE);
    draw_text(
        &mut img,
        (i64::from(w) - i64::from(tw)) / 2,
        22,
        title,
        TITLE_SCALE,
        TEXT,
    );

    // Grid and y ticks.
    for (v, label) in y_ticks.values.iter().zip(&y_labels) {
        let y = frame.py(*v).round() as i64;
        fill_rect(&mut img, fl, y, fr - fl, 1, GRID);
        fill_rect(&mut img, fl - 6, y, 6, 1, AXIS);
        let lw = i64::from(text_width(label, LABEL_SCALE));
        let lh = i64::from(text_height(LABEL_SCALE));
        draw_text(&mut img, fl - 10 - lw, y - lh / 2, label, LABEL_SCALE, TEXT);
    }
    // X ticks: whole epochs only.
    if epochs > 0 {
        for e in epoch_ticks(epochs) {
            let x = frame.px(e as f64).round() as i64;
            fill_rect(&mut img, x, ft, 1, fb - ft, GRID);
            fill_rect(&mut img, x, fb, 1, 6, AXIS);
            let label = e.to_string();
            let lw = i64::from(text_width(&label, LABEL_SCALE));
            draw_text(&mut img, x - lw / 2, fb + 12, &label, LABEL_SCALE, TEXT);
        }
    }

    // Series, on top of the grid. The mask remembers which pixels they cover, for the legend.
    let mut mask = vec![false; (w * h) as usize];
    for (i, s) in series.iter().enumerate() {
        let colour = series_colour(i);
        for run in finite_runs(&s.values) {
            let points: Vec<(f64, f64)> = run
                .iter()
                .map(|&(epoch, v)| (frame.px(epoch as f64), frame.py(v)))
                .collect();
            if let [(x, y)] = points[..] {
                fill_circle(&mut img, &mut mask, x, y, DOT_RADIUS, colour);
            } else {
                stroke_polyline(&mut img, &mut mask, &points, LINE_WIDTH, colour);
            }
        }
    }

    // Axes (left and bottom) over the series' ends.
    fill_rect(&mut img, fl, ft, 1, fb - ft + 1, AXIS);
    fill_rect(&mut img, fl, fb, fr - fl + 1, 1, AXIS);

    // X axis label.
    let x_label = x_label.trim();
    let xw = i64::from(text_width(x_label, LABEL_SCALE));
    draw_text(
        &mut img,
        (fl + fr) / 2 - xw / 2,
        fb + 46,
        x_label,
        LABEL_SCALE,
        TEXT,
    );

    if y_range.is_none() {
        let msg = "NO DATA";
        let mw = i64::from(text_width(msg, LABEL_SCALE));
        let mh = i64::from(text_height(LABEL_SCALE));
        draw_text(
            &mut img,
            (fl + fr) / 2 - mw / 2,
            (ft + fb) / 2 - mh / 2,
            msg,
            LABEL_SCALE,
            MUTED_TEXT,
        );
    }

    draw_legend(&mut img, &mask, &frame, series);
    img
}

/// The legend: a framed box with a line sample and the name of each series, in the corner of
/// the plot area covering the fewest series pixels (ties: top right, top left, bottom right,
/// bottom left).
fn draw_legend(img: &mut RgbImage, mask: &[bool], frame: &Frame, series: &[Series]) {
    if series.is_empty() {
        return;
    }
    const PAD: i64 = 10;
    const SAMPLE: i64 = 26;
    const GAP: i64 = 8;
    const ROW: i64 = 24;
    const MAX_NAME: usize = 32;

    let names: Vec<String> = series
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let name = s.name.trim();
            let name = if name.is_empty() {
                format!("SERIES {}", i + 1)
            } else {
                name.to_string()
            };
            truncate(&name, MAX_NAME)
        })
        .collect();
    let text_w = names
        .iter()
        .map(|n| i64::from(text_width(n, LABEL_SCALE)))
        .max()
        .unwrap_or(0);
    let text_h = i64::from(text_height(LABEL_SCALE));
    let box_w = PAD + SAMPLE + GAP + text_w + PAD;
    let box_h = PAD + (names.len() as i64 - 1) * ROW + text_h + PAD;

    let inset = 12;
    let (l, t, r, b) = (
        frame.left as i64 + inset,
        frame.top as i64 + inset,
        frame.right as i64 - inset,
        frame.bottom as i64 - inset,
    );
    let corners = [
        (r - box_w, t),
        (l, t),
        (r - box_w, b - box_h),
        (l, b - box_h),
    ];
    let width = i64::from(img.width());
    let height = i64::from(img.height());
    let covered = |x0: i64, y0: i64| -> usize {
        let mut n = 0;
        for y in y0.max(0)..(y0 + box_h).min(height) {
            for x in x0.max(0)..(x0 + box_w).min(width) {
                if mask[(y * width + x) as usize] {
                    n += 1;
                }
            }
        }
        n
    };
    let mut best = corners[0];
    let mut best_count = covered(best.0, best.1);
    for &(x, y) in &corners[1..] {
        let c = covered(x, y);
        if c < best_count {
            best = (x, y);
            best_count = c;
        }
    }
    let (x0, y0) = best;

    fill_rect(img, x0, y0, box_w, box_h, BACKGROUND);
    stroke_rect(img, x0, y0, box_w, box_h, LEGEND_BORDER);
    let mut scratch = vec![false; mask.len()];
    for (i, name) in names.iter().enumerate() {
        let y = y0 + PAD + i as i64 * ROW;
        let mid = (y + text_h / 2) as f64 + 0.5;
        let xs = (x0 + PAD) as f64;
        stroke_polyline(
            img,
            &mut scratch,
            &[(xs, mid), (xs + SAMPLE as f64, mid)],
            LINE_WIDTH + 0.5,
            series_colour(i),
        );
        draw_text(img, x0 + PAD + SAMPLE + GAP, y, name, LABEL_SCALE, TEXT);
    }
}

/// The finite points of a series as runs of consecutive epochs: `(epoch, value)` with epochs
/// counted from 1. A NaN or infinite value ends a run, so the line is broken around it.
fn finite_runs(values: &[f64]) -> Vec<Vec<(usize, f64)>> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    for (i, &v) in values.iter().enumerate() {
        if v.is_finite() {
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

/// The y range to show for `values`: the finite values' span plus 8% on each side; for a
/// single distinct value, that value +- 10% of it (+- 1 for 0). `None` if no value is finite.
fn value_range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold(None, |acc: Option<(f64, f64)>, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })?;
    let span = hi - lo;
    if span > 0.0 && span.is_finite() {
        let m = span * 0.08;
        Some((lo - m, hi + m))
    } else if span == 0.0 {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        Some((lo - pad, hi + pad))
    } else {
        // The span overflows f64 (values near +-f64::MAX): show the values, without margin.
        Some((lo, hi))
    }
}

/// Tick positions on an axis and how many decimals their labels need.
#[derive(Debug, PartialEq)]
struct Ticks {
    values: Vec<f64>,
    decimals: usize,
}

impl Ticks {
    fn label(&self, v: f64) -> String {
        // Avoid "-0.00" for a tick that is zero up to rounding.
        let v = if v.abs() < 1e-12 * (1.0 + v.abs()) {
            0.0
        } else {
            v
        };
        format!("{v:.*}", self.decimals)
    }
}

/// Round tick values (1, 2 or 5 times a power of ten apart) inside `[lo, hi]`, about `target`
/// of them.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> Ticks {
    let empty = Ticks {
        values: Vec::new(),
        decimals: 0,
    };
    let span = hi - lo;
    if !(span > 0.0 && span.is_finite()) || target == 0 {
        return empty;
    }
    let step = nice_step(span / target as f64);
    if !(step > 0.0 && step.is_finite()) {
        return empty;
    }
    let first = (lo / step).ceil();
    let last = (hi / step).floor();
    // At most a few dozen ticks; guards the loop against huge or odd ranges.
    if !(first.is_finite() && last.is_finite()) || last - first > 50.0 {
        return empty;
    }
    let values = (0..=((last - first) as i64))
        .map(|k| (first + k as f64) * step)
        .collect();
    let decimals = (-step.log10().floor()).clamp(0.0, 12.0) as usize;
    Ticks { values, decimals }
}

/// 1, 2 or 5 times a power of ten, near `raw`.
fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Whole-epoch x ticks for `epochs` epochs: every epoch for short runs, else multiples of a
/// round step (5, 10, 20, 50, ...).
fn epoch_ticks(epochs: usize) -> Vec<usize> {
    if epochs <= 10 {
        return (1..=epochs).collect();
    }
    let step = (nice_step((epochs - 1) as f64 / 8.0).round() as usize).max(1);
    (1..=epochs / step).map(|k| k * step).collect()
}

// ---------------------------------------------------------------------------------------------
// Confusion matrix
// ---------------------------------------------------------------------------------------------

/// Draws `matrix` (`matrix[true][predicted]` counts) as a heat map and writes it as a PNG to
/// `path`: darker blue for larger counts, the count written in each cell that can hold it,
/// class names along both axes, "TRUE" on the vertical axis and "PREDICTED" on the horizontal
/// one.
///
/// The number of classes is the largest of `classes.len()`, the row count and the longest row;
/// missing cells count as 0 and a class without a name is labelled by its index.
pub fn confusion_matrix_png(
    path: &Path,
    title: &str,
    classes: &[String],
    matrix: &[Vec<usize>],
) -> Result<()> {
    let img = render_confusion_matrix(title, classes, matrix);
    write_png(path, &img)
}

/// Where everything of a confusion-matrix image goes; shared with the tests.
#[derive(Debug)]
struct MatrixLayout {
    width: u32,
    height: u32,
    /// Top-left corner of the grid of cells.
    grid_x: i64,
    grid_y: i64,
    /// Side of one cell, gaps included.
    cell: i64,
    /// White gap between cells, split over both sides.
    gap: i64,
    /// Scale of the class names on both axes; 0 when cells are too small for any text.
    name_scale: u32,
    /// Column names are turned a quarter left (read bottom to top) when one is wider than
    /// its cell.
    vertical_names: bool,
    /// Top of the column names, and of the "PREDICTED" label.
    col_names_y: i64,
    predicted_y: i64,
    /// Left edge of the rotated "TRUE" label.
    true_x: i64,
}

const MATRIX_TITLE_TOP: i64 = 22;

fn matrix_layout(title: &str, names: &[String], max_count: usize) -> MatrixLayout {
    let n = names.len() as i64;
    // Cells shrink as classes grow, so ten classes still fit a screen; beyond a few hundred
    // classes the image grows instead (one pixel per cell at worst).
    let cell: i64 = if n == 0 {
        120
    } else if n <= 500 {
        (480 / n).clamp(8, 120)
    } else {
        (4000 / n).max(1)
    };
    // Widen the cells so the largest count fits at full size, then so every column name
    // fits under its cell, each only as long as the grid stays within 720 pixels; past that,
    // counts get smaller and column names are written vertically.
    let widest = |scale| {
        names
            .iter()
            .map(|s| i64::from(text_width(s, scale)))
            .max()
            .unwrap_or(0)
    };
    let widen = |cell: i64, need: i64| {
        if n > 0 && need * n <= 720 {
            cell.max(need)
        } else {
            cell
        }
    };
    let cell = widen(cell, count_room(max_count, LABEL_SCALE));
    let cell = widen(cell, widest(LABEL_SCALE) + 12);
    let gap = if cell >= 16 { 2 } else { 0 };
    let grid = cell * n;

    // Names must not be taller than their row (or, vertical, wider than their column).
    let name_scale = if cell >= 16 {
        LABEL_SCALE
    } else if cell >= 9 {
        1
    } else {
        0
    };
    let names_w = if name_scale == 0 {
        0
    } else {
        widest(name_scale)
    };
    let vertical_names = name_scale > 0 && names_w > cell - 4;
    let col_band = match (name_scale, vertical_names) {
        (0, _) => 0,
        (_, true) => names_w,
        (s, false) => i64::from(text_height(s)),
    };
    let label_h = i64::from(text_height(LABEL_SCALE));

    // Left to right: margin, "TRUE" (rotated), gap, row names, gap, grid, margin.
    let block_w = label_h + 14 + names_w + 12 + grid;
    let title_w = i64::from(text_width(title, TITLE_SCALE));
    let width = (block_w + 2 * 32).max(title_w + 80).max(240);
    // Top to bottom: title, gap, grid, gap, column names, gap, "PREDICTED", margin.
    let grid_y = MATRIX_TITLE_TOP + i64::from(text_height(TITLE_SCALE)) + 28;
    let col_names_y = grid_y + grid + 10;
    let predicted_y = col_names_y + col_band + 18;
    let height = predicted_y + label_h + 24;
    // Centre the block (axis label, row names, grid) horizontally.
    let block_x = (width - block_w) / 2;
    MatrixLayout {
        width: width as u32,
        height: height as u32,
        grid_x: block_x + block_w - grid,
        grid_y,
        cell,
        gap,
        name_scale,
        vertical_names,
        col_names_y,
        predicted_y,
        true_x: block_x,
    }
}

/// The cell side (gaps included) that holds `count` written at `scale` with some air.
fn count_room(count: usize, scale: u32) -> i64 {
    let text = i64::from(text_width(&count.to_string(), scale).max(text_height(scale)));
    text + 12
}

/// The colour of a cell holding `t` (0..1) of the largest count: a white-to-navy blue ramp
/// (matplotlib's "Blues" end points, through a middle blue).
fn heat_colour(t: f64) -> Rgb<u8> {
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
    Rgb(std::array::from_fn(|i| {
        (a[i] + (b[i] - a[i]) * u).round() as u8
    }))
}

fn render_confusion_matrix(title: &str, classes: &[String], matrix: &[Vec<usize>]) -> RgbImage {
    let n = classes
        .len()
        .max(matrix.len())
        .max(matrix.iter().map(Vec::len).max().unwrap_or(0));
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
    let title = title.trim();
    let lay = matrix_layout(title, &names, max);
    let mut img = RgbImage::from_pixel(lay.width, lay.height, BACKGROUND);

    let tw = i64::from(text_width(title, TITLE_SCALE));
    draw_text(
        &mut img,
        (i64::from(lay.width) - tw) / 2,
        MATRIX_TITLE_TOP,
        title,
        TITLE_SCALE,
        TEXT,
    );

    let grid = lay.cell * n as i64;
    if n == 0 {
        let msg = "NO DATA";
        let mw = i64::from(text_width(msg, LABEL_SCALE));
        draw_text(
            &mut img,
            (i64::from(lay.width) - mw) / 2,
            lay.grid_y + 8,
            msg,
            LABEL_SCALE,
            MUTED_TEXT,
        );
        return img;
    }

    // One text size for every count: the largest at which the largest count fits a cell.
    let count_scale = [LABEL_SCALE, 1]
        .into_iter()
        .find(|&s| count_room(max, s) <= lay.cell);
    let half_gap = lay.gap / 2;
    for t in 0..n {
        for p in 0..n {
            let c = count(t, p);
            let frac = if max == 0 { 0.0 } else { c as f64 / max as f64 };
            let x = lay.grid_x + p as i64 * lay.cell;
            let y = lay.grid_y + t as i64 * lay.cell;
            let side = lay.cell - lay.gap;
            fill_rect(
                &mut img,
                x + half_gap,
                y + half_gap,
                side,
                side,
                heat_colour(frac),
            );
            if let Some(s) = count_scale {
                // White on the dark half of the ramp, dark ink on the pale half.
                let ink = if frac > 0.5 { BACKGROUND } else { TEXT };
                let text = c.to_string();
                let w = i64::from(text_width(&text, s));
                let h = i64::from(text_height(s));
                draw_text(
                    &mut img,
                    x + (lay.cell - w) / 2,
                    y + (lay.cell - h) / 2,
                    &text,
                    s,
                    ink,
                );
            }
        }
    }

    // Row names right-aligned against the grid; column names centred under their cell, or
    // turned to read upwards and ending just under the grid.
    if lay.name_scale > 0 {
        let s = lay.name_scale;
        let h = i64::from(text_height(s));
        for (i, name) in names.iter().enumerate() {
            let w = i64::from(text_width(name, s));
            let start = i as i64 * lay.cell;
            let y = lay.grid_y + start + (lay.cell - h) / 2;
            draw_text(&mut img, lay.grid_x - 12 - w, y, name, s, TEXT);
            if lay.vertical_names {
                let x = lay.grid_x + start + (lay.cell - h) / 2;
                draw_text_up(&mut img, x, lay.col_names_y, name, s, TEXT);
            } else {
                let x = lay.grid_x + start + (lay.cell - w) / 2;
                draw_text(&mut img, x, lay.col_names_y, name, s, TEXT);
            }
        }
    }

    // Axis titles.
    let label = "PREDICTED";
    let w = i64::from(text_width(label, LABEL_SCALE));
    let x = lay.grid_x + grid / 2 - w / 2;
    draw_text(&mut img, x, lay.predicted_y, label, LABEL_SCALE, MUTED_TEXT);
    let label = "TRUE";
    let w = i64::from(text_width(label, LABEL_SCALE));
    let y = lay.grid_y + grid / 2 - w / 2;
    draw_text_up(&mut img, lay.true_x, y, label, LABEL_SCALE, MUTED_TEXT);
    img
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

/// Encodes `img` as PNG in memory, then writes it atomically.
fn write_png(path: &Path, img: &RgbImage) -> Result<()> {
    let mut bytes = Cursor::new(Vec::new());
    PngEncoder::new(&mut bytes)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
    atomic_write(path, bytes.get_ref())
}

// ---------------------------------------------------------------------------------------------
// Drawing primitives. Coordinates are i64 (or f64) and may fall outside the image: everything
// is clipped, so layout arithmetic never needs to be careful about edges.
// ---------------------------------------------------------------------------------------------

fn put(img: &mut RgbImage, x: i64, y: i64, colour: Rgb<u8>) {
    if x >= 0 && y >= 0 && x < i64::from(img.width()) && y < i64::from(img.height()) {
        img.put_pixel(x as u32, y as u32, colour);
    }
}

/// Mixes `colour` into the pixel with weight `alpha` (0..1).
fn blend(img: &mut RgbImage, x: i64, y: i64, colour: Rgb<u8>, alpha: f64) {
    if x < 0 || y < 0 || x >= i64::from(img.width()) || y >= i64::from(img.height()) {
        return;
    }
    let p = img.get_pixel_mut(x as u32, y as u32);
    for (dst, src) in p.0.iter_mut().zip(colour.0) {
        let mixed = f64::from(*dst) * (1.0 - alpha) + f64::from(src) * alpha;
        *dst = mixed.round().clamp(0.0, 255.0) as u8;
    }
}

fn fill_rect(img: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, colour: Rgb<u8>) {
    let (x0, y0) = (x.max(0), y.max(0));
    let x1 = (x + w).min(i64::from(img.width()));
    let y1 = (y + h).min(i64::from(img.height()));
    for py in y0..y1 {
        for px in x0..x1 {
            img.put_pixel(px as u32, py as u32, colour);
        }
    }
}

/// A one-pixel outline of the rectangle.
fn stroke_rect(img: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, colour: Rgb<u8>) {
    fill_rect(img, x, y, w, 1, colour);
    fill_rect(img, x, y + h - 1, w, 1, colour);
    fill_rect(img, x, y, 1, h, colour);
    fill_rect(img, x + w - 1, y, 1, h, colour);
}

/// Distance from `p` to the segment `a`-`b`.
fn distance_to_segment(p: (f64, f64), a: (f64, f64), b: (f64, f64)) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 {
        (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let (cx, cy) = (a.0 + t * dx, a.1 + t * dy);
    ((p.0 - cx).powi(2) + (p.1 - cy).powi(2)).sqrt()
}

/// An anti-aliased polyline of the given width with round joins and caps. Each pixel's
/// coverage is the maximum over all segments (not their sum), so joins are not darker than
/// the line. Covered pixels are marked in `mask` (row-major, the image's size).
fn stroke_polyline(
    img: &mut RgbImage,
    mask: &mut [bool],
    points: &[(f64, f64)],
    width: f64,
    colour: Rgb<u8>,
) {
    let points: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    if points.is_empty() {
        return;
    }
    let reach = width / 2.0 + 1.0;
    let (iw, ih) = (i64::from(img.width()), i64::from(img.height()));
    let clamp_x = |v: f64| (v as i64).clamp(0, iw);
    let clamp_y = |v: f64| (v as i64).clamp(0, ih);
    let bx0 = clamp_x(points.iter().map(|p| p.0).fold(f64::INFINITY, f64::min) - reach);
    let by0 = clamp_y(points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min) - reach);
    let bx1 = clamp_x(points.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max) + reach + 1.0);
    let by1 = clamp_y(points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max) + reach + 1.0);
    if bx1 <= bx0 || by1 <= by0 {
        return;
    }
    let bw = (bx1 - bx0) as usize;
    let mut coverage = vec![0f64; bw * (by1 - by0) as usize];

    // A single point is a zero-length segment: a round dot.
    let segments: Vec<((f64, f64), (f64, f64))> = if points.len() == 1 {
        vec![(points[0], points[0])]
    } else {
        points.windows(2).map(|w| (w[0], w[1])).collect()
    };
    for (a, b) in segments {
        let x0 = clamp_x(a.0.min(b.0) - reach);
        let x1 = clamp_x(a.0.max(b.0) + reach + 1.0);
        let y0 = clamp_y(a.1.min(b.1) - reach);
        let y1 = clamp_y(a.1.max(b.1) + reach + 1.0);
        for y in y0..y1 {
            for x in x0..x1 {
                let d = distance_to_segment((x as f64 + 0.5, y as f64 + 0.5), a, b);
                let c = (width / 2.0 + 0.5 - d).clamp(0.0, 1.0);
                let i = (y - by0) as usize * bw + (x - bx0) as usize;
                if c > coverage[i] {
                    coverage[i] = c;
                }
            }
        }
    }
    for (i, &c) in coverage.iter().enumerate() {
        if c > 0.0 {
            let x = bx0 + (i % bw) as i64;
            let y = by0 + (i / bw) as i64;
            blend(img, x, y, colour, c);
            if let Some(m) = mask.get_mut((y * iw + x) as usize) {
                *m = true;
            }
        }
    }
}

/// An anti-aliased filled disc.
fn fill_circle(
    img: &mut RgbImage,
    mask: &mut [bool],
    cx: f64,
    cy: f64,
    radius: f64,
    colour: Rgb<u8>,
) {
    stroke_polyline(img, mask, &[(cx, cy)], radius * 2.0, colour);
}

// ---------------------------------------------------------------------------------------------
// Text: a 5x7 bitmap font, each glyph drawn as `scale` x `scale` blocks with one blank column
// between glyphs.
// ---------------------------------------------------------------------------------------------

const GLYPH_W: u32 = 5;
const GLYPH_H: u32 = 7;
const ADVANCE: u32 = GLYPH_W + 1;

/// Width in pixels of `text` drawn at `scale` (no trailing spacing).
fn text_width(text: &str, scale: u32) -> u32 {
    let n = text.chars().count() as u32;
    if n == 0 {
        0
    } else {
        (n * ADVANCE - 1) * scale
    }
}

/// Height in pixels of a line of text drawn at `scale`.
fn text_height(scale: u32) -> u32 {
    GLYPH_H * scale
}

/// `text` cut to at most `max` characters, with ".." marking a cut.
fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let keep: String = text.chars().take(max.saturating_sub(2)).collect();
        format!("{keep}..")
    }
}

/// Draws `text` with its top-left corner at (x, y).
fn draw_text(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: u32, colour: Rgb<u8>) {
    let s = i64::from(scale);
    for (k, ch) in text.chars().enumerate() {
        let gx0 = x + k as i64 * i64::from(ADVANCE) * s;
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..GLYPH_W {
                if bits & (1 << (GLYPH_W - 1 - col)) != 0 {
                    fill_rect(
                        img,
                        gx0 + i64::from(col) * s,
                        y + row as i64 * s,
                        s,
                        s,
                        colour,
                    );
                }
            }
        }
    }
}

/// Draws `text` turned a quarter left (read bottom to top), its bounding box's top-left
/// corner at (x, y); the box is `text_height` wide and `text_width` tall.
fn draw_text_up(img: &mut RgbImage, x: i64, y: i64, text: &str, scale: u32, colour: Rgb<u8>) {
    let s = i64::from(scale);
    let len = i64::from(text_width(text, scale));
    for (k, ch) in text.chars().enumerate() {
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..GLYPH_W {
                if bits & (1 << (GLYPH_W - 1 - col)) != 0 {
                    // Unrotated block at (ux, uy); a quarter turn left maps it to
                    // (uy, len - ux - s).
                    let ux = (k as i64 * i64::from(ADVANCE) + i64::from(col)) * s;
                    let uy = row as i64 * s;
                    for dy in 0..s {
                        for dx in 0..s {
                            put(img, x + uy + dy, y + len - 1 - (ux + dx), colour);
                        }
                    }
                }
            }
        }
    }
}

/// The 5x7 bitmap of `c`: seven rows, top first, the low five bits of each row left to right.
/// Lower-case letters use the upper-case glyphs; a character the font lacks is drawn as `?`.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        ' ' => [0; 7],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '[' => [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E],
        ']' => [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E],
        '\'' => [0x0C, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00],
        '#' => [0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A],
        '<' => [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02],
        '>' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn has_colour(img: &RgbImage, c: Rgb<u8>) -> bool {
        img.pixels().any(|p| *p == c)
    }

    fn series(name: &str, values: &[f64]) -> Series {
        Series {
            name: name.into(),
            values: values.to_vec(),
        }
    }

    #[test]
    fn text_lands_inside_its_box() {
        let mut img = RgbImage::from_pixel(60, 40, BACKGROUND);
        draw_text(&mut img, 10, 12, "8", 2, TEXT);
        let mut inked = 0;
        for (x, y, p) in img.enumerate_pixels() {
            if *p != BACKGROUND {
                inked += 1;
                assert!(
                    (10..20).contains(&x) && (12..26).contains(&y),
                    "ink at {x},{y}"
                );
            }
        }
        // Every set bit of the glyph is a 2x2 block.
        let bits: u32 = glyph('8').iter().map(|r| r.count_ones()).sum();
        assert_eq!(inked, bits * 4);
        // The top bar of '8' is glyph columns 1..=3 of row 0: pixels x 12..18, y 12..14.
        assert_eq!(*img.get_pixel(12, 12), TEXT);
        assert_eq!(*img.get_pixel(10, 12), BACKGROUND);
        assert_eq!(text_width("8", 2), 10);
        assert_eq!(text_width("88", 2), 22);
        assert_eq!(text_width("", 2), 0);
    }

    #[test]
    fn font_covers_the_needed_characters() {
        let unknown = glyph('\u{1}');
        for c in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ.-%:/() ".chars() {
            if c != ' ' {
                assert_ne!(glyph(c), unknown, "{c:?} has no glyph");
                assert_ne!(glyph(c), [0; 7], "{c:?} is blank");
            }
        }
        assert_eq!(glyph('q'), glyph('Q'));
        // Every glyph fits in five columns.
        for c in (' '..='~').chain(['\u{e9}']) {
            assert!(glyph(c).iter().all(|&r| r < 32), "{c:?}");
        }
    }

    #[test]
    fn rotated_text_lands_inside_its_box() {
        let mut img = RgbImage::from_pixel(40, 60, BACKGROUND);
        draw_text_up(&mut img, 5, 8, "AB", 2, TEXT);
        let (w, h) = (text_height(2), text_width("AB", 2));
        let mut inked = 0;
        for (x, y, p) in img.enumerate_pixels() {
            if *p != BACKGROUND {
                inked += 1;
                assert!(x >= 5 && x < 5 + w && y >= 8 && y < 8 + h, "ink at {x},{y}");
            }
        }
        let bits: u32 = glyph('A')
            .iter()
            .chain(&glyph('B'))
            .map(|r| r.count_ones())
            .sum();
        assert_eq!(inked, bits * 4);
        // Read bottom to top, 'A' comes first: its left column (all set but the top row)
        // is the bottom line of the box.
        assert_eq!(*img.get_pixel(5 + 2, 8 + h - 1), TEXT);
    }

    #[test]
    fn line_chart_draws_each_series_in_its_colour() {
        let dir = temp_dir("two-series");
        let path = dir.join("loss.png");
        let train: Vec<f64> = (0..30)
            .map(|e| 1.2 * (-(e as f64) / 8.0).exp() + 0.05)
            .collect();
        let val: Vec<f64> = (0..30)
            .map(|e| 1.1 * (-(e as f64) / 10.0).exp() + 0.2)
            .collect();
        line_chart(
            &path,
            "Loss",
            "Epoch",
            &[series("train", &train), series("val", &val)],
        )
        .expect("line chart");
        let img = decode(&path);
        assert_eq!(img.dimensions(), (LINE_CHART_WIDTH, LINE_CHART_HEIGHT));
        assert!(has_colour(&img, series_colour(0)));
        assert!(has_colour(&img, series_colour(1)));
        assert!(!has_colour(&img, series_colour(2)));
        // Nothing but the file is left behind.
        let entries: Vec<_> = std::fs::read_dir(&dir).expect("read dir").collect();
        assert_eq!(entries.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn line_chart_edge_cases_do_not_panic() {
        let dir = temp_dir("edge-cases");
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
            ("huge", vec![series("huge", &[-f64::MAX, f64::MAX])]),
            (
                "no-name",
                vec![series("", &[1.0, 2.0]), series("  ", &[2.0, 1.0])],
            ),
        ];
        for (name, s) in cases {
            let path = dir.join(format!("{name}.png"));
            line_chart(&path, name, "epoch", &s).expect(name);
            let img = decode(&path);
            assert_eq!(
                img.dimensions(),
                (LINE_CHART_WIDTH, LINE_CHART_HEIGHT),
                "{name}"
            );
            if ["one-point", "all-equal", "nan", "no-name"].contains(&name) {
                assert!(has_colour(&img, series_colour(0)), "{name}");
            }
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
        match line_chart(&path, "t", "x", &[]) {
            Err(Error::Io { path: p, .. }) => assert!(p.starts_with(&blocker)),
            other => panic!("expected an I/O error, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ticks_are_round_and_inside_the_range() {
        let t = nice_ticks(-0.05, 1.05, 6);
        assert_eq!(t.decimals, 1);
        let labels: Vec<String> = t.values.iter().map(|&v| t.label(v)).collect();
        assert_eq!(labels, ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        let t = nice_ticks(0.213, 0.287, 6);
        assert_eq!(t.decimals, 2);
        assert!(t.values.iter().all(|&v| (0.213..=0.287).contains(&v)));
        assert_eq!(nice_ticks(1.0, 1.0, 6).values, Vec::<f64>::new());
        assert_eq!(nice_ticks(f64::NAN, 1.0, 6).values, Vec::<f64>::new());
        assert_eq!(epoch_ticks(3), vec![1, 2, 3]);
        assert_eq!(epoch_ticks(30), vec![5, 10, 15, 20, 25, 30]);
        assert_eq!(value_range([f64::NAN].into_iter()), None);
        assert_eq!(value_range([0.0, 0.0].into_iter()), Some((-1.0, 1.0)));
    }

    #[test]
    fn confusion_matrix_shades_cells_by_count() {
        let dir = temp_dir("confusion");
        let path = dir.join("cm.png");
        let classes = vec!["not emergency".to_string(), "emergency".to_string()];
        let matrix = vec![vec![50, 3], vec![0, 40]];
        confusion_matrix_png(&path, "Validation", &classes, &matrix).expect("confusion matrix");
        let img = decode(&path);
        let lay = matrix_layout("Validation", &classes, 50);
        assert_eq!(img.dimensions(), (lay.width, lay.height));
        // Near a cell's corner (clear of the centred count) is the cell's colour.
        let corner = |t: i64, p: i64| {
            let x = lay.grid_x + p * lay.cell + lay.gap + 2;
            let y = lay.grid_y + t * lay.cell + lay.gap + 2;
            *img.get_pixel(x as u32, y as u32)
        };
        assert_eq!(corner(0, 0), heat_colour(1.0));
        assert_eq!(corner(1, 1), heat_colour(40.0 / 50.0));
        assert_eq!(corner(0, 1), heat_colour(3.0 / 50.0));
        assert_eq!(corner(1, 0), heat_colour(0.0));
        // The count of the dark cell is written in white, the pale one's in dark ink.
        let cell_has = |t: i64, p: i64, c: Rgb<u8>| {
            // Inside the cell's fill, clear of the white gaps around it.
            let x0 = lay.grid_x + p * lay.cell + lay.gap;
            let y0 = lay.grid_y + t * lay.cell + lay.gap;
            let side = lay.cell - 2 * lay.gap;
            (y0..y0 + side)
                .any(|y| (x0..x0 + side).any(|x| *img.get_pixel(x as u32, y as u32) == c))
        };
        assert!(cell_has(0, 0, BACKGROUND));
        assert!(cell_has(1, 0, TEXT));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn confusion_matrix_edge_cases_do_not_panic() {
        let dir = temp_dir("confusion-edges");
        let many: Vec<String> = (0..40).map(|i| format!("class number {i}")).collect();
        let big: Vec<Vec<usize>> = (0..40)
            .map(|t| (0..40).map(|p| t * p * 97).collect())
            .collect();
        type Case = (&'static str, Vec<String>, Vec<Vec<usize>>);
        let cases: Vec<Case> = vec![
            ("empty", vec![], vec![]),
            (
                "zeros",
                vec!["a".into(), "b".into()],
                vec![vec![0, 0], vec![0, 0]],
            ),
            ("ragged", vec!["a".into()], vec![vec![1, 2, 3], vec![4]]),
            ("many", many, big),
        ];
        for (name, classes, matrix) in cases {
            let path = dir.join(format!("{name}.png"));
            confusion_matrix_png(&path, name, &classes, &matrix).expect(name);
            let _ = decode(&path);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
