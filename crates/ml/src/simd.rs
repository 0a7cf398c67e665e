//! A vectorised `exp` for the fused kernels' hot loops: the cross-entropy's pass over the
//! vocabulary, SiLU and softmax. Profiled on SmolLM2 evaluation, glibc's scalar `expf`
//! was the largest cost after the matrix products (`docs/BENCHMARKS.md`).
//!
//! Release builds target plain x86-64, so the AVX2 path is chosen at run time (the CPU
//! is asked once) and compiled for AVX2 + FMA with `#[target_feature]`; elsewhere, and
//! on CPUs without them, it is the standard library's `exp`.
//!
//! The method is Cephes' `expf`: `x = n ln 2 + r` with `|r| <= ln 2 / 2` (ln 2 split in
//! two constants so `r` is exact), a degree-7 polynomial for `e^r`, and `2^n` built in
//! the exponent bits. Within 2 ulp of the correctly rounded result over the whole range
//! (tested below against `f64::exp`); below -87.3 the result is exactly 0 and above 88.7
//! it is about 2.2e38, never infinite for finite input; NaN stays NaN.

/// `e^x` for every value of `xs`, in place.
pub(crate) fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe { avx2::exp_in_place(xs) };
        return;
    }
    xs.iter_mut().for_each(|x| *x = exp_scalar(*x));
}

/// `e^(x - shift)` for every value of `xs` written to `out` (of the same length), and
/// their sum: softmax's and log-sum-exp's inner loop.
pub(crate) fn exp_shifted_sum(xs: &[f32], shift: f32, out: &mut [f32]) -> f32 {
    assert_eq!(xs.len(), out.len(), "exp_shifted_sum: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { avx2::exp_shifted_sum(xs, shift, out) };
    }
    let mut sum = 0f32;
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = exp_scalar(x - shift);
        sum += *o;
    }
    sum
}

/// The sum of `e^(x - shift)` over `xs`, without writing the values.
pub(crate) fn exp_shifted_total(xs: &[f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { avx2::exp_shifted_total(xs, shift) };
    }
    xs.iter().map(|&x| exp_scalar(x - shift)).sum()
}

/// The largest value of `xs` (`-inf` for none).
pub(crate) fn max(xs: &[f32]) -> f32 {
    xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

/// Below this `e^x` is 0 (its true value is under f32's smallest normal).
const LOWEST: f32 = -87.33654;
/// Inputs above this are clamped (`e^x` is then about 2.2e38, finite).
const HIGHEST: f32 = 88.3;

/// The scalar path: the same polynomial as the vector one, so both give the same bits.
fn exp_scalar(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x < LOWEST {
        return 0.0;
    }
    let x = x.min(HIGHEST);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let p = poly(r);
    let scale = f32::from_bits((((n as i32) + 127) as u32) << 23);
    p * scale
}

const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5, // Cephes: 5.0000001201e-1, which rounds to 0.5 in f32
];

