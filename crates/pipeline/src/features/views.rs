//! Augmented views (`[extract] views`): deterministic transforms of a preprocessed image, each
//! extracted as its own feature row, trained on as its own row, and averaged over at prediction
//! time (test-time augmentation).
//!
//! A view transforms the image *after* preprocessing (resize or center crop, normalisation), on
//! its `[3, S, S]` CHW values, `S` the backbone's input size. Because normalisation is a
//! per-channel affine map and every transform below is a convex combination of pixels of one
//! channel, transforming the normalised image equals normalising the transformed one.
//!
//! The views, as spelled in the config:
//! - `original`: the image as preprocessed (today's row; always present, always first).
//! - `hflip`: mirrored left-right: `out[c][y][x] = in[c][y][S-1-x]`.
//! - `crop:tl`, `crop:tr`, `crop:bl`, `crop:br`, `crop:center`: a square crop of side
//!   `C = floor(7 S / 8)` (at least 1) at the top-left, top-right, bottom-left, bottom-right
//!   corner or the center (offset `floor((S-C)/2)` on both axes), resized back to `S x S`
//!   bilinearly with half-pixel centres: output pixel `d` samples the crop at
//!   `(d + 0.5) C / S - 0.5`, clamped to `[0, C-1]` (PyTorch's `interpolate(mode="bilinear",
//!   align_corners=False)`; an enlargement, so no antialiasing is involved). The scale 7/8 is
//!   the ratio of the usual 224 crop of a 256 resize.
//! - `crops:4` stands for the four corner crops, `crops:5` for those and `crop:center`
//!   (torchvision's FiveCrop positions, at scale 7/8 and resized back).
//!
//! Row keys: the original view's row is the image's content hash, exactly as without views;
//! view `v`'s row is addressed by `<hash>:<v>` and stored under the SHA-256 of that text (64
//! hex digits, so the shard format is unchanged and the view rows live in the image's own
//! feature space). Extracting more views later reuses every row already stored.

use sha2::{Digest, Sha256};

use crate::data::dataset::hex;
use crate::error::{Error, Result};

/// The config key the views are read from, for messages.
pub const KEY: &str = "extract.views";

/// Scale of the crops: their side is `floor(CROP_NUM * S / CROP_DEN)` of the image's `S`.
const CROP_NUM: usize = 7;
const CROP_DEN: usize = 8;

/// Where a crop sits in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Corner {
    TopLeft,
    TopRight,
    BottomLeft,
    BottomRight,
    Center,
}

impl Corner {
    const ALL: [Corner; 5] = [
        Corner::TopLeft,
        Corner::TopRight,
        Corner::BottomLeft,
        Corner::BottomRight,
        Corner::Center,
    ];

    fn name(self) -> &'static str {
        match self {
            Corner::TopLeft => "tl",
            Corner::TopRight => "tr",
            Corner::BottomLeft => "bl",
            Corner::BottomRight => "br",
            Corner::Center => "center",
        }
    }

    /// (top, left) of a crop of side `c` in an image of side `s`.
    fn offset(self, s: usize, c: usize) -> (usize, usize) {
        let far = s - c;
        match self {
            Corner::TopLeft => (0, 0),
            Corner::TopRight => (0, far),
            Corner::BottomLeft => (far, 0),
            Corner::BottomRight => (far, far),
            Corner::Center => (far / 2, far / 2),
        }
    }
}

/// One deterministic transform of a preprocessed image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum View {
    /// The image as preprocessed.
    Original,
    /// Mirrored left-right.
    Hflip,
    /// A 7/8-scale crop at a corner or the center, resized back to the input size.
    Crop(Corner),
}

impl View {
    /// The canonical name (as written in the config, in row keys and in run records).
    pub fn name(&self) -> String {
        match self {
            View::Original => "original".into(),
            View::Hflip => "hflip".into(),
            View::Crop(c) => format!("crop:{}", c.name()),
        }
    }

    /// One config entry: a view, or `crops:4` / `crops:5` standing for several.
    fn parse_entry(entry: &str) -> Option<Vec<View>> {
        let corner = |name: &str| Corner::ALL.into_iter().find(|c| c.name() == name);
        Some(match entry {
            "original" => vec![View::Original],
            "hflip" => vec![View::Hflip],
            "crops:4" => Corner::ALL[..4].iter().map(|&c| View::Crop(c)).collect(),
            "crops:5" => Corner::ALL.iter().map(|&c| View::Crop(c)).collect(),
            _ => vec![View::Crop(corner(entry.strip_prefix("crop:")?)?)],
        })
    }

