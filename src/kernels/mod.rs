//! CPU matrix multiplication against quantized weights stored in ggml/GGUF layout.
//!
//! References (layouts and arithmetic follow these exactly so that results match llama.cpp):
//! - ggml `ggml-common.h`: `block_q4_0`, `block_q4_1`, `block_q5_0`, `block_q5_1`, `block_q8_0`,
//!   `block_q8_1`, `block_q2_K`, `block_q3_K`, `block_q4_K`, `block_q5_K`, `block_q6_K`,
//!   `block_q8_K`, `block_iq4_nl`, `block_iq4_xs`, `kvalues_iq4nl`.
//! - ggml `ggml-quants.c`: `dequantize_row_*`, `quantize_row_q8_K_ref`, `get_scale_min_k4`.
//! - ggml `ggml-cpu/arch/x86/quants.c`: `quantize_row_q8_0` / `quantize_row_q8_1` (the
//!   rounding actually used on x86) and the `ggml_vec_dot_*` kernels.
//!
//! # Weight layout
//! A weight matrix has `rows` output features and `cols` inputs. Each row is `cols / block_size`
//! consecutive blocks; rows follow each other with no padding. All multi-byte fields are
//! little-endian and the data may be unaligned (it usually comes straight from an mmap).
//!
//! | type | weights/block | bytes | fields, in order |
//! |------|---------------|-------|------------------|
//! | Q4_0 | 32  | 18  | f16 d; 16 B nibbles (w = d·(q−8); low nibbles are weights 0..16) |
//! | Q4_1 | 32  | 20  | f16 d; f16 m; 16 B nibbles (w = d·q + m) |
//! | Q5_0 | 32  | 22  | f16 d; 4 B qh (u32, bit j: weight j's 5th bit); nibbles as Q4_0 (w = d·(q−16)) |
//! | Q5_1 | 32  | 24  | f16 d; f16 m; 4 B qh; 16 B nibbles (w = d·q + m) |
//! | Q8_0 | 32  | 34  | f16 d; 32 × i8 (w = d·q) |
//! | Q2_K | 256 | 84  | 16 B scales (low nibble scale, high nibble min); 64 B 2-bit quants; f16 d; f16 dmin (w = d·sc·q − dmin·min) |
//! | Q3_K | 256 | 110 | 32 B hmask (3rd bits); 64 B 2-bit low bits; 12 B packed 6-bit scales; f16 d (w = d·(sc−32)·(q−4)) |
//! | Q4_K | 256 | 144 | f16 d; f16 dmin; 12 B packed 6-bit scales/mins; 128 B nibbles |
//! | Q5_K | 256 | 176 | f16 d; f16 dmin; 12 B scales/mins; 32 B high bits; 128 B nibbles |
//! | Q6_K | 256 | 210 | 128 B low nibbles; 64 B high 2-bit pairs; 16 × i8 scales; f16 d |
//! | IQ4_NL | 32 | 18 | f16 d; 16 B nibbles as Q4_0 (w = d·kvalues_iq4nl\[q\]) |
//! | IQ4_XS | 256 | 136 | f16 d; u16 scales_h (high 2 bits of 8 scales); 4 B scales_l (low nibbles); 8 × 16 B nibbles, each 16 as IQ4_NL's (w = d·(ls−32)·kvalues_iq4nl\[q\]) |
//! | F32 / F16 / BF16 | 1 | 4 / 2 / 2 | dense |
//!
//! # Activations
//! Like ggml, the f32 activations are quantized once per matmul (Q8_0 for Q4_0, Q5_0, Q8_0 and
//! IQ4_NL weights, Q8_1 for Q4_1 and Q5_1, Q8_K for the K-quants and IQ4_XS) and the dot products
//! run on integers, with one float multiply-add per block. F32/F16/BF16 weights use the f32 activations directly.
//!
//! # Kernel paths
//! [`KernelPath::Scalar`] is the reference (the spec); [`KernelPath::Avx2`] is picked at run
//! time on x86-64 with AVX2+FMA+F16C, and [`KernelPath::Avx512Vnni`] instead where AVX-512
//! F/BW/VL/VNNI are detected too (Zen 4, Ice Lake and later); [`KernelPath::Neon`] on aarch64.
//! For `m > 1` activation rows the SIMD paths compute register tiles of several activation rows
//! per weight load, so the cost per row falls as `m` grows. `Avx512Vnni` runs the AVX2 kernels
//! for GEMV and for the types it has no tiles for, and its own tiles give results bit-identical
//! to `Avx2` (same float operations in the same order; see `avx512.rs`), so which of the two a
//! machine picks never changes an output. [`KernelPath::Amx`] is picked over it where Intel AMX
//! is usable: `Avx512Vnni` plus tile multiplies for Q4_K and Q5_K weights with 3 or more
//! activation rows and Q6_K with 8 or more (`avx512/amx.rs`), whose results differ from the
//! other paths in the last bits.
//!
//! [`detect`] makes the one selection for the process, and every SIMD routine of the CPU forward
//! follows it: the matmuls here, and attention and the vector math (SiLU, `e^x`) in the model
//! layer, which run their AVX2 code exactly when [`KernelPath::runs_avx2_routines`] says so and
//! their portable code otherwise (they have no NEON or AVX-512 versions).
//!
//! # Threads
//! [`matmul()`] splits the weight rows into equal contiguous panels (tens of KiB each) that the
//! threads of a [`ThreadPool`] take in turn; each thread computes its panels for all `m`
//! activation rows, so every weight byte is read once per matmul. Tiny matmuls stay on the
//! calling thread. Keep one pool (and one [`ActivationScratch`] per calling thread) for the
//! life of the model: `ThreadPool::run` costs well under a microsecond while its workers are
//! spinning, and they spin only ~50 µs after each job before parking.
//!
//! ```ignore
//! let pool = ThreadPool::new(2);
//! let mut scratch = ActivationScratch::default();
//! let w = QMatrix::new(WeightType::Q4_1, 1536, 576, bytes)?;
//! matmul(&pool, &w, &x, m, &mut out, &mut scratch)?; // out: m × 1536
//! ```

