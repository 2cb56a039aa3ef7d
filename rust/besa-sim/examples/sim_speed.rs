//! Where the time of one matrix goes (no files): column degrees, the reference search and the
//! full model on an 11008 x 4096 BF16 matrix at 50%, next to one plain pass over its bytes
//! (the memory-bound floor). `RAYON_NUM_THREADS=1 cargo run --release --example sim_speed`.
use std::time::Instant;

use besa_sim::full::{simulate_full, FullParams};
use besa_sim::reference::{simulate_matrix_with_degrees, RefParams};
use besa_sim::MaskView;
use safetensors::tensor::Dtype;

fn best_of<T>(n: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..n {
        let t = Instant::now();
        let r = std::hint::black_box(f());
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(r);
    }
    (best * 1e3, out.expect("n > 0"))
}

fn main() {
    let (rows, cols) = (11008usize, 4096usize);
    let mut state = 0x1234_5678_9abc_def0u64;
    let data: Vec<u8> = (0..rows * cols)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let v = if state & 1 == 0 { 0u16 } else { 0x3f80 };
            v.to_le_bytes()
        })
        .collect();
    let view = MaskView::new(&data[..], Dtype::BF16, rows, cols).unwrap();
    let mb = data.len() as f64 / 1e6;
    let (t_sum, sum) = best_of(5, || {
        std::hint::black_box(&data[..])
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .fold(0u64, u64::wrapping_add)
    });
    let (t_deg, deg) = best_of(5, || view.column_degrees());
    let mask: Vec<u8> = data.chunks_exact(2).map(|b| (b[1] != 0) as u8).collect();
    let bool_view = MaskView::new(&mask[..], Dtype::BOOL, rows, cols).unwrap();
    let (t_bool, bool_deg) = best_of(5, || bool_view.column_degrees());
    assert_eq!(bool_deg, deg);
    let p = RefParams::default();
    let (t_ref, chunks) = best_of(5, || simulate_matrix_with_degrees(&view, &deg, false, &p));
    let (t_full, full) = best_of(3, || simulate_full(&view, &deg, &FullParams::default()));
    println!(
        "{rows} x {cols} BF16 ({mb:.0} MB), {} threads",
        rayon::current_num_threads()
    );
    println!("plain pass over the bytes: {t_sum:8.2} ms (checksum {sum:x})");
    println!("column degrees:            {t_deg:8.2} ms");
    println!("column degrees, BOOL mask: {t_bool:8.2} ms (45 MB)");
    println!(
        "reference search:          {t_ref:8.2} ms ({} evaluations, {} cycles)",
        chunks[0].evals.len(),
        chunks[0].cycles
    );
    println!(
        "full model:                {t_full:8.2} ms (decode {:.3}x)",
        full.decode.speedup
    );
}
