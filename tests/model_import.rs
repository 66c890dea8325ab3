//! `model import`: checkpoints written by real PyTorch (the project's venv) must read back
//! exactly as Python saved them, and a torchvision Faster R-CNN state dict must import and
//! load into the Rust model.
//!
//! Python writes each checkpoint with `torch.save` and the same tensors with
//! `safetensors.torch.save_file`; the tests compare every tensor.

use std::path::{Path, PathBuf};
use std::process::Command;

use attrstream::model::import::{self, CheckpointFormat, ImportOptions};
use attrstream::model::labels::coco_labels;
use attrstream::model::torch_pickle::{self, CheckpointError};
use attrstream::model::weights;
use tch::Tensor;

/// Writes the fixtures named on the command line into the folder given first.
const GENERATOR: &str = r#"
import argparse, collections, pathlib, sys, warnings
import torch
from safetensors.torch import save_file

warnings.filterwarnings("ignore")
out = pathlib.Path(sys.argv[1])
kinds = set(sys.argv[2:])

def reference(sd, name):
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(out / name))

def small():
    torch.manual_seed(0)
    sd = collections.OrderedDict()
    sd["conv.weight"] = torch.randn(4, 3, 3, 3)
    sd["f64"] = torch.randn(5, dtype=torch.float64)
    sd["f16"] = torch.randn(2, 3).half()
    sd["bf16"] = torch.randn(3, 2).bfloat16()
    sd["i64"] = torch.arange(-5, 5, dtype=torch.int64)
    sd["i32"] = torch.tensor([1, -2, 2**31 - 1], dtype=torch.int32)
    sd["i16"] = torch.tensor([-300, 7], dtype=torch.int16)
    sd["i8"] = torch.tensor([-128, 127], dtype=torch.int8)
    sd["u8"] = torch.tensor([0, 255], dtype=torch.uint8)
    sd["mask"] = torch.tensor([True, False, True])
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0, 4)
    base = torch.randn(6, 7)
    sd["base"] = base
    sd["transposed"] = base.t()
    sd["column"] = base[:, 2]
    sd["offset_slice"] = torch.arange(20.0)[5:15].view(2, 5)
    sd["bn.num_batches_tracked"] = torch.tensor(10)
    return sd

if "small" in kinds:
    sd = small()
    torch.save(sd, out / "small.pth")
    torch.save(sd, out / "small_legacy.pth", _use_new_zipfile_serialization=False)
    torch.save(sd, out / "small_proto4.pth", pickle_protocol=4)
    torch.save({"model": sd, "epoch": 3, "optimizer": {"lr": 0.1, "betas": (0.9, 0.99)},
                "args": argparse.Namespace(lr=0.1)}, out / "wrapped_model.pth")
    torch.save({"state_dict": sd, "note": "x"}, out / "wrapped_state_dict.pth",
               _use_new_zipfile_serialization=False)
    torch.save(collections.OrderedDict(
        (k, torch.nn.Parameter(v) if v.is_floating_point() else v) for k, v in sd.items()), out / "params.pth")
    torch.save({"module." + k: v for k, v in sd.items()}, out / "data_parallel.pth")
    reference(sd, "small_ref.safetensors")

if "bad" in kinds:
    torch.save(torch.nn.Linear(2, 2), out / "whole_module.pth")
    torch.save({"q": torch.quantize_per_tensor(torch.randn(3), 0.1, 0, torch.qint8)}, out / "quantized.pth")
    torch.save({"c": torch.randn(2, dtype=torch.cfloat)}, out / "complex.pth")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(out / "torchscript.pt"))
    torch.save({"epoch": 3, "lr": 0.1}, out / "no_tensors.pth")
    torch.save({"roi_heads.box_predictor.cls_score.weight": torch.randn(5, 8),
                "roi_heads.box_predictor.cls_score.bias": torch.randn(5)}, out / "five_classes.pth")

if "frcnn" in kinds:
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    sd = model.state_dict()
    torch.save(sd, out / "frcnn.pth")
    reference(sd, "frcnn_ref.safetensors")
"#;

/// The project's Python (with torch, torchvision, safetensors). Missing is a failure: the
/// tests must not pass without comparing against real PyTorch output.
fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} not found: these tests compare against real PyTorch; run `scripts/setup --test` to create the venv",
        python.display()
    );
    python
}

/// Runs the generator for `kinds` into a fresh temporary folder.
fn generate(kinds: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temporary folder");
    let script = dir.path().join("generate.py");
    std::fs::write(&script, GENERATOR).expect("write generator");
    let output = Command::new(python())
        .arg(&script)
        .arg(dir.path())
        .args(kinds)
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "the fixture generator failed (run `scripts/setup --test` if torch is missing):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    dir
}

