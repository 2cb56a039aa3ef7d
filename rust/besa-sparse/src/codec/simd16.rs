//! SSSE3 kernels for 16-bit items (F16/BF16): 8 items per mask byte; a 256-entry shuffle table
//! compresses the kept items of a 16-byte load (encode) or expands packed items into their
//! positions with zeros elsewhere (decode).

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::bitmask_row_bytes;

struct Tables {
    compress: [[u8; 16]; 256],
    expand: [[u8; 16]; 256],
}

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        let mut compress = [[0x80u8; 16]; 256];
        let mut expand = [[0x80u8; 16]; 256];
        for (m, (c, e)) in compress.iter_mut().zip(expand.iter_mut()).enumerate() {
            let mut k = 0usize;
            for j in 0..8 {
                if (m >> j) & 1 == 1 {
                    c[2 * k] = 2 * j as u8;
                    c[2 * k + 1] = 2 * j as u8 + 1;
                    e[2 * j] = 2 * k as u8;
                    e[2 * j + 1] = 2 * k as u8 + 1;
                    k += 1;
                }
            }
        }
        Tables { compress, expand }
    })
}

pub fn available() -> bool {
    static A: OnceLock<bool> = OnceLock::new();
    *A.get_or_init(|| is_x86_feature_detected!("ssse3") && is_x86_feature_detected!("popcnt"))
}

/// Same contract as `encode_rows_w::<u16>`. A 16-byte store at slot k is only done when
/// slots k..k+8 are inside `values`; its lanes past the kept count are overwritten by later
/// stores (slots are filled in increasing order), so the result is exact.
#[target_feature(enable = "ssse3,popcnt")]
pub unsafe fn encode_rows(
    data: &[u8],
    cols: usize,
    counts: &[u64],
    mask: &mut [u8],
    values: &mut [u8],
) {
    let t = tables();
    let wb = bitmask_row_bytes(cols);
    let len = values.len() / 2;
    let full = cols / 8;
    let magnitude = _mm_set1_epi16(0x7fff);
    let zero = _mm_setzero_si128();
    let mut k = 0usize;
    for ((row, mrow), &_cnt) in data
        .chunks_exact(cols * 2)
        .zip(mask.chunks_exact_mut(wb))
        .zip(counts)
    {
        for g in 0..full {
            let grp = &row[g * 16..g * 16 + 16];
            let v = _mm_loadu_si128(grp.as_ptr() as *const __m128i);
            let z = _mm_cmpeq_epi16(_mm_and_si128(v, magnitude), zero);
            let zm = (_mm_movemask_epi8(_mm_packs_epi16(z, z)) & 0xff) as u8;
            let m = !zm;
            mrow[g] = m;
            if k + 8 <= len {
                let sh = _mm_loadu_si128(t.compress[m as usize].as_ptr() as *const __m128i);
                let dst = values[k * 2..k * 2 + 16].as_mut_ptr() as *mut __m128i;
                _mm_storeu_si128(dst, _mm_shuffle_epi8(v, sh));
            } else {
                let mut b = m;
                let mut kk = k;
                while b != 0 {
                    let j = b.trailing_zeros() as usize;
                    values[kk * 2..kk * 2 + 2].copy_from_slice(&grp[2 * j..2 * j + 2]);
                    kk += 1;
                    b &= b - 1;
                }
            }
            k += m.count_ones() as usize;
        }
        if cols % 8 != 0 {
            let grp = &row[full * 16..];
            let mut bits = 0u8;
            for (j, e) in grp.chunks_exact(2).enumerate() {
                if u16::from_le_bytes([e[0], e[1]]) & 0x7fff != 0 {
                    bits |= 1 << j;
                    values[k * 2..k * 2 + 2].copy_from_slice(e);
                    k += 1;
                }
            }
            mrow[full] = bits;
        }
    }
    debug_assert_eq!(k, len);
}

/// Non-zero 16-bit items of one row.
#[target_feature(enable = "ssse3,popcnt")]
pub unsafe fn count_row(row: &[u8]) -> u64 {
    let magnitude = _mm_set1_epi16(0x7fff);
    let zero = _mm_setzero_si128();
    let mut zeros = 0u64;
    let chunks = row.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        let v = _mm_loadu_si128(c.as_ptr() as *const __m128i);
        let z = _mm_cmpeq_epi16(_mm_and_si128(v, magnitude), zero);
        zeros += (_mm_movemask_epi8(z) as u32).count_ones() as u64 / 2;
    }
    let tail_kept = tail
        .chunks_exact(2)
        .filter(|e| u16::from_le_bytes([e[0], e[1]]) & 0x7fff != 0)
        .count() as u64;
    (row.len() - tail.len()) as u64 / 2 - zeros + tail_kept
}

/// Same contract as `decode_rows_w::<u16>`: every output item is written.
#[target_feature(enable = "ssse3,popcnt")]
pub unsafe fn decode_rows(out: &mut [u8], cols: usize, mask: &[u8], values: &[u8]) {
    let t = tables();
    let wb = bitmask_row_bytes(cols);
    let len = values.len() / 2;
    let full = cols / 8;
    let mut k = 0usize;
    for (orow, mrow) in out.chunks_exact_mut(cols * 2).zip(mask.chunks_exact(wb)) {
        for g in 0..full {
            let m = mrow[g];
            let dst = &mut orow[g * 16..g * 16 + 16];
            if k + 8 <= len {
                let v = _mm_loadu_si128(values[k * 2..k * 2 + 16].as_ptr() as *const __m128i);
                let sh = _mm_loadu_si128(t.expand[m as usize].as_ptr() as *const __m128i);
                _mm_storeu_si128(dst.as_mut_ptr() as *mut __m128i, _mm_shuffle_epi8(v, sh));
                k += m.count_ones() as usize;
            } else {
                for (j, o) in dst.chunks_exact_mut(2).enumerate() {
                    if (m >> j) & 1 == 1 {
                        o.copy_from_slice(&values[k * 2..k * 2 + 2]);
                        k += 1;
                    } else {
                        o.fill(0);
                    }
                }
            }
        }
        if cols % 8 != 0 {
            let m = mrow[full];
            for (j, o) in orow[full * 16..].chunks_exact_mut(2).enumerate() {
                if (m >> j) & 1 == 1 {
                    o.copy_from_slice(&values[k * 2..k * 2 + 2]);
                    k += 1;
                } else {
                    o.fill(0);
                }
            }
        }
    }
}
