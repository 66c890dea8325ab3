//! Publishing a version: checks against the weights' own metadata, a claimed sequence number,
//! the weights copied in with their sha256, then the manifest that makes the version visible.

use std::path::Path;

use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{PutMode, PutPayload};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    hash_file, Architecture, ModelRegistry, ModelVersion, NewVersion, RegistryError, Result, TrainingData, VersionId,
    WeightsInfo, CHUNK, MANIFEST_FILE, MANIFEST_FORMAT, UPLOAD_BUFFER, WEIGHTS_FILE,
};
use crate::model::labels::coco_labels;
use crate::model::weights;

impl ModelRegistry {
    /// Publishes a version: checks the weights against the given label map, architecture and
    /// config, copies them in with their sha256, then writes the manifest (which makes the
    /// version visible). Returns the new id.
    pub async fn publish(&self, candidate: NewVersion) -> Result<VersionId> {
        let path = candidate.weights.clone();
        let meta = weights::read_metadata(&path).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let architecture = reconcile_architecture(&path, candidate.architecture, meta.architecture.as_deref())?;
        let labels = reconcile_labels(&path, candidate.labels, meta.labels)?;
        let model_config = reconcile_config(&path, candidate.model_config, meta.config)?;
        if let Some(m) = &candidate.metrics {
            m.validate("metrics")?;
        }
        if let Some(pm) = &candidate.parent_metrics {
            pm.validate("parent_metrics")?;
            let Some(parent) = &candidate.parent else {
                return Err(RegistryError::Invalid(
                    "parent_metrics were given without a parent version; name the parent they were computed for".into(),
                ));
            };
            match &candidate.metrics {
                Some(m) if m.validation_fingerprint == pm.validation_fingerprint => {}
                Some(m) => {
                    return Err(RegistryError::Invalid(format!(
                        "parent_metrics of {parent} were computed on validation set {} but the metrics on {}; \
                         evaluate both models on the same validation set",
                        pm.validation_fingerprint, m.validation_fingerprint
                    )))
                }
                None => {
                    return Err(RegistryError::Invalid(
                        "parent_metrics were given without metrics; give the candidate's metrics on the same \
                         validation set"
                            .into(),
                    ))
                }
            }
        }
        if let Some(data) = &candidate.training_data {
            validate_training_data(data)?;
        }
        if let Some(parent) = &candidate.parent {
            self.get(parent).await?;
        }

        let hash_path = path.clone();
        let (sha256, size) = tokio::task::spawn_blocking(move || hash_file(&hash_path))
            .await
            .map_err(|e| RegistryError::Invalid(format!("hashing {} failed: {e}", path.display())))?
            .map_err(|error| RegistryError::Io {
                action: format!("read {}", path.display()),
                error,
            })?;
        let created_at = Utc::now();
        let version = self.claim_version(created_at, &sha256).await?;
        let weights_key = self.version_key(&version, WEIGHTS_FILE);
        let uploaded = self.upload_file(&path, &weights_key).await;
        match uploaded {
            Ok(sha) if sha == sha256 => {}
            Ok(_) => {
                let _ = self.store.delete(&weights_key).await;
                return Err(RegistryError::Invalid(format!(
                    "{} changed while it was being published; publish it again once it is complete",
                    path.display()
                )));
            }
            Err(e) => {
                let _ = self.store.delete(&weights_key).await;
                return Err(e);
            }
        }
        let manifest = ModelVersion {
            format: MANIFEST_FORMAT,
            version: version.clone(),
            created_at,
            created_by: self.actor.clone(),
            architecture,
            labels,
            model_config,
            parent: candidate.parent,
            training_data: candidate.training_data,
            training_config: candidate.training_config.unwrap_or(serde_json::Value::Null),
            metrics: candidate.metrics,
            parent_metrics: candidate.parent_metrics,
            weights: WeightsInfo {
                file: WEIGHTS_FILE.to_string(),
                sha256,
                size,
            },
            notes: candidate.notes,
        };
        let key = self.version_key(&version, MANIFEST_FILE);
        let body = serde_json::to_vec_pretty(&manifest).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        self.store
            .put_opts(&key, PutPayload::from(body), PutMode::Create.into())
            .await
            .map_err(|e| self.store_error("write the manifest", &key, e))?;
        tracing::info!(registry = %self.location, %version, "published model version");
        Ok(version)
    }

