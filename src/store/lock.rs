//! Lock files for workers sharing one artifact folder (several machines on a shared filesystem,
//! Slurm array tasks, Kubernetes Indexed Job pods): two workers never compute the same shard at once,
//! and a stage's manifest is written once.
//!
//! A lock is a small JSON file (`part-00002-of-00008.lock`, `manifest.lock`) created atomically with
//! `O_CREAT|O_EXCL` (`create_new`), holding its owner: host, pid namespace, pid, the process's start
//! time and the lock's start time. While held, a background thread refreshes the file's modification
//! time every [`heartbeat_interval`] (the heartbeat). A lock is **stale** (its owner died) when:
//!
//! * the owner ran on this machine (same host name and pid namespace) and its pid is gone, or now
//!   belongs to a process started at another time (a reused pid); or
//! * the owner ran elsewhere and the heartbeat is older than [`stale_after`] (10 minutes; set
//!   `QPERT_LOCK_STALE_SECS` to change it). Machines' clocks must agree to well within that.
//!
//! A stale lock is taken over: renamed aside (atomic; only one of several contenders succeeds),
//! checked to be the very lock judged stale, deleted, and the new lock created with `create_new`.
//! A worker only ever removes a lock that still holds its own identity.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Default age of a heartbeat after which a lock from another machine counts as stale.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(600);

/// Environment variable overriding [`DEFAULT_STALE_AFTER`], in seconds.
pub const STALE_AFTER_VAR: &str = "QPERT_LOCK_STALE_SECS";

/// Who holds a lock, as written in the lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockOwner {
    /// Host name of the owner's machine.
    pub host: String,
    /// The owner's pid namespace (`pid:[4026531836]`): same host name but another namespace (a
    /// container) means the pid cannot be checked from here.
    pub pid_ns: String,
    /// The owner's process id.
    pub pid: u32,
    /// The owner process's start time in clock ticks since boot (Linux `/proc/<pid>/stat` field
    /// 22), to tell a reused pid apart; 0 where unknown.
    pub pid_start: u64,
    /// When the lock was taken, in seconds since the Unix epoch.
    pub since: u64,
}

impl LockOwner {
    /// This process, now.
    pub fn current() -> Self {
        let pid = std::process::id();
        LockOwner {
            host: host_name(),
            pid_ns: pid_namespace(),
            pid,
            pid_start: process_start(pid).unwrap_or(0),
            since: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        }
    }

    /// `host vm pid 1234 since 2026-11-27T01:15:40Z`.
    pub fn describe(&self) -> String {
        format!("host {} pid {} since {}", self.host, self.pid, utc_timestamp(self.since))
    }

    fn same_machine(&self, other: &LockOwner) -> bool {
        self.host == other.host && self.pid_ns == other.pid_ns && !self.pid_ns.is_empty()
    }
}

/// A lock file found on disk and whether its owner is alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockState {
    /// The lock file.
    pub path: PathBuf,
    /// Its owner; `None` while the file is being written (or if it is unreadable).
    pub owner: Option<LockOwner>,
    /// `None` if the owner is (as far as can be told) alive; otherwise why the lock is stale.
    pub stale: Option<String>,
}

impl LockState {
    /// Reads the lock at `path`; `None` if there is none.
    pub fn read(path: &Path) -> Result<Option<LockState>> {
        let (bytes, modified) = match fs::read(path).and_then(|b| Ok((b, fs::metadata(path)?.modified()?))) {
            Ok(found) => found,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::artifact(path, e)),
        };
        let owner: Option<LockOwner> = serde_json::from_slice(&bytes).ok();
        let age = SystemTime::now().duration_since(modified).unwrap_or_default();
        let stale = staleness(owner.as_ref(), age, &LockOwner::current());
        Ok(Some(LockState { path: path.to_path_buf(), owner, stale }))
    }

    /// `host vm pid 1234 since ...`, or `an owner still writing its lock file`.
    pub fn describe_owner(&self) -> String {
        self.owner.as_ref().map_or_else(|| "an owner still writing its lock file".to_string(), LockOwner::describe)
    }
}

