//! Bad data never crashes a run: a label line with the wrong field count, a class index out of
//! range, a missing or corrupt image, an empty split. Each stops `kestrel-train train` with the
//! file (and line) named; with `--skip-bad` the image is skipped with a warning and counted in the
//! run summary.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kestrel_runtime::dataset::{Dataset, Split};
use kestrel_runtime::synth::{SynthConfig, generate};

/// A 64-pixel synthetic YOLO dataset in `dir` (8 train, 2 val images) whose `data.yaml` reads the
/// train split from a list file, so a listed image can be missing.
fn dataset(dir: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    let cfg = SynthConfig {
        images: 10,
        width: 64,
        height: 64,
        seed: 5,
        val_fraction: 0.2,
        ..SynthConfig::default()
    };
    generate(&cfg, dir, &mut |_, _| {}).unwrap();
    let mut train: Vec<String> = std::fs::read_dir(dir.join("images/train"))
        .unwrap()
        .map(|e| format!("images/train/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    train.sort();
    std::fs::write(dir.join("train.txt"), train.join("\n") + "\n").unwrap();
    let yaml = dir.join("data.yaml");
    std::fs::write(
        &yaml,
        "path: .\ntrain: train.txt\nval: images/val\nnames: [circle, rectangle, triangle, hexagon, star, cross]\n",
    )
    .unwrap();
    yaml
}

fn train_images(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("images/train"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn label_of(image: &Path) -> PathBuf {
    kestrel_runtime::dataset::label_path_for(image)
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kestrel-bad-data-{name}-{}", std::process::id()))
}

/// The error of reading the train split, which must name `what` (a path, and a line).
fn strict_error(yaml: &Path) -> String {
    Dataset::from_yolo_yaml(yaml, Split::Train)
        .unwrap_err()
        .to_string()
}

#[test]
fn each_kind_of_bad_data_is_named_with_its_file_and_line() {
    let dir = temp("strict");
    let yaml = dataset(&dir);
    let images = train_images(&dir);

    // A label line with the wrong number of fields: file and line.
    let label = label_of(&images[0]);
    let text = std::fs::read_to_string(&label).unwrap();
    std::fs::write(&label, format!("{text}0 0.5 0.5 0.1\n")).unwrap();
    let line = text.lines().count() + 1;
    let e = strict_error(&yaml);
    assert!(
        e.contains(&format!("{}:{line}", label.display())) && e.contains("found 4 fields"),
        "{e}"
    );
    std::fs::write(&label, &text).unwrap();

    // A class index out of range.
    std::fs::write(&label, format!("7 0.5 0.5 0.1 0.1\n{text}")).unwrap();
    let e = strict_error(&yaml);
    assert!(
        e.contains(&format!("{}:1", label.display())) && e.contains("class 7 is out of range"),
        "{e}"
    );
    std::fs::write(&label, &text).unwrap();

    // A listed image that does not exist: the list file and its line.
    std::fs::rename(&images[2], dir.join("moved.png")).unwrap();
    let e = strict_error(&yaml);
    assert!(
        e.contains(&format!("{}:3", dir.join("train.txt").display()))
            && e.contains("does not exist"),
        "{e}"
    );
    std::fs::rename(dir.join("moved.png"), &images[2]).unwrap();

    // A corrupt image.
    let original = std::fs::read(&images[3]).unwrap();
    std::fs::write(&images[3], b"not an image at all").unwrap();
    let e = strict_error(&yaml);
    assert!(e.contains(&images[3].display().to_string()), "{e}");
    std::fs::write(&images[3], &original).unwrap();

    // An empty split.
    for f in std::fs::read_dir(dir.join("images/val")).unwrap() {
        std::fs::remove_file(f.unwrap().path()).unwrap();
    }
    let e = Dataset::from_yolo_yaml(&yaml, Split::Val)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("data.yaml") && e.contains("no images found"),
        "{e}"
    );
    let mut skipped = Vec::new();
    let e = Dataset::from_yolo_yaml_skipping_bad(&yaml, Split::Val, &mut skipped)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no images found"), "{e}");

    // Nothing bad left in train: it loads whole.
    assert_eq!(
        Dataset::from_yolo_yaml(&yaml, Split::Train)
            .unwrap()
            .samples
            .len(),
        8
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn train_cli(yaml: &Path, project: &Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kestrel-train"))
        .args([
            "train",
            "--model",
            "gelan-t",
            "--data",
            yaml.to_str().unwrap(),
            "--epochs",
            "1",
            "--imgsz",
            "64",
            "--batch-size",
            "4",
            "--project",
            project.to_str().unwrap(),
            "--name",
            "bad",
        ])
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn skip_bad_trains_on_the_rest_and_counts_what_it_skipped() {
    let dir = temp("skip");
    let yaml = dataset(&dir);
    let images = train_images(&dir);
    let label = label_of(&images[0]);
    let text = std::fs::read_to_string(&label).unwrap();
    std::fs::write(&label, format!("{text}0 0.5 0.5\n")).unwrap();
    let label1 = label_of(&images[1]);
    std::fs::write(&label1, "9 0.5 0.5 0.2 0.2\n").unwrap();
    std::fs::remove_file(&images[2]).unwrap();
    std::fs::write(&images[3], b"garbage").unwrap();
    // A PNG whose header is whole but whose pixel data is cut: found bad only when decoded,
    // during training.
    let png = std::fs::read(&images[4]).unwrap();
    std::fs::write(&images[4], &png[..png.len() / 2]).unwrap();
    let project = dir.join("runs");

    // Without --skip-bad the first bad entry (the missing image, third in the list) stops the
    // run before training, named with its file and line.
    let list = dir.join("train.txt");
    let (ok, log) = train_cli(&yaml, &project, &[]);
    assert!(!ok, "{log}");
    assert!(log.contains(&format!("{}:3", list.display())), "{log}");
    assert!(!log.contains("panicked"), "{log}");

    let (ok, log) = train_cli(&yaml, &project, &["--skip-bad"]);
    assert!(ok, "{log}");
    let expected = [
        format!("{}:{}", label.display(), text.lines().count() + 1),
        format!("{}:1", label1.display()),
        format!("{}:3", list.display()),
        images[3].display().to_string(),
        images[4].display().to_string(),
    ];
    for bad in &expected {
        assert!(
            log.contains(&format!("warning: skipping a bad image: {bad}")),
            "no warning for {bad}:\n{log}"
        );
    }
    assert!(log.contains("5 bad images skipped"), "{log}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(project.join("bad/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["skipped_images"], 5, "{summary}");
    assert_eq!(summary["skipped"].as_array().unwrap().len(), 5);
    let _ = std::fs::remove_dir_all(dir);
}
