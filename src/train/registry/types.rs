//! What the registry stores: version ids, manifests, the production record, decisions, and
//! the inputs of publishing and promotion.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{RegistryError, Result};
use crate::detection::{FASTERRCNN_RESNET50_FPN, SSD_MOBILENET_V2};

/// A version id: `v<sequence>-<YYYYMMDDTHHMMSSZ>-<8 hex digits of the weights' sha256>`.
///
/// Unique within a registry (the sequence number is claimed exclusively) and ordered by
/// sequence number, so "newest" and "list order" need no timestamps.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VersionId {
    text: String,
    sequence: u64,
}

impl VersionId {
    /// Parses and validates an id (also guards object paths against `..` and slashes).
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || RegistryError::InvalidVersion {
            given: text.to_string(),
        };
        let rest = text.strip_prefix('v').ok_or_else(bad)?;
        let mut parts = rest.splitn(3, '-');
        let (seq, time, sha) = match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => return Err(bad()),
        };
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        let time_ok =
            time.len() == 16 && digits(&time[..8]) && &time[8..9] == "T" && digits(&time[9..15]) && &time[15..] == "Z";
        let sha_ok = sha.len() == 8 && sha.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if seq.len() < 4 || seq.len() > 18 || !digits(seq) || !time_ok || !sha_ok {
            return Err(bad());
        }
        let sequence = seq.parse().map_err(|_| bad())?;
        Ok(Self {
            text: text.to_string(),
            sequence,
        })
    }

    /// Builds the id of a new version.
    pub(super) fn new(sequence: u64, created_at: DateTime<Utc>, sha256: &str) -> Self {
        let text = format!(
            "v{sequence:04}-{}-{}",
            created_at.format("%Y%m%dT%H%M%SZ"),
            &sha256[..8.min(sha256.len())]
        );
        Self { text, sequence }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The sequence number (1 for the first version published to a registry).
    pub fn sequence(&self) -> u64 {
        self.sequence
    }
}

impl Ord for VersionId {
    fn cmp(&self, other: &Self) -> Ordering {
        self.sequence
            .cmp(&other.sequence)
            .then_with(|| self.text.cmp(&other.text))
    }
}

impl PartialOrd for VersionId {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for VersionId {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl TryFrom<String> for VersionId {
    type Error = RegistryError;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<VersionId> for String {
    fn from(v: VersionId) -> Self {
        v.text
    }
}

/// The network a version's weights are for; the names are those of the weights metadata
/// (`attrstream.architecture`), so the registry and [`crate::detection::Detector`] agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// torchvision's Faster R-CNN ResNet-50 FPN (v1).
    #[serde(rename = "fasterrcnn_resnet50_fpn", alias = "faster_rcnn_resnet50_fpn")]
    FasterRcnnResnet50Fpn,
    /// The TF Object Detection API's SSD MobileNetV2.
    #[serde(rename = "ssd_mobilenet_v2")]
    SsdMobileNetV2,
}

impl Architecture {
    /// The name written into manifests and weights metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FasterRcnnResnet50Fpn => FASTERRCNN_RESNET50_FPN,
            Self::SsdMobileNetV2 => SSD_MOBILENET_V2,
        }
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Architecture {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            FASTERRCNN_RESNET50_FPN | "faster_rcnn_resnet50_fpn" => Ok(Self::FasterRcnnResnet50Fpn),
            SSD_MOBILENET_V2 => Ok(Self::SsdMobileNetV2),
            other => Err(format!(
                "unknown architecture `{other}`; attrstream runs {FASTERRCNN_RESNET50_FPN} and {SSD_MOBILENET_V2}"
            )),
        }
    }
}