/// Why a lock with `owner` and heartbeat `age` is stale, as seen by `me`; `None` while alive.
fn staleness(owner: Option<&LockOwner>, age: Duration, me: &LockOwner) -> Option<String> {
    let limit = stale_after();
    let Some(owner) = owner else {
        // A lock file is written right after it is created: unreadable for long means a dead writer.
        return (age > limit).then(|| format!("unreadable lock file, untouched for {}s", age.as_secs()));
    };
    if owner.same_machine(me) && Path::new("/proc/self/stat").exists() {
        return match process_start(owner.pid) {
            None => Some(format!("pid {} is not running on {}", owner.pid, owner.host)),
            Some(start) if owner.pid_start != 0 && start != owner.pid_start => {
                Some(format!("pid {} on {} is now another process", owner.pid, owner.host))
            }
            Some(_) => None,
        };
    }
    (age > limit)
        .then(|| format!("no heartbeat for {}s (limit {}s, {STALE_AFTER_VAR})", age.as_secs(), limit.as_secs()))
}

/// How long a heartbeat may be silent before a lock from another machine is stale: `QPERT_LOCK_STALE_SECS`
/// or 10 minutes.
pub fn stale_after() -> Duration {
    std::env::var(STALE_AFTER_VAR)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map_or(DEFAULT_STALE_AFTER, Duration::from_secs)
}

/// How often a held lock refreshes its heartbeat: a quarter of [`stale_after`], at least a second.
pub fn heartbeat_interval() -> Duration {
    (stale_after() / 4).max(Duration::from_secs(1))
}

/// A held lock: released (the file removed, if it is still ours) when dropped.
#[derive(Debug)]
pub struct Lock {
    path: PathBuf,
    content: Vec<u8>,
    heartbeat: Option<(Sender<()>, JoinHandle<()>)>,
}

/// The outcome of [`Lock::try_acquire`].
#[derive(Debug)]
pub enum Acquired {
    /// The lock is ours.
    Held(Lock),
    /// A live owner holds it.
    Busy(LockState),
}

impl Lock {
    /// Takes the lock at `path` unless a live owner holds it; a stale lock is taken over.
    pub fn try_acquire(path: &Path) -> Result<Acquired> {
        let me = LockOwner::current();
        let content = serde_json::to_vec(&me).map_err(|e| Error::artifact(path, e))?;
        // A few rounds: each failed round means another worker changed the lock meanwhile.
        for _ in 0..4 {
            match File::options().write(true).create_new(true).open(path) {
                Ok(mut file) => {
                    if let Err(e) = file.write_all(&content).and_then(|()| file.sync_all()) {
                        let _ = fs::remove_file(path);
                        return Err(Error::artifact(path, format!("cannot write the lock file: {e}")));
                    }
                    let lock = Lock { path: path.to_path_buf(), content, heartbeat: None };
                    return Ok(Acquired::Held(lock.with_heartbeat()));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::artifact(path, format!("cannot create the lock file: {e}"))),
            }
            let Some(state) = LockState::read(path)? else { continue };
            if state.stale.is_none() {
                return Ok(Acquired::Busy(state));
            }
            take_over(path, &state)?;
        }
        match LockState::read(path)? {
            Some(state) => Ok(Acquired::Busy(state)),
            None => Err(Error::artifact(path, "the lock keeps changing hands; retry")),
        }
    }

    fn with_heartbeat(mut self) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        let path = self.path.clone();
        let interval = heartbeat_interval();
        let thread = std::thread::spawn(move || {
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                // A failed heartbeat only makes the lock look stale sooner to other machines.
                let _ = File::options().write(true).open(&path).and_then(|f| f.set_modified(SystemTime::now()));
            }
        });
        self.heartbeat = Some((stop, thread));
        self
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.heartbeat.take() {
            drop(stop);
            let _ = thread.join();
        }
        // Remove the file only if it is still ours (it may have been taken over as stale).
        if fs::read(&self.path).is_ok_and(|c| c == self.content) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Removes the stale lock `state` at `path`, unless another worker replaced it meanwhile.
