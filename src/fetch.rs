//! Fetching an event's image bytes: inline, `file://`, `http(s)://` and `s3://`.
//!
//! Events come from producers we do not control, so every URI is untrusted input. The
//! [`ImageFetcher`] therefore bounds everything it does:
//! * size: [`FetchConfig::max_bytes`] is checked before reading (file metadata, HTTP
//!   `Content-Length`, S3 object size) *and* while streaming, so a lying or endless body is cut off;
//! * time: a timeout per attempt, a bounded number of retries (only for failures that can heal:
//!   timeouts, connection errors, HTTP 429 and 5xx), and a concurrency limit;
//! * reach: an SSRF guard refuses loopback, private, link-local (cloud metadata), CGNAT,
//!   multicast, documentation and other special-purpose addresses, for IP literals, for every
//!   address a hostname resolves to (checked inside the HTTP client's resolver, so the address
//!   that was checked is the address that is connected to: no DNS rebinding window) and for every
//!   redirect hop; `file://` is off unless a root directory is configured, and paths cannot
//!   escape that root through `..` or symlinks.
//!
//! Failures are [`FetchError`]s whose [`kind`](FetchError::kind) is one of
//! [`crate::events::error_kinds`], ready for the dead-letter record.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use backon::{ExponentialBuilder, Retryable as _};
use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore as _, RetryConfig};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;
use tokio::sync::Semaphore;
use url::{Host, Url};

use crate::events::error_kinds;
use crate::events::ImageSource;

/// The config key that turns the SSRF guard off; named in every refusal so operators know
/// what to change.
const ALLOW_PRIVATE_KEY: &str = "fetch.allow_private_addresses";
/// The config key that enables `file://`; named in refusals.
const FILE_ROOT_KEY: &str = "fetch.file_root";
/// The config key of the size limit; named in refusals.
const MAX_BYTES_KEY: &str = "fetch.max_bytes";
/// Most redirects followed for one HTTP fetch.
pub const MAX_REDIRECTS: usize = 5;
/// Upper bound of the delay between two retries (unless `retry_backoff` itself is larger).
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(2);
/// Most S3 bucket clients kept; bucket names come from events, so the cache must be bounded.
const MAX_CACHED_BUCKETS: usize = 64;

/// Settings of the image fetcher (the `fetch` section of the service configuration).
///
/// Every field has a default suitable for production, so an empty section is valid.
/// S3 credentials are deliberately not here: they come from the standard `AWS_*` environment
/// variables (or the instance/pod identity), so they never end up in config files or logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    /// Time limit of one attempt (connect, headers and body), e.g. `"10s"`. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Time limit for establishing a connection, e.g. `"3s"`. Default 3 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Largest image accepted, in bytes, for every source (inline included). Default 32 MiB.
    pub max_bytes: u64,
    /// Retries after the first attempt, only for failures that may heal: timeouts, connection
    /// errors, HTTP 429 and 5xx (never other 4xx). Default 3 (so at most 4 attempts).
    pub retries: u32,
    /// Delay before the first retry; it doubles per retry with random jitter, capped at 2 s
    /// (or at this value if larger). Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Most fetches (file, HTTP, S3 requests) in flight at once in this fetcher. Default 32.
    pub max_concurrency: usize,
    /// Turns the SSRF guard off: allow loopback, private, link-local (cloud metadata),
    /// CGNAT and other special-purpose addresses. Default false; only enable it when image
    /// hosts are on a private network you trust.
    pub allow_private_addresses: bool,
    /// Directory `file://` URIs may read from (after resolving `..` and symlinks). Default
    /// unset: `file://` URIs are refused.
    pub file_root: Option<PathBuf>,
    /// S3-compatible endpoint (MinIO, Ceph, …) such as `http://minio:9000`; when set, requests
    /// are path-style and plain http is allowed. Default unset: AWS S3.
    pub s3_endpoint: Option<String>,
    /// S3 region; overrides `AWS_REGION`/`AWS_DEFAULT_REGION`. Default `us-east-1`.
    pub s3_region: String,
    /// `User-Agent` header sent to HTTP servers and S3. Default `attrstream/<version>`.
    pub user_agent: String,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            max_bytes: 32 * 1024 * 1024,
            retries: 3,
            retry_backoff: Duration::from_millis(100),
            max_concurrency: 32,
            allow_private_addresses: false,
            file_root: None,
            s3_endpoint: None,
            s3_region: "us-east-1".to_string(),
            user_agent: concat!("attrstream/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

impl FetchConfig {
    /// Checks the settings, with errors that name the offending key.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.timeout.is_zero(), "fetch.timeout must be greater than zero");
        anyhow::ensure!(
            !self.connect_timeout.is_zero(),
            "fetch.connect_timeout must be greater than zero"
        );
        anyhow::ensure!(self.max_bytes > 0, "fetch.max_bytes must be greater than zero");
        anyhow::ensure!(self.max_concurrency > 0, "fetch.max_concurrency must be at least 1");
        anyhow::ensure!(
            self.max_concurrency <= Semaphore::MAX_PERMITS,
            "fetch.max_concurrency is too large (at most {})",
            Semaphore::MAX_PERMITS
        );
        anyhow::ensure!(!self.s3_region.is_empty(), "fetch.s3_region must not be empty");
        if let Some(endpoint) = &self.s3_endpoint {
            let url = Url::parse(endpoint)
                .with_context(|| format!("fetch.s3_endpoint {endpoint:?} is not a URL (e.g. http://minio:9000)"))?;
            anyhow::ensure!(
                matches!(url.scheme(), "http" | "https"),
                "fetch.s3_endpoint {endpoint:?} must be an http:// or https:// URL"
            );
        }
        Ok(())
    }
}

