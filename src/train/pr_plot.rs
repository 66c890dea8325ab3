//! The precision-recall plot of an evaluation, as a PNG a person reads to see where a model
//! loses precision: the all-classes curves at IoU .50 and .75, and per-class curves at .50.
//!
//! Drawn with plotters into an RGB buffer and encoded by the `image` crate. Text uses DejaVu
//! Sans, embedded from the `dejavu` crate: a fresh machine has no system fonts.

use std::path::Path;
use std::sync::OnceLock;

use image::RgbImage;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::coco_eval::{ClassCurve, CocoMetrics};

/// Width of the written PNG in pixels.
pub const PLOT_WIDTH: u32 = 1280;
/// Height of the written PNG in pixels.
pub const PLOT_HEIGHT: u32 = 800;
/// Classes drawn in colour and named in the legend (the best by AP50); the others are drawn
/// as thin grey lines under one legend entry, so 80 COCO classes stay readable.
pub const MAX_LEGEND_CLASSES: usize = 10;

/// Width of the legend panel right of the chart.
const LEGEND_WIDTH: u32 = 340;
/// The font family name the embedded font is registered under.
const FONT: &str = "sans-serif";
/// Tableau 10: distinct colours for the named classes.
const CLASS_COLOURS: [RGBColor; MAX_LEGEND_CLASSES] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const OTHER_CLASSES: RGBColor = RGBColor(205, 205, 205);

/// Why the plot could not be drawn or written.
#[derive(Debug, thiserror::Error)]
pub enum PrPlotError {
    /// plotters failed to draw (a bug rather than bad input; please report it).
    #[error("cannot draw the precision-recall plot: {0}")]
    Draw(String),
    /// The PNG could not be written.
    #[error("cannot write the precision-recall plot {path}: {source}; check that the folder exists and is writable")]
    Write {
        /// The PNG's path.
        path: std::path::PathBuf,
        /// The encoder's or file system's error.
        source: image::ImageError,
    },
}

/// Draws the plot and writes it as a PNG of [`PLOT_WIDTH`] × [`PLOT_HEIGHT`] pixels.
pub fn write_pr_plot(metrics: &CocoMetrics, path: &Path) -> Result<(), PrPlotError> {
    render_pr_plot(metrics)?
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|source| PrPlotError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// Draws the plot into an image (for callers that embed it elsewhere).
pub fn render_pr_plot(metrics: &CocoMetrics) -> Result<RgbImage, PrPlotError> {
    register_embedded_font()?;
    let mut buffer = vec![0u8; (PLOT_WIDTH * PLOT_HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (PLOT_WIDTH, PLOT_HEIGHT)).into_drawing_area();
        draw(&root, metrics).map_err(|e| PrPlotError::Draw(e.to_string()))?;
        root.present().map_err(|e| PrPlotError::Draw(e.to_string()))?;
    }
    RgbImage::from_raw(PLOT_WIDTH, PLOT_HEIGHT, buffer)
        .ok_or_else(|| PrPlotError::Draw("the pixel buffer has the wrong size".into()))
}

/// Registers DejaVu Sans once per process as plotters' "sans-serif".
fn register_embedded_font() -> Result<(), PrPlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && register_font(FONT, FontStyle::Bold, dejavu::sans::bold()).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(PrPlotError::Draw("the embedded DejaVu Sans font did not load".into()))
    }
}

/// One line of the plot and its legend entry.
struct Line {
    label: String,
    colour: RGBColor,
    width: u32,
    dashed: bool,
    /// (recall, precision) points where precision is defined.
    points: Vec<(f64, f64)>,
}

type DrawResult = Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

fn draw(root: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>, metrics: &CocoMetrics) -> DrawResult {
    root.fill(&WHITE)?;
    let (chart_area, legend_area) = root.split_horizontally(PLOT_WIDTH - LEGEND_WIDTH);
    let lines = lines(metrics);

    let title = format!(
        "Precision-recall: {} images, {} objects, {} detections (all areas, 100 per image)",
        metrics.counts.images,
        metrics.counts.annotations - metrics.counts.crowd_annotations,
        metrics.counts.detections
    );
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(title, (FONT, 20).into_font().style(FontStyle::Bold))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..1f64, 0f64..1.02f64)?;
    chart
        .configure_mesh()
        .x_desc("Recall")
        .y_desc("Precision")
        .axis_desc_style((FONT, 20))
        .label_style((FONT, 16))
        .x_labels(11)
        .y_labels(11)
        .x_label_formatter(&|v| format!("{v:.1}"))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .light_line_style(TRANSPARENT)
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()?;

    // Background classes first, then named classes, then the all-classes curves on top.
    for line in lines.iter().rev() {
        let style = ShapeStyle::from(&line.colour).stroke_width(line.width);
        if line.dashed {
            chart.draw_series(DashedLineSeries::new(line.points.iter().copied(), 10, 6, style))?;
        } else {
            chart.draw_series(LineSeries::new(line.points.iter().copied(), style))?;
        }
    }
    if lines.is_empty() {
        chart.draw_series(std::iter::once(Text::new(
            "no ground truth: nothing to plot",
            (0.3, 0.5),
            (FONT, 22).into_font(),
        )))?;
    }
    draw_legend(&legend_area, &lines)
}

