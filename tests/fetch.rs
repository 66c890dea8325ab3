//! Integration tests of `attrstream::fetch` against local servers: an HTTP server with
//! well-behaved and misbehaving endpoints, and a fake S3 endpoint. No network access needed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use attrstream::events::error_kinds;
use attrstream::events::ImageSource;
use attrstream::fetch::{blocked_address_reason, FetchConfig, FetchError, FetchedImage, ImageFetcher};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt as _;
use url::Url;

/// What the test server's /image endpoint returns.
const IMAGE: &[u8] = b"\x89PNG\r\n\x1a\nnot really a png, but bytes are bytes";
const CHUNK: usize = 64 * 1024;
/// Length of the endless body: far more than any test reads.
const HUGE_CHUNKS: u64 = 16 * 1024; // 1 GiB

#[derive(Default)]
struct ServerState {
    hits: Mutex<HashMap<String, usize>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    huge_bytes_sent: Arc<AtomicU64>,
    port: OnceLock<u16>,
}

struct TestServer {
    addr: SocketAddr,
    state: Arc<ServerState>,
}

impl TestServer {
    async fn start() -> Self {
        let state = Arc::new(ServerState::default());
        let app = axum::Router::new().fallback(handle).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        state.port.set(addr.port()).unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, state }
    }

    fn url(&self, path: &str) -> ImageSource {
        ImageSource::Uri(format!("http://{}{path}", self.addr))
    }

    fn hits(&self, path: &str) -> usize {
        self.state.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    fn total_hits(&self) -> usize {
        self.state.hits.lock().unwrap().values().sum()
    }
}

fn respond(status: StatusCode, body: impl Into<Body>) -> Response {
    Response::builder().status(status).body(body.into()).unwrap()
}

fn redirect(location: &str) -> Response {
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, location)
        .body(Body::empty())
        .unwrap()
}

async fn handle(State(state): State<Arc<ServerState>>, uri: Uri) -> Response {
    let path = uri.path().to_string();
    let hit = {
        let mut hits = state.hits.lock().unwrap();
        let count = hits.entry(path.clone()).or_default();
        *count += 1;
        *count
    };
    let port = *state.port.get().unwrap();
    match path.as_str() {
        "/image" => respond(StatusCode::OK, IMAGE),
        "/missing" => respond(StatusCode::NOT_FOUND, "no such image"),
        "/gone" => respond(StatusCode::GONE, "gone"),
        "/forbidden" => respond(StatusCode::FORBIDDEN, "no"),
        "/flaky" if hit == 1 => respond(StatusCode::INTERNAL_SERVER_ERROR, "try again"),
        "/flaky" => respond(StatusCode::OK, IMAGE),
        "/throttled" if hit == 1 => respond(StatusCode::TOO_MANY_REQUESTS, "slow down"),
        "/throttled" => respond(StatusCode::OK, IMAGE),
        "/always500" => respond(StatusCode::INTERNAL_SERVER_ERROR, "broken"),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            respond(StatusCode::OK, IMAGE)
        }
        "/concurrent" => {
            let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            state.max_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            state.in_flight.fetch_sub(1, Ordering::SeqCst);
            respond(StatusCode::OK, IMAGE)
        }
        "/huge" => {
            // Chunked, no Content-Length, 1 GiB produced lazily: counts what was produced.
            let sent = state.huge_bytes_sent.clone();
            let stream = futures::stream::iter(0..HUGE_CHUNKS).map(move |_| {
                sent.fetch_add(CHUNK as u64, Ordering::SeqCst);
                Ok::<_, Infallible>(Bytes::from(vec![0u8; CHUNK]))
            });
            respond(StatusCode::OK, Body::from_stream(stream))
        }
        // 2 MiB with a Content-Length header (axum sets it for a complete body).
        "/declared-large" => respond(StatusCode::OK, vec![0u8; 2 * 1024 * 1024]),
        "/redirect/image" => redirect("/image"),
        "/redirect/loop" => redirect("/redirect/loop"),
        "/redirect/metadata" => redirect("http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
        "/redirect/loopback" => redirect(&format!("http://127.0.0.2:{port}/image")),
        "/redirect/ipv6-loopback" => redirect(&format!("http://[::1]:{port}/image")),
        _ => respond(StatusCode::NOT_FOUND, "unknown test path"),
    }
}

/// Fast retries, the guard as asked.
fn config(allow_private: bool) -> FetchConfig {
    FetchConfig {
        allow_private_addresses: allow_private,
        retries: 2,
        retry_backoff: Duration::from_millis(10),
        timeout: Duration::from_secs(5),
        ..FetchConfig::default()
    }
}

