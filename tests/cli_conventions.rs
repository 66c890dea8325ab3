//! The command line behaves like the tools around it: documented exit codes (0 success, 1 some
//! inputs failed, 2 usage or configuration, 3 runtime failure), `--version` with what a bug
//! report needs, shell completions, and logs that suit a terminal, a pipe or a log pipeline
//! (no colour codes unless on a terminal, JSON lines on request, -v/-q).
//!
//! Every test runs the real binary. None needs a broker or model weights: the runtime failures
//! are an unreachable broker (127.0.0.1:1) and a missing weights file.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Schema ids so `serve`, `publish` and `tail` need no schema registry.
const FIXED_IDS: [&str; 6] = [
    "--set",
    "schemas.input_schema_id=1",
    "--set",
    "schemas.output_schema_id=2",
    "--set",
    "schemas.dead_letter_schema_id=3",
];

/// Where nothing listens: connections are refused at once.
const NO_BROKER: &str = "127.0.0.1:1";

fn attrstream(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_attrstream"));
    command
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .env_remove("ATTRSTREAM_TELEMETRY__LOG_FORMAT")
        .env_remove("ATTRSTREAM_CONFIG")
        .env_remove("ATTRSTREAM_WEIGHTS");
    command
}

fn run(dir: &Path, args: &[&str]) -> Output {
    attrstream(dir).args(args).output().expect("run attrstream")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `serve` that logs "starting", then fails at start because the weights file is missing.
fn serve_without_weights(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    args.extend(["serve", "--brokers", NO_BROKER, "--weights", "missing.safetensors"].map(String::from));
    args.extend(FIXED_IDS.map(String::from));
    args.extend(["--set", "telemetry.listen=\"\""].map(String::from));
    args
}

#[test]
fn exit_code_0_version_names_commit_libtorch_and_cuda() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["--version"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let line = stdout(&out);
    let cuda = if cfg!(feature = "cuda") { "on" } else { "off" };
    assert!(
        line.starts_with(&format!("attrstream {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{line}"
    );
    assert!(line.contains(&format!(", cuda feature {cuda})")), "{line}");
    let libtorch = line.split("libtorch ").nth(1).unwrap_or_default();
    assert!(
        libtorch.starts_with(|c: char| c.is_ascii_digit()),
        "libtorch version missing: {line}"
    );
    let commit = line.split("(commit ").nth(1).unwrap_or_default();
    assert!(!commit.starts_with(','), "commit missing: {line}");
}

#[test]
fn completions_are_valid_scripts_for_each_shell() {
    let dir = tempfile::tempdir().unwrap();
    let bash = run(dir.path(), &["completions", "bash"]);
    assert_eq!(bash.status.code(), Some(0), "{}", stderr(&bash));
    let script = stdout(&bash);
    assert!(
        script.contains("_attrstream()") && script.contains("publish-labels"),
        "{script}"
    );
    let path = dir.path().join("attrstream.bash");
    std::fs::write(&path, &script).unwrap();
    let syntax = Command::new("bash").arg("-n").arg(&path).output().expect("run bash -n");
    assert!(syntax.status.success(), "bash -n: {}", stderr(&syntax));

    let zsh = stdout(&run(dir.path(), &["completions", "zsh"]));
    assert!(zsh.starts_with("#compdef attrstream"), "{zsh}");
    let fish = stdout(&run(dir.path(), &["completions", "fish"]));
    assert!(fish.contains("complete -c attrstream"), "{fish}");

    let unknown = run(dir.path(), &["completions", "tcsh"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", stderr(&unknown));
}

#[test]
fn exit_code_2_for_flags_keys_and_values() {
    let dir = tempfile::tempdir().unwrap();
    let flag = run(dir.path(), &["serve", "--no-such-flag"]);
    assert_eq!(flag.status.code(), Some(2), "{}", stderr(&flag));

    let mut args = vec!["serve", "--print-config", "--set", "kafka.no_such_key=1"];
    args.extend(FIXED_IDS);
    let key = run(dir.path(), &args);
    assert_eq!(key.status.code(), Some(2), "{}", stderr(&key));
    assert!(stderr(&key).contains("no_such_key"), "{}", stderr(&key));

    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[batch]\nmax_batch_size = 0\n").unwrap();
    let mut args = vec!["publish", "--config", config.to_str().unwrap(), "x.png"];
    args.extend(FIXED_IDS);
    let value = run(dir.path(), &args);
    assert_eq!(value.status.code(), Some(2), "{}", stderr(&value));
    assert!(
        stderr(&value).contains("batch.max_batch_size must be at least 1"),
        "{}",
        stderr(&value)
    );

    let device = run(dir.path(), &["detect", "--device", "gpu7", "x.png"]);
    assert_eq!(device.status.code(), Some(2), "{}", stderr(&device));
    assert!(stderr(&device).contains("unknown device"), "{}", stderr(&device));
}

#[test]
fn print_config_shows_an_invalid_configuration_then_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "serve",
        "--print-config",
        "--set",
        "batch.max_batch_size=0",
        "--kafka-option",
        "sasl.password=hunter2",
    ];
    args.extend(FIXED_IDS);
    let out = run(dir.path(), &args);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let shown: toml::Value = toml::from_str(&stdout(&out)).expect("the configuration is printed as TOML");
    assert_eq!(shown["batch"]["max_batch_size"].as_integer(), Some(0));
    assert_eq!(shown["kafka"]["options"]["sasl.password"].as_str(), Some("<redacted>"));
    assert!(
        stderr(&out).contains("batch.max_batch_size must be at least 1"),
        "{}",
        stderr(&out)
    );

    let valid = run(dir.path(), &[&["serve", "--print-config"][..], &FIXED_IDS].concat());
    assert_eq!(valid.status.code(), Some(0), "{}", stderr(&valid));
}

#[test]
fn exit_code_3_when_the_model_is_missing_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let args = serve_without_weights(&[]);
    let out = attrstream(dir.path()).args(&args).output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("missing.safetensors"), "{}", stderr(&out));
}

#[test]
fn exit_code_3_when_the_broker_cannot_be_reached_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("cup.png");
    std::fs::File::create(&image)
        .unwrap()
        .write_all(b"not decoded by publish")
        .unwrap();
    let labelled = dir.path().join("labelled");
    let made = run(
        dir.path(),
        &["synth-labels", "--out", labelled.to_str().unwrap(), "--images", "2"],
    );
    assert!(made.status.success(), "{}", stderr(&made));
    let annotations = labelled.join("annotations.json");
    let timeout = ["--set", "kafka.connect_timeout=\"2s\""];
    let commands: [Vec<&str>; 5] = [
        vec!["publish", "--brokers", NO_BROKER, image.to_str().unwrap()],
        vec!["tail", "--brokers", NO_BROKER],
        vec![
            "publish-labels",
            "--brokers",
            NO_BROKER,
            "--schema-id",
            "4",
            "--annotations",
            annotations.to_str().unwrap(),
        ],
        vec![
            "eval",
            "--brokers",
            NO_BROKER,
            "--model",
            "m.safetensors",
            "--topic",
            "labelled",
        ],
        vec![
            "train",
            "--brokers",
            NO_BROKER,
            "--base",
            "m.safetensors",
            "--topic",
            "labelled",
        ],
    ];
    for command in commands {
        let started = Instant::now();
        let out = run(dir.path(), &[&command[..], &FIXED_IDS, &timeout].concat());
        let took = started.elapsed();
        assert_eq!(out.status.code(), Some(3), "{command:?}: {}", stderr(&out));
        // publish, tail and publish-labels wait for the brokers first; eval and train fail
        // reading the topic's metadata within the same limit.
        assert!(
            stderr(&out).contains("cannot reach the Kafka brokers at 127.0.0.1:1 within 2s")
                || stderr(&out).contains("cannot read the metadata of topic labelled (are the brokers reachable?)"),
            "{command:?}: {}",
            stderr(&out)
        );
        assert!(
            took < Duration::from_secs(20),
            "{command:?} gave up after {took:?}, not near its 2 s limit"
        );
    }
}

