//! A leak-free train/validation split of replayed examples.
//!
//! Photos of one product look alike; if some are trained on and others validated on, the
//! validation score measures memory, not generalisation. Every strategy here therefore keeps a
//! product on one side, and [`Split`]'s last step enforces it whatever the strategy: a product
//! that has any photo outside the training set has all its photos removed from training (and
//! counted in [`SplitReport::leaked_removed`]).
//!
//! Strategies ([`SplitStrategy`]):
//! * [`SplitStrategy::ProductHash`]: a product goes to validation when
//!   [`validation_score`]`(salt, product_id) < validation_fraction`. The score is the first 8
//!   bytes of `SHA-256(UTF-8(salt) ‖ UTF-8(product_id))` read as a big-endian `u64`, divided by
//!   2^64: stable across runs, machines, Rust versions and languages (unlike Rust's
//!   `DefaultHasher`), and a new salt gives an independent split.
//! * [`SplitStrategy::Hint`]: the records' split hint (`validation` → validation, `test` →
//!   held out of both, `train` or none → train).
//! * [`SplitStrategy::OffsetRanges`]: validation is what lies in the given offset ranges of the
//!   replayed topic (e.g. the newest records), training is the rest.
//! * An explicit validation topic: replay it separately and call [`split_explicit`].

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use anyhow::{ensure, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::replay::Example;
use crate::events::labelled::SplitHint;

/// How to choose the validation examples.
#[derive(Debug, Clone, PartialEq)]
pub enum SplitStrategy {
    /// By a stable hash of the product id (see the module documentation).
    ProductHash {
        /// Share of *products* that go to validation, in [0, 1].
        validation_fraction: f64,
        /// Changes the assignment; keep it fixed for comparable runs.
        salt: String,
    },
    /// By the records' split hint; `test` examples are held out of both sets.
    Hint,
    /// Validation = the examples whose (partition, offset) lies in one of these ranges.
    OffsetRanges(Vec<(i32, Range<i64>)>),
}

/// The default salt of [`SplitStrategy::ProductHash`].
pub const DEFAULT_SALT: &str = "attrstream-split-v1";

/// Sizes of one side of the split, for reporting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SetCounts {
    /// Images.
    pub images: usize,
    /// Boxes (crowd boxes included).
    pub boxes: usize,
    /// Crowd boxes among them.
    pub crowd_boxes: usize,
    /// Distinct product ids.
    pub products: usize,
    /// Boxes per class name.
    pub boxes_per_class: BTreeMap<String, usize>,
    /// Images with at least one box of the class, per class name.
    pub images_per_class: BTreeMap<String, usize>,
}

impl SetCounts {
    /// Counts a set of examples.
    pub fn of(examples: &[Example]) -> Self {
        let mut counts = SetCounts {
            images: examples.len(),
            ..Default::default()
        };
        let mut products = BTreeSet::new();
        for e in examples {
            products.insert(e.product_id.as_str());
            counts.boxes += e.boxes.len();
            counts.crowd_boxes += e.iscrowd.iter().filter(|c| **c).count();
            for label in &e.labels {
                *counts.boxes_per_class.entry(label.clone()).or_default() += 1;
            }
            for label in e.labels.iter().collect::<BTreeSet<_>>() {
                *counts.images_per_class.entry(label.clone()).or_default() += 1;
            }
        }
        counts.products = products.len();
        counts
    }
}

/// What the split did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SplitReport {
    /// The training set.
    pub train: SetCounts,
    /// The validation set.
    pub validation: SetCounts,
    /// Examples held out of both (split hint `test`).
    pub held_out: usize,
    /// Training examples removed because their product also has photos in validation or the
    /// held-out set.
    pub leaked_removed: usize,
    /// Classes with training boxes but none in validation (their validation score is unknown).
    pub classes_missing_from_validation: Vec<String>,
}

/// The two sets and their report.
#[derive(Debug, Clone)]
pub struct Split {
    /// Examples to train on.
    pub train: Vec<Example>,
    /// Examples to validate on (no product in common with `train`).
    pub validation: Vec<Example>,
    /// Counts for logs and the run summary.
    pub report: SplitReport,
}

/// The validation score of a product in [0, 1): the first 8 bytes of
/// `SHA-256(UTF-8(salt) ‖ UTF-8(product_id))`, big-endian, divided by 2^64.
pub fn validation_score(salt: &str, product_id: &str) -> f64 {
    let digest = Sha256::new()
        .chain_update(salt.as_bytes())
        .chain_update(product_id.as_bytes())
        .finalize();
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(head) as f64 / 18_446_744_073_709_551_616.0
}

