//! The transfer-learning pipeline as a library: the binaries only parse arguments and call one
//! function here. The folders follow the data flow:
//!
//! `config` -> [`data`] (dataset, preprocessing, split; downloads on first use) ->
//! [`features`] (weights, frozen backbones, the feature store, `extract`) -> [`models`]
//! (heads, CNN baseline, fine-tuned block 5) -> [`training`] (the loop, `train-head`,
//! `train-cnn`) -> [`reporting`] (run directories, charts, the comparison) and
//! [`inference`] (`predict`).

pub mod allocator;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod features;
pub mod inference;
pub mod models;
pub(crate) mod progress;
pub mod reporting;
pub mod training;

pub use config::Config;
pub use data::{Dataset, Preprocessing, Sample};
pub use error::{Error, Result};
pub use features::{
    BackboneOptions, CacheKey, EfficientNetLite0, FeatureSet, RowMap, Store, Vgg16Features,
    Weights, WeightsSource,
};
