//! bf16 matrix products with f32 accumulation, for the frozen weights' products (and full
//! fine-tuning's, see `peft::frozen::trainable_product`) when `model.matmul_precision = "bf16"`, on either of two
//! CPU features:
//!
//! - **Intel AMX** (Xeon 4th generation and later): one `tdpbf16ps` multiplies a 16×32 by a
//!   32×16 bf16 tile into 16×16 f32 accumulators; PyTorch reaches the same units through oneDNN
//!   when asked for bf16 (autocast, or `torch.backends.mkldnn.matmul.fp32_precision = "bf16"`).
//! - **AVX512-BF16** (AMD Zen 4 and later, Intel Cooper Lake): one `vdpbf16ps` adds the products
//!   of 16 bf16 pairs to 16 f32 lanes, twice the multiply-adds of an f32 FMA of the same width.
//!
//! Both operands are rounded to bf16 (8 significant bits, round-to-nearest-even) and every
//! product is summed in f32, so a result differs from the f32 product by about 2⁻⁸ of the
//! terms' magnitude: the precision of mixed-precision training, not of the f32 reference.
//!
//! [`gemm_bf16`] packs `a` (m×k) into bf16 rows and `b` (k×n, any strides) into the
//! pair-interleaved ("VNNI") layout both instructions read, in 32-column panels, then computes
//! 32×32 blocks of the output, row blocks spread over rayon's threads: on AMX with four
//! accumulator tiles (set up once per process by the kernel's `ARCH_REQ_XCOMP_PERM`, configured
//! per task), on AVX512-BF16 as four 8-row strips of 16 accumulator registers each.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use rayon::prelude::*;

/// Rows and columns of an output block (2 × 2 tiles of 16 × 16).
const BLOCK: usize = 32;
/// bf16 values of a k-block (one tile row of A holds 32 of them: 64 bytes).
const KB: usize = 32;
/// u16 values in one B tile (16 k-pairs × 16 columns × 2).
const TILE: usize = 512;

/// Which instructions compute the bf16 products on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Intel AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX-512 vectors (`vdpbf16ps`).
    Avx512Bf16,
}

impl Kernel {
    /// The feature's name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "AMX",
            Kernel::Avx512Bf16 => "AVX512-BF16",
        }
    }
}

/// The kernel this CPU runs (checked once; AMX first, asking the kernel for the tile state's
/// permission the first time), or `None`. `PEFT_STUDIO_NO_AMX=1` and
/// `PEFT_STUDIO_NO_AVX512BF16=1` rule one out (to compare them, or to test the fallback).
pub fn kernel() -> Option<Kernel> {
    static KERNEL: OnceLock<Option<Kernel>> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        let off = |var: &str| std::env::var_os(var).is_some_and(|v| v == "1");
        if !off("PEFT_STUDIO_NO_AMX") && amx_detected() {
            Some(Kernel::Amx)
        } else if !off("PEFT_STUDIO_NO_AVX512BF16") && avx512bf16_detected() {
            Some(Kernel::Avx512Bf16)
        } else {
            None
        }
    })
}

/// Whether this CPU computes bf16 products with either kernel.
pub fn available() -> bool {
    kernel().is_some()
}

#[cfg(target_arch = "x86_64")]
fn avx512bf16_detected() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512bf16_detected() -> bool {
    false
}

/// Whether this CPU and kernel run AMX bf16 (asks the kernel for the tile state's permission).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn amx_detected() -> bool {
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    // CPUID leaf 7 exists where leaf 0 reports a maximum of at least 7.
    let max_leaf = std::arch::x86_64::__cpuid(0).eax;
    if max_leaf < 7 {
        return false;
    }
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
        return false;
    }
    unsafe extern "C" {
        fn syscall(number: i64, ...) -> i64;
    }
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) only grants the process the right to use the
    // AMX tile state; it returns 0 on success and a negative value where unsupported.
    unsafe { syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn amx_detected() -> bool {
    false
}

/// f32 → bf16, rounding to nearest even (NaN stays NaN). Branch-free, so that loops over
/// slices vectorise.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16;
    let nan = (bits & 0x7FFF_FFFF) > 0x7F80_0000;
    (if nan { (bits >> 16) | 0x40 } else { rounded }) as u16
}

