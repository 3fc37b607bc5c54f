//! Intel AMX (AMX-TILE, AMX-INT8) for the super-block types with many activation rows
//! ([`super::super::KernelPath::Amx`]): Q4_K and Q5_K from [`AMX_MIN_M_K4`] activation rows,
//! Q6_K from [`AMX_MIN_M_Q6K`].
//!
//! Two layouts, both built per call from the weights' super-blocks, 16 weight rows at a time.
//! Batched decode (at most 16 activation rows, one A tile; Q6_K: at most [`RAW_MAX_Q6K`]) takes
//! the raw one ([`raw_pack`]): the quants as stored, one `tdpbsud` per sub-block, the
//! sub-block scales applied to the tile's sums on the vector side. Cheap to build, it makes the
//! tile unit pay from 3 rows of Q4_K on (8 of Q6_K, whose 16-weight sub-blocks double the tile
//! work). Prefill, and everything past one tile, takes the scale planes ([`pack`]).
//!
//! For the scale planes, the 16 rows' quants are transposed as for the wide kernel (line `l` of a run
//! holds dword `l` of each row's quants, 16 rows to a line, which is the layout, `K/4` rows of
//! `N·4` bytes, that an AMX B tile takes; the rows' scales are unpacked 16 at a time from
//! gathered dwords), each quant is multiplied by its sub-block scale and the i16 product split
//! into a low and a high byte plane. With the sub-block scales inside the weights, one
//! super-block is four `tdpbsud`/`tdpbssd` per plane over 64 weights each with no sum to scale
//! in between: `Σ y·q·scale = C_lo + 256·C_hi`, exact in i32, then one `d·d_y` float multiply-add per
//! super-block; the Q4_K/Q5_K min term is a third plane (the min repeated over its sub-block)
//! and Q6_K's `−32` is folded into its quants before the multiply. A tile computes 16
//! activation rows × 16 weight rows; the tile unit's sums go through memory to the vector
//! units once per super-block.
//!
//! The integers are exact, as on every path, but the float sums are not the AVX2 tiles' (the
//! planes: one per super-block, instead of eight lane sums per sub-block), so results differ from
//! [`super::super::KernelPath::Avx2`] in the last bits (below those row counts, and for every
//! other type, this path runs the AVX-512 kernels and their results). The raw layout's float
//! sums differ again (one per sub-block), so which layout a batch takes also shows in the last
//! bits.
//!
//! Linux gives a process the AMX register state only on request (`arch_prctl`,
//! `ARCH_REQ_XCOMP_PERM`); [`available`] makes it once. Each call loads its tile configuration
//! and releases the tiles when it returns, so a thread holds AMX state only inside a matmul.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::ops::Range;

use super::super::matmul::OutPtr;
use super::super::quantize::{Acts, GROUP};
use super::super::{QMatrix, WeightType};
use super::{
    G16_Q6K, Group16, Line, TileArgs, WIDE, d_ndmin, g16_quants, k4_header, k4_quants, put_row,
    q6k_header, store_d_dmin, transpose,
};
use crate::kernels::formats::{self, Q4K_BYTES, Q5K_BYTES, Q6K_BYTES, QK_K};

/// Activation rows from which the AMX tiles run Q4_K and Q5_K. Below it the VNNI tiles win
/// (one call, 2 rows: 12 vs 14 ns per super-block and thread; 3 rows: 16 vs 14; 8 rows: 35 vs
/// 19, on the AMX test machine), and they keep smaller batches bit-identical to AVX2.
pub(super) const AMX_MIN_M_K4: usize = 3;

/// Activation rows from which the AMX tiles run Q6_K (at 7 rows the VNNI tiles still win: 30–35
/// vs 33 ns per super-block; at 8 rows 37–47 vs 34–37).
pub(super) const AMX_MIN_M_Q6K: usize = 8;

/// Most activation rows of Q6_K on the raw layout; past it the scale planes win (16 rows: 48 vs
/// 45 ns per super-block, a tie at 12).
const RAW_MAX_Q6K: usize = 12;

/// Activation rows per tile (the rows of an AMX tile register).
const TM: usize = 16;

/// Whether this CPU and OS let the process use AMX-TILE and AMX-INT8: CPUID leaf 7 bits
/// AMX-TILE and AMX-INT8, the OS enabling the tile state in XCR0, and Linux granting the
/// permission. Asked once.
pub(crate) fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        if !super::super::KernelPath::Avx512Vnni.is_available()
            || !std::arch::is_x86_feature_detected!("xsave")
        {
            return false;
        }
        // CPUID leaf 7 exists on every CPU with AVX-512.
        let leaf7 = __cpuid_count(7, 0);
        let (tile, int8) = (leaf7.edx >> 24 & 1 == 1, leaf7.edx >> 25 & 1 == 1);
        // SAFETY: XSAVE (hence XGETBV) is present (checked above).
        let xcr0 = unsafe { _xgetbv(0) };
        // XTILECFG (bit 17) and XTILEDATA (bit 18).
        if !(tile && int8 && xcr0 >> 17 & 3 == 3) {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with these arguments only changes the process's permissions.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        r == 0
    })
}

