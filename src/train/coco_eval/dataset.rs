//! The inputs of COCO evaluation: ground truth (images, categories, box annotations) and
//! detections, with loaders for COCO-format JSON files that name the first problem precisely.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Why ground truth or detections were refused. Each message names the offending record and
/// says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum CocoDataError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not JSON of the expected shape.
    #[error("{path} is not a COCO {what} file: {source}; expected {expected}")]
    Json {
        /// The file.
        path: PathBuf,
        /// "ground-truth" or "results".
        what: &'static str,
        /// What the file should look like.
        expected: &'static str,
        /// The parser's error, with line and column.
        source: serde_json::Error,
    },
    /// Two images, categories or annotations share an id.
    #[error("duplicate {kind} id {id}: ids must be unique within the ground truth")]
    DuplicateId {
        /// "image", "category" or "annotation".
        kind: &'static str,
        /// The repeated id.
        id: i64,
    },
    /// Annotation id 0: pycocotools stores matches by annotation id and reads 0 as "unmatched".
    #[error("annotation id 0 is not allowed (COCO ids start at 1; pycocotools would count a detection matched to it as a false positive): renumber the annotations")]
    AnnotationIdZero,
    /// A record refers to an image the ground truth does not list.
    #[error("{record} refers to image id {image_id}, which the ground truth's \"images\" does not list; evaluate detections against the ground truth of the same images")]
    UnknownImage {
        /// The record, e.g. "annotation 17" or "detection #3".
        record: String,
        /// The unknown image id.
        image_id: i64,
    },
    /// An annotation refers to a category the ground truth does not list.
    #[error("{record} refers to category id {category_id}, which the ground truth's \"categories\" does not list; add the category or fix the annotation")]
    UnknownCategory {
        /// The annotation, e.g. "annotation 17".
        record: String,
        /// The unknown category id.
        category_id: i64,
    },
    /// A box is not `[x, y, width, height]` with finite numbers and non-negative sizes.
    #[error("{record} has a bad bbox {bbox:?}: {reason}; COCO boxes are [x, y, width, height] in pixels")]
    BadBox {
        /// The record, e.g. "annotation 17" or "detection #3".
        record: String,
        /// The box as given.
        bbox: Vec<f64>,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A detection score or an annotation area is not a finite number (or the area is negative).
    #[error("{record} has a bad {field} {value}: it must be a finite{sign} number")]
    BadNumber {
        /// The record, e.g. "annotation 17" or "detection #3".
        record: String,
        /// "score" or "area".
        field: &'static str,
        /// The value as given.
        value: f64,
        /// " non-negative" where that is required too.
        sign: &'static str,
    },
}

/// One image of the ground truth. Every image listed is evaluated, also those without
/// annotations (where any detection is a false positive).
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// The image id that annotations and detections refer to.
    pub id: i64,
    /// Width in pixels (kept for reports; evaluation does not need it).
    pub width: u32,
    /// Height in pixels (kept for reports; evaluation does not need it).
    pub height: u32,
}

/// One class of the ground truth; per-class metrics are reported by its id and name.
#[derive(Debug, Clone, PartialEq)]
pub struct Category {
    /// The category id that annotations and detections refer to.
    pub id: i64,
    /// The human-readable name, e.g. "cup".
    pub name: String,
}

/// One ground-truth object.
#[derive(Debug, Clone, PartialEq)]
pub struct Annotation {
    /// Unique, non-zero annotation id (pycocotools matches by it).
    pub id: i64,
    /// The image the object is in.
    pub image_id: i64,
    /// The object's class.
    pub category_id: i64,
    /// `[x, y, width, height]` in pixels.
    pub bbox: [f64; 4],
    /// The object's area in pixels, which decides its small/medium/large range (COCO uses the
    /// segmentation area, smaller than the box's).
    pub area: f64,
    /// A crowd region: never a missed object, and any number of detections inside it are
    /// ignored rather than counted as false positives.
    pub iscrowd: bool,
}

