//! The hardening issue, as a new user meets it: every item has a test here that failed before its
//! fix (panics, destroyed files, litter, wrong numbers, Rust debug text, missing conveniences).

mod common;

use common::*;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// A float checkpoint (1 epoch) and a W8A8 checkpoint with its exported model, made once.
struct Fixture {
    data: PathBuf,
    fp: PathBuf,
    q: PathBuf,
    qmm: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let data = small_data(3000, 1000);
        let dir = tmp("hardening-fixture");
        let fp = dir.join("fp");
        let o = train(&data, &fp, &["--epochs", "1", "--lr", "0.01"]);
        assert!(o.status.success(), "{}", text(&o));
        let q = dir.join("q");
        let o = train(&data, &q, &["--epochs", "1", "--lr", "0.01", "--quant", "w8a8"]);
        assert!(o.status.success(), "{}", text(&o));
        let qmm = dir.join("m.qmm");
        let o = run(&["export", s(&q.join("checkpoint.safetensors")), "-o", s(&qmm)]);
        assert!(o.status.success(), "{}", text(&o));
        Fixture {
            data,
            fp: fp.join("checkpoint.safetensors"),
            q: q.join("checkpoint.safetensors"),
            qmm,
        }
    })
}

fn no_panic(o: &Output) {
    let t = text(o);
    assert!(!t.contains("panicked") && !t.contains("RUST_BACKTRACE"), "{t}");
}

fn fails_with(o: &Output, want: &str) {
    no_panic(o);
    assert!(!o.status.success(), "expected a failure: {}", text(o));
    assert!(text(o).contains(want), "expected «{want}» in: {}", text(o));
}

// ---- 1. Crashes ------------------------------------------------------------------------------

#[test]
fn flags_that_used_to_panic_are_errors() {
    let f = fixture();
    fails_with(
        &run(&["bench", "train", "--epochs", "1", "--data", s(&f.data)]),
        "--epochs",
    );
    fails_with(
        &run(&["bench", "infer", "--rounds", "0", "--data", s(&f.data)]),
        "--rounds",
    );
    fails_with(
        &run(&["infer", s(&f.qmm), "--threads", "0", "--data", s(&f.data)]),
        "--threads",
    );
    fails_with(
        &run(&["bench", "train", "--peak-gflops", "nan", "--data", s(&f.data)]),
        "--peak-gflops NaN: must be a number of GFLOP/s",
    );
    fails_with(
        &run(&[
            "train",
            "--schedule",
            "step:1:0.5:9",
            "--data",
            s(&f.data),
            "--out",
            s(&tmp("sched")),
        ]),
        "step takes at most 2 field(s)",
    );
}

/// A reader that closes the pipe (`info CKPT | head -3`) ends the program quietly with 141.
#[test]
fn a_closed_stdout_ends_quietly() {
    let f = fixture();
    for args in [vec!["info", s(&f.q)], vec!["predict", s(&f.fp), "--data", s(&f.data)]] {
        let mut fds = [0i32; 2];
        // SAFETY: `pipe` fills two valid descriptors; the read end is closed at once, so the
        // child's first write to the write end fails with EPIPE.
        let write_end = unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            libc::close(fds[0]);
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1])
        };
        let o = Command::new(bin())
            .args(&args)
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(141), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: quiet, but said: {err}");
    }
}

