//! Confluent Schema Registry client, and the two things the service builds on it: the input
//! decoder (framed or raw Avro value → [`ProductImageEvent`], writer schemas cached by id) and
//! the lookup of the schema id our output records are framed with.
//!
//! Only the REST calls a Kafka Avro serde needs are implemented: register, look up, fetch by
//! id. Registry failures that are not the message's fault (unreachable, timeout, 5xx, bad
//! credentials) are kept apart from "this id does not exist", so the service retries the
//! former and dead-letters only the latter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use apache_avro::Schema;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use url::Url;

use super::codec::{self, DecodeError};
use super::types::ProductImageEvent;
use super::wire;

/// Content type of schema-registry requests (and the first one we accept in answers).
const REGISTRY_CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// How much of an error body goes into an error message.
const MAX_BODY_IN_ERROR: usize = 500;

/// A failed schema-registry call, with the URL, status and body so the message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request did not get an answer (connection refused, DNS, TLS, timeout).
    #[error("schema registry request {method} {url} failed: {detail}; check that the registry URL is right and the registry is reachable from here")]
    Unreachable {
        /// HTTP method.
        method: Method,
        /// Request URL (password removed).
        url: String,
        /// The transport error, with its causes.
        detail: String,
    },
    /// The registry answered with an error status.
    #[error("schema registry {method} {url} answered {status}: {body}; {hint}")]
    Status {
        /// HTTP method.
        method: Method,
        /// Request URL (password removed).
        url: String,
        /// HTTP status.
        status: StatusCode,
        /// Confluent `error_code` from the body, when there is one (40401 subject not found, …).
        error_code: Option<i64>,
        /// The body (shortened).
        body: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// A success status with a body that is not what the Confluent API returns.
    #[error("schema registry {method} {url} answered with an unexpected body ({reason}): {body}; is this URL a Confluent-compatible schema registry?")]
    BadResponse {
        /// HTTP method.
        method: Method,
        /// Request URL (password removed).
        url: String,
        /// What is wrong with it.
        reason: String,
        /// The body (shortened).
        body: String,
    },
    /// The registry returned a schema we cannot use (not Avro, references, does not parse).
    #[error("schema id {id} from the schema registry is not usable: {reason}")]
    UnusableSchema {
        /// The schema id.
        id: u32,
        /// Why.
        reason: String,
    },
}

impl RegistryError {
    /// Whether the registry said the subject, version or schema does not exist (HTTP 404).
    pub fn is_not_found(&self) -> bool {
        matches!(self, RegistryError::Status { status, .. } if *status == StatusCode::NOT_FOUND)
    }
}

/// An async client of a Confluent-compatible schema registry (Confluent, Redpanda, Apicurio's
/// Confluent API, Karapace). Schemas fetched by id are cached for the process lifetime:
/// registry ids are immutable.
pub struct SchemaRegistry {
    base: Url,
    client: reqwest::Client,
    auth: Option<(String, String)>,
    by_id: Mutex<HashMap<u32, Arc<Schema>>>,
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistry")
            .field("url", &redacted(&self.base))
            .field("user", &self.auth.as_ref().map(|(user, _)| user))
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct IdAnswer {
    id: u32,
}

#[derive(Deserialize)]
struct SchemaAnswer {
    schema: String,
    #[serde(default, rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error_code: Option<i64>,
}

impl SchemaRegistry {
    /// A client for the registry at `base_url` (e.g. `http://schema-registry:8081`, a path
    /// prefix is kept), with optional HTTP basic auth (`user`, `password`) and a timeout for
    /// each request (connecting included).
    pub fn new(base_url: &str, basic_auth: Option<(String, String)>, timeout: Duration) -> anyhow::Result<Self> {
        let mut base = Url::parse(base_url).with_context(|| {
            format!("schema registry URL {base_url:?} is not a valid URL (expected e.g. http://host:8081)")
        })?;
        anyhow::ensure!(
            matches!(base.scheme(), "http" | "https"),
            "schema registry URL {} must start with http:// or https://",
            redacted(&base)
        );
        anyhow::ensure!(
            base.host().is_some(),
            "schema registry URL {} has no host",
            redacted(&base)
        );
        // Credentials in the URL become basic auth, unless given explicitly.
        let mut auth = basic_auth;
        if auth.is_none() && !base.username().is_empty() {
            auth = Some((
                percent_decode(base.username()),
                base.password().map(percent_decode).unwrap_or_default(),
            ));
        }
        let _ = base.set_username("");
        let _ = base.set_password(None);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .context("cannot build the HTTP client for the schema registry")?;
        Ok(SchemaRegistry {
            base,
            client,
            auth,
            by_id: Mutex::new(HashMap::new()),
        })
    }

