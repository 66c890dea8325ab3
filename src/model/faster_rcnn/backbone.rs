//! ResNet-50 body with frozen batch norm, as torchvision's `resnet50` inside
//! `IntermediateLayerGetter` (returns the outputs of layer1..layer4).
//!
//! Variable paths equal torchvision's state-dict keys under `backbone.body`. Frozen batch
//! norm can be folded into the preceding convolution for inference ([`ResNetBody::fuse`]).

use tch::{nn, Kind, Tensor};

/// The same values in channels-last (NHWC) memory order, still shaped `[N, C, H, W]`.
///
/// libtorch's oneDNN convolutions run faster on channels-last tensors (no layout reorder
/// per layer), and their outputs stay channels-last, so converting the input and the
/// weights once makes the whole network channels-last.
pub fn to_channels_last(t: &Tensor) -> Tensor {
    t.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

/// Batch norm with fixed statistics and affine parameters (torchvision `FrozenBatchNorm2d`).
///
/// Its four tensors are never trained: fine-tuning Faster R-CNN keeps them frozen, as
/// torchvision does.
#[derive(Debug)]
pub struct FrozenBatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    /// Added to the variance: 1e-5 in torchvision, 0 for its COCO_V1 checkpoint.
    eps: f64,
}

impl FrozenBatchNorm2d {
    /// Creates the four buffers under `p` (`weight`, `bias`, `running_mean`, `running_var`).
    pub fn new(p: nn::Path, channels: i64, eps: f64) -> Self {
        Self {
            eps,
            weight: p.ones_no_train("weight", &[channels]),
            bias: p.zeros_no_train("bias", &[channels]),
            running_mean: p.zeros_no_train("running_mean", &[channels]),
            running_var: p.ones_no_train("running_var", &[channels]),
        }
    }

    /// Per-channel `(scale, shift)` so that `bn(x) = x * scale + shift`.
    fn scale_shift(&self) -> (Tensor, Tensor) {
        let scale = &self.weight * (&self.running_var + self.eps).rsqrt();
        let shift = &self.bias - &self.running_mean * &scale;
        (scale, shift)
    }

    /// Sets the statistics to those of `x` (per channel over batch and space; weight 1, bias 0)
    /// so that this layer outputs zero mean and unit variance on `x`: the data-dependent
    /// initialisation of a network trained from scratch with frozen batch norm.
    fn calibrate(&self, x: &Tensor) {
        let _guard = tch::no_grad_guard();
        let x = x.to_kind(Kind::Float);
        let mean = x.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Float);
        let var = x.var_dim([0i64, 2, 3].as_slice(), false, false);
        self.running_mean.shallow_clone().copy_(&mean);
        self.running_var.shallow_clone().copy_(&var);
        let _ = self.weight.shallow_clone().fill_(1.0);
        let _ = self.bias.shallow_clone().fill_(0.0);
    }

    /// Applies the normalization, as torchvision's `FrozenBatchNorm2d.forward`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (scale, shift) = self.scale_shift();
        x * scale.view([1, -1, 1, 1]) + shift.view([1, -1, 1, 1])
    }
}

/// A bias-free convolution followed by frozen batch norm; foldable into one convolution.
#[derive(Debug)]
pub struct ConvBn {
    conv: nn::Conv2D,
    bn: FrozenBatchNorm2d,
    stride: i64,
    padding: i64,
    /// Convolution weight and bias with the batch norm folded in, once [`ConvBn::fuse`] ran.
    fused: Option<(Tensor, Tensor)>,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        conv_path: nn::Path,
        bn_path: nn::Path,
        cin: i64,
        cout: i64,
        k: i64,
        stride: i64,
        padding: i64,
        eps: f64,
    ) -> Self {
        let cfg = nn::ConvConfig {
            stride,
            padding,
            bias: false,
            ..Default::default()
        };
        Self {
            conv: nn::conv2d(conv_path, cin, cout, k, cfg),
            bn: FrozenBatchNorm2d::new(bn_path, cout, eps),
            stride,
            padding,
            fused: None,
        }
    }

    /// Folds the frozen batch norm into the convolution (inference only). The folded
    /// weight is computed in double precision, rounded once, and stored channels-last.
    fn fuse(&mut self) {
        let _guard = tch::no_grad_guard();
        let (scale, shift) = self.bn.scale_shift();
        let weight = (self.conv.ws.to_kind(Kind::Double) * scale.to_kind(Kind::Double).view([-1, 1, 1, 1]))
            .to_kind(self.conv.ws.kind());
        self.fused = Some((to_channels_last(&weight), shift));
    }

    /// Calibrates the batch norm on this convolution's output for `x` and returns the
    /// normalized output (see [`FrozenBatchNorm2d::calibrate`]).
    fn calibrate(&self, x: &Tensor) -> Tensor {
        let y = x.apply(&self.conv);
        self.bn.calibrate(&y);
        self.bn.forward(&y)
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        match &self.fused {
            Some((w, b)) => x.conv2d(w, Some(b), [self.stride], [self.padding], [1], 1),
            None => self.bn.forward(&x.apply(&self.conv)),
        }
    }
}

