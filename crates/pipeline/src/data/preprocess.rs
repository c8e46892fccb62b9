//! Pixels to network input: decode (any colour type to RGB), resize, scale, normalise, CHW.
//!
//! The weights decide the preprocessing: it is read from the safetensors metadata or from a
//! table of known hub weights, and any field can be overridden in `[preprocess]`.
//!
//! Decoding is bounded by [`InputLimits`]: the file is read through
//! [`read_image_file`](crate::data::dataset::read_image_file) (regular files up to
//! `max_file_bytes`), and the header's width x height is checked against `max_image_pixels`
//! before the decoder allocates the pixels (the `image` crate's own limits are set too).

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use image::imageops::FilterType;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::{ChannelOrder, PreprocessConfig, ResizeMode};
use crate::data::dataset::{read_image_file, InputLimits};
use crate::error::{Error, Result};

/// ImageNet statistics on 0..1 pixels, used by torchvision and timm weights.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The complete recipe turning a file into a network input. Recorded in the feature manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    pub input_size: u32,
    /// Pixels are mapped from 0..255 to 0..input_scale before normalising.
    pub input_scale: f32,
    /// In RGB order, in scaled units.
    pub mean: [f32; 3],
    /// In RGB order, in scaled units.
    pub std: [f32; 3],
    pub channel_order: ChannelOrder,
    pub resize: ResizeMode,
}

/// Preprocessing fields, each possibly unknown: what one source (metadata, table, config) says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Partial {
    pub input_size: Option<u32>,
    pub input_scale: Option<f32>,
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
    pub channel_order: Option<ChannelOrder>,
}

impl Partial {
    /// Fields from a safetensors `__metadata__` map (`input_size`, `input_scale`, `mean`, `std`,
    /// `channel_order`; triples written "a,b,c"). A present but unparsable field is an error.
    pub fn from_metadata(meta: &HashMap<String, String>, file: &Path) -> Result<Self> {
        let bad = |key: &str, v: &str| Error::WeightsSource {
            source_name: file.display().to_string(),
            message: format!("metadata `{key}` = `{v}` is not understood"),
        };
        let num = |key: &str| -> Result<Option<f32>> {
            meta.get(key)
                .map(|v| v.trim().parse::<f32>().map_err(|_| bad(key, v)))
                .transpose()
        };
        let triple = |key: &str| -> Result<Option<[f32; 3]>> {
            meta.get(key)
                .map(|v| parse_triple(v).ok_or_else(|| bad(key, v)))
                .transpose()
        };
        let channel_order = meta
            .get("channel_order")
            .map(|v| match v.trim().to_ascii_uppercase().as_str() {
                "RGB" => Ok(ChannelOrder::Rgb),
                "BGR" => Ok(ChannelOrder::Bgr),
                _ => Err(bad("channel_order", v)),
            })
            .transpose()?;
        Ok(Self {
            input_size: num("input_size")?.map(|v| v as u32),
            input_scale: num("input_scale")?,
            mean: triple("mean")?,
            std: triple("std")?,
            channel_order,
        })
    }

    /// The preprocessing of known hub weights, by repository name.
    pub fn known(repo: &str) -> Option<Self> {
        match repo {
            "timm/vgg16.tv_in1k" | "timm/vgg16_bn.tv_in1k" => Some(Self {
                input_size: Some(224),
                input_scale: Some(1.0),
                mean: Some(IMAGENET_MEAN),
                std: Some(IMAGENET_STD),
                channel_order: Some(ChannelOrder::Rgb),
            }),
            _ => None,
        }
    }

    /// The `[preprocess]` overrides.
    pub fn from_config(c: &PreprocessConfig) -> Self {
        Self {
            input_size: c.input_size,
            input_scale: c.input_scale,
            mean: c.mean,
            std: c.std,
            channel_order: c.channel_order,
        }
    }

    /// Fills the fields `self` lacks from `other`.
    pub fn or(self, other: Self) -> Self {
        Self {
            input_size: self.input_size.or(other.input_size),
            input_scale: self.input_scale.or(other.input_scale),
            mean: self.mean.or(other.mean),
            std: self.std.or(other.std),
            channel_order: self.channel_order.or(other.channel_order),
        }
    }

