//! Line charts as PNGs, so a run can be judged at a glance: the trainer's loss terms and mAP per
//! epoch and its precision-recall curves, and the soak runs' memory over time.

use std::path::Path;

use ab_glyph::{FontVec, PxScale};
use image::{Rgb, RgbImage};
use imageproc::drawing::{draw_line_segment_mut, draw_text_mut};

use crate::error::{Error, Result};

/// One named series of values, one per step of the x axis (epoch, sample).
pub struct Series<'a> {
    pub name: &'a str,
    pub values: &'a [f64],
    pub colour: [u8; 3],
}

const W: u32 = 900;
const H: u32 = 450;
const MARGIN: f32 = 60.0;

/// Draw `series` against the epoch number and write a PNG to `path`. Without a font the curves
/// are drawn without labels.
pub fn curves(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    let n = series.iter().map(|s| s.values.len()).max().unwrap_or(0);
    chart(path, title, series, &format!("epoch {n}"), None, false)
}

/// [`curves`] with the y axis spanning only the data (plus a tenth of its span each side), for
/// values that differ little, such as mAP across fine-tuning epochs.
pub fn curves_zoomed(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    let n = series.iter().map(|s| s.values.len()).max().unwrap_or(0);
    let (lo, hi) = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    let range = lo.is_finite().then(|| {
        let pad = ((hi - lo) * 0.1).max(1e-3);
        (lo - pad, hi + pad)
    });
    chart(path, title, series, &format!("epoch {n}"), range, false)
}

/// Precision-recall curves: each series holds precision at evenly spaced recall from 0 to 1
/// (pycocotools' 101 points), drawn on fixed [0, 1] axes with the legend as a column.
pub fn pr_curves(path: &Path, title: &str, series: &[Series]) -> Result<()> {
    chart(path, title, series, "recall 0 → 1", Some((0.0, 1.0)), true)
}

/// [`curves`] with the x axis named `x_label` (its unit and extent, e.g. "1800 s").
pub fn curves_labelled(path: &Path, title: &str, series: &[Series], x_label: &str) -> Result<()> {
    chart(path, title, series, x_label, None, false)
}

