//! Production: reading it, the promotion rule, the conditional replace that lets only one of
//! several concurrent promoters win, rollback, and the decision log.

use std::path::Path;

use bytes::Bytes;
use chrono::Utc;
use futures::TryStreamExt;
use object_store::{PutMode, PutOptions, PutPayload, UpdateVersion};

use super::{
    Metric, ModelRegistry, ModelVersion, Production, ProductionAction, PromotionDecision, PromotionPolicy,
    RegistryError, Result, VersionId, LOCK_FILE, PRODUCTION_FILE,
};

impl ModelRegistry {
    /// The production version, or `None` before the first promotion.
    pub async fn production(&self) -> Result<Option<Production>> {
        let snapshot = self.snapshot().await?;
        self.parse_production(&snapshot)
    }

    /// Reads production.json with what a conditional replace needs.
    pub(super) async fn snapshot(&self) -> Result<Snapshot> {
        let key = self.key(PRODUCTION_FILE);
        match self.store.get(&key).await {
            Ok(result) => {
                let e_tag = result.meta.e_tag.clone();
                let object_version = result.meta.version.clone();
                let raw = result.bytes().await.map_err(|e| self.store_error("read", &key, e))?;
                Ok(Snapshot {
                    raw: Some(raw),
                    e_tag,
                    object_version,
                })
            }
            Err(object_store::Error::NotFound { .. }) => Ok(Snapshot::default()),
            Err(e) => Err(self.store_error("read", &key, e)),
        }
    }

    pub(super) fn parse_production(&self, snapshot: &Snapshot) -> Result<Option<Production>> {
        let Some(raw) = &snapshot.raw else {
            return Ok(None);
        };
        serde_json::from_slice(raw)
            .map(Some)
            .map_err(|e| RegistryError::CorruptProduction {
                path: self.shown(&self.key(PRODUCTION_FILE)),
                reason: e.to_string(),
            })
    }