mod formats;
mod matmul;
mod pool;
mod quantize;
mod scalar;

/// `$f::<MR, NR, extra…>` for an `(mr, nr)` tile shape, as a function pointer. One table for
/// both x86 backends: AVX2 asks for up to 4 × 2 tiles, and 1 × 3 and 1 × 4 for one activation
/// row; AVX-512 for up to 8 × 2.
#[cfg(target_arch = "x86_64")]
macro_rules! pick_mr_nr {
    ($mr:expr, $nr:expr, $f:ident $(, $extra:tt)*) => {
        match ($mr, $nr) {
            (1, 1) => $f::<1, 1 $(, $extra)*>,
            (2, 1) => $f::<2, 1 $(, $extra)*>,
            (3, 1) => $f::<3, 1 $(, $extra)*>,
            (4, 1) => $f::<4, 1 $(, $extra)*>,
            (5, 1) => $f::<5, 1 $(, $extra)*>,
            (6, 1) => $f::<6, 1 $(, $extra)*>,
            (7, 1) => $f::<7, 1 $(, $extra)*>,
            (8, 1) => $f::<8, 1 $(, $extra)*>,
            (1, 2) => $f::<1, 2 $(, $extra)*>,
            (2, 2) => $f::<2, 2 $(, $extra)*>,
            (3, 2) => $f::<3, 2 $(, $extra)*>,
            (4, 2) => $f::<4, 2 $(, $extra)*>,
            (5, 2) => $f::<5, 2 $(, $extra)*>,
            (6, 2) => $f::<6, 2 $(, $extra)*>,
            (7, 2) => $f::<7, 2 $(, $extra)*>,
            (8, 2) => $f::<8, 2 $(, $extra)*>,
            (1, 3) => $f::<1, 3 $(, $extra)*>,
            _ => $f::<1, 4 $(, $extra)*>,
        }
    };
}

