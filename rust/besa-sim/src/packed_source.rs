//! Every checkpoint, plain or packed (any format of `besa_sparse::codec`), as a
//! [`MatrixSource`], read through besa-sparse's packed reader (one open, no sniffing).
//!
//! A packed matrix's keep-mask comes from its codec (`Codec::keep_mask`: the stored index and
//! the stored kept values), never from a dense decode: every stored position is marked kept
//! unless its stored value is zero (the zero fillers of 2:4, or explicit zeros some writers
//! keep), so the mask equals `W != 0` of the unpacked matrix and simulating a packed checkpoint
//! gives exactly the numbers of simulating its dense original. Tensors left dense in the
//! checkpoint are read from their values, as in a plain checkpoint.

use besa_sparse::dtype::name as dtype_name;
use besa_sparse::packed::Storage;
use besa_sparse::{PackedModel, Result};

use safetensors::tensor::Dtype;

use crate::mask::MaskView;
use crate::model::{MatrixSource, TensorMeta};

/// A checkpoint (plain or packed) read through besa-sparse's packed reader; tensors have their
/// logical (dense) names, shapes and dtypes.
pub struct PackedSource {
    pub model: PackedModel,
}

impl MatrixSource for PackedSource {
    fn describe(&self) -> String {
        self.model.model().root().display().to_string()
    }
    fn tensors(&self) -> Vec<TensorMeta> {
        self.model
            .tensors()
            .iter()
            .map(|t| TensorMeta {
                name: t.name.clone(),
                shape: t.shape.clone(),
                dtype: dtype_name(t.dtype),
            })
            .collect()
    }
    fn mask(&self, name: &str) -> Result<MaskView<'_>> {
        let t = self.model.require(name)?;
        let what = format!("tensor {name:?}");
        if t.shape.len() != 2 {
            besa_sparse::bail!(
                shape,
                "{what} has shape {:?}; the simulator needs a 2-D weight",
                t.shape
            );
        }
        let (rows, cols) = (t.shape[0], t.shape[1]);
        match &t.storage {
            Storage::Dense(l) => MaskView::new(self.model.part_data(*l), t.dtype, rows, cols)
                .map_err(|e| e.context(&what)),
            Storage::Packed(p) => {
                // Errors of keep_mask already name the file and tensor.
                let mask = self.model.keep_mask(t, p)?;
                MaskView::new(mask, Dtype::BOOL, rows, cols).map_err(|e| e.context(&what))
            }
        }
    }
    fn release(&self, name: &str) {
        if let Some(t) = self.model.get(name) {
            self.model.release(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use besa_sparse::pack::{pack, PackOptions};
    use safetensors::tensor::{Dtype, TensorView};

    use besa_sparse::codec::{PackFormat, BITMASK, CSR, TWO_FOUR};
    use besa_sparse::ErrorKind;

    use super::*;
    use crate::full::FullParams;
    use crate::model::{open_source, simulate_path, SimParams};

    /// A tiny "model" with F32 weights: rows pruned at random, some all-zero and all-dense
    /// rows, one 2:4 matrix with an all-zero row (fillers), one dense (unpruned) matrix.
    fn write_model(dir: &Path, fmt: PackFormat) {
        let two_four = fmt == TWO_FOUR;
        // CSR only pays off below ~50% density (it is copied through otherwise).
        let keep_one_in = if fmt == CSR { 4 } else { 2 };
        let mut seed = 12345u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, rows, cols, prune) in [
            (
                "model.layers.0.self_attn.q_proj.weight",
                16usize,
                24usize,
                true,
            ),
            ("model.layers.0.mlp.down_proj.weight", 8, 40, true),
            ("model.layers.1.self_attn.o_proj.weight", 12, 12, false),
        ] {
            let mut w = vec![0f32; rows * cols];
            for r in 0..rows {
                for c in 0..cols {
                    let v = (rnd() % 1000) as f32 / 100.0 + 0.5;
                    let keep = if !prune || r == 1 {
                        true
                    } else if r == 0 {
                        false
                    } else if two_four {
                        (c % 4) == (r % 3) || (c % 4) == 3
                    } else {
                        rnd() % keep_one_in == 0
                    };
                    w[r * cols + c] = if keep { v } else { 0.0 };
                }
            }
            if two_four && prune {
                // Row 1 dense in a 2:4 matrix is not allowed: make it 2:4 too.
                for c in 0..cols {
                    if c % 4 >= 2 {
                        w[cols + c] = 0.0;
                    }
                }
            }
            let bytes = w.iter().flat_map(|x| x.to_le_bytes()).collect();
            bufs.push((name.to_string(), vec![rows, cols], bytes));
        }
        let views: HashMap<String, TensorView<'_>> = bufs
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
                )
            })
            .collect();
        std::fs::create_dir_all(dir).unwrap();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    }

    #[test]
    fn packed_checkpoints_simulate_like_their_dense_original() {
        let tmp = tempfile::tempdir().unwrap();
        for fmt in [BITMASK, CSR, TWO_FOUR] {
            let dense = tmp.path().join(format!("dense-{}", fmt.name()));
            let packed = tmp.path().join(format!("packed-{}", fmt.name()));
            write_model(&dense, fmt);
            let opts = PackOptions {
                format: fmt,
                sync: false,
                ..PackOptions::default()
            };
            pack(&dense, &packed, &opts).unwrap();
            let src = open_source(&packed).unwrap();
            assert!(src.describe().ends_with(&format!("packed-{}", fmt.name())));
            let p = src.tensors();
            assert!(
                p.iter()
                    .any(|t| t.name == "model.layers.0.self_attn.q_proj.weight"
                        && t.shape == [16, 24])
            );
            let pm = PackedModel::open(&packed).unwrap();
            assert!(pm.is_packed(), "{}", fmt.name());
            assert!(pm
                .get("model.layers.0.self_attn.q_proj.weight")
                .unwrap()
                .format()
                .is_some());
            assert!(pm
                .get("model.layers.1.self_attn.o_proj.weight")
                .unwrap()
                .format()
                .is_none());
            for params in [
                SimParams::default(),
                SimParams {
                    full: Some(FullParams::default()),
                    ..SimParams::default()
                },
            ] {
                let a = simulate_path(&dense, &params).unwrap();
                let b = simulate_path(&packed, &params).unwrap();
                assert_eq!(a.matrices.len(), 3);
                assert_eq!(b.matrices.len(), 3);
                for ma in &a.matrices {
                    let mb = b.matrices.iter().find(|m| m.name == ma.name).unwrap();
                    let ja = serde_json::to_value(ma).unwrap();
                    let jb = serde_json::to_value(mb).unwrap();
                    assert!(ja == jb, "{} {}: {ja} != {jb}", fmt.name(), ma.name);
                }
            }
        }
    }

    #[test]
    fn corrupt_packed_values_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dense = tmp.path().join("d");
        let packed = tmp.path().join("p");
        write_model(&dense, BITMASK);
        let opts = PackOptions {
            sync: false,
            ..PackOptions::default()
        };
        pack(&dense, &packed, &opts).unwrap();
        let f = packed.join("model.safetensors");
        let mut bytes = std::fs::read(&f).unwrap();
        let (hlen, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let info = meta
            .info("model.layers.0.self_attn.q_proj.compressed")
            .expect("q_proj is packed");
        bytes[8 + hlen + info.data_offsets.0 + 1] ^= 0x55;
        std::fs::write(&f, bytes).unwrap();
        // Refused when opened (every packed tensor is verified up front), before any matrix
        // is simulated or any progress is reported.
        let err = open_source(&packed).err().expect("corrupt file refused");
        assert_eq!(err.kind, ErrorKind::Integrity, "{err:?}");
        assert!(err.message.contains("checksum mismatch"), "{err:?}");
    }
}
