//! Writing a file so that a failure never leaves a half-written one behind.
//!
//! [`write_file`] is the one function every crate of the project uses to write its outputs
//! (models, checkpoints, reports): a regular file is replaced atomically, while a special file
//! the user named on purpose (`/dev/stdout`, `/dev/null`, a FIFO) is written through.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What every error of the replacing path ends with.
const INTACT: &str = "(nothing was replaced; the previous file, if any, is intact)";

/// Writes `bytes` to `path`, atomically when `path` is (or will be) a regular file.
///
/// - `path` does not exist or is a regular file: the bytes go to a temporary file
///   `.{file_name}.tmp.{pid}` in the same folder, which is synced and renamed over `path`;
///   then the folder is synced so the rename survives a crash. On any failure the temporary
///   file is removed and `path` is left as it was; the error says so. A replaced file keeps
///   its permission bits (not its owner, nor other hard links to it).
/// - `path` is a symbolic link: it is followed. If it leads to a regular file, that target is
///   replaced as above (found with [`fs::canonicalize`]), so the link itself survives; if it
///   leads nowhere, nothing is written and the error names the link.
/// - `path` is a directory: an error of kind [`io::ErrorKind::IsADirectory`]; nothing is written.
/// - `path` is anything else (a character or block device such as `/dev/null` or
///   `/dev/stdout`, a FIFO, a socket): it is opened for writing, without creating or
///   truncating it, and written through; it is never replaced. A write error (e.g. `ENOSPC`
///   on `/dev/full`) is returned. Opening a FIFO blocks until it has a reader.
///
/// Errors keep the [`io::ErrorKind`] of the failing system call, and their message names the
/// file involved.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return replace(path, None, bytes),
        Err(e) => return Err(annotate(e, format!("cannot inspect '{}'", path.display()), INTACT)),
    };
    if !meta.file_type().is_symlink() {
        return match Kind::of(&meta) {
            Kind::File => replace(path, Some(&meta), bytes),
            Kind::Dir => Err(is_a_directory(path)),
            Kind::Special => write_through(path, &meta, bytes),
        };
    }
    // A symbolic link: look at what it leads to (`metadata` follows every link, including the
    // kernel's `/proc/self/fd/N` links behind `/dev/stdout`, whose target may be a pipe).
    let target_meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(dangling(path)),
        Err(e) => {
            let what = format!("cannot follow the symbolic link '{}'", path.display());
            return Err(annotate(e, what, INTACT));
        }
    };
    match Kind::of(&target_meta) {
        // `/dev/stdout`, `/dev/fd/N`, `/proc/self/fd/N`: a descriptor the caller already holds
        // (the shell's `> out.csv`). Replacing its file by name would leave that descriptor on
        // the deleted copy, so the bytes go through it, as to a device.
        Kind::File if is_descriptor_link(path) => write_through(path, &target_meta, bytes),
        Kind::File => {
            let target = fs::canonicalize(path).map_err(|e| {
                let what = format!("cannot resolve the symbolic link '{}'", path.display());
                annotate(e, what, INTACT)
            })?;
            replace(&target, Some(&target_meta), bytes)
        }
        Kind::Dir => Err(is_a_directory(path)),
        // Opening the link opens its target: no need to resolve it by name.
        Kind::Special => write_through(path, &target_meta, bytes),
    }
}

/// A path that names an open file descriptor rather than a file (`/dev/stdout`, `/dev/fd/1`,
/// `/proc/self/fd/1`, …).
fn is_descriptor_link(path: &Path) -> bool {
    path.starts_with("/dev") || path.starts_with("/proc")
}

/// How [`write_file`] treats a file, from its metadata (links already followed).
enum Kind {
    File,
    Dir,
    Special,
}

impl Kind {
    fn of(meta: &fs::Metadata) -> Kind {
        if meta.is_file() {
            Kind::File
        } else if meta.is_dir() {
            Kind::Dir
        } else {
            Kind::Special
        }
    }
}

/// `e` with `what: e suffix` as its message, keeping its kind.
fn annotate(e: io::Error, what: String, suffix: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e} {suffix}").trim_end().to_string())
}

fn is_a_directory(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::IsADirectory,
        format!(
            "'{}' is a directory; give a file name for the output (nothing was written)",
            path.display()
        ),
    )
}

fn dangling(path: &Path) -> io::Error {
    let target = match fs::read_link(path) {
        Ok(t) => format!(" to '{}'", t.display()),
        Err(_) => String::new(),
    };
    io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "'{}' is a symbolic link{target} that leads to no file; refusing to write through it \
             (nothing was written)",
            path.display()
        ),
    )
}

/// Serialises [`replace`] within the process: two threads replacing the same file would
/// otherwise share the temporary name (it only holds the process id).
static REPLACING: Mutex<()> = Mutex::new(());

