//! Reading PyTorch checkpoints written by `torch.save`, without Python.
//!
//! libtorch cannot read `torch.save` files from C++ (they are Python pickles), so this
//! module carries a small pickle machine that understands exactly what `torch.save` emits
//! for state dicts. It never runs code: the few Python callables a state dict needs
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, ...) are interpreted
//! here, and anything else becomes an opaque placeholder that is an error only where a
//! tensor is needed.
//!
//! Two container formats are read:
//!
//! * **zip** (PyTorch >= 1.6): `<name>/data.pkl` holds the pickle, `<name>/data/<key>`
//!   one storage each, `<name>/byteorder` the storages' byte order.
//! * **legacy** (PyTorch < 1.6, e.g. torchvision's 2019 detection checkpoints): a stream of
//!   pickles (magic number, protocol version, system info, the object, the storage keys)
//!   followed by the raw storages, each prefixed by its element count.
//!
//! Tensors come back contiguous, on the CPU, in the dtype they were saved with.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tch::{Device, Kind, Tensor};

/// The pickle that opens every legacy checkpoint: `LONG1` 0x1950a86a20f9469cfc6c, protocol 2.
const LEGACY_MAGIC: [u8; 14] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];
/// The legacy magic number's little-endian bytes (the payload of the `LONG1` above).
const LEGACY_MAGIC_NUMBER: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// The only legacy protocol version PyTorch ever wrote.
const LEGACY_PROTOCOL_VERSION: i64 = 1001;
/// Largest `data.pkl` we read into memory (real ones are a few hundred kB).
const MAX_PICKLE_BYTES: u64 = 1 << 30;
/// Most dimensions a tensor may have (libtorch's own limit is lower).
const MAX_DIMS: usize = 64;
/// Hint appended to errors about checkpoints that are not plain state dicts.
const SAVE_STATE_DICT_HINT: &str = "save the weights alone with `torch.save(model.state_dict(), path)`";

/// The container format of a `torch.save` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchFormat {
    /// The zip format of PyTorch >= 1.6.
    Zip,
    /// The pickle-stream format of PyTorch < 1.6.
    Legacy,
}

/// Why a checkpoint could not be read. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be opened or read.
    #[error("cannot read checkpoint {path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        cause: std::io::Error,
    },
    /// The file is not a `torch.save` file at all.
    #[error("{path} is not a PyTorch checkpoint ({reason}); expected a file written by `torch.save`")]
    NotCheckpoint {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The zip container is damaged.
    #[error("cannot read the zip archive {path}: {cause}; the file may be truncated, download it again")]
    Zip {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        cause: zip::result::ZipError,
    },
    /// The pickle is damaged or uses a construct this reader does not know.
    #[error("malformed pickle in {path} at byte {offset}: {reason}")]
    Pickle {
        /// The file.
        path: PathBuf,
        /// Byte offset in the pickle stream.
        offset: usize,
        /// What was wrong.
        reason: String,
    },
    /// The pickle uses an opcode this reader does not implement.
    #[error(
        "{path} uses pickle opcode {name} (0x{opcode:02x}) at byte {offset}, which attrstream does not \
         support; {SAVE_STATE_DICT_HINT}"
    )]
    UnsupportedOpcode {
        /// The file.
        path: PathBuf,
        /// The opcode byte.
        opcode: u8,
        /// Its name in Python's `pickletools`, or `unknown`.
        name: &'static str,
        /// Byte offset in the pickle stream.
        offset: usize,
    },
    /// A tensor (or the whole object) is built by a Python callable this reader does not know.
    #[error("{path}: {what} is built by `{global}`, which attrstream cannot read; {hint}")]
    UnsupportedGlobal {
        /// The file.
        path: PathBuf,
        /// What needed it, e.g. "tensor `backbone.conv1.weight`".
        what: String,
        /// The Python global, `module.name`.
        global: String,
        /// What to do instead.
        hint: String,
    },
    /// The file holds something other than a state dict.
    #[error("{path} does not hold a state dict: {reason}; {SAVE_STATE_DICT_HINT}")]
    NotStateDict {
        /// The file.
        path: PathBuf,
        /// What it holds instead.
        reason: String,
    },
    /// A tensor's storage, offset or strides do not fit together.
    #[error("tensor `{key}` in {path} is damaged: {reason}")]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The state-dict key.
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// libtorch refused to build a tensor.
    #[error("libtorch failed on tensor `{key}` of {path}: {cause}")]
    Torch {
        /// The file.
        path: PathBuf,
        /// The state-dict key.
        key: String,
        /// The underlying error.
        cause: tch::TchError,
    },
}

/// Recognises a `torch.save` file from its first bytes (at least 14 are needed for legacy).
pub fn sniff(head: &[u8]) -> Option<TorchFormat> {
    if head.starts_with(b"PK\x03\x04") {
        Some(TorchFormat::Zip)
    } else if head.starts_with(&LEGACY_MAGIC) {
        Some(TorchFormat::Legacy)
    } else {
        None
    }
}

/// Reads the state dict of a `torch.save` checkpoint (zip or legacy format).
///
/// The top-level object may be a state dict or a dict holding one under `model`,
/// `state_dict` or `model_state_dict` (as training scripts save them); entries that are
/// not tensors (epoch counters, optimizer settings, ...) are skipped. Keys keep the
/// file's order.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        cause: source,
    };
    let mut head = [0u8; LEGACY_MAGIC.len()];
    let mut file = File::open(path).map_err(io)?;
    let n = read_up_to(&mut file, &mut head).map_err(io)?;
    match sniff(&head[..n]) {
        Some(TorchFormat::Zip) => read_zip(path),
        Some(TorchFormat::Legacy) => read_legacy(path),
        None => Err(CheckpointError::NotCheckpoint {
            path: path.to_path_buf(),
            reason: if head[..n].starts_with(b"\x80") {
                "a plain pickle without tensor storages".to_string()
            } else {
                "neither a zip archive nor a legacy pickle stream".to_string()
            },
        }),
    }
}

