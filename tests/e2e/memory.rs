use std::process::{Command, Stdio};

use blockferry_tests::{MIB, PASSPHRASE, Rng, Sandbox, bin, make_image};

/// Runs a command and returns its exit code and peak RSS in bytes.
///
/// The peak is the child's own `VmHWM`, polled from /proc until it exits. (wait4's
/// `ru_maxrss` would not do: the child is spawned sharing this test process's memory until it
/// execs, and the kernel carries that high-water mark over into the child's figure.)
fn run_peak_rss(cmd: &mut Command) -> (i32, u64) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status_path)
            && let Some(line) = text.lines().find(|l| l.starts_with("VmHWM:"))
        {
            let kib: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            peak = peak.max(kib * 1024);
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code().unwrap_or(-1), peak);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// A dense image several times the budget stays within budget + a small constant.
/// (The 8 GiB measurement of the issue is a manual run, see ARCHITECTURE.md.)
#[test]
fn peak_rss_stays_within_the_budget() {
    let mut rng = Rng::seeded("peak_rss");
    let sb = Sandbox::new();
    sb.init(&[]);
    let image = sb.path("dense.raw");
    let data: Vec<(u64, Vec<u8>)> = (0..8)
        .map(|i| (i * 64 * MIB, rng.bytes(64 << 20)))
        .collect();
    make_image(&image, 512 * MIB, &data);
    drop(data);
    let budget = 48 * MIB;
    let (status, peak) = run_peak_rss(
        Command::new(bin())
            .args([
                "replicate",
                image.to_str().unwrap(),
                "--store",
                &sb.store(),
                "--memory-budget",
                "48M",
            ])
            .env("BLOCKFERRY_PASSPHRASE", PASSPHRASE)
            .env("BLOCKFERRY_STATE_DIR", sb.path("state")),
    );
    assert_eq!(status, 0);
    assert!(peak > 0, "no VmHWM reading");
    eprintln!(
        "peak RSS {} MiB for a 512 MiB dense image with a 48 MiB budget",
        peak / MIB
    );
    // The constant: program, libraries, allocator slack, thread stacks.
    assert!(
        peak < budget + 24 * MIB,
        "peak RSS {peak} exceeds budget {budget} + 24 MiB"
    );
}

