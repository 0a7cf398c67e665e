//! A matrix-multiply benchmark whose answers the validator checks without redoing it.
//!
//! The validator sends a secret seed, a size `n`, a dtype and a count `k`. The miner
//! regenerates `A_i`, `B_i` (every entry computable on its own from the seed: a
//! counter-based generator), computes `C_i = A_i B_i` on its device and commits to a
//! blake3 Merkle root over `C_i`'s `tile`×`tile` blocks. Only then does the validator
//! reveal a random vector `r` and random tiles; the miner returns `C_i r` and the opened
//! tiles with their Merkle paths. The validator checks
//!
//! - every opened tile against the committed root (its Merkle path), and recomputes each
//!   opened tile exactly from the seed (`tile² · n` multiply-adds, not `n³`);
//! - Freivalds' identity `C_i r = A_i (B_i r)` (`2n²` multiply-adds), within the
//!   rigorous rounding bound of any summation order.
//!
//! Entries carry the dtype's full significand (24 bits for f32, 8 for bf16, 11 for f16),
//! so a lower-precision path (TF32, bf16 or int8 tensor cores on an f32 challenge) rounds
//! every input and misses the tiles' tolerance by an order of magnitude; the validator's
//! reference is exact (integer arithmetic on the significands). The tiles' tolerance is
//! statistical: `8·√n` f32 roundoffs of the entry's scale `√Σ(a_k b_k)²` (an honest f32
//! sum errs by about `√(n/6)` of them), plus two roundoffs of the value for the stored
//! bf16 or f16 result.
//!
//! What the checks bind: a commitment is fixed before `r` and the tiles are known, so a
//! miner that computed only a fraction `f` of the tiles survives `m` opened tiles with
//! probability at most `f^m`. The returned `C r` is checked against `A(Br)`, which anyone
//! can compute in `O(n²)`: it catches a miner whose committed `C` is wrong and who answers
//! from it, not one who answers `r` honestly from the seed; the tiles carry that part.
//! The time that counts is the validator's, from sending the challenge to receiving the
//! commitment ([`tflops`]); a miner's own report of its time is only compared with it.

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Largest matrix side: keeps the validator's integer recomputation of a tile exact
/// (24 + 24 significand bits per product, at most 2^14 terms).
pub const MAX_N: u32 = 16384;
/// Most matrices in one challenge.
pub const MAX_K: u32 = 64;
/// Most tiles opened per matrix.
pub const MAX_OPEN: u32 = 256;

/// The element type the product is computed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    Bf16,
    F16,
}

impl Dtype {
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::Bf16, Dtype::F16];

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }

    pub fn parse(s: &str) -> Result<Dtype, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Dtype::F32),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "f16" | "fp16" | "float16" | "half" => Ok(Dtype::F16),
            other => Err(format!("unknown dtype `{other}`: use f32, bf16 or f16")),
        }
    }

    /// Significand bits of the generated entries (the format's precision).
    pub fn bits(self) -> u32 {
        match self {
            Dtype::F32 => 24,
            Dtype::Bf16 => 8,
            Dtype::F16 => 11,
        }
    }

    /// Unit roundoff of the stored result: 0 for f32 (its rounding is in the sum's),
    /// 2^-8 for bf16, 2^-11 for f16.
    pub fn output_roundoff(self) -> f64 {
        match self {
            Dtype::F32 => 0.0,
            Dtype::Bf16 => (2f64).powi(-8),
            Dtype::F16 => (2f64).powi(-11),
        }
    }

    fn candle(self) -> DType {
        match self {
            Dtype::F32 => DType::F32,
            Dtype::Bf16 => DType::BF16,
            Dtype::F16 => DType::F16,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The size of one challenge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// Side of every matrix.
    pub n: u32,
    /// Matrices to multiply.
    pub k: u32,
    /// Side of a committed tile; divides `n`.
    pub tile: u32,
    pub dtype: Dtype,
}

impl Spec {
    /// Refuses sizes the checks cannot be exact for or a miner should not be asked for.
    pub fn validate(&self) -> Result<(), String> {
        if self.n < 2 || self.n > MAX_N {
            return Err(format!("n = {} is out of range: 2..={MAX_N}", self.n));
        }
        if self.k == 0 || self.k > MAX_K {
            return Err(format!("k = {} is out of range: 1..={MAX_K}", self.k));
        }
        if self.tile == 0 || self.tile > self.n || !self.n.is_multiple_of(self.tile) {
            return Err(format!(
                "tile = {} must divide n = {} (and be at least 1)",
                self.tile, self.n
            ));
        }
        Ok(())
    }

    /// Floating-point operations of the whole challenge: `2 n³ k`.
    pub fn flops(&self) -> f64 {
        2.0 * (self.n as f64).powi(3) * self.k as f64
    }

    pub fn tiles_per_side(&self) -> u32 {
        self.n / self.tile
    }

    pub fn tiles_per_matrix(&self) -> u32 {
        self.tiles_per_side() * self.tiles_per_side()
    }
}

/// One device's challenge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// Secret until sent: the matrices cannot be computed before.
    pub seed: [u8; 32],
    pub spec: Spec,
    /// The device it is for (its index in the miner's inventory; 0 for a CPU).
    pub device: u32,
}

