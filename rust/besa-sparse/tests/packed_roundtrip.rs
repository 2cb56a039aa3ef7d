//! `cargo test` alone covers the packer and the reader: a small multi-shard checkpoint written
//! with the safetensors crate is packed in every format, read back through the packed reader
//! and unpacked; the hostile packed fixtures (shared with the Python tests) are refused with
//! the right error kind, naming the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use besa_sparse::codec::{self, kernels::canonical_zeros, PackFormat};
use besa_sparse::pack::{pack, unpack, PackOptions, UnpackOptions};
use besa_sparse::{ErrorKind, PackedModel};
use safetensors::tensor::{Dtype, TensorView};

/// (name, dtype, shape, bytes) of the test model: three block linears (one per float dtype),
/// 2:4-shaped so that every format accepts them, a norm vector and an embedding.
fn tensors() -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let mut seed = 7u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut out = Vec::new();
    for (i, (dtype, rows, cols)) in [
        (Dtype::F32, 8, 16),
        (Dtype::F16, 6, 24),
        (Dtype::BF16, 12, 32),
    ]
    .into_iter()
    .enumerate()
    {
        let n = dtype.bitsize() / 8;
        let mut bytes = vec![0u8; rows * cols * n];
        for (k, e) in bytes.chunks_exact_mut(n).enumerate() {
            // keep column 0 of every group of 8 (fits 2:4, sparse enough for CSR to pay off);
            // a -0.0 among the dropped ones
            match k % 8 {
                0 => {
                    let r = rnd();
                    e.copy_from_slice(&r.to_le_bytes()[..n]);
                    e[n - 1] = (e[n - 1] & 0x3f) | 0x30; // a normal number, never zero
                }
                1 => e[n - 1] = 0x80,
                _ => {}
            }
        }
        let name = format!("model.layers.{i}.mlp.up_proj.weight");
        out.push((name, dtype, vec![rows, cols], bytes));
    }
    out.push((
        "model.norm.weight".into(),
        Dtype::F32,
        vec![4],
        vec![1u8; 16],
    ));
    out.push((
        "model.embed_tokens.weight".into(),
        Dtype::F32,
        vec![3, 4],
        vec![2u8; 48],
    ));
    out
}

/// Writes the model as two shards with an index and a config.json.
fn write_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let ts = tensors();
    let mut weight_map = serde_json::Map::new();
    for (k, chunk) in ts.chunks(3).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", k + 1);
        let views: HashMap<String, TensorView<'_>> = chunk
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for (n, ..) in chunk {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
}

fn canonical(dtype: Dtype, bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    if besa_sparse::dtype::is_float(dtype) {
        canonical_zeros(dtype, &mut v).unwrap();
    }
    v
}

#[test]
fn pack_open_decode_unpack_round_trip_in_every_format() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("dense");
    write_model(&src);
    // the quantized formats need a quantized model: quantized_pack_round_trip
    for &fmt in codec::all().iter().filter(|f| !f.is_quantized()) {
        let packed = tmp
            .path()
            .join(format!("packed-{}", fmt.name().replace(':', "")));
        let opts = PackOptions {
            format: fmt,
            min_sparsity: 0.0,
            shard_size: 300,
            sync: false,
            ..PackOptions::default()
        };
        let report = pack(&src, &packed, &opts).unwrap();
        assert!(report.files.len() > 1, "{fmt}: expected several shards");
        assert!(packed.join("model.safetensors.index.json").is_file());
        let pm = PackedModel::open(&packed).unwrap();
        assert_eq!(pm.declared_format(), Some(fmt));
        assert_eq!(pm.verify_all().unwrap().0, 3, "{fmt}");
        for (name, dtype, shape, bytes) in tensors() {
            let t = pm.get(&name).unwrap();
            assert_eq!((t.dtype, &t.shape), (dtype, &shape));
            let packed_here = name.contains(".layers.");
            assert_eq!(t.format(), packed_here.then_some(fmt), "{fmt} {name}");
            assert_eq!(
                pm.read(&name).unwrap(),
                canonical(dtype, &bytes),
                "{fmt} {name}"
            );
        }
        let back = tmp
            .path()
            .join(format!("back-{}", fmt.name().replace(':', "")));
        let unpack_opts = UnpackOptions {
            sync: false,
            ..UnpackOptions::default()
        };
        let r = unpack(&packed, &back, &unpack_opts).unwrap();
        assert_eq!(r.format, fmt.name());
        let plain = PackedModel::open(&back).unwrap();
        assert!(!plain.is_packed());
        for (name, dtype, _, bytes) in tensors() {
            assert_eq!(plain.read(&name).unwrap(), canonical(dtype, &bytes));
        }
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(back.join("config.json")).unwrap())
                .unwrap();
        assert!(cfg.get("quantization_config").is_none());
    }
}