/// Fills `buf` as far as the reader allows; returns the number of bytes read.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

// ---------------------------------------------------------------------------------------
// Containers
// ---------------------------------------------------------------------------------------

/// Where storage bytes come from.
trait StorageSource {
    /// All bytes of storage `key`.
    fn bytes(&mut self, key: &str) -> Result<&[u8], String>;
    /// Whether the storages hold big-endian numbers.
    fn big_endian(&self) -> bool;
}

/// Storages of a zip checkpoint, read on first use.
struct ZipStorages {
    archive: zip::ZipArchive<BufReader<File>>,
    prefix: String,
    big_endian: bool,
    cache: HashMap<String, Vec<u8>>,
}

impl StorageSource for ZipStorages {
    fn bytes(&mut self, key: &str) -> Result<&[u8], String> {
        if !self.cache.contains_key(key) {
            let name = format!("{}data/{key}", self.prefix);
            let mut entry = self
                .archive
                .by_name(&name)
                .map_err(|e| format!("archive entry {name}: {e}"))?;
            let mut data = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
            entry
                .read_to_end(&mut data)
                .map_err(|e| format!("archive entry {name}: {e}"))?;
            self.cache.insert(key.to_string(), data);
        }
        Ok(self.cache.get(key).map(Vec::as_slice).unwrap_or_default())
    }

    fn big_endian(&self) -> bool {
        self.big_endian
    }
}

/// Storages of a legacy checkpoint: ranges of the file, which is held in memory.
struct LegacyStorages {
    data: Vec<u8>,
    ranges: HashMap<String, std::ops::Range<usize>>,
}

impl StorageSource for LegacyStorages {
    fn bytes(&mut self, key: &str) -> Result<&[u8], String> {
        let range = self
            .ranges
            .get(key)
            .ok_or_else(|| "not among the file's storages".to_string())?;
        Ok(&self.data[range.clone()])
    }

    fn big_endian(&self) -> bool {
        // `_legacy_save` always writes little-endian numbers.
        false
    }
}

fn read_zip(path: &Path) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let zip_err = |source| CheckpointError::Zip {
        path: path.to_path_buf(),
        cause: source,
    };
    let not_ckpt = |reason: String| CheckpointError::NotCheckpoint {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        cause: source,
    })?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(zip_err)?;
    let names: Vec<String> = archive.file_names().map(str::to_string).collect();
    let prefix = names
        .iter()
        .filter_map(|n| n.strip_suffix("data.pkl"))
        .filter(|p| p.ends_with('/') && p.matches('/').count() == 1)
        .min_by_key(|p| p.len())
        .map(str::to_string)
        .ok_or_else(|| not_ckpt("a zip archive without `<name>/data.pkl`".to_string()))?;
    if names
        .iter()
        .any(|n| n == &format!("{prefix}constants.pkl") || n.starts_with(&format!("{prefix}code/")))
    {
        return Err(CheckpointError::NotStateDict {
            path: path.to_path_buf(),
            reason: "it is a TorchScript archive (`torch.jit.save`)".to_string(),
        });
    }
    let big_endian = match archive.by_name(&format!("{prefix}byteorder")) {
        Ok(mut entry) => {
            let mut order = String::new();
            entry
                .read_to_string(&mut order)
                .map_err(|e| not_ckpt(format!("unreadable `{prefix}byteorder`: {e}")))?;
            match order.trim() {
                "little" => false,
                "big" => true,
                other => return Err(not_ckpt(format!("unknown byte order `{other}`"))),
            }
        }
        Err(zip::result::ZipError::FileNotFound) => false,
        Err(e) => return Err(zip_err(e)),
    };
    let pickle = {
        let mut entry = archive.by_name(&format!("{prefix}data.pkl")).map_err(zip_err)?;
        if entry.size() > MAX_PICKLE_BYTES {
            return Err(not_ckpt(format!(
                "`{prefix}data.pkl` is implausibly large ({} bytes)",
                entry.size()
            )));
        }
        let mut data = Vec::new();
        entry.read_to_end(&mut data).map_err(|source| CheckpointError::Io {
            path: path.to_path_buf(),
            cause: source,
        })?;
        data
    };
    let mut vm = Machine::new(&pickle, 0);
    let top = vm.run().map_err(|e| e.into_error(path))?;
    let entries = state_dict_entries(path, &top)?;
    let mut source = ZipStorages {
        archive,
        prefix,
        big_endian,
        cache: HashMap::new(),
    };
    materialize(path, entries, &mut source)
}

fn read_legacy(path: &Path) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let data = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        cause: source,
    })?;
    let malformed = |offset: usize, reason: String| CheckpointError::Pickle {
        path: path.to_path_buf(),
        offset,
        reason,
    };
    let mut pos = 0;
    let next = |pos: &mut usize| -> Result<(Value, Machine<'_>), CheckpointError> {
        let mut vm = Machine::new(&data, *pos);
        let value = vm.run().map_err(|e| e.into_error(path))?;
        *pos = vm.pos;
        Ok((value, vm))
    };
    let (magic, _) = next(&mut pos)?;
    match magic {
        Value::BigInt(bytes) if bytes[..] == LEGACY_MAGIC_NUMBER => {}
        _ => return Err(malformed(0, "wrong magic number".to_string())),
    }
    let (protocol, _) = next(&mut pos)?;
    if !matches!(protocol, Value::Int(LEGACY_PROTOCOL_VERSION)) {
        return Err(malformed(
            pos,
            format!("unsupported legacy protocol version {}", protocol.describe()),
        ));
    }
    let (_sys_info, _) = next(&mut pos)?;
    let (top, vm) = next(&mut pos)?;
    let storages = vm.storages;
    let (keys, _) = next(&mut pos)?;
    let keys: Vec<String> = match &keys {
        Value::List(list) => list
            .borrow()
            .iter()
            .map(|k| match k {
                Value::Str(s) => Ok(s.to_string()),
                other => Err(malformed(
                    pos,
                    format!("storage key is {}, expected a str", other.describe()),
                )),
            })
            .collect::<Result<_, _>>()?,
        other => return Err(malformed(pos, format!("storage key list is {}", other.describe()))),
    };
    let mut ranges = HashMap::new();
    for key in keys {
        let (dtype, numel) = *storages
            .get(&key)
            .ok_or_else(|| malformed(pos, format!("storage `{key}` is listed but never referenced")))?;
        let count = data
            .get(pos..pos + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
            .ok_or_else(|| malformed(pos, format!("file ends before storage `{key}`; it is truncated")))?;
        if count != numel {
            return Err(malformed(
                pos,
                format!("storage `{key}` holds {count} elements, the pickle says {numel}"),
            ));
        }
        let start = pos + 8;
        let end = count
            .checked_mul(dtype.size() as u64)
            .and_then(|n| usize::try_from(n).ok())
            .and_then(|n| start.checked_add(n))
            .filter(|&end| end <= data.len())
            .ok_or_else(|| malformed(pos, format!("file ends inside storage `{key}`; it is truncated")))?;
        ranges.insert(key, start..end);
        pos = end;
    }
    let entries = state_dict_entries(path, &top)?;
    let mut source = LegacyStorages { data, ranges };
    materialize(path, entries, &mut source)
}