/// Line chart of `series` against their index; `range` fixes the y axis (else it spans the data
/// and 0).
fn chart(
    path: &Path,
    title: &str,
    series: &[Series],
    x_label: &str,
    range: Option<(f64, f64)>,
    legend_column: bool,
) -> Result<()> {
    let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
    let n = series.iter().map(|s| s.values.len()).max().unwrap_or(0);
    let finite = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let (lo, hi) = match range {
        Some(r) => r,
        None if lo.is_finite() => (lo.min(0.0), hi.max(lo + 1e-9)),
        None => (0.0, 1.0),
    };
    let (x0, x1, y0, y1) = (MARGIN, W as f32 - 20.0, H as f32 - MARGIN, 40.0);
    let grey = Rgb([120, 120, 120]);
    draw_line_segment_mut(&mut img, (x0, y0), (x1, y0), grey);
    draw_line_segment_mut(&mut img, (x0, y0), (x0, y1), grey);
    let x = |i: usize| x0 + (x1 - x0) * i as f32 / (n.max(2) - 1) as f32;
    let y = |v: f64| y0 - (y0 - y1) * ((v - lo) / (hi - lo)) as f32;
    for s in series {
        let colour = Rgb(s.colour);
        // Missing values (NaN: epochs without validation) are bridged from point to point.
        let points: Vec<(f32, f32)> = s
            .values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(|(i, &v)| (x(i), y(v)))
            .collect();
        for w in points.windows(2) {
            // Two pixels thick.
            for d in [0.0, 1.0] {
                draw_line_segment_mut(&mut img, (w[0].0, w[0].1 + d), (w[1].0, w[1].1 + d), colour);
            }
        }
        if points.len() == 1 || points.len() < s.values.len() / 2 {
            // Sparse points (a single one, or validation every few epochs) also get a marker.
            for &(px, py) in &points {
                for d in [-1.0, 0.0, 1.0] {
                    draw_line_segment_mut(&mut img, (px - 3.0, py + d), (px + 3.0, py + d), colour);
                }
            }
        }
    }
    if let Some(font) =
        crate::labels::label_font_bytes().and_then(|b| FontVec::try_from_vec(b).ok())
    {
        let scale = PxScale::from(16.0);
        let black = Rgb([0, 0, 0]);
        draw_text_mut(
            &mut img,
            black,
            MARGIN as i32,
            10,
            PxScale::from(20.0),
            &font,
            title,
        );
        draw_text_mut(
            &mut img,
            black,
            5,
            y1 as i32 - 8,
            scale,
            &font,
            &format!("{hi:.3}"),
        );
        draw_text_mut(
            &mut img,
            black,
            5,
            y0 as i32 - 8,
            scale,
            &font,
            &format!("{lo:.3}"),
        );
        draw_text_mut(
            &mut img,
            black,
            x1 as i32 - 110,
            y0 as i32 + 10,
            scale,
            &font,
            x_label,
        );
        for (k, s) in series.iter().enumerate() {
            // A row in the top margin, right of the title, clear of the curves; or a column in
            // the lower left, where precision-recall curves do not go.
            let (lx, ly) = if legend_column {
                (
                    MARGIN as i32 + 20,
                    y0 as i32 - 30 - 22 * (series.len() - 1 - k) as i32,
                )
            } else {
                (440 + 150 * k as i32, 12)
            };
            for d in 0..3 {
                draw_line_segment_mut(
                    &mut img,
                    (lx as f32, (ly + 8 + d) as f32),
                    (lx as f32 + 24.0, (ly + 8 + d) as f32),
                    Rgb(s.colour),
                );
            }
            draw_text_mut(&mut img, black, lx + 30, ly, scale, &font, s.name);
        }
    }
    img.save(path).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        message: format!("writing the chart: {e}"),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn curves_are_drawn_in_their_colours() {
        let path = std::env::temp_dir().join(format!("kestrel-plot-{}.png", std::process::id()));
        let falling = [3.0, 2.0, 1.5, 1.2];
        let flat = [0.5, 0.5, 0.5, f64::NAN];
        curves(
            &path,
            "losses",
            &[
                Series {
                    name: "box",
                    values: &falling,
                    colour: [220, 30, 30],
                },
                Series {
                    name: "cls",
                    values: &flat,
                    colour: [30, 30, 220],
                },
            ],
        )
        .unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (W, H));
        let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
        assert!(count([220, 30, 30]) > 500 && count([30, 30, 220]) > 300);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn sparse_points_are_joined_across_the_gaps() {
        // Validation every fourth epoch: NaN in between must not hide the curve.
        let path =
            std::env::temp_dir().join(format!("kestrel-plot-gaps-{}.png", std::process::id()));
        let map = [
            f64::NAN,
            f64::NAN,
            f64::NAN,
            0.3,
            f64::NAN,
            f64::NAN,
            f64::NAN,
            0.6,
        ];
        curves(
            &path,
            "mAP",
            &[Series {
                name: "mAP50-95",
                values: &map,
                colour: [10, 160, 10],
            }],
        )
        .unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        // A line from epoch 4 to epoch 8: green pixels across the right half of the plot.
        let columns = (0..W)
            .filter(|&x| (0..H).any(|y| img.get_pixel(x, y).0 == [10, 160, 10]))
            .count();
        assert!(columns > 300, "{columns}");
        let _ = std::fs::remove_file(&path);

        // Precision-recall curves: fixed [0, 1] axes, one series per class.
        let flat = vec![0.5; 101];
        pr_curves(
            &path,
            "pr",
            &[Series {
                name: "a",
                values: &flat,
                colour: [200, 0, 0],
            }],
        )
        .unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        // Precision 0.5 is drawn halfway up the plot area (y0 = H - MARGIN, y1 = 40).
        let mid = ((H as f32 - MARGIN + 40.0) / 2.0) as u32;
        let x = W / 2;
        assert!(
            (mid - 2..=mid + 2).any(|y| img.get_pixel(x, y).0 == [200, 0, 0]),
            "no red at ({x}, {mid})"
        );
        let _ = std::fs::remove_file(path);
    }
}