#[test]
fn packing_twice_and_unknown_tensors_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("dense");
    write_model(&src);
    let packed = tmp.path().join("p");
    let opts = PackOptions {
        sync: false,
        min_sparsity: 0.0,
        ..PackOptions::default()
    };
    pack(&src, &packed, &opts).unwrap();
    let err = pack(&packed, &tmp.path().join("pp"), &opts).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Format);
    assert!(err.message.contains("already a packed checkpoint"), "{err}");
    let named = PackOptions {
        tensors: Some(vec!["nope.weight".into()]),
        ..opts.clone()
    };
    let err = pack(&src, &tmp.path().join("q"), &named).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Config);
    assert!(!tmp.path().join("q").exists());
    let bad = PackOptions {
        format: PackFormat::parse("csr").unwrap(),
        force_24: true,
        ..opts
    };
    assert_eq!(
        pack(&src, &tmp.path().join("r"), &bad).unwrap_err().kind,
        ErrorKind::Config
    );
}

fn hostile() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hostile")
}

/// Opens and fully verifies a checkpoint, decoding every tensor.
fn read_all(path: &Path) -> besa_sparse::Result<()> {
    let pm = PackedModel::open(path)?;
    pm.verify_all()?;
    for t in pm.tensors() {
        pm.read(&t.name)?;
    }
    Ok(())
}

#[test]
fn every_hostile_packed_fixture_is_refused_naming_the_file() {
    let integrity = [
        "bitmask_missing_parts",
        "bitmask_anchor_missing",
        "module_listed_but_absent",
        "checksum_without_module",
        "row_offsets_missing",
        "checksum_mismatch",
        "checksum_missing",
    ];
    let mut n = 0;
    for entry in std::fs::read_dir(hostile()).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_dir() {
            continue;
        }
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let err = read_all(&path).expect_err(&name);
        let want = if integrity.contains(&name.as_str()) {
            ErrorKind::Integrity
        } else {
            ErrorKind::Format
        };
        assert_eq!(err.kind, want, "{name}: {err}");
        assert!(
            err.message.contains("model.safetensors") || err.message.contains("config.json"),
            "{name}: {err}"
        );
        assert!(!err.message.contains('\n'));
        n += 1;
    }
    assert!(n >= 25, "expected the hostile fixtures, found {n}");
}

/// A quantized model directory (F32 and BF16 linears, 3 bits, groups of 8, half the codes at
/// their zero point) with its side file; returns (module, dtype, rows, cols, codes, weight
/// bytes, zero points).
#[allow(clippy::type_complexity)]
fn write_quantized_model(
    dir: &Path,
) -> Vec<(String, Dtype, usize, usize, Vec<u8>, Vec<u8>, Vec<u8>)> {
    use besa_sparse::codec::{nbit, QuantParams};
    use besa_sparse::quant_file::{self, SideEntry, QUANT_FILE};
    std::fs::create_dir_all(dir).unwrap();
    let q = QuantParams {
        bits: 3,
        group_size: 8,
    };
    let mut seed = 11u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut mods = Vec::new();
    for (i, (dtype, rows, cols)) in [(Dtype::F32, 6, 16), (Dtype::BF16, 5, 24)]
        .into_iter()
        .enumerate()
    {
        let groups = cols / 8;
        let zero: Vec<u8> = (0..rows * groups).map(|_| (rnd() % 8) as u8).collect();
        let codes: Vec<u8> = (0..rows * cols)
            .map(|k| {
                if rnd() % 2 == 0 {
                    zero[(k / cols) * groups + (k % cols) / 8]
                } else {
                    (rnd() % 8) as u8
                }
            })
            .collect();
        let scale: Vec<u8> = (0..rows * groups)
            .flat_map(|g| {
                let s = 0.01 + g as f32 * 0.003;
                if dtype == Dtype::F32 {
                    s.to_le_bytes().to_vec()
                } else {
                    half::bf16::from_f32(s).to_le_bytes().to_vec()
                }
            })
            .collect();
        mods.push((
            format!("model.layers.{i}.mlp.up_proj"),
            dtype,
            rows,
            cols,
            codes,
            scale,
            zero,
        ));
    }
    let mut weights: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (m, dtype, rows, cols, codes, scale, zero) in &mods {
        let n = dtype.bitsize() / 8;
        let groups = cols / 8;
        let mut w = vec![0u8; rows * cols * n];
        for r in 0..*rows {
            nbit::dequantize_row(
                *dtype,
                &codes[r * cols..(r + 1) * cols],
                &zero[r * groups..(r + 1) * groups],
                &scale[r * groups * n..(r + 1) * groups * n],
                8,
                &mut w[r * cols * n..(r + 1) * cols * n],
            );
        }
        weights.push((format!("{m}.weight"), *dtype, vec![*rows, *cols], w));
    }
    weights.push((
        "model.norm.weight".into(),
        Dtype::F32,
        vec![4],
        vec![1u8; 16],
    ));
    let views: HashMap<String, TensorView<'_>> = weights
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let entries: Vec<SideEntry<'_>> = mods
        .iter()
        .map(|(m, dtype, rows, cols, codes, scale, zero)| SideEntry {
            module: m.clone(),
            rows: *rows,
            cols: *cols,
            dtype: *dtype,
            groups: cols / 8,
            codes: codes.clone(),
            scale,
            zero: zero.clone(),
        })
        .collect();
    quant_file::write(&dir.join(QUANT_FILE), q, &entries).unwrap();
    mods.into_iter()
        .zip(weights)
        .map(|((m, d, r, c, codes, _scale, z), (_, _, _, w))| (m, d, r, c, codes, w, z))
        .collect()
}

