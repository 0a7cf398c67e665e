//! A delta sketch: a seeded CountSketch (a sparse random projection) of a weight delta. It
//! keeps inner products approximately, so the cosine of two sketches estimates the cosine
//! of two deltas — enough to find a copy with a little noise added — in a few thousand
//! numbers, at O(parameters) cost.

/// A fixed-length projection of a weight delta.
pub type Sketch = Vec<f32>;

/// splitmix64: a cheap, well-mixed hash of the element's global index.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Adds `values` (elements `offset..`) of a delta into `sketch`.
pub(crate) fn accumulate(sketch: &mut [f32], offset: u64, values: &[f32]) {
    let dim = sketch.len() as u64;
    if dim == 0 {
        return;
    }
    for (i, v) in values.iter().enumerate() {
        let h = mix(offset.wrapping_add(i as u64));
        let bucket = (h % dim) as usize;
        if h & (1 << 63) == 0 {
            sketch[bucket] += v;
        } else {
            sketch[bucket] -= v;
        }
    }
}

/// Cosine similarity of two sketches (shared with the engine, which compares them).
pub use tunenet_types::sketch_cosine as cosine;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sketch_cosine_tracks_true_cosine() {
        let n: u64 = 50_000;
        let a: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let noise: Vec<f32> = (0..n)
            .map(|i| ((i * 104_729 % 997) as f32 / 498.5 - 1.0) * 0.05)
            .collect();
        let b: Vec<f32> = a.iter().zip(&noise).map(|(x, e)| x + e).collect();
        let other: Vec<f32> = (0..n)
            .map(|i| ((i * 31 % 1009) as f32 / 504.5) - 1.0)
            .collect();
        let sk = |v: &[f32]| {
            let mut s = vec![0f32; 2048];
            accumulate(&mut s, 0, v);
            s
        };
        assert!(cosine(&sk(&a), &sk(&b)) > 0.98);
        assert!(cosine(&sk(&a), &sk(&other)).abs() < 0.2);
    }
}
