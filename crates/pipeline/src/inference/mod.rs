//! Using a trained run: `predict` labels new images, `evaluate` scores a labelled dataset.
//! Both label images the same way (`predict`'s `TrainedRun` and `score`).

pub mod evaluate;
pub mod predict;