/// COCO-style evaluation results of one model on one validation set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalMetrics {
    /// Identifies the validation set (e.g. a sha256 over its image ids and annotations); metrics
    /// are comparable only when their fingerprints are equal.
    pub validation_fingerprint: String,
    /// AP averaged over IoU .50:.05:.95 (COCO's headline "mAP").
    pub map: f64,
    /// AP at IoU .50.
    pub ap50: f64,
    /// AP at IoU .75.
    pub ap75: f64,
    /// AP@[.50:.95] per class name (-1 where the class has no ground truth, as pycocotools).
    #[serde(default)]
    pub per_class_ap: BTreeMap<String, f64>,
    /// Images in the validation set, for the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images: Option<u64>,
}

impl EvalMetrics {
    /// The value of `metric`.
    pub fn value(&self, metric: Metric) -> f64 {
        match metric {
            Metric::Map => self.map,
            Metric::Ap50 => self.ap50,
        }
    }

    /// Checks ranges so that a promotion never compares NaN or garbage.
    pub(super) fn validate(&self, what: &str) -> Result<()> {
        let invalid = |msg: String| Err(RegistryError::Invalid(format!("{what}: {msg}")));
        if self.validation_fingerprint.trim().is_empty() {
            return invalid("validation_fingerprint is empty; it must identify the validation set".into());
        }
        for (name, v) in [("map", self.map), ("ap50", self.ap50), ("ap75", self.ap75)] {
            if !(0.0..=1.0).contains(&v) {
                return invalid(format!("{name} = {v} is not in [0, 1]"));
            }
        }
        for (class, v) in &self.per_class_ap {
            if !(v.is_finite() && (*v == -1.0 || (0.0..=1.0).contains(v))) {
                return invalid(format!(
                    "per_class_ap[{class:?}] = {v} is neither in [0, 1] nor -1 (no ground truth)"
                ));
            }
        }
        Ok(())
    }
}

/// The offsets of one partition a model was trained on (`start_offset` inclusive, `end_offset`
/// exclusive, as Kafka's watermarks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionRange {
    /// Partition number.
    pub partition: i32,
    /// First offset read.
    pub start_offset: i64,
    /// One past the last offset read.
    pub end_offset: i64,
}

/// Which labelled records a model was trained on, so a run can be reproduced or audited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingData {
    /// The labelled-image topic.
    pub topic: String,
    /// The offset range of each partition.
    pub partitions: Vec<PartitionRange>,
}

/// Where a version's weights are stored and what they hash to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsInfo {
    /// File name inside the version's folder.
    pub file: String,
    /// sha256 of the file, lowercase hex; checked on every download.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// A version's manifest (`versions/<version>/model.json`): everything needed to load, audit and
/// compare it. Immutable once written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelVersion {
    /// Manifest format ([`super::MANIFEST_FORMAT`]).
    pub format: u32,
    /// The version's id.
    pub version: VersionId,
    /// When it was published.
    pub created_at: DateTime<Utc>,
    /// Who published it (`user@host` or the `--by` name).
    pub created_by: String,
    /// The network.
    pub architecture: Architecture,
    /// Label map: class index → name (index 0 is the background).
    pub labels: Vec<String>,
    /// Model configuration the weights need (JSON, as in the weights metadata); `{}` for the defaults.
    pub model_config: serde_json::Value,
    /// The version it was fine-tuned from.
    pub parent: Option<VersionId>,
    /// The training records (topic, partitions, offsets).
    pub training_data: Option<TrainingData>,
    /// Training settings (JSON: epochs, learning rate, frozen layers, seed, …); `null` if unknown.
    pub training_config: serde_json::Value,
    /// The version's metrics on its validation set (the fingerprint is inside).
    pub metrics: Option<EvalMetrics>,
    /// The parent's metrics on the same validation set, computed in the same run.
    pub parent_metrics: Option<EvalMetrics>,
    /// The weights file and its sha256.
    pub weights: WeightsInfo,
    /// Free text (what changed, ticket, …).
    pub notes: Option<String>,
}

impl ModelVersion {
    /// The validation set the metrics were computed on.
    pub fn validation_fingerprint(&self) -> Option<&str> {
        self.metrics.as_ref().map(|m| m.validation_fingerprint.as_str())
    }
}

