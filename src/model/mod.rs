//! Detection models and the pieces they share.
//!
//! * [`ops`]: nms, batched nms, roi_align, box coding, IoU (torchvision semantics).
//! * [`faster_rcnn`]: Faster R-CNN ResNet-50 FPN, equal to torchvision's.
//! * [`weights`]: safetensors loading with key/shape checks, and weight metadata.
//! * [`labels`]: the COCO label map.

pub mod faster_rcnn;
pub mod labels;
pub mod ops;
pub mod weights;
