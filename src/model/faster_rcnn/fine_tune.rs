//! Fine-tuning setup, as torchvision: which backbone layers train
//! (`_resnet_fpn_extractor(backbone, trainable_layers)`), a fresh box predictor when the
//! label set changes (`FastRCNNPredictor(1024, num_classes)`), and the variables an
//! optimizer updates.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use tch::{nn::VarStore, Device, Tensor};

use super::{FasterRcnn, FasterRcnnConfig};
use crate::model::weights::{self, LoadPolicy, LoadReport, WeightsError};

/// torchvision's default number of trainable backbone layers when fine-tuning from
/// pretrained weights (`trainable_backbone_layers=None` becomes 3).
pub const DEFAULT_TRAINABLE_BACKBONE_LAYERS: u8 = 3;

/// Variable-name prefix of the ResNet body inside the model.
const BODY_PREFIX: &str = "backbone.body.";
/// Variable-name prefix of the box predictor, replaced for a new label set.
pub const BOX_PREDICTOR_PREFIX: &str = "roi_heads.box_predictor.";
/// The predictor tensor whose first dimension is the class count.
const CLASS_SCORE_WEIGHT: &str = "roi_heads.box_predictor.cls_score.weight";
/// The ResNet body parts that train when `trainable_layers` (0 to 5) of the backbone train,
/// as torchvision's `_resnet_fpn_extractor`: the last stages first, then the stem
/// convolution, and its batch norm when all five train.
pub fn backbone_layers_to_train(trainable_layers: u8) -> Result<Vec<&'static str>, String> {
    if trainable_layers > 5 {
        return Err(format!(
            "trainable backbone layers must be between 0 and 5 (torchvision's range; 3 is its fine-tuning default), got {trainable_layers}"
        ));
    }
    let mut layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][..trainable_layers as usize].to_vec();
    if trainable_layers == 5 {
        layers.push("bn1");
    }
    Ok(layers)
}

/// Sets which variables train for fine-tuning with `trainable_layers` (0 to 5) backbone
/// layers, exactly as torchvision: ResNet body parameters outside
/// [`backbone_layers_to_train`] are frozen, every other parameter (FPN, RPN, box head and
/// predictor) trains, and batch norm (frozen batch norm buffers) never trains.
///
/// Only variables created trainable are touched. Call it after loading weights and before
/// building the optimizer; `VarStore::freeze`/`unfreeze` would undo it.
pub fn freeze_backbone_layers(vs: &VarStore, trainable_layers: u8) -> Result<(), String> {
    let layers = backbone_layers_to_train(trainable_layers)?;
    let parameters: HashSet<usize> = vs.trainable_variables().iter().map(|t| t.data_ptr() as usize).collect();
    for (name, tensor) in vs.variables() {
        if !parameters.contains(&(tensor.data_ptr() as usize)) {
            continue;
        }
        let trains = match name.strip_prefix(BODY_PREFIX) {
            Some(rest) => layers.iter().any(|layer| rest.starts_with(layer)),
            None => true,
        };
        let _ = tensor.set_requires_grad(trains);
    }
    Ok(())
}

/// The variables that currently require gradients, sorted by name: what an optimizer should
/// update after [`freeze_backbone_layers`] (frozen ones get no gradient at all).
pub fn trainable_variables(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// The number of classes (background included) a weights file's box predictor was trained
/// for, read from the safetensors header only; `None` when it has no predictor.
pub fn checkpoint_num_classes(path: &Path) -> Result<Option<i64>, WeightsError> {
    let not_st = |reason: String| WeightsError::NotSafetensors {
        path: path.to_path_buf(),
        reason,
    };
    let header = weights::read_header_bytes(path)?;
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        shape: Vec<i64>,
    }
    let mut entries: HashMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| not_st(format!("header is not JSON: {e}")))?;
    let Some(entry) = entries.remove(CLASS_SCORE_WEIGHT) else {
        return Ok(None);
    };
    let entry: Entry = serde_json::from_value(entry).map_err(|e| not_st(format!("bad entry: {e}")))?;
    Ok(entry.shape.first().copied())
}

/// What [`FasterRcnn::load_for_fine_tuning`] did.
#[derive(Debug)]
pub struct FineTuneReport {
    /// Tensors loaded and variables left at their initial values.
    pub load: LoadReport,
    /// Class count of the checkpoint's box predictor (`None` when it has none).
    pub checkpoint_num_classes: Option<i64>,
    /// Whether the box predictor was freshly initialised for a different label set.
    pub predictor_replaced: bool,
}

/// Why a model could not be prepared for fine-tuning.
#[derive(Debug, thiserror::Error)]
pub enum FineTuneError {
    /// The weights file could not be loaded.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The configuration is invalid.
    #[error("{0}")]
    Config(String),
}