/// How a version became the production version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProductionAction {
    /// It beat the previous production version.
    Promote,
    /// Promoted with `force` (whatever the metrics said).
    ForcedPromote,
    /// Set back explicitly.
    Rollback,
}

/// `production.json`: the version that serves, and how it got there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Production {
    /// The serving version.
    pub version: VersionId,
    /// When it became production.
    pub promoted_at: DateTime<Utc>,
    /// Who made it production.
    pub promoted_by: String,
    /// Promote, forced promote or rollback.
    pub action: ProductionAction,
    /// Why (the comparison that won, or the operator's note).
    pub reason: String,
    /// The version it replaced.
    pub previous_version: Option<VersionId>,
    /// Counts changes of production.json (1 for the first promotion).
    pub revision: u64,
}

/// The metric a promotion compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// AP@[.50:.95].
    #[default]
    Map,
    /// AP@.50.
    Ap50,
}

impl Metric {
    /// The name used in configuration, the CLI and manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Map => "map",
            Self::Ap50 => "ap50",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Metric {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "map" => Ok(Self::Map),
            "ap50" => Ok(Self::Ap50),
            other => Err(format!("unknown metric `{other}`; use `map` (AP@[.50:.95]) or `ap50`")),
        }
    }
}

/// The rule [`super::ModelRegistry::promote`] applies.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PromotionPolicy {
    /// Promote even if the candidate is not better or not comparable (recorded as forced).
    pub force: bool,
    /// The metric compared.
    pub metric: Metric,
    /// The candidate must beat production by at least this much (and by more than 0).
    pub min_improvement: f64,
    /// Operator's note, recorded with the decision.
    pub note: Option<String>,
}

/// The outcome of a promotion or rollback, recorded under `decisions/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromotionDecision {
    /// The version asked for.
    pub candidate: VersionId,
    /// Production before the decision.
    pub production_before: Option<VersionId>,
    /// Whether production now names the candidate because of this decision.
    pub promoted: bool,
    /// What kind of change was asked for.
    pub action: ProductionAction,
    /// The metric compared.
    pub metric: Metric,
    /// The candidate's value of the metric.
    pub candidate_value: Option<f64>,
    /// Production's value on the same validation set.
    pub baseline_value: Option<f64>,
    /// Where the baseline came from.
    pub baseline_source: Option<String>,
    /// The improvement required.
    pub min_improvement: f64,
    /// The candidate's validation set.
    pub validation_fingerprint: Option<String>,
    /// Why it was (not) promoted, in words.
    pub reason: String,
    /// The operator's note.
    pub note: Option<String>,
    /// When it was decided.
    pub decided_at: DateTime<Utc>,
    /// Who decided.
    pub decided_by: String,
}

/// A version to publish: a weights file plus what is known about how it was made.
#[derive(Debug, Clone, Default)]
pub struct NewVersion {
    /// Local safetensors file (from the trainer or `attrstream model import/fetch`).
    pub weights: PathBuf,
    /// The network [default: the weights metadata's, else Faster R-CNN as `detect` assumes].
    pub architecture: Option<Architecture>,
    /// Label map; must equal the weights metadata's (that is what the detector loads)
    /// [default: the weights metadata's, else COCO's].
    pub labels: Option<Vec<String>>,
    /// Model configuration; must equal the weights metadata's [default: that, else `{}`].
    pub model_config: Option<serde_json::Value>,
    /// The version it was fine-tuned from (must exist in the registry).
    pub parent: Option<VersionId>,
    /// The training records.
    pub training_data: Option<TrainingData>,
    /// Training settings.
    pub training_config: Option<serde_json::Value>,
    /// Metrics on the validation set.
    pub metrics: Option<EvalMetrics>,
    /// The parent's metrics on the same validation set.
    pub parent_metrics: Option<EvalMetrics>,
    /// Free text.
    pub notes: Option<String>,
}

impl NewVersion {
    /// A version with only its weights file; fill in the rest as known.
    pub fn new(weights: impl Into<PathBuf>) -> Self {
        Self {
            weights: weights.into(),
            ..Self::default()
        }
    }
}
