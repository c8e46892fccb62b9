//! Every fast kernel against the plain reference convolution (`fastconv::reference`, f64
//! accumulation) on random shapes: odd sizes, 1 and 3 input channels, batch 1 and 7, with and
//! without the fused max-pool.
//!
//! Bounds: f32 path `max|diff| / max|ref| <= 1e-5` (the exactness bound; observed
//! ~1e-7); bf16 path `<= 1e-2`.

use fastconv::{conv3x3_relu_nchw, reference, Algorithm, Conv3x3, Tile};

/// A small deterministic generator (SplitMix64), so failures reproduce without a `rand` dep.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
}

fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let max_ref = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let max_diff = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    if max_ref == 0.0 {
        max_diff
    } else {
        max_diff / max_ref
    }
}

/// Random input, weights and bias (drawn in that order), the layer `build` makes from the
/// weights and bias, and its error against the reference: `max|diff| / max|ref|`.
#[allow(clippy::too_many_arguments)]
fn random_layer_error(
    rng: &mut Rng,
    batch: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    pool: bool,
    build: impl FnOnce(&[f32], &[f32]) -> Conv3x3,
) -> (f32, Conv3x3) {
    let input = rng.vec(batch * cin * h * w);
    let weight: Vec<f32> = rng.vec(cout * cin * 9);
    // A positive bias shift keeps about half the ReLU outputs alive.
    let bias: Vec<f32> = rng.vec(cout).iter().map(|b| b * 0.5).collect();
    let layer = build(&weight, &bias);
    let got = conv3x3_relu_nchw(&layer, &input, batch, h, w, pool).expect("fast conv");
    let want = reference::conv3x3_relu_nchw(&input, batch, cin, h, w, &weight, &bias, cout, pool);
    (rel_err(&got, &want), layer)
}

#[allow(clippy::too_many_arguments)]
fn check(
    rng: &mut Rng,
    batch: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    pool: bool,
    bf16: bool,
) {
    check_kernel(rng, batch, cin, cout, h, w, pool, bf16, false);
    check_kernel(rng, batch, cin, cout, h, w, pool, bf16, true);
}

/// One shape on one kernel: the automatic choice (the direct AVX2 kernel where the CPU and
/// `cout % 16 == 0` allow), or with `gemm_only` the `gemm` crate path.
#[allow(clippy::too_many_arguments)]
fn check_kernel(
    rng: &mut Rng,
    batch: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    pool: bool,
    bf16: bool,
    gemm_only: bool,
) {
    let (err, layer) = random_layer_error(rng, batch, cin, cout, h, w, pool, |weight, bias| {
        let layer = Conv3x3::new(weight, bias, cin, cout, bf16).expect("layer");
        if gemm_only {
            layer.gemm_only()
        } else {
            layer
        }
    });
    let bound = if bf16 { 1e-2 } else { 1e-5 };
    assert!(
        err <= bound,
        "batch {batch} cin {cin} cout {cout} {h}x{w} pool {pool} bf16 {bf16} direct {}: rel err {err:e} > {bound:e}",
        layer.uses_direct_kernel()
    );
}

#[test]
fn f32_matches_reference_on_random_shapes() {
    let mut rng = Rng(1);
    for &batch in &[1, 7] {
        for &cin in &[1, 3, 16, 67] {
            for &pool in &[false, true] {
                let (h, w) = (rng.range(1, 19), rng.range(1, 19));
                let cout = rng.range(1, 40);
                check(&mut rng, batch, cin, cout, h, w, pool, false);
            }
        }
    }
}

#[test]
fn f32_odd_sizes_and_floor_pooling() {
    let mut rng = Rng(2);
    for &(h, w) in &[
        (1, 1),
        (1, 7),
        (7, 1),
        (3, 5),
        (9, 13),
        (2, 2),
        (5, 5),
        (31, 3),
    ] {
        for &pool in &[false, true] {
            check(&mut rng, 1, 3, 5, h, w, pool, false);
            check(&mut rng, 7, 1, 8, h, w, pool, false);
        }
    }
}

#[test]
fn f32_large_layer_spans_many_chunks() {
    // 600 + 2 columns > the 512-position chunk target, so every chunk is one row; 57 rows give
    // a ragged last chunk, and many channels exercise the gemm crate's blocking.
    let mut rng = Rng(3);
    check(&mut rng, 1, 64, 70, 5, 600, false, false);
    check(&mut rng, 1, 130, 33, 57, 21, true, false);
    check(&mut rng, 2, 256, 64, 14, 14, true, false);
}

