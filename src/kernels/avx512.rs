//! x86-64 AVX-512 VNNI kernels for matmuls with `m > 1` activation rows, selected at run time
//! ([`super::KernelPath::Avx512Vnni`]); results bit-identical to the AVX2 path.
//!
//! # Dispatch
//! | weight type | `m = 1` (GEMV) | `2 ≤ m < 24` | `m ≥ 24` |
//! |---|---|---|---|
//! | Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL | AVX2 | 8×2 tiles | wide |
//! | Q4_K, Q5_K, Q6_K, Q2_K, Q3_K | AVX2 | K tiles | wide |
//! | IQ4_XS | AVX2 | K tiles | wide |
//! | F32, F16, BF16 | AVX2 | AVX2 | AVX2 |
//!
//! (8×2 tiles: [`tile_q4`], [`tile_q8_0`]; K tiles: [`tile_k`], [`tile_q6k`], and `tile_q2k`,
//! `tile_q3k`, `tile_iq4xs` from `avx2::k_tiles`; wide:
//! [`compute_wide`]. The thresholds are where the wide kernel's per-call weight repack starts
//! to pay, measured on Zen 4.)
//!
//! # Why the results are bit-identical to `avx2`
//! For each (activation row, weight row) pair the AVX2 tiles compute, per 32-weight block, eight
//! i32 lanes `p_l = Σ_{k<4} u[4l+k]·v[4l+k]` (`vpmaddubsw` then `vpmaddwd` with ones), then
//! `acc_l = fma(d_w·d_x, f32(p_l), acc_l)` block after block, the fixed [`hsum`] of the 8 lanes
//! at the end, plus (Q4_0/Q4_1/Q5_1) the offset term `fma(offset_w, s_x, ·)` accumulated in its own
//! lane and added last. The K-quant tiles do the same per 256-weight super-block, with `p_l`
//! an exact integer sum over its sub-blocks weighted by their scales, and their min (Q2_K, Q4_K,
//! Q5_K), `−4` (Q3_K) or `−32` (Q6_K) terms. Every kernel here keeps exactly that float sequence per pair
//! (the same scale products, the same FMAs per block in block order into the pair's lane `l`,
//! [`hsum`]'s order, the same offset FMAs) and computes the same exact integers; only the
//! integer instructions, the register tiling and where each lane lives differ.
//!
//! The integers are equal because nothing saturates or wraps:
//! - AVX2's `vpmaddubsw` saturates its i16 pair sums; there `0 ≤ u ≤ 128` (4-, 5- and 6-bit
//!   quants, or `|w|` of a Q8_0, Q5_0 or IQ4 weight, −128 included) and `|v| ≤ 127` (the Q8_0/Q8_1/Q8_K
//!   activation quants are rounded from `x·127/amax`, never −128), so a pair sum is at most
//!   2·128·127 = 32512 < 32767 and `p_l` is the exact dot product of its 4 bytes.
//! - `vpdpbusd` (not the saturating `vpdpbusds`) adds four u8×i8 products to an i32 with no
//!   intermediate rounding: `p_l` exactly. Where the weights are offset to unsigned (Q8_0:
//!   `w + 128`) or the activations are (`y + 128`), the accumulator starts at the exact
//!   correction (`−128·Σ` of the other operand's 4 bytes), all within ±2²⁰.
//! - The K-quant sub-block scales are applied by `vpdpwssd` to the low i16 half of `p_l`
//!   (|p_l| ≤ 4·63·127 < 2¹⁵, the scale's high half is 0), IQ4_XS's by `vpmulld` (its |p_l|
//!   reaches 4·127·127), and the super-block sums stay far below 2³¹, as in AVX2.
//!
//! # 8×2 tiles (`2 ≤ m < 24`)
//! A tile is up to [`MR_MAX`] = 8 activation rows × [`NR_MAX`] = 2 weight rows: 16 ymm
//! accumulators (AVX-512 has 32 vector registers), each weight block unpacked once for 8 rows,
//! each activation block loaded once for 2 weight rows, the 16 scale products `d_w·d_x` of a
//! block computed 8 at a time. Per (pair, block) that leaves `vpdpbusd`, `vcvtdq2ps` and an FMA
//! with a broadcast scale operand, against `vpmaddubsw`, `vpmaddwd`, `vcvtdq2ps` and the FMA
//! in the AVX2 4×1 tile; on Zen 4 the integer multiplies and the FMAs share two pipes, so that
//! is 2 of their slots instead of 3. Q8_0 avoids `vpsignb` (also on those pipes): the
//! activations are offset (`y + 128`, one XOR per activation block) and `vpdpbusd(c, y + 128,
//! w)` starts from `c = −128·Σw`, computed once per weight block. Q5_0 runs the Q8_0 tiles on
//! its signed quants `q − 16`, Q5_1 the Q4_1 tiles with the fifth bits OR-ed in.
//!
//! # K tiles (`2 ≤ m < 24`)
//! Up to 8 activation rows per weight row, so batched decode (a few sequences, one row each)
//! unpacks each weight super-block once for all of them. Q4_K, Q5_K and Q6_K have zmm tiles
//! ([`tile_k`], [`tile_q6k`]): a zmm holds 64 weights (two 32-weight runs of the AVX2 tile),
//! `vpdpbusd` gives each run's exact 4-byte dot products, two chunks' products share the i16
//! halves of one lane and one `vpdpwssd` applies both sub-block scales ([`ZRows::dot2`]: 3
//! integer multiplies per 128 weights and row, against 4 on zmm with `vpmaddubsw`, 8 on ymm),
//! and the float work runs on pairs of rows. Q2_K, Q3_K and IQ4_XS run `avx2`'s tile bodies
//! (`avx2::k_tiles`) compiled with AVX-512 enabled: sums in ymm16–31 instead of spilling, each
//! scale product one `vpdpwssd`, 8 rows (Q2_K, Q3_K: 4). On the AMX test machine (Sapphire
//! Rapids class) the 8-row Q4_K tile takes ~3.5 ns per row and super-block on one thread, about
//! what its 6 zmm integer multiplies allow there (~1.5–1.7 G/s per core measured).
//!
//! # Wide kernel (`m ≥ 24`)
//! Lane `k` of a zmm belongs to weight row `j0 + k` of a 16-row group, with one accumulator per
//! activation row and lane position `l`; see [`compute_wide`]. No scale is broadcast per pair
//! and an activation dword is a broadcast memory operand, so per (pair, block) only the two
//! pipe-bound operations remain, at half the instructions of the 8×2 tile. It needs the 16-row
//! weight group repacked (per call, into a per-thread buffer), which pays off from a few dozen
//! activation rows.

// Register tiles index several fixed-size arrays with the same row/column counters.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::avx2::{
    self, SIGNED_IQ4NL, SIGNED_Q5_0, SIGNED_Q8_0, TileArgs, TileFn, bytes_from_bits, hsum,
    signed_block_bytes, signed_quants,
};
use super::formats::{
    self, IQ4NL_BYTES, IQ4NL_QS, IQ4XS_BYTES, IQ4XS_QS, Q2K_BYTES, Q2K_D, Q2K_DMIN, Q2K_QS,
    Q2K_SCALES, Q3K_BYTES, Q3K_D, Q3K_HMASK, Q3K_QS, Q3K_SCALES, Q4_0_BYTES, Q4_1_BYTES,
    Q5_0_BYTES, Q5_0_QS, Q5_1_BYTES, Q5_1_QH, Q5_1_QS, Q5K_QH, Q6K_BYTES, Q6K_D, Q6K_QH, Q6K_QL,
    Q6K_SCALES, Q8_0_BYTES, QK, QK_K, iq4xs_scales, q3k_scales,
};
use super::matmul::OutPtr;
use super::quantize::{Acts, GROUP};
use super::{QMatrix, WeightType};

mod amx;
pub(crate) use amx::available as amx_available;

/// Activation rows per tile (two 4-row scale groups).
const MR_MAX: usize = 2 * GROUP;

/// Weight rows per tile.
const NR_MAX: usize = 2;

/// Blocks whose scale products a tile computes ahead of their dot products. Computing them in a
/// separate loop and reading them back from memory lets every FMA take its scale as a broadcast
/// memory operand; otherwise the compiler keeps them in registers and spends two shuffles per
/// (row, block) to broadcast each one.
const CHUNK: usize = 8;

/// Computes `out[i, j]` for activation rows `a` × weight rows `r`.
///
/// # Safety
/// The CPU supports AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI; otherwise as
/// [`avx2::compute`]: `a.start` is a multiple of 4, `acts` was quantized for `w.ty` with
/// `acts.m ≥ a.end`, `w.rows ≥ r.end`, and `out` is exclusively ours for `a × r`.
pub(crate) unsafe fn compute(
    w: &QMatrix,
    acts: &Acts,
    a: Range<usize>,
    r: Range<usize>,
    out: OutPtr,
) {
    if acts.m >= WIDE_MIN_M
        && let Some(kind) = WideKind::of(w.ty)
    {
        // SAFETY: forwarded contract.
        return unsafe { compute_wide(kind, w, acts, a, r, out) };
    }
    // Tile shape limits: activation rows, weight rows.
    let (mr_max, nr_max, pick): (usize, usize, fn(usize, usize) -> TileFn) = match w.ty {
        WeightType::Q4_0 if acts.m > 1 => (MR_MAX, NR_MAX, pick_q4::<false, false>),
        WeightType::Q4_1 if acts.m > 1 => (MR_MAX, NR_MAX, pick_q4::<true, false>),
        WeightType::Q5_1 if acts.m > 1 => (MR_MAX, NR_MAX, pick_q4::<true, true>),
        WeightType::Q8_0 if acts.m > 1 => (MR_MAX, NR_MAX, pick_q8_0::<SIGNED_Q8_0>),
        WeightType::Q5_0 if acts.m > 1 => (MR_MAX, NR_MAX, pick_q8_0::<SIGNED_Q5_0>),
        WeightType::IQ4NL if acts.m > 1 => (MR_MAX, NR_MAX, pick_q8_0::<SIGNED_IQ4NL>),
        WeightType::Q4K if acts.m > 1 => (MR_MAX, 1, pick_k::<false>),
        WeightType::Q5K if acts.m > 1 => (MR_MAX, 1, pick_k::<true>),
        WeightType::Q6K if acts.m > 1 => (MR_MAX, 1, pick_q6k),
        // Eight rows of Q2_K's and Q3_K's ymm tiles run out of registers (slower than four).
        WeightType::Q2K if acts.m > 1 => (GROUP, 1, pick_q2k),
        WeightType::Q3K if acts.m > 1 => (GROUP, 1, pick_q3k),
        WeightType::IQ4XS if acts.m > 1 => (MR_MAX, 1, pick_iq4xs),
        // SAFETY: forwarded contract (AVX2/FMA/F16C are part of it).
        _ => return unsafe { avx2::compute(w, acts, a, r, out) },
    };
    debug_assert!(a.start.is_multiple_of(GROUP) && a.end <= acts.m && r.end <= w.rows);
    let t = TileArgs::new(w, acts);
    // SAFETY: the caller's contract; every row limit is a multiple of 4.
    unsafe { avx2::run_tiles(&t, a, r, (mr_max, nr_max), pick, out) };
}

