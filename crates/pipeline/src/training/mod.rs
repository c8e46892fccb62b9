//! Training: the one loop every model goes through (Adam, schedules, early stopping), the
//! seeded random generator, the metrics, and the study's commands (`train-head`, `train-cnn`)
//! that tie the split, the models and the run directories together.

pub(crate) mod fit;
pub(crate) mod metrics;
pub(crate) mod rng;
pub mod study;

pub use fit::{
    evaluate, fit, learning_rate, predict, probabilities, EpochRecord, History, Labelled, Model,
    Rows, TrainOptions,
};
pub use metrics::{argmax_rows, ConfusionMatrix, Metrics};
pub use rng::Rng;
