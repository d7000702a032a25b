//! The `qmomentum` binary end to end: training outputs, interruption (SIGKILL at random points,
//! SIGINT), the run lock, a full disk, divergence, PTQ, export and integer inference.

mod common;

use common::*;
use qmomentum::rng::Rng;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn train_writes_checkpoint_history_plot_and_result() {
    let data = small_data(3000, 1000);
    let out = tmp("train");
    let o = train(
        &data,
        &out,
        &["--epochs", "2", "--lr", "0.01", "--validation-split", "0.1"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let csv = std::fs::read_to_string(out.join("history.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(csv.starts_with("epoch,loss,accuracy,val_loss,val_accuracy"));
    let png = std::fs::read(out.join("curves.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("result.json")).unwrap()).unwrap();
    assert!(result["test_accuracy"].as_f64().unwrap() > 0.6, "{result}");
    assert!(!out.join(".lock").exists(), "the lock is released");
    // The saved config reproduces the run; info reads the checkpoint.
    let cfg = qmomentum::config::TrainConfig::from_toml_file(&out.join("config.toml")).unwrap();
    assert_eq!((cfg.epochs, cfg.optimizer.lr, cfg.validation_split), (2, 0.01, 0.1));
    let o = run(&["info", s(&out.join("checkpoint.safetensors"))]);
    assert!(
        o.status.success() && text(&o).contains("2 of 2 epochs done"),
        "{}",
        text(&o)
    );
    // Refuses to overwrite a finished run without --resume.
    let o = train(&data, &out, &[]);
    assert!(
        !o.status.success() && text(&o).contains("already holds a checkpoint"),
        "{}",
        text(&o)
    );
}

/// SIGKILL at 20 pseudo-random points (during steps, checkpoint writes and history writes),
/// resume each time; the final weights and history must equal an uninterrupted run's, and every
/// checkpoint seen between kills must load.
#[test]
fn sigkill_at_random_points_then_resume_is_bit_identical() {
    let data = small_data(2560, 500);
    let common = [
        "--data",
        s(&data),
        "--epochs",
        "8",
        "--lr",
        "0.01",
        "--checkpoint-every",
        "1",
        "--quiet",
        "--quant",
        "w8a8",
    ];
    let reference = tmp("kill-ref");
    let o = run(&[&["train", "--out", s(&reference)][..], &common[..]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let want = weights(&reference.join("checkpoint.safetensors"));

    let out = tmp("kill");
    let ckpt = out.join("checkpoint.safetensors");
    let mut rng = Rng::new(2024, 0);
    let mut kills = 0;
    let mut during_write = 0;
    let mut attempts = 0;
    while kills < 20 && attempts < 200 {
        attempts += 1;
        let mut args = vec!["train", "--out", s(&out)];
        if ckpt.exists() {
            args.push("--resume");
            args.extend(["--data", s(&data), "--quiet"]);
        } else {
            args.extend(common);
        }
        let mut child = Command::new(bin())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let wait = Duration::from_micros(2_000 + rng.below(60_000));
        let t0 = Instant::now();
        let mut finished = false;
        while t0.elapsed() < wait {
            if child.try_wait().unwrap().is_some() {
                finished = true;
                break;
            }
            std::thread::sleep(Duration::from_micros(300));
        }
        if !finished {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        // A temporary file left behind means the kill landed inside a checkpoint/history write.
        if std::fs::read_dir(&out)
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().contains(".tmp."))
        {
            during_write += 1;
        }
        if ckpt.exists() {
            qmomentum::checkpoint::load(&ckpt)
                .unwrap_or_else(|e| panic!("unreadable checkpoint after kill {kills}: {e}"));
        }
        if finished && out.join("result.json").exists() {
            break;
        }
    }
    assert_eq!(kills, 20, "only {kills} kills landed before the run ended");
    // Finish the run.
    let o = run(&["train", "--out", s(&out), "--resume", "--data", s(&data), "--quiet"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        weights(&ckpt),
        want,
        "weights after {kills} kills differ from the uninterrupted run"
    );
    let h = |p: &Path| std::fs::read_to_string(p.join("history.json")).unwrap();
    let strip = |s: String| {
        s.lines()
            .filter(|l| !l.contains("seconds") && !l.contains("samples_per_sec"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(h(&out)), strip(h(&reference)), "history differs");
    eprintln!("survived {kills} SIGKILLs ({during_write} inside a file write)");
}

fn spawn_long(out: &Path, data: &Path) -> std::process::Child {
    Command::new(bin())
        .args([
            "train",
            "--data",
            s(data),
            "--out",
            s(out),
            "--epochs",
            "200",
            "--quiet",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for(p: &Path) {
    let t0 = Instant::now();
    while !p.exists() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sigint_checkpoints_and_a_second_run_on_the_same_folder_is_refused() {
    let data = small_data(2560, 500);
    let out = tmp("sigint");
    let child = spawn_long(&out, &data);
    wait_for(&out.join("config.toml"));
    std::thread::sleep(Duration::from_millis(300));
    // A second run on the same folder is refused while the first holds the lock.
    let o = train(&data, &out, &["--epochs", "1"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("in use by another run (pid"), "{}", text(&o));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", text(&o));
    assert!(
        text(&o).contains("interrupted at epoch") && text(&o).contains("--resume"),
        "{}",
        text(&o)
    );
    let t = qmomentum::checkpoint::load(&out.join("checkpoint.safetensors")).unwrap();
    assert!(t.global_step > 0);
    assert!(!out.join(".lock").exists());
    // Resume with fewer epochs than configured finishes at once.
    let o = run(&[
        "train",
        "--out",
        s(&out),
        "--resume",
        "--data",
        s(&data),
        "--epochs",
        &(t.epoch + 1).to_string(),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_stale_lock_from_a_killed_run_is_taken_over() {
    let data = small_data(1280, 200);
    let out = tmp("stale");
    std::fs::write(out.join(".lock"), "999999999").unwrap(); // no such process
    let o = train(&data, &out, &["--epochs", "1"]);
    assert!(o.status.success(), "{}", text(&o));
}

/// A file-size limit makes the checkpoint write fail: the run says so, names the file, exits
/// non-zero, and the previous checkpoint is intact.
#[test]
fn full_disk_reports_and_keeps_the_previous_checkpoint() {
    let data = small_data(1280, 200);
    let out = tmp("full");
    let o = train(&data, &out, &["--epochs", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let before = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    // 100 KiB per file: the ~440 KB checkpoint cannot be written.
    let cmd = format!(
        "ulimit -f 100; exec {} train --out {} --resume --data {} --epochs 2 --quiet",
        bin(),
        s(&out),
        s(&data)
    );
    let o = Command::new("bash").args(["-c", &cmd]).output().unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains("checkpoint.safetensors") && msg.contains("previous file, if any, is intact"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(out.join("checkpoint.safetensors")).unwrap(),
        before,
        "the previous checkpoint changed"
    );
    assert!(
        std::fs::read_dir(&out)
            .unwrap()
            .all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp")),
        "temporary file left"
    );
}

#[test]
fn divergence_stops_naming_the_step_or_skips_on_request() {
    let data = small_data(1280, 200);
    let out = tmp("nan");
    let o = train(
        &data,
        &out,
        &["--epochs", "2", "--lr", "100000", "--checkpoint-every", "1"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains("training diverged at epoch 1, step") && msg.contains("lower learning rate"),
        "{msg}"
    );
    if out.join("checkpoint.safetensors").exists() {
        qmomentum::checkpoint::load(&out.join("checkpoint.safetensors"))
            .expect("the last good checkpoint loads (finite weights)");
    }
    let out2 = tmp("nan-skip");
    let o = train(&data, &out2, &["--epochs", "1", "--lr", "100000", "--on-nan", "skip"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("steps skipped (NaN/inf)"), "{}", text(&o));
}

#[test]
fn bad_inputs_give_named_errors_and_exit_1() {
    let data = small_data(1280, 200);
    let bad = tmp("bad");
    std::fs::write(bad.join("c.toml"), "[optimizer]\nmomentum = 1.2\n").unwrap();
    let o = run(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&bad.join("o")),
        "--config",
        s(&bad.join("c.toml")),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("c.toml") && text(&o).contains("optimizer.momentum = 1.2"),
        "{}",
        text(&o)
    );
    let o = run(&["train", "--data", s(&bad), "--out", s(&bad.join("o2"))]);
    assert!(
        text(&o).contains("train-images-idx3-ubyte") && text(&o).contains("not found"),
        "{}",
        text(&o)
    );
    let o = run(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&bad.join("o3")),
        "--momentum",
        "1",
    ]);
    assert!(text(&o).contains("momentum must be in [0, 1)"), "{}", text(&o));
    // 10×10 images for a model that reads 784 values: a named error from train, evaluate, predict.
    let odd = bad.join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    for pre in ["train", "t10k"] {
        write_idx(&odd.join(format!("{pre}-images-idx3-ubyte")), &[3, 10, 10], &[1; 300]);
        write_idx(&odd.join(format!("{pre}-labels-idx1-ubyte")), &[3], &[1, 2, 3]);
    }
    let o = train(&odd, &bad.join("o4"), &["--epochs", "1"]);
    assert!(
        text(&o).contains("the data have 100 features per sample, the model reads 784"),
        "{}",
        text(&o)
    );
    let fp = bad.join("fp");
    let o = train(&data, &fp, &["--epochs", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    for cmd in ["evaluate", "predict"] {
        let o = run(&[cmd, s(&fp.join("checkpoint.safetensors")), "--data", s(&odd)]);
        assert_eq!(o.status.code(), Some(1), "{cmd}: {}", text(&o));
        assert!(
            text(&o).contains("784") && text(&o).contains("100"),
            "{cmd}: {}",
            text(&o)
        );
    }
    let o = run(&["evaluate", s(&bad.join("c.toml")), "--data", s(&data)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("c.toml"), "{}", text(&o));
}

/// PTQ → export → integer inference through the CLI; PTQ refuses a quantized checkpoint.
#[test]
fn quantize_export_infer() {
    let data = small_data(6000, 2000);
    let out = tmp("deploy");
    let fp = out.join("fp");
    let o = train(&data, &fp, &["--epochs", "2", "--lr", "0.01"]);
    assert!(o.status.success(), "{}", text(&o));
    let ptq = out.join("ptq");
    let o = run(&[
        "quantize",
        s(&fp.join("checkpoint.safetensors")),
        "--data",
        s(&data),
        "--out",
        s(&ptq),
        "--calibration",
        "percentile:99.99",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("→ PTQ w8a8"), "{}", text(&o));
    let o = run(&[
        "quantize",
        s(&ptq.join("checkpoint.safetensors")),
        "--data",
        s(&data),
        "--out",
        s(&out.join("again")),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("starts from a float (fp32) checkpoint"),
        "{}",
        text(&o)
    );
    let model = out.join("m.qmm");
    let o = run(&["export", s(&ptq.join("checkpoint.safetensors")), "-o", s(&model)]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&["infer", s(&model), "--data", s(&data)]);
    assert!(o.status.success(), "{}", text(&o));
    let acc: f64 = text(&o)
        .split("accuracy ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(acc > 0.7, "{}", text(&o));
    let o = run(&["info", s(&model)]);
    assert!(
        text(&o).contains("dense_i8 784→128, int8 codes within ±127 (8-bit) → relu, u8 on 256 levels")
            && text(&o).contains("scheme         w8a8"),
        "{}",
        text(&o)
    );
    // A float checkpoint cannot be exported.
    let o = run(&[
        "export",
        s(&fp.join("checkpoint.safetensors")),
        "-o",
        s(&out.join("x.qmm")),
    ]);
    assert!(
        !o.status.success() && text(&o).contains("export needs a quantized model"),
        "{}",
        text(&o)
    );
    // ONNX: both checkpoints export (onnxruntime runs them in tests/onnx/check_onnx.py, CI); the
    // int8 file is about a quarter of the float one.
    let mut sizes = Vec::new();
    for (ck, name) in [(&fp, "fp.onnx"), (&ptq, "ptq.onnx")] {
        let f = out.join(name);
        let o = run(&[
            "export",
            s(&ck.join("checkpoint.safetensors")),
            "--format",
            "onnx",
            "-o",
            s(&f),
        ]);
        assert!(o.status.success() && text(&o).contains("ONNX opset 21"), "{}", text(&o));
        sizes.push(std::fs::metadata(&f).unwrap().len() as f64);
    }
    assert!(sizes[1] / sizes[0] <= 0.3, "{sizes:?}");
    // `predict --logits`: a float32 .npy of [2000, 10] (128-byte header).
    let npy = out.join("logits.npy");
    let o = run(&[
        "predict",
        s(&model),
        "--data",
        s(&data),
        "--logits",
        s(&npy),
        "-o",
        s(&out.join("p.csv")),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let bytes = std::fs::read(&npy).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    assert!(String::from_utf8_lossy(&bytes[10..128]).contains("'shape': (2000, 10)"));
    assert_eq!(bytes.len(), 128 + 2000 * 10 * 4);
}

/// `--distributed` outside an MPI launcher, and a launcher's environment for a build without
/// MPI: clear errors before anything is read or written.
#[test]
fn distributed_training_needs_a_launcher_and_an_mpi_build() {
    let data = small_data(3000, 1000);
    let out = tmp("dist-nolauncher");
    let _ = std::fs::remove_dir_all(&out);
    let o = train(&data, &out, &["--distributed"]);
    assert!(
        !o.status.success() && text(&o).contains("--distributed needs an MPI launcher") && !out.exists(),
        "{}",
        text(&o)
    );
    if cfg!(not(feature = "mpi")) {
        let o = Command::new(bin())
            .args(["train", "--data", s(&data), "--out", s(&out), "--quiet"])
            .env("OMPI_COMM_WORLD_SIZE", "2")
            .output()
            .unwrap();
        assert!(
            !o.status.success() && text(&o).contains("built without MPI support") && !out.exists(),
            "{}",
            text(&o)
        );
    }
}
