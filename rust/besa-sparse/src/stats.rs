//! Counting exact zeros of float tensors, multithreaded.

use rayon::prelude::*;
use safetensors::tensor::Dtype;

use crate::dtype::magnitude;

/// Chunk size (bytes) of the parallel scans: big enough to amortise scheduling.
const CHUNK: usize = 1 << 20;

/// Number of zeros (under the zero rule of [`crate::dtype`]: +0.0 and -0.0) in little-endian
/// float bytes, or `None` for dtypes that are not floating point (F64, F32, F16, BF16 are
/// counted).
pub fn count_zeros(dtype: Dtype, bytes: &[u8]) -> Option<u64> {
    if !crate::dtype::is_float(dtype) {
        return None;
    }
    Some(crate::dispatch_itemsize!(
        crate::dtype::itemsize(dtype),
        count_by::<N>(bytes)
    ))
}

fn count_by<const N: usize>(bytes: &[u8]) -> u64 {
    bytes
        .par_chunks(CHUNK - CHUNK % N)
        .map(|chunk| {
            chunk
                .chunks_exact(N)
                .filter(|c| magnitude::<N>(c) == 0)
                .count() as u64
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_signed_zeros_of_every_float_dtype() {
        let f32s: Vec<u8> = [0.0f32, -0.0, 1.0, f32::NAN, 0.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(count_zeros(Dtype::F32, &f32s), Some(3));
        let f16s: Vec<u8> = [0x0000u16, 0x8000, 0x3c00, 0x0001]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(count_zeros(Dtype::F16, &f16s), Some(2));
        assert_eq!(count_zeros(Dtype::BF16, &f16s), Some(2));
        let f64s: Vec<u8> = [0.0f64, -0.0, 2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(count_zeros(Dtype::F64, &f64s), Some(2));
        assert_eq!(count_zeros(Dtype::I32, &[0; 8]), None);
    }

    #[test]
    fn large_buffers_split_across_chunks() {
        let n = (CHUNK / 4) * 3 + 7;
        let bytes: Vec<u8> = (0..n)
            .flat_map(|i| (if i % 3 == 0 { 0.0f32 } else { 1.0 }).to_le_bytes())
            .collect();
        assert_eq!(count_zeros(Dtype::F32, &bytes), Some(n.div_ceil(3) as u64));
    }
}