    /// The full recipe, or an error naming the first field nobody set.
    pub fn complete(self, resize: ResizeMode, weights: &str) -> Result<Preprocessing> {
        let missing = |field: &str| Error::WeightsSource {
            source_name: weights.to_string(),
            message: format!(
                "the weights do not say their `{field}`; set `preprocess.{field}` in the config"
            ),
        };
        Ok(Preprocessing {
            input_size: self.input_size.ok_or_else(|| missing("input_size"))?,
            input_scale: self.input_scale.ok_or_else(|| missing("input_scale"))?,
            mean: self.mean.ok_or_else(|| missing("mean"))?,
            std: self.std.ok_or_else(|| missing("std"))?,
            channel_order: self.channel_order.ok_or_else(|| missing("channel_order"))?,
            resize,
        })
    }
}

fn parse_triple(v: &str) -> Option<[f32; 3]> {
    let parts: Vec<f32> = v
        .trim_matches(|c| c == '[' || c == ']' || c == '(' || c == ')')
        .split(',')
        .map(|p| p.trim().parse().ok())
        .collect::<Option<_>>()?;
    parts.try_into().ok()
}

impl Preprocessing {
    /// Values per image: 3 x size x size.
    pub fn len(&self) -> usize {
        3 * (self.input_size as usize).pow(2)
    }

    /// Whether an image has no values (an input size of 0).
    pub fn is_empty(&self) -> bool {
        self.input_size == 0
    }

    /// Decodes, resizes and normalises one image file into CHW floats, with the default
    /// [`InputLimits`].
    pub fn load(&self, path: &Path) -> Result<Vec<f32>> {
        self.load_within(path, &InputLimits::default())
    }

    /// Decodes, resizes and normalises one image file into CHW floats; a file that cannot be
    /// read or decoded, or is beyond `limits`, is [`Error::BadImage`] naming it.
    pub fn load_within(&self, path: &Path, limits: &InputLimits) -> Result<Vec<f32>> {
        let bytes = read_image_file(path, limits)?;
        let img = decode_within(path, &bytes, limits)?;
        // The `image` crate's resize (squash) first resizes the height, holding a
        // width x input_size intermediate of 16 bytes per pixel: bound it like a decoded image,
        // so a 60000000x1 strip cannot take hundreds of GB.
        let (w, size) = (img.width() as u64, self.input_size as u64);
        if self.resize == ResizeMode::Squash && w * size > limits.max_image_pixels {
            return Err(Error::BadImage {
                path: path.to_owned(),
                message: format!(
                    "{}x{} pixels: squashing it to {size}x{size} needs a {w}x{size} intermediate, \
                     above `data.max_image_pixels` = {}",
                    img.width(),
                    img.height(),
                    limits.max_image_pixels
                ),
            });
        }
        Ok(self.apply(&img))
    }

    /// Resizes and normalises a decoded image (any colour type) into CHW floats.
    pub fn apply(&self, img: &image::DynamicImage) -> Vec<f32> {
        let size = self.input_size;
        let rgb = img.to_rgb8();
        let rgb = match self.resize {
            ResizeMode::Squash if rgb.dimensions() == (size, size) => rgb,
            ResizeMode::Squash => image::imageops::resize(&rgb, size, size, FilterType::Triangle),
            ResizeMode::CenterCrop => center_crop(&rgb, size),
        };
        let plane = (size * size) as usize;
        let mut out = vec![0f32; 3 * plane];
        let src_channel = match self.channel_order {
            ChannelOrder::Rgb => [0, 1, 2],
            ChannelOrder::Bgr => [2, 1, 0],
        };
        let scale = self.input_scale / 255.0;
        for (c, &src) in src_channel.iter().enumerate() {
            let (m, s) = (self.mean[src], self.std[src]);
            let dst = &mut out[c * plane..(c + 1) * plane];
            for (d, p) in dst.iter_mut().zip(rgb.pixels()) {
                *d = (p.0[src] as f32 * scale - m) / s;
            }
        }
        out
    }

    /// Loads many images in parallel with the default [`InputLimits`], each result naming its
    /// file on failure.
    pub fn load_many(&self, paths: &[&Path]) -> Vec<Result<Vec<f32>>> {
        self.load_many_within(paths, &InputLimits::default())
    }

    /// Loads many images in parallel within `limits`, each result naming its file on failure.
    pub fn load_many_within(&self, paths: &[&Path], limits: &InputLimits) -> Vec<Result<Vec<f32>>> {
        paths
            .par_iter()
            .map(|p| self.load_within(p, limits))
            .collect()
    }
}