/// Whether [`compute`] runs `m` activation rows of `ty`.
pub(super) fn runs(ty: WeightType, m: usize) -> bool {
    match ty {
        WeightType::Q4K | WeightType::Q5K => m >= AMX_MIN_M_K4,
        WeightType::Q6K => m >= AMX_MIN_M_Q6K,
        _ => false,
    }
}

/// A 64-byte tile configuration (palette 1): tiles 0–2 hold `m` rows of 16 i32 sums, tile 3
/// `m` activation rows of 64 quants, tiles 4–6 16 lines of a weight matrix.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new(m: usize) -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        for tile in 0..7 {
            c[16 + 2 * tile] = 64;
            c[48 + tile] = if tile < 4 { m as u8 } else { TM as u8 };
        }
        TileConfig(c)
    }

    /// Loads this configuration (which zeroes every tile).
    ///
    /// # Safety
    /// AMX is enabled for the process.
    unsafe fn load(&self) {
        // SAFETY: a valid palette-1 configuration; AMX is enabled (caller).
        unsafe { asm!("ldtilecfg [{}]", in(reg) self.0.as_ptr(), options(nostack, readonly)) };
    }
}

/// 64-byte lines of one super-block of a 16-row group in the AMX layout ([`pack`]).
const AMX_LINES: usize = 194;

/// 16 rows of 16 i32, where a tile of sums is stored.
#[repr(C, align(64))]
struct Sums([[i32; WIDE]; TM]);