/// [`compute`] with the AMX tiles for the types and row counts they take ([`amx::runs`]).
///
/// # Safety
/// As [`compute`], and [`amx_available`] returned true.
pub(crate) unsafe fn compute_amx(
    w: &QMatrix,
    acts: &Acts,
    a: Range<usize>,
    r: Range<usize>,
    out: OutPtr,
) {
    if amx::runs(w.ty, acts.m) {
        // SAFETY: forwarded contract.
        unsafe { amx::compute(w, acts, a, r, out) }
    } else {
        // SAFETY: forwarded contract.
        unsafe { compute(w, acts, a, r, out) }
    }
}

x86_tile_pickers!();

/// [`avx2::ScaledSum`] in one VNNI instruction.
struct Dpwssd;

impl avx2::ScaledSum for Dpwssd {
    #[inline(always)]
    unsafe fn add(sum: __m256i, pairs: __m256i, scales: __m256i) -> __m256i {
        // SAFETY: AVX-512 VL and VNNI are the caller's contract.
        unsafe { _mm256_dpwssd_epi32(sum, pairs, scales) }
    }
}

// Q2_K, Q3_K and IQ4_XS tiles ("K tiles" above): `avx2`'s bodies with each scale product
// fused into one `vpdpwssd` and ymm16–31 holding the sums of the rows past four (AVX2's 16
// registers spill them), so a batch of decoding sequences unpacks each weight block once for
// up to 8 rows. Q4_K, Q5_K and Q6_K have zmm tiles of their own below.
avx2::k_tiles!(@small "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", Dpwssd);

/// A zmm constant of `$n` lanes of `$t`, lane `$w` being `$e` (for `const` items and `const
/// fn`s).
macro_rules! zmm_table {
    ($t:ty, $n:expr, |$w:ident| $e:expr) => {{
        let mut a: [$t; $n] = [0; $n];
        let mut $w = 0;
        while $w < $n {
            a[$w] = $e;
            $w += 1;
        }
        // SAFETY: 64 bytes of plain data.
        unsafe { std::mem::transmute::<[$t; $n], __m512i>(a) }
    }};
}

/// 32 i16 lanes: `lo` in the low 256 bits, `hi` in the high (per-half shift counts and
/// `vpermw` indices).
const fn halves(lo: i16, hi: i16) -> __m512i {
    zmm_table!(i16, 32, |w| if w < 16 { lo } else { hi })
}

/// `halves(2c, 2c + 1)` for c in 0..4.
const PAIRS: [__m512i; 4] = [halves(0, 1), halves(2, 3), halves(4, 5), halves(6, 7)];

/// The `vpermw` index that gives each i32 lane of [`ZRows::dot2`]'s packed sums its two
/// scales: word `w` (lane `w / 2`) gets `first + step·(w % 2) + (w / 2) / per`, where the
/// first sum's lane `l` takes scale `first + l / per` and the second's `step` further.
const fn scale_words(first: usize, step: usize, per: usize) -> __m512i {
    zmm_table!(i16, 32, |w| (first + step * (w % 2) + w / 2 / per) as i16)
}

/// `vpshufb` control that moves the low word of each i32 lane to its high word (the masked
/// bytes 2 and 3 of each lane; the others are kept by the mask).
const LOW_WORD_UP: __m512i =
    zmm_table!(u8, 64, |j| if j % 4 >= 2 { (j % 16 - 2) as u8 } else { 0 });

/// `vpermw` index of Q4_K's unpacked header (words 0..8 scales, 8..16 mins) to each min twice,
/// in both halves: `madd(bsums, ·)` then weighs both 16-sums of a sub-block by its min.
const MINS_TWICE: __m512i = zmm_table!(i16, 32, |w| 8 + (w % 16 / 2) as i16);

/// `vpdpwssd`: `acc + madd(a, b)`, lane by lane. As one instruction on purpose: LLVM's machine
/// combiner splits the intrinsic into `vpmaddwd` + `vpaddd` to shorten the accumulator chain,
/// which here (8 independent chains) only doubles the pipe-bound instructions.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    // SAFETY: a register-only instruction of the enabled AVX-512 VNNI.
    unsafe {
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// The activation rows of a zmm K tile ([`tile_k`], [`tile_q6k`]): up to 8 rows, handled in
/// pairs (`2p`, `2p + 1`) whose float sums share a zmm, row `2p` in the low 8 lanes. With an
/// odd `MR` the last pair repeats its row and the copy's sums are dropped.
struct ZRows<const MR: usize> {
    rows: avx2::KRows<MR>,
    d: RowScales<MR>,
}

impl<const MR: usize> ZRows<MR> {
    /// # Safety
    /// Rows `i0..i0 + MR` exist in `t`; `i0` is a multiple of 4.
    #[inline(always)]
    unsafe fn new(t: &TileArgs, i0: usize) -> Self {
        // SAFETY: the caller's.
        unsafe {
            ZRows {
                rows: avx2::KRows::new(t, i0),
                d: RowScales::new(t.d, t.nb, i0),
            }
        }
    }

    /// The rows of pair `p`.
    #[inline(always)]
    fn pair(p: usize) -> (usize, usize) {
        (2 * p, (2 * p + 1).min(MR - 1))
    }

    /// Two 64-weight chunks `q[k]` (unsigned quants) against every row's 64 activation quants
    /// at `off[k]` of super-block `b`: `vpdpbusd` gives each chunk's exact 4-byte dot products
    /// (|·| < 2¹⁵, see the module doc), the second's are moved into the high i16 of the first's
    /// lanes, and one `vpdpwssd` adds both times their scales (`scales`: the two words of each
    /// lane, [`scale_words`]) to `sums[i]`. Lane `l` gains exactly what the two `vpmaddubsw` +
    /// `vpmaddwd` of AVX2 give its lane `l`, with 3 multiplies per 128 weights instead of 4.
    ///
    /// # Safety
    /// `b < nb`, `off[k] + 64 ≤ 256`; inlined into a function that enables AVX-512 BW and VNNI.
    #[inline(always)]
    unsafe fn dot2(
        &self,
        sums: &mut [__m512i; MR],
        b: usize,
        off: [usize; 2],
        q: [__m512i; 2],
        scales: __m512i,
    ) {
        for i in 0..MR {
            // SAFETY: the caller's.
            unsafe {
                let at = |k: usize| self.rows.y[i].add(b * QK_K + off[k]) as *const __m512i;
                let zero = _mm512_setzero_si512();
                let p0 = _mm512_dpbusd_epi32(zero, q[0], _mm512_loadu_si512(at(0)));
                let p1 = _mm512_dpbusd_epi32(zero, q[1], _mm512_loadu_si512(at(1)));
                let both = _mm512_mask_shuffle_epi8(p0, 0xCCCC_CCCC_CCCC_CCCC, p1, LOW_WORD_UP);
                sums[i] = dpwssd(sums[i], both, scales);
            }
        }
    }

    /// Pair `p`'s 16 block sums of super-block `b`, row `2p` in the low half.
    ///
    /// # Safety
    /// As [`Self::dot2`].
    #[inline(always)]
    unsafe fn bsums_pair(&self, b: usize, p: usize) -> __m512i {
        let (i, j) = Self::pair(p);
        // SAFETY: each row has 16 sums per super-block.
        unsafe {
            let lo = _mm256_loadu_si256(self.rows.bsums[i].add(b * 16) as *const __m256i);
            let hi = _mm256_loadu_si256(self.rows.bsums[j].add(b * 16) as *const __m256i);
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
        }
    }
}

/// The 8 i32 lanes of the AVX2 K tile's integer sum for both rows of a pair, from the zmm sums
/// whose two 256-bit halves hold the two interleaved runs of 32 weights that AVX2 adds lane by
/// lane: `[a.lo + a.hi | b.lo + b.hi]` (exact integers, so the same values).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn fold_pair(a: __m512i, b: __m512i) -> __m512i {
    let lo = _mm512_shuffle_i64x2::<0b01_00_01_00>(a, b);
    let hi = _mm512_shuffle_i64x2::<0b11_10_11_10>(a, b);
    _mm512_add_epi32(lo, hi)
}

/// Lanes `2p` (low half) and `2p + 1` (high half) of the 8 per-row factors `v`, broadcast.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn pair_lanes(v: __m256, p: usize) -> __m512 {
    let idx = _mm512_mask_blend_epi32(
        0xFF00,
        _mm512_set1_epi32(2 * p as i32),
        _mm512_set1_epi32(2 * p as i32 + 1),
    );
    _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(v))
}

/// The frame of the zmm K tiles (as `avx2::k_frame`): weight row `j0`'s super-blocks in order,
/// `$body` run for each, then each row's [`hsum`] of its half of its pair's sums.
macro_rules! z_frame {
    ($t:expr, $i0:expr, $j0:expr, $out:expr, $bytes:expr, |$blk:ident, $b:ident, $rows:ident, $acc:ident| $body:block) => {{
        let (t, i0, j0, out, bytes): (&TileArgs, usize, usize, OutPtr, usize) =
            ($t, $i0, $j0, $out, $bytes);
        let $rows = ZRows::<MR>::new(t, i0);
        let mut $acc = [_mm512_setzero_ps(); MR_MAX / 2];
        let wrow = t.w.add(j0 * t.rb);
        for $b in 0..t.nb {
            let $blk = wrow.add($b * bytes);
            $body
        }
        for i in 0..MR {
            let v = $acc[i / 2];
            let half = if i % 2 == 0 {
                _mm512_castps512_ps256(v)
            } else {
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
            };
            out.write(i0 + i, j0, hsum(half));
        }
    }};
}