/// ResNet "Bottleneck" block (v1.5: stride on the 3x3 convolution).
#[derive(Debug)]
struct Bottleneck {
    conv_bn1: ConvBn,
    conv_bn2: ConvBn,
    conv_bn3: ConvBn,
    downsample: Option<ConvBn>,
}

impl Bottleneck {
    fn new(p: &nn::Path, inplanes: i64, planes: i64, stride: i64, downsample: bool, eps: f64) -> Self {
        let out = planes * 4;
        Self {
            conv_bn1: ConvBn::new(p / "conv1", p / "bn1", inplanes, planes, 1, 1, 0, eps),
            conv_bn2: ConvBn::new(p / "conv2", p / "bn2", planes, planes, 3, stride, 1, eps),
            conv_bn3: ConvBn::new(p / "conv3", p / "bn3", planes, out, 1, 1, 0, eps),
            downsample: downsample.then(|| {
                ConvBn::new(
                    p / "downsample" / "0",
                    p / "downsample" / "1",
                    inplanes,
                    out,
                    1,
                    stride,
                    0,
                    eps,
                )
            }),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let out = self.conv_bn1.forward(x).relu_();
        let out = self.conv_bn2.forward(&out).relu_();
        let mut out = self.conv_bn3.forward(&out);
        match &self.downsample {
            Some(d) => out += d.forward(x),
            None => out += x,
        }
        out.relu_()
    }

    /// [`Bottleneck::forward`] that calibrates each batch norm on its way.
    fn calibrate(&self, x: &Tensor) -> Tensor {
        let out = self.conv_bn1.calibrate(x).relu_();
        let out = self.conv_bn2.calibrate(&out).relu_();
        let mut out = self.conv_bn3.calibrate(&out);
        match &self.downsample {
            Some(d) => out += d.calibrate(x),
            None => out += x,
        }
        out.relu_()
    }

    fn convs_mut(&mut self) -> impl Iterator<Item = &mut ConvBn> {
        [&mut self.conv_bn1, &mut self.conv_bn2, &mut self.conv_bn3]
            .into_iter()
            .chain(self.downsample.as_mut())
    }
}

/// The ResNet-50 body: stem, then four stages returning C2..C5 feature maps.
#[derive(Debug)]
pub struct ResNetBody {
    stem: ConvBn,
    layers: Vec<Vec<Bottleneck>>,
}

/// Out channels of layer1..layer4, the FPN's inputs.
pub const RESNET50_STAGE_CHANNELS: [i64; 4] = [256, 512, 1024, 2048];

impl ResNetBody {
    /// Creates ResNet-50 (blocks 3, 4, 6, 3) under `p` (torchvision `backbone.body`).
    /// `eps` is the frozen batch norm epsilon ([`super::FasterRcnnConfig::frozen_bn_eps`]).
    pub fn resnet50(p: &nn::Path, eps: f64) -> Self {
        let stem = ConvBn::new(p / "conv1", p / "bn1", 3, 64, 7, 2, 3, eps);
        let mut inplanes = 64;
        let mut layers = Vec::new();
        for (i, (&blocks, planes)) in [3i64, 4, 6, 3].iter().zip([64i64, 128, 256, 512]).enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            let lp = p / format!("layer{}", i + 1);
            let stage = (0..blocks)
                .map(|b| {
                    let block = if b == 0 {
                        Bottleneck::new(&(&lp / "0"), inplanes, planes, stride, true, eps)
                    } else {
                        Bottleneck::new(&(&lp / b.to_string()), planes * 4, planes, 1, false, eps)
                    };
                    inplanes = planes * 4;
                    block
                })
                .collect();
            layers.push(stage);
        }
        Self { stem, layers }
    }

    /// Returns the outputs of layer1..layer4 (strides 4, 8, 16, 32).
    pub fn forward(&self, x: &Tensor) -> Vec<Tensor> {
        let x = self.stem.forward(x).relu_();
        let mut x = x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        let mut outputs = Vec::with_capacity(4);
        for stage in &self.layers {
            for block in stage {
                x = block.forward(&x);
            }
            outputs.push(x.shallow_clone());
        }
        outputs
    }

    /// Sets every frozen batch norm's statistics from a forward pass over `x` (a normalized,
    /// padded batch), layer by layer, so that each normalizes its input: a network built
    /// from scratch then starts well scaled, as one with trainable batch norm would.
    pub fn calibrate_batch_norm(&self, x: &Tensor) {
        let _guard = tch::no_grad_guard();
        let x = self.stem.calibrate(x).relu_();
        let mut x = x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for block in self.layers.iter().flatten() {
            x = block.calibrate(&x);
        }
    }

    /// Folds every frozen batch norm into its convolution (channels-last weights), for
    /// faster inference.
    pub fn fuse(&mut self) {
        self.stem.fuse();
        for block in self.layers.iter_mut().flatten() {
            block.convs_mut().for_each(ConvBn::fuse);
        }
    }
}
