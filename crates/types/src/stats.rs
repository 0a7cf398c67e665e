//! Small numeric helpers the validator's statistical tests share.

/// Complementary error function (Numerical Recipes' Chebyshev fit; relative error below
/// 1.2e-7 everywhere), enough for p-values.
pub fn erfc(x: f64) -> f64 {
    const C: [f64; 10] = [
        -1.265_512_23,
        1.000_023_68,
        0.374_091_96,
        0.096_784_18,
        -0.186_288_06,
        0.278_868_07,
        -1.135_203_98,
        1.488_515_87,
        -0.822_152_23,
        0.170_872_77,
    ];
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    // C[0] + t (C[1] + t (C[2] + ...)), by Horner's rule.
    let poly = C.iter().rev().fold(0.0, |acc, c| acc * t + c);
    let r = t * (-z * z + poly).exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

#[cfg(test)]
mod tests {
    #[test]
    fn erfc_matches_known_values() {
        for (x, want) in [
            (0.0, 1.0),
            (0.5, 0.479_500_122),
            (1.0, 0.157_299_207),
            (-1.0, 1.842_700_793),
            (3.0, 2.209_049_7e-5),
        ] {
            let got = super::erfc(x);
            assert!(
                (got - want).abs() <= 1.2e-7 * want.abs().max(1e-3),
                "erfc({x}) = {got}, want {want}"
            );
        }
    }
}
