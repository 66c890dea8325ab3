//! Model weights on disk: safetensors files whose header metadata says what they are.
//!
//! A weights file is a plain safetensors file (readable by Python's `safetensors`) whose
//! `__metadata__` holds the architecture, the label names, where the weights came from and
//! the sha256 of the original checkpoint. Loading checks every key and shape and names the
//! first problem precisely, instead of failing deep inside libtorch.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Kind, Tensor};

/// Metadata keys written into the safetensors header.
const KEY_ARCHITECTURE: &str = "attrstream.architecture";
const KEY_LABELS: &str = "attrstream.labels";
const KEY_SOURCE: &str = "attrstream.source";
const KEY_SHA256: &str = "attrstream.source_sha256";
const KEY_CONFIG: &str = "attrstream.config";

/// Largest safetensors header we accept (real ones are a few hundred kB).
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// Why weights could not be read or loaded. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file could not be opened or read.
    #[error("cannot read weights file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a safetensors file.
    #[error("{path} is not a safetensors file ({reason}); convert PyTorch checkpoints with `attrstream model import`")]
    NotSafetensors {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A tensor the model needs is absent.
    #[error("weights {path} lack {count} tensor(s) the model needs, e.g. `{first}`; is this a checkpoint of the same architecture?")]
    Missing {
        /// The file.
        path: PathBuf,
        /// Number of missing keys.
        count: usize,
        /// The first missing key.
        first: String,
    },
    /// The file holds tensors the model does not have.
    #[error("weights {path} hold {count} tensor(s) the model does not have, e.g. `{first}`; is this a checkpoint of the same architecture?")]
    Unexpected {
        /// The file.
        path: PathBuf,
        /// Number of unexpected keys.
        count: usize,
        /// The first unexpected key.
        first: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{key}` in {path} has shape {found:?} but the model expects {expected:?} (a different number of classes needs `num_classes` set to match)")]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The state-dict key.
        key: String,
        /// Shape the model expects.
        expected: Vec<i64>,
        /// Shape in the file.
        found: Vec<i64>,
    },
    /// libtorch failed.
    #[error("libtorch failed on {path}: {source}")]
    Torch {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: tch::TchError,
    },
    /// The metadata is malformed.
    #[error("weights {path} have malformed metadata `{key}`: {reason}")]
    BadMetadata {
        /// The file.
        path: PathBuf,
        /// The metadata key.
        key: String,
        /// What was wrong.
        reason: String,
    },
}

/// What a weights file says about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WeightsMetadata {
    /// Model architecture, e.g. `fasterrcnn_resnet50_fpn`.
    pub architecture: Option<String>,
    /// Label names by class index (index 0 = background).
    pub labels: Option<Vec<String>>,
    /// Where the weights came from (URL, file, training run).
    pub source: Option<String>,
    /// sha256 of the original checkpoint file.
    pub source_sha256: Option<String>,
    /// Model configuration (JSON) the weights were trained with, if any.
    pub config: Option<serde_json::Value>,
}

impl WeightsMetadata {
    /// As string pairs for the safetensors header.
    fn to_header(&self) -> HashMap<String, String> {
        let mut map = HashMap::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                map.insert(k.to_string(), v);
            }
        };
        put(KEY_ARCHITECTURE, self.architecture.clone());
        put(
            KEY_LABELS,
            self.labels
                .as_ref()
                .map(|l| serde_json::Value::from(l.clone()).to_string()),
        );
        put(KEY_SOURCE, self.source.clone());
        put(KEY_SHA256, self.source_sha256.clone());
        put(KEY_CONFIG, self.config.as_ref().map(|c| c.to_string()));
        map
    }

    fn from_header(path: &Path, map: &BTreeMap<String, String>) -> Result<Self, WeightsError> {
        let json = |key: &str| -> Result<Option<serde_json::Value>, WeightsError> {
            map.get(key)
                .map(|s| {
                    serde_json::from_str(s).map_err(|e| WeightsError::BadMetadata {
                        path: path.to_path_buf(),
                        key: key.to_string(),
                        reason: e.to_string(),
                    })
                })
                .transpose()
        };
        let labels = match json(KEY_LABELS)? {
            Some(v) => Some(serde_json::from_value(v).map_err(|e| WeightsError::BadMetadata {
                path: path.to_path_buf(),
                key: KEY_LABELS.to_string(),
                reason: format!("expected a JSON list of strings: {e}"),
            })?),
            None => None,
        };
        Ok(Self {
            architecture: map.get(KEY_ARCHITECTURE).cloned(),
            labels,
            source: map.get(KEY_SOURCE).cloned(),
            source_sha256: map.get(KEY_SHA256).cloned(),
            config: json(KEY_CONFIG)?,
        })
    }
}

/// The raw JSON header of a safetensors file (length-checked), without reading the tensors:
/// what [`read_metadata`] and header-only inspections (e.g. a tensor's shape) parse.
pub fn read_header_bytes(path: &Path) -> Result<Vec<u8>, WeightsError> {
    let not_st = |reason: &str| WeightsError::NotSafetensors {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let io = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io)?);
    let mut len = [0u8; 8];
    reader
        .read_exact(&mut len)
        .map_err(|_| not_st("shorter than 8 bytes"))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER_BYTES {
        return Err(not_st("header length is implausible"));
    }
    let mut header = vec![0u8; len as usize];
    reader.read_exact(&mut header).map_err(|_| not_st("truncated header"))?;
    Ok(header)
}

/// Reads only the header of a safetensors file and returns its attrstream metadata.
pub fn read_metadata(path: &Path) -> Result<WeightsMetadata, WeightsError> {
    let not_st = |reason: &str| WeightsError::NotSafetensors {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let header = read_header_bytes(path)?;
    #[derive(Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: BTreeMap<String, String>,
    }
    let header: Header = serde_json::from_slice(&header).map_err(|e| not_st(&format!("header is not JSON: {e}")))?;
    WeightsMetadata::from_header(path, &header.metadata)
}

/// How strictly [`load_into`] matches file keys to model variables.
#[derive(Debug, Clone, Default)]
pub struct LoadPolicy {
    /// Variables whose key starts with one of these may be absent from the file (e.g. a new
    /// box predictor when fine-tuning on a new label set); they keep their initial values.
    pub allow_missing_prefixes: Vec<String>,
    /// Keys with these prefixes in the file are ignored (e.g. an old predictor).
    pub ignore_prefixes: Vec<String>,
}

/// What [`load_into`] did.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Number of tensors copied into the model.
    pub loaded: usize,
    /// Model variables left at their initial values (allowed by the policy).
    pub left_initialized: Vec<String>,
}

/// `num_batches_tracked` is a BatchNorm2d counter with no meaning for frozen batch norm.
fn is_ignorable(key: &str) -> bool {
    key.ends_with(".num_batches_tracked")
}

/// Loads a safetensors file into `vs`, checking that keys and shapes match exactly.
///
/// Both torchvision flavours load: with `BatchNorm2d` (extra `num_batches_tracked` keys,
/// ignored) and with `FrozenBatchNorm2d`. Tensors are converted to each variable's dtype and
/// device.
pub fn load_into(vs: &mut VarStore, path: &Path, policy: &LoadPolicy) -> Result<LoadReport, WeightsError> {
    let torch = |source| WeightsError::Torch {
        path: path.to_path_buf(),
        source,
    };
    // Check the header first so a non-safetensors file gets a helpful message.
    read_metadata(path)?;
    let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(path).map_err(torch)?.into_iter().collect();
    let variables = vs.variables();
    let starts = |key: &str, prefixes: &[String]| prefixes.iter().any(|p| key.starts_with(p.as_str()));

    let mut unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| !variables.contains_key(*k) && !is_ignorable(k) && !starts(k, &policy.ignore_prefixes))
        .collect();
    unexpected.sort();
    if let Some(first) = unexpected.first() {
        return Err(WeightsError::Unexpected {
            path: path.to_path_buf(),
            count: unexpected.len(),
            first: first.to_string(),
        });
    }
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    let mut missing = Vec::new();
    let mut report = LoadReport::default();
    let _guard = tch::no_grad_guard();
    for name in names {
        let var = &variables[name];
        let source = tensors.get(name).filter(|_| !starts(name, &policy.ignore_prefixes));
        match source {
            None if starts(name, &policy.allow_missing_prefixes) => report.left_initialized.push(name.clone()),
            None => missing.push(name.clone()),
            Some(src) => {
                if src.size() != var.size() {
                    return Err(WeightsError::ShapeMismatch {
                        path: path.to_path_buf(),
                        key: name.clone(),
                        expected: var.size(),
                        found: src.size(),
                    });
                }
                let src = src.to_kind(var.kind()).to_device(var.device());
                var.shallow_clone().f_copy_(&src).map_err(torch)?;
                report.loaded += 1;
            }
        }
    }
    if let Some(first) = missing.first() {
        return Err(WeightsError::Missing {
            path: path.to_path_buf(),
            count: missing.len(),
            first: first.clone(),
        });
    }
    Ok(report)
}

/// A CPU tensor in safetensors' terms.
struct TensorBytes {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &TensorBytes {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn to_bytes(t: &Tensor) -> Result<TensorBytes, String> {
    let dtype = match t.kind() {
        Kind::Float => safetensors::Dtype::F32,
        Kind::Double => safetensors::Dtype::F64,
        Kind::Half => safetensors::Dtype::F16,
        Kind::BFloat16 => safetensors::Dtype::BF16,
        Kind::Int64 => safetensors::Dtype::I64,
        Kind::Int => safetensors::Dtype::I32,
        Kind::Int16 => safetensors::Dtype::I16,
        Kind::Uint8 => safetensors::Dtype::U8,
        Kind::Int8 => safetensors::Dtype::I8,
        Kind::Bool => safetensors::Dtype::BOOL,
        other => return Err(format!("unsupported dtype {other:?}")),
    };
    let t = t.to_device(tch::Device::Cpu).contiguous();
    let numel = t.numel();
    let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel).map_err(|e| e.to_string())?;
    Ok(TensorBytes {
        dtype,
        shape: t.size().iter().map(|&d| d as usize).collect(),
        data,
    })
}

/// Writes named tensors and metadata as a safetensors file (atomically: a temporary file
/// in the same folder is renamed into place, so readers never see half a file).
pub fn save(path: &Path, tensors: &[(String, Tensor)], metadata: &WeightsMetadata) -> anyhow::Result<()> {
    use anyhow::Context;
    let owned: Vec<(String, TensorBytes)> = tensors
        .iter()
        .map(|(k, t)| {
            to_bytes(t)
                .map(|b| (k.clone(), b))
                .map_err(|e| anyhow::anyhow!("tensor `{k}`: {e}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let views: Vec<(&str, &TensorBytes)> = owned.iter().map(|(k, b)| (k.as_str(), b)).collect();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write into {}", dir.display()))?;
    safetensors::serialize_to_file(views, Some(metadata.to_header()), tmp.path())
        .with_context(|| format!("cannot write {}", path.display()))?;
    // Temporary files are private (0600); weights are read by other users and containers.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot set permissions on {}", tmp.path().display()))?;
    }
    tmp.persist(path)
        .with_context(|| format!("cannot move weights into {}", path.display()))?;
    Ok(())
}
