//! The model registry: every fine-tuned detector as an immutable, checksummed version, and the
//! one version that serves ("production"), changed only by a promotion that beats it on the
//! same validation set (or is forced), or by a rollback.
//!
//! Unrelated to the Avro schema registry in [`crate::events::registry`].
//!
//! # Location
//! A registry lives in a local directory (a plain path or `file:///abs/dir`) or under an
//! object-store prefix (`s3://bucket/prefix`; credentials, region and endpoint come from the
//! usual `AWS_*` environment variables, e.g. `AWS_ENDPOINT=http://minio:9000` and
//! `AWS_ALLOW_HTTP=true` for MinIO). Both go through one `object_store` code path; tests use
//! an in-memory store ([`ModelRegistry::in_memory`]).
//!
//! # Layout
//! ```text
//! <location>/
//!   versions/<version>/weights.safetensors  the weights (a safetensors file, as `detect` loads)
//!   versions/<version>/model.json           the manifest (ModelVersion), written after the weights
//!   production.json                         the serving version (Production), replaced in one put
//!   sequence/<NNNNNN>                       claims a version's sequence number (holds its id)
//!   decisions/<time>-<version>-<rand>.json  every promotion decision and rollback (PromotionDecision)
//!   .production.lock                        local directories only: serializes promoters (flock)
//! ```
//! A version exists once its `model.json` exists; the manifest is written only after the
//! weights are completely stored, so a reader never sees a version without its weights.
//!
//! # Version ids
//! `v<sequence>-<UTC time>-<sha>`, e.g. `v0003-20261128T181500Z-1a2b3c4d`: the sequence number
//! (at least four digits, assigned by an exclusive create of `sequence/<NNNNNN>`, so no two
//! versions share one), the publish time to the second, and the first 8 hex digits of the
//! weights' sha256. Ids sort by sequence number ([`VersionId`]'s `Ord`; as text up to v9999).
//!
//! # Concurrency
//! `production.json` is replaced with a conditional put (`PutMode::Update` with the etag/version
//! read before deciding, or `PutMode::Create` when there is none yet), so of two concurrent
//! promoters exactly one wins and the other gets [`RegistryError::Conflict`]. `object_store`'s
//! local file system has no conditional update, so for directories the compare-and-replace runs
//! under an exclusive `flock` on `.production.lock` (temp file + rename inside). On S3 this needs
//! conditional writes (`If-Match`/`If-None-Match`: AWS S3, MinIO, R2); see docs/model-registry.md.
//!
//! # Files
//! This file opens the store and reads versions (get, list, download). Beside it in
//! `registry/`: `types` (ids, manifest, production record, decisions), `location`, `publish`,
//! `promotion` (the rule, the conditional replace, rollback, the decision log), `watch`, and
//! `resolve` (local weights, labels and config for `serve`/`detect`).

mod location;
mod promotion;
mod publish;
mod resolve;
#[cfg(test)]
mod tests;
mod types;
mod watch;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::progress::Progress;

pub use location::{parse_location, Location};
pub use resolve::{resolve_model, resolve_model_blocking, ResolvedModel};
pub use types::{
    Architecture, EvalMetrics, Metric, ModelVersion, NewVersion, PartitionRange, Production, ProductionAction,
    PromotionDecision, PromotionPolicy, TrainingData, VersionId, WeightsInfo,
};
pub use watch::ProductionWatch;

/// Version of the manifest format written into `model.json`.
pub const MANIFEST_FORMAT: u32 = 1;

/// File name of a version's weights.
pub const WEIGHTS_FILE: &str = "weights.safetensors";

/// File name of a version's manifest.
pub const MANIFEST_FILE: &str = "model.json";

/// The serving pointer's file name.
pub const PRODUCTION_FILE: &str = "production.json";

/// The reference that [`resolve_model`] reads as "whatever is in production".
pub const PRODUCTION_REF: &str = "production";

/// Where downloaded weights are cached unless told otherwise (`model.registry_cache_dir`).
pub const DEFAULT_CACHE_DIR: &str = "models/registry-cache";

/// Lock file that serializes promoters of a local registry.
const LOCK_FILE: &str = ".production.lock";

/// Upload buffer: below it a single PUT, above it a multipart upload.
const UPLOAD_BUFFER: usize = 16 * 1024 * 1024;

/// Read size when hashing and copying weights.
const CHUNK: usize = 1 << 20;

/// Longest pause between `watch` polls after repeated failures (unless the interval is longer).
const MAX_WATCH_BACKOFF: Duration = Duration::from_secs(60);