/// bf16 → f32 (exact).
pub fn from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// A k×n operand packed for the B side of the tiles: per 32-column panel and 32-row k-block,
/// two tiles of 16 k-pairs × 16 columns with each pair's two values side by side. Pack a
/// frozen weight once and multiply many row blocks by it.
pub struct PackedB {
    data: Vec<u16>,
    kblocks: usize,
    panels: usize,
    k: usize,
    n: usize,
}

/// One f32 matrix as (buffer, offset of element (0, 0), row stride, column stride).
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    /// The buffer.
    pub data: &'a [f32],
    /// Offset of element (0, 0).
    pub start: usize,
    /// Row stride (elements).
    pub rs: usize,
    /// Column stride (elements).
    pub cs: usize,
}

impl Strided<'_> {
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[self.start + i * self.rs + j * self.cs]
    }
}

impl PackedB {
    /// Packs `b` (k×n) in bf16, panels in parallel. Call only when [`available`].
    pub fn new(b: Strided, k: usize, n: usize) -> Self {
        let kblocks = k.div_ceil(KB);
        let panels = n.div_ceil(BLOCK);
        let per_panel = kblocks * 2 * TILE;
        let mut data = uninit(panels * per_panel);
        data.par_chunks_mut(per_panel)
            .enumerate()
            // SAFETY: both kernels' CPUs have AVX-512 F and BW (the caller checked `available`).
            .for_each(|(p, panel)| unsafe { pack_panel(b, k, n, p * BLOCK, panel) });
        Self {
            // SAFETY: `pack_panel` wrote every value of every panel.
            data: unsafe { assume_init(data) },
            kblocks,
            panels,
            k,
            n,
        }
    }

    /// (k, n).
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }
}

/// A vector of `len` values to be written before use.
fn uninit(len: usize) -> Vec<MaybeUninit<u16>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { v.set_len(len) };
    v
}

/// The vector once every value has been written.
///
/// # Safety
/// Every element must have been written.
unsafe fn assume_init(v: Vec<MaybeUninit<u16>>) -> Vec<u16> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: same allocation, layout and length; the caller vouches for the values.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<u16>(), v.len(), v.capacity()) }
}

/// Writes every value of the panel of columns `j0…j0+32` (zero beyond k and n): per k-block,
/// tile t holds 16 rows (k-pairs) of 16 columns × 2.
///
/// # Safety
/// The CPU must have AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_panel(b: Strided, k: usize, n: usize, j0: usize, panel: &mut [MaybeUninit<u16>]) {
    let whole_cols = j0 + BLOCK <= n;
    for (kb, tiles) in panel.chunks_exact_mut(2 * TILE).enumerate() {
        let k0 = kb * KB;
        let whole = whole_cols && k0 + KB <= k;
        for (t, tile) in tiles.chunks_exact_mut(TILE).enumerate() {
            let jt = j0 + t * 16;
            if whole && b.cs == 1 {
                // Rows of b are contiguous: interleave rows k0+2r and k0+2r+1.
                for (r, out) in tile.chunks_exact_mut(32).enumerate() {
                    let row0 = &b.data[b.start + (k0 + 2 * r) * b.rs + jt..][..16];
                    let row1 = &b.data[b.start + (k0 + 2 * r + 1) * b.rs + jt..][..16];
                    for (c, pair) in out.chunks_exact_mut(2).enumerate() {
                        pair[0].write(to_bf16(row0[c]));
                        pair[1].write(to_bf16(row1[c]));
                    }
                }
            } else if whole && b.rs == 1 {
                // Columns of b are contiguous (b is a weight's transpose): column j's 32
                // values of this k-block fill column c of every tile row.
                for c in 0..16 {
                    let col = &b.data[b.start + (jt + c) * b.cs + k0..][..KB];
                    let mut converted = [0u16; KB];
                    for (d, &x) in converted.iter_mut().zip(col) {
                        *d = to_bf16(x);
                    }
                    for r in 0..16 {
                        tile[r * 32 + c * 2].write(converted[2 * r]);
                        tile[r * 32 + c * 2 + 1].write(converted[2 * r + 1]);
                    }
                }
            } else {
                for r in 0..16 {
                    for c in 0..16 {
                        for e in 0..2 {
                            let (kk, j) = (k0 + 2 * r + e, jt + c);
                            let v = if kk < k && j < n {
                                to_bf16(b.at(kk, j))
                            } else {
                                0
                            };
                            tile[r * 32 + c * 2 + e].write(v);
                        }
                    }
                }
            }
        }
    }
}

