//! The `report` stage on hand-written upstream artifacts: 3 images x 6 texts with hand-written ITC
//! ranks, top-k tables and re-rank pairs (k = 2), written through the store under the upstream
//! fingerprints. Checks the ranks under both semantics, the recalls, the bins, the files and their
//! keys, a report without re-ranking, determinism, and refusals of missing or inconsistent inputs.

use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, BooleanArray, Float32Array, Float64Array, StringArray, UInt32Array};
use arrow::datatypes::{Field, Schema};
use arrow::record_batch::RecordBatch;
use serde_json::Value;

use qpert::config::Config;
use qpert::error::Error;
use qpert::stages::{Context, DeviceChoice, Outcome, Progress, Reporter, Stage, index, report, rerank, run_stage, sim};
use qpert::store::{FileEntry, Notes, Shard, StageDir};

fn config(out: &Path, rerank: bool) -> Config {
    let mut config: Config = toml::from_str(include_str!("../configs/mini.toml")).unwrap();
    config.dataset.name = "flickr30k-hand".into();
    config.rerank.enabled = rerank;
    config.rerank.k = 2;
    config.output.dir = out.to_path_buf();
    config
}

fn context(config: Config, lines: Arc<Mutex<Vec<String>>>) -> Context {
    let info = Box::new(move |l: &str| lines.lock().unwrap().push(l.to_string()));
    Context {
        config,
        device: DeviceChoice { kind: qpert::config::DeviceKind::Cpu, device: Ok(burn::tensor::Device::flex()) },
        strict: false,
        force: false,
        reporter: Reporter::new(info, Box::new(|_| {}), Progress::Off),
    }
}

fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
    let fields: Vec<Field> =
        columns.iter().map(|(n, a)| Field::new(*n, a.data_type().clone(), a.null_count() > 0)).collect();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns.into_iter().map(|(_, a)| a).collect()).unwrap()
}

fn u32s(v: &[u32]) -> ArrayRef {
    Arc::new(UInt32Array::from(v.to_vec()))
}

fn f32s(v: &[f32]) -> ArrayRef {
    Arc::new(Float32Array::from(v.to_vec()))
}

fn write_tables(dir: &StageDir, tables: &[(&str, RecordBatch)]) {
    let files: Vec<FileEntry> =
        tables.iter().map(|(name, b)| dir.write_table(name, &b.schema(), std::slice::from_ref(b)).unwrap()).collect();
    dir.finish(files, Value::Null, Notes::default()).unwrap();
}

/// Sizes: image 0 small (0.05), image 1 in [0.3, 0.4), image 2 without annotation (-1).
const SIZES: [f64; 3] = [0.05, 0.35, -1.0];
/// Texts 0, 1 -> image 0; 2, 3 -> image 1; 4, 5 -> image 2.
const TEXT_IMAGE: [u32; 6] = [0, 0, 1, 1, 2, 2];
const ITC_I2T: [u32; 3] = [0, 3, 1];
const ITC_T2I: [u32; 6] = [0, 1, 2, 0, 1, 0];

/// A re-rank row: (image, text, score, in_i2t, in_t2i).
type Pair = (u32, u32, f32, bool, bool);

/// Each image selects 2 texts, each text 2 images.
const PAIRS: [Pair; 15] = [
    (0, 0, 1.0, true, true),
    (0, 2, 2.0, true, true),
    (1, 3, 0.5, true, true),
    (1, 4, 0.5, true, false),
    (2, 1, 0.7, true, false),
    (2, 5, 0.7, true, false),
    (1, 0, 3.0, false, true),
    (1, 1, 0.2, false, true),
    (0, 1, 0.1, false, true),
    (1, 2, 1.5, false, true),
    (2, 3, 0.5, false, true),
    (2, 4, 0.9, false, true),
    (0, 4, 0.95, false, true),
    (0, 5, 0.3, false, true),
    (1, 5, 0.4, false, true),
];

