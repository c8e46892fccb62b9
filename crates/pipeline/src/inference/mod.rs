//! Using a trained run: `predict` labels new images.

pub mod predict;