thread_local! {
    /// Per-thread buffer for one 16-row group in the AMX layout.
    static AMX_PACK: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// Computes `out[i, j]` for activation rows `a` × weight rows `r` of a Q4_K, Q5_K or Q6_K
/// matrix ([`runs`]).
///
/// # Safety
/// [`available`] returned true; as [`super::compute`]: `acts` was quantized (Q8_K) for `w.ty`
/// with `acts.m ≥ a.end`, `w.rows ≥ r.end`, and `out` is exclusively ours for `a × r`.
pub(super) unsafe fn compute(
    w: &QMatrix,
    acts: &Acts,
    a: Range<usize>,
    r: Range<usize>,
    out: OutPtr,
) {
    debug_assert!(runs(w.ty, acts.m) && a.end <= acts.m && r.end <= w.rows);
    let t = TileArgs::new(w, acts);
    // Batched decode: the raw layout.
    let raw_max = if w.ty == WeightType::Q6K {
        RAW_MAX_Q6K
    } else {
        TM
    };
    if a.len() <= raw_max {
        // SAFETY: forwarded contract.
        return unsafe {
            match w.ty {
                WeightType::Q4K => compute_raw::<PACK_Q4K>(&t, a, r, out),
                WeightType::Q5K => compute_raw::<PACK_Q5K>(&t, a, r, out),
                _ => compute_raw::<PACK_Q6K>(&t, a, r, out),
            }
        };
    }
    type Pack = unsafe fn(&TileArgs, usize, usize, usize, Range<usize>, *mut Line);
    type Tile = unsafe fn(
        &TileArgs,
        *const Line,
        usize,
        usize,
        Range<usize>,
        &mut [__m512; TM],
        &mut [Sums; 3],
    );
    let (pack_group, tile_group): (Pack, Tile) = match w.ty {
        WeightType::Q4K => (pack::<PACK_Q4K>, tile::<false>),
        WeightType::Q5K => (pack::<PACK_Q5K>, tile::<false>),
        _ => (pack::<PACK_Q6K>, tile::<true>),
    };
    // The planes. At most 16 rows in all (Q6_K past the raw layout's rows): one activation
    // tile, under a configuration of its rows. Otherwise full tiles, and a last tile of fewer
    // rows switches configurations.
    let one = a.len() <= TM;
    let full = TileConfig::new(if one { a.len() } else { TM });
    let tail = TileConfig::new(a.len() % TM);
    // Where the tiles' sums are stored for the vector units; rows a tail tile leaves unwritten
    // stay zero.
    let mut sums = [(); 3].map(|_| Sums([[0; WIDE]; TM]));
    AMX_PACK.with_borrow_mut(|pack| {
        if pack.len() < t.nb * AMX_LINES {
            pack.resize(t.nb * AMX_LINES, Line([0; 64]));
        }
        let pack = pack.as_mut_ptr();
        // SAFETY: all-zero bits are 0.0 in every lane.
        let zero: __m512 = unsafe { std::mem::zeroed() };
        // SAFETY: AMX is enabled (caller).
        unsafe { full.load() };
        let mut j = r.start;
        while j < r.end {
            let n = (r.end - j).min(WIDE);
            let ahead = (r.end - j - n).min(WIDE);
            if one {
                // One activation tile: each super-block is packed and multiplied at once, so
                // its 12 KiB of planes stay in L1.
                let mut acc = [zero; TM];
                for b in 0..t.nb {
                    // SAFETY: AMX is enabled and configured for these rows; rows j..j+n+ahead
                    // exist; `pack` holds one super-block; rows a exist in the activations.
                    unsafe {
                        pack_group(&t, j, n, ahead, b..b + 1, pack);
                        tile_group(&t, pack, a.start, a.len(), b..b + 1, &mut acc, &mut sums);
                    }
                }
                // SAFETY: the outputs a × (j..j+n) are ours.
                unsafe { store(&acc, a.start, a.len(), j, n, out) };
                j += n;
                continue;
            }
            // SAFETY: rows j..j+n + ahead exist; `pack` holds nb super-blocks of the AMX layout.
            unsafe { pack_group(&t, j, n, ahead, 0..t.nb, pack) };
            let mut i = a.start;
            while i < a.end {
                let rows = (a.end - i).min(TM);
                let switch = rows < TM;
                let mut acc = [zero; TM];
                // SAFETY: AMX is enabled; rows i..i+rows exist in the activations; the
                // outputs (i..i+rows) × (j..j+n) are ours. A last tile of fewer than 16 rows
                // runs under a configuration of that many rows.
                unsafe {
                    if switch {
                        tail.load();
                    }
                    tile_group(&t, pack, i, rows, 0..t.nb, &mut acc, &mut sums);
                    if switch {
                        full.load();
                    }
                    store(&acc, i, rows, j, n, out);
                };
                i += rows;
            }
            j += n;
        }
        // SAFETY: releases the tile state loaded above.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    });
}

/// [`compute`] for at most 16 activation rows (one A tile) on the raw layout, under one tile
/// configuration of `a.len()` rows: per 16-row group, super-block after super-block,
/// [`raw_pack`], [`raw_tiles`], [`raw_readout`] (the plane and the sums stay in L1).
///
/// # Safety
/// As [`compute`], with `a.len() ≤ 16`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn compute_raw<const TY: u8>(t: &TileArgs, a: Range<usize>, r: Range<usize>, out: OutPtr) {
    let k = if TY == PACK_Q6K { 16 } else { 32 };
    AMX_PACK.with_borrow_mut(|pack| {
        // The plane, then the sub-block sums (16 tiles of 16 lines).
        let lines = RAW_LINES + 16 * TM;
        if pack.len() < lines {
            pack.resize(lines, Line([0; 64]));
        }
        let plane = pack.as_mut_ptr();
        // SAFETY: the sums' lines lie inside the buffer, 64-byte aligned, past the plane.
        let sums = unsafe { &mut *(plane.add(RAW_LINES) as *mut SubSums) };
        let rows = (a.start, a.len());
        // SAFETY: AMX is enabled (caller); the configuration has a.len() activation rows.
        unsafe { raw_config(a.len(), k).load() };
        let mut j = r.start;
        while j < r.end {
            let n = (r.end - j).min(WIDE);
            let ahead = (r.end - j - n).min(WIDE);
            let mut acc = [_mm512_setzero_ps(); TM];
            for b in 0..t.nb {
                // SAFETY: rows j..j+n+ahead exist and b < nb; rows `a` exist in the
                // activations; the plane and the sums are ours.
                unsafe {
                    let head = raw_pack::<TY>(t, (j, n, ahead), b, plane);
                    raw_tiles::<TY>(t, b, rows.0, plane, sums);
                    raw_readout::<TY>(t, b, rows, &head, sums, &mut acc);
                }
            }
            // SAFETY: the outputs a × (j..j+n) are ours.
            unsafe { store(&acc, a.start, a.len(), j, n, out) };
            j += n;
        }
        // SAFETY: releases the tile state loaded above.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    });
}

/// The i16 lanes of `lo` (i32 lanes, each within i16) in the low halves of a dword, `hi`'s in
/// the high halves: the word pairs `vpdpwssd` and the planes' in-place multiply take.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
fn i16_pair(lo: __m512i, hi: __m512i) -> __m512i {
    _mm512_or_si512(
        _mm512_and_si512(lo, _mm512_set1_epi32(0xFFFF)),
        _mm512_slli_epi32::<16>(hi),
    )
}

/// Super-block `b`'s share of the prefetches of the `ahead` rows from `j` (the next 16-row
/// group's): their rows are read a super-block from each of 16 rows at a time, which the
/// hardware prefetchers do not follow, so each super-block's step requests its part of them.
///
/// # Safety
/// Rows `j..j + ahead` exist in `t` (a prefetch does not fault; the last line may pass the
/// rows' end, hence wrapping arithmetic).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn prefetch_share(t: &TileArgs, j: usize, ahead: usize, b: usize) {
    let next = t.w.wrapping_add(j * t.rb);
    let lines = (ahead * t.rb).div_ceil(64);
    for line in b * lines / t.nb..(b + 1) * lines / t.nb {
        _mm_prefetch::<_MM_HINT_T1>(next.wrapping_add(64 * line) as *const i8);
    }
}

/// The weight types of [`pack`].
const PACK_Q4K: u8 = 0;
const PACK_Q5K: u8 = 1;
const PACK_Q6K: u8 = 2;

/// Packs super-blocks `bs` of weight rows `j0..j0+n` (`n ≤ 16`; missing rows are zero) of a
/// Q4_K, Q5_K or Q6_K matrix (`TY`) straight into the AMX layout at `dst`, 194 lines per
/// super-block, each weight matrix as 64 lines of `tdpb*d` B rows (line `8r + l`: weights
/// `32r + 4l..32r + 4l + 4` of the 16 rows, transposed as for the wide kernel):
/// - lines `0..64` and `64..128`: the low byte (u8) and the high byte (i8: Q4_K and Q5_K 0..7,
///   Q6_K −16..16) of `q·scale` (an i16; Q4_K and Q5_K: 0..1953, Q6_K with its signed quants
///   `q − 32` and i8 scales: −4064..4096), so that `Σ y·q·scale = Σ y·lo + 256·Σ y·hi` with no
///   scale left to apply per sub-block;
/// - lines `128..192` (Q4_K, Q5_K): the sub-block's min repeated over its weights, so that
///   `Σ y·min` is the min term;
/// - line `192`: `d`, `193`: `−dmin` (Q6_K: 0), as f32.
///
/// The group's rows are read a super-block from each of 16 rows at a time, which the hardware
/// prefetchers do not follow, so each super-block's step also prefetches its share of the
/// next `ahead` rows (the next group's).
///
/// # Safety
/// AVX-512 F/BW and F16C; rows `j0..j0+n+ahead` exist in `t`; `bs` are super-blocks of
/// them, packed from `dst` on, which holds `bs.len()·194` 64-byte aligned lines.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn pack<const TY: u8>(
    t: &TileArgs,
    j0: usize,
    n: usize,
    ahead: usize,
    bs: Range<usize>,
    dst: *mut Line,
) {
    let q6 = TY == PACK_Q6K;
    let bb = [Q4K_BYTES, Q5K_BYTES, Q6K_BYTES][TY as usize];
    // The low byte of each word.
    let byte_lo = _mm512_set1_epi16(0x00FF);
    // Byte 0 of each dword, four times.
    let rep = _mm512_set4_epi32(0x0C0C_0C0C, 0x0808_0808, 0x0404_0404, 0);
    // A scale (i32 lanes) in both i16 halves of its dword.
    let words = |v: __m512i| i16_pair(v, v);
    // SAFETY: super-block b of rows j0..j0+n lies inside the weights; the lines written are
    // below nb·194 (caller contract).
    unsafe {
        for b in bs.clone() {
            prefetch_share(t, j0 + n, ahead, b);
            let out = dst.add((b - bs.start) * AMX_LINES);
            let g = Group16 {
                base: t.w.add(j0 * t.rb + b * bb),
                rb: t.rb,
                n,
            };
            // Per run of 32 weights, the scale of its first and second 16 (Q4_K, Q5_K: one
            // scale per run), and (Q4_K, Q5_K) its min in each byte.
            let mut sc = [[_mm512_setzero_si512(); 2]; 8];
            let mut mins = [_mm512_setzero_si512(); 8];
            let dd = if q6 {
                let (s16, dd) = q6k_header(&g);
                for r in 0..8 {
                    sc[r] = [words(s16[2 * r]), words(s16[2 * r + 1])];
                }
                dd
            } else {
                let (s8, m8, dd) = if TY == PACK_Q5K {
                    k4_header::<true>(&g)
                } else {
                    k4_header::<false>(&g)
                };
                for r in 0..8 {
                    sc[r] = [words(s8[r]); 2];
                    mins[r] = _mm512_shuffle_epi8(m8[r], rep);
                }
                dd
            };
            for r in 0..8 {
                let mut z = [_mm512_setzero_si512(); WIDE / 2];
                for k in 0..n {
                    let q = match TY {
                        PACK_Q4K => k4_quants::<false>(g.blk(k), r),
                        PACK_Q5K => k4_quants::<true>(g.blk(k), r),
                        _ => g16_quants::<G16_Q6K>(g.blk(k), r),
                    };
                    put_row(&mut z, k, q);
                }
                for (l, q) in transpose(&z).into_iter().enumerate() {
                    // Lane k (a dword) holds row k's 4 quants and `scw` row k's scale in both
                    // i16 halves, so the even and the odd bytes multiply in place as words.
                    let scw = sc[r][l / 4];
                    let mut q_even = _mm512_and_si512(q, byte_lo);
                    let mut q_odd = _mm512_srli_epi16::<8>(q);
                    if q6 {
                        q_even = _mm512_sub_epi16(q_even, _mm512_set1_epi16(32));
                        q_odd = _mm512_sub_epi16(q_odd, _mm512_set1_epi16(32));
                    }
                    let p_even = _mm512_mullo_epi16(q_even, scw);
                    let p_odd = _mm512_mullo_epi16(q_odd, scw);
                    // Each product's low byte, then its high byte, in its quant's place.
                    let lo = _mm512_or_si512(
                        _mm512_and_si512(p_even, byte_lo),
                        _mm512_slli_epi16::<8>(p_odd),
                    );
                    let hi = _mm512_or_si512(
                        _mm512_srli_epi16::<8>(p_even),
                        _mm512_andnot_si512(byte_lo, p_odd),
                    );
                    let line = 8 * r + l;
                    _mm512_store_si512(out.add(line) as *mut __m512i, lo);
                    _mm512_store_si512(out.add(64 + line) as *mut __m512i, hi);
                    if !q6 {
                        _mm512_store_si512(out.add(128 + line) as *mut __m512i, mins[r]);
                    }
                }
            }
            store_d_dmin(out, 192, dd);
        }
    }
}

/// Activation rows `i0..i0 + rows` (`rows ≤ 16`, the rows of the loaded configuration) ×
/// super-blocks `bs` of one 16-row group in the AMX layout ([`pack`]; `pack` holds super-block
/// `bs.start` first), accumulated into `acc` (row `i`'s 16 weight rows in `acc[i]`). Per
/// super-block, with `C_lo`, `C_hi`, `C_min` the `tdpb*d` sums of the activations with its
/// matrices, `acc = fma(d·d_y, f32(C_lo + 256·C_hi), acc)`, then (Q4_K, Q5_K) `acc =
/// fma(−dmin·d_y, f32(C_min), acc)`.
///
/// # Safety
/// AMX is enabled and configured by [`compute`]; `pack` holds super-blocks `bs` of this type's
/// group in the AMX layout; the tile configuration has `rows` activation rows; rows `i0..i0 +
/// rows` exist in the Q8_K activations.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile<const Q6: bool>(
    t: &TileArgs,
    pack: *const Line,
    i0: usize,
    rows: usize,
    bs: Range<usize>,
    acc_out: &mut [__m512; TM],
    sums: &mut [Sums; 3],
) {
    let mut acc = *acc_out;
    // SAFETY: activation row i0 + i (i < rows) has its scale at ((row/4)·nb + b)·4 + row%4;
    // the lines read of super-block b are below bs.len()·194 of `pack`; the tile loads read 16 rows of
    // 64 bytes at stride cols of activation rows i0..i0 + rows and 16 lines of `pack`.
    unsafe {
        let qs = t.qs.add(i0 * t.cols);
        let last = i0 + rows - 1;
        let drow: [*const f32; TM] = std::array::from_fn(|i| {
            let row = (i0 + i).min(last);
            t.d.add(row / GROUP * t.nb * GROUP + row % GROUP)
        });
        for b in bs.clone() {
            let line = pack.add((b - bs.start) * AMX_LINES);
            asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
            if !Q6 {
                asm!("tilezero tmm2", options(nostack, nomem));
            }
            for c in 0..4 {
                let a = qs.add(b * QK_K + 64 * c);
                let w = line.add(16 * c);
                // Both high-byte planes fit i8 (Q4_K/Q5_K: 0..7), so `tdpbssd` takes either.
                asm!(
                    "tileloadd tmm3, [{a} + {lda}*1]",
                    "tileloadd tmm4, [{w} + {ldb}*1]",
                    "tileloadd tmm5, [{w} + {ldb}*1 + 4096]",
                    "tdpbsud tmm0, tmm3, tmm4",
                    "tdpbssd tmm1, tmm3, tmm5",
                    a = in(reg) a,
                    lda = in(reg) t.cols,
                    w = in(reg) w,
                    ldb = in(reg) 64usize,
                    options(nostack, readonly, preserves_flags),
                );
                if !Q6 {
                    asm!(
                        "tileloadd tmm6, [{w} + {ldb}*1 + 8192]",
                        "tdpbsud tmm2, tmm3, tmm6",
                        w = in(reg) w,
                        ldb = in(reg) 64usize,
                        options(nostack, readonly, preserves_flags),
                    );
                }
            }
            asm!(
                "tilestored [{c0} + {ldc}*1], tmm0",
                "tilestored [{c1} + {ldc}*1], tmm1",
                c0 = in(reg) sums[0].0.as_mut_ptr(),
                c1 = in(reg) sums[1].0.as_mut_ptr(),
                ldc = in(reg) 64usize,
                options(nostack, preserves_flags),
            );
            // Q6_K has no min plane.
            if !Q6 {
                asm!(
                    "tilestored [{c2} + {ldc}*1], tmm2",
                    c2 = in(reg) sums[2].0.as_mut_ptr(),
                    ldc = in(reg) 64usize,
                    options(nostack, preserves_flags),
                );
            }
            let dw = _mm512_load_ps(line.add(192) as *const f32);
            let ndmin = _mm512_load_ps(line.add(193) as *const f32);
            for i in 0..TM {
                // Rows past `rows` hold stale sums; their scale is taken as 0.
                let dy = if i < rows {
                    _mm512_set1_ps(*drow[i].add(b * GROUP))
                } else {
                    _mm512_setzero_ps()
                };
                let lo = _mm512_load_si512(sums[0].0[i].as_ptr() as *const __m512i);
                let hi = _mm512_load_si512(sums[1].0[i].as_ptr() as *const __m512i);
                let isum = _mm512_add_epi32(lo, _mm512_slli_epi32::<8>(hi));
                acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(dw, dy), _mm512_cvtepi32_ps(isum), acc[i]);
                if !Q6 {
                    let min = _mm512_load_si512(sums[2].0[i].as_ptr() as *const __m512i);
                    acc[i] =
                        _mm512_fmadd_ps(_mm512_mul_ps(ndmin, dy), _mm512_cvtepi32_ps(min), acc[i]);
                }
            }
        }
    }
    *acc_out = acc;
}