fn take_over(path: &Path, state: &LockState) -> Result<()> {
    let me = LockOwner::current();
    let aside = path.with_file_name(format!(
        ".{}.stale.{}.{}.tmp",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        me.host,
        me.pid
    ));
    match fs::rename(path, &aside) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::artifact(path, format!("cannot take over the stale lock: {e}"))),
    }
    let moved: Option<LockOwner> = fs::read(&aside).ok().and_then(|b| serde_json::from_slice(&b).ok());
    if moved.is_some() && moved != state.owner {
        // Another worker took over first and we moved its fresh lock: put it back (never clobbering).
        let _ = fs::hard_link(&aside, path);
    }
    let _ = fs::remove_file(&aside);
    Ok(())
}

/// This machine's host name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`, else `unknown`).
pub fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

fn pid_namespace() -> String {
    fs::read_link("/proc/self/ns/pid").map(|p| p.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The start time of `pid` in clock ticks since boot; `None` if no such process runs (or no /proc).
fn process_start(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (the command) is in parentheses and may hold spaces: count fields after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// `secs` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_timestamp(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(host: &str, pid: u32) -> LockOwner {
        LockOwner { host: host.into(), pid_ns: "pid:[1]".into(), pid, pid_start: 0, since: 0 }
    }

    #[test]
    fn timestamps_are_utc_civil_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_795_742_116), "2026-11-27T01:15:16Z");
    }

    #[test]
    fn a_lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("part-00001-of-00002.lock");
        let Acquired::Held(lock) = Lock::try_acquire(&path).unwrap() else { panic!("expected the lock") };
        let Acquired::Busy(state) = Lock::try_acquire(&path).unwrap() else { panic!("expected busy") };
        assert_eq!(state.owner, Some(LockOwner { since: state.owner.as_ref().unwrap().since, ..LockOwner::current() }));
        assert_eq!(state.stale, None);
        drop(lock);
        assert!(!path.exists());
        assert!(matches!(Lock::try_acquire(&path).unwrap(), Acquired::Held(_)));
    }

    #[test]
    fn a_dead_local_owner_is_stale_and_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.lock");
        // pid 0 never names a user process; the host and namespace are ours.
        let dead = LockOwner { pid: 0, pid_start: 7, ..LockOwner::current() };
        fs::write(&path, serde_json::to_vec(&dead).unwrap()).unwrap();
        let state = LockState::read(&path).unwrap().unwrap();
        assert_eq!(state.stale.as_deref(), Some(format!("pid 0 is not running on {}", dead.host).as_str()));
        let Acquired::Held(lock) = Lock::try_acquire(&path).unwrap() else { panic!("expected a takeover") };
        assert_eq!(LockState::read(lock.path()).unwrap().unwrap().owner.unwrap().pid, std::process::id());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "nothing left aside");
    }

    #[test]
    fn a_remote_owner_is_stale_only_without_a_heartbeat() {
        let me = LockOwner::current();
        let remote = owner("elsewhere", me.pid);
        assert_eq!(staleness(Some(&remote), Duration::from_secs(5), &me), None);
        let old = staleness(Some(&remote), DEFAULT_STALE_AFTER + Duration::from_secs(1), &me).unwrap();
        assert!(old.starts_with("no heartbeat for 601s"), "{old}");
        assert_eq!(staleness(None, Duration::from_secs(1), &me), None, "a lock being written is busy");
        // Same host name, another pid namespace (a container): the pid cannot be checked.
        let container = LockOwner { pid_ns: "pid:[2]".into(), pid: 0, ..me.clone() };
        assert_eq!(staleness(Some(&container), Duration::from_secs(5), &me), None);
    }

    #[test]
    fn a_reused_pid_is_stale() {
        let me = LockOwner::current();
        let reused = LockOwner { pid_start: me.pid_start + 1, ..me.clone() };
        assert!(staleness(Some(&reused), Duration::ZERO, &me).unwrap().contains("now another process"));
        assert_eq!(staleness(Some(&me), Duration::ZERO, &me), None);
    }
}
