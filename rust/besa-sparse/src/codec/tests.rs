//! Tests of the codecs: the kernels on worked examples and random matrices, and every codec
//! through the [`Codec`] trait (every float dtype, edge shapes, all-zero, all-kept, -0.0).

use safetensors::tensor::Dtype;

use super::csr::{csr_check, csr_encode};
use super::kernels::*;
use super::two_four::{check_24_bitmask, encode_24};
use super::*;

use proptest::prelude::*;

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn worked_example_of_the_spec() {
    let w: Vec<f32> = [
        [1.5, -2., 0., 0., 0., 0., 0., 0., 0., 3.],
        [0.; 10],
        [0., 4., 0., 0., 0., 0., 0., 0., 5., 0.],
    ]
    .concat();
    let data = f32s(&w);
    let counts = row_nnz(Dtype::F32, &data, 3, 10).unwrap();
    assert_eq!(counts, [3, 0, 2]);
    assert_eq!(prefix_offsets(&counts), (vec![0, 3, 3], 5));
    let mut mask = vec![0u8; 6];
    let mut vals = vec![0u8; 20];
    bitmask_encode(Dtype::F32, &data, 3, 10, &counts, &mut mask, &mut vals).unwrap();
    assert_eq!(mask, [3, 2, 0, 0, 2, 1]);
    assert_eq!(vals, f32s(&[1.5, -2., 3., 4., 5.]));
    let mut out = vec![0xffu8; data.len()];
    let c2 = bitmask_row_counts(&mask, 3, 10).unwrap();
    bitmask_decode(4, &mask, &vals, 10, &c2, 0..3, &mut out).unwrap();
    assert_eq!(out, data);
    let planned: usize = BITMASK
        .plan(Dtype::F32, 3, 10, 5, None)
        .iter()
        .map(|p| p.shape.iter().product::<usize>() * crate::dtype::itemsize(p.dtype))
        .sum();
    assert_eq!(planned, 16 + 20 + 6 + 24);
}

#[test]
fn signed_zero_is_zero_and_nan_is_kept() {
    let data = f32s(&[-0.0, f32::NAN, 0.0, 1.0]);
    let counts = row_nnz(Dtype::F32, &data, 1, 4).unwrap();
    assert_eq!(counts, [2]);
    let (mut m, mut v) = (vec![0u8; 1], vec![0u8; 8]);
    bitmask_encode(Dtype::F32, &data, 1, 4, &counts, &mut m, &mut v).unwrap();
    let mut out = vec![0u8; 16];
    bitmask_decode(4, &m, &v, 4, &counts, 0..1, &mut out).unwrap();
    let mut want = data.clone();
    canonical_zeros(Dtype::F32, &mut want).unwrap();
    assert_eq!(out, want);
    assert_eq!(&out[..4], &[0, 0, 0, 0]);
}

#[test]
fn padding_bits_refused() {
    assert!(bitmask_row_counts(&[0b1000_0000], 1, 7).is_err());
    assert_eq!(bitmask_row_counts(&[0b0100_0000], 1, 7).unwrap(), [1]);
    assert!(bitmask_row_counts(&[0, 0], 1, 7).is_err());
}

#[test]
fn two_four_selection_and_check() {
    let data = f32s(&[1., 0., 3., 0., 5., -6., 7., 0.]);
    assert_eq!(
        check_24(Dtype::F32, &data, 1, 8).unwrap(),
        (
            Some(Not24 {
                row: 0,
                col: 4,
                kept: 3
            }),
            1
        )
    );
    let (mut m, mut v) = (vec![0u8; 1], vec![0u8; 16]);
    encode_24(Dtype::F32, &data, 1, 8, &mut m, &mut v).unwrap();
    assert_eq!(m, [0b0110_0101]);
    assert_eq!(v, f32s(&[1., 3., -6., 7.]));
    check_24_bitmask(&m, 1, 8).unwrap();
    assert!(check_24_bitmask(&[0b1110_0101], 1, 8).is_err());
    // fewer than 2 kept: zero fillers (stored +0), first zero positions
    let data = f32s(&[0., -0.0, 0., 2.]);
    let (mut m, mut v) = (vec![0u8; 1], vec![0u8; 8]);
    encode_24(Dtype::F32, &data, 1, 4, &mut m, &mut v).unwrap();
    assert_eq!(m, [0b1001]);
    assert_eq!(v, f32s(&[0., 2.]));
}