/// Verified speed from a spec and the validator-timed seconds.
pub fn tflops(spec: &Spec, seconds: f64) -> f64 {
    spec.flops() / seconds.max(1e-9) / 1e12
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator key of matrix `i`'s `A` (`which` = 0) or `B` (1).
pub fn matrix_key(seed: &[u8; 32], device: u32, i: u32, which: u8) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(b"tunenet bench matrix v1");
    h.update(seed);
    h.update(&device.to_le_bytes());
    h.update(&i.to_le_bytes());
    h.update(&[which]);
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Entry `(row, col)` of the matrix with this key, as a signed integer significand of
/// `bits` bits: the value is `m / 2^(bits-1)`, in [-1, 1). Two entries share one 64-bit
/// draw; each is computable on its own.
#[inline]
pub fn entry(key: u64, bits: u32, row: u32, col: u32) -> i32 {
    let word = splitmix64(key ^ (((row as u64) << 32) | (col >> 1) as u64));
    significand(word >> ((col & 1) * 32), bits)
}

#[inline]
fn significand(word: u64, bits: u32) -> i32 {
    ((word as u32) >> (32 - bits)) as i32 - (1 << (bits - 1))
}

/// Row `row` of the matrix with this key, into `out` (its length is `n`).
pub fn fill_row(key: u64, bits: u32, row: u32, out: &mut [i32]) {
    for (chunk, block) in out.chunks_mut(2).zip(0u32..) {
        let word = splitmix64(key ^ (((row as u64) << 32) | block as u64));
        for (j, v) in chunk.iter_mut().enumerate() {
            *v = significand(word >> (j * 32), bits);
        }
    }
}

/// The scale of a significand: `2^-(bits-1)`.
fn unit(bits: u32) -> f64 {
    (2f64).powi(-(bits as i32 - 1))
}

/// A whole matrix, row-major, as f32 (exact: at most 24 significant bits).
fn matrix_f32(key: u64, bits: u32, n: u32) -> Vec<f32> {
    let scale = unit(bits) as f32;
    let mut m = vec![0f32; n as usize * n as usize];
    m.par_chunks_mut(n as usize)
        .enumerate()
        .for_each(|(row, out)| {
            let mut r = vec![0i32; n as usize];
            fill_row(key, bits, row as u32, &mut r);
            for (o, v) in out.iter_mut().zip(r) {
                *o = v as f32 * scale;
            }
        });
    m
}

/// The validator's secret vector `r`: entries in [-2^15, 2^15].
pub fn r_vector(r_seed: &[u8; 32], n: u32) -> Vec<i64> {
    let mut h = blake3::Hasher::new();
    h.update(b"tunenet bench r v1");
    h.update(r_seed);
    let key = u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"));
    (0..n as u64)
        .map(|c| (splitmix64(key ^ c) % 65_537) as i64 - 32_768)
        .collect()
}

/// The hash of one tile's values (f32, little-endian, row-major inside the tile).
pub fn tile_leaf(matrix: u32, index: u32, values: &[f32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"tunenet bench tile v1");
    h.update(&matrix.to_le_bytes());
    h.update(&index.to_le_bytes());
    for v in values {
        h.update(&v.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

fn node(l: &[u8; 32], r: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"tunenet bench node v1");
    h.update(l);
    h.update(r);
    *h.finalize().as_bytes()
}

/// A binary Merkle tree over leaves, padded with zero hashes to a power of two.
pub struct Merkle {
    levels: Vec<Vec<[u8; 32]>>,
}

impl Merkle {
    pub fn new(mut leaves: Vec<[u8; 32]>) -> Merkle {
        let size = leaves.len().max(1).next_power_of_two();
        leaves.resize(size, [0u8; 32]);
        let mut levels = vec![leaves];
        while levels.last().expect("a level").len() > 1 {
            let prev = levels.last().expect("a level");
            let next: Vec<[u8; 32]> = prev.chunks(2).map(|p| node(&p[0], &p[1])).collect();
            levels.push(next);
        }
        Merkle { levels }
    }

    pub fn root(&self) -> [u8; 32] {
        self.levels.last().expect("a level")[0]
    }

    /// Siblings from the leaf up.
    pub fn path(&self, mut index: usize) -> Vec<[u8; 32]> {
        let mut p = Vec::new();
        for level in &self.levels[..self.levels.len() - 1] {
            p.push(level[index ^ 1]);
            index >>= 1;
        }
        p
    }
}

/// Whether `leaf` at `index` hashes up to `root` along `path` (of a tree of `leaves`).
pub fn verify_path(
    leaf: [u8; 32],
    mut index: usize,
    leaves: usize,
    path: &[[u8; 32]],
    root: &[u8; 32],
) -> bool {
    let depth = leaves.max(1).next_power_of_two().trailing_zeros() as usize;
    if path.len() != depth || index >= leaves {
        return false;
    }
    let mut h = leaf;
    for s in path {
        h = if index & 1 == 0 {
            node(&h, s)
        } else {
            node(s, &h)
        };
        index >>= 1;
    }
    &h == root
}

/// Copies tile `index` of a row-major `n`×`n` matrix.
fn tile_of(c: &[f32], spec: &Spec, index: u32) -> Vec<f32> {
    let (t, n) = (spec.tile as usize, spec.n as usize);
    let (ti, tj) = (
        (index / spec.tiles_per_side()) as usize,
        (index % spec.tiles_per_side()) as usize,
    );
    let mut out = Vec::with_capacity(t * t);
    for r in ti * t..(ti + 1) * t {
        out.extend_from_slice(&c[r * n + tj * t..r * n + (tj + 1) * t]);
    }
    out
}

/// The miner's side: the products it keeps until the reveal, and their Merkle trees.
pub struct Computed {
    pub challenge: Challenge,
    products: Vec<Vec<f32>>,
    trees: Vec<Merkle>,
}

impl Computed {
    /// The committed roots, one per matrix.
    pub fn roots(&self) -> Vec<[u8; 32]> {
        self.trees.iter().map(Merkle::root).collect()
    }

    /// Replaces matrix `i`'s product and recommits (the red team's cheats use this).
    pub fn with_product(mut self, i: usize, c: Vec<f32>) -> Computed {
        self.trees[i] = tree_of(&c, &self.challenge.spec, i as u32);
        self.products[i] = c;
        self
    }

    /// Matrix `i`'s product (row-major).
    pub fn product(&self, i: usize) -> &[f32] {
        &self.products[i]
    }
}

fn tree_of(c: &[f32], spec: &Spec, matrix: u32) -> Merkle {
    let leaves: Vec<[u8; 32]> = (0..spec.tiles_per_matrix())
        .into_par_iter()
        .map(|ix| tile_leaf(matrix, ix, &tile_of(c, spec, ix)))
        .collect();
    Merkle::new(leaves)
}

/// Computes every product of the challenge on `device` and commits to them.
pub fn compute(ch: &Challenge, device: &Device) -> Result<Computed, String> {
    compute_in(ch, device, ch.spec.dtype)
}

/// As [`compute`], multiplying in `dtype` whatever the challenge asks (an honest miner
/// uses the challenge's; the red team's cheats use a cheaper one).
pub fn compute_in(ch: &Challenge, device: &Device, dtype: Dtype) -> Result<Computed, String> {
    ch.spec.validate()?;
    let bits = ch.spec.dtype.bits();
    let n = ch.spec.n as usize;
    let mut products = Vec::new();
    let mut trees = Vec::new();
    for i in 0..ch.spec.k {
        let (a, b) = rayon::join(
            || matrix_f32(matrix_key(&ch.seed, ch.device, i, 0), bits, ch.spec.n),
            || matrix_f32(matrix_key(&ch.seed, ch.device, i, 1), bits, ch.spec.n),
        );
        let e = |e: candle_core::Error| format!("the {dtype} product failed: {e}");
        let dt = dtype.candle();
        let a = Tensor::from_vec(a, (n, n), device)
            .and_then(|t| t.to_dtype(dt))
            .map_err(e)?;
        let b = Tensor::from_vec(b, (n, n), device)
            .and_then(|t| t.to_dtype(dt))
            .map_err(e)?;
        let c = a
            .matmul(&b)
            .and_then(|c| c.to_dtype(DType::F32))
            .and_then(|c| c.flatten_all())
            .and_then(|c| c.to_vec1::<f32>())
            .map_err(e)?;
        trees.push(tree_of(&c, &ch.spec, i));
        products.push(c);
    }
    Ok(Computed {
        challenge: ch.clone(),
        products,
        trees,
    })
}

/// Which tile of which matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TileRef {
    pub matrix: u32,
    pub index: u32,
}

/// What the validator reveals after the commitment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reveal {
    pub r_seed: [u8; 32],
    pub tiles: Vec<TileRef>,
}

/// Draws a reveal: a fresh `r` and `open` distinct tiles per matrix.
pub fn draw_reveal(spec: &Spec, open: u32, rng: &mut impl Rng) -> Reveal {
    let open = open.clamp(1, MAX_OPEN).min(spec.tiles_per_matrix());
    let mut tiles = Vec::new();
    for matrix in 0..spec.k {
        let picked = rand::seq::index::sample(rng, spec.tiles_per_matrix() as usize, open as usize);
        let mut ix: Vec<u32> = picked.into_iter().map(|i| i as u32).collect();
        ix.sort_unstable();
        tiles.extend(ix.into_iter().map(|index| TileRef { matrix, index }));
    }
    Reveal {
        r_seed: rng.random(),
        tiles,
    }
}

/// One opened tile with its Merkle path.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpenedTile {
    pub tile: TileRef,
    pub values: Vec<f32>,
    pub path: Vec<[u8; 32]>,
}

