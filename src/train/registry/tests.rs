//! Unit tests of the registry on the in-memory store and on temporary directories.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use object_store::{ObjectStore, PutPayload};
use tch::Tensor;

use super::*;
use crate::detection::FASTERRCNN_RESNET50_FPN;
use crate::model::weights::{self, WeightsMetadata};

const LABELS: [&str; 3] = ["__background__", "red_circle", "blue_square"];

fn labels() -> Vec<String> {
    LABELS.iter().map(|s| s.to_string()).collect()
}

/// A small weights file whose content depends on `seed`.
fn weights_file(dir: &Path, seed: f32) -> PathBuf {
    let path = dir.join(format!("w{seed}.safetensors"));
    let meta = WeightsMetadata {
        architecture: Some(FASTERRCNN_RESNET50_FPN.into()),
        labels: Some(labels()),
        config: Some(serde_json::json!({"min_size": 320})),
        ..Default::default()
    };
    let t = Tensor::from_slice(&[seed, seed + 1.0, seed + 2.0]);
    weights::save(&path, &[("w".to_string(), t)], &meta).unwrap();
    path
}

fn metrics(fingerprint: &str, map: f64) -> EvalMetrics {
    EvalMetrics {
        validation_fingerprint: fingerprint.into(),
        map,
        ap50: (map + 0.2).min(1.0),
        ap75: map,
        per_class_ap: BTreeMap::from([("red_circle".into(), map), ("blue_square".into(), -1.0)]),
        images: Some(40),
    }
}

/// Publishes weights (seed) with metrics on `fp`, optionally with a parent and its metrics.
async fn publish(
    reg: &ModelRegistry,
    dir: &Path,
    seed: f32,
    m: Option<EvalMetrics>,
    parent: Option<(&VersionId, EvalMetrics)>,
) -> VersionId {
    let mut nv = NewVersion::new(weights_file(dir, seed));
    nv.metrics = m;
    if let Some((p, pm)) = parent {
        nv.parent = Some(p.clone());
        nv.parent_metrics = Some(pm);
    }
    nv.training_data = Some(TrainingData {
        topic: "labelled".into(),
        partitions: vec![PartitionRange {
            partition: 0,
            start_offset: 0,
            end_offset: 100,
        }],
    });
    reg.publish(nv).await.unwrap()
}

fn policy() -> PromotionPolicy {
    PromotionPolicy::default()
}

#[test]
fn version_ids_parse_order_and_reject_paths() {
    let a = VersionId::parse("v0002-20261128T181500Z-1a2b3c4d").unwrap();
    let b = VersionId::parse("v0010-20261127T000000Z-00000000").unwrap();
    let c = VersionId::parse("v10000-20261127T000000Z-00000000").unwrap();
    assert!(a < b && b < c, "ordered by sequence number, not text");
    assert_eq!(c.sequence(), 10000);
    for bad in [
        "",
        "production",
        "v2-20261128T181500Z-1a2b3c4d",
        "v0002-20261128T181500-1a2b3c4d",
        "v0002-20261128T181500Z-1A2B3C4D",
        "v0002-20261128T181500Z-1a2b3c4d/..",
        "v0002-20261128T181500Z-../../x",
    ] {
        assert!(VersionId::parse(bad).is_err(), "{bad:?} accepted");
    }
    let made = VersionId::new(3, "2026-11-28T18:15:00.5Z".parse().unwrap(), &"ab".repeat(32));
    assert_eq!(made.as_str(), "v0003-20261128T181500Z-abababab");
    assert_eq!(VersionId::parse(made.as_str()).unwrap(), made);
}

#[test]
fn locations_parse() {
    assert_eq!(
        parse_location("s3://bucket/a/b/").unwrap(),
        Location::S3 {
            bucket: "bucket".into(),
            prefix: "a/b".into()
        }
    );
    assert_eq!(
        parse_location("file:///srv/models").unwrap(),
        Location::Local("/srv/models".into())
    );
    assert_eq!(parse_location("rel/dir").unwrap(), Location::Local("rel/dir".into()));
    for bad in [
        "",
        "gs://b/p",
        "s3:///nobucket",
        "s3://key:secret@bucket/p",
        "file://relative",
    ] {
        let err = parse_location(bad).unwrap_err().to_string();
        assert!(err.contains("not usable"), "{bad}: {err}");
    }
}