fn fetcher(config: FetchConfig) -> ImageFetcher {
    ImageFetcher::new(config).unwrap()
}

#[track_caller]
fn expect_err(result: Result<FetchedImage, FetchError>, kind: &str) -> FetchError {
    match result {
        Ok(image) => panic!("expected {kind}, got {} bytes", image.bytes.len()),
        Err(e) => {
            eprintln!("{}: {e}", e.kind());
            assert_eq!(e.kind(), kind, "unexpected error: {e}");
            e
        }
    }
}

// ---- http ----

#[tokio::test]
async fn http_image_and_not_found() {
    let server = TestServer::start().await;
    let fetcher = fetcher(config(true));

    let image = fetcher.fetch(&server.url("/image")).await.unwrap();
    assert_eq!(&image.bytes[..], IMAGE);
    assert!(image.elapsed > Duration::ZERO);

    let err = expect_err(fetcher.fetch(&server.url("/missing")).await, error_kinds::MISSING_IMAGE);
    assert!(err.message().contains("404"), "{err}");
    expect_err(fetcher.fetch(&server.url("/gone")).await, error_kinds::MISSING_IMAGE);
    // Not-found is final: no retries.
    assert_eq!(server.hits("/missing"), 1);
    assert_eq!(server.hits("/gone"), 1);
}

#[tokio::test]
async fn http_retries_transient_failures_only() {
    let server = TestServer::start().await;
    let fetcher = fetcher(config(true));

    let image = fetcher.fetch(&server.url("/flaky")).await.unwrap();
    assert_eq!(&image.bytes[..], IMAGE);
    assert_eq!(server.hits("/flaky"), 2, "one 500, then success");

    fetcher.fetch(&server.url("/throttled")).await.unwrap();
    assert_eq!(server.hits("/throttled"), 2, "429 is retried");

    let err = expect_err(
        fetcher.fetch(&server.url("/always500")).await,
        error_kinds::FETCH_HTTP_STATUS,
    );
    assert!(err.message().contains("500"), "{err}");
    assert_eq!(server.hits("/always500"), 3, "retries (2) + 1 attempts");

    let err = expect_err(
        fetcher.fetch(&server.url("/forbidden")).await,
        error_kinds::FETCH_HTTP_STATUS,
    );
    assert!(err.message().contains("403"), "{err}");
    assert_eq!(server.hits("/forbidden"), 1, "4xx is never retried");
}

