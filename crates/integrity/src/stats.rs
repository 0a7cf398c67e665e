//! The statistics behind the "trained on this job's data" checks: a one-sided
//! Mann–Whitney U test, exact for small untied samples and normal-approximated (with tie
//! and continuity corrections) otherwise, and robust location and spread.
//!
//! Why Mann–Whitney: the groups it compares (a miner's assigned canaries against
//! never-released siblings, its assigned records against the shard's unassigned ones) are
//! split at random by the validator, so under "the model did not train on these records"
//! the per-record values are exchangeable between the groups and the rank test's null
//! holds exactly, whatever the (skewed, multi-modal) distribution of per-record losses.
//! A t-test would lean on normality at n ≈ 6–10, which per-record losses do not have.
use tunenet_types::stats::erfc;

/// A one-sided Mann–Whitney U test of "x tends to be larger than y".
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MannWhitney {
    /// U: pairs (x, y) with x > y, ties counting one half.
    pub u: f64,
    /// U / (|x|·|y|): the estimated P(X > Y); 0.5 under the null.
    pub effect: f64,
    /// The one-sided p-value P(U' ≥ U) under the null.
    pub p: f64,
    /// Whether `p` is exact (small samples without ties) or a normal approximation.
    pub exact: bool,
}

/// Largest |x|·|y| for which the exact null distribution is computed.
const EXACT_MAX_PAIRS: usize = 2500;

/// One-sided Mann–Whitney U test that values in `x` tend to exceed those in `y`. Non-finite
/// values are dropped; with an empty group the p-value is 1 (no evidence).
pub fn mann_whitney_greater(x: &[f64], y: &[f64]) -> MannWhitney {
    let x: Vec<f64> = x.iter().copied().filter(|v| v.is_finite()).collect();
    let y: Vec<f64> = y.iter().copied().filter(|v| v.is_finite()).collect();
    let (m, n) = (x.len(), y.len());
    if m == 0 || n == 0 {
        return MannWhitney {
            u: 0.0,
            effect: 0.5,
            p: 1.0,
            exact: true,
        };
    }
    let mut u = 0f64;
    for a in &x {
        for b in &y {
            if a > b {
                u += 1.0;
            } else if a == b {
                u += 0.5;
            }
        }
    }
    let mut all: Vec<f64> = x.iter().chain(y.iter()).copied().collect();
    all.sort_by(f64::total_cmp);
    let mut tie_term = 0f64;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1] == all[i] {
            j += 1;
        }
        let t = (j - i + 1) as f64;
        tie_term += t * t * t - t;
        i = j + 1;
    }
    let pairs = m * n;
    let effect = u / pairs as f64;
    if tie_term == 0.0 && pairs <= EXACT_MAX_PAIRS {
        return MannWhitney {
            u,
            effect,
            p: exact_upper_tail(m, n, u.round() as usize),
            exact: true,
        };
    }
    let total = (m + n) as f64;
    let mean = pairs as f64 / 2.0;
    let var = pairs as f64 / 12.0 * ((total + 1.0) - tie_term / (total * (total - 1.0)));
    let p = if var <= 0.0 {
        1.0
    } else {
        let z = (u - mean - 0.5) / var.sqrt();
        0.5 * erfc(z / std::f64::consts::SQRT_2)
    };
    MannWhitney {
        u,
        effect,
        p: p.clamp(0.0, 1.0),
        exact: false,
    }
}

/// P(U ≥ u) for group sizes m and n under the null, by counting rank arrangements:
/// the number of arrangements with statistic u obeys f(m, n, u) = f(m−1, n, u−n) + f(m, n−1, u).
fn exact_upper_tail(m: usize, n: usize, u: usize) -> f64 {
    let max_u = m * n;
    // counts[j][k]: arrangements of i x's and j y's with statistic k, for the current i.
    let mut prev: Vec<Vec<f64>> = (0..=n)
        .map(|_| {
            let mut v = vec![0f64; max_u + 1];
            v[0] = 1.0;
            v
        })
        .collect();
    for _i in 1..=m {
        let mut cur: Vec<Vec<f64>> = vec![vec![0f64; max_u + 1]; n + 1];
        cur[0][0] = 1.0;
        for j in 1..=n {
            for k in 0..=max_u {
                // The largest value is an x (beating all j y's) or a y (beating nothing).
                let from_x = if k >= j { prev[j][k - j] } else { 0.0 };
                cur[j][k] = from_x + cur[j - 1][k];
            }
        }
        prev = cur;
    }
    let dist = &prev[n];
    let total: f64 = dist.iter().sum();
    let tail: f64 = dist.iter().skip(u.min(max_u + 1)).sum();
    if total > 0.0 { tail / total } else { 1.0 }
}

/// Median of the finite values (None if there are none).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let k = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[k]
    } else {
        (v[k - 1] + v[k]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_p_values_match_the_tables() {
        // 3 vs 3, complete separation: 1 arrangement of C(6,3) = 20.
        let r = mann_whitney_greater(&[4.0, 5.0, 6.0], &[1.0, 2.0, 3.0]);
        assert_eq!(r.u, 9.0);
        assert!(r.exact);
        assert!((r.p - 0.05).abs() < 1e-12, "{r:?}");
        // The other direction is as unlikely as it gets: p = 1.
        let r = mann_whitney_greater(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]);
        assert!((r.p - 1.0).abs() < 1e-12);
        // 4 vs 4 with U = 14: P(U ≥ 14) = 4/70 (U = 16, 15, 14, 14).
        let r = mann_whitney_greater(&[3.0, 6.0, 7.0, 8.0], &[1.0, 2.0, 4.0, 5.0]);
        assert_eq!(r.u, 14.0);
        assert!((r.p - 4.0 / 70.0).abs() < 1e-12, "{r:?}");
    }

    #[test]
    fn normal_approximation_agrees_with_the_exact_test_and_handles_ties() {
        let x: Vec<f64> = (0..30).map(|i| i as f64 + 3.0).collect();
        let y: Vec<f64> = (0..30).map(|i| i as f64 + 0.5).collect();
        let exact = mann_whitney_greater(&x, &y);
        // One tie (x[0] = y[2] = 3.0) moves U by a half and forces the approximation.
        let mut tied = y.clone();
        tied[2] = x[0];
        let approx = mann_whitney_greater(&x, &tied);
        assert!(exact.exact && !approx.exact);
        assert!(exact.p > 0.1 && exact.p < 0.5, "{exact:?}");
        assert!((exact.p - approx.p).abs() < 0.05, "{exact:?} {approx:?}");
        assert_eq!(mann_whitney_greater(&[], &[1.0]).p, 1.0);
        assert_eq!(mann_whitney_greater(&[f64::NAN], &[1.0]).p, 1.0);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN]), None);
    }
}