/// The miner's answer to a reveal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Opening {
    /// `C_i r` for every matrix, computed in f64 from the committed `C_i`.
    pub products: Vec<Vec<f64>>,
    pub tiles: Vec<OpenedTile>,
}

/// The miner's side of the reveal.
pub fn open(c: &Computed, reveal: &Reveal) -> Result<Opening, String> {
    let spec = &c.challenge.spec;
    let r = r_vector(&reveal.r_seed, spec.n);
    let n = spec.n as usize;
    let products = c
        .products
        .iter()
        .map(|m| {
            m.par_chunks(n)
                .map(|row| row.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum())
                .collect()
        })
        .collect();
    let mut tiles = Vec::new();
    for t in &reveal.tiles {
        if t.matrix >= spec.k || t.index >= spec.tiles_per_matrix() {
            return Err(format!(
                "the reveal asks for tile {} of matrix {}, which does not exist",
                t.index, t.matrix
            ));
        }
        let m = t.matrix as usize;
        tiles.push(OpenedTile {
            tile: *t,
            values: tile_of(&c.products[m], spec, t.index),
            path: c.trees[m].path(t.index as usize),
        });
    }
    Ok(Opening { products, tiles })
}

/// Why an answer failed verification.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Failure {
    #[error("malformed answer: {0}")]
    Malformed(String),
    #[error("tile {index} of matrix {matrix} does not match the committed root")]
    Commitment { matrix: u32, index: u32 },
    #[error(
        "tile {index} of matrix {matrix} is wrong: entry ({row}, {col}) is {got}, the product is {want} (tolerance {tolerance:.3e})"
    )]
    Tile {
        matrix: u32,
        index: u32,
        row: u32,
        col: u32,
        got: f64,
        want: f64,
        tolerance: f64,
    },
    #[error(
        "Freivalds' check failed on matrix {matrix}: (C r)[{row}] is {got}, A(B r) gives {want} (tolerance {tolerance})"
    )]
    Freivalds {
        matrix: u32,
        row: u32,
        got: f64,
        want: f64,
        tolerance: f64,
    },
}

