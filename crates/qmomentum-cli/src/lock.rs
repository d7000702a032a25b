//! A lock file that keeps two runs from writing the same output folder.
//!
//! `DIR/.lock` is created with `create_new` (atomic on POSIX) and holds the owner's pid. A lock
//! whose process no longer exists (a run killed with SIGKILL) is stale and taken over; a live one
//! is an error that names the folder and the pid. The lock is removed when the run ends.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct RunLock {
    path: PathBuf,
}

fn alive(pid: u32) -> bool {
    // Linux: a running process has /proc/PID. Elsewhere we cannot tell: treat it as alive.
    // A zombie (killed, not yet reaped: a rank whose mpirun has gone) holds no lock.
    if cfg!(target_os = "linux") {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()) != Some("Z"),
            Err(_) => false,
        }
    } else {
        true
    }
}

impl RunLock {
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        let path = dir.join(".lock");
        for _ in 0..2 {
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    write!(f, "{}", std::process::id())
                        .with_context(|| format!("{}: cannot write the lock", path.display()))?;
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&path).unwrap_or_default();
                    match owner.trim().parse::<u32>() {
                        Ok(pid) if pid != std::process::id() && alive(pid) => bail!(
                            "{} is in use by another run (pid {pid}, lock file {}); wait for it or choose another --out",
                            dir.display(),
                            path.display()
                        ),
                        _ => {
                            // Stale (its process is gone) or unreadable: take it over.
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                Err(e) => return Err(e).with_context(|| format!("{}: cannot create the lock file", path.display())),
            }
        }
        bail!("{}: could not take the lock", path.display())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