/// The bytes of one fetched image.
#[derive(Debug, Clone)]
pub struct FetchedImage {
    /// The encoded image, exactly as stored (no decompression or decoding).
    pub bytes: Bytes,
    /// Wall time of the fetch, retries and waiting for a concurrency slot included
    /// (reported as `StageTimings::fetch_ms`).
    pub elapsed: Duration,
}

/// Why an image could not be fetched: a stable machine-readable kind for the dead-letter
/// record and alerting, and a message for people saying what happened and what to do.
#[derive(Debug, Clone)]
pub struct FetchError {
    kind: &'static str,
    message: String,
    /// Whether another attempt may succeed (timeouts, connection errors, 429, 5xx).
    retryable: bool,
}

impl FetchError {
    fn new(kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retryable: false,
        }
    }

    fn retryable(kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retryable: true,
        }
    }

    /// One of [`crate::events::error_kinds`] (`missing_image`, `blocked_address`, …).
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// The human-readable detail (the same text as `Display`).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for FetchError {}

/// Decides whether the SSRF guard refuses an address: `Some(reason)` names the kind of
/// address (e.g. `"loopback"`), `None` allows it. [`blocked_address_reason`] is the guard's.
#[doc(hidden)]
pub type AddressClassifier = fn(IpAddr) -> Option<&'static str>;

/// Fetches image bytes for events, with limits, retries and the SSRF guard (see the module
/// documentation). Cheap to clone: clones share the HTTP connection pool, the S3 clients and
/// the concurrency limit.
#[derive(Clone)]
pub struct ImageFetcher {
    inner: Arc<Inner>,
}

struct Inner {
    config: FetchConfig,
    /// Canonical `file_root`.
    file_root: Option<PathBuf>,
    /// One pooled client for every HTTP fetch.
    http: reqwest::Client,
    /// `None` when `allow_private_addresses` is set.
    classifier: Option<AddressClassifier>,
    permits: Semaphore,
    s3: Mutex<HashMap<String, Arc<AmazonS3>>>,
    backoff: ExponentialBuilder,
}

impl fmt::Debug for ImageFetcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageFetcher")
            .field("config", &self.inner.config)
            .field("file_root", &self.inner.file_root)
            .finish_non_exhaustive()
    }
}

impl ImageFetcher {
    /// Builds a fetcher: validates the config, canonicalizes `file_root` (it must exist) and
    /// creates the shared HTTP client.
    pub fn new(config: FetchConfig) -> anyhow::Result<Self> {
        Self::with_address_classifier(config, blocked_address_reason)
    }

    /// Like [`ImageFetcher::new`] with a different SSRF classifier (ignored when
    /// `allow_private_addresses` is set). Exists only so tests can exempt their local server
    /// and still exercise the guard on redirects; services use `new`.
    #[doc(hidden)]
    pub fn with_address_classifier(config: FetchConfig, classifier: AddressClassifier) -> anyhow::Result<Self> {
        config.validate()?;
        let file_root = match &config.file_root {
            Some(root) => Some(std::fs::canonicalize(root).with_context(|| {
                format!(
                    "fetch.file_root {} cannot be opened (it must be an existing directory)",
                    root.display()
                )
            })?),
            None => None,
        };
        if let Some(root) = &file_root {
            anyhow::ensure!(root.is_dir(), "fetch.file_root {} is not a directory", root.display());
        }
        let classifier = (!config.allow_private_addresses).then_some(classifier);

        // Environment proxies are ignored on purpose: through a proxy the guard would check the
        // proxy's address instead of the image host's.
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .user_agent(config.user_agent.clone())
            .no_proxy()
            .redirect(redirect_policy(classifier));
        if let Some(classify) = classifier {
            builder = builder.dns_resolver(Arc::new(GuardedResolver { classify }));
        }
        let http = builder.build().context("building the HTTP client for image fetching")?;

        let max_delay = MAX_RETRY_BACKOFF.max(config.retry_backoff);
        let backoff = ExponentialBuilder::default()
            .with_min_delay(config.retry_backoff)
            .with_max_delay(max_delay)
            .with_factor(2.0)
            .with_max_times(config.retries as usize)
            .with_jitter();

        Ok(Self {
            inner: Arc::new(Inner {
                permits: Semaphore::new(config.max_concurrency),
                config,
                file_root,
                http,
                classifier,
                s3: Mutex::new(HashMap::new()),
                backoff,
            }),
        })
    }

