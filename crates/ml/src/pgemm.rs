//! The matrix product of a linear layer at inference, `x wᵀ`, on x86-64 CPUs with AVX2
//! and FMA (and AVX-512 where the CPU has it), with the weight packed once instead of at
//! every call.
//!
//! A general matrix-product library (candle's `gemm`, PyTorch's BLAS) copies the weight
//! into its kernel's layout on every call: for a layer's weight `[n, k]` that copy gathers
//! sixteen rows at a time with scalar loads, and profiled on SmolLM2 evaluation it was 9 %
//! of the time (`docs/BENCHMARKS.md`). A model's weights do not change between inference
//! calls, so [`PackedWeight`] holds them in the kernel's layout from the start: panels of
//! [`NR`] output features, each `k` rows of `NR` values (one cache line), read front to
//! back by the kernel.
//!
//! The kernel computes a tile of rows of `x` by one panel: with AVX-512, 12 rows in 12
//! sixteen-lane accumulators, each multiply-add taking its `x` value broadcast straight
//! from memory (13 instructions per depth step); with AVX2, 6 rows in 12 eight-lane
//! accumulators (20 instructions for half the work). On Zen 4, whose AVX-512 units are
//! 256 bits wide, the two have the same arithmetic peak and the AVX-512 tile still ran
//! faster (fewer instructions for the front end); on CPUs with two 512-bit units it has
//! twice the peak. A panel is read once per call, front to back (the next one fetched
//! into the cache while the first tile runs), and every row of `x` passes over it while
//! it is in the L2 cache. Each output element is one chain of multiply-adds in depth
//! order (for depths past [`KC`] a block starts from the last block's sums), whatever the
//! kernel, tile or thread split: results are the same bits on every x86-64 CPU and for
//! any number of threads.

use std::ops::Range;

/// Output features per panel: two vectors of eight `f32`.
pub(crate) const NR: usize = 16;
/// Most depth steps per block. A panel's whole depth in one block was fastest on every
/// SmolLM2 shape (k = 576 and 1536: 36 and 96 KiB per panel, read from L2), ahead of
/// blocks that fit L1 (128 or 256 steps): blocks cost a second pass over the output.
const KC: usize = 4096;
/// Products smaller than this many multiply-adds run on the calling thread.
const PARALLEL_MIN: usize = 1 << 20;

/// Whether this CPU runs the packed product (x86-64 with AVX2 and FMA); elsewhere callers
/// keep the weight as it is.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

thread_local! {
    /// Set while this thread runs one of several model passes side by side (see
    /// [`serially`]): its products then stay on this thread.
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with this thread's products kept on this thread: for work that is already
/// split across threads at a coarser grain (several sequences' passes side by side).
pub(crate) fn serially<T>(f: impl FnOnce() -> T) -> T {
    /// Restores the flag as it was, also when `f` panics (the thread is a pool's worker
    /// and outlives the panic).
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERIAL.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(SERIAL.with(|s| s.replace(true)));
    f()
}

/// Whether this thread is inside [`serially`].
pub(crate) fn in_serial() -> bool {
    SERIAL.with(|s| s.get())
}

/// One depth step of a panel: `NR` values, one cache line.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [f32; NR]);

/// A weight `[n, k]` in panels: panel `p` holds, for depth `d`, the line
/// `w[p NR .. p NR + NR, d]` (zeros past `n`).
#[derive(Clone)]
pub(crate) struct PackedWeight {
    n: usize,
    k: usize,
    lines: Vec<Line>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight[{}, {}]", self.n, self.k)
    }
}

