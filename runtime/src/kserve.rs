//! The KServe v2 inference request as it arrives over HTTP, without the HTTP: a JSON body, or a
//! JSON header followed by raw tensor bytes (the binary tensor data extension, whose JSON length
//! is the `Inference-Header-Content-Length` header), checked against the one image input a
//! Kestrel model has.
//!
//! The service (`kestrel serve`) parses every `/v2/models/{name}/infer` body with
//! [`parse_infer_request`]; it lives in this library so that it can be unit-tested and fuzzed
//! (`fuzz/fuzz_targets/kserve_request.rs`) without a server. [`InferRequest::encode`] writes the
//! same wire format, for clients, tests and the fuzzer's seed corpus.

use std::time::Duration;

use serde::Deserialize;

/// The HTTP header of the binary tensor data extension (lower case, as `http` stores names): the
/// length in bytes of the JSON part at the start of the body.
pub const BINARY_HEADER: &str = "inference-header-content-length";

/// What a request must fit: the served model's input and outputs and the server's batch limit.
#[derive(Debug, Clone, Copy)]
pub struct ModelSignature<'a> {
    /// The model's input tensor name (`images` for exported GELAN models).
    pub input_name: &'a str,
    /// Input height and width, pixels (the input is FP32 `[batch, 3, H, W]`).
    pub input_hw: [usize; 2],
    /// The most images one request may carry (the model config's `max_batch_size`).
    pub max_batch_size: usize,
    /// The model's output tensor names, in order (`output0`, then a segmentation model's
    /// prototypes).
    pub output_names: &'a [&'a str],
}

impl ModelSignature<'_> {
    /// FP32 values of one image of input: 3 × H × W.
    pub fn values_per_image(&self) -> usize {
        3 * self.input_hw[0] * self.input_hw[1]
    }
}

/// A request that fits its model: what the service queues on the model's batcher.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    /// The client's request id, echoed in the response.
    pub id: Option<String>,
    /// Images in the batch (1 ≤ images ≤ `max_batch_size`).
    pub images: usize,
    /// The input tensor, row-major `[images, 3, H, W]`: `images × 3 × H × W` values.
    pub input: Vec<f32>,
    /// The outputs asked for, by name, in the request's order (each one of the model's outputs);
    /// empty means all of them.
    pub outputs: Vec<String>,
    /// Whether the response carries its tensors as binary data (an output's
    /// `parameters.binary_data` or the request's `parameters.binary_data_output`).
    pub binary_output: bool,
    /// The request's own deadline (Triton's `parameters.timeout`, whole microseconds).
    pub timeout: Option<Duration>,
}

/// Why a request body was refused. Every variant is the client's mistake (HTTP 400); the message
/// says what to send instead.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// The `Inference-Header-Content-Length` header is not a whole number.
    #[error("Inference-Header-Content-Length is not a number")]
    HeaderLengthNotANumber,
    /// The JSON length given is longer than the body, bytes.
    #[error("Inference-Header-Content-Length {length} exceeds the body ({body} bytes)")]
    HeaderLengthTooLong { length: usize, body: usize },
    /// The JSON part does not parse as a request (the parser's message).
    #[error("the inference request is not valid JSON: {0}")]
    Json(String),
    /// Not exactly one input tensor.
    #[error("give exactly one input, {input} (FP32 [batch, 3, {h}, {w}])")]
    InputCount { input: String, h: usize, w: usize },
    /// The input is not the model's.
    #[error("no input {given:?}: the model's input is {input} (FP32 [batch, 3, {h}, {w}])")]
    InputName {
        given: String,
        input: String,
        h: usize,
        w: usize,
    },
    /// The input's datatype is not FP32.
    #[error("input {input} is {datatype}: the model takes FP32")]
    Datatype { input: String, datatype: String },
    /// The input's shape is not `[batch ≥ 1, 3, H, W]`.
    #[error("input shape {shape:?}: the model takes [batch, 3, {h}, {w}]")]
    Shape { shape: Vec<i64>, h: usize, w: usize },
    /// More images than `max_batch_size`.
    #[error(
        "a batch of {images} images exceeds max_batch_size {max}: send at most {max} per request"
    )]
    BatchTooLarge { images: usize, max: usize },
    /// `binary_data_size` is not the tensor's size, or longer than the bytes after the JSON.
    #[error(
        "binary input {input}: {size} bytes given, [{images}, 3, {h}, {w}] FP32 needs {needed}{}",
        if *short { " (and the body is shorter)" } else { "" }
    )]
    BinarySize {
        input: String,
        size: usize,
        images: usize,
        h: usize,
        w: usize,
        needed: usize,
        short: bool,
    },
    /// A JSON tensor holds something that is not a number (the value, as JSON).
    #[error("tensor data holds {0}, not a number")]
    NotANumber(String),
    /// Neither `data` nor `parameters.binary_data_size`.
    #[error("input {input} has neither data nor parameters.binary_data_size")]
    NoData { input: String },
    /// The JSON tensor's number of values does not match its shape.
    #[error("input {input} holds {values} values; shape {shape:?} needs {needed}")]
    ValueCount {
        input: String,
        values: usize,
        shape: Vec<i64>,
        needed: usize,
    },
    /// An output the model does not have (`outputs`: the model's, comma-separated).
    #[error("no output {given:?}: the model's outputs are {outputs}")]
    UnknownOutput { given: String, outputs: String },
    /// `parameters.timeout` is not a whole number of microseconds (the value, as JSON).
    #[error("parameters.timeout {0}: give microseconds as a whole number")]
    Timeout(String),
}