/// `a` (m×k) as bf16 rows of `kblocks·32` values, `rows` of them (zero beyond m and k).
fn pack_a(a: Strided, m: usize, k: usize, rows: usize, kblocks: usize) -> Vec<u16> {
    let width = kblocks * KB;
    let mut out = uninit(rows * width);
    // SAFETY (both calls): both kernels' CPUs have AVX-512 F and BW (the caller checked
    // `available`).
    if m * k >= 1 << 16 {
        out.par_chunks_mut(width)
            .enumerate()
            .for_each(|(i, row)| unsafe { pack_row(a, m, k, i, row) });
    } else {
        out.chunks_mut(width)
            .enumerate()
            .for_each(|(i, row)| unsafe { pack_row(a, m, k, i, row) });
    }
    // SAFETY: `pack_row` wrote every value of every row.
    unsafe { assume_init(out) }
}

/// Writes row i of the packed `a` (zero beyond m and k).
///
/// # Safety
/// The CPU must have AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_row(a: Strided, m: usize, k: usize, i: usize, row: &mut [MaybeUninit<u16>]) {
    let (values, padding) = row.split_at_mut(if i < m { k } else { 0 });
    if values.is_empty() {
    } else if a.cs == 1 {
        let src = &a.data[a.start + i * a.rs..][..values.len()];
        for (d, &x) in values.iter_mut().zip(src) {
            d.write(to_bf16(x));
        }
    } else {
        for (kk, d) in values.iter_mut().enumerate() {
            d.write(to_bf16(a.at(i, kk)));
        }
    }
    for d in padding {
        d.write(0);
    }
}

/// `dst (+)= a·b` in bf16 × bf16 → f32 ([`kernel`]): `a` m×k, `b` k×n, `dst` m×n row-major. With
/// `accumulate` the product is added to what `dst` holds (a bias, say); otherwise `dst` is
/// overwritten. Call only when [`available`].
pub fn gemm_bf16(
    a: Strided,
    b: Strided,
    (m, k, n): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let packed = PackedB::new(b, k, n);
    gemm_bf16_packed(a, m, &packed, dst, accumulate, true);
}

/// `dst (+)= a·b` for a `b` packed beforehand; `parallel` spreads the row blocks over rayon's
/// threads (pass `false` inside a rayon task that already splits the rows). Call only when
/// [`available`].
pub fn gemm_bf16_packed(
    a: Strided,
    m: usize,
    b: &PackedB,
    dst: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    let kernel = kernel().expect("gemm_bf16 needs AMX or AVX512-BF16");
    gemm_packed_on(kernel, a, m, b, dst, accumulate, parallel);
}

