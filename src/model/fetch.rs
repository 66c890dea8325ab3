//! `attrstream model fetch`: download a known checkpoint, check its hash, convert it.
//!
//! Known checkpoints are listed in [`KNOWN_CHECKPOINTS`]. Their URLs follow the torch.hub
//! convention: the hex digits after the last `-` of the file name are the first digits of
//! the file's sha256, which is checked after the download (a full `sha256` can be given
//! instead). Downloads go to a temporary file in the target folder, survive dropped
//! connections and 5xx answers (retried with exponential backoff, resuming with an HTTP
//! `Range` request where the server supports it), and are converted with
//! [`import_checkpoint`] into `<dir>/<name>.safetensors`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use backon::{BlockingRetryable, ExponentialBuilder};
use reqwest::blocking::Client;
use reqwest::header::{CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};

use crate::detection::FASTERRCNN_RESNET50_FPN;
use crate::model::import::{import_checkpoint, ImportOptions, ImportReport};
use crate::model::weights;
use crate::progress::{Progress, ProgressOptions, Unit};

/// A checkpoint `model fetch` knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownCheckpoint {
    /// Name on the command line and stem of the weights file.
    pub name: &'static str,
    /// Where to download it (torch.hub naming: `<name>-<sha256 prefix>.pth`).
    pub url: &'static str,
    /// Architecture of the weights.
    pub architecture: &'static str,
    /// One line for `model list`.
    pub description: &'static str,
}

/// The checkpoints `model fetch` knows by name.
pub const KNOWN_CHECKPOINTS: &[KnownCheckpoint] = &[KnownCheckpoint {
    name: "fasterrcnn_resnet50_fpn_coco",
    url: "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth",
    architecture: FASTERRCNN_RESNET50_FPN,
    description: "torchvision Faster R-CNN ResNet-50 FPN trained on COCO 2017 (box AP 37.0, 91 labels)",
}];

/// The known checkpoint called `name`.
pub fn known_checkpoint(name: &str) -> Option<&'static KnownCheckpoint> {
    KNOWN_CHECKPOINTS.iter().find(|c| c.name == name)
}

/// Where `fetch` puts the weights of `name` inside `dir`.
pub fn weights_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.safetensors"))
}

/// The sha256 prefix in a torch.hub file name (`...-258fb6c6.pth` gives `258fb6c6`).
pub fn hub_hash_prefix(url: &str) -> Option<String> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let file = path.rsplit('/').next()?;
    let (_, tail) = file.rsplit_once('-')?;
    let hash = tail.split('.').next()?;
    (hash.len() >= 6 && hash.len() <= 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| hash.to_string())
}

/// The hash a download must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedHash {
    /// The complete sha256, lowercase hex.
    Full(String),
    /// The first hex digits of the sha256 (torch.hub convention).
    Prefix(String),
}

impl ExpectedHash {
    /// Whether a full lowercase-hex sha256 matches.
    pub fn matches(&self, sha256: &str) -> bool {
        match self {
            ExpectedHash::Full(h) => sha256 == h,
            ExpectedHash::Prefix(p) => sha256.starts_with(p.as_str()),
        }
    }

    /// Parses a full sha256 given by the user (64 hex digits, any case).
    pub fn full(hex: &str) -> Result<Self> {
        let hex = hex.trim().to_ascii_lowercase();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("`{hex}` is not a sha256: expected 64 hex digits");
        }
        Ok(ExpectedHash::Full(hex))
    }
}

impl std::fmt::Display for ExpectedHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExpectedHash::Full(h) => f.write_str(h),
            ExpectedHash::Prefix(p) => write!(f, "{p}..."),
        }
    }
}

/// How often and how patiently transient failures are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: usize,
    /// Delay before the first retry; it doubles each time.
    pub min_delay: Duration,
    /// Longest delay between attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 5,
            min_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
        }
    }
}

