//! `model fetch` against a local HTTP server serving a real (small) torch checkpoint:
//! hash checks, retries of dropped connections and 5xx answers with resume, and clear
//! failures that leave nothing behind.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use attrstream::model::fetch::{self, FetchOptions, RetryPolicy};
use attrstream::model::{torch_pickle, weights};
use sha2::{Digest, Sha256};
use tch::Tensor;

const GENERATOR: &str = r#"
import collections, sys, torch
torch.manual_seed(0)
sd = collections.OrderedDict()
sd["conv.weight"] = torch.randn(8, 3, 3, 3)
sd["conv.bias"] = torch.randn(8)
sd["fc.weight"] = torch.randn(64, 72).t()
sd["steps"] = torch.arange(1000, dtype=torch.int64)
torch.save(sd, sys.argv[1])
"#;

/// A small torch checkpoint written by the project's PyTorch, generated once per run.
fn checkpoint() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
        assert!(
            python.exists(),
            "{} not found: these tests serve a checkpoint written by real PyTorch; run `scripts/setup --test`",
            python.display()
        );
        let dir = tempfile::tempdir().expect("temporary folder");
        let path = dir.path().join("tiny.pth");
        let out = Command::new(python)
            .args(["-c", GENERATOR])
            .arg(&path)
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "generator failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(&path).expect("read checkpoint")
    })
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A local HTTP server answering request number `i` with `handler(i, exchange)`: one
/// request per connection, so dropping a connection mid-body really closes it (tiny_http
/// keeps kept-alive sockets open, which would turn a drop into a read timeout).
struct Server {
    base: String,
    requests: Arc<AtomicUsize>,
    /// The `Range` header of each request, if any.
    ranges: Arc<Mutex<Vec<Option<String>>>>,
}

/// One request: its `Range` header and the connection to answer on.
struct Exchange {
    range: Option<String>,
    stream: TcpStream,
}

impl Server {
    fn start(handler: impl Fn(usize, Exchange) + Send + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a local port");
        let addr = listener.local_addr().expect("local address");
        let requests = Arc::new(AtomicUsize::new(0));
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (requests.clone(), ranges.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let Some(range) = read_request(&stream) else {
                    continue;
                };
                seen.lock().expect("lock").push(range.clone());
                let i = count.fetch_add(1, Ordering::SeqCst);
                handler(i, Exchange { range, stream });
            }
        });
        Self {
            base: format!("http://{addr}"),
            requests,
            ranges,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Reads a request head; returns its `Range` header (`None` when the head is unreadable).
fn read_request(stream: &TcpStream) -> Option<Option<String>> {
    let mut reader = BufReader::new(stream);
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            return Some(range);
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_string());
            }
        }
    }
}

/// Writes a response head and `body`, then closes the connection.
fn respond(mut exchange: Exchange, status: &str, extra_headers: &str, content_length: usize, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {content_length}\r\nETag: \"v1\"\r\nConnection: close\r\n{extra_headers}\r\n"
    );
    let _ = exchange.stream.write_all(head.as_bytes());
    let _ = exchange.stream.write_all(body);
    let _ = exchange.stream.flush();
    let _ = exchange.stream.shutdown(Shutdown::Both);
}

/// 200 with the whole body, ignoring any `Range`.
fn full(exchange: Exchange, body: &[u8]) {
    respond(exchange, "200 OK", "", body.len(), body);
}

/// Honours `Range: bytes=N-` with a 206, else 200.
fn ranged(exchange: Exchange, body: &[u8]) {
    let start = exchange
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse::<usize>().ok());
    match start {
        Some(start) if start < body.len() => {
            let range = format!("Content-Range: bytes {start}-{}/{}\r\n", body.len() - 1, body.len());
            respond(
                exchange,
                "206 Partial Content",
                &range,
                body.len() - start,
                &body[start..],
            );
        }
        _ => full(exchange, body),
    }
}

/// Announces the whole body, sends the first half, and drops the connection.
fn drop_mid_body(exchange: Exchange, body: &[u8]) {
    respond(exchange, "200 OK", "", body.len(), &body[..body.len() / 2]);
}

fn status(exchange: Exchange, code: u16) {
    let text = format!("status {code}");
    respond(exchange, &format!("{code} Status"), "", text.len(), text.as_bytes());
}