    /// Replaces production.json only if it still is what `expected` read; exactly one of
    /// several concurrent callers with the same `expected` succeeds.
    pub(super) async fn replace_production(&self, expected: &Snapshot, new: &Production) -> Result<()> {
        let key = self.key(PRODUCTION_FILE);
        let body = serde_json::to_vec_pretty(new).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        if let Some(root) = &self.local_root {
            // LocalFileSystem has no conditional update: compare and replace under a lock.
            let lock_path = root.join(LOCK_FILE);
            let lock = tokio::task::spawn_blocking(move || lock_exclusive(&lock_path))
                .await
                .map_err(|e| RegistryError::Invalid(format!("waiting for the registry lock failed: {e}")))?
                .map_err(|error| RegistryError::Io {
                    action: format!("lock {}", root.join(LOCK_FILE).display()),
                    error,
                })?;
            let current = self.snapshot().await?;
            if current.raw != expected.raw {
                drop(lock);
                return Err(self.conflict(&current));
            }
            // A put on the local store is a temp file renamed into place.
            self.store
                .put(&key, PutPayload::from(body))
                .await
                .map_err(|e| self.store_error("write", &key, e))?;
            drop(lock);
            return Ok(());
        }
        let mode = match &expected.raw {
            None => PutMode::Create,
            Some(_) if expected.e_tag.is_none() && expected.object_version.is_none() => {
                return Err(RegistryError::NoConditionalWrites {
                    location: self.location.clone(),
                    detail: "the store reported neither an etag nor a version for production.json".into(),
                })
            }
            Some(_) => PutMode::Update(UpdateVersion {
                e_tag: expected.e_tag.clone(),
                version: expected.object_version.clone(),
            }),
        };
        match self
            .store
            .put_opts(&key, PutPayload::from(body), PutOptions::from(mode))
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => {
                let current = self.snapshot().await?;
                Err(self.conflict(&current))
            }
            Err(object_store::Error::NotImplemented) => Err(RegistryError::NoConditionalWrites {
                location: self.location.clone(),
                detail: "conditional put is not implemented".into(),
            }),
            Err(e) => Err(self.store_error("write", &key, e)),
        }
    }

    fn conflict(&self, current: &Snapshot) -> RegistryError {
        let now = match self.parse_production(current) {
            Ok(Some(p)) => p.version.to_string(),
            Ok(None) => "no version".to_string(),
            Err(_) => "an unreadable file".to_string(),
        };
        RegistryError::Conflict {
            location: self.location.clone(),
            current: now,
        }
    }

    /// Makes `candidate` the production version if it beats the current one on `policy.metric`
    /// on the same validation set (or `policy.force`). The decision is recorded under
    /// `decisions/` either way; a refusal is `Ok` with `promoted == false` and the reason.
    /// Two concurrent promoters: one wins, the other gets [`RegistryError::Conflict`].
    pub async fn promote(&self, candidate: &VersionId, policy: &PromotionPolicy) -> Result<PromotionDecision> {
        if !(policy.min_improvement.is_finite() && policy.min_improvement >= 0.0) {
            return Err(RegistryError::Invalid(format!(
                "min_improvement must be a number ≥ 0, got {}",
                policy.min_improvement
            )));
        }
        let manifest = self.get(candidate).await?;
        let snapshot = self.snapshot().await?;
        let current = self.parse_production(&snapshot)?;
        let current_manifest = match &current {
            Some(p) if p.version != *candidate => match self.get(&p.version).await {
                Ok(m) => Some(m),
                Err(e) if policy.force => {
                    tracing::warn!("forced promotion: production {} is unreadable ({e})", p.version);
                    None
                }
                Err(e) => return Err(e),
            },
            _ => None,
        };
        let verdict = judge(&manifest, current.as_ref(), current_manifest.as_ref(), policy);
        let promote = verdict.better || (policy.force && !verdict.already_production);
        let action = if verdict.better || !policy.force {
            ProductionAction::Promote
        } else {
            ProductionAction::ForcedPromote
        };
        let reason = if promote && !verdict.better {
            format!("forced: {}", verdict.reason)
        } else {
            verdict.reason.clone()
        };
        let now = Utc::now();
        if promote {
            let new = Production {
                version: candidate.clone(),
                promoted_at: now,
                promoted_by: self.actor.clone(),
                action,
                reason: with_note(&reason, policy.note.as_deref()),
                previous_version: current.as_ref().map(|p| p.version.clone()),
                revision: current.as_ref().map_or(0, |p| p.revision) + 1,
            };
            self.replace_production(&snapshot, &new).await?;
            tracing::info!(registry = %self.location, version = %candidate, %reason, "promoted to production");
        }
        let decision = PromotionDecision {
            candidate: candidate.clone(),
            production_before: current.map(|p| p.version),
            promoted: promote,
            action,
            metric: policy.metric,
            candidate_value: verdict.candidate_value,
            baseline_value: verdict.baseline_value,
            baseline_source: verdict.baseline_source,
            min_improvement: policy.min_improvement,
            validation_fingerprint: manifest.validation_fingerprint().map(str::to_string),
            reason,
            note: policy.note.clone(),
            decided_at: now,
            decided_by: self.actor.clone(),
        };
        self.record_decision(&decision).await;
        Ok(decision)
    }

    /// Sets production back to `to` (any published version) whatever the metrics, e.g. after a
    /// bad promotion; also repairs an unreadable production.json. Recorded like a promotion.
    pub async fn rollback(&self, to: &VersionId, note: Option<&str>) -> Result<Production> {
        self.get(to).await?;
        let snapshot = self.snapshot().await?;
        let current = match self.parse_production(&snapshot) {
            Ok(current) => current,
            Err(e) => {
                tracing::warn!("replacing an unreadable production.json: {e}");
                None
            }
        };
        if let Some(p) = current.as_ref().filter(|p| p.version == *to) {
            tracing::info!(version = %to, "already production; nothing to roll back");
            return Ok(p.clone());
        }
        let now = Utc::now();
        let reason = match &current {
            Some(p) => format!("rollback from {} to {to}", p.version),
            None => format!("rollback to {to}"),
        };
        let new = Production {
            version: to.clone(),
            promoted_at: now,
            promoted_by: self.actor.clone(),
            action: ProductionAction::Rollback,
            reason: with_note(&reason, note),
            previous_version: current.as_ref().map(|p| p.version.clone()),
            revision: current.as_ref().map_or(0, |p| p.revision) + 1,
        };
        self.replace_production(&snapshot, &new).await?;
        tracing::info!(registry = %self.location, version = %to, "rolled back");
        let decision = PromotionDecision {
            candidate: to.clone(),
            production_before: current.map(|p| p.version),
            promoted: true,
            action: ProductionAction::Rollback,
            metric: Metric::default(),
            candidate_value: None,
            baseline_value: None,
            baseline_source: None,
            min_improvement: 0.0,
            validation_fingerprint: None,
            reason,
            note: note.map(str::to_string),
            decided_at: now,
            decided_by: self.actor.clone(),
        };
        self.record_decision(&decision).await;
        Ok(new)
    }

    /// Writes a decision under `decisions/`. Production has already changed (or deliberately
    /// not) when this runs, so a failure here is logged, not returned.
    async fn record_decision(&self, decision: &PromotionDecision) {
        let name = format!(
            "decisions/{}-{}-{}.json",
            decision.decided_at.format("%Y%m%dT%H%M%S%.9fZ"),
            decision.candidate,
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let key = self.key(&name);
        let body = match serde_json::to_vec_pretty(decision) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("cannot serialize the decision: {e}");
                return;
            }
        };
        if let Err(e) = self.store.put(&key, PutPayload::from(body)).await {
            tracing::warn!("{}", self.store_error("record the decision at", &key, e));
        }
    }

    /// Recorded decisions, oldest first; only those about `candidate` when given.
    pub async fn decisions(&self, candidate: Option<&VersionId>) -> Result<Vec<PromotionDecision>> {
        let prefix = self.key("decisions");
        let mut metas: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| self.store_error("list", &prefix, e))?;
        metas.sort_by(|a, b| a.location.cmp(&b.location));
        let mut decisions = Vec::new();
        for meta in metas {
            if let Some(c) = candidate {
                let name = meta.location.filename().unwrap_or_default();
                if !name.contains(c.as_str()) {
                    continue;
                }
            }
            let bytes = self
                .store
                .get(&meta.location)
                .await
                .map_err(|e| self.store_error("read", &meta.location, e))?
                .bytes()
                .await
                .map_err(|e| self.store_error("read", &meta.location, e))?;
            match serde_json::from_slice::<PromotionDecision>(&bytes) {
                Ok(d) if candidate.is_none_or(|c| d.candidate == *c) => decisions.push(d),
                Ok(_) => {}
                Err(e) => tracing::warn!("skipping unreadable decision {}: {e}", self.shown(&meta.location)),
            }
        }
        // Names start with the time (ns); keep that order, and the time's if names were changed.
        decisions.sort_by_key(|d| d.decided_at);
        Ok(decisions)
    }
}