/// A tile configuration for [`raw_pack`] with `k`-quant sub-blocks (32: Q4_K, Q5_K;
/// 16: Q6_K): tiles 0–1 hold `m` rows of 16 i32 sums, tiles 2–3 `m` activation rows of one
/// sub-block, tiles 4–5 one sub-block of the 16 weight rows (`k/4` lines).
fn raw_config(m: usize, k: usize) -> TileConfig {
    let mut c = [0u8; 64];
    c[0] = 1;
    for (tile, (colsb, rows)) in [(64, m), (64, m), (k, m), (k, m), (64, k / 4), (64, k / 4)]
        .into_iter()
        .enumerate()
    {
        c[16 + 2 * tile] = colsb as u8;
        c[48 + tile] = rows as u8;
    }
    TileConfig(c)
}

/// 64-byte lines of one super-block of a 16-row group in [`raw_pack`]'s layout: the
/// unpacked quants of its 8 runs of 32 weights, 8 lines each (line `8r + l`: weights
/// `32r + 4l..32r + 4l + 4` of the 16 rows).
const RAW_LINES: usize = 64;

/// Sub-block sums of one super-block: up to 16 tiles of `m ≤ 16` rows × 16 i32.
#[repr(C, align(64))]
struct SubSums([Sums; 16]);