#[tokio::test]
async fn promotes_only_when_better_on_the_same_validation_set() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = ModelRegistry::in_memory().with_actor("tester");
    assert!(reg.production().await.unwrap().is_none());
    let v1 = publish(&reg, tmp.path(), 1.0, Some(metrics("val-A", 0.40)), None).await;
    let v2 = publish(
        &reg,
        tmp.path(),
        2.0,
        Some(metrics("val-A", 0.45)),
        Some((&v1, metrics("val-A", 0.40))),
    )
    .await;
    assert_eq!((v1.sequence(), v2.sequence()), (1, 2));
    let listed: Vec<VersionId> = reg.list().await.unwrap().into_iter().map(|m| m.version).collect();
    assert_eq!(listed, vec![v1.clone(), v2.clone()]);

    let m2 = reg.get(&v2).await.unwrap();
    assert_eq!(m2.labels, labels());
    assert_eq!(m2.architecture, Architecture::FasterRcnnResnet50Fpn);
    assert_eq!(m2.model_config, serde_json::json!({"min_size": 320}));
    assert_eq!(m2.parent.as_ref(), Some(&v1));
    assert_eq!(m2.created_by, "tester");
    assert_eq!(m2.weights.sha256.len(), 64);
    assert!(v2.as_str().ends_with(&m2.weights.sha256[..8]));

    // First promotion: nothing to beat.
    let d = reg.promote(&v1, &policy()).await.unwrap();
    assert!(d.promoted, "{}", d.reason);
    assert_eq!(reg.production().await.unwrap().unwrap().version, v1);

    // Better on the same validation set (through parent_metrics).
    let d = reg.promote(&v2, &policy()).await.unwrap();
    assert!(d.promoted, "{}", d.reason);
    assert_eq!(d.baseline_value, Some(0.40));
    let p = reg.production().await.unwrap().unwrap();
    assert_eq!(
        (p.version.clone(), p.previous_version.clone(), p.revision),
        (v2.clone(), Some(v1.clone()), 2)
    );
    assert_eq!(p.action, ProductionAction::Promote);

    // Worse: refused, production unchanged, decision recorded.
    let v3 = publish(
        &reg,
        tmp.path(),
        3.0,
        Some(metrics("val-A", 0.44)),
        Some((&v2, metrics("val-A", 0.45))),
    )
    .await;
    let d = reg.promote(&v3, &policy()).await.unwrap();
    assert!(!d.promoted);
    assert!(d.reason.contains("does not beat"), "{}", d.reason);
    assert_eq!(reg.production().await.unwrap().unwrap().version, v2);

    // Better, but not by the required margin; then compared on AP50 instead.
    let v4 = publish(&reg, tmp.path(), 4.0, Some(metrics("val-A", 0.46)), None).await;
    let strict = PromotionPolicy {
        min_improvement: 0.05,
        ..policy()
    };
    let d = reg.promote(&v4, &strict).await.unwrap();
    assert!(!d.promoted, "{}", d.reason);
    assert_eq!(
        d.baseline_source.as_deref(),
        Some(format!("metrics of production {v2}").as_str())
    );
    let ap50 = PromotionPolicy {
        metric: Metric::Ap50,
        ..policy()
    };
    let d = reg.promote(&v4, &ap50).await.unwrap();
    assert!(d.promoted, "{}", d.reason);
    assert_eq!((d.candidate_value, d.baseline_value), (Some(0.66), Some(0.65)));

    let decisions = reg.decisions(None).await.unwrap();
    assert_eq!(decisions.len(), 5);
    let about_v3 = reg.decisions(Some(&v3)).await.unwrap();
    assert_eq!(about_v3.len(), 1);
    assert!(!about_v3[0].promoted && about_v3[0].decided_by == "tester");

    // Promoting production again is a no-op, even forced.
    let forced = PromotionPolicy {
        force: true,
        ..policy()
    };
    let d = reg.promote(&v4, &forced).await.unwrap();
    assert!(!d.promoted && d.reason.contains("already"), "{}", d.reason);
    assert_eq!(reg.production().await.unwrap().unwrap().revision, 3);
}