/// Validated ground truth: unique ids, every annotation on a listed image and category, and
/// sound boxes. Build it with [`GroundTruth::new`] or [`GroundTruth::from_coco_json`].
#[derive(Debug, Clone)]
pub struct GroundTruth {
    images: Vec<Image>,
    categories: Vec<Category>,
    annotations: Vec<Annotation>,
}

impl GroundTruth {
    /// Checks and wraps ground truth built in code (e.g. from a labelled topic). Annotation
    /// order is kept: like pycocotools, it breaks ties between equally good matches.
    pub fn new(
        images: Vec<Image>,
        categories: Vec<Category>,
        annotations: Vec<Annotation>,
    ) -> Result<Self, CocoDataError> {
        let image_ids = unique_ids("image", images.iter().map(|i| i.id))?;
        let category_ids = unique_ids("category", categories.iter().map(|c| c.id))?;
        unique_ids("annotation", annotations.iter().map(|a| a.id))?;
        for ann in &annotations {
            let record = || format!("annotation {}", ann.id);
            if ann.id == 0 {
                return Err(CocoDataError::AnnotationIdZero);
            }
            if !image_ids.contains(&ann.image_id) {
                return Err(CocoDataError::UnknownImage {
                    record: record(),
                    image_id: ann.image_id,
                });
            }
            if !category_ids.contains(&ann.category_id) {
                return Err(CocoDataError::UnknownCategory {
                    record: record(),
                    category_id: ann.category_id,
                });
            }
            check_box(&ann.bbox, record)?;
            if !ann.area.is_finite() || ann.area < 0.0 {
                return Err(CocoDataError::BadNumber {
                    record: record(),
                    field: "area",
                    value: ann.area,
                    sign: " non-negative",
                });
            }
        }
        Ok(Self {
            images,
            categories,
            annotations,
        })
    }

    /// Reads a COCO-format ground-truth file (`{"images": [...], "annotations": [...],
    /// "categories": [...]}`; other keys such as "info" or "segmentation" are ignored). An
    /// annotation without "area" gets its box's area, without "iscrowd" is not a crowd.
    pub fn from_coco_json(path: &Path) -> Result<Self, CocoDataError> {
        let raw: RawGroundTruth = read_json(
            path,
            "ground-truth",
            "an object with \"images\" [{id, width, height}], \"annotations\" [{id, image_id, category_id, bbox, area, iscrowd}] and \"categories\" [{id, name}]",
        )?;
        let images = raw
            .images
            .into_iter()
            .map(|i| Image {
                id: i.id,
                width: i.width,
                height: i.height,
            })
            .collect();
        let categories = raw
            .categories
            .into_iter()
            .map(|c| Category { id: c.id, name: c.name })
            .collect();
        let annotations = raw
            .annotations
            .into_iter()
            .map(|a| {
                let bbox = box4(&a.bbox, || format!("annotation {}", a.id))?;
                Ok(Annotation {
                    id: a.id,
                    image_id: a.image_id,
                    category_id: a.category_id,
                    bbox,
                    area: a.area.unwrap_or(bbox[2] * bbox[3]),
                    iscrowd: a.iscrowd.is_some_and(Flag::is_set),
                })
            })
            .collect::<Result<Vec<_>, CocoDataError>>()?;
        Self::new(images, categories, annotations)
    }

    /// The images, in the order given.
    pub fn images(&self) -> &[Image] {
        &self.images
    }

    /// The categories, in the order given.
    pub fn categories(&self) -> &[Category] {
        &self.categories
    }

    /// The annotations, in the order given.
    pub fn annotations(&self) -> &[Annotation] {
        &self.annotations
    }
}

/// One detection to evaluate, as in a COCO results file.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectionResult {
    /// The image it was found in (must be in the ground truth).
    pub image_id: i64,
    /// The predicted class. Detections of a class the ground truth does not list are ignored,
    /// as pycocotools does (and counted in the metrics).
    pub category_id: i64,
    /// `[x, y, width, height]` in pixels.
    pub bbox: [f64; 4],
    /// Confidence; higher is ranked first.
    pub score: f64,
}