/// Whether [`SplitStrategy::ProductHash`] puts this product into validation.
pub fn is_validation_product(salt: &str, product_id: &str, validation_fraction: f64) -> bool {
    validation_score(salt, product_id) < validation_fraction
}

/// Splits one replayed data set with `strategy`.
pub fn split(examples: Vec<Example>, strategy: &SplitStrategy) -> Result<Split> {
    let mut train = Vec::new();
    let mut validation = Vec::new();
    let mut held_out = Vec::new();
    match strategy {
        SplitStrategy::ProductHash {
            validation_fraction,
            salt,
        } => {
            ensure!(
                (0.0..=1.0).contains(validation_fraction),
                "validation fraction {validation_fraction} must be between 0 and 1"
            );
            for e in examples {
                if is_validation_product(salt, &e.product_id, *validation_fraction) {
                    validation.push(e);
                } else {
                    train.push(e);
                }
            }
        }
        SplitStrategy::Hint => {
            for e in examples {
                match e.split_hint {
                    Some(SplitHint::Validation) => validation.push(e),
                    Some(SplitHint::Test) => held_out.push(e),
                    Some(SplitHint::Train) | None => train.push(e),
                }
            }
        }
        SplitStrategy::OffsetRanges(ranges) => {
            for e in examples {
                let in_range = ranges
                    .iter()
                    .any(|(p, r)| *p == e.source.partition && r.contains(&e.source.offset));
                if in_range {
                    validation.push(e);
                } else {
                    train.push(e);
                }
            }
        }
    }
    Ok(finish(train, validation, held_out))
}

/// Combines a training set and a separately replayed validation set (an explicit validation
/// topic), removing from training every product that also appears in validation.
pub fn split_explicit(train: Vec<Example>, validation: Vec<Example>) -> Split {
    finish(train, validation, Vec::new())
}