#[tokio::test]
async fn refuses_another_validation_set_unless_forced_and_rolls_back() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = ModelRegistry::in_memory();
    let v1 = publish(&reg, tmp.path(), 1.0, Some(metrics("val-A", 0.40)), None).await;
    let v2 = publish(&reg, tmp.path(), 2.0, Some(metrics("val-B", 0.90)), None).await;
    let v3 = publish(&reg, tmp.path(), 3.0, None, None).await;
    assert!(reg.promote(&v1, &policy()).await.unwrap().promoted);

    let d = reg.promote(&v2, &policy()).await.unwrap();
    assert!(!d.promoted);
    assert!(d.reason.contains("val-B") && d.reason.contains("val-A") && d.reason.contains("not comparable"));
    let d = reg.promote(&v3, &policy()).await.unwrap();
    assert!(!d.promoted && d.reason.contains("no metrics"), "{}", d.reason);
    assert_eq!(reg.production().await.unwrap().unwrap().version, v1);

    let forced = PromotionPolicy {
        force: true,
        note: Some("new validation set".into()),
        ..policy()
    };
    let d = reg.promote(&v2, &forced).await.unwrap();
    assert!(d.promoted && d.action == ProductionAction::ForcedPromote);
    let p = reg.production().await.unwrap().unwrap();
    assert_eq!(p.action, ProductionAction::ForcedPromote);
    assert!(
        p.reason.starts_with("forced: ") && p.reason.ends_with("note: new validation set"),
        "{}",
        p.reason
    );

    let p = reg.rollback(&v1, Some("v2 misbehaves")).await.unwrap();
    assert_eq!(
        (p.version.clone(), p.previous_version.clone()),
        (v1.clone(), Some(v2.clone()))
    );
    assert_eq!((p.action, p.revision), (ProductionAction::Rollback, 3));
    assert_eq!(reg.production().await.unwrap().unwrap(), p);
    let last = reg.decisions(Some(&v1)).await.unwrap().pop().unwrap();
    assert_eq!(last.action, ProductionAction::Rollback);

    let missing = VersionId::parse("v0099-20261128T181500Z-00000000").unwrap();
    let err = reg.rollback(&missing, None).await.unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn publish_checks_its_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = ModelRegistry::in_memory();
    let w = weights_file(tmp.path(), 1.0);
    let err = |nv: NewVersion| {
        let reg = reg.clone();
        async move { reg.publish(nv).await.unwrap_err().to_string() }
    };
    let mut nv = NewVersion::new(&w);
    nv.labels = Some(vec!["__background__".into(), "cup".into()]);
    assert!(err(nv).await.contains("differs from the one the detector will use"));
    let mut nv = NewVersion::new(&w);
    nv.architecture = Some(Architecture::SsdMobileNetV2);
    assert!(err(nv).await.contains("fasterrcnn_resnet50_fpn model"));
    let mut nv = NewVersion::new(&w);
    nv.parent = Some(VersionId::parse("v0007-20261128T181500Z-00000000").unwrap());
    assert!(err(nv).await.contains("not in the model registry"));
    let v1 = reg.publish(NewVersion::new(&w)).await.unwrap();
    let mut nv = NewVersion::new(&w);
    nv.parent = Some(v1.clone());
    nv.metrics = Some(metrics("val-A", 0.5));
    nv.parent_metrics = Some(metrics("val-B", 0.4));
    assert!(err(nv).await.contains("same validation set"));
    let mut nv = NewVersion::new(&w);
    nv.metrics = Some(metrics("val-A", f64::NAN));
    assert!(err(nv).await.contains("map = NaN"));
    let mut nv = NewVersion::new(tmp.path().join("absent.safetensors"));
    nv.metrics = None;
    assert!(err(nv).await.contains("absent.safetensors"));
    // The same weights can be published twice: new sequence number, new id.
    let again = reg.publish(NewVersion::new(&w)).await.unwrap();
    assert_eq!(again.sequence(), 2);
}

