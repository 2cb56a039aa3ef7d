//! The reader on the corrupt/hostile files kept in tests/fixtures/corrupt (shared with the
//! Python tests), plus random mutations of a valid file: always an error, never a panic.

use std::path::PathBuf;

use besa_sparse::inspect::inspect;
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