impl PackedWeight {
    /// Packs `w`, row-major `[n, k]`.
    pub(crate) fn pack(w: &[f32], n: usize, k: usize) -> PackedWeight {
        assert_eq!(
            w.len(),
            n * k,
            "PackedWeight::pack: {} values for [{n}, {k}]",
            w.len()
        );
        let panels = n.div_ceil(NR);
        let mut lines = vec![Line([0.0; NR]); panels * k];
        use rayon::prelude::*;
        lines
            .par_chunks_mut(k.max(1))
            .enumerate()
            .for_each(|(p, panel)| {
                for j in 0..NR.min(n - p * NR) {
                    let row = &w[(p * NR + j) * k..][..k];
                    for (line, &v) in panel.iter_mut().zip(row) {
                        line.0[j] = v;
                    }
                }
            });
        PackedWeight { n, k, lines }
    }

    /// Output features.
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Row `i` of the weight (`k` values), e.g. a tied embedding's lookup.
    pub(crate) fn row(&self, i: usize, out: &mut [f32]) {
        assert!(
            i < self.n && out.len() == self.k,
            "PackedWeight::row: bad row or length"
        );
        let panel = &self.lines[(i / NR) * self.k..][..self.k];
        for (o, line) in out.iter_mut().zip(panel) {
            *o = line.0[i % NR];
        }
    }

    /// The weight back in its row-major `[n, k]` form.
    pub(crate) fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.n * self.k];
        for (i, row) in w.chunks_mut(self.k.max(1)).enumerate().take(self.n) {
            self.row(i, row);
        }
        w
    }

    /// `x wᵀ` for `x` row-major `[m, k]`: `[m, n]` row-major, split across rayon's threads
    /// when large enough.
    pub(crate) fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_on(kernel(), x, m, 0..self.n.div_ceil(NR))
    }

    /// Output features `cols` (a range starting at a multiple of [`NR`]) of `x wᵀ`:
    /// `[m, cols.len()]` row-major.
    pub(crate) fn matmul_cols(&self, x: &[f32], m: usize, cols: Range<usize>) -> Vec<f32> {
        assert!(
            cols.start.is_multiple_of(NR) && cols.start <= cols.end && cols.end <= self.n,
            "PackedWeight::matmul_cols: columns {cols:?} of {}",
            self.n
        );
        self.matmul_on(kernel(), x, m, cols.start / NR..cols.end.div_ceil(NR))
    }

    /// Output panels `panels` of `x wᵀ` with a given kernel (which the CPU must have).
    fn matmul_on(&self, kernel: Kernel, x: &[f32], m: usize, panels: Range<usize>) -> Vec<f32> {
        assert_eq!(
            x.len(),
            m * self.k,
            "PackedWeight::matmul: {} values for [{m}, {}]",
            x.len(),
            self.k
        );
        let first = panels.start * NR;
        let width = (panels.end * NR).min(self.n).saturating_sub(first);
        let mut out: Vec<f32> = Vec::with_capacity(m * width);
        if width == 0 {
            return out;
        }
        let count = panels.len();
        let threads = rayon::current_num_threads();
        let dst = Dst {
            ptr: out.as_mut_ptr(),
            ldc: width,
            first,
        };
        if threads <= 1 || m * width * self.k < PARALLEL_MIN || in_serial() {
            // SAFETY: every element of `out` is written once (rows 0..m, all panels).
            unsafe { self.run(kernel, x, m, &dst, 0..m, panels) };
        } else if count >= 4 * threads {
            // Split by panels: each thread reads every row of x, its own share of w.
            let per = count.div_ceil(threads);
            rayon::scope(|s| {
                for t in 0..threads {
                    let ps = panels.start + (t * per).min(count)
                        ..panels.start + ((t + 1) * per).min(count);
                    let dst = &dst;
                    s.spawn(move |_| unsafe { self.run(kernel, x, m, dst, 0..m, ps) });
                }
            });
        } else {
            // A narrow product: split by rows, in whole tiles.
            let mr = kernel.rows();
            let per = m.div_ceil(threads).div_ceil(mr) * mr;
            rayon::scope(|s| {
                for t in 0..threads {
                    let rs = (t * per).min(m)..((t + 1) * per).min(m);
                    let (dst, panels) = (&dst, panels.clone());
                    s.spawn(move |_| unsafe { self.run(kernel, x, m, dst, rs, panels) });
                }
            });
        }
        // SAFETY: the tasks above wrote all m * width elements.
        unsafe { out.set_len(m * width) };
        out
    }

    /// Writes rows `rows` x panels `panels` of the product into `dst`.
    ///
    /// # Safety
    /// `dst` holds `m` rows covering the panels' columns, writable, and no other thread
    /// writes this region.
    unsafe fn run(
        &self,
        kernel: Kernel,
        x: &[f32],
        m: usize,
        dst: &Dst,
        rows: Range<usize>,
        panels: Range<usize>,
    ) {
        debug_assert!(rows.end <= m);
        let (n, k) = (self.n, self.k);
        let blocks = k.div_ceil(KC).max(1);
        let kc = k.div_ceil(blocks);
        let last = panels.end;
        let mr = kernel.rows();
        for p in panels {
            let c0 = p * NR;
            let cols = NR.min(n - c0);
            for b in 0..blocks {
                let d0 = b * kc;
                let depth = kc.min(k - d0.min(k));
                let panel = &self.lines[p * k + d0..][..depth];
                // The first tile fetches the next block's lines into the cache as it goes.
                let next = if b + 1 < blocks {
                    self.lines[p * k + d0 + depth..].as_ptr()
                } else if p + 1 < last {
                    self.lines[(p + 1) * k..].as_ptr()
                } else {
                    std::ptr::null()
                };
                let mut r = rows.start;
                while r < rows.end {
                    let t = Tile {
                        depth,
                        a: x[r * k + d0..].as_ptr(),
                        lda: k,
                        b: panel.as_ptr(),
                        prefetch: if r == rows.start {
                            next
                        } else {
                            std::ptr::null()
                        },
                        // SAFETY: r < m and c0 is one of dst's columns, inside the output.
                        c: unsafe { dst.ptr.add(r * dst.ldc + c0 - dst.first) },
                        ldc: dst.ldc,
                        cols,
                        first: b == 0,
                    };
                    let rs = mr.min(rows.end - r);
                    // SAFETY: the tile's rows and columns are inside x, the panel and dst.
                    unsafe { t.run(kernel, rs) };
                    r += rs;
                }
            }
        }
    }
}