    /// The settings this fetcher was built with.
    pub fn config(&self) -> &FetchConfig {
        &self.inner.config
    }

    /// Fetches the bytes of `source`. Inline images are returned as they are (still subject to
    /// `max_bytes`); URIs are fetched by scheme (`file`, `http`, `https`, `s3`).
    pub async fn fetch(&self, source: &ImageSource) -> Result<FetchedImage, FetchError> {
        let start = Instant::now();
        let bytes = match source {
            ImageSource::Inline(data) => {
                self.check_size(data.len() as u64, "the inline image")?;
                Bytes::copy_from_slice(data)
            }
            ImageSource::Uri(uri) => self.fetch_uri(uri).await?,
        };
        Ok(FetchedImage {
            bytes,
            elapsed: start.elapsed(),
        })
    }

    async fn fetch_uri(&self, uri: &str) -> Result<Bytes, FetchError> {
        let url = Url::parse(uri.trim()).map_err(|e| {
            FetchError::new(
                error_kinds::UNSUPPORTED_URI,
                format!(
                    "image URI {:?} is not a valid URI ({e}); use file://, http://, https:// or s3:// URIs",
                    truncate(uri, 200)
                ),
            )
        })?;
        match url.scheme() {
            "http" | "https" => self.fetch_http(url).await,
            "file" => self.fetch_file(&url).await,
            "s3" => self.fetch_s3(&url).await,
            other => Err(FetchError::new(
                error_kinds::UNSUPPORTED_URI,
                format!(
                    "image URI {} uses the unsupported scheme {other:?}; use file://, http://, https:// or s3://",
                    redact(&url)
                ),
            )),
        }
    }

    fn check_size(&self, size: u64, what: &str) -> Result<(), FetchError> {
        let limit = self.inner.config.max_bytes;
        if size > limit {
            return Err(too_large(what, Some(size), limit));
        }
        Ok(())
    }

