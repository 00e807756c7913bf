use blockferry_tests::{MIB, Rng, Sandbox, make_image};

#[test]
fn demo_runs_the_whole_job() {
    let sb = Sandbox::new();
    let out = sb.run_env(&["demo", "--dir", sb.path("demo").to_str().unwrap()], &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "full replication",
        "replication again",
        "verified snapshot",
        "byte-identical",
    ] {
        assert!(text.contains(step), "demo output lacks {step:?}:\n{text}");
    }
}

#[test]
fn json_output_of_every_command() {
    let mut rng = Rng::seeded("json_output");
    let sb = Sandbox::new();
    let store = sb.store();
    let init = sb.json(&["init", "--store", &store, "--chunk-size", "256K"]);
    assert_eq!(init["chunk_size"], 256 * 1024);
    assert_eq!(init["encrypted"], true);
    let image = sb.path("disk.raw");
    make_image(&image, 10 * MIB, &[(MIB, rng.bytes(2 << 20))]);
    let r = sb.replicate(&image, &[]);
    for key in [
        "snapshot",
        "virtual_size",
        "bytes_read",
        "bytes_zero",
        "bytes_deduplicated",
        "bytes_stored",
        "seconds",
    ] {
        assert!(!r[key].is_null(), "replicate --json lacks {key}: {r}");
    }
    // io_uring where the kernel allows it (this machine does), else pread.
    assert!(
        r["io_engine"] == "io_uring" || r["io_engine"] == "pread",
        "{r}"
    );
    let list = sb.json(&["snapshots", "--store", &store]);
    assert_eq!(list["snapshots"][0]["id"], r["snapshot"]);
    assert_eq!(list["snapshots"][0]["virtual_size"], 10 * MIB);
    let snap = r["snapshot"].as_str().unwrap();
    // A unique prefix and `latest` both name it.
    let v = sb.json(&["verify", "--store", &store, &snap[..6]]);
    assert_eq!(v["ok"], true);
    assert_eq!(v["snapshot"], snap);
    let out = sb.path("out.raw");
    let rr = sb.json(&[
        "restore",
        "--store",
        &store,
        "latest",
        out.to_str().unwrap(),
    ]);
    assert_eq!(rr["virtual_size"], 10 * MIB);
    assert_eq!(rr["bytes_written"], 2 * MIB);
    // Plain replicate prints just the id on stdout, for `snap=$(blockferry replicate …)`.
    let plain = sb.ok(&["replicate", image.to_str().unwrap(), "--store", &store]);
    assert_eq!(plain.trim().len(), 16, "{plain:?}");
    let table = sb.ok(&["snapshots", "--store", &store]);
    assert!(
        table.contains(plain.trim()) && table.contains("disk.raw"),
        "{table}"
    );
}

/// Issue 16.17: a reader that goes away (`| head -1`, `| true`) ends the program quietly,
/// never with a panic (exit 101 and a stack trace before the fix).
#[test]
fn a_closed_pipe_ends_output_quietly() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let sb = Sandbox::new();
    let store = sb.store();
    sb.init(&[]);
    // Data every other 64 KiB: thousands of extents, far more output than a pipe holds.
    let image = sb.path("striped.raw");
    let regions: Vec<(u64, Vec<u8>)> = (0..4096u64)
        .map(|i| ((i * 128) << 10, vec![7u8; 64 << 10]))
        .collect();
    make_image(&image, 512 * MIB, &regions);
    sb.replicate(&image, &[]);
    let img = image.to_str().unwrap();
    let folder = sb.dir.path().to_str().unwrap();
    let cases: [(&[&str], bool); 6] = [
        (&["map", img, "--json"], true),
        (&["map", img], true),
        (&["snapshots", "--store", &store, "--json"], false),
        (&["snapshots", "--store", &store], false),
        (&["discover", folder], false),
        (&["info", img, "--json"], false),
    ];
    for (args, read_a_line) in cases {
        let mut child = Command::new(blockferry_tests::bin())
            .args(args)
            .env("BLOCKFERRY_PASSPHRASE", blockferry_tests::PASSPHRASE)
            .env("BLOCKFERRY_STATE_DIR", sb.path("state"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        if read_a_line {
            // `| head -1`: the writer is blocked on a full pipe when the reader goes.
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).unwrap();
            assert!(!line.is_empty());
        } else {
            // `| true`: gone before the first write.
            drop(stdout);
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !err.contains("panicked"),
            "{args:?}: {:?}\n{err}",
            out.status
        );
    }
}

