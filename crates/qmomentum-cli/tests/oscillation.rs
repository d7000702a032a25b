//! Oscillation tracking of quantized weights as a user sees it: per-layer columns in history.csv,
//! the figures in history.json, oscillations.png, and the switch to turn it off.

mod common;

use common::*;

#[test]
fn quantized_runs_log_and_plot_oscillations() {
    let data = small_data(2560, 300);
    let out = tmp("osc-on");
    let o = train(&data, &out, &["--epochs", "2", "--lr", "0.01", "--quant", "w4a4"]);
    assert!(o.status.success(), "{}", text(&o));
    let csv = std::fs::read_to_string(out.join("history.csv")).unwrap();
    let header = csv.lines().next().unwrap();
    for l in [0, 1, 2] {
        assert!(header.contains(&format!("fraction_oscillating_l{l}")), "{header}");
    }
    let h: qmomentum::train::History =
        serde_json::from_str(&std::fs::read_to_string(out.join("history.json")).unwrap()).unwrap();
    let o2 = &h.epochs[1].oscillation;
    assert_eq!(o2.len(), 3);
    for x in o2 {
        assert!((0.0..=1.0).contains(&x.fraction_oscillating) && x.flips_per_step >= x.oscillations_per_step);
    }
    // Weights move under Momentum: some codes change.
    assert!(o2.iter().any(|x| x.flips_per_step > 0.0), "{o2:?}");
    let png = std::fs::read(out.join("oscillations.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // Off on request; a float run has nothing to track.
    let off = tmp("osc-off");
    let o = train(
        &data,
        &off,
        &["--epochs", "1", "--quant", "w8a8", "--no-oscillation-tracking"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(!std::fs::read_to_string(off.join("history.csv"))
        .unwrap()
        .contains("oscillat"));
    assert!(!off.join("oscillations.png").exists());
}