    async fn permit(&self) -> tokio::sync::SemaphorePermit<'_> {
        // The semaphore is never closed.
        self.inner.permits.acquire().await.expect("fetch semaphore closed")
    }

    // ---- http(s) ----

    async fn fetch_http(&self, url: Url) -> Result<Bytes, FetchError> {
        if url.host().is_none() {
            return Err(FetchError::new(
                error_kinds::UNSUPPORTED_URI,
                format!("image URI {} has no host", redact(&url)),
            ));
        }
        if let Some(classify) = self.inner.classifier {
            check_ip_literal(&url, classify)?;
        }
        (|| self.http_attempt(&url))
            .retry(self.inner.backoff)
            .sleep(tokio::time::sleep)
            .when(|e: &FetchError| e.retryable)
            .notify(|e: &FetchError, delay: Duration| {
                tracing::debug!(url = %redact(&url), kind = e.kind, error = %e.message, ?delay, "retrying image fetch");
            })
            .await
    }

    async fn http_attempt(&self, url: &Url) -> Result<Bytes, FetchError> {
        let _permit = self.permit().await;
        let shown = redact(url);
        let mut response = self
            .inner
            .http
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "image/*, */*;q=0.5")
            .send()
            .await
            .map_err(|e| self.http_error(&shown, &e))?;

        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
            return Err(FetchError::new(
                error_kinds::MISSING_IMAGE,
                format!("image {shown} does not exist (HTTP {status}); fix the URI in the event"),
            ));
        }
        if !status.is_success() {
            let retryable = status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
            let advice = if retryable {
                "the server is failing or throttling; retried, check the image host"
            } else {
                "the request was refused; check the URI and the server's access rules"
            };
            return Err(FetchError {
                kind: error_kinds::FETCH_HTTP_STATUS,
                message: format!("image {shown} answered HTTP {status} ({advice})"),
                retryable,
            });
        }
        let limit = self.inner.config.max_bytes;
        if let Some(length) = response.content_length() {
            if length > limit {
                return Err(too_large(&format!("image {shown}"), Some(length), limit));
            }
        }
        let capacity = response.content_length().unwrap_or(64 * 1024).min(limit) as usize;
        let mut body = BytesMut::with_capacity(capacity);
        while let Some(chunk) = response.chunk().await.map_err(|e| self.http_error(&shown, &e))? {
            if (body.len() + chunk.len()) as u64 > limit {
                // Dropping the response closes the connection: the rest is never read.
                return Err(too_large(&format!("image {shown}"), None, limit));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    fn http_error(&self, shown: &str, error: &reqwest::Error) -> FetchError {
        if let Some(blocked) = find_source::<GuardRefusal>(error) {
            return FetchError::new(blocked.kind, blocked.message.clone());
        }
        if error.is_timeout() {
            return FetchError::retryable(
                error_kinds::FETCH_TIMEOUT,
                format!(
                    "fetching image {shown} took longer than fetch.timeout ({}) per attempt ({} attempt(s) allowed); \
                     check the image host or raise fetch.timeout",
                    humantime_serde::re::humantime::format_duration(self.inner.config.timeout),
                    self.inner.config.retries + 1
                ),
            );
        }
        if error.is_builder() {
            return FetchError::new(
                error_kinds::UNSUPPORTED_URI,
                format!("image URI {shown} cannot be requested: {}", error_chain(error)),
            );
        }
        let what = if error.is_connect() {
            "connecting to the server failed"
        } else {
            "the request failed"
        };
        FetchError::retryable(
            error_kinds::FETCH_FAILED,
            format!(
                "fetching image {shown}: {what}: {}; check that the host is reachable",
                error_chain(error)
            ),
        )
    }

    // ---- file ----

    async fn fetch_file(&self, url: &Url) -> Result<Bytes, FetchError> {
        let Some(root) = &self.inner.file_root else {
            return Err(FetchError::new(
                error_kinds::UNSUPPORTED_URI,
                format!(
                    "image URI {} uses file://, which is disabled; set {FILE_ROOT_KEY} to the directory images may be read from",
                    redact(url)
                ),
            ));
        };
        let path = url.to_file_path().map_err(|()| {
            FetchError::new(
                error_kinds::UNSUPPORTED_URI,
                format!(
                    "image URI {} is not a local file path (file:///absolute/path, no host)",
                    redact(url)
                ),
            )
        })?;
        let timeout = self.inner.config.timeout;
        let _permit = self.permit().await;
        match tokio::time::timeout(timeout, self.read_file_under(root, &path)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::new(
                error_kinds::FETCH_TIMEOUT,
                format!(
                    "reading {} took longer than fetch.timeout ({}); check the file system",
                    path.display(),
                    humantime_serde::re::humantime::format_duration(timeout)
                ),
            )),
        }
    }

    async fn read_file_under(&self, root: &Path, path: &Path) -> Result<Bytes, FetchError> {
        let outside = || {
            FetchError::new(
                error_kinds::UNSUPPORTED_URI,
                format!(
                    "{} is outside {FILE_ROOT_KEY} ({}) once `..` and symlinks are resolved; only files under it can be read",
                    path.display(),
                    root.display()
                ),
            )
        };
        let canonical = match tokio::fs::canonicalize(path).await {
            Ok(canonical) => canonical,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Say "missing" only for paths that would be inside the root, so that the
                // answer does not reveal which files exist elsewhere.
                return Err(if existing_ancestor_within(root, path).await {
                    FetchError::new(
                        error_kinds::MISSING_IMAGE,
                        format!("image file {} does not exist; fix the URI in the event", path.display()),
                    )
                } else {
                    outside()
                });
            }
            Err(e) => {
                return Err(FetchError::new(
                    error_kinds::FETCH_FAILED,
                    format!("cannot resolve image file {}: {e}", path.display()),
                ))
            }
        };
        if !is_within(root, &canonical) {
            return Err(outside());
        }
        let io_error = |e: std::io::Error| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound {
                error_kinds::MISSING_IMAGE
            } else {
                error_kinds::FETCH_FAILED
            };
            FetchError::new(kind, format!("cannot read image file {}: {e}", path.display()))
        };
        let file = tokio::fs::File::open(&canonical).await.map_err(io_error)?;
        let metadata = file.metadata().await.map_err(io_error)?;
        if !metadata.is_file() {
            return Err(FetchError::new(
                error_kinds::MISSING_IMAGE,
                format!(
                    "{} is not a regular file; file:// URIs must name image files",
                    path.display()
                ),
            ));
        }
        let what = format!("image file {}", path.display());
        self.check_size(metadata.len(), &what)?;
        // The file may grow after the metadata check: read at most one byte over the limit.
        let limit = self.inner.config.max_bytes;
        let mut data = Vec::with_capacity(metadata.len() as usize);
        file.take(limit.saturating_add(1))
            .read_to_end(&mut data)
            .await
            .map_err(io_error)?;
        if data.len() as u64 > limit {
            return Err(too_large(&what, None, limit));
        }
        Ok(Bytes::from(data))
    }

    // ---- s3 ----

    async fn fetch_s3(&self, url: &Url) -> Result<Bytes, FetchError> {
        let (bucket, key) = parse_s3_url(url)?;
        let store = self.s3_store(&bucket)?;
        let shown = format!("s3://{bucket}/{key}");
        let _permit = self.permit().await;
        // object_store retries the request itself (configured from our settings).
        let result = store
            .get(&key)
            .await
            .map_err(|e| s3_error(&shown, e, &self.inner.config))?;
        self.check_size(result.meta.size, &format!("image {shown}"))?;
        let limit = self.inner.config.max_bytes;
        let mut body = BytesMut::with_capacity(result.meta.size as usize);
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| s3_error(&shown, e, &self.inner.config))?;
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(too_large(&format!("image {shown}"), None, limit));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    fn s3_store(&self, bucket: &str) -> Result<Arc<AmazonS3>, FetchError> {
        let mut cache = self.inner.s3.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(store) = cache.get(bucket) {
            return Ok(store.clone());
        }
        let config = &self.inner.config;
        // Credentials, session tokens etc. come from AWS_* variables (never from our config).
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_region(config.s3_region.clone())
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: config.retry_backoff,
                    max_backoff: MAX_RETRY_BACKOFF.max(config.retry_backoff),
                    base: 2.0,
                },
                max_retries: config.retries as usize,
                retry_timeout: (config.timeout + MAX_RETRY_BACKOFF.max(config.retry_backoff)) * (config.retries + 1),
            })
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                format!("{}ms", config.timeout.as_millis()),
            )
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                format!("{}ms", config.connect_timeout.as_millis()),
            )
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::UserAgent),
                config.user_agent.clone(),
            );
        if let Some(endpoint) = &config.s3_endpoint {
            builder = builder
                .with_endpoint(endpoint.clone())
                .with_virtual_hosted_style_request(false)
                .with_allow_http(true);
        }
        let store = Arc::new(builder.build().map_err(|e| {
            FetchError::new(
                error_kinds::FETCH_FAILED,
                format!(
                    "cannot set up S3 access for bucket {bucket:?}: {e}; check fetch.s3_* and the AWS_* environment"
                ),
            )
        })?);
        if cache.len() >= MAX_CACHED_BUCKETS {
            cache.clear();
        }
        cache.insert(bucket.to_string(), store.clone());
        Ok(store)
    }
}