/// The lines, in legend order: all classes at .50 and .75, the best classes by AP50, then one
/// entry for the rest.
fn lines(metrics: &CocoMetrics) -> Vec<Line> {
    let recall = &metrics.pr_curves.recall;
    let points = |precision: &[f64]| -> Vec<(f64, f64)> {
        recall
            .iter()
            .zip(precision)
            .filter(|(_, &p)| p > -1.0)
            .map(|(&r, &p)| (r, p))
            .collect()
    };
    let mut out = Vec::new();
    let s = &metrics.stats;
    for (curve, label, dashed) in [
        (
            &metrics.pr_curves.iou50,
            format!("all classes, IoU .50 (AP50 {:.3})", s.ap50),
            false,
        ),
        (
            &metrics.pr_curves.iou75,
            format!("all classes, IoU .75 (AP75 {:.3})", s.ap75),
            true,
        ),
    ] {
        let pts = points(&curve.all_classes);
        if !pts.is_empty() {
            out.push(Line {
                label,
                colour: BLACK,
                width: 3,
                dashed,
                points: pts,
            });
        }
    }
    let mut classes: Vec<&ClassCurve> = metrics.pr_curves.iou50.classes.iter().collect();
    // Best first; ties by category id (the curves are sorted by id and the sort is stable).
    classes.sort_by(|a, b| b.ap.total_cmp(&a.ap));
    let (named, rest) = classes.split_at(classes.len().min(MAX_LEGEND_CLASSES));
    for (c, colour) in named.iter().zip(CLASS_COLOURS) {
        out.push(Line {
            label: format!("{} (AP50 {:.3})", truncate(&c.name, 22), c.ap),
            colour,
            width: 2,
            dashed: false,
            points: points(&c.precision),
        });
    }
    for (i, c) in rest.iter().enumerate() {
        out.push(Line {
            // Only the first of the grey lines carries the legend entry.
            label: if i == 0 {
                format!("{} more classes, IoU .50", rest.len())
            } else {
                String::new()
            },
            colour: OTHER_CLASSES,
            width: 1,
            dashed: false,
            points: points(&c.precision),
        });
    }
    out
}

fn truncate(name: &str, max_chars: usize) -> String {
    if name.chars().count() <= max_chars {
        name.to_string()
    } else {
        let mut s: String = name.chars().take(max_chars - 1).collect();
        s.push('…');
        s
    }
}

fn draw_legend(area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>, lines: &[Line]) -> DrawResult {
    let font = (FONT, 16).into_font();
    let mut y = 70;
    area.draw(&Text::new(
        "Legend",
        (10, y - 32),
        (FONT, 18).into_font().style(FontStyle::Bold),
    ))?;
    let mut named_classes_header = false;
    for line in lines.iter().filter(|l| !l.label.is_empty()) {
        if line.width < 3 && !named_classes_header {
            named_classes_header = true;
            y += 12;
            area.draw(&Text::new("per class, IoU .50:", (10, y), font.clone()))?;
            y += 26;
        }
        let style = ShapeStyle::from(&line.colour).stroke_width(line.width);
        let sample = if line.dashed {
            vec![
                PathElement::new(vec![(10, y + 9), (22, y + 9)], style),
                PathElement::new(vec![(30, y + 9), (42, y + 9)], style),
            ]
        } else {
            vec![PathElement::new(vec![(10, y + 9), (42, y + 9)], style)]
        };
        for element in sample {
            area.draw(&element)?;
        }
        area.draw(&Text::new(line.label.clone(), (52, y), font.clone()))?;
        y += 26;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::coco_eval::{evaluate, Annotation, Category, DetectionResult, GroundTruth, Image};

    /// `classes` classes, one object each on one image; class k is found with score k.
    fn metrics(classes: i64, with_ground_truth: bool) -> CocoMetrics {
        let categories = (1..=classes)
            .map(|id| Category {
                id,
                name: format!("class {id}"),
            })
            .collect();
        let bbox = [10.0, 10.0, 40.0, 40.0];
        let annotations = (1..=classes)
            .filter(|_| with_ground_truth)
            .map(|id| Annotation {
                id,
                image_id: 1,
                category_id: id,
                bbox,
                area: 1600.0,
                iscrowd: false,
            })
            .collect();
        let image = Image {
            id: 1,
            width: 64,
            height: 64,
        };
        let gt = GroundTruth::new(vec![image], categories, annotations).unwrap();
        let dets: Vec<DetectionResult> = (1..=classes)
            .map(|id| DetectionResult {
                image_id: 1,
                category_id: id,
                bbox,
                score: id as f64 / 100.0,
            })
            .collect();
        evaluate(&gt, &dets).unwrap()
    }

    #[test]
    fn legend_names_the_best_classes_and_groups_the_rest() {
        let lines = lines(&metrics(15, true));
        let labels: Vec<&str> = lines
            .iter()
            .map(|l| l.label.as_str())
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len(), 2 + 15, "every class is drawn");
        assert_eq!(labels.len(), 2 + MAX_LEGEND_CLASSES + 1, "{labels:?}");
        assert!(labels[0].starts_with("all classes, IoU .50"));
        assert!(labels[1].starts_with("all classes, IoU .75"));
        assert_eq!(labels.last(), Some(&"5 more classes, IoU .50"));
    }

    #[test]
    fn renders_with_and_without_ground_truth() {
        for with_gt in [true, false] {
            let image = render_pr_plot(&metrics(3, with_gt)).unwrap();
            assert_eq!(image.dimensions(), (PLOT_WIDTH, PLOT_HEIGHT));
            let dark = image.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
            assert!(dark > 500, "text and axes are drawn ({dark} dark pixels)");
        }
        assert!(lines(&metrics(3, false)).is_empty());
    }
}
