//! Where labelled images come from and how they become network inputs: the dataset (a label
//! CSV or class folders, fetched on first use when the config names a source), the
//! preprocessing recipe (decode, resize, normalise), and the train/validation split.

pub(crate) mod dataset;
pub mod fetch;
pub(crate) mod preprocess;
pub(crate) mod split;

pub use dataset::{
    content_hashes, content_hashes_within, hex, ContentHash, Dataset, InputLimits, Sample,
};
pub use preprocess::{Partial, Preprocessing, IMAGENET_MEAN, IMAGENET_STD};
pub use split::{stratified_split, Split};