/// Options of [`fetch`].
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Folder of the weights file (created if needed).
    pub dir: PathBuf,
    /// Download from here instead of the registry's URL (e.g. a mirror).
    pub url: Option<String>,
    /// Full sha256 the download must have, instead of the torch.hub prefix.
    pub sha256: Option<String>,
    /// Download and convert even if the weights file is already there.
    pub force: bool,
    /// Load the converted weights into the model before putting them in place.
    pub verify: bool,
    /// Show a progress bar on stderr (only drawn when stderr is a terminal; without one,
    /// progress goes to periodic log lines).
    pub progress: bool,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// Limit for establishing a connection.
    pub connect_timeout: Duration,
    /// Limit for each wait on the server (response headers, each read of the body).
    pub read_timeout: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            dir: PathBuf::from(crate::detection::DEFAULT_MODEL_DIR),
            url: None,
            sha256: None,
            force: false,
            verify: true,
            progress: true,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
        }
    }
}

/// What [`fetch`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FetchReport {
    /// The checkpoint's name.
    pub name: String,
    /// The weights file.
    pub output: PathBuf,
    /// Where the checkpoint came from.
    pub url: String,
    /// sha256 of the downloaded checkpoint (of the original, when nothing was downloaded).
    pub sha256: String,
    /// False when the weights file was already there with the expected hash.
    pub downloaded: bool,
    /// Bytes downloaded (0 when nothing was downloaded).
    pub bytes: u64,
    /// The conversion, when one happened.
    pub import: Option<ImportReport>,
}

/// Downloads checkpoint `name` (known, or any name with `options.url`), checks its hash and
/// converts it into `<dir>/<name>.safetensors`. Nothing is downloaded when that file
/// already holds weights converted from a checkpoint with the expected hash, unless
/// `options.force`.
pub fn fetch(name: &str, options: &FetchOptions) -> Result<FetchReport> {
    if name.is_empty()
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        || name.starts_with('.')
    {
        bail!("`{name}` is not a valid model name (letters, digits, `_`, `-` and `.` only)");
    }
    let known = known_checkpoint(name);
    let url = match (&options.url, known) {
        (Some(url), _) => url.clone(),
        (None, Some(k)) => k.url.to_string(),
        (None, None) => bail!(
            "unknown model `{name}`; known: {} (or give a download URL with --url)",
            KNOWN_CHECKPOINTS.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
        ),
    };
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("`{url}` is not an http(s) URL; to convert a local file use `attrstream model import FILE`");
    }
    let expected = match &options.sha256 {
        Some(hex) => ExpectedHash::full(hex)?,
        None => hub_hash_prefix(&url)
            .or_else(|| known.and_then(|k| hub_hash_prefix(k.url)))
            .map(ExpectedHash::Prefix)
            .ok_or_else(|| anyhow!("no hash to check {url} against: pass --sha256 with the file's full sha256"))?,
    };

    let output = weights_path(&options.dir, name);
    if !options.force {
        if let Some(sha256) = existing_match(&output, &expected) {
            tracing::info!(path = %output.display(), "weights already present with the expected hash; --force downloads again");
            return Ok(FetchReport {
                name: name.to_string(),
                output,
                url,
                sha256,
                downloaded: false,
                bytes: 0,
                import: None,
            });
        }
    }

    std::fs::create_dir_all(&options.dir).with_context(|| format!("cannot create folder {}", options.dir.display()))?;
    let mut part = tempfile::Builder::new()
        .prefix(&format!(".{name}-"))
        .suffix(".part")
        .tempfile_in(&options.dir)
        .with_context(|| format!("cannot write into {}", options.dir.display()))?;
    tracing::info!(%url, "downloading {name}");
    let (sha256, bytes) = download(&url, part.as_file_mut(), options)?;
    if !expected.matches(&sha256) {
        let kept = part.path().to_path_buf();
        part.close()
            .with_context(|| format!("cannot delete {}", kept.display()))?;
        bail!(
            "sha256 mismatch for {url}: expected {expected}, got {sha256}; the download is corrupt or the \
             server sent a different file, and it was deleted (retry, or pass --sha256 if the file is known to differ)"
        );
    }
    let mut import_options = ImportOptions::new(&output);
    import_options.source = Some(url.clone());
    import_options.source_sha256 = Some(sha256.clone());
    import_options.verify = options.verify;
    if let Some(k) = known {
        import_options.architecture = k.architecture.to_string();
    }
    let report = import_checkpoint(part.path(), &import_options)
        .with_context(|| format!("downloaded {url}, but converting it failed"))?;
    drop(part);
    Ok(FetchReport {
        name: name.to_string(),
        output,
        url,
        sha256,
        downloaded: true,
        bytes,
        import: Some(report),
    })
}