// ---- SSRF guard ----

/// Why the SSRF guard refuses `ip`, or `None` when it is an ordinary public unicast address.
///
/// Refused: unspecified, loopback, private (RFC 1918, unique-local fc00::/7), link-local
/// (169.254/16 with the cloud metadata service, fe80::/10), shared/CGNAT 100.64/10,
/// broadcast, multicast, documentation, benchmarking, reserved and protocol-assignment
/// ranges, deprecated site-local fec0::/10; IPv6 forms that embed an IPv4 address
/// (IPv4-mapped, IPv4-compatible, NAT64 64:ff9b::/96, 6to4 2002::/16) are judged by that
/// IPv4 address. Public so that configuration checks and tests can use the same rules.
pub fn blocked_address_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => blocked_v6(v6),
    }
}

fn blocked_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    let reason = match (a, b, c) {
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_broadcast() => "broadcast",
        (0, _, _) => "\"this network\", 0.0.0.0/8",
        (10, _, _) => "private, 10.0.0.0/8",
        (100, 64..=127, _) => "shared/CGNAT, 100.64.0.0/10",
        (127, _, _) => "loopback",
        (169, 254, _) => "link-local, 169.254.0.0/16, incl. cloud metadata",
        (172, 16..=31, _) => "private, 172.16.0.0/12",
        (192, 0, 0) => "IETF protocol-assignment, 192.0.0.0/24",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation, TEST-NET",
        (192, 88, 99) => "6to4 relay anycast, 192.88.99.0/24",
        (192, 168, _) => "private, 192.168.0.0/16",
        (198, 18..=19, _) => "benchmarking, 198.18.0.0/15",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved, 240.0.0.0/4",
        _ => return None,
    };
    Some(reason)
}

fn blocked_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        return blocked_v4(v4);
    }
    let s = ip.segments();
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    let reason = match s {
        // ::a.b.c.d (deprecated IPv4-compatible); :: and ::1 were handled above.
        [0, 0, 0, 0, 0, 0, _, _] => "deprecated IPv4-compatible IPv6, ::/96",
        // NAT64 well-known prefix: judged by the IPv4 address it translates to.
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => {
            return blocked_v4(embedded_v4(hi, lo));
        }
        [0x64, 0xff9b, 1, ..] => "NAT64 local-use, 64:ff9b:1::/48",
        [0x100, 0, 0, 0, ..] => "discard-only, 100::/64",
        [0x2001, 0xdb8, ..] => "documentation, 2001:db8::/32",
        [0x2002, hi, lo, ..] => {
            return blocked_v4(embedded_v4(hi, lo));
        }
        [first, ..] if first & 0xfff0 == 0x3ff0 => "documentation, 3fff::/20",
        [first, ..] if first & 0xfe00 == 0xfc00 => "unique-local/private, fc00::/7",
        [first, ..] if first & 0xffc0 == 0xfe80 => "link-local, fe80::/10",
        [first, ..] if first & 0xffc0 == 0xfec0 => "deprecated site-local, fec0::/10",
        [first, ..] if first & 0xff00 == 0xff00 => "multicast",
        _ => return None,
    };
    Some(reason)
}

/// A refusal raised inside reqwest (resolver or redirect policy) and recovered from the
/// error's source chain.
#[derive(Debug)]
struct GuardRefusal {
    kind: &'static str,
    message: String,
}

impl fmt::Display for GuardRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for GuardRefusal {}

/// The refusal text. `subject` is what was refused: a redacted URL, or `host NAME` in the
/// resolver (which does not see the URL); `resolved` says the address came from DNS.
fn blocked_message(subject: &str, ip: IpAddr, reason: &str, resolved: bool) -> String {
    let what = if resolved {
        format!("it resolves to {ip}, which is not a public address ({reason})")
    } else {
        format!("{ip} is not a public address ({reason})")
    };
    format!("{subject} is refused by the SSRF guard: {what}; if this host is trusted, set {ALLOW_PRIVATE_KEY} = true")
}

