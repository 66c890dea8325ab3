//! `attrstream model import`: a checkpoint in, an attrstream weights file out.
//!
//! The input may be a PyTorch checkpoint written by `torch.save` (read by
//! [`torch_pickle`](crate::model::torch_pickle)) or a safetensors file; the format is
//! recognised from the content, not the file name. The output is a safetensors file
//! whose metadata records the architecture, the label map, where the weights came from
//! and the sha256 of the input. Unless told otherwise the result is loaded into a
//! Faster R-CNN before it is put in place, so a checkpoint of another architecture or
//! with another number of classes fails here, with the offending key and shape, rather
//! than when detection starts.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tch::{Device, Tensor};

use crate::detection::FASTERRCNN_RESNET50_FPN;
use crate::model::faster_rcnn::{FasterRcnn, FasterRcnnConfig};
use crate::model::labels::coco_labels;
use crate::model::torch_pickle::{self, TorchFormat};
use crate::model::weights::{self, WeightsMetadata};
use crate::progress::Progress;

/// State-dict key whose first dimension is the number of classes of a Faster R-CNN.
const CLASS_SCORE_KEY: &str = "roi_heads.box_predictor.cls_score.weight";
/// Key prefix `torch.nn.DataParallel` puts in front of every state-dict key.
const DATA_PARALLEL_PREFIX: &str = "module.";

/// The format of a checkpoint file, recognised from its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// `torch.save` zip archive (PyTorch >= 1.6).
    TorchZip,
    /// `torch.save` legacy pickle stream (PyTorch < 1.6).
    TorchLegacy,
    /// A safetensors file.
    Safetensors,
}

impl std::fmt::Display for CheckpointFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CheckpointFormat::TorchZip => "pytorch-zip",
            CheckpointFormat::TorchLegacy => "pytorch-legacy",
            CheckpointFormat::Safetensors => "safetensors",
        })
    }
}

/// Recognises a checkpoint file from its first bytes.
pub fn detect_format(path: &Path) -> Result<CheckpointFormat> {
    let mut head = Vec::with_capacity(16);
    File::open(path)
        .and_then(|f| f.take(16).read_to_end(&mut head))
        .with_context(|| format!("cannot read {}", path.display()))?;
    if let Some(format) = torch_pickle::sniff(&head) {
        return Ok(match format {
            TorchFormat::Zip => CheckpointFormat::TorchZip,
            TorchFormat::Legacy => CheckpointFormat::TorchLegacy,
        });
    }
    // safetensors: an 8-byte little-endian header length, then a JSON object.
    if head.len() > 8 && head[8] == b'{' {
        let header_len = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
        let file_len = std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        if header_len >= 2 && header_len.saturating_add(8) <= file_len {
            return Ok(CheckpointFormat::Safetensors);
        }
    }
    bail!(
        "{} is neither a PyTorch checkpoint (`torch.save`) nor a safetensors file; \
         if it is a TorchScript or ONNX export, save the state dict instead: `torch.save(model.state_dict(), path)`",
        path.display()
    )
}

/// What [`import_checkpoint`] should produce.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The weights file to write (replaced if it exists; the folder is created).
    pub output: PathBuf,
    /// Architecture recorded in the metadata; only `fasterrcnn_resnet50_fpn` can be verified.
    pub architecture: String,
    /// Label map (index 0 = background). `None`: the input's own (safetensors with
    /// attrstream metadata), else COCO's.
    pub labels: Option<Vec<String>>,
    /// Where the weights came from (a URL); `None`: the input file's absolute path.
    pub source: Option<String>,
    /// sha256 of the input when the caller already computed it; `None`: computed here.
    pub source_sha256: Option<String>,
    /// Load the result into the model before putting it in place.
    pub verify: bool,
    /// Frozen batch-norm epsilon the weights were trained with. `None`: 0 for torchvision's
    /// official COCO_V1 checkpoint (torchvision runs it with `overwrite_eps(model, 0.0)`),
    /// else the input's own metadata or the default 1e-5.
    pub frozen_bn_eps: Option<f64>,
}