/// The output, shared by the threads that write disjoint parts of it: row stride `ldc`,
/// its first column being the product's column `first`.
struct Dst {
    ptr: *mut f32,
    ldc: usize,
    first: usize,
}
// SAFETY: threads write disjoint elements (see `PackedWeight::run`).
unsafe impl Sync for Dst {}

/// One tile's operands: `rows` rows of `x` from `a` (row stride `lda`), a panel block of
/// `depth` lines from `b`, the output at `c` (row stride `ldc`, `cols` valid columns);
/// `first`: the output is not yet written (start from zero, not from it); `prefetch`:
/// lines to fetch into the cache, one per depth step (or null).
struct Tile {
    depth: usize,
    a: *const f32,
    lda: usize,
    b: *const Line,
    prefetch: *const Line,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    first: bool,
}

impl Tile {
    /// Runs `rows` rows (at most `kernel.rows()`).
    ///
    /// # Safety
    /// The CPU has `kernel`'s instructions; the operands are as [`Tile`] says.
    unsafe fn run(&self, kernel: Kernel, rows: usize) {
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Avx512 {
            unsafe {
                match rows {
                    12 => avx512::tile::<12>(self),
                    11 => avx512::tile::<11>(self),
                    10 => avx512::tile::<10>(self),
                    9 => avx512::tile::<9>(self),
                    8 => avx512::tile::<8>(self),
                    7 => avx512::tile::<7>(self),
                    6 => avx512::tile::<6>(self),
                    5 => avx512::tile::<5>(self),
                    4 => avx512::tile::<4>(self),
                    3 => avx512::tile::<3>(self),
                    2 => avx512::tile::<2>(self),
                    _ => avx512::tile::<1>(self),
                }
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match rows {
                6 => avx2::tile::<6>(self),
                5 => avx2::tile::<5>(self),
                4 => avx2::tile::<4>(self),
                3 => avx2::tile::<3>(self),
                2 => avx2::tile::<2>(self),
                _ => avx2::tile::<1>(self),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!(
            "PackedWeight is used only where available() is true ({kernel:?}, {rows} rows)"
        );
    }
}

/// Which tile kernel this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Kernel {
    /// 6 rows x 16 columns in 12 eight-lane registers.
    Avx2,
    /// 12 rows x 16 columns in 12 sixteen-lane registers, `x`'s values broadcast from
    /// memory inside the multiply-adds.
    Avx512,
}

/// The widest kernel this CPU has (the caller has checked [`available`]).
fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        if *HAS.get_or_init(|| is_x86_feature_detected!("avx512f")) {
            return Kernel::Avx512;
        }
    }
    Kernel::Avx2
}