// ---------------------------------------------------------------------------------------
// From pickled objects to tensors
// ---------------------------------------------------------------------------------------

/// Keys under which training scripts nest the state dict.
const WRAPPER_KEYS: [&str; 3] = ["model", "state_dict", "model_state_dict"];

/// The tensor entries of the state dict in `top`, in file order.
fn state_dict_entries(path: &Path, top: &Value) -> Result<Vec<(String, Rc<TensorSpec>)>, CheckpointError> {
    let not_sd = |reason: String| CheckpointError::NotStateDict {
        path: path.to_path_buf(),
        reason,
    };
    let unsupported = |what: String, global: &str| CheckpointError::UnsupportedGlobal {
        path: path.to_path_buf(),
        what,
        global: global.to_string(),
        hint: SAVE_STATE_DICT_HINT.to_string(),
    };
    let mut dict = match top {
        Value::Dict(d) => d.clone(),
        Value::Object(global) => return Err(unsupported("the top-level object".to_string(), global)),
        other => return Err(not_sd(format!("the top-level object is {}", other.describe()))),
    };
    let wrapped = WRAPPER_KEYS
        .iter()
        .find_map(|k| dict.borrow().get_str(k).map(|v| (*k, v)));
    match wrapped {
        Some((_, Value::Dict(inner))) => dict = inner,
        Some((key, Value::Object(global))) => return Err(unsupported(format!("entry `{key}`"), &global)),
        _ => {}
    }
    let dict = dict.borrow();
    let mut entries = Vec::new();
    let mut skipped = Vec::new();
    for (key, value) in &dict.entries {
        let Value::Str(key) = key else {
            skipped.push(key.describe());
            continue;
        };
        match value {
            Value::Tensor(spec) => entries.push((key.to_string(), spec.clone())),
            Value::Object(global) if global.starts_with("torch.") => {
                return Err(CheckpointError::UnsupportedGlobal {
                    path: path.to_path_buf(),
                    what: format!("tensor `{key}`"),
                    global: global.to_string(),
                    hint: "only dense tensors of type float64/32/16, bfloat16, int64/32/16/8, uint8 or bool are \
                           supported (not quantized, complex, sparse, nested or meta tensors)"
                        .to_string(),
                });
            }
            _ => skipped.push(format!("`{key}`")),
        }
    }
    if !skipped.is_empty() {
        tracing::debug!(count = skipped.len(), first = %skipped[0], "skipped non-tensor state-dict entries");
    }
    if entries.is_empty() {
        let keys: Vec<String> = dict
            .entries
            .iter()
            .take(5)
            .map(|(k, _)| match k {
                Value::Str(s) => format!("`{s}`"),
                other => other.describe(),
            })
            .collect();
        return Err(not_sd(if keys.is_empty() {
            "the dict is empty".to_string()
        } else {
            format!(
                "no tensors among its entries ({}{})",
                keys.join(", "),
                if dict.entries.len() > 5 { ", ..." } else { "" }
            )
        }));
    }
    Ok(entries)
}

/// Builds every tensor from its storage.
fn materialize(
    path: &Path,
    entries: Vec<(String, Rc<TensorSpec>)>,
    source: &mut dyn StorageSource,
) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let big_endian = source.big_endian();
    entries
        .into_iter()
        .map(|(key, spec)| {
            let bad = |reason: String| CheckpointError::BadTensor {
                path: path.to_path_buf(),
                key: key.clone(),
                reason,
            };
            let bytes = source
                .bytes(&spec.storage.key)
                .map_err(|e| bad(format!("storage `{}`: {e}", spec.storage.key)))?;
            let tensor = build_tensor(bytes, &spec, big_endian).map_err(|e| match e {
                BuildError::Bad(reason) => bad(reason),
                BuildError::Torch(source) => CheckpointError::Torch {
                    path: path.to_path_buf(),
                    key: key.clone(),
                    cause: source,
                },
            })?;
            Ok((key, tensor))
        })
        .collect()
}

enum BuildError {
    Bad(String),
    Torch(tch::TchError),
}

impl From<tch::TchError> for BuildError {
    fn from(e: tch::TchError) -> Self {
        BuildError::Torch(e)
    }
}

