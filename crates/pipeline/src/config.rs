//! `pipeline.toml`: the only place the pipeline reads its settings from.
//!
//! Loading is two steps: the file is parsed into a TOML table, `--set section.key=value`
//! overrides are applied on top of it (command line wins over file), then the table is
//! deserialised into [`Config`] with every unknown key reported by its full name. Relative
//! paths are resolved against the directory holding the config file, whichever of the two
//! they came from, so a run behaves the same from any working directory.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// The whole configuration. Every section and key has a default.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    pub data: DataConfig,
    pub backbone: BackboneConfig,
    pub preprocess: PreprocessConfig,
    pub extract: ExtractConfig,
    pub split: SplitConfig,
    pub head: HeadConfig,
    pub cnn: CnnConfig,
    pub output: OutputConfig,
    pub predict: PredictConfig,
}

/// Where the labelled images are: a CSV plus an image folder, or one folder per class.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct DataConfig {
    /// Label file (CSV with a header). Default: none.
    pub csv: Option<PathBuf>,
    /// Folder the CSV's image names are relative to. Default: none.
    pub images: Option<PathBuf>,
    /// Column of the CSV holding image file names. Default: "image".
    pub image_column: String,
    /// Column of the CSV holding labels (integers or strings). Default: "label".
    pub label_column: String,
    /// A class-per-folder dataset (`root/<class>/*.jpg`), instead of `csv` + `images`.
    pub root: Option<PathBuf>,
    /// Use only the first N rows (smoke runs). Default: all rows.
    pub limit: Option<usize>,
    /// The known classes, in index order. Default: discovered from the labels.
    pub classes: Option<Vec<String>>,
    /// What one unreadable image does to a run. Default: error.
    pub on_bad_image: OnBadImage,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            csv: None,
            images: None,
            image_column: "image".into(),
            label_column: "label".into(),
            root: None,
            limit: None,
            classes: None,
            on_bad_image: OnBadImage::Error,
        }
    }
}

/// What to do with an image that is missing or cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadImage {
    /// Stop the run with an error naming the image.
    Error,
    /// Leave the image out and list it in the manifest.
    Skip,
}

/// The frozen feature extractor.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct BackboneConfig {
    /// Architecture. Default: vgg16.
    pub name: BackboneName,
    /// A local `.safetensors` path, or `hf:<repo>` for the Hugging Face hub.
    pub weights: String,
}

impl Default for BackboneConfig {
    fn default() -> Self {
        Self {
            name: BackboneName::Vgg16,
            weights: "hf:timm/vgg16.tv_in1k".into(),
        }
    }
}

/// The backbones the pipeline can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackboneName {
    Vgg16,
}

/// Overrides of the preprocessing that the weights ask for. Unset keys come from the weights'
/// metadata, or from the table of known hub weights.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct PreprocessConfig {
    /// Side of the square network input, in pixels.
    pub input_size: Option<u32>,
    /// Pixels are scaled from 0..255 to 0..input_scale before the mean is subtracted.
    pub input_scale: Option<f32>,
    /// Per-channel mean, in the scaled units, in RGB order.
    pub mean: Option<[f32; 3]>,
    /// Per-channel standard deviation, in the scaled units, in RGB order.
    pub std: Option<[f32; 3]>,
    /// Channel order the network expects.
    pub channel_order: Option<ChannelOrder>,
    /// How an image is brought to the input size. Default: squash.
    pub resize: ResizeMode,
}

/// Channel order of the network input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

/// How images are brought to the network's square input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeMode {
    /// Resize straight to size x size (bilinear); no pixel is lost, the aspect may change.
    #[default]
    Squash,
    /// Resize the short side to size / 0.875, then crop the centre (the ImageNet evaluation
    /// recipe).
    CenterCrop,
}

/// Feature extraction settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ExtractConfig {
    /// Images per forward pass, and rows per cache shard. Default: 128.
    pub batch_size: usize,
    /// "auto", "cpu" or "cuda:N". Default: auto.
    pub device: String,
    /// Cache directory. Default: "features".
    pub out: PathBuf,
    /// Data type of the cached features. Default: f32.
    pub dtype: FeatureDType,
    /// Convolution algorithm of the CPU f32 engine. Default: winograd2x2.
    pub conv: ConvAlgorithm,
    /// Arithmetic of the backbone's forward pass. Default: f32.
    pub compute: ComputePrecision,
    /// Largest im2col buffer, in MiB, one convolution of the candle (GPU) engine may allocate:
    /// the batch is cut into slices that fit. Default: 1024.
    pub conv_workspace_mb: usize,
    /// Seconds to wait for the store's lock when another process holds it, then fail.
    /// Default: wait as long as it takes.
    pub lock_timeout: Option<u64>,
}

