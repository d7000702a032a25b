//! Where the command line writes: stdout (a closed pipe ends the program quietly, as `ls | head`
//! does; a full device is an error naming stdout, never a panic) and `-o/--output` files
//! (`-` is stdout; a regular file is replaced atomically; a FIFO, a device or a symlink's target
//! is written through or replaced without destroying the link: `qmomentum_runtime::io`).

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Stdout was closed by the reader (EPIPE): `main` ends the program with status 141 and no
/// message, as a Unix tool killed by SIGPIPE would, after destructors ran (the run lock is
/// released, a checkpoint is never cut short: it is written before anything is printed).
#[derive(Debug)]
pub struct ClosedStdout;

impl std::fmt::Display for ClosedStdout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed")
    }
}
impl std::error::Error for ClosedStdout {}

/// Write `bytes` to stdout and flush.
pub fn stdout_bytes(bytes: &[u8]) -> Result<()> {
    let mut o = std::io::stdout().lock();
    match o.write_all(bytes).and_then(|_| o.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(ClosedStdout.into()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to stdout")),
    }
}

/// Set on the ranks other than 0 of a data-parallel run: only rank 0 reports (status lines and
/// warnings; errors are printed by every rank).
pub static FOLLOWER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn follower() -> bool {
    FOLLOWER.load(std::sync::atomic::Ordering::Relaxed)
}

/// `println!` that returns an error instead of panicking (use through [`outln!`]).
pub fn stdout_line(args: std::fmt::Arguments<'_>) -> Result<()> {
    if follower() {
        return Ok(());
    }
    let mut s = args.to_string();
    s.push('\n');
    stdout_bytes(s.as_bytes())
}

/// `println!` for the command line: `outln!(…)?`.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::stdout_line(format_args!(""))
    };
    ($($t:tt)*) => {
        $crate::output::stdout_line(format_args!($($t)*))
    };
}

/// Write a result file named by `-o/--output`: `-` is stdout, anything else goes through
/// [`qmomentum_runtime::io::write_file`] (atomic for regular files, written through for devices
/// and FIFOs, no temporary left behind on failure).
pub fn write_output(path: &Path, bytes: &[u8]) -> Result<()> {
    if path.as_os_str() == "-" {
        return stdout_bytes(bytes);
    }
    qmomentum_runtime::io::write_file(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Refuse an output that is one of the command's inputs (same file, whatever the path): writing
/// it would destroy what was just read.
pub fn refuse_if_input(output: &Path, inputs: &[&Path]) -> Result<()> {
    if output.as_os_str() == "-" {
        return Ok(());
    }
    for i in inputs {
        if same_file(output, i) {
            anyhow::bail!(
                "-o {}: that is one of this command's inputs ({}); writing it would destroy it. Choose another output file",
                output.display(),
                i.display()
            );
        }
    }
    Ok(())
}

/// Whether two paths name the same existing file (device and inode).
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    false
}

/// Whether an output path is this process's stdout (`-`, `/dev/stdout`, or the very file stdout
/// is redirected to): status messages then go to stderr, so they cannot end up inside the output.
pub fn is_stdout(path: &Path) -> bool {
    path.as_os_str() == "-" || same_file(path, Path::new("/dev/stdout"))
}

/// A warning on stderr (the run goes on).
pub fn warn(msg: impl std::fmt::Display) {
    if follower() {
        return;
    }
    let _ = writeln!(std::io::stderr(), "warning: {msg}");
}