/// Q4_K (`FIVE = false`) and Q5_K × Q8_K, `MR ≤ 8` activation rows × one weight row, on zmm:
/// each `vpmaddubsw`/`vpdpwssd` takes both 32-weight sub-blocks of a 64-weight chunk (the low
/// and high nibbles of its 32 bytes), and the float work runs on pairs of rows. The per-row
/// floats are exactly `avx2::tile_k_rows`': its 8 integer lanes are the two halves of the zmm
/// sum added ([`fold_pair`]), its min term `madd(mins, hadd(bsums))` is `madd(bsums, mins
/// doubled)` with adjacent dwords added, and the scale products and FMAs are the same, in the
/// same order. One row (a remainder) runs the AVX2 body.
///
/// # Safety
/// As `avx2::tile_k_rows`, with AVX-512 F/BW/VL/VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_k<const MR: usize, const NR: usize, const FIVE: bool>(
    t: &TileArgs,
    i0: usize,
    j0: usize,
    out: OutPtr,
) {
    debug_assert_eq!(NR, 1);
    if MR == 1 {
        // SAFETY: forwarded contract.
        return unsafe { avx2::tile_k_rows::<1, FIVE, Dpwssd>(t, i0, j0, out) };
    }
    let (bb, sc_off, qs_off) = formats::k4_layout(FIVE);
    let (m4, m1) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(1));
    let even = _mm512_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0, 8, 10, 12, 14, 0, 0, 0, 0);
    // SAFETY: a super-block is `bb` bytes with the fields at the offsets of `formats`; the
    // rest is the caller's contract.
    unsafe {
        z_frame!(t, i0, j0, out, bb, |blk, b, rows, acc| {
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                blk as *const i32,
            )));
            let (dw, dmin) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)));
            let sm =
                _mm512_castsi256_si512(_mm256_cvtepu8_epi16(avx2::k4_scales_mins(blk.add(sc_off))));
            let mins = _mm512_permutexvar_epi16(MINS_TWICE, sm);
            let hbits = if FIVE {
                _mm512_broadcast_i64x4(_mm256_loadu_si256(blk.add(Q5K_QH) as *const __m256i))
            } else {
                _mm512_setzero_si512()
            };
            let mut isum = [_mm512_setzero_si512(); MR];
            let mut q = [_mm512_setzero_si512(); 4];
            for (c, qc) in q.iter_mut().enumerate() {
                let raw = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                    blk.add(qs_off + 32 * c) as *const __m256i
                ));
                // Low nibbles (sub-block 2c) in the low half, high nibbles (2c + 1) in the high.
                *qc = _mm512_and_si512(_mm512_srlv_epi16(raw, const { halves(0, 4) }), m4);
                if FIVE {
                    // Bit 2c of each qh byte is the 5th bit of the low nibble, bit 2c+1 of the high.
                    let h = _mm512_srlv_epi16(hbits, PAIRS[c]);
                    *qc = _mm512_or_si512(*qc, _mm512_slli_epi16::<4>(_mm512_and_si512(h, m1)));
                }
            }
            // Chunks 2k and 2k + 1: sub-blocks 4k + half and 4k + 2 + half.
            for (k, idx) in [
                const { scale_words(0, 2, 8) },
                const { scale_words(4, 2, 8) },
            ]
            .into_iter()
            .enumerate()
            {
                let scales = _mm512_permutexvar_epi16(idx, sm);
                rows.dot2(
                    &mut isum,
                    b,
                    [128 * k, 128 * k + 64],
                    [q[2 * k], q[2 * k + 1]],
                    scales,
                );
            }
            let dy = rows.d.block(b);
            let (sd, smin) = (
                _mm256_mul_ps(_mm256_set1_ps(dw), dy),
                _mm256_mul_ps(_mm256_set1_ps(-dmin), dy),
            );
            for p in 0..MR.div_ceil(2) {
                let (ia, ib) = ZRows::<MR>::pair(p);
                let s = fold_pair(isum[ia], isum[ib]);
                acc[p] = _mm512_fmadd_ps(pair_lanes(sd, p), _mm512_cvtepi32_ps(s), acc[p]);
                let m = _mm512_madd_epi16(rows.bsums_pair(b, p), mins);
                let m = _mm512_add_epi32(m, _mm512_srli_epi64::<32>(m));
                let m = _mm512_maskz_permutexvar_epi32(0x0F0F, even, m);
                acc[p] = _mm512_fmadd_ps(pair_lanes(smin, p), _mm512_cvtepi32_ps(m), acc[p]);
            }
        })
    }
}

/// Q6_K × Q8_K, `MR ≤ 8` activation rows × one weight row, on zmm as [`tile_k`]: a zmm holds
/// two of `avx2::tile_q6k_rows`' 32-weight runs (its `ql` pair is one 64-byte load), each
/// 128-bit lane one 16-weight scale; the `−32·Σ scale·bsum` term and the float work as there,
/// on pairs of rows.
///
/// # Safety
/// As `avx2::tile_k_rows`, with AVX-512 F/BW/VL/VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_q6k<const MR: usize, const NR: usize>(
    t: &TileArgs,
    i0: usize,
    j0: usize,
    out: OutPtr,
) {
    debug_assert_eq!(NR, 1);
    if MR == 1 {
        // SAFETY: forwarded contract.
        return unsafe { avx2::tile_q6k_rows::<1, Dpwssd>(t, i0, j0, out) };
    }
    let (m4, m3) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x03));
    // Half `n`: scale `8n + k` in 128-bit lane `k` of `qa`, `8n + 4 + k` of `qb`.
    let idx = [
        const { scale_words(0, 4, 4) },
        const { scale_words(8, 4, 4) },
    ];
    // SAFETY: as in `tile_k` with the Q6_K field offsets.
    unsafe {
        z_frame!(t, i0, j0, out, Q6K_BYTES, |blk, b, rows, acc| {
            let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                blk.add(Q6K_D) as *const u16,
            ) as i32)));
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(Q6K_SCALES) as *const __m128i));
            let sc = _mm512_castsi256_si512(sc16);
            let mut isum = [_mm512_setzero_si512(); MR];
            for n in 0..2 {
                let ql = _mm512_loadu_si512(blk.add(Q6K_QL + 64 * n) as *const __m512i);
                let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                    blk.add(Q6K_QH + 32 * n) as *const __m256i
                ));
                let ha = _mm512_srlv_epi16(qh, const { halves(0, 2) });
                let hb = _mm512_srlv_epi16(qh, const { halves(4, 6) });
                // Runs 0 and 1 of this half (low nibbles), then runs 2 and 3 (high nibbles).
                let qa = _mm512_or_si512(
                    _mm512_and_si512(ql, m4),
                    _mm512_slli_epi16::<4>(_mm512_and_si512(ha, m3)),
                );
                let qb = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4),
                    _mm512_slli_epi16::<4>(_mm512_and_si512(hb, m3)),
                );
                let scales = _mm512_permutexvar_epi16(idx[n], sc);
                rows.dot2(&mut isum, b, [128 * n, 128 * n + 64], [qa, qb], scales);
            }
            let sd = _mm256_mul_ps(_mm256_set1_ps(dw), rows.d.block(b));
            let sc_both = _mm512_broadcast_i64x4(sc16);
            for p in 0..MR.div_ceil(2) {
                let (ia, ib) = ZRows::<MR>::pair(p);
                // Quants are stored +32: subtract 32 · Σ_g scale_g · bsum_g.
                let off = _mm512_slli_epi32::<5>(_mm512_madd_epi16(sc_both, rows.bsums_pair(b, p)));
                let s = _mm512_sub_epi32(fold_pair(isum[ia], isum[ib]), off);
                acc[p] = _mm512_fmadd_ps(pair_lanes(sd, p), _mm512_cvtepi32_ps(s), acc[p]);
            }
        })
    }
}

/// The activation scales of rows `i0..i0+MR` (`MR ≤ 8`) for the blocks of a tile: `d` or `s`
/// of the one or two 4-row groups, as 8 lanes (row `i0 + l` in lane `l`; lanes of a missing
/// second group are zero, lanes past `m` in a partial group are zero already).
struct RowScales<const MR: usize> {
    lo: *const f32,
    hi: *const f32,
}

impl<const MR: usize> RowScales<MR> {
    /// # Safety
    /// `i0` is a multiple of 4 and the groups of rows `i0..i0+MR` exist in `base`.
    #[inline(always)]
    unsafe fn new(base: *const f32, nb: usize, i0: usize) -> Self {
        // SAFETY: group i0/4 exists, and group i0/4 + 1 when MR > 4 (caller contract).
        unsafe {
            let lo = base.add(i0 / GROUP * nb * GROUP);
            let hi = if MR > GROUP { lo.add(nb * GROUP) } else { lo };
            RowScales { lo, hi }
        }
    }

    /// # Safety
    /// `b < nb`; the CPU has AVX.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn block(&self, b: usize) -> __m256 {
        // SAFETY: each group holds nb·4 floats (caller contract of `new`).
        unsafe {
            if MR > GROUP {
                _mm256_loadu2_m128(self.hi.add(b * GROUP), self.lo.add(b * GROUP))
            } else {
                _mm256_zextps128_ps256(_mm_loadu_ps(self.lo.add(b * GROUP)))
            }
        }
    }
}

/// Q4_0 (`Q41 = false`, offset −8·d), Q4_1 (`Q41 = true`, offset m) and Q5_1 (`Q41` and
/// `FIVE`) × Q8_0/Q8_1, `MR ≤ 8` rows × `NR ≤ 2` weight rows. Per pair the float operations are
/// those of `avx2::tile_q4`.
///
/// # Safety
/// AVX2/FMA/F16C and AVX-512 F/BW/VL/VNNI; the tile lies inside the operands described by `t`
/// (see [`compute`]).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_q4<const MR: usize, const NR: usize, const Q41: bool, const FIVE: bool>(
    t: &TileArgs,
    i0: usize,
    j0: usize,
    out: OutPtr,
) {
    debug_assert!(Q41 || !FIVE);
    let (bb, qoff) = match (Q41, FIVE) {
        (true, true) => (Q5_1_BYTES, Q5_1_QS),
        (true, false) => (Q4_1_BYTES, 4),
        _ => (Q4_0_BYTES, 2),
    };
    let mask = _mm256_set1_epi8(0x0F);
    let bit5 = _mm256_set1_epi8(0x10);
    // Shift the upper 128 bits by 4: low nibbles (weights 0..16) below, high nibbles above.
    let nibble_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    // Lane l: the offset term of row i0 + l (as the AVX2 tile's 4-lane `accm`, 8 rows wide).
    let mut accm = [_mm256_setzero_ps(); NR];
    let mut sc = [[[0f32; MR_MAX]; NR]; CHUNK];
    // SAFETY (whole block): rows j0..j0+NR and i0..i0+MR exist (caller contract), so every
    // block pointer stays inside its row: weight block b at b·bb (< rb), activation block at
    // b·32 (< cols), and the scales of block b at b·4 in their groups (< nb·4).
    unsafe {
        let wrow = t.weight_rows::<NR>(j0);
        let yrow = t.act_rows::<MR>(i0);
        let dx = RowScales::<MR>::new(t.d, t.nb, i0);
        let sx = RowScales::<MR>::new(t.s, t.nb, i0);
        let mut b0 = 0;
        while b0 < t.nb {
            let n = (t.nb - b0).min(CHUNK);
            for c in 0..n {
                let b = b0 + c;
                let (dxb, sxb) = (dx.block(b), sx.block(b));
                for j in 0..NR {
                    let blk = wrow[j].add(b * bb);
                    let (dw, mw) = if Q41 {
                        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                            blk as *const i32,
                        )));
                        (
                            _mm256_broadcastss_ps(dm),
                            _mm256_broadcastss_ps(_mm_movehdup_ps(dm)),
                        )
                    } else {
                        let raw = std::ptr::read_unaligned(blk as *const u16);
                        let dw = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(raw as i32)));
                        (dw, _mm256_mul_ps(dw, _mm256_set1_ps(-8.0)))
                    };
                    accm[j] = _mm256_fmadd_ps(mw, sxb, accm[j]);
                    _mm256_storeu_ps(sc[c][j].as_mut_ptr(), _mm256_mul_ps(dw, dxb));
                }
            }
            for c in 0..n {
                let b = b0 + c;
                let mut q = [_mm256_setzero_si256(); NR];
                for j in 0..NR {
                    let raw = _mm_loadu_si128(wrow[j].add(b * bb + qoff) as *const __m128i);
                    let raw = _mm256_broadcastsi128_si256(raw);
                    q[j] = _mm256_and_si256(_mm256_srlv_epi32(raw, nibble_shift), mask);
                    if FIVE {
                        let hi =
                            _mm256_and_si256(bytes_from_bits(wrow[j].add(b * bb + Q5_1_QH)), bit5);
                        q[j] = _mm256_or_si256(q[j], hi);
                    }
                }
                for i in 0..MR {
                    let y = _mm256_loadu_si256(yrow[i].add(b * QK) as *const __m256i);
                    for j in 0..NR {
                        let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q[j], y);
                        acc[i][j] = _mm256_fmadd_ps(
                            _mm256_set1_ps(sc[c][j][i]),
                            _mm256_cvtepi32_ps(p),
                            acc[i][j],
                        );
                    }
                }
            }
            b0 += n;
        }
        for j in 0..NR {
            let mut mins = [0f32; MR_MAX];
            _mm256_storeu_ps(mins.as_mut_ptr(), accm[j]);
            for i in 0..MR {
                out.write(i0 + i, j0 + j, hsum(acc[i][j]) + mins[i]);
            }
        }
    }
}

