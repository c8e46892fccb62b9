//! bf16 rounding: keep an f32's sign, exponent and top 7 mantissa bits, rounding to nearest even.
//!
//! The bf16 mode rounds weights and every activation to bf16 and accumulates in f32. A product
//! of two bf16 values is exact in f32, so this is the arithmetic of a bf16 dot product with f32
//! accumulation (AVX512_BF16's `vdpbf16ps`), up to summation order.

/// Rounds `x` to the nearest bf16 (ties to even), returned as the f32 with the same value.
/// NaN stays NaN; values that round past the largest bf16 become infinity, as in hardware.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let bits = x.to_bits();
    let lsb = (bits >> 16) & 1;
    let rounded = bits.wrapping_add(0x7fff + lsb) & 0xffff_0000;
    f32::from_bits(rounded)
}

/// [`round_bf16`] over a slice, in place.
pub fn round_slice_bf16(xs: &mut [f32]) {
    for x in xs {
        *x = round_bf16(*x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_even() {
        assert_eq!(round_bf16(1.0), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: goes up.
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        assert_eq!(round_bf16(-2.5), -2.5);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
        let x = 0.123_456_79_f32;
        assert!((round_bf16(x) - x).abs() <= x * 2f32.powi(-8));
    }
}