impl ExtractConfig {
    /// `lock_timeout` as a duration (`None`: wait for ever).
    pub fn lock_wait(&self) -> Option<std::time::Duration> {
        self.lock_timeout.map(std::time::Duration::from_secs)
    }
}

impl Default for ExtractConfig {
    fn default() -> Self {
        Self {
            batch_size: 128,
            device: "auto".into(),
            out: "features".into(),
            dtype: FeatureDType::F32,
            conv: ConvAlgorithm::Winograd2x2,
            compute: ComputePrecision::F32,
            conv_workspace_mb: 1024,
            lock_timeout: None,
        }
    }
}

/// The arithmetic of the backbone's forward pass, whatever the stored `dtype`. Part of the
/// cache key: reduced precision changes the features (cosine >= 0.999 of f32's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputePrecision {
    /// IEEE f32 everywhere (on CUDA with TF32 tensor-core GEMMs off).
    #[default]
    F32,
    /// f32 tensors with TF32 GEMMs (CUDA only; ~1e-3 relative error, several times faster).
    Tf32,
    /// f16 weights and activations (CUDA only).
    F16,
    /// bf16 weights and activations (CUDA; on the CPU, bf16 rounding with f32 accumulation).
    Bf16,
}

impl ComputePrecision {
    /// The candle dtype of weights and activations.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 | Self::Tf32 => candle_core::DType::F32,
            Self::F16 => candle_core::DType::F16,
            Self::Bf16 => candle_core::DType::BF16,
        }
    }

    /// The config spelling ("f32", "tf32", "f16", "bf16").
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Tf32 => "tf32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }
}

/// How the CPU f32 engine computes VGG16's 3x3 convolutions (`crates/fastconv`). All three
/// reproduce the reference pool5 features within 1e-5 relative (`crates/fastconv/tests/parity.rs`);
/// see BENCHMARKS.md for speed and measured error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvAlgorithm {
    /// The direct sum of the 9 taps (the exact path).
    Direct,
    /// Winograd F(2x2, 3x3): 2.25x fewer multiplications, error like the direct path's.
    Winograd2x2,
    /// Winograd F(4x4, 3x3): 4x fewer multiplications, ~5e-6 relative error on the features.
    Winograd4x4,
}

impl ConvAlgorithm {
    /// The fastconv algorithm.
    pub fn to_fastconv(self) -> fastconv::Algorithm {
        match self {
            Self::Direct => fastconv::Algorithm::Direct,
            Self::Winograd2x2 => fastconv::Algorithm::Winograd(fastconv::Tile::F2x2),
            Self::Winograd4x4 => fastconv::Algorithm::Winograd(fastconv::Tile::F4x4),
        }
    }
}

/// Storage type of cached features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureDType {
    F32,
    F16,
    Bf16,
}

impl FeatureDType {
    /// The candle dtype.
    pub fn to_candle(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::F16 => candle_core::DType::F16,
            Self::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// The train/validation split shared by every model.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct SplitConfig {
    /// Fraction of each class held out for validation. Default: 0.1.
    pub val_fraction: f64,
    /// Seed of the split, the shuffles and the initial weights. Default: 13.
    pub seed: u64,
    /// Keep byte-identical images on one side of the split. Default: true.
    pub group_duplicates: bool,
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self {
            val_fraction: 0.1,
            seed: 13,
            group_duplicates: true,
        }
    }
}

/// The classifier trained on cached features.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct HeadConfig {
    /// "linear" or "mlp". Default: linear.
    pub kind: HeadKind,
    /// Adam learning rate. Default: 0.0005.
    pub lr: f64,
    /// Default: 30.
    pub epochs: usize,
    /// Default: 128.
    pub batch_size: usize,
    /// Dropout of the mlp head. Default: 0.5.
    pub dropout: f32,
    /// Stop after this many epochs without a lower validation loss. Default: never.
    pub early_stopping: Option<usize>,
    /// Learning-rate schedule. Default: constant.
    pub schedule: Schedule,
    /// Epochs between decays of the step schedule. Default: 10.
    pub step_size: usize,
    /// Factor of the step schedule. Default: 0.1.
    pub gamma: f64,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            kind: HeadKind::Linear,
            lr: 0.0005,
            epochs: 30,
            batch_size: 128,
            dropout: 0.5,
            early_stopping: None,
            schedule: Schedule::Constant,
            step_size: 10,
            gamma: 0.1,
        }
    }
}