impl Kernel {
    /// Rows of `x` per tile.
    fn rows(self) -> usize {
        match self {
            Kernel::Avx2 => 6,
            Kernel::Avx512 => 12,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{NR, Tile};
    use std::arch::x86_64::*;

    /// `R` rows of the tile (see [`Tile`]).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const R: usize>(t: &Tile) {
        unsafe {
            let mask: __mmask16 = if t.cols >= NR {
                0xffff
            } else {
                (1u16 << t.cols) - 1
            };
            let mut acc = [_mm512_setzero_ps(); R];
            if !t.first {
                for (r, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_maskz_loadu_ps(mask, t.c.add(r * t.ldc));
                }
            }
            let mut b = t.b as *const f32;
            let mut a = t.a;
            let mut pf = t.prefetch as *const i8;
            for _ in 0..t.depth {
                if !pf.is_null() {
                    _mm_prefetch::<_MM_HINT_T0>(pf);
                    pf = pf.add(64);
                }
                let bv = _mm512_load_ps(b);
                for (r, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(r * t.lda)), bv, *acc);
                }
                b = b.add(NR);
                a = a.add(1);
            }
            for (r, acc) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(t.c.add(r * t.ldc), mask, *acc);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{NR, Tile};
    use std::arch::x86_64::*;

    /// `R` rows of the tile (see [`Tile`]).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const R: usize>(t: &Tile) {
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            if !t.first {
                for (r, acc) in acc.iter_mut().enumerate() {
                    let c = t.c.add(r * t.ldc);
                    if t.cols == NR {
                        acc[0] = _mm256_loadu_ps(c);
                        acc[1] = _mm256_loadu_ps(c.add(8));
                    } else {
                        let mut buf = [0f32; NR];
                        std::ptr::copy_nonoverlapping(c, buf.as_mut_ptr(), t.cols);
                        acc[0] = _mm256_loadu_ps(buf.as_ptr());
                        acc[1] = _mm256_loadu_ps(buf.as_ptr().add(8));
                    }
                }
            }
            let mut b = t.b as *const f32;
            let mut a = t.a;
            let mut pf = t.prefetch as *const i8;
            for _ in 0..t.depth {
                if !pf.is_null() {
                    _mm_prefetch::<_MM_HINT_T0>(pf);
                    pf = pf.add(64);
                }
                let b0 = _mm256_load_ps(b);
                let b1 = _mm256_load_ps(b.add(8));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*a.add(r * t.lda));
                    acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
                }
                b = b.add(NR);
                a = a.add(1);
            }
            for (r, acc) in acc.iter().enumerate() {
                let c = t.c.add(r * t.ldc);
                if t.cols == NR {
                    _mm256_storeu_ps(c, acc[0]);
                    _mm256_storeu_ps(c.add(8), acc[1]);
                } else {
                    let mut buf = [0f32; NR];
                    _mm256_storeu_ps(buf.as_mut_ptr(), acc[0]);
                    _mm256_storeu_ps(buf.as_mut_ptr().add(8), acc[1]);
                    std::ptr::copy_nonoverlapping(buf.as_ptr(), c, t.cols);
                }
            }
        }
    }
}

