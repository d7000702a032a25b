//! `io::write_file`: atomic replacement of regular files, writing through special files, and
//! nothing left behind on failure.
#![cfg(unix)]

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use qmomentum_runtime::io::write_file;

/// A fresh, empty folder for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("qmomentum-runtime-io-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Names in `dir` that look like one of `write_file`'s temporary files.
fn temporaries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn creates_a_new_file() {
    let dir = TempDir::new("new");
    let path = dir.path().join("out.bin");
    write_file(&path, b"hello").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"hello");
    assert_eq!(names(dir.path()), ["out.bin"]);
}

#[test]
fn replaces_an_existing_file_and_keeps_its_mode() {
    let dir = TempDir::new("replace");
    let path = dir.path().join("out.bin");
    fs::write(&path, b"old contents, longer than the new ones").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    write_file(&path, b"new").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"new");
    assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
    assert_eq!(names(dir.path()), ["out.bin"]);
}

#[test]
fn a_symlink_survives_and_its_target_gets_the_content() {
    let dir = TempDir::new("symlink");
    fs::create_dir(dir.path().join("real")).unwrap();
    let target = dir.path().join("real").join("model.qmm");
    fs::write(&target, b"old").unwrap();
    let link = dir.path().join("link.qmm");
    // A relative link, resolved against the link's folder.
    std::os::unix::fs::symlink("real/model.qmm", &link).unwrap();
    write_file(&link, b"new").unwrap();
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert_eq!(fs::read_link(&link).unwrap(), Path::new("real/model.qmm"));
    assert_eq!(fs::read(&target).unwrap(), b"new");
    assert!(temporaries(dir.path()).is_empty());
    assert!(temporaries(&dir.path().join("real")).is_empty());
}

#[test]
fn a_dangling_symlink_is_refused() {
    let dir = TempDir::new("dangling");
    let link = dir.path().join("link.qmm");
    std::os::unix::fs::symlink("nowhere/model.qmm", &link).unwrap();
    let err = write_file(&link, b"new").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&link.display().to_string()), "{msg}");
    assert!(msg.contains("symbolic link"), "{msg}");
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert!(!dir.path().join("nowhere").exists());
    assert_eq!(names(dir.path()), ["link.qmm"]);
}

#[test]
fn a_directory_is_refused_and_nothing_is_left_behind() {
    let dir = TempDir::new("dir");
    let target = dir.path().join("out");
    fs::create_dir(&target).unwrap();
    let err = write_file(&target, b"data").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::IsADirectory);
    let msg = err.to_string();
    assert!(msg.contains(&target.display().to_string()), "{msg}");
    assert!(msg.contains("is a directory"), "{msg}");
    assert!(fs::metadata(&target).unwrap().is_dir());
    assert_eq!(names(dir.path()), ["out"]);
    assert!(names(&target).is_empty());
}

#[test]
fn a_symlink_to_a_directory_is_refused() {
    let dir = TempDir::new("dirlink");
    fs::create_dir(dir.path().join("out")).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink("out", &link).unwrap();
    let err = write_file(&link, b"data").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::IsADirectory);
    assert_eq!(names(dir.path()), ["link", "out"]);
    assert!(names(&dir.path().join("out")).is_empty());
}

#[test]
fn a_missing_folder_is_an_error_and_creates_nothing() {
    let dir = TempDir::new("nofolder");
    let path = dir.path().join("missing").join("out.bin");
    let err = write_file(&path, b"data").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let msg = err.to_string();
    assert!(
        msg.contains("nothing was replaced; the previous file, if any, is intact"),
        "{msg}"
    );
    assert!(names(dir.path()).is_empty());
}

#[test]
fn a_failure_leaves_the_destination_intact() {
    // The temporary name is taken by a directory (which `write_file` must not remove), so the
    // temporary file cannot be created: the old file must stay as it was.
    let dir = TempDir::new("intact");
    let path = dir.path().join("out.bin");
    fs::write(&path, b"precious").unwrap();
    let blocker = dir.path().join(format!(".out.bin.tmp.{}", std::process::id()));
    fs::create_dir(&blocker).unwrap();
    fs::write(blocker.join("keep"), b"x").unwrap();
    let err = write_file(&path, b"new").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("nothing was replaced; the previous file, if any, is intact"),
        "{msg}"
    );
    assert_eq!(fs::read(&path).unwrap(), b"precious");
    assert!(blocker.join("keep").exists());
}

#[test]
fn a_stale_temporary_file_is_replaced() {
    // Left by a process with the same id that died mid-write.
    let dir = TempDir::new("stale");
    let path = dir.path().join("out.bin");
    fs::write(dir.path().join(format!(".out.bin.tmp.{}", std::process::id())), b"junk").unwrap();
    write_file(&path, b"new").unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"new");
    assert_eq!(names(dir.path()), ["out.bin"]);
}

#[test]
fn a_fifo_is_written_through_and_stays_a_fifo() {
    let dir = TempDir::new("fifo");
    let fifo = dir.path().join("pipe");
    let status = std::process::Command::new("mkfifo").arg(&fifo).status();
    match status {
        Ok(s) if s.success() => {}
        _ => {
            eprintln!("skipped: mkfifo is not available");
            return;
        }
    }
    let reader = {
        let fifo = fifo.clone();
        // Opening a FIFO for reading blocks until a writer opens it, and the read ends when
        // the writer closes it.
        std::thread::spawn(move || fs::read(fifo).unwrap())
    };
    let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let result = write_file(&fifo, &data);
    if result.is_err() {
        // Unblock the reader before failing.
        let _ = fs::OpenOptions::new().write(true).open(&fifo);
    }
    let got = reader.join().unwrap();
    result.unwrap();
    assert_eq!(got, data);
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    assert_eq!(names(dir.path()), ["pipe"]);
}

#[test]
fn dev_null_is_written_through_and_stays_a_device() {
    let null = Path::new("/dev/null");
    if !null.exists() {
        return;
    }
    write_file(null, b"discarded").unwrap();
    assert!(fs::metadata(null).unwrap().file_type().is_char_device());
    assert!(!temporaries(Path::new("/dev"))
        .iter()
        .any(|n| n.starts_with(".null.tmp")));
}

#[test]
fn dev_full_reports_the_write_error_and_leaves_nothing_in_dev() {
    let full = Path::new("/dev/full");
    if !full.exists() {
        return;
    }
    let err = write_file(full, &[0u8; 4096]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StorageFull, "{err}");
    assert!(err.to_string().contains("/dev/full"), "{err}");
    assert!(fs::metadata(full).unwrap().file_type().is_char_device());
    assert!(!temporaries(Path::new("/dev"))
        .iter()
        .any(|n| n.starts_with(".full.tmp")));
}