#[test]
fn direct_kernel_matches_reference() {
    // cout a multiple of 16 selects the direct kernel (where AVX2+FMA exist); cin 130 and 257
    // cross its 128-channel blocks, odd sizes give ragged 6-position tiles.
    let mut rng = Rng(5);
    for &(batch, cin, cout, h, w, pool) in &[
        (1, 8, 16, 5, 7, false),
        (7, 13, 32, 9, 3, true),
        (1, 130, 48, 11, 13, true),
        (1, 257, 16, 6, 5, false),
        (7, 64, 64, 7, 7, true),
    ] {
        let weight = rng.vec(cout * cin * 9);
        let layer = Conv3x3::new(&weight, &vec![0.0; cout], cin, cout, false).expect("layer");
        assert_eq!(layer.uses_direct_kernel(), fastconv::direct::available());
        check(&mut rng, batch, cin, cout, h, w, pool, false);
    }
}

#[test]
fn bf16_within_one_percent() {
    let mut rng = Rng(4);
    for &(batch, cin, h, w, pool) in &[
        (1, 1, 9, 7, true),
        (7, 3, 11, 5, false),
        (1, 64, 14, 14, true),
    ] {
        check(&mut rng, batch, cin, 32, h, w, pool, true);
    }
}

#[test]
fn rejects_wrong_lengths() {
    assert!(Conv3x3::new(&[0.0; 26], &[0.0], 3, 1, false).is_err());
    assert!(Conv3x3::new(&[0.0; 27], &[0.0; 2], 3, 1, false).is_err());
    let layer = Conv3x3::new(&[0.0; 27], &[0.0], 3, 1, false).expect("layer");
    assert!(conv3x3_relu_nchw(&layer, &[0.0; 10], 1, 2, 2, false).is_err());
}

/// One shape under a Winograd variant: the error against the f64 reference, relative to
/// `max|ref|`, and whether the layer really ran Winograd (else it fell back to direct).
#[allow(clippy::too_many_arguments)]
fn winograd_error(
    rng: &mut Rng,
    tile: Tile,
    batch: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    pool: bool,
) -> (f32, bool) {
    let (err, layer) = random_layer_error(rng, batch, cin, cout, h, w, pool, |weight, bias| {
        Conv3x3::with_algorithm(weight, bias, cin, cout, false, Algorithm::Winograd(tile))
            .expect("layer")
    });
    (err, layer.winograd_tile() == Some(tile))
}

/// Per-variant exactness bounds for random layers (`max|diff| / max|ref|`): F(2x2) uses only
/// 0, ±1, ±1/2 and stays near the direct sum; F(4x4)'s constants up to 8 cost about a decimal.
fn winograd_bound(tile: Tile) -> f32 {
    match tile {
        Tile::F2x2 => 1e-5,
        Tile::F4x4 => 1e-4,
    }
}

#[test]
fn winograd_matches_reference_on_random_shapes() {
    let mut rng = Rng(6);
    for tile in [Tile::F2x2, Tile::F4x4] {
        let mut worst = 0.0f32;
        // Odd sizes and sizes that are not a multiple of the tile (overhanging tiles), 1x1 and
        // 2x2 images, floor pooling of odd sizes, batch 1 and 7, cin crossing the 8-channel
        // groups of the input transform, ragged 6-tile groups.
        for &(batch, cin, cout, h, w, pool) in &[
            (1, 8, 16, 5, 7, false),
            (7, 13, 32, 9, 3, true),
            (1, 130, 48, 11, 13, true),
            (1, 64, 16, 14, 14, false),
            (7, 9, 16, 1, 1, false),
            (1, 16, 16, 2, 2, true),
            (1, 24, 32, 3, 3, true),
            (1, 17, 16, 31, 6, false),
            (2, 32, 64, 28, 28, true),
            (1, 256, 32, 14, 14, false),
        ] {
            let (err, ran) = winograd_error(&mut rng, tile, batch, cin, cout, h, w, pool);
            assert!(ran, "{tile:?} should run on cin {cin} cout {cout}");
            println!("{tile:?} batch {batch} cin {cin} cout {cout} {h}x{w} pool {pool}: {err:e}");
            assert!(
                err <= winograd_bound(tile),
                "{tile:?} batch {batch} cin {cin} cout {cout} {h}x{w} pool {pool}: rel err {err:e}"
            );
            worst = worst.max(err);
        }
        println!(
            "{tile:?}: worst rel err {worst:e} (bound {:e})",
            winograd_bound(tile)
        );
    }
}

#[test]
fn winograd_falls_back_where_it_cannot_run() {
    // 1 and 3 input channels (below the 8 the transform is worth it for) and cout not a
    // multiple of 16 run the direct path, and must still be exact.
    let mut rng = Rng(7);
    for &(batch, cin, cout, h, w, pool) in &[
        (1, 1, 16, 9, 7, true),
        (7, 3, 16, 5, 5, false),
        (1, 16, 20, 6, 6, false),
    ] {
        let (err, ran) = winograd_error(&mut rng, Tile::F2x2, batch, cin, cout, h, w, pool);
        assert!(!ran, "cin {cin} cout {cout} should fall back");
        assert!(err <= 1e-5, "fallback cin {cin} cout {cout}: {err:e}");
    }
}