/// The ImageNet evaluation recipe as PIL computes it: the short side resized to
/// `round(size / 0.875)` (256 for 224), the long side to the same scale rounded to the nearest
/// integer (ties to even, as Python's `round`), bilinear with PIL's antialiasing, then the
/// centre `size x size` (offsets rounded down). Only the cropped window is computed, so memory
/// stays near `size x short side` whatever the aspect ratio.
fn center_crop(rgb: &image::RgbImage, size: u32) -> image::RgbImage {
    let short = (size as f64 / 0.875).round() as u64;
    let (w, h) = (rgb.width() as u64, rgb.height() as u64);
    if w == 0 || h == 0 {
        return image::RgbImage::new(size, size);
    }
    let (nw, nh) = if w <= h {
        (short, scaled_rounded(h, short, w))
    } else {
        (scaled_rounded(w, short, h), short)
    };
    let size64 = size as u64;
    let window = Window {
        x0: (nw - size64) / 2,
        y0: (nh - size64) / 2,
        width: size64,
        height: size64,
    };
    resize_window_bilinear(rgb, nw, nh, &window)
}

/// `round(value * num / den)`, ties to even, in exact integer arithmetic.
fn scaled_rounded(value: u64, num: u64, den: u64) -> u64 {
    let product = value as u128 * num as u128;
    let (q, r) = (product / den as u128, product % den as u128);
    let up = match (2 * r).cmp(&(den as u128)) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Equal => q % 2 == 1,
        std::cmp::Ordering::Less => false,
    };
    (q + u128::from(up)) as u64
}

/// The part of a resized image to compute.
struct Window {
    x0: u64,
    y0: u64,
    width: u64,
    height: u64,
}

/// Bits of fraction of PIL's fixed-point 8-bit resampling weights (`PRECISION_BITS`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The input pixels and fixed-point weights making one output pixel along one axis.
struct Taps {
    first: usize,
    weights: Vec<i64>,
}

/// PIL's bilinear weights (`precompute_coeffs` and `normalize_coeffs_8bpc` in Pillow's
/// `Resample.c`) for the output positions `from..from + count` of an `input` -> `output`
/// resize along one axis: the triangle filter, widened by the scale when shrinking
/// (antialiasing), normalised, then rounded to `PRECISION_BITS` fixed point.
fn bilinear_taps(input: u64, output: u64, from: u64, count: u64) -> Vec<Taps> {
    let scale = input as f64 / output as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale; // the triangle's support is 1
                                // Multiplying by the reciprocal, not dividing, as PIL does: the last bits can differ.
    let inverse = 1.0 / filter_scale;
    (from..from + count)
        .map(|out| {
            let center = (out as f64 + 0.5) * scale;
            // C's `(int)` truncation, then the clamps PIL applies.
            let first = ((center - support + 0.5) as i64).max(0);
            let end = ((center + support + 0.5) as i64).min(input as i64);
            let raw: Vec<f64> = (first..end)
                .map(|i| (1.0 - ((i as f64 - center + 0.5) * inverse).abs()).max(0.0))
                .collect();
            let sum: f64 = raw.iter().sum();
            let one = (1i64 << PRECISION_BITS) as f64;
            let weights = raw
                .iter()
                .map(|&k| {
                    let k = if sum != 0.0 { k / sum } else { k };
                    // The weights are never negative for the triangle filter.
                    (0.5 + k * one) as i64
                })
                .collect();
            Taps {
                first: first as usize,
                weights,
            }
        })
        .collect()
}

