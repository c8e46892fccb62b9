//! The transfer-learning pipeline as a library: the binaries only parse arguments and call
//! one function here. Modules follow the data flow: config -> dataset -> preprocess ->
//! weights -> backbone -> store (feature cache) -> extract.

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
pub mod head;
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
pub use store::{FeatureSet, FeatureStore, Manifest};
pub use weights::{Weights, WeightsSource};