/// Shapes of the feature head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// features -> classes.
    Linear,
    /// The VGG classifier: features -> 4096 -> 4096 -> classes, ReLU and dropout.
    Mlp,
}

/// Learning-rate schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    /// Multiply by `gamma` every `step_size` epochs.
    Step,
    /// Cosine from lr to 0 over the epochs.
    Cosine,
}

/// The from-scratch CNN baseline.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct CnnConfig {
    /// Output channels of each conv block; the length is the depth. Default: [4, 4].
    pub channels: Vec<usize>,
    /// Adam learning rate. Default: 0.0001.
    pub lr: f64,
    /// Default: 15.
    pub epochs: usize,
    /// Default: 128.
    pub batch_size: usize,
    /// Side of the square input. Default: 224.
    pub input_size: u32,
    /// Stop after this many epochs without a lower validation loss. Default: never.
    pub early_stopping: Option<usize>,
}

impl Default for CnnConfig {
    fn default() -> Self {
        Self {
            channels: vec![4, 4],
            lr: 0.0001,
            epochs: 15,
            batch_size: 128,
            input_size: 224,
            early_stopping: None,
        }
    }
}

/// Where training runs are written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct OutputConfig {
    /// Parent of every run directory. Default: "runs".
    pub runs: PathBuf,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            runs: "runs".into(),
        }
    }
}

/// Labelling new images.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct PredictConfig {
    /// A CSV of image names (resolved against `[data] images`) or an image folder.
    pub input: Option<PathBuf>,
    /// Output CSV. Default: "predictions.csv".
    pub output: Option<PathBuf>,
    /// A head run directory. Default: the most recent head run under `[output] runs`.
    pub run: Option<PathBuf>,
}

impl Config {
    /// Reads `path`, applies `overrides`
    /// (`section.key=value`, value in TOML syntax or a bare string), validates, and makes every
    /// path absolute and canonical: relative ones are resolved against the config file's
    /// (canonical) directory, symbolic links and `.`/`..` are resolved, so the same file is
    /// spelled the same way whatever the working directory or the spelling in the config.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).at(path)?;
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Config {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        for item in overrides {
            apply_override(&mut table, item)?;
        }
        let mut config = Self::from_table(table, path)?;
        config.validate()?;
        let file = std::fs::canonicalize(path).at(path)?;
        let base = file.parent().unwrap_or(Path::new("/"));
        config.resolve_paths(base);
        Ok(config)
    }

    /// Deserialises a table, naming any unknown key and the key of any ill-typed value.
    pub fn from_table(table: toml::Table, path: &Path) -> Result<Self> {
        let mut unknown = Vec::new();
        let mut record = |p: serde_ignored::Path| unknown.push(p.to_string());
        let de = serde_ignored::Deserializer::new(toml::Value::Table(table), &mut record);
        let parsed: std::result::Result<Config, _> = serde_path_to_error::deserialize(de);
        if let Some(key) = unknown.into_iter().next() {
            return Err(Error::UnknownKey {
                path: path.to_owned(),
                key,
            });
        }
        parsed.map_err(|e| Error::Config {
            path: path.to_owned(),
            message: format!("key `{}`: {}", e.path(), e.inner()),
        })
    }

