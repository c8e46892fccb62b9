//! Frozen backbones and their cached features: weights (local or from the hub), the backbones
//! (VGG16's conv base; EfficientNet-Lite0) with their engines, the content-addressed feature
//! store, `extract`, which fills the store, and the augmented views it can extract.

pub(crate) mod backbone;
pub mod efficientnet;
pub mod extract;
pub mod nhwc;
pub mod parts;
pub mod store;
pub mod views;
pub(crate) mod weights;

pub use backbone::{load_layer, BackboneOptions, CandleVgg, Vgg16Features};
pub use efficientnet::EfficientNetLite0;
pub use store::{CacheKey, FeatureSet, RowMap, Store};
pub use weights::{Weights, WeightsSource};
