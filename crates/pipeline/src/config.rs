//! `pipeline.toml`: the only place the pipeline reads its settings from.
//!
//! Loading is two steps: the file is parsed into a TOML table, `--set section.key=value`
//! overrides are applied on top of it (command line wins over file), then the table is
//! deserialised into [`Config`] with every unknown key reported by its full name. Relative
//! paths are resolved against the directory holding the config file, whichever of the two
//! they came from, so a run behaves the same from any working directory.
//!
//! Between the file and `--set` comes an optional *layer* ([`LAYER_VAR`], [`apply_layer`]): a
//! second TOML file whose keys replace the file's, e.g. `configs/shared.toml`, which points the
//! study's data and weights at local copies on machines without internet. Paths written
//! `source:PATH` name files inside the fetched `[data] source` archive (see `fetch`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::fetch;
use crate::device::DeviceChoice;
use crate::error::{Error, IoContext, Result};
use crate::features::weights::WeightsSource;

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
    pub evaluate: EvaluateConfig,
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
    /// Largest image file read, in bytes; a bigger one is a bad image. Default: 64 MiB.
    pub max_file_bytes: u64,
    /// Largest image decoded, in pixels (width x height, from the file's header); a bigger one
    /// is a bad image. Default: 64 megapixels.
    pub max_image_pixels: u64,
    /// An archive (`https://...zip` or a local `.zip`) fetched on first use; paths written
    /// `source:PATH` point inside its top folder. Default: none.
    pub source: Option<String>,
    /// SHA-256 content digest of the archive's files (see `fetch::archive`); required with
    /// `source`.
    pub source_digest: Option<String>,
    /// Cache folder for fetched data. Default: `$PIPELINE_CACHE_DIR`, else
    /// `$XDG_CACHE_HOME/vehicle-transfer`, else `~/.cache/vehicle-transfer`.
    pub cache: Option<PathBuf>,
}

/// Default of `[data] max_file_bytes`: 64 MiB, far above any photo a VGG16 study sees.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Default of `[data] max_image_pixels`: 64 megapixels (an 8000x8000 image; ~192 MB as RGB).
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 64_000_000;

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
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
            source: None,
            source_digest: None,
            cache: None,
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
    /// Architecture, a name in `features::backbone::REGISTRY`: "vgg16" or
    /// "efficientnet_lite0". Default: vgg16.
    pub name: String,
    /// A local `.safetensors` path, or `hf:<repo>` for the Hugging Face hub (one string in the
    /// TOML, checked when the config is loaded).
    pub weights: WeightsSource,
}

impl Default for BackboneConfig {
    fn default() -> Self {
        Self {
            name: "vgg16".into(),
            weights: WeightsSource::Hub {
                repo: "timm/vgg16.tv_in1k".into(),
                file: "model.safetensors".into(),
            },
        }
    }
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
    /// "auto", "cpu" or "cuda:N" (one string in the TOML, checked when the config is loaded).
    /// Default: auto.
    pub device: DeviceChoice,
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
    /// Augmented views extracted per image, each its own feature row
    /// ([`crate::features::views`]): "original", "hflip", "crop:tl|tr|bl|br|center",
    /// "crops:4", "crops:5". Must include "original". Default: ["original"].
    pub views: Vec<String>,
    /// Extract only part K of N of the dataset ("K/N", counted from 0), as one task of an array
    /// job on a shared store. `--shard` wins over it; without either, a Slurm job array or a
    /// Kubernetes Indexed Job sets it (see `features::parts`). Default: none (the whole dataset).
    pub shard: Option<String>,
    /// The number of parts of a Kubernetes Indexed Job (its `completions`), when the
    /// `PIPELINE_SHARD_COUNT` variable does not say it. Default: none.
    pub shard_count: Option<usize>,
}

impl ExtractConfig {
    /// `lock_timeout` as a duration (`None`: wait for ever).
    pub fn lock_wait(&self) -> Option<std::time::Duration> {
        self.lock_timeout.map(std::time::Duration::from_secs)
    }

    /// The views as parsed and checked by [`crate::features::views::parse_views`]: original
    /// first, shorthands expanded.
    pub fn views(&self) -> Result<Vec<crate::features::views::View>> {
        crate::features::views::parse_views(&self.views)
    }
}

