//! The whole pipeline through the binary on the mini dataset with the tiny model, against the
//! independent Python reference (`tools/reference_e2e.py` -> `tests/fixtures/e2e/`), plus the
//! guarantees of the artifact store across stages: sharding, staleness and resumption.

mod common;

use std::path::Path;

use common::{Workspace, bools, f32s, parts, stderr, u32s};

fn expected(variant: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/e2e/expected_{variant}.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// `--set` arguments for the reference's settings of `variant` (the workspace config already
/// names the tiny model and k = 3).
fn settings(variant: &str) -> Vec<String> {
    let sets: &[&str] = match variant {
        "principal" => &["qpert.projector=principal"],
        // ITM chunks of 4 pairs: rerank prepares each length's texts in several padded batches and
        // runs many chunks, against the same reference as the default 128 pairs of `principal`.
        "plain" => &["qpert.enabled=false", "model.pair_batch=4"],
        _ => unreachable!(),
    };
    sets.iter().flat_map(|set| ["--set".to_string(), set.to_string()]).collect()
}

fn stage(ws: &Workspace, variant: &str, args: &[&str]) {
    stage_on(ws, variant, args, "cpu");
}

fn stage_on(ws: &Workspace, variant: &str, args: &[&str], device: &str) {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.extend(["--config".into(), "{config}".into()]);
    all.extend(settings(variant));
    all.extend(["--set".into(), format!("model.device={device}")]);
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = ws.qpert(&refs);
    assert_eq!(out.status.code(), Some(0), "qpert {args:?}: {}", stderr(&out));
}

fn run_model_stages(ws: &Workspace, variant: &str, device: &str) {
    for name in ["index", "extract", "text", "sim", "rerank", "report"] {
        stage_on(ws, variant, &["stage", name], device);
    }
}

fn close(got: f32, want: &serde_json::Value, what: &str) {
    let want = want.as_f64().unwrap() as f32;
    assert!((got - want).abs() <= 1e-5, "{what}: got {got}, want {want}");
}

#[test]
fn every_stage_matches_the_python_reference() {
    assert_every_stage_matches_the_python_reference("cpu");
}

/// The same on the CubeCL backend that CUDA uses, run by wgpu (on a CPU through Mesa's lavapipe):
/// `make test-cubecl`.
#[cfg(feature = "wgpu")]
#[test]
fn every_stage_on_the_cubecl_backend_matches_the_python_reference() {
    assert_every_stage_matches_the_python_reference("wgpu");
}

fn assert_every_stage_matches_the_python_reference(device: &str) {
    // One cache for both variants: plain BLIP-2's Q-Pert-dependent stages live in `<stage>-plain/`.
    let ws = Workspace::new("flickr30k_test.json");
    for variant in ["principal", "plain"] {
        run_model_stages(&ws, variant, device);
        let dir = |stage: &str| folder(variant, stage);
        let want = expected(variant);
        let itc = &want["itc"];

        // Top-k in both directions: the same candidates in the same order, the same ITC scores.
        for (table, query, item, lists) in
            [("i2t_topk", "image_idx", "text_idx", "i2t_topk"), ("t2i_topk", "text_idx", "image_idx", "t2i_topk")]
        {
            let t = ws.table(&dir("sim"), table);
            let (queries, items, scores) = (u32s(&t, query), u32s(&t, item), f32s(&t, "itc"));
            let mut row = 0;
            for (q, list) in want[lists].as_array().unwrap().iter().enumerate() {
                for expected_item in list.as_array().unwrap() {
                    assert_eq!(
                        (queries[row], items[row] as u64),
                        (q as u32, expected_item.as_u64().unwrap()),
                        "{variant} {table} row {row}"
                    );
                    let (i, t) = if query == "image_idx" { (q, items[row] as usize) } else { (items[row] as usize, q) };
                    close(scores[row], &itc[i][t], &format!("{variant} itc[{i}][{t}]"));
                    row += 1;
                }
            }
            assert_eq!(row, queries.len());
        }
        // Ground-truth ITC ranks.
        assert_eq!(
            u32s(&ws.table(&dir("sim"), "i2t_ranks"), "itc_rank"),
            to_u32s(&want["ranks"]["itc"]["i2t"]),
            "{variant}"
        );
        assert_eq!(
            u32s(&ws.table(&dir("sim"), "t2i_ranks"), "itc_rank"),
            to_u32s(&want["ranks"]["itc"]["t2i"]),
            "{variant}"
        );

        // ITM re-ranking: the union of both directions' pairs, each once, in (image, text) order.
        let r = parts(&ws, &dir("rerank"));
        let pairs = want["pairs"].as_array().unwrap();
        assert_eq!(r.num_rows(), pairs.len(), "{variant}: scored pairs");
        let (images, texts, itm, score) =
            (u32s(&r, "image_idx"), u32s(&r, "text_idx"), f32s(&r, "itm"), f32s(&r, "score"));
        let (in_i2t, in_t2i) = (bools(&r, "in_i2t"), bools(&r, "in_t2i"));
        for (row, p) in pairs.iter().enumerate() {
            assert_eq!(
                (images[row] as u64, texts[row] as u64),
                (p["image"].as_u64().unwrap(), p["text"].as_u64().unwrap())
            );
            close(itm[row], &p["itm"], &format!("{variant} itm {row}"));
            close(score[row], &p["score"], &format!("{variant} score {row}"));
            assert_eq!((in_i2t[row], in_t2i[row]), (p["in_i2t"].as_bool().unwrap(), p["in_t2i"].as_bool().unwrap()));
        }

        // The report: every metric of both blocks, overall and per object-size bin.
        let path = ws.path().join("out").join(dir("report")).join("metrics.json");
        let got: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        for block in ["itc", "rerank"] {
            let (g, w) = (&got[block], &want["metrics"][block]);
            for (key, value) in w.as_object().unwrap() {
                if key == "bins" {
                    for (bin, (gb, wb)) in
                        g["bins"].as_array().unwrap().iter().zip(value.as_array().unwrap()).enumerate()
                    {
                        for (k, v) in wb.as_object().unwrap() {
                            same_number(&gb[k], v, &format!("{variant} {block} bin {bin} {k}"));
                        }
                    }
                } else {
                    same_number(&g[key], value, &format!("{variant} {block} {key}"));
                }
            }
        }
    }
    // The Q-Pert report now finds the plain run in the same cache: it is stale, and once recomputed
    // it shows both side by side (reference ITC text-to-image R@1: 16 with Q-Pert, 24 plain).
    let status = common::stdout(&ws.qpert(&["status", "--config", "{config}", "--set", "qpert.projector=principal"]));
    assert!(status.lines().any(|l| l.starts_with("report") && l.contains("baseline: added")), "{status}");
    stage_on(&ws, "principal", &["stage", "report"], device);
    let md = std::fs::read_to_string(ws.path().join("out/report/report.md")).unwrap();
    assert!(md.contains("## Q-Pert against plain BLIP-2 (same cache)"), "{md}");
    assert!(md.contains("| ITC | text to image R@1 | 24.00 | 16.00 | -8.00 |"), "{md}");
}

/// Equal numbers (to 1e-9: recalls are ratios of small counts) or both null.
fn same_number(got: &serde_json::Value, want: &serde_json::Value, what: &str) {
    match (got.as_f64(), want.as_f64()) {
        (Some(g), Some(w)) => assert!((g - w).abs() < 1e-9, "{what}: got {g}, want {w}"),
        _ => assert_eq!(got, want, "{what}"),
    }
}

/// `model.precision = "bf16"` runs every model stage, and the ITC scores of the top-k lists and the
/// ITM logits of the re-ranked pairs stay near the f32 Python reference. Rows are matched by
/// (image, text), since bf16 may reorder near-ties. With Q-Pert the deviation is larger than the
/// per-head bounds of tests/parity.rs (there Pi is given): here Pi itself is built from bf16 keys.
/// Measured worst ITC and ITM deviations (CPU, burn-flex): plain 7.6e-3 and 1.4e-2, principal
/// 6.9e-3 and 1.2e-1. The bounds are about twice those.
#[test]
fn bf16_runs_every_model_stage_near_the_f32_reference() {
    for (variant, itc_bound, itm_bound) in [("plain", 1.5e-2, 3e-2), ("principal", 1.5e-2, 2.5e-1)] {
        let ws = Workspace::new("flickr30k_test.json");
        for name in ["index", "extract", "text", "sim", "rerank"] {
            stage(&ws, variant, &["stage", name, "--set", "model.precision=bf16"]);
        }
        let want = expected(variant);
        let t = ws.table(&folder(variant, "sim"), "i2t_topk");
        let (images, texts, itc) = (u32s(&t, "image_idx"), u32s(&t, "text_idx"), f32s(&t, "itc"));
        assert!(!itc.is_empty());
        let mut itc_worst: f32 = 0.0;
        for row in 0..itc.len() {
            let reference = want["itc"][images[row] as usize][texts[row] as usize].as_f64().unwrap() as f32;
            itc_worst = itc_worst.max((itc[row] - reference).abs());
        }
        let r = parts(&ws, &folder(variant, "rerank"));
        let (images, texts, itm) = (u32s(&r, "image_idx"), u32s(&r, "text_idx"), f32s(&r, "itm"));
        let (mut itm_worst, mut matched): (f32, usize) = (0.0, 0);
        for p in want["pairs"].as_array().unwrap() {
            let key = (p["image"].as_u64().unwrap() as u32, p["text"].as_u64().unwrap() as u32);
            if let Some(row) = (0..itm.len()).find(|&row| (images[row], texts[row]) == key) {
                itm_worst = itm_worst.max((itm[row] - p["itm"].as_f64().unwrap() as f32).abs());
                matched += 1;
            }
        }
        eprintln!(
            "bf16 {variant}: worst ITC deviation {itc_worst:.2e}, worst ITM deviation {itm_worst:.2e} ({matched} pairs)"
        );
        assert!(matched > 0, "{variant}: no re-ranked pair in common with the reference");
        assert!(itc_worst > 1e-4 && itc_worst < itc_bound, "{variant}: bf16 ITC deviation {itc_worst:e}");
        assert!(itm_worst > 1e-4 && itm_worst < itm_bound, "{variant}: bf16 ITM deviation {itm_worst:e}");
    }
}

/// The output folder of `stage` for `variant`: plain BLIP-2 writes the Q-Pert-dependent stages to
/// `<stage>-plain/`.
fn folder(variant: &str, stage: &str) -> String {
    let depends_on_qpert = ["extract", "sim", "rerank", "report"].contains(&stage);
    if variant == "plain" && depends_on_qpert { format!("{stage}-plain") } else { stage.to_string() }
}

fn to_u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn any_sharding_gives_identical_tables() {
    let single = Workspace::new("flickr30k_test.json");
    run_model_stages(&single, "principal", "cpu");
    let sharded = Workspace::new("flickr30k_test.json");
    stage(&sharded, "principal", &["stage", "index"]);
    for (name, count) in [("extract", 2), ("text", 3), ("sim", 1), ("rerank", 3), ("report", 1)] {
        // Out of order on purpose: the stage completes when its last part lands.
        for i in (1..=count).rev() {
            let mut args = vec!["stage", name];
            let shard = format!("{i}/{count}");
            if count > 1 {
                args.extend(["--shard", &shard]);
            }
            stage(&sharded, "principal", &args);
        }
    }
    for name in ["extract", "text", "rerank"] {
        let (a, b) = (parts(&single, name), parts(&sharded, name));
        assert_eq!(a.schema(), b.schema(), "{name} schema");
        for (i, (x, y)) in a.columns().iter().zip(b.columns()).enumerate() {
            assert_eq!(x, y, "{name} column {}", a.schema().field(i).name());
        }
    }
    for table in ["i2t_topk", "t2i_topk", "i2t_ranks", "t2i_ranks"] {
        assert_eq!(single.table("sim", table), sharded.table("sim", table), "sim {table}");
    }
    assert_eq!(report_metrics(&single), report_metrics(&sharded));
}

fn report_metrics(ws: &Workspace) -> String {
    std::fs::read_to_string(ws.path().join("out/report/metrics.json")).unwrap()
}

#[test]
fn changing_alpha_makes_only_the_perturbed_stages_stale() {
    let ws = Workspace::new("flickr30k_test.json");
    run_model_stages(&ws, "principal", "cpu");
    let mut args: Vec<String> = vec!["status".into(), "--config".into(), "{config}".into()];
    args.extend(settings("principal"));
    args.extend(["--set".into(), "qpert.alpha=4".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let status = common::stdout(&ws.qpert(&refs));
    let line = |stage: &str| status.lines().find(|l| l.starts_with(stage)).unwrap_or_default().to_string();
    assert!(line("index").contains("done"), "{status}");
    assert!(line("text").contains("done"), "{status}");
    for stale in ["extract", "sim", "rerank"] {
        assert!(line(stale).contains("stale"), "{stale}: {status}");
    }
    assert!(line("extract").contains("qpert.alpha"), "{status}");
}

/// Runs `qpert run` on `ws`'s config; returns its stdout.
fn run_all(ws: &Workspace) -> String {
    let out = ws.qpert(&["run", "--config", "{config}"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    common::stdout(&out)
}

fn assert_same_artifacts(a: &Workspace, b: &Workspace) {
    for name in ["extract", "text", "rerank"] {
        let (x, y) = (parts(a, name), parts(b, name));
        for (i, (cx, cy)) in x.columns().iter().zip(y.columns()).enumerate() {
            assert_eq!(cx, cy, "{name} column {}", x.schema().field(i).name());
        }
    }
    for table in ["i2t_topk", "t2i_topk", "i2t_ranks", "t2i_ranks"] {
        assert_eq!(a.table("sim", table).columns(), b.table("sim", table).columns(), "sim {table}");
    }
    assert_eq!(report_metrics(a), report_metrics(b));
}

/// SIGKILLs `qpert run` while it is paused inside `blocked`, at the fail point `write-parquet`
/// (the stage's part is written to its temporary file, not yet renamed into place), then resumes:
/// the stages done before are skipped, the temporary file is removed, nothing half-written is
/// read, and the artifacts equal an uninterrupted run.
#[test]
fn a_killed_run_resumes_to_identical_artifacts() {
    let uninterrupted = Workspace::new("flickr30k_test.json");
    run_all(&uninterrupted);
    for (blocked, done_before) in [("extract", &["index"][..]), ("rerank", &["index", "extract", "text", "sim"][..])] {
        let ws = Workspace::new("flickr30k_test.json");
        for name in done_before {
            let out = ws.qpert(&["stage", name, "--config", "{config}"]);
            assert!(out.status.success(), "{name}: {}", stderr(&out));
        }
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_qpert"))
            .args(["run", "--config", &ws.config().display().to_string()])
            .env("FAILPOINTS", "write-parquet=pause")
            .current_dir(ws.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stage_dir = ws.path().join("out").join(blocked);
        let temporary = || -> Vec<String> {
            let names = std::fs::read_dir(&stage_dir).into_iter().flatten().map(|e| e.unwrap().file_name());
            names
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".part-00001-of-00001.parquet."))
                .collect()
        };
        let start = std::time::Instant::now();
        while temporary().is_empty() && start.elapsed().as_secs() < 120 {
            assert!(child.try_wait().unwrap().is_none(), "{blocked}: the run ended instead of pausing");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(child.try_wait().unwrap().is_none(), "{blocked}: the run should be paused in its part's write");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert_eq!(temporary().len(), 1, "{blocked}: the killed run leaves its temporary part");
        assert!(!stage_dir.join("manifest.json").exists(), "{blocked}: no manifest after the kill");
        assert!(!stage_dir.join("part-00001-of-00001.parquet").exists(), "{blocked}: no part after the kill");

        let resumed = run_all(&ws);
        for name in done_before {
            assert!(resumed.contains(&format!("{name}: up to date, skipped")), "{name} must be kept: {resumed}");
        }
        assert_eq!(temporary(), Vec::<String>::new(), "{blocked}: the resumed run removes the temporary part");
        assert_same_artifacts(&uninterrupted, &ws);
    }
}

/// `extract` keeps each batch's Z and Pi (`out/extract/vision/`); `rerank` reading them gives the
/// same bits as recomputing them, and a cache file it cannot use (corrupt, or from another
/// configuration) makes it say so and recompute, with the same result.
#[test]
fn the_vision_cache_gives_the_same_rerank_as_recomputing() {
    let ws = Workspace::new("flickr30k_test.json");
    let out = run_all(&ws);
    assert!(!out.contains("recomputing"), "the cache was used: {out}");
    let vision = ws.path().join("out/extract/vision");
    let files: Vec<_> = std::fs::read_dir(&vision).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(!files.is_empty() && files.iter().all(|f| f.to_string_lossy().ends_with(".arrow")), "{files:?}");
    let cached = parts(&ws, "rerank");

    let rerank = |extra: &[&str]| {
        let mut args = vec!["stage", "rerank", "--config", "{config}", "--force"];
        args.extend_from_slice(extra);
        let out = ws.qpert(&args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(parts(&ws, "rerank").columns(), cached.columns(), "rerank with {extra:?}");
        common::stdout(&out) + &stderr(&out)
    };
    let out = rerank(&["--set", "rerank.vision_cache=false"]);
    assert!(!out.contains("recomputing"), "{out}");

    // A corrupt cache file: named, then recomputed.
    let first = vision.join("batch-000000.arrow");
    let bytes = std::fs::read(&first).unwrap();
    std::fs::write(&first, &bytes[..bytes.len() / 2]).unwrap();
    let out = rerank(&[]);
    assert!(
        out.contains("rerank 1/1: recomputing vision tokens and Q-Pert") && out.contains("batch-000000.arrow"),
        "{out}"
    );

    // A cache written with another batch size does not match the batches of this one.
    std::fs::write(&first, &bytes).unwrap();
    let out = ws.qpert(&["stage", "rerank", "--config", "{config}", "--force", "--set", "model.image_batch=1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let said = common::stdout(&out) + &stderr(&out);
    assert!(said.contains("recomputing vision tokens and Q-Pert") && said.contains("another configuration"), "{said}");

    // Re-extracting with another batch size leaves only that run's files: five batches of one image,
    // then one batch of all five, whose run removes the four files it no longer numbers.
    let cache_files = |batch: &str| {
        let set = format!("model.image_batch={batch}");
        let out = ws.qpert(&["stage", "extract", "--config", "{config}", "--force", "--set", &set]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let mut names: Vec<String> = std::fs::read_dir(&vision)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(cache_files("1").len(), 5);
    assert_eq!(cache_files("8"), ["batch-000000.arrow"]);
}
