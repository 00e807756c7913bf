//! `blockferry convert` against `qemu-img convert -O raw`, on the same 2 GiB dense image in
//! each format, in one run. Run: `cargo bench -p blockferry-benches --bench convert`
//! (`BF_BENCH_GIB` sets the size; `BF_BENCH_KEEP=1` keeps the images for the next run). Output goes to tmpfs so both measure reading and
//! decoding, not the disk. The tools run in turns, 9 times each;
//! the table gives median times and the ratios of medians and of bests.

// A benchmark harness prints its results.
#![allow(clippy::print_stdout)]

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use blockferry_benches::{Paired, blockferry_release, machine, settle, time};

/// Runs of each tool per format, taken in turns.
const RUNS: usize = 9;

fn main() -> Result<()> {
    let gib: u64 = std::env::var("BF_BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let bf = blockferry_release()?;
    let work = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-convert");
    std::fs::create_dir_all(&work)?;
    let out_dir = Path::new("/dev/shm").join("bf-bench-convert");
    // A run that was interrupted leaves its outputs in memory: start from an empty folder.
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&out_dir)?;
    let raw = work.join("dense.raw");
    if std::fs::metadata(&raw).map(|m| m.len()).ok() != Some(gib << 30) {
        // Dense, mixed data: half random (incompressible), half repetitive text.
        let mut f = std::fs::File::create(&raw)?;
        let mut state = 0x1234_5678_9abc_def0_u64;
        let mut buf = vec![0u8; 1 << 20];
        for mib in 0..(gib << 10) {
            for (i, c) in buf.chunks_mut(8).enumerate() {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let v = if mib % 2 == 0 {
                    state
                } else {
                    (i as u64 % 97) * 0x0101_0101_0101_0101
                };
                c.copy_from_slice(&v.to_le_bytes());
            }
            std::io::Write::write_all(&mut f, &buf)?;
        }
    }
    println!("machine: {}", machine());
    println!(
        "image: {gib} GiB dense (half random, half repetitive); output on tmpfs; {RUNS} runs each in turns, medians; warm cache\n"
    );
    println!(
        "{:<24} {:>10} {:>12} {:>10} {:>10}",
        "format", "qemu-img s", "blockferry s", "ratio med", "ratio best"
    );
    let formats: [(&str, &str, &[&str]); 8] = [
        ("raw", "raw", &[]),
        (
            "vpc dynamic",
            "vpc",
            &["-o", "subformat=dynamic,force_size=on"],
        ),
        ("vpc fixed", "vpc", &["-o", "subformat=fixed,force_size=on"]),
        ("vhdx dynamic", "vhdx", &[]),
        ("vhdx fixed", "vhdx", &["-o", "subformat=fixed"]),
        ("vmdk monolithicSparse", "vmdk", &[]),
        (
            "vmdk streamOptimized",
            "vmdk",
            &["-o", "subformat=streamOptimized"],
        ),
        (
            "vmdk monolithicFlat",
            "vmdk",
            &["-o", "subformat=monolithicFlat"],
        ),
    ];
    for (name, fmt, opts) in &formats {
        // Named by size: images made from another size of source are never reused.
        let image = if *fmt == "raw" {
            raw.clone()
        } else {
            work.join(format!("{}-{gib}g.{fmt}", name.replace(' ', "-")))
        };
        if !image.exists() {
            let mut c = Command::new("qemu-img");
            c.args(["convert", "-f", "raw", "-O", fmt])
                .args(*opts)
                .arg(&raw)
                .arg(&image);
            time(&mut c).with_context(|| format!("creating {name}"))?;
        }
        // Written back and in the page cache before the first timed run: writeback of a
        // new image would otherwise fall on whichever tool runs while it happens.
        settle(&image)?;
        let q_out = out_dir.join("q.raw");
        let b_out = out_dir.join("b.raw");
        let runs = Paired::run(
            RUNS,
            || {
                let _ = std::fs::remove_file(&q_out);
                time(
                    Command::new("qemu-img")
                        .args(["convert", "-f", fmt, "-O", "raw"])
                        .arg(&image)
                        .arg(&q_out),
                )
            },
            || {
                let _ = std::fs::remove_file(&b_out);
                time(Command::new(&bf).arg("convert").arg(&image).arg(&b_out))
            },
        )?;
        let ((qm, bm), (qb, bb)) = (runs.medians(), runs.bests());
        println!(
            "{name:<24} {qm:>10.2} {bm:>12.2} {:>10.2} {:>10.2}",
            qm / bm,
            qb / bb
        );
        let _ = std::fs::remove_file(&q_out);
        let _ = std::fs::remove_file(&b_out);
        if *fmt != "raw" && std::env::var_os("BF_BENCH_KEEP").is_none() {
            // 2 GiB each: the disk holds one at a time.
            let _ = std::fs::remove_file(&image);
            let _ = std::fs::remove_file(
                work.join(format!("{}-{gib}g-flat.vmdk", name.replace(' ', "-"))),
            );
        }
    }
    std::fs::remove_dir_all(&out_dir)?;
    println!("\nratio > 1: blockferry is faster");
    Ok(())
}