/// The `n ≤ 16` rows' 32 bytes at `off` of their super-blocks, transposed: vector `l` holds
/// dword `l` of each row (zero for rows past `n`).
///
/// # Safety
/// Inlined (so its result stays in registers) into a function that enables AVX-512 F/BW/VL;
/// bytes `off..off + 32` lie inside each super-block of `g`.
#[inline(always)]
unsafe fn rows_transposed(g: &Group16, off: usize) -> [__m512i; 8] {
    // SAFETY: AVX-512 F is the caller's contract.
    let mut z = [unsafe { _mm512_setzero_si512() }; WIDE / 2];
    // SAFETY: the caller's.
    let row = |k: usize| unsafe { _mm256_loadu_si256(g.blk(k).add(off) as *const __m256i) };
    // SAFETY: (put_row, transpose) the CPU features are the caller's contract.
    unsafe {
        if g.n == WIDE {
            // The usual case, unrolled.
            for k in 0..WIDE {
                put_row(&mut z, k, row(k));
            }
        } else {
            for k in 0..g.n {
                put_row(&mut z, k, row(k));
            }
        }
        transpose(&z)
    }
}

/// The per-weight-row factors of one super-block on the raw layout, from [`raw_pack`] for
/// [`raw_readout`]: `d·sc_s` as f32 (16 of them for Q6_K, 8 otherwise), the second sum's
/// factors as i16 pairs (Q6_K: `sc_2t`, `sc_2t+1`; Q4_K/Q5_K: `min_t` twice), and its float
/// factor `c` (Q6_K `−32·d`, otherwise `−dmin`).
#[derive(Clone, Copy)]
struct RawHeader {
    sd: [__m512; 16],
    mw: [__m512i; 8],
    c: __m512,
}