/// A fixed-point sum back to 8 bits, as PIL's `clip8`.
fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The `window` of `rgb` resized to `out_w x out_h` with PIL's bilinear resampling: the
/// horizontal pass first, rounded to 8 bits, then the vertical pass, as Pillow's
/// `ImagingResample` does, so the values are Pillow's. The horizontal pass covers only the
/// rows the window's vertical taps read.
fn resize_window_bilinear(
    rgb: &image::RgbImage,
    out_w: u64,
    out_h: u64,
    window: &Window,
) -> image::RgbImage {
    let (w, h) = (rgb.width() as u64, rgb.height() as u64);
    let columns = bilinear_taps(w, out_w, window.x0, window.width);
    let rows = bilinear_taps(h, out_h, window.y0, window.height);
    let first_row = rows.iter().map(|t| t.first).min().unwrap_or(0);
    let end_row = rows
        .iter()
        .map(|t| t.first + t.weights.len())
        .max()
        .unwrap_or(first_row);
    let (src, w) = (rgb.as_raw(), w as usize);
    let width = window.width as usize;
    let half = 1i64 << (PRECISION_BITS - 1);
    let mut tmp = vec![0u8; (end_row - first_row) * width * 3];
    for (y, line) in (first_row..end_row).zip(tmp.chunks_exact_mut(width * 3)) {
        let src_line = &src[y * w * 3..(y + 1) * w * 3];
        for (t, px) in columns.iter().zip(line.chunks_exact_mut(3)) {
            for (c, v) in px.iter_mut().enumerate() {
                let mut sum = half;
                for (k, &weight) in t.weights.iter().enumerate() {
                    sum += src_line[(t.first + k) * 3 + c] as i64 * weight;
                }
                *v = clip8(sum);
            }
        }
    }
    let mut out = image::RgbImage::new(window.width as u32, window.height as u32);
    for (t, line) in rows.iter().zip(out.chunks_exact_mut(width * 3)) {
        for (x, px) in line.chunks_exact_mut(3).enumerate() {
            for (c, v) in px.iter_mut().enumerate() {
                let mut sum = half;
                for (k, &weight) in t.weights.iter().enumerate() {
                    let row = t.first - first_row + k;
                    sum += tmp[(row * width + x) * 3 + c] as i64 * weight;
                }
                *v = clip8(sum);
            }
        }
    }
    out
}

/// Bytes per pixel the `image` crate may allocate while decoding: 8 for the output (RGBA with 16
/// bits per channel, the widest JPEG or PNG gives) and as much again for a decoder's buffers.
const MAX_BYTES_PER_PIXEL: u64 = 16;

/// The error for an image whose header announces more pixels than allowed.
fn too_many_pixels(path: &Path, width: u32, height: u32, limits: &InputLimits) -> Error {
    Error::BadImage {
        path: path.to_owned(),
        message: format!(
            "{width}x{height} pixels ({} in all) is above `data.max_image_pixels` = {}",
            width as u64 * height as u64,
            limits.max_image_pixels
        ),
    }
}

/// A reader of `bytes` with its format guessed from the content, allowed to allocate what
/// `max_image_pixels` pixels need (but with no width or height limit, so that the header can
/// be read and [`too_many_pixels`] give the message).
fn reader<'a>(
    path: &Path,
    bytes: &'a [u8],
    limits: &InputLimits,
) -> Result<image::ImageReader<Cursor<&'a [u8]>>> {
    let mut reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::BadImage {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    let mut l = image::Limits::default();
    l.max_alloc = Some(limits.max_image_pixels.saturating_mul(MAX_BYTES_PER_PIXEL));
    reader.limits(l);
    Ok(reader)
}

/// Checks the pixel count an image's header announces against `max_image_pixels`. A file whose
/// header cannot be read passes: decoding will report it.
pub fn check_pixels(path: &Path, bytes: &[u8], limits: &InputLimits) -> Result<()> {
    let Ok(reader) = reader(path, bytes, limits) else {
        return Ok(());
    };
    match reader.into_dimensions() {
        Ok((w, h)) if w as u64 * h as u64 > limits.max_image_pixels => {
            Err(too_many_pixels(path, w, h, limits))
        }
        _ => Ok(()),
    }
}