/// Refuses a URL whose host is a blocked IP literal (hostnames are checked by the resolver;
/// IP literals never reach it).
fn check_ip_literal(url: &Url, classify: AddressClassifier) -> Result<(), FetchError> {
    let ip = match url.host() {
        Some(Host::Ipv4(ip)) => IpAddr::V4(ip),
        Some(Host::Ipv6(ip)) => IpAddr::V6(ip),
        Some(Host::Domain(_)) => return Ok(()),
        None => {
            return Err(FetchError::new(
                error_kinds::UNSUPPORTED_URI,
                format!("image URI {} has no host", redact(url)),
            ))
        }
    };
    match classify(ip) {
        Some(reason) => Err(FetchError::new(
            error_kinds::BLOCKED_ADDRESS,
            blocked_message(&format!("image URI {}", redact(url)), ip, reason, false),
        )),
        None => Ok(()),
    }
}

/// The decision for one redirect hop: `next` is where the server sends us, `previous` the
/// URLs fetched so far (the original first). Errors are [`GuardRefusal`]-shaped `FetchError`s.
fn check_redirect(next: &Url, previous: usize, classify: Option<AddressClassifier>) -> Result<(), FetchError> {
    if previous > MAX_REDIRECTS {
        return Err(FetchError::new(
            error_kinds::FETCH_FAILED,
            format!(
                "image fetch was redirected more than {MAX_REDIRECTS} times (last to {}); fix the URI",
                redact(next)
            ),
        ));
    }
    if !matches!(next.scheme(), "http" | "https") {
        return Err(FetchError::new(
            error_kinds::UNSUPPORTED_URI,
            format!("image fetch was redirected to {}, which is not http(s)", redact(next)),
        ));
    }
    match classify {
        Some(classify) => check_ip_literal(next, classify),
        None => Ok(()),
    }
}

fn redirect_policy(classify: Option<AddressClassifier>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        match check_redirect(attempt.url(), attempt.previous().len(), classify) {
            Ok(()) => attempt.follow(),
            Err(e) => attempt.error(GuardRefusal {
                kind: e.kind,
                message: e.message,
            }),
        }
    })
}

/// DNS resolver for the HTTP client that refuses a hostname if ANY of its addresses is
/// blocked. The client connects only to the addresses returned here, so what was checked is
/// what is connected to.
struct GuardedResolver {
    classify: AddressClassifier,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let classify = self.classify;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            for addr in &addrs {
                if let Some(reason) = classify(addr.ip()) {
                    let message = blocked_message(&format!("host {host}"), addr.ip(), reason, true);
                    return Err(Box::new(GuardRefusal {
                        kind: error_kinds::BLOCKED_ADDRESS,
                        message,
                    }) as _);
                }
            }
            if addrs.is_empty() {
                return Err(format!("{host} resolves to no address").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

// ---- file helpers ----

/// Whether `path` lies under `root`, component-wise and without `..` (both should be
/// canonical; `/data/imagesX` is not under `/data/images`).
fn is_within(root: &Path, path: &Path) -> bool {
    path.starts_with(root) && !path.components().any(|c| matches!(c, Component::ParentDir))
}

/// For a path that does not exist: whether its deepest existing ancestor, canonicalized, is
/// under `root` (so a missing file behind a symlink that leaves the root counts as outside).
async fn existing_ancestor_within(root: &Path, path: &Path) -> bool {
    for ancestor in path.ancestors().skip(1) {
        if let Ok(canonical) = tokio::fs::canonicalize(ancestor).await {
            return is_within(root, &canonical);
        }
    }
    false
}

// ---- s3 helpers ----

/// Splits `s3://bucket/key` into a validated bucket name and object path.
fn parse_s3_url(url: &Url) -> Result<(String, object_store::path::Path), FetchError> {
    let bad = |why: &str| {
        FetchError::new(
            error_kinds::UNSUPPORTED_URI,
            format!("image URI {} is not a usable s3://bucket/key URI: {why}", redact(url)),
        )
    };
    let bucket = url.host_str().unwrap_or_default();
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !valid_bucket {
        return Err(bad(
            "the bucket name must be 3-63 lowercase letters, digits, dots or hyphens",
        ));
    }
    if url.port().is_some() || !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "no port or credentials allowed (configure fetch.s3_endpoint and AWS_* instead)",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("percent-encode '?' and '#' in the key"));
    }
    let key = url.path().trim_start_matches('/');
    if key.is_empty() {
        return Err(bad("the key is empty"));
    }
    let key = object_store::path::Path::from_url_path(key).map_err(|e| bad(&e.to_string()))?;
    Ok((bucket.to_string(), key))
}

fn s3_error(shown: &str, error: object_store::Error, config: &FetchConfig) -> FetchError {
    use object_store::client::HttpErrorKind;
    match &error {
        object_store::Error::NotFound { .. } => {
            return FetchError::new(
                error_kinds::MISSING_IMAGE,
                format!("image {shown} does not exist; fix the URI in the event"),
            )
        }
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            return FetchError::new(
                error_kinds::FETCH_HTTP_STATUS,
                format!(
                    "access to image {shown} was denied ({}); check the AWS_* credentials and the bucket policy",
                    error_chain(&error)
                ),
            )
        }
        _ => {}
    }
    match find_source::<object_store::client::HttpError>(&error).map(|e| e.kind()) {
        Some(HttpErrorKind::Timeout) => FetchError::new(
            error_kinds::FETCH_TIMEOUT,
            format!(
                "fetching image {shown} took longer than fetch.timeout ({}) per attempt ({} attempt(s) allowed); check the S3 endpoint",
                humantime_serde::re::humantime::format_duration(config.timeout),
                config.retries + 1
            ),
        ),
        Some(_) => FetchError::new(
            error_kinds::FETCH_FAILED,
            format!("fetching image {shown} failed: {}; check the S3 endpoint and network", error_chain(&error)),
        ),
        // No transport error underneath: the server answered with an error status.
        None => FetchError::new(
            error_kinds::FETCH_HTTP_STATUS,
            format!(
                "fetching image {shown} failed: {}; check the object, the S3 endpoint and the credentials",
                error_chain(&error).trim_end_matches([' ', ':'])
            ),
        ),
    }
}

