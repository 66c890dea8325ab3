//! Loading a model by registry reference (`production` or a version id): local weights,
//! labels and config for `serve` and `detect`.

use std::path::{Path, PathBuf};

use super::{Architecture, ModelRegistry, ModelVersion, RegistryError, Result, VersionId, PRODUCTION_REF};

/// A registry version ready to load: what `serve`/`detect` need instead of a weights path.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    /// The version resolved.
    pub version: VersionId,
    /// Local copy of its weights (in the cache directory, sha256 checked).
    pub weights: PathBuf,
    /// Label map (index → name).
    pub labels: Vec<String>,
    /// Model configuration (JSON).
    pub config: serde_json::Value,
    /// The network.
    pub architecture: Architecture,
    /// The whole manifest.
    pub manifest: ModelVersion,
}

/// Resolves `reference` (`production` or a version id) to local weights in `cache_dir`.
pub async fn resolve_model(registry: &ModelRegistry, reference: &str, cache_dir: &Path) -> Result<ResolvedModel> {
    let version = if reference.trim() == PRODUCTION_REF {
        registry
            .production()
            .await?
            .ok_or_else(|| {
                RegistryError::Invalid(format!(
                    "the model registry {} has no production version yet; promote one with \
                     `attrstream model registry promote VERSION`",
                    registry.location()
                ))
            })?
            .version
    } else {
        VersionId::parse(reference.trim())?
    };
    let manifest = registry.get(&version).await?;
    let weights = registry.download_weights(&version, cache_dir).await?;
    Ok(ResolvedModel {
        version,
        weights,
        labels: manifest.labels.clone(),
        config: manifest.model_config.clone(),
        architecture: manifest.architecture,
        manifest,
    })
}

/// [`resolve_model`] for synchronous callers (start-up of `serve`, `detect`): opens the
/// registry at `location` and runs on a private runtime. Must not be called from async code.
pub fn resolve_model_blocking(location: &str, reference: &str, cache_dir: &Path) -> Result<ResolvedModel> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(RegistryError::Invalid(
            "resolve_model_blocking was called inside an async runtime; await resolve_model instead".into(),
        ));
    }
    let registry = ModelRegistry::open(location)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| RegistryError::Io {
            action: "start an async runtime".into(),
            error,
        })?;
    runtime.block_on(resolve_model(&registry, reference, cache_dir))
}
