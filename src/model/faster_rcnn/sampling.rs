//! Training targets: matching anchors or proposals to ground-truth boxes and sampling a
//! balanced subset of them for the losses, as torchvision's `det_utils.Matcher` and
//! `det_utils.BalancedPositiveNegativeSampler`.

use tch::{Device, Kind, Tensor};

/// Match value of an element whose best IoU is below the low threshold (background).
pub const BELOW_LOW_THRESHOLD: i64 = -1;
/// Match value of an element whose best IoU is between the thresholds (ignored).
pub const BETWEEN_THRESHOLDS: i64 = -2;

/// Assigns every predicted element (anchor or proposal) the ground-truth box it overlaps
/// most, or [`BELOW_LOW_THRESHOLD`] / [`BETWEEN_THRESHOLDS`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Matcher {
    /// IoU at or above which a match is kept.
    pub high_threshold: f64,
    /// IoU below which an element is background.
    pub low_threshold: f64,
    /// Also match, for each ground-truth box, the elements it overlaps most (ties included)
    /// even below the thresholds, so no box goes without a match (the RPN's setting).
    pub allow_low_quality_matches: bool,
}

impl Matcher {
    /// Match indices `[N]` (int64) for a non-empty `[M, N]` IoU matrix of M ground-truth
    /// boxes against N elements, as torchvision's `Matcher.__call__`.
    pub fn matches(&self, quality: &Tensor) -> Tensor {
        let (matched_vals, matches) = quality.max_dim(0, false);
        let below = matched_vals.lt(self.low_threshold);
        let between = matched_vals
            .ge(self.low_threshold)
            .logical_and(&matched_vals.lt(self.high_threshold));
        let thresholded = matches
            .masked_fill(&below, BELOW_LOW_THRESHOLD)
            .masked_fill(&between, BETWEEN_THRESHOLDS);
        if !self.allow_low_quality_matches {
            return thresholded;
        }
        // For each ground-truth box, the elements with its highest IoU (ties included) get
        // back their best match.
        let (highest, _) = quality.max_dim(1, true);
        let elements = quality.eq_tensor(&highest).nonzero().select(1, 1);
        thresholded.index_copy(0, &elements, &matches.index_select(0, &elements))
    }
}

/// Anchors or proposals of one image: how many could be sampled and how many were.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StageStats {
    /// Elements labelled foreground (label >= 1).
    pub positive_candidates: i64,
    /// Elements labelled background (label 0).
    pub negative_candidates: i64,
    /// Foreground elements sampled: `min(positive_candidates, batch * positive_fraction)`.
    pub positives: i64,
    /// Background elements sampled: `min(negative_candidates, batch - positives)`.
    pub negatives: i64,
}

/// The elements sampled from one image, as boolean masks over its elements.
#[derive(Debug)]
pub struct Sampled {
    /// `[N]` bool: sampled foreground elements.
    pub positive: Tensor,
    /// `[N]` bool: sampled background elements.
    pub negative: Tensor,
    /// Counts of candidates and samples.
    pub stats: StageStats,
}

/// Which positives and negatives the balanced sampler takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// A uniformly random subset (`torch.randperm` on libtorch's generator).
    Random,
    /// The first ones in index order (torchvision with `randperm` replaced by `arange`).
    FirstK,
}

/// The balanced positive/negative sampler of both training stages (RPN anchors and box-head
/// proposals), as torchvision's `BalancedPositiveNegativeSampler`.
///
/// Labels `>= 1` are candidates for positives, `0` for negatives, `-1` is ignored. Per image
/// it takes `min(#positives, int(batch * positive_fraction))` positives and fills the batch
/// with up to `batch - positives` negatives.
#[derive(Debug, Clone)]
pub struct Sampler {
    order: Order,
}

impl Sampler {
    /// Random subsets drawn from libtorch's global generator, as torchvision does:
    /// `tch::manual_seed` before a step makes the draw repeatable, and on the CPU a training
    /// step seeded like torchvision's (`torch.manual_seed`, same seed) samples exactly what
    /// torchvision samples (tests/parity_training.rs checks it).
    pub fn random() -> Self {
        Self { order: Order::Random }
    }

    /// The first positives and negatives in index order: deterministic, and what
    /// torchvision computes when `torch.randperm` is replaced by `torch.arange` (parity
    /// tests; debugging a training step).
    pub fn first_k() -> Self {
        Self { order: Order::FirstK }
    }

    /// Samples one image's elements from their labels (`[N]`, any numeric kind).
    pub fn sample(&mut self, labels: &Tensor, batch_size_per_image: i64, positive_fraction: f64) -> Sampled {
        let positive = labels.ge(1).nonzero().select(1, 0);
        let negative = labels.eq(0).nonzero().select(1, 0);
        let positive_candidates = positive.size()[0];
        let negative_candidates = negative.size()[0];
        // Python's int() truncates, as `as` does.
        let positives = positive_candidates.min((batch_size_per_image as f64 * positive_fraction) as i64);
        let negatives = negative_candidates.min(batch_size_per_image - positives).max(0);
        let device = labels.device();
        let positive = self.pick(&positive, positives, device);
        let negative = self.pick(&negative, negatives, device);
        let mask = |idx: &Tensor| Tensor::zeros([labels.size()[0]], (Kind::Bool, device)).index_fill(0, idx, 1i64);
        Sampled {
            positive: mask(&positive),
            negative: mask(&negative),
            stats: StageStats {
                positive_candidates,
                negative_candidates,
                positives,
                negatives,
            },
        }
    }

