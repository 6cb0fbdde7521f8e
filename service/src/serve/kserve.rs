//! The HTTP handlers: KServe v2 (health, metadata, infer with JSON or binary tensors, model
//! repository) and the image endpoint.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kestrel_runtime::Detection;
use kestrel_runtime::dataset::{ImageBytesError, decode_image_bytes};
use kestrel_runtime::engine::EngineInfo;
use kestrel_runtime::kserve::{BINARY_HEADER, ModelSignature, RequestError, parse_infer_request};
use kestrel_runtime::letterbox::{LetterboxParams, Letterboxer};
use kestrel_runtime::masks::{
    MASK_COEFFICIENTS, MaskDecoder, PrototypeShape, Rle, coefficients_at,
};
use kestrel_runtime::nms::{NmsConfig, Postprocessor};
use serde::Deserialize;

use super::batcher::{Reply, SubmitError};
use super::repository::{LoadedModel, valid_name};
use super::{ApiError, AppState, metrics as m};

type ApiResult<T> = Result<T, ApiError>;

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

/// A body that could not be read: over `--max-body-bytes` (413) or broken, as a JSON error.
fn body_of(body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body exceeds max_body_bytes: send a smaller body, or raise \
             --max-body-bytes / max_body_bytes in the --config file"
                .to_string()
        } else {
            format!("reading the request body: {}", e.body_text())
        };
        ApiError::new(status, message)
    })
}

/// The served model `name` (`version`: a path segment, the newest when `None`).
fn lookup(state: &AppState, name: &str, version: Option<&str>) -> ApiResult<Arc<LoadedModel>> {
    if !valid_name(name) {
        return Err(bad_request(format!(
            "{name:?} is not a model name (letters, digits, '-', '_', '.')"
        )));
    }
    let version = match version {
        None => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| bad_request(format!("version {v:?} is not a number")))?,
        ),
    };
    Ok(state.repo.get(name, version)?)
}

/// Count a finished request and its duration. Names that are not models of the repository are
/// counted as `_unknown`, so clients cannot create metric series at will.
fn record(
    state: &AppState,
    model: &str,
    endpoint: &'static str,
    started: Instant,
    outcome: &ApiResult<Response>,
) {
    let model = if state.repo.has(model) {
        model
    } else {
        "_unknown"
    };
    let outcome = match outcome {
        Ok(_) => "ok".to_string(),
        Err(e) => e.status.as_u16().to_string(),
    };
    ::metrics::counter!(m::REQUESTS, "model" => model.to_string(), "endpoint" => endpoint,
        "outcome" => outcome)
    .increment(1);
    ::metrics::histogram!(m::REQUEST_SECONDS, "model" => model.to_string(), "endpoint" => endpoint)
        .record(started.elapsed().as_secs_f64());
}

pub async fn live() -> impl IntoResponse {
    Json(serde_json::json!({ "live": true }))
}

pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.repo.all_ready() {
        Json(serde_json::json!({ "ready": true })).into_response()
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "a model failed to load").into_response()
    }
}

pub async fn server_metadata() -> impl IntoResponse {
    Json(serde_json::json!({
        "name": "kestrel",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_repository"],
    }))
}

fn metadata(model: &LoadedModel) -> serde_json::Value {
    let info = &model.info;
    let [h, w] = info.input_hw;
    serde_json::json!({
        "name": model.name,
        "versions": [model.version.to_string()],
        "platform": format!("kestrel_{}", info.backend),
        "inputs": [{"name": info.input_name, "datatype": "FP32", "shape": [-1, 3, h, w]}],
        "outputs": output_shapes(info, None)
            .into_iter()
            .map(|(name, shape)| serde_json::json!({"name": name, "datatype": "FP32", "shape": shape}))
            .collect::<Vec<_>>(),
    })
}

