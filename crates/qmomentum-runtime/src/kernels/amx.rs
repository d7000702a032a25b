//! The int8 dense kernel on AMX-INT8 tiles (Intel Sapphire Rapids and later).
//!
//! `tdpbusd` multiplies a 16×64 tile of u8 activations by a 64×16 tile of i8 weights into a
//! 16×16 tile of i32 accumulators: 16,384 multiply-adds per instruction, the same u8×i8 → i32
//! arithmetic as `vpdpbusd` (so the results are bit-identical to every other tier; wrapping i32
//! sums, exact products). Measured peak on a 2-vCPU Xeon VM: see `doc/runtime.md`.
//!
//! The weights are read in the VNNI layout of `avx512.rs` as they are: group `g` of 16 output
//! channels, quad `s` of 4 inputs is the 64-byte row `(g·steps + s)·64`, which is exactly one
//! row of an AMX `B` tile (16 channels × 4 inputs). No second packing.
//!
//! Per call, rows are taken 32 at a time (two row blocks of ≤ 16, one `C` tile each), inputs 64
//! at a time (one `A` tile per row block, one `B` tile) plus a tail of `4·tq < 64` inputs with
//! tiles of their own shape, so that no tile reads a byte the caller did not pass. Tiles:
//! `tmm0/1` C (blocks 0/1), `tmm2/3` A (full), `tmm4` B (full), `tmm5/6` A (tail), `tmm7` B
//! (tail). The accumulators start from the bias row (a tile load with stride 0).
//!
//! Written with inline assembly: Rust's AMX intrinsics are not stable, and the instructions are
//! few (`ldtilecfg`, `sttilecfg`, `tileloadd`, `tdpbusd`, `tilestored`). Linux hands out the
//! 8 KB tile state only to a process that asks (`arch_prctl(ARCH_REQ_XCOMP_PERM)`):
//! [`available`] asks once and caches the answer (other systems: the tier is not offered).
//!
//! The tile configuration is loaded only when the one in place differs: each call reads it back
//! (`sttilecfg`, cheap) and compares, so another AMX user on the thread (oneDNN in the same
//! Python process, say) can never leave us tiles of the wrong shape. Loading and releasing it at
//! every call was 19 % of this kernel's samples on cnn-small. The tiles stay configured after a
//! call (the thread's 8 KB of tile state is then saved at context switches).

use std::arch::asm;
use std::sync::OnceLock;

use super::{PackedDenseI8, LANES};

/// Whether this CPU has AMX-TILE and AMX-INT8 and the kernel granted this process the tile
/// state (asked once).
pub(crate) fn available() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    *GRANTED.get_or_init(|| {
        // CPUID leaf 7, sub-leaf 0, EDX bit 24 = AMX-TILE, bit 25 = AMX-INT8.
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        if edx & (1 << 24) == 0 || edx & (1 << 25) == 0 {
            return false;
        }
        if !super::KernelKind::Avx512Vnni.is_available() {
            return false;
        }
        request_tile_state()
    })
}

/// Linux: `arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18)`, true on success.
#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    {
        let ret: i64;
        // SAFETY: the `arch_prctl` system call with these arguments only changes this process's
        // permission to use the AMX tile state; it reads and writes no memory of ours. `syscall`
        // clobbers rcx and r11, declared here; the stack is not used.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") 158i64 => ret,
                in("rdi") 0x1023i64,
                in("rsi") 18i64,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    }
}

/// Other systems: no tier (their system calls differ; not wired up).
#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// Whether the AMX kernel takes this call (else the VNNI kernel does, with the same results).
/// It must not read outside the rows the caller passed: a tile row is whole 4-byte input steps,
/// so the inputs must be a multiple of 4 (convolutions pad their patches to 4 bytes). 4-bit
/// layers have no byte layout for the tiles. And it only pays from a tile's worth of rows: with
/// fewer, most of each `tdpbusd` is wasted and the tile configuration changes (measured: the
/// MLP's batch-1 latency 1.16 µs on AMX against 0.8 µs on VNNI).
pub(super) fn fits(w: &PackedDenseI8, rows: usize) -> bool {
    rows >= MIN_ROWS && w.inputs.is_multiple_of(4) && w.vnni.is_some() && w.nibbles.is_none()
}

/// Fewest rows for which [`fits`] takes a call: one full tile.
const MIN_ROWS: usize = 16;