/// Q8_0, Q5_0 and IQ4_NL (`FMT`, the signed quants of `avx2::signed_quants`) × Q8_0, `MR ≤ 8`
/// rows × `NR ≤ 2` weight rows: `vpdpbusd(−128·Σw, y + 128, w)`.
///
/// # Safety
/// As [`tile_q4`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_q8_0<const MR: usize, const NR: usize, const FMT: u8>(
    t: &TileArgs,
    i0: usize,
    j0: usize,
    out: OutPtr,
) {
    let bb = signed_block_bytes(FMT);
    let bias = _mm256_set1_epi8(-128);
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    let mut sc = [[[0f32; MR_MAX]; NR]; CHUNK];
    // SAFETY: as in `tile_q4`, with blocks of `bb` bytes (see `avx2::signed_quants`).
    unsafe {
        let wrow = t.weight_rows::<NR>(j0);
        let yrow = t.act_rows::<MR>(i0);
        let dx = RowScales::<MR>::new(t.d, t.nb, i0);
        let mut b0 = 0;
        while b0 < t.nb {
            let n = (t.nb - b0).min(CHUNK);
            for c in 0..n {
                let b = b0 + c;
                let dxb = dx.block(b);
                for j in 0..NR {
                    let raw = std::ptr::read_unaligned(wrow[j].add(b * bb) as *const u16);
                    let dw = _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(raw as i32)));
                    _mm256_storeu_ps(sc[c][j].as_mut_ptr(), _mm256_mul_ps(dw, dxb));
                }
            }
            for c in 0..n {
                let b = b0 + c;
                let mut wq = [_mm256_setzero_si256(); NR];
                let mut corr = [_mm256_setzero_si256(); NR];
                for j in 0..NR {
                    wq[j] = signed_quants::<FMT>(wrow[j].add(b * bb));
                    // −128·(sum of each 4 weights): cancels the +128 on the activations.
                    let s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), bias, wq[j]);
                    corr[j] = _mm256_sub_epi32(_mm256_setzero_si256(), s);
                }
                for i in 0..MR {
                    let y = _mm256_loadu_si256(yrow[i].add(b * QK) as *const __m256i);
                    let yb = _mm256_xor_si256(y, bias);
                    for j in 0..NR {
                        let p = _mm256_dpbusd_epi32(corr[j], yb, wq[j]);
                        acc[i][j] = _mm256_fmadd_ps(
                            _mm256_set1_ps(sc[c][j][i]),
                            _mm256_cvtepi32_ps(p),
                            acc[i][j],
                        );
                    }
                }
            }
            b0 += n;
        }
        for i in 0..MR {
            for j in 0..NR {
                out.write(i0 + i, j0 + j, hsum(acc[i][j]));
            }
        }
    }
}

/// Activation rows from which every type of [`WideKind`] uses the wide kernel
/// ([`compute_wide`]); below it the VNNI tiles of up to 8 rows win (the repack costs more than
/// the wide tile saves).
const WIDE_MIN_M: usize = 24;

/// Weight rows per wide group: the 16 lanes of a zmm.
const WIDE: usize = 16;

/// 64-byte lines of one repacked 32-weight block of a 16-row group: 8 lines of weights, `d`,
/// and (Q4) the offset.
const WIDE_LINES: usize = 10;

/// 64-byte lines of one repacked Q4_K/Q5_K super-block of a 16-row group: 8 lines of weights
/// per 32-weight sub-block, then 8 lines of sub-block scales, 8 of mins, `d` and `−dmin`.
const WIDE_LINES_K: usize = 82;

/// 64-byte lines of one repacked Q6_K, Q3_K or Q2_K super-block of a 16-row group
/// ([`repack_g16`]): 8 lines of weights per 32-weight run, 16 lines of the 16-weight scales, 8
/// of scale (Q2_K: min) pairs, `d` and Q2_K's `−dmin`.
const WIDE_LINES_G16: usize = 90;

/// One cache line, so the repack buffer is 64-byte aligned.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

thread_local! {
    /// Per-thread buffer for one repacked 16-row weight group (grows to the largest `nb` seen).
    static REPACK: std::cell::RefCell<Vec<Line>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The weight types of the wide kernel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WideKind {
    /// Q4_0 (offset −8·d).
    Q4_0,
    /// Q4_1 (offset m).
    Q4_1,
    /// Q8_0 (weights stored +128, see [`tile_wide`]).
    Q8_0,
    /// Q5_0 (signed quants `q − 16` stored +128, as Q8_0's).
    Q5_0,
    /// Q5_1 (5-bit quants, offset m).
    Q5_1,
    /// IQ4_NL (its levels stored +128, as Q8_0's quants).
    IQ4NL,
    /// Q4_K ([`tile_wide_sb`]).
    Q4K,
    /// Q5_K ([`tile_wide_sb`]).
    Q5K,
    /// Q6_K ([`tile_wide_sb`]).
    Q6K,
    /// Q3_K ([`tile_wide_sb`]).
    Q3K,
    /// Q2_K ([`tile_wide_sb`]).
    Q2K,
    /// IQ4_XS ([`tile_wide_sb`], its levels stored +128).
    IQ4XS,
}

impl WideKind {
    /// The wide kernel's kind for `ty`; `None` for the dense types.
    fn of(ty: WeightType) -> Option<WideKind> {
        Some(match ty {
            WeightType::Q4_0 => WideKind::Q4_0,
            WeightType::Q4_1 => WideKind::Q4_1,
            WeightType::Q8_0 => WideKind::Q8_0,
            WeightType::Q5_0 => WideKind::Q5_0,
            WeightType::Q5_1 => WideKind::Q5_1,
            WeightType::IQ4NL => WideKind::IQ4NL,
            WeightType::Q4K => WideKind::Q4K,
            WeightType::Q5K => WideKind::Q5K,
            WeightType::Q6K => WideKind::Q6K,
            WeightType::Q3K => WideKind::Q3K,
            WeightType::Q2K => WideKind::Q2K,
            WeightType::IQ4XS => WideKind::IQ4XS,
            WeightType::F32 | WeightType::F16 | WeightType::BF16 => return None,
        })
    }
}

/// The wide kernel for many activation rows: lane `k` of a zmm belongs to weight row `j0 + k`
/// of a 16-row group, and there is one accumulator per activation row and per *lane position*
/// `l` (0..8) of the AVX2 layout.
///
/// Each 16-row weight group is first repacked ([`repack`]: unpacked quants, transposed so that
/// line `l` of block `b` holds dword `l` of the 16 rows' blocks, plus their `d` and offset as
/// f32). Then `vpdpbusd(U_l, broadcast(y dword l))` gives lane position `l` of 16 (activation
/// row, weight row) pairs at once, the 16 scale products `d_w·d_x` are one multiply per
/// (activation row, block), and no scale is broadcast per pair. Per pair and block the float
/// work is exactly the AVX2 one: lane `l` of pair (i, j) is `fma(d_w·d_x, f32(p_l), acc)` block
/// after block, the final sum is [`hsum`]'s order, `((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7))`, then
/// `+ offset`.
///
/// # Safety
/// As [`compute`].
unsafe fn compute_wide(
    kind: WideKind,
    w: &QMatrix,
    acts: &Acts,
    a: Range<usize>,
    r: Range<usize>,
    out: OutPtr,
) {
    debug_assert!(a.end <= acts.m && r.end <= w.rows);
    let t = TileArgs::new(w, acts);
    type Repack = unsafe fn(&TileArgs, usize, usize, *mut Line);
    type WideTile = unsafe fn(&TileArgs, *const Line, usize, usize, usize, OutPtr);
    // One arm per kind: lines per block, the repack, and the tile for two and for one
    // activation row (`$tile::<2, …>`, `$tile::<1, …>`).
    macro_rules! wide {
        ($lines:expr, $repack:expr, $tile:ident, $g:expr) => {
            ($lines, $repack, $tile::<2, { $g }>, $tile::<1, { $g }>)
        };
    }
    let (lines_per_block, repack, tile2, tile1): (usize, Repack, WideTile, WideTile) = match kind {
        WideKind::Q4_0 => wide!(WIDE_LINES, repack::<0>, tile_wide, 0),
        WideKind::Q4_1 => wide!(WIDE_LINES, repack::<1>, tile_wide, 1),
        WideKind::Q8_0 => wide!(WIDE_LINES, repack::<2>, tile_wide, 2),
        WideKind::Q5_0 => wide!(WIDE_LINES, repack::<3>, tile_wide, 2),
        WideKind::Q5_1 => wide!(WIDE_LINES, repack::<4>, tile_wide, 1),
        WideKind::IQ4NL => wide!(WIDE_LINES, repack::<5>, tile_wide, 2),
        WideKind::Q4K => wide!(WIDE_LINES_K, repack_k::<false>, tile_wide_sb, SB_K4),
        WideKind::Q5K => wide!(WIDE_LINES_K, repack_k::<true>, tile_wide_sb, SB_K4),
        WideKind::IQ4XS => wide!(WIDE_LINES_K, repack_iq4xs, tile_wide_sb, SB_IQ4XS),
        WideKind::Q6K => wide!(WIDE_LINES_G16, repack_g16::<G16_Q6K>, tile_wide_sb, G16_Q6K),
        WideKind::Q3K => wide!(WIDE_LINES_G16, repack_g16::<G16_Q3K>, tile_wide_sb, G16_Q3K),
        WideKind::Q2K => wide!(WIDE_LINES_G16, repack_g16::<G16_Q2K>, tile_wide_sb, G16_Q2K),
    };
    REPACK.with_borrow_mut(|buf| {
        let lines = t.nb * lines_per_block;
        if buf.len() < lines {
            buf.resize(lines, Line([0; 64]));
        }
        let pack = buf.as_mut_ptr();
        let mut j = r.start;
        while j < r.end {
            let n = (r.end - j).min(WIDE);
            // SAFETY: rows j..j+n exist; `pack` holds nb·lines_per_block lines; CPU features
            // are the caller's contract.
            unsafe { repack(&t, j, n, pack) };
            let mut i = a.start;
            while i < a.end {
                let mr = (a.end - i).min(2);
                let tile = if mr == 2 { tile2 } else { tile1 };
                // SAFETY: rows i..i+mr exist; `pack` holds the group; the outputs
                // (i..i+mr) × (j..j+n) are ours.
                unsafe { tile(&t, pack, i, j, n, out) };
                i += mr;
            }
            j += n;
        }
    });
}

/// Repacks weight rows `j0..j0+n` (`n ≤ 16`; missing rows are zero) of a Q4_0 (`K = 0`),
/// Q4_1 (1), Q8_0 (2), Q5_0 (3), Q5_1 (4) or IQ4_NL (5) matrix into `dst`: for block
/// `b`, lines `10b + l` (l < 8) hold, in their 16 dword lanes, dword `l` of each row's block as
/// the AVX2 tiles feed it to the integer dot product (Q4, Q5_1: the unpacked quants of
/// `avx2::tile_q4`'s `q`; Q8_0, Q5_0, IQ4_NL: the signed quants + 128, as u8); line `10b + 8`
/// holds the
/// rows' `d` and line `10b + 9` their offset (Q4_1/Q5_1 `m`, Q4_0 `-8·d`) as f32.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI and F16C; rows `j0..j0+n` exist in `t`; `dst` holds `nb·10` lines.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn repack<const K: u8>(t: &TileArgs, j0: usize, n: usize, dst: *mut Line) {
    let kind = [
        WideKind::Q4_0,
        WideKind::Q4_1,
        WideKind::Q8_0,
        WideKind::Q5_0,
        WideKind::Q5_1,
        WideKind::IQ4NL,
    ][K as usize];
    let (bb, qoff) = match kind {
        WideKind::Q4_0 => (Q4_0_BYTES, 2),
        WideKind::Q4_1 => (Q4_1_BYTES, 4),
        WideKind::Q5_0 => (Q5_0_BYTES, Q5_0_QS),
        WideKind::Q5_1 => (Q5_1_BYTES, Q5_1_QS),
        WideKind::IQ4NL => (IQ4NL_BYTES, IQ4NL_QS),
        _ => (Q8_0_BYTES, 2),
    };
    let bit5 = _mm256_set1_epi8(0x10);
    let mask = _mm256_set1_epi8(0x0F);
    let nibble_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    let bias = _mm256_set1_epi8(-128);
    // SAFETY: block b of row j0 + k (k < n) lies inside the weights; line 10b + 9 < nb·10.
    unsafe {
        for b in 0..t.nb {
            let line = dst.add(b * WIDE_LINES);
            let mut d16 = [0u16; WIDE];
            let mut m16 = [0u16; WIDE];
            let mut z = [_mm512_setzero_si512(); WIDE / 2];
            for k in 0..n {
                let blk = t.w.add((j0 + k) * t.rb + b * bb);
                d16[k] = std::ptr::read_unaligned(blk as *const u16);
                let q = if kind == WideKind::Q8_0 {
                    _mm256_xor_si256(signed_quants::<SIGNED_Q8_0>(blk), bias)
                } else if kind == WideKind::Q5_0 {
                    _mm256_xor_si256(signed_quants::<SIGNED_Q5_0>(blk), bias)
                } else if kind == WideKind::IQ4NL {
                    _mm256_xor_si256(signed_quants::<SIGNED_IQ4NL>(blk), bias)
                } else {
                    if matches!(kind, WideKind::Q4_1 | WideKind::Q5_1) {
                        m16[k] = std::ptr::read_unaligned(blk.add(2) as *const u16);
                    }
                    let raw = _mm_loadu_si128(blk.add(qoff) as *const __m128i);
                    let q = _mm256_and_si256(
                        _mm256_srlv_epi32(_mm256_broadcastsi128_si256(raw), nibble_shift),
                        mask,
                    );
                    if kind == WideKind::Q5_1 {
                        let hi = _mm256_and_si256(bytes_from_bits(blk.add(Q5_1_QH)), bit5);
                        _mm256_or_si256(q, hi)
                    } else {
                        q
                    }
                };
                put_row(&mut z, k, q);
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(d16.as_ptr() as *const __m256i));
            _mm512_store_ps(line.add(8) as *mut f32, dw);
            match kind {
                WideKind::Q4_0 => _mm512_store_ps(
                    line.add(9) as *mut f32,
                    _mm512_mul_ps(dw, _mm512_set1_ps(-8.0)),
                ),
                WideKind::Q4_1 | WideKind::Q5_1 => _mm512_store_ps(
                    line.add(9) as *mut f32,
                    _mm512_cvtph_ps(_mm256_loadu_si256(m16.as_ptr() as *const __m256i)),
                ),
                _ => {}
            }
            transpose_store(&z, line);
        }
    }
}