/// The `pick_*` functions of an x86 backend: the tile kernel for `mr` activation rows and `nr`
/// weight rows, from that backend's `tile_*` functions (the K-quant tiles take one weight row).
#[cfg(target_arch = "x86_64")]
macro_rules! x86_tile_pickers {
    () => {
        fn pick_q4<const Q41: bool, const FIVE: bool>(mr: usize, nr: usize) -> TileFn {
            pick_mr_nr!(mr, nr, tile_q4, Q41, FIVE)
        }

        fn pick_q8_0<const FMT: u8>(mr: usize, nr: usize) -> TileFn {
            pick_mr_nr!(mr, nr, tile_q8_0, FMT)
        }

        fn pick_k<const FIVE: bool>(mr: usize, _nr: usize) -> TileFn {
            pick_mr_nr!(mr, 1, tile_k, FIVE)
        }

        fn pick_q6k(mr: usize, _nr: usize) -> TileFn {
            pick_mr_nr!(mr, 1, tile_q6k)
        }

        fn pick_q2k(mr: usize, _nr: usize) -> TileFn {
            pick_mr_nr!(mr, 1, tile_q2k)
        }

        fn pick_q3k(mr: usize, _nr: usize) -> TileFn {
            pick_mr_nr!(mr, 1, tile_q3k)
        }

        fn pick_iq4xs(mr: usize, _nr: usize) -> TileFn {
            pick_mr_nr!(mr, 1, tile_iq4xs)
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(any(target_arch = "aarch64", test))]
mod neon;
#[cfg(all(test, not(target_arch = "aarch64")))]
mod neon_emu;

#[cfg(test)]
mod testutil;

use std::fmt;

pub use pool::ThreadPool;
pub use quantize::ActivationScratch;

/// Storage type of a weight matrix, as in ggml.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    /// ggml's IQ4_NL: 32 weights per block, 4-bit indices into ggml's 16 non-linear levels
    /// (`kvalues_iq4nl`) times an f16 scale.
    IQ4NL,
    /// ggml's IQ4_XS: IQ4_NL's levels in 256-weight super-blocks with 6-bit sub-block scales.
    IQ4XS,
}

impl WeightType {
    /// All supported types.
    pub const ALL: [WeightType; 15] = [
        WeightType::F32,
        WeightType::F16,
        WeightType::BF16,
        WeightType::Q4_0,
        WeightType::Q4_1,
        WeightType::Q5_0,
        WeightType::Q5_1,
        WeightType::Q8_0,
        WeightType::Q2K,
        WeightType::Q3K,
        WeightType::Q4K,
        WeightType::Q5K,
        WeightType::Q6K,
        WeightType::IQ4NL,
        WeightType::IQ4XS,
    ];

    /// Number of weights per block.
    pub fn block_size(self) -> usize {
        match self {
            WeightType::F32 | WeightType::F16 | WeightType::BF16 => 1,
            WeightType::Q4_0
            | WeightType::Q4_1
            | WeightType::Q5_0
            | WeightType::Q5_1
            | WeightType::Q8_0
            | WeightType::IQ4NL => formats::QK,
            WeightType::Q2K
            | WeightType::Q3K
            | WeightType::Q4K
            | WeightType::Q5K
            | WeightType::Q6K
            | WeightType::IQ4XS => formats::QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            WeightType::F32 => 4,
            WeightType::F16 | WeightType::BF16 => 2,
            WeightType::Q4_0 => formats::Q4_0_BYTES,
            WeightType::Q4_1 => formats::Q4_1_BYTES,
            WeightType::Q5_0 => formats::Q5_0_BYTES,
            WeightType::Q5_1 => formats::Q5_1_BYTES,
            WeightType::Q8_0 => formats::Q8_0_BYTES,
            WeightType::Q2K => formats::Q2K_BYTES,
            WeightType::Q3K => formats::Q3K_BYTES,
            WeightType::Q4K => formats::Q4K_BYTES,
            WeightType::Q5K => formats::Q5K_BYTES,
            WeightType::Q6K => formats::Q6K_BYTES,
            WeightType::IQ4NL => formats::IQ4NL_BYTES,
            WeightType::IQ4XS => formats::IQ4XS_BYTES,
        }
    }

    /// Bytes of one row of `k` weights (`k` should be a multiple of [`Self::block_size`]).
    pub fn row_bytes(self, k: usize) -> usize {
        k / self.block_size() * self.block_bytes()
    }

    /// Maps a ggml type id (`ggml_type`, as stored in GGUF tensor infos) to a supported type.
    pub fn from_ggml_type_id(id: u32) -> Result<Self, KernelError> {
        Ok(match id {
            0 => WeightType::F32,
            1 => WeightType::F16,
            2 => WeightType::Q4_0,
            3 => WeightType::Q4_1,
            6 => WeightType::Q5_0,
            7 => WeightType::Q5_1,
            8 => WeightType::Q8_0,
            10 => WeightType::Q2K,
            11 => WeightType::Q3K,
            12 => WeightType::Q4K,
            13 => WeightType::Q5K,
            14 => WeightType::Q6K,
            20 => WeightType::IQ4NL,
            23 => WeightType::IQ4XS,
            30 => WeightType::BF16,
            other => return Err(KernelError::UnsupportedType(other)),
        })
    }

    /// The ggml type id of this type.
    pub fn ggml_type_id(self) -> u32 {
        match self {
            WeightType::F32 => 0,
            WeightType::F16 => 1,
            WeightType::Q4_0 => 2,
            WeightType::Q4_1 => 3,
            WeightType::Q5_0 => 6,
            WeightType::Q5_1 => 7,
            WeightType::Q8_0 => 8,
            WeightType::Q2K => 10,
            WeightType::Q3K => 11,
            WeightType::Q4K => 12,
            WeightType::Q5K => 13,
            WeightType::Q6K => 14,
            WeightType::IQ4NL => 20,
            WeightType::IQ4XS => 23,
            WeightType::BF16 => 30,
        }
    }
}

impl fmt::Display for WeightType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            WeightType::F32 => "F32",
            WeightType::F16 => "F16",
            WeightType::BF16 => "BF16",
            WeightType::Q4_0 => "Q4_0",
            WeightType::Q4_1 => "Q4_1",
            WeightType::Q5_0 => "Q5_0",
            WeightType::Q5_1 => "Q5_1",
            WeightType::Q8_0 => "Q8_0",
            WeightType::Q2K => "Q2_K",
            WeightType::Q3K => "Q3_K",
            WeightType::Q4K => "Q4_K",
            WeightType::Q5K => "Q5_K",
            WeightType::Q6K => "Q6_K",
            WeightType::IQ4NL => "IQ4_NL",
            WeightType::IQ4XS => "IQ4_XS",
        };
        f.write_str(name)
    }
}

