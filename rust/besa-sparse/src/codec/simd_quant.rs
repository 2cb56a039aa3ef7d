//! SSSE3 kernels of the quantized formats for 16-bit dtypes (F16/BF16) and codes of at most 4
//! bits: a group's (at most 16) dequantized values are two 16-byte tables (low and high bytes)
//! that one shuffle each looks up for 16 codes at a time.

use std::arch::x86_64::*;
use std::sync::OnceLock;

pub fn available() -> bool {
    static A: OnceLock<bool> = OnceLock::new();
    *A.get_or_init(|| is_x86_feature_detected!("ssse3") && is_x86_feature_detected!("popcnt"))
}

/// The low and high bytes of a group's 16-bit values for codes 0..16.
pub fn tables(values: &[u16; 16]) -> ([u8; 16], [u8; 16]) {
    let mut lo = [0u8; 16];
    let mut hi = [0u8; 16];
    for (q, v) in values.iter().enumerate() {
        lo[q] = *v as u8;
        hi[q] = (*v >> 8) as u8;
    }
    (lo, hi)
}

/// The 16-bit values of 16 codes (each masked to its low 4 bits), as two vectors of 8 words.
#[inline]
#[target_feature(enable = "ssse3")]
unsafe fn lookup(c: __m128i, lo: __m128i, hi: __m128i) -> (__m128i, __m128i) {
    let idx = _mm_and_si128(c, _mm_set1_epi8(0x0f));
    let l = _mm_shuffle_epi8(lo, idx);
    let h = _mm_shuffle_epi8(hi, idx);
    (_mm_unpacklo_epi8(l, h), _mm_unpackhi_epi8(l, h))
}

/// The first `16 * (codes.len() / 16)` codes of a group against their weights (`2 *` as many
/// bytes): returns (OR of the codes, whether a weight differs from the value of its code,
/// codes that differ from `z`, codes done).
///
/// # Safety
/// The CPU must have SSSE3 and POPCNT ([`available`]).
#[target_feature(enable = "ssse3,popcnt")]
pub unsafe fn check16(
    codes: &[u8],
    weights: &[u8],
    lo: &[u8; 16],
    hi: &[u8; 16],
    z: u8,
) -> (u8, bool, u32, usize) {
    let n = codes.len() / 16 * 16;
    assert!(
        weights.len() >= 2 * n,
        "check16: weights shorter than the codes"
    );
    let lo = _mm_loadu_si128(lo.as_ptr() as *const __m128i);
    let hi = _mm_loadu_si128(hi.as_ptr() as *const __m128i);
    let zv = _mm_set1_epi8(z as i8);
    let mut any = _mm_setzero_si128();
    let mut diff = _mm_setzero_si128();
    let mut equal = 0u32;
    let mut i = 0;
    while i < n {
        let c = _mm_loadu_si128(codes.as_ptr().add(i) as *const __m128i);
        any = _mm_or_si128(any, c);
        let (w0, w1) = lookup(c, lo, hi);
        let x0 = _mm_loadu_si128(weights.as_ptr().add(2 * i) as *const __m128i);
        let x1 = _mm_loadu_si128(weights.as_ptr().add(2 * i + 16) as *const __m128i);
        diff = _mm_or_si128(diff, _mm_xor_si128(w0, x0));
        diff = _mm_or_si128(diff, _mm_xor_si128(w1, x1));
        equal += (_mm_movemask_epi8(_mm_cmpeq_epi8(c, zv)) as u32).count_ones();
        i += 16;
    }
    let mut bytes = [0u8; 16];
    _mm_storeu_si128(bytes.as_mut_ptr() as *mut __m128i, any);
    let any = bytes.iter().fold(0u8, |a, &b| a | b);
    let differ = _mm_movemask_epi8(_mm_cmpeq_epi8(diff, _mm_setzero_si128())) != 0xffff;
    (any, differ, n as u32 - equal, n)
}