impl Default for ExtractConfig {
    fn default() -> Self {
        Self {
            batch_size: 128,
            device: DeviceChoice::Auto,
            out: "features".into(),
            dtype: FeatureDType::F32,
            conv: ConvAlgorithm::Winograd2x2,
            compute: ComputePrecision::F32,
            conv_workspace_mb: 1024,
            lock_timeout: None,
            views: crate::features::views::original_only(),
            shard: None,
            shard_count: None,
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

/// How a model is trained: the keys `[head]` and `[cnn]` share. In the file they sit flat in
/// their section (`[head] lr = 0.0005`); loading lifts them into the section's `train` table
/// (see [`lift_train_keys`]), so the rules are written once.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct TrainSettings {
    /// Adam learning rate.
    pub lr: f64,
    pub epochs: usize,
    pub batch_size: usize,
    /// Stop after this many epochs without a lower validation loss, then restore the weights
    /// of the best epoch. Default: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<usize>,
    /// Learning-rate schedule. Default: constant.
    pub schedule: Schedule,
    /// Epochs between decays of the step schedule. Default: 10.
    pub step_size: usize,
    /// Factor of the step schedule. Default: 0.1.
    pub gamma: f64,
    /// Decoupled weight decay of Adam (AdamW's). Default: 0 (the study's plain Adam).
    #[serde(default)]
    pub weight_decay: f64,
}

impl TrainSettings {
    /// The keys of [`TrainSettings`], as they appear flat in `[head]` and `[cnn]`.
    pub const KEYS: [&'static str; 8] = [
        "lr",
        "epochs",
        "batch_size",
        "early_stopping",
        "schedule",
        "step_size",
        "gamma",
        "weight_decay",
    ];

    /// Settings with a constant learning rate and no early stopping.
    pub fn new(lr: f64, epochs: usize, batch_size: usize) -> Self {
        Self {
            lr,
            epochs,
            batch_size,
            early_stopping: None,
            schedule: Schedule::Constant,
            step_size: 10,
            gamma: 0.1,
            weight_decay: 0.0,
        }
    }

    fn validate(&self, section: &str) -> Result<()> {
        let bad = |key: &str, message: &str| {
            Err(Error::InvalidValue {
                key: format!("{section}.{key}"),
                message: message.into(),
            })
        };
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1");
        }
        if self.lr.is_nan() || self.lr <= 0.0 {
            return bad("lr", "must be positive");
        }
        if self.weight_decay.is_nan() || self.weight_decay < 0.0 {
            return bad("weight_decay", "must be 0 or positive");
        }
        if self.early_stopping == Some(0) {
            return bad(
                "early_stopping",
                "must be at least 1 (leave it out to never stop)",
            );
        }
        Ok(())
    }
}

/// The classifier trained on cached features.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct HeadConfig {
    /// "linear" or "mlp". Default: linear.
    pub kind: HeadKind,
    /// Dropout of the mlp head. Default: 0.5.
    pub dropout: f32,
    /// Feature scaling fitted on the training rows and saved with the head. Default: none.
    pub scaling: crate::models::scaling::Scaling,
    /// The logistic head's inverse penalties `C` (lambda = 1 / (C n)); with more than one,
    /// cross-validation picks one. Default: 1e-4, 1e-3, ..., 1e4.
    pub c: Vec<f64>,
    /// Folds of the logistic head's cross-validation. Default: 5.
    pub cv_folds: usize,
    /// Which views of a validation image are scored when `[extract] views` has several:
    /// its original view, or the mean of its class probabilities over all views. Default:
    /// original.
    pub val_views: ValViews,
    /// Which backbone layers train with the head. Default: none (frozen features).
    pub unfreeze: Unfreeze,
    /// With `unfreeze = "block5"`: the convolutions' learning rate relative to `lr`. Default:
    /// 0.1 (pretrained filters move slowly while the new head settles).
    pub conv_lr_scale: f64,
    /// With `unfreeze = "block5"`: epochs of training block 5 and the head together, after
    /// `epochs` epochs of the head alone on frozen block-5 features. Default: 3.
    pub finetune_epochs: usize,
    /// Default: lr 0.0005, 30 epochs, batch 128, constant schedule, no early stopping.
    pub train: TrainSettings,
}

/// How validation scores an image extracted with several views (`[head] val_views`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ValViews {
    /// The original view's prediction (as without views).
    #[default]
    Original,
    /// The mean of the class probabilities over every view (test-time augmentation).
    Mean,
}

impl ValViews {
    /// "original" or "mean".
    pub fn name(self) -> &'static str {
        match self {
            ValViews::Original => "original",
            ValViews::Mean => "mean",
        }
    }
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            kind: HeadKind::Linear,
            dropout: 0.5,
            scaling: crate::models::scaling::Scaling::None,
            c: crate::models::logistic::C_GRID.to_vec(),
            cv_folds: 5,
            val_views: ValViews::Original,
            unfreeze: Unfreeze::None,
            conv_lr_scale: 0.1,
            finetune_epochs: 3,
            train: TrainSettings::new(0.0005, 30, 128),
        }
    }
}

/// Shapes of the feature head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// features -> classes, trained with Adam (the study's recipe).
    Linear,
    /// The VGG classifier: features -> 4096 -> 4096 -> classes, ReLU and dropout.
    Mlp,
    /// features -> classes: L2-penalised multinomial logistic regression solved to
    /// convergence, the penalty chosen by cross-validation ([`crate::models::logistic`]).
    Logistic,
}

/// Backbone layers trained with the head (`[head] unfreeze`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unfreeze {
    /// The backbone stays frozen: the head trains on stored features.
    None,
    /// VGG16's block 5 (its three convolutions) trains with a linear head, on stored block-4
    /// activations ([`crate::models::finetune`]).
    Block5,
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
    /// Side of the square input. Default: 224.
    pub input_size: u32,
    /// Default: lr 0.0001, 15 epochs, batch 128, constant schedule, no early stopping.
    pub train: TrainSettings,
}

