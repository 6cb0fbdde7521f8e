//! The CPU backend runs Q/DQ graphs (per-tensor activations, per-channel weights) and computes
//! what the quantization says: checked against the same arithmetic done by hand.

use kestrel_exporter::builder::GraphBuilder;
use kestrel_exporter::onnx::{self, pb};
use kestrel_exporter::shapes::Dim;
use kestrel_exporter::weights::SplitMix64;
use kestrel_runtime::engine::{BatchProfile, BuildOptions, build_engine};
use kestrel_tests::scratch_dir;

/// Round half to even, as ONNX QuantizeLinear does.
fn round_even(x: f32) -> f32 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

#[test]
fn cpu_backend_runs_qdq_models_exactly() {
    let (cin, cout, hw) = (3usize, 6usize, 8usize);
    let mut rng = SplitMix64::new(5);
    let act_scale = 1.0f32 / 127.0;
    let w_q: Vec<i8> = (0..cout * cin)
        .map(|_| (rng.next_u64() % 255) as i8)
        .collect();
    let w_scale: Vec<f32> = (0..cout).map(|c| 0.01 * (c + 1) as f32).collect();
    let bias: Vec<f32> = (0..cout).map(|c| c as f32 * 0.5 - 1.0).collect();

    let mut b = GraphBuilder::new();
    let x = b.input(
        "images",
        vec![
            Dim::Symbol("batch".into()),
            Dim::Fixed(cin as i64),
            Dim::Fixed(hw as i64),
            Dim::Fixed(hw as i64),
        ],
    );
    let s = b.const_f32("act.scale", &[], &[act_scale]);
    let z = b.const_i8("act.zero", &[], &[0]);
    let q = b
        .node1("QuantizeLinear", "act.q", &[&x, &s, &z], vec![])
        .unwrap();
    let dq = b
        .node1("DequantizeLinear", "act.dq", &[&q, &s, &z], vec![])
        .unwrap();
    let wq = b.const_i8("conv.weight_q", &[cout as i64, cin as i64, 1, 1], &w_q);
    let ws = b.const_f32("conv.weight_scale", &[cout as i64], &w_scale);
    let wz = b.const_i8("conv.weight_zero", &[cout as i64], &vec![0; cout]);
    let w = b
        .node1(
            "DequantizeLinear",
            "conv.weight_dq",
            &[&wq, &ws, &wz],
            vec![pb::AttributeProto::int("axis", 0)],
        )
        .unwrap();
    let bias_name = b.const_f32("conv.bias", &[cout as i64], &bias);
    let y = b
        .node1(
            "Conv",
            "conv",
            &[&dq, &w, &bias_name],
            vec![
                pb::AttributeProto::ints("kernel_shape", &[1, 1]),
                pb::AttributeProto::int("group", 1),
            ],
        )
        .unwrap();
    let shape = b.const_i64("flatten.shape", &[0, cout as i64, -1]);
    let out = b
        .node1("Reshape", "flatten", &[&y, &shape], vec![])
        .unwrap();
    b.rename_last_output(&out, "output0");
    b.output("output0", pb::data_type::FLOAT, "");
    let model = b.finish_model("qdq");
    let summary = kestrel_exporter::summarize(&model);
    assert_eq!(summary.qdq_pairs, 1);
    assert_eq!(summary.params, (cout * cin + cout) as u64);

    let dir = scratch_dir("qdq");
    let path = dir.join("qdq.onnx");
    onnx::write_model(&model, &path).unwrap();
    let options = BuildOptions {
        profile: BatchProfile {
            min: 1,
            opt: 2,
            max: 2,
        },
        ..Default::default()
    };
    let mut engine = build_engine(&path, &options).unwrap();
    let input: Vec<f32> = (0..2 * cin * hw * hw)
        .map(|_| rng.next_f32() * 1.2 - 0.1)
        .collect();
    let got = engine.run(&input, 2).unwrap().to_vec();

    let plane = hw * hw;
    for n in 0..2 {
        for c in 0..cout {
            for p in 0..plane {
                let mut acc = bias[c];
                for k in 0..cin {
                    let xv = input[(n * cin + k) * plane + p];
                    let xq = round_even(xv / act_scale).clamp(-128.0, 127.0) * act_scale;
                    acc += w_q[c * cin + k] as f32 * w_scale[c] * xq;
                }
                let v = got[(n * cout + c) * plane + p];
                assert!(
                    (v - acc).abs() < 1e-4,
                    "image {n} channel {c} pixel {p}: {v} vs {acc}"
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
