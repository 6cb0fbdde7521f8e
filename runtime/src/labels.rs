//! What every picture of detections shares (the CLI's annotated images, the GStreamer overlay,
//! the trainer's plots): a colour per class, the class-names file format and the label font.

/// Fonts tried for labels, in order (Debian's fonts-dejavu-core, installed by scripts/setup.sh).
pub const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
];

/// The bytes of the label font: `$KESTREL_FONT` when set and readable, else the first of
/// [`FONT_PATHS`] found; `None` when there is none (pictures are then drawn without text).
pub fn label_font_bytes() -> Option<Vec<u8>> {
    let env = std::env::var("KESTREL_FONT").ok();
    env.iter()
        .map(String::as_str)
        .chain(FONT_PATHS)
        .find_map(|p| std::fs::read(p).ok())
}

/// A distinct, stable RGB colour for a class: hues spaced by the golden angle.
pub fn class_colour(class_id: usize) -> [u8; 3] {
    let h = (class_id as f32 * 137.507_77) % 360.0;
    let (r, g, b) = hsv_to_rgb(h, 0.85, 0.95);
    let to = |u: f32| (u * 255.0).round() as u8;
    [to(r), to(g), to(b)]
}

/// RGB in [0, 1] of hue `h` (degrees, 0–360), saturation `s` and value `v` (0–1). Shared by the
/// class colours and the trainer's HSV augmentation (per pixel there, hence `inline`).
#[inline]
pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let c = v * s;
    let x = c * (1.0 - ((h / 60.0).rem_euclid(2.0) - 1.0).abs());
    let (r, g, b) = match (h / 60.0) as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    (r + m, g + m, b + m)
}

/// Class names from a names file: one per line, surrounding blanks trimmed, empty lines skipped.
pub fn parse_class_names(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbouring_classes_differ_and_names_skip_blank_lines() {
        for c in 0..80 {
            assert_ne!(class_colour(c), class_colour(c + 1));
        }
        assert_eq!(parse_class_names(" cat \n\n dog\n"), vec!["cat", "dog"]);
    }
}