impl Failure {
    /// A short name of the failed check, for logs and the console.
    pub fn check(&self) -> &'static str {
        match self {
            Failure::Malformed(_) => "malformed",
            Failure::Commitment { .. } => "commitment",
            Failure::Tile { .. } => "tile",
            Failure::Freivalds { .. } => "freivalds",
        }
    }
}

/// The validator's side: checks an opening against the committed roots. Costs `2n²`
/// generated entries and multiply-adds per matrix for Freivalds, plus `tile² · n` per
/// opened tile.
pub fn verify(
    ch: &Challenge,
    roots: &[[u8; 32]],
    reveal: &Reveal,
    opening: &Opening,
) -> Result<(), Failure> {
    let spec = &ch.spec;
    spec.validate().map_err(Failure::Malformed)?;
    let (n, k) = (spec.n as usize, spec.k as usize);
    if roots.len() != k {
        return Err(Failure::Malformed(format!(
            "{} roots committed for {k} matrices",
            roots.len()
        )));
    }
    if opening.products.len() != k || opening.products.iter().any(|p| p.len() != n) {
        return Err(Failure::Malformed(format!(
            "C r must be {k} vectors of {n} values"
        )));
    }
    let t = spec.tile as usize;
    if opening.tiles.len() != reveal.tiles.len()
        || opening
            .tiles
            .iter()
            .zip(&reveal.tiles)
            .any(|(o, want)| o.tile != *want || o.values.len() != t * t)
    {
        return Err(Failure::Malformed(format!(
            "the opened tiles must be the {} asked for, in order, {t}×{t} values each",
            reveal.tiles.len()
        )));
    }
    let r = r_vector(&reveal.r_seed, spec.n);
    let bits = spec.dtype.bits();
    let scale = unit(bits) * unit(bits);
    // Any summation order of n f32 terms errs by at most γ_n = n·u/(1 − n·u) of Σ|terms|;
    // the stored result adds its own rounding; f64 arithmetic here adds 2^-40 of slack.
    let u = (2f64).powi(-24);
    let gamma = n as f64 * u / (1.0 - n as f64 * u) + spec.dtype.output_roundoff() + 1e-12;
    for i in 0..spec.k {
        let (ka, kb) = (
            matrix_key(&ch.seed, ch.device, i, 0),
            matrix_key(&ch.seed, ch.device, i, 1),
        );
        // Opened tiles first: cheap, and they bind the commitment.
        for o in opening.tiles.iter().filter(|o| o.tile.matrix == i) {
            let index = o.tile.index;
            let leaf = tile_leaf(i, index, &o.values);
            if !verify_path(
                leaf,
                index as usize,
                spec.tiles_per_matrix() as usize,
                &o.path,
                &roots[i as usize],
            ) {
                return Err(Failure::Commitment { matrix: i, index });
            }
            check_tile(spec, ka, kb, i, index, &o.values)?;
        }
        // Freivalds: B r (exact, in integers), then A (B r), row by row from the seed.
        let br: Vec<(i64, i64)> = (0..spec.n)
            .into_par_iter()
            .map(|row| {
                let mut b = vec![0i32; n];
                fill_row(kb, bits, row, &mut b);
                b.iter().zip(&r).fold((0i64, 0i64), |(s, a), (x, y)| {
                    (s + *x as i64 * y, a + (*x as i64).abs() * y.abs())
                })
            })
            .collect();
        let got = &opening.products[i as usize];
        let bad = (0..spec.n).into_par_iter().find_map_first(|row| {
            let mut a = vec![0i32; n];
            fill_row(ka, bits, row, &mut a);
            let (want, bound) = a.iter().zip(&br).fold((0f64, 0f64), |(s, b), (x, (v, w))| {
                (s + *x as f64 * *v as f64, b + (*x as f64).abs() * *w as f64)
            });
            let (want, bound) = (want * scale, bound * scale);
            let g = got[row as usize];
            let tolerance = gamma * bound;
            let ok = g.is_finite() && (g - want).abs() <= tolerance;
            (!ok).then_some(Failure::Freivalds {
                matrix: i,
                row,
                got: g,
                want,
                tolerance,
            })
        });
        if let Some(f) = bad {
            return Err(f);
        }
    }
    Ok(())
}

