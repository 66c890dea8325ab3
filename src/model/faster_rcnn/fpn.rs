//! Feature Pyramid Network with the max-pool extra level, as torchvision's
//! `FeaturePyramidNetwork(..., extra_blocks=LastLevelMaxPool())`.

use tch::{nn, Tensor};

/// Number of channels of every FPN output.
pub const FPN_CHANNELS: i64 = 256;

/// Names of the FPN outputs, as in torchvision: four levels and the extra `pool` level.
pub const FPN_LEVEL_NAMES: [&str; 5] = ["0", "1", "2", "3", "pool"];

/// Top-down pathway with lateral 1x1 connections and 3x3 output convolutions.
#[derive(Debug)]
pub struct Fpn {
    inner_blocks: Vec<nn::Conv2D>,
    layer_blocks: Vec<nn::Conv2D>,
}

impl Fpn {
    /// Creates the FPN under `p` (torchvision `backbone.fpn`).
    pub fn new(p: &nn::Path, in_channels: &[i64]) -> Self {
        let padded = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let inner_blocks = in_channels
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                nn::conv2d(
                    p / "inner_blocks" / i.to_string() / "0",
                    c,
                    FPN_CHANNELS,
                    1,
                    Default::default(),
                )
            })
            .collect();
        let layer_blocks = (0..in_channels.len())
            .map(|i| {
                nn::conv2d(
                    p / "layer_blocks" / i.to_string() / "0",
                    FPN_CHANNELS,
                    FPN_CHANNELS,
                    3,
                    padded,
                )
            })
            .collect();
        Self {
            inner_blocks,
            layer_blocks,
        }
    }

    /// Stores the convolution weights channels-last (see [`super::backbone::to_channels_last`]).
    pub fn weights_to_channels_last(&mut self) {
        for conv in self.inner_blocks.iter_mut().chain(self.layer_blocks.iter_mut()) {
            conv.ws = super::backbone::to_channels_last(&conv.ws);
        }
    }

    /// Maps backbone stages (fine to coarse) to FPN levels "0".."3" plus "pool".
    pub fn forward(&self, features: &[Tensor]) -> Vec<Tensor> {
        let last = features.len() - 1;
        let mut last_inner = features[last].apply(&self.inner_blocks[last]);
        let mut results = vec![last_inner.apply(&self.layer_blocks[last])];
        for idx in (0..last).rev() {
            let lateral = features[idx].apply(&self.inner_blocks[idx]);
            let size = lateral.size();
            let top_down = last_inner.upsample_nearest2d([size[2], size[3]], None, None);
            last_inner = lateral + top_down;
            results.insert(0, last_inner.apply(&self.layer_blocks[idx]));
        }
        let pool = results[last].max_pool2d([1, 1], [2, 2], [0, 0], [1, 1], false);
        results.push(pool);
        results
    }
}