/// The compare-and-replace itself: two writers that read the same production.json; exactly
/// one may replace it (conditional put on the memory store, flock + compare locally).
async fn exactly_one_replace_wins(reg: &ModelRegistry, dir: &Path) {
    let v1 = publish(reg, dir, 1.0, Some(metrics("val-A", 0.4)), None).await;
    let v2 = publish(reg, dir, 2.0, Some(metrics("val-A", 0.5)), None).await;
    let v3 = publish(reg, dir, 3.0, Some(metrics("val-A", 0.5)), None).await;
    for base in [None, Some(&v1)] {
        if let Some(v) = base {
            reg.rollback(v, None).await.unwrap();
        }
        let stale = reg.snapshot().await.unwrap();
        let record = |v: &VersionId| Production {
            version: v.clone(),
            promoted_at: Utc::now(),
            promoted_by: "t".into(),
            action: ProductionAction::Promote,
            reason: "test".into(),
            previous_version: base.cloned(),
            revision: 9,
        };
        let (r2, r3) = (record(&v2), record(&v3));
        let (a, b) = tokio::join!(reg.replace_production(&stale, &r2), reg.replace_production(&stale, &r3));
        let wins = [a.is_ok(), b.is_ok()];
        assert_eq!(wins.iter().filter(|w| **w).count(), 1, "{a:?} {b:?}");
        let loser = if a.is_ok() { b } else { a };
        assert!(matches!(loser, Err(RegistryError::Conflict { .. })), "{loser:?}");
        let winner = if wins[0] { &v2 } else { &v3 };
        assert_eq!(&reg.production().await.unwrap().unwrap().version, winner);
    }
}

#[tokio::test]
async fn concurrent_replace_in_memory_has_one_winner() {
    let tmp = tempfile::tempdir().unwrap();
    exactly_one_replace_wins(&ModelRegistry::in_memory(), tmp.path()).await;
}

#[tokio::test]
async fn concurrent_replace_in_a_directory_has_one_winner() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = ModelRegistry::open(tmp.path().join("registry").to_str().unwrap()).unwrap();
    exactly_one_replace_wins(&reg, tmp.path()).await;
}

/// Many promoters at once, each with a candidate better than production and all equal:
/// exactly one becomes production (the others lose the race or no longer beat the winner).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_promoters_in_a_directory_have_one_winner() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = ModelRegistry::open(tmp.path().join("registry").to_str().unwrap()).unwrap();
    let base = publish(&reg, tmp.path(), 0.0, Some(metrics("val-A", 0.3)), None).await;
    assert!(reg.promote(&base, &policy()).await.unwrap().promoted);
    let mut candidates = Vec::new();
    for i in 1..=6 {
        candidates.push(publish(&reg, tmp.path(), i as f32, Some(metrics("val-A", 0.5)), None).await);
    }
    let tasks: Vec<_> = candidates
        .iter()
        .map(|c| {
            let (reg, c) = (reg.clone(), c.clone());
            tokio::spawn(async move { reg.promote(&c, &PromotionPolicy::default()).await })
        })
        .collect();
    let mut promoted = Vec::new();
    for (task, c) in tasks.into_iter().zip(&candidates) {
        match task.await.unwrap() {
            Ok(d) if d.promoted => promoted.push(c.clone()),
            Ok(d) => assert!(d.reason.contains("does not beat"), "{}", d.reason),
            Err(RegistryError::Conflict { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(promoted.len(), 1, "{promoted:?}");
    let p = reg.production().await.unwrap().unwrap();
    assert_eq!(
        (p.version, p.previous_version, p.revision),
        (promoted[0].clone(), Some(base), 2)
    );
}

#[tokio::test]
async fn directory_layout_is_as_documented() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("reg");
    let reg = ModelRegistry::open(&format!("file://{}", root.display())).unwrap();
    let v1 = publish(&reg, tmp.path(), 1.0, Some(metrics("val-A", 0.4)), None).await;
    reg.promote(&v1, &policy()).await.unwrap();
    let dir = root.join("versions").join(v1.as_str());
    let original = std::fs::read(tmp.path().join("w1.safetensors")).unwrap();
    assert_eq!(std::fs::read(dir.join(WEIGHTS_FILE)).unwrap(), original);
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(manifest["architecture"], "fasterrcnn_resnet50_fpn");
    assert_eq!(manifest["labels"][0], "__background__");
    assert_eq!(manifest["training_data"]["partitions"][0]["end_offset"], 100);
    assert_eq!(manifest["metrics"]["validation_fingerprint"], "val-A");
    let production: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join(PRODUCTION_FILE)).unwrap()).unwrap();
    assert_eq!(production["version"], v1.as_str());
    assert_eq!(
        std::fs::read_to_string(root.join("sequence/000001")).unwrap(),
        v1.as_str()
    );
    assert_eq!(std::fs::read_dir(root.join("decisions")).unwrap().count(), 1);
}