/// Results of registry operations.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// Why a registry operation failed. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The location string cannot be turned into a store.
    #[error("model registry location `{location}` is not usable: {reason}")]
    Location {
        /// The location as given.
        location: String,
        /// What is wrong and what to write instead.
        reason: String,
    },
    /// Not a version id.
    #[error(
        "`{given}` is not a model version id (they look like v0003-20261128T181500Z-1a2b3c4d); \
         `attrstream model registry list` shows the versions"
    )]
    InvalidVersion {
        /// The text given.
        given: String,
    },
    /// The version has no manifest in this registry.
    #[error("version {version} is not in the model registry {location}{hint}")]
    NotFound {
        /// The version asked for.
        version: String,
        /// The registry.
        location: String,
        /// What is known about it (weights without a manifest, …) and what to do.
        hint: String,
    },
    /// A manifest exists but cannot be used.
    #[error(
        "manifest {path} is unreadable: {reason}; this version is damaged: publish its weights again \
         as a new version"
    )]
    CorruptManifest {
        /// Where the manifest is.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `production.json` exists but cannot be used.
    #[error(
        "{path} is unreadable: {reason}; set a version explicitly with \
         `attrstream model registry rollback VERSION`"
    )]
    CorruptProduction {
        /// Where the file is.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The stored weights do not hash to the manifest's sha256.
    #[error(
        "weights of {version} hash to sha256 {actual} but its manifest says {expected}: the stored \
         file is corrupt or was replaced; publish the weights again as a new version"
    )]
    ChecksumMismatch {
        /// The version.
        version: String,
        /// sha256 in the manifest.
        expected: String,
        /// sha256 of what was read.
        actual: String,
    },
    /// Another promoter changed `production.json` between our read and our write.
    #[error(
        "production.json of {location} changed while this command was deciding (it now names {current}); \
         nothing was changed: run the command again to decide against the new production version"
    )]
    Conflict {
        /// The registry.
        location: String,
        /// What production names now.
        current: String,
    },
    /// The store cannot do conditional writes, so promotion would not be safe.
    #[error(
        "the object store behind {location} refused a conditional write ({detail}); promotion needs \
         them so that two promoters cannot both win: use AWS S3, MinIO or another store with \
         If-Match/If-None-Match support, and do not set AWS_CONDITIONAL_PUT=disabled"
    )]
    NoConditionalWrites {
        /// The registry.
        location: String,
        /// The store's answer.
        detail: String,
    },
    /// Bad input to an operation (the message names it and says what to do).
    #[error("{0}")]
    Invalid(String),
    /// The object store failed.
    #[error(
        "cannot {action}: {error}; check the registry location and, for s3://, the AWS_* credentials, \
         region and endpoint"
    )]
    Store {
        /// What was being done, with the object's path.
        action: String,
        /// The store's error.
        error: object_store::Error,
    },
    /// A local file operation failed.
    #[error("cannot {action}: {error}")]
    Io {
        /// What was being done, with the file's path.
        action: String,
        /// The error.
        error: std::io::Error,
    },
}

// ---------------------------------------------------------------------------------------------
// The registry
// ---------------------------------------------------------------------------------------------

/// A model registry at one location; cheap to clone (the store is shared).
#[derive(Debug, Clone)]
pub struct ModelRegistry {
    /// The object store holding the registry.
    store: Arc<dyn ObjectStore>,
    /// Key prefix of the registry inside the store.
    root: String,
    /// The location as shown to users.
    location: String,
    /// For local directories: where the promotion lock file lives (the store cannot do
    /// conditional updates there).
    local_root: Option<PathBuf>,
    /// Recorded as who published, promoted or rolled back.
    actor: String,
}

impl ModelRegistry {
    /// Opens the registry at a directory (created if missing), `file:///dir` or
    /// `s3://bucket/prefix` (credentials, region and endpoint from `AWS_*`; conditional writes
    /// on unless `AWS_CONDITIONAL_PUT` says otherwise).
    pub fn open(location: &str) -> Result<Self> {
        let shown = location.trim().to_string();
        match parse_location(location)? {
            Location::Local(dir) => {
                std::fs::create_dir_all(&dir).map_err(|error| RegistryError::Io {
                    action: format!("create the registry directory {}", dir.display()),
                    error,
                })?;
                let dir = std::fs::canonicalize(&dir).map_err(|error| RegistryError::Io {
                    action: format!("resolve the registry directory {}", dir.display()),
                    error,
                })?;
                let store = LocalFileSystem::new_with_prefix(&dir).map_err(|e| RegistryError::Location {
                    location: shown.clone(),
                    reason: e.to_string(),
                })?;
                Ok(Self {
                    store: Arc::new(store),
                    root: String::new(),
                    location: shown,
                    local_root: Some(dir),
                    actor: default_actor(),
                })
            }
            Location::S3 { bucket, prefix } => {
                let mut builder = AmazonS3Builder::from_env().with_bucket_name(&bucket);
                if std::env::var_os("AWS_CONDITIONAL_PUT").is_none() {
                    builder = builder.with_conditional_put(S3ConditionalPut::ETagMatch);
                }
                let store = builder.build().map_err(|e| RegistryError::Location {
                    location: shown.clone(),
                    reason: format!("{e}; check the AWS_* environment (region, endpoint, credentials)"),
                })?;
                Self::from_store(Arc::new(store), &prefix, &shown)
            }
        }
    }