/// `e^r` for `|r| <= ln 2 / 2`: `1 + r + r² p(r)`.
fn poly(r: f32) -> f32 {
    let mut y = P[0];
    for c in &P[1..] {
        y = y.mul_add(r, *c);
    }
    (y * r).mul_add(r, r) + 1.0
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{HIGHEST, LN2_HI, LN2_LO, LOWEST, P, exp_scalar};
    use std::arch::x86_64::*;

    /// `e^x` of eight lanes; lanes below [`LOWEST`] give 0, NaN lanes stay NaN.
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(LOWEST));
        let xc = _mm256_min_ps(x, _mm256_set1_ps(HIGHEST));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut y = _mm256_set1_ps(P[0]);
        for c in &P[1..] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_add_ps(
            _mm256_fmadd_ps(_mm256_mul_ps(y, r), r, r),
            _mm256_set1_ps(1.0),
        );
        let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        let v = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
        let v = _mm256_andnot_ps(under, v);
        _mm256_blendv_ps(v, x, nan)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_in_place(xs: &mut [f32]) {
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: `c` holds exactly eight f32s.
            unsafe {
                let v = exp8(_mm256_loadu_ps(c.as_ptr()));
                _mm256_storeu_ps(c.as_mut_ptr(), v);
            }
        }
        chunks
            .into_remainder()
            .iter_mut()
            .for_each(|x| *x = exp_scalar(*x));
    }

    /// The eight lanes' sum.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted_sum(xs: &[f32], shift: f32, out: &mut [f32]) -> f32 {
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let n8 = xs.len() / 8 * 8;
        for i in (0..n8).step_by(8) {
            // SAFETY: `i + 8 <= n8 <= len` for both slices (their lengths are equal).
            unsafe {
                let v = exp8(_mm256_sub_ps(_mm256_loadu_ps(xs.as_ptr().add(i)), s));
                _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
                acc = _mm256_add_ps(acc, v);
            }
        }
        let mut sum = hsum(acc);
        for i in n8..xs.len() {
            out[i] = exp_scalar(xs[i] - shift);
            sum += out[i];
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted_total(xs: &[f32], shift: f32) -> f32 {
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = xs.chunks_exact(8);
        for c in &mut chunks {
            // SAFETY: `c` holds exactly eight f32s.
            let v = unsafe { exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), s)) };
            acc = _mm256_add_ps(acc, v);
        }
        let mut sum = hsum(acc);
        for &x in chunks.remainder() {
            sum += exp_scalar(x - shift);
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite f32s of one sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    /// Every 997th f32 from -87 to 88 (about two million values): the vector path, the
    /// scalar path and the correctly rounded `e^x` agree within 2 ulp.
    #[test]
    fn exp_is_within_two_ulp_over_the_range() {
        let mut xs = Vec::new();
        let mut b = (-87.0f32).to_bits();
        while f32::from_bits(b) < 0.0 {
            xs.push(f32::from_bits(b));
            b -= 997;
        }
        let mut b = 0u32;
        while f32::from_bits(b) < 88.0 {
            xs.push(f32::from_bits(b));
            b += 997;
        }
        let mut v = xs.clone();
        exp_in_place(&mut v);
        for (&x, &y) in xs.iter().zip(&v) {
            let want = (x as f64).exp() as f32;
            if want < f32::MIN_POSITIVE {
                continue; // subnormal results: the fast path flushes them
            }
            let d = ulps(y, want);
            assert!(d <= 2, "exp({x}) = {y}, want {want} ({d} ulp)");
            assert_eq!(
                y.to_bits(),
                exp_scalar(x).to_bits(),
                "exp({x}): the paths differ"
            );
        }
        assert!(xs.len() > 500_000, "{} values", xs.len());
    }

    #[test]
    fn exp_edges_are_zero_finite_or_nan() {
        let mut v = vec![
            -1e9,
            -88.0,
            f32::NEG_INFINITY,
            0.0,
            100.0,
            f32::INFINITY,
            f32::NAN,
            1.0,
            -0.0,
        ];
        exp_in_place(&mut v);
        assert_eq!(&v[..4], &[0.0, 0.0, 0.0, 1.0]);
        assert!(v[4].is_finite() && v[4] > 1e38 && v[5].is_finite());
        assert!(v[6].is_nan());
        assert!((v[7] - std::f32::consts::E).abs() < 1e-6 && v[8] == 1.0);
    }

    /// The shifted sums equal the sum of the written values, on lengths that leave
    /// remainders after the eight-lane loop.
    #[test]
    fn shifted_sums_match_the_values() {
        for n in [0, 1, 7, 8, 9, 1001] {
            let xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
            let shift = max(&xs).max(0.0);
            let mut out = vec![0.0; n];
            let s = exp_shifted_sum(&xs, shift, &mut out);
            let t = exp_shifted_total(&xs, shift);
            let want: f64 = xs.iter().map(|&x| ((x - shift) as f64).exp()).sum();
            assert!(
                (s as f64 - want).abs() <= 1e-5 * want.max(1.0),
                "{n}: {s} vs {want}"
            );
            assert!((t - s).abs() <= 1e-5 * s.max(1.0), "{n}: {t} vs {s}");
            for (o, &x) in out.iter().zip(&xs) {
                assert_eq!(o.to_bits(), exp_scalar(x - shift).to_bits());
            }
        }
    }
}
