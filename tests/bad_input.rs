//! One test per bad input (issue 2, item 5): each must exit 2 (usage/config) or 1 (data) with a
//! single stderr line naming the file and the problem, and never panic.

mod common;

use std::fs;

use common::{Workspace, assert_fails, stdout};

const LAVIS: &str = "flickr30k_test.json";

fn index(ws: &Workspace, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["stage", "index", "--config", "{config}"];
    args.extend_from_slice(extra);
    ws.qpert(&args)
}

#[test]
fn missing_annotation_file() {
    let ws = Workspace::new("no_such_split.json");
    assert_fails(&index(&ws, &[]), 1, &["annotations/no_such_split.json", "No such file"]);
}

#[test]
fn malformed_split_json_gives_line_and_column() {
    let ws = Workspace::with_copy(LAVIS);
    fs::write(
        ws.data.join("annotations/flickr30k_test.json"),
        "[\n  {\"image\": \"a.jpg\", \"caption\": [\"x\"]},\n  {\"image\": }\n]",
    )
    .unwrap();
    assert_fails(&index(&ws, &[]), 1, &["flickr30k_test.json: line 3, column 13"]);
}

#[test]
fn split_json_of_the_wrong_shape() {
    let ws = Workspace::with_copy(LAVIS);
    fs::write(ws.data.join("annotations/flickr30k_test.json"), "[{\"image\": 3, \"caption\": []}]").unwrap();
    assert_fails(&index(&ws, &[]), 1, &["flickr30k_test.json: line 1", "invalid type"]);
}

#[test]
fn malformed_entities_xml_gives_its_position() {
    let ws = Workspace::with_copy(LAVIS);
    let xml = ws.data.join("flickr30k_entities/Annotations/1000002.xml");
    fs::write(&xml, "<annotation>\n  <size><width>512</width><height>512</heigth></size>\n</annotation>\n").unwrap();
    assert_fails(&index(&ws, &[]), 1, &["Annotations/1000002.xml: malformed XML at line 2"]);
}

#[test]
fn a_box_coordinate_that_is_not_finite_is_named() {
    let ws = Workspace::with_copy(LAVIS);
    let xml = ws.data.join("flickr30k_entities/Annotations/1000001.xml");
    let text = fs::read_to_string(&xml).unwrap().replacen("<xmax>401</xmax>", "<xmax>nan</xmax>", 1);
    fs::write(&xml, text).unwrap();
    assert_fails(&index(&ws, &[]), 1, &["Annotations/1000001.xml", "<xmax> is not a finite number: `nan`"]);
}

#[test]
fn malformed_sentences_file_gives_its_line() {
    let ws = Workspace::with_copy(LAVIS);
    let txt = ws.data.join("flickr30k_entities/Sentences/1000002.txt");
    fs::write(&txt, "[/EN#10/people A man] stands .\n[/EN#10/people A man stands .\n").unwrap();
    assert_fails(&index(&ws, &[]), 1, &["Sentences/1000002.txt: line 2: phrase", "not closed"]);
}

#[test]
fn missing_image() {
    let ws = Workspace::with_copy(LAVIS);
    fs::remove_file(ws.data.join("flickr30k-images/1000003.jpg")).unwrap();
    assert_fails(&index(&ws, &[]), 1, &["1000003.jpg: image not found"]);
}

#[test]
fn image_that_does_not_decode() {
    let ws = Workspace::with_copy(LAVIS);
    fs::write(ws.data.join("flickr30k-images/1000004.jpg"), "this is not a JPEG").unwrap();
    assert_fails(&index(&ws, &[]), 1, &["flickr30k-images/1000004.jpg: cannot read the image"]);
}

#[test]
fn failed_run_leaves_earlier_artifacts_intact() {
    let ws = Workspace::with_copy(LAVIS);
    assert!(index(&ws, &[]).status.success());
    let before = fs::read(ws.path().join("out/index/images.parquet")).unwrap();
    let table = ws.table("index", "images");
    fs::write(ws.data.join("flickr30k-images/1000004.jpg"), "garbage").unwrap();
    assert_fails(&index(&ws, &["--force"]), 1, &["1000004.jpg"]);
    assert_eq!(fs::read(ws.path().join("out/index/images.parquet")).unwrap(), before);
    assert_eq!(ws.table("index", "images"), table);
    assert!(ws.path().join("out/index/manifest.json").exists());
}

