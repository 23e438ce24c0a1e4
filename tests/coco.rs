//! COCO through the binary on the `coco_mini` fixture (a hand-written `coco_entities_release.json`
//! in the release's structure): the index's exact kept boxes and areas for both box origins, the
//! image missing from COCO Entities, bad COCO input, and the model stages end to end with the tiny
//! model, where the image without COCO Entities data is not perturbed.

mod common;

use std::path::{Path, PathBuf};

use common::{
    Workspace, area, assert_fails, bools, boxes, chains, copy_dir, f32s, f64s, parts, stderr, stdout, strings, u32s,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/coco_mini")
}

/// A workspace whose config points at `data` (the fixture or a copy) with `box_origin`.
fn workspace(data: Option<PathBuf>, box_origin: u8) -> Workspace {
    let dir = tempfile::tempdir().unwrap();
    let data = data.unwrap_or_else(fixture);
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_blip2_a");
    let (d, model) = (data.display(), model.display());
    let text = format!(
        r#"[dataset]
name = "coco-mini"
annotations = "{d}/annotations/coco_karpathy_test.json"
images = "{d}/images"
entities = "{d}/coco_entities_release.json"
box_origin = {box_origin}

[model]
dir = "{model}"
device = "cpu"
precision = "f32"
image_batch = 2
text_batch = 8

[qpert]
enabled = true
alpha = 8.0
npc = 0.99
weight = "constant"
projector = "official"

[rerank]
enabled = true
k = 2

[output]
dir = "out"
"#
    );
    let ws = Workspace { dir, data };
    std::fs::write(ws.config(), text).unwrap();
    ws
}

