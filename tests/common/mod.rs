//! Test helpers shared by `tests/cli.rs` and `tests/bad_input.rs`: a temp workspace with a config
//! pointing at the `flickr_mini` fixture (or a mutable copy of it), running the built `qpert`
//! binary there, and reading Parquet artifacts back with the arrow/parquet readers.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use arrow::array::{
    Array, BooleanArray, FixedSizeListArray, Float32Array, Float64Array, ListArray, StringArray, UInt32Array,
};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// The committed mini dataset, laid out like real Flickr30K + Entities.
pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flickr_mini")
}

/// A temp folder holding `qpert.toml` (and artifacts under `out/`).
pub struct Workspace {
    pub dir: tempfile::TempDir,
    /// The dataset root the config points at.
    pub data: PathBuf,
}

impl Workspace {
    /// A workspace on the committed fixture, reading the split from `annotations/<split_file>`.
    pub fn new(split_file: &str) -> Workspace {
        let ws = Workspace { dir: tempfile::tempdir().unwrap(), data: fixture() };
        ws.write_config(split_file);
        ws
    }

    /// A workspace on a private copy of the fixture, which the test may break.
    pub fn with_copy(split_file: &str) -> Workspace {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        copy_dir(&fixture(), &data);
        let ws = Workspace { dir, data };
        ws.write_config(split_file);
        ws
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self) -> PathBuf {
        self.path().join("qpert.toml")
    }

    fn write_config(&self, split_file: &str) {
        let d = self.data.display();
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_blip2_a");
        let model = model.display();
        let text = format!(
            r#"[dataset]
name = "flickr-mini"
annotations = "{d}/annotations/{split_file}"
split = "test"
images = "{d}/flickr30k-images"
entities = "{d}/flickr30k_entities"
box_origin = 1

[model]
dir = "{model}"
device = "cpu"
precision = "f32"
image_batch = 2
text_batch = 4

[qpert]
enabled = true
alpha = 8.0
npc = 0.99
weight = "constant"
projector = "official"

[rerank]
enabled = true
k = 3

[output]
dir = "out"
"#
        );
        fs::write(self.config(), text).unwrap();
    }

    /// Runs `qpert <args>` in the workspace; `{config}` in an argument is the config path.
    pub fn qpert(&self, args: &[&str]) -> Output {
        let config = self.config().display().to_string();
        let args: Vec<String> = args.iter().map(|a| a.replace("{config}", &config)).collect();
        Command::new(env!("CARGO_BIN_EXE_qpert")).args(&args).current_dir(self.path()).output().unwrap()
    }

    /// Reads `out/<stage>/<table>.parquet`.
    pub fn table(&self, stage: &str, table: &str) -> RecordBatch {
        read_parquet(&self.path().join("out").join(stage).join(format!("{table}.parquet")))
    }
}

pub fn read_parquet(path: &Path) -> RecordBatch {
    let file = fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let schema = builder.schema().clone();
    let batches: Vec<RecordBatch> = builder.build().unwrap().map(|b| b.unwrap()).collect();
    arrow::compute::concat_batches(&schema, &batches).unwrap()
}

/// Copies a folder tree.
pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts a failure with `code`, exactly one stderr line starting `qpert: ` and containing every
/// `needle`, and no panic or backtrace text.
pub fn assert_fails(out: &Output, code: i32, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "expected one stderr line, got: {err}");
    assert!(err.starts_with("qpert: "), "{err}");
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks `{needle}`: {err}");
    }
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE", "internal error"] {
        assert!(!err.contains(bad), "{err}");
    }
}

/// All `part-*.parquet` files of `out/<stage>/`, in name (= shard) order, as one table.
pub fn parts(ws: &Workspace, stage: &str) -> RecordBatch {
    let mut files: Vec<_> = fs::read_dir(ws.path().join("out").join(stage))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("part-"))
        .collect();
    files.sort();
    let batches: Vec<RecordBatch> = files.iter().map(|f| read_parquet(f)).collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

pub fn u32s(batch: &RecordBatch, name: &str) -> Vec<u32> {
    batch.column_by_name(name).unwrap().as_any().downcast_ref::<UInt32Array>().unwrap().values().to_vec()
}

pub fn f32s(batch: &RecordBatch, name: &str) -> Vec<f32> {
    batch.column_by_name(name).unwrap().as_any().downcast_ref::<Float32Array>().unwrap().values().to_vec()
}

pub fn f64s(batch: &RecordBatch, name: &str) -> Vec<f64> {
    batch.column_by_name(name).unwrap().as_any().downcast_ref::<Float64Array>().unwrap().values().to_vec()
}

pub fn bools(batch: &RecordBatch, name: &str) -> Vec<bool> {
    let c = batch.column_by_name(name).unwrap().as_any().downcast_ref::<BooleanArray>().unwrap();
    (0..c.len()).map(|i| c.value(i)).collect()
}

pub fn strings(batch: &RecordBatch, name: &str) -> Vec<String> {
    let col = batch.column_by_name(name).unwrap().as_any().downcast_ref::<StringArray>().unwrap();
    col.iter().map(|s| s.unwrap().to_string()).collect()
}

/// `boxes.parquet`'s `box` column.
pub fn boxes(batch: &RecordBatch) -> Vec<[f32; 4]> {
    let col = batch.column_by_name("box").unwrap().as_any().downcast_ref::<FixedSizeListArray>().unwrap();
    let values = col.values().as_any().downcast_ref::<Float32Array>().unwrap();
    values.values().chunks(4).map(|c| [c[0], c[1], c[2], c[3]]).collect()
}

/// `boxes.parquet`'s `chains` column.
pub fn chains(batch: &RecordBatch) -> Vec<Vec<String>> {
    let col = batch.column_by_name("chains").unwrap().as_any().downcast_ref::<ListArray>().unwrap();
    (0..col.len())
        .map(|i| {
            let v = col.value(i);
            let s = v.as_any().downcast_ref::<StringArray>().unwrap();
            s.iter().map(|x| x.unwrap().to_string()).collect()
        })
        .collect()
}

/// Area ratio as qpert computes and stores it, in f64.
pub fn area(b: [f64; 4], w: f64, h: f64) -> f64 {
    (b[2] - b[0]) * (b[3] - b[1]) / (w * h)
}