/// The recorded source sha256 of `output` when it matches `expected`.
fn existing_match(output: &Path, expected: &ExpectedHash) -> Option<String> {
    if !output.exists() {
        return None;
    }
    match weights::read_metadata(output) {
        Ok(meta) => match meta.source_sha256 {
            Some(sha) if expected.matches(&sha) => Some(sha),
            _ => {
                tracing::info!(path = %output.display(), "existing weights come from another checkpoint; replacing them");
                None
            }
        },
        Err(e) => {
            tracing::warn!(path = %output.display(), "existing weights are unreadable ({e}); replacing them");
            None
        }
    }
}

/// A failed download attempt: worth retrying or not.
#[derive(Debug)]
enum AttemptError {
    /// Connection problems, 5xx answers, interrupted transfers.
    Transient(anyhow::Error),
    /// Everything else (4xx answers, local I/O errors).
    Permanent(anyhow::Error),
}

impl AttemptError {
    fn into_inner(self) -> anyhow::Error {
        match self {
            AttemptError::Transient(e) | AttemptError::Permanent(e) => e,
        }
    }
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Transient(e) | AttemptError::Permanent(e) => write!(f, "{e:#}"),
        }
    }
}

/// State of one download across attempts.
struct Transfer<'a> {
    client: Client,
    url: &'a str,
    file: &'a mut File,
    /// Bytes in `file` so far (all of them hashed).
    received: u64,
    /// Size of the whole file, once a server said it.
    total: Option<u64>,
    /// ETag or Last-Modified of the first answer, so a resumed range comes from the same file.
    validator: Option<String>,
    hasher: Sha256,
    progress: Progress,
}

/// Downloads `url` into `file` with retries; returns its sha256 and size.
fn download(url: &str, file: &mut File, options: &FetchOptions) -> Result<(String, u64)> {
    let client = Client::builder()
        .user_agent(concat!("attrstream/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(options.connect_timeout)
        .timeout(options.read_timeout)
        .build()
        .context("cannot set up the HTTP client")?;
    let progress = Progress::with_options(
        "download",
        None,
        ProgressOptions {
            unit: Unit::Bytes,
            bar: options.progress,
            ..ProgressOptions::default()
        },
    );
    progress.set_message(url.rsplit('/').next().unwrap_or(url).to_string());
    let mut transfer = Transfer {
        client,
        url,
        file,
        received: 0,
        total: None,
        validator: None,
        hasher: Sha256::new(),
        progress,
    };
    let backoff = ExponentialBuilder::default()
        .with_min_delay(options.retry.min_delay)
        .with_max_delay(options.retry.max_delay)
        .with_max_times(options.retry.max_retries)
        .with_jitter();
    let result = (|| transfer.attempt())
        .retry(backoff)
        .when(|e| matches!(e, AttemptError::Transient(_)))
        .notify(|e, delay| tracing::warn!("download of {url} failed: {e}; retrying in {delay:.1?}"))
        .call();
    result.map_err(|e| e.into_inner().context(format!("cannot download {url}")))?;
    transfer.progress.finish();
    let sha256 = hex::encode(std::mem::take(&mut transfer.hasher).finalize());
    Ok((sha256, transfer.received))
}

impl Transfer<'_> {
    /// Forgets what was received, to download from the start.
    fn restart(&mut self) -> Result<(), AttemptError> {
        self.file
            .set_len(0)
            .and_then(|()| self.file.seek(SeekFrom::Start(0)).map(drop))
            .map_err(|e| AttemptError::Permanent(anyhow!("cannot truncate the temporary file: {e}")))?;
        self.received = 0;
        self.hasher = Sha256::new();
        self.progress.set_position(0);
        Ok(())
    }

    /// One request: from the start, or from `received` on with a `Range` request.
    fn attempt(&mut self) -> Result<(), AttemptError> {
        let mut request = self.client.get(self.url);
        let resuming = self.received > 0;
        if resuming {
            request = request.header(RANGE, format!("bytes={}-", self.received));
            if let Some(v) = &self.validator {
                request = request.header(IF_RANGE, v.as_str());
            }
        }
        let mut response = request.send().map_err(classify)?;
        let status = response.status();
        match status {
            StatusCode::PARTIAL_CONTENT if resuming => {
                let range = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_content_range);
                match range {
                    Some((start, total)) if start == self.received => {
                        if total.is_some() {
                            self.total = total;
                        }
                        tracing::info!(from = self.received, "resuming the download");
                    }
                    _ => {
                        self.restart()?;
                        return Err(AttemptError::Transient(anyhow!(
                            "the server resumed at the wrong place"
                        )));
                    }
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE if resuming => {
                if self.total == Some(self.received) {
                    return Ok(());
                }
                self.restart()?;
                return Err(AttemptError::Transient(anyhow!(
                    "the server refused to resume; starting over"
                )));
            }
            s if s.is_success() => {
                if resuming {
                    tracing::info!("the server cannot resume; starting over");
                    self.restart()?;
                }
                self.total = response.content_length();
                let header = |name| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                self.validator = header(ETAG)
                    .filter(|e| !e.starts_with("W/"))
                    .or_else(|| header(LAST_MODIFIED));
            }
            s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT || s == StatusCode::TOO_MANY_REQUESTS => {
                return Err(AttemptError::Transient(anyhow!("the server answered {s}")));
            }
            s => {
                return Err(AttemptError::Permanent(anyhow!(
                    "the server answered {s}; check the model name or the URL (a mirror can be given with --url)"
                )));
            }
        }
        if let Some(total) = self.total {
            self.progress.set_length(total);
        }
        self.progress.set_position(self.received);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match response.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(AttemptError::Transient(anyhow!(
                        "transfer interrupted after {} bytes: {e}",
                        self.received
                    )))
                }
            };
            self.file
                .write_all(&buf[..n])
                .map_err(|e| AttemptError::Permanent(anyhow!("cannot write the temporary file: {e}")))?;
            self.hasher.update(&buf[..n]);
            self.received += n as u64;
            self.progress.inc(n as u64);
        }
        match self.total {
            Some(total) if self.received < total => Err(AttemptError::Transient(anyhow!(
                "transfer interrupted: received {} of {total} bytes",
                self.received
            ))),
            Some(total) if self.received > total => {
                self.restart()?;
                Err(AttemptError::Transient(anyhow!(
                    "the server sent more than the {total} bytes it announced"
                )))
            }
            _ => self
                .file
                .flush()
                .map_err(|e| AttemptError::Permanent(anyhow!("cannot write the temporary file: {e}"))),
        }
    }
}