    /// Parses a canonical view name (one view, no shorthand).
    pub fn from_name(name: &str) -> Option<View> {
        match View::parse_entry(name)?.as_slice() {
            [v] if v.name() == name => Some(*v),
            _ => None,
        }
    }

    /// The view of a CHW image of side `size` (`3 * size * size` values).
    pub fn apply(&self, chw: &[f32], size: usize) -> Vec<f32> {
        match self {
            View::Original => chw.to_vec(),
            View::Hflip => {
                let mut out = Vec::with_capacity(chw.len());
                for row in chw.chunks_exact(size.max(1)) {
                    out.extend(row.iter().rev());
                }
                out
            }
            View::Crop(corner) => {
                let c = crop_side(size);
                let (top, left) = corner.offset(size, c);
                crop_resize(chw, size, top, left, c)
            }
        }
    }

    /// The store key of this view's row of the image with content hash `hash`.
    pub fn row_key(&self, hash: &str) -> String {
        row_key(hash, &self.name())
    }
}

/// The store key of view `name`'s row of the image `hash`: the hash itself for `original`,
/// else the SHA-256 of `<hash>:<name>`.
pub fn row_key(hash: &str, name: &str) -> String {
    if name == "original" {
        hash.to_string()
    } else {
        hex(&Sha256::digest(format!("{hash}:{name}").as_bytes()))
    }
}

/// Side of the crops of an image of side `size`.
pub fn crop_side(size: usize) -> usize {
    (size * CROP_NUM / CROP_DEN).max(1)
}

/// The `c x c` square at (`top`, `left`) of each channel, resized to `size x size` bilinearly
/// with half-pixel centres and clamped edges.
fn crop_resize(chw: &[f32], size: usize, top: usize, left: usize, c: usize) -> Vec<f32> {
    // Source position and weights along one axis, the same for rows and columns.
    let taps: Vec<(usize, usize, f32)> = (0..size)
        .map(|d| {
            let src = ((d as f64 + 0.5) * c as f64 / size as f64 - 0.5).clamp(0.0, (c - 1) as f64);
            let i0 = src.floor() as usize;
            let i1 = (i0 + 1).min(c - 1);
            (i0, i1, (src - i0 as f64) as f32)
        })
        .collect();
    let plane = size * size;
    let mut out = Vec::with_capacity(chw.len());
    for channel in chw.chunks_exact(plane.max(1)) {
        let at = |y: usize, x: usize| channel[(top + y) * size + left + x];
        for &(y0, y1, wy) in &taps {
            for &(x0, x1, wx) in &taps {
                let upper = at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx;
                let lower = at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx;
                out.push(upper * (1.0 - wy) + lower * wy);
            }
        }
    }
    out
}

/// The views `[extract] views` lists, expanded and checked: `original` must be among them
/// and comes first, the others follow in the order given; unknown or repeated entries are
/// errors naming the key and the entry.
pub fn parse_views(entries: &[String]) -> Result<Vec<View>> {
    let bad = |message: String| Error::InvalidValue {
        key: KEY.into(),
        message,
    };
    let mut views = vec![View::Original];
    let mut original = false;
    for entry in entries {
        let expanded = View::parse_entry(entry.trim()).ok_or_else(|| {
            bad(format!(
                "unknown view `{entry}`: use \"original\", \"hflip\", \"crop:tl\", \"crop:tr\", \
                 \"crop:bl\", \"crop:br\", \"crop:center\", \"crops:4\" or \"crops:5\""
            ))
        })?;
        for v in expanded {
            if v == View::Original {
                if original {
                    return Err(bad(format!("`{entry}` is listed twice")));
                }
                original = true;
            } else if views.contains(&v) {
                return Err(bad(format!(
                    "`{}` is listed twice (in `{entry}`)",
                    v.name()
                )));
            } else {
                views.push(v);
            }
        }
    }
    if !original {
        return Err(bad(format!(
            "must include \"original\" (the image as preprocessed, which validation and \
             predictions start from); got {entries:?}"
        )));
    }
    Ok(views)
}