#[derive(Debug, Deserialize)]
struct WireRequest {
    id: Option<String>,
    inputs: Vec<WireInput>,
    #[serde(default)]
    outputs: Vec<WireOutput>,
    #[serde(default)]
    parameters: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct WireInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: serde_json::Map<String, serde_json::Value>,
    data: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct WireOutput {
    name: String,
    #[serde(default)]
    parameters: serde_json::Map<String, serde_json::Value>,
}

/// Append the numbers of a JSON tensor (flat or nested, row-major) to `out`. The nesting depth is
/// bounded by serde_json's recursion limit (128), so this recursion is too.
fn flatten(v: &serde_json::Value, out: &mut Vec<f32>) -> Result<(), RequestError> {
    match v {
        serde_json::Value::Array(items) => {
            for i in items {
                flatten(i, out)?;
            }
            Ok(())
        }
        serde_json::Value::Number(n) => {
            out.push(n.as_f64().unwrap_or(f64::NAN) as f32);
            Ok(())
        }
        other => Err(RequestError::NotANumber(other.to_string())),
    }
}

/// Parse and check an infer request body for `model`. `binary_header`: the raw value of the
/// `Inference-Header-Content-Length` header when the request has one (then the body is that many
/// bytes of JSON followed by the tensor bytes, little-endian FP32).
pub fn parse_infer_request(
    body: &[u8],
    binary_header: Option<&[u8]>,
    model: &ModelSignature<'_>,
) -> Result<InferRequest, RequestError> {
    let (json_part, binary) = match binary_header {
        Some(v) => {
            // What `http::HeaderValue::to_str` accepts (visible ASCII and tabs), then a number.
            let n: usize = std::str::from_utf8(v)
                .ok()
                .filter(|s| s.bytes().all(|b| b == b'\t' || (32..127).contains(&b)))
                .and_then(|s| s.trim().parse().ok())
                .ok_or(RequestError::HeaderLengthNotANumber)?;
            if n > body.len() {
                return Err(RequestError::HeaderLengthTooLong {
                    length: n,
                    body: body.len(),
                });
            }
            body.split_at(n)
        }
        None => (body, &body[..0]),
    };
    let request: WireRequest =
        serde_json::from_slice(json_part).map_err(|e| RequestError::Json(e.to_string()))?;
    let [h, w] = model.input_hw;
    let [input] = request.inputs.as_slice() else {
        return Err(RequestError::InputCount {
            input: model.input_name.to_string(),
            h,
            w,
        });
    };
    if input.name != model.input_name {
        return Err(RequestError::InputName {
            given: input.name.clone(),
            input: model.input_name.to_string(),
            h,
            w,
        });
    }
    if input.datatype != "FP32" {
        return Err(RequestError::Datatype {
            input: input.name.clone(),
            datatype: input.datatype.clone(),
        });
    }
    let images = match input.shape.as_slice() {
        [b, 3, ih, iw] if *b >= 1 && *ih == h as i64 && *iw == w as i64 => *b as usize,
        other => {
            return Err(RequestError::Shape {
                shape: other.to_vec(),
                h,
                w,
            });
        }
    };
    let max = model.max_batch_size;
    if images > max {
        return Err(RequestError::BatchTooLarge { images, max });
    }
    // `images` ≤ max_batch_size, so this allocation is bounded by the server's configuration.
    let want = images * model.values_per_image();
    let mut values = Vec::with_capacity(want);
    if let Some(size) = input
        .parameters
        .get("binary_data_size")
        .and_then(serde_json::Value::as_u64)
    {
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if size != want * 4 || size > binary.len() {
            return Err(RequestError::BinarySize {
                input: input.name.clone(),
                size,
                images,
                h,
                w,
                needed: want * 4,
                short: size > binary.len(),
            });
        }
        values.extend(
            binary[..size]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    } else if let Some(data) = &input.data {
        flatten(data, &mut values)?;
    } else {
        return Err(RequestError::NoData {
            input: input.name.clone(),
        });
    }
    if values.len() != want {
        return Err(RequestError::ValueCount {
            input: input.name.clone(),
            values: values.len(),
            shape: input.shape.clone(),
            needed: want,
        });
    }
    for o in &request.outputs {
        if !model.output_names.contains(&o.name.as_str()) {
            return Err(RequestError::UnknownOutput {
                given: o.name.clone(),
                outputs: model.output_names.join(", "),
            });
        }
    }
    let binary_output = request.outputs.iter().any(|o| {
        o.parameters
            .get("binary_data")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
    }) || request
        .parameters
        .get("binary_data_output")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    // Triton's request parameter: microseconds.
    let timeout = match request.parameters.get("timeout") {
        None => None,
        Some(v) => Some(Duration::from_micros(
            v.as_u64()
                .ok_or_else(|| RequestError::Timeout(v.to_string()))?,
        )),
    };
    Ok(InferRequest {
        id: request.id,
        images,
        input: values,
        outputs: request.outputs.into_iter().map(|o| o.name).collect(),
        binary_output,
        timeout,
    })
}

/// How [`InferRequest::encode`] carries the input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorEncoding {
    /// A flat JSON list of numbers (non-finite values have no JSON form and become `null`).
    Json,
    /// The binary tensor data extension: little-endian FP32 bytes after the JSON part.
    Binary,
}

/// A request body and, for binary tensors, the `Inference-Header-Content-Length` to send with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRequest {
    pub body: Vec<u8>,
    /// The JSON part's length, bytes (binary tensors only).
    pub header_length: Option<usize>,
}

