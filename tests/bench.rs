//! `qpert bench` end to end on CPU through the binary: the tiny configuration on four synthetic
//! images runs every stage, and the table and projections come out with plausible numbers; the
//! random model it writes loads back with identical weights.

use std::process::Command;

/// The table row of `stage` (below the header; stage messages come before it), split on whitespace.
fn row<'a>(stdout: &'a str, stage: &str) -> Vec<&'a str> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("stage "))
        .find(|l| l.split_whitespace().next() == Some(stage))
        .unwrap_or_else(|| panic!("no `{stage}` row in:\n{stdout}"))
        .split_whitespace()
        .collect()
}

#[test]
fn bench_tiny_reports_every_stage_and_projections() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_qpert"))
        .args(["bench", "--model-config", "tiny", "--images", "4", "--k", "3", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains(
            "model tiny in f32 (explicit attention), 4 images x 5 captions, 8 boxes per image, k = 3, on cpu"
        ),
        "{stdout}"
    );

    // Columns: stage items unit wall load items/s GFLOP TFLOP/s preproc eigen waited autotune(2 words) host GPU.
    for (stage, items, unit) in
        [("index", 4.0, "images"), ("extract", 4.0, "images"), ("text", 20.0, "texts"), ("sim", 80.0, "pairs")]
    {
        let r = row(&stdout, stage);
        assert_eq!(r[1].parse::<f64>().unwrap(), items, "{stage}: {r:?}");
        assert_eq!(r[2], unit);
        assert!(r[3].parse::<f64>().unwrap() > 0.0, "wall {r:?}");
        assert!(r[5].parse::<f64>().unwrap() > 0.0, "throughput {r:?}");
        assert_eq!(&r[11..13], ["n/a", "(cpu)"], "autotune is GPU only: {r:?}");
        assert!(r[13].parse::<f64>().unwrap() > 0.0, "host memory {r:?}");
        assert_eq!(r[14], "n/a", "no GPU memory on CPU: {r:?}");
    }
    // k = 3 both ways over 4 images x 20 texts: 4*3 i2t pairs and all 20*3 t2i pairs, union in [60, 72].
    let rerank = row(&stdout, "rerank");
    let pairs: f64 = rerank[1].parse().unwrap();
    assert!((60.0..=72.0).contains(&pairs), "{rerank:?}");
    assert!(rerank[7].parse::<f64>().unwrap() > 0.0, "TFLOP/s {rerank:?}");
    // Extract decoded the JPEGs and ran the eigendecompositions: both counters moved, and the
    // model side's wait for them is part of the stage's wall time.
    let extract = row(&stdout, "extract");
    let (wall, preprocess, eigen, waited): (f64, f64, f64, f64) = (
        extract[3].parse().unwrap(),
        extract[8].parse().unwrap(),
        extract[9].parse().unwrap(),
        extract[10].parse().unwrap(),
    );
    assert!(preprocess > 0.0 && eigen > 0.0 && (0.0..=wall).contains(&waited), "{extract:?}");

    for (name, line) in [
        ("flickr30k", "1000 images x 5000 texts, k = 64, <= 384000 ITM pairs"),
        ("coco", "5000 images x 25010 texts, k = 128, <= 3841280 ITM pairs"),
    ] {
        let projection =
            stdout.lines().find(|l| l.starts_with(&format!("projected {name}:"))).unwrap_or_else(|| panic!("{stdout}"));
        assert!(projection.contains(line), "{projection}");
        let seconds: f64 =
            projection.split("ITM pairs: ").nth(1).unwrap().split(" s ").next().unwrap().parse().unwrap();
        assert!(seconds > 0.0 && seconds.is_finite(), "{projection}");
    }

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["stages"].as_array().unwrap().len(), 5);
    // The weights are loaded once per run, by extract; text and rerank reuse them.
    let load = |stage: &str| {
        report["stages"].as_array().unwrap().iter().find(|s| s["stage"] == stage).unwrap()["load_s"].as_f64().unwrap()
    };
    assert!(load("extract") > 0.0, "{report}");
    assert_eq!((load("text"), load("rerank")), (0.0, 0.0), "{report}");
    assert_eq!(report["projections"][0]["pairs"], 384000.0);
    // Both Z options measured: the tiny model's Z is 17 x 48 f16 values per image.
    let z = &report["z_cache"];
    assert_eq!(z["mib_per_image"].as_f64().unwrap(), (17 * 48 * 2) as f64 / (1024.0 * 1024.0));
    assert!(z["recompute_ms"].as_f64().unwrap() > 0.0 && z["store_and_load_ms"].as_f64().unwrap() > 0.0, "{z}");
    assert!(stdout.lines().any(|l| l.starts_with("Z cache (")), "{stdout}");
    // The vision tower alone, timed with every attention kernel.
    let kernels = report["vision_ms_per_image"].as_array().unwrap();
    assert_eq!(kernels.iter().map(|k| k[0].as_str().unwrap()).collect::<Vec<_>>(), ["explicit", "aligned", "fused"]);
    assert!(kernels.iter().all(|k| k[1].as_f64().unwrap() > 0.0), "{kernels:?}");
    assert!(stdout.contains("vision tower alone (f32, batch of 4): explicit "), "{stdout}");
    // ITM alone, with the vision tokens as they are and padded (17 -> 64 for the tiny model).
    let itm = report["itm_pairs_per_s"].as_array().unwrap();
    assert_eq!(itm.iter().map(|k| k[0].as_str().unwrap()).collect::<Vec<_>>(), ["explicit", "aligned"]);
    assert!(itm.iter().all(|k| k[1].as_f64().unwrap() > 0.0), "{itm:?}");
    assert!(stdout.contains("ITM alone (f32, 128 pairs of 24-token texts over 4 images): explicit "), "{stdout}");
    // ITM on chunks four times larger, with the run's kernel.
    let large = &report["itm_large_chunk"];
    assert_eq!(large[0], 512, "{large}");
    assert!(large[1].as_f64().is_some_and(|v| v > 0.0), "{large}");
    assert!(stdout.contains("ITM alone (f32, explicit attention) on chunks of 512 pairs: "), "{stdout}");
    // ITM with every pair on another image: the worst layout for the per-image cross-attention.
    assert!(report["itm_short_runs"].as_f64().is_some_and(|v| v > 0.0), "{}", report["itm_short_runs"]);
    assert!(
        stdout.contains("ITM alone (f32, explicit attention) with each pair on another image (runs of 1, not 64): "),
        "{stdout}"
    );
    // The same shapes' matrix products alone, with their TFLOP/s from the counted FLOPs.
    let floor = &report["matmul_floor"];
    assert_eq!(floor["vision_attention_len"], 24, "{floor}"); // 17 tokens, keys padded to a multiple of 8
    for field in ["vision_ms_per_image", "vision_tflops", "itm_pairs_per_s", "itm_tflops"] {
        assert!(floor[field].as_f64().is_some_and(|v| v > 0.0 && v.is_finite()), "{field}: {floor}");
    }
    assert!(
        stdout.contains("matmuls alone (f32, the shapes above, attention over 24 tokens): vision tower "),
        "{stdout}"
    );
}