/// Decodes an image file's bytes (format from the content) within `limits`: the header's
/// width x height is checked before any pixel memory is allocated, and the `image` crate's
/// limits (width, height, allocation) are set from `max_image_pixels` as a second guard.
pub fn decode_within(
    path: &Path,
    bytes: &[u8],
    limits: &InputLimits,
) -> Result<image::DynamicImage> {
    use image::ImageDecoder;
    let bad = |e: image::ImageError| Error::BadImage {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let mut decoder = reader(path, bytes, limits)?.into_decoder().map_err(bad)?;
    let (w, h) = decoder.dimensions();
    if w as u64 * h as u64 > limits.max_image_pixels {
        return Err(too_many_pixels(path, w, h, limits));
    }
    let side = u32::try_from(limits.max_image_pixels).unwrap_or(u32::MAX);
    let mut l = image::Limits::default();
    l.max_image_width = Some(side);
    l.max_image_height = Some(side);
    l.max_alloc = Some(limits.max_image_pixels.saturating_mul(MAX_BYTES_PER_PIXEL));
    decoder.set_limits(l).map_err(bad)?;
    image::DynamicImage::from_decoder(decoder).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vgg_oxford() -> Preprocessing {
        Preprocessing {
            input_size: 2,
            input_scale: 255.0,
            mean: [123.68, 116.779, 103.939],
            std: [1.0, 1.0, 1.0],
            channel_order: ChannelOrder::Rgb,
            resize: ResizeMode::Squash,
        }
    }

    #[test]
    fn normalises_known_pixels_in_chw_order() {
        let mut img = image::RgbImage::new(2, 2);
        img.put_pixel(1, 0, image::Rgb([255, 0, 10]));
        let out = vgg_oxford().apply(&image::DynamicImage::ImageRgb8(img));
        assert_eq!(out.len(), 12);
        // channel 0 (R), pixel (x=1, y=0) is index 1
        assert!((out[1] - (255.0 - 123.68)).abs() < 1e-4);
        assert!((out[0] + 123.68).abs() < 1e-4);
        // channel 2 (B) plane starts at 8
        assert!((out[9] - (10.0 - 103.939)).abs() < 1e-4);
    }

    #[test]
    fn bgr_swaps_channels_and_their_statistics() {
        let mut p = vgg_oxford();
        p.channel_order = ChannelOrder::Bgr;
        let img = image::RgbImage::from_pixel(2, 2, image::Rgb([200, 100, 50]));
        let out = p.apply(&image::DynamicImage::ImageRgb8(img));
        assert!((out[0] - (50.0 - 103.939)).abs() < 1e-4);
        assert!((out[8] - (200.0 - 123.68)).abs() < 1e-4);
    }

    #[test]
    fn imagenet_scaling_on_unit_pixels() {
        let p = Preprocessing {
            input_scale: 1.0,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            ..vgg_oxford()
        };
        let img = image::RgbImage::from_pixel(2, 2, image::Rgb([255, 255, 255]));
        let out = p.apply(&image::DynamicImage::ImageRgb8(img));
        assert!((out[0] - (1.0 - 0.485) / 0.229).abs() < 1e-5);
    }

    #[test]
    fn grayscale_and_alpha_become_rgb_and_size_is_forced() {
        let p = Preprocessing {
            input_size: 4,
            ..vgg_oxford()
        };
        let gray =
            image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(7, 3, image::Luma([9])));
        assert_eq!(p.apply(&gray).len(), 48);
        let rgba = image::DynamicImage::ImageRgba8(image::RgbaImage::new(9, 9));
        assert_eq!(p.apply(&rgba).len(), 48);
        let crop = Preprocessing {
            resize: ResizeMode::CenterCrop,
            ..p
        };
        assert_eq!(crop.apply(&gray).len(), 48);
    }

    #[test]
    fn images_above_the_pixel_limit_are_bad_before_decoding() {
        let dir = std::env::temp_dir().join(format!("pipeline-pp-px-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let small = dir.join("eleven-by-ten.png");
        image::RgbImage::from_pixel(11, 10, image::Rgb([1, 2, 3]))
            .save(&small)
            .expect("png");
        let at = InputLimits {
            max_image_pixels: 110,
            ..InputLimits::default()
        };
        assert_eq!(
            vgg_oxford()
                .load_within(&small, &at)
                .expect("110 pixels")
                .len(),
            12
        );
        let below = InputLimits {
            max_image_pixels: 109,
            ..at
        };
        let err = vgg_oxford()
            .load_within(&small, &below)
            .expect_err("111 > 109");
        let text = err.to_string();
        assert!(
            matches!(err, Error::BadImage { .. })
                && text.contains("eleven-by-ten.png")
                && text.contains("11x10")
                && text.contains("max_image_pixels"),
            "{text}"
        );
        let bytes = std::fs::read(&small).expect("read");
        assert!(check_pixels(&small, &bytes, &at).is_ok());
        assert!(check_pixels(&small, &bytes, &below).is_err());
        // A header claiming 60000x60000 (10.8 GB as RGB) is refused from the header alone,
        // with the default limits.
        let huge = dir.join("claims-huge.png");
        std::fs::write(&huge, testkit::png_claiming(60_000, 60_000)).expect("write");
        let err = vgg_oxford().load(&huge).expect_err("huge").to_string();
        assert!(
            err.contains("60000x60000") && err.contains("max_image_pixels"),
            "{err}"
        );
        // Undecodable bytes pass the header check (decoding reports them).
        assert!(check_pixels(&huge, b"not an image", &at).is_ok());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn long_side_rounds_to_nearest_with_ties_to_even() {
        assert_eq!(scaled_rounded(451, 256, 300), 385); // 384.85
        assert_eq!(scaled_rounded(600, 256, 400), 384); // exact
        assert_eq!(scaled_rounded(3, 5, 2), 8); // 7.5 -> 8
        assert_eq!(scaled_rounded(5, 5, 2), 12); // 12.5 -> 12
        assert_eq!(scaled_rounded(1, 2, 3), 1); // 0.67
    }

    #[test]
    fn center_crop_keeps_flat_colours_and_bounds_memory_for_any_aspect() {
        let p = Preprocessing {
            input_size: 224,
            resize: ResizeMode::CenterCrop,
            ..vgg_oxford()
        };
        // A 224x224 image is enlarged to 256 and cropped, not passed through: the corner
        // pixel of the result comes from inside the image.
        let img = image::RgbImage::from_fn(224, 224, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let out = p.apply(&image::DynamicImage::ImageRgb8(img));
        let corner = out[0] + 123.68;
        assert!((12.0..=16.0).contains(&corner), "corner red {corner}");
        // A flat colour stays exactly that colour (the fixed-point weights sum to one).
        let flat = image::RgbImage::from_pixel(451, 300, image::Rgb([200, 17, 255]));
        let out = p.apply(&image::DynamicImage::ImageRgb8(flat));
        assert!(out[..224 * 224]
            .iter()
            .all(|v| (v - (200.0 - 123.68)).abs() < 1e-4));
        assert!(out[2 * 224 * 224..]
            .iter()
            .all(|v| (v - (255.0 - 103.939)).abs() < 1e-4));
        // A 1x60000 strip would be 256 x 15.36 million pixels resized in full; only the
        // 224x224 window is computed.
        let strip = image::RgbImage::from_pixel(1, 60_000, image::Rgb([9, 9, 9]));
        let out = p.apply(&image::DynamicImage::ImageRgb8(strip));
        assert_eq!(out.len(), 3 * 224 * 224);
        assert!((out[0] - (9.0 - 123.68)).abs() < 1e-4);
    }

    #[test]
    fn squash_refuses_an_intermediate_beyond_the_pixel_limit() {
        let dir = std::env::temp_dir().join(format!("pipeline-pp-strip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let strip = dir.join("strip.png");
        image::RgbImage::from_pixel(50, 2, image::Rgb([1, 2, 3]))
            .save(&strip)
            .expect("png");
        let limits = InputLimits {
            max_image_pixels: 100,
            ..InputLimits::default()
        };
        let squash = Preprocessing {
            input_size: 4,
            ..vgg_oxford()
        };
        // 50 x 4 = 200 intermediate pixels > 100.
        let err = squash
            .load_within(&strip, &limits)
            .expect_err("intermediate too big")
            .to_string();
        assert!(err.contains("strip.png") && err.contains("50x4"), "{err}");
        let crop = Preprocessing {
            resize: ResizeMode::CenterCrop,
            ..squash
        };
        assert_eq!(
            crop.load_within(&strip, &limits).expect("windowed").len(),
            48
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn metadata_is_parsed_and_overrides_win() {
        let meta: HashMap<String, String> = [
            ("input_size", "224"),
            ("input_scale", "255"),
            ("mean", "123.68,116.779,103.939"),
            ("std", "1,1,1"),
            ("channel_order", "RGB"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let from_file = Partial::from_metadata(&meta, Path::new("w")).expect("parses");
        assert_eq!(from_file.mean, Some([123.68, 116.779, 103.939]));
        let over = Partial {
            input_size: Some(112),
            ..Partial::default()
        };
        let p = over
            .or(from_file)
            .complete(ResizeMode::Squash, "w")
            .expect("complete");
        assert_eq!(p.input_size, 112);
        assert_eq!(p.input_scale, 255.0);
        let err = Partial::default()
            .complete(ResizeMode::Squash, "w")
            .expect_err("missing");
        assert!(err.to_string().contains("input_size"));
        let mut bad = meta.clone();
        bad.insert("mean".into(), "1,2".into());
        assert!(Partial::from_metadata(&bad, Path::new("w")).is_err());
    }
}