impl InferRequest {
    /// This request on the wire for `model` (its input's name and size), the tensor carried as
    /// `encoding` says: what a KServe v2 client sends, and what [`parse_infer_request`] reads back
    /// (exactly, for binary tensors and for finite values in JSON). A timeout is written in whole
    /// microseconds.
    pub fn encode(&self, model: &ModelSignature<'_>, encoding: TensorEncoding) -> EncodedRequest {
        let [h, w] = model.input_hw;
        let mut input = serde_json::json!({
            "name": model.input_name,
            "shape": [self.images, 3, h, w],
            "datatype": "FP32",
        });
        match encoding {
            TensorEncoding::Json => input["data"] = serde_json::json!(self.input),
            TensorEncoding::Binary => {
                input["parameters"] =
                    serde_json::json!({ "binary_data_size": self.input.len() * 4 });
            }
        }
        let mut request = serde_json::json!({ "inputs": [input] });
        if let Some(id) = &self.id {
            request["id"] = serde_json::json!(id);
        }
        if !self.outputs.is_empty() {
            request["outputs"] = self
                .outputs
                .iter()
                .map(|name| serde_json::json!({ "name": name }))
                .collect();
        }
        let mut parameters = serde_json::Map::new();
        if self.binary_output {
            parameters.insert("binary_data_output".into(), true.into());
        }
        if let Some(t) = self.timeout {
            let micros = u64::try_from(t.as_micros()).unwrap_or(u64::MAX);
            parameters.insert("timeout".into(), micros.into());
        }
        if !parameters.is_empty() {
            request["parameters"] = parameters.into();
        }
        let mut body = request.to_string().into_bytes();
        match encoding {
            TensorEncoding::Json => EncodedRequest {
                body,
                header_length: None,
            },
            TensorEncoding::Binary => {
                let n = body.len();
                body.extend(self.input.iter().flat_map(|v| v.to_le_bytes()));
                EncodedRequest {
                    body,
                    header_length: Some(n),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUTS: &[&str] = &["output0", "output1"];

    fn model() -> ModelSignature<'static> {
        ModelSignature {
            input_name: "images",
            input_hw: [2, 3],
            max_batch_size: 4,
            output_names: OUTPUTS,
        }
    }

    fn request(images: usize) -> InferRequest {
        InferRequest {
            id: Some("r-1".into()),
            images,
            input: (0..images * 18).map(|i| i as f32 * 0.25 - 1.0).collect(),
            outputs: vec!["output1".into()],
            binary_output: true,
            timeout: Some(Duration::from_micros(2500)),
        }
    }

    fn parse(e: &EncodedRequest) -> Result<InferRequest, RequestError> {
        let header = e.header_length.map(|n| n.to_string());
        parse_infer_request(&e.body, header.as_deref().map(str::as_bytes), &model())
    }

    #[test]
    fn json_and_binary_requests_round_trip() {
        for encoding in [TensorEncoding::Json, TensorEncoding::Binary] {
            for images in [1, 4] {
                let r = request(images);
                assert_eq!(parse(&r.encode(&model(), encoding)).unwrap(), r);
            }
        }
        // Nested JSON data is read row-major; no outputs named means all of them.
        let body = br#"{"inputs":[{"name":"images","shape":[1,3,2,3],"datatype":"FP32",
            "data":[[[1,2,3],[4,5,6]],[[7,8,9],[10,11,12]],[[13,14,15],[16,17,18]]]}]}"#;
        let r = parse_infer_request(body, None, &model()).unwrap();
        assert_eq!(r.input, (1..=18).map(|v| v as f32).collect::<Vec<_>>());
        assert!(r.outputs.is_empty() && !r.binary_output && r.id.is_none());
    }

