//! A small in-process Confluent Schema Registry for tests: the REST calls attrstream makes
//! (register, look up, fetch by id, latest version), on 127.0.0.1 with a free port, on its
//! own thread and tokio runtime so sync tests and `#[tokio::test]`s can both use it. Stops
//! when dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};

/// A running test registry; `url` is its base URL (`http://127.0.0.1:PORT`).
pub struct TestRegistry {
    /// Base URL to give to the client.
    pub url: String,
    state: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Shared {
    data: Mutex<Data>,
    /// Answer every request with 503 (a registry that is down but reachable).
    unavailable: AtomicBool,
    /// Required `Authorization` header value, when basic auth is on.
    auth: Option<String>,
    /// Requests served, by "METHOD path-pattern".
    requests: Mutex<HashMap<String, usize>>,
    total: AtomicUsize,
}

#[derive(Default)]
struct Data {
    /// Schema text and type by id (id = index + 1).
    schemas: Vec<(String, Option<String>)>,
    /// Schema ids of each subject's versions (version = index + 1).
    subjects: HashMap<String, Vec<u32>>,
}

impl Data {
    /// The id of `text` (same JSON, whitespace aside, means same schema), registering it if new.
    fn id_of(&mut self, text: &str, schema_type: Option<String>) -> u32 {
        let parsed = serde_json::from_str::<Value>(text).ok();
        let found = self.schemas.iter().position(|(t, ty)| {
            *ty == schema_type && (t == text || (parsed.is_some() && serde_json::from_str::<Value>(t).ok() == parsed))
        });
        match found {
            Some(i) => i as u32 + 1,
            None => {
                self.schemas.push((text.to_owned(), schema_type));
                self.schemas.len() as u32
            }
        }
    }

    fn find(&self, text: &str) -> Option<u32> {
        let parsed = serde_json::from_str::<Value>(text).ok()?;
        self.schemas
            .iter()
            .position(|(t, _)| serde_json::from_str::<Value>(t).ok().as_ref() == Some(&parsed))
            .map(|i| i as u32 + 1)
    }
}

impl TestRegistry {
    /// Starts a registry without authentication.
    pub fn start() -> TestRegistry {
        Self::spawn(Shared::default())
    }

    /// Starts a registry that answers 401 unless requests carry these basic-auth credentials.
    pub fn start_with_auth(user: &str, password: &str) -> TestRegistry {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        Self::spawn(Shared {
            auth: Some(format!("Basic {token}")),
            ..Shared::default()
        })
    }

    fn spawn(shared: Shared) -> TestRegistry {
        let state = Arc::new(shared);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind test registry");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = Router::new()
            .route("/subjects/{subject}/versions", post(register))
            .route("/subjects/{subject}", post(lookup))
            .route("/subjects/{subject}/versions/latest", get(latest))
            .route("/schemas/ids/{id}", get(by_id))
            .with_state(state.clone());
        let thread = std::thread::Builder::new()
            .name("test-registry".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = rx.await;
                        })
                        .await
                        .expect("test registry server");
                });
            })
            .expect("spawn test registry thread");
        TestRegistry {
            url,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// Makes every request answer 503 (true) or work again (false).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.state.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Adds a schema directly (no subject), e.g. a PROTOBUF one, and returns its id.
    pub fn insert_schema(&self, text: &str, schema_type: Option<&str>) -> u32 {
        self.state
            .data
            .lock()
            .unwrap()
            .id_of(text, schema_type.map(str::to_owned))
    }

    /// How many requests matched `route` (e.g. `"GET /schemas/ids/{id}"`).
    pub fn requests(&self, route: &str) -> usize {
        self.state.requests.lock().unwrap().get(route).copied().unwrap_or(0)
    }

    /// How many requests were served in all.
    pub fn total_requests(&self) -> usize {
        self.state.total.load(Ordering::SeqCst)
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/vnd.schemaregistry.v1+json")],
        body.to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, code: u32, message: &str) -> Response {
    answer(status, json!({ "error_code": code, "message": message }))
}

/// Counting, availability and authentication, common to every route.
fn gate(state: &Shared, route: &str, headers: &HeaderMap) -> Option<Response> {
    state.total.fetch_add(1, Ordering::SeqCst);
    *state.requests.lock().unwrap().entry(route.to_owned()).or_default() += 1;
    if state.unavailable.load(Ordering::SeqCst) {
        return Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            50003,
            "test registry is unavailable",
        ));
    }
    if let Some(expected) = &state.auth {
        let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if given != Some(expected.as_str()) {
            return Some(error(StatusCode::UNAUTHORIZED, 401, "Unauthorized"));
        }
    }
    None
}