/// One contiguous CPU tensor from the storage bytes and the tensor's view of them.
fn build_tensor(bytes: &[u8], spec: &TensorSpec, big_endian: bool) -> Result<Tensor, BuildError> {
    let bad = |s: String| BuildError::Bad(s);
    let storage = &spec.storage;
    let storage_es = storage.dtype.size() as u128;
    let es = spec.dtype.size() as u128;
    let view_start = storage.elem_offset as u128 * storage_es;
    let view_end = view_start + storage.numel as u128 * storage_es;
    if view_end > bytes.len() as u128 {
        return Err(bad(format!(
            "its storage should hold {} bytes but has {}; the file is truncated or corrupt",
            view_end,
            bytes.len()
        )));
    }
    let numel: u128 = spec.size.iter().map(|&d| d as u128).product();
    if numel == 0 {
        return Ok(Tensor::f_zeros(spec.size.as_slice(), (spec.dtype.kind(), Device::Cpu))?);
    }
    // Elements spanned by the view, from its first to its last element.
    let extent: u128 = 1 + spec
        .size
        .iter()
        .zip(&spec.stride)
        .map(|(&d, &s)| (d as u128 - 1) * s as u128)
        .sum::<u128>();
    let start = view_start + spec.offset as u128 * es;
    let end = start + extent * es;
    if end > view_end {
        return Err(bad(format!(
            "offset {} with size {:?} and stride {:?} reaches past the end of its storage ({} {} elements)",
            spec.offset,
            spec.size,
            spec.stride,
            (view_end - view_start) / es,
            spec.dtype.name()
        )));
    }
    let extent = i64::try_from(extent).map_err(|_| bad("it is too large".to_string()))?;
    let slice = &bytes[start as usize..end as usize];
    let slice: Cow<[u8]> = if big_endian != cfg!(target_endian = "big") && spec.dtype.size() > 1 {
        let mut owned = slice.to_vec();
        owned.chunks_exact_mut(spec.dtype.size()).for_each(<[u8]>::reverse);
        Cow::Owned(owned)
    } else {
        Cow::Borrowed(slice)
    };
    let flat = if spec.dtype == Dtype::Bool {
        // Any non-zero byte is true; libtorch must not see other values in a bool tensor.
        Tensor::f_from_data_size(&slice, &[extent], Kind::Uint8)?.f_ne(0)?
    } else {
        Tensor::f_from_data_size(&slice, &[extent], spec.dtype.kind())?
    };
    Ok(flat
        .f_as_strided(spec.size.as_slice(), spec.stride.as_slice(), 0)?
        .f_contiguous()?)
}

// ---------------------------------------------------------------------------------------
// Pickle values
// ---------------------------------------------------------------------------------------

/// Element types of tensor storages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    /// From a storage class name such as `FloatStorage`.
    fn from_storage_class(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => Dtype::F64,
            "FloatStorage" => Dtype::F32,
            "HalfStorage" => Dtype::F16,
            "BFloat16Storage" => Dtype::BF16,
            "LongStorage" => Dtype::I64,
            "IntStorage" => Dtype::I32,
            "ShortStorage" => Dtype::I16,
            "CharStorage" => Dtype::I8,
            "ByteStorage" | "UntypedStorage" => Dtype::U8,
            "BoolStorage" => Dtype::Bool,
            _ => return None,
        })
    }

    /// From a `torch.<dtype>` attribute name such as `float32`.
    fn from_dtype_name(name: &str) -> Option<Self> {
        Some(match name {
            "float64" | "double" => Dtype::F64,
            "float32" | "float" => Dtype::F32,
            "float16" | "half" => Dtype::F16,
            "bfloat16" => Dtype::BF16,
            "int64" | "long" => Dtype::I64,
            "int32" | "int" => Dtype::I32,
            "int16" | "short" => Dtype::I16,
            "int8" => Dtype::I8,
            "uint8" => Dtype::U8,
            "bool" => Dtype::Bool,
            _ => return None,
        })
    }

    fn kind(self) -> Kind {
        match self {
            Dtype::F64 => Kind::Double,
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::I64 => Kind::Int64,
            Dtype::I32 => Kind::Int,
            Dtype::I16 => Kind::Int16,
            Dtype::I8 => Kind::Int8,
            Dtype::U8 => Kind::Uint8,
            Dtype::Bool => Kind::Bool,
        }
    }

    fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Dtype::F64 => "float64",
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::BF16 => "bfloat16",
            Dtype::I64 => "int64",
            Dtype::I32 => "int32",
            Dtype::I16 => "int16",
            Dtype::I8 => "int8",
            Dtype::U8 => "uint8",
            Dtype::Bool => "bool",
        }
    }
}

/// A storage (or, in legacy files, a view of one) referenced by a persistent id.
#[derive(Debug)]
struct StorageRef {
    /// The storage's key: its file name in a zip archive, its id in a legacy file.
    key: String,
    dtype: Dtype,
    /// Elements of `dtype` visible through this reference.
    numel: u64,
    /// First visible element (non-zero only for legacy storage views).
    elem_offset: u64,
}

/// A tensor as the pickle describes it; its data is read later.
#[derive(Debug)]
struct TensorSpec {
    storage: Rc<StorageRef>,
    dtype: Dtype,
    /// In elements of `dtype`, from the start of the storage reference.
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

/// A Python global (`module.name`) named by `GLOBAL` or `STACK_GLOBAL`.
#[derive(Debug)]
struct Global {
    module: String,
    name: String,
}

/// Keys of Python dicts that can be looked up (the hashable values that occur in state dicts).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum DictKey {
    Str(Rc<str>),
    Int(i64),
    Bool(bool),
    None,
}

/// A Python dict: insertion-ordered entries, plus an index for replacing existing keys.
#[derive(Debug, Default)]
struct Dict {
    entries: Vec<(Value, Value)>,
    index: HashMap<DictKey, usize>,
}

impl Dict {
    fn insert(&mut self, key: Value, value: Value) {
        match key.dict_key() {
            Some(k) => match self.index.get(&k) {
                Some(&i) => self.entries[i].1 = value,
                None => {
                    self.index.insert(k, self.entries.len());
                    self.entries.push((key, value));
                }
            },
            None => self.entries.push((key, value)),
        }
    }

    fn get_str(&self, key: &str) -> Option<Value> {
        self.index
            .get(&DictKey::Str(Rc::from(key)))
            .map(|&i| self.entries[i].1.clone())
    }
}

