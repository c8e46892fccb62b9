//! Feature scaling for the heads (`[head] scaling`): fitted on the training rows only, saved
//! with the head, and applied to every feature row the head sees afterwards (validation,
//! prediction).

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How feature rows are scaled before the head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scaling {
    /// As extracted (the study's recipe).
    #[default]
    None,
    /// Per feature: minus the training rows' mean, over their standard deviation (features
    /// constant on the training rows are only centred).
    Standardize,
    /// Per row: divided by its Euclidean norm (rows of zeros stay zero).
    L2,
}

/// A fitted scaling: the statistics of `Standardize`, nothing for the others.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaler {
    pub kind: Scaling,
    /// Per-feature mean and 1/std (`Standardize` only).
    pub mean: Option<Vec<f32>>,
    pub inv_std: Option<Vec<f32>>,
}

impl Scaler {
    /// Fits `kind` on rows `train` of `features` (`[n, dim]`).
    pub fn fit(kind: Scaling, features: &Tensor, train: &[usize]) -> Result<Self> {
        let (mean, inv_std) = match kind {
            Scaling::None | Scaling::L2 => (None, None),
            Scaling::Standardize => {
                if train.is_empty() {
                    return Err(Error::Model {
                        model: "scaling".into(),
                        message: "standardising needs at least one training row".into(),
                    });
                }
                let x = crate::training::fit::select_rows(&features.to_dtype(DType::F64)?, train)?;
                let mean = x.mean(0)?;
                let var = x.broadcast_sub(&mean)?.sqr()?.mean(0)?;
                let mean: Vec<f64> = mean.to_vec1()?;
                let inv_std: Vec<f32> = var
                    .to_vec1::<f64>()?
                    .into_iter()
                    .map(|v| {
                        if v > 1e-24 {
                            (1.0 / v.sqrt()) as f32
                        } else {
                            1.0
                        }
                    })
                    .collect();
                (
                    Some(mean.into_iter().map(|m| m as f32).collect()),
                    Some(inv_std),
                )
            }
        };
        Ok(Self {
            kind,
            mean,
            inv_std,
        })
    }

    /// The identity.
    pub fn none() -> Self {
        Self {
            kind: Scaling::None,
            mean: None,
            inv_std: None,
        }
    }

    /// `features` (`[n, dim]`) scaled, in their dtype and on their device.
    pub fn apply(&self, features: &Tensor) -> Result<Tensor> {
        let dtype = features.dtype();
        match self.kind {
            Scaling::None => Ok(features.clone()),
            Scaling::L2 => {
                let x = features.to_dtype(DType::F32)?;
                let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
                // Rows of zeros: divide by 1 instead of 0.
                let safe = norm.maximum(f32::MIN_POSITIVE as f64)?;
                Ok(x.broadcast_div(&safe)?.to_dtype(dtype)?)
            }
            Scaling::Standardize => {
                let (Some(mean), Some(inv)) = (&self.mean, &self.inv_std) else {
                    return Err(Error::Model {
                        model: "scaling".into(),
                        message: "standardize without statistics".into(),
                    });
                };
                let dim = features.dim(1)?;
                if mean.len() != dim || inv.len() != dim {
                    return Err(Error::Model {
                        model: "scaling".into(),
                        message: format!("statistics of {} features for rows of {dim}", mean.len()),
                    });
                }
                let dev = features.device();
                let m = Tensor::from_slice(mean, (1, dim), dev)?;
                let s = Tensor::from_slice(inv, (1, dim), dev)?;
                Ok(features
                    .to_dtype(DType::F32)?
                    .broadcast_sub(&m)?
                    .broadcast_mul(&s)?
                    .to_dtype(dtype)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(rows: &[[f32; 3]]) -> Tensor {
        Tensor::from_vec(rows.concat(), (rows.len(), 3), &Device::Cpu).expect("t")
    }

    #[test]
    fn standardize_uses_the_training_rows_only() {
        let x = t(&[[1.0, 2.0, 5.0], [3.0, 2.0, 5.0], [100.0, -7.0, 0.0]]);
        let s = Scaler::fit(Scaling::Standardize, &x, &[0, 1]).expect("fit");
        assert_eq!(s.mean.as_deref(), Some(&[2.0, 2.0, 5.0][..]));
        // Feature 0 has std 1 on the training rows; features 1 and 2 are constant there.
        assert_eq!(s.inv_std.as_deref(), Some(&[1.0, 1.0, 1.0][..]));
        let y: Vec<Vec<f32>> = s.apply(&x).expect("apply").to_vec2().expect("rows");
        assert_eq!(
            y,
            vec![
                vec![-1.0, 0.0, 0.0],
                vec![1.0, 0.0, 0.0],
                vec![98.0, -9.0, -5.0]
            ]
        );
    }

    #[test]
    fn l2_normalises_rows_and_keeps_zero_rows() {
        let x = t(&[[3.0, 4.0, 0.0], [0.0, 0.0, 0.0]]);
        let s = Scaler::fit(Scaling::L2, &x, &[0]).expect("fit");
        let y: Vec<Vec<f32>> = s.apply(&x).expect("apply").to_vec2().expect("rows");
        assert_eq!(y, vec![vec![0.6, 0.8, 0.0], vec![0.0, 0.0, 0.0]]);
        let none = Scaler::none().apply(&x).expect("apply");
        assert_eq!(
            none.to_vec2::<f32>().expect("rows"),
            x.to_vec2::<f32>().expect("x")
        );
    }

    #[test]
    fn mismatched_statistics_are_an_error() {
        let x = t(&[[1.0, 2.0, 5.0]]);
        let s = Scaler::fit(Scaling::Standardize, &x, &[0]).expect("fit");
        let y = Tensor::zeros((1, 2), DType::F32, &Device::Cpu).expect("y");
        assert!(s.apply(&y).is_err());
        assert!(Scaler::fit(Scaling::Standardize, &x, &[]).is_err());
    }
}