/// The `schema` (and `schemaType`) of a request body, or the 422 answer's message.
fn schema_of(body: &str) -> Result<(String, Option<String>), String> {
    let request: Value = serde_json::from_str(body).map_err(|e| format!("body is not JSON: {e}"))?;
    let schema = request["schema"].as_str().ok_or("body has no \"schema\" string")?;
    let schema_type = request["schemaType"].as_str().map(str::to_owned);
    if schema_type.is_none() && serde_json::from_str::<Value>(schema).is_err() {
        return Err("Invalid schema: not JSON".into());
    }
    Ok((schema.to_owned(), schema_type))
}

fn invalid(message: String) -> Response {
    error(StatusCode::UNPROCESSABLE_ENTITY, 42201, &message)
}

async fn register(
    State(state): State<Arc<Shared>>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Some(r) = gate(&state, "POST /subjects/{subject}/versions", &headers) {
        return r;
    }
    let (schema, schema_type) = match schema_of(&body) {
        Ok(s) => s,
        Err(message) => return invalid(message),
    };
    let mut data = state.data.lock().unwrap();
    let id = data.id_of(&schema, schema_type);
    let versions = data.subjects.entry(subject).or_default();
    if !versions.contains(&id) {
        versions.push(id);
    }
    answer(StatusCode::OK, json!({ "id": id }))
}

async fn lookup(
    State(state): State<Arc<Shared>>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Some(r) = gate(&state, "POST /subjects/{subject}", &headers) {
        return r;
    }
    let (schema, _) = match schema_of(&body) {
        Ok(s) => s,
        Err(message) => return invalid(message),
    };
    let data = state.data.lock().unwrap();
    let Some(versions) = data.subjects.get(&subject) else {
        return error(StatusCode::NOT_FOUND, 40401, &format!("Subject '{subject}' not found."));
    };
    match data
        .find(&schema)
        .and_then(|id| versions.iter().position(|v| *v == id).map(|i| (id, i + 1)))
    {
        Some((id, version)) => answer(
            StatusCode::OK,
            json!({ "subject": subject, "id": id, "version": version, "schema": data.schemas[id as usize - 1].0 }),
        ),
        None => error(StatusCode::NOT_FOUND, 40403, "Schema not found"),
    }
}

async fn latest(State(state): State<Arc<Shared>>, Path(subject): Path<String>, headers: HeaderMap) -> Response {
    if let Some(r) = gate(&state, "GET /subjects/{subject}/versions/latest", &headers) {
        return r;
    }
    let data = state.data.lock().unwrap();
    match data
        .subjects
        .get(&subject)
        .and_then(|v| v.last().map(|id| (*id, v.len())))
    {
        Some((id, version)) => answer(
            StatusCode::OK,
            json!({ "subject": subject, "id": id, "version": version, "schema": data.schemas[id as usize - 1].0 }),
        ),
        None => error(StatusCode::NOT_FOUND, 40401, &format!("Subject '{subject}' not found.")),
    }
}

async fn by_id(State(state): State<Arc<Shared>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Some(r) = gate(&state, "GET /schemas/ids/{id}", &headers) {
        return r;
    }
    let data = state.data.lock().unwrap();
    let found = id
        .parse::<usize>()
        .ok()
        .filter(|i| *i >= 1)
        .and_then(|i| data.schemas.get(i - 1));
    match found {
        Some((schema, None)) => answer(StatusCode::OK, json!({ "schema": schema })),
        Some((schema, Some(ty))) => answer(StatusCode::OK, json!({ "schema": schema, "schemaType": ty })),
        None => error(StatusCode::NOT_FOUND, 40403, "Schema not found"),
    }
}
