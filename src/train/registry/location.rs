//! Parsing a registry location: a directory, `file:///dir` or `s3://bucket/prefix`.

use std::path::PathBuf;

use super::{RegistryError, Result};

/// A parsed registry location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local directory.
    Local(PathBuf),
    /// An S3 (or S3-compatible) bucket and key prefix.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix without leading or trailing slash (may be empty).
        prefix: String,
    },
}

/// Parses a location without touching the store: a path, `file:///abs/dir` or
/// `s3://bucket/prefix`. Used by configuration validation and [`super::ModelRegistry::open`].
pub fn parse_location(location: &str) -> Result<Location> {
    let bad = |reason: &str| RegistryError::Location {
        location: location.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = location.trim();
    if trimmed.is_empty() {
        return Err(bad("it is empty; give a directory, file:///dir or s3://bucket/prefix"));
    }
    let Some((scheme, _)) = trimmed.split_once("://") else {
        return Ok(Location::Local(PathBuf::from(trimmed)));
    };
    let url = url::Url::parse(trimmed).map_err(|e| bad(&format!("not a URL ({e})")))?;
    match scheme.to_ascii_lowercase().as_str() {
        "file" => {
            let path = url
                .to_file_path()
                .map_err(|_| bad("file:// URLs need an absolute local path, e.g. file:///srv/models"))?;
            Ok(Location::Local(path))
        }
        "s3" => {
            let bucket = url.host_str().unwrap_or_default().to_string();
            if bucket.is_empty() {
                return Err(bad("no bucket; write s3://bucket/prefix"));
            }
            if !url.username().is_empty() || url.password().is_some() || url.port().is_some() {
                return Err(bad(
                    "no credentials or port in the URL; use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT",
                ));
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err(bad("no query or fragment; write s3://bucket/prefix"));
            }
            let prefix = url.path().trim_matches('/').to_string();
            if prefix.split('/').any(|p| p == "." || p == "..") {
                return Err(bad("`.` and `..` are not allowed in the prefix"));
            }
            Ok(Location::S3 { bucket, prefix })
        }
        other => Err(bad(&format!(
            "unsupported scheme `{other}`; use a directory, file:///dir or s3://bucket/prefix"
        ))),
    }
}