    /// Checks values that have the right type but an unusable value.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, message: &str| {
            Err(Error::InvalidValue {
                key: key.into(),
                message: message.into(),
            })
        };
        let d = &self.data;
        match (&d.csv, &d.images, &d.root) {
            (Some(_), Some(_), None) | (None, None, Some(_)) => {}
            (Some(_), None, None) => return bad("data.images", "`data.csv` needs `data.images`"),
            (None, Some(_), None) => return bad("data.csv", "`data.images` needs `data.csv`"),
            (None, None, None) => {
                return bad(
                    "data",
                    "set either `csv` and `images`, or `root` (a folder per class)",
                )
            }
            _ => {
                return bad(
                    "data.root",
                    "set either `csv` and `images`, or `root`, not both",
                )
            }
        }
        if d.limit == Some(0) {
            return bad(
                "data.limit",
                "must be at least 1 (leave it out for all rows)",
            );
        }
        if self.extract.batch_size == 0 {
            return bad("extract.batch_size", "must be at least 1");
        }
        if self.extract.batch_size > crate::store::shard::MAX_SHARD_ROWS {
            return bad(
                "extract.batch_size",
                &format!(
                    "must be at most {} (rows per store shard)",
                    crate::store::shard::MAX_SHARD_ROWS
                ),
            );
        }
        if self.extract.conv_workspace_mb == 0 {
            return bad("extract.conv_workspace_mb", "must be at least 1");
        }
        crate::device::DeviceChoice::parse(&self.extract.device)?;
        let v = self.split.val_fraction;
        if v.is_nan() || v <= 0.0 || v >= 1.0 {
            return bad("split.val_fraction", "must be between 0 and 1 (exclusive)");
        }
        if self.head.batch_size == 0 || self.cnn.batch_size == 0 {
            return bad("head.batch_size / cnn.batch_size", "must be at least 1");
        }
        if self.head.lr.is_nan()
            || self.head.lr <= 0.0
            || self.cnn.lr.is_nan()
            || self.cnn.lr <= 0.0
        {
            return bad("head.lr / cnn.lr", "must be positive");
        }
        if !(0.0..1.0).contains(&self.head.dropout) {
            return bad("head.dropout", "must be in [0, 1)");
        }
        if self.cnn.channels.is_empty() || self.cnn.channels.contains(&0) {
            return bad(
                "cnn.channels",
                "needs at least one block, each of 1+ channels",
            );
        }
        let pools = 1u32 << self.cnn.channels.len();
        if !self.cnn.input_size.is_multiple_of(pools) {
            return bad(
                "cnn.input_size",
                &format!("must be divisible by {pools} (one 2x2 pool per block)"),
            );
        }
        if let Some(s) = self.preprocess.std {
            if s.contains(&0.0) {
                return bad("preprocess.std", "must not contain 0");
            }
        }
        Ok(())
    }

    /// Makes every path absolute (relative ones against `base`) and canonical.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            *p = canonical(&base.join(&*p));
        };
        let d = &mut self.data;
        for p in [&mut d.csv, &mut d.images, &mut d.root]
            .into_iter()
            .flatten()
        {
            fix(p);
        }
        if !self.backbone.weights.starts_with("hf:") {
            let mut w = PathBuf::from(&self.backbone.weights);
            fix(&mut w);
            self.backbone.weights = w.to_string_lossy().into_owned();
        }
        fix(&mut self.extract.out);
        fix(&mut self.output.runs);
        let p = &mut self.predict;
        for p in [&mut p.input, &mut p.output, &mut p.run]
            .into_iter()
            .flatten()
        {
            fix(p);
        }
    }
}

