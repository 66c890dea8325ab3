//! `attrstream model registry …` end to end: the binary on a registry in a temporary directory.
//! Publish, promote only if better, refuse another validation set, --force, rollback, two
//! promoting processes at once, damaged manifests and weights, and the `--config` fallback.
//! The same registry code against an S3-compatible server (moto, from the project's .venv):
//! conditional creates and updates, two promoters that decided on the same state, the CLI
//! configured from `AWS_*` like a deployment.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use attrstream::model::weights::{self, WeightsMetadata};
use attrstream::train::registry::{
    EvalMetrics, ModelRegistry, NewVersion, PromotionPolicy, RegistryError, VersionId, PRODUCTION_REF,
};
use futures::stream::BoxStream;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions,
    PutPayload, PutResult,
};
use serde_json::{json, Value};
use tch::Tensor;

const LABELS: [&str; 3] = ["__background__", "red_circle", "blue_square"];

/// A registry directory plus the files the commands read.
struct Fixture {
    tmp: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    fn registry(&self) -> PathBuf {
        self.tmp.path().join("registry")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Runs `attrstream model registry ARGS --registry DIR`.
    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.command(args);
        cmd.arg("--registry").arg(self.registry());
        cmd.output().unwrap()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_attrstream"));
        cmd.args(["model", "registry"])
            .args(args)
            .args(["--by", "ci"])
            .env_remove("ATTRSTREAM_MODEL__REGISTRY")
            .env_remove("ATTRSTREAM_CONFIG")
            .env("RUST_LOG", "warn");
        cmd
    }