/// A weight matrix of `rows` output features × `cols` inputs, in ggml layout, borrowed (e.g. from
/// an mmap). `data` needs no particular alignment.
#[derive(Clone, Copy, Debug)]
pub struct QMatrix<'a> {
    pub ty: WeightType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> QMatrix<'a> {
    /// Checks that `cols` is a whole number of blocks and that `data` holds exactly
    /// `rows * row_bytes(cols)` bytes.
    pub fn new(
        ty: WeightType,
        rows: usize,
        cols: usize,
        data: &'a [u8],
    ) -> Result<Self, KernelError> {
        if !cols.is_multiple_of(ty.block_size()) {
            return Err(KernelError::NotBlockAligned {
                ty,
                cols,
                block_size: ty.block_size(),
            });
        }
        let expected = (cols / ty.block_size())
            .checked_mul(ty.block_bytes())
            .and_then(|row_bytes| row_bytes.checked_mul(rows))
            .ok_or(KernelError::SizeOverflow)?;
        if data.len() != expected {
            return Err(KernelError::ShapeMismatch {
                what: "weight data bytes",
                expected,
                actual: data.len(),
            });
        }
        Ok(QMatrix {
            ty,
            rows,
            cols,
            data,
        })
    }

    /// Bytes per weight row.
    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols)
    }

    /// Re-checks the invariants of [`QMatrix::new`] (the fields are public, so a value may
    /// have been built by hand).
    fn validate(&self) -> Result<(), KernelError> {
        QMatrix::new(self.ty, self.rows, self.cols, self.data).map(|_| ())
    }
}

