//! The crate's one error type.

/// Everything that can go wrong when building or running the fast path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A buffer had the wrong number of elements for the shape it was declared with.
    #[error("{what}: expected {expected} elements, got {got}")]
    Length {
        /// Which argument.
        what: String,
        /// Elements implied by the shape.
        expected: usize,
        /// Elements supplied.
        got: usize,
    },
    /// A shape that the kernels cannot handle (zero sizes, wrong layer count, image too small).
    #[error("bad shape: {0}")]
    Shape(String),
    /// The safetensors file could not be read or lacked a tensor.
    #[error("weights, tensor `{tensor}`: {message}")]
    Weights {
        /// Tensor name (`features.0.weight`), or empty for a whole-file problem.
        tensor: String,
        /// What was wrong.
        message: String,
    },
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Checks that `got == expected`, naming the argument in the error.
pub(crate) fn check_len(what: &str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::Length {
            what: what.to_string(),
            expected,
            got,
        })
    }
}
