//! A plain, obviously-correct convolution used as the oracle in tests: NCHW, f64 accumulation,
//! loops straight from the definition (PyTorch's cross-correlation, zero padding 1).

/// `maxpool2x2?(ReLU(conv3x3(x) + b))` on an NCHW batch.
///
/// # Shapes
/// `input`: `[batch, cin, h, w]`, `weight`: `[cout, cin, 3, 3]`, `bias`: `[cout]` ->
/// `[batch, cout, ho, wo]` with `(ho, wo) = (h, w)`, or `(h / 2, w / 2)` with `pool`.
///
/// # Panics
/// If a slice length does not match its shape.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_relu_nchw(
    input: &[f32],
    batch: usize,
    cin: usize,
    h: usize,
    w: usize,
    weight: &[f32],
    bias: &[f32],
    cout: usize,
    pool: bool,
) -> Vec<f32> {
    assert_eq!(input.len(), batch * cin * h * w);
    assert_eq!(weight.len(), cout * cin * 9);
    assert_eq!(bias.len(), cout);
    let mut conv = vec![0.0f32; batch * cout * h * w];
    for n in 0..batch {
        for o in 0..cout {
            for y in 0..h {
                for x in 0..w {
                    let mut s = f64::from(bias[o]);
                    for i in 0..cin {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (iy, ix) = (y + ky, x + kx);
                                if iy < 1 || ix < 1 || iy > h || ix > w {
                                    continue;
                                }
                                let v = input[((n * cin + i) * h + iy - 1) * w + ix - 1];
                                let k = weight[((o * cin + i) * 3 + ky) * 3 + kx];
                                s += f64::from(v) * f64::from(k);
                            }
                        }
                    }
                    conv[((n * cout + o) * h + y) * w + x] = (s as f32).max(0.0);
                }
            }
        }
    }
    if !pool {
        return conv;
    }
    let (ho, wo) = (h / 2, w / 2);
    let mut out = vec![0.0f32; batch * cout * ho * wo];
    for nc in 0..batch * cout {
        for y in 0..ho {
            for x in 0..wo {
                let at = |dy: usize, dx: usize| conv[(nc * h + 2 * y + dy) * w + 2 * x + dx];
                out[(nc * ho + y) * wo + x] = at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1));
            }
        }
    }
    out
}