/// Which implementation computes the dot products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelPath {
    /// Portable reference implementation.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C, detected at run time.
    Avx2,
    /// [`KernelPath::Avx2`] plus AVX-512 F/BW/VL/VNNI (e.g. Zen 4, Ice Lake and later): `vpdpbusd`
    /// register tiles for the matmuls with `m > 1`, bit-identical to the AVX2 path; everything
    /// else runs the AVX2 kernels.
    Avx512Vnni,
    /// [`KernelPath::Avx512Vnni`] plus Intel AMX-TILE/AMX-INT8 (Sapphire Rapids and later, where
    /// the OS grants it): tile multiplies for Q4_K and Q5_K weights with 3 or more activation
    /// rows and Q6_K with 8 or more (prefill, and batched decode of that many sequences). Their
    /// integer sums are exact as everywhere, but the float
    /// scaling is one sum per super-block, so those results differ from the other x86 paths in
    /// the last bits; everything else runs [`KernelPath::Avx512Vnni`]'s kernels.
    Amx,
    /// aarch64 NEON.
    Neon,
}

impl KernelPath {
    /// Whether the AVX2+FMA+F16C routines outside the matmuls (attention, SiLU, `e^x`) run on
    /// this path: on [`KernelPath::Avx2`] and on [`KernelPath::Avx512Vnni`] (which has none of
    /// its own for them), and only where the CPU has those features. On the other paths they run
    /// their portable code.
    pub fn runs_avx2_routines(self) -> bool {
        matches!(
            self,
            KernelPath::Avx2 | KernelPath::Avx512Vnni | KernelPath::Amx
        ) && avx2_available()
    }

    /// Whether this path can run on the current CPU.
    pub fn is_available(self) -> bool {
        match self {
            KernelPath::Scalar => true,
            KernelPath::Avx2 => avx2_available(),
            KernelPath::Avx512Vnni => avx512_vnni_available(),
            KernelPath::Amx => amx_available(),
            KernelPath::Neon => cfg!(target_arch = "aarch64"),
        }
    }
}

impl fmt::Display for KernelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            KernelPath::Scalar => "scalar",
            KernelPath::Avx2 => "avx2",
            KernelPath::Avx512Vnni => "avx512vnni",
            KernelPath::Amx => "amx",
            KernelPath::Neon => "neon",
        };
        f.write_str(name)
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_available() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_available() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512_vnni_available() -> bool {
    avx2_available()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_vnni_available() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn amx_available() -> bool {
    avx512::amx_available()
}

#[cfg(not(target_arch = "x86_64"))]
fn amx_available() -> bool {
    false
}

/// The path the CPU forward's SIMD routines use (the matmuls, and through
/// [`KernelPath::runs_avx2_routines`] attention and the vector math): the fastest one available
/// on this CPU, unless the environment variable `LLM_WORKER_CPU_KERNELS` names another available
/// one (`scalar`, `avx2`, `avx512vnni`, `amx`, `neon`), which lets benchmarks compare paths in one
/// build. Decided once.
pub fn detect() -> KernelPath {
    static CHOSEN: std::sync::OnceLock<KernelPath> = std::sync::OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let fastest = fastest_available();
        let Ok(wanted) = std::env::var("LLM_WORKER_CPU_KERNELS") else {
            return fastest;
        };
        [
            KernelPath::Scalar,
            KernelPath::Avx2,
            KernelPath::Avx512Vnni,
            KernelPath::Amx,
            KernelPath::Neon,
        ]
        .into_iter()
        .find(|p| p.to_string() == wanted.trim() && p.is_available())
        .unwrap_or_else(|| {
            tracing::warn!(
                requested = %wanted,
                using = %fastest,
                "LLM_WORKER_CPU_KERNELS names no kernel path available on this CPU"
            );
            fastest
        })
    })
}

fn fastest_available() -> KernelPath {
    if KernelPath::Amx.is_available() {
        KernelPath::Amx
    } else if KernelPath::Avx512Vnni.is_available() {
        KernelPath::Avx512Vnni
    } else if KernelPath::Avx2.is_available() {
        KernelPath::Avx2
    } else if KernelPath::Neon.is_available() {
        KernelPath::Neon
    } else {
        KernelPath::Scalar
    }
}

