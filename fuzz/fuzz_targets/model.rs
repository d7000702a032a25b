//! The integer runtime's model loader on arbitrary bytes; a model that loads must also run.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = qmomentum_runtime::Model::from_bytes(data) {
        let n = m.input().size;
        if n <= 1 << 16 {
            let x = vec![7u8; n];
            let mut ws = m.workspace(1);
            let _ = m.run(&mut ws, &x, 1);
        }
    }
});
