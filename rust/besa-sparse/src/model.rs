//! A model on disk: a single safetensors file, or a Hugging Face directory holding
//! `model.safetensors`, a sharded `model.safetensors.index.json`, or other `*.safetensors`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::st::{StFile, TensorEntry};

/// Name of the sharded-checkpoint index written by `save_pretrained`.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// The safetensors files of a model, mapped and validated, with its config.json when present.
#[derive(Debug)]
pub struct Model {
    root: PathBuf,
    files: Vec<StFile>,
    config: Option<serde_json::Value>,
}

/// A tensor of a model: which file holds it and its header entry.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    pub file: usize,
    pub entry: &'a TensorEntry,
}

impl Model {
    /// Opens a safetensors file or a model directory. Missing paths are `NotFound`, anything
    /// malformed is a `Format` error naming the file.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_file() {
            let file = StFile::open(path)?;
            let config = path
                .parent()
                .map(|p| p.join("config.json"))
                .filter(|p| p.is_file())
                .map(|p| read_json(&p))
                .transpose()?;
            return Ok(Self {
                root: path.to_path_buf(),
                files: vec![file],
                config,
            });
        }
        if !meta.is_dir() {
            let ft = meta.file_type();
            use std::os::unix::fs::FileTypeExt;
            let what = if ft.is_fifo() {
                "a FIFO (named pipe)"
            } else if ft.is_char_device() {
                "a character device"
            } else if ft.is_block_device() {
                "a block device"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "an unsupported kind of file"
            };
            return Err(Error::format(format!(
                "{}: is {what}, not a safetensors file or a model directory",
                path.display()
            )));
        }
        let files = Self::shard_paths(path)?
            .iter()
            .map(|p| StFile::open(p))
            .collect::<Result<Vec<_>>>()?;
        let config_path = path.join("config.json");
        let config = if config_path.is_file() {
            Some(read_json(&config_path)?)
        } else {
            None
        };
        let model = Self {
            root: path.to_path_buf(),
            files,
            config,
        };
        model.check_unique_names()?;
        if path.join(INDEX_NAME).is_file() {
            model.check_index(&path.join(INDEX_NAME))?;
        }
        Ok(model)
    }

    /// The safetensors files that make up the model directory `dir`, in load order.
    pub fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
        let index = dir.join(INDEX_NAME);
        if index.is_file() {
            let map = weight_map(&index)?;
            let mut seen = HashSet::new();
            let mut out = Vec::new();
            for file in map.values() {
                if seen.insert(file.clone()) {
                    let p = dir.join(file);
                    if !p.is_file() {
                        return Err(Error::new(
                            crate::ErrorKind::NotFound,
                            format!(
                                "{}: shard {file:?} listed in {INDEX_NAME} is missing",
                                dir.display()
                            ),
                        ));
                    }
                    out.push(p);
                }
            }
            out.sort();
            return Ok(out);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(vec![single]);
        }
        let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && p.is_file())
            .filter(|p| !p.ends_with(crate::quant_file::QUANT_FILE))
            .collect();
        if out.is_empty() {
            return Err(Error::format(format!(
                "{}: no model.safetensors, {INDEX_NAME} or *.safetensors file in this directory",
                dir.display()
            )));
        }
        out.sort();
        Ok(out)
    }

    fn check_unique_names(&self) -> Result<()> {
        let mut seen: BTreeMap<&str, &Path> = BTreeMap::new();
        for f in &self.files {
            for t in f.tensors() {
                if let Some(prev) = seen.insert(&t.name, f.path()) {
                    return Err(Error::format(format!(
                        "tensor {:?} is stored twice: in {} and in {}",
                        t.name,
                        prev.display(),
                        f.path().display()
                    )));
                }
            }
        }
        Ok(())
    }

    fn check_index(&self, index: &Path) -> Result<()> {
        let map = weight_map(index)?;
        for (tensor, file) in &map {
            let found = self
                .files
                .iter()
                .find(|f| f.path().file_name().is_some_and(|n| n == file.as_str()));
            match found {
                Some(f) if f.get(tensor).is_some() => {}
                _ => {
                    return Err(Error::format(format!(
                        "{}: tensor {tensor:?} is listed in file {file:?} but is not in it",
                        index.display()
                    )))
                }
            }
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn files(&self) -> &[StFile] {
        &self.files
    }
    pub fn config(&self) -> Option<&serde_json::Value> {
        self.config.as_ref()
    }
    /// Every tensor, file by file, in file order.
    pub fn tensors(&self) -> impl Iterator<Item = TensorRef<'_>> {
        self.files.iter().enumerate().flat_map(|(i, f)| {
            f.tensors()
                .iter()
                .map(move |entry| TensorRef { file: i, entry })
        })
    }
    pub fn find(&self, name: &str) -> Option<TensorRef<'_>> {
        self.tensors().find(|t| t.entry.name == name)
    }
    pub fn data(&self, t: TensorRef<'_>) -> &[u8] {
        self.files[t.file].data(t.entry)
    }
    /// Metadata of the first file (`__metadata__` of the header).
    pub fn metadata(&self) -> BTreeMap<String, String> {
        self.files
            .first()
            .map(|f| f.metadata().clone())
            .unwrap_or_default()
    }
}

/// Reads and parses a JSON file; a malformed file is a `Format` error naming it.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::format(format!("{}: invalid JSON: {e}", path.display())))
}

/// The `weight_map` of a sharded checkpoint index, validated.
pub fn weight_map(index: &Path) -> Result<BTreeMap<String, String>> {
    let v = read_json(index)?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            Error::format(format!(
                "{}: no \"weight_map\" object in the index",
                index.display()
            ))
        })?;
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let file = v.as_str().ok_or_else(|| {
            Error::format(format!(
                "{}: weight_map entry {k:?} is not a file name",
                index.display()
            ))
        })?;
        if file.contains('/') || file.contains('\\') || file == ".." || file.is_empty() {
            return Err(Error::format(format!(
                "{}: weight_map entry {k:?} names {file:?}, which is not a plain file name",
                index.display()
            )));
        }
        out.insert(k.clone(), file.to_string());
    }
    Ok(out)
}