#[test]
fn exit_code_1_when_some_inputs_fail() {
    // detect's per-file failures (tests/detect_cli.rs covers the detections themselves) and a
    // promotion the registry refuses (tests/model_registry.rs covers the decision).
    let dir = tempfile::tempdir().unwrap();
    let weights = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/ssd_mobilenet_v2_coco.safetensors");
    assert!(weights.exists(), "{} is missing: run scripts/setup", weights.display());
    let out = run(
        dir.path(),
        &[
            "detect",
            "--device",
            "cpu",
            "--weights",
            weights.to_str().unwrap(),
            "no-such.png",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
}

#[test]
fn logs_have_no_colour_codes_when_piped() {
    let dir = tempfile::tempdir().unwrap();
    let out = attrstream(dir.path())
        .args(serve_without_weights(&[]))
        .output()
        .unwrap();
    let text = stderr(&out);
    assert!(text.contains("starting"), "{text}");
    assert!(!text.contains('\u{1b}'), "escape codes in piped logs: {text:?}");
}

/// Runs `args` under a pseudo-terminal (util-linux `script`), returning what it printed.
fn on_a_terminal(dir: &Path, args: &[String], no_color: bool) -> String {
    let mut line = shell_quote(env!("CARGO_BIN_EXE_attrstream"));
    for arg in args {
        line.push(' ');
        line.push_str(&shell_quote(arg));
    }
    let mut command = Command::new("script");
    command
        .current_dir(dir)
        .args(["-qec", &line, "/dev/null"])
        .env_remove("RUST_LOG");
    if no_color {
        command.env("NO_COLOR", "1");
    } else {
        command.env_remove("NO_COLOR");
    }
    let out = command
        .output()
        .expect("util-linux `script` runs commands on a pseudo-terminal (Debian: bsdutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn logs_are_coloured_on_a_terminal_unless_no_color() {
    let dir = tempfile::tempdir().unwrap();
    let args = serve_without_weights(&[]);
    let coloured = on_a_terminal(dir.path(), &args, false);
    assert!(coloured.contains("starting"), "{coloured}");
    assert!(coloured.contains("\u{1b}["), "no colour on a terminal: {coloured:?}");
    let plain = on_a_terminal(dir.path(), &args, true);
    assert!(plain.contains("starting"), "{plain}");
    assert!(!plain.contains('\u{1b}'), "colour despite NO_COLOR: {plain:?}");
}

/// Every stderr line parsed as JSON.
fn json_lines(output: &Output) -> Vec<serde_json::Value> {
    stderr(output)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

fn assert_json_logs(output: &Output) {
    assert_eq!(output.status.code(), Some(3), "{}", stderr(output));
    let lines = json_lines(output);
    let starting = lines
        .iter()
        .find(|l| l["message"] == "starting")
        .unwrap_or_else(|| panic!("no starting line: {lines:?}"));
    assert_eq!(starting["level"], "info");
    assert_eq!(starting["brokers"], NO_BROKER);
    assert!(starting["target"].as_str().unwrap().starts_with("attrstream"));
    assert!(starting["timestamp"].as_str().unwrap().ends_with('Z'));
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "error", "{last}");
    assert_eq!(last["exit_code"], 3, "{last}");
    assert!(
        last["message"].as_str().unwrap().contains("missing.safetensors"),
        "{last}"
    );
}

#[test]
fn json_logs_from_the_flag_the_environment_or_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let flag = attrstream(dir.path())
        .args(serve_without_weights(&["--log-format", "json"]))
        .output()
        .unwrap();
    assert_json_logs(&flag);

    let env = attrstream(dir.path())
        .args(serve_without_weights(&[]))
        .env("ATTRSTREAM_TELEMETRY__LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert_json_logs(&env);

    let config = dir.path().join("attrstream.toml");
    std::fs::write(&config, "[telemetry]\nlog_format = \"json\"\n").unwrap();
    let mut args = serve_without_weights(&[]);
    args.extend(["--config".to_string(), config.to_string_lossy().into_owned()]);
    let configured = attrstream(dir.path()).args(&args).output().unwrap();
    assert_json_logs(&configured);

    // The flag wins over the configuration.
    let mut args = serve_without_weights(&["--log-format", "text"]);
    args.extend(["--config".to_string(), config.to_string_lossy().into_owned()]);
    let text = attrstream(dir.path()).args(&args).output().unwrap();
    assert!(
        stderr(&text)
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_err()),
        "{}",
        stderr(&text)
    );
    assert!(stderr(&text).contains("error: "), "{}", stderr(&text));
}

#[test]
fn verbose_and_quiet_move_the_level_on_top_of_rust_log() {
    let dir = tempfile::tempdir().unwrap();
    let quiet = attrstream(dir.path())
        .args(serve_without_weights(&["-q"]))
        .output()
        .unwrap();
    assert!(!stderr(&quiet).contains("starting"), "{}", stderr(&quiet));
    assert!(stderr(&quiet).contains("missing.safetensors"), "errors still show");

    let warn_only = attrstream(dir.path())
        .args(serve_without_weights(&[]))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!stderr(&warn_only).contains("starting"), "{}", stderr(&warn_only));
    let verbose = attrstream(dir.path())
        .args(serve_without_weights(&["-v"]))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(stderr(&verbose).contains("starting"), "{}", stderr(&verbose));
    assert_eq!(verbose.status.code(), Some(3));

    let both = run(dir.path(), &["-v", "-q", "info"]);
    assert_eq!(both.status.code(), Some(2), "-v and -q conflict: {}", stderr(&both));
}