    /// A registry in memory (for tests and experiments; gone when dropped).
    pub fn in_memory() -> Self {
        Self {
            store: Arc::new(InMemory::new()),
            root: String::new(),
            location: "memory://".to_string(),
            local_root: None,
            actor: default_actor(),
        }
    }

    /// A registry under `prefix` of any object store that supports conditional puts
    /// (`PutMode::Create` and `PutMode::Update`); `location` is how messages name it.
    pub fn from_store(store: Arc<dyn ObjectStore>, prefix: &str, location: &str) -> Result<Self> {
        let root = prefix.trim_matches('/').to_string();
        ObjectPath::parse(&root).map_err(|e| RegistryError::Location {
            location: location.to_string(),
            reason: format!("prefix `{prefix}` is not a valid object path: {e}"),
        })?;
        Ok(Self {
            store,
            root,
            location: location.to_string(),
            local_root: None,
            actor: default_actor(),
        })
    }

    /// Names who acts in recorded decisions and manifests (default: `$USER@$HOSTNAME`).
    pub fn with_actor(mut self, actor: impl Into<String>) -> Self {
        let actor = actor.into();
        if !actor.trim().is_empty() {
            self.actor = actor;
        }
        self
    }

    /// The location as given to [`ModelRegistry::open`].
    pub fn location(&self) -> &str {
        &self.location
    }

    // ---- keys ----

    fn key(&self, relative: &str) -> ObjectPath {
        if self.root.is_empty() {
            ObjectPath::from(relative)
        } else {
            ObjectPath::from(format!("{}/{relative}", self.root))
        }
    }

    fn version_key(&self, version: &VersionId, file: &str) -> ObjectPath {
        self.key(&format!("versions/{version}/{file}"))
    }

    /// How a key is shown in messages: the location plus the path inside the registry.
    fn shown(&self, key: &ObjectPath) -> String {
        let key = key.as_ref();
        let relative = key
            .strip_prefix(self.root.as_str())
            .map(|k| k.trim_start_matches('/'))
            .unwrap_or(key);
        format!("{}/{relative}", self.location.trim_end_matches('/'))
    }

    fn store_error(&self, action: &str, key: &ObjectPath, error: object_store::Error) -> RegistryError {
        RegistryError::Store {
            action: format!("{action} {}", self.shown(key)),
            error,
        }
    }

    // ---- versions ----

    /// The manifest of `version`.
    pub async fn get(&self, version: &VersionId) -> Result<ModelVersion> {
        let key = self.version_key(version, MANIFEST_FILE);
        let bytes = match self.store.get(&key).await {
            Ok(r) => r.bytes().await.map_err(|e| self.store_error("read", &key, e))?,
            Err(object_store::Error::NotFound { .. }) => return Err(self.not_found(version).await),
            Err(e) => return Err(self.store_error("read", &key, e)),
        };
        let corrupt = |reason: String| RegistryError::CorruptManifest {
            path: self.shown(&key),
            reason,
        };
        let manifest: ModelVersion = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if manifest.version != *version {
            return Err(corrupt(format!("it names version {} instead", manifest.version)));
        }
        if manifest.format > MANIFEST_FORMAT {
            return Err(corrupt(format!(
                "manifest format {} is newer than this attrstream understands ({MANIFEST_FORMAT}); upgrade attrstream",
                manifest.format
            )));
        }
        Ok(manifest)
    }

    async fn not_found(&self, version: &VersionId) -> RegistryError {
        let weights_key = self.version_key(version, WEIGHTS_FILE);
        let hint = match self.store.head(&weights_key).await {
            Ok(_) => format!(
                ": its weights are there but its manifest {MANIFEST_FILE} is missing (an interrupted publish, \
                 or the manifest was deleted); publish the weights again"
            ),
            Err(_) => "; `attrstream model registry list` shows the versions".to_string(),
        };
        RegistryError::NotFound {
            version: version.to_string(),
            location: self.location.clone(),
            hint,
        }
    }

