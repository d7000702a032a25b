//! `qmomentum sweep` as a user runs it: the grid's cells trained, summarised (CSV, markdown, heat
//! maps), kept on a rerun, a lost cell trained again, another grid refused, a bad grid refused
//! before anything runs.

mod common;

use common::*;

const GRID: &str = r#"
epochs = 1
seeds = [0, 1]
optimizer = ["heavy-ball"]
momentum = [0.0, 0.9]
lr = [0.1]
effective_lr = true
quant = ["w2a2"]
control = ["none", "freeze:0.03"]
"#;

#[test]
fn a_sweep_trains_summarises_and_resumes() {
    let data = small_data(1280, 200);
    let dir = tmp("sweep");
    std::fs::create_dir_all(&dir).unwrap();
    let grid = dir.join("grid.toml");
    std::fs::write(&grid, GRID).unwrap();
    let out = dir.join("out");
    let o = run(&["sweep", s(&grid), "--data", s(&data), "--out", s(&out), "--jobs", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    // 2 momenta × 2 controls × 2 seeds.
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 8, "{csv}");
    // Equal effective learning rate: η = 0.1·(1 − μ), η/(1−μ) = 0.1 in every row.
    assert!(rows.iter().any(|r| r.contains(",heavy-ball,0.9,0.01,0.1,")), "{csv}");
    assert!(rows.iter().all(|r| r.contains(",0.1,128,")), "{csv}");
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert_eq!(md.lines().filter(|l| l.starts_with("| w2a2 |")).count(), 4, "{md}");
    assert!(md.contains("| 2 |"), "two seeds per row: {md}");
    for f in [
        "heatmap_accuracy_heavy-ball_lr0.1_b128_none.png",
        "heatmap_oscillation_heavy-ball_lr0.1_b128_none.png",
    ] {
        let png = std::fs::read(out.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
    // A rerun keeps every finished cell; a cell whose result is lost is trained again, to the
    // same accuracy (same seed, same weights).
    let cell = out.join("w2a2_heavy-ball_m0.9_lr0.01_b128_freeze0.03_s1");
    let before = std::fs::read_to_string(cell.join("result.json")).unwrap();
    std::fs::remove_dir_all(&cell).unwrap();
    let o = run(&["sweep", s(&grid), "--data", s(&data), "--out", s(&out)]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert_eq!(t.matches("(kept)").count(), 7, "{t}");
    let after = std::fs::read_to_string(cell.join("result.json")).unwrap();
    let acc = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap()["test_accuracy"].clone();
    assert_eq!(acc(&before), acc(&after));
    // Another grid in the same folder is refused.
    std::fs::write(&grid, GRID.replace("[0.0, 0.9]", "[0.0, 0.95]")).unwrap();
    let o = run(&["sweep", s(&grid), "--data", s(&data), "--out", s(&out)]);
    assert!(!o.status.success());
    assert!(text(&o).contains("another grid"), "{}", text(&o));
}

#[test]
fn impossible_grids_are_refused_before_anything_runs() {
    let dir = tmp("sweep-bad");
    std::fs::create_dir_all(&dir).unwrap();
    for (change, want) in [
        (("[0.0, 0.9]", "[0.9, 1.0]"), "momentum = 1"),
        (("[0.0, 0.9]", "[]"), "axis `momentum` is empty"),
        (("[\"heavy-ball\"]", "[\"bop\"]"), "optimizer = \"bop\""),
        (("epochs = 1", "epochs = 1\nwarmup = 2"), "unknown field"),
    ] {
        let grid = dir.join("grid.toml");
        std::fs::write(&grid, GRID.replace(change.0, change.1)).unwrap();
        let out = dir.join("out");
        let o = run(&["sweep", s(&grid), "--out", s(&out)]);
        let t = text(&o);
        assert!(!o.status.success() && t.contains(want), "{want}: {t}");
        assert!(!out.exists(), "nothing is created for a bad grid");
    }
}
