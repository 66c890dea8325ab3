//! The Kubernetes deployment's configuration, read by the real configuration loader.
//!
//! scripts/validate-deploy checks the rendered manifests (schemas and invariants) but cannot
//! know which configuration keys attrstream accepts. These tests load every `attrstream.toml`
//! under deploy/k8s with [`Config::load`] (unknown keys and bad values are errors there), and
//! check that the environment variable names the Secret example and the kafka-auth component
//! hand to the pods are real configuration keys that land where the manifests say.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use attrstream::config::{normalize_kafka_key, Config};

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s")
}

/// Every `attrstream.toml` under deploy/k8s (the base's and each overlay's).
fn config_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out);
            } else if path.file_name().is_some_and(|n| n == "attrstream.toml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&k8s_dir(), &mut files);
    files
}

/// `KEY: value` entries of the Secrets' stringData in the example (upper-case keys only, so
/// `ca.crt` and metadata are skipped). A deliberately small reader: the file is ours.
fn example_secret_env() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(k8s_dir().join("examples/secrets.example.yaml")).unwrap();
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.strip_prefix("  ")?.split_once(": ")?;
            let is_env = !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            is_env.then(|| (key.to_string(), value.trim().to_string()))
        })
        .collect()
}

/// `- NAME=value` literals of the kafka-auth component's attrstream-env ConfigMap.
fn kafka_auth_env() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(k8s_dir().join("components/kafka-auth/kustomization.yaml")).unwrap();
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("- ATTRSTREAM_"))
        .filter_map(|rest| rest.split_once('='))
        .map(|(k, v)| (format!("ATTRSTREAM_{k}"), v.to_string()))
        .collect()
}

/// [`Config::load`], except that `model.devices` is only checked for its syntax: the loader also
/// insists that each `cuda:N` is visible, and these tests run on machines without GPUs.
fn load_deploy_config(path: &Path) -> Result<Config, String> {
    let mut config = Config::load_unvalidated(Some(path), &[]).map_err(|e| format!("{e:#}"))?;
    for device in &config.model.devices {
        let index = device.strip_prefix("cuda:").map(|n| n.parse::<u32>().is_ok());
        if device != "cpu" && index != Some(true) {
            return Err(format!("model.devices entry `{device}` is neither cpu nor cuda:N"));
        }
    }
    let devices = std::mem::take(&mut config.model.devices);
    config.validate().map_err(|e| format!("{e:#}"))?;
    config.model.devices = devices;
    Ok(config)
}

#[test]
fn every_kubernetes_config_file_loads_and_validates() {
    let files = config_files();
    assert!(
        files.len() >= 3,
        "expected the base's and two overlays' configs, found {files:?}"
    );
    for file in &files {
        let config = load_deploy_config(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            config.model.registry.is_some(),
            "{}: serve follows the model registry the training job promotes into",
            file.display()
        );
        assert!(
            config.model.registry_cache_dir.is_absolute(),
            "{}: the registry cache must be on the mounted cache volume (read-only root filesystem)",
            file.display()
        );
        assert_eq!(
            config.telemetry.listen,
            "0.0.0.0:9464",
            "{}: the probes use port 9464",
            file.display()
        );
    }
}

#[test]
fn the_commented_database_example_is_a_valid_config() {
    for file in config_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let enabled = text
            .replace("# [database]\n", "[database]\n")
            .replace("# url = \"postgres://", "url = \"postgres://");
        assert_ne!(enabled, text, "{}: no commented [database] example", file.display());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("attrstream.toml");
        std::fs::write(&path, enabled).unwrap();
        let config = load_deploy_config(&path).unwrap_or_else(|e| panic!("{} with [database]: {e}", file.display()));
        assert!(config.database.url.is_some());
    }
}

