//! `attrstream model import|fetch|list`: getting weights `detect` can load.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::cli::{ModelArgs, ModelCommand, ModelFetchArgs, ModelImportArgs, ModelListArgs};
use crate::detection::DEFAULT_MODEL_DIR;
use crate::model::fetch::{self, ExpectedHash, FetchOptions, KNOWN_CHECKPOINTS};
use crate::model::import::{self, ImportOptions};
use crate::model::weights;

/// Runs a `model` subcommand.
pub fn run(args: ModelArgs) -> Result<ExitCode> {
    match args.command {
        ModelCommand::Import(args) => run_import(args),
        ModelCommand::Fetch(args) => run_fetch(args),
        ModelCommand::List(args) => run_list(args),
    }
}

/// Converts a checkpoint and prints the import report as JSON.
fn run_import(args: ModelImportArgs) -> Result<ExitCode> {
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| import::default_output_path(&args.file, Path::new(DEFAULT_MODEL_DIR)));
    let mut options = ImportOptions::new(output);
    options.labels = args.labels.as_deref().map(import::read_labels).transpose()?;
    options.verify = !args.no_verify;
    options.frozen_bn_eps = args.frozen_bn_eps;
    let report = import::import_checkpoint(&args.file, &options)?;
    tracing::info!(output = %report.output.display(), tensors = report.tensors, "imported");
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// Downloads and converts a checkpoint and prints the fetch report as JSON.
fn run_fetch(args: ModelFetchArgs) -> Result<ExitCode> {
    let options = FetchOptions {
        dir: args.dir,
        url: args.url,
        sha256: args.sha256,
        force: args.force,
        verify: !args.no_verify,
        ..FetchOptions::default()
    };
    let report = fetch::fetch(&args.name, &options)?;
    tracing::info!(output = %report.output.display(), downloaded = report.downloaded, "model ready");
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// One row of `model list`.
struct Row {
    name: String,
    status: String,
    path: PathBuf,
}

/// Prints the known checkpoints and the weights files in the folder as a table.
fn run_list(args: ModelListArgs) -> Result<ExitCode> {
    let mut rows: Vec<Row> = KNOWN_CHECKPOINTS
        .iter()
        .map(|known| {
            let path = fetch::weights_path(&args.dir, known.name);
            let status = if !path.exists() {
                "missing".to_string()
            } else {
                let expected = fetch::hub_hash_prefix(known.url).map(ExpectedHash::Prefix);
                match weights::read_metadata(&path) {
                    Ok(meta) => match (expected, meta.source_sha256) {
                        (Some(e), Some(sha)) if !e.matches(&sha) => "present (other source)".to_string(),
                        _ => "present".to_string(),
                    },
                    Err(_) => "unreadable".to_string(),
                }
            };
            Row {
                name: known.name.to_string(),
                status,
                path,
            }
        })
        .collect();
    rows.extend(other_weights(&args.dir)?);
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(4);
    println!("{:width$}  {:22}  PATH", "NAME", "STATUS");
    for row in &rows {
        println!("{:width$}  {:22}  {}", row.name, row.status, row.path.display());
    }
    if rows.iter().any(|r| r.status == "missing") {
        eprintln!("get missing weights with `attrstream model fetch NAME` (needs internet)");
    }
    Ok(ExitCode::SUCCESS)
}

/// Weights files in `dir` that are not known checkpoints (imported ones).
fn other_weights(dir: &Path) -> Result<Vec<Row>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut rows = Vec::new();
    for entry in entries {
        let path = entry.with_context(|| format!("cannot list {}", dir.display()))?.path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let is_weights = path.extension().is_some_and(|e| e == "safetensors");
        if !is_weights || stem.starts_with('.') || KNOWN_CHECKPOINTS.iter().any(|k| k.name == stem) {
            continue;
        }
        let status = match weights::read_metadata(&path) {
            Ok(_) => "imported",
            Err(_) => "unreadable",
        };
        rows.push(Row {
            name: stem.to_string(),
            status: status.to_string(),
            path,
        });
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(rows)
}