fn write_index(config: &Config) {
    let dir = StageDir::open(&config.output.dir, "index", index::fingerprint(config).unwrap());
    let ids: ArrayRef = Arc::new(StringArray::from(vec!["a", "b", "c"]));
    let images = batch(vec![
        ("image_idx", u32s(&[0, 1, 2])),
        ("image_id", ids),
        ("object_size", Arc::new(Float64Array::from(SIZES.to_vec()))),
    ]);
    let texts = batch(vec![("text_idx", u32s(&[0, 1, 2, 3, 4, 5])), ("image_idx", u32s(&TEXT_IMAGE))]);
    write_tables(&dir, &[("images", images), ("texts", texts)]);
}

fn write_sim(config: &Config, i2t_ranks: &[u32]) {
    let dir = StageDir::open(&config.output.dir, "sim", sim::fingerprint(config).unwrap());
    let topk = |q: fn(&Pair) -> Option<(u32, u32)>, query: &str, item: &str| {
        let rows: Vec<(u32, u32)> = PAIRS.iter().filter_map(q).collect();
        let (qs, items): (Vec<u32>, Vec<u32>) = rows.iter().copied().unzip();
        let ranks: Vec<u32> = (0..rows.len() as u32).map(|r| r % 2).collect();
        let itc: Vec<f32> = vec![0.5; rows.len()];
        batch(vec![(query, u32s(&qs)), ("rank", u32s(&ranks)), (item, u32s(&items)), ("itc", f32s(&itc))])
    };
    let i2t_topk = topk(|p| p.3.then_some((p.0, p.1)), "image_idx", "text_idx");
    let t2i_topk = topk(|p| p.4.then_some((p.1, p.0)), "text_idx", "image_idx");
    let i2t = batch(vec![("image_idx", u32s(&[0, 1, 2])), ("itc_rank", u32s(i2t_ranks))]);
    let t2i = batch(vec![("text_idx", u32s(&[0, 1, 2, 3, 4, 5])), ("itc_rank", u32s(&ITC_T2I))]);
    write_tables(&dir, &[("i2t_topk", i2t_topk), ("t2i_topk", t2i_topk), ("i2t_ranks", i2t), ("t2i_ranks", t2i)]);
}

/// The pairs in two parts (shards 1/2 and 2/2), as the sharded stage writes them.
fn write_rerank(config: &Config, pairs: &[Pair]) {
    let dir = StageDir::open(&config.output.dir, "rerank", rerank::fingerprint(config).unwrap());
    for shard in Shard::all_of(2).unwrap() {
        let rows = &pairs[shard.range(pairs.len())];
        let col = |f: fn(&Pair) -> u32| u32s(&rows.iter().map(f).collect::<Vec<_>>());
        let flag =
            |f: fn(&Pair) -> bool| -> ArrayRef { Arc::new(BooleanArray::from(rows.iter().map(f).collect::<Vec<_>>())) };
        let score: Vec<f32> = rows.iter().map(|p| p.2).collect();
        let b = batch(vec![
            ("image_idx", col(|p| p.0)),
            ("text_idx", col(|p| p.1)),
            ("itc", f32s(&vec![0.25; rows.len()])),
            ("itm", f32s(&score.iter().map(|s| s - 0.25).collect::<Vec<_>>())),
            ("score", f32s(&score)),
            ("in_i2t", flag(|p| p.3)),
            ("in_t2i", flag(|p| p.4)),
        ]);
        dir.write_part(shard, &b.schema(), &[b]).unwrap();
    }
    dir.finish_parts(2, Value::Null).unwrap().unwrap();
}

