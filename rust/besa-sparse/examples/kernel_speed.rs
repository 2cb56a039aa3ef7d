//! In-memory speed of the bitmask kernels (no files): `cargo run --release --example kernel_speed`.
use std::time::Instant;

use besa_sparse::codec::kernels::{bitmask_decode, bitmask_encode, bitmask_row_counts, row_nnz};
use safetensors::tensor::Dtype;

fn main() {
    let (rows, cols) = (11008usize, 4096usize);
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let data: Vec<u8> = (0..rows * cols)
        .flat_map(|_| {
            let r = rnd();
            let v = if r & 1 == 0 {
                0u16
            } else {
                (r >> 16) as u16 | 1
            };
            v.to_le_bytes()
        })
        .collect();
    let gb = data.len() as f64 / 1e9;
    for _ in 0..3 {
        let t = Instant::now();
        let counts = row_nnz(Dtype::BF16, &data, rows, cols).unwrap();
        let t_count = t.elapsed().as_secs_f64();
        let nnz: u64 = counts.iter().sum();
        let mut mask = vec![0u8; rows * cols.div_ceil(8)];
        let mut vals = vec![0u8; nnz as usize * 2];
        let t = Instant::now();
        bitmask_encode(
            Dtype::BF16,
            &data,
            rows,
            cols,
            &counts,
            &mut mask,
            &mut vals,
        )
        .unwrap();
        let t_enc = t.elapsed().as_secs_f64();
        let mut out = vec![0u8; data.len()];
        let t = Instant::now();
        let c2 = bitmask_row_counts(&mask, rows, cols).unwrap();
        bitmask_decode(2, &mask, &vals, cols, &c2, 0..rows, &mut out).unwrap();
        let t_dec = t.elapsed().as_secs_f64();
        assert_eq!(out, data);
        let t = Instant::now();
        let copy = data.clone();
        let t_copy = t.elapsed().as_secs_f64();
        drop(copy);
        println!("crc32 {:.2} GB/s (one thread)", crc_speed(&data));
        println!(
            "{gb:.2} GB bf16: count {:.2} GB/s, encode {:.2} GB/s, decode {:.2} GB/s, memcpy {:.2} GB/s",
            gb / t_count,
            gb / t_enc,
            gb / t_dec,
            gb / t_copy
        );
    }
}

fn crc_speed(data: &[u8]) -> f64 {
    let t = Instant::now();
    let mut h = crc32fast::Hasher::new();
    h.update(data);
    std::hint::black_box(h.finalize());
    data.len() as f64 / 1e9 / t.elapsed().as_secs_f64()
}