/// A 10,000-part upload (the S3 maximum) stays within the budget: 64 KiB chunks and parts
/// into moto's emulator, which takes parts that small (SeaweedFS and AWS do not), through the
/// test proxy that counts the parts. (Reading it back through moto, which copies the whole
/// object for every ranged GET, would take many minutes; the round trips of multipart packs
/// are checked against SeaweedFS in `s3.rs` and `s3_faults.rs`.)
#[test]
fn ten_thousand_part_upload_stays_within_the_budget() {
    let (endpoint, bucket) = blockferry_tests::moto();
    let proxy = blockferry_tests::proxy::Proxy::start(endpoint);
    let mut rng = Rng::seeded("ten_thousand_parts");
    let sb = Sandbox::new();
    let store = format!("s3://{bucket}/parts-{}", std::process::id());
    let s3_args = [
        "--endpoint",
        proxy.url.as_str(),
        "--s3-min-part-size",
        "64K",
    ];
    let env = [
        ("AWS_ACCESS_KEY_ID", "moto"),
        ("AWS_SECRET_ACCESS_KEY", "moto"),
        ("AWS_REGION", "us-east-1"),
        ("BLOCKFERRY_PASSPHRASE", PASSPHRASE),
    ];
    let mut init = vec!["init", "--store", &store, "--chunk-size", "64K"];
    init.extend(s3_args);
    let out = sb.run_env(&init, &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 10,000 incompressible chunks: one worker puts them in one pack of 10,000 parts.
    let image = sb.path("noise.raw");
    let size = 10_000 * 64 * 1024;
    make_image(&image, size, &[(0, rng.bytes(size as usize))]);
    let budget = 16 * MIB;
    // The process's own footprint (binary, S3 client and its runtime) with the store open:
    // what the upload may add to it is the budget and a small constant.
    let mut snapshots = vec!["snapshots", "--store", &store];
    snapshots.extend(s3_args);
    let (status, baseline) = run_peak_rss(
        Command::new(bin())
            .args(&snapshots)
            .envs(env)
            .env("BLOCKFERRY_STATE_DIR", sb.path("state")),
    );
    assert_eq!(status, 0);
    let (status, peak) = run_peak_rss(
        Command::new(bin())
            .args(["replicate", image.to_str().unwrap(), "--store", &store])
            .args(s3_args)
            .args(["--memory-budget", "16M", "--workers", "1", "--jobs", "2"])
            .args(["--part-size", "64K"])
            .envs(env)
            .env("BLOCKFERRY_STATE_DIR", sb.path("state")),
    );
    assert_eq!(status, 0);
    let parts = proxy.part_requests();
    eprintln!(
        "peak RSS {} MiB for a {parts}-part upload with a 16 MiB budget ({} MiB with the store \
         just open)",
        peak / MIB,
        baseline / MIB
    );
    assert!(parts >= 10_000, "only {parts} parts");
    assert!(
        peak < baseline + budget + 16 * MIB,
        "peak RSS {peak} exceeds the {baseline} of an open store + budget {budget} + 16 MiB"
    );
}

/// Issue 16.13: a change list is bounded by its extents, not only its bytes. Before the fix a
/// 128 MiB list of 13 M extents took 646 MB and a 32 M-entry Hyper-V list 1.7 GB: the lists
/// were held whole several times over. Now they are parsed as streams into a set of at most
/// 2^20 extents (rounded out beyond that), a Hyper-V list's arrays paired in windows.
#[test]
fn long_change_lists_stay_bounded() {
    use std::io::Write;
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    let image = sb.path("thin.raw");
    let disk = 96u64 << 30;
    make_image(&image, disk, &[(0, vec![7u8; 1 << 20])]);
    let base = sb.replicate(&image, &["--change-id", "rctX:1:1"]);
    let base = base["snapshot"].as_str().unwrap();
    // 9 M one-byte extents 8 KiB apart (about 125 MiB of text).
    let lines = sb.path("changes.txt");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&lines).unwrap());
    for i in 0..9_000_000u64 {
        writeln!(w, "{},1", i * 8192).unwrap();
    }
    drop(w);
    // A Hyper-V list of 8 M entries (about 110 MiB).
    let rct = sb.path("changes.json");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&rct).unwrap());
    let n = 8_000_000u64;
    write!(w, "{{\"ChangedByteOffsets\": [").unwrap();
    for i in 0..n {
        write!(w, "{}{}", if i > 0 { "," } else { "" }, i * 8192).unwrap();
    }
    write!(w, "], \"ChangedByteLengths\": [").unwrap();
    for i in 0..n {
        write!(w, "{}1", if i > 0 { "," } else { "" }).unwrap();
    }
    write!(
        w,
        "], \"TargetRctId\": \"rctX:1:1\", \"ByteOffset\": 0, \"ProcessedByteLength\": {disk}}}"
    )
    .unwrap();
    drop(w);
    for list in [&lines, &rct] {
        let (status, peak) = run_peak_rss(
            Command::new(bin())
                .args(["replicate", image.to_str().unwrap(), "--store", &store])
                .args(["--base", base, "--changes", list.to_str().unwrap()])
                .args(["--memory-budget", "64M"])
                .env("BLOCKFERRY_PASSPHRASE", PASSPHRASE)
                .env("BLOCKFERRY_STATE_DIR", sb.path("state")),
        );
        assert_eq!(status, 0);
        eprintln!("peak RSS {} MiB with {}", peak / MIB, list.display());
        // The budget, the constant of the other tests, and the list: a set of at most 2^20
        // extents (16 MiB, twice while it is compacted) and two windows of a Hyper-V list's
        // arrays (32 MiB), plus the delta's own position lists of a 96 GiB disk.
        assert!(peak < 64 * MIB + 24 * MIB + 80 * MIB, "peak RSS {peak}");
    }
}
