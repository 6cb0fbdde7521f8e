//! GPU letterbox (`cuda::pre`) against the CPU reference (`Frame::to_rgb` then `Letterboxer`):
//! every input format, odd sizes and pitches, one launch per batch of different sizes (GPU
//! machine), and a clear error where there is no GPU.

use kestrel_runtime::cuda::pre::GpuLetterboxer;
use kestrel_runtime::frame::{Frame, PixelFormat, YuvMatrix};
use kestrel_runtime::letterbox::Letterboxer;

/// SplitMix64 bytes.
struct Rng(u64);
impl Rng {
    fn byte(&mut self) -> u8 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as u8
    }
}

/// Owned planes of a random frame with `pad` bytes of pitch beyond each row.
struct Owned {
    format: PixelFormat,
    width: usize,
    height: usize,
    planes: [Vec<u8>; 3],
    strides: [usize; 3],
    yuv: YuvMatrix,
}

impl Owned {
    fn random(
        rng: &mut Rng,
        format: PixelFormat,
        width: usize,
        height: usize,
        pad: usize,
        yuv: YuvMatrix,
    ) -> Self {
        let mut planes: [Vec<u8>; 3] = Default::default();
        let mut strides = [0; 3];
        for i in 0..format.planes() {
            strides[i] = format.row_bytes(i, width) + pad;
            let len = format.rows(i, height) * strides[i];
            // Smooth-ish content (neighbours correlate) with random noise on top.
            planes[i] = (0..len)
                .map(|k| ((k % strides[i]) as u8).wrapping_mul(3) ^ (rng.byte() & 0x3f))
                .collect();
        }
        Self {
            format,
            width,
            height,
            planes,
            strides,
            yuv,
        }
    }

    fn frame(&self) -> Frame<'_> {
        Frame {
            format: self.format,
            width: self.width,
            height: self.height,
            planes: [&self.planes[0], &self.planes[1], &self.planes[2]],
            strides: self.strides,
            yuv: self.yuv,
        }
    }
}

fn cpu_reference(frames: &[Frame], dst: u32) -> Vec<f32> {
    let plane = 3 * (dst * dst) as usize;
    let mut out = vec![0f32; frames.len() * plane];
    let mut rgb = image::RgbImage::new(1, 1);
    let mut letterboxer = Letterboxer::new();
    for (k, f) in frames.iter().enumerate() {
        f.to_rgb(&mut rgb).expect("to RGB");
        letterboxer
            .run(&rgb, dst, dst, &mut out[k * plane..(k + 1) * plane])
            .expect("letterbox");
    }
    out
}

const FORMATS: [PixelFormat; 6] = [
    PixelFormat::Rgb,
    PixelFormat::Bgr,
    PixelFormat::Rgba,
    PixelFormat::Bgrx,
    PixelFormat::Nv12,
    PixelFormat::I420,
];

#[test]
fn without_a_gpu_the_error_says_so() {
    if kestrel_runtime::cuda::unavailable_reason().is_none() {
        return;
    }
    let err = GpuLetterboxer::new(0)
        .err()
        .expect("no GPU here")
        .to_string();
    assert!(err.contains("cuda"), "{err}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_letterbox_equals_the_cpu_reference_for_every_format() {
    let mut rng = Rng(3);
    let mut gpu = GpuLetterboxer::new(0).expect("GPU letterbox");
    let (mut out, mut placements) = (Vec::new(), Vec::new());
    // Odd sizes and pitches, tall and wide, down- and up-scaled, full and studio range.
    let sizes = [
        (1921, 1079, 3),
        (640, 640, 0),
        (17, 999, 5),
        (333, 101, 1),
        (5, 3, 7),
    ];
    for format in FORMATS {
        for yuv in [
            YuvMatrix::BT601,
            YuvMatrix {
                full_range: true,
                ..YuvMatrix::BT709
            },
        ] {
            let owned: Vec<Owned> = sizes
                .iter()
                .map(|&(w, h, pad)| Owned::random(&mut rng, format, w, h, pad, yuv))
                .collect();
            let frames: Vec<Frame> = owned.iter().map(Owned::frame).collect();
            // One launch for the whole batch of different sizes.
            gpu.run(&frames, 640, 640, &mut out, &mut placements)
                .expect("GPU letterbox");
            let cpu = cpu_reference(&frames, 640);
            let worst = out
                .iter()
                .zip(&cpu)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            println!("{format:?} {yuv:?}: max |GPU - CPU| {:.3e} (of 1)", worst);
            assert!(worst <= 1.0 / 255.0, "{format:?}: {worst}");
            assert_eq!(worst, 0.0, "{format:?}: not bit-identical ({worst})");
            assert_eq!(placements.len(), frames.len());
        }
    }
    // A malformed frame is named.
    let bad = Owned::random(&mut rng, PixelFormat::I420, 9, 9, 0, YuvMatrix::BT601);
    let mut f = bad.frame();
    f.planes[2] = &bad.planes[2][..3];
    let err = gpu
        .run(&[bad.frame(), f], 64, 64, &mut out, &mut placements)
        .expect_err("short plane")
        .to_string();
    assert!(err.contains("frame 1") && err.contains("plane 2"), "{err}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_letterbox_time_for_8_frames_of_1080p() {
    // Measured, not asserted: frames from host memory (upload included), input back to the host
    // excluded (run_device writes where the engine reads).
    let mut rng = Rng(9);
    let mut gpu = GpuLetterboxer::new(0).expect("GPU letterbox");
    let mut placements = Vec::new();
    let mut out = Vec::new();
    for format in [PixelFormat::Rgb, PixelFormat::Nv12] {
        let owned: Vec<Owned> = (0..8)
            .map(|_| Owned::random(&mut rng, format, 1920, 1080, 0, YuvMatrix::BT709))
            .collect();
        let frames: Vec<Frame> = owned.iter().map(Owned::frame).collect();
        gpu.run(&frames, 640, 640, &mut out, &mut placements)
            .expect("warm-up");
        let reps = 20;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            gpu.run(&frames, 640, 640, &mut out, &mut placements)
                .expect("run");
        }
        let gpu_ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
        let t = std::time::Instant::now();
        let _ = cpu_reference(&frames, 640);
        let cpu_ms = t.elapsed().as_secs_f64() * 1e3;
        println!(
            "{format:?} 8 x 1920x1080 -> 8 x 3 x 640 x 640: GPU {gpu_ms:.2} ms a batch (upload and \
             download included), CPU reference {cpu_ms:.1} ms"
        );
    }
}