/// The names of `views`, as recorded in row maps and runs.
pub fn names(views: &[View]) -> Vec<String> {
    views.iter().map(View::name).collect()
}

/// `["original"]`: the views of a store or run that records none.
pub fn original_only() -> Vec<String> {
    vec!["original".into()]
}

/// Whether `names` is just the original view (recorded by leaving the field out).
pub fn is_original_only(names: &[String]) -> bool {
    names.len() == 1 && names[0] == "original"
}

/// The mean of each row's class probabilities over views: `per_view[v][i]` is row `i`'s
/// probabilities under view `v`; every view must have the same rows and classes.
pub fn mean_over_views(per_view: &[Vec<Vec<f32>>]) -> Result<Vec<Vec<f32>>> {
    let bad = |message: String| Error::Model {
        model: "views".into(),
        message,
    };
    let Some(first) = per_view.first() else {
        return Err(bad("no views to average".into()));
    };
    let n = per_view.len() as f32;
    let mut mean: Vec<Vec<f32>> = first.clone();
    for (v, probs) in per_view.iter().enumerate().skip(1) {
        if probs.len() != mean.len() {
            return Err(bad(format!(
                "view {v} has {} rows, view 0 has {}",
                probs.len(),
                mean.len()
            )));
        }
        for (i, (m, p)) in mean.iter_mut().zip(probs).enumerate() {
            if m.len() != p.len() {
                return Err(bad(format!(
                    "row {i}: {} classes under view {v}, {} under view 0",
                    p.len(),
                    m.len()
                )));
            }
            m.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
    }
    if per_view.len() > 1 {
        mean.iter_mut().flatten().for_each(|a| *a /= n);
    }
    Ok(mean)
}

/// Feature-row positions of `rows` (positions among `per_view` kept images) under every view:
/// view `v`'s row of image `i` is at `v * per_view + i`. All views of an image follow the image,
/// so a split of images is a split of rows that never separates an image's views.
pub fn expand_rows(rows: &[usize], per_view: usize, views: usize) -> Vec<usize> {
    (0..views)
        .flat_map(|v| rows.iter().map(move |&i| v * per_view + i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3-channel `s x s` image whose value at (c, y, x) is `100 c + 10 y + x`.
    fn ramp(s: usize) -> Vec<f32> {
        let mut v = Vec::new();
        for c in 0..3 {
            for y in 0..s {
                for x in 0..s {
                    v.push((100 * c + 10 * y + x) as f32);
                }
            }
        }
        v
    }

    #[test]
    fn original_is_the_image_and_hflip_mirrors_each_row() {
        let img = ramp(3);
        assert_eq!(View::Original.apply(&img, 3), img);
        let flipped = View::Hflip.apply(&img, 3);
        // Channel 1, row 2: 120 121 122 -> 122 121 120.
        assert_eq!(&flipped[9 + 6..9 + 9], &[122.0, 121.0, 120.0]);
        assert_eq!(&flipped[0..3], &[2.0, 1.0, 0.0]);
        assert_eq!(
            View::Hflip.apply(&flipped, 3),
            img,
            "a flip twice is the image"
        );
    }

    #[test]
    fn crops_are_seven_eighths_resized_back_with_half_pixel_bilinear() {
        // S = 8: crops of 7, sampled at 0.875 d - 0.0625 clamped to [0, 6]:
        let axis = [0.0, 0.8125, 1.6875, 2.5625, 3.4375, 4.3125, 5.1875, 6.0];
        assert_eq!(crop_side(8), 7);
        assert_eq!(crop_side(224), 196);
        assert_eq!(crop_side(1), 1);
        let img = ramp(8);
        // The ramp is linear, so bilinear sampling returns the sampled position's value.
        for (corner, (top, left)) in [
            (Corner::TopLeft, (0.0, 0.0)),
            (Corner::TopRight, (0.0, 1.0)),
            (Corner::BottomLeft, (1.0, 0.0)),
            (Corner::BottomRight, (1.0, 1.0)),
            (Corner::Center, (0.0, 0.0)), // (8 - 7) / 2 = 0
        ] {
            let out = View::Crop(corner).apply(&img, 8);
            assert_eq!(out.len(), img.len());
            for c in 0..3 {
                for y in 0..8 {
                    for x in 0..8 {
                        let want = 100.0 * c as f32 + 10.0 * (top + axis[y]) + (left + axis[x]);
                        let got = out[c * 64 + y * 8 + x];
                        assert!(
                            (got - want).abs() < 1e-4,
                            "{corner:?} c{c} y{y} x{x}: {got} vs {want}"
                        );
                    }
                }
            }
        }
        // Side 16: the center crop of 14 starts at 1.
        let out = View::Crop(Corner::Center).apply(&ramp(16), 16);
        assert_eq!(Corner::Center.offset(16, 14), (1, 1));
        assert!((out[0] - (10.0 + 1.0)).abs() < 1e-4, "{}", out[0]);
    }

    #[test]
    fn a_crop_of_a_checkerboard_interpolates_between_neighbours() {
        // 2x2 image (crop side 1): every output pixel is the crop's single pixel.
        let img: Vec<f32> = [1.0, 2.0, 3.0, 4.0].repeat(3);
        assert_eq!(View::Crop(Corner::TopLeft).apply(&img, 2), vec![1.0; 12]);
        assert_eq!(
            View::Crop(Corner::BottomRight).apply(&img, 2),
            vec![4.0; 12]
        );
        assert_eq!(View::Crop(Corner::TopRight).apply(&img, 2), vec![2.0; 12]);
    }

    #[test]
    fn the_config_spelling_is_parsed_expanded_and_checked() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_views(&s(&["original"])).expect("ok"),
            vec![View::Original]
        );
        let v = parse_views(&s(&["hflip", "original", "crops:5"])).expect("ok");
        assert_eq!(
            names(&v),
            s(&[
                "original",
                "hflip",
                "crop:tl",
                "crop:tr",
                "crop:bl",
                "crop:br",
                "crop:center"
            ])
        );
        for name in names(&v) {
            assert_eq!(View::from_name(&name).map(|v| v.name()), Some(name));
        }
        assert_eq!(View::from_name("crops:4"), None);
        for (entries, needle) in [
            (s(&["original", "vflip"]), "unknown view `vflip`"),
            (
                s(&["original", "crop:middle"]),
                "unknown view `crop:middle`",
            ),
            (s(&["hflip"]), "must include \"original\""),
            (s(&[]), "must include \"original\""),
            (
                s(&["original", "hflip", "hflip"]),
                "`hflip` is listed twice",
            ),
            (
                s(&["original", "crops:4", "crop:tl"]),
                "`crop:tl` is listed twice",
            ),
            (s(&["original", "original"]), "`original` is listed twice"),
        ] {
            let e = parse_views(&entries).expect_err(needle).to_string();
            assert!(e.contains(KEY) && e.contains(needle), "{e}");
        }
    }

    #[test]
    fn the_original_row_key_is_the_content_hash_and_views_get_derived_keys() {
        let h = "ab".repeat(32);
        assert_eq!(View::Original.row_key(&h), h);
        let k = View::Hflip.row_key(&h);
        assert_eq!(
            k,
            hex(&Sha256::digest(format!("{h}:hflip").as_bytes())),
            "SHA-256 of `<hash>:<view>`"
        );
        assert!(crate::features::store::is_hex(&k, 64));
        assert_ne!(k, View::Crop(Corner::TopLeft).row_key(&h));
    }

    #[test]
    fn mean_over_views_averages_each_rows_probabilities() {
        let per_view = vec![
            vec![vec![0.9, 0.1], vec![0.2, 0.8]],
            vec![vec![0.5, 0.5], vec![0.6, 0.4]],
        ];
        let mean = mean_over_views(&per_view).expect("ok");
        let want = [[0.7, 0.3], [0.4, 0.6]];
        for (m, w) in mean.iter().zip(want) {
            for (a, b) in m.iter().zip(w) {
                assert!((a - b).abs() < 1e-6, "{mean:?}");
            }
        }
        // One view: the probabilities unchanged, bit for bit.
        assert_eq!(mean_over_views(&per_view[..1]).expect("ok"), per_view[0]);
        assert!(mean_over_views(&[]).is_err());
        assert!(mean_over_views(&[vec![vec![1.0]], vec![]]).is_err());
    }

    #[test]
    fn expanded_rows_are_view_major() {
        assert_eq!(expand_rows(&[0, 2], 3, 2), vec![0, 2, 3, 5]);
        assert_eq!(expand_rows(&[1], 3, 1), vec![1]);
    }
}
