//! `attrstream synth-labels`: writes the seeded synthetic shapes data set
//! ([`crate::train::synthetic`]) as a COCO folder that `publish-labels` imports.

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::SynthLabelsArgs;
use crate::train::synthetic::{write_coco, SynthConfig, PRODUCT_ID_FIELD};

/// Generates the images and annotations; prints a JSON summary (images, boxes, products, per class).
pub fn run(args: SynthLabelsArgs) -> Result<ExitCode> {
    let config = SynthConfig {
        width: args.width,
        height: args.height,
        min_object: args.min_object,
        max_object: args.max_object,
        ..SynthConfig::new(args.images, args.seed)
    };
    let summary = write_coco(&config, &args.out, args.force)?;
    println!("{}", serde_json::to_string(&summary)?);
    eprintln!(
        "attrstream: wrote {} images with {} boxes of {} products to {}; publish them with\n  \
         attrstream publish-labels --annotations {} --product-id-field {PRODUCT_ID_FIELD} --brokers HOST:PORT --schema-id N",
        summary.images,
        summary.boxes,
        summary.products,
        summary.out.display(),
        summary.annotations.display()
    );
    Ok(ExitCode::SUCCESS)
}
