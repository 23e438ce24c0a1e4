//! The cluster path without a scheduler: `--shard auto` from each environment form (set on the child
//! process, as Slurm or Kubernetes would), two processes racing for one shard, a stale lock taken
//! over, `--finalize`, `qpert status` with running/stale/missing shards and the rerun command,
//! three shards in parallel processes giving the same artifacts as one process, and a plain `run`
//! finishing the shard layout it finds, and `pipelines/local/run-gpus.sh` (one worker per GPU of
//! one machine). The real scheduler test is `tests/slurm/run.sh`.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use sha2::Digest;

use common::{Workspace, assert_fails, read_parquet, stderr, stdout};

/// Scheduler variables a test might inherit (e.g. when the suite itself runs in a Slurm job).
const SCHEDULER_VARS: [&str; 8] = [
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_MAX",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_STEP",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_JOB_ID",
    "JOB_COMPLETION_INDEX",
];

/// `qpert <args> --config <ws config>` in the workspace with exactly `env` as scheduler variables.
fn qpert_cmd(ws: &Workspace, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qpert"));
    cmd.args(args).arg("--config").arg(ws.config()).current_dir(ws.path());
    for var in SCHEDULER_VARS {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd
}

fn qpert(ws: &Workspace, args: &[&str], env: &[(&str, &str)]) -> Output {
    qpert_cmd(ws, args, env).output().unwrap()
}

fn ok(ws: &Workspace, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = qpert(ws, args, env);
    assert_eq!(out.status.code(), Some(0), "qpert {args:?} {env:?}: {}", stderr(&out));
    stdout(&out)
}

fn parts(ws: &Workspace, stage: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(ws.path().join("out").join(stage))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("part-") && n.ends_with(".parquet"))
        .collect();
    names.sort();
    names
}

fn slurm(id: &'static str, min: &'static str, max: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![("SLURM_ARRAY_TASK_ID", id), ("SLURM_ARRAY_TASK_MIN", min), ("SLURM_ARRAY_TASK_MAX", max)]
}

#[test]
fn shard_auto_takes_the_shard_from_slurm_and_kubernetes_environments() {
    let ws = Workspace::new("flickr30k_test.json");
    ok(&ws, &["stage", "index"], &[]);
    // A Slurm array --array=1-3: N from the array.
    let mut env = slurm("2", "1", "3");
    env.extend([("SLURM_ARRAY_TASK_COUNT", "3"), ("SLURM_ARRAY_TASK_STEP", "1")]);
    assert!(ok(&ws, &["stage", "text", "--shard", "auto"], &env).contains("text 2/3: "));
    // A Kubernetes Indexed Job pod: 0-based index, N from --shards.
    assert!(
        ok(&ws, &["stage", "text", "--shard", "auto", "--shards", "3"], &[("JOB_COMPLETION_INDEX", "0")])
            .contains("text 1/3: ")
    );
    assert_eq!(parts(&ws, "text"), ["part-00001-of-00003.parquet", "part-00002-of-00003.parquet"]);
    // A resubmitted Slurm index (--array=3) says nothing of N: without --shards that is an error.
    assert_fails(
        &qpert(&ws, &["stage", "text", "--shard", "auto"], &slurm("3", "3", "3")),
        2,
        &["SLURM_ARRAY_TASK_MIN=3", "add --shards N"],
    );
    let out = ok(&ws, &["stage", "text", "--shard", "auto", "--shards", "3"], &slurm("3", "3", "3"));
    assert!(out.contains("text 3/3: "), "{out}");
    assert!(ws.path().join("out/text/manifest.json").exists(), "the last shard writes the manifest");

    // No scheduler, an inconsistent array, a pod without --shards, --shards without auto.
    assert_fails(&qpert(&ws, &["stage", "text", "--shard", "auto"], &[]), 2, &["no array task in the environment"]);
    assert_fails(
        &qpert(&ws, &["stage", "text", "--shard", "auto", "--shards", "2"], &slurm("1", "1", "3")),
        2,
        &["SLURM_ARRAY_TASK_MAX=3, more than --shards 2"],
    );
    assert_fails(
        &qpert(&ws, &["stage", "text", "--shard", "auto"], &[("JOB_COMPLETION_INDEX", "1")]),
        2,
        &["add --shards N"],
    );
    assert_fails(
        &qpert(&ws, &["stage", "text", "--shard", "1/3", "--shards", "3"], &[]),
        2,
        &["--shards 3 goes with --shard auto"],
    );
}