/// Recomputes one tile exactly and compares it with the opened values.
fn check_tile(
    spec: &Spec,
    ka: u64,
    kb: u64,
    matrix: u32,
    index: u32,
    values: &[f32],
) -> Result<(), Failure> {
    let (t, n) = (spec.tile as usize, spec.n as usize);
    let bits = spec.dtype.bits();
    let scale = unit(bits) * unit(bits);
    let (ti, tj) = (index / spec.tiles_per_side(), index % spec.tiles_per_side());
    // The tile's columns of B, transposed so that each is contiguous. Significands of at
    // most 24 bits multiply exactly in f64; the f64 sum of at most 2^14 terms errs by
    // under 2^-39 of their magnitude, far inside the tolerance.
    let cols: Vec<Vec<f64>> = (0..spec.tile)
        .map(|c| {
            let col = tj * spec.tile + c;
            (0..spec.n)
                .map(|row| entry(kb, bits, row, col) as f64)
                .collect()
        })
        .collect();
    // Statistical tolerance of the f32 sum, in units of the entry's scale.
    let acc = 8.0 * (n as f64).sqrt() * (2f64).powi(-24);
    let out = 2.0 * spec.dtype.output_roundoff();
    let bad = (0..t).into_par_iter().find_map_first(|lr| {
        let row = ti * spec.tile + lr as u32;
        let mut a = vec![0i32; n];
        fill_row(ka, bits, row, &mut a);
        let a: Vec<f64> = a.into_iter().map(f64::from).collect();
        cols.iter().enumerate().find_map(|(lc, col)| {
            let (sum, sq) = a.iter().zip(col).fold((0f64, 0f64), |(s, q), (x, y)| {
                let p = x * y;
                (s + p, q + p * p)
            });
            let want = sum * scale;
            let tolerance = acc * sq.sqrt() * scale + out * want.abs();
            let got = values[lr * t + lc] as f64;
            (!(got.is_finite() && (got - want).abs() <= tolerance)).then_some(Failure::Tile {
                matrix,
                index,
                row,
                col: tj * spec.tile + lc as u32,
                got,
                want,
                tolerance,
            })
        })
    });
    bad.map_or(Ok(()), Err)
}