/// The raw layout ([`compute_raw`]) for super-block `b` of weight rows `j0..j0+n` (`n ≤ 16`) of
/// a Q4_K, Q5_K or Q6_K matrix (`TY`, as for [`pack`]), with activation rows `i0..i0 + rows`
/// (`rows ≤ 16`), in three steps; this one unpacks the quants as stored (Q4_K 0..15, Q5_K
/// 0..31, Q6_K 0..63 with its +32) into `plane`, each row's quant bytes transposed
/// once for all the sub-blocks they hold (Q4_K: 32 bytes of nibbles for two sub-blocks), and
/// returns the scales. [`raw_tiles`] runs one `tdpbsud` per sub-block (Q4_K, Q5_K: 32 weights;
/// Q6_K: 16), [`raw_readout`] applies the scales to its sums: per activation row, `acc +=
/// d_y·(Σ_s f32(C_s)·d·sc_s + c·f32(Σ_s m_s·bsum_s))` with the second sum exact in i32
/// (`vpdpwssd` on pairs of the row's 16-sums): Q4_K/Q5_K `m_s` the mins and `c = −dmin`, Q6_K
/// `m_s` the scales and `c = −32·d`. The next `ahead` rows get their share of prefetches, as
/// in [`pack`].
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI and F16C; rows `j0..j0+n+ahead` exist in `t`, `b < nb`; `plane`
/// holds [`RAW_LINES`] 64-byte aligned lines.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn raw_pack<const TY: u8>(
    t: &TileArgs,
    (j0, n, ahead): (usize, usize, usize),
    b: usize,
    plane: *mut Line,
) -> RawHeader {
    let q6 = TY == PACK_Q6K;
    let bb = [Q4K_BYTES, Q5K_BYTES, Q6K_BYTES][TY as usize];
    let (m4, m3, m1) = (
        _mm512_set1_epi8(0x0F),
        _mm512_set1_epi8(0x03),
        _mm512_set1_epi8(0x01),
    );
    let store = |line: usize, v: __m512i| {
        // SAFETY: line < RAW_LINES (caller contract on `plane`).
        unsafe { _mm512_store_si512(plane.add(line) as *mut __m512i, v) }
    };
    // SAFETY: super-block b of rows j0..j0+n lies inside the weights; the plane is ours.
    unsafe {
        prefetch_share(t, j0 + n, ahead, b);
        let g = Group16 {
            base: t.w.add(j0 * t.rb + b * bb),
            rb: t.rb,
            n,
        };
        let mut sd = [_mm512_setzero_ps(); 16];
        let mut mw = [_mm512_setzero_si512(); 8];
        let c = if q6 {
            let (s16, dd) = q6k_header(&g);
            let (d, _) = d_ndmin(dd);
            for s in 0..16 {
                sd[s] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(s16[s]));
            }
            for (p, w) in mw.iter_mut().enumerate() {
                *w = i16_pair(s16[2 * p], s16[2 * p + 1]);
            }
            for h in 0..2 {
                // Runs 4h..4h+4: the low nibbles of ql[64h..64h+32] and of ql[64h+32..],
                // then their high nibbles, each with two bits of qh[32h..32h+32].
                let qa = rows_transposed(&g, formats::Q6K_QL + 64 * h);
                let qb = rows_transposed(&g, formats::Q6K_QL + 64 * h + 32);
                let qh = rows_transposed(&g, formats::Q6K_QH + 32 * h);
                for l in 0..8 {
                    let high = |shift: i32| {
                        let v = _mm512_srl_epi16(qh[l], _mm_cvtsi32_si128(shift));
                        _mm512_slli_epi16::<4>(_mm512_and_si512(v, m3))
                    };
                    let nib_hi = |v: __m512i| _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
                    let run = [
                        _mm512_or_si512(_mm512_and_si512(qa[l], m4), high(0)),
                        _mm512_or_si512(_mm512_and_si512(qb[l], m4), high(2)),
                        _mm512_or_si512(nib_hi(qa[l]), high(4)),
                        _mm512_or_si512(nib_hi(qb[l]), high(6)),
                    ];
                    for (k, v) in run.into_iter().enumerate() {
                        store(8 * (4 * h + k) + l, v);
                    }
                }
            }
            _mm512_mul_ps(d, _mm512_set1_ps(-32.0))
        } else {
            let five = TY == PACK_Q5K;
            let (sc, mins, dd) = if five {
                k4_header::<true>(&g)
            } else {
                k4_header::<false>(&g)
            };
            let (d, ndmin) = d_ndmin(dd);
            for s in 0..8 {
                sd[s] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc[s]));
                mw[s] = i16_pair(mins[s], mins[s]);
            }
            let (_, _, qs_off) = formats::k4_layout(five);
            let qh = if five {
                rows_transposed(&g, formats::Q5K_QH)
            } else {
                [_mm512_setzero_si512(); 8]
            };
            for ch in 0..4 {
                for (l, raw) in rows_transposed(&g, qs_off + 32 * ch)
                    .into_iter()
                    .enumerate()
                {
                    let mut lo = _mm512_and_si512(raw, m4);
                    let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), m4);
                    if five {
                        // Bit s of each qh byte is the fifth bit of sub-block s.
                        let bit = |s: usize| {
                            let v = _mm512_srl_epi16(qh[l], _mm_cvtsi32_si128(s as i32));
                            _mm512_slli_epi16::<4>(_mm512_and_si512(v, m1))
                        };
                        lo = _mm512_or_si512(lo, bit(2 * ch));
                        hi = _mm512_or_si512(hi, bit(2 * ch + 1));
                    }
                    store(16 * ch + l, lo);
                    store(16 * ch + 8 + l, hi);
                }
            }
            ndmin
        };
        RawHeader { sd, mw, c }
    }
}