/// One 16×16 i32 tile in memory.
#[repr(C, align(64))]
struct Tile([[i32; LANES]; 16]);

/// The 64-byte tile configuration (palette 1): `colsb` bytes per row and `rows` of each tile.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn new(shapes: &[(u8, u16); 8]) -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        for (t, &(rows, colsb)) in shapes.iter().enumerate() {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
            c[48 + t] = rows;
        }
        TileConfig(c)
    }
}

/// `acc[b][j] = bias[j] + Σ_k x[b][k]·W[j][k]` for `rows` rows, as [`super::dense_i8`].
///
/// # Safety
/// - [`available`] returned true (AMX-TILE, AMX-INT8, the tile state granted to this process).
/// - `packed` is `w.vnni` (the layout of `avx512::pack` for `w.inputs × w.outputs`).
/// - [`fits`]`(w, rows)` is true; `x` holds `(rows − 1)·x_stride + w.inputs` bytes and `acc`
///   `(rows − 1)·acc_stride + w.outputs` values (when `rows > 0`), `acc_stride ≥ w.outputs`;
///   `w.bias` holds `⌈outputs/16⌉·16` values.
pub(super) unsafe fn dense_i8(
    w: &PackedDenseI8,
    packed: &[i8],
    x: &[u8],
    x_stride: usize,
    rows: usize,
    acc: &mut [i32],
    acc_stride: usize,
) {
    let groups = w.outputs.div_ceil(LANES);
    let steps = w.inputs / 4;
    let (full, tq) = (steps / 16, steps % 16);
    debug_assert!(fits(w, rows) && acc_stride >= w.outputs);
    debug_assert!(rows == 0 || acc.len() >= (rows - 1) * acc_stride + w.outputs);
    debug_assert!(packed.len() >= groups * steps * 64 && w.bias.len() >= groups * LANES);
    debug_assert!(rows == 0 || x.len() >= (rows - 1) * x_stride + w.inputs);
    let (xp, wp, bp, ap) = (x.as_ptr(), packed.as_ptr(), w.bias.as_ptr(), acc.as_mut_ptr());
    let acc_bytes = acc_stride * 4;
    // The configuration in place now (all zero if none): read back, never assumed.
    let mut current = TileConfig([0; 64]);
    // SAFETY: `sttilecfg` writes 64 bytes to a 64-byte buffer we own (zeros when the tiles are
    // not configured); it reads no memory.
    unsafe { asm!("sttilecfg [{0}]", in(reg) current.0.as_mut_ptr(), options(nostack, preserves_flags)) };
    let mut m0 = 0;
    while m0 < rows {
        let r0 = (rows - m0).min(16);
        let r1 = (rows - m0 - r0).min(16);
        // Tiles of an absent block (r1 = 0) stay unconfigured and are never touched.
        let (a, b) = (r0 as u8, r1 as u8);
        let cfg = TileConfig::new(&[
            (a, 64),
            (b, if b > 0 { 64 } else { 0 }),
            (a, 64),
            (b, if b > 0 { 64 } else { 0 }),
            (16, 64),
            (if tq > 0 { a } else { 0 }, (4 * tq) as u16),
            (if tq > 0 { b } else { 0 }, if b > 0 { (4 * tq) as u16 } else { 0 }),
            (tq as u8, if tq > 0 { 64 } else { 0 }),
        ]);
        if cfg.0 != current.0 {
            // SAFETY: a valid palette-1 configuration (rows ≤ 16, colsb ≤ 64, unused tiles all
            // zero), read from a 64-byte buffer that lives across the call.
            unsafe { asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly, preserves_flags)) };
            current = cfg;
        }
        // SAFETY: (every tile access below) rows `m0..m0 + r0 + r1 ≤ rows` of `x` are read,
        // bytes `0..4·steps = w.inputs` of each (the caller's promise on `x`); weight rows
        // `g·steps + s` for `s < steps` lie in `packed` (its length); the bias tile reads the 16
        // values at `16·g` (padded bias); the C tiles write channels `16·g..16·g + 16` of rows
        // `m0..m0 + r0 + r1` when the group is whole (inside `acc`: `16·g + 16 ≤ outputs ≤
        // acc_stride`), else a local tile whose first `outputs − 16·g` channels are copied.
        // Each tile's shape is exactly those rows and bytes: the configuration in place equals
        // `cfg` (read back with `sttilecfg` at the start of the call, loaded above if it
        // differed); no function is called between here and the last tile instruction of the
        // block (the partial group's copies come after both of its tile stores), so nothing can
        // change the tiles in between.
        unsafe {
            let x0 = xp.add(m0 * x_stride);
            // Only dereferenced when r1 > 0; `wrapping_add` because with r1 = 0 it may point
            // past the end of `x`.
            let x1 = xp.wrapping_add((m0 + r0) * x_stride);
            for g in 0..groups {
                let bias = bp.add(g * LANES);
                asm!("tileloadd tmm0, [{b} + {z}*1]", b = in(reg) bias, z = in(reg) 0usize, options(nostack, readonly, preserves_flags));
                if r1 > 0 {
                    asm!("tileloadd tmm1, [{b} + {z}*1]", b = in(reg) bias, z = in(reg) 0usize, options(nostack, readonly, preserves_flags));
                }
                let wg = wp.add(g * steps * 64);
                for c in 0..full {
                    asm!(
                        "tileloadd tmm4, [{w} + {s64}*1]",
                        "tileloadd tmm2, [{a} + {xs}*1]",
                        "tdpbusd tmm0, tmm2, tmm4",
                        w = in(reg) wg.add(c * 16 * 64),
                        s64 = in(reg) 64usize,
                        a = in(reg) x0.add(c * 64),
                        xs = in(reg) x_stride,
                        options(nostack, readonly, preserves_flags),
                    );
                    if r1 > 0 {
                        asm!(
                            "tileloadd tmm3, [{a} + {xs}*1]",
                            "tdpbusd tmm1, tmm3, tmm4",
                            a = in(reg) x1.add(c * 64),
                            xs = in(reg) x_stride,
                            options(nostack, readonly, preserves_flags),
                        );
                    }
                }
                if tq > 0 {
                    asm!(
                        "tileloadd tmm7, [{w} + {s64}*1]",
                        "tileloadd tmm5, [{a} + {xs}*1]",
                        "tdpbusd tmm0, tmm5, tmm7",
                        w = in(reg) wg.add(full * 16 * 64),
                        s64 = in(reg) 64usize,
                        a = in(reg) x0.add(full * 64),
                        xs = in(reg) x_stride,
                        options(nostack, readonly, preserves_flags),
                    );
                    if r1 > 0 {
                        asm!(
                            "tileloadd tmm6, [{a} + {xs}*1]",
                            "tdpbusd tmm1, tmm6, tmm7",
                            a = in(reg) x1.add(full * 64),
                            xs = in(reg) x_stride,
                            options(nostack, readonly, preserves_flags),
                        );
                    }
                }
                let width = (w.outputs - g * LANES).min(LANES);
                if width == LANES {
                    asm!(
                        "tilestored [{c} + {s}*1], tmm0",
                        c = in(reg) ap.add(m0 * acc_stride + g * LANES),
                        s = in(reg) acc_bytes,
                        options(nostack, preserves_flags),
                    );
                    if r1 > 0 {
                        asm!(
                            "tilestored [{c} + {s}*1], tmm1",
                            c = in(reg) ap.add((m0 + r0) * acc_stride + g * LANES),
                            s = in(reg) acc_bytes,
                            options(nostack, preserves_flags),
                        );
                    }
                } else {
                    // The last, partial group: through a local tile, then only its `width`
                    // channels (the kernels write no more than `outputs` per row).
                    let mut t0 = Tile([[0i32; LANES]; 16]);
                    let mut t1 = Tile([[0i32; LANES]; 16]);
                    asm!("tilestored [{c} + {s}*1], tmm0", c = in(reg) t0.0.as_mut_ptr(), s = in(reg) 64usize, options(nostack, preserves_flags));
                    if r1 > 0 {
                        asm!("tilestored [{c} + {s}*1], tmm1", c = in(reg) t1.0.as_mut_ptr(), s = in(reg) 64usize, options(nostack, preserves_flags));
                    }
                    for (t, r, m) in [(&t0, r0, m0), (&t1, r1, m0 + r0)] {
                        for (i, row) in t.0[..r].iter().enumerate() {
                            let dst = ap.add((m + i) * acc_stride + g * LANES);
                            std::ptr::copy_nonoverlapping(row.as_ptr(), dst, width);
                        }
                    }
                }
            }
        }
        m0 += r0 + r1;
    }
}
