//! The command line's cluster path: `--shard auto` takes I and N from the scheduler's environment,
//! and `qpert status` prints the commands that rerun only the shards not done.
//!
//! `--shard auto` reads, in a
//! * **Slurm job array** (`sbatch --array=1-N`): I = `SLURM_ARRAY_TASK_ID` (1-based: array indices
//!   are shard indices, so resubmitting `--array=2` reruns shard 2); N = `--shards N`, or, without it,
//!   `SLURM_ARRAY_TASK_MAX` of an array that runs exactly 1..=N (`SLURM_ARRAY_TASK_MIN` = 1, step 1,
//!   `SLURM_ARRAY_TASK_COUNT` = N). A resubmission of some indices must give `--shards N`.
//! * **Kubernetes Indexed Job**: I = `JOB_COMPLETION_INDEX` + 1 (it is 0-based); N = `--shards N`,
//!   the Job's `completions` (a pod cannot read it from its environment).
//!
//! Anything else (no array variables, both schedulers' variables, an index outside 1..=N, an array
//! that contradicts `--shards`) is a usage error (exit 2) saying what was found.

use std::fmt;
use std::str::FromStr;

use super::args::CommonArgs;
use crate::error::{Error, Result};
use crate::stages::cluster::ShardTable;
use crate::store::Shard;

/// The value of `--shard`: a fixed `I/N`, or `auto` (from the scheduler's environment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardArg {
    /// `--shard I/N`.
    Fixed(Shard),
    /// `--shard auto`.
    Auto,
}

impl FromStr for ShardArg {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s == "auto" { Ok(ShardArg::Auto) } else { s.parse().map(ShardArg::Fixed) }
    }
}

impl fmt::Display for ShardArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShardArg::Fixed(shard) => shard.fmt(f),
            ShardArg::Auto => f.write_str("auto"),
        }
    }
}

