//! The nvinfer configuration `kestrel export --deepstream` writes, read back with GLib's key-file
//! parser: the one DeepStream's nvinfer reads its configuration with.
#![allow(clippy::unwrap_used)]

use gst::glib;
use kestrel_exporter::deepstream::{NvinferConfig, PARSER_FUNCTION, nvinfer_config};

#[test]
fn the_nvinfer_config_parses_as_a_glib_key_file() {
    let config = NvinferConfig {
        onnx_file: "gelan-c-ds.onnx".into(),
        labels_file: "labels.txt".into(),
        num_classes: 80,
        batch_size: 4,
        precision: "int8".into(),
        iou_threshold: 0.45,
        score_threshold: 0.25,
        top_k: 300,
    };
    let text = nvinfer_config(&config).unwrap();
    let dir = kestrel_tests::scratch_dir("deepstream-config");
    let path = dir.join("config_infer_primary_kestrel.txt");
    std::fs::write(&path, &text).unwrap();
    let kf = glib::KeyFile::new();
    kf.load_from_file(&path, glib::KeyFileFlags::KEEP_COMMENTS)
        .unwrap();
    let int = |g: &str, k: &str| kf.integer(g, k).unwrap();
    let string = |g: &str, k: &str| kf.string(g, k).unwrap().to_string();
    assert_eq!(int("property", "network-mode"), 1);
    assert_eq!(int("property", "batch-size"), 4);
    assert_eq!(int("property", "num-detected-classes"), 80);
    assert_eq!(int("property", "cluster-mode"), 2);
    assert_eq!(int("property", "maintain-aspect-ratio"), 1);
    assert_eq!(int("property", "symmetric-padding"), 1);
    assert_eq!(string("property", "onnx-file"), "gelan-c-ds.onnx");
    assert_eq!(
        string("property", "model-engine-file"),
        "gelan-c-ds_b4_gpu0_int8.engine"
    );
    assert_eq!(string("property", "labelfile-path"), "labels.txt");
    assert_eq!(string("property", "parse-bbox-func-name"), PARSER_FUNCTION);
    let scale = kf.double("property", "net-scale-factor").unwrap();
    // The float32 nearest 1/255, as DeepStream configs write it.
    assert!((scale - 1.0 / 255.0).abs() < 1e-8);
    assert!((kf.double("class-attrs-all", "nms-iou-threshold").unwrap() - 0.45).abs() < 1e-6);
    assert!(
        (kf.double("class-attrs-all", "pre-cluster-threshold")
            .unwrap()
            - 0.25)
            .abs()
            < 1e-6
    );
    assert_eq!(int("class-attrs-all", "topk"), 300);
    // Every key carries a comment saying what it does.
    for key in kf.keys("property").unwrap().iter() {
        let comment = kf.comment(Some("property"), Some(key.as_str())).unwrap();
        assert!(!comment.trim().is_empty(), "{key} has no comment");
    }
    // A precision DeepStream does not know is refused.
    let bad = NvinferConfig {
        precision: "bf16".into(),
        ..config
    };
    let e = nvinfer_config(&bad).unwrap_err().to_string();
    assert!(e.contains("bf16") && e.contains("fp16"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}