/// Each output's name and shape (`images` rows, or -1 for a dynamic batch): `output0`, then
/// the prototypes of segmentation models.
fn output_shapes(info: &EngineInfo, images: Option<usize>) -> Vec<(&str, Vec<i64>)> {
    let b = images.map_or(-1, |n| n as i64);
    let mut out = vec![(
        info.output_name.as_str(),
        vec![b, info.output_channels as i64, info.anchors as i64],
    )];
    if let Some(p) = info.prototypes {
        out.push((
            info.prototypes_name.as_str(),
            vec![b, MASK_COEFFICIENTS as i64, p.height as i64, p.width as i64],
        ));
    }
    out
}

pub async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let m = lookup(&state, &model, None)?;
    Ok(Json(metadata(&m)))
}

pub async fn model_metadata_version(
    State(state): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let m = lookup(&state, &model, Some(&version))?;
    Ok(Json(metadata(&m)))
}

pub async fn model_ready(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    lookup(&state, &model, None)?;
    Ok(Json(serde_json::json!({ "name": model, "ready": true })))
}

pub async fn model_ready_version(
    State(state): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    lookup(&state, &model, Some(&version))?;
    Ok(Json(
        serde_json::json!({ "name": model, "version": version, "ready": true }),
    ))
}

pub async fn model_config(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let m = lookup(&state, &model, None)?;
    let c = &m.config;
    let [h, w] = m.info.input_hw;
    Ok(Json(serde_json::json!({
        "name": m.name,
        "platform": format!("kestrel_{}", m.info.backend),
        "backend": c.backend,
        "precision": c.precision,
        "max_batch_size": c.max_batch_size,
        "dynamic_batching": {
            "max_queue_delay_microseconds": c.max_queue_delay_us,
            "preferred_batch_size": c.preferred_batch_sizes,
            "default_queue_policy": { "max_queue_size": c.max_queue_size },
        },
        "input": [{"name": m.info.input_name, "data_type": "TYPE_FP32", "dims": [3, h, w]}],
        "output": output_shapes(&m.info, None)
            .into_iter()
            .map(|(name, shape)| {
                serde_json::json!({"name": name, "data_type": "TYPE_FP32", "dims": shape[1..]})
            })
            .collect::<Vec<_>>(),
        "class_names": m.class_names,
        "detect_defaults": {
            "conf_threshold": c.conf_threshold,
            "iou_threshold": c.iou_threshold,
            "max_detections": c.max_detections,
        },
    })))
}

pub async fn repository_index(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    Json(serde_json::Value::Array(state.repo.index()))
}

pub async fn load(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let s = Arc::clone(&state);
    let name = model.clone();
    tokio::task::spawn_blocking(move || s.repo.load(&name))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(serde_json::json!({ "name": model, "state": "READY" })))
}

pub async fn unload(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    if !valid_name(&model) {
        return Err(bad_request(format!("{model:?} is not a model name")));
    }
    let s = Arc::clone(&state);
    let name = model.clone();
    // Blocking: waits for the model's queued requests to complete.
    tokio::task::spawn_blocking(move || s.repo.unload(&name))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(Json(
        serde_json::json!({ "name": model, "state": "UNAVAILABLE" }),
    ))
}

/// Queue `images` rows of input on the model's batcher and wait for them, at most the server's
/// `--request-timeout-s` or the request's own `timeout`, whichever is shorter.
async fn run_batched(
    state: &AppState,
    model: &LoadedModel,
    input: Vec<f32>,
    images: usize,
    timeout: Option<Duration>,
) -> ApiResult<Reply> {
    let timeout = timeout.map_or(state.request_timeout, |t| t.min(state.request_timeout));
    let receiver = model.batcher.submit(input, images).map_err(|e| match e {
        SubmitError::QueueFull => {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "model {} has {} requests waiting (max_queue_size): retry shortly, or raise \
                     max_queue_size (the model's config.json, --max-queue-size or the --config \
                     file)",
                    model.name,
                    model.batcher.config().max_queue_size
                ),
            );
            e.retry_after = Some(1);
            e
        }
        SubmitError::Stopped => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("model {} is being unloaded", model.name),
        ),
    })?;
    let reply = match tokio::time::timeout(timeout, receiver).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "no result within {:.3} s (the request's own timeout, or request_timeout_s: \
                     raise --request-timeout-s / request_timeout_s in the --config file)",
                    timeout.as_secs_f64()
                ),
            ));
        }
        Ok(Err(_)) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the model stopped before running the request",
            ));
        }
        Ok(Ok(Err(message))) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("inference failed: {message}"),
            ));
        }
        Ok(Ok(Ok(reply))) => reply,
    };
    model.metrics.queue_seconds.record(reply.queued_s);
    Ok(reply)
}