#[tokio::test]
async fn damaged_manifests_and_weights_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = ModelRegistry::in_memory();
    let v1 = publish(&reg, tmp.path(), 1.0, Some(metrics("val-A", 0.4)), None).await;
    let v2 = publish(&reg, tmp.path(), 2.0, Some(metrics("val-A", 0.5)), None).await;

    // Corrupt manifest: get names the file; list skips the version.
    let key = reg.version_key(&v1, MANIFEST_FILE);
    reg.store
        .put(&key, PutPayload::from_static(b"{\"format\": 1,"))
        .await
        .unwrap();
    let err = reg.get(&v1).await.unwrap_err();
    assert!(matches!(err, RegistryError::CorruptManifest { .. }), "{err}");
    assert!(err.to_string().contains(&format!("versions/{v1}/model.json")), "{err}");
    let listed: Vec<VersionId> = reg.list().await.unwrap().into_iter().map(|m| m.version).collect();
    assert_eq!(listed, vec![v2.clone()]);

    // Missing manifest: the version is gone from list, and get says why.
    reg.store.delete(&key).await.unwrap();
    let err = reg.get(&v1).await.unwrap_err().to_string();
    assert!(
        err.contains("its weights are there but its manifest model.json is missing"),
        "{err}"
    );

    // A manifest stored under another version's name.
    let moved = serde_json::to_vec(&reg.get(&v2).await.unwrap()).unwrap();
    reg.store.put(&key, PutPayload::from(moved)).await.unwrap();
    assert!(reg.get(&v1).await.unwrap_err().to_string().contains("names version"));

    // Weights replaced in the store: the download is refused and nothing is cached.
    let cache = tmp.path().join("cache");
    let weights_key = reg.version_key(&v2, WEIGHTS_FILE);
    let good = reg.store.get(&weights_key).await.unwrap().bytes().await.unwrap();
    let mut bad = good.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    reg.store.put(&weights_key, PutPayload::from(bad)).await.unwrap();
    let err = reg.download_weights(&v2, &cache).await.unwrap_err();
    assert!(matches!(err, RegistryError::ChecksumMismatch { .. }), "{err}");
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        0,
        "no partial file left behind"
    );

    // Restored: downloaded once, then served from the cache; a damaged cached copy is replaced.
    reg.store
        .put(&weights_key, PutPayload::from(good.clone()))
        .await
        .unwrap();
    let path = reg.download_weights(&v2, &cache).await.unwrap();
    let sha = reg.get(&v2).await.unwrap().weights.sha256;
    assert_eq!(path, cache.join(format!("{sha}.safetensors")));
    assert_eq!(std::fs::read(&path).unwrap(), good.to_vec());
    std::fs::write(&path, b"damaged").unwrap();
    assert_eq!(reg.download_weights(&v2, &cache).await.unwrap(), path);
    assert_eq!(std::fs::read(&path).unwrap(), good.to_vec());

    // Unreadable production.json: a clear error, and rollback repairs it.
    reg.store
        .put(&reg.key(PRODUCTION_FILE), PutPayload::from_static(b"not json"))
        .await
        .unwrap();
    let err = reg.production().await.unwrap_err().to_string();
    assert!(
        err.contains("production.json is unreadable") && err.contains("rollback"),
        "{err}"
    );
    reg.rollback(&v2, None).await.unwrap();
    assert_eq!(reg.production().await.unwrap().unwrap().version, v2);
}