#[test]
fn csr_checks() {
    let crow: Vec<u8> = [0i64, 2, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
    let col = |v: &[i32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    assert_eq!(csr_check(&crow, &col(&[1, 3, 0]), 2, 5, 3).unwrap(), [2, 1]);
    assert!(csr_check(&crow, &col(&[3, 1, 0]), 2, 5, 3).is_err());
    assert!(csr_check(&crow, &col(&[1, 1, 0]), 2, 5, 3).is_err());
    assert!(csr_check(&crow, &col(&[1, 5, 0]), 2, 5, 3).is_err());
    assert!(csr_check(&crow, &col(&[1, 2]), 2, 5, 2).is_err());
}

fn matrix() -> impl Strategy<Value = (usize, usize, usize, Vec<u8>)> {
    (
        0usize..12,
        0usize..40,
        prop::sample::select(vec![2usize, 4, 8]),
        0u8..=10,
    )
        .prop_flat_map(|(r, c, n, density)| {
            let elem = prop_oneof![
                (10 - density as u32) => Just(vec![0u8; 8]),
                1 => Just({ let mut z = vec![0u8; 8]; z[7] = 0x80; z }),
                (density as u32) => prop::collection::vec(any::<u8>(), 8),
            ];
            (
                Just(r),
                Just(c),
                Just(n),
                prop::collection::vec(elem, r * c),
            )
                .prop_map(move |(r, c, n, els)| {
                    let bytes = els
                        .into_iter()
                        .flat_map(|mut e| {
                            // keep the sign byte at the element's last byte
                            let sign = e[7];
                            e.truncate(n);
                            e[n - 1] = (e[n - 1] & 0x7f) | (sign & 0x80);
                            e
                        })
                        .collect();
                    (r, c, n, bytes)
                })
        })
}

fn dtype_of(n: usize) -> Dtype {
    match n {
        2 => Dtype::BF16,
        4 => Dtype::F32,
        _ => Dtype::F64,
    }
}

proptest! {
    #[test]
    fn bitmask_and_csr_roundtrip((r, c, n, data) in matrix()) {
        let dt = dtype_of(n);
        let mut want = data.clone();
        canonical_zeros(dt, &mut want).unwrap();
        let counts = row_nnz(dt, &data, r, c).unwrap();
        let nnz: u64 = counts.iter().sum();
        let (mut m, mut v) = (vec![0u8; r * c.div_ceil(8)], vec![0u8; nnz as usize * n]);
        bitmask_encode(dt, &data, r, c, &counts, &mut m, &mut v).unwrap();
        let c2 = bitmask_row_counts(&m, r, c).unwrap();
        prop_assert_eq!(&c2, &counts);
        let mut out = vec![0xaa; data.len()];
        bitmask_decode(n, &m, &v, c, &c2, 0..r, &mut out).unwrap();
        prop_assert_eq!(&out, &want);

        let (mut crow, mut col, mut vals) = (vec![0u8; (r + 1) * 8], vec![0u8; nnz as usize * 4], vec![0u8; nnz as usize * n]);
        csr_encode(dt, &data, r, c, &counts, &mut crow, &mut col, &mut vals).unwrap();
        prop_assert_eq!(&vals, &v);
        let c3 = csr_check(&crow, &col, r, c, nnz as usize).unwrap();
        let mut out = vec![0x55; data.len()];
        let parts: [&[u8]; 4] = [&[0u8; 16], &crow, &col, &vals];
        let s = Stored { dtype: dt, quant: None, rows: r, cols: c, itemsize: n, nnz: nnz as usize, parts: &parts };
        CSR.decode(&s, &c3, 0..r, &mut out).unwrap();
        prop_assert_eq!(&out, &want);
    }

    #[test]
    fn two_four_roundtrip_of_24_matrices((r, c, n, mut data) in matrix()) {
        let c4 = c - c % 4;
        data.truncate(r * c4 * n);
        let dt = dtype_of(n);
        // zero the last two of every group -> 2:4
        for g in data.chunks_mut(4 * n) { g[2 * n..].fill(0); }
        prop_assert_eq!(check_24(dt, &data, r, c4).unwrap().0, None);
        let (mut m, mut v) = (vec![0u8; r * c4.div_ceil(8)], vec![0u8; r * c4 / 2 * n]);
        encode_24(dt, &data, r, c4, &mut m, &mut v).unwrap();
        check_24_bitmask(&m, r, c4).unwrap();
        let mut out = vec![1u8; data.len()];
        bitmask_decode(n, &m, &v, c4, &vec![(c4 / 2) as u64; r], 0..r, &mut out).unwrap();
        let mut want = data.clone();
        canonical_zeros(dt, &mut want).unwrap();
        prop_assert_eq!(out, want);
    }

    #[test]
    fn decoders_never_panic_on_garbage(mask in prop::collection::vec(any::<u8>(), 0..40), r in 0usize..6, c in 0usize..40, nv in 0usize..64) {
        if let Ok(counts) = bitmask_row_counts(&mask, r, c) {
            let total: u64 = counts.iter().sum();
            let vals = vec![7u8; nv * 2];
            let mut out = vec![0u8; r * c * 2];
            let res = bitmask_decode(2, &mask, &vals, c, &counts, 0..r, &mut out);
            prop_assert_eq!(res.is_ok(), total as usize == nv);
        }
    }
}

/// A matrix of `dtype` from f32 values.
fn to_dtype(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| match dtype {
            Dtype::F32 => x.to_le_bytes().to_vec(),
            // F16: exact for the small values used here (sign, 5-bit exponent, 10-bit mantissa).
            Dtype::F16 => {
                if x == 0.0 {
                    (if x.is_sign_negative() { 0x8000u16 } else { 0 })
                        .to_le_bytes()
                        .to_vec()
                } else {
                    let b = x.to_bits();
                    let sign = ((b >> 16) & 0x8000) as u16;
                    let exp = (((b >> 23) & 0xff) as i32 - 127 + 15) as u16;
                    let man = ((b >> 13) & 0x3ff) as u16;
                    (sign | (exp << 10) | man).to_le_bytes().to_vec()
                }
            }
            Dtype::BF16 => ((x.to_bits() >> 16) as u16).to_le_bytes().to_vec(),
            _ => unreachable!(),
        })
        .collect()
}

/// Encodes through the trait, then validates, decodes (whole and by row ranges) and builds
/// the keep-mask; checks all against the dense input under the zero rule.
fn roundtrip(fmt: PackFormat, dtype: Dtype, rows: usize, cols: usize, data: &[u8]) {
    let m = Matrix {
        dtype,
        rows,
        cols,
        data,
        quant: None,
    };
    let counts = row_nnz(dtype, data, rows, cols).unwrap();
    let Admission::Pack { stored_nnz, .. } =
        fmt.admit(m, &counts, EncodeOptions::default()).unwrap()
    else {
        panic!("{fmt} refused [{rows}, {cols}]");
    };
    let plan = fmt.plan(dtype, rows, cols, stored_nnz as usize, None);
    assert_eq!(
        plan.iter().map(|p| p.suffix).collect::<Vec<_>>(),
        fmt.parts()
    );
    let mut bufs: Vec<Vec<u8>> = plan
        .iter()
        .map(|p| vec![0xa5; p.shape.iter().product::<usize>() * crate::dtype::itemsize(p.dtype)])
        .collect();
    let mut refs: Vec<&mut [u8]> = bufs.iter_mut().map(|b| &mut b[..]).collect();
    fmt.encode(m, &counts, &mut refs).unwrap();
    let infos: Vec<PartInfo<'_>> = plan
        .iter()
        .zip(&bufs)
        .map(|(p, b)| PartInfo {
            dtype: p.dtype,
            shape: &p.shape,
            nbytes: b.len(),
        })
        .collect();
    let layout = fmt.check_layout(rows, cols, &infos, None).unwrap();
    assert_eq!(layout.dtype, dtype);
    let parts: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
    let n = crate::dtype::itemsize(dtype);
    let s = Stored {
        dtype,
        quant: None,
        rows,
        cols,
        itemsize: n,
        nnz: layout.nnz,
        parts: &parts,
    };
    let stored_counts = fmt.validate(&s).unwrap();
    let mut want = data.to_vec();
    canonical_zeros(dtype, &mut want).unwrap();
    let mut out = vec![0x5a; data.len()];
    fmt.decode(&s, &stored_counts, 0..rows, &mut out).unwrap();
    assert_eq!(out, want, "{fmt} {dtype:?} [{rows}, {cols}]");
    if rows > 1 {
        let half = rows / 2;
        let mut top = vec![0x11; half * cols * n];
        fmt.decode(
            &s,
            &stored_counts,
            half..rows,
            &mut vec![0; (rows - half) * cols * n],
        )
        .unwrap();
        fmt.decode(&s, &stored_counts, 0..half, &mut top).unwrap();
        assert_eq!(&top[..], &want[..half * cols * n]);
    }
    let mut mask = vec![7u8; rows * cols];
    fmt.keep_mask(&s, &stored_counts, &mut mask).unwrap();
    let kept: Vec<u8> = data
        .chunks_exact(n)
        .map(|e| u8::from(!crate::dtype::is_zero(e)))
        .collect();
    assert_eq!(mask, kept, "{fmt} keep-mask {dtype:?} [{rows}, {cols}]");
}

#[test]
fn every_codec_round_trips_every_float_dtype_and_edge_case() {
    for fmt in all().iter().copied().filter(|f| !f.is_quantized()) {
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            for (rows, cols) in [
                (0, 0),
                (0, 8),
                (3, 0),
                (1, 4),
                (3, 8),
                (5, 12),
                (4, 16),
                (7, 36),
                (2, 9),
            ] {
                if fmt == TWO_FOUR && cols % 4 != 0 {
                    continue;
                }
                let numel = rows * cols;
                let all_zero: Vec<f32> = (0..numel)
                    .map(|i| if i % 2 == 0 { 0.0 } else { -0.0 })
                    .collect();
                let all_kept: Vec<f32> = (0..numel).map(|i| 1.0 + i as f32).collect();
                // 2 of every 4 kept (valid 2:4), with -0.0 among the dropped
                let two_four: Vec<f32> = (0..numel)
                    .map(|i| match i % 4 {
                        0 => -1.5,
                        1 => -0.0,
                        2 => 0.0,
                        _ => 2.5 + i as f32,
                    })
                    .collect();
                let mut cases = vec![all_zero, two_four];
                if fmt != TWO_FOUR {
                    cases.push(all_kept);
                }
                for v in cases {
                    roundtrip(fmt, dtype, rows, cols, &to_dtype(dtype, &v));
                }
            }
        }
    }
}

