//! The trainable models and what they are made of: the feature heads (linear, MLP,
//! cross-validated logistic regression, with feature scaling), the from-scratch CNN baseline,
//! VGG16's block 5 fine-tuned with a head, the parameter registry they share, and their
//! custom CPU ops with hand-written backward passes.

pub(crate) mod cnn;
pub(crate) mod finetune;
pub mod gemm_conv;
pub(crate) mod head;
pub mod logistic;
pub mod ops;
pub(crate) mod params;
pub(crate) mod scaling;

pub use cnn::{conv3x3, load_images, max_pool2x2, Cnn, CnnShape};
pub use finetune::{Block5Head, Block5Shape};
pub use head::{Head, HeadShape, MLP_HIDDEN};
pub use params::{Params, SavedState};
pub use scaling::{Scaler, Scaling};
