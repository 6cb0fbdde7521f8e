//! Parameter and FLOP counts of the fused models at 640x640 with 80 classes must match YOLOv9's
//! published figures (params within 0.1 %, GFLOPs within 1 %).

use kestrel_exporter::{ExportOptions, ModelConfig, WeightSource, export, summarize};

fn check(name: &str, params_m: f64, gflops: f64) {
    let cfg = ModelConfig::new(name, 80, 640).unwrap();
    let model = export(
        &cfg,
        &mut WeightSource::Random { seed: 0 },
        &ExportOptions::dynamic(80),
    )
    .unwrap();
    let s = summarize(&model);
    let p = s.params as f64 / 1e6;
    let g = s.flops.expect("flops") / 1e9;
    println!("{name}: {p:.3}M params, {g:.2} GFLOPs");
    assert!(
        (p - params_m).abs() / params_m < 1e-3,
        "{name}: {p:.4}M params, want {params_m}M"
    );
    assert!(
        (g - gflops).abs() / gflops < 1e-2,
        "{name}: {g:.3} GFLOPs, want {gflops}"
    );
}

#[test]
fn gelan_t() {
    check("gelan-t", 2.408, 9.82);
}

#[test]
fn gelan_s() {
    check("gelan-s", 7.106, 26.38);
}

#[test]
fn gelan_m() {
    check("gelan-m", 19.979, 76.32);
}

#[test]
fn gelan_c() {
    check("gelan-c", 25.289, 102.15);
}

#[test]
fn gelan_e() {
    check("gelan-e", 57.346, 188.95);
}

#[test]
fn gelan_c_seg() {
    // DESIGN.md: gelan-c-seg at 640 with 80 classes, 27.42M params / 144.6 GFLOPs.
    check("gelan-c-seg", 27.42, 144.6);
}
