//! The reader on the corrupt/hostile files kept in tests/fixtures/corrupt (shared with the
//! Python tests), plus random mutations of a valid file: always an error, never a panic.

use std::path::PathBuf;

use besa_sparse::inspect::inspect;
use besa_sparse::pack::{pack, PackOptions};
use besa_sparse::packed::PackedModel;
use besa_sparse::ErrorKind;
use proptest::prelude::*;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/corrupt")
}

#[test]
fn every_corrupt_fixture_is_a_format_error_naming_the_file() {
    let mut n = 0;
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let path = entry.unwrap().path();
        let err = inspect(&path).expect_err(&path.display().to_string());
        assert_eq!(err.kind, ErrorKind::Format, "{}: {}", path.display(), err);
        assert!(err
            .message
            .contains(path.file_name().unwrap().to_str().unwrap()));
        assert!(!err.message.contains('\n'));
        n += 1;
    }
    assert!(n >= 10, "expected the fixture files, found {n}");
}

fn valid_file() -> Vec<u8> {
    let header = br#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]},"__metadata__":{"format":"pt"}}"#;
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend((0..32u8).map(|i| if i % 3 == 0 { 0 } else { i }));
    out
}

#[test]
fn valid_file_reads() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ok.safetensors");
    std::fs::write(&p, valid_file()).unwrap();
    let rep = inspect(&p).unwrap();
    assert_eq!(rep.tensors.len(), 2);
    assert_eq!(rep.tensors[0].name, "a");
    assert_eq!(rep.metadata.get("format").map(String::as_str), Some("pt"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    /// Byte flips, truncations and extensions of a valid file: Ok or a clean error.
    #[test]
    fn mutated_files_never_panic(
        flips in proptest::collection::vec((0usize..200, any::<u8>()), 0..6),
        cut in 0usize..220,
        extra in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut bytes = valid_file();
        for (i, b) in flips {
            let n = bytes.len();
            bytes[i % n] = b;
        }
        bytes.truncate(cut.min(bytes.len()));
        bytes.extend(extra);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        std::fs::write(&p, &bytes).unwrap();
        if let Err(e) = inspect(&p) {
            prop_assert!(matches!(e.kind, ErrorKind::Format | ErrorKind::Io));
        }
    }
}

/// A header from (name, shape) pairs, each tensor U8 so its byte length is its element count;
/// offsets tile the data (saturating for shapes whose count overflows).
fn header_file(tensors: &[(&str, Vec<u64>)]) -> Vec<u8> {
    let mut h = String::from("{");
    let mut off = 0u64;
    for (i, (name, shape)) in tensors.iter().enumerate() {
        let n = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .unwrap_or(0)
            .min(64);
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        if i > 0 {
            h.push(',');
        }
        h.push_str(&format!(
            "\"{name}\":{{\"dtype\":\"U8\",\"shape\":[{}],\"data_offsets\":[{off},{}]}}",
            dims.join(","),
            off + n
        ));
        off += n;
    }
    h.push('}');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend(std::iter::repeat_n(7u8, off as usize));
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Issue 14, item 6: a name used twice is refused by name (never "last one wins"), and a
    /// shape whose dimensions overflow is refused even when a 0 makes its element count 0.
    #[test]
    fn duplicate_names_and_overflowing_dimensions_are_refused(
        names in proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c")], 1..4),
        shapes in proptest::collection::vec(
            proptest::collection::vec(prop_oneof![Just(0u64), Just(1), Just(3), Just(1 << 32), Just(1 << 63)], 0..4),
            4,
        ),
    ) {
        let tensors: Vec<(&str, Vec<u64>)> =
            names.iter().zip(&shapes).map(|(n, s)| (*n, s.clone())).collect();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        std::fs::write(&p, header_file(&tensors)).unwrap();
        let dup = (1..names.len()).any(|i| names[..i].contains(&names[i]));
        let overflows = |s: &Vec<u64>| {
            s.iter().try_fold(1i64, |a, &d| i64::try_from(d.max(1)).ok()?.checked_mul(a)).is_none()
        };
        let overflow = tensors.iter().any(|(_, s)| overflows(s));
        // hidden behind a 0 dimension: the byte length (0) is consistent, only the dimensions
        // are wrong
        // (asserted when every other tensor is consistent, so this is the only defect)
        let hidden_here = |s: &Vec<u64>| s.contains(&0) && overflows(s);
        let consistent = |s: &Vec<u64>| {
            s.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).is_some_and(|n| n <= 64)
        };
        let hidden = tensors.iter().any(|(_, s)| hidden_here(s))
            && tensors.iter().all(|(_, s)| hidden_here(s) || consistent(s));
        match inspect(&p) {
            Ok(_) => prop_assert!(!dup && !overflow),
            Err(e) => {
                prop_assert_eq!(e.kind, ErrorKind::Format);
                if dup {
                    prop_assert!(e.message.contains("appears twice"), "{}", e.message);
                } else if hidden {
                    prop_assert!(e.message.contains("overflow"), "{}", e.message);
                }
            }
        }
    }
}

fn packed_dir(dir: &std::path::Path) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    let vals: Vec<u8> = (0..16 * 8)
        .flat_map(|i: u32| (if i % 3 == 0 { 1.5f32 } else { 0.0 }).to_le_bytes())
        .collect();
    let t = besa_sparse::writer::PlannedTensor::new(
        "model.layers.0.mlp.up_proj.weight",
        safetensors::Dtype::F32,
        vec![16, 8],
    );
    besa_sparse::writer::write_file(&src.join("model.safetensors"), &[(t, &vals[..])], None)
        .unwrap();
    std::fs::write(src.join("config.json"), r#"{"model_type":"llama"}"#).unwrap();
    let out = dir.join("packed");
    pack(
        &src,
        &out,
        &PackOptions {
            sync: false,
            ..PackOptions::default()
        },
    )
    .unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// Issue 14, item 4: deleting any non-empty subset of a packed module's parts (all four
    /// included) is an Integrity error, never a checkpoint with one matrix fewer.
    #[test]
    fn any_missing_part_of_a_packed_module_is_an_integrity_error(drop in 1u8..16) {
        let dir = tempfile::tempdir().unwrap();
        let out = packed_dir(dir.path());
        let f = out.join("model.safetensors");
        let bytes = std::fs::read(&f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let parts = ["shape", "compressed", "bitmask", "row_offsets"];
        let keep: Vec<(besa_sparse::writer::PlannedTensor, Vec<u8>)> = parts
            .iter()
            .enumerate()
            .filter(|(i, _)| drop & (1 << i) == 0)
            .map(|(_, p)| {
                let name = format!("model.layers.0.mlp.up_proj.{p}");
                let v = st.tensor(&name).unwrap();
                (
                    besa_sparse::writer::PlannedTensor::new(name, v.dtype(), v.shape().to_vec()),
                    v.data().to_vec(),
                )
            })
            .collect();
        let md: std::collections::BTreeMap<String, String> =
            meta.metadata().clone().unwrap().into_iter().collect();
        let refs: Vec<_> = keep.iter().map(|(t, d)| (t.clone(), &d[..])).collect();
        std::fs::remove_file(&f).unwrap();
        besa_sparse::writer::write_file(&f, &refs, Some(&md)).unwrap();
        let err = PackedModel::open(&out).expect_err("incomplete module accepted");
        prop_assert_eq!(err.kind, ErrorKind::Integrity, "{}", err.message);
        prop_assert!(err.message.contains("model.layers.0.mlp.up_proj"), "{}", err.message);
    }
}
