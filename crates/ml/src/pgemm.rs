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
/// Most depth steps per block of `x w` (the backward pass's product, whose depth is the
/// layer's output width: 49 152 for SmolLM2's vocabulary head).
const KC_T: usize = 4096;
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
        self.matmul_on(kernel(), Side::W, x, m, 0..self.n.div_ceil(NR))
    }

    /// `g w` for `g` row-major `[m, n]`: `[m, k]` row-major, the gradient of `x wᵀ` with
    /// respect to `x` (for a frozen weight). The same kernel runs on panels of `wᵀ`, each
    /// gathered from `w`'s lines into a buffer as the product reaches it (sixteen of `w`'s
    /// lines at a time, transposed): the weight is held once, in one layout.
    pub(crate) fn matmul_t(&self, g: &[f32], m: usize) -> Vec<f32> {
        self.matmul_on(kernel(), Side::Wt, g, m, 0..self.k.div_ceil(NR))
    }

    /// Output features `cols` (a range starting at a multiple of [`NR`]) of `x wᵀ`:
    /// `[m, cols.len()]` row-major.
    pub(crate) fn matmul_cols(&self, x: &[f32], m: usize, cols: Range<usize>) -> Vec<f32> {
        assert!(
            cols.start.is_multiple_of(NR) && cols.start <= cols.end && cols.end <= self.n,
            "PackedWeight::matmul_cols: columns {cols:?} of {}",
            self.n
        );
        self.matmul_on(
            kernel(),
            Side::W,
            x,
            m,
            cols.start / NR..cols.end.div_ceil(NR),
        )
    }

    /// Output panels `panels` of `x wᵀ` (or of `x w`, by `side`) with a given kernel (which
    /// the CPU must have).
    fn matmul_on(
        &self,
        kernel: Kernel,
        side: Side,
        x: &[f32],
        m: usize,
        panels: Range<usize>,
    ) -> Vec<f32> {
        let (n, k) = self.dims(side);
        assert_eq!(
            x.len(),
            m * k,
            "PackedWeight::matmul: {} values for [{m}, {k}]",
            x.len(),
        );
        let first = panels.start * NR;
        let width = (panels.end * NR).min(n).saturating_sub(first);
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
        if threads <= 1 || m * width * k < PARALLEL_MIN || in_serial() {
            // SAFETY: every element of `out` is written once (rows 0..m, all panels).
            unsafe { self.run(kernel, side, x, m, &dst, 0..m, panels) };
        } else if count >= 4 * threads {
            // Split by panels: each thread reads every row of x, its own share of w.
            let per = count.div_ceil(threads);
            rayon::scope(|s| {
                for t in 0..threads {
                    let ps = panels.start + (t * per).min(count)
                        ..panels.start + ((t + 1) * per).min(count);
                    let dst = &dst;
                    s.spawn(move |_| unsafe { self.run(kernel, side, x, m, dst, 0..m, ps) });
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
                    s.spawn(move |_| unsafe { self.run(kernel, side, x, m, dst, rs, panels) });
                }
            });
        }
        // SAFETY: the tasks above wrote all m * width elements.
        unsafe { out.set_len(m * width) };
        out
    }

    /// (output features, depth) of the product on `side`.
    fn dims(&self, side: Side) -> (usize, usize) {
        match side {
            Side::W => (self.n, self.k),
            Side::Wt => (self.k, self.n),
        }
    }

    /// Writes rows `rows` x panels `panels` of the product on `side` into `dst`.
    ///
    /// # Safety
    /// `dst` holds `m` rows covering the panels' columns, writable, and no other thread
    /// writes this region.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        &self,
        kernel: Kernel,
        side: Side,
        x: &[f32],
        m: usize,
        dst: &Dst,
        rows: Range<usize>,
        panels: Range<usize>,
    ) {
        debug_assert!(rows.end <= m);
        let (n, k) = self.dims(side);
        let most = match side {
            Side::W => KC,
            Side::Wt => KC_T,
        };
        let blocks = k.div_ceil(most).max(1);
        // Whole lines of `w` per block, so that `wᵀ`'s blocks gather whole 16 x 16 squares.
        let kc = k.div_ceil(blocks).div_ceil(NR) * NR;
        let mr = kernel.rows();
        let mut gathered = match side {
            Side::W => Vec::new(),
            Side::Wt => vec![Line([0.0; NR]); kc.min(k)],
        };
        // Rows of x a multiple of 4 KiB apart fall into the same sets of the L1 cache (a
        // tile reads 12 of them at once): such blocks are copied with a padded stride.
        let copy = k.is_multiple_of(1024);
        let ld = kc.next_multiple_of(256) + NR;
        let mut xb = if copy {
            vec![0f32; (rows.end - rows.start) * ld]
        } else {
            Vec::new()
        };
        // Blocks of depth outermost: every panel passes over one block of x's columns
        // while it is in the cache.
        for b in 0..blocks {
            let d0 = b * kc;
            let depth = kc.min(k - d0.min(k));
            if depth == 0 && b > 0 {
                continue;
            }
            let (xs, xoff, lda) = if copy {
                for (i, r) in rows.clone().enumerate() {
                    xb[i * ld..][..depth].copy_from_slice(&x[r * k + d0..][..depth]);
                }
                (&xb[..], rows.start, ld)
            } else {
                (x, 0, k)
            };
            for p in panels.clone() {
                let c0 = p * NR;
                let cols = NR.min(n - c0);
                let (panel, next): (&[Line], *const Line) = match side {
                    Side::W => (
                        &self.lines[p * k + d0..][..depth],
                        // The first tile fetches the next panel's lines into the cache as
                        // it goes.
                        if p + 1 < panels.end {
                            self.lines[(p + 1) * k + d0..].as_ptr()
                        } else if d0 + depth < k {
                            self.lines[panels.start * k + d0 + depth..].as_ptr()
                        } else {
                            std::ptr::null()
                        },
                    ),
                    Side::Wt => {
                        self.gather_t(p, d0, &mut gathered[..depth]);
                        (&gathered[..depth], std::ptr::null())
                    }
                };
                let mut r = rows.start;
                while r < rows.end {
                    let t = Tile {
                        depth,
                        a: if copy {
                            xs[(r - xoff) * lda..].as_ptr()
                        } else {
                            xs[r * lda + d0..].as_ptr()
                        },
                        lda,
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

    /// Lines `d0 ..` of panel `j` of `wᵀ` into `out` (`d0` a multiple of [`NR`]): line `o`
    /// holds `w[o, j NR .. j NR + NR]` (zeros past `k`), gathered from the sixteen lines
    /// `j NR ..` of each of `w`'s panels, transposed.
    fn gather_t(&self, j: usize, d0: usize, out: &mut [Line]) {
        debug_assert!(d0.is_multiple_of(NR) && d0 + out.len() <= self.n);
        let c0 = j * NR;
        let valid = NR.min(self.k - c0);
        for (q, dst) in out.chunks_mut(NR).enumerate() {
            let panel = d0 / NR + q;
            let src = &self.lines[panel * self.k + c0..][..valid];
            transpose(src, dst);
        }
    }
}

/// Which product a packed weight `w` runs: `x wᵀ`, or `x w` (the backward pass's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    W,
    Wt,
}

/// `dst[o][c] = src[c][o]` for the lines given (`src` may be short: its missing lines
/// read as zeros; `dst` may be short: the rest is not written).
fn transpose(src: &[Line], dst: &mut [Line]) {
    #[cfg(target_arch = "x86_64")]
    if dst.len() == NR && available() {
        let zero = Line([0.0; NR]);
        let rows: [&Line; NR] = std::array::from_fn(|c| src.get(c).unwrap_or(&zero));
        // SAFETY: `available()` checked that the CPU has AVX2; 16 lines each side.
        unsafe { avx2::transpose(&rows, dst) };
        return;
    }
    for (o, d) in dst.iter_mut().enumerate() {
        for (c, v) in d.0.iter_mut().enumerate() {
            *v = src.get(c).map_or(0.0, |s| s.0[o]);
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
    use super::{Line, NR, Tile};
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

    /// `dst[o][c] = src[c][o]` for a 16 x 16 square, as four 8 x 8 squares in registers.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn transpose(src: &[&Line; NR], dst: &mut [Line]) {
        assert_eq!(dst.len(), NR);
        unsafe {
            // Square (c0, o0): lines c0..c0+8 of src, lanes o0..o0+8 -> lines o0..o0+8 of
            // dst, lanes c0..c0+8.
            for (c0, o0) in [(0, 0), (0, 8), (8, 0), (8, 8)] {
                let r: [__m256; 8] =
                    std::array::from_fn(|i| _mm256_load_ps(src[c0 + i].0.as_ptr().add(o0)));
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let out = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
                for (i, v) in out.into_iter().enumerate() {
                    _mm256_store_ps(dst[o0 + i].0.as_mut_ptr().add(c0), v);
                }
            }
        }
    }
}

/// `x wᵀ` (or `x w`, by [`Side`]) as a candle op on a CPU tensor `x` (f32, `[m, k]`, or
/// `[m, n]` for `x w`).
struct PackedProduct(std::sync::Arc<PackedWeight>, Side);

impl candle_core::CustomOp1 for PackedProduct {
    fn name(&self) -> &'static str {
        match self.1 {
            Side::W => "packed-linear",
            Side::Wt => "packed-linear-backward",
        }
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (m, k) = l.shape().dims2()?;
        let (n, depth) = self.0.dims(self.1);
        if k != depth {
            candle_core::bail!("linear: an input of {k} features for a weight of {depth}");
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
        let xs = &xs[start..end];
        let out = match self.1 {
            Side::W => self.0.matmul(xs, m),
            Side::Wt => self.0.matmul_t(xs, m),
        };
        Ok((candle_core::CpuStorage::F32(out), (m, n).into()))
    }

    /// The gradient with respect to `x` (the weight is frozen: it has none). `x w`'s own
    /// backward pass is never taken (a gradient of a gradient).
    fn bwd(
        &self,
        _x: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        match self.1 {
            Side::W => Ok(Some(
                grad.contiguous()?
                    .apply_op1_no_bwd(&PackedProduct(self.0.clone(), Side::Wt))?,
            )),
            Side::Wt => candle_core::bail!("packed linear: no second-order gradient"),
        }
    }
}

/// `x wᵀ` for a CPU tensor `x` `[m, k]` in f32: `[m, n]`. The weight is frozen: where `x`
/// carries a gradient, the backward pass hands on `grad w` (the same packed weight, read
/// transposed) and `w` gets none.
pub(crate) fn linear(
    x: &candle_core::Tensor,
    w: &std::sync::Arc<PackedWeight>,
) -> candle_core::Result<candle_core::Tensor> {
    x.contiguous()?.apply_op1(PackedProduct(w.clone(), Side::W))
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

    /// `got` within f32 rounding of `want`, for sums of `depth` products of values in [-1, 1].
    fn assert_near(got: &[f32], want: &[f64], depth: usize, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        let tol = 1e-5 * (depth as f64).sqrt() * 4.0;
        for (i, (&g, &r)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - r).abs() <= tol,
                "{what} element {i}: {g} vs {r}"
            );
        }
    }

    /// `x wᵀ`, and the backward pass's `g w`, against the definition; for `g w` the depth is
    /// `n`, past one block of `KC_T` lines in the last two shapes.
    /// `a` and `b` the same bits, element for element.
    fn assert_same_bits(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        assert!(
            a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{what}"
        );
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
            (3, 4100, 21),
            (14, 8200, 40),
        ] {
            let x = random(m * k, (m * 31 + n) as u64);
            let w = random(n * k, (n * 17 + k) as u64);
            let packed = PackedWeight::pack(&w, n, k);
            let got = packed.matmul(&x, m);
            assert_near(
                &got,
                &reference(&x, &w, m, n, k),
                k,
                &format!("[{m},{n},{k}]"),
            );
            assert_eq!(packed.unpack(), w, "unpack gives the weight back");
            // g w = g (wᵀ)ᵀ: the reference with wᵀ as the weight.
            let g = random(m * n, (m * 7 + n) as u64);
            let mut wt = vec![0f32; k * n];
            for i in 0..n {
                for j in 0..k {
                    wt[j * n + i] = w[i * k + j];
                }
            }
            assert_near(
                &packed.matmul_t(&g, m),
                &reference(&g, &wt, m, k, n),
                n,
                &format!("[{m},{n},{k}] transposed"),
            );
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
            let a = packed.matmul_on(Kernel::Avx512, Side::W, &x, m, all.clone());
            let b = packed.matmul_on(Kernel::Avx2, Side::W, &x, m, all);
            assert_same_bits(&a, &b, &format!("[{m},{n},{k}]"));
            let g = random(m * n, 6);
            let all = 0..k.div_ceil(NR);
            let a = packed.matmul_on(Kernel::Avx512, Side::Wt, &g, m, all.clone());
            let b = packed.matmul_on(Kernel::Avx2, Side::Wt, &g, m, all);
            assert_same_bits(&a, &b, &format!("[{m},{n},{k}] transposed"));
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
            assert_same_bits(&a, &b, &format!("[{m},{n},{k}]"));
            let g = random(m * n, 3);
            let a = one.install(|| packed.matmul_t(&g, m));
            let b = three.install(|| packed.matmul_t(&g, m));
            assert_same_bits(&a, &b, &format!("[{m},{n},{k}] transposed"));
        }
    }

    #[test]
    fn a_frozen_packed_weight_hands_its_input_the_gradient_of_the_plain_product() {
        if !available() {
            return;
        }
        use candle_core::{Device, Tensor, Var};
        let dev = Device::Cpu;
        for (m, n, k) in [(5, 37, 19), (30, 64, 100), (9, 300, 33)] {
            let w = random(n * k, (m + n + k) as u64);
            let wt = Tensor::from_vec(w.clone(), (n, k), &dev).unwrap();
            let packed = std::sync::Arc::new(PackedWeight::pack(&w, n, k));
            let x = Var::from_tensor(&Tensor::from_vec(random(m * k, 9), (m, k), &dev).unwrap())
                .unwrap();
            // A loss that weighs every output differently, so the gradient is not uniform.
            let weights = Tensor::from_vec(random(m * n, 10), (m, n), &dev).unwrap();
            let loss = |y: Tensor| (y * &weights).unwrap().sum_all().unwrap();
            let ours = loss(linear(x.as_tensor(), &packed).unwrap());
            let plain = loss(x.as_tensor().matmul(&wt.t().unwrap()).unwrap());
            let close = |a: &Tensor, b: &Tensor, what: &str| {
                let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                let d = d.to_scalar::<f32>().unwrap();
                assert!(d <= 1e-4, "[{m},{n},{k}] {what}: off by {d}");
            };
            close(&ours, &plain, "loss");
            let (g1, g2) = (ours.backward().unwrap(), plain.backward().unwrap());
            close(
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
                "gradient",
            );
        }
    }

    #[test]
    fn a_square_of_lines_transposes_whole_and_short() {
        let lines: Vec<Line> = (0..NR)
            .map(|c| Line(std::array::from_fn(|o| (c * 100 + o) as f32)))
            .collect();
        for valid in [NR, 5, 1] {
            for out_len in [NR, 3] {
                let mut dst = vec![Line([-1.0; NR]); out_len];
                transpose(&lines[..valid], &mut dst);
                for (o, d) in dst.iter().enumerate() {
                    for (c, &v) in d.0.iter().enumerate() {
                        let want = if c < valid { (c * 100 + o) as f32 } else { 0.0 };
                        assert_eq!(v, want, "valid {valid}, line {o}, lane {c}");
                    }
                }
            }
        }
    }
}