fn finish(train: Vec<Example>, validation: Vec<Example>, held_out: Vec<Example>) -> Split {
    let outside: BTreeSet<&str> = validation
        .iter()
        .chain(&held_out)
        .map(|e| e.product_id.as_str())
        .collect();
    let before = train.len();
    let train: Vec<Example> = train
        .into_iter()
        .filter(|e| !outside.contains(e.product_id.as_str()))
        .collect();
    let leaked_removed = before - train.len();
    if leaked_removed > 0 {
        tracing::warn!(
            leaked_removed,
            "training examples removed: their products also have photos in validation or the held-out set"
        );
    }
    let train_counts = SetCounts::of(&train);
    let validation_counts = SetCounts::of(&validation);
    let classes_missing_from_validation = train_counts
        .boxes_per_class
        .keys()
        .filter(|c| !validation_counts.boxes_per_class.contains_key(*c))
        .cloned()
        .collect();
    Split {
        report: SplitReport {
            train: train_counts,
            validation: validation_counts,
            held_out: held_out.len(),
            leaked_removed,
            classes_missing_from_validation,
        },
        train,
        validation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::replay::RecordSource;

    fn example(product: &str, offset: i64, labels: &[&str], hint: Option<SplitHint>) -> Example {
        Example {
            product_id: product.to_string(),
            image: image::RgbImage::new(1, 1),
            boxes: labels.iter().map(|_| [0.0, 0.0, 1.0, 1.0]).collect(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            iscrowd: labels.iter().map(|l| *l == "crowd").collect(),
            split_hint: hint,
            label_source: "synthetic".into(),
            event_id: None,
            metadata: Default::default(),
            source: RecordSource {
                topic: "t".into(),
                partition: (offset % 2) as i32,
                offset,
            },
            timestamp_ms: None,
        }
    }

    /// Expected scores computed independently with Python:
    /// `int.from_bytes(hashlib.sha256((salt + pid).encode()).digest()[:8], "big") / 2**64`.
    #[test]
    fn product_hash_is_the_documented_sha256_rule() {
        for (salt, product, score) in [
            (DEFAULT_SALT, "sku-42", 0.871_528_826_994_354_9),
            (DEFAULT_SALT, "sku-1", 0.108_313_917_631_633_9),
            (DEFAULT_SALT, "sku-15", 0.078_248_605_116_650_37),
            (DEFAULT_SALT, "synth-s1-p00000", 0.575_457_462_701_535),
            ("other-salt", "sku-42", 0.717_657_636_303_461_8),
        ] {
            assert!(
                (validation_score(salt, product) - score).abs() < 1e-12,
                "{salt} {product}"
            );
        }
        assert!(is_validation_product(DEFAULT_SALT, "sku-1", 0.2));
        assert!(!is_validation_product(DEFAULT_SALT, "sku-42", 0.2));
    }

    #[test]
    fn product_hash_split_keeps_products_whole_and_matches_the_ratio() {
        // 3000 products with 1-3 photos each.
        let examples: Vec<Example> = (0..3000)
            .flat_map(|p| (0..(p % 3 + 1)).map(move |k| example(&format!("sku-{p}"), p * 3 + k, &["x"], None)))
            .collect();
        let strategy = SplitStrategy::ProductHash {
            validation_fraction: 0.2,
            salt: DEFAULT_SALT.into(),
        };
        let s = split(examples.clone(), &strategy).unwrap();
        let train: BTreeSet<&str> = s.train.iter().map(|e| e.product_id.as_str()).collect();
        let validation: BTreeSet<&str> = s.validation.iter().map(|e| e.product_id.as_str()).collect();
        assert!(train.is_disjoint(&validation));
        assert_eq!(s.report.leaked_removed, 0);
        assert_eq!(s.train.len() + s.validation.len(), examples.len());
        let fraction = validation.len() as f64 / 3000.0;
        assert!((fraction - 0.2).abs() < 0.025, "{fraction}");
        assert_eq!(s.report.validation.products, validation.len());
        // sku-1 and sku-15 score below 0.2, sku-42 above (see the test above).
        assert!(validation.contains("sku-1") && validation.contains("sku-15") && train.contains("sku-42"));
        // Same input, same split.
        let again = split(examples, &strategy).unwrap();
        let ids = |v: &[Example]| v.iter().map(|e| e.source.offset).collect::<Vec<_>>();
        assert_eq!(ids(&again.validation), ids(&s.validation));
    }

    #[test]
    fn hint_split_holds_test_out_and_removes_leaks() {
        let examples = vec![
            example("a", 0, &["x"], Some(SplitHint::Train)),
            example("a", 1, &["x"], Some(SplitHint::Validation)),
            example("b", 2, &["y", "crowd"], None),
            example("c", 3, &["x"], Some(SplitHint::Test)),
            example("c", 4, &["x"], None),
        ];
        let s = split(examples, &SplitStrategy::Hint).unwrap();
        let ids = |v: &[Example]| v.iter().map(|e| e.source.offset).collect::<Vec<_>>();
        assert_eq!(ids(&s.train), vec![2]);
        assert_eq!(ids(&s.validation), vec![1]);
        assert_eq!(s.report.held_out, 1);
        assert_eq!(s.report.leaked_removed, 2);
        assert_eq!(s.report.train.crowd_boxes, 1);
        assert_eq!(
            s.report.classes_missing_from_validation,
            vec!["crowd".to_string(), "y".to_string()]
        );
    }

    #[test]
    fn offset_ranges_choose_validation() {
        let examples = (0..10).map(|o| example(&format!("p{o}"), o, &["x"], None)).collect();
        let s = split(examples, &SplitStrategy::OffsetRanges(vec![(0, 6..100), (1, 9..10)])).unwrap();
        let offsets: Vec<i64> = s.validation.iter().map(|e| e.source.offset).collect();
        assert_eq!(offsets, vec![6, 8, 9]);
        assert_eq!(s.report.train.images, 7);
    }

    #[test]
    fn explicit_validation_set_removes_shared_products_from_training() {
        let train = vec![example("a", 0, &["x"], None), example("b", 1, &["x", "y"], None)];
        let validation = vec![example("b", 0, &["y"], None)];
        let s = split_explicit(train, validation);
        assert_eq!(s.train.len(), 1);
        assert_eq!(s.report.leaked_removed, 1);
        assert_eq!(s.report.validation.boxes_per_class["y"], 1);
    }

    #[test]
    fn fractions_outside_0_1_are_refused() {
        let err = split(
            vec![],
            &SplitStrategy::ProductHash {
                validation_fraction: 1.5,
                salt: DEFAULT_SALT.into(),
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("between 0 and 1"), "{err}");
    }
}
