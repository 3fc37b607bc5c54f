//! Test-only scalar emulation of the few NEON intrinsics `neon.rs` uses, with the same names
//! and signatures as `core::arch::aarch64`, so the NEON kernels' logic is exercised on x86.
//! Loads are `unsafe fn` (raw pointers); arithmetic is safe, as on aarch64.

#![allow(non_camel_case_types)]

/// Each vector type is its array of lanes.
macro_rules! vector_types {
    ($($name:ident($lanes:ty);)*) => {
        $(
            #[derive(Clone, Copy, Debug)]
            pub struct $name($lanes);
        )*
    };
}

vector_types! {
    uint8x16_t([u8; 16]);
    int8x16_t([i8; 16]);
    int8x8_t([i8; 8]);
    int16x8_t([i16; 8]);
    int32x4_t([i32; 4]);
    float32x4_t([f32; 4]);
}

pub unsafe fn vld1q_u8(p: *const u8) -> uint8x16_t {
    // SAFETY: the caller guarantees 16 readable bytes.
    uint8x16_t(unsafe { std::ptr::read_unaligned(p as *const [u8; 16]) })
}

pub unsafe fn vld1q_s8(p: *const i8) -> int8x16_t {
    // SAFETY: the caller guarantees 16 readable bytes.
    int8x16_t(unsafe { std::ptr::read_unaligned(p as *const [i8; 16]) })
}

pub unsafe fn vld1q_f32(p: *const f32) -> float32x4_t {
    // SAFETY: the caller guarantees 4 readable floats.
    float32x4_t(unsafe { std::ptr::read_unaligned(p as *const [f32; 4]) })
}

pub fn vdupq_n_u8(v: u8) -> uint8x16_t {
    uint8x16_t([v; 16])
}

pub fn vdupq_n_s8(v: i8) -> int8x16_t {
    int8x16_t([v; 16])
}

pub fn vdupq_n_s32(v: i32) -> int32x4_t {
    int32x4_t([v; 4])
}

pub fn vdupq_n_f32(v: f32) -> float32x4_t {
    float32x4_t([v; 4])
}

pub fn vandq_u8(a: uint8x16_t, b: uint8x16_t) -> uint8x16_t {
    uint8x16_t(std::array::from_fn(|i| a.0[i] & b.0[i]))
}

pub fn vorrq_u8(a: uint8x16_t, b: uint8x16_t) -> uint8x16_t {
    uint8x16_t(std::array::from_fn(|i| a.0[i] | b.0[i]))
}

pub fn vshrq_n_u8<const N: i32>(a: uint8x16_t) -> uint8x16_t {
    uint8x16_t(std::array::from_fn(|i| a.0[i] >> N))
}

pub fn vshlq_n_u8<const N: i32>(a: uint8x16_t) -> uint8x16_t {
    uint8x16_t(std::array::from_fn(|i| a.0[i] << N))
}

pub fn vreinterpretq_s8_u8(a: uint8x16_t) -> int8x16_t {
    int8x16_t(a.0.map(|v| v as i8))
}

pub fn vsubq_s8(a: int8x16_t, b: int8x16_t) -> int8x16_t {
    int8x16_t(std::array::from_fn(|i| a.0[i].wrapping_sub(b.0[i])))
}

/// Table lookup: lane `i` is `t[idx[i]]`, or 0 where `idx[i] ≥ 16`.
pub fn vqtbl1q_s8(t: int8x16_t, idx: uint8x16_t) -> int8x16_t {
    int8x16_t(idx.0.map(|k| t.0.get(k as usize).copied().unwrap_or(0)))
}

pub fn vget_low_s8(a: int8x16_t) -> int8x8_t {
    int8x8_t(std::array::from_fn(|i| a.0[i]))
}

pub fn vget_high_s8(a: int8x16_t) -> int8x8_t {
    int8x8_t(std::array::from_fn(|i| a.0[i + 8]))
}

pub fn vmull_s8(a: int8x8_t, b: int8x8_t) -> int16x8_t {
    int16x8_t(std::array::from_fn(|i| a.0[i] as i16 * b.0[i] as i16))
}

pub fn vpadalq_s16(a: int32x4_t, b: int16x8_t) -> int32x4_t {
    int32x4_t(std::array::from_fn(|i| {
        a.0[i].wrapping_add(b.0[2 * i] as i32 + b.0[2 * i + 1] as i32)
    }))
}

pub fn vaddvq_s32(a: int32x4_t) -> i32 {
    a.0.iter().fold(0i32, |s, v| s.wrapping_add(*v))
}

pub fn vfmaq_f32(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
    float32x4_t(std::array::from_fn(|i| b.0[i].mul_add(c.0[i], a.0[i])))
}

pub fn vaddvq_f32(a: float32x4_t) -> f32 {
    (a.0[0] + a.0[1]) + (a.0[2] + a.0[3])
}