/// Sorts a request error into retryable or not.
fn classify(e: reqwest::Error) -> AttemptError {
    if e.is_builder() || e.is_redirect() {
        AttemptError::Permanent(anyhow!(e))
    } else {
        AttemptError::Transient(anyhow!(e))
    }
}

/// Parses `bytes START-END/TOTAL` (TOTAL may be `*`) into `(START, TOTAL)`.
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start.trim().parse().ok()?, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_prefix_from_file_name() {
        assert_eq!(
            hub_hash_prefix("https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth").as_deref(),
            Some("258fb6c6")
        );
        assert_eq!(
            hub_hash_prefix("http://mirror/x/model-abcdef12.pth?sig=1").as_deref(),
            Some("abcdef12")
        );
        assert_eq!(hub_hash_prefix("http://mirror/x/model.pth"), None);
        assert_eq!(hub_hash_prefix("http://mirror/x/my-model.pth"), None);
    }

    #[test]
    fn expected_hash_matching() -> Result<()> {
        let full = "258fb6c6".to_string() + &"0".repeat(56);
        assert!(ExpectedHash::Prefix("258fb6c6".into()).matches(&full));
        assert!(!ExpectedHash::Prefix("258fb6c7".into()).matches(&full));
        assert!(ExpectedHash::full(&full.to_uppercase())?.matches(&full));
        assert!(ExpectedHash::full("abc").is_err());
        Ok(())
    }

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("bytes 100-199/200"), Some((100, Some(200))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn registry_is_consistent() {
        for k in KNOWN_CHECKPOINTS {
            assert!(hub_hash_prefix(k.url).is_some(), "{} has no hash in its URL", k.name);
        }
        assert!(known_checkpoint("fasterrcnn_resnet50_fpn_coco").is_some());
    }
}