#[test]
fn missing_entities_folder() {
    let ws = Workspace::with_copy(LAVIS);
    fs::remove_dir_all(ws.data.join("flickr30k_entities/Sentences")).unwrap();
    assert_fails(&index(&ws, &[]), 1, &["flickr30k_entities: not a Flickr30K Entities folder: no Sentences/"]);
}

#[test]
fn unknown_config_key_is_named_with_the_known_keys() {
    let ws = Workspace::new(LAVIS);
    let text = fs::read_to_string(ws.config()).unwrap().replace("box_origin = 1", "box_origin = 1\nbox_orign = 0");
    fs::write(ws.config(), text).unwrap();
    assert_fails(
        &index(&ws, &[]),
        2,
        &[
            "qpert.toml: line 8",
            "in [dataset]",
            "unknown field `box_orign`",
            "`box_origin`",
            "`annotations`",
            "`entities`",
        ],
    );
}

#[test]
fn unknown_config_section() {
    let ws = Workspace::new(LAVIS);
    let text = fs::read_to_string(ws.config()).unwrap() + "\n[extras]\nx = 1\n";
    fs::write(ws.config(), text).unwrap();
    assert_fails(&index(&ws, &[]), 2, &["qpert.toml", "unknown field `extras`", "`dataset`", "`output`"]);
}

#[test]
fn config_value_of_the_wrong_type() {
    let ws = Workspace::new(LAVIS);
    let text = fs::read_to_string(ws.config()).unwrap().replace("k = 3\n", "k = \"sixty-four\"\n");
    fs::write(ws.config(), text).unwrap();
    assert_fails(&index(&ws, &[]), 2, &["qpert.toml: line 25", "in [rerank]", "invalid type: string \"sixty-four\""]);
}

#[test]
fn bad_enum_value_lists_the_choices() {
    let ws = Workspace::new(LAVIS);
    let text = fs::read_to_string(ws.config()).unwrap().replace("device = \"cpu\"", "device = \"tpu\"");
    fs::write(ws.config(), text).unwrap();
    assert_fails(&index(&ws, &[]), 2, &["qpert.toml", "unknown variant `tpu`", "`cuda`", "`cpu`"]);
}

#[test]
fn missing_config_file() {
    let ws = Workspace::new(LAVIS);
    assert_fails(&ws.qpert(&["status", "--config", "nope.toml"]), 2, &["nope.toml", "No such file"]);
}

#[test]
fn bad_shard_values() {
    let ws = Workspace::new(LAVIS);
    for (shard, why) in
        [("0/4", "out of range"), ("5/4", "out of range"), ("x", "expected I/N"), ("1/0", "between 1 and")]
    {
        let out = ws.qpert(&["stage", "extract", "--config", "{config}", "--shard", shard]);
        assert_fails(&out, 2, &["--shard", shard, why]);
    }
}

#[test]
fn unknown_stage_and_verb() {
    let ws = Workspace::new(LAVIS);
    assert_fails(
        &ws.qpert(&["stage", "train", "--config", "{config}"]),
        2,
        &["train", "possible values: index, extract"],
    );
    assert_fails(&ws.qpert(&["frobnicate"]), 2, &["frobnicate"]);
    let none = ws.qpert(&[]);
    assert_fails(&none, 2, &["no command given"]);
    assert!(stdout(&none).is_empty());
}

// ---- Bad inputs of the model stages (issue 5, item 8) ----

fn stage(ws: &Workspace, name: &str) -> std::process::Output {
    ws.qpert(&["stage", name, "--config", "{config}"])
}

fn run_through(ws: &Workspace, last: &str) {
    for name in ["index", "extract", "text", "sim", "rerank"] {
        let out = stage(ws, name);
        assert!(out.status.success(), "{name}: {}", common::stderr(&out));
        if name == last {
            return;
        }
    }
}

#[test]
fn a_stage_before_its_inputs_names_the_stage_to_run() {
    let ws = Workspace::new(LAVIS);
    assert_fails(&stage(&ws, "extract"), 1, &["out/index", "incomplete; run `qpert stage index`"]);
    run_through(&ws, "extract");
    assert_fails(&stage(&ws, "sim"), 1, &["out/text", "incomplete; run `qpert stage text`"]);
}