/// Writes a temporary file next to `dest` and renames it over `dest` (a regular file or
/// nothing; `old` is its metadata if it exists).
fn replace(dest: &Path, old: Option<&fs::Metadata>, bytes: &[u8]) -> io::Result<()> {
    let Some((dir, tmp)) = temp_path(dest) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("'{}' does not name a file {INTACT}", dest.display()),
        ));
    };
    let dir = dir.as_path();

    {
        // Nothing here panics while the lock is held; a poisoned lock is still a valid lock.
        let _guard = REPLACING.lock().unwrap_or_else(|p| p.into_inner());
        let mut file = create_new(&tmp).map_err(|e| {
            let what = format!("cannot create the temporary file '{}'", tmp.display());
            annotate(e, what, INTACT)
        })?;
        // From here on the temporary file exists and must go on any failure.
        let written = (|| {
            if let Some(old) = old {
                // Keep the replaced file's mode, set before any byte is written so a private
                // file's contents are never readable under a wider mode. Best effort: some file
                // systems refuse `chmod`, and a default mode is no reason to fail the write.
                let _ = file.set_permissions(old.permissions());
            }
            file.write_all(bytes)?;
            file.sync_all()
        })();
        drop(file);
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            let what = format!("cannot write the temporary file '{}'", tmp.display());
            return Err(annotate(e, what, INTACT));
        }
        if let Err(e) = fs::rename(&tmp, dest) {
            let _ = fs::remove_file(&tmp);
            let what = format!("cannot rename '{}' to '{}'", tmp.display(), dest.display());
            return Err(annotate(e, what, INTACT));
        }
    }
    sync_dir(dir).map_err(|e| {
        let what = format!("'{}' was replaced, but syncing its folder failed", dest.display());
        annotate(e, what, "(the new file may not survive a system crash)")
    })
}

/// The folder of `dest` (`.` for a bare file name) and the temporary file in it,
/// `.{file_name}.tmp.{pid}`; `None` if `dest` has no file name (`/`, `..`).
fn temp_path(dest: &Path) -> Option<(PathBuf, PathBuf)> {
    let name = dest.file_name()?;
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    Some((dir.to_path_buf(), dir.join(tmp_name)))
}

/// Creates `tmp`, which must not exist; a stale regular file (or link) of that name, left by a
/// process that had the same id and died mid-write, is removed first. Never follows a link.
fn create_new(tmp: &Path) -> io::Result<File> {
    let open = || OpenOptions::new().write(true).create_new(true).open(tmp);
    match open() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // `remove_file` removes a link itself, not its target, and fails on a directory,
            // which is then reported rather than touched.
            fs::remove_file(tmp)?;
            open()
        }
        other => other,
    }
}

/// Makes a rename in `dir` durable. Where a directory cannot be opened or synced at all (not
/// Unix, or a file system without directory fsync) there is nothing to do.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let Ok(d) = File::open(dir) else {
            return Ok(());
        };
        match d.sync_all() {
            Err(e) if matches!(e.kind(), io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported) => Ok(()),
            other => other,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Writes into an existing special file (device, FIFO, socket) without replacing it.
fn write_through(path: &Path, meta: &fs::Metadata, bytes: &[u8]) -> io::Result<()> {
    let what = |e: io::Error| {
        let kind = describe(meta);
        annotate(e, format!("cannot write to '{}' ({kind})", path.display()), "")
    };
    // No `create`, no `truncate`: the file exists, and truncating a stream means nothing.
    let mut f = OpenOptions::new().write(true).open(path).map_err(what)?;
    f.write_all(bytes).map_err(what)?;
    f.flush().map_err(what)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        // A disk is the one special file whose data can be lost in a cache.
        if meta.file_type().is_block_device() {
            f.sync_all().map_err(what)?;
        }
    }
    Ok(())
}

/// A few words for a special file's type, for error messages.
fn describe(meta: &fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_char_device() {
            return "a character device";
        } else if t.is_block_device() {
            return "a block device";
        } else if t.is_fifo() {
            return "a FIFO";
        } else if t.is_socket() {
            return "a socket";
        }
    }
    let _ = meta;
    "not a regular file"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_file_sits_next_to_the_destination() {
        let pid = std::process::id();
        let (dir, tmp) = temp_path(Path::new("out/model.qmm")).unwrap();
        assert_eq!(dir, Path::new("out"));
        assert_eq!(tmp, Path::new(&format!("out/.model.qmm.tmp.{pid}")));
        // A bare file name lives in the current folder.
        let (dir, tmp) = temp_path(Path::new("model.qmm")).unwrap();
        assert_eq!(dir, Path::new("."));
        assert_eq!(tmp, Path::new(&format!("./.model.qmm.tmp.{pid}")));
        assert!(temp_path(Path::new("/")).is_none());
        assert!(temp_path(Path::new("out/..")).is_none());
    }
}