/// Puts row `k`'s 32 bytes `q` into the row pairs `z` that [`transpose_store`] takes.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn put_row(z: &mut [__m512i; WIDE / 2], k: usize, q: __m256i) {
    z[k / 2] = if k.is_multiple_of(2) {
        _mm512_castsi256_si512(q)
    } else {
        _mm512_inserti64x4::<1>(z[k / 2], q)
    };
}

/// Stores the 16 rows of 8 dwords held as row pairs in `z` (`z[p]` = rows 2p, 2p+1) as 8
/// lines: line `l` = dword `l` of rows 0..16.
///
/// # Safety
/// AVX-512 F; `line` points to 8 writable, 64-byte aligned lines.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn transpose_store(z: &[__m512i; WIDE / 2], line: *mut Line) {
    // SAFETY: lines 0..8 are writable and aligned (caller contract).
    unsafe {
        for (l, v) in transpose(z).into_iter().enumerate() {
            _mm512_store_si512(line.add(l) as *mut __m512i, v);
        }
    }
}

/// The 16 rows of 8 dwords held as row pairs in `z` (`z[p]` = rows 2p, 2p+1) as 8 vectors:
/// vector `l` = dword `l` of rows 0..16.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn transpose(z: &[__m512i; WIDE / 2]) -> [__m512i; 8] {
    // Row r of a quad (0..4), dword l (0..4 or 4..8) from the pair vectors [row 2p | row 2p+1].
    let idx_lo = _mm512_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27);
    let idx_hi = _mm512_add_epi32(idx_lo, _mm512_set1_epi32(4));
    // Quad g, lane position l in 128-bit lane l % 4: [rows 4g..4g+4, dword l].
    let mut tlo = [_mm512_setzero_si512(); 4];
    let mut thi = [_mm512_setzero_si512(); 4];
    for g in 0..4 {
        tlo[g] = _mm512_permutex2var_epi32(z[2 * g], idx_lo, z[2 * g + 1]);
        thi[g] = _mm512_permutex2var_epi32(z[2 * g], idx_hi, z[2 * g + 1]);
    }
    // 4×4 transpose of 128-bit lanes: line l = [quads 0..4, dword l].
    let mut lines = [_mm512_setzero_si512(); 8];
    for (half, tq) in [tlo, thi].iter().enumerate() {
        let p = _mm512_shuffle_i32x4::<0x44>(tq[0], tq[1]);
        let q = _mm512_shuffle_i32x4::<0xEE>(tq[0], tq[1]);
        let r = _mm512_shuffle_i32x4::<0x44>(tq[2], tq[3]);
        let s = _mm512_shuffle_i32x4::<0xEE>(tq[2], tq[3]);
        lines[4 * half] = _mm512_shuffle_i32x4::<0x88>(p, r);
        lines[4 * half + 1] = _mm512_shuffle_i32x4::<0xDD>(p, r);
        lines[4 * half + 2] = _mm512_shuffle_i32x4::<0x88>(q, s);
        lines[4 * half + 3] = _mm512_shuffle_i32x4::<0xDD>(q, s);
    }
    lines
}

/// Super-block `b` of the rows `j0..j0+n` (`n ≤ 16`) of a 16-row group, as the repacks read it.
struct Group16 {
    /// Row `j0`'s super-block; row `j0 + k`'s is `k·rb` further.
    base: *const u8,
    rb: usize,
    n: usize,
}

impl Group16 {
    /// Where row `j0 + k`'s super-block starts.
    ///
    /// # Safety
    /// `k < n`.
    #[inline(always)]
    unsafe fn blk(&self, k: usize) -> *const u8 {
        // SAFETY: the caller's.
        unsafe { self.base.add(k * self.rb) }
    }

    /// The little-endian dword at byte `off` of each row's super-block as the 16 lanes of a
    /// zmm (zero in lanes `n..16`): one gather instead of 16 scalar loads and lane inserts.
    ///
    /// # Safety
    /// AVX-512 F; bytes `off..off + 4` lie inside each of the `n` super-blocks.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[inline]
    unsafe fn dwords(&self, off: usize) -> __m512i {
        let rows = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let idx = _mm512_mullo_epi32(rows, _mm512_set1_epi32(self.rb as i32));
        let mask = ((1u32 << self.n) - 1) as u16;
        // SAFETY: the masked lanes read bytes off..off+4 of rows j0..j0+n (caller contract).
        unsafe {
            _mm512_mask_i32gather_epi32::<1>(
                _mm512_setzero_si512(),
                mask,
                idx,
                self.base.add(off) as *const i32,
            )
        }
    }
}

/// `d` (the low f16 of `dd`'s lanes) and `−dmin` (the high f16) as f32 in lines `at` and `at
/// + 1`: the header lines of [`repack_super_blocks`] after the per-type values.
///
/// # Safety
/// AVX-512 F and F16C; lines `at`, `at + 1` are writable and 64-byte aligned.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn store_d_dmin(line: *mut Line, at: usize, dd: __m512i) {
    let (d, ndmin) = d_ndmin(dd);
    // SAFETY: the caller's.
    unsafe {
        _mm512_store_ps(line.add(at) as *mut f32, d);
        _mm512_store_ps(line.add(at + 1) as *mut f32, ndmin);
    }
}

/// `d` (the low f16 of `dd`'s lanes) and `−dmin` (the high f16) as f32.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn d_ndmin(dd: __m512i) -> (__m512, __m512) {
    let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dd));
    let dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dd)));
    (d, _mm512_sub_ps(_mm512_setzero_ps(), dmin))
}

/// A [`repack_super_blocks`] header from each row's values, for the types whose scales are
/// unpacked row by row: lines `64..64 + LANES` get the rows' 32-bit values, the two after them
/// `d` and `−dmin` (the f16 bits `values` returns with them).
///
/// # Safety
/// As [`repack_super_blocks`]' `header`; `values` reads only inside the super-block it is given.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn header_by_rows<const LANES: usize>(
    g: &Group16,
    line: *mut Line,
    values: impl Fn(*const u8) -> ([u32; LANES], u16, u16),
) {
    let mut dd = [0u32; WIDE];
    let mut lanes = [[0u32; WIDE]; LANES];
    // SAFETY: rows k < n exist; lines 64..66 + LANES are the caller's.
    unsafe {
        for k in 0..g.n {
            let (v, d, dmin) = values(g.blk(k));
            dd[k] = u32::from(d) | u32::from(dmin) << 16;
            for (lane, v) in lanes.iter_mut().zip(v) {
                lane[k] = v;
            }
        }
        for (i, v) in lanes.iter().enumerate() {
            let v = _mm512_loadu_si512(v.as_ptr() as *const __m512i);
            _mm512_store_si512(line.add(64 + i) as *mut __m512i, v);
        }
        let dd = _mm512_loadu_si512(dd.as_ptr() as *const __m512i);
        store_d_dmin(line, 64 + LANES, dd);
    }
}