/// [`gemm_bf16_packed`] on `kernel` (which the CPU must have).
fn gemm_packed_on(
    kernel: Kernel,
    a: Strided,
    m: usize,
    b: &PackedB,
    dst: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    let (k, n) = b.dims();
    assert_eq!(
        dst.len(),
        m * n,
        "gemm_bf16: output of {} values for {m}×{n}",
        dst.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let row_blocks = m.div_ceil(BLOCK);
    let width = b.kblocks * KB;
    let ap = pack_a(a, m, k, row_blocks * BLOCK, b.kblocks);
    let block = |(rb, out): (usize, &mut [f32])| {
        let rows = out.len() / n;
        let a_block = &ap[rb * BLOCK * width..][..BLOCK * width];
        // SAFETY: the CPU has `kernel` (the caller's promise); each pointer covers what the
        // block kernel reads or writes (see `row_block`).
        unsafe { row_block(kernel, a_block, width, b, out, rows, n, accumulate) };
    };
    if parallel {
        dst.par_chunks_mut(BLOCK * n).enumerate().for_each(block);
    } else {
        dst.chunks_mut(BLOCK * n).enumerate().for_each(block);
    }
}

/// One 32-row block of the output against every panel.
///
/// # Safety
/// The CPU must have `kernel`; `a_block` holds 32 rows of `width` bf16 values.
#[allow(clippy::too_many_arguments)]
unsafe fn row_block(
    kernel: Kernel,
    a_block: &[u16],
    width: usize,
    b: &PackedB,
    out: &mut [f32],
    rows: usize,
    n: usize,
    accumulate: bool,
) {
    if kernel == Kernel::Amx {
        // SAFETY: the caller checked AMX; the config is 64 bytes, aligned.
        unsafe { configure_tiles() };
    }
    let mut temp = [0f32; BLOCK * BLOCK];
    for p in 0..b.panels {
        let j0 = p * BLOCK;
        let cols = (n - j0).min(BLOCK);
        let panel = &b.data[p * b.kblocks * 2 * TILE..][..b.kblocks * 2 * TILE];
        let direct = rows == BLOCK && cols == BLOCK;
        let (c, c_stride) = if direct {
            (out[j0..].as_mut_ptr(), n)
        } else {
            if accumulate {
                for i in 0..rows {
                    temp[i * BLOCK..][..cols].copy_from_slice(&out[i * n + j0..][..cols]);
                }
            }
            (temp.as_mut_ptr(), BLOCK)
        };
        // SAFETY: `c` addresses 32 rows of 32 f32 at `c_stride` (the output when the block
        // is whole, else `temp`); `a_block` and `panel` hold the k-blocks the kernel reads.
        unsafe {
            let (ap, bp, kblocks) = (a_block.as_ptr(), panel.as_ptr(), b.kblocks);
            block_kernel(kernel, ap, width, bp, kblocks, c, c_stride, accumulate)
        };
        if !direct {
            for i in 0..rows {
                out[i * n + j0..][..cols].copy_from_slice(&temp[i * BLOCK..][..cols]);
            }
        }
    }
}

/// C (32×32 f32, row stride `cs` values) (+)= A (32 rows of `width` bf16) · panel (`kblocks`
/// pairs of B tiles) on `kernel`.
///
/// # Safety
/// The CPU must have `kernel` (AMX configured on this thread for [`Kernel::Amx`]); every
/// pointer covers what it addresses.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_kernel(
    kernel: Kernel,
    a: *const u16,
    width: usize,
    b: *const u16,
    kblocks: usize,
    c: *mut f32,
    cs: usize,
    accumulate: bool,
) {
    // SAFETY: the caller vouches for the CPU, the tile configuration and the pointers.
    unsafe {
        match kernel {
            Kernel::Amx => tile_kernel(a, width * 2, b, kblocks, c, cs * 4, accumulate),
            Kernel::Avx512Bf16 => vector_kernel(a, width, b, kblocks, c, cs, accumulate),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn block_kernel(
    _kernel: Kernel,
    _a: *const u16,
    _width: usize,
    _b: *const u16,
    _kblocks: usize,
    _c: *mut f32,
    _cs: usize,
    _accumulate: bool,
) {
    unreachable!("the bf16 kernels exist on x86-64 only ([`kernel`] is `None` elsewhere)")
}

/// Rows of one strip of [`vector_kernel`]: 8 rows × 2 vectors of 16 columns = 16 accumulator
/// registers, plus the two B vectors and a broadcast A pair, within AVX-512's 32.
const STRIP: usize = 8;

/// C (32×32 f32, row stride `cs` values) (+)= A (32 rows of bf16, row stride `as_` values) ·
/// panel (`kblocks` pairs of B tiles) with `vdpbf16ps`: for each 8-row strip, every k-pair
/// broadcasts row i's two A values to all lanes and adds their products with the panel's two
/// 16-column vectors of that k-pair (the tiles' VNNI layout: 16 k-pair rows of 16 columns × 2).
///
/// # Safety
/// The CPU must have AVX-512 F and BF16; every pointer covers what it addresses.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn vector_kernel(
    a: *const u16,
    as_: usize,
    b: *const u16,
    kblocks: usize,
    c: *mut f32,
    cs: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller vouches for the CPU and for every address below.
    unsafe {
        for strip in 0..BLOCK / STRIP {
            let c0 = c.add(strip * STRIP * cs);
            let a0 = a.add(strip * STRIP * as_);
            let mut acc = [[_mm512_setzero_ps(); 2]; STRIP];
            if accumulate {
                for (i, row) in acc.iter_mut().enumerate() {
                    row[0] = _mm512_loadu_ps(c0.add(i * cs));
                    row[1] = _mm512_loadu_ps(c0.add(i * cs + 16));
                }
            }
            for kb in 0..kblocks {
                let tile0 = b.add(kb * 2 * TILE);
                let tile1 = tile0.add(TILE);
                for pair in 0..KB / 2 {
                    let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                        tile0.add(pair * 32).cast::<__m512i>(),
                    ));
                    let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                        tile1.add(pair * 32).cast::<__m512i>(),
                    ));
                    for (i, row) in acc.iter_mut().enumerate() {
                        let a_pair = a0.add(i * as_ + kb * KB + pair * 2).cast::<i32>();
                        let av: __m512bh =
                            std::mem::transmute(_mm512_set1_epi32(a_pair.read_unaligned()));
                        row[0] = _mm512_dpbf16_ps(row[0], av, b0);
                        row[1] = _mm512_dpbf16_ps(row[1], av, b1);
                    }
                }
            }
            for (i, row) in acc.iter().enumerate() {
                _mm512_storeu_ps(c0.add(i * cs), row[0]);
                _mm512_storeu_ps(c0.add(i * cs + 16), row[1]);
            }
        }
    }
}

