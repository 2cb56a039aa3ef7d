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