/// production.json as read, with what a conditional replace needs.
#[derive(Debug, Clone, Default)]
pub(super) struct Snapshot {
    /// The bytes, `None` when the file does not exist.
    pub(super) raw: Option<Bytes>,
    /// The store's etag of what was read.
    pub(super) e_tag: Option<String>,
    /// The store's object version of what was read (versioned buckets).
    pub(super) object_version: Option<String>,
}

/// What comparing a candidate with production found.
#[derive(Debug)]
struct Verdict {
    better: bool,
    already_production: bool,
    reason: String,
    candidate_value: Option<f64>,
    baseline_value: Option<f64>,
    baseline_source: Option<String>,
}

/// The promotion rule. Production's value comes from the candidate's `parent_metrics` when the
/// candidate was fine-tuned from production (same run, same validation set), else from
/// production's own metrics if they were computed on the candidate's validation set;
/// otherwise the two are not comparable.
fn judge(
    candidate: &ModelVersion,
    current: Option<&Production>,
    current_manifest: Option<&ModelVersion>,
    policy: &PromotionPolicy,
) -> Verdict {
    let metric = policy.metric;
    let mut verdict = Verdict {
        better: false,
        already_production: false,
        reason: String::new(),
        candidate_value: candidate.metrics.as_ref().map(|m| m.value(metric)),
        baseline_value: None,
        baseline_source: None,
    };
    let c = &candidate.version;
    if current.is_some_and(|p| p.version == *c) {
        verdict.already_production = true;
        verdict.reason = format!("{c} already is the production version");
        return verdict;
    }
    let Some(cand) = &candidate.metrics else {
        verdict.reason = format!("{c} has no metrics; evaluate it on the validation set and publish it with metrics");
        return verdict;
    };
    let Some(current) = current else {
        verdict.better = true;
        verdict.reason = format!("no production version yet; {c} has {metric} {:.4}", cand.value(metric));
        return verdict;
    };
    let p = &current.version;
    let fp = &cand.validation_fingerprint;
    let baseline = match (&candidate.parent, &candidate.parent_metrics, current_manifest) {
        (Some(parent), Some(pm), _) if parent == p && pm.validation_fingerprint == *fp => Some((
            pm,
            format!("parent_metrics of {c} (production {p} on the same validation set)"),
        )),
        (_, _, Some(m)) => match &m.metrics {
            Some(pm) if pm.validation_fingerprint == *fp => Some((pm, format!("metrics of production {p}"))),
            Some(pm) => {
                verdict.reason = format!(
                    "{c} was evaluated on validation set {fp} but production {p} on {}; metrics on different \
                     validation sets are not comparable: evaluate {p} on the candidate's validation set (publish \
                     the candidate with parent {p} and parent_metrics) or force the promotion",
                    pm.validation_fingerprint
                );
                return verdict;
            }
            None => None,
        },
        _ => None,
    };
    let Some((base, source)) = baseline else {
        verdict.reason = format!(
            "production {p} has no metrics on validation set {fp}; publish {c} with parent {p} and parent_metrics \
             computed on the same validation set, or force the promotion"
        );
        return verdict;
    };
    let (cv, bv) = (cand.value(metric), base.value(metric));
    let gain = cv - bv;
    verdict.baseline_value = Some(bv);
    verdict.baseline_source = Some(source);
    verdict.better = gain > 0.0 && gain >= policy.min_improvement;
    verdict.reason = if verdict.better {
        format!(
            "{c} {metric} {cv:.4} beats production {p} {bv:.4} by {gain:+.4} (required ≥ {:.4}, validation set {fp})",
            policy.min_improvement
        )
    } else {
        format!(
            "{c} {metric} {cv:.4} does not beat production {p} {bv:.4} by the required margin ({gain:+.4}; \
             required > 0 and ≥ {:.4}, validation set {fp})",
            policy.min_improvement
        )
    };
    verdict
}

fn with_note(reason: &str, note: Option<&str>) -> String {
    match note.map(str::trim).filter(|n| !n.is_empty()) {
        Some(n) => format!("{reason}; note: {n}"),
        None => reason.to_string(),
    }
}

/// Blocks until this process holds the exclusive lock on `path`; released when the returned
/// file is dropped (or the process dies).
#[cfg(unix)]
fn lock_exclusive(path: &Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)?;
    Ok(file)
}

#[cfg(not(unix))]
fn lock_exclusive(_path: &Path) -> std::io::Result<std::fs::File> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "promoting in a local registry needs file locks (unix); use an s3:// registry",
    ))
}