#[test]
fn registry_names_and_aliases() {
    assert_eq!(all().len(), 5);
    for f in all() {
        assert_eq!(by_name(f.name()), Some(*f));
        assert_eq!(by_name(f.config_name()), Some(*f));
        assert_eq!(by_config_name(f.config_name()), Some(*f));
        for a in f.aliases() {
            assert_eq!(PackFormat::parse(a).unwrap(), *f);
        }
        assert!(f.parts()[f.shape_part()].ends_with("shape"));
        assert!(f.parts().contains(&f.anchor()));
    }
    assert_eq!(by_name("2of4"), Some(TWO_FOUR));
    assert!(PackFormat::parse("os.system").is_err());
    assert_eq!(by_config_name("bitmask"), None);
    let json = serde_json::to_string(&TWO_FOUR).unwrap();
    assert_eq!(json, "\"2:4\"");
    assert_eq!(
        serde_json::from_str::<PackFormat>("\"sparse-bitmask\"").unwrap(),
        BITMASK
    );
}

#[test]
fn two_four_admission() {
    let d = to_dtype(Dtype::F32, &[1., 2., 3., 0., 0., 0., 0., 0.]);
    let m = Matrix {
        dtype: Dtype::F32,
        rows: 1,
        cols: 8,
        data: &d,
        quant: None,
    };
    let counts = row_nnz(Dtype::F32, &d, 1, 8).unwrap();
    let e = TWO_FOUR
        .admit(m, &counts, EncodeOptions::default())
        .unwrap_err();
    assert!(e.message.contains("row 0, columns 0..3 keep 3 of 4"), "{e}");
    let forced = TWO_FOUR
        .admit(m, &counts, EncodeOptions { force: true })
        .unwrap();
    assert_eq!(
        forced,
        Admission::Pack {
            stored_nnz: 4,
            dropped: 1
        }
    );
    let m6 = Matrix {
        dtype: Dtype::F32,
        rows: 1,
        cols: 6,
        data: &d[..24],
        quant: None,
    };
    assert!(matches!(
        TWO_FOUR.admit(m6, &[3], EncodeOptions::default()).unwrap(),
        Admission::Skip(_)
    ));
}