impl DetectionResult {
    /// Checks box and score; `index` is the detection's position, for the message.
    pub fn validate(&self, index: usize) -> Result<(), CocoDataError> {
        let record = || format!("detection #{index}");
        check_box(&self.bbox, record)?;
        if !self.score.is_finite() {
            return Err(CocoDataError::BadNumber {
                record: record(),
                field: "score",
                value: self.score,
                sign: "",
            });
        }
        Ok(())
    }
}

/// Reads a COCO results file: a JSON list of `{"image_id", "category_id", "bbox", "score"}`
/// (other keys ignored). Image ids are checked against the ground truth by `evaluate`.
pub fn load_results_json(path: &Path) -> Result<Vec<DetectionResult>, CocoDataError> {
    let raw: Vec<RawDetection> = read_json(
        path,
        "results",
        "a JSON list of {\"image_id\", \"category_id\", \"bbox\": [x, y, width, height], \"score\"}",
    )?;
    raw.into_iter()
        .enumerate()
        .map(|(index, d)| {
            let det = DetectionResult {
                image_id: d.image_id,
                category_id: d.category_id,
                bbox: box4(&d.bbox, || format!("detection #{index}"))?,
                score: d.score,
            };
            det.validate(index)?;
            Ok(det)
        })
        .collect()
}

fn read_json<T: for<'de> Deserialize<'de>>(
    path: &Path,
    what: &'static str,
    expected: &'static str,
) -> Result<T, CocoDataError> {
    let bytes = std::fs::read(path).map_err(|source| CocoDataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| CocoDataError::Json {
        path: path.to_path_buf(),
        what,
        expected,
        source,
    })
}

fn unique_ids(kind: &'static str, ids: impl Iterator<Item = i64>) -> Result<HashSet<i64>, CocoDataError> {
    let mut seen = HashSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(CocoDataError::DuplicateId { kind, id });
        }
    }
    Ok(seen)
}

fn box4(values: &[f64], record: impl Fn() -> String) -> Result<[f64; 4], CocoDataError> {
    <[f64; 4]>::try_from(values).map_err(|_| CocoDataError::BadBox {
        record: record(),
        bbox: values.to_vec(),
        reason: "it must have exactly 4 numbers",
    })
}

fn check_box(bbox: &[f64; 4], record: impl Fn() -> String) -> Result<(), CocoDataError> {
    let reason = if bbox.iter().any(|v| !v.is_finite()) {
        Some("every value must be a finite number")
    } else if bbox[2] < 0.0 || bbox[3] < 0.0 {
        Some("width and height must not be negative (is it [x1, y1, x2, y2]?)")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(CocoDataError::BadBox {
            record: record(),
            bbox: bbox.to_vec(),
            reason,
        }),
        None => Ok(()),
    }
}

#[derive(Deserialize)]
struct RawGroundTruth {
    images: Vec<RawImage>,
    #[serde(default)]
    annotations: Vec<RawAnnotation>,
    categories: Vec<RawCategory>,
}

#[derive(Deserialize)]
struct RawImage {
    id: i64,
    width: u32,
    height: u32,
}

#[derive(Deserialize)]
struct RawCategory {
    id: i64,
    name: String,
}

#[derive(Deserialize)]
struct RawAnnotation {
    id: i64,
    image_id: i64,
    category_id: i64,
    bbox: Vec<f64>,
    area: Option<f64>,
    iscrowd: Option<Flag>,
}

/// COCO writes `iscrowd` as 0/1; some tools write true/false.
#[derive(Deserialize, Clone, Copy)]
#[serde(untagged)]
enum Flag {
    Int(i64),
    Bool(bool),
}