/// `x wᵀ` as a candle op on a CPU tensor `x` `[m, k]` (f32, no gradient).
struct PackedProduct(std::sync::Arc<PackedWeight>);

impl candle_core::CustomOp1 for PackedProduct {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (m, k) = l.shape().dims2()?;
        if k != self.0.k {
            candle_core::bail!(
                "linear: an input of {k} features for a weight of {}",
                self.0.k
            );
        }
        let candle_core::CpuStorage::F32(xs) = s else {
            candle_core::bail!(
                "packed linear: input is {:?}, not f32",
                candle_core::backend::BackendStorage::dtype(s)
            );
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("packed linear: input is not contiguous");
        };
        let out = self.0.matmul(&xs[start..end], m);
        Ok((candle_core::CpuStorage::F32(out), (m, self.0.n).into()))
    }
}

/// `x wᵀ` for a CPU tensor `x` `[m, k]` in f32: `[m, n]`. Inference only (no gradient).
pub(crate) fn linear(
    x: &candle_core::Tensor,
    w: &std::sync::Arc<PackedWeight>,
) -> candle_core::Result<candle_core::Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&PackedProduct(w.clone()))
}

/// `x wᵀ` (`x` `[m, k]` on the CPU, f32) handed to `each` in pieces of about `per`
/// output features (whole panels), with the column each starts at: for consumers that
/// need not hold all of a wide output at once.
pub(crate) fn linear_pieces(
    x: &candle_core::Tensor,
    w: &PackedWeight,
    per: usize,
    each: &mut dyn FnMut(usize, candle_core::Tensor) -> candle_core::Result<()>,
) -> candle_core::Result<()> {
    let (m, k) = x.dims2()?;
    if k != w.k {
        candle_core::bail!("linear: an input of {k} features for a weight of {}", w.k);
    }
    let xs = x
        .contiguous()?
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    let per = per.div_ceil(NR).max(1) * NR;
    for start in (0..w.n).step_by(per) {
        let end = (start + per).min(w.n);
        let piece = w.matmul_cols(&xs, m, start..end);
        each(
            start,
            candle_core::Tensor::from_vec(piece, (m, end - start), &candle_core::Device::Cpu)?,
        )?;
    }
    Ok(())
}

/// Rows `ids` of the weight (an embedding lookup): `[ids, k]` on the CPU.
pub(crate) fn rows(
    w: &PackedWeight,
    ids: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    let ids = ids
        .flatten_all()?
        .to_dtype(candle_core::DType::U32)?
        .to_vec1::<u32>()?;
    let k = w.k;
    let mut out = vec![0f32; ids.len() * k];
    for (&id, row) in ids.iter().zip(out.chunks_mut(k.max(1))) {
        if id as usize >= w.n {
            candle_core::bail!("token id {id} is outside the vocabulary of {}", w.n);
        }
        w.row(id as usize, row);
    }
    candle_core::Tensor::from_vec(out, (ids.len(), k), &candle_core::Device::Cpu)
}

/// `w` (a CPU tensor `[n, k]` in f32) packed.
pub(crate) fn pack_tensor(w: &candle_core::Tensor) -> candle_core::Result<PackedWeight> {
    let (n, k) = w.dims2()?;
    let v = w.flatten_all()?.to_vec1::<f32>()?;
    Ok(PackedWeight::pack(&v, n, k))
}