/// The shard a worker runs: `--shard I/N` as given, or `--shard auto` resolved with `lookup` (the
/// process environment in the CLI). `--shards` only goes with `--shard auto`.
pub fn resolve_shard(
    shard: Option<ShardArg>,
    shards: Option<u32>,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Option<Shard>> {
    match (shard, shards) {
        (Some(ShardArg::Auto), _) => shard_from_env(shards, lookup).map(Some),
        (_, Some(n)) => Err(Error::Usage(format!("--shards {n} goes with --shard auto (or --finalize)"))),
        (Some(ShardArg::Fixed(shard)), None) => Ok(Some(shard)),
        (None, None) => Ok(None),
    }
}

/// I and N from a Slurm job array or a Kubernetes Indexed Job (see the module doc).
pub fn shard_from_env(shards: Option<u32>, lookup: impl Fn(&str) -> Option<String>) -> Result<Shard> {
    let var = |name: &str| -> Result<Option<u32>> {
        lookup(name)
            .map(|v| {
                v.trim()
                    .parse::<u32>()
                    .map_err(|_| Error::Usage(format!("--shard auto: {name}={v} is not a non-negative integer")))
            })
            .transpose()
    };
    let (slurm, k8s) = (var("SLURM_ARRAY_TASK_ID")?, var("JOB_COMPLETION_INDEX")?);
    let shard = match (slurm, k8s) {
        (Some(id), Some(index)) => {
            return Err(Error::Usage(format!(
                "--shard auto: both SLURM_ARRAY_TASK_ID={id} and JOB_COMPLETION_INDEX={index} are set; \
                 use --shard I/N to say which shard this is"
            )));
        }
        (Some(0), None) => {
            return Err(Error::Usage(
                "--shard auto: SLURM_ARRAY_TASK_ID=0, but array indices are 1-based shard indices: submit with --array=1-N".into(),
            ));
        }
        (Some(id), None) => Shard::new(id, shards.map_or_else(|| slurm_count(&var), Ok)?),
        (None, Some(index)) => {
            let n = shards.ok_or_else(|| {
                Error::Usage(format!(
                    "--shard auto: JOB_COMPLETION_INDEX={index} (a Kubernetes Indexed Job) does not say how many \
                     shards there are: add --shards N with N = the Job's completions"
                ))
            })?;
            Shard::new(index + 1, n)
        }
        (None, None) => {
            let slurm_job =
                lookup("SLURM_JOB_ID").map(|id| format!(" (Slurm job {id} is not an array job)")).unwrap_or_default();
            return Err(Error::Usage(format!(
                "--shard auto: no array task in the environment{slurm_job}: expected SLURM_ARRAY_TASK_ID (sbatch \
                 --array=1-N) or JOB_COMPLETION_INDEX (a Kubernetes Indexed Job); elsewhere use --shard I/N"
            )));
        }
    };
    let shard = shard.map_err(|e| Error::Usage(format!("--shard auto: {e} (from {})", describe_env(&lookup))))?;
    if let (Some(n), Some(max)) = (shards, var("SLURM_ARRAY_TASK_MAX")?)
        && max > n
    {
        return Err(Error::Usage(format!(
            "--shard auto: the array runs up to SLURM_ARRAY_TASK_MAX={max}, more than --shards {n}"
        )));
    }
    Ok(shard)
}

/// N of a Slurm array that runs exactly 1..=N.
fn slurm_count(var: &dyn Fn(&str) -> Result<Option<u32>>) -> Result<u32> {
    let (min, max) = (var("SLURM_ARRAY_TASK_MIN")?, var("SLURM_ARRAY_TASK_MAX")?);
    let (step, count) = (var("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1), var("SLURM_ARRAY_TASK_COUNT")?);
    let (Some(min), Some(max)) = (min, max) else {
        return Err(Error::Usage(
            "--shard auto: SLURM_ARRAY_TASK_MIN/_MAX are not set, so the shard count is unknown: add --shards N".into(),
        ));
    };
    if min != 1 || step != 1 || count.is_some_and(|c| c != max) {
        let count = count.map(|c| format!(", SLURM_ARRAY_TASK_COUNT={c}")).unwrap_or_default();
        return Err(Error::Usage(format!(
            "--shard auto: the array (SLURM_ARRAY_TASK_MIN={min}, _MAX={max}, _STEP={step}{count}) is not 1..=N, \
             so N cannot be inferred (resubmitting some shards?): add --shards N"
        )));
    }
    Ok(max)
}

fn describe_env(lookup: &impl Fn(&str) -> Option<String>) -> String {
    let names = ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "JOB_COMPLETION_INDEX"];
    let set: Vec<String> = names.iter().filter_map(|n| lookup(n).map(|v| format!("{n}={v}"))).collect();
    set.join(", ")
}

/// The lines `qpert status` prints for a stage with shards to rerun: a shell loop running just those
/// shards, and the Slurm resubmission of just those array indices.
pub fn rerun_commands(table: &ShardTable, common: &CommonArgs) -> Vec<String> {
    let mut args = format!("--config {}", shell_quote(&common.config.to_string_lossy()));
    for set in &common.overrides {
        args += &format!(" --set {}", shell_quote(set));
    }
    let (stage, n) = (table.stage, table.count);
    let shards: Vec<String> = table.to_rerun().iter().map(u32::to_string).collect();
    let mut lines = vec![format!("{stage}: to finish, rerun only shards {} of {n}:", shards.join(", "))];
    lines.push(format!("  for i in {}; do qpert stage {stage} {args} --shard $i/{n}; done", shards.join(" ")));
    lines.push(format!(
        "  Slurm: sbatch --array={} <job script running: qpert stage {stage} {args} --shard auto --shards {n}>",
        shards.join(",")
    ));
    if !table.running.is_empty() {
        let running: Vec<String> = table.running.iter().map(|(i, _)| i.to_string()).collect();
        lines.push(format!("  (shards {} are running: leave them)", running.join(", ")));
    }
    lines
}

/// `s` as one shell word: unchanged when safe, else single-quoted.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn auto(vars: &[(&str, &str)], shards: Option<u32>) -> Result<Shard> {
        let env: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        shard_from_env(shards, |name| env.get(name).cloned())
    }

    fn slurm(id: u32, min: u32, max: u32) -> Vec<(&'static str, String)> {
        vec![
            ("SLURM_ARRAY_TASK_ID", id.to_string()),
            ("SLURM_ARRAY_TASK_MIN", min.to_string()),
            ("SLURM_ARRAY_TASK_MAX", max.to_string()),
            ("SLURM_ARRAY_TASK_COUNT", (max - min + 1).to_string()),
            ("SLURM_ARRAY_TASK_STEP", "1".to_string()),
        ]
    }

    fn run(vars: &[(&'static str, String)], shards: Option<u32>) -> Result<Shard> {
        let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        auto(&refs, shards)
    }

    #[test]
    fn slurm_arrays_give_one_based_shards() {
        assert_eq!(run(&slurm(2, 1, 3), None).unwrap(), Shard::new(2, 3).unwrap());
        assert_eq!(run(&slurm(3, 1, 3), Some(3)).unwrap(), Shard::new(3, 3).unwrap());
        // Only MIN and MAX (older Slurm): still 1..=N.
        assert_eq!(
            auto(&[("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_MIN", "1"), ("SLURM_ARRAY_TASK_MAX", "4")], None)
                .unwrap(),
            Shard::new(1, 4).unwrap()
        );
        // A resubmitted index (--array=2) knows N only from --shards.
        assert_eq!(run(&slurm(2, 2, 2), Some(3)).unwrap(), Shard::new(2, 3).unwrap());
        let err = run(&slurm(2, 2, 2), None).unwrap_err().to_string();
        assert!(err.contains("SLURM_ARRAY_TASK_MIN=2") && err.contains("add --shards N"), "{err}");
    }

    #[test]
    fn inconsistent_slurm_arrays_are_usage_errors() {
        let mut stepped = slurm(3, 1, 5);
        stepped[4].1 = "2".into();
        stepped[3].1 = "3".into();
        assert!(run(&stepped, None).unwrap_err().to_string().contains("_STEP=2"));
        assert_eq!(run(&stepped, Some(5)).unwrap(), Shard::new(3, 5).unwrap());
        let err = run(&slurm(2, 1, 4), Some(3)).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("SLURM_ARRAY_TASK_MAX=4, more than --shards 3"), "{err}");
        assert!(run(&slurm(0, 0, 2), None).unwrap_err().to_string().contains("1-based"));
        let err = run(&slurm(5, 5, 5), Some(3)).unwrap_err().to_string();
        assert!(err.contains("out of range") && err.contains("SLURM_ARRAY_TASK_ID=5"), "{err}");
        assert!(auto(&[("SLURM_ARRAY_TASK_ID", "x")], None).unwrap_err().to_string().contains("SLURM_ARRAY_TASK_ID=x"));
    }

    #[test]
    fn kubernetes_indexed_jobs_are_zero_based_and_need_shards() {
        assert_eq!(auto(&[("JOB_COMPLETION_INDEX", "0")], Some(3)).unwrap(), Shard::new(1, 3).unwrap());
        assert_eq!(auto(&[("JOB_COMPLETION_INDEX", "2")], Some(3)).unwrap(), Shard::new(3, 3).unwrap());
        assert!(auto(&[("JOB_COMPLETION_INDEX", "3")], Some(3)).unwrap_err().to_string().contains("out of range"));
        assert!(auto(&[("JOB_COMPLETION_INDEX", "1")], None).unwrap_err().to_string().contains("add --shards N"));
    }

    #[test]
    fn no_or_both_schedulers_are_usage_errors() {
        let err = auto(&[], None).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("no array task in the environment: expected SLURM_ARRAY_TASK_ID"), "{err}");
        assert!(
            auto(&[("SLURM_JOB_ID", "7")], None).unwrap_err().to_string().contains("Slurm job 7 is not an array job")
        );
        let both = auto(&[("SLURM_ARRAY_TASK_ID", "1"), ("JOB_COMPLETION_INDEX", "0")], Some(2)).unwrap_err();
        assert!(both.to_string().contains("both"), "{both}");
    }

    #[test]
    fn shards_goes_only_with_auto() {
        let fixed = ShardArg::Fixed(Shard::new(1, 2).unwrap());
        assert!(resolve_shard(Some(fixed), Some(2), |_| None).is_err());
        assert_eq!(resolve_shard(Some(fixed), None, |_| None).unwrap(), Some(Shard::new(1, 2).unwrap()));
        assert_eq!(resolve_shard(None, None, |_| None).unwrap(), None);
        assert_eq!("auto".parse::<ShardArg>().unwrap(), ShardArg::Auto);
    }

    #[test]
    fn shell_words_are_quoted_only_when_needed() {
        assert_eq!(shell_quote("configs/mini.toml"), "configs/mini.toml");
        assert_eq!(shell_quote("output.dir=a b"), "'output.dir=a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