// ---- shared helpers ----

fn too_large(what: &str, size: Option<u64>, limit: u64) -> FetchError {
    let size = match size {
        Some(size) => format!("is {size} bytes, more than"),
        None => "is larger than".to_string(),
    };
    FetchError::new(
        error_kinds::FETCH_TOO_LARGE,
        format!("{what} {size} {MAX_BYTES_KEY} allows ({limit} bytes); shrink the image or raise {MAX_BYTES_KEY}"),
    )
}

/// The URL without credentials, query or fragment (they may hold secrets such as presigned
/// signatures), for messages and logs.
fn redact(url: &Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((index, _)) => &text[..index],
        None => text,
    }
}

/// The first error of type `T` in `error`'s source chain (itself included).
fn find_source<'a, T: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// `error: cause: cause…`, without repeating identical texts.
fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        current = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_classifier_table() {
        let cases: &[(&str, bool)] = &[
            // IPv4
            ("8.8.8.8", false),
            ("1.1.1.1", false),
            ("93.184.216.34", false),
            ("0.0.0.0", true),
            ("0.1.2.3", true),
            ("127.0.0.1", true),
            ("127.255.255.254", true),
            ("10.0.0.1", true),
            ("10.255.255.255", true),
            ("172.15.255.255", false),
            ("172.16.0.1", true),
            ("172.31.255.255", true),
            ("172.32.0.1", false),
            ("192.168.1.1", true),
            ("192.169.0.1", false),
            ("169.254.169.254", true),
            ("169.254.0.1", true),
            ("100.63.255.255", false),
            ("100.64.0.1", true),
            ("100.127.255.255", true),
            ("100.128.0.1", false),
            ("255.255.255.255", true),
            ("224.0.0.1", true),
            ("239.255.255.250", true),
            ("240.0.0.1", true),
            ("192.0.2.10", true),
            ("198.51.100.7", true),
            ("203.0.113.9", true),
            ("198.18.0.1", true),
            ("192.0.0.8", true),
            // IPv6
            ("::", true),
            ("::1", true),
            ("fe80::1", true),
            ("febf::1", true),
            ("fec0::1", true),
            ("fc00::1", true),
            ("fd12:3456::1", true),
            ("ff02::1", true),
            ("2001:db8::1", true),
            ("3fff::1", true),
            ("100::1", true),
            ("2606:4700:4700::1111", false),
            ("2001:4860:4860::8888", false),
            // IPv4-mapped / embedded forms
            ("::ffff:127.0.0.1", true),
            ("::ffff:7f00:1", true),
            ("::ffff:10.1.2.3", true),
            ("::ffff:169.254.169.254", true),
            ("::ffff:192.168.0.1", true),
            ("::ffff:100.64.0.1", true),
            ("::ffff:8.8.8.8", false),
            ("::127.0.0.1", true),
            ("::8.8.8.8", true),
            ("64:ff9b::a9fe:a9fe", true),
            ("64:ff9b::808:808", false),
            ("2002:7f00:1::", true),
            ("2002:0808:0808::1", false),
        ];
        for (text, blocked) in cases {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(
                blocked_address_reason(ip).is_some(),
                *blocked,
                "{text}: got {:?}",
                blocked_address_reason(ip)
            );
        }
    }

    #[test]
    fn ip_literal_hosts_are_checked_after_url_normalization() {
        for uri in [
            "http://127.0.0.1/x",
            "http://2130706433/x",
            "http://0x7f.1/x",
            "http://[::ffff:127.0.0.1]/x",
            "http://[::1]:8080/x",
            "http://169.254.169.254/latest/meta-data/",
            "https://10.0.0.1/x",
        ] {
            let url = Url::parse(uri).unwrap();
            let err = check_ip_literal(&url, blocked_address_reason).unwrap_err();
            assert_eq!(err.kind(), error_kinds::BLOCKED_ADDRESS, "{uri}");
            assert!(err.message().contains(ALLOW_PRIVATE_KEY), "{}", err.message());
        }
        for uri in ["http://8.8.8.8/x", "http://example.com/x", "http://localhost/x"] {
            check_ip_literal(&Url::parse(uri).unwrap(), blocked_address_reason).unwrap();
        }
    }

    #[test]
    fn redirect_decisions() {
        let public = Url::parse("https://images.example.com/a.jpg").unwrap();
        let metadata = Url::parse("http://169.254.169.254/latest/meta-data/").unwrap();
        let mapped = Url::parse("http://[::ffff:10.0.0.1]/").unwrap();
        check_redirect(&public, 1, Some(blocked_address_reason)).unwrap();
        let err = check_redirect(&metadata, 1, Some(blocked_address_reason)).unwrap_err();
        assert_eq!(err.kind(), error_kinds::BLOCKED_ADDRESS);
        assert!(err.message().contains("169.254.169.254"), "{}", err.message());
        assert_eq!(
            check_redirect(&mapped, 1, Some(blocked_address_reason))
                .unwrap_err()
                .kind(),
            "blocked_address"
        );
        // Guard off: private hops are followed.
        check_redirect(&metadata, 1, None).unwrap();
        // Hop limit, guard on or off.
        check_redirect(&public, MAX_REDIRECTS, None).unwrap();
        assert_eq!(
            check_redirect(&public, MAX_REDIRECTS + 1, None).unwrap_err().kind(),
            error_kinds::FETCH_FAILED
        );
        // Only http(s) hops.
        let file = Url::parse("file:///etc/passwd").unwrap();
        assert_eq!(
            check_redirect(&file, 1, None).unwrap_err().kind(),
            error_kinds::UNSUPPORTED_URI
        );
    }

    #[test]
    fn path_within_root() {
        let root = Path::new("/data/images");
        assert!(is_within(root, Path::new("/data/images/a.jpg")));
        assert!(is_within(root, Path::new("/data/images/sub/a.jpg")));
        assert!(is_within(root, Path::new("/data/images")));
        assert!(!is_within(root, Path::new("/data/imagesX/a.jpg")));
        assert!(!is_within(root, Path::new("/data/images/../secret")));
        assert!(!is_within(root, Path::new("/data/other/a.jpg")));
        assert!(!is_within(root, Path::new("/etc/passwd")));
    }

    #[tokio::test]
    async fn missing_paths_are_judged_by_their_existing_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let root = std::fs::canonicalize(&root).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();

        assert!(existing_ancestor_within(&root, &root.join("sub/missing.jpg")).await);
        assert!(existing_ancestor_within(&root, &root.join("missing/deeper.jpg")).await);
        assert!(!existing_ancestor_within(&root, &outside.join("missing.jpg")).await);
        #[cfg(unix)]
        assert!(!existing_ancestor_within(&root, &root.join("link/missing.jpg")).await);
    }

    #[test]
    fn s3_urls() {
        let (bucket, key) = parse_s3_url(&Url::parse("s3://my-bucket/dir/photo%201.jpg").unwrap()).unwrap();
        assert_eq!(bucket, "my-bucket");
        assert_eq!(key.as_ref(), "dir/photo 1.jpg");
        for bad in [
            "s3://My_Bucket/key",
            "s3://ab/key",
            "s3://bucket/",
            "s3://bucket:9000/key",
            "s3://user:pw@bucket/key",
            "s3://bucket/key?versionId=1",
        ] {
            let err = parse_s3_url(&Url::parse(bad).unwrap()).unwrap_err();
            assert_eq!(err.kind(), error_kinds::UNSUPPORTED_URI, "{bad}");
        }
    }

    #[test]
    fn redaction_hides_secrets() {
        let url = Url::parse("https://user:secret@host/a.jpg?X-Amz-Signature=abc#frag").unwrap();
        assert_eq!(redact(&url), "https://host/a.jpg");
    }

    #[test]
    fn config_defaults_and_keys() {
        let config: FetchConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(config, FetchConfig::default());
        assert_eq!(config.timeout, Duration::from_secs(10));
        assert_eq!(config.max_bytes, 32 * 1024 * 1024);
        assert!(!config.allow_private_addresses);
        let config: FetchConfig =
            serde_json::from_str(r#"{"timeout": "300ms", "retry_backoff": "1s", "file_root": "/tmp"}"#).unwrap();
        assert_eq!(config.timeout, Duration::from_millis(300));
        assert!(serde_json::from_str::<FetchConfig>(r#"{"secret_access_key": "x"}"#).is_err());
        config.validate().unwrap();
        assert!(FetchConfig {
            max_concurrency: 0,
            ..FetchConfig::default()
        }
        .validate()
        .is_err());
    }
}