#[test]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
fn secret_and_component_environment_names_are_real_config_keys() {
    let secret = example_secret_env();
    let component = kafka_auth_env();
    for key in [
        "ATTRSTREAM_KAFKA__OPTIONS__SASL_USERNAME",
        "ATTRSTREAM_KAFKA__OPTIONS__SASL_PASSWORD",
        "ATTRSTREAM_SCHEMAS__REGISTRY_PASSWORD",
        "ATTRSTREAM_DATABASE__PASSWORD",
        "AWS_ACCESS_KEY_ID",
    ] {
        assert!(secret.contains_key(key), "the Secret example lacks {key}: {secret:?}");
    }
    assert!(
        component.contains_key("ATTRSTREAM_KAFKA__OPTIONS__SECURITY_PROTOCOL"),
        "{component:?}"
    );
    let base = k8s_dir().join("base/attrstream.toml");
    figment::Jail::expect_with(|jail| {
        for (key, value) in secret.iter().chain(&component) {
            jail.set_env(key, value);
        }
        let config = Config::load(Some(&base), &[]).map_err(|e| format!("{e:#}"))?;
        let options: BTreeMap<String, String> = config
            .kafka
            .options
            .iter()
            .map(|(k, v)| (normalize_kafka_key(k), v.clone()))
            .collect();
        let expect = |key: &str, env: &str, all: &BTreeMap<String, String>| {
            assert_eq!(
                options.get(key),
                all.get(env),
                "librdkafka {key} from {env}: {options:?}"
            );
        };
        expect("sasl.username", "ATTRSTREAM_KAFKA__OPTIONS__SASL_USERNAME", &secret);
        expect("sasl.password", "ATTRSTREAM_KAFKA__OPTIONS__SASL_PASSWORD", &secret);
        expect(
            "security.protocol",
            "ATTRSTREAM_KAFKA__OPTIONS__SECURITY_PROTOCOL",
            &component,
        );
        expect(
            "sasl.mechanisms",
            "ATTRSTREAM_KAFKA__OPTIONS__SASL_MECHANISMS",
            &component,
        );
        expect(
            "ssl.ca.location",
            "ATTRSTREAM_KAFKA__OPTIONS__SSL_CA_LOCATION",
            &component,
        );
        assert_eq!(
            config.schemas.registry_password.as_ref(),
            secret.get("ATTRSTREAM_SCHEMAS__REGISTRY_PASSWORD")
        );
        assert_eq!(
            config.database.password.as_ref(),
            secret.get("ATTRSTREAM_DATABASE__PASSWORD")
        );
        Ok(())
    });
}

/// The `args:` lists of the manifests' attrstream containers, one per file that has one. A
/// deliberately small reader: our manifests write each argument as its own `- item` line.
fn container_args() -> Vec<(PathBuf, Vec<String>)> {
    let files = [
        "base/deployment.yaml",
        "base/train-cronjob.yaml",
        "examples/train-job.yaml",
    ];
    let mut found = Vec::new();
    for file in files {
        let path = k8s_dir().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines
            .iter()
            .position(|l| l.trim_end().ends_with("args:"))
            .unwrap_or_else(|| panic!("{file}: no args: list"));
        let indent = lines[start].len() - lines[start].trim_start().len();
        let mut args = Vec::new();
        for line in &lines[start + 1..] {
            let trimmed = line.trim_start();
            if trimmed.starts_with('#') {
                continue;
            }
            let depth = line.len() - trimmed.len();
            match trimmed.strip_prefix("- ") {
                Some(item) if depth >= indent => args.push(item.trim().trim_matches('"').to_string()),
                _ => break,
            }
        }
        assert!(!args.is_empty(), "{file}: empty args: list");
        found.push((path, args));
    }
    found
}

#[test]
fn every_container_command_line_parses_with_the_real_cli() {
    use clap::Parser;
    let commands = container_args();
    assert_eq!(commands.len(), 3);
    for (path, args) in commands {
        let argv = std::iter::once("attrstream".to_string()).chain(args.iter().cloned());
        if let Err(e) = attrstream::cli::Cli::try_parse_from(argv) {
            panic!(
                "{}: `attrstream {}` is refused by the CLI:\n{e}",
                path.display(),
                args.join(" ")
            );
        }
    }
    // The reader and the check can fail: a flag the CLI does not know is refused.
    let refused = attrstream::cli::Cli::try_parse_from(["attrstream", "train", "--no-such-flag"]);
    assert!(refused.is_err());
}