/// The repack of the super-block types, super-block `b` of the group (weight rows `j0..j0+n`)
/// from line `lines_per_block·b` of `dst`: lines `8r..8r + 8` hold dword `l` of run `r`'s 32
/// quant bytes `quants(blk, r)` (r < 8) of each row (transposed, [`transpose_store`]); lines
/// `64..64 + LANES` the rows' 32-bit scale values, the two lines after them the rows' `d` and
/// `−dmin` as f32, all written by `header`.
///
/// # Safety
/// AVX-512 F/BW/VL and F16C; rows `j0..j0+n` (`n ≤ 16`) exist in `t` with super-blocks of `bb`
/// bytes; `dst` holds `nb·lines_per_block` 64-byte aligned lines, `lines_per_block ≥ 66 +
/// LANES`; `header` writes only lines `64..66 + LANES` of the line it is given and, like
/// `quants`, reads only inside the super-blocks it is given.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn repack_super_blocks(
    t: &TileArgs,
    j0: usize,
    n: usize,
    dst: *mut Line,
    bb: usize,
    lines_per_block: usize,
    header: impl Fn(&Group16, *mut Line),
    quants: impl Fn(*const u8, usize) -> __m256i,
) {
    // SAFETY: super-block b of row j0 + k (k < n) lies inside the weights; the lines written
    // are below (b + 1)·lines_per_block ≤ nb·lines_per_block.
    unsafe {
        for b in 0..t.nb {
            let line = dst.add(b * lines_per_block);
            let g = Group16 {
                base: t.w.add(j0 * t.rb + b * bb),
                rb: t.rb,
                n,
            };
            header(&g, line);
            for r in 0..8 {
                let mut z = [_mm512_setzero_si512(); WIDE / 2];
                for k in 0..n {
                    put_row(&mut z, k, quants(g.blk(k), r));
                }
                transpose_store(&z, line.add(8 * r));
            }
        }
    }
}

/// `MR` (1 or 2) activation rows from `i0` × the repacked 16-row group at `pack` (weight rows
/// `j0..j0+n`); `K` is the layout: 0 Q4_0, 1 Q4_1 and Q5_1 (offset line), 2 Q8_0 and Q5_0
/// (weights stored +128).
///
/// Q8_0 (and Q5_0) weights are stored +128 (unsigned, as `vpdpbusd` needs), so each lane's dot product
/// starts from `−128·Σy` over its 4 activations instead of 0: `Σ(w+128)·y − 128·Σy = Σw·y`,
/// exactly (all in i32, no overflow).
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI; `pack` was filled by [`repack`] for this matrix and kind; rows
/// `i0..i0+MR` exist in the activations; the outputs `(i0..i0+MR) × (j0..j0+n)` are ours.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_wide<const MR: usize, const K: u8>(
    t: &TileArgs,
    pack: *const Line,
    i0: usize,
    j0: usize,
    n: usize,
    out: OutPtr,
) {
    let q8 = K == 2;
    let bias = _mm256_set1_epi8(-128);
    let mut acc = [[_mm512_setzero_ps(); 8]; MR];
    let mut accm = [_mm512_setzero_ps(); MR];
    // Q8_0: the −128·Σy start of each lane, for the blocks of a chunk (see `CHUNK`).
    let mut start = [[[0i32; 8]; MR]; CHUNK];
    // SAFETY: activation row i has cols quants at i·cols and its scales at
    // ((i/4)·nb + b)·4 + i%4; line 10b + 9 < nb·10 of `pack`.
    unsafe {
        let yrow = t.act_rows::<MR>(i0);
        let drow = t.row_scales::<MR>(t.d, i0);
        let srow = t.row_scales::<MR>(t.s, i0);
        let mut b0 = 0;
        while b0 < t.nb {
            let nc = (t.nb - b0).min(CHUNK);
            if q8 {
                for c in 0..nc {
                    for i in 0..MR {
                        let y = _mm256_loadu_si256(yrow[i].add((b0 + c) * QK) as *const __m256i);
                        let s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), bias, y);
                        let neg = _mm256_sub_epi32(_mm256_setzero_si256(), s);
                        _mm256_storeu_si256(start[c][i].as_mut_ptr() as *mut __m256i, neg);
                    }
                }
            }
            for c in 0..nc {
                let b = b0 + c;
                let line = pack.add(b * WIDE_LINES);
                let dw = _mm512_load_ps(line.add(8) as *const f32);
                let mut sc = [_mm512_setzero_ps(); MR];
                for i in 0..MR {
                    sc[i] = _mm512_mul_ps(dw, _mm512_set1_ps(*drow[i].add(b * GROUP)));
                }
                if !q8 {
                    let mw = _mm512_load_ps(line.add(9) as *const f32);
                    for i in 0..MR {
                        let sx = _mm512_set1_ps(*srow[i].add(b * GROUP));
                        accm[i] = _mm512_fmadd_ps(mw, sx, accm[i]);
                    }
                }
                for l in 0..8 {
                    let u = _mm512_load_si512(line.add(l) as *const __m512i);
                    for i in 0..MR {
                        let y = std::ptr::read_unaligned(yrow[i].add(b * QK + 4 * l) as *const i32);
                        let init = if q8 {
                            _mm512_set1_epi32(start[c][i][l])
                        } else {
                            _mm512_setzero_si512()
                        };
                        let p = _mm512_dpbusd_epi32(init, u, _mm512_set1_epi32(y));
                        acc[i][l] = _mm512_fmadd_ps(sc[i], _mm512_cvtepi32_ps(p), acc[i][l]);
                    }
                }
            }
            b0 += nc;
        }
        for i in 0..MR {
            let a = &acc[i];
            // `hsum`'s order for every lane at once.
            let s = _mm512_add_ps(
                _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
                _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7])),
            );
            let s = if q8 { s } else { _mm512_add_ps(s, accm[i]) };
            let mut v = [0f32; WIDE];
            _mm512_storeu_ps(v.as_mut_ptr(), s);
            for k in 0..n {
                out.write(i0 + i, j0 + k, v[k]);
            }
        }
    }
}

/// Repacks weight rows `j0..j0+n` (`n ≤ 16`; missing rows are zero) of a Q4_K (`FIVE =
/// false`) or Q5_K matrix into `dst`, 82 lines per super-block `b` (from line `82b`):
/// - `8s + l` (s, l < 8): dword `l` of each row's 32 quants of sub-block `s` (weights
///   32s..32s+32: the low nibbles of `qs[32c..32c+32]` for s = 2c, the high ones for s = 2c+1,
///   plus the fifth bit for Q5_K), the bytes `avx2::tile_k` feeds to `vpmaddubsw`;
/// - `64 + s`: the 6-bit scale of sub-block `s` as i32; `72 + s`: its min, in both i16 halves;
/// - `80`: `d`, `81`: `−dmin`, as f32.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI and F16C; rows `j0..j0+n` exist in `t`; `dst` holds `nb·82` lines.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn repack_k<const FIVE: bool>(t: &TileArgs, j0: usize, n: usize, dst: *mut Line) {
    let bb = formats::k4_layout(FIVE).0;
    // SAFETY: forwarded contract; each closure reads the super-block it is given.
    unsafe {
        repack_super_blocks(
            t,
            j0,
            n,
            dst,
            bb,
            WIDE_LINES_K,
            |g, line| {
                let (sc, mins, dd) = k4_header::<FIVE>(g);
                for s in 0..8 {
                    _mm512_store_si512(line.add(64 + s) as *mut __m512i, sc[s]);
                    // Mins go in both i16 halves.
                    let both = _mm512_or_si512(mins[s], _mm512_slli_epi32::<16>(mins[s]));
                    _mm512_store_si512(line.add(72 + s) as *mut __m512i, both);
                }
                store_d_dmin(line, 80, dd);
            },
            |blk, s| k4_quants::<FIVE>(blk, s),
        )
    }
}

/// The 8 sub-block scales and 8 mins (6-bit, as i32 lanes) and the `d`/`dmin` dword of a
/// Q4_K (`FIVE = false`) or Q5_K super-block of 16 rows: ggml's scale unpacking
/// (`get_scale_min_k4`) on 16 rows at once.
///
/// # Safety
/// AVX-512 F; as [`Group16::dwords`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn k4_header<const FIVE: bool>(g: &Group16) -> ([__m512i; 8], [__m512i; 8], __m512i) {
    let sc_off = formats::k4_layout(FIVE).1;
    // SAFETY: the 12 scale bytes and the leading dword lie inside each super-block.
    let (u0, u1, u2, dd) = unsafe {
        (
            g.dwords(sc_off),
            g.dwords(sc_off + 4),
            g.dwords(sc_off + 8),
            g.dwords(0),
        )
    };
    let (m6, m4, m2) = (
        _mm512_set1_epi32(0x3F),
        _mm512_set1_epi32(0x0F),
        _mm512_set1_epi32(0x03),
    );
    let shr = |v: __m512i, bits: usize| _mm512_srl_epi32(v, _mm_cvtsi32_si128(bits as i32));
    let mut sc = [_mm512_setzero_si512(); 8];
    let mut mins = [_mm512_setzero_si512(); 8];
    for s in 0..4 {
        let sh = 8 * s;
        sc[s] = _mm512_and_si512(shr(u0, sh), m6);
        mins[s] = _mm512_and_si512(shr(u1, sh), m6);
        let top = |u: __m512i| _mm512_slli_epi32::<4>(_mm512_and_si512(shr(u, sh + 6), m2));
        sc[4 + s] = _mm512_or_si512(_mm512_and_si512(shr(u2, sh), m4), top(u0));
        mins[4 + s] = _mm512_or_si512(_mm512_and_si512(shr(u2, sh + 4), m4), top(u1));
    }
    (sc, mins, dd)
}

/// The 32 quants (0..15, Q5_K 0..31) of sub-block `s` of a Q4_K (`FIVE = false`) or Q5_K
/// super-block: the low nibbles of `qs[32c..32c+32]` for `s = 2c`, the high ones for `s =
/// 2c+1`, plus the fifth bit for Q5_K; the bytes `avx2::tile_k` feeds to `vpmaddubsw`.
///
/// # Safety
/// AVX2; `blk` points to a whole super-block.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn k4_quants<const FIVE: bool>(blk: *const u8, s: usize) -> __m256i {
    let qs_off = formats::k4_layout(FIVE).2;
    let m4 = _mm256_set1_epi8(0x0F);
    let (c, high) = (s / 2, s % 2 == 1);
    // SAFETY: the quant bytes lie inside the super-block (caller contract).
    let raw = unsafe { _mm256_loadu_si256(blk.add(qs_off + 32 * c) as *const __m256i) };
    let q = if high {
        _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m4)
    } else {
        _mm256_and_si256(raw, m4)
    };
    if FIVE {
        // Bit s of each qh byte is the fifth bit of sub-block s.
        // SAFETY: as above.
        let qh = unsafe { _mm256_loadu_si256(blk.add(Q5K_QH) as *const __m256i) };
        let bit = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(s as i32));
        let m1 = _mm256_set1_epi8(0x01);
        _mm256_or_si256(q, _mm256_slli_epi16::<4>(_mm256_and_si256(bit, m1)))
    } else {
        q
    }
}