/// The tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Loads the tile configuration on this thread.
///
/// # Safety
/// AMX must be available and permitted (see [`available`]).
#[cfg(target_arch = "x86_64")]
unsafe fn configure_tiles() {
    let mut cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    for t in 0..8 {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    // SAFETY: a valid palette-1 configuration (the caller vouches for AMX).
    unsafe { std::arch::asm!("ldtilecfg [{0}]", in(reg) &cfg as *const TileConfig) };
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn configure_tiles() {}

/// C (32×32 f32 at byte stride `cs`) (+)= A (32 rows of bf16 at byte stride `as_`) ·
/// panel (`kblocks` pairs of B tiles), over `kblocks` blocks of 32 k-values.
///
/// # Safety
/// AMX configured on this thread; every pointer covers what it addresses.
#[cfg(target_arch = "x86_64")]
unsafe fn tile_kernel(
    a: *const u16,
    as_: usize,
    b: *const u16,
    kblocks: usize,
    c: *mut f32,
    cs: usize,
    accumulate: bool,
) {
    use std::arch::asm;
    // SAFETY: the caller vouches for the pointers and the tile configuration.
    unsafe {
        let a1 = (a as *const u8).add(16 * as_);
        let c1 = (c as *mut u8).add(16 * cs);
        if accumulate {
            asm!(
                "tileloadd tmm0, [{c} + {cs}*1]",
                "tileloadd tmm1, [{c} + {cs}*1 + 64]",
                "tileloadd tmm2, [{c1} + {cs}*1]",
                "tileloadd tmm3, [{c1} + {cs}*1 + 64]",
                c = in(reg) c, c1 = in(reg) c1, cs = in(reg) cs,
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3"
            );
        }
        asm!(
            "2:",
            "tileloadd tmm4, [{a} + {as_}*1]",
            "tileloadd tmm5, [{a1} + {as_}*1]",
            "tileloadd tmm6, [{b} + {s64}*1]",
            "tileloadd tmm7, [{b} + {s64}*1 + 1024]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a}, 64",
            "add {a1}, 64",
            "add {b}, 2048",
            "dec {k}",
            "jnz 2b",
            a = inout(reg) a => _,
            a1 = inout(reg) a1 => _,
            b = inout(reg) b => _,
            k = inout(reg) kblocks => _,
            as_ = in(reg) as_,
            s64 = in(reg) 64usize,
        );
        asm!(
            "tilestored [{c} + {cs}*1], tmm0",
            "tilestored [{c} + {cs}*1 + 64], tmm1",
            "tilestored [{c1} + {cs}*1], tmm2",
            "tilestored [{c1} + {cs}*1 + 64], tmm3",
            c = in(reg) c, c1 = in(reg) c1, cs = in(reg) cs,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_round_trips() {
        assert_eq!(to_bf16(1.0), 0x3F80);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        // 1 + 2⁻⁸ lies halfway between 1 and 1 + 2⁻⁷: ties go to the even (1.0).
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        // 1 + 3·2⁻⁸ lies halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: ties go to 1 + 2⁻⁶.
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
        assert_eq!(from_bf16(to_bf16(1.0 + 1.1 / 256.0)), 1.0 + 1.0 / 128.0);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        for x in [1e-3f32, 3.7, -1234.5, 6.1e-5] {
            assert!(((from_bf16(to_bf16(x)) - x) / x).abs() <= 1.0 / 256.0);
        }
    }

    /// The product of the bf16-rounded operands in f64: what AMX computes, up to f32 sums.
    fn reference(a: &[f32], b: &[f32], (m, k, n): (usize, usize, usize), b_t: bool) -> Vec<f32> {
        let r = |x: f32| from_bf16(to_bf16(x)) as f64;
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for kk in 0..k {
                    let bv = if b_t { b[j * k + kk] } else { b[kk * n + j] };
                    s += r(a[i * k + kk]) * r(bv);
                }
                out[i * n + j] = s as f32;
            }
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 2001) as f32
                    / 1000.0
                    - 1.0
            })
            .collect()
    }

    /// The kernels this CPU has.
    fn kernels() -> Vec<Kernel> {
        let mut out = Vec::new();
        if amx_detected() {
            out.push(Kernel::Amx);
        }
        if avx512bf16_detected() {
            out.push(Kernel::Avx512Bf16);
        }
        out
    }

    #[test]
    fn every_kernel_equals_the_bf16_reference_on_ragged_shapes() {
        let kernels = kernels();
        if kernels.is_empty() {
            eprintln!("skipped: this CPU has neither AMX nor AVX512-BF16");
            return;
        }
        for kernel in kernels {
            products_equal_the_reference(kernel);
        }
    }

    fn products_equal_the_reference(kernel: Kernel) {
        for (m, k, n) in [(37, 70, 45), (64, 64, 64), (1, 33, 5), (96, 576, 40)] {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            for b_t in [false, true] {
                // b as given (k×n row-major) or as the transpose of an n×k matrix.
                let bs = if b_t {
                    Strided {
                        data: &b,
                        start: 0,
                        rs: 1,
                        cs: k,
                    }
                } else {
                    Strided {
                        data: &b,
                        start: 0,
                        rs: n,
                        cs: 1,
                    }
                };
                let want = reference(&a, &b, (m, k, n), b_t);
                let a_s = Strided {
                    data: &a,
                    start: 0,
                    rs: k,
                    cs: 1,
                };
                let packed = PackedB::new(bs, k, n);
                // The same a stored as the transpose of a k×m matrix (a weight gradient's
                // left operand) packs to the same product.
                let a_t: Vec<f32> = (0..k * m).map(|q| a[(q % m) * k + q / m]).collect();
                let a_ts = Strided {
                    data: &a_t,
                    start: 0,
                    rs: 1,
                    cs: m,
                };
                let mut from_t = vec![f32::NAN; m * n];
                gemm_packed_on(kernel, a_ts, m, &packed, &mut from_t, false, true);
                for (g, w) in from_t.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{kernel:?} {m}×{k}×{n}, a transposed: {g} vs {w}"
                    );
                }
                let mut got = vec![f32::NAN; m * n];
                gemm_packed_on(kernel, a_s, m, &packed, &mut got, false, true);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{kernel:?} {m}×{k}×{n}: {g} vs {w}"
                    );
                }
                let mut acc = vec![1.5f32; m * n];
                gemm_packed_on(kernel, a_s, m, &packed, &mut acc, true, false);
                for (g, w) in acc.iter().zip(&want) {
                    assert!(
                        (g - (w + 1.5)).abs() <= 1e-4 * (2.5 + w.abs()),
                        "accumulate: {g} vs {}",
                        w + 1.5
                    );
                }
            }
        }
    }
}