/// sha256 prefix of torchvision's COCO_V1 Faster R-CNN file (`...coco-258fb6c6.pth`).
pub const COCO_V1_SHA256_PREFIX: &str = "258fb6c6";

impl ImportOptions {
    /// Defaults: Faster R-CNN ResNet-50 FPN, input labels or COCO, verified.
    pub fn new(output: impl Into<PathBuf>) -> Self {
        Self {
            output: output.into(),
            architecture: FASTERRCNN_RESNET50_FPN.to_string(),
            labels: None,
            source: None,
            source_sha256: None,
            verify: true,
            frozen_bn_eps: None,
        }
    }
}

/// What [`import_checkpoint`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImportReport {
    /// The weights file written.
    pub output: PathBuf,
    /// The input's format.
    #[serde(serialize_with = "serialize_display")]
    pub format: CheckpointFormat,
    /// Number of tensors written.
    pub tensors: usize,
    /// Number of labels in the label map (including background).
    pub labels: usize,
    /// sha256 of the input file.
    pub source_sha256: String,
    /// Whether the weights were loaded into the model before being put in place.
    pub verified: bool,
}

fn serialize_display<S: serde::Serializer>(v: &CheckpointFormat, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// The default output for `input`: `<dir>/<stem>.safetensors`, where a torch.hub hash
/// suffix (`-258fb6c6`) is dropped from the stem so that importing a downloaded
/// `fasterrcnn_resnet50_fpn_coco-258fb6c6.pth` gives the file `detect` looks for.
pub fn default_output_path(input: &Path, dir: &Path) -> PathBuf {
    let stem = input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "weights".to_string());
    let stem = match stem.rsplit_once('-') {
        Some((base, hash)) if !base.is_empty() && hash.len() >= 6 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            base.to_string()
        }
        _ => stem,
    };
    dir.join(format!("{stem}.safetensors"))
}

/// Reads a label map: a JSON list of strings, or one name per line (index 0 first, which
/// is the background). Blank lines at the end are ignored; blank lines in between are an
/// error, since they would shift every following class id.
pub fn read_labels(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read label file {}", path.display()))?;
    let text = text.trim_start_matches('\u{feff}');
    let labels: Vec<String> = if text.trim_start().starts_with('[') {
        serde_json::from_str(text)
            .with_context(|| format!("label file {} is not a JSON list of strings", path.display()))?
    } else {
        let mut lines: Vec<&str> = text.lines().map(str::trim).collect();
        while lines.last() == Some(&"") {
            lines.pop();
        }
        if let Some(i) = lines.iter().position(|l| l.is_empty()) {
            bail!(
                "label file {} has an empty line {}; every line up to the last names one class \
                 (use a placeholder such as N/A for unused ids)",
                path.display(),
                i + 1
            );
        }
        lines.into_iter().map(str::to_string).collect()
    };
    if labels.len() < 2 {
        bail!(
            "label file {} has {} name(s); it needs the background (index 0) and at least one class",
            path.display(),
            labels.len()
        );
    }
    Ok(labels)
}

/// sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The `config` metadata: the input's, with the frozen batch-norm epsilon settled.
fn model_config(input: Option<serde_json::Value>, options: &ImportOptions, sha256: &str) -> Option<serde_json::Value> {
    let eps = options
        .frozen_bn_eps
        .or_else(|| sha256.starts_with(COCO_V1_SHA256_PREFIX).then_some(0.0));
    match (input, eps) {
        (config, None) => config,
        (Some(serde_json::Value::Object(mut map)), Some(eps)) => {
            map.insert("frozen_bn_eps".to_string(), eps.into());
            Some(serde_json::Value::Object(map))
        }
        (_, Some(eps)) => Some(serde_json::json!({ "frozen_bn_eps": eps })),
    }
}