/// The canonical spelling of an absolute path that may not exist yet: its longest existing
/// ancestor is canonicalised (symbolic links resolved), the rest appended with `.` dropped
/// and `..` applied lexically.
pub fn canonical(path: &Path) -> PathBuf {
    use std::path::Component;
    let parts: Vec<Component> = path.components().collect();
    for keep in (1..=parts.len()).rev() {
        let head: PathBuf = parts[..keep].iter().collect();
        if let Ok(mut out) = std::fs::canonicalize(&head) {
            for c in &parts[keep..] {
                match c {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::Normal(n) => out.push(n),
                    _ => {}
                }
            }
            return out;
        }
    }
    // Nothing of it exists (not even the root): lexical clean-up only.
    let mut out = PathBuf::new();
    for c in parts {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// Applies one `section.key=value` override to the table.
fn apply_override(table: &mut toml::Table, item: &str) -> Result<()> {
    let usage = || Error::Usage(format!("--set {item}: expected section.key=value"));
    let (key, raw) = item.split_once('=').ok_or_else(usage)?;
    let (section, name) = key.trim().split_once('.').ok_or_else(usage)?;
    if section.is_empty() || name.is_empty() || name.contains('.') {
        return Err(usage());
    }
    let value = parse_value(raw.trim());
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(sect) = entry else {
        return Err(Error::Usage(format!(
            "--set {item}: `{section}` is not a section"
        )));
    };
    sect.insert(name.to_string(), value);
    Ok(())
}

/// A value in TOML syntax (`3`, `0.5`, `true`, `[4, 8]`, `"x"`), else the raw text as a string.
fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str, overrides: &[&str]) -> Result<Config> {
        let mut table: toml::Table = text.parse().expect("test toml");
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let c = Config::from_table(table, Path::new("test.toml"))?;
        c.validate()?;
        Ok(c)
    }

    const MINIMAL: &str = "[data]\ncsv = \"a.csv\"\nimages = \"img\"\n";

    #[test]
    fn defaults_fill_missing_keys() {
        let c = load_str(MINIMAL, &[]).expect("valid");
        assert_eq!(c.extract.batch_size, 128);
        assert_eq!(c.head.epochs, 30);
        assert_eq!(c.cnn.epochs, 15);
        assert_eq!(c.split.seed, 13);
    }

    #[test]
    fn unknown_key_is_named_with_its_section() {
        let err = load_str(&format!("{MINIMAL}[extract]\nbatchsize = 3\n"), &[])
            .expect_err("unknown key");
        assert!(err.to_string().contains("extract.batchsize"), "{err}");
        let err = load_str(MINIMAL, &["head.lrr=0.1"]).expect_err("unknown override");
        assert!(err.to_string().contains("head.lrr"), "{err}");
        let err = load_str(&format!("{MINIMAL}[nosuch]\nx = 1\n"), &[]).expect_err("section");
        assert!(err.to_string().contains("nosuch"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = load_str(MINIMAL, &["extract.batch_size=big"]).expect_err("type");
        assert!(err.to_string().contains("extract.batch_size"), "{err}");
    }

    #[test]
    fn conv_algorithm_defaults_to_winograd2x2_and_is_checked() {
        let c = load_str(MINIMAL, &[]).expect("valid");
        assert_eq!(c.extract.conv, ConvAlgorithm::Winograd2x2);
        let c = load_str(MINIMAL, &["extract.conv=\"direct\""]).expect("valid");
        assert_eq!(c.extract.conv, ConvAlgorithm::Direct);
        assert_eq!(c.extract.conv.to_fastconv(), fastconv::Algorithm::Direct);
        let c = load_str(MINIMAL, &["extract.conv=\"winograd4x4\""]).expect("valid");
        assert_eq!(
            c.extract.conv.to_fastconv(),
            fastconv::Algorithm::Winograd(fastconv::Tile::F4x4)
        );
        let err = load_str(MINIMAL, &["extract.conv=\"fft\""]).expect_err("unknown algorithm");
        assert!(err.to_string().contains("extract.conv"), "{err}");
    }

    #[test]
    fn overrides_win_and_parse_toml_values() {
        let c = load_str(
            MINIMAL,
            &[
                "extract.batch_size=7",
                "cnn.channels=[8, 8, 8]",
                "data.limit=5",
                "extract.device=cpu",
            ],
        )
        .expect("valid");
        assert_eq!(c.extract.batch_size, 7);
        assert_eq!(c.cnn.channels, vec![8, 8, 8]);
        assert_eq!(c.data.limit, Some(5));
        assert_eq!(c.extract.device, "cpu");
    }

    #[test]
    fn load_makes_every_path_absolute_and_canonical_whatever_the_spelling() {
        let dir =
            std::env::temp_dir().join(format!("pipeline-config-canon-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub/data")).expect("mkdir");
        std::fs::write(
            dir.join("sub/pipeline.toml"),
            "[data]\ncsv = \"./data/../data/a.csv\"\nimages = \"data\"\n\
             [extract]\nout = \"feats/./x/\"\n[output]\nruns = \"../sub/runs\"\n",
        )
        .expect("write");
        let a = Config::load(&dir.join("sub/pipeline.toml"), &[]).expect("load");
        let b = Config::load(
            &dir.join("sub/../sub/./pipeline.toml"),
            &["extract.out=../sub/feats/nothing/../x".into()],
        )
        .expect("load");
        let root = dir.canonicalize().expect("canonical");
        assert_eq!(a.data.csv, Some(root.join("sub/data/a.csv")));
        assert_eq!(a.data.images, Some(root.join("sub/data")));
        assert_eq!(a.extract.out, root.join("sub/feats/x"));
        assert_eq!(a.output.runs, root.join("sub/runs"));
        assert_eq!((&a.data.csv, &a.extract.out), (&b.data.csv, &b.extract.out));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_values_are_rejected() {
        for o in [
            "extract.batch_size=0",
            "extract.batch_size=100000",
            "split.val_fraction=1.5",
            "extract.device=tpu",
            "data.limit=0",
            "cnn.channels=[]",
        ] {
            let err = load_str(MINIMAL, &[o]).expect_err(o);
            let key = o.split('=').next().expect("key");
            assert!(err.to_string().contains(key), "{o}: {err}");
        }
        assert!(load_str("", &[]).is_err(), "no dataset");
        assert!(load_str(MINIMAL, &["data.root=x"]).is_err(), "both layouts");
        assert!(load_str(MINIMAL, &["nodot=1"]).is_err());
    }
}