impl Flag {
    fn is_set(self) -> bool {
        match self {
            Flag::Int(v) => v != 0,
            Flag::Bool(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct RawDetection {
    image_id: i64,
    category_id: i64,
    bbox: Vec<f64>,
    score: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    const GT: &str = r#"{"info": {}, "images": [{"id": 1, "width": 640, "height": 480}],
        "categories": [{"id": 3, "name": "cup", "supercategory": "kitchen"}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 20],
                         "segmentation": [], "iscrowd": 0},
                        {"id": 6, "image_id": 1, "category_id": 3, "bbox": [0, 0, 50, 50],
                         "area": 1000.5, "iscrowd": true}]}"#;

    #[test]
    fn loads_coco_ground_truth_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let gt = GroundTruth::from_coco_json(&write(dir.path(), "gt.json", GT)).unwrap();
        assert_eq!(gt.images().len(), 1);
        assert_eq!(gt.categories()[0].name, "cup");
        let anns = gt.annotations();
        assert_eq!(anns[0].area, 200.0, "missing area defaults to the box area");
        assert!(!anns[0].iscrowd);
        assert_eq!(anns[1].area, 1000.5);
        assert!(anns[1].iscrowd);
    }

    #[test]
    fn ground_truth_errors_name_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                GT.replace(
                    "\"image_id\": 1, \"category_id\": 3, \"bbox\": [1",
                    "\"image_id\": 9, \"category_id\": 3, \"bbox\": [1",
                ),
                "annotation 5 refers to image id 9",
            ),
            (
                GT.replace("\"category_id\": 3, \"bbox\": [0", "\"category_id\": 4, \"bbox\": [0"),
                "annotation 6 refers to category id 4",
            ),
            (
                GT.replace("[1, 2, 10, 20]", "[1, 2, -10, 20]"),
                "annotation 5 has a bad bbox",
            ),
            (GT.replace("[1, 2, 10, 20]", "[1, 2, 10]"), "exactly 4 numbers"),
            (GT.replace("\"id\": 6", "\"id\": 5"), "duplicate annotation id 5"),
            (GT.replace("\"id\": 6", "\"id\": 0"), "annotation id 0"),
            (GT.replace("1000.5", "-1"), "bad area -1"),
            ("[]".to_string(), "not a COCO ground-truth file"),
        ];
        for (text, expected) in cases {
            let err = GroundTruth::from_coco_json(&write(dir.path(), "gt.json", &text)).unwrap_err();
            assert!(err.to_string().contains(expected), "{err} should contain {expected:?}");
        }
        let missing = GroundTruth::from_coco_json(&dir.path().join("missing.json")).unwrap_err();
        assert!(missing.to_string().starts_with("cannot read"), "{missing}");
    }

    #[test]
    fn loads_results_and_refuses_bad_detections() {
        let dir = tempfile::tempdir().unwrap();
        let ok = r#"[{"image_id": 1, "category_id": 3, "bbox": [1.5, 2, 10, 20], "score": 0.9, "extra": 1}]"#;
        let dets = load_results_json(&write(dir.path(), "r.json", ok)).unwrap();
        assert_eq!(
            dets,
            vec![DetectionResult {
                image_id: 1,
                category_id: 3,
                bbox: [1.5, 2.0, 10.0, 20.0],
                score: 0.9
            }]
        );
        let bad = r#"[{"image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 20], "score": 0.9},
                      {"image_id": 1, "category_id": 3, "bbox": [1, 2, 10, -1], "score": 0.9}]"#;
        let err = load_results_json(&write(dir.path(), "r.json", bad)).unwrap_err();
        assert!(err.to_string().contains("detection #1 has a bad bbox"), "{err}");
        let object = r#"{"annotations": []}"#;
        let err = load_results_json(&write(dir.path(), "r.json", object)).unwrap_err();
        assert!(err.to_string().contains("expected a JSON list"), "{err}");
        let nan = DetectionResult {
            image_id: 1,
            category_id: 1,
            bbox: [0.0, 0.0, 1.0, 1.0],
            score: f64::NAN,
        };
        assert!(nan
            .validate(4)
            .unwrap_err()
            .to_string()
            .contains("detection #4 has a bad score"));
    }
}
