//! Tests of the quantized codecs (pack-quantized, bitmask-quantized) and their shared N-bit
//! kernels: hand-computed examples, round trips, hostile parts.

use safetensors::tensor::Dtype;

use super::nbit::{self, QuantInput, QuantParams};
use super::*;

use proptest::prelude::*;

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Encodes a module through the trait; returns its parts in [`Codec::parts`] order.
#[allow(clippy::too_many_arguments)]
fn encode(
    fmt: PackFormat,
    dtype: Dtype,
    rows: usize,
    cols: usize,
    q: QuantParams,
    codes: &[u8],
    scale: &[u8],
    zero: &[u8],
) -> Vec<Vec<u8>> {
    let groups = q.groups(cols).unwrap();
    let width = cols / groups;
    let counts: Vec<u64> = (0..rows)
        .map(|r| {
            (0..cols)
                .filter(|&c| codes[r * cols + c] != zero[r * groups + c / width])
                .count() as u64
        })
        .collect();
    let nnz = counts.iter().sum::<u64>() as usize;
    let plan = fmt.plan(dtype, rows, cols, nnz, Some(q));
    let mut bufs: Vec<Vec<u8>> = plan
        .iter()
        .map(|p| vec![0xee; p.shape.iter().product::<usize>() * crate::dtype::itemsize(p.dtype)])
        .collect();
    let m = Matrix {
        dtype,
        rows,
        cols,
        data: &[],
        quant: Some(QuantInput {
            params: q,
            groups,
            codes,
            scale,
            zero,
        }),
    };
    let mut outs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
    fmt.encode(m, &counts, &mut outs).unwrap();
    bufs
}

/// Layout check + validate + decode + keep-mask + quant_data of stored parts.
#[allow(clippy::type_complexity)]
fn read(
    fmt: PackFormat,
    dtype: Dtype,
    rows: usize,
    cols: usize,
    q: QuantParams,
    bufs: &[Vec<u8>],
) -> crate::Result<(Vec<u8>, Vec<u8>, QuantData)> {
    read_as(fmt, dtype, rows, cols, q, q, bufs)
}

/// [`read`] of data written with `stored` under a config that says `q`.
#[allow(clippy::type_complexity)]
fn read_as(
    fmt: PackFormat,
    dtype: Dtype,
    rows: usize,
    cols: usize,
    stored: QuantParams,
    q: QuantParams,
    bufs: &[Vec<u8>],
) -> crate::Result<(Vec<u8>, Vec<u8>, QuantData)> {
    let plan = fmt.plan(dtype, rows, cols, 0, Some(stored));
    let shapes: Vec<Vec<usize>> = plan
        .iter()
        .zip(bufs)
        .map(|(p, b)| match p.shape.len() {
            1 if p.suffix != "shape" && p.suffix != "weight_shape" => vec![b.len()],
            _ => p.shape.clone(),
        })
        .collect();
    let infos: Vec<PartInfo<'_>> = plan
        .iter()
        .zip(&shapes)
        .zip(bufs)
        .map(|((p, s), b)| PartInfo {
            dtype: p.dtype,
            shape: s,
            nbytes: b.len(),
        })
        .collect();
    let layout = fmt.check_layout(rows, cols, &infos, Some(q))?;
    assert_eq!(layout.dtype, dtype);
    let parts: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
    let s = Stored {
        dtype,
        quant: Some(q),
        rows,
        cols,
        itemsize: crate::dtype::itemsize(dtype),
        nnz: layout.nnz,
        parts: &parts,
    };
    let counts = fmt.validate(&s)?;
    let mut out = vec![0x77; rows * cols * s.itemsize];
    fmt.decode(&s, &counts, 0..rows, &mut out)?;
    let mut keep = vec![9; rows * cols];
    fmt.keep_mask(&s, &counts, &mut keep)?;
    assert_eq!(
        counts.iter().sum::<u64>(),
        keep.iter().map(|&k| u64::from(k)).sum::<u64>()
    );
    Ok((out, keep, fmt.quant_data(&s, &counts)?))
}

const Q4: QuantParams = QuantParams {
    bits: 4,
    group_size: -1,
};