/// Shards take whole batches, so 25 captions in 2 batches of 16 leave one of 3 shards empty: it
/// says why, writes its (empty) part, and the stage completes with the other two.
#[test]
fn a_shard_without_a_whole_batch_is_empty_and_says_why() {
    let ws = Workspace::new("flickr30k_test.json");
    ok(&ws, &["stage", "index"], &[]);
    let text = |i: u32| ok(&ws, &["stage", "text", "--shard", &format!("{i}/3"), "--set", "model.text_batch=16"], &[]);
    let first = text(1);
    assert!(
        first.contains("text 1/3: 0 captions -> ")
            && first.contains(
                "(a shard takes whole batches: 25 captions make 2 batches of model.text_batch = 16, fewer than 3 shards)"
            ),
        "{first}"
    );
    for (i, captions) in [(2, 16), (3, 9)] {
        let out = text(i);
        assert!(out.contains(&format!("text {i}/3: {captions} captions -> ")), "{out}");
        assert!(!out.contains("whole batches"), "{out}");
    }
    assert!(ws.path().join("out/text/manifest.json").exists(), "the last shard writes the manifest");
}

/// An interrupted 2-shard run finished with 3 shards: the 3-shard manifest supersedes the 2-shard
/// part, which is removed so that a reader globbing `part-*.parquet` does not count its rows twice.
#[test]
fn the_manifest_of_one_shard_count_removes_the_parts_of_another() {
    let ws = Workspace::new("flickr30k_test.json");
    ok(&ws, &["stage", "index"], &[]);
    ok(&ws, &["stage", "text", "--shard", "1/2"], &[]);
    for i in 1..=3 {
        ok(&ws, &["stage", "text", "--shard", &format!("{i}/3")], &[]);
        let expected = if i < 3 { 1 + i } else { 3 };
        assert_eq!(parts(&ws, "text").len(), expected, "after shard {i}/3: {:?}", parts(&ws, "text"));
    }
    assert_eq!(
        parts(&ws, "text"),
        ["part-00001-of-00003.parquet", "part-00002-of-00003.parquet", "part-00003-of-00003.parquet"]
    );
    assert!(ok(&ws, &["status"], &[]).contains("text     done"), "{}", ok(&ws, &["status"], &[]));
}

/// A process that stays alive until killed, and its start time as the lock file records it.
fn live_process() -> (Child, u64) {
    let child = Command::new("sleep").arg("60").stdout(Stdio::null()).spawn().unwrap();
    let stat = fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
    let start = stat[stat.rfind(')').unwrap() + 1..].split_whitespace().nth(19).unwrap().parse().unwrap();
    (child, start)
}

/// Writes a lock for `shard` of `stage` owned by `pid` on this machine.
fn write_lock(ws: &Workspace, stage: &str, shard: &str, pid: u32, pid_start: u64) {
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    let pid_ns = fs::read_link("/proc/self/ns/pid").unwrap().to_string_lossy().into_owned();
    let lock = serde_json::json!({ "host": host, "pid_ns": pid_ns, "pid": pid, "pid_start": pid_start, "since": 1_795_742_116u64 });
    let dir = ws.path().join("out").join(stage);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(format!("{shard}.lock")), lock.to_string()).unwrap();
}

