//! `kestrel inspect --qdq --svg` on a Q/DQ model: which convolutions are INT8, where a scale
//! breaks TensorRT's sharing rules, and a picture that an XML parser reads.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use kestrel_exporter::graph_view::{ConvPrecision, graph_svg, qdq_report};
use kestrel_exporter::quantize::{
    QuantizePolicy, head_output_convs, quantize_model_with, quantized_convs, sharing_groups,
};
use kestrel_exporter::{ExportOptions, ModelConfig, WeightSource, export, pb};
use kestrel_tests::{run_python, scratch_dir};

fn quantized_gelan_t(policy: &QuantizePolicy) -> (pb::ModelProto, pb::ModelProto) {
    let cfg = ModelConfig::new("gelan-t", 4, 64).unwrap();
    let model = export(
        &cfg,
        &mut WeightSource::Random { seed: 2 },
        &ExportOptions::dynamic(4),
    )
    .unwrap();
    let ranges: HashMap<String, f32> = sharing_groups(&model)
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, t)| (t, 0.5 + (i % 31) as f32 * 0.21))
        .chain([("images".to_string(), 1.0)])
        .collect();
    let q = quantize_model_with(&model, &ranges, policy).unwrap();
    (model, q)
}

#[test]
fn the_qdq_report_counts_int8_convolutions_and_finds_broken_scale_sharing() {
    // The head's last convolutions kept float, as the QAT recipe does: INT8 and float meet there.
    let plain = quantized_gelan_t(&QuantizePolicy::default()).0;
    let policy = QuantizePolicy {
        float_convs: head_output_convs(&plain).into_iter().collect(),
        ..Default::default()
    };
    let (float_model, q) = quantized_gelan_t(&policy);
    let report = qdq_report(&q);
    let want_int8 = quantized_convs(&float_model, &policy).len();
    assert_eq!(report.int8_convs, want_int8);
    let convs_total = float_model
        .graph()
        .node
        .iter()
        .filter(|n| n.op_type == "Conv")
        .count();
    assert_eq!(report.int8_convs + report.float_convs, convs_total);
    for c in &report.convs {
        let kept_float = policy.float_convs.contains(&c.name);
        if kept_float {
            assert_eq!(c.precision, ConvPrecision::Float, "{}", c.name);
        }
    }
    // The convolutions feeding the float head's last convolutions sit at a boundary.
    assert!(report.convs.iter().any(|c| c.precision_boundary));
    // quantize_model follows the sharing rules: nothing breaks them.
    assert!(
        report.sharing_breaks.is_empty(),
        "{:?}",
        report.sharing_breaks
    );
    assert!(report.scale_groups.iter().any(|g| g.tensors.len() > 1));

    // Change the scale of one Q/DQ pair around a concat: that concat breaks the sharing.
    let mut broken = q.clone();
    let graph = broken.graph.as_mut().unwrap();
    let quantize_of = |t: &str| {
        graph
            .node
            .iter()
            .find(|n| n.op_type == "QuantizeLinear" && n.input[0] == t)
            .cloned()
    };
    let (concat, q_node) = graph
        .node
        .iter()
        .filter(|n| n.op_type == "Concat")
        .find_map(|n| {
            let quantized: Vec<pb::NodeProto> = n
                .input
                .iter()
                .chain(&n.output)
                .filter_map(|t| quantize_of(t))
                .collect();
            (quantized.len() >= 2).then(|| (n.clone(), quantized[0].clone()))
        })
        .expect("a concat with two quantized tensors");
    let scale_name = q_node.input[1].clone();
    let scale = graph
        .initializer
        .iter_mut()
        .find(|t| t.name == scale_name)
        .unwrap();
    let old = scale.to_f32().unwrap()[0];
    *scale = pb::TensorProto::from_f32(&scale_name, &scale.dims.clone(), &[old * 2.0]);
    let report = qdq_report(&broken);
    assert!(
        report
            .sharing_breaks
            .iter()
            .any(|b| b.node == concat.name && b.op == "Concat"),
        "{:?}",
        report.sharing_breaks
    );

    // The picture: one box per convolution, by precision, readable by an XML parser.
    let dir = scratch_dir("inspect-svg");
    let path = dir.join("q.svg");
    std::fs::write(&path, graph_svg(&q, "gelan-t <Q/DQ> & co")).unwrap();
    let out = run_python("svg_summary.py", &[path.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let report = qdq_report(&q);
    assert_eq!(v["rects"]["conv int8"], report.int8_convs as u64, "{v}");
    assert_eq!(v["rects"]["conv float"], report.float_convs as u64, "{v}");
    assert_eq!(
        v["titles"],
        (report.int8_convs + report.float_convs) as u64,
        "{v}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_profile_picture_has_one_bar_per_layer_by_precision() {
    use kestrel_exporter::graph_view::{TimedLayer, profile_svg};
    let layers: Vec<TimedLayer> = [
        ("conv int8 (cuDNN fused)", 0.084),
        ("conv fp16 (cuDNN fused)", 0.090),
        ("pool", 0.011),
        ("concat/split copy", 0.004),
        ("conv int8", 0.047),
    ]
    .iter()
    .enumerate()
    .map(|(i, (kind, ms))| TimedLayer {
        kind: kind.to_string(),
        name: format!("model.{i}.out [8, 64, 80, 80] <&>"),
        ms: *ms,
    })
    .collect();
    let dir = scratch_dir("profile-svg");
    let path = dir.join("p.svg");
    std::fs::write(&path, profile_svg(&layers, "gelan-c int8 b8")).unwrap();
    let out = run_python("svg_summary.py", &[path.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["rects"]["layer int8"], 2, "{v}");
    assert_eq!(v["rects"]["layer float"], 1, "{v}");
    assert_eq!(v["rects"]["layer other"], 2, "{v}");
    let _ = std::fs::remove_dir_all(dir);
}