#[test]
fn pack_quantized_hand_example() {
    // codes 1, 2, 3 with zero point 5 and scale 0.5: one int32 word 0x321 per row
    let (codes, zero, scale) = ([1u8, 2, 3], [5u8], f32s(&[0.5]));
    let b = encode(PACK_QUANTIZED, Dtype::F32, 1, 3, Q4, &codes, &scale, &zero);
    assert_eq!(b[0], [0x21, 0x03, 0, 0]);
    assert_eq!(b[1], scale);
    assert_eq!(b[2], [5, 0, 0, 0]);
    assert_eq!(b[3], [1, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
    let (w, keep, d) = read(PACK_QUANTIZED, Dtype::F32, 1, 3, Q4, &b).unwrap();
    assert_eq!(w, f32s(&[-2.0, -1.5, -1.0]));
    assert_eq!(keep, [1, 1, 1]);
    assert_eq!((d.codes, d.zero), (codes.to_vec(), zero.to_vec()));
}

#[test]
fn pack_quantized_fields_straddle_words() {
    // N = 3, C = 12: field 10 is bits 30..31 of word 0 and bit 0 of word 1
    let q = QuantParams {
        bits: 3,
        group_size: -1,
    };
    let mut codes = [0u8; 12];
    codes[10] = 7;
    let b = encode(
        PACK_QUANTIZED,
        Dtype::F32,
        1,
        12,
        q,
        &codes,
        &f32s(&[1.0]),
        &[0],
    );
    assert_eq!(b[0], [0, 0, 0, 0xC0, 1, 0, 0, 0]);
    let (w, keep, _) = read(PACK_QUANTIZED, Dtype::F32, 1, 12, q, &b).unwrap();
    let mut want = [0f32; 12];
    want[10] = 7.0;
    assert_eq!(w, f32s(&want));
    assert_eq!(keep.iter().position(|&k| k == 1), Some(10));
    // zero points of 33 rows at 3 bits: 99 bits, 4 words along dim 0
    let zero: Vec<u8> = (0..33).map(|r| (r % 8) as u8).collect();
    let codes = vec![0u8; 33 * 12];
    let scale = f32s(&[1.0; 33]);
    let b = encode(PACK_QUANTIZED, Dtype::F32, 33, 12, q, &codes, &scale, &zero);
    assert_eq!(b[2].len(), 16);
    let (_, _, d) = read(PACK_QUANTIZED, Dtype::F32, 33, 12, q, &b).unwrap();
    assert_eq!(d.zero, zero);
}

#[test]
fn bitmask_quantized_hand_example() {
    let q = QuantParams {
        bits: 4,
        group_size: 2,
    };
    let codes = [3u8, 3, 7, 1, 0, 2, 2, 2];
    let zero = [3u8, 1, 0, 2];
    let scale = f32s(&[1.0, 0.25, 2.0, 0.5]);
    let b = encode(
        BITMASK_QUANTIZED,
        Dtype::F32,
        2,
        4,
        q,
        &codes,
        &scale,
        &zero,
    );
    assert_eq!(b[0], [2, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(b[1], [0b0100, 0b0010]);
    assert_eq!(b[2], [0x27]);
    assert_eq!(b[4], [0x13, 0x20]);
    let (w, keep, d) = read(BITMASK_QUANTIZED, Dtype::F32, 2, 4, q, &b).unwrap();
    assert_eq!(w, f32s(&[0.0, 0.0, 1.5, 0.0, 0.0, 4.0, 0.0, 0.0]));
    assert_eq!(keep, [0, 0, 1, 0, 0, 1, 0, 0]);
    assert_eq!((d.codes, d.zero), (codes.to_vec(), zero.to_vec()));
}

#[test]
fn half_precision_dequantization_rounds_once() {
    use half::{bf16, f16};
    // (7 - 0) * scale rounded once to bf16 / f16 (nearest even of the exact f32 product)
    let s = bf16::from_f32(0.0123);
    let mut out = [0u8; 2];
    nbit::dequantize_row(Dtype::BF16, &[7], &[0], &s.to_le_bytes(), 1, &mut out);
    assert_eq!(out, bf16::from_f32(7.0 * s.to_f32()).to_le_bytes());
    let s = f16::from_f32(-0.3);
    nbit::dequantize_row(Dtype::F16, &[1], &[4], &s.to_le_bytes(), 1, &mut out);
    assert_eq!(out, f16::from_f32(-3.0 * s.to_f32()).to_le_bytes());
    // q == z is +0.0, never -0.0 (scales are positive)
    let s = f16::from_f32(0.3);
    nbit::dequantize_row(Dtype::F16, &[4], &[4], &s.to_le_bytes(), 1, &mut out);
    assert_eq!(out, [0, 0]);
}

#[test]
fn codes_out_of_range_are_refused() {
    let e = nbit::check_range(&[3, 20, 1], 4, "code").unwrap_err();
    assert_eq!(e.message, "code 20 outside 0..15 (4 bits)");
    assert!(nbit::check_range(&[15, 0], 4, "zero point").is_ok());
}

#[test]
fn hostile_quantized_parts() {
    let q = QuantParams {
        bits: 3,
        group_size: 8,
    };
    // 5 rows x 2 groups: 30 zero-point bits (padding in both layouts)
    let (rows, cols) = (5, 16);
    let zero: Vec<u8> = (0..10).map(|i| (i * 3 % 8) as u8).collect();
    let codes: Vec<u8> = (0..80).map(|i| ((i * 5 + 1) % 8) as u8).collect();
    let scale = f32s(&[0.5; 10]);
    for fmt in [PACK_QUANTIZED, BITMASK_QUANTIZED] {
        let good = encode(fmt, Dtype::F32, rows, cols, q, &codes, &scale, &zero);
        read(fmt, Dtype::F32, rows, cols, q, &good).unwrap();
        let (si, zi) = if fmt == PACK_QUANTIZED {
            (1, 2)
        } else {
            (3, 4)
        };
        // non-finite and non-positive scales
        for bad_scale in [f32::NAN, f32::INFINITY, 0.0, -1.0] {
            let mut b = good.clone();
            b[si][4..8].copy_from_slice(&bad_scale.to_le_bytes());
            let e = read(fmt, Dtype::F32, rows, cols, q, &b).unwrap_err();
            assert!(
                e.message.contains("weight_scale[1]"),
                "{fmt}: {}",
                e.message
            );
        }
        // a padding bit of the zero-point stream
        let mut b = good.clone();
        let last = b[zi].len() - 1;
        b[zi][last] |= 0x80;
        let e = read(fmt, Dtype::F32, rows, cols, q, &b).unwrap_err();
        assert!(e.message.contains("padding"), "{fmt}: {}", e.message);
        // another bit width than the data
        let q8 = QuantParams { bits: 8, ..q };
        let e = read_as(fmt, Dtype::F32, rows, cols, q, q8, &good).unwrap_err();
        assert!(
            e.message.contains("3-bit data") && e.message.contains("num_bits = 8"),
            "{fmt}: {}",
            e.message
        );
        // another group size than the data
        let q16 = QuantParams {
            group_size: 16,
            ..q
        };
        let e = read_as(fmt, Dtype::F32, rows, cols, q, q16, &good).unwrap_err();
        assert!(
            e.message.contains("group_size = 16"),
            "{fmt}: {}",
            e.message
        );
    }
    // pack-quantized: padding bits of a row, truncated rows
    let good = encode(
        PACK_QUANTIZED,
        Dtype::F32,
        rows,
        cols,
        q,
        &codes,
        &scale,
        &zero,
    );
    let mut b = good.clone();
    b[0][7] |= 0x80; // 48 bits per row: bits 48..63 of the row are padding
    let e = read(PACK_QUANTIZED, Dtype::F32, rows, cols, q, &b).unwrap_err();
    assert!(
        e.message.contains("weight_packed: padding"),
        "{}",
        e.message
    );
    // bitmask-quantized: truncated codes, padding, a stored code equal to its zero point
    let good = encode(
        BITMASK_QUANTIZED,
        Dtype::F32,
        rows,
        cols,
        q,
        &codes,
        &scale,
        &zero,
    );
    let mut b = good.clone();
    b[2].pop();
    let e = read(BITMASK_QUANTIZED, Dtype::F32, rows, cols, q, &b).unwrap_err();
    assert!(e.message.contains("codes:"), "{}", e.message);
    let nnz: u32 = good[1].iter().map(|b| b.count_ones()).sum();
    if (nnz * 3) % 8 != 0 {
        let mut b = good.clone();
        *b[2].last_mut().unwrap() |= 0x80;
        let e = read(BITMASK_QUANTIZED, Dtype::F32, rows, cols, q, &b).unwrap_err();
        assert!(e.message.contains("codes: padding"), "{}", e.message);
    }
    let mut b = good.clone();
    b[2][0] = (b[2][0] & !7) | zero[0]; // first stored code (row 0, group 0) := its zero point
    let e = read(BITMASK_QUANTIZED, Dtype::F32, rows, cols, q, &b).unwrap_err();
    assert!(e.message.contains("equals its zero point"), "{}", e.message);
    let mut b = good;
    b[1][0] ^= 0xff; // a bitmask that no longer matches the codes length
    assert!(read(BITMASK_QUANTIZED, Dtype::F32, rows, cols, q, &b).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn quantized_round_trip(
        rows in 1usize..9, groups in 1usize..4, width in 1usize..40, bits in 1u32..9,
        seed in any::<u64>(), density in 0.0f64..1.0,
    ) {
        let cols = groups * width;
        let q = QuantParams { bits, group_size: width as i64 };
        let mut x = seed | 1;
        let mut next = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x };
        let qmax = (1u64 << bits) - 1;
        let zero: Vec<u8> = (0..rows * groups).map(|_| (next() % (qmax + 1)) as u8).collect();
        let codes: Vec<u8> = (0..rows * cols).map(|i| {
            let z = zero[(i / cols) * groups + (i % cols) / width];
            if (next() % 1000) as f64 / 1000.0 < density { (next() % (qmax + 1)) as u8 } else { z }
        }).collect();
        let scale: Vec<u8> = (0..rows * groups)
            .flat_map(|i| half::bf16::from_f32(0.001 + i as f32 * 0.01).to_le_bytes()).collect();
        let mut want = vec![0u8; rows * cols * 2];
        for r in 0..rows {
            nbit::dequantize_row(Dtype::BF16, &codes[r * cols..(r + 1) * cols],
                &zero[r * groups..(r + 1) * groups], &scale[r * groups * 2..(r + 1) * groups * 2],
                width, &mut want[r * cols * 2..(r + 1) * cols * 2]);
        }
        for fmt in [PACK_QUANTIZED, BITMASK_QUANTIZED] {
            let b = encode(fmt, Dtype::BF16, rows, cols, q, &codes, &scale, &zero);
            let (w, keep, d) = read(fmt, Dtype::BF16, rows, cols, q, &b).unwrap();
            prop_assert_eq!(&w, &want);
            prop_assert_eq!(&d.codes, &codes);
            prop_assert_eq!(&d.zero, &zero);
            for (i, &k) in keep.iter().enumerate() {
                let nz = w[2 * i] != 0 || w[2 * i + 1] != 0;
                prop_assert_eq!(k == 1, nz);
            }
        }
    }
}

/// Field `i` of an LSB-first stream, bit by bit (reference of the stream kernels).
fn ref_field(data: &[u8], bits: u32, i: usize) -> u8 {
    (0..bits as usize).fold(0u8, |acc, j| {
        let b = i * bits as usize + j;
        let bit = data.get(b / 8).map_or(0, |x| (x >> (b % 8)) & 1);
        acc | (bit << j)
    })
}

/// `(q - z) * s` of one weight, converted on its own (reference of the dequantization
/// kernels, without their tables or shuffles).
fn ref_value(dtype: Dtype, q: u8, z: u8, sb: &[u8]) -> Vec<u8> {
    use half::{bf16, f16};
    let d = i32::from(q) - i32::from(z);
    match dtype {
        Dtype::BF16 => {
            let s = bf16::from_le_bytes([sb[0], sb[1]]).to_f32();
            bf16::from_f32(d as f32 * s).to_le_bytes().to_vec()
        }
        Dtype::F16 => {
            let s = f16::from_le_bytes([sb[0], sb[1]]).to_f32();
            f16::from_f32(d as f32 * s).to_le_bytes().to_vec()
        }
        Dtype::F32 => {
            let s = f32::from_le_bytes(sb.try_into().unwrap());
            (d as f32 * s).to_le_bytes().to_vec()
        }
        _ => {
            let s = f64::from_le_bytes(sb.try_into().unwrap());
            (f64::from(d) * s).to_le_bytes().to_vec()
        }
    }
}

fn scale_bytes(dtype: Dtype, v: f32) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
        Dtype::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
        Dtype::F32 => v.to_le_bytes().to_vec(),
        _ => f64::from(v).to_le_bytes().to_vec(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn streams_match_the_bit_by_bit_reference(
        bits in 1u32..9, n in 0usize..80, start in 0usize..80, seed in any::<u64>(),
    ) {
        let mut x = seed | 1;
        let mut next = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x };
        let vals: Vec<u8> = (0..n).map(|_| (next() % (1 << bits)) as u8).collect();
        let mut buf = vec![0xa5u8; nbit::stream_bytes(n, bits, 32)];
        nbit::pack_stream(&vals, bits, &mut buf);
        for (i, &v) in vals.iter().enumerate() {
            prop_assert_eq!(ref_field(&buf, bits, i), v);
        }
        prop_assert!(nbit::check_padding(&buf, bits, n, "s").is_ok());
        // any window of the stream, also past its end (read as zero)
        let len = n.saturating_sub(start.min(n)) + 3;
        let mut out = vec![0x5au8; len];
        nbit::unpack_stream(&buf, bits, start.min(n), &mut out);
        for (k, &o) in out.iter().enumerate() {
            prop_assert_eq!(o, ref_field(&buf, bits, start.min(n) + k));
        }
    }

    #[test]
    fn fused_row_check_and_dequantization_match_the_reference(
        dt in 0usize..4, groups in 1usize..4, width in 1usize..70, bits in 1u32..9,
        seed in any::<u64>(), bad in 0usize..3,
    ) {
        let dtype = [Dtype::BF16, Dtype::F16, Dtype::F32, Dtype::F64][dt];
        let n = crate::dtype::itemsize(dtype);
        let cols = groups * width;
        let mut x = seed | 1;
        let mut next = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x };
        let qmax = (1u32 << bits) - 1;
        let zero: Vec<u8> = (0..groups).map(|_| (next() % u64::from(qmax + 1)) as u8).collect();
        let mut codes: Vec<u8> = (0..cols).map(|_| (next() % u64::from(qmax + 1)) as u8).collect();
        let scale: Vec<u8> = (0..groups)
            .flat_map(|g| scale_bytes(dtype, 0.0007 + g as f32 * 0.013))
            .collect();
        let mut want = Vec::new();
        for (c, &q) in codes.iter().enumerate() {
            let g = c / width;
            want.extend(ref_value(dtype, q, zero[g], &scale[g * n..(g + 1) * n]));
        }
        let mut out = vec![0x77u8; cols * n];
        nbit::dequantize_row(dtype, &codes, &zero, &scale, width, &mut out);
        prop_assert_eq!(&out, &want);
        let kept = (0..cols).filter(|&c| codes[c] != zero[c / width]).count() as u64;
        let at = (next() as usize) % cols;
        let mut weights = want.clone();
        match bad {
            // a weight that is not the value of its code
            1 => weights[at * n] ^= 1,
            // a code above the bit width
            2 if bits < 8 => codes[at] = (qmax + 1 + (next() % u64::from(255 - qmax)) as u32) as u8,
            _ => {}
        }
        let r = nbit::check_row(dtype, &codes, &zero, &scale, width, qmax as u8, &weights);
        prop_assert_eq!(r.out_of_range, bad == 2 && bits < 8);
        if bad == 1 {
            prop_assert!(r.mismatch);
            prop_assert_eq!(r.kept, kept);
        }
        if bad == 0 {
            prop_assert_eq!(r, nbit::RowCheck { out_of_range: false, mismatch: false, kept });
        }
    }
}

#[test]
fn bf16_ties_round_to_even_in_every_kernel() {
    use half::bf16;
    // s = 1 + 2^-7: 3 * s needs one bit more than bf16 has, exactly half way (a tie, rounded
    // to the even neighbour); groups of 16 and more take the shuffle-table kernels, shorter
    // ones the scalar code
    let s = bf16::from_bits(0x3f81);
    for width in [3usize, 16, 40] {
        let zero = [6u8];
        let codes: Vec<u8> = (0..width).map(|c| [9u8, 3, 6, 15][c % 4]).collect();
        let want: Vec<u8> = codes
            .iter()
            .flat_map(|&q| bf16::from_f32((i32::from(q) - 6) as f32 * s.to_f32()).to_le_bytes())
            .collect();
        assert_eq!(
            bf16::from_f32(3.0 * s.to_f32()).to_bits(),
            0x4042,
            "a tie rounded up"
        );
        let mut out = vec![0u8; 2 * width];
        nbit::dequantize_row(
            Dtype::BF16,
            &codes,
            &zero,
            &s.to_le_bytes(),
            width,
            &mut out,
        );
        assert_eq!(out, want, "width {width}");
        let r = nbit::check_row(
            Dtype::BF16,
            &codes,
            &zero,
            &s.to_le_bytes(),
            width,
            15,
            &want,
        );
        assert!(!r.mismatch && !r.out_of_range, "width {width}");
    }
}