/// The packed weight back as a CPU tensor `[n, k]`.
pub(crate) fn unpack_tensor(w: &PackedWeight) -> candle_core::Result<candle_core::Tensor> {
    candle_core::Tensor::from_vec(w.unpack(), (w.n, w.k), &candle_core::Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// `x wᵀ` in f64, the reference.
    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|d| x[i * k + d] as f64 * w[j * k + d] as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn packed_product_matches_the_definition_on_odd_shapes() {
        if !available() {
            return;
        }
        for (m, n, k) in [
            (1, 1, 1),
            (7, 17, 5),
            (13, 33, 300),
            (6, 16, 256),
            (25, 40, 513),
            (1, 100, 700),
        ] {
            let x = random(m * k, (m * 31 + n) as u64);
            let w = random(n * k, (n * 17 + k) as u64);
            let packed = PackedWeight::pack(&w, n, k);
            let got = packed.matmul(&x, m);
            let want = reference(&x, &w, m, n, k);
            for (i, (&g, &r)) in got.iter().zip(&want).enumerate() {
                let tol = 1e-5 * (k as f64).sqrt() * 4.0;
                assert!(
                    (g as f64 - r).abs() <= tol,
                    "[{m},{n},{k}] element {i}: {g} vs {r}"
                );
            }
            assert_eq!(packed.unpack(), w, "unpack gives the weight back");
            // Column pieces are the same columns of the whole product, bit for bit.
            for start in (0..n).step_by(NR) {
                let end = (start + 2 * NR).min(n);
                let piece = packed.matmul_cols(&x, m, start..end);
                for i in 0..m {
                    let whole = &got[i * n + start..i * n + end];
                    assert_eq!(
                        &piece[i * (end - start)..(i + 1) * (end - start)],
                        whole,
                        "columns {start}..{end}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_avx512_and_avx2_kernels_give_the_same_bits() {
        if !available() || kernel() != Kernel::Avx512 {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        for (m, n, k) in [
            (1, 1, 1),
            (13, 33, 300),
            (25, 40, 513),
            (252, 192, 576),
            (7, 17, 5000),
        ] {
            let x = random(m * k, 3);
            let w = random(n * k, 4);
            let packed = PackedWeight::pack(&w, n, k);
            let all = 0..n.div_ceil(NR);
            let a = packed.matmul_on(Kernel::Avx512, &x, m, all.clone());
            let b = packed.matmul_on(Kernel::Avx2, &x, m, all);
            assert!(
                a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                "[{m},{n},{k}]"
            );
        }
    }

    #[test]
    fn bad_inputs_are_errors_that_say_what_was_wrong() {
        if !available() {
            return;
        }
        let dev = candle_core::Device::Cpu;
        let w = std::sync::Arc::new(PackedWeight::pack(&random(20 * 8, 5), 20, 8));
        let x = candle_core::Tensor::zeros((3, 7), candle_core::DType::F32, &dev).unwrap();
        let err = linear(&x, &w).unwrap_err().to_string();
        assert!(
            err.contains("an input of 7 features for a weight of 8"),
            "{err}"
        );
        let x = candle_core::Tensor::zeros((3, 8), candle_core::DType::F64, &dev).unwrap();
        let err = linear(&x, &w).unwrap_err().to_string();
        assert!(err.contains("not f32"), "{err}");
        let ids = candle_core::Tensor::new(&[1u32, 20], &dev).unwrap();
        let err = rows(&w, &ids).unwrap_err().to_string();
        assert!(
            err.contains("token id 20 is outside the vocabulary of 20"),
            "{err}"
        );
    }

    #[test]
    fn results_do_not_depend_on_the_thread_split() {
        if !available() {
            return;
        }
        // Wide (split by panels), narrow (split by rows), and one thread.
        for (m, n, k) in [(250, 1024, 576), (251, 48, 600)] {
            let x = random(m * k, 1);
            let w = random(n * k, 2);
            let packed = PackedWeight::pack(&w, n, k);
            let one = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let three = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap();
            let a = one.install(|| packed.matmul(&x, m));
            let b = three.install(|| packed.matmul(&x, m));
            assert!(
                a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
                "[{m},{n},{k}]"
            );
        }
    }
}