    #[test]
    fn non_finite_binary_values_survive() {
        let mut r = request(1);
        r.input[0] = f32::NAN;
        r.input[1] = f32::NEG_INFINITY;
        let back = parse(&r.encode(&model(), TensorEncoding::Binary)).unwrap();
        assert!(back.input[0].is_nan() && back.input[1] == f32::NEG_INFINITY);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let m = model();
        let err = |body: &str, header: Option<&str>| {
            parse_infer_request(body.as_bytes(), header.map(str::as_bytes), &m)
                .unwrap_err()
                .to_string()
        };
        let ok_input = r#""name":"images","shape":[1,3,2,3],"datatype":"FP32""#;
        let cases: &[(&str, Option<&str>, &str)] = &[
            (
                "{}",
                Some("x"),
                "Inference-Header-Content-Length is not a number",
            ),
            (
                "{}",
                Some("3"),
                "Inference-Header-Content-Length 3 exceeds the body (2 bytes)",
            ),
            ("{", None, "not valid JSON"),
            (
                r#"{"inputs":[]}"#,
                None,
                "give exactly one input, images (FP32 [batch, 3, 2, 3])",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#,
                None,
                "no input \"x\": the model's input is images",
            ),
            (
                r#"{"inputs":[{"name":"images","shape":[1],"datatype":"INT8"}]}"#,
                None,
                "input images is INT8: the model takes FP32",
            ),
            (
                r#"{"inputs":[{"name":"images","shape":[0,3,2,3],"datatype":"FP32"}]}"#,
                None,
                "input shape [0, 3, 2, 3]: the model takes [batch, 3, 2, 3]",
            ),
            (
                r#"{"inputs":[{"name":"images","shape":[5,3,2,3],"datatype":"FP32"}]}"#,
                None,
                "a batch of 5 images exceeds max_batch_size 4",
            ),
            (
                &format!(r#"{{"inputs":[{{{ok_input}}}]}}"#),
                None,
                "input images has neither data nor parameters.binary_data_size",
            ),
            (
                &format!(r#"{{"inputs":[{{{ok_input},"data":[1,"a"]}}]}}"#),
                None,
                "tensor data holds \"a\", not a number",
            ),
            (
                &format!(r#"{{"inputs":[{{{ok_input},"data":[1,2]}}]}}"#),
                None,
                "input images holds 2 values; shape [1, 3, 2, 3] needs 18",
            ),
            (
                &format!(r#"{{"inputs":[{{{ok_input},"parameters":{{"binary_data_size":72}}}}]}}"#),
                None,
                "binary input images: 72 bytes given, [1, 3, 2, 3] FP32 needs 72 (and the body is shorter)",
            ),
            (
                &format!(
                    r#"{{"inputs":[{{{ok_input},"data":[{}]}}],"outputs":[{{"name":"o"}}]}}"#,
                    ["0"; 18].join(",")
                ),
                None,
                "no output \"o\": the model's outputs are output0, output1",
            ),
            (
                &format!(
                    r#"{{"inputs":[{{{ok_input},"data":[{}]}}],"parameters":{{"timeout":-1}}}}"#,
                    ["0"; 18].join(",")
                ),
                None,
                "parameters.timeout -1: give microseconds as a whole number",
            ),
        ];
        for (body, header, want) in cases {
            let got = err(body, *header);
            assert!(got.contains(want), "{body}: {got}");
        }
    }
}