#[tokio::test]
async fn http_timeout() {
    let server = TestServer::start().await;
    let fetcher = fetcher(FetchConfig {
        timeout: Duration::from_millis(300),
        retries: 1,
        ..config(true)
    });
    let start = Instant::now();
    let err = expect_err(fetcher.fetch(&server.url("/slow")).await, error_kinds::FETCH_TIMEOUT);
    assert!(err.message().contains("fetch.timeout"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
    assert_eq!(server.hits("/slow"), 2, "timeouts are retried");
}

#[tokio::test]
async fn http_connection_refused_is_fetch_failed() {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let fetcher = fetcher(FetchConfig {
        retries: 1,
        ..config(true)
    });
    expect_err(
        fetcher.fetch(&ImageSource::Uri(format!("http://{addr}/image"))).await,
        error_kinds::FETCH_FAILED,
    );
}

#[tokio::test]
async fn http_endless_body_is_cut_off_at_max_bytes() {
    let server = TestServer::start().await;
    let max_bytes = 1024 * 1024;
    let fetcher = fetcher(FetchConfig {
        max_bytes,
        ..config(true)
    });
    let start = Instant::now();
    let err = expect_err(fetcher.fetch(&server.url("/huge")).await, error_kinds::FETCH_TOO_LARGE);
    let elapsed = start.elapsed();
    assert!(err.message().contains("fetch.max_bytes"), "{err}");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    // Give the server a moment to notice the closed connection, then check it stopped early.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = server.state.huge_bytes_sent.load(Ordering::SeqCst);
    eprintln!("fetch stopped after {elapsed:?}; server produced {sent} bytes");
    assert!(sent < 64 * 1024 * 1024, "server produced {sent} bytes of a 1 GiB body");
    assert_eq!(server.hits("/huge"), 1, "too large is not retried");
}

#[tokio::test]
async fn http_content_length_over_limit_is_refused_up_front() {
    let server = TestServer::start().await;
    let fetcher = fetcher(FetchConfig {
        max_bytes: 1024 * 1024,
        ..config(true)
    });
    let err = expect_err(
        fetcher.fetch(&server.url("/declared-large")).await,
        error_kinds::FETCH_TOO_LARGE,
    );
    // The declared size is named: refused from the header, not after streaming.
    assert!(err.message().contains(&(2 * 1024 * 1024).to_string()), "{err}");
}

#[tokio::test]
async fn http_redirects_followed_up_to_the_limit() {
    let server = TestServer::start().await;
    let fetcher = fetcher(config(true));
    let image = fetcher.fetch(&server.url("/redirect/image")).await.unwrap();
    assert_eq!(&image.bytes[..], IMAGE);
    let err = expect_err(
        fetcher.fetch(&server.url("/redirect/loop")).await,
        error_kinds::FETCH_FAILED,
    );
    assert!(err.message().contains("redirected more than 5"), "{err}");
    // With the guard off, a redirect to another loopback address is followed (nothing listens
    // on 127.0.0.2, so it fails to connect, but it is not refused).
    if let Err(e) = fetcher.fetch(&server.url("/redirect/loopback")).await {
        assert_ne!(e.kind(), error_kinds::BLOCKED_ADDRESS, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_is_limited() {
    let server = TestServer::start().await;
    let fetcher = fetcher(FetchConfig {
        max_concurrency: 2,
        ..config(true)
    });
    let source = server.url("/concurrent");
    let start = Instant::now();
    let results = futures::future::join_all((0..6).map(|_| fetcher.fetch(&source))).await;
    for result in results {
        result.unwrap();
    }
    assert_eq!(server.hits("/concurrent"), 6);
    assert_eq!(server.state.max_in_flight.load(Ordering::SeqCst), 2);
    // 6 requests of 300 ms, 2 at a time.
    assert!(
        start.elapsed() >= Duration::from_millis(850),
        "took {:?}",
        start.elapsed()
    );
}

// ---- SSRF guard ----

#[tokio::test]
async fn guard_refuses_loopback_literals_and_names() {
    let server = TestServer::start().await;
    let fetcher = fetcher(config(false));
    let port = server.addr.port();

    let err = expect_err(fetcher.fetch(&server.url("/image")).await, error_kinds::BLOCKED_ADDRESS);
    assert!(err.message().contains("127.0.0.1"), "{err}");
    assert!(err.message().contains("fetch.allow_private_addresses"), "{err}");

    // A hostname is refused by the resolver, which names what it resolved to.
    let err = expect_err(
        fetcher
            .fetch(&ImageSource::Uri(format!("http://localhost:{port}/image")))
            .await,
        error_kinds::BLOCKED_ADDRESS,
    );
    assert!(
        err.message().contains("host localhost") && err.message().contains("resolves to"),
        "{err}"
    );
    assert!(err.message().contains("fetch.allow_private_addresses"), "{err}");

    for uri in [
        format!("http://[::ffff:127.0.0.1]:{port}/image"),
        format!("http://[::1]:{port}/image"),
        format!("http://2130706433:{port}/image"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://10.0.0.1/image".to_string(),
    ] {
        expect_err(
            fetcher.fetch(&ImageSource::Uri(uri)).await,
            error_kinds::BLOCKED_ADDRESS,
        );
    }
    assert_eq!(server.total_hits(), 0, "nothing reached the server");
}

/// Test classifier: the guard's rules, except the test server's own address, which stands in
/// for an allowed public host.
fn exempt_test_server(ip: IpAddr) -> Option<&'static str> {
    if ip == IpAddr::V4(Ipv4Addr::LOCALHOST) {
        None
    } else {
        blocked_address_reason(ip)
    }
}

#[tokio::test]
async fn guard_checks_every_redirect_hop() {
    let server = TestServer::start().await;
    let fetcher = ImageFetcher::with_address_classifier(config(false), exempt_test_server).unwrap();

    // The exemption works: the "public" host is reachable, and allowed redirects are followed.
    fetcher.fetch(&server.url("/image")).await.unwrap();
    fetcher.fetch(&server.url("/redirect/image")).await.unwrap();

    let err = expect_err(
        fetcher.fetch(&server.url("/redirect/metadata")).await,
        error_kinds::BLOCKED_ADDRESS,
    );
    assert!(err.message().contains("169.254.169.254"), "{err}");
    assert!(err.message().contains("fetch.allow_private_addresses"), "{err}");

    let err = expect_err(
        fetcher.fetch(&server.url("/redirect/loopback")).await,
        error_kinds::BLOCKED_ADDRESS,
    );
    assert!(err.message().contains("127.0.0.2"), "{err}");

    expect_err(
        fetcher.fetch(&server.url("/redirect/ipv6-loopback")).await,
        error_kinds::BLOCKED_ADDRESS,
    );
    // Refusals are final: each redirecting endpoint was asked once.
    assert_eq!(server.hits("/redirect/metadata"), 1);
    assert_eq!(server.hits("/redirect/loopback"), 1);
}

// ---- inline and unsupported ----

#[tokio::test]
async fn inline_and_unsupported_uris() {
    let fetcher = fetcher(FetchConfig {
        max_bytes: 10,
        ..config(false)
    });
    let image = fetcher
        .fetch(&ImageSource::Inline(b"0123456789".to_vec()))
        .await
        .unwrap();
    assert_eq!(&image.bytes[..], b"0123456789");
    expect_err(
        fetcher.fetch(&ImageSource::Inline(vec![0; 11])).await,
        error_kinds::FETCH_TOO_LARGE,
    );

    for uri in [
        "ftp://example.com/a.jpg",
        "not a uri",
        "gopher://x/y",
        "data:image/png;base64,AAAA",
    ] {
        expect_err(
            fetcher.fetch(&ImageSource::Uri(uri.into())).await,
            error_kinds::UNSUPPORTED_URI,
        );
    }
}

// ---- file ----

struct FileTree {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    outside: std::path::PathBuf,
}

fn file_tree() -> FileTree {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("images");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(root.join("sub/a.png"), IMAGE).unwrap();
    std::fs::write(root.join("big.png"), vec![0u8; 2048]).unwrap();
    std::fs::write(outside.join("secret.png"), b"secret").unwrap();
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(outside.join("secret.png"), root.join("escape.png")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape-dir")).unwrap();
        std::os::unix::fs::symlink(root.join("sub/a.png"), root.join("inside-link.png")).unwrap();
    }
    FileTree {
        _dir: dir,
        root,
        outside,
    }
}

fn file_uri(path: &std::path::Path) -> ImageSource {
    ImageSource::Uri(Url::from_file_path(path).unwrap().to_string())
}

#[tokio::test]
async fn file_uris_stay_under_the_root() {
    let tree = file_tree();
    let fetcher = fetcher(FetchConfig {
        file_root: Some(tree.root.clone()),
        max_bytes: 1024,
        ..config(false)
    });

    let image = fetcher.fetch(&file_uri(&tree.root.join("sub/a.png"))).await.unwrap();
    assert_eq!(&image.bytes[..], IMAGE);

    let err = expect_err(
        fetcher.fetch(&file_uri(&tree.root.join("sub/nope.png"))).await,
        error_kinds::MISSING_IMAGE,
    );
    assert!(err.message().contains("does not exist"), "{err}");

    expect_err(
        fetcher.fetch(&file_uri(&tree.root.join("big.png"))).await,
        error_kinds::FETCH_TOO_LARGE,
    );
    expect_err(
        fetcher.fetch(&file_uri(&tree.root.join("sub"))).await,
        error_kinds::MISSING_IMAGE,
    );

    // `..` escapes (the URI is normalized before the check; either way it is outside).
    let dotdot = format!("file://{}/../outside/secret.png", tree.root.display());
    let err = expect_err(
        fetcher.fetch(&ImageSource::Uri(dotdot)).await,
        error_kinds::UNSUPPORTED_URI,
    );
    assert!(err.message().contains("fetch.file_root"), "{err}");
    let encoded = format!("file://{}/%2e%2e/outside/secret.png", tree.root.display());
    expect_err(
        fetcher.fetch(&ImageSource::Uri(encoded)).await,
        error_kinds::UNSUPPORTED_URI,
    );
    // Absolute paths elsewhere, existing or not (no existence oracle outside the root).
    expect_err(
        fetcher.fetch(&file_uri(&tree.outside.join("secret.png"))).await,
        error_kinds::UNSUPPORTED_URI,
    );
    expect_err(
        fetcher.fetch(&file_uri(&tree.outside.join("nope.png"))).await,
        error_kinds::UNSUPPORTED_URI,
    );
    expect_err(
        fetcher.fetch(&ImageSource::Uri("file:///etc/passwd".into())).await,
        error_kinds::UNSUPPORTED_URI,
    );
    // Remote file hosts are not local paths.
    expect_err(
        fetcher
            .fetch(&ImageSource::Uri("file://server/share/a.png".into()))
            .await,
        error_kinds::UNSUPPORTED_URI,
    );

    #[cfg(unix)]
    {
        let err = expect_err(
            fetcher.fetch(&file_uri(&tree.root.join("escape.png"))).await,
            error_kinds::UNSUPPORTED_URI,
        );
        assert!(err.message().contains("symlinks"), "{err}");
        expect_err(
            fetcher.fetch(&file_uri(&tree.root.join("escape-dir/secret.png"))).await,
            error_kinds::UNSUPPORTED_URI,
        );
        expect_err(
            fetcher.fetch(&file_uri(&tree.root.join("escape-dir/nope.png"))).await,
            error_kinds::UNSUPPORTED_URI,
        );
        // Symlinks that stay inside are fine.
        let image = fetcher
            .fetch(&file_uri(&tree.root.join("inside-link.png")))
            .await
            .unwrap();
        assert_eq!(&image.bytes[..], IMAGE);
    }
}

#[tokio::test]
async fn file_uris_are_refused_without_a_root() {
    let tree = file_tree();
    let fetcher = fetcher(config(true));
    let err = expect_err(
        fetcher.fetch(&file_uri(&tree.root.join("sub/a.png"))).await,
        error_kinds::UNSUPPORTED_URI,
    );
    assert!(err.message().contains("fetch.file_root"), "{err}");
}

#[test]
fn file_root_must_exist() {
    let err = ImageFetcher::new(FetchConfig {
        file_root: Some("/definitely/not/here".into()),
        ..config(false)
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("fetch.file_root"), "{err:#}");
}

// ---- s3 ----

#[derive(Default)]
struct S3State {
    hits: Mutex<HashMap<String, usize>>,
}

async fn fake_s3(State(state): State<Arc<S3State>>, uri: Uri) -> Response {
    let path = uri.path().to_string();
    *state.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
    match path.as_str() {
        "/photos/dir/cat.png" => Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "image/png")
            .header(header::ETAG, "\"abc\"")
            .header(header::LAST_MODIFIED, "Mon, 01 Jan 2024 00:00:00 GMT")
            .body(Body::from(IMAGE))
            .unwrap(),
        "/photos/big.png" => respond(StatusCode::OK, vec![0u8; 2048]),
        "/photos/broken.png" => respond(StatusCode::SERVICE_UNAVAILABLE, "<Error><Code>SlowDown</Code></Error>"),
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header(header::CONTENT_TYPE, "application/xml")
            .body(Body::from(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>NoSuchKey</Code>\
                 <Message>The specified key does not exist.</Message></Error>",
            ))
            .unwrap(),
    }
}

/// The only test that touches AWS_* variables (process-global): it sets them before building
/// the fetcher. The guard stays on: the configured endpoint is trusted, event URIs only name
/// bucket and key.
#[tokio::test]
async fn s3_against_a_fake_endpoint() {
    std::env::set_var("AWS_ACCESS_KEY_ID", "test-access-key");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test-secret-key");

    let state = Arc::new(S3State::default());
    let app = axum::Router::new().fallback(fake_s3).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let fetcher = fetcher(FetchConfig {
        s3_endpoint: Some(format!("http://{addr}")),
        max_bytes: 1024,
        retries: 1,
        ..config(false)
    });

    let image = fetcher
        .fetch(&ImageSource::Uri("s3://photos/dir/cat.png".into()))
        .await
        .unwrap();
    assert_eq!(&image.bytes[..], IMAGE);
    // The bucket client is cached and reused.
    fetcher
        .fetch(&ImageSource::Uri("s3://photos/dir/cat.png".into()))
        .await
        .unwrap();

    let err = expect_err(
        fetcher.fetch(&ImageSource::Uri("s3://photos/nope.png".into())).await,
        error_kinds::MISSING_IMAGE,
    );
    assert!(err.message().contains("s3://photos/nope.png"), "{err}");
    expect_err(
        fetcher.fetch(&ImageSource::Uri("s3://photos/big.png".into())).await,
        error_kinds::FETCH_TOO_LARGE,
    );
    expect_err(
        fetcher.fetch(&ImageSource::Uri("s3://photos/broken.png".into())).await,
        error_kinds::FETCH_HTTP_STATUS,
    );
    expect_err(
        fetcher.fetch(&ImageSource::Uri("s3://Bad_Bucket/x.png".into())).await,
        error_kinds::UNSUPPORTED_URI,
    );

    let hits = state.hits.lock().unwrap();
    assert_eq!(hits.get("/photos/dir/cat.png"), Some(&2));
    assert_eq!(hits.get("/photos/nope.png"), Some(&1), "not-found is not retried");
    assert_eq!(hits.get("/photos/broken.png"), Some(&2), "retries (1) + 1 attempts");
}