/// Writes the 16-bit values of the first `16 * (codes.len() / 16)` codes (each below 16) into
/// `out` (`2 *` as many bytes); returns the codes done.
///
/// # Safety
/// The CPU must have SSSE3 ([`available`]).
#[target_feature(enable = "ssse3")]
pub unsafe fn decode16(codes: &[u8], out: &mut [u8], lo: &[u8; 16], hi: &[u8; 16]) -> usize {
    let n = codes.len() / 16 * 16;
    assert!(
        out.len() >= 2 * n,
        "decode16: output shorter than the codes"
    );
    let lo = _mm_loadu_si128(lo.as_ptr() as *const __m128i);
    let hi = _mm_loadu_si128(hi.as_ptr() as *const __m128i);
    let mut i = 0;
    while i < n {
        let c = _mm_loadu_si128(codes.as_ptr().add(i) as *const __m128i);
        let (w0, w1) = lookup(c, lo, hi);
        _mm_storeu_si128(out.as_mut_ptr().add(2 * i) as *mut __m128i, w0);
        _mm_storeu_si128(out.as_mut_ptr().add(2 * i + 16) as *mut __m128i, w1);
        i += 16;
    }
    n
}

/// Per mask byte, the shuffle that moves the next `popcount` stored bytes to the lanes of its
/// set bits (0x80, a zero lane, elsewhere and in lanes 8..16).
fn expand_table() -> &'static [[u8; 16]; 256] {
    static T: OnceLock<[[u8; 16]; 256]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = [[0x80u8; 16]; 256];
        for (m, e) in t.iter_mut().enumerate() {
            let mut k = 0u8;
            for (j, lane) in e.iter_mut().enumerate().take(8) {
                if (m >> j) & 1 == 1 {
                    *lane = k;
                    k += 1;
                }
            }
        }
        t
    })
}

/// The full codes of one bitmask-quantized row whose groups are whole mask bytes (`width` a
/// multiple of 8): set bits take the next stored code, clear bits their group's zero point.
/// Returns whether a stored code equals its group's zero point (not canonical).
///
/// # Safety
/// The CPU must have SSSE3 ([`available`]). `stored` holds the row's stored codes followed
/// by at least 16 bytes (one 16-byte load per mask byte starts at the next stored code).
#[target_feature(enable = "ssse3")]
pub unsafe fn expand_row(
    mrow: &[u8],
    stored: &[u8],
    zero: &[u8],
    width: usize,
    out: &mut [u8],
) -> bool {
    let t = expand_table();
    let per_group = width / 8;
    let cols = out.len();
    assert!(width % 8 == 0 && width > 0 && cols % width == 0 && mrow.len() >= cols / 8);
    let total: usize = mrow[..cols / 8]
        .iter()
        .map(|m| m.count_ones() as usize)
        .sum();
    assert!(
        stored.len() >= total + 16,
        "expand_row: stored codes without slack"
    );
    let zero_lane = _mm_set1_epi8(0x80u8 as i8);
    let mut equal = _mm_setzero_si128();
    let mut k = 0usize;
    for (g, (ms, os)) in mrow[..cols / 8]
        .chunks_exact(per_group)
        .zip(out.chunks_exact_mut(width))
        .enumerate()
    {
        let zv = _mm_set1_epi8(zero[g] as i8);
        for (i, &m) in ms.iter().enumerate() {
            let idx = _mm_loadu_si128(t[m as usize].as_ptr() as *const __m128i);
            let src = _mm_loadu_si128(stored.as_ptr().add(k) as *const __m128i);
            let sh = _mm_shuffle_epi8(src, idx);
            let clear = _mm_cmpeq_epi8(idx, zero_lane);
            let v = _mm_or_si128(sh, _mm_and_si128(clear, zv));
            equal = _mm_or_si128(equal, _mm_andnot_si128(clear, _mm_cmpeq_epi8(sh, zv)));
            _mm_storel_epi64(os.as_mut_ptr().add(8 * i) as *mut __m128i, v);
            k += m.count_ones() as usize;
        }
    }
    _mm_movemask_epi8(equal) != 0
}

/// Per mask byte, the shuffle that moves the bytes of its set bits to the first lanes, in
/// order (0x80 elsewhere).
fn compress_table() -> &'static [[u8; 16]; 256] {
    static T: OnceLock<[[u8; 16]; 256]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = [[0x80u8; 16]; 256];
        for (m, c) in t.iter_mut().enumerate() {
            let mut k = 0;
            for j in 0..8u8 {
                if (m >> j) & 1 == 1 {
                    c[k] = j;
                    k += 1;
                }
            }
        }
        t
    })
}

