//! Detection models and the pieces they share.
//!
//! * [`ops`]: nms, batched nms, roi_align, box coding, IoU (torchvision semantics).
//! * [`faster_rcnn`]: Faster R-CNN ResNet-50 FPN, equal to torchvision's in inference and training losses.
//! * [`ssd_mobilenet_v2`]: SSD MobileNetV2 from the TF Object Detection API (offline default).
//! * [`weights`]: safetensors loading with key/shape checks, and weight metadata.
//! * [`labels`]: the COCO label map.
//! * [`torch_pickle`]: reading `torch.save` checkpoints (zip and legacy) without Python.
//! * [`import`]: converting a checkpoint into a verified weights file (`model import`).
//! * [`fetch`]: downloading known checkpoints with hash checks and retries (`model fetch`).

pub mod faster_rcnn;
pub mod fetch;
pub mod import;
pub mod labels;
pub mod ops;
pub mod ssd_mobilenet_v2;
pub mod torch_pickle;
pub mod weights;