impl Default for CnnConfig {
    fn default() -> Self {
        Self {
            channels: vec![4, 4],
            input_size: 224,
            train: TrainSettings::new(0.0001, 15, 128),
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
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct PredictConfig {
    /// A CSV of image names (resolved against `[data] images`) or an image folder.
    pub input: Option<PathBuf>,
    /// Output CSV. Default: "predictions.csv".
    pub output: Option<PathBuf>,
    /// A head run directory. Default: the most recent head run under `[output] runs`.
    pub run: Option<PathBuf>,
    /// Test-time augmentation: average the class probabilities over the views the run was
    /// trained with (its `[extract] views`); false scores the original view only. Default:
    /// true.
    pub tta: bool,
}

impl Default for PredictConfig {
    fn default() -> Self {
        Self {
            input: None,
            output: None,
            run: None,
            tta: true,
        }
    }
}

/// Scoring a trained head on a labelled dataset (`evaluate`): a label CSV (+ images) or a
/// class-per-folder tree, read like `[data]`'s.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct EvaluateConfig {
    /// A label CSV with the columns `image_column` and `label_column`. Default: none.
    pub csv: Option<PathBuf>,
    /// Folder the CSV's image names are relative to. Default: `[data] images`, else the CSV's
    /// folder.
    pub images: Option<PathBuf>,
    /// A class-per-folder tree (`root/<class>/**/*.jpg`, sub-folders included), instead of
    /// `csv`. Default: none.
    pub root: Option<PathBuf>,
    /// Column of the CSV holding image names. Default: `[data] image_column`.
    pub image_column: Option<String>,
    /// Column of the CSV holding labels. Default: `[data] label_column`.
    pub label_column: Option<String>,
    /// A head run directory. Default: the most recent finished head run under `[output] runs`.
    pub run: Option<PathBuf>,
    /// Folder the results are written to (`predictions.csv`, `metrics.json`,
    /// `per_class.csv`, `confusion_matrix.csv`, `confusion_matrix.png`, `report.md`).
    /// Default: "evaluation".
    pub output: PathBuf,
}

impl Default for EvaluateConfig {
    fn default() -> Self {
        Self {
            csv: None,
            images: None,
            root: None,
            image_column: None,
            label_column: None,
            run: None,
            output: "evaluation".into(),
        }
    }
}

impl EvaluateConfig {
    /// Whether a dataset to score is named (`csv` or `root`).
    pub fn has_dataset(&self) -> bool {
        self.csv.is_some() || self.root.is_some()
    }
}

impl Config {
    /// Reads `path`, applies the layer named by [`LAYER_VAR`] (when it overlays `path`), then
    /// `overrides` (`section.key=value`, value in TOML syntax or a bare string), validates,
    /// resolves `source:` paths into the fetch cache, and makes every path absolute and
    /// canonical: relative ones are resolved against the config file's (canonical) directory,
    /// symbolic links and `.`/`..` are resolved, so the same file is spelled the same way
    /// whatever the working directory or the spelling in the config.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).at(path)?;
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Config {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        apply_env_layer(&mut table, path)?;
        for item in overrides {
            apply_override(&mut table, item)?;
        }
        let mut config = Self::from_table(table, path)?;
        config.validate()?;
        let file = std::fs::canonicalize(path).at(path)?;
        let base = file.parent().unwrap_or(Path::new("/"));
        config.resolve_source_paths(base)?;
        config.resolve_paths(base);
        Ok(config)
    }

    /// Deserialises a table, naming any unknown key and the key of any ill-typed value.
    pub fn from_table(mut table: toml::Table, path: &Path) -> Result<Self> {
        lift_train_keys(&mut table)?;
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
            // Name the key as the user wrote it: `head.lr`, not the lifted `head.train.lr`;
            // once (the TOML error's own text would add a second line "in `head.lr`").
            message: format!(
                "key `{}`: {}",
                e.path().to_string().replace(".train.", "."),
                e.inner().message()
            ),
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
        // `predict` and `evaluate` read their own images: a config for them alone needs no
        // `[data]` (the run they use names the dataset it was trained on).
        let reads_other_images = self.predict.input.is_some() || self.evaluate.has_dataset();
        match (&d.csv, &d.images, &d.root) {
            (Some(_), Some(_), None) | (None, None, Some(_)) => {}
            (None, None, None) if reads_other_images => {}
            (Some(_), None, None) => return bad("data.images", "`data.csv` needs `data.images`"),
            (None, Some(_), None) => return bad("data.csv", "`data.images` needs `data.csv`"),
            (None, None, None) => {
                return bad(
                    "data",
                    "set either `csv` and `images`, or `root` (a folder per class); \
                     or, for `predict` / `evaluate` alone, `predict.input` / `evaluate.csv` \
                     or `evaluate.root`",
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
        if d.max_file_bytes == 0 {
            return bad("data.max_file_bytes", "must be at least 1");
        }
        if d.max_image_pixels == 0 {
            return bad("data.max_image_pixels", "must be at least 1");
        }
        if self.extract.batch_size == 0 {
            return bad("extract.batch_size", "must be at least 1");
        }
        if self.extract.batch_size > crate::features::store::shard::MAX_SHARD_ROWS {
            return bad(
                "extract.batch_size",
                &format!(
                    "must be at most {} (rows per store shard)",
                    crate::features::store::shard::MAX_SHARD_ROWS
                ),
            );
        }
        if self.extract.conv_workspace_mb == 0 {
            return bad("extract.conv_workspace_mb", "must be at least 1");
        }
        self.extract.views()?;
        if let Some(shard) = &self.extract.shard {
            if let Err(m) = crate::features::parts::Part::parse(shard) {
                return bad("extract.shard", &m);
            }
        }
        if self.extract.shard_count == Some(0) {
            return bad("extract.shard_count", "must be at least 1");
        }
        crate::features::backbone::spec(&self.backbone.name)?;
        let v = self.split.val_fraction;
        if v.is_nan() || v <= 0.0 || v >= 1.0 {
            return bad("split.val_fraction", "must be between 0 and 1 (exclusive)");
        }
        self.head.train.validate("head")?;
        if self.head.c.is_empty() || self.head.c.iter().any(|c| !(c.is_finite() && *c > 0.0)) {
            return bad("head.c", "needs one or more positive values");
        }
        if self.head.c.len() > 1 && self.head.cv_folds < 2 {
            return bad(
                "head.cv_folds",
                "must be at least 2 to choose among several `c`",
            );
        }
        self.validate_unfreeze()?;
        self.cnn.train.validate("cnn")?;
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
        let e = &self.evaluate;
        if e.csv.is_some() && e.root.is_some() {
            return bad(
                "evaluate.root",
                "set either `csv` (and `images`) or `root`, not both",
            );
        }
        if e.images.is_some() && e.csv.is_none() {
            return bad("evaluate.images", "`evaluate.images` needs `evaluate.csv`");
        }
        for (key, column) in [
            ("evaluate.image_column", &e.image_column),
            ("evaluate.label_column", &e.label_column),
        ] {
            if column.as_ref().is_some_and(|c| c.trim().is_empty()) {
                return bad(key, "must not be empty");
            }
        }
        Ok(())
    }

    /// `[head] unfreeze = "block5"` needs VGG16 and the linear head (trained by Adam together
    /// with the convolutions; the logistic solver and the MLP have no such path), a positive
    /// `conv_lr_scale` and at least one fine-tuning epoch.
    fn validate_unfreeze(&self) -> Result<()> {
        let h = &self.head;
        if h.unfreeze == Unfreeze::None {
            return Ok(());
        }
        let bad = |key: &str, message: String| {
            Err(Error::InvalidValue {
                key: key.into(),
                message,
            })
        };
        if self.backbone.name != "vgg16" {
            return bad(
                "head.unfreeze",
                format!(
                    "\"block5\" fine-tunes VGG16's block 5, but `backbone.name` is `{}`: use backbone.name = \"vgg16\" or unfreeze = \"none\"",
                    self.backbone.name
                ),
            );
        }
        if h.kind != HeadKind::Linear {
            return bad(
                "head.unfreeze",
                format!(
                    "\"block5\" trains a linear head with the convolutions, but `head.kind` is `{}`: use kind = \"linear\" or unfreeze = \"none\"",
                    toml::Value::try_from(h.kind)
                        .map(|v| v.as_str().unwrap_or_default().to_string())
                        .unwrap_or_default()
                ),
            );
        }
        if self.extract.views.len() > 1 {
            return bad(
                "head.unfreeze",
                format!(
                    "\"block5\" trains on the original images only, but `extract.views` is {:?}: use views = [\"original\"] or unfreeze = \"none\"",
                    self.extract.views
                ),
            );
        }
        if !(h.conv_lr_scale.is_finite() && h.conv_lr_scale > 0.0) {
            return bad("head.conv_lr_scale", "must be positive".into());
        }
        if h.finetune_epochs == 0 {
            return bad(
                "head.finetune_epochs",
                "must be at least 1 with unfreeze = \"block5\"".into(),
            );
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
        if let WeightsSource::Local(w) = &mut self.backbone.weights {
            fix(w);
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
        let e = &mut self.evaluate;
        for p in [&mut e.csv, &mut e.images, &mut e.root, &mut e.run]
            .into_iter()
            .flatten()
        {
            fix(p);
        }
        fix(&mut e.output);
    }
}

/// Moves the training keys of `[head]` and `[cnn]` ([`TrainSettings::KEYS`]) into the
/// section's `train` table, on top of that section's defaults (so `[cnn] lr = 0.001` keeps the
/// CNN's default epochs, not another section's). A `train` table already there (a run's
/// resolved config.toml is written that way) is merged the same way; flat keys win.
fn lift_train_keys(table: &mut toml::Table) -> Result<()> {
    let sections = [
        ("head", HeadConfig::default().train),
        ("cnn", CnnConfig::default().train),
    ];
    for (section, defaults) in sections {
        let Some(toml::Value::Table(sect)) = table.get_mut(section) else {
            continue;
        };
        let mut train = toml::Table::try_from(&defaults).map_err(|e| Error::InvalidValue {
            key: format!("{section}.train"),
            message: e.to_string(),
        })?;
        match sect.remove("train") {
            Some(toml::Value::Table(given)) => train.extend(given),
            // Not a table: leave it for deserialisation to report with its key.
            Some(other) => {
                sect.insert("train".into(), other);
                continue;
            }
            None => {}
        }
        for key in TrainSettings::KEYS {
            if let Some(v) = sect.remove(key) {
                train.insert(key.into(), v);
            }
        }
        sect.insert("train".into(), toml::Value::Table(train));
    }
    Ok(())
}

impl Config {
    /// Turns `source:PATH` values of `data.csv`, `data.images`, `data.root`, `predict.input`
    /// and `evaluate.csv` / `images` / `root` into paths under the `[data] source` cache folder, and resolves `data.source` (a local
    /// archive) and `data.cache` against `base`. Nothing is fetched here: `fetch::ensure_source`
    /// does that when the files are first read.
    fn resolve_source_paths(&mut self, base: &Path) -> Result<()> {
        let invalid = |key: &str, message: String| Error::InvalidValue {
            key: key.into(),
            message,
        };
        let is_source = |p: Option<&PathBuf>| p.is_some_and(|p| fetch::is_source_path(p));
        let misplaced = [
            ("extract.out", is_source(Some(&self.extract.out))),
            ("output.runs", is_source(Some(&self.output.runs))),
            ("predict.output", is_source(self.predict.output.as_ref())),
            ("predict.run", is_source(self.predict.run.as_ref())),
            ("evaluate.output", is_source(Some(&self.evaluate.output))),
            ("evaluate.run", is_source(self.evaluate.run.as_ref())),
            ("data.cache", is_source(self.data.cache.as_ref())),
            (
                "backbone.weights",
                matches!(&self.backbone.weights, WeightsSource::Local(w) if fetch::is_source_path(w)),
            ),
        ];
        if let Some((key, _)) = misplaced.iter().find(|(_, bad)| *bad) {
            return Err(invalid(
                key,
                "`source:` paths are for files read from the fetched data (data.csv, \
                 data.images, data.root, predict.input, evaluate.csv, evaluate.images, \
                 evaluate.root)"
                    .into(),
            ));
        }
        let d = &mut self.data;
        if let Some(cache) = d.cache.as_mut() {
            if cache.is_relative() {
                *cache = base.join(&*cache);
            }
        }
        // A local archive (a path or a file:// URL) resolves like any other path.
        if let Some(location) = d.source.as_mut() {
            let local = location.strip_prefix("file://").unwrap_or(location);
            if !local.contains("://") {
                *location = base.join(local).to_string_lossy().into_owned();
            }
        }
        let e = &mut self.evaluate;
        let uses_source = [
            &d.csv,
            &d.images,
            &d.root,
            &self.predict.input,
            &e.csv,
            &e.images,
            &e.root,
        ]
        .into_iter()
        .flatten()
        .any(|p| fetch::is_source_path(p));
        if !uses_source {
            return Ok(());
        }
        if d.source.is_none() {
            return Err(invalid(
                "data.source",
                "a path is written `source:...` but no `data.source` archive is set".into(),
            ));
        }
        if d.cache.is_none() {
            d.cache = fetch::default_cache_dir();
        }
        let source = fetch::Source::from_config(d)?
            .ok_or_else(|| invalid("data.source", "a `source:` path needs `data.source`".into()))?;
        for p in [
            &mut d.csv,
            &mut d.images,
            &mut d.root,
            &mut self.predict.input,
            &mut e.csv,
            &mut e.images,
            &mut e.root,
        ]
        .into_iter()
        .flatten()
        {
            if let Some(resolved) = fetch::source_path(&source, p) {
                *p = resolved;
            }
        }
        Ok(())
    }
}

/// Environment variable naming a config layer: a TOML file applied on top of the config file
/// before `--set` (see [`apply_layer`]). A relative value is relative to the working directory.
pub const LAYER_VAR: &str = "PIPELINE_CONFIG_LAYER";

/// Config keys holding paths: a layer's relative values of these resolve against the layer's
/// own folder.
const PATH_KEYS: &[(&str, &str)] = &[
    ("data", "csv"),
    ("data", "images"),
    ("data", "root"),
    ("data", "source"),
    ("data", "cache"),
    ("backbone", "weights"),
    ("extract", "out"),
    ("output", "runs"),
    ("predict", "input"),
    ("predict", "output"),
    ("predict", "run"),
    ("evaluate", "csv"),
    ("evaluate", "images"),
    ("evaluate", "root"),
    ("evaluate", "run"),
    ("evaluate", "output"),
];

/// Applies the layer `$PIPELINE_CONFIG_LAYER` names, if set, to the table read from `config`.
fn apply_env_layer(table: &mut toml::Table, config: &Path) -> Result<()> {
    let Some(layer) = std::env::var_os(LAYER_VAR).filter(|v| !v.is_empty()) else {
        return Ok(());
    };
    let layer = PathBuf::from(layer);
    // Relative to the working directory, made absolute so the layer's own paths are too.
    let layer = std::path::absolute(&layer).at(&layer)?;
    if apply_layer(table, config, &layer)? {
        eprintln!(
            "config: {} with layer {} ({LAYER_VAR})",
            config.display(),
            layer.display()
        );
    } else {
        eprintln!(
            "config: layer {} ({LAYER_VAR}) is for another config file, not applied to {}",
            layer.display(),
            config.display()
        );
    }
    Ok(())
}

/// Merges the layer file `layer` into `table` (read from the config file `config`): every key
/// of the layer's sections replaces the file's. Relative paths in the layer resolve against the
/// layer's folder (absolute when `layer` is). The layer's own `[layer] applies_to = "PATH"` limits it to that config file
/// (so tests and other configs are left alone); without it the layer applies to any config.
/// Returns whether it was applied. Errors name the layer file and the key.
pub fn apply_layer(table: &mut toml::Table, config: &Path, layer: &Path) -> Result<bool> {
    let text = std::fs::read_to_string(layer).at(layer)?;
    let cfg_err = |message: String| Error::Config {
        path: layer.to_owned(),
        message,
    };
    let mut layer_table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| cfg_err(e.to_string()))?;
    let dir = layer.parent().unwrap_or(Path::new("."));
    if let Some(header) = layer_table.remove("layer") {
        // One config file, or a list of them.
        let targets: Vec<&str> = match header.get("applies_to") {
            Some(toml::Value::String(one)) => vec![one.as_str()],
            Some(toml::Value::Array(many)) => many.iter().filter_map(toml::Value::as_str).collect(),
            _ => Vec::new(),
        };
        if targets.is_empty() {
            return Err(cfg_err(
                "`[layer]` needs `applies_to = \"<config file>\"` (or a list of them)".into(),
            ));
        }
        if !targets.iter().any(|t| same_file(&dir.join(t), config)) {
            return Ok(false);
        }
    }
    // A typo in the layer is reported against the layer, not the config file.
    Config::from_table(layer_table.clone(), layer)?;
    for (section, values) in layer_table {
        let toml::Value::Table(values) = values else {
            return Err(cfg_err(format!("`{section}` is not a section")));
        };
        let target = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(target) = target else {
            return Err(Error::Config {
                path: config.to_owned(),
                message: format!("`{section}` is not a section"),
            });
        };
        for (key, mut value) in values {
            if PATH_KEYS.contains(&(section.as_str(), key.as_str())) {
                anchor_path(&mut value, dir);
            }
            target.insert(key, value);
        }
    }
    Ok(true)
}

/// Makes a relative filesystem path value absolute against `dir`; leaves `hf:`, `source:` and
/// URL values alone.
fn anchor_path(value: &mut toml::Value, dir: &Path) {
    let toml::Value::String(s) = value else {
        return;
    };
    let special = s.starts_with("hf:") || s.starts_with(fetch::SOURCE_PREFIX) || s.contains("://");
    if !special && Path::new(s.as_str()).is_relative() {
        *s = dir.join(s.as_str()).to_string_lossy().into_owned();
    }
}

/// Whether two paths name the same file (after resolving links and `..`).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
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
    let usage = || Error::Usage {
        argument: format!("--set {item}"),
        message: "expected section.key=value".into(),
    };
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
        return Err(Error::Usage {
            argument: format!("--set {item}"),
            message: format!("`{section}` is not a section"),
        });
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
        assert_eq!(c.head.train.epochs, 30);
        assert_eq!(c.cnn.train.epochs, 15);
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
    fn training_keys_are_shared_and_keep_their_section_defaults() {
        let c = load_str(
            &format!("{MINIMAL}[cnn]\nlr = 0.001\n[head]\nepochs = 7\nschedule = \"cosine\"\n"),
            &["cnn.early_stopping=4"],
        )
        .expect("valid");
        assert_eq!(c.cnn.train.lr, 0.001);
        assert_eq!(c.cnn.train.epochs, 15, "the CNN's own default");
        assert_eq!(c.cnn.train.early_stopping, Some(4));
        assert_eq!(c.head.train.epochs, 7);
        assert_eq!(c.head.train.lr, 0.0005, "the head's own default");
        assert_eq!(c.head.train.schedule, Schedule::Cosine);
        // A written-out config (nested `train` tables) reads back the same.
        let text = toml::to_string_pretty(&c).expect("serialise");
        let back = load_str(&text, &[]).expect("reads back");
        assert_eq!(back.cnn.train, c.cnn.train);
        assert_eq!(back.head.train, c.head.train);
        // Errors name the key as written.
        let err = load_str(MINIMAL, &["head.lr=fast"]).expect_err("type");
        assert!(err.to_string().contains("`head.lr`"), "{err}");
        let err = load_str(MINIMAL, &["cnn.epochs=0"]).expect_err("zero");
        assert!(err.to_string().contains("cnn.epochs"), "{err}");
    }

    #[test]
    fn unfreeze_block5_is_typed_and_checked() {
        let c = load_str(MINIMAL, &[]).expect("valid");
        assert_eq!(c.head.unfreeze, Unfreeze::None);
        assert_eq!(c.head.conv_lr_scale, 0.1);
        let c = load_str(
            MINIMAL,
            &["head.unfreeze=\"block5\"", "head.conv_lr_scale=0.05"],
        )
        .expect("valid");
        assert_eq!(c.head.unfreeze, Unfreeze::Block5);
        assert_eq!(c.head.conv_lr_scale, 0.05);
        assert_eq!(c.head.finetune_epochs, 3);
        let err = load_str(MINIMAL, &["head.unfreeze=\"block4\""]).expect_err("unknown");
        assert!(err.to_string().contains("head.unfreeze"), "{err}");
        // Another backbone: an error naming both keys.
        let err = load_str(
            MINIMAL,
            &[
                "head.unfreeze=\"block5\"",
                "backbone.name=\"efficientnet_lite0\"",
            ],
        )
        .expect_err("backbone");
        let text = err.to_string();
        assert!(
            text.contains("head.unfreeze") && text.contains("backbone.name"),
            "{text}"
        );
        assert!(text.contains("efficientnet_lite0"), "{text}");
        // Heads other than linear: an error naming both keys.
        for kind in ["logistic", "mlp"] {
            let err = load_str(
                MINIMAL,
                &["head.unfreeze=\"block5\"", &format!("head.kind=\"{kind}\"")],
            )
            .expect_err("kind");
            let text = err.to_string();
            assert!(
                text.contains("head.unfreeze") && text.contains("head.kind"),
                "{text}"
            );
            assert!(text.contains(kind), "{text}");
        }
        // Block 5 with augmented views: an error naming both keys.
        let err = load_str(
            MINIMAL,
            &[
                "head.unfreeze=\"block5\"",
                "extract.views=[\"original\", \"hflip\"]",
            ],
        )
        .expect_err("views");
        let text = err.to_string();
        assert!(
            text.contains("head.unfreeze") && text.contains("extract.views"),
            "{text}"
        );
        for bad in ["0", "-1", "nan"] {
            let err = load_str(
                MINIMAL,
                &[
                    "head.unfreeze=\"block5\"",
                    &format!("head.conv_lr_scale={bad}"),
                ],
            )
            .expect_err("scale");
            assert!(err.to_string().contains("head.conv_lr_scale"), "{err}");
        }
        let err = load_str(
            MINIMAL,
            &["head.unfreeze=\"block5\"", "head.finetune_epochs=0"],
        )
        .expect_err("epochs");
        assert!(err.to_string().contains("head.finetune_epochs"), "{err}");
        // Without fine-tuning the keys are inert.
        load_str(MINIMAL, &["head.kind=\"logistic\"", "head.conv_lr_scale=0"]).expect("inert");
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
        assert_eq!(c.extract.device, DeviceChoice::Cpu);
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
            "data.max_file_bytes=0",
            "data.max_image_pixels=0",
            "cnn.channels=[]",
            "extract.shard=4/4",
            "extract.shard=\"1 of 4\"",
            "extract.shard_count=0",
            "backbone.weights=hf:",
            "backbone.weights=hf:timm",
            "backbone.weights=\"\"",
            "evaluate.images=x",
            "evaluate.label_column=\" \"",
        ] {
            let err = load_str(MINIMAL, &[o]).expect_err(o);
            let key = o.split('=').next().expect("key");
            assert!(err.to_string().contains(key), "{o}: {err}");
        }
        assert!(load_str("", &[]).is_err(), "no dataset");
        assert!(load_str(MINIMAL, &["data.root=x"]).is_err(), "both layouts");
        assert!(load_str(MINIMAL, &["nodot=1"]).is_err());
        // `--set extract.shard=2/4` is a bare word: a string.
        let c = load_str(MINIMAL, &["extract.shard=2/4", "extract.shard_count=4"]).expect("valid");
        assert_eq!(
            (c.extract.shard.as_deref(), c.extract.shard_count),
            (Some("2/4"), Some(4))
        );
    }

    #[test]
    fn device_and_weights_are_parsed_once_at_load() {
        let c = load_str(
            MINIMAL,
            &[
                "extract.device=cuda:2",
                "backbone.weights=hf:a/b/c.safetensors",
            ],
        )
        .expect("valid");
        assert_eq!(c.extract.device, DeviceChoice::Cuda(2));
        assert_eq!(
            c.backbone.weights,
            WeightsSource::Hub {
                repo: "a/b".into(),
                file: "c.safetensors".into()
            }
        );
        // The error names the key (once, on one line) and the value, and is a config error at
        // load time.
        let err = load_str(MINIMAL, &["extract.device=gpu0"]).expect_err("device");
        let text = err.to_string();
        assert!(
            matches!(err, Error::Config { .. })
                && text.contains("`extract.device`")
                && text.contains("gpu0"),
            "{text}"
        );
        assert_eq!(
            (text.matches("extract.device").count(), text.lines().count()),
            (1, 1),
            "{text}"
        );
        let err = load_str(MINIMAL, &["backbone.weights=hf:only-owner"]).expect_err("weights");
        let text = err.to_string();
        assert!(
            matches!(err, Error::Config { .. })
                && text.contains("`backbone.weights`")
                && text.contains("hf:only-owner"),
            "{text}"
        );
        // Written out (a run's config.toml), both are the strings they were.
        let text = toml::to_string_pretty(&c).expect("serialise");
        assert!(text.contains("device = \"cuda:2\""), "{text}");
        assert!(
            text.contains("weights = \"hf:a/b/c.safetensors\""),
            "{text}"
        );
        let back = load_str(&text, &[]).expect("reads back");
        assert_eq!(
            (back.extract.device, back.backbone.weights),
            (c.extract.device, c.backbone.weights)
        );
    }

    #[test]
    fn predict_or_evaluate_alone_need_no_dataset_section() {
        let c = load_str("[predict]\ninput = \"new\"\n", &[]).expect("predict alone");
        assert!(c.data.csv.is_none() && c.data.root.is_none());
        load_str("[evaluate]\nroot = \"tree/val\"\n", &[]).expect("evaluate alone");
        load_str("[evaluate]\ncsv = \"held-out.csv\"\n", &[]).expect("evaluate csv");
        // Without anything to read, the dataset is still required.
        let err = load_str("[evaluate]\noutput = \"x\"\n", &[]).expect_err("nothing");
        assert!(err.to_string().contains("`data`"), "{err}");
        let err = load_str("[evaluate]\ncsv = \"a.csv\"\nroot = \"tree\"\n", &[])
            .expect_err("both layouts");
        assert!(err.to_string().contains("evaluate.root"), "{err}");
    }

    #[test]
    fn evaluate_paths_resolve_against_the_config_folder() {
        let dir = testkit::temp_dir("config-evaluate");
        let config = dir.join("pipeline.toml");
        std::fs::write(
            &config,
            "[evaluate]\ncsv = \"held/out.csv\"\nimages = \"imgs\"\nrun = \"runs/head-x\"\n",
        )
        .expect("config");
        let c = Config::load(&config, &[]).expect("valid");
        let root = dir.canonicalize().expect("canonical");
        assert_eq!(c.evaluate.csv, Some(root.join("held/out.csv")));
        assert_eq!(c.evaluate.images, Some(root.join("imgs")));
        assert_eq!(c.evaluate.run, Some(root.join("runs/head-x")));
        assert_eq!(c.evaluate.output, root.join("evaluation"));
        let err = Config::load(&config, &["evaluate.output=source:x".into()]).expect_err("source");
        assert!(err.to_string().contains("evaluate.output"), "{err}");
    }

    /// A config file and a layer in `<dir>/configs/`; returns (config, layer).
    fn layered(dir: &Path, layer: &str) -> (PathBuf, PathBuf) {
        let config = dir.join("pipeline.toml");
        std::fs::write(
            &config,
            "[data]\ncsv = \"a.csv\"\nimages = \"img\"\nimage_column = \"f\"\n\
             [backbone]\nweights = \"hf:timm/vgg16.tv_in1k\"\n",
        )
        .expect("config");
        std::fs::create_dir_all(dir.join("configs")).expect("mkdir");
        let path = dir.join("configs/local.toml");
        std::fs::write(&path, layer).expect("layer");
        (config, path)
    }

    fn table_of(path: &Path) -> toml::Table {
        std::fs::read_to_string(path)
            .expect("read")
            .parse()
            .expect("toml")
    }

    #[test]
    fn layer_replaces_keys_and_its_paths_resolve_against_its_folder() {
        let dir = testkit::temp_dir("config-layer");
        let (config, layer) = layered(
            &dir,
            "[layer]\napplies_to = \"../pipeline.toml\"\n[data]\ncsv = \"../../shared/t.csv\"\n\
             [backbone]\nweights = \"w/vgg.safetensors\"\n[head]\nepochs = 3\n",
        );
        let mut table = table_of(&config);
        assert!(apply_layer(&mut table, &config, &layer).expect("applies"));
        apply_override(&mut table, "head.epochs=4").expect("override");
        let c = Config::from_table(table, &config).expect("valid");
        assert_eq!(c.data.csv, Some(dir.join("configs/../../shared/t.csv")));
        // Keys the layer does not name keep the file's values; --set wins over the layer.
        assert_eq!(c.data.images, Some(PathBuf::from("img")));
        assert_eq!(c.data.image_column, "f");
        assert_eq!(
            c.backbone.weights,
            WeightsSource::Local(dir.join("configs/w/vgg.safetensors"))
        );
        assert_eq!(c.head.train.epochs, 4);
    }

    #[test]
    fn layer_applies_to_any_config_of_its_list() {
        let dir = testkit::temp_dir("config-layer-list");
        let (config, layer) = layered(
            &dir,
            "[layer]\napplies_to = [\"../other.toml\", \"../pipeline.toml\"]\n[data]\ncsv = \"x.csv\"\n",
        );
        let mut table = table_of(&config);
        assert!(apply_layer(&mut table, &config, &layer).expect("applies"));
        std::fs::write(&layer, "[layer]\napplies_to = []\n").expect("layer");
        let err = apply_layer(&mut table_of(&config), &config, &layer).expect_err("empty list");
        assert!(err.to_string().contains("applies_to"), "{err}");
    }

    #[test]
    fn layer_for_another_config_file_leaves_the_config_alone() {
        let dir = testkit::temp_dir("config-layer-other");
        let (config, layer) = layered(
            &dir,
            "[layer]\napplies_to = \"../other.toml\"\n[data]\ncsv = \"x.csv\"\n",
        );
        let mut table = table_of(&config);
        let before = table.clone();
        assert!(!apply_layer(&mut table, &config, &layer).expect("read"));
        assert_eq!(table, before);
        // Without `[layer]` a layer applies to any config.
        std::fs::write(&layer, "[data]\ncsv = \"x.csv\"\n").expect("layer");
        assert!(apply_layer(&mut table, &config, &layer).expect("applies"));
    }

    #[test]
    fn layer_errors_name_the_layer_file_and_key() {
        let dir = testkit::temp_dir("config-layer-bad");
        let (config, layer) = layered(&dir, "[data]\ncsvv = \"x.csv\"\n");
        let err = apply_layer(&mut table_of(&config), &config, &layer).expect_err("typo");
        let text = err.to_string();
        assert!(
            text.contains("local.toml") && text.contains("data.csvv"),
            "{text}"
        );
        std::fs::write(&layer, "[layer]\nfor = 1\n").expect("layer");
        let err = apply_layer(&mut table_of(&config), &config, &layer).expect_err("header");
        assert!(err.to_string().contains("applies_to"), "{err}");
        let missing = dir.join("configs/absent.toml");
        let err = apply_layer(&mut table_of(&config), &config, &missing).expect_err("absent");
        assert!(err.to_string().contains("absent.toml"), "{err}");
    }

    #[test]
    fn source_paths_resolve_into_the_cache_folder() {
        let dir = testkit::temp_dir("config-source");
        let config = dir.join("pipeline.toml");
        let digest = "ab".repeat(32);
        std::fs::write(
            &config,
            format!(
                "[data]\nsource = \"https://h/o/study/archive/c0ffee.zip\"\n\
                 source_digest = \"{digest}\"\ncache = \"cache\"\n\
                 csv = \"source:E/train.csv\"\nimages = \"source:E/train\"\n\
                 [predict]\ninput = \"source:E/test\"\n"
            ),
        )
        .expect("config");
        let c = Config::load(&config, &[]).expect("valid");
        let folder = dir.join("cache/data/study-abababababababab");
        assert_eq!(c.data.csv, Some(folder.join("E/train.csv")));
        assert_eq!(c.data.images, Some(folder.join("E/train")));
        assert_eq!(c.predict.input, Some(folder.join("E/test")));
        assert_eq!(c.data.cache, Some(dir.join("cache")));
        // A local archive resolves against the config's folder like any path.
        let c = Config::load(&config, &["data.source=data/study.zip".into()]).expect("valid");
        assert_eq!(
            c.data.source.as_deref(),
            Some(dir.join("data/study.zip").to_string_lossy().as_ref())
        );
        for (set, key) in [
            ("data.source_digest=\"12\"", "data.source_digest"),
            ("data.source=ftp://h/a.zip", "data.source"),
            ("extract.out=source:x", "extract.out"),
            ("backbone.weights=source:w.safetensors", "backbone.weights"),
        ] {
            let err = Config::load(&config, &[set.into()]).expect_err(set);
            assert!(err.to_string().contains(key), "{set}: {err}");
        }
        std::fs::write(&config, "[data]\ncsv = \"source:a.csv\"\nimages = \"i\"\n").expect("w");
        let err = Config::load(&config, &[]).expect_err("no source");
        assert!(err.to_string().contains("data.source"), "{err}");
    }
}