#[test]
fn bench_rejects_a_missing_config_file_with_one_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_qpert"))
        .args(["bench", "--model-config", "no/such/config.json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("qpert: no/such/config.json: cannot read"), "{err}");
}

#[test]
fn a_saved_random_model_loads_back_with_the_same_weights() {
    use burn::tensor::{Device, Tensor};
    use qpert::model::Blip2Model;

    let dir = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let config = qpert::bench::ModelChoice::Tiny.config().unwrap();
    let model = Blip2Model::init_random(&config, 3, &device).unwrap();
    qpert::bench::synthetic::write_model(dir.path(), &config, 3, &device).unwrap();
    let loaded = Blip2Model::load(dir.path(), &device).unwrap();
    let z = Tensor::<3>::ones([1, config.vision_config.num_tokens(), config.vision_config.hidden_size], &device);
    let a = model.image_features(z.clone(), None).unwrap().into_data().try_to_vec::<f32>().unwrap();
    let b = loaded.image_features(z, None).unwrap().into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(a, b, "same seed, same weights, same features");
    let pixels = Tensor::<4>::zeros([1, 3, config.vision_config.image_size, config.vision_config.image_size], &device);
    let za = model.vision_tokens(pixels.clone()).unwrap().into_data().try_to_vec::<f32>().unwrap();
    let zb = loaded.vision_tokens(pixels).unwrap().into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(za, zb);
}

/// On the CubeCL backend (wgpu over Mesa's lavapipe on a CPU, `make test-cubecl`) the bench takes
/// its GPU path: a warm-up run, and each stage's autotuning and compilation time as the difference
/// from it. The first `extract` compiles and tunes every kernel of the vision tower, so it is > 0.
/// The probes run there as well.
#[cfg(feature = "wgpu")]
#[test]
fn bench_on_the_cubecl_backend_reports_autotuning() {
    let out = Command::new(env!("CARGO_BIN_EXE_qpert"))
        .args(["bench", "--model-config", "tiny", "--images", "4", "--k", "3", "--device", "wgpu", "--warmup"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("8 boxes per image, k = 3, on wgpu"), "{stdout}");
    for stage in ["index", "extract", "text", "sim", "rerank"] {
        let r = row(&stdout, stage);
        let autotune: f64 = r[11].parse().unwrap_or_else(|_| panic!("autotune seconds: {r:?}"));
        assert!(autotune >= 0.0, "{r:?}");
        if stage == "extract" {
            assert!(autotune > 0.0, "the warm-up compiled the vision tower: {r:?}");
        }
        assert_eq!(r[13], "n/a", "no nvidia-smi, no GPU memory: {r:?}");
    }
    // The probes ran on the device too, the matmul floor included (a failed one prints "failed"
    // or "n/a").
    for prefix in ["vision tower alone (", "ITM alone (", "matmuls alone ("] {
        let line = stdout.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix}: {stdout}"));
        assert!(!line.contains("failed") && !line.contains("n/a"), "{line}");
    }
}
