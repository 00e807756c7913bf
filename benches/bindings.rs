//! The bindings' overhead: one full replication of the same image into a new local store
//! through the CLI, through Python (`blockferry.Store.replicate` with a progress callback)
//! and through the C ABI (`bf_replicate` with a progress callback), each a whole process,
//! timed in turns. Run: `cargo bench -p blockferry-benches --bench bindings` (needs `cc` and
//! `python3`; `BF_BENCH_MIB` sets the image size, default 2048; `BF_BENCH_RUNS` the runs of
//! each, default 5). The target: Python and C within 5% of the CLI (median time ratio ≤ 1.05).

// A benchmark harness prints its results.
#![allow(clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;
use blockferry_benches::{blockferry_release, machine, make_os_image, run, warm};

const PASSPHRASE: &str = "bench passphrase";

fn main() -> Result<()> {
    let mib: u64 = env_or("BF_BENCH_MIB", 2048);
    let runs: usize = env_or("BF_BENCH_RUNS", 5);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let work = root.join("target/bench-bindings");
    std::fs::create_dir_all(&work)?;
    let image = work.join("disk.raw");
    if std::fs::metadata(&image).map(|m| m.len()).ok() != Some(mib << 20) {
        make_os_image(&image, mib, 0xb1d1)?;
    }

    // The three front ends, all release builds.
    let cli = blockferry_release()?;
    // The library as a host links it (ffi/dist.sh builds and packs it).
    run(Command::new(root.join("ffi/dist.sh")).arg("release"))?;
    let c_bin = work.join("replicate-c");
    let lib = root.join("target/ffi/release/lib");
    run(Command::new("cc")
        .args(["-O2", "-std=c11", "-Wall", "-Werror", "-o"])
        .arg(&c_bin)
        .arg(root.join("benches/bindings/replicate.c"))
        .arg("-I")
        .arg(root.join("ffi/include"))
        .arg(format!("-L{}", lib.display()))
        .arg("-lblockferry_ffi")
        .arg(format!("-Wl,-rpath,{}", lib.display())))?;
    let python = python_with_package(&root, &work)?;

    println!("machine: {}", machine());
    println!(
        "job: full replication of a {mib} MiB OS-like image (warm cache) into a new encrypted \
         local store; {runs} runs of each in turns; whole-process wall times\n"
    );
    let mut times: [Vec<f64>; 3] = Default::default();
    for i in 0..runs {
        for (k, front) in ["cli", "python", "c"].iter().enumerate() {
            let store = work.join(format!("store-{front}"));
            let state = work.join(format!("state-{front}"));
            let _ = std::fs::remove_dir_all(&store);
            let _ = std::fs::remove_dir_all(&state);
            run(Command::new(&cli)
                .args(["init", "--store"])
                .arg(&store)
                .env("BLOCKFERRY_PASSPHRASE", PASSPHRASE))?;
            let mut cmd = match *front {
                "cli" => {
                    let mut c = Command::new(&cli);
                    c.arg("replicate").arg(&image).arg("--store").arg(&store);
                    c.arg("--state-dir").arg(&state);
                    c
                }
                "python" => {
                    let mut c = Command::new(&python);
                    c.arg(root.join("benches/bindings/replicate.py"));
                    c.arg(&image).arg(&store).arg(&state);
                    c
                }
                _ => {
                    let mut c = Command::new(&c_bin);
                    c.arg(&image).arg(&store).arg(&state);
                    c
                }
            };
            cmd.env("BLOCKFERRY_PASSPHRASE", PASSPHRASE);
            warm(&image)?;
            let (secs, out) = run(&mut cmd)?;
            println!("run {} {front:<6} {secs:.3} s  {}", i + 1, out.trim());
            times[k].push(secs);
        }
    }
    for t in &mut times {
        t.sort_by(f64::total_cmp);
    }
    let med = |t: &[f64]| t[t.len() / 2];
    let (cli_t, py_t, c_t) = (med(&times[0]), med(&times[1]), med(&times[2]));
    println!(
        "\n{:<8} {:>10} {:>10} {:>16}",
        "front", "median s", "best s", "median / CLI"
    );
    for (name, t) in [("cli", &times[0]), ("python", &times[1]), ("c", &times[2])] {
        println!(
            "{name:<8} {:>10.3} {:>10.3} {:>16.3}",
            med(t),
            t[0],
            med(t) / cli_t
        );
    }
    let ok = |r: f64| if r <= 1.05 { "met" } else { "NOT MET" };
    println!(
        "\ntarget: at most 5% slower than the CLI: python {:.3} ({}), c {:.3} ({})",
        py_t / cli_t,
        ok(py_t / cli_t),
        c_t / cli_t,
        ok(c_t / cli_t)
    );
    for front in ["cli", "python", "c"] {
        let _ = std::fs::remove_dir_all(work.join(format!("store-{front}")));
        let _ = std::fs::remove_dir_all(work.join(format!("state-{front}")));
    }
    Ok(())
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A venv under `work` with the package installed from `python/` (a release build), as a
/// user installs it; returns its interpreter.
fn python_with_package(root: &Path, work: &Path) -> Result<PathBuf> {
    let venv = work.join("venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--force-reinstall", "--no-deps"])
        .arg(root.join("python")))?;
    Ok(python)
}