/// Errors from the kernels. Shapes are checked up front; nothing is computed on error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelError {
    /// A buffer or dimension does not have the size the other arguments imply.
    ShapeMismatch {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    /// `cols` is not a multiple of the type's block size.
    NotBlockAligned {
        ty: WeightType,
        cols: usize,
        block_size: usize,
    },
    /// A row index past the end of the matrix.
    RowOutOfRange { row: usize, rows: usize },
    /// A ggml type id this module does not implement.
    UnsupportedType(u32),
    /// The requested kernel path cannot run on this CPU.
    PathUnavailable(KernelPath),
    /// A size computation overflowed `usize`.
    SizeOverflow,
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::ShapeMismatch {
                what,
                expected,
                actual,
            } => write!(f, "shape mismatch: {what} is {actual}, expected {expected}"),
            KernelError::NotBlockAligned {
                ty,
                cols,
                block_size,
            } => write!(
                f,
                "{ty} rows need a multiple of {block_size} columns, got {cols}"
            ),
            KernelError::RowOutOfRange { row, rows } => {
                write!(f, "row {row} out of range for a matrix of {rows} rows")
            }
            KernelError::UnsupportedType(id) => {
                write!(f, "unsupported ggml weight type id {id}")
            }
            KernelError::PathUnavailable(path) => {
                write!(f, "kernel path {path} is not available on this CPU")
            }
            KernelError::SizeOverflow => f.write_str("size computation overflowed"),
        }
    }
}

impl std::error::Error for KernelError {}

/// `out[i*rows + j] = sum_c x[i*cols + c] * W[j, c]` for `i < m`; `x` is `m × cols` row-major.
///
/// Uses the fastest available path ([`detect`]) and all threads of `pool`.
pub fn matmul(
    pool: &ThreadPool,
    w: &QMatrix,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    scratch: &mut ActivationScratch,
) -> Result<(), KernelError> {
    let min = matmul::DEFAULT_MIN_PARALLEL_BYTES;
    matmul::matmul_many(detect(), pool, &mut [(w, out)], x, m, scratch, min)
}

/// Several matrices with the same input `x` (`m × cols`, `cols` shared), e.g. the q, k and v
/// projections: the activations are quantized once and all matrices run in one pool dispatch.
/// Each output is `m × rows` of its matrix.
pub fn matmul_many(
    pool: &ThreadPool,
    jobs: &mut [(&QMatrix, &mut [f32])],
    x: &[f32],
    m: usize,
    scratch: &mut ActivationScratch,
) -> Result<(), KernelError> {
    matmul::matmul_many(
        detect(),
        pool,
        jobs,
        x,
        m,
        scratch,
        matmul::DEFAULT_MIN_PARALLEL_BYTES,
    )
}

/// Dequantizes row `row` of `w` into `out` (length `cols`), e.g. for a token-embedding lookup
/// from a quantized table.
pub fn dequantize_row(w: &QMatrix, row: usize, out: &mut [f32]) -> Result<(), KernelError> {
    w.validate()?;
    if row >= w.rows {
        return Err(KernelError::RowOutOfRange { row, rows: w.rows });
    }
    if out.len() != w.cols {
        return Err(KernelError::ShapeMismatch {
            what: "dequantize_row output length",
            expected: w.cols,
            actual: out.len(),
        });
    }
    let rb = w.row_bytes();
    formats::dequantize_row(w.ty, &w.data[row * rb..(row + 1) * rb], out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_x86_paths_run_the_avx2_routines_and_only_where_the_cpu_has_avx2() {
        assert!(!KernelPath::Scalar.runs_avx2_routines());
        assert!(!KernelPath::Neon.runs_avx2_routines());
        let avx2 = KernelPath::Avx2.is_available();
        assert_eq!(KernelPath::Avx2.runs_avx2_routines(), avx2);
        assert_eq!(KernelPath::Avx512Vnni.runs_avx2_routines(), avx2);
        assert_eq!(KernelPath::Amx.runs_avx2_routines(), avx2);
        // AMX is only offered where AVX-512 VNNI is too (its fallback).
        assert!(!KernelPath::Amx.is_available() || KernelPath::Avx512Vnni.is_available());
        // The default selection runs them wherever the CPU has them, as before the selection
        // reached attention and the vector math.
        assert_eq!(fastest_available().runs_avx2_routines(), avx2);
    }
}