pub async fn infer(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    infer_any(state, model, None, headers, body).await
}

pub async fn infer_version(
    State(state): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    infer_any(state, model, Some(version), headers, body).await
}

async fn infer_any(
    state: Arc<AppState>,
    model: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let result = match body_of(body) {
        Ok(body) => infer_request(&state, &model, version.as_deref(), &headers, &body).await,
        Err(e) => Err(e),
    };
    record(&state, &model, "infer", started, &result);
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn infer_request(
    state: &AppState,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<Response> {
    let model = lookup(state, name, version)?;
    let info = &model.info;
    let output_names: Vec<&str> = output_shapes(info, None)
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let signature = ModelSignature {
        input_name: &info.input_name,
        input_hw: info.input_hw,
        max_batch_size: model.batcher.config().max_batch_size,
        output_names: &output_names,
    };
    let request = parse_infer_request(
        body,
        headers.get(BINARY_HEADER).map(HeaderValue::as_bytes),
        &signature,
    )
    .map_err(|e| match e {
        RequestError::BatchTooLarge { .. } => bad_request(format!(
            "{e} (or raise max_batch_size: the model's config.json, --max-batch-size or the \
             --config file)"
        )),
        e => bad_request(e.to_string()),
    })?;
    let (images, timeout) = (request.images, request.timeout);
    let (_, per_out) = model.batcher.per_image();
    let shapes = output_shapes(info, Some(images));
    let reply = run_batched(state, &model, request.input, images, timeout).await?;
    debug_assert_eq!(reply.output.len(), images * per_out);
    // The requested outputs, in the model's order; all of them when none is named.
    let wanted: Vec<(&str, &Vec<i64>, &[f32])> = shapes
        .iter()
        .enumerate()
        .filter(|(_, (name, _))| {
            request.outputs.is_empty() || request.outputs.iter().any(|o| o == name)
        })
        .map(|(k, (name, shape))| {
            let data = if k == 0 {
                &reply.output[..]
            } else {
                &reply.prototypes[..]
            };
            (*name, shape, data)
        })
        .collect();
    let mut out = serde_json::json!({
        "model_name": model.name,
        "model_version": model.version.to_string(),
        "outputs": wanted
            .iter()
            .map(|(name, shape, _)| serde_json::json!({"name": name, "datatype": "FP32", "shape": shape}))
            .collect::<Vec<_>>(),
    });
    if let Some(id) = &request.id {
        out["id"] = serde_json::json!(id);
    }
    if request.binary_output {
        let mut bytes = Vec::new();
        for (k, (_, _, data)) in wanted.iter().enumerate() {
            out["outputs"][k]["parameters"] =
                serde_json::json!({ "binary_data_size": data.len() * 4 });
            bytes.extend(data.iter().flat_map(|v| v.to_le_bytes()));
        }
        let header_json = serde_json::to_vec(&out)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let n = header_json.len();
        let mut body = header_json;
        body.extend_from_slice(&bytes);
        let mut r = (StatusCode::OK, body).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        r.headers_mut().insert(BINARY_HEADER, HeaderValue::from(n));
        return Ok(r);
    }
    for (k, (_, _, data)) in wanted.iter().enumerate() {
        out["outputs"][k]["data"] = serde_json::json!(data);
    }
    Ok(Json(out).into_response())
}

/// Query parameters of the image endpoint.
#[derive(Debug, Deserialize)]
pub struct DetectParams {
    /// Confidence threshold, 0–1.
    conf: Option<f32>,
    /// NMS IoU threshold, 0–1.
    iou: Option<f32>,
    /// Detections kept, at most.
    max_det: Option<usize>,
    /// `rle` or `none`: instance masks, for segmentation models.
    masks: Option<String>,
    /// Milliseconds this request may wait for its result (capped by `--request-timeout-s`).
    timeout_ms: Option<u64>,
}

pub async fn detect(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    params: Result<Query<DetectParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let params = params.map_err(|e| {
        bad_request(format!(
            "query parameters: {} (conf, iou: 0–1; max_det, timeout_ms: whole numbers; masks: \
             rle or none)",
            e.body_text()
        ))
    });
    let result = match (params, body_of(body).and_then(|b| image_bytes(&headers, b))) {
        (Ok(Query(params)), Ok(body)) => detect_request(&state, &model, params, body).await,
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    record(&state, &model, "detect", started, &result);
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn detect_request(
    state: &AppState,
    name: &str,
    params: DetectParams,
    body: Bytes,
) -> ApiResult<Response> {
    let model = lookup(state, name, None)?;
    let masks = match params.masks.as_deref() {
        None | Some("none") => None,
        Some("rle") => match model.info.prototypes {
            Some(shape) => Some(shape),
            None => {
                return Err(bad_request(format!(
                    "masks=rle: model {} detects boxes only (no mask outputs); masks come with \
                     segmentation models (e.g. kestrel export --model gelan-c-seg)",
                    model.name
                )));
            }
        },
        Some(other) => return Err(bad_request(format!("masks={other}: give rle or none"))),
    };
    let c = &model.config;
    let nms = NmsConfig {
        conf_threshold: params.conf.unwrap_or(c.conf_threshold),
        iou_threshold: params.iou.unwrap_or(c.iou_threshold),
        max_detections: params.max_det.unwrap_or(c.max_detections),
        ..NmsConfig::display()
    };
    nms.validate()
        .map_err(|e| bad_request(format!("query parameters: {e}")))?;
    let [h, w] = model.info.input_hw;
    let max_pixels = state.max_image_pixels;
    let pre_started = Instant::now();
    let (width, height, input, placement) = tokio::task::spawn_blocking(move || {
        let image = decode_image(&body, max_pixels)?;
        let (width, height) = image.dimensions();
        let mut input = vec![0f32; 3 * h * w];
        let placement = Letterboxer::new()
            .run(&image, w as u32, h as u32, &mut input)
            .map_err(|e| bad_request(e.to_string()))?;
        Ok::<_, ApiError>((width, height, input, placement))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    model
        .metrics
        .preprocess_seconds
        .record(pre_started.elapsed().as_secs_f64());
    let reply = run_batched(
        state,
        &model,
        input,
        1,
        params.timeout_ms.map(Duration::from_millis),
    )
    .await?;
    let post_started = Instant::now();
    let mut dets = Vec::new();
    Postprocessor::new()
        .run(
            &reply.output,
            model.info.num_classes,
            model.info.anchors,
            &placement,
            &nms,
            &mut dets,
        )
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    model
        .metrics
        .postprocess_seconds
        .record(post_started.elapsed().as_secs_f64());
    let rles = match masks {
        Some(shape) => instance_masks(&model.info, shape, &reply, &placement, &dets)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
        None => Vec::new(),
    };
    let detections: Vec<serde_json::Value> = dets
        .iter()
        .enumerate()
        .map(|(k, d)| {
            let mut v = serde_json::json!({
                "class_id": d.class_id,
                "label": model.class_names.get(d.class_id).map_or("object", String::as_str),
                "confidence": d.score,
                "box_xyxy": [d.bbox.x1, d.bbox.y1, d.bbox.x2, d.bbox.y2],
            });
            if let Some(rle) = rles.get(k) {
                v["mask_rle"] = serde_json::json!({
                    "size": [rle.height, rle.width],
                    "counts": rle.counts,
                });
            }
            v
        })
        .collect();
    Ok(Json(serde_json::json!({
        "model_name": model.name,
        "model_version": model.version.to_string(),
        "width": width,
        "height": height,
        "detections": detections,
        "batch_images": reply.batch_images,
        "timing_ms": {
            "queue": reply.queued_s * 1e3,
            "inference": reply.inference_s * 1e3,
        },
    }))
    .into_response())
}

/// COCO RLE of each detection's instance mask (CPU decoding of the request's prototypes).
fn instance_masks(
    info: &kestrel_runtime::engine::EngineInfo,
    shape: PrototypeShape,
    reply: &Reply,
    placement: &LetterboxParams,
    dets: &[Detection],
) -> kestrel_runtime::Result<Vec<Rle>> {
    let mut coefficients = Vec::with_capacity(dets.len() * MASK_COEFFICIENTS);
    for d in dets {
        coefficients_at(
            &reply.output,
            info.output_channels,
            info.anchors,
            d.anchor,
            &mut coefficients,
        )?;
    }
    let boxes: Vec<_> = dets.iter().map(|d| d.bbox).collect();
    let mut bitmaps = Vec::new();
    MaskDecoder::new().decode(
        &reply.prototypes,
        shape,
        placement,
        &boxes,
        &coefficients,
        &mut bitmaps,
    )?;
    Ok(bitmaps.iter().map(Rle::encode).collect())
}

/// The image of a request body: the body itself, or the first file part of a
/// `multipart/form-data` body (an HTML form or `curl -F image=@scene.png`).
fn image_bytes(headers: &HeaderMap, body: Bytes) -> ApiResult<Bytes> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        return Ok(body);
    }
    let boundary = content_type
        .split(';')
        .filter_map(|p| p.trim().strip_prefix("boundary="))
        .next()
        .map(|b| b.trim_matches('"'))
        .filter(|b| !b.is_empty())
        .ok_or_else(|| bad_request("multipart/form-data without a boundary"))?;
    let part = first_multipart_part(&body, boundary.as_bytes())
        .ok_or_else(|| bad_request("the multipart body has no part with a file"))?;
    Ok(body.slice_ref(part))
}

/// The content of the first part of a multipart body (RFC 7578) delimited by `boundary`.
fn first_multipart_part<'a>(body: &'a [u8], boundary: &[u8]) -> Option<&'a [u8]> {
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    let mut delimiter = b"--".to_vec();
    delimiter.extend_from_slice(boundary);
    let start = find(body, &delimiter)? + delimiter.len();
    let rest = &body[start..];
    // The part's headers end at the first empty line.
    let content = find(rest, b"\r\n\r\n")? + 4;
    let mut closing = b"\r\n".to_vec();
    closing.extend_from_slice(&delimiter);
    let end = find(&rest[content..], &closing)?;
    Some(&rest[content..content + end])
}

/// Decode a PNG, JPEG or BMP body ([`decode_image_bytes`]: an image over `max_pixels` is refused
/// from its header, before any pixel is decoded): too many pixels is a 413, anything else a 400.
fn decode_image(body: &[u8], max_pixels: u64) -> ApiResult<image::RgbImage> {
    decode_image_bytes(body, max_pixels).map_err(|e| match e {
        ImageBytesError::TooManyPixels { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{e}: send a smaller image, or raise max_image_pixels (--max-image-pixels or \
                     the --config file)"
            ),
        ),
        _ => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_bodies_give_their_first_part() {
        let body =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\
Content-Type: image/png\r\n\r\n\x89PNG\r\n--not-the-end\r\n--XyZ--\r\n";
        assert_eq!(
            first_multipart_part(body, b"XyZ"),
            Some(&b"\x89PNG\r\n--not-the-end"[..])
        );
        assert_eq!(first_multipart_part(body, b"other"), None);
        assert_eq!(first_multipart_part(b"--XyZ\r\nno end", b"XyZ"), None);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary=XyZ"),
        );
        let got = image_bytes(&headers, Bytes::from_static(body)).unwrap();
        assert_eq!(&got[..4], b"\x89PNG");
        // Other content types pass the body through.
        let plain = image_bytes(&HeaderMap::new(), Bytes::from_static(b"raw")).unwrap();
        assert_eq!(&plain[..], b"raw");
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data"),
        );
        assert!(image_bytes(&headers, Bytes::from_static(body)).is_err());
    }
}