#[test]
fn a_live_lock_refuses_a_second_worker_and_a_dead_ones_lock_is_taken_over() {
    let ws = Workspace::new("flickr30k_test.json");
    ok(&ws, &["stage", "index"], &[]);
    let (mut holder, start) = live_process();
    write_lock(&ws, "text", "part-00002-of-00002", holder.id(), start);
    let refused = qpert(&ws, &["stage", "text", "--shard", "2/2"], &[]);
    assert_fails(
        &refused,
        1,
        &[
            "part-00002-of-00002.lock: shard 2/2 of text is being computed by host ",
            &format!("pid {} since 2026-11-27T01:15:16Z", holder.id()),
        ],
    );
    assert!(parts(&ws, "text").is_empty(), "nothing written by the refused worker");

    // The holder dies without cleaning up: its lock is stale, status says so, a worker takes over.
    holder.kill().unwrap();
    holder.wait().unwrap();
    let status = ok(&ws, &["status"], &[]);
    assert!(status.contains("stale lock, owner gone [2: host "), "{status}");
    assert!(status.contains(&format!("pid {} is not running", holder.id())), "{status}");
    assert!(ok(&ws, &["stage", "text", "--shard", "2/2"], &[]).contains("text 2/2: "));
    assert!(!ws.path().join("out/text/part-00002-of-00002.lock").exists(), "released after the write");
}