impl FasterRcnn {
    /// Builds the model for fine-tuning from any Faster R-CNN ResNet-50 FPN weights file on
    /// `device`: when the file's class count differs from `cfg.num_classes` (a new label
    /// set), the box predictor (`roi_heads.box_predictor.*`) starts fresh with torchvision's
    /// `nn.Linear` initialisation (seeded by `tch::manual_seed`), and every other tensor
    /// loads with strict key and shape checks. Then `trainable_backbone_layers` (0 to 5,
    /// torchvision's default 3) are set as by [`freeze_backbone_layers`].
    ///
    /// The frozen batch norm epsilon comes from the file's metadata when it records one
    /// (torchvision's COCO checkpoint was trained with 0), the class count from `cfg`.
    /// Use [`trainable_variables`] for the optimizer; do not call
    /// [`FasterRcnn::optimize_for_inference`] on a model being trained.
    pub fn load_for_fine_tuning(
        path: &Path,
        device: Device,
        mut cfg: FasterRcnnConfig,
        trainable_backbone_layers: u8,
    ) -> Result<(VarStore, Self, FineTuneReport), FineTuneError> {
        backbone_layers_to_train(trainable_backbone_layers).map_err(FineTuneError::Config)?;
        cfg.validate().map_err(FineTuneError::Config)?;
        let metadata = weights::read_metadata(path)?;
        if let Some(eps) = metadata
            .config
            .as_ref()
            .and_then(|c| c.get("frozen_bn_eps"))
            .and_then(|v| v.as_f64())
        {
            cfg.frozen_bn_eps = eps;
        }
        let checkpoint_num_classes = checkpoint_num_classes(path)?;
        let predictor_replaced = checkpoint_num_classes != Some(cfg.num_classes);
        let policy = if predictor_replaced {
            LoadPolicy {
                allow_missing_prefixes: vec![BOX_PREDICTOR_PREFIX.to_string()],
                ignore_prefixes: vec![BOX_PREDICTOR_PREFIX.to_string()],
            }
        } else {
            LoadPolicy::default()
        };
        let mut vs = VarStore::new(device);
        let model = Self::new(&vs.root(), cfg);
        let load = weights::load_into(&mut vs, path, &policy)?;
        freeze_backbone_layers(&vs, trainable_backbone_layers).map_err(FineTuneError::Config)?;
        Ok((
            vs,
            model,
            FineTuneReport {
                load,
                checkpoint_num_classes,
                predictor_replaced,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_to_train_follow_torchvision() {
        assert_eq!(backbone_layers_to_train(0).unwrap(), Vec::<&str>::new());
        assert_eq!(backbone_layers_to_train(3).unwrap(), vec!["layer4", "layer3", "layer2"]);
        assert_eq!(
            backbone_layers_to_train(5).unwrap(),
            vec!["layer4", "layer3", "layer2", "layer1", "conv1", "bn1"]
        );
        let err = backbone_layers_to_train(6).unwrap_err();
        assert!(err.contains("between 0 and 5") && err.contains("got 6"), "{err}");
    }

    #[test]
    fn freezing_selects_body_layers_and_keeps_batch_norm_and_heads_as_they_must_be() {
        // Building the model draws from libtorch's global generator: not while a seeded test runs.
        let _rng = super::super::sampling::tests::RNG
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let vs = VarStore::new(Device::Cpu);
        let _model = FasterRcnn::new(&vs.root(), FasterRcnnConfig::default());
        let names = |n: u8| -> Vec<String> {
            freeze_backbone_layers(&vs, n).unwrap();
            trainable_variables(&vs).into_iter().map(|(name, _)| name).collect()
        };
        let heads = |v: &[String]| v.iter().filter(|n| !n.starts_with(BODY_PREFIX)).count();
        let body = |v: &[String]| v.iter().filter(|n| n.starts_with(BODY_PREFIX)).count();
        // Convolutions (bias-free) added per layer, in training order: layer4 3 blocks x 3 +
        // 1 downsample, layer3 6 x 3 + 1, layer2 4 x 3 + 1, layer1 3 x 3 + 1, the stem 1.
        let expected_body = [0, 10, 10 + 19, 10 + 19 + 13, 10 + 19 + 13 + 10, 10 + 19 + 13 + 10 + 1];
        let all_heads = heads(&names(0));
        // FPN 8 convs x 2, RPN 3 convs x 2, box head 2 linears x 2, predictor 2 linears x 2.
        assert_eq!(all_heads, 16 + 6 + 4 + 4);
        for (n, &want) in expected_body.iter().enumerate() {
            let v = names(n as u8);
            assert_eq!(body(&v), want, "trainable body convolutions with {n} layers");
            assert_eq!(heads(&v), all_heads, "heads always train");
            assert!(
                v.iter().all(|n| !n.contains(".bn") && !n.contains("downsample.1")),
                "batch norm never trains"
            );
        }
        let three = names(3);
        assert!(three.contains(&"backbone.body.layer2.0.downsample.0.weight".to_string()));
        assert!(!three.iter().any(|n| n.starts_with("backbone.body.layer1.")));
        assert!(!three.contains(&"backbone.body.conv1.weight".to_string()));
        assert!(freeze_backbone_layers(&vs, 9).is_err());
    }
}