    /// Claims the next free sequence number with an exclusive create and returns the id.
    async fn claim_version(&self, created_at: DateTime<Utc>, sha256: &str) -> Result<VersionId> {
        let prefix = self.key("sequence");
        let existing: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.store_error("list", &prefix, e))?;
        let mut next = existing
            .iter()
            .filter_map(|m| m.location.filename().and_then(|f| f.parse::<u64>().ok()))
            .max()
            .unwrap_or(0)
            + 1;
        for _ in 0..1000 {
            let version = VersionId::new(next, created_at, sha256);
            let key = self.key(&format!("sequence/{next:06}"));
            let put = self
                .store
                .put_opts(&key, PutPayload::from(version.to_string()), PutMode::Create.into())
                .await;
            match put {
                Ok(_) => return Ok(version),
                Err(object_store::Error::AlreadyExists { .. }) => next += 1,
                Err(object_store::Error::NotImplemented) => {
                    return Err(RegistryError::NoConditionalWrites {
                        location: self.location.clone(),
                        detail: "create-if-absent is not implemented".into(),
                    })
                }
                Err(e) => return Err(self.store_error("claim a sequence number at", &key, e)),
            }
        }
        Err(RegistryError::Invalid(format!(
            "could not claim a free sequence number in {} after 1000 tries; is something creating them in a loop?",
            self.location
        )))
    }

    /// Streams a local file into the store; returns its sha256 as read during the upload.
    async fn upload_file(&self, path: &Path, key: &ObjectPath) -> Result<String> {
        let io = |action: String| move |error| RegistryError::Io { action, error };
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(io(format!("read {}", path.display())))?;
        let mut writer =
            object_store::buffered::BufWriter::with_capacity(self.store.clone(), key.clone(), UPLOAD_BUFFER);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let copied: std::io::Result<()> = async {
            loop {
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                writer.write_all(&buf[..n]).await?;
            }
            writer.shutdown().await
        }
        .await;
        if let Err(error) = copied {
            let _ = writer.abort().await;
            return Err(RegistryError::Io {
                action: format!("copy {} to {}", path.display(), self.shown(key)),
                error,
            });
        }
        Ok(hex::encode(hasher.finalize()))
    }
}

fn reconcile_architecture(path: &Path, given: Option<Architecture>, in_file: Option<&str>) -> Result<Architecture> {
    let from_file = in_file
        .map(|a| {
            a.parse::<Architecture>()
                .map_err(|e| RegistryError::Invalid(format!("{}: {e}", path.display())))
        })
        .transpose()?;
    match (given, from_file) {
        (Some(g), Some(f)) if g != f => Err(RegistryError::Invalid(format!(
            "architecture {g} was given but the weights {} are a {f} model",
            path.display()
        ))),
        (Some(a), _) | (None, Some(a)) => Ok(a),
        (None, None) => Ok(Architecture::FasterRcnnResnet50Fpn),
    }
}

fn reconcile_labels(path: &Path, given: Option<Vec<String>>, in_file: Option<Vec<String>>) -> Result<Vec<String>> {
    // The detector uses the weights' label map, or COCO's when they carry none.
    let effective = in_file.unwrap_or_else(coco_labels);
    if let Some(given) = given {
        if given != effective {
            let first = given
                .iter()
                .zip(&effective)
                .position(|(a, b)| a != b)
                .unwrap_or(given.len().min(effective.len()));
            return Err(RegistryError::Invalid(format!(
                "the label map given ({} names) differs from the one the detector will use from {} ({} names), \
                 first at index {first} ({:?} vs {:?}); write the right labels into the weights \
                 (`attrstream model import --labels`) or give the same labels",
                given.len(),
                path.display(),
                effective.len(),
                given.get(first),
                effective.get(first),
            )));
        }
    }
    if effective.len() < 2 {
        return Err(RegistryError::Invalid(format!(
            "the label map of {} has {} name(s); it needs the background (index 0) and at least one class",
            path.display(),
            effective.len()
        )));
    }
    if let Some(i) = effective.iter().position(|l| l.trim().is_empty()) {
        return Err(RegistryError::Invalid(format!(
            "label {i} of {} is empty; name every class (use N/A for unused ids)",
            path.display()
        )));
    }
    Ok(effective)
}

fn reconcile_config(
    path: &Path,
    given: Option<serde_json::Value>,
    in_file: Option<serde_json::Value>,
) -> Result<serde_json::Value> {
    match (given, in_file) {
        (Some(g), Some(f)) if g != f => Err(RegistryError::Invalid(format!(
            "the model config given differs from the one stored in {} ({f}); the detector uses the stored one",
            path.display()
        ))),
        (Some(c), _) | (None, Some(c)) => Ok(c),
        (None, None) => Ok(serde_json::Value::Object(Default::default())),
    }
}

fn validate_training_data(data: &TrainingData) -> Result<()> {
    if data.topic.trim().is_empty() {
        return Err(RegistryError::Invalid("training_data.topic is empty".into()));
    }
    for r in &data.partitions {
        if r.partition < 0 || r.start_offset < 0 || r.end_offset < r.start_offset {
            return Err(RegistryError::Invalid(format!(
                "training_data partition {}: range {}..{} is not a valid offset range (start ≥ 0, end ≥ start)",
                r.partition, r.start_offset, r.end_offset
            )));
        }
    }
    Ok(())
}
