//! The COCO label map used by torchvision's detection models: 91 indices, index 0 is the
//! background and the "N/A" entries are category ids COCO never used.

/// torchvision's `_COCO_CATEGORIES`, index = class id predicted by a COCO detector.
pub const COCO_CATEGORIES: [&str; 91] = [
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter",
    "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A",
    "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"
];

/// COCO label names as owned strings (the default label map of a COCO checkpoint).
pub fn coco_labels() -> Vec<String> {
    COCO_CATEGORIES.iter().map(|s| s.to_string()).collect()
}

/// Name of class `id` in `labels`, or `class_<id>` when the map has no such entry.
pub fn label_name(labels: &[String], id: i64) -> String {
    usize::try_from(id)
        .ok()
        .and_then(|i| labels.get(i))
        .cloned()
        .unwrap_or_else(|| format!("class_{id}"))
}