/// Encodes one bitmask-quantized row whose groups are whole mask bytes (`width` a multiple of
/// 8): its bitmask bytes (bit set = code differs from its group's zero point) into `mrow` and
/// its kept codes, in order, into `kept`. Returns the number of kept codes.
///
/// # Safety
/// The CPU must have SSSE3 and POPCNT ([`available`]). `kept` has room for the kept codes
/// plus 16 bytes (each 8 codes are stored with one 16-byte store).
#[target_feature(enable = "ssse3,popcnt")]
pub unsafe fn compress_row(
    codes: &[u8],
    zero: &[u8],
    width: usize,
    mrow: &mut [u8],
    kept: &mut [u8],
) -> usize {
    let t = compress_table();
    let cols = codes.len();
    assert!(width % 8 == 0 && width > 0 && cols % width == 0 && mrow.len() >= cols / 8);
    assert!(kept.len() >= cols + 16, "compress_row: kept without room");
    let mut k = 0usize;
    for (g, (cs, ms)) in codes
        .chunks_exact(width)
        .zip(mrow.chunks_exact_mut(width / 8))
        .enumerate()
    {
        let zv = _mm_set1_epi8(zero[g] as i8);
        for (c8, m) in cs.chunks_exact(8).zip(ms.iter_mut()) {
            let v = _mm_loadl_epi64(c8.as_ptr() as *const __m128i);
            let eq = _mm_movemask_epi8(_mm_cmpeq_epi8(v, zv)) as u32;
            let bits = !eq as u8;
            *m = bits;
            let sh = _mm_loadu_si128(t[bits as usize].as_ptr() as *const __m128i);
            _mm_storeu_si128(
                kept.as_mut_ptr().add(k) as *mut __m128i,
                _mm_shuffle_epi8(v, sh),
            );
            k += bits.count_ones() as usize;
        }
    }
    k
}

/// Four BF16 values `(q0 + i - z) * s` (i = 0..4; the exact F32 product rounded to
/// nearest-even, as `half::bf16::from_f32` rounds finite values), in the low halves of four
/// 32-bit lanes.
#[inline]
#[target_feature(enable = "sse2")]
unsafe fn bf16_round4(q0: f32, z: __m128, s: __m128) -> __m128i {
    let d = _mm_sub_ps(_mm_setr_ps(q0, q0 + 1.0, q0 + 2.0, q0 + 3.0), z);
    let u = _mm_castps_si128(_mm_mul_ps(d, s));
    let lsb = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
    _mm_srli_epi32(
        _mm_add_epi32(_mm_add_epi32(u, _mm_set1_epi32(0x7fff)), lsb),
        16,
    )
}

/// The shuffle tables ([`tables`]) of the BF16 values of codes 0..16 of a group with zero
/// point `z` and BF16 scale bits `s` (finite: the scales are checked).
///
/// # Safety
/// The CPU must have SSSE3 and SSE4.1 ([`available_bf16`]).
#[target_feature(enable = "ssse3,sse4.1")]
pub unsafe fn bf16_tables(z: u8, s: u16) -> ([u8; 16], [u8; 16]) {
    let sv = _mm_castsi128_ps(_mm_set1_epi32((u32::from(s) << 16) as i32));
    let zf = _mm_set1_ps(f32::from(z));
    let w0 = _mm_packus_epi32(bf16_round4(0.0, zf, sv), bf16_round4(4.0, zf, sv));
    let w1 = _mm_packus_epi32(bf16_round4(8.0, zf, sv), bf16_round4(12.0, zf, sv));
    let x = -128;
    let even = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, x, x, x, x, x, x, x, x);
    let odd = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, x, x, x, x, x, x, x, x);
    let lo = _mm_unpacklo_epi64(_mm_shuffle_epi8(w0, even), _mm_shuffle_epi8(w1, even));
    let hi = _mm_unpacklo_epi64(_mm_shuffle_epi8(w0, odd), _mm_shuffle_epi8(w1, odd));
    let mut out = ([0u8; 16], [0u8; 16]);
    _mm_storeu_si128(out.0.as_mut_ptr() as *mut __m128i, lo);
    _mm_storeu_si128(out.1.as_mut_ptr() as *mut __m128i, hi);
    out
}

pub fn available_bf16() -> bool {
    static A: OnceLock<bool> = OnceLock::new();
    *A.get_or_init(|| available() && is_x86_feature_detected!("sse4.1"))
}