#[test]
fn two_processes_racing_for_one_shard_never_both_compute_it() {
    let ws = Workspace::new("flickr30k_test.json");
    ok(&ws, &["stage", "index"], &[]);
    for round in 0..3 {
        // Each round recomputes the shard from scratch.
        let _ = fs::remove_file(ws.path().join("out/text/part-00001-of-00002.parquet"));
        let spawn = || {
            qpert_cmd(&ws, &["stage", "text", "--shard", "1/2"], &[])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn(), spawn());
        let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
        let computed = outs.iter().filter(|o| stdout(o).contains("text 1/2: ")).count();
        // Either one computed and the other found the part done (it came second), or the other
        // found the shard locked and exited 1 naming the holder. Never both.
        for out in &outs {
            match out.status.code() {
                Some(0) => {}
                Some(1) => assert!(stderr(out).contains("is being computed by"), "{}", stderr(out)), // by host ..., or by an owner still writing its lock
                code => panic!("exit {code:?}: {}", stderr(out)),
            }
        }
        assert_eq!(computed, 1, "round {round}: {:?}", outs.iter().map(|o| (stdout(o), stderr(o))).collect::<Vec<_>>());
    }
    assert_eq!(parts(&ws, "text"), ["part-00001-of-00002.parquet"]);
    let leftovers: Vec<_> = fs::read_dir(ws.path().join("out/text"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn status_lists_every_shard_and_the_command_rerunning_only_the_missing_ones() {
    let ws = Workspace::new("flickr30k_test.json");
    ok(&ws, &["stage", "index"], &[]);
    ok(&ws, &["stage", "extract", "--shard", "1/4"], &[]);
    let (mut holder, start) = live_process();
    write_lock(&ws, "extract", "part-00002-of-00004", holder.id(), start);
    write_lock(&ws, "extract", "part-00004-of-00004", 0, 1);
    let status = ok(&ws, &["status", "--set", "output.dir=out"], &[]);
    let line = status.lines().find(|l| l.starts_with("extract")).unwrap();
    assert!(line.contains("partial: 1 of 4 shards done [1]; running [2: host "), "{line}");
    assert!(line.contains(&format!("pid {} since 2026-11-27T01:15:16Z]", holder.id())), "{line}");
    assert!(line.contains("; stale lock, owner gone [4: host ") && line.ends_with("; missing [3]"), "{line}");
    let config = ws.config().display().to_string();
    let want =
        format!("  for i in 3 4; do qpert stage extract --config {config} --set output.dir=out --shard $i/4; done");
    assert!(status.lines().any(|l| l == want), "want `{want}` in:\n{status}");
    assert!(status.contains("extract: to finish, rerun only shards 3, 4 of 4:"), "{status}");
    assert!(status.contains("  Slurm: sbatch --array=3,4 <job script running: qpert stage extract"), "{status}");
    assert!(status.contains("(shards 2 are running: leave them)"), "{status}");

    // --finalize refuses while shards are missing, and completes the stage once they are all there.
    assert_fails(
        &qpert(&ws, &["stage", "extract", "--finalize"], &[]),
        1,
        &["cannot finalize: shards 2, 3, 4 of 4 are not done"],
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    for i in 2..=4 {
        ok(&ws, &["stage", "extract", "--shard", &format!("{i}/4")], &[]);
    }
    let manifest = ws.path().join("out/extract/manifest.json");
    assert!(manifest.exists());
    fs::remove_file(&manifest).unwrap(); // as if the last worker died before writing it
    assert!(ok(&ws, &["status"], &[]).lines().any(|l| l.starts_with("extract  partial: 4 of 4 shards done")));
    assert!(ok(&ws, &["stage", "extract", "--finalize"], &[]).contains("extract: complete, 4 parts, 5 rows"));
    let status = ok(&ws, &["status"], &[]);
    assert!(status.lines().any(|l| l.starts_with("extract  done (4 files, 4 shard(s)")), "{status}");
    assert!(!status.contains("to finish"), "{status}");
    assert_fails(&qpert(&ws, &["stage", "sim", "--finalize"], &[]), 2, &["stage sim is not sharded"]);
}

/// The parquet part files and tables of a stage, by name, as bytes.
fn stage_files(root: &Path, stage: &str) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(root.join(stage))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    files
}

#[test]
fn three_shards_in_parallel_processes_equal_one_process() {
    let single = Workspace::new("flickr30k_test.json");
    for stage in ["index", "extract", "text", "sim", "rerank"] {
        ok(&single, &["stage", stage], &[]);
    }
    let sharded = Workspace::new("flickr30k_test.json");
    for stage in ["index", "extract", "text", "sim", "rerank"] {
        if matches!(stage, "index" | "sim") {
            ok(&sharded, &["stage", stage], &[]);
            continue;
        }
        // Three Kubernetes-style workers at once.
        let workers: Vec<Child> = ["0", "1", "2"]
            .iter()
            .map(|&i| {
                qpert_cmd(
                    &sharded,
                    &["stage", stage, "--shard", "auto", "--shards", "3"],
                    &[("JOB_COMPLETION_INDEX", i)],
                )
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
            })
            .collect();
        for worker in workers {
            let out = worker.wait_with_output().unwrap();
            assert_eq!(out.status.code(), Some(0), "{stage}: {}", stderr(&out));
        }
        assert!(
            sharded.path().join("out").join(stage).join("manifest.json").exists(),
            "{stage}: manifest written by the last worker"
        );
    }
    let (a, b) = (single.path().join("out"), sharded.path().join("out"));
    for stage in ["extract", "text", "rerank"] {
        let (x, y) = (read_parts(&a, stage), read_parts(&b, stage));
        assert_eq!(x, y, "{stage}: the three parts concatenated equal the single part");
    }
    // Unsharded stages downstream of sharded ones: the same files, byte for byte.
    assert_eq!(stage_files(&a, "sim"), stage_files(&b, "sim"));
    // A plain run afterwards finds the sharded stages done: nothing is computed again in one piece.
    let run = ok(&sharded, &["run"], &[]);
    for stage in ["index", "extract", "text", "sim", "rerank"] {
        assert!(run.contains(&format!("{stage}: up to date, skipped")), "{run}");
    }
    for stage in ["extract", "text", "rerank"] {
        assert!(!b.join(stage).join("part-00001-of-00001.parquet").exists(), "{stage}");
    }
}

#[test]
fn a_plain_run_computes_only_the_shards_missing_from_the_layout_it_finds() {
    let ws = Workspace::new("flickr30k_test.json");
    ok(&ws, &["stage", "index"], &[]);
    for shard in ["1/3", "3/3"] {
        ok(&ws, &["stage", "text", "--shard", shard], &[]);
    }
    let run = ok(&ws, &["run"], &[]);
    assert!(run.contains("text: 2 of 3 shards are done; computing the rest of that layout: 2\n"), "{run}");
    assert!(run.contains("text 2/3: "), "{run}");
    assert!(!run.contains("text 1/3: ") && !run.contains("text 3/3: "), "done shards are not recomputed: {run}");
    let three = ["part-00001-of-00003.parquet", "part-00002-of-00003.parquet", "part-00003-of-00003.parquet"];
    assert_eq!(parts(&ws, "text"), three);
    assert!(ws.path().join("out/report/manifest.json").exists());

    // A damaged part is recomputed alone, in the same layout.
    let part = ws.path().join("out/text/part-00003-of-00003.parquet");
    let bytes = fs::read(&part).unwrap();
    fs::write(&part, &bytes[..bytes.len() / 3]).unwrap();
    let status = ok(&ws, &["status"], &[]);
    assert!(status.contains("text     damaged (part-00003-of-00003.parquet: not a readable Parquet file"), "{status}");
    assert!(status.contains("--shard $i/3"), "the rerun command names the layout: {status}");
    let run = ok(&ws, &["run"], &[]);
    assert!(run.contains("text: 2 of 3 shards are done; computing the rest of that layout: 3\n"), "{run}");
    assert!(run.contains("sim: up to date, skipped"), "{run}");
    assert_eq!(parts(&ws, "text"), three);
    assert_eq!(ok(&ws, &["status"], &[]).matches(" done (").count(), 6);
}

/// Nodes with their own copy of the model: a copy with other modification times (a plain `cp`, a
/// separate download) makes the same parts, as the fingerprint names the weights by content (hashed
/// once per copy, remembered in `out/content-hashes.json`); a copy whose weights differ stamps
/// another fingerprint on its parts, and `status` says which entry differs.
#[test]
fn copies_of_the_model_agree_whatever_their_times_and_status_names_weights_that_differ() {
    let ws = Workspace::new("flickr30k_test.json");
    let model = ws.path().join("model");
    fs::create_dir(&model).unwrap();
    for entry in fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_blip2_a")).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
    }
    let weights = model.join("model.safetensors");
    let set_mtime = |secs: u64| {
        let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        fs::File::options().write(true).open(&weights).unwrap().set_modified(time).unwrap();
    };
    let set = format!("model.dir={}", model.display());
    let text = |shard: &str| ok(&ws, &["stage", "text", "--shard", shard, "--set", &set], &[]);
    let text_line = || {
        let status = ok(&ws, &["status", "--set", &set], &[]);
        status.lines().find(|l| l.starts_with("text")).unwrap().to_string()
    };
    ok(&ws, &["stage", "index"], &[]);
    set_mtime(1_700_000_000);
    text("1/2");
    set_mtime(1_700_000_060);
    text("2/2");
    assert!(text_line().starts_with("text     done (2 files, 2 shard(s)"), "{}", text_line());
    let cache = fs::read_to_string(ws.path().join("out/content-hashes.json")).unwrap();
    let cache: Vec<serde_json::Value> = serde_json::from_str(&cache).unwrap();
    let times: Vec<&serde_json::Value> = cache
        .iter()
        .filter(|e| e["path"].as_str().unwrap().ends_with("model.safetensors"))
        .map(|e| &e["mtime_ns"])
        .collect();
    assert_eq!(times, [1_700_000_000_000_000_000u64, 1_700_000_060_000_000_000], "one entry per copy: {cache:?}");

    // The same size and tensor layout, one weight changed: shard 2's part is now stale.
    let sha =
        |bytes: &[u8]| -> String { sha2::Sha256::digest(bytes).iter().take(6).map(|b| format!("{b:02x}")).collect() };
    let mut bytes = fs::read(&weights).unwrap();
    let before = sha(&bytes);
    *bytes.last_mut().unwrap() ^= 0x01;
    fs::write(&weights, &bytes).unwrap();
    text("1/2");
    assert_eq!(
        text_line(),
        format!(
            "text     partial: 1 of 2 shards done [1]; stale [2] (model.model.safetensors: sha256 {before} -> sha256 {})",
            sha(&bytes)
        )
    );
    text("2/2");
    assert!(text_line().starts_with("text     done (2 files, 2 shard(s)"), "{}", text_line());
}

fn read_parts(root: &Path, stage: &str) -> arrow::record_batch::RecordBatch {
    let batches: Vec<_> =
        stage_files(root, stage).iter().map(|(name, _)| read_parquet(&root.join(stage).join(name))).collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

/// `pipelines/local/run-gpus.sh <--gpus LIST>` in the workspace, with the test's binary and config.
fn run_gpus(ws: &Workspace, gpus: &str) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/local/run-gpus.sh");
    // The binary behind a wrapper that records each call's CUDA_VISIBLE_DEVICES and arguments, and
    // makes the first workers of extract and rerank slow (to see workers reported as they end, not
    // in shard order, and text's workers running beside extract's).
    let wrapper = ws.path().join("qpert-wrapper");
    let record = format!(
        "#!/bin/sh\necho \"$CUDA_VISIBLE_DEVICES $*\" >> calls.txt\n\
         case \"$*\" in *'stage rerank '*'--shard 1/3'* | *'stage extract '*'--shard 1/3'*) sleep 2 ;; esac\n\
         exec '{}' \"$@\"\n",
        env!("CARGO_BIN_EXE_qpert")
    );
    fs::write(&wrapper, record).unwrap();
    fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut cmd = Command::new("bash");
    cmd.arg(script).args(["--gpus", gpus]).current_dir(ws.path());
    cmd.env("QPERT", &wrapper).env("QPERT_CONFIG", ws.config()).env("QPERT_LOGS", "logs");
    for var in SCHEDULER_VARS.iter().chain(&["CUDA_VISIBLE_DEVICES"]) {
        cmd.env_remove(var);
    }
    cmd.output().unwrap()
}

/// The one-machine path: one worker per listed GPU, each seeing only its own GPU and reported when
/// it ends, text's workers beside extract's; a worker that fails stops the script before the stages
/// after it, a rerun computes only what is missing, and the artifacts equal one process's.
#[test]
fn the_local_gpu_script_runs_a_worker_per_gpu_and_resumes_after_a_failed_one() {
    let single = Workspace::new("flickr30k_test.json");
    ok(&single, &["run"], &[]);

    // First text's shard 3 is held by another process: extract and text run, nothing after them.
    let ws = Workspace::new("flickr30k_test.json");
    let (mut holder, start) = live_process();
    write_lock(&ws, "text", "part-00003-of-00003", holder.id(), start);
    let out = run_gpus(&ws, "4,5,GPU-7");
    assert_eq!(out.status.code(), Some(1), "{}\n{}", stdout(&out), stderr(&out));
    let said = stdout(&out);
    assert!(said.contains("run-gpus: extract 2/3 on GPU 5: ok ("), "{said}");
    assert!(said.contains("): extract 2/3: 2 images (1 perturbed) -> out/extract\n"), "{said}");
    let (text_done, extract_done) = ("run-gpus: text 1/3 on GPU 4: ok (", "run-gpus: extract 1/3 on GPU 4: ok (");
    assert!(said.contains(text_done) && said.contains(extract_done), "{said}");
    assert!(said.find(text_done) < said.find(extract_done), "text runs beside extract: {said}");
    assert!(said.contains("run-gpus: text 3/3 on GPU GPU-7: FAILED (exit 1): qpert: "), "{said}");
    assert!(
        said.contains("run-gpus: text failed in shard(s) 3 of 3 (logs above)") && !said.contains("extract failed"),
        "{said}"
    );
    assert!(!said.contains("run-gpus: rerank") && !said.contains("ITC scores"), "sim and rerank wait: {said}");

    // Then rerank's shard 2 is held: the script gets as far as rerank.
    fs::remove_file(ws.path().join("out/text/part-00003-of-00003.lock")).unwrap();
    write_lock(&ws, "rerank", "part-00002-of-00003", holder.id(), start);
    let out = run_gpus(&ws, "4,5,GPU-7");
    assert_eq!(out.status.code(), Some(1), "{}\n{}", stdout(&out), stderr(&out));
    let said = stdout(&out);
    assert!(said.contains("): text 3/3: "), "the missing text shard is computed: {said}");
    let (done, failed) =
        ("run-gpus: rerank 1/3 on GPU 4: ok (", "run-gpus: rerank 2/3 on GPU 5: FAILED (exit 1): qpert: ");
    assert!(said.contains(done) && said.contains(failed), "{said}");
    assert!(said.find(failed) < said.find(done), "the failed worker is named before the slow one ends: {said}");
    assert!(said.contains("shard 2/3 of rerank is being computed by host "), "{said}");
    assert!(
        said.contains("run-gpus: rerank failed in shard(s) 2 of 3 (logs above); fix the cause and rerun"),
        "{said}"
    );
    assert!(said.trim_end().ends_with("done shards are skipped"), "report is not started: {said}");
    let calls = fs::read_to_string(ws.path().join("calls.txt")).unwrap();
    let config = ws.config().display().to_string();
    for (gpu, stage, shard) in [
        ("4", "index", ""),
        ("GPU-7", "extract", " --shard 3/3"),
        ("5", "text", " --shard 2/3"),
        ("4", "sim", ""),
        ("4", "rerank", " --shard 1/3"),
    ] {
        let call = format!("{gpu} stage {stage} --config {config}{shard}");
        assert!(calls.lines().any(|l| l == call), "each worker sees its own GPU: `{call}` in\n{calls}");
    }
    let log = fs::read_to_string(ws.path().join("logs/extract-3-of-3.log")).unwrap();
    assert!(log.contains(" CUDA_VISIBLE_DEVICES=GPU-7: ") && log.contains(" --shard 3/3"), "{log}");

    holder.kill().unwrap();
    holder.wait().unwrap();
    let out = run_gpus(&ws, "4,5,GPU-7");
    assert_eq!(out.status.code(), Some(0), "{}\n{}", stdout(&out), stderr(&out));
    let said = stdout(&out);
    assert!(said.contains("run-gpus: extract 1/3 on GPU 4: ok (") && said.contains("extract: up to date"), "{said}");
    assert!(said.contains("run-gpus: rerank 2/3 on GPU 5: ok ("), "{said}");
    assert!(said.contains("): rerank 2/3: "), "the missing shard is computed: {said}");
    assert!(!said.contains("): rerank 1/3: ") && !said.contains("): rerank 3/3: "), "done shards are kept: {said}");
    assert!(said.contains("run-gpus: done up to report"), "{said}");

    let (a, b) = (single.path().join("out"), ws.path().join("out"));
    for stage in ["extract", "text", "rerank"] {
        assert_eq!(read_parts(&a, stage), read_parts(&b, stage), "{stage}");
    }
    for stage in ["sim", "report"] {
        assert_eq!(stage_files(&a, stage), stage_files(&b, stage), "{stage}");
    }
    let bad = run_gpus(&ws, "0,,1");
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).starts_with("run-gpus.sh: --gpus 0,,1: an empty entry\nusage: "), "{}", stderr(&bad));
}
