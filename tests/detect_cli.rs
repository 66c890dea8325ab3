//! `attrstream detect` as a user runs it: good photos give JSON records and annotated PNGs;
//! empty, corrupt, truncated, non-image and oversized files each get a clear error record
//! while the other files are still processed, and the exit code reports the failures.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn detect_reports_every_file_and_survives_bad_ones() {
    let weights = common::faster_rcnn_reference().join("weights_frozen_bn.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let samples = common::root().join("assets/samples");
    let coffee = std::fs::read(samples.join("coffee.png")).unwrap();
    let rocket = std::fs::read(samples.join("rocket.jpg")).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let empty = write("empty.png", b"");
    let text = write("notes.png", b"this is not an image at all");
    let truncated = write("truncated.png", &coffee[..coffee.len() / 3]);
    let mut corrupt_jpeg = rocket.clone();
    for b in corrupt_jpeg.iter_mut().skip(600).take(4000) {
        *b = 0x5a;
    }
    let corrupt = write("corrupt.jpg", &corrupt_jpeg[..corrupt_jpeg.len() / 2]);
    let bomb = write("bomb.png", &common::kafka::png_header_only(50_000, 50_000));
    let missing = dir.path().join("missing.png");
    let annotate = dir.path().join("annotated");

    let output = Command::new(env!("CARGO_BIN_EXE_attrstream"))
        .args([
            "detect",
            "--device",
            "cpu",
            "--min-size",
            "320",
            "--score-threshold",
            "0.3",
        ])
        .arg("--weights")
        .arg(&weights)
        .arg("--annotate")
        .arg(&annotate)
        .arg(samples.join("coffee.png"))
        .args([&empty, &text, &truncated, &corrupt, &bomb, &missing])
        .arg(samples.join("chelsea.png"))
        .output()
        .expect("run attrstream detect");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "exit code; stderr:\n{stderr}");

    let records: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(records.len(), 8, "one record per input:\n{stdout}");
    let record = |p: &Path| {
        records
            .iter()
            .find(|r| r["image"].as_str() == Some(p.to_str().unwrap()))
            .unwrap_or_else(|| panic!("no record for {}", p.display()))
            .clone()
    };
    for good in ["coffee.png", "chelsea.png"] {
        let r = record(&samples.join(good));
        assert!(r.get("error").is_none(), "{good}: {r}");
        let (w, h) = (r["width"].as_f64().unwrap(), r["height"].as_f64().unwrap());
        let detections = r["detections"].as_array().unwrap();
        assert!(!detections.is_empty(), "{good}: the seeded model detects something");
        for d in detections {
            let px: Vec<f64> = d["box_px"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let norm: Vec<f64> = d["box_norm"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert!(
                px[0] <= px[2] && px[1] <= px[3] && px[2] <= w && px[3] <= h,
                "{good}: box {px:?}"
            );
            assert!((norm[0] - px[0] / w).abs() < 1e-6 && (norm[3] - px[3] / h).abs() < 1e-6);
            assert!(d["score"].as_f64().unwrap() >= 0.3);
            assert!(d["label"].as_str().is_some_and(|l| !l.is_empty()));
        }
        let png = annotate.join(good);
        let annotated = image::open(&png).unwrap_or_else(|e| panic!("annotated {}: {e}", png.display()));
        assert_eq!((annotated.width() as f64, annotated.height() as f64), (w, h));
    }
    let expect_error = |p: &Path, needle: &str| {
        let r = record(p);
        let e = r["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: expected an error, got {r}", p.display()));
        assert!(e.contains(needle), "{}: error `{e}` lacks `{needle}`", p.display());
    };
    expect_error(&empty, "empty");
    expect_error(&text, "not a supported image");
    expect_error(&truncated, "corrupt or truncated");
    expect_error(&corrupt, "corrupt or truncated");
    expect_error(&bomb, "2500000000 pixels, above the limit");
    expect_error(&missing, "cannot read");
}

#[test]
fn detect_without_weights_says_how_to_get_them() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_attrstream"))
        .current_dir(dir.path())
        .args(["detect", "--device", "cpu", "x.png"])
        .output()
        .expect("run attrstream detect");
    assert_eq!(output.status.code(), Some(3), "a missing model is a runtime failure");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("model fetch") && stderr.contains("model import"),
        "{stderr}"
    );
}