/// Asserts that `actual` holds exactly the tensors of the safetensors file `reference`,
/// in any order, with equal dtype, shape and values.
fn assert_same_tensors(actual: &[(String, Tensor)], reference: &Path) {
    let expected = Tensor::read_safetensors(reference).expect("read reference");
    assert_eq!(
        actual.len(),
        expected.len(),
        "tensor count differs from {}",
        reference.display()
    );
    for (key, want) in &expected {
        let (_, got) = actual
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("`{key}` missing"));
        assert_eq!(got.kind(), want.kind(), "dtype of `{key}`");
        assert_eq!(got.size(), want.size(), "shape of `{key}`");
        assert!(got.is_contiguous(), "`{key}` is not contiguous");
        assert!(got.equal(want), "values of `{key}` differ");
    }
}

fn read(path: &Path) -> Vec<(String, Tensor)> {
    torch_pickle::read_state_dict(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[test]
fn small_checkpoints_read_back_exactly() {
    let dir = generate(&["small"]);
    let reference = dir.path().join("small_ref.safetensors");
    for name in [
        "small.pth",
        "small_legacy.pth",
        "small_proto4.pth",
        "wrapped_model.pth",
        "wrapped_state_dict.pth",
        "params.pth",
    ] {
        let tensors = read(&dir.path().join(name));
        assert_same_tensors(&tensors, &reference);
        if name == "small.pth" {
            let keys: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys[..3], ["conv.weight", "f64", "f16"], "file order is kept");
        }
    }
    assert_eq!(
        import::detect_format(&dir.path().join("small_legacy.pth")).expect("format"),
        CheckpointFormat::TorchLegacy
    );
    assert_eq!(
        import::detect_format(&dir.path().join("small.pth")).expect("format"),
        CheckpointFormat::TorchZip
    );
    assert_eq!(
        import::detect_format(&reference).expect("format"),
        CheckpointFormat::Safetensors
    );
}

#[test]
fn import_writes_safetensors_with_metadata() {
    let dir = generate(&["small"]);
    let reference = dir.path().join("small_ref.safetensors");
    for input in [
        "small.pth",
        "small_legacy.pth",
        "data_parallel.pth",
        "small_ref.safetensors",
    ] {
        let input = dir.path().join(input);
        let output = dir.path().join("out").join("weights.safetensors");
        let mut options = ImportOptions::new(&output);
        options.verify = false;
        let report = import::import_checkpoint(&input, &options).expect("import");
        assert_eq!(report.output, output);
        assert_eq!(report.tensors, 17);
        assert!(!report.verified);
        let written = Tensor::read_safetensors(&output).expect("read output");
        assert_same_tensors(&written, &reference);
        let meta = weights::read_metadata(&output).expect("metadata");
        assert_eq!(meta.architecture.as_deref(), Some("fasterrcnn_resnet50_fpn"));
        assert_eq!(meta.labels, Some(coco_labels()));
        let sha = import::sha256_file(&input).expect("hash");
        assert_eq!(meta.source_sha256.as_deref(), Some(sha.as_str()));
        assert_eq!(report.source_sha256, sha);
        let source = std::fs::canonicalize(&input).expect("canonical path");
        assert_eq!(meta.source.as_deref(), Some(source.display().to_string().as_str()));
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("out")).expect("list").collect();
        assert_eq!(leftovers.len(), 1, "only the weights file is left in the output folder");
    }
}

#[test]
fn import_checks_labels_against_the_class_count() {
    let dir = generate(&["bad"]);
    let input = dir.path().join("five_classes.pth");
    let output = dir.path().join("five.safetensors");
    let mut options = ImportOptions::new(&output);
    options.verify = false;
    let err = import::import_checkpoint(&input, &options).expect_err("91 COCO labels for 5 classes");
    let message = format!("{err:#}");
    assert!(
        message.contains("predicts 5 classes") && message.contains("--labels"),
        "{message}"
    );
    assert!(!output.exists());

    let labels = dir.path().join("labels.txt");
    std::fs::write(&labels, "__background__\nshoe\nbag\nhat\nbelt\n").expect("write labels");
    options.labels = Some(import::read_labels(&labels).expect("labels"));
    import::import_checkpoint(&input, &options).expect("import with 5 labels");
    let meta = weights::read_metadata(&output).expect("metadata");
    assert_eq!(meta.labels.map(|l| l.len()), Some(5));
}