    /// Every readable version, oldest first. Folders without a manifest (a publish in progress)
    /// are not versions; unreadable manifests are skipped with a warning (`get` reports why).
    pub async fn list(&self) -> Result<Vec<ModelVersion>> {
        let prefix = self.key("versions");
        let listing = self
            .store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|e| self.store_error("list", &prefix, e))?;
        let mut ids: Vec<VersionId> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().and_then(|name| VersionId::parse(name).ok()))
            .collect();
        ids.sort();
        let found: Vec<Result<Option<ModelVersion>>> = futures::stream::iter(ids)
            .map(|id| async move {
                match self.get(&id).await {
                    Ok(m) => Ok(Some(m)),
                    Err(RegistryError::NotFound { .. }) => Ok(None),
                    Err(e @ RegistryError::CorruptManifest { .. }) => {
                        tracing::warn!(registry = %self.location, version = %id, "skipping version: {e}");
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            })
            .buffered(8)
            .collect()
            .await;
        let mut versions = Vec::new();
        for item in found {
            if let Some(m) = item? {
                versions.push(m);
            }
        }
        Ok(versions)
    }

    /// Copies a version's weights into `cache_dir` as `<sha256>.safetensors` (kept across runs,
    /// so a restarted service does not download again) and returns that path. The sha256 is
    /// checked on download and on every cache hit; a damaged cached copy is replaced.
    pub async fn download_weights(&self, version: &VersionId, cache_dir: &Path) -> Result<PathBuf> {
        let manifest = self.get(version).await?;
        let expected = manifest.weights.sha256.to_ascii_lowercase();
        if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RegistryError::CorruptManifest {
                path: self.shown(&self.version_key(version, MANIFEST_FILE)),
                reason: format!("weights.sha256 `{expected}` is not 64 hex digits"),
            });
        }
        let io = |action: String| move |error| RegistryError::Io { action, error };
        tokio::fs::create_dir_all(cache_dir)
            .await
            .map_err(io(format!("create the weights cache {}", cache_dir.display())))?;
        let target = cache_dir.join(format!("{expected}.safetensors"));
        if tokio::fs::try_exists(&target).await.unwrap_or(false) {
            let check = target.clone();
            match tokio::task::spawn_blocking(move || hash_file(&check)).await {
                Ok(Ok((sha, _))) if sha == expected => return Ok(target),
                Ok(Ok((sha, _))) => {
                    tracing::warn!(path = %target.display(), %sha, "cached weights are damaged; downloading again")
                }
                Ok(Err(e)) => {
                    tracing::warn!(path = %target.display(), "cached weights unreadable ({e}); downloading again")
                }
                Err(e) => tracing::warn!("hashing cached weights failed ({e}); downloading again"),
            }
        }
        let key = self.version_key(version, &manifest.weights.file);
        let result = self
            .store
            .get(&key)
            .await
            .map_err(|e| self.store_error("download", &key, e))?;
        let tmp = tempfile::Builder::new()
            .prefix(".download-")
            .tempfile_in(cache_dir)
            .map_err(io(format!("write into {}", cache_dir.display())))?;
        let mut out = tokio::fs::OpenOptions::new()
            .write(true)
            .open(tmp.path())
            .await
            .map_err(io(format!("write {}", tmp.path().display())))?;
        let mut hasher = Sha256::new();
        let progress = Progress::bytes("download", Some(result.meta.size));
        progress.set_message(format!("{version} {}", manifest.weights.file));
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.store_error("download", &key, e))?;
            hasher.update(&chunk);
            out.write_all(&chunk)
                .await
                .map_err(io(format!("write {}", tmp.path().display())))?;
            progress.inc(chunk.len() as u64);
        }
        progress.finish();
        out.sync_all()
            .await
            .map_err(io(format!("write {}", tmp.path().display())))?;
        drop(out);
        let actual = hex::encode(hasher.finalize());
        if actual != expected {
            return Err(RegistryError::ChecksumMismatch {
                version: version.to_string(),
                expected,
                actual,
            });
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
                .map_err(io(format!("set permissions on {}", tmp.path().display())))?;
        }
        tmp.persist(&target).map_err(|e| RegistryError::Io {
            action: format!("move the weights into {}", target.display()),
            error: e.error,
        })?;
        Ok(target)
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `$USER@$HOSTNAME` (or what of it is known).
fn default_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .unwrap_or_else(|_| "unknown".to_string());
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty());
    match host {
        Some(h) => format!("{user}@{h}"),
        None => user,
    }
}

/// sha256 (lowercase hex) and size of a file.
fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}