/// A value on the pickle machine's stack.
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer beyond i64, as little-endian two's-complement bytes.
    BigInt(Rc<[u8]>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<[Value]>),
    /// Lists and sets.
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Dict>>),
    Global(Rc<Global>),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorSpec>),
    /// Something built by a Python callable this reader does not interpret, named by it.
    Object(Rc<str>),
}

impl Value {
    fn dict_key(&self) -> Option<DictKey> {
        Some(match self {
            Value::Str(s) => DictKey::Str(s.clone()),
            Value::Int(i) => DictKey::Int(*i),
            Value::Bool(b) => DictKey::Bool(*b),
            Value::None => DictKey::None,
            _ => return None,
        })
    }

    /// A short description for error messages.
    fn describe(&self) -> String {
        match self {
            Value::None => "None".to_string(),
            Value::Bool(b) => format!("the bool {b}"),
            Value::Int(i) => format!("the int {i}"),
            Value::BigInt(_) => "a big int".to_string(),
            Value::Float(f) => format!("the float {f}"),
            Value::Str(s) => format!("the str {s:?}"),
            Value::Bytes(b) => format!("a bytes object of {} bytes", b.len()),
            Value::Tuple(t) => format!("a tuple of {}", t.len()),
            Value::List(l) => format!("a list of {}", l.borrow().len()),
            Value::Dict(d) => format!("a dict of {}", d.borrow().entries.len()),
            Value::Global(g) => format!("the global `{}.{}`", g.module, g.name),
            Value::Storage(_) => "a storage".to_string(),
            Value::Tensor(_) => "a tensor".to_string(),
            Value::Object(name) => format!("a `{name}` object"),
        }
    }

    fn as_int(&self, what: &str) -> Result<i64, String> {
        match self {
            Value::Int(i) => Ok(*i),
            Value::Bool(b) => Ok(i64::from(*b)),
            other => Err(format!("{what} is {}, expected an int", other.describe())),
        }
    }

    fn as_ints(&self, what: &str) -> Result<Vec<i64>, String> {
        let items: Vec<Value> = match self {
            Value::Tuple(t) => t.to_vec(),
            Value::List(l) => l.borrow().clone(),
            other => return Err(format!("{what} is {}, expected a tuple of ints", other.describe())),
        };
        items.iter().map(|v| v.as_int(what)).collect()
    }
}

// ---------------------------------------------------------------------------------------
// The pickle machine
// ---------------------------------------------------------------------------------------

/// A pickle-machine failure, before the file path is known.
enum VmError {
    Malformed { offset: usize, reason: String },
    Opcode { offset: usize, opcode: u8 },
}

impl VmError {
    fn into_error(self, path: &Path) -> CheckpointError {
        match self {
            VmError::Malformed { offset, reason } => CheckpointError::Pickle {
                path: path.to_path_buf(),
                offset,
                reason,
            },
            VmError::Opcode { offset, opcode } => CheckpointError::UnsupportedOpcode {
                path: path.to_path_buf(),
                opcode,
                name: opcode_name(opcode),
                offset,
            },
        }
    }
}

/// Names of pickle opcodes (Python's `pickletools`), for error messages.
fn opcode_name(op: u8) -> &'static str {
    match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