/// A GPU model's datasheet peak, dense, TFLOPS (no structured sparsity).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Datasheet {
    pub model: &'static str,
    pub f32: f64,
    pub bf16: Option<f64>,
    pub f16: f64,
}

impl Datasheet {
    pub fn peak(&self, dtype: Dtype) -> Option<f64> {
        match dtype {
            Dtype::F32 => Some(self.f32),
            Dtype::Bf16 => self.bf16,
            Dtype::F16 => Some(self.f16),
        }
    }
}

/// Datasheet figures of the GPUs miners run, matched by NVML name; the most specific
/// name first (`A100` before `A10`, `L40S` before `L4`, PCIe before SXM).
const DATASHEETS: &[(&[&str], Datasheet)] = &[
    (&["H100", "PCIE"], ds("H100 PCIe", 51.0, Some(756.0), 756.0)),
    (&["H100"], ds("H100 SXM", 67.0, Some(989.0), 989.0)),
    (&["H200"], ds("H200", 67.0, Some(989.0), 989.0)),
    (&["A100"], ds("A100", 19.5, Some(312.0), 312.0)),
    (&["V100", "PCIE"], ds("V100 PCIe", 14.0, None, 112.0)),
    (&["V100"], ds("V100 SXM2", 15.7, None, 125.0)),
    (&["L40S"], ds("L40S", 91.6, Some(362.0), 362.0)),
    (&["A10"], ds("A10", 31.2, Some(125.0), 125.0)),
    (&["T4"], ds("T4", 8.1, None, 65.0)),
    (&["L4"], ds("L4", 30.3, Some(121.0), 121.0)),
    (&["4090"], ds("RTX 4090", 82.6, Some(165.2), 165.2)),
];

const fn ds(model: &'static str, f32: f64, bf16: Option<f64>, f16: f64) -> Datasheet {
    Datasheet {
        model,
        f32,
        bf16,
        f16,
    }
}

/// The datasheet of the GPU NVML names `name`, when known.
pub fn datasheet(name: &str) -> Option<Datasheet> {
    let up = name.to_ascii_uppercase();
    DATASHEETS
        .iter()
        .find(|(keys, _)| keys.iter().all(|k| up.contains(k)))
        .map(|(_, d)| *d)
}

/// Below this share of the claimed GPU's f32 datasheet figure, a verified result flags
/// the claim (an honest card delivers far more even with the benchmark's host work; a
/// CPU posing as a GPU delivers far less).
pub const CLAIM_FLOOR: f64 = 0.1;