fn upstream(config: &Config) {
    write_index(config);
    write_sim(config, &ITC_I2T);
    if config.rerank.enabled {
        write_rerank(config, &PAIRS);
    }
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn close(v: &Value, expected: f64) {
    let got = v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"));
    assert!((got - expected).abs() < 1e-9, "{got} != {expected}");
}

fn per_query(path: &Path) -> RecordBatch {
    let file = fs::File::open(path).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
    let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

fn u32_column(b: &RecordBatch, name: &str) -> Vec<Option<u32>> {
    b.column_by_name(name).unwrap().as_any().downcast_ref::<UInt32Array>().unwrap().iter().collect()
}

#[test]
fn hand_checked_report_with_rerank() {
    let out = tempfile::tempdir().unwrap();
    let config = config(out.path(), true);
    upstream(&config);
    let lines = Arc::new(Mutex::new(Vec::new()));
    let ctx = context(config, lines.clone());
    assert_eq!(run_stage(Stage::Report, &ctx, None).unwrap(), Outcome::Ran);
    let dir = out.path().join("report");

    let m = json(&dir.join("metrics.json"));
    assert_eq!(m["dataset"], "flickr30k-hand");
    assert_eq!(m["units"], "percent");
    assert_eq!(m["k"], 2);
    assert_eq!(m["qpert"]["weight"], "constant");
    assert_eq!(m["qpert"]["projector"], "official");
    assert_eq!(m["qpert"]["npc"], 0.99);
    let c = &m["counts"];
    assert_eq!(
        (c["images"].as_u64(), c["texts"].as_u64(), c["images_with_size"].as_u64()),
        (Some(3), Some(6), Some(2))
    );
    assert_eq!((c["small_images"].as_u64(), c["small_texts"].as_u64()), (Some(1), Some(2)));
    assert_eq!(
        (c["rerank_pairs"].as_u64(), c["rerank_i2t_pairs"].as_u64(), c["rerank_t2i_pairs"].as_u64()),
        (Some(15), Some(6), Some(12))
    );
    let keys = [
        "txt_r1",
        "txt_r5",
        "txt_r10",
        "img_r1",
        "img_r5",
        "img_r10",
        "txt_r_mean",
        "img_r_mean",
        "r_mean",
        "txt_mdr",
        "txt_mer",
        "txt_mrr",
        "img_mdr",
        "img_mer",
        "img_mrr",
        "small",
        "bins",
    ];
    for block in ["itc", "rerank"] {
        for key in keys {
            assert!(m[block].get(key).is_some(), "{block}.{key} missing");
        }
        let bins = m[block]["bins"].as_array().unwrap();
        assert_eq!(bins.len(), 10);
        let bin_keys: Vec<&str> = bins[0].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(bin_keys.len(), 10, "{bin_keys:?}");
        for key in ["lo", "hi", "n_images", "n_texts", "txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"] {
            assert!(bins[0].get(key).is_some(), "bins[].{key} missing");
        }
        assert_eq!((bins[3]["lo"].as_f64(), bins[3]["hi"].as_f64()), (Some(0.3), Some(0.4)));
        assert!(bins[7]["txt_r1"].is_null() && bins[7]["n_images"] == 0);
    }

    // ITC: i2t ranks [0, 3, 1], t2i ranks [0, 1, 2, 0, 1, 0].
    let itc = &m["itc"];
    close(&itc["txt_r1"], 100.0 / 3.0);
    close(&itc["txt_r5"], 100.0);
    close(&itc["img_r1"], 50.0);
    close(&itc["txt_mdr"], 2.0);
    close(&itc["txt_mer"], 7.0 / 3.0);
    close(&itc["img_mrr"], (1.0 + 0.5 + 1.0 / 3.0 + 1.0 + 0.5 + 1.0) / 6.0);
    close(&itc["small"]["txt_r1"], 100.0);
    close(&itc["small"]["img_r1"], 50.0);
    // Re-rank (hand-derived in report.rs's unit tests): i2t [1, 0, 1], t2i [1, 1, 1, 0, 1, 2].
    let rr = &m["rerank"];
    close(&rr["txt_r1"], 100.0 / 3.0);
    close(&rr["img_r1"], 100.0 / 6.0);
    close(&rr["img_r5"], 100.0);
    close(&rr["img_mer"], 2.0);
    close(&rr["txt_r_mean"], (100.0 / 3.0 + 200.0) / 3.0);
    close(&rr["r_mean"], ((100.0 / 3.0 + 200.0) / 3.0 + (100.0 / 6.0 + 200.0) / 3.0) / 2.0);
    assert_eq!((rr["small"]["n_images"].as_u64(), rr["small"]["n_texts"].as_u64()), (Some(1), Some(2)));
    close(&rr["small"]["txt_r1"], 0.0);
    close(&rr["small"]["img_r1"], 0.0);
    close(&rr["bins"][3]["txt_r1"], 100.0);
    close(&rr["bins"][3]["img_r1"], 50.0);
    assert_eq!(rr["bins"][3]["n_texts"], 2);

    let clip = json(&dir.join("clip_benchmark.json"));
    assert_eq!(clip["task"], "zeroshot_retrieval");
    assert_eq!(clip["model"], "tiny_blip2_a");
    close(&clip["metrics"]["image_retrieval_recall@1"], 1.0 / 6.0);
    close(&clip["metrics"]["text_retrieval_recall@1"], 1.0 / 3.0);
    close(&clip["metrics"]["text_retrieval_recall@10"], 1.0);

    let pq = per_query(&dir.join("per_query.parquet"));
    assert_eq!(pq.num_rows(), 9);
    let direction: Vec<&str> = pq
        .column_by_name("direction")
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap()
        .iter()
        .flatten()
        .collect();
    assert_eq!(direction, ["i2t", "i2t", "i2t", "t2i", "t2i", "t2i", "t2i", "t2i", "t2i"]);
    assert_eq!(u32_column(&pq, "query_idx"), [0, 1, 2, 0, 1, 2, 3, 4, 5].map(Some));
    assert_eq!(u32_column(&pq, "itc_rank"), [0, 3, 1, 0, 1, 2, 0, 1, 0].map(Some));
    assert_eq!(u32_column(&pq, "rerank_rank"), [1, 0, 1, 1, 1, 1, 0, 1, 2].map(Some));
    let size: Vec<f64> =
        pq.column_by_name("object_size").unwrap().as_any().downcast_ref::<Float64Array>().unwrap().values().to_vec();
    assert_eq!(size, [0.05, 0.35, -1.0, 0.05, 0.05, 0.35, 0.35, -1.0, -1.0]);
    let meta = qpert::store::parquet::read_footer(&dir.join("per_query.parquet")).unwrap().metadata;
    assert_eq!(meta["qpert.stage"], "report");

    let md = fs::read_to_string(dir.join("report.md")).unwrap();
    for needle in [
        "## Text to Image",
        "## Image to Text",
        "published Q-Pert + ITM",
        "89.88",
        "85.33",
        "ITC + ITM re-rank",
        "recall_by_size.svg",
        "| [0.3, 0.4) | 1 | 2 |",
        "small: 1 image, 2 captions.",
    ] {
        assert!(md.contains(needle), "report.md lacks {needle:?}:\n{md}");
    }
    let svg = fs::read_to_string(dir.join("recall_by_size.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("ITC + ITM re-rank") && svg.contains("Image to text") && svg.contains("Text to image"));

    let manifest = json(&dir.join("manifest.json"));
    let names: Vec<&str> = manifest["files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, report::FILES);
    close(&manifest["summary"]["rerank"]["img_r1"], 100.0 / 6.0);

    let lines = lines.lock().unwrap().join("\n");
    assert!(lines.contains("re-rank  image->text R@1/5/10 33.33 / 100.00 / 100.00"), "{lines}");
    assert!(lines.contains("report/report.md"), "{lines}");
    assert_eq!(run_stage(Stage::Report, &ctx, None).unwrap(), Outcome::UpToDate);
}

#[test]
fn report_without_rerank() {
    let out = tempfile::tempdir().unwrap();
    let mut config = config(out.path(), false);
    config.dataset.name = "mini".into();
    upstream(&config);
    assert!(!out.path().join("rerank").exists());
    let ctx = context(config, Arc::new(Mutex::new(Vec::new())));
    run_stage(Stage::Report, &ctx, None).unwrap();
    let dir = out.path().join("report");
    let m = json(&dir.join("metrics.json"));
    assert!(m["rerank"].is_null());
    assert!(m["counts"]["rerank_pairs"].is_null());
    close(&m["itc"]["img_r1"], 50.0);
    let clip = json(&dir.join("clip_benchmark.json"));
    assert_eq!(clip["scoring"], "itc");
    close(&clip["metrics"]["image_retrieval_recall@1"], 0.5);
    let pq = per_query(&dir.join("per_query.parquet"));
    assert_eq!(pq.column_by_name("rerank_rank").unwrap().null_count(), 9);
    let md = fs::read_to_string(dir.join("report.md")).unwrap();
    assert!(!md.contains("re-rank |") && !md.contains("published"), "{md}");
    assert!(!fs::read_to_string(dir.join("recall_by_size.svg")).unwrap().contains("re-rank"));
}

#[test]
fn reruns_are_byte_identical() {
    let out = tempfile::tempdir().unwrap();
    let config = config(out.path(), true);
    upstream(&config);
    let mut ctx = context(config, Arc::new(Mutex::new(Vec::new())));
    run_stage(Stage::Report, &ctx, None).unwrap();
    let dir = out.path().join("report");
    let first: Vec<Vec<u8>> = report::FILES.iter().map(|f| fs::read(dir.join(f)).unwrap()).collect();
    ctx.force = true;
    assert_eq!(run_stage(Stage::Report, &ctx, None).unwrap(), Outcome::Ran);
    for (name, bytes) in report::FILES.iter().zip(first) {
        assert_eq!(fs::read(dir.join(name)).unwrap(), bytes, "{name} differs");
    }
}

#[test]
fn missing_or_inconsistent_inputs_are_artifact_errors() {
    let out = tempfile::tempdir().unwrap();
    let config = config(out.path(), true);
    write_index(&config);
    let ctx = context(config.clone(), Arc::new(Mutex::new(Vec::new())));
    let err = run_stage(Stage::Report, &ctx, None).unwrap_err();
    assert!(matches!(err, Error::Artifact { .. }) && err.to_string().contains("qpert stage sim"), "{err}");

    write_sim(&config, &[0, 3, 7]);
    let err = run_stage(Stage::Report, &ctx, None).unwrap_err().to_string();
    assert!(err.contains("i2t_ranks.parquet") && err.contains("not below the gallery size 6"), "{err}");

    write_sim(&config, &ITC_I2T);
    let err = run_stage(Stage::Report, &ctx, None).unwrap_err().to_string();
    assert!(err.contains("rerank") && err.contains("incomplete"), "{err}");

    // One t2i-selected pair missing: the counts disagree with sim's top-k.
    write_rerank(&config, &PAIRS[..14]);
    let err = run_stage(Stage::Report, &ctx, None).unwrap_err().to_string();
    assert!(err.contains("11 pairs have in_t2i, but sim/t2i_topk.parquet has 12 rows"), "{err}");
    assert!(!out.path().join("report/manifest.json").exists());

    // A changed k makes sim (and so the report's inputs) stale.
    let mut other = config.clone();
    other.rerank.k = 3;
    let err =
        run_stage(Stage::Report, &context(other, Arc::new(Mutex::new(Vec::new()))), None).unwrap_err().to_string();
    assert!(err.contains("stale"), "{err}");
}

#[test]
fn report_fingerprint_follows_its_inputs() {
    let out = tempfile::tempdir().unwrap();
    let on = config(out.path(), true);
    let off = config(out.path(), false);
    let fp = |c: &Config| report::fingerprint(c).unwrap();
    assert!(fp(&on).entries().contains_key("input.rerank"));
    assert!(!fp(&off).entries().contains_key("input.rerank"));
    let mut renamed = on.clone();
    renamed.dataset.name = "other".into();
    assert_ne!(fp(&on).digest(), fp(&renamed).digest());
    assert_eq!(fp(&on).entries()["input.sim"], sim::fingerprint(&on).unwrap().digest());
}