    /// The registry's base URL (without credentials), for messages.
    pub fn url(&self) -> String {
        redacted(&self.base)
    }

    /// Registers `schema_json` under `subject` (idempotent: an already registered schema
    /// returns its existing id). Fails with 409 when the subject's compatibility rules
    /// reject the schema.
    pub async fn register(&self, subject: &str, schema_json: &str) -> Result<u32, RegistryError> {
        let url = self.url_for(&["subjects", subject, "versions"]);
        let body = serde_json::json!({ "schema": schema_json }).to_string();
        let (_, text) = self.call(Method::POST, url.clone(), Some(body)).await?;
        parse_answer::<IdAnswer>(&url, Method::POST, &text).map(|a| a.id)
    }

    /// The id of `schema_json` if it is registered under `subject`, `None` if the subject or
    /// the schema is not there (404).
    pub async fn lookup(&self, subject: &str, schema_json: &str) -> Result<Option<u32>, RegistryError> {
        let url = self.url_for(&["subjects", subject]);
        let body = serde_json::json!({ "schema": schema_json }).to_string();
        match self.call(Method::POST, url.clone(), Some(body)).await {
            Ok((_, text)) => parse_answer::<IdAnswer>(&url, Method::POST, &text).map(|a| Some(a.id)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The Avro schema with registry id `id` (cached: ids never change meaning). Fails with a
    /// 404 [`RegistryError::Status`] when the id does not exist and with
    /// [`RegistryError::UnusableSchema`] when it is not a self-contained Avro schema.
    pub async fn schema_by_id(&self, id: u32) -> Result<Schema, RegistryError> {
        self.shared_schema_by_id(id).await.map(|s| Schema::clone(&s))
    }

    /// [`SchemaRegistry::schema_by_id`] without copying the cached schema (the input
    /// decoder's hot path).
    pub async fn shared_schema_by_id(&self, id: u32) -> Result<Arc<Schema>, RegistryError> {
        if let Some(schema) = self.cached(id) {
            return Ok(schema);
        }
        let url = self.url_for(&["schemas", "ids", &id.to_string()]);
        let (_, text) = self.call(Method::GET, url.clone(), None).await?;
        let answer = parse_answer::<SchemaAnswer>(&url, Method::GET, &text)?;
        if let Some(kind) = answer
            .schema_type
            .as_deref()
            .filter(|k| !k.eq_ignore_ascii_case("AVRO"))
        {
            return Err(RegistryError::UnusableSchema {
                id,
                reason: format!("it is a {kind} schema, not Avro"),
            });
        }
        if !answer.references.is_empty() {
            return Err(RegistryError::UnusableSchema {
                id,
                reason:
                    "it uses schema references, which attrstream does not resolve; register a self-contained schema"
                        .into(),
            });
        }
        let schema = Schema::parse_str(&answer.schema).map_err(|e| RegistryError::UnusableSchema {
            id,
            reason: format!("it does not parse as Avro: {e}"),
        })?;
        let schema = Arc::new(schema);
        self.by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, schema.clone());
        Ok(schema)
    }

    /// A schema already fetched by [`SchemaRegistry::shared_schema_by_id`], without a request.
    pub fn cached(&self, id: u32) -> Option<Arc<Schema>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    fn url_for(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Sends a request; a success status returns the body, anything else an error that says
    /// what went wrong and what to do.
    async fn call(
        &self,
        method: Method,
        url: Url,
        body: Option<String>,
    ) -> Result<(StatusCode, String), RegistryError> {
        let shown = redacted(&url);
        let mut request = self.client.request(method.clone(), url).header(
            ACCEPT,
            "application/vnd.schemaregistry.v1+json, application/vnd.schemaregistry+json, application/json",
        );
        if let Some((user, password)) = &self.auth {
            request = request.basic_auth(user, Some(password));
        }
        if let Some(body) = body {
            request = request.header(CONTENT_TYPE, REGISTRY_CONTENT_TYPE).body(body);
        }
        let unreachable = |e: reqwest::Error| RegistryError::Unreachable {
            method: method.clone(),
            url: shown.clone(),
            detail: error_chain(&e),
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let text = response.text().await.map_err(unreachable)?;
        if status.is_success() {
            return Ok((status, text));
        }
        let error_code = serde_json::from_str::<ErrorAnswer>(&text)
            .ok()
            .and_then(|e| e.error_code);
        Err(RegistryError::Status {
            method,
            url: shown,
            status,
            error_code,
            body: shorten(&text),
            hint: hint(status, error_code),
        })
    }
}

fn parse_answer<T: for<'de> Deserialize<'de>>(url: &Url, method: Method, text: &str) -> Result<T, RegistryError> {
    serde_json::from_str(text).map_err(|e| RegistryError::BadResponse {
        method,
        url: redacted(url),
        reason: e.to_string(),
        body: shorten(text),
    })
}

fn hint(status: StatusCode, error_code: Option<i64>) -> &'static str {
    match (status.as_u16(), error_code) {
        (401, _) => "the registry needs credentials: check the configured user and password",
        (403, _) => "the credentials are not allowed to do this: check the registry ACLs for this subject",
        (404, Some(40401)) => "the subject does not exist: register the schema first",
        (404, Some(40403)) => "the schema does not exist in the registry",
        (404, _) => "not found: check that the URL is the registry's base URL",
        (409, _) => {
            "the schema is incompatible with the subject's earlier versions under its compatibility level; \
             fix the schema (see schemas/README.md) or change the subject's compatibility"
        }
        (422, _) => "the registry rejected the schema as invalid",
        (429, _) => "the registry is rate-limiting: retry later",
        (500..=599, _) => "the registry failed: retry later and check its logs",
        _ => "unexpected answer from the schema registry",
    }
}

/// Whether a registry error means the registry could not be asked (retry later), as opposed
/// to an answer about the id itself.
fn is_unavailable(e: &RegistryError) -> bool {
    match e {
        RegistryError::Unreachable { .. } | RegistryError::BadResponse { .. } => true,
        RegistryError::Status { status, .. } => *status != StatusCode::NOT_FOUND,
        RegistryError::UnusableSchema { .. } => false,
    }
}

/// Decodes `%XX` escapes (user info in a URL is kept percent-encoded by [`Url`]).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `url` without user name and password.
fn redacted(url: &Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.to_string()
}

fn shorten(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(MAX_BODY_IN_ERROR) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None if text.is_empty() => "(empty body)".into(),
        None => text.to_owned(),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// How the service learns the writer schema of its input messages.
pub enum InputSchemas {
    /// Confluent-framed values; the writer schema of each id comes from the registry.
    Registry(Arc<SchemaRegistry>),
    /// Confluent-framed values that must all carry schema id `id`, written with
    /// `writer_schema` (no registry needed); any other id is `unknown_schema`.
    Fixed {
        /// The only accepted schema id.
        id: u32,
        /// The schema that id stands for.
        writer_schema: Schema,
    },
    /// Bare Avro bodies without framing, all written with `writer_schema` (producers that do
    /// not use a schema registry).
    Raw {
        /// The producers' schema.
        writer_schema: Schema,
    },
}

/// A writer schema ready for decoding: parsed once, with the writer-equals-reader test done once.
struct Writer {
    schema: Arc<Schema>,
    resolve: bool,
}

impl Writer {
    fn new(schema: Arc<Schema>) -> Arc<Writer> {
        let resolve = codec::needs_resolution(&schema, codec::product_image_event_schema());
        Arc::new(Writer { schema, resolve })
    }

    fn decode(&self, body: &[u8], id: Option<u32>) -> Result<ProductImageEvent, DecodeError> {
        let result = codec::decode_event_with(body, &self.schema, self.resolve);
        match id {
            Some(id) => result.map_err(|e| e.with_schema_id(id)),
            None => result,
        }
    }
}

/// An id the registry said does not exist (or is unusable), remembered for a while so a
/// burst of such messages does not become a burst of registry requests.
struct Unknown {
    reason: String,
    since: Instant,
}

/// How long an unknown schema id is answered from memory before the registry is asked again.
const UNKNOWN_ID_TTL: Duration = Duration::from_secs(30);

enum Mode {
    Registry(Arc<SchemaRegistry>),
    Fixed { id: u32, writer: Arc<Writer> },
    Raw { writer: Arc<Writer> },
}

/// Turns input message values into [`ProductImageEvent`]s: unframes, finds the writer schema
/// (registry, fixed or raw), decodes with resolution to our schema and checks the rules.
/// Writer schemas are cached by id, so the registry is asked once per id.
pub struct InputDecoder {
    mode: Mode,
    writers: Mutex<HashMap<u32, Arc<Writer>>>,
    unknown: Mutex<HashMap<u32, Unknown>>,
}

impl InputDecoder {
    /// A decoder for the given schema source.
    pub fn new(schemas: InputSchemas) -> Self {
        let mode = match schemas {
            InputSchemas::Registry(registry) => Mode::Registry(registry),
            InputSchemas::Fixed { id, writer_schema } => Mode::Fixed {
                id,
                writer: Writer::new(Arc::new(writer_schema)),
            },
            InputSchemas::Raw { writer_schema } => Mode::Raw {
                writer: Writer::new(Arc::new(writer_schema)),
            },
        };
        InputDecoder {
            mode,
            writers: Mutex::new(HashMap::new()),
            unknown: Mutex::new(HashMap::new()),
        }
    }

    /// Decodes one message value. Errors carry their dead-letter kind
    /// ([`DecodeError::kind`]); [`DecodeError::RegistryUnavailable`] has none: retry it.
    pub async fn decode(&self, value: &[u8]) -> Result<ProductImageEvent, DecodeError> {
        if let Some(done) = self.decode_cached(value) {
            return done;
        }
        // Only the registry mode with an id not yet cached gets here.
        let Mode::Registry(registry) = &self.mode else {
            unreachable!("fixed and raw modes never need the registry")
        };
        let (id, body) = wire::unframe(value)?;
        let writer = match registry.shared_schema_by_id(id).await {
            Ok(schema) => {
                let writer = Writer::new(schema);
                lock(&self.writers).insert(id, writer.clone());
                writer
            }
            Err(e) if is_unavailable(&e) => {
                return Err(DecodeError::RegistryUnavailable {
                    id,
                    reason: e.to_string(),
                });
            }
            Err(e) => {
                let reason = match &e {
                    RegistryError::Status { .. } => format!("the schema registry {} does not know it", registry.url()),
                    other => other.to_string(),
                };
                lock(&self.unknown).insert(
                    id,
                    Unknown {
                        reason: reason.clone(),
                        since: Instant::now(),
                    },
                );
                return Err(DecodeError::UnknownSchema { id, reason });
            }
        };
        writer.decode(body, Some(id))
    }

    /// The synchronous fast path: decodes when no registry request is needed (fixed and raw
    /// modes, a framing error, or an id already cached), `None` otherwise (call
    /// [`InputDecoder::decode`]).
    pub fn decode_cached(&self, value: &[u8]) -> Option<Result<ProductImageEvent, DecodeError>> {
        match &self.mode {
            Mode::Raw { writer } => Some(writer.decode(value, None)),
            Mode::Fixed { id: expected, writer } => Some(match wire::unframe(value) {
                Err(e) => Err(e.into()),
                Ok((id, body)) if id == *expected => writer.decode(body, Some(id)),
                Ok((id, _)) => Err(DecodeError::UnknownSchema {
                    id,
                    reason: format!(
                        "only schema id {expected} is accepted (fixed input schema id in the configuration); \
                         configure the schema registry to accept several writer schemas"
                    ),
                }),
            }),
            Mode::Registry(_) => {
                let (id, body) = match wire::unframe(value) {
                    Ok(framed) => framed,
                    Err(e) => return Some(Err(e.into())),
                };
                if let Some(writer) = lock(&self.writers).get(&id).cloned() {
                    return Some(writer.decode(body, Some(id)));
                }
                let mut unknown = lock(&self.unknown);
                match unknown.get(&id) {
                    Some(u) if u.since.elapsed() < UNKNOWN_ID_TTL => Some(Err(DecodeError::UnknownSchema {
                        id,
                        reason: u.reason.clone(),
                    })),
                    Some(_) => {
                        unknown.remove(&id);
                        None
                    }
                    None => None,
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The schema id to frame output records of `subject` with: `fixed_id` when configured;
/// otherwise the id of `schema_json` in the registry, registering it first when it is
/// missing and `auto_register` allows. Called once at start-up for each output topic.
pub async fn resolve_output_schema_id(
    registry: Option<&SchemaRegistry>,
    subject: &str,
    schema_json: &str,
    auto_register: bool,
    fixed_id: Option<u32>,
) -> anyhow::Result<u32> {
    if let Some(id) = fixed_id {
        return Ok(id);
    }
    let Some(registry) = registry else {
        anyhow::bail!(
            "no schema id for subject {subject}: configure a schema registry URL, or a fixed schema id for this topic"
        );
    };
    if let Some(id) = registry
        .lookup(subject, schema_json)
        .await
        .with_context(|| format!("cannot look up the schema of subject {subject}"))?
    {
        return Ok(id);
    }
    anyhow::ensure!(
        auto_register,
        "the schema for subject {subject} is not registered in {} and auto-registration is off: register it \
         (POST {{\"schema\": <schemas/*.avsc as a JSON string>}} to {}subjects/{subject}/versions), enable \
         auto-registration, or configure a fixed schema id",
        registry.url(),
        registry.url().trim_end_matches('/').to_owned() + "/"
    );
    registry
        .register(subject, schema_json)
        .await
        .with_context(|| format!("cannot register the schema of subject {subject}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_a_path_prefix_and_escape_subjects() {
        let r = SchemaRegistry::new("http://u:p%40ss@registry:8081/prefix/", None, Duration::from_secs(1)).unwrap();
        assert_eq!(
            r.url_for(&["subjects", "a/b c-value", "versions"]).as_str(),
            "http://registry:8081/prefix/subjects/a%2Fb%20c-value/versions"
        );
        assert_eq!(r.auth, Some(("u".into(), "p@ss".into())));
        assert_eq!(r.url(), "http://registry:8081/prefix/");
        assert!(!format!("{r:?}").contains("p@ss"));
    }

    #[test]
    fn bad_urls_are_rejected_with_the_reason() {
        let err = SchemaRegistry::new("registry:8081", None, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("http"), "{err}");
        let err = SchemaRegistry::new("not a url", None, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("not a valid URL"), "{err}");
    }

    #[test]
    fn unavailable_and_unknown_are_told_apart() {
        let status = |code: u16| RegistryError::Status {
            method: Method::GET,
            url: "u".into(),
            status: StatusCode::from_u16(code).unwrap(),
            error_code: None,
            body: String::new(),
            hint: "",
        };
        assert!(!is_unavailable(&status(404)));
        assert!(is_unavailable(&status(500)));
        assert!(is_unavailable(&status(401)));
        assert!(!is_unavailable(&RegistryError::UnusableSchema {
            id: 1,
            reason: String::new()
        }));
    }

    #[test]
    fn fixed_mode_needs_no_registry() {
        let event = ProductImageEvent {
            event_id: "e".into(),
            product_id: "p".into(),
            image: crate::events::ImageSource::Uri("file:///a.jpg".into()),
            content_type: None,
            metadata: Default::default(),
            event_time_ms: None,
        };
        let body = codec::encode_event(&event);
        let schema = codec::product_image_event_schema().clone();
        let fixed = InputDecoder::new(InputSchemas::Fixed {
            id: 5,
            writer_schema: schema.clone(),
        });
        assert_eq!(fixed.decode_cached(&wire::frame(5, &body)).unwrap().unwrap(), event);
        let err = fixed.decode_cached(&wire::frame(6, &body)).unwrap().unwrap_err();
        assert_eq!(err.kind(), Some(crate::events::error_kinds::UNKNOWN_SCHEMA), "{err}");
        let raw = InputDecoder::new(InputSchemas::Raw { writer_schema: schema });
        assert_eq!(raw.decode_cached(&body).unwrap().unwrap(), event);
    }
}
