use attrstream::model::faster_rcnn::{FasterRcnn, FasterRcnnConfig};
use attrstream::model::weights::{self, LoadPolicy};
use attrstream::preprocess::{decode_image, to_tensor};
use tch::{nn::VarStore, Device};
fn main() {
    tch::set_num_threads(2);
    let fuse = std::env::args().nth(1).is_some();
    let cfg = FasterRcnnConfig { min_size: 800, box_score_thresh: 0.05, ..Default::default() };
    let mut vs = VarStore::new(Device::Cpu);
    let mut m = FasterRcnn::new(&vs.root(), cfg);
    weights::load_into(&mut vs, std::path::Path::new("/tmp/bw.safetensors"), &LoadPolicy::default()).unwrap();
    if fuse { m.optimize_for_inference(); }
    let img = to_tensor(&decode_image(&std::fs::read("assets/samples/coffee.png").unwrap(), 1 << 30).unwrap(), Device::Cpu);
    for _ in 0..4 { let t = std::time::Instant::now(); m.detect(&[img.shallow_clone()]); eprintln!("total {:?}", t.elapsed()); }
}