/// A kept box: image, box, chain, mask size.
type Kept = (u32, [f64; 4], &'static str, (u32, u32));

fn run(ws: &Workspace, args: &[&str]) -> std::process::Output {
    let mut all = args.to_vec();
    all.extend(["--config", "{config}"]);
    ws.qpert(&all)
}

/// The kept boxes of the fixture as written (0-based), per the rules in `src/data/coco_entities.rs`
/// and the fixture README.
const KEPT: [Kept; 6] = [
    (0, [0.0, 10.5, 300.25, 500.0], "0", (512, 512)),   // man (x1 = 0)
    (0, [350.0, 20.0, 450.0, 120.0], "1", (512, 512)),  // flag, via "flags"
    (0, [400.0, 200.0, 480.0, 260.0], "1", (512, 512)), // flag, second box
    (0, [100.0, 0.0, 200.0, 80.0], "3", (512, 512)),    // helmet (y1 = 0)
    (1, [0.0, 50.0, 200.5, 290.0], "1", (451, 300)),    // cat, via "cats" (x1 = 0)
    (2, [150.0, 50.0, 450.0, 350.0], "0", (600, 400)),  // cup
];

#[test]
fn index_keeps_the_exact_boxes_for_both_origins() {
    for origin in [0u8, 1] {
        let ws = workspace(None, origin);
        let out = run(&ws, &["stage", "index"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let report = stdout(&out);
        assert!(report.contains("4 images, 21 captions; 3 images with Entities annotations (1 without)"), "{report}");
        let outside = if origin == 0 { 0 } else { 3 };
        assert!(
            report.contains(&format!(
                "boxes: 6 kept, 4 dropped (chain not mentioned), 6 dropped (duplicate), {outside} outside their image"
            )),
            "{report}"
        );
        assert!(
            report.contains("no COCO Entities data for 1 image of the split (object size -1, not perturbed): 35498"),
            "{report}"
        );
        let warnings = stderr(&out);
        assert_eq!(warnings.lines().count(), outside, "{warnings}");
        if origin == 1 {
            assert!(warnings.contains("coco_entities_release.json: image COCO_val2014_000000000101: kept box 1 (chains 0) [-1.0, 9.5, 299.25, 499.0]"), "{warnings}");
            assert!(warnings.contains("starts from the far side"), "{warnings}");
        }

        let images = ws.table("index", "images");
        assert_eq!(
            strings(&images, "image_id"),
            [
                "COCO_val2014_000000000101",
                "COCO_val2014_000000000102",
                "COCO_val2014_000000000103",
                "COCO_val2014_000000035498"
            ]
        );
        assert!(strings(&images, "path")[0].ends_with("coco_mini/images/val2014/COCO_val2014_000000000101.jpg"));
        assert_eq!(u32s(&images, "width"), [512, 451, 600, 640]);
        assert_eq!(u32s(&images, "height"), [512, 300, 400, 427]);
        let sizes = [area(KEPT[0].1, 512.0, 512.0), area(KEPT[4].1, 451.0, 300.0), area(KEPT[5].1, 600.0, 400.0), -1.0];
        assert_eq!(f64s(&images, "object_size"), sizes, "origin {origin}");
        assert_eq!(sizes[2], 0.375);
        assert_eq!(u32s(&images, "num_boxes"), [4, 1, 1, 0]);
        assert_eq!(u32s(&images, "num_captions"), [5, 5, 6, 5]);

        let b = ws.table("index", "boxes");
        let shift = origin as f64;
        assert_eq!(u32s(&b, "image_idx"), KEPT.map(|k| k.0));
        assert_eq!(boxes(&b), KEPT.map(|k| k.1.map(|v| (v - shift) as f32)), "origin {origin}");
        let areas = KEPT.map(|k| area(k.1, k.3.0 as f64, k.3.1 as f64));
        assert_eq!(f64s(&b, "area"), areas, "the shift does not change areas");
        assert_eq!(chains(&b).iter().map(|c| c.join(",")).collect::<Vec<_>>(), KEPT.map(|k| k.2));
        assert_eq!(u32s(&b, "mask_width"), KEPT.map(|k| k.3.0));
        assert_eq!(u32s(&b, "mask_height"), KEPT.map(|k| k.3.1));
        let outside = if origin == 0 { [false; 6] } else { [true, false, false, true, true, false] };
        assert_eq!(bools(&b, "outside_image"), outside);

        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ws.path().join("out/index/manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["summary"]["boxes_duplicate"], 6, "{manifest}");
    }
}

#[test]
fn origin_change_makes_the_index_stale_and_strict_rejects_shifted_border_boxes() {
    let ws = workspace(None, 0);
    assert!(run(&ws, &["stage", "index"]).status.success());
    let status = stdout(&run(&ws, &["status", "--set", "dataset.box_origin=1"]));
    assert!(status.contains("dataset.box_origin: 0 -> 1"), "{status}");
    let out = run(&ws, &["stage", "index", "--set", "dataset.box_origin=1", "--strict"]);
    assert_fails(&out, 1, &["coco_entities_release.json", "COCO_val2014_000000000101", "fatal under --strict"]);
}

#[test]
fn bad_coco_input_is_one_line_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for sub in ["images", "annotations"] {
        copy_dir(&fixture().join(sub), &data.join(sub));
    }
    let entities = data.join("coco_entities_release.json");
    let ws = workspace(Some(data.clone()), 0);

    std::fs::write(&entities, "{\"101\": {\"A man.\": {\"detections\": {\"man\": [[0, [0, 1, 2]]]}}}}").unwrap();
    assert_fails(&run(&ws, &["stage", "index"]), 1, &["coco_entities_release.json: line 1, column"]);

    std::fs::write(&entities, "{\"COCO_101\": {}}").unwrap();
    assert_fails(
        &run(&ws, &["stage", "index"]),
        1,
        &["coco_entities_release.json: line 1", "key `COCO_101` is not a COCO image id"],
    );

    std::fs::remove_file(&entities).unwrap();
    assert_fails(&run(&ws, &["stage", "index"]), 1, &["coco_entities_release.json", "No such file"]);

    // An empty file of COCO Entities: every split image has object size -1, never a crash.
    std::fs::write(&entities, "{}").unwrap();
    let out = run(&ws, &["stage", "index"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("no COCO Entities data for 4 images of the split"), "{}", stdout(&out));
    assert_eq!(f64s(&ws.table("index", "images"), "object_size"), [-1.0; 4]);
}

#[test]
fn the_pipeline_runs_end_to_end_and_skips_the_image_without_coco_entities() {
    let ws = workspace(None, 0);
    let out = run(&ws, &["run"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let extract = parts(&ws, "extract");
    assert_eq!(u32s(&extract, "image_idx"), [0, 1, 2, 3]);
    assert_eq!(bools(&extract, "perturbed"), [true, true, true, false], "35498 has no COCO Entities data");
    assert_eq!(f64s(&ws.table("index", "images"), "object_size")[3], -1.0);

    // Every caption gets its ITC rank; the re-ranked pairs cover each query's top-2.
    assert_eq!(ws.table("sim", "t2i_ranks").num_rows(), 21);
    assert_eq!(ws.table("sim", "i2t_ranks").num_rows(), 4);
    let rerank = parts(&ws, "rerank");
    let (in_i2t, in_t2i) = (bools(&rerank, "in_i2t"), bools(&rerank, "in_t2i"));
    assert_eq!(in_i2t.iter().filter(|&&b| b).count(), 4 * 2);
    assert_eq!(in_t2i.iter().filter(|&&b| b).count(), 21 * 2);
    assert!(f32s(&rerank, "score").iter().all(|s| s.is_finite()));

    // The report counts the image without COCO Entities data in no size bin.
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ws.path().join("out/report/metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["counts"]["images"], 4);
    assert_eq!(metrics["counts"]["images_with_size"], 3);
    let binned: u64 =
        metrics["rerank"]["bins"].as_array().unwrap().iter().map(|b| b["n_images"].as_u64().unwrap()).sum();
    assert_eq!(binned, 3);
}

#[test]
fn shipped_coco_config_parses_and_names_the_missing_split() {
    // From the repository root, as `make reproduce-coco` runs it; the data is not in the repository,
    // so the index stops at the split JSON (a data error, 1), not at the config (which would be 2).
    let root = env!("CARGO_MANIFEST_DIR");
    for extra in [&[][..], &["--set", "rerank.k=128"][..]] {
        let mut args = vec!["stage", "index", "--config", "configs/coco.toml"];
        args.extend_from_slice(extra);
        let out =
            std::process::Command::new(env!("CARGO_BIN_EXE_qpert")).args(&args).current_dir(root).output().unwrap();
        if Path::new(root).join("data/coco/annotations/coco_karpathy_test.json").exists() {
            return;
        }
        assert_fails(&out, 1, &["data/coco/annotations/coco_karpathy_test.json", "No such file"]);
    }
}

#[test]
fn image_shapes_that_disagree_with_the_header_are_warned() {
    let ws = workspace(None, 0);
    let shapes = ws.path().join("coco_img_shapes.json");
    std::fs::write(&shapes, r#"{"101": [512, 512], "102": [450, 300], "103": [600, 400], "35498": [640, 427]}"#)
        .unwrap();
    let text = std::fs::read_to_string(ws.config()).unwrap();
    let text = text.replace("box_origin = 0", &format!("box_origin = 0\nimage_shapes = \"{}\"", shapes.display()));
    std::fs::write(ws.config(), text).unwrap();

    let out = run(&ws, &["stage", "index"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let warnings = stderr(&out);
    assert_eq!(warnings.lines().count(), 1, "{warnings}");
    assert!(
        warnings.contains(
            "coco_img_shapes.json: image COCO_val2014_000000000102: size 450x300 differs from the image's 451x300"
        ),
        "{warnings}"
    );
    // The mask size stays the header's.
    assert_eq!(u32s(&ws.table("index", "boxes"), "mask_width")[4], 451);
    assert_fails(&run(&ws, &["stage", "index", "--force", "--strict"]), 1, &["coco_img_shapes.json", "450x300"]);

    let flickr = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flickr_mini/flickr30k_entities");
    let out = run(&ws, &["stage", "index", "--set", &format!("dataset.entities={}", flickr.display())]);
    assert_fails(&out, 1, &["coco_img_shapes.json", "dataset.image_shapes is for COCO Entities only"]);
}