/// [`raw_pack`]'s second step: the tiles of super-block `b`, activation rows from `i0` (the
/// configured count), `plane`'s sub-blocks, sums to `sums`.
///
/// # Safety
/// AMX is enabled and configured by [`raw_config`] for this type; the rows exist; `plane`
/// holds super-block `b` from [`raw_pack`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn raw_tiles<const TY: u8>(
    t: &TileArgs,
    b: usize,
    i0: usize,
    plane: *const Line,
    sums: &mut SubSums,
) {
    // SAFETY: the tiles read the configured activation rows at stride cols from sub-block
    // offsets inside super-block b, and the plane's lines; the sums are ours.
    unsafe {
        // The sub-blocks: 8 of 32 weights (A: 32 bytes a row, B: 8 lines) or 16 of 16.
        let (subs, k) = if TY == PACK_Q6K { (16, 16) } else { (8, 32) };
        let a = t.qs.add(i0 * t.cols + b * QK_K);
        for p in 0..subs / 2 {
            let (s0, s1) = (2 * p, 2 * p + 1);
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tileloadd tmm2, [{a0} + {lda}*1]",
                "tileloadd tmm4, [{w0} + {ldb}*1]",
                "tdpbsud tmm0, tmm2, tmm4",
                "tileloadd tmm3, [{a1} + {lda}*1]",
                "tileloadd tmm5, [{w1} + {ldb}*1]",
                "tdpbsud tmm1, tmm3, tmm5",
                "tilestored [{c0} + {ldb}*1], tmm0",
                "tilestored [{c1} + {ldb}*1], tmm1",
                a0 = in(reg) a.add(k * s0),
                a1 = in(reg) a.add(k * s1),
                lda = in(reg) t.cols,
                w0 = in(reg) plane.add(k / 4 * s0),
                w1 = in(reg) plane.add(k / 4 * s1),
                ldb = in(reg) 64usize,
                c0 = in(reg) sums.0[s0].0.as_mut_ptr(),
                c1 = in(reg) sums.0[s1].0.as_mut_ptr(),
                options(nostack, preserves_flags),
            );
        }
    }
}