#[test]
fn quantized_pack_round_trip() {
    use besa_sparse::quant_file::{SideFile, QUANT_FILE};
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("q");
    let mods = write_quantized_model(&src);
    for fmt in [codec::PACK_QUANTIZED, codec::BITMASK_QUANTIZED] {
        let packed = tmp.path().join(format!("p-{fmt}"));
        let opts = PackOptions {
            format: fmt,
            shard_size: 200,
            sync: false,
            ..PackOptions::default()
        };
        let report = pack(&src, &packed, &opts).unwrap();
        assert!(report.files.len() > 1, "{fmt}: expected several shards");
        assert!(!packed.join(QUANT_FILE).exists());
        let pm = PackedModel::open(&packed).unwrap();
        assert_eq!(pm.declared_format(), Some(fmt));
        assert_eq!(pm.verify_all().unwrap(), (2, 2), "{fmt}");
        for (m, dtype, rows, cols, codes, w, zero) in &mods {
            let name = format!("{m}.weight");
            let t = pm.get(&name).unwrap();
            assert_eq!((t.dtype, &t.shape), (*dtype, &vec![*rows, *cols]));
            assert_eq!(&pm.read(&name).unwrap(), w, "{fmt} {name}");
            let besa_sparse::packed::Storage::Packed(p) = &t.storage else {
                panic!("{name} not packed")
            };
            let keep = pm.keep_mask(t, p).unwrap();
            let groups = cols / 8;
            for (k, &kb) in keep.iter().enumerate() {
                assert_eq!(
                    kb == 1,
                    codes[k] != zero[(k / cols) * groups + (k % cols) / 8]
                );
            }
        }
        let back = tmp.path().join(format!("u-{fmt}"));
        let uo = UnpackOptions {
            sync: false,
            ..UnpackOptions::default()
        };
        let ur = unpack(&packed, &back, &uo).unwrap();
        // the report counts the kept weights (codes that differ from their zero point), not
        // the layout's bound on them
        for (m, _, rows, cols, codes, _, zero) in &mods {
            let groups = cols / 8;
            let kept = (0..rows * cols)
                .filter(|&k| codes[k] != zero[(k / cols) * groups + (k % cols) / 8])
                .count() as u64;
            assert!(
                kept < (rows * cols) as u64,
                "{m}: the fixture has pruned weights"
            );
            let name = format!("{m}.weight");
            let line = ur.tensors.iter().find(|r| r.name == name).unwrap();
            assert_eq!(line.nnz, Some(kept), "{fmt} {name}");
            let want = 1.0 - kept as f64 / (rows * cols) as f64;
            assert!(
                (line.sparsity.unwrap() - want).abs() < 1e-12,
                "{fmt} {name}"
            );
            let packed_line = report.tensors.iter().find(|r| r.name == name).unwrap();
            assert_eq!(packed_line.nnz, Some(kept), "{fmt} {name}: pack's count");
        }
        let side = SideFile::open(&back).unwrap();
        for (m, dtype, rows, cols, codes, _, zero) in &mods {
            let qi = side.input(m, *dtype, *rows, *cols).unwrap();
            assert_eq!((qi.codes, qi.zero), (&codes[..], &zero[..]));
        }
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(back.join("config.json")).unwrap())
                .unwrap();
        assert!(cfg.get("quantization_config").is_none());
        // pack -> unpack -> pack is lossless
        let again = tmp.path().join(format!("a-{fmt}"));
        pack(&back, &again, &opts).unwrap();
        for f in &report.files {
            assert_eq!(
                std::fs::read(packed.join(&f.name)).unwrap(),
                std::fs::read(again.join(&f.name)).unwrap(),
                "{fmt} {}",
                f.name
            );
        }
    }
    // a model without the side file, and codes out of range
    let plain = tmp.path().join("plain");
    write_model(&plain);
    let opts = PackOptions {
        format: codec::PACK_QUANTIZED,
        sync: false,
        ..PackOptions::default()
    };
    let e = pack(&plain, &tmp.path().join("x"), &opts).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Format);
    assert!(e.message.contains("not quantized"), "{}", e.message);
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn checksum_of_large_parts_hashed_in_pieces_is_the_plain_crc() {
    // parts over the size hashed in parallel pieces, with lengths that are not multiples of
    // the piece size
    let a: Vec<u8> = (0..5_000_017u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let b: Vec<u8> = (0..3_100_003u32)
        .map(|i| (i.wrapping_mul(40_503) >> 7) as u8)
        .collect();
    let mut h = crc32fast::Hasher::new();
    h.update(&a);
    h.update(&[]);
    h.update(&b);
    let want = h.finalize();
    assert_eq!(besa_sparse::packed::crc_of(&[&a, &[], &b]), want);
    assert_eq!(
        besa_sparse::packed::crc_of(&[&b[..10]]),
        crc32fast::hash(&b[..10])
    );
}