fn options(dir: &Path) -> FetchOptions {
    FetchOptions {
        dir: dir.to_path_buf(),
        verify: false,
        progress: false,
        retry: RetryPolicy {
            max_retries: 4,
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
        },
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(10),
        ..FetchOptions::default()
    }
}

/// The URL of the checkpoint under a torch.hub-style name carrying `prefix`.
fn url(server: &Server, prefix: &str) -> String {
    format!("{}/models/tiny-{prefix}.pth", server.base)
}

/// Asserts the weights file holds the checkpoint's tensors and records where it came from.
fn assert_converted(output: &Path, url: &str) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let original = dir.path().join("tiny.pth");
    std::fs::write(&original, checkpoint()).expect("write");
    let expected = torch_pickle::read_state_dict(&original).expect("read checkpoint");
    let written = Tensor::read_safetensors(output).expect("read weights");
    assert_eq!(written.len(), expected.len());
    for (key, want) in &expected {
        let (_, got) = written
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("`{key}` missing"));
        assert!(got.equal(want), "`{key}` differs");
    }
    let meta = weights::read_metadata(output).expect("metadata");
    assert_eq!(meta.source.as_deref(), Some(url));
    assert_eq!(meta.source_sha256, Some(sha256(checkpoint())));
}

/// Files in `dir`, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut names: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.expect("entry").path()).collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

#[test]
fn right_hash_is_accepted_converted_and_not_fetched_twice() {
    let body = checkpoint();
    let server = Server::start(move |_, exchange| full(exchange, body));
    let dir = tempfile::tempdir().expect("temporary folder");
    let url = url(&server, &sha256(body)[..8]);
    let mut opts = FetchOptions {
        url: Some(url.clone()),
        ..options(dir.path())
    };

    let report = fetch::fetch("tiny", &opts).expect("fetch");
    assert!(report.downloaded);
    assert_eq!(report.bytes, body.len() as u64);
    assert_eq!(report.sha256, sha256(body));
    assert_eq!(report.output, dir.path().join("tiny.safetensors"));
    assert_converted(&report.output, &url);
    assert_eq!(
        files(dir.path()),
        std::slice::from_ref(&report.output),
        "the download's temporary file is gone"
    );
    assert_eq!(server.requests(), 1);

    let again = fetch::fetch("tiny", &opts).expect("second fetch");
    assert!(!again.downloaded, "present with the right hash: not downloaded again");
    assert_eq!(server.requests(), 1);

    opts.force = true;
    assert!(fetch::fetch("tiny", &opts).expect("forced fetch").downloaded);
    assert_eq!(server.requests(), 2);

    // A full sha256 is accepted instead of the prefix in the name.
    let plain = format!("{}/tiny.pth", server.base);
    let opts = FetchOptions {
        url: Some(plain),
        sha256: Some(sha256(body).to_uppercase()),
        ..options(dir.path())
    };
    assert!(
        fetch::fetch("tiny_full_hash", &opts)
            .expect("fetch with --sha256")
            .downloaded
    );
}

#[test]
fn wrong_hash_is_rejected_and_nothing_is_left() {
    let body = checkpoint();
    let server = Server::start(move |_, exchange| full(exchange, body));
    let dir = tempfile::tempdir().expect("temporary folder");
    let actual = sha256(body);
    let wrong_prefix = if actual.starts_with("00000000") {
        "11111111"
    } else {
        "00000000"
    };

    let opts = FetchOptions {
        url: Some(url(&server, wrong_prefix)),
        ..options(dir.path())
    };
    let message = format!("{:#}", fetch::fetch("tiny", &opts).expect_err("wrong hash"));
    assert!(message.contains("sha256 mismatch"), "{message}");
    assert!(message.contains(&format!("expected {wrong_prefix}...")), "{message}");
    assert!(message.contains(&format!("got {actual}")), "{message}");
    assert!(files(dir.path()).is_empty(), "left behind: {:?}", files(dir.path()));

    let opts = FetchOptions {
        url: Some(url(&server, &actual[..8])),
        sha256: Some("ab".repeat(32)),
        ..options(dir.path())
    };
    let message = format!("{:#}", fetch::fetch("tiny", &opts).expect_err("wrong full hash"));
    assert!(message.contains(&format!("expected {}", "ab".repeat(32))), "{message}");
    assert!(files(dir.path()).is_empty(), "left behind: {:?}", files(dir.path()));
}

