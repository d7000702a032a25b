//! The TOML training configuration: parse, then validate; building a trainer from a config that
//! validated must not panic either (sizes are capped to keep allocations small).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(cfg) = toml::from_str::<qmomentum::config::TrainConfig>(text) else { return };
    if cfg.validate().is_err() {
        return;
    }
    let small = cfg.model.input <= 4096
        && cfg.model.layers.iter().all(|l| match l {
            qmomentum::config::LayerConfig::Dense { units, .. } => *units <= 4096,
            _ => true,
        })
        && cfg.model.layers.len() <= 16;
    if small {
        let _ = qmomentum::train::Trainer::new(cfg);
    }
});