/// A full stdout is an error naming stdout (exit 1), not a panic.
#[test]
fn a_full_stdout_is_an_error() {
    let f = fixture();
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let o = Command::new(bin())
        .args(["evaluate", s(&f.fp), "--data", s(&f.data)])
        .stdout(Stdio::from(full))
        .output()
        .unwrap();
    fails_with(&o, "cannot write to stdout");
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn huge_layers_are_refused_before_allocation() {
    let d = tmp("huge");
    let cfg = d.join("huge.toml");
    std::fs::write(
        &cfg,
        "[model]\ninput = 784\nlayers = [{ type = \"dense\", units = 1000000000000, activation = \"softmax\" }]\n",
    )
    .unwrap();
    let f = fixture();
    fails_with(
        &run(&[
            "train",
            "--config",
            s(&cfg),
            "--data",
            s(&f.data),
            "--out",
            s(&d.join("run")),
        ]),
        "units = 1000000000000: must be in 1..=1048576",
    );
    assert!(!d.join("run").exists(), "a refused run creates no folder");
}

#[test]
fn a_head_narrower_than_the_labels_is_an_error() {
    let d = tmp("narrow-head");
    let cfg = d.join("five.toml");
    std::fs::write(
        &cfg,
        "epochs = 1\n[model]\ninput = 784\nlayers = [{ type = \"dense\", units = 5, activation = \"softmax\" }]\n",
    )
    .unwrap();
    let t = qmomentum::train::Trainer::new(qmomentum::config::TrainConfig::from_toml_file(&cfg).unwrap()).unwrap();
    let ck = d.join("five.safetensors");
    qmomentum::checkpoint::save(&t, &ck).unwrap();
    let f = fixture();
    fails_with(
        &run(&["evaluate", s(&ck), "--data", s(&f.data)]),
        "labels up to 9, the model has 5 outputs",
    );
}

// ---- 2. Destroyed files and litter ----------------------------------------------------------

#[test]
fn outputs_write_through_links_fifos_and_devices() {
    let f = fixture();
    let d = tmp("outputs");
    // A symlink stays a symlink; its target gets the model.
    let target = d.join("real.qmm");
    std::fs::write(&target, b"old").unwrap();
    let link = d.join("link.qmm");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let o = run(&["export", s(&f.q), "-o", s(&link)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert!(qmomentum_runtime::Model::load(&target).is_ok());
    // /dev/null stays a character device (the test runs as root in CI, where a rename could
    // replace it).
    let o = run(&[
        "predict",
        s(&f.fp),
        "--data",
        s(&f.data),
        "--limit",
        "5",
        "-o",
        "/dev/null",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
    // A FIFO is written through and stays a FIFO.
    let fifo = d.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
    };
    let o = run(&[
        "predict",
        s(&f.fp),
        "--data",
        s(&f.data),
        "--limit",
        "3",
        "-o",
        s(&fifo),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let csv = reader.join().unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    // `-o -` is stdout.
    let o = run(&["predict", s(&f.fp), "--data", s(&f.data), "--limit", "2", "-o", "-"]);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("index,source,label,predicted,class,probability\n"));
    // A failed export onto a folder leaves no temporary behind.
    let dir_out = d.join("adir");
    std::fs::create_dir(&dir_out).unwrap();
    fails_with(&run(&["export", s(&f.q), "-o", s(&dir_out)]), "is a directory");
    let left: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(left.is_empty(), "temporaries left: {left:?}");
}

#[test]
fn failed_runs_leave_no_litter() {
    let d = tmp("litter");
    let out = d.join("run");
    fails_with(&train(&d.join("no-such-data"), &out, &[]), "not found");
    assert!(!out.exists(), "missing data: the output folder was created");
    // A run that diverges at its first step (before any checkpoint) removes the folder it made,
    // so the same command can be run again.
    let f = fixture();
    let o = train(&f.data, &out, &["--lr", "1e30", "--epochs", "1"]);
    fails_with(&o, "diverged");
    assert!(
        !out.exists(),
        "a run that failed before its first checkpoint left {}",
        out.display()
    );
}

// ---- Wrong numbers ---------------------------------------------------------------------------

#[test]
fn resume_rules() {
    let f = fixture();
    let out = tmp("resume-rules");
    let o = train(
        &f.data,
        &out,
        &["--epochs", "2", "--lr", "0.01", "--schedule", "cosine"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let result = out.join("result.json");
    let before = std::fs::read(&result).unwrap();
    // The same flags again, plus --resume, on a finished run: nothing to do, nothing rewritten.
    let o = train(
        &f.data,
        &out,
        &["--epochs", "2", "--lr", "0.01", "--schedule", "cosine", "--resume"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("is finished (2 of 2 epochs): nothing to do"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read(&result).unwrap(), before);
    // A conflicting value is refused, naming it.
    fails_with(
        &train(&f.data, &out, &["--lr", "0.1", "--resume", "--epochs", "3"]),
        "optimizer.lr: 0.01 in the checkpoint, 0.1 now",
    );
    // Shortening is refused.
    fails_with(
        &train(&f.data, &out, &["--resume", "--epochs", "1"]),
        "cannot be shortened",
    );
    // Other data is refused unless forced.
    let other = small_data(2560, 500);
    fails_with(&train(&other, &out, &["--resume", "--epochs", "3"]), "files of");
    // Extending keeps the cosine's horizon of 2 epochs unless --reschedule.
    let o = train(&f.data, &out, &["--resume", "--epochs", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("keeps its horizon of 2 epochs"), "{}", text(&o));
    let cfg = qmomentum::config::TrainConfig::from_toml_file(&out.join("config.toml")).unwrap();
    assert_eq!((cfg.epochs, cfg.schedule_epochs), (3, Some(2)));
    let h = std::fs::read_to_string(out.join("history.csv")).unwrap();
    assert_eq!(h.lines().count(), 4, "{h}");
    // Timings of the earlier epochs survive the resume (they are not in the checkpoint).
    assert!(h.lines().nth(1).unwrap().split(',').nth(6).unwrap() != "0.0000", "{h}");
}

#[test]
fn sigint_message_names_the_data() {
    let f = fixture();
    let out = tmp("stop-msg");
    let o = train(&f.data, &out, &["--epochs", "1", "--stop-after-steps", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("--data {} --resume", f.data.display())),
        "{}",
        text(&o)
    );
}

#[test]
fn json_has_no_float_noise_and_identical_runs_give_identical_checkpoints() {
    let f = fixture();
    let (a, b) = (tmp("same-a"), tmp("same-b"));
    for out in [&a, &b] {
        let o = train(&f.data, out, &["--epochs", "1", "--lr", "0.001"]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let ck = |d: &Path| std::fs::read(d.join("checkpoint.safetensors")).unwrap();
    assert!(ck(&a) == ck(&b), "two identical runs wrote different checkpoints");
    let r = std::fs::read_to_string(a.join("result.json")).unwrap();
    assert!(r.contains("\"lr\": 0.001"), "{r}");
    let acc = r
        .split("\"test_accuracy\": ")
        .nth(1)
        .unwrap()
        .split([',', '\n'])
        .next()
        .unwrap();
    assert!(acc.len() <= 8, "test_accuracy printed with float noise: {acc}");
}

// ---- Things users expect ---------------------------------------------------------------------

/// A PNG and a .npy of test images give the predictions of the same images from the test set.
#[test]
fn predict_on_images_and_npy() {
    let f = fixture();
    let d = tmp("own-data");
    let test = qmomentum::data::Dataset::load_mnist_test(&f.data).unwrap();
    let png = d.join("img0.png");
    image::GrayImage::from_raw(28, 28, test.images[..784].to_vec())
        .unwrap()
        .save(&png)
        .unwrap();
    // .npy v1.0, uint8, shape (2, 28, 28): the first two test images.
    let npy = d.join("two.npy");
    let mut header = "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 28, 28), }".to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&test.images[..2 * 784]);
    std::fs::write(&npy, bytes).unwrap();
    let names = d.join("names.txt");
    std::fs::write(&names, (0..10).map(|i| format!("class {i}\n")).collect::<String>()).unwrap();

    let reference = run(&["predict", s(&f.fp), "--data", s(&f.data), "--limit", "2"]);
    let ref_csv = String::from_utf8_lossy(&reference.stdout).to_string();
    let row = |csv: &str, i: usize| -> Vec<String> {
        csv.lines().nth(1 + i).unwrap().split(',').map(str::to_string).collect()
    };
    let o = run(&["predict", s(&f.fp), s(&png), s(&npy), "--class-names", s(&names)]);
    assert!(o.status.success(), "{}", text(&o));
    let csv = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(csv.starts_with("index,source,predicted,class,probability\n"), "{csv}");
    // png, npy[0], npy[1]: predictions and probabilities equal the test set's rows 0, 0, 1.
    for (i, r) in [(0usize, 0usize), (1, 0), (2, 1)] {
        let (got, want) = (row(&csv, i), row(&ref_csv, r));
        assert_eq!(got[2], want[3], "{csv}\n{ref_csv}");
        assert_eq!(got[3], format!("class {}", want[3]));
        assert_eq!(got[4], want[5]);
    }
    // The integer model too, as JSON; `evaluate` takes a .qmm and `infer` names the fitting
    // command for a checkpoint.
    let o = run(&["predict", s(&f.qmm), s(&png), "--format", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["source"], s(&png));
    let o = run(&["evaluate", s(&f.qmm), "--data", s(&f.data)]);
    assert!(
        o.status.success() && text(&o).contains("integer runtime"),
        "{}",
        text(&o)
    );
    fails_with(
        &run(&["infer", s(&f.q), "--data", s(&f.data)]),
        "is a training checkpoint, not an integer model",
    );
    fails_with(
        &run(&["quantize", s(&f.qmm), "--data", s(&f.data)]),
        "is an integer model (.qmm)",
    );
}

/// Fashion-MNIST's class names travel from the data to the checkpoint and the model file.
#[test]
fn class_names_are_stored() {
    let f = fixture();
    let d = tmp("classes");
    // Test files only (evaluate/predict need no training files) and a classes.txt.
    for n in ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"] {
        std::fs::copy(f.data.join(n), d.join(n)).unwrap();
    }
    let names: Vec<String> = qmomentum::data::FASHION_MNIST_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let o = run(&["evaluate", s(&f.fp), "--data", s(&d)]);
    assert!(o.status.success(), "evaluate without training files: {}", text(&o));
    let t = qmomentum::checkpoint::load(&f.fp).unwrap();
    assert_eq!(t.class_names, None, "the small data folder has no names");
    let shipped = shipped();
    let out = tmp("classes-run");
    let o = train(&shipped, &out, &["--epochs", "1", "--stop-after-steps", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = qmomentum::checkpoint::load(&out.join("checkpoint.safetensors")).unwrap();
    assert_eq!(t.class_names.as_ref(), Some(&names));
    let o = run(&[
        "predict",
        s(&out.join("checkpoint.safetensors")),
        "--data",
        s(&d),
        "--limit",
        "1",
    ]);
    let csv = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(names.iter().any(|n| csv.contains(n.as_str())), "{csv}");
}

/// Without --data, the repository's data are found from anywhere; when nothing is found, every
/// place tried is named.
#[test]
fn the_data_folder_is_found_or_every_place_is_named() {
    let f = fixture();
    let cwd = tmp("elsewhere");
    let o = Command::new(bin())
        .args(["evaluate", s(&f.fp)])
        .current_dir(&cwd)
        .env_remove("QMOMENTUM_DATA")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("10000 samples of") && text(&o).contains("data/fashion-mnist"),
        "{}",
        text(&o)
    );
    // A copy of the binary outside the repository, with a wrong $QMOMENTUM_DATA.
    let exe = cwd.join("qmomentum");
    std::fs::copy(bin(), &exe).unwrap();
    let o = Command::new(&exe)
        .args(["evaluate", s(&f.fp)])
        .current_dir(&cwd)
        .env("QMOMENTUM_DATA", "/nonexistent/qm")
        .output()
        .unwrap();
    if !Path::new("/usr/share/datasets/fashion-mnist").exists() {
        fails_with(&o, "$QMOMENTUM_DATA = /nonexistent/qm");
        assert!(text(&o).contains("/usr/share/datasets/fashion-mnist"), "{}", text(&o));
    }
    // $QMOMENTUM_DATA is used when it holds the data.
    let o = Command::new(&exe)
        .args(["evaluate", s(&f.fp)])
        .current_dir(&cwd)
        .env("QMOMENTUM_DATA", &f.data)
        .output()
        .unwrap();
    assert!(o.status.success() && text(&o).contains("1000 samples"), "{}", text(&o));
}

#[test]
fn text_is_human_not_rust_debug() {
    let f = fixture();
    let debug = [
        "Some(",
        "OptimizerConfig",
        "{ ",
        "Cosine",
        "Percentile {",
        "Int {",
        "BackendError",
    ];
    let out = tmp("human");
    let o = train(
        &f.data,
        &out,
        &["--epochs", "1", "--schedule", "cosine:0.5", "--quant", "w4a4"],
    );
    let i = run(&["info", s(&out.join("checkpoint.safetensors"))]);
    let m = run(&["info", s(&f.qmm)]);
    let q = run(&[
        "quantize",
        s(&f.fp),
        "--data",
        s(&f.data),
        "--calibration",
        "percentile:99.9",
        "--out",
        s(&tmp("human-q")),
    ]);
    for o in [&o, &i, &m, &q] {
        assert!(o.status.success(), "{}", text(o));
        for d in debug {
            assert!(!text(o).contains(d), "«{d}» in: {}", text(o));
        }
    }
    assert!(
        text(&o).contains("cosine(warm-up 0.5 epochs, min lr 0)"),
        "{}",
        text(&o)
    );
    assert!(
        text(&i).contains("weights 4-bit per-channel symmetric (narrow range)"),
        "{}",
        text(&i)
    );
    assert!(text(&m).contains("scheme         w8a8"), "{}", text(&m));
    assert!(text(&q).contains("percentile 99.9 calibration"), "{}", text(&q));
    // A plotting failure is one plain sentence naming the file.
    let out = tmp("plot-fail");
    let o = train(&f.data, &out, &["--epochs", "1", "--stop-after-steps", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    std::fs::create_dir_all(out.join("curves.png")).unwrap();
    let o = train(&f.data, &out, &["--resume"]);
    fails_with(&o, "cannot write the plot");
    assert!(!text(&o).contains("Os {"), "{}", text(&o));
}

#[test]
fn negative_numbers_reach_the_validation() {
    let f = fixture();
    fails_with(
        &train(&f.data, &tmp("neg"), &["--lr", "-1"]),
        "invalid optimizer.lr = -1: the learning rate must be a finite number ≥ 0",
    );
}

#[test]
fn nonsense_gets_a_warning_or_an_error() {
    let f = fixture();
    let o = train(
        &f.data,
        &tmp("warn-bs"),
        &["--epochs", "1", "--batch-size", "100000", "--decoupled"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("warning: --batch-size 100000 is larger than the 3000 training samples"),
        "{}",
        text(&o)
    );
    assert!(
        text(&o).contains("warning: --decoupled without --weight-decay"),
        "{}",
        text(&o)
    );
    let o = train(
        &f.data,
        &tmp("warn-lb"),
        &[
            "--epochs",
            "1",
            "--quant",
            "w8a8",
            "--latent-binary",
            "--stop-after-steps",
            "1",
        ],
    );
    assert!(
        text(&o).contains("warning: --latent-binary has no effect"),
        "{}",
        text(&o)
    );
    let o = train(
        &f.data,
        &tmp("warn-cos"),
        &["--epochs", "1", "--schedule", "cosine:2", "--stop-after-steps", "1"],
    );
    assert!(
        text(&o).contains("warning: the cosine warm-up (2 epochs) is not shorter than the run"),
        "{}",
        text(&o)
    );
    fails_with(
        &train(
            &f.data,
            &tmp("val-both"),
            &["--validation-split", "0.1", "--validate-on-test"],
        ),
        "cannot be used with",
    );
    fails_with(
        &run(&[
            "compare",
            "--seeds",
            "0,0",
            "--data",
            s(&f.data),
            "--out",
            s(&tmp("cmp-dup")),
        ]),
        "--seeds: 0 is listed twice",
    );
    fails_with(
        &run(&[
            "compare",
            "--ptq",
            "binary",
            "--data",
            s(&f.data),
            "--out",
            s(&tmp("cmp-bin")),
        ]),
        "--ptq binary: post-training quantization supports",
    );
    fails_with(
        &run(&["quantize", s(&f.fp), "--quant", "binary-all", "--data", s(&f.data)]),
        "--quant binary-all: post-training quantization supports",
    );
    let o = run(&[
        "quantize",
        s(&f.fp),
        "--batches",
        "100000",
        "--data",
        s(&f.data),
        "--out",
        s(&tmp("q-many")),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("has only 24 batches of 128; calibrating on all of them"),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("24 batches of 128)"), "{}", text(&o));
}

#[test]
fn help_shows_the_defaults() {
    let o = run(&["train", "--help"]);
    let h = text(&o);
    let d = qmomentum::config::TrainConfig::default();
    for (flag, v) in [
        ("--epochs", d.epochs.to_string()),
        ("--batch-size", d.batch_size.to_string()),
        ("--lr", d.optimizer.lr.to_string()),
        ("--momentum", d.optimizer.momentum.to_string()),
        ("--seed", d.seed.to_string()),
    ] {
        let block = h.split(&format!("      {flag}")).nth(1).unwrap_or_default();
        let block = block.split("\n  -").next().unwrap_or_default();
        assert!(block.contains(&format!("[default: {v}]")), "{flag}: {block}");
    }
    let c = run(&["compare", "--help"]);
    assert!(text(&c).contains("not the design document's 0.001"), "{}", text(&c));
}

/// A one-epoch run draws its points (markers), and the comparison chart starts its axis at a
/// round value with PTQ and QAT in different colours.
#[test]
fn plots_show_what_they_claim() {
    let f = fixture();
    let out = tmp("plot-one");
    let o = train(&f.data, &out, &["--epochs", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let img = image::open(out.join("curves.png")).unwrap().to_rgb8();
    let blue = img.pixels().filter(|p| p[0] < 40 && p[1] < 40 && p[2] > 200).count();
    assert!(blue > 20, "a one-epoch plot shows its point ({blue} blue pixels)");
    let cmp = tmp("plot-cmp");
    let o = run(&[
        "compare",
        "--schemes",
        "w8a8",
        "--ptq",
        "w8a8",
        "--seeds",
        "0",
        "--epochs",
        "1",
        "--data",
        s(&f.data),
        "--out",
        s(&cmp),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let md = std::fs::read_to_string(cmp.join("compare.md")).unwrap();
    assert!(md.contains(&format!("Test accuracy on {}", f.data.display())), "{md}");
    assert!(
        md.contains("(3000 training / 1000 test samples), MLP 784-128-64-10"),
        "{md}"
    );
    let img = image::open(cmp.join("compare.png")).unwrap().to_rgb8();
    let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
    assert!(
        count([230, 140, 30]) > 500 && count([40, 100, 200]) > 500,
        "PTQ orange and QAT blue bars"
    );
}

// ---- Found by the second new-user pass ------------------------------------------------------

/// An output that is one of the inputs is refused (it would destroy what was just read).
#[test]
fn an_output_onto_an_input_is_refused() {
    let f = fixture();
    let d = tmp("out-is-in");
    let copy = d.join("m.qmm");
    std::fs::copy(&f.qmm, &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    fails_with(
        &run(&["predict", s(&copy), "--data", s(&f.data), "-o", s(&copy)]),
        "one of this command's inputs",
    );
    fails_with(
        &run(&["infer", s(&copy), "--data", s(&f.data), "-o", s(&copy)]),
        "one of this command's inputs",
    );
    let labels = f.data.join("t10k-labels-idx1-ubyte");
    fails_with(
        &run(&["predict", s(&copy), "--data", s(&f.data), "-o", s(&labels)]),
        "one of this command's inputs",
    );
    let ck = d.join("ck.safetensors");
    std::fs::copy(&f.q, &ck).unwrap();
    fails_with(&run(&["export", s(&ck), "-o", s(&ck)]), "one of this command's inputs");
    assert_eq!(std::fs::read(&copy).unwrap(), before);
    assert!(qmomentum::checkpoint::load(&ck).is_ok());
}

/// `quantize --out` never replaces a run; a failed quantize or compare leaves no folder.
#[test]
fn quantize_and_compare_never_replace_or_litter() {
    let f = fixture();
    let run_dir = f.fp.parent().unwrap();
    let before = std::fs::read(&f.fp).unwrap();
    fails_with(
        &run(&["quantize", s(&f.fp), "--data", s(&f.data), "--out", s(run_dir)]),
        "already holds a checkpoint",
    );
    assert_eq!(std::fs::read(&f.fp).unwrap(), before);
    let d = tmp("no-litter");
    let q = d.join("q");
    fails_with(
        &run(&[
            "quantize",
            s(&f.fp),
            "--data",
            s(&f.data),
            "--out",
            s(&q),
            "--finetune-epochs",
            "1",
            "--lr",
            "1e30",
        ]),
        "diverged",
    );
    assert!(!q.exists(), "a failed quantize left {}", q.display());
    let c = d.join("cmp");
    fails_with(
        &run(&[
            "compare",
            "--data",
            s(&f.data),
            "--epochs",
            "1",
            "--schemes",
            "w8a8",
            "--seeds",
            "0",
            "--lr",
            "1e30",
            "--out",
            s(&c),
        ]),
        "diverged",
    );
    assert!(!c.exists(), "a failed compare left {}", c.display());
}

/// `export -o /dev/stdout > file` gives a valid model file (the status line goes to stderr).
#[test]
fn export_to_stdout_is_a_valid_model() {
    let f = fixture();
    let d = tmp("export-stdout");
    let file = d.join("m.qmm");
    let out = std::fs::File::create(&file).unwrap();
    let o = Command::new(bin())
        .args(["export", s(&f.q), "-o", "/dev/stdout"])
        .stdout(Stdio::from(out))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(qmomentum_runtime::Model::load(&file).is_ok(), "{}", text(&o));
}

/// A new run does not write into a folder that holds somebody else's files.
#[test]
fn train_refuses_a_folder_of_other_files() {
    let f = fixture();
    let d = tmp("other-files");
    std::fs::write(d.join("history.csv"), "mine\n").unwrap();
    fails_with(&train(&f.data, &d, &["--epochs", "1"]), "is not empty (history.csv)");
    assert_eq!(std::fs::read_to_string(d.join("history.csv")).unwrap(), "mine\n");
}

/// A corrupt image gets a plain reason, no decoder debug text; config type errors use words.
#[test]
fn decoder_and_config_errors_are_plain_words() {
    let f = fixture();
    let d = tmp("plain-errors");
    let png = d.join("bad.png");
    image::GrayImage::from_pixel(8, 8, image::Luma([7])).save(&png).unwrap();
    let mut bytes = std::fs::read(&png).unwrap();
    bytes[20] ^= 0xff; // inside IHDR: its CRC no longer matches
    std::fs::write(&png, bytes).unwrap();
    let o = run(&["predict", s(&f.qmm), s(&png)]);
    fails_with(&o, "bad.png: cannot decode the PNG image: the file is corrupt");
    assert!(
        !text(&o).contains("ChunkType") && !text(&o).contains('{'),
        "{}",
        text(&o)
    );
    let cfg = d.join("c.toml");
    std::fs::write(&cfg, "epochs = -3\n").unwrap();
    let o = train(&f.data, &d.join("run"), &["--config", s(&cfg)]);
    fails_with(&o, "expected a whole number ≥ 0");
    assert!(!text(&o).contains("usize"), "{}", text(&o));
    let o = run(&[
        "train",
        "--class-names",
        "/nonexistent/names.txt",
        "--data",
        s(&f.data),
        "--out",
        s(&d.join("r2")),
    ]);
    fails_with(&o, "No such file or directory");
    assert_eq!(text(&o).matches("No such file or directory").count(), 1, "{}", text(&o));
}

// ---- Convolutional networks end to end -------------------------------------------------------

/// The accuracy figure `evaluate` prints.
fn printed_accuracy(o: &Output) -> String {
    text(o)
        .split("accuracy ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Export checkpoint `ck` to the integer model `model`; `evaluate` must print the same accuracy
/// for both (the simulation and the integer runtime).
fn export_scores_the_simulation(ck: &Path, model: &Path, data: &Path, what: &str) {
    let o = run(&["export", s(ck), "-o", s(model)]);
    assert!(o.status.success(), "{}", text(&o));
    let sim = run(&["evaluate", s(ck), "--data", s(data)]);
    let int = run(&["evaluate", s(model), "--data", s(data)]);
    assert!(
        sim.status.success() && int.status.success(),
        "{}{}",
        text(&sim),
        text(&int)
    );
    assert_eq!(
        printed_accuracy(&sim),
        printed_accuracy(&int),
        "{what}: simulation and integer runtime"
    );
}

/// cnn-small and lenet5 by name: train (float, batch norm), `info` summary, PTQ (which folds the
/// batch norms), export, integer inference and evaluation of the model file agree; QAT of the
/// batch-normalised model (batch norm folded, moving, then frozen) resumes bit-exactly and exports.
#[test]
fn cnn_by_name_from_training_to_integer_inference() {
    let data = small_data(1024, 300);
    let d = tmp("cnn-e2e");
    let run_dir = d.join("cnn");
    let o = train(
        &data,
        &run_dir,
        &["--model", "cnn-small", "--epochs", "1", "--lr", "0.01"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let ck = run_dir.join("checkpoint.safetensors");
    let o = run(&["info", s(&ck)]);
    assert!(o.status.success(), "{}", text(&o));
    for want in [
        "28×28×1 → conv 32 3×3 same → batch_norm",
        "14×14×64",
        "parameters     50378",
        "3869824",
    ] {
        assert!(text(&o).contains(want), "«{want}» in {}", text(&o));
    }
    // QAT with batch norm folded into the convolutions while it moves, statistics frozen after
    // the first epoch; the same two epochs in one go and as 1 + a resumed 1 end at the same
    // bytes, and the exported model scores what the simulation scores.
    let qat = d.join("qat");
    let args = [
        "--model",
        "cnn-small",
        "--quant",
        "w8a8",
        "--lr",
        "0.01",
        "--freeze-bn-stats-after",
        "1",
    ];
    let o = train(&data, &qat, &[&args[..], &["--epochs", "2"]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let split = d.join("qat-split");
    let o = train(&data, &split, &[&args[..], &["--epochs", "1"]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let o = train(&data, &split, &[&args[..], &["--epochs", "2", "--resume"]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let ck_qat = qat.join("checkpoint.safetensors");
    assert!(
        std::fs::read(&ck_qat).unwrap() == std::fs::read(split.join("checkpoint.safetensors")).unwrap(),
        "a resumed QAT run with folded batch norm ends at other weights"
    );
    let o = run(&["info", s(&ck_qat)]);
    assert!(text(&o).contains("conv2d+bn relu"), "{}", text(&o));
    export_scores_the_simulation(&ck_qat, &d.join("qat.qmm"), &data, "folded-BN QAT");
    // Binary cnn-small: the ±1 convolution keeps its batch norm after the kernel; it resumes
    // bit-exactly too, and runs in the integer runtime as XNOR-popcount convolutions.
    let bargs = [
        "--model",
        "cnn-small",
        "--quant",
        "binary",
        "--lr",
        "0.01",
        "--freeze-bn-stats-after",
        "1",
    ];
    let bin = d.join("bin");
    let o = train(&data, &bin, &[&bargs[..], &["--epochs", "2"]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let bsplit = d.join("bin-split");
    let o = train(&data, &bsplit, &[&bargs[..], &["--epochs", "1"]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let o = train(&data, &bsplit, &[&bargs[..], &["--epochs", "2", "--resume"]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let ck_bin = bin.join("checkpoint.safetensors");
    assert!(
        std::fs::read(&ck_bin).unwrap() == std::fs::read(bsplit.join("checkpoint.safetensors")).unwrap(),
        "a resumed binary CNN run ends at other weights"
    );
    let bin_model = d.join("bin.qmm");
    export_scores_the_simulation(&ck_bin, &bin_model, &data, "binary CNN");
    let o = run(&["info", s(&bin_model)]);
    for want in ["conv2d_i8", "sign bits", "maxpool_bin", "conv2d_bin", "dense_bin"] {
        assert!(text(&o).contains(want), "«{want}» in {}", text(&o));
    }
    fails_with(
        &run(&["export", s(&ck_bin), "--format", "onnx", "-o", s(&d.join("bin.onnx"))]),
        "pooling of sign (±1) activations has no mapping",
    );
    fails_with(
        &train(
            &data,
            &d.join("bad"),
            &["--freeze-bn-stats-after", "1", "--epochs", "1", "--quant", "w8a8"],
        ),
        "freeze_bn_stats_after",
    );
    let q = d.join("q");
    let o = run(&[
        "quantize",
        s(&ck),
        "--quant",
        "w8a8",
        "--data",
        s(&data),
        "--out",
        s(&q),
        "--batches",
        "4",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let qck = q.join("checkpoint.safetensors");
    let model = d.join("cnn.qmm");
    export_scores_the_simulation(&qck, &model, &data, "PTQ");
    let o = run(&["info", s(&model)]);
    assert!(
        text(&o).contains("conv2d_i8") && text(&o).contains("maxpool_u8"),
        "{}",
        text(&o)
    );
    // LeNet-5 (average pooling) trains and exports too.
    let l = d.join("lenet");
    let o = train(&data, &l, &["--model", "lenet5", "--epochs", "1", "--lr", "0.01"]);
    assert!(o.status.success(), "{}", text(&o));
    let lq = d.join("lq");
    let o = run(&[
        "quantize",
        s(&l.join("checkpoint.safetensors")),
        "--data",
        s(&data),
        "--out",
        s(&lq),
        "--batches",
        "4",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&[
        "export",
        s(&lq.join("checkpoint.safetensors")),
        "-o",
        s(&d.join("lenet.qmm")),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    fails_with(
        &run(&[
            "train",
            "--model",
            "resnet50",
            "--data",
            s(&data),
            "--out",
            s(&d.join("x")),
        ]),
        "expected mlp, cnn-small or lenet5",
    );
}