/// Converts `input` (PyTorch checkpoint or safetensors) into an attrstream weights file.
///
/// The file is written into a temporary folder next to `options.output`, verified (unless
/// `options.verify` is false) and only then moved into place, so a failed import never
/// leaves a broken file behind nor replaces a good one. Progress counts the stages (read,
/// hash, write, verify).
pub fn import_checkpoint(input: &Path, options: &ImportOptions) -> Result<ImportReport> {
    let format = detect_format(input)?;
    let progress = Progress::new("import", Some(3 + u64::from(options.verify)));
    progress.set_message(format!("reading {}", input.display()));
    let (tensors, input_meta) = match format {
        CheckpointFormat::TorchZip | CheckpointFormat::TorchLegacy => (torch_pickle::read_state_dict(input)?, None),
        CheckpointFormat::Safetensors => {
            let meta = weights::read_metadata(input)?;
            let tensors = Tensor::read_safetensors(input)
                .with_context(|| format!("cannot read safetensors file {}", input.display()))?;
            (tensors, Some(meta))
        }
    };
    let tensors = strip_data_parallel_prefix(tensors);
    if tensors.is_empty() {
        bail!("{} holds no tensors", input.display());
    }
    let labels = options
        .labels
        .clone()
        .or_else(|| input_meta.as_ref().and_then(|m| m.labels.clone()))
        .unwrap_or_else(coco_labels);
    check_class_count(input, &tensors, &labels, options.labels.is_some())?;

    progress.inc(1);
    progress.set_message("hashing the input");
    let source_sha256 = match &options.source_sha256 {
        Some(h) => h.clone(),
        None => sha256_file(input)?,
    };
    let source = match &options.source {
        Some(s) => s.clone(),
        None => std::fs::canonicalize(input)
            .unwrap_or_else(|_| input.to_path_buf())
            .display()
            .to_string(),
    };
    let metadata = WeightsMetadata {
        architecture: Some(options.architecture.clone()),
        labels: Some(labels.clone()),
        source: Some(source),
        source_sha256: Some(source_sha256.clone()),
        config: model_config(input_meta.and_then(|m| m.config), options, &source_sha256),
    };

    let output = &options.output;
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".attrstream-import-")
        .tempdir_in(dir)
        .with_context(|| format!("cannot write into {}", dir.display()))?;
    let file_name = output
        .file_name()
        .with_context(|| format!("output {} has no file name", output.display()))?;
    let staged = staging.path().join(file_name);
    progress.inc(1);
    progress.set_message(format!("writing {} tensors", tensors.len()));
    weights::save(&staged, &tensors, &metadata)?;
    progress.inc(1);
    if options.verify {
        progress.set_message("verifying");
        if options.architecture != FASTERRCNN_RESNET50_FPN {
            bail!(
                "cannot verify weights of architecture `{}` (only {FASTERRCNN_RESNET50_FPN}); import with --no-verify",
                options.architecture
            );
        }
        verify_faster_rcnn(&staged, labels.len()).with_context(|| {
            format!(
                "{} does not fit {FASTERRCNN_RESNET50_FPN} with {} classes (nothing was written; \
                 --no-verify converts it anyway)",
                input.display(),
                labels.len()
            )
        })?;
        progress.inc(1);
    }
    std::fs::rename(&staged, output).with_context(|| format!("cannot move weights into {}", output.display()))?;
    progress.set_message("");
    progress.finish();
    Ok(ImportReport {
        output: output.clone(),
        format,
        tensors: tensors.len(),
        labels: labels.len(),
        source_sha256,
        verified: options.verify,
    })
}

/// Loads a weights file into a CPU Faster R-CNN with `num_classes` classes, checking
/// every key and shape.
pub fn verify_faster_rcnn(path: &Path, num_classes: usize) -> Result<()> {
    let cfg = FasterRcnnConfig {
        num_classes: i64::try_from(num_classes)?,
        ..Default::default()
    };
    cfg.validate().map_err(anyhow::Error::msg)?;
    FasterRcnn::load(path, Device::Cpu, cfg, false)?;
    Ok(())
}