/// Issue 16.20: what a user reads adds up and says what it means.
#[test]
fn figures_and_messages_a_user_reads() {
    let mut rng = Rng::seeded("user_figures");
    let sb = Sandbox::new();
    let store = sb.store();
    // init with a bad chunk size leaves no folder behind.
    sb.fails(
        &["init", "--store", &store, "--chunk-size", "3000"],
        1,
        &["chunk size"],
    );
    assert!(!std::path::Path::new(&store).exists(), "init left {store}");
    sb.init(&[]);
    // Usage errors are JSON with --json (and still exit 2).
    let out = sb.run(&["replicate", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "Usage", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("--store"),
        "{v}"
    );
    // An empty image is said so, once.
    let empty = sb.path("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    let out = sb.run(&["replicate", empty.to_str().unwrap(), "--store", &store]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("is empty").count(), 1, "{err}");
    // A part size means nothing to a local store.
    let image = sb.path("disk.raw");
    make_image(&image, 8 * MIB, &[(MIB, rng.bytes(3 << 20))]);
    sb.fails(
        &[
            "replicate",
            image.to_str().unwrap(),
            "--store",
            &store,
            "--part-size",
            "8M",
        ],
        1,
        &["part size applies to S3"],
    );
    // Replicate and restore figures add up to the disk.
    let r = sb.replicate(&image, &[]);
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap();
    assert_eq!(
        n(&r, "bytes_zero") + n(&r, "bytes_deduplicated") + n(&r, "bytes_new"),
        8 * MIB,
        "{r}"
    );
    assert!(n(&r, "bytes_read") <= n(&r, "allocated_bytes"), "{r}");
    let out = sb.path("out.raw");
    let rr = sb.json(&[
        "restore",
        "--store",
        &store,
        "disk.raw@latest",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        n(&rr, "bytes_written") + n(&rr, "bytes_zero"),
        8 * MIB,
        "{rr}"
    );
    // A damaged chunk's error names the pack with its offset in the pack, and the disk
    // offset in words; verify lists it at its disk offset.
    let pack = blockferry_tests::objects(&store, "packs").pop().unwrap();
    let size = std::fs::metadata(&pack).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, 200).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[byte[0] ^ 1], 200).unwrap();
    let out = sb.run(&[
        "restore",
        "--store",
        &store,
        "disk.raw@latest",
        sb.path("o2").to_str().unwrap(),
        "--json",
    ]);
    let failed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        failed["error"]["object"]
            .as_str()
            .unwrap()
            .starts_with("packs/"),
        "{failed}"
    );
    assert!(
        failed["error"]["offset"].as_u64().unwrap() < size,
        "{failed}"
    );
    // The damaged record is the pack's first, one of the three data chunks (which one
    // depends on which worker finished first).
    let message = failed["error"]["message"].as_str().unwrap();
    let at = [MIB, 2 * MIB, 3 * MIB]
        .into_iter()
        .find(|o| message.contains(&format!("at disk offset {o}")))
        .unwrap_or_else(|| panic!("{failed}"));
    let checked = sb.run(&["verify", "--store", &store, "disk.raw@latest", "--json"]);
    let checked: serde_json::Value = serde_json::from_slice(&checked.stdout).unwrap();
    assert_eq!(checked["problems"][0]["offset"], at, "{checked}");
}

#[test]
fn completions_and_man_pages_come_from_the_command_definitions() {
    let sb = Sandbox::new();
    for shell in ["bash", "zsh", "fish"] {
        let out = sb.run_env(&["generate", "--completions", shell], &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8_lossy(&out.stdout);
        // Every command and a flag added late are in it.
        for word in ["replicate", "sync", "gc", "stall-warning"] {
            assert!(script.contains(word), "{shell} completions lack {word:?}");
        }
        if shell == "bash" {
            let path = sb.path("blockferry.bash");
            std::fs::write(&path, script.as_bytes()).unwrap();
            let check = std::process::Command::new("bash")
                .args(["-n", path.to_str().unwrap()])
                .status()
                .unwrap();
            assert!(check.success(), "the bash completions do not parse");
        }
    }
    let dir = sb.path("man");
    let out = sb.run_env(&["generate", "--man", dir.to_str().unwrap()], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "blockferry.1",
        "blockferry-replicate.1",
        "blockferry-sync.1",
    ] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        assert!(text.contains(".TH blockferry"), "{page}: {text}");
    }
    let replicate = std::fs::read_to_string(dir.join("blockferry-replicate.1")).unwrap();
    assert!(replicate.contains("changes\\-from\\-chain"), "{replicate}");
    // Nothing asked for is a usage error.
    assert_eq!(sb.run_env(&["generate"], &[]).status.code(), Some(2));
}