    /// A weights file (content varies with `seed`) with our label map in its metadata.
    fn weights(&self, seed: f32) -> PathBuf {
        let path = self.path(&format!("weights-{seed}.safetensors"));
        let meta = WeightsMetadata {
            architecture: Some("fasterrcnn_resnet50_fpn".into()),
            labels: Some(LABELS.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        };
        let t = Tensor::from_slice(&[seed; 64]);
        weights::save(&path, &[("roi_heads.w".to_string(), t)], &meta).unwrap();
        path
    }

    fn metrics(&self, name: &str, fingerprint: &str, map: f64) -> PathBuf {
        let path = self.path(&format!("{name}.json"));
        let m = json!({
            "validation_fingerprint": fingerprint,
            "map": map, "ap50": (map + 0.05_f64).min(1.0), "ap75": map - 0.05,
            "per_class_ap": {"red_circle": map, "blue_square": map},
            "images": 50
        });
        std::fs::write(&path, m.to_string()).unwrap();
        path
    }

    /// Publishes and returns the new version id.
    fn publish(&self, seed: f32, extra: &[&str]) -> String {
        let weights = self.weights(seed);
        let mut args = vec!["publish", "--weights", weights.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        let manifest = json_out(&out);
        manifest["version"].as_str().unwrap().to_string()
    }

    fn production(&self) -> Value {
        json_out(&self.run(&["show", "production"]))
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The JSON printed by a successful command.
fn json_out(out: &Output) -> Value {
    assert!(out.status.success(), "command failed: {}", stderr(out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn publish_promote_refuse_force_and_roll_back() {
    let f = Fixture::new();
    let (m1, m2) = (f.metrics("m1", "val-A", 0.40), f.metrics("m2", "val-A", 0.45));
    let v1 = f.publish(1.0, &["--metrics", s(&m1), "--notes", "baseline"]);
    let v2 = f.publish(2.0, &["--metrics", s(&m2), "--parent", &v1, "--parent-metrics", s(&m1)]);
    assert!(v1.starts_with("v0001-") && v2.starts_with("v0002-"), "{v1} {v2}");

    // Layout on disk as documented.
    let dir = f.registry().join("versions").join(&v2);
    assert!(dir.join("weights.safetensors").is_file() && dir.join("model.json").is_file());

    let out = f.run(&["list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        table.contains(&v1) && table.contains(&v2) && table.contains("0.4500"),
        "{table}"
    );
    assert!(!table.contains('*'), "nothing is production yet: {table}");

    let out = f.run(&["promote", &v1]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = f.run(&["promote", &v2, "--note", "retrained"]);
    let decision = json_out(&out);
    assert_eq!(decision["promoted"], true);
    assert_eq!(decision["baseline_value"], 0.40);
    assert_eq!(f.production()["manifest"]["version"], v2.as_str());
    let list = f.run(&["list", "--json"]);
    let lines: Vec<Value> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["parent"], v1.as_str());

    // Worse than production: refused with exit code 1 and the reason; production unchanged.
    let (m3, m3p) = (f.metrics("m3", "val-A", 0.44), f.metrics("m3p", "val-A", 0.45));
    let v3 = f.publish(
        3.0,
        &["--metrics", s(&m3), "--parent", &v2, "--parent-metrics", s(&m3p)],
    );
    let out = f.run(&["promote", &v3]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not promoted") && stderr(&out).contains("does not beat"));
    assert_eq!(f.production()["manifest"]["version"], v2.as_str());

    // Evaluated on another validation set: refused, then forced.
    let m4 = f.metrics("m4", "val-B", 0.90);
    let v4 = f.publish(4.0, &["--metrics", s(&m4)]);
    let out = f.run(&["promote", &v4]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not comparable"), "{}", stderr(&out));
    let out = f.run(&["promote", &v4, "--force", "--note", "new validation set"]);
    let decision = json_out(&out);
    assert_eq!(
        (decision["promoted"].clone(), decision["action"].clone()),
        (json!(true), json!("forced_promote"))
    );
    let shown = f.production();
    assert_eq!(shown["production_record"]["promoted_by"], "ci");
    assert_eq!(shown["production_record"]["previous_version"], v2.as_str());

    // Rollback to v2.
    let out = f.run(&["rollback", &v2, "--note", "v4 misbehaves"]);
    let production = json_out(&out);
    assert_eq!(
        (production["action"].clone(), production["revision"].clone()),
        (json!("rollback"), json!(4))
    );
    let shown = json_out(&f.run(&["show", &v2]));
    assert_eq!(shown["production"], true);
    let actions: Vec<&str> = shown["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["promote", "rollback"]);

    // Downloaded weights are the published bytes, named by their sha256.
    let cache = f.path("cache");
    let got = json_out(&f.run(&["download", "--cache-dir", s(&cache)]));
    assert_eq!(got["version"], v2.as_str());
    let path = PathBuf::from(got["weights"].as_str().unwrap());
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(f.path("weights-2.safetensors")).unwrap()
    );
    assert!(path.ends_with(format!("{}.safetensors", got["sha256"].as_str().unwrap())));
}

#[test]
fn two_promoting_processes_have_one_winner() {
    let f = Fixture::new();
    let base = f.publish(0.0, &["--metrics", s(&f.metrics("m0", "val-A", 0.30))]);
    assert!(f.run(&["promote", &base]).status.success());
    let better = f.metrics("m1", "val-A", 0.60);
    for round in 0..3 {
        let a = f.publish(10.0 + 2.0 * round as f32, &["--metrics", s(&better)]);
        let b = f.publish(11.0 + 2.0 * round as f32, &["--metrics", s(&better)]);
        if round > 0 {
            assert!(f.run(&["rollback", &base]).status.success());
        }
        let spawn = |v: &str| {
            let mut cmd = f.command(&["promote", v]);
            cmd.arg("--registry").arg(f.registry());
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (pa, pb) = (spawn(&a), spawn(&b));
        let (oa, ob) = (pa.wait_with_output().unwrap(), pb.wait_with_output().unwrap());
        let won: Vec<&String> = [(&oa, &a), (&ob, &b)]
            .into_iter()
            .filter(|(o, _)| o.status.success())
            .map(|(_, v)| v)
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {} / {}", stderr(&oa), stderr(&ob));
        let loser = if oa.status.success() { &ob } else { &oa };
        // The loser either lost the race (error, exit 2) or decided after the winner (exit 1).
        let why = stderr(loser);
        eprintln!("round {round}: loser exit {:?}: {}", loser.status.code(), why.trim());
        assert!(
            (loser.status.code() == Some(3) && why.contains("changed while this command was deciding"))
                || (loser.status.code() == Some(1) && why.contains("does not beat")),
            "{why}"
        );
        assert_eq!(f.production()["manifest"]["version"], won[0].as_str());
    }
}

#[test]
fn damaged_registries_give_clear_errors() {
    let f = Fixture::new();
    let v1 = f.publish(1.0, &[]);
    let v2 = f.publish(2.0, &[]);
    let manifest = f.registry().join("versions").join(&v1).join("model.json");

    std::fs::write(&manifest, b"{\"format\": 1, \"version\":").unwrap();
    let out = f.run(&["show", &v1]);
    assert_eq!(out.status.code(), Some(3), "a damaged registry is a runtime failure");
    assert!(
        stderr(&out).contains("model.json is unreadable") && stderr(&out).contains("publish its weights again"),
        "{}",
        stderr(&out)
    );
    let out = f.run(&["list"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!table.contains(&v1) && table.contains(&v2), "{table}");

    std::fs::remove_file(&manifest).unwrap();
    let out = f.run(&["promote", &v1]);
    assert_eq!(out.status.code(), Some(3), "a damaged registry is a runtime failure");
    assert!(
        stderr(&out).contains("manifest model.json is missing"),
        "{}",
        stderr(&out)
    );

    let out = f.run(&["show", "v0042-20261128T181500Z-00000000"]);
    assert!(
        stderr(&out).contains("is not in the model registry"),
        "{}",
        stderr(&out)
    );
    let out = f.run(&["show", "latest"]);
    assert!(stderr(&out).contains("is not a model version id"), "{}", stderr(&out));
    let out = f.run(&["show", "production"]);
    assert!(stderr(&out).contains("no production version"), "{}", stderr(&out));

    // Stored weights altered after publishing: the download is refused.
    let stored = f.registry().join("versions").join(&v2).join("weights.safetensors");
    let mut bytes = std::fs::read(&stored).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&stored, bytes).unwrap();
    let out = f.run(&["download", &v2, "--cache-dir", s(&f.path("cache"))]);
    assert_eq!(out.status.code(), Some(3), "a damaged registry is a runtime failure");
    assert!(stderr(&out).contains("hash to sha256"), "{}", stderr(&out));

    // Labels that differ from the weights' own map are refused at publish.
    let labels = f.path("labels.txt");
    std::fs::write(&labels, "__background__\ncup\n").unwrap();
    let w = f.weights(5.0);
    let out = f.run(&["publish", "--weights", s(&w), "--labels", s(&labels)]);
    assert_eq!(out.status.code(), Some(3), "a damaged registry is a runtime failure");
    assert!(stderr(&out).contains("label map given"), "{}", stderr(&out));
}

#[test]
fn location_comes_from_flag_environment_or_config() {
    let f = Fixture::new();
    let v1 = f.publish(1.0, &[]);

    let config = f.path("attrstream.toml");
    std::fs::write(&config, format!("[model]\nregistry = {:?}\n", s(&f.registry()))).unwrap();
    let out = f.command(&["list", "--config", s(&config)]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&v1));

    let out = f
        .command(&["list"])
        .env("ATTRSTREAM_MODEL__REGISTRY", f.registry())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&v1), "{}", stderr(&out));

    let out = f.command(&["list"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no model registry given"), "{}", stderr(&out));
    let out = f
        .command(&["list", "--registry", "gs://bucket/models"])
        .output()
        .unwrap();
    assert!(stderr(&out).contains("unsupported scheme"), "{}", stderr(&out));
}

// ---------------------------------------------------------------------------------------------
// Concurrent promoters that are guaranteed to decide on the same state, and S3 (moto)
// ---------------------------------------------------------------------------------------------

/// An object store that, once armed, holds back the first two reads of production.json until
/// both have been made: two promoters then certainly decide on the same production state, and
/// only the store's conditional put can stop both from winning.
#[derive(Debug)]
struct RendezvousStore {
    inner: Arc<dyn ObjectStore>,
    armed: AtomicBool,
    arrived: AtomicUsize,
    barrier: tokio::sync::Barrier,
}

impl RendezvousStore {
    fn new(inner: Arc<dyn ObjectStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            armed: AtomicBool::new(false),
            arrived: AtomicUsize::new(0),
            barrier: tokio::sync::Barrier::new(2),
        })
    }
}

impl std::fmt::Display for RendezvousStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rendezvous({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for RendezvousStore {
    async fn put_opts(&self, l: &ObjectPath, p: PutPayload, o: PutOptions) -> object_store::Result<PutResult> {
        self.inner.put_opts(l, p, o).await
    }
    async fn put_multipart_opts(
        &self,
        l: &ObjectPath,
        o: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(l, o).await
    }
    async fn get_opts(&self, l: &ObjectPath, o: GetOptions) -> object_store::Result<GetResult> {
        // Read first, then wait for the other reader: both see the state before either writes.
        let result = self.inner.get_opts(l, o).await;
        if l.filename() == Some("production.json")
            && self.armed.load(Ordering::SeqCst)
            && self.arrived.fetch_add(1, Ordering::SeqCst) < 2
        {
            self.barrier.wait().await;
        }
        result
    }
    async fn delete(&self, l: &ObjectPath) -> object_store::Result<()> {
        self.inner.delete(l).await
    }
    fn list(&self, prefix: Option<&ObjectPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&ObjectPath>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy(&self, from: &ObjectPath, to: &ObjectPath) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }
    async fn copy_if_not_exists(&self, from: &ObjectPath, to: &ObjectPath) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

fn eval(fingerprint: &str, map: f64) -> EvalMetrics {
    EvalMetrics {
        validation_fingerprint: fingerprint.into(),
        map,
        ap50: map,
        ap75: map,
        per_class_ap: Default::default(),
        images: None,
    }
}

async fn publish_lib(reg: &ModelRegistry, f: &Fixture, seed: f32, map: f64) -> VersionId {
    let mut nv = NewVersion::new(f.weights(seed));
    nv.metrics = Some(eval("val-A", map));
    reg.publish(nv).await.unwrap()
}

/// Base promoted, then two better candidates promoted at once after reading the same state:
/// exactly one wins, the other gets a Conflict and changes nothing.
async fn same_state_promoters_have_one_winner(store: Arc<RendezvousStore>, prefix: &str, shown: &str) {
    let f = Fixture::new();
    let reg = ModelRegistry::from_store(store.clone(), prefix, shown).unwrap();
    let base = publish_lib(&reg, &f, 1.0, 0.3).await;
    let (a, b) = (
        publish_lib(&reg, &f, 2.0, 0.6).await,
        publish_lib(&reg, &f, 3.0, 0.6).await,
    );
    assert!(reg.promote(&base, &PromotionPolicy::default()).await.unwrap().promoted);
    store.armed.store(true, Ordering::SeqCst);
    let policy = PromotionPolicy::default();
    let (ra, rb) = tokio::join!(reg.promote(&a, &policy), reg.promote(&b, &policy));
    let outcomes = [&ra, &rb];
    let winners: Vec<&VersionId> = outcomes
        .iter()
        .zip([&a, &b])
        .filter(|(r, _)| matches!(r, Ok(d) if d.promoted))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(winners.len(), 1, "{ra:?} / {rb:?}");
    let lost = outcomes
        .iter()
        .filter(|r| matches!(r, Err(RegistryError::Conflict { .. })))
        .count();
    assert_eq!(lost, 1, "{ra:?} / {rb:?}");
    let p = reg.production().await.unwrap().unwrap();
    assert_eq!(
        (&p.version, p.previous_version.as_ref(), p.revision),
        (winners[0], Some(&base), 2)
    );
}

#[tokio::test]
async fn in_memory_promoters_on_the_same_state_have_one_winner() {
    same_state_promoters_have_one_winner(RendezvousStore::new(Arc::new(InMemory::new())), "", "memory://").await;
}

/// A moto S3 server on a free local port, stopped when dropped.
struct Moto {
    child: std::process::Child,
    endpoint: String,
}

impl Moto {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let python = common::python();
        let child = Command::new(&python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start moto with {}: {e}", python.display()));
        let moto = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let started = std::time::Instant::now();
        let client = reqwest::blocking::Client::new();
        loop {
            // Unsigned bucket creation: moto does not check signatures.
            match client.put(format!("{}/models", moto.endpoint)).send() {
                Ok(r) if r.status().is_success() => break,
                _ if started.elapsed() > Duration::from_secs(60) => panic!(
                    "moto S3 server did not start on {}; install it with `scripts/setup --test` \
                     (moto[server] in .venv)",
                    moto.endpoint
                ),
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        moto
    }

    fn store(&self) -> Arc<dyn ObjectStore> {
        let store = AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_bucket_name("models")
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .build()
            .unwrap();
        Arc::new(store)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn s3_compatible_server() {
    let moto = Moto::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Conditional update of production.json on S3 (If-Match with the etag read).
        same_state_promoters_have_one_winner(
            RendezvousStore::new(moto.store()),
            "race/models",
            "s3://models/race/models",
        )
        .await;

        // Conditional create of sequence claims (If-None-Match: *): a taken number is skipped.
        let f = Fixture::new();
        let store = moto.store();
        store
            .put(
                &ObjectPath::from("team/models/sequence/000001"),
                PutPayload::from_static(b"taken"),
            )
            .await
            .unwrap();
        let reg = ModelRegistry::from_store(store.clone(), "team/models", "s3://models/team/models").unwrap();
        let v = publish_lib(&reg, &f, 5.0, 0.5).await;
        assert_eq!(v.sequence(), 2, "{v}");

        // Watch (conditional GETs on the etag) sees a promotion.
        let mut watch = reg.watch(Duration::from_millis(50)).await.unwrap();
        assert_eq!(watch.next_change().await, Some(None));
        assert!(reg.promote(&v, &PromotionPolicy::default()).await.unwrap().promoted);
        let seen = tokio::time::timeout(Duration::from_secs(10), watch.next_change())
            .await
            .unwrap();
        assert_eq!(seen.unwrap().unwrap().version, v);

        // Download checks the sha256; an object replaced behind the registry's back is refused.
        let cache = f.path("cache");
        let resolved = attrstream::train::registry::resolve_model(&reg, PRODUCTION_REF, &cache)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(&resolved.weights).unwrap(),
            std::fs::read(f.path("weights-5.safetensors")).unwrap()
        );
        let key = ObjectPath::from(format!("team/models/versions/{v}/weights.safetensors"));
        store
            .put(&key, PutPayload::from_static(b"not the weights"))
            .await
            .unwrap();
        std::fs::remove_dir_all(&cache).unwrap();
        let err = reg.download_weights(&v, &cache).await.unwrap_err();
        assert!(matches!(err, RegistryError::ChecksumMismatch { .. }), "{err}");
    });

    // The CLI, configured from AWS_* like a deployment (conditional writes on by default).
    let f = Fixture::new();
    let cli = |args: &[&str]| {
        f.command(args)
            .args(["--registry", "s3://models/cli"])
            .env("AWS_ENDPOINT", &moto.endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env_remove("AWS_CONDITIONAL_PUT")
            .env_remove("AWS_PROFILE")
            .output()
            .unwrap()
    };
    let (m1, m2) = (f.metrics("m1", "val-A", 0.4), f.metrics("m2", "val-A", 0.5));
    let (w1, w2) = (f.weights(1.0), f.weights(2.0));
    let v1 = json_out(&cli(&["publish", "--weights", s(&w1), "--metrics", s(&m1)]))["version"].clone();
    let v2 = json_out(&cli(&["publish", "--weights", s(&w2), "--metrics", s(&m2)]))["version"].clone();
    let (v1, v2) = (v1.as_str().unwrap().to_string(), v2.as_str().unwrap().to_string());
    assert!(cli(&["promote", &v2]).status.success());
    let out = cli(&["promote", &v1]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(cli(&["rollback", &v1]).status.success());
    let shown = json_out(&cli(&["show", "production"]));
    assert_eq!(shown["manifest"]["version"], v1.as_str());
    let out = cli(&["list"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(table.contains(&format!("* {v1}")) && table.contains(&v2), "{table}");
}