/// Repacks weight rows `j0..j0+n` (`n ≤ 16`; missing rows are zero) of an IQ4_XS matrix into
/// `dst` in [`repack_k`]'s 82 lines per super-block `b`, for [`tile_wide_sb`] with [`SB_IQ4XS`]:
/// `8s + l`: dword `l` of each row's 32 levels of sub-block `s` + 128 (as u8, the bytes of
/// `avx2::iq4_levels`); `64 + s`: its scale `ls − 32` as i32; `80`: `d` as f32.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI and F16C; rows `j0..j0+n` exist in `t`; `dst` holds `nb·82` lines.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn repack_iq4xs(t: &TileArgs, j0: usize, n: usize, dst: *mut Line) {
    let bias = _mm256_set1_epi8(-128);
    // SAFETY: forwarded contract; each closure reads the super-block it is given.
    unsafe {
        repack_super_blocks(
            t,
            j0,
            n,
            dst,
            IQ4XS_BYTES,
            WIDE_LINES_K,
            |g, line| {
                header_by_rows::<16>(g, line, |blk| {
                    let ls = iq4xs_scales(std::slice::from_raw_parts(blk, IQ4XS_QS));
                    // Lines 72..80 (Q4_K's mins) and `−dmin` stay zero: the IQ4 tile reads
                    // neither.
                    let lanes =
                        std::array::from_fn(|g| if g < 8 { ls[g] as i32 as u32 } else { 0 });
                    (lanes, std::ptr::read_unaligned(blk as *const u16), 0)
                })
            },
            |blk, s| _mm256_xor_si256(avx2::iq4_levels(blk.add(IQ4XS_QS + 16 * s)), bias),
        )
    }
}

/// Repacks weight rows `j0..j0+n` (`n ≤ 16`; missing rows are zero) of a Q6_K
/// (`K` = [`G16_Q6K`]), Q3_K ([`G16_Q3K`]) or Q2_K ([`G16_Q2K`]) matrix into `dst`, 90 lines
/// per super-block `b` (from line `90b`):
/// - `8r + l` (r, l < 8): dword `l` of each row's 32 quants of run `r` (weights 32r..32r+32),
///   the bytes the AVX2 tiles feed to the integer dot product: Q6_K's six-bit quants (0..64) as
///   `avx2::tile_q6k` builds `q[c]` for half `r / 4`, run `r % 4`; Q3_K's and Q2_K's bits
///   `2·(r % 4)` of `qs[32·(r / 4)..][..32]`, with Q3_K's third bit (bit `r` of hmask) as 4;
/// - `64 + g` (g < 16): the scale of 16-weight group `g` (Q6_K: i8, Q3_K: −32..31) as an i16
///   in the low half of an i32; `80 + l`: scales `2l` and `2l+1` (Q2_K: its mins) as the two
///   i16 halves;
/// - `88`: `d`, `89`: Q2_K's `−dmin` (zero otherwise), as f32.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI and F16C; rows `j0..j0+n` exist in `t`; `dst` holds `nb·90` lines.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn repack_g16<const K: u8>(t: &TileArgs, j0: usize, n: usize, dst: *mut Line) {
    let (bb, d_off) = match K {
        G16_Q6K => (Q6K_BYTES, Q6K_D),
        G16_Q3K => (Q3K_BYTES, Q3K_D),
        _ => (Q2K_BYTES, Q2K_D),
    };
    // SAFETY: forwarded contract; each closure reads the super-block it is given.
    unsafe {
        repack_super_blocks(
            t,
            j0,
            n,
            dst,
            bb,
            WIDE_LINES_G16,
            |g, line| {
                if K == G16_Q6K {
                    let (sc, dd) = q6k_header(g);
                    let low16 = _mm512_set1_epi32(0xFFFF);
                    let put =
                        |at: usize, v: __m512i| _mm512_store_si512(line.add(at) as *mut __m512i, v);
                    for q in 0..16 {
                        put(64 + q, _mm512_and_si512(sc[q], low16));
                    }
                    for l in 0..8 {
                        let lo = _mm512_and_si512(sc[2 * l], low16);
                        put(
                            80 + l,
                            _mm512_or_si512(lo, _mm512_slli_epi32::<16>(sc[2 * l + 1])),
                        );
                    }
                    store_d_dmin(line, 88, dd);
                    return;
                }
                header_by_rows::<24>(g, line, |blk| {
                    let (sc, paired, dmin): ([i16; 16], [i16; 16], u16) = match K {
                        G16_Q6K => {
                            let sc =
                                std::slice::from_raw_parts(blk.add(Q6K_SCALES) as *const i8, 16);
                            let sc = std::array::from_fn(|g| i16::from(sc[g]));
                            (sc, sc, 0)
                        }
                        G16_Q3K => {
                            let sc =
                                q3k_scales(std::slice::from_raw_parts(blk.add(Q3K_SCALES), 12));
                            let sc = sc.map(i16::from);
                            (sc, sc, 0)
                        }
                        _ => {
                            let packed = std::slice::from_raw_parts(blk.add(Q2K_SCALES), 16);
                            (
                                std::array::from_fn(|g| (packed[g] & 0xF) as i16),
                                std::array::from_fn(|g| (packed[g] >> 4) as i16),
                                std::ptr::read_unaligned(blk.add(Q2K_DMIN) as *const u16),
                            )
                        }
                    };
                    // The 16 scales, then the 8 pairs.
                    let lanes = std::array::from_fn(|g| {
                        if g < 16 {
                            sc[g] as u16 as u32
                        } else {
                            let l = g - 16;
                            paired[2 * l] as u16 as u32 | ((paired[2 * l + 1] as u16 as u32) << 16)
                        }
                    });
                    (
                        lanes,
                        std::ptr::read_unaligned(blk.add(d_off) as *const u16),
                        dmin,
                    )
                })
            },
            |blk, r| g16_quants::<K>(blk, r),
        )
    }
}

/// The i8 scales of the 16-weight groups (sign-extended to i32 lanes) and `d` (the low f16 of
/// each lane, `dmin` 0) of a Q6_K super-block of 16 rows.
///
/// # Safety
/// AVX-512 F; as [`Group16::dwords`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn q6k_header(g: &Group16) -> ([__m512i; 16], __m512i) {
    let mut sc = [_mm512_setzero_si512(); 16];
    // SAFETY: the scales and the last dword lie inside each super-block.
    unsafe {
        for q in 0..4 {
            let w = g.dwords(Q6K_SCALES + 4 * q);
            for b in 0..4 {
                let up = _mm512_sll_epi32(w, _mm_cvtsi32_si128(24 - 8 * b as i32));
                sc[4 * q + b] = _mm512_srai_epi32::<24>(up);
            }
        }
        // `d` is the high half of the super-block's last dword.
        (sc, _mm512_srli_epi32::<16>(g.dwords(Q6K_BYTES - 4)))
    }
}

/// Run `r`'s 32 quants of a Q6_K (`K` = [`G16_Q6K`]), Q3_K or Q2_K super-block, as
/// [`repack_g16`] lays them out.
///
/// # Safety
/// AVX2; `blk` points to a whole super-block.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn g16_quants<const K: u8>(blk: *const u8, r: usize) -> __m256i {
    let m4 = _mm256_set1_epi8(0x0F);
    let m3 = _mm256_set1_epi8(0x03);
    let m1 = _mm256_set1_epi8(0x01);
    // SAFETY: every load lies inside the super-block (caller contract).
    unsafe {
        let (half, c) = (r / 4, r % 4);
        if K == G16_Q6K {
            let ql_at = Q6K_QL + 64 * half + 32 * (c % 2);
            let ql = _mm256_loadu_si256(blk.add(ql_at) as *const __m256i);
            let qh = _mm256_loadu_si256(blk.add(Q6K_QH + 32 * half) as *const __m256i);
            let lo = if c < 2 {
                _mm256_and_si256(ql, m4)
            } else {
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql), m4)
            };
            let hbits = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c as i32));
            let hi = _mm256_slli_epi16::<4>(_mm256_and_si256(hbits, m3));
            _mm256_or_si256(lo, hi)
        } else {
            let qs_off = if K == G16_Q3K { Q3K_QS } else { Q2K_QS };
            let raw = _mm256_loadu_si256(blk.add(qs_off + 32 * half) as *const __m256i);
            let bits = _mm256_srl_epi16(raw, _mm_cvtsi32_si128(2 * c as i32));
            let q = _mm256_and_si256(bits, m3);
            if K == G16_Q3K {
                let hm = _mm256_loadu_si256(blk.add(Q3K_HMASK) as *const __m256i);
                let h = _mm256_srl_epi16(hm, _mm_cvtsi32_si128(r as i32));
                _mm256_or_si256(q, _mm256_slli_epi16::<2>(_mm256_and_si256(h, m1)))
            } else {
                q
            }
        }
    }
}

/// The super-block types of the wide kernel, as [`tile_wide_sb`] and [`repack_g16`] take them.
const SB_K4: u8 = 0;
const SB_IQ4XS: u8 = 1;
const G16_Q6K: u8 = 2;
const G16_Q3K: u8 = 3;
const G16_Q2K: u8 = 4;

