//! fastconv's integration tests, in one test executable: every kernel against an f64 reference,
//! and the real VGG16 against the reference features.

mod kernels;
mod parity;