#[tokio::test]
async fn resolve_model_gives_local_weights_labels_and_config() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = ModelRegistry::in_memory();
    let cache = tmp.path().join("cache");
    let err = resolve_model(&reg, PRODUCTION_REF, &cache)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no production version yet"), "{err}");
    let v1 = publish(&reg, tmp.path(), 1.0, Some(metrics("val-A", 0.4)), None).await;
    reg.promote(&v1, &policy()).await.unwrap();
    let r = resolve_model(&reg, PRODUCTION_REF, &cache).await.unwrap();
    assert_eq!((r.version.clone(), r.labels.clone()), (v1.clone(), labels()));
    assert_eq!(r.config, serde_json::json!({"min_size": 320}));
    let meta = weights::read_metadata(&r.weights).unwrap();
    assert_eq!(meta.labels, Some(labels()), "the detector reads the same label map");
    assert_eq!(
        resolve_model(&reg, v1.as_str(), &cache).await.unwrap().weights,
        r.weights
    );
    assert!(resolve_model(&reg, "latest", &cache).await.is_err());
}

#[tokio::test]
async fn watch_starts_with_the_current_state_and_sees_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = ModelRegistry::open(tmp.path().join("reg").to_str().unwrap()).unwrap();
    let v1 = publish(&reg, tmp.path(), 1.0, Some(metrics("val-A", 0.4)), None).await;
    let v2 = publish(&reg, tmp.path(), 2.0, Some(metrics("val-A", 0.5)), None).await;
    let mut watch = reg.watch(Duration::from_millis(20)).await.unwrap();
    async fn next(w: &mut ProductionWatch) -> Option<Production> {
        let seen = tokio::time::timeout(Duration::from_secs(10), w.next_change()).await;
        seen.expect("no change seen").expect("watch ended")
    }
    assert_eq!(next(&mut watch).await, None, "first value: no production yet");
    reg.promote(&v1, &policy()).await.unwrap();
    assert_eq!(next(&mut watch).await.unwrap().version, v1);

    // An unreadable production.json is logged and retried; the last good state stands.
    std::fs::write(tmp.path().join("reg").join(PRODUCTION_FILE), b"{ broken").unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    reg.rollback(&v2, Some("after repair")).await.unwrap();
    let seen = next(&mut watch).await.unwrap();
    assert_eq!((seen.version, seen.action), (v2, ProductionAction::Rollback));

    // Also a Stream.
    reg.rollback(&v1, None).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap();
    assert_eq!(seen.unwrap().unwrap().version, v1);
    assert!(reg.watch(Duration::ZERO).await.is_err());
}

#[test]
fn resolve_model_blocking_serves_synchronous_start_up() {
    let tmp = tempfile::tempdir().unwrap();
    let location = tmp.path().join("reg").to_str().unwrap().to_string();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let v1 = runtime.block_on(async {
        let reg = ModelRegistry::open(&location).unwrap();
        let v1 = publish(&reg, tmp.path(), 1.0, Some(metrics("val-A", 0.4)), None).await;
        reg.promote(&v1, &policy()).await.unwrap();
        // Inside a runtime it refuses instead of panicking.
        let err = resolve_model_blocking(&location, PRODUCTION_REF, tmp.path()).unwrap_err();
        assert!(err.to_string().contains("await resolve_model instead"), "{err}");
        v1
    });
    drop(runtime);
    let resolved = resolve_model_blocking(&location, PRODUCTION_REF, &tmp.path().join("cache")).unwrap();
    assert_eq!((resolved.version, resolved.labels), (v1, labels()));
    assert!(resolved.weights.starts_with(tmp.path().join("cache")));
}