/// `MR` (1 or 2) activation rows from `i0` × a repacked 16-row group (weight rows `j0..j0+n`)
/// of a super-block type `K`, with the AVX2 tile's float operations per pair and [`hsum`]'s
/// order at the end. Per super-block, with `p_{r,l}` the `vpdpbusd` of run `r`'s dword `l`:
///
/// - Q4_K/Q5_K ([`SB_K4`], from [`repack_k`]; `avx2::tile_k`): `acc_l = fma(d·d_y,
///   f32(isum_l), acc_l)` then `acc_l = fma(−dmin·d_y, msum_l, acc_l)` (`msum_l` = 0 for
///   l ≥ 4), where `isum_l = Σ_s scale_s · p_{s,l}` (the scale applied by `vpdpwssd` on the low
///   i16 half: |p| ≤ 4·31·127 fits, the high half is 0) and `msum_l` is `vpmaddwd(mins,
///   bsums)` of AVX2 with the pair sums of the bsums distributed.
/// - IQ4_XS ([`SB_IQ4XS`], from [`repack_iq4xs`]; `avx2::tile_iq4xs`): the first FMA only. Its
///   levels are stored +128, so each `p_{s,l}` starts from `−128·Σy` over its 4 activations,
///   as [`tile_wide`]'s Q8_0, and its scale `ls − 32` is applied by `vpmulld`.
/// - Q6_K, Q3_K, Q2_K ([`G16_Q6K`], [`G16_Q3K`], [`G16_Q2K`], from [`repack_g16`];
///   `avx2::tile_q6k`, `tile_q2k`, `tile_q3k`): `acc_l = fma(d·d_y, f32(isum_l − off_l),
///   acc_l)` (Q2_K: `fma(d·d_y, f32(isum_l), acc_l)` then `fma(−dmin·d_y, f32(msum_l),
///   acc_l)`), where `isum_l = Σ_r scale_{2r + [l ≥ 4]} · p_{r,l}` (|p| ≤ 4·63·127 fits), the
///   offset `off_l = 32·(sc_{2l}·bs_{2l} + sc_{2l+1}·bs_{2l+1})` (Q3_K: 4·) and Q2_K's
///   `msum_l = min_{2l}·bs_{2l} + min_{2l+1}·bs_{2l+1}` are the AVX2 integers.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI; `pack` was filled by the repack of `K` for this matrix; rows
/// `i0..i0+MR` exist in the Q8_K activations; the outputs `(i0..i0+MR) × (j0..j0+n)` are ours.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile_wide_sb<const MR: usize, const K: u8>(
    t: &TileArgs,
    pack: *const Line,
    i0: usize,
    j0: usize,
    n: usize,
    out: OutPtr,
) {
    let g16 = K >= G16_Q6K;
    let iq4 = K == SB_IQ4XS;
    // Lines per super-block and the line of `d` (`−dmin` follows it).
    let (lines_per_block, d_line) = if g16 {
        (WIDE_LINES_G16, 88)
    } else {
        (WIDE_LINES_K, 80)
    };
    let mut acc = [[_mm512_setzero_ps(); 8]; MR];
    // IQ4: the −128·Σy start of each (sub-block, dword) of a super-block, per row.
    let mut start = [[[0i32; 8]; 8]; MR];
    // SAFETY: activation row i has cols quants at i·cols, 16 bsums per super-block at
    // (i·nb + b)·16 and its scale at ((i/4)·nb + b)·4 + i%4; the lines read of block b are
    // below nb·lines_per_block of `pack`.
    unsafe {
        let yrow = t.act_rows::<MR>(i0);
        let drow = t.row_scales::<MR>(t.d, i0);
        let bsrow = t.row_bsums::<MR>(i0);
        for b in 0..t.nb {
            let line = pack.add(b * lines_per_block);
            let dw = _mm512_load_ps(line.add(d_line) as *const f32);
            let ndmin = _mm512_load_ps(line.add(d_line + 1) as *const f32);
            let mut s1 = [_mm512_setzero_ps(); MR];
            let mut s2 = [_mm512_setzero_ps(); MR];
            for i in 0..MR {
                let dy = _mm512_set1_ps(*drow[i].add(b * GROUP));
                s1[i] = _mm512_mul_ps(dw, dy);
                s2[i] = _mm512_mul_ps(ndmin, dy);
                if iq4 {
                    let bias = _mm256_set1_epi8(-128);
                    for s in 0..8 {
                        let y =
                            _mm256_loadu_si256(yrow[i].add(b * QK_K + 32 * s) as *const __m256i);
                        let sum = _mm256_dpbusd_epi32(_mm256_setzero_si256(), bias, y);
                        let neg = _mm256_sub_epi32(_mm256_setzero_si256(), sum);
                        _mm256_storeu_si256(start[i][s].as_mut_ptr() as *mut __m256i, neg);
                    }
                }
            }
            for l in 0..8 {
                let mut isum = [_mm512_setzero_si512(); MR];
                for r in 0..8 {
                    let u = _mm512_load_si512(line.add(8 * r + l) as *const __m512i);
                    let sc_line = if g16 { 64 + 2 * r + l / 4 } else { 64 + r };
                    let sc = _mm512_load_si512(line.add(sc_line) as *const __m512i);
                    for i in 0..MR {
                        let y = std::ptr::read_unaligned(
                            yrow[i].add(b * QK_K + 32 * r + 4 * l) as *const i32
                        );
                        let init = if iq4 {
                            _mm512_set1_epi32(start[i][r][l])
                        } else {
                            _mm512_setzero_si512()
                        };
                        let p = _mm512_dpbusd_epi32(init, u, _mm512_set1_epi32(y));
                        isum[i] = if iq4 {
                            _mm512_add_epi32(isum[i], _mm512_mullo_epi32(p, sc))
                        } else {
                            _mm512_dpwssd_epi32(isum[i], p, sc)
                        };
                    }
                }
                for i in 0..MR {
                    if g16 {
                        let pair = _mm512_load_si512(line.add(80 + l) as *const __m512i);
                        let bs =
                            std::ptr::read_unaligned(bsrow[i].add(b * 16 + 2 * l) as *const i32);
                        let v = _mm512_dpwssd_epi32(
                            _mm512_setzero_si512(),
                            pair,
                            _mm512_set1_epi32(bs),
                        );
                        if K == G16_Q2K {
                            acc[i][l] =
                                _mm512_fmadd_ps(s1[i], _mm512_cvtepi32_ps(isum[i]), acc[i][l]);
                            acc[i][l] = _mm512_fmadd_ps(s2[i], _mm512_cvtepi32_ps(v), acc[i][l]);
                        } else {
                            let off = if K == G16_Q6K {
                                _mm512_slli_epi32::<5>(v)
                            } else {
                                _mm512_slli_epi32::<2>(v)
                            };
                            let s = _mm512_sub_epi32(isum[i], off);
                            acc[i][l] = _mm512_fmadd_ps(s1[i], _mm512_cvtepi32_ps(s), acc[i][l]);
                        }
                        continue;
                    }
                    acc[i][l] = _mm512_fmadd_ps(s1[i], _mm512_cvtepi32_ps(isum[i]), acc[i][l]);
                    if iq4 {
                        continue;
                    }
                    let msum = if l < 4 {
                        // mins[2l]·(bs[4l] + bs[4l+1]) + mins[2l+1]·(bs[4l+2] + bs[4l+3]).
                        let bs = bsrow[i].add(b * 16 + 4 * l) as *const i32;
                        let lo = _mm512_set1_epi32(std::ptr::read_unaligned(bs));
                        let hi = _mm512_set1_epi32(std::ptr::read_unaligned(bs.add(1)));
                        let m0 = _mm512_load_si512(line.add(72 + 2 * l) as *const __m512i);
                        let m1 = _mm512_load_si512(line.add(72 + 2 * l + 1) as *const __m512i);
                        let v = _mm512_dpwssd_epi32(_mm512_setzero_si512(), m0, lo);
                        _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(v, m1, hi))
                    } else {
                        _mm512_setzero_ps()
                    };
                    acc[i][l] = _mm512_fmadd_ps(s2[i], msum, acc[i][l]);
                }
            }
        }
        for i in 0..MR {
            let a = &acc[i];
            // `hsum`'s order for every lane at once.
            let s = _mm512_add_ps(
                _mm512_add_ps(_mm512_add_ps(a[0], a[4]), _mm512_add_ps(a[2], a[6])),
                _mm512_add_ps(_mm512_add_ps(a[1], a[5]), _mm512_add_ps(a[3], a[7])),
            );
            let mut v = [0f32; WIDE];
            _mm512_storeu_ps(v.as_mut_ptr(), s);
            for k in 0..n {
                out.write(i0 + i, j0 + k, v[k]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::kernels::formats::{Q2K_D, Q2K_DMIN, Q3K_D, Q6K_D};
    use crate::kernels::testutil::run_path as run;
    use crate::kernels::testutil::{self, Rng};
    use crate::kernels::{KernelPath, QMatrix, ThreadPool, WeightType};

    /// Bit patterns, so that the comparison is exact (and NaN-safe).
    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    fn assert_paths_identical(
        pools: &[ThreadPool],
        ty: WeightType,
        rows: usize,
        cols: usize,
        ms: &[usize],
        data: &[u8],
        x_all: &[f32],
    ) {
        let w = QMatrix::new(ty, rows, cols, data).unwrap();
        for &m in ms {
            let x = &x_all[..m * cols];
            let want = bits(&run(KernelPath::Avx2, &pools[0], &w, x, m));
            for pool in pools {
                let got = bits(&run(KernelPath::Avx512Vnni, pool, &w, x, m));
                if got != want {
                    let k = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
                    panic!(
                        "{ty} t={} m={m} rows={rows} cols={cols}: first difference at ({}, {}): \
                         {} vs avx2 {}",
                        pool.n_threads(),
                        k / rows,
                        k % rows,
                        f32::from_bits(got[k]),
                        f32::from_bits(want[k])
                    );
                }
            }
        }
    }

    /// The AVX-512 VNNI path equals the AVX2 path bit for bit, for every weight type (the
    /// types without a VNNI tile, and GEMV, go through the AVX2 kernels), every m from 1 to 70,
    /// row counts that are not multiples of the tile, several block counts and thread counts.
    #[test]
    fn avx512vnni_is_bit_identical_to_avx2() {
        if !KernelPath::Avx512Vnni.is_available() {
            eprintln!("skipped: no AVX-512 VNNI on this CPU");
            return;
        }
        let mut rng = Rng::new(77);
        let pools: Vec<ThreadPool> = [1, 2, 3].into_iter().map(ThreadPool::new).collect();
        let all_m: Vec<usize> = (1..=70).collect();
        for ty in WeightType::ALL {
            let bs = ty.block_size();
            let shapes: &[(usize, usize)] = match bs {
                1 => &[(5, 33), (64, 576)],
                32 => &[(1, 32), (3, 64), (5, 96), (17, 288), (67, 576), (64, 1536)],
                _ => &[(3, 256), (17, 512), (67, 768)],
            };
            for (si, &(rows, cols)) in shapes.iter().enumerate() {
                let data = testutil::random_weights(&mut rng, ty, rows, cols);
                let x = testutil::random_activations(&mut rng, 70 * cols);
                // Every m on the mid-sized shapes, a spread elsewhere, to bound run time.
                let ms: Vec<usize> = if bs == 32 && (si == 3 || si == 4) {
                    all_m.clone()
                } else {
                    vec![
                        1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 24, 31, 33, 40, 64, 70,
                    ]
                };
                assert_paths_identical(&pools, ty, rows, cols, &ms, &data, &x);
            }
        }
    }

    /// Extreme integer operands: every quant at its largest (or −128 for Q8_0, IQ4's levels −127
    /// and 113), every K-quant scale and min at its largest (Q6_K: −128 or 127, Q3_K and IQ4_XS:
    /// −32 or 31), and activation blocks whose quants are all ±127, where a saturating or
    /// wrapping integer step would show.
    #[test]
    fn avx512vnni_matches_avx2_on_extreme_values() {
        if !KernelPath::Avx512Vnni.is_available() {
            eprintln!("skipped: no AVX-512 VNNI on this CPU");
            return;
        }
        let pool = [ThreadPool::new(2)];
        let (rows, cols, m) = (19, 256, 40);
        let mut x = vec![0f32; m * cols];
        for (k, v) in x.iter_mut().enumerate() {
            *v = match (k / 32) % 4 {
                0 => -3.0,
                1 => 2.5,
                2 => {
                    if k % 2 == 0 {
                        1.0
                    } else {
                        -1.0
                    }
                }
                _ => (k % 7) as f32 - 3.0,
            };
        }
        let f16 = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
        for ty in [
            WeightType::Q4_0,
            WeightType::Q4_1,
            WeightType::Q5_0,
            WeightType::Q5_1,
            WeightType::Q8_0,
            WeightType::Q4K,
            WeightType::Q5K,
            WeightType::Q6K,
            WeightType::Q3K,
            WeightType::Q2K,
            WeightType::IQ4NL,
            WeightType::IQ4XS,
        ] {
            for fill in [0x00u8, 0xFF, 0x80, 0x7F] {
                let mut data = vec![fill; rows * ty.row_bytes(cols)];
                for (n, blk) in data.chunks_exact_mut(ty.block_bytes()).enumerate() {
                    let d = f16(0.001 * (1 + n % 3) as f32);
                    match ty {
                        WeightType::Q6K => blk[Q6K_D..Q6K_D + 2].copy_from_slice(&d),
                        WeightType::Q3K => blk[Q3K_D..Q3K_D + 2].copy_from_slice(&d),
                        WeightType::Q2K => {
                            blk[Q2K_D..Q2K_D + 2].copy_from_slice(&d);
                            blk[Q2K_DMIN..Q2K_DMIN + 2].copy_from_slice(&f16(0.0007));
                        }
                        _ => blk[0..2].copy_from_slice(&d),
                    }
                    if matches!(
                        ty,
                        WeightType::Q4_1 | WeightType::Q5_1 | WeightType::Q4K | WeightType::Q5K
                    ) {
                        blk[2..4].copy_from_slice(&f16(0.0007));
                    }
                }
                assert_paths_identical(&pool, ty, rows, cols, &[2, 11, 17, m], &data, &x);
            }
        }
    }
}