#[test]
fn unsupported_checkpoints_fail_clearly() {
    let dir = generate(&["bad"]);
    let err = |name: &str| -> CheckpointError {
        match torch_pickle::read_state_dict(&dir.path().join(name)) {
            Ok(_) => panic!("{name} should not read"),
            Err(e) => e,
        }
    };
    let e = err("whole_module.pth");
    assert!(
        matches!(&e, CheckpointError::UnsupportedGlobal { global, .. } if global == "torch.nn.modules.linear.Linear"),
        "{e}"
    );
    assert!(e.to_string().contains("model.state_dict()"), "{e}");
    let e = err("quantized.pth");
    assert!(
        matches!(&e, CheckpointError::UnsupportedGlobal { global, what, .. }
        if global == "torch._utils._rebuild_qtensor" && what.contains("`q`")),
        "{e}"
    );
    let e = err("complex.pth");
    assert!(e.to_string().contains("torch.ComplexFloatStorage"), "{e}");
    let e = err("torchscript.pt");
    assert!(e.to_string().contains("TorchScript"), "{e}");
    let e = err("no_tensors.pth");
    assert!(
        matches!(&e, CheckpointError::NotStateDict { reason, .. } if reason.contains("no tensors")),
        "{e}"
    );

    // Not a checkpoint at all, and a truncated one.
    let text = dir.path().join("notes.pth");
    std::fs::write(&text, "just some text").expect("write");
    assert!(matches!(
        torch_pickle::read_state_dict(&text),
        Err(CheckpointError::NotCheckpoint { .. })
    ));
    let import_err = import::import_checkpoint(&text, &ImportOptions::new(dir.path().join("x.safetensors")))
        .expect_err("text is no checkpoint");
    assert!(
        import_err.to_string().contains("neither a PyTorch checkpoint"),
        "{import_err}"
    );
    let bytes = std::fs::read(dir.path().join("five_classes.pth")).expect("read");
    let truncated = dir.path().join("truncated.pth");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("write");
    assert!(torch_pickle::read_state_dict(&truncated).is_err());
}

#[test]
fn faster_rcnn_state_dict_imports_and_loads() {
    let dir = generate(&["frcnn"]);
    let input = dir.path().join("frcnn.pth");
    let tensors = read(&input);
    assert_same_tensors(&tensors, &dir.path().join("frcnn_ref.safetensors"));
    drop(tensors);

    let output = dir.path().join("models").join("frcnn.safetensors");
    let report = import::import_checkpoint(&input, &ImportOptions::new(&output)).expect("import and verify");
    assert!(report.verified);
    assert_eq!(report.labels, 91);
    // The imported weights load with the default policy (this is what `detect` does).
    import::verify_faster_rcnn(&output, 91).expect("load again");

    // A checkpoint of another model fails at import time, naming a key, and writes nothing.
    let small = generate(&["small"]);
    let wrong = dir.path().join("models").join("wrong.safetensors");
    let err = import::import_checkpoint(&small.path().join("small.pth"), &ImportOptions::new(&wrong))
        .expect_err("a small state dict is no Faster R-CNN");
    let message = format!("{err:#}");
    assert!(
        message.contains("does not fit fasterrcnn_resnet50_fpn") && message.contains('`'),
        "{message}"
    );
    assert!(!wrong.exists());
    let names: Vec<_> = std::fs::read_dir(dir.path().join("models"))
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["frcnn.safetensors"], "no staging folder is left behind");
}

#[test]
fn cli_import_and_list() {
    let dir = generate(&["small", "bad"]);
    let bin = env!("CARGO_BIN_EXE_attrstream");
    let models = dir.path().join("models");
    let out = Command::new(bin)
        .args(["model", "import"])
        .arg(dir.path().join("small.pth"))
        .arg("--output")
        .arg(models.join("small.safetensors"))
        .arg("--no-verify")
        .output()
        .expect("run attrstream");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["tensors"], 17);
    assert_eq!(report["format"], "pytorch-zip");

    let out = Command::new(bin)
        .args(["model", "import"])
        .arg(dir.path().join("whole_module.pth"))
        .arg("--output")
        .arg(models.join("module.safetensors"))
        .output()
        .expect("run attrstream");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("torch.nn.modules.linear.Linear"), "{stderr}");

    let out = Command::new(bin)
        .args(["model", "list", "--dir"])
        .arg(&models)
        .output()
        .expect("run attrstream");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let coco = stdout
        .lines()
        .find(|l| l.starts_with("fasterrcnn_resnet50_fpn_coco"))
        .expect("known model listed");
    assert!(coco.contains("missing"), "{stdout}");
    let small = stdout
        .lines()
        .find(|l| l.starts_with("small "))
        .expect("imported model listed");
    assert!(small.contains("imported"), "{stdout}");
}