    /// `k` of the `candidates` (indices), chosen according to the order.
    fn pick(&mut self, candidates: &Tensor, k: i64, device: Device) -> Tensor {
        let n = candidates.size()[0];
        let chosen = match self.order {
            Order::Random => Tensor::randperm(n, (Kind::Int64, device)).narrow(0, 0, k),
            Order::FirstK => Tensor::arange(k, (Kind::Int64, device)),
        };
        candidates.index_select(0, &chosen)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Tests that seed libtorch's global generator run one at a time (unit tests elsewhere
    /// in the crate that seed it take this lock too).
    pub(crate) static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn to_vec(t: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(&t.to_kind(Kind::Int64)).unwrap()
    }

    fn mask_indices(mask: &Tensor) -> Vec<i64> {
        to_vec(&mask.nonzero().select(1, 0))
    }

    #[test]
    fn matcher_thresholds_and_low_quality_matches_follow_torchvision() {
        // 2 ground-truth boxes x 5 elements.
        let q = Tensor::from_slice(&[0.9f32, 0.5, 0.1, 0.2, 0.0, 0.1, 0.6, 0.25, 0.2, 0.0]).view([2, 5]);
        let strict = Matcher {
            high_threshold: 0.7,
            low_threshold: 0.3,
            allow_low_quality_matches: false,
        };
        assert_eq!(to_vec(&strict.matches(&q)), vec![0, -2, -1, -1, -1]);
        // Box 1's best IoU is 0.6 (element 1): element 1 gets matched back to box 1. Box 0's
        // best is element 0, already matched. Element 3 ties 0.2 with both boxes but is
        // nobody's best.
        let low_quality = Matcher {
            allow_low_quality_matches: true,
            ..strict
        };
        assert_eq!(to_vec(&low_quality.matches(&q)), vec![0, 1, -1, -1, -1]);
    }

    #[test]
    fn low_quality_ties_match_every_tied_element() {
        let q = Tensor::from_slice(&[0.2f32, 0.2, 0.1]).view([1, 3]);
        let m = Matcher {
            high_threshold: 0.7,
            low_threshold: 0.3,
            allow_low_quality_matches: true,
        };
        assert_eq!(to_vec(&m.matches(&q)), vec![0, 0, -1]);
    }

    #[test]
    fn first_k_takes_candidates_in_index_order() {
        // positives at 1, 3, 4, 6; negatives at 0, 2, 7, 8; ignored at 5.
        let labels = Tensor::from_slice(&[0i64, 2, 0, 1, 3, -1, 1, 0, 0]);
        let s = Sampler::first_k().sample(&labels, 4, 0.5);
        assert_eq!(mask_indices(&s.positive), vec![1, 3]);
        assert_eq!(mask_indices(&s.negative), vec![0, 2]);
        assert_eq!(
            s.stats,
            StageStats {
                positive_candidates: 4,
                negative_candidates: 4,
                positives: 2,
                negatives: 2
            }
        );
    }

    #[test]
    fn random_sampler_takes_exact_counts_from_the_right_candidates() {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(7);
        let labels = Tensor::randint_low(-1, 3, [5000], (Kind::Int64, Device::Cpu));
        let (pos_all, neg_all) = (
            labels.ge(1).sum(Kind::Int64).int64_value(&[]),
            labels.eq(0).sum(Kind::Int64).int64_value(&[]),
        );
        for (batch, fraction) in [(256i64, 0.5), (512, 0.25), (10_000, 0.5)] {
            let s = Sampler::random().sample(&labels, batch, fraction);
            let want_pos = pos_all.min((batch as f64 * fraction) as i64);
            let want_neg = neg_all.min(batch - want_pos);
            assert_eq!(s.stats.positives, want_pos);
            assert_eq!(s.stats.negatives, want_neg);
            let pos = mask_indices(&s.positive);
            let neg = mask_indices(&s.negative);
            assert_eq!(pos.len() as i64, want_pos, "distinct positives");
            assert_eq!(neg.len() as i64, want_neg, "distinct negatives");
            let l = to_vec(&labels);
            assert!(pos.iter().all(|&i| l[i as usize] >= 1));
            assert!(neg.iter().all(|&i| l[i as usize] == 0));
        }
        // Not the first ones: random.
        let s = Sampler::random().sample(&labels, 256, 0.5);
        let first = Sampler::first_k().sample(&labels, 256, 0.5);
        assert_ne!(mask_indices(&s.negative), mask_indices(&first.negative));
    }

    #[test]
    fn manual_seed_makes_random_sampling_repeatable() {
        let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
        let labels = Tensor::randint_low(-1, 3, [3000], (Kind::Int64, Device::Cpu));
        let draw = || {
            let s = Sampler::random().sample(&labels, 256, 0.5);
            (mask_indices(&s.positive), mask_indices(&s.negative))
        };
        tch::manual_seed(11);
        let a = draw();
        tch::manual_seed(11);
        let b = draw();
        tch::manual_seed(12);
        let c = draw();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn no_candidates_samples_nothing() {
        let labels = Tensor::from_slice(&[-1i64, -1]);
        let s = Sampler::random().sample(&labels, 256, 0.5);
        assert_eq!(s.stats, StageStats::default());
        assert!(mask_indices(&s.positive).is_empty() && mask_indices(&s.negative).is_empty());
    }
}
