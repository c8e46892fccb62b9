//! The transfer-learning pipeline as a library: the binaries only parse arguments and call
//! one function here. Modules follow the data flow: config -> dataset -> preprocess ->
//! weights -> backbone -> store (content-addressed feature store) -> extract; `fetch`
//! downloads missing data and weights on first use.

pub mod allocator;
pub mod backbone;
pub mod cli;
pub mod cnn;
pub mod config;
pub mod dataset;
pub mod device;
pub mod efficientnet;
pub mod error;
pub mod extract;
pub mod fetch;
pub mod finetune;
pub mod head;
pub mod logistic;
pub mod metrics;
pub mod nhwc;
pub mod ops;
pub mod params;
pub mod plot;
pub mod predict;
pub mod preprocess;
pub mod progress;
pub mod report;
pub mod rng;
pub mod runs;
pub mod scaling;
pub mod split;
pub mod store;
pub mod study;
pub mod train;
pub mod weights;

pub use backbone::Vgg16Features;
pub use config::Config;
pub use dataset::{Dataset, Sample};
pub use efficientnet::EfficientNetLite0;
pub use error::{Error, Result};
pub use preprocess::Preprocessing;
pub use store::{CacheKey, FeatureSet, RowMap, Store};
pub use weights::{Weights, WeightsSource};