/// Drops the `module.` prefix `nn.DataParallel` adds when every key has it.
fn strip_data_parallel_prefix(tensors: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    if tensors.is_empty() || !tensors.iter().all(|(k, _)| k.starts_with(DATA_PARALLEL_PREFIX)) {
        return tensors;
    }
    tracing::info!("dropping the `{DATA_PARALLEL_PREFIX}` prefix (DataParallel) from every key");
    tensors
        .into_iter()
        .map(|(k, t)| (k[DATA_PARALLEL_PREFIX.len()..].to_string(), t))
        .collect()
}

/// Fails early when the box predictor's class count differs from the label map's.
fn check_class_count(input: &Path, tensors: &[(String, Tensor)], labels: &[String], explicit: bool) -> Result<()> {
    let Some((_, scores)) = tensors.iter().find(|(k, _)| k == CLASS_SCORE_KEY) else {
        return Ok(());
    };
    let classes = scores.size().first().copied().unwrap_or(0);
    if classes != labels.len() as i64 {
        let hint = if explicit {
            "fix the label file"
        } else {
            "pass --labels FILE with one name per class"
        };
        bail!(
            "{} predicts {classes} classes (`{CLASS_SCORE_KEY}`) but the label map has {} names; {hint} \
             (index 0 = background)",
            input.display(),
            labels.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn official_coco_checkpoint_gets_epsilon_zero_and_others_keep_theirs() {
        let mut options = ImportOptions::new("x.safetensors");
        let coco = format!("{COCO_V1_SHA256_PREFIX}{}", "0".repeat(56));
        assert_eq!(
            model_config(None, &options, &coco),
            Some(serde_json::json!({"frozen_bn_eps": 0.0}))
        );
        assert_eq!(model_config(None, &options, &"a".repeat(64)), None);
        let own = serde_json::json!({"num_classes": 5});
        assert_eq!(model_config(Some(own.clone()), &options, &"a".repeat(64)), Some(own));
        options.frozen_bn_eps = Some(1e-3);
        assert_eq!(
            model_config(Some(serde_json::json!({"num_classes": 5})), &options, &coco),
            Some(serde_json::json!({"num_classes": 5, "frozen_bn_eps": 1e-3}))
        );
    }

    use super::*;

    #[test]
    fn default_output_drops_hub_hash() {
        let dir = Path::new("models");
        assert_eq!(
            default_output_path(Path::new("/x/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"), dir),
            dir.join("fasterrcnn_resnet50_fpn_coco.safetensors")
        );
        assert_eq!(
            default_output_path(Path::new("my-model.pth"), dir),
            dir.join("my-model.safetensors")
        );
        assert_eq!(
            default_output_path(Path::new("ckpt.pt"), dir),
            dir.join("ckpt.safetensors")
        );
    }

    #[test]
    fn labels_from_lines_and_json() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let lines = dir.path().join("labels.txt");
        std::fs::write(&lines, "__background__\r\nshoe\ntraffic light\n\n")?;
        assert_eq!(read_labels(&lines)?, ["__background__", "shoe", "traffic light"]);
        let json = dir.path().join("labels.json");
        std::fs::write(&json, r#"["bg", "cup"]"#)?;
        assert_eq!(read_labels(&json)?, ["bg", "cup"]);
        let gap = dir.path().join("gap.txt");
        std::fs::write(&gap, "bg\n\ncup\n")?;
        assert!(read_labels(&gap).is_err_and(|e| e.to_string().contains("empty line 2")));
        let one = dir.path().join("one.txt");
        std::fs::write(&one, "bg\n")?;
        assert!(read_labels(&one).is_err());
        Ok(())
    }
}
