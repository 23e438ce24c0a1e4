//! Sharded stages run by many workers (Slurm array tasks, Kubernetes Indexed Job pods, or plain
//! processes) on one shared artifact folder: where each shard stands ([`ShardTable`], for
//! `qpert status`), which shards to rerun ([`rerun_plan`]), and `qpert stage <name> --finalize`
//! ([`finalize`]). The locking itself is in `store::lock`, the claim in `StageDir::claim`.

use super::{Context, Stage};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::{Manifest, StageDir, StageState};

/// Every shard 1..=N of a sharded stage that is not complete yet, in exactly one state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardTable {
    /// The stage.
    pub stage: Stage,
    /// N, the shard count of the parts and locks found (the largest, if they disagree).
    pub count: u32,
    /// Shards whose part is fresh.
    pub done: Vec<u32>,
    /// Shards a live worker holds a lock on, with that worker (`host vm pid 12 since ...`).
    pub running: Vec<(u32, String)>,
    /// Shards whose lock is stale (its owner died), with why.
    pub abandoned: Vec<(u32, String)>,
    /// Shards whose part was made from other inputs, with what differs.
    pub stale: Vec<(u32, String)>,
    /// Shards with nothing on disk.
    pub missing: Vec<u32>,
}

impl ShardTable {
    /// The shards of `dir` on disk; `None` when there are no parts and no locks.
    pub fn read(stage: Stage, dir: &StageDir) -> Result<Option<ShardTable>> {
        let (parts, locks) = (dir.part_states()?, dir.shard_locks()?);
        let count = parts.iter().map(|p| p.shard.count()).chain(locks.iter().map(|(s, _)| s.count())).max();
        let Some(count) = count else { return Ok(None) };
        let mut table = ShardTable {
            stage,
            count,
            done: Vec::new(),
            running: Vec::new(),
            abandoned: Vec::new(),
            stale: Vec::new(),
            missing: Vec::new(),
        };
        for i in 1..=count {
            let part = parts.iter().find(|p| (p.shard.index(), p.shard.count()) == (i, count));
            let lock = locks.iter().find(|(s, _)| (s.index(), s.count()) == (i, count)).map(|(_, l)| l);
            match (part, lock) {
                (_, Some(l)) if l.stale.is_none() => table.running.push((i, l.describe_owner())),
                (Some(p), _) if p.fresh() => table.done.push(i),
                (_, Some(l)) => {
                    let why = l.stale.clone().unwrap_or_default();
                    table.abandoned.push((i, format!("{}: {why}", l.describe_owner())))
                }
                (Some(p), None) => table.stale.push((i, p.stale.clone().unwrap_or_default())),
                (None, None) => table.missing.push(i),
            }
        }
        Ok(Some(table))
    }

    /// The shards to run again: those abandoned, stale or missing, in order.
    pub fn to_rerun(&self) -> Vec<u32> {
        let mut shards: Vec<u32> = self.abandoned.iter().chain(&self.stale).map(|(i, _)| *i).collect();
        shards.extend(&self.missing);
        shards.sort_unstable();
        shards
    }

    /// `partial: 1 of 3 shards done [1]; running [2: host vm pid 12 since ...]; missing [3]`; stale
    /// shards are grouped by what differs: `stale [2, 3] (qpert.alpha: 8 -> 4)`.
    pub fn describe(&self) -> String {
        let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
        let with = |v: &[(u32, String)]| v.iter().map(|(i, w)| format!("{i}: {w}")).collect::<Vec<_>>().join("; ");
        let mut line = format!("partial: {} of {} shards done [{}]", self.done.len(), self.count, list(&self.done));
        if !self.running.is_empty() {
            line += &format!("; running [{}]", with(&self.running));
        }
        if !self.abandoned.is_empty() {
            line += &format!("; stale lock, owner gone [{}]", with(&self.abandoned));
        }
        let mut reasons: Vec<&str> = Vec::new();
        for (_, why) in &self.stale {
            if !reasons.contains(&why.as_str()) {
                reasons.push(why);
            }
        }
        for why in reasons {
            let shards: Vec<u32> = self.stale.iter().filter(|(_, w)| w == why).map(|(i, _)| *i).collect();
            line += &format!("; stale [{}] ({why})", list(&shards));
        }
        if !self.missing.is_empty() {
            line += &format!("; missing [{}]", list(&self.missing));
        }
        line
    }
}

/// The shard table of a sharded stage under `config` when it is not done; `None` for an
/// unsharded, complete or untouched stage, or one whose inputs cannot be fingerprinted yet.
pub fn shard_table(stage: Stage, config: &Config) -> Result<Option<ShardTable>> {
    if !stage.is_sharded() {
        return Ok(None);
    }
    let Ok(fingerprint) = stage.fingerprint(config) else { return Ok(None) };
    let dir = stage.dir(config, fingerprint);
    match dir.state()? {
        // A damaged stage's table names the parts to recompute (missing, or unreadable: stale).
        StageState::Partial(_) | StageState::Missing | StageState::Damaged(_) => ShardTable::read(stage, &dir),
        StageState::Done(_) | StageState::Stale(_) => Ok(None),
    }
}

/// The sharded stages with shards to rerun (abandoned, stale or missing), in pipeline order.
pub fn rerun_plan(config: &Config) -> Result<Vec<ShardTable>> {
    let mut plan = Vec::new();
    for stage in Stage::ALL {
        if let Some(table) = shard_table(stage, config)?.filter(|t| !t.to_rerun().is_empty()) {
            plan.push(table);
        }
    }
    Ok(plan)
}

/// `qpert stage <name> --finalize [--shards N]`: writes the manifest of a sharded stage whose parts
/// are all present (see `StageDir::finalize`).
pub fn finalize(stage: Stage, ctx: &Context, count: Option<u32>) -> Result<Manifest> {
    if !stage.is_sharded() {
        return Err(Error::Usage(format!("stage {stage} is not sharded: it has no parts to finalize")));
    }
    ctx.stage_dir(stage, stage.fingerprint(&ctx.config)?).finalize(count)
}