/// Runs one pickle from a byte slice.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed, for error messages.
    op_start: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    /// Every storage referenced by a persistent id: key -> (dtype, element count).
    storages: HashMap<String, (Dtype, u64)>,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Self {
            data,
            pos,
            op_start: pos,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            storages: HashMap::new(),
        }
    }

    fn err(&self, reason: impl Into<String>) -> VmError {
        VmError::Malformed {
            offset: self.op_start,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], VmError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let bytes = &self.data[self.pos..end];
                self.pos = end;
                Ok(bytes)
            }
            None => Err(self.err("unexpected end of data; the file is truncated")),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], VmError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn len_u32(&mut self) -> Result<usize, VmError> {
        Ok(u32::from_le_bytes(self.array()?) as usize)
    }

    fn len_u64(&mut self) -> Result<usize, VmError> {
        usize::try_from(u64::from_le_bytes(self.array()?)).map_err(|_| self.err("length does not fit in memory"))
    }

    /// A text argument up to the next newline (protocol 0 opcodes).
    fn line(&mut self) -> Result<&'a str, VmError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("unterminated text argument"))?;
        let line = std::str::from_utf8(&rest[..n]).map_err(|_| self.err("text argument is not UTF-8"))?;
        self.pos += n + 1;
        Ok(line)
    }

    fn utf8(&self, bytes: &[u8]) -> Result<Value, VmError> {
        std::str::from_utf8(bytes)
            .map(|s| Value::Str(Rc::from(s)))
            .map_err(|_| self.err("string is not UTF-8"))
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn pop(&mut self) -> Result<Value, VmError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&self) -> Result<&Value, VmError> {
        self.stack.last().ok_or_else(|| self.err("stack underflow"))
    }

    /// Pops everything above the last mark, and the mark.
    fn pop_mark(&mut self) -> Result<Vec<Value>, VmError> {
        let mark = self.marks.pop().ok_or_else(|| self.err("no MARK on the stack"))?;
        Ok(self.stack.split_off(mark))
    }

    fn memo_get(&self, index: u64) -> Result<Value, VmError> {
        self.memo
            .get(&index)
            .cloned()
            .ok_or_else(|| self.err(format!("memo entry {index} was never stored")))
    }

    fn memo_put(&mut self, index: u64) -> Result<(), VmError> {
        let v = self.top()?.clone();
        self.memo.insert(index, v);
        Ok(())
    }

    fn int_from_le(&self, bytes: &[u8]) -> Value {
        if bytes.is_empty() {
            return Value::Int(0);
        }
        if bytes.len() <= 8 {
            let negative = bytes[bytes.len() - 1] & 0x80 != 0;
            let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
            buf[..bytes.len()].copy_from_slice(bytes);
            Value::Int(i64::from_le_bytes(buf))
        } else {
            Value::BigInt(Rc::from(bytes))
        }
    }

    fn append_items(&self, target: &Value, items: Vec<Value>) -> Result<(), VmError> {
        match target {
            Value::List(list) => {
                list.borrow_mut().extend(items);
                Ok(())
            }
            Value::Object(_) => Ok(()),
            other => Err(self.err(format!("cannot append to {}", other.describe()))),
        }
    }

    fn set_items(&self, target: &Value, items: Vec<Value>) -> Result<(), VmError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err("odd number of items for SETITEMS"));
        }
        match target {
            Value::Dict(dict) => {
                let mut dict = dict.borrow_mut();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    dict.insert(k, v);
                }
                Ok(())
            }
            Value::Object(_) => Ok(()),
            other => Err(self.err(format!("cannot set items on {}", other.describe()))),
        }
    }

    /// Runs until `STOP` and returns the pickled object.
    fn run(&mut self) -> Result<Value, VmError> {
        loop {
            self.op_start = self.pos;
            let op = self.take(1)?[0];
            match op {
                0x80 => {
                    let proto = self.take(1)?[0];
                    if proto > 5 {
                        return Err(self.err(format!("pickle protocol {proto} is newer than 5")));
                    }
                }
                0x95 => {
                    self.take(8)?;
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v);
                }
                // Numbers.
                b'J' => {
                    let v = i32::from_le_bytes(self.array()?);
                    self.push(Value::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.take(1)?[0];
                    self.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.array()?);
                    self.push(Value::Int(i64::from(v)));
                }
                0x8a => {
                    let n = self.take(1)?[0] as usize;
                    let bytes = self.take(n)?;
                    let v = self.int_from_le(bytes);
                    self.push(v);
                }
                0x8b => {
                    let n = i32::from_le_bytes(self.array()?);
                    let n = usize::try_from(n).map_err(|_| self.err("negative LONG4 length"))?;
                    let bytes = self.take(n)?;
                    let v = self.int_from_le(bytes);
                    self.push(v);
                }
                b'I' => {
                    let line = self.line()?;
                    let v = match line {
                        "00" => Value::Bool(false),
                        "01" => Value::Bool(true),
                        s => Value::Int(s.trim().parse().map_err(|_| self.err(format!("bad INT {s:?}")))?),
                    };
                    self.push(v);
                }
                b'L' => {
                    let line = self.line()?;
                    let s = line.trim().trim_end_matches('L');
                    let v = s
                        .parse()
                        .map_err(|_| self.err(format!("LONG {line:?} is not a 64-bit int")))?;
                    self.push(Value::Int(v));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.array()?);
                    self.push(Value::Float(v));
                }
                b'F' => {
                    let line = self.line()?;
                    let v = line
                        .trim()
                        .parse()
                        .map_err(|_| self.err(format!("bad FLOAT {line:?}")))?;
                    self.push(Value::Float(v));
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                // Strings and bytes.
                b'X' => {
                    let n = self.len_u32()?;
                    let v = self.take(n)?;
                    let v = self.utf8(v)?;
                    self.push(v);
                }
                0x8c => {
                    let n = self.take(1)?[0] as usize;
                    let v = self.take(n)?;
                    let v = self.utf8(v)?;
                    self.push(v);
                }
                0x8d => {
                    let n = self.len_u64()?;
                    let v = self.take(n)?;
                    let v = self.utf8(v)?;
                    self.push(v);
                }
                // Python 2 `str`: bytes that are text in practice.
                b'T' => {
                    let n = self.len_u32()?;
                    let v = self.take(n)?;
                    self.push(Value::Str(Rc::from(String::from_utf8_lossy(v).as_ref())));
                }
                b'U' => {
                    let n = self.take(1)?[0] as usize;
                    let v = self.take(n)?;
                    self.push(Value::Str(Rc::from(String::from_utf8_lossy(v).as_ref())));
                }
                b'B' => {
                    let n = self.len_u32()?;
                    let v = self.take(n)?;
                    self.push(Value::Bytes(Rc::from(v)));
                }
                b'C' => {
                    let n = self.take(1)?[0] as usize;
                    let v = self.take(n)?;
                    self.push(Value::Bytes(Rc::from(v)));
                }
                0x8e | 0x96 => {
                    let n = self.len_u64()?;
                    let v = self.take(n)?;
                    self.push(Value::Bytes(Rc::from(v)));
                }
                // Containers.
                b')' => self.push(Value::Tuple(Rc::from(Vec::new()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(Rc::from(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let floor = self.marks.last().copied().unwrap_or(0);
                    if self.stack.len() < floor + n {
                        return Err(self.err("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Value::Tuple(Rc::from(items)));
                }
                b']' | 0x8f => self.push(Value::List(Rc::default())),
                b'l' | 0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append_items(self.top()?, vec![v])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    self.append_items(self.top()?, items)?;
                }
                b'}' => self.push(Value::Dict(Rc::default())),
                b'd' => {
                    let items = self.pop_mark()?;
                    let dict = Value::Dict(Rc::default());
                    self.set_items(&dict, items)?;
                    self.push(dict);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(self.top()?, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(self.top()?, items)?;
                }
                // Memo.
                b'q' => {
                    let i = self.take(1)?[0];
                    self.memo_put(u64::from(i))?;
                }
                b'r' => {
                    let i = u32::from_le_bytes(self.array()?);
                    self.memo_put(u64::from(i))?;
                }
                b'p' => {
                    let line = self.line()?;
                    let i = line
                        .trim()
                        .parse()
                        .map_err(|_| self.err(format!("bad PUT index {line:?}")))?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.take(1)?[0];
                    let v = self.memo_get(u64::from(i))?;
                    self.push(v);
                }
                b'j' => {
                    let i = u32::from_le_bytes(self.array()?);
                    let v = self.memo_get(u64::from(i))?;
                    self.push(v);
                }
                b'g' => {
                    let line = self.line()?;
                    let i = line
                        .trim()
                        .parse()
                        .map_err(|_| self.err(format!("bad GET index {line:?}")))?;
                    let v = self.memo_get(i)?;
                    self.push(v);
                }
                // Objects.
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.push(Value::Global(Rc::new(Global { module, name })));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(module), Value::Str(name)) => self.push(Value::Global(Rc::new(Global {
                            module: module.to_string(),
                            name: name.to_string(),
                        }))),
                        _ => return Err(self.err("STACK_GLOBAL needs two strs")),
                    }
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(&callable, &args)?;
                    self.push(v);
                }
                0x92 => {
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(&callable, &args)?;
                    self.push(v);
                }
                b'b' => {
                    // Object state (e.g. a state dict's `_metadata`, a tensor's hooks) is
                    // not needed to read weights.
                    let _state = self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(&pid)?;
                    self.push(v);
                }
                _ => {
                    return Err(VmError::Opcode {
                        offset: self.op_start,
                        opcode: op,
                    })
                }
            }
        }
    }

    /// Resolves a `torch.save` persistent id: `('storage', type, key, location, numel[, view])`.
    fn persistent_load(&mut self, pid: &Value) -> Result<Value, VmError> {
        let Value::Tuple(items) = pid else {
            return Err(self.err(format!("persistent id is {}, expected a tuple", pid.describe())));
        };
        match items.first() {
            Some(Value::Str(tag)) if &**tag == "storage" => {}
            Some(Value::Str(tag)) if &**tag == "module" => {
                // An `nn.Module` class with its source code (whole-model saves): keep the
                // class, so that what it builds is named after it.
                return Ok(match items.get(1) {
                    Some(class @ Value::Global(_)) => class.clone(),
                    _ => Value::Object(Rc::from("torch.nn.Module")),
                });
            }
            _ => return Err(self.err(format!("unknown persistent id {}", pid.describe()))),
        }
        if items.len() < 5 {
            return Err(self.err(format!(
                "storage persistent id has {} fields, expected 5 or 6",
                items.len()
            )));
        }
        let dtype = match &items[1] {
            Value::Global(g) => match Dtype::from_storage_class(&g.name) {
                Some(dtype) if g.module == "torch" || g.module == "torch.cuda" => dtype,
                // Quantized, complex, float8, ... storages: tensors built from them are
                // reported by name where a state-dict entry needs them.
                _ => return Ok(Value::Object(Rc::from(format!("{}.{}", g.module, g.name)))),
            },
            other => return Err(self.err(format!("storage type is {}", other.describe()))),
        };
        let key = match &items[2] {
            Value::Str(s) => s.to_string(),
            other => return Err(self.err(format!("storage key is {}", other.describe()))),
        };
        let numel = u64::try_from(items[4].as_int("storage size").map_err(|e| self.err(e))?)
            .map_err(|_| self.err("negative storage size"))?;
        match self.storages.get(&key) {
            Some(&(d, n)) if d != dtype || n != numel => {
                return Err(self.err(format!(
                    "storage `{key}` is referenced with two different types or sizes"
                )))
            }
            _ => {
                self.storages.insert(key.clone(), (dtype, numel));
            }
        }
        let (elem_offset, numel) = match items.get(5) {
            None | Some(Value::None) => (0, numel),
            // Legacy storage view: (view_key, offset, size) in elements of the root storage.
            Some(Value::Tuple(view)) if view.len() == 3 => {
                let offset = view[1].as_int("storage view offset").map_err(|e| self.err(e))?;
                let size = view[2].as_int("storage view size").map_err(|e| self.err(e))?;
                let (offset, size) = (
                    u64::try_from(offset).map_err(|_| self.err("negative view offset"))?,
                    u64::try_from(size).map_err(|_| self.err("negative view size"))?,
                );
                if offset.checked_add(size).is_none_or(|end| end > numel) {
                    return Err(self.err(format!("storage view of `{key}` reaches past its end")));
                }
                (offset, size)
            }
            Some(other) => return Err(self.err(format!("storage view is {}", other.describe()))),
        };
        Ok(Value::Storage(Rc::new(StorageRef {
            key,
            dtype,
            numel,
            elem_offset,
        })))
    }

    /// Applies `callable` to `args` for the callables state dicts use; anything else
    /// yields an opaque object named after the callable.
    fn call(&mut self, callable: &Value, args: &Value) -> Result<Value, VmError> {
        let global = match callable {
            Value::Global(g) => g,
            Value::Object(name) => return Ok(Value::Object(name.clone())),
            other => return Err(self.err(format!("cannot call {}", other.describe()))),
        };
        let args: Vec<Value> = match args {
            Value::Tuple(t) => t.to_vec(),
            other => return Err(self.err(format!("call arguments are {}, expected a tuple", other.describe()))),
        };
        let arity = |n: usize| -> Result<(), VmError> {
            if args.len() < n {
                Err(self.err(format!(
                    "`{}.{}` needs {n} arguments, got {}",
                    global.module,
                    global.name,
                    args.len()
                )))
            } else {
                Ok(())
            }
        };
        match (global.module.as_str(), global.name.as_str()) {
            ("collections", "OrderedDict") | ("builtins" | "__builtin__", "dict") => {
                let dict = Value::Dict(Rc::default());
                if let Some(pairs) = args.first() {
                    let pairs: Vec<Value> = match pairs {
                        Value::List(l) => l.borrow().clone(),
                        Value::Tuple(t) => t.to_vec(),
                        other => return Err(self.err(format!("dict argument is {}", other.describe()))),
                    };
                    let mut items = Vec::with_capacity(pairs.len() * 2);
                    for pair in pairs {
                        match pair {
                            Value::Tuple(kv) if kv.len() == 2 => items.extend(kv.iter().cloned()),
                            other => return Err(self.err(format!("dict item is {}", other.describe()))),
                        }
                    }
                    self.set_items(&dict, items)?;
                }
                Ok(dict)
            }
            ("torch._utils", "_rebuild_tensor" | "_rebuild_tensor_v2") => {
                arity(4)?;
                self.rebuild_tensor(&args[0], &args[1], &args[2], &args[3], None)
            }
            ("torch._utils", "_rebuild_tensor_v3") => {
                arity(7)?;
                self.rebuild_tensor(&args[0], &args[1], &args[2], &args[3], Some(&args[6]))
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                arity(1)?;
                Ok(args[0].clone())
            }
            ("torch._tensor", "_rebuild_from_type_v2") => {
                arity(3)?;
                self.call(&args[0], &args[2])
            }
            ("torch", "Size") => {
                arity(1)?;
                Ok(args[0].clone())
            }
            (module, name) => Ok(Value::Object(Rc::from(format!("{module}.{name}")))),
        }
    }

    fn rebuild_tensor(
        &self,
        storage: &Value,
        offset: &Value,
        size: &Value,
        stride: &Value,
        dtype: Option<&Value>,
    ) -> Result<Value, VmError> {
        let storage = match storage {
            Value::Storage(s) => s.clone(),
            Value::Object(name) => return Ok(Value::Object(name.clone())),
            other => return Err(self.err(format!("tensor storage is {}", other.describe()))),
        };
        let dtype = match dtype {
            None => storage.dtype,
            Some(Value::Global(g)) if g.module == "torch" => Dtype::from_dtype_name(&g.name)
                .ok_or_else(|| self.err(format!("unsupported tensor dtype `torch.{}`", g.name)))?,
            Some(other) => return Err(self.err(format!("tensor dtype is {}", other.describe()))),
        };
        let offset = offset.as_int("storage offset").map_err(|e| self.err(e))?;
        let size = size.as_ints("tensor size").map_err(|e| self.err(e))?;
        let stride = stride.as_ints("tensor stride").map_err(|e| self.err(e))?;
        if size.len() != stride.len() {
            return Err(self.err(format!("tensor size {size:?} and stride {stride:?} differ in length")));
        }
        if size.len() > MAX_DIMS {
            return Err(self.err(format!("tensor has {} dimensions", size.len())));
        }
        if offset < 0 || size.iter().any(|&d| d < 0) || stride.iter().any(|&s| s < 0) {
            return Err(self.err(format!(
                "negative tensor offset, size or stride ({offset}, {size:?}, {stride:?})"
            )));
        }
        Ok(Value::Tensor(Rc::new(TensorSpec {
            storage,
            dtype,
            offset,
            size,
            stride,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<Value, VmError> {
        Machine::new(bytes, 0).run()
    }

    #[test]
    fn ints_and_containers() {
        // {'a': [1, -2, 300], 'b': (True, None)} in protocol 2, hand-assembled.
        let pickle =
            b"\x80\x02}q\x00(X\x01\x00\x00\x00a]q\x01(K\x01J\xfe\xff\xff\xffM,\x01eX\x01\x00\x00\x00b\x88N\x86u.";
        let Ok(Value::Dict(d)) = run(pickle) else {
            panic!("expected a dict")
        };
        let d = d.borrow();
        assert_eq!(d.entries.len(), 2);
        let Some(Value::List(l)) = d.get_str("a") else {
            panic!("expected a list")
        };
        let ints: Vec<i64> = l.borrow().iter().map(|v| v.as_int("x").unwrap_or(-1)).collect();
        assert_eq!(ints, [1, -2, 300]);
        assert!(matches!(d.get_str("b"), Some(Value::Tuple(t)) if t.len() == 2));
    }

    #[test]
    fn long1_sign_extends() {
        assert!(matches!(run(b"\x8a\x01\xff."), Ok(Value::Int(-1))));
        assert!(matches!(run(b"\x8a\x02\xff\x00."), Ok(Value::Int(255))));
        assert!(matches!(run(b"\x8a\x00."), Ok(Value::Int(0))));
    }

    #[test]
    fn unknown_opcode_is_named() {
        match run(b"\x80\x02\x82\x01.") {
            Err(VmError::Opcode {
                opcode: 0x82,
                offset: 2,
            }) => assert_eq!(opcode_name(0x82), "EXT1"),
            _ => panic!("expected an opcode error"),
        }
    }

    #[test]
    fn truncated_pickle_fails() {
        assert!(matches!(
            run(b"\x80\x02X\x05\x00\x00\x00ab"),
            Err(VmError::Malformed { .. })
        ));
        assert!(matches!(run(b"\x80\x02"), Err(VmError::Malformed { .. })));
    }

    #[test]
    fn unknown_global_becomes_named_object() {
        let pickle = b"\x80\x02cargparse\nNamespace\nq\x00)\x81q\x01}q\x02b.";
        match run(pickle) {
            Ok(Value::Object(name)) => assert_eq!(&*name, "argparse.Namespace"),
            _ => panic!("expected an opaque object"),
        }
    }

    #[test]
    fn sniffs_formats() {
        assert_eq!(sniff(b"PK\x03\x04rest"), Some(TorchFormat::Zip));
        assert_eq!(sniff(&LEGACY_MAGIC), Some(TorchFormat::Legacy));
        assert_eq!(sniff(b"\x80\x02}q\x00."), None);
    }

    #[test]
    fn strided_view_is_copied_out() {
        let storage = Rc::new(StorageRef {
            key: "0".into(),
            dtype: Dtype::F32,
            numel: 6,
            elem_offset: 0,
        });
        let bytes: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let spec = TensorSpec {
            storage,
            dtype: Dtype::F32,
            offset: 1,
            size: vec![2, 2],
            stride: vec![1, 2],
        };
        let Ok(t) = build_tensor(&bytes, &spec, false) else {
            panic!("build failed")
        };
        let values: Vec<f32> = Vec::try_from(t.view(-1)).unwrap_or_default();
        assert_eq!(values, [1.0, 3.0, 2.0, 4.0]);
        let too_far = TensorSpec { offset: 3, ..spec };
        assert!(matches!(build_tensor(&bytes, &too_far, false), Err(BuildError::Bad(_))));
    }
}