/// [`raw_pack`]'s third step: super-block `b`'s sums scaled by `head` into `acc` for
/// activation rows `i0..i0 + rows`.
///
/// # Safety
/// AVX-512 F/BW/VNNI; the rows exist and `sums` holds super-block `b`'s tiles from
/// [`raw_tiles`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn raw_readout<const TY: u8>(
    t: &TileArgs,
    b: usize,
    (i0, rows): (usize, usize),
    head: &RawHeader,
    sums: &SubSums,
    acc: &mut [__m512; TM],
) {
    let subs = if TY == PACK_Q6K { 16 } else { 8 };
    // SAFETY: row i0 + i's scale and block sums lie inside the activations; the sums' rows
    // below `rows` were stored by the tiles.
    unsafe {
        for i in 0..rows {
            let row = i0 + i;
            let dy =
                *t.d.add(row / GROUP * t.nb * GROUP + b * GROUP + row % GROUP);
            // The row's 16 block sums as 8 dwords of two.
            let bs = t.bsums.add(row * t.nb * 16 + b * 16) as *const i32;
            let mut msum = _mm512_setzero_si512();
            for (p, w) in head.mw.iter().enumerate() {
                msum = _mm512_dpwssd_epi32(msum, *w, _mm512_set1_epi32(*bs.add(p)));
            }
            let mut f = _mm512_mul_ps(head.c, _mm512_cvtepi32_ps(msum));
            for s in 0..subs {
                let cs = _mm512_load_si512(sums.0[s].0[i].as_ptr() as *const __m512i);
                f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(cs), head.sd[s], f);
            }
            acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(dy), f, acc[i]);
        }
    }
}

/// Stores lanes `0..n` of `acc`'s first `rows` rows as outputs `(i0..i0 + rows) × (j0..j0 + n)`.
///
/// # Safety
/// AVX-512 F; those outputs are ours.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn store(acc: &[__m512; TM], i0: usize, rows: usize, j0: usize, n: usize, out: OutPtr) {
    // A masked store: n may be below 16.
    let lanes = ((1u32 << n) - 1) as u16;
    for (i, a) in acc.iter().enumerate().take(rows) {
        // SAFETY: the caller's.
        unsafe { _mm512_mask_storeu_ps(out.at(i0 + i, j0), lanes, *a) };
    }
}

#[cfg(test)]
mod tests {
    use super::{AMX_MIN_M_K4, AMX_MIN_M_Q6K, RAW_MAX_Q6K};
    use crate::kernels::testutil::run_path as run;
    use crate::kernels::testutil::{self, Rng};
    use crate::kernels::{KernelPath, QMatrix, ThreadPool, WeightType};

    /// The AMX tiles against the AVX2 path (the same exact integers, another float order; the
    /// distance to the dequantized product is checked for every path in `matmul`'s tests): row counts with a partial 16-row group,
    /// activation counts with a partial 16-row tile, one and several super-blocks, 1 and 2
    /// threads. Random scale bytes cover every 6-bit scale and min (Q6_K: every i8 scale).
    #[test]
    fn amx_matches_avx2_and_the_dequantized_product() {
        if !KernelPath::Amx.is_available() {
            eprintln!("skipped: no AMX on this CPU");
            return;
        }
        let mut rng = Rng::new(1234);
        let pools: Vec<ThreadPool> = [1, 2].into_iter().map(ThreadPool::new).collect();
        for ty in [WeightType::Q4K, WeightType::Q5K, WeightType::Q6K] {
            for (rows, cols) in [(16, 256), (37, 512), (64, 1024)] {
                let data = testutil::random_weights(&mut rng, ty, rows, cols);
                let w = QMatrix::new(ty, rows, cols, &data).unwrap();
                let first = if ty == WeightType::Q6K {
                    AMX_MIN_M_Q6K
                } else {
                    AMX_MIN_M_K4
                };
                // Both layouts: raw up to one tile (Q6_K: RAW_MAX_Q6K rows), planes past it.
                for m in [first, 8, RAW_MAX_Q6K, RAW_MAX_Q6K + 1, 16, 17, 45, 64] {
                    let x = testutil::random_activations(&mut rng, m * cols);
                    let want = run(KernelPath::Avx2, &pools[0], &w, &x, m);
                    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                    for pool in &pools {
                        let got = run(KernelPath::Amx, pool, &w, &x, m);
                        for (k, (g, a)) in got.iter().zip(&want).enumerate() {
                            // Same integers, so only float rounding separates the two.
                            assert!(
                                (g - a).abs() <= 1e-5 * scale,
                                "{ty} rows={rows} cols={cols} m={m} ({}, {}): amx {g} avx2 {a}",
                                k / rows,
                                k % rows
                            );
                        }
                    }
                }
            }
        }
    }
}