#[test]
fn dropped_connections_and_server_errors_are_retried_with_resume() {
    let body = checkpoint();
    let server = Server::start(move |i, exchange| match i {
        0 => status(exchange, 503),
        1 => drop_mid_body(exchange, body),
        _ => ranged(exchange, body),
    });
    let dir = tempfile::tempdir().expect("temporary folder");
    let url = url(&server, &sha256(body)[..8]);
    let opts = FetchOptions {
        url: Some(url.clone()),
        ..options(dir.path())
    };
    let report = fetch::fetch("tiny", &opts).expect("fetch despite failures");
    assert_converted(&report.output, &url);
    assert_eq!(server.requests(), 3);
    let ranges = server.ranges.lock().expect("lock").clone();
    assert_eq!(ranges[..2], [None, None]);
    assert_eq!(
        ranges[2].as_deref(),
        Some(format!("bytes={}-", body.len() / 2).as_str()),
        "resumed with Range"
    );
    assert_eq!(report.bytes, body.len() as u64);
}

#[test]
fn a_server_without_range_support_is_restarted() {
    let body = checkpoint();
    let server = Server::start(move |i, exchange| match i {
        0 | 1 => drop_mid_body(exchange, body),
        _ => full(exchange, body),
    });
    let dir = tempfile::tempdir().expect("temporary folder");
    let url = url(&server, &sha256(body)[..8]);
    let opts = FetchOptions {
        url: Some(url.clone()),
        ..options(dir.path())
    };
    let report = fetch::fetch("tiny", &opts).expect("fetch despite failures");
    assert_converted(&report.output, &url);
    assert_eq!(server.requests(), 3);
    assert_eq!(report.bytes, body.len() as u64);
}

#[test]
fn not_found_fails_at_once() {
    let server = Server::start(|_, exchange| status(exchange, 404));
    let dir = tempfile::tempdir().expect("temporary folder");
    let opts = FetchOptions {
        url: Some(url(&server, "258fb6c6")),
        ..options(dir.path())
    };
    let message = format!("{:#}", fetch::fetch("tiny", &opts).expect_err("404"));
    assert!(message.contains("404"), "{message}");
    assert!(message.contains("--url"), "{message}");
    assert_eq!(server.requests(), 1, "a 404 is not retried");
    assert!(files(dir.path()).is_empty(), "left behind: {:?}", files(dir.path()));
}

#[test]
fn persistent_server_errors_give_up_after_the_retries() {
    let server = Server::start(|_, exchange| status(exchange, 502));
    let dir = tempfile::tempdir().expect("temporary folder");
    let mut opts = FetchOptions {
        url: Some(url(&server, "258fb6c6")),
        ..options(dir.path())
    };
    opts.retry.max_retries = 2;
    let message = format!("{:#}", fetch::fetch("tiny", &opts).expect_err("502"));
    assert!(message.contains("502"), "{message}");
    assert_eq!(server.requests(), 3, "one attempt and two retries");
    assert!(files(dir.path()).is_empty(), "left behind: {:?}", files(dir.path()));
}

#[test]
fn bad_names_and_arguments_fail_before_downloading() {
    let dir = tempfile::tempdir().expect("temporary folder");
    let message = format!(
        "{:#}",
        fetch::fetch("no_such_model", &options(dir.path())).expect_err("unknown")
    );
    assert!(
        message.contains("fasterrcnn_resnet50_fpn_coco") && message.contains("--url"),
        "{message}"
    );
    let opts = FetchOptions {
        url: Some("http://127.0.0.1:9/x.pth".into()),
        ..options(dir.path())
    };
    let message = format!("{:#}", fetch::fetch("../escape", &opts).expect_err("bad name"));
    assert!(message.contains("not a valid model name"), "{message}");
    let message = format!("{:#}", fetch::fetch("nohash", &opts).expect_err("no hash"));
    assert!(message.contains("--sha256"), "{message}");
    let opts = FetchOptions {
        sha256: Some("xyz".into()),
        ..options(dir.path())
    };
    let message = format!(
        "{:#}",
        fetch::fetch("fasterrcnn_resnet50_fpn_coco", &opts).expect_err("bad hash")
    );
    assert!(message.contains("64 hex digits"), "{message}");
    assert!(files(dir.path()).is_empty());
}
