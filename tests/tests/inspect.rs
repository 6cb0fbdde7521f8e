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

/// `kestrel inspect --layers`: the cuda engine's steps of a Q/DQ gelan-t, listed without a GPU.
/// Every INT8 convolution reads int8 and carries its Conv, its activation's Q/DQ and its SiLU;
/// the quantizations and layout changes the engine inserts name no ONNX node; recorded choices
/// land on the steps they were made for.
#[test]
fn engine_layers_name_their_onnx_nodes_precisions_and_algorithms() {
    use kestrel_runtime::cuda::layers::engine_layers;
    use kestrel_runtime::engine::Precision;
    let (float_model, q) = quantized_gelan_t(&QuantizePolicy::default());
    let want_int8 = quantized_convs(&float_model, &QuantizePolicy::default()).len();
    let rows = engine_layers(&q, Precision::Int8, &[1, 4], &serde_json::Value::Null).unwrap();
    let int8: Vec<_> = rows.iter().filter(|r| r.kind == "conv int8").collect();
    // The rest of the quantized convolutions run in fp16 after a fake quantization (the engine
    // keeps some small deep layers float at 64 px), and the first one (3 input channels) as the
    // stem kernel, with the input's layout pass and Q/DQ pair folded in.
    let fake = rows.iter().filter(|r| r.kind == "fake quantize").count();
    let stem: Vec<_> = rows.iter().filter(|r| r.kind == "stem conv").collect();
    assert_eq!(stem.len(), 1, "{rows:?}");
    assert_eq!(stem[0].precision_out, "int8", "{:?}", stem[0]);
    for op in ["(Conv)", "(DequantizeLinear)", "(QuantizeLinear)"] {
        assert!(
            stem[0].sources.iter().any(|s| s.ends_with(op)),
            "{op}: {:?}",
            stem[0]
        );
    }
    assert!(!int8.is_empty());
    assert_eq!(int8.len() + fake + stem.len(), want_int8);
    for r in &int8 {
        assert_eq!(r.precision_in, "int8", "{r:?}");
        // int8 where the next layer reads it quantized (the quantization fused in), else fp16.
        assert!(matches!(r.precision_out, "int8" | "fp16"), "{r:?}");
        for op in ["(Conv)", "(DequantizeLinear)", "(QuantizeLinear)"] {
            assert!(r.sources.iter().any(|s| s.ends_with(op)), "{op}: {r:?}");
        }
        // Shapes per bucket: the batch leads.
        assert_eq!(r.shapes[&1][0], 1);
        assert_eq!(r.shapes[&4][0], 4);
        assert_eq!(r.shapes[&1][1..], r.shapes[&4][1..]);
    }
    // The SiLU of a hidden convolution is fused into it.
    assert!(
        int8.iter()
            .any(|r| r.sources.iter().any(|s| s.ends_with("(Sigmoid)"))),
        "{int8:?}"
    );
    let inserted: Vec<_> = rows.iter().filter(|r| r.sources.is_empty()).collect();
    assert!(inserted.iter().any(|r| r.kind == "quantize"));
    assert!(
        inserted
            .iter()
            .all(|r| { matches!(r.kind, "quantize" | "input to NHWC" | "NHWC to row-major") })
    );
    // Every ONNX Conv is carried out by exactly one step.
    let convs = q
        .graph()
        .node
        .iter()
        .filter(|n| n.op_type == "Conv")
        .count();
    let carried: usize = rows
        .iter()
        .map(|r| r.sources.iter().filter(|s| s.ends_with("(Conv)")).count())
        .sum();
    assert_eq!(carried, convs);

    // Recorded choices (as a cuda engine file holds them) map onto the convolutions in order,
    // for the steps of the engine that recorded them (here with the stem kernel, as above).
    let float_convs: Vec<usize> = rows
        .iter()
        .filter(|r| r.kind.starts_with("conv") && r.kind != "conv int8")
        .map(|r| r.index)
        .collect();
    let fused_step = int8[1].index;
    let choices = serde_json::json!({
        "stem_conv": true,
        "conv_algorithms": {"1": (0..float_convs.len()).collect::<Vec<_>>()},
        "int8_tiles": {"1": vec!["64x64"; int8.len()]},
        "fused_convolutions": {"1": {fused_step.to_string(): "CUDNN_HEUR_MODE_A #3"}},
    });
    let rows = engine_layers(&q, Precision::Int8, &[1], &choices).unwrap();
    if let Some(&last) = float_convs.last() {
        assert_eq!(
            rows[last].algorithms[&1],
            format!("cuDNN algorithm {}", float_convs.len() - 1)
        );
    }
    assert_eq!(rows[int8[0].index].algorithms[&1], "int8 tile 64x64");
    assert_eq!(
        rows[fused_step].algorithms[&1],
        "cuDNN fused graph: CUDNN_HEUR_MODE_A #3"
    );
    assert!(
        rows.iter()
            .filter(|r| r.kind == "pool")
            .all(|r| r.algorithms.is_empty())
    );
}