#[test]
fn a_truncated_upstream_part_is_named_and_nothing_downstream_is_written() {
    let ws = Workspace::new(LAVIS);
    run_through(&ws, "text");
    let part = ws.path().join("out/extract/part-00001-of-00001.parquet");
    let bytes = fs::read(&part).unwrap();
    fs::write(&part, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(
        &stage(&ws, "sim"),
        1,
        &[
            "out/extract: damaged (part-00001-of-00001.parquet: not a readable Parquet file",
            "rerun `qpert stage extract`",
        ],
    );
    assert!(!ws.path().join("out/sim").exists());
}

#[test]
fn a_part_rewritten_by_another_configuration_is_not_read() {
    let ws = Workspace::new(LAVIS);
    run_through(&ws, "text");
    let part = ws.path().join("out/text/part-00001-of-00001.parquet");
    // A part from another run (here: the extract part) under the text stage's name.
    fs::copy(ws.path().join("out/extract/part-00001-of-00001.parquet"), &part).unwrap();
    assert_fails(
        &stage(&ws, "sim"),
        1,
        &[
            "out/text: damaged (part-00001-of-00001.parquet: fingerprint does not match the manifest (rewritten since?))",
        ],
    );
}

#[test]
fn a_model_folder_whose_config_does_not_match_its_weights() {
    let ws = Workspace::with_copy(LAVIS);
    let model = ws.path().join("model");
    fs::create_dir_all(&model).unwrap();
    let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_blip2_a");
    for f in ["model.safetensors", "vocab.txt"] {
        fs::copy(tiny.join(f), model.join(f)).unwrap();
    }
    let config = fs::read_to_string(tiny.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 64", "\"intermediate_size\": 80");
    fs::write(model.join("config.json"), config).unwrap();
    let dir = format!("model.dir={}", model.display());
    run_through(&ws, "index");
    let out = ws.qpert(&["stage", "extract", "--config", "{config}", "--set", &dir]);
    assert_fails(&out, 1, &["model.safetensors", "intermediate", "expected", "found"]);
    assert!(ws.path().join("out/index/manifest.json").exists(), "earlier artifacts stay");
}

#[test]
fn an_image_whose_pixels_do_not_decode_stops_extract_naming_it() {
    let ws = Workspace::with_copy(LAVIS);
    // The header (read by index) stays valid; the entropy-coded data is cut.
    let image = ws.data.join("flickr30k-images/1000002.jpg");
    let bytes = fs::read(&image).unwrap();
    fs::write(&image, &bytes[..bytes.len() / 3]).unwrap();
    run_through(&ws, "index");
    assert_fails(&stage(&ws, "extract"), 1, &["1000002.jpg"]);
    assert!(!ws.path().join("out/extract/manifest.json").exists());
}

/// `model.device = "wgpu"` on a machine where wgpu finds no adapter (here: the Vulkan loader is
/// pointed at no driver) is a one-line device error, not CubeCL's panic on its device thread.
#[cfg(feature = "wgpu")]
#[test]
fn no_adapter_for_the_cubecl_backend_is_named() {
    let ws = Workspace::new("flickr30k_test.json");
    assert_eq!(index(&ws, &[]).status.code(), Some(0));
    let config = ws.config().display().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qpert"))
        .args(["stage", "extract", "--config", &config, "--set", "model.device=wgpu"])
        .env("VK_ICD_FILENAMES", "/nonexistent/icd.json")
        .current_dir(ws.path())
        .output()
        .unwrap();
    assert_fails(&out, 1, &["model.device = \"wgpu\" but wgpu finds no adapter", "mesa-vulkan-drivers"]);
}

#[test]
fn progress_interval_that_is_not_a_number() {
    let ws = Workspace::new(LAVIS);
    let config = ws.config().display().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qpert"))
        .args(["stage", "index", "--config", &config])
        .env("QPERT_PROGRESS_SECS", "soon")
        .current_dir(ws.path())
        .output()
        .unwrap();
    assert_fails(&out, 2, &["QPERT_PROGRESS_SECS=soon: not a number of seconds"]);
    assert!(!ws.path().join("out/index").exists(), "nothing runs");
}
