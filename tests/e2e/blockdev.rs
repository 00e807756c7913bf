use std::process::Command;

use blockferry_tests::{MIB, Rng, Sandbox, file_hash, make_image};

/// A loop device over a file, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &std::path::Path, read_only: bool) -> Option<Loop> {
        let mut cmd = Command::new("losetup");
        cmd.args(["-f", "--show"]);
        if read_only {
            cmd.arg("-r");
        }
        let out = cmd.arg(file).output().ok()?;
        out.status
            .success()
            .then(|| Loop(String::from_utf8_lossy(&out.stdout).trim().to_owned()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Replicates from a read-only block device and restores onto another one.
#[test]
fn replicate_from_and_restore_to_block_devices() {
    let mut rng = Rng::seeded("block_devices");
    let sb = Sandbox::new();
    sb.init(&[]);
    let backing = sb.path("backing.raw");
    make_image(
        &backing,
        48 * MIB,
        &[(0, rng.bytes(3 << 20)), (20 * MIB, rng.texty(5 << 20))],
    );
    let target_file = sb.path("target.raw");
    // The target starts full of garbage: zero chunks must be written as zeros on a device.
    make_image(&target_file, 64 * MIB, &[(0, vec![0xee; 64 << 20])]);
    let (Some(src), Some(dst)) = (
        Loop::attach(&backing, true),
        Loop::attach(&target_file, false),
    ) else {
        assert!(
            std::env::var_os("BF_REQUIRE_TOOLS").is_none(),
            "loop devices are unavailable"
        );
        eprintln!("skipping: loop devices are unavailable here");
        return;
    };
    let r = sb.replicate(std::path::Path::new(&src.0), &[]);
    assert_eq!(r["virtual_size"], 48 * MIB);
    let snap = r["snapshot"].as_str().unwrap();
    let store = sb.store();
    // Issue 16.19: a device is overwritten only with --force, as an existing file is
    // (before the fix it was written without a word); a device in use is refused.
    sb.fails(
        &["restore", "--store", &store, snap, &dst.0],
        1,
        &["--force", "block device"],
    );
    sb.fails(
        &["convert", backing.to_str().unwrap(), &dst.0],
        1,
        &["--force", "block device"],
    );
    assert!(
        std::fs::read(&target_file)
            .unwrap()
            .iter()
            .all(|&b| b == 0xee)
    );
    {
        use std::os::unix::fs::OpenOptionsExt;
        let _held = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&dst.0)
            .unwrap();
        sb.fails(
            &["restore", "--store", &store, snap, &dst.0, "--force"],
            1,
            &["in use"],
        );
    }
    let rr = sb.json(&["restore", "--store", &store, snap, &dst.0, "--force"]);
    assert_eq!(rr["block_device"], true);
    drop(dst);
    // The first 48 MiB of the target now equal the source; the rest is untouched.
    let restored = std::fs::read(&target_file).unwrap();
    let original = std::fs::read(&backing).unwrap();
    assert!(
        restored[..48 << 20] == original[..],
        "device contents differ"
    );
    assert!(restored[48 << 20..].iter().all(|&b| b == 0xee));
    // A device smaller than the disk is refused.
    let small = sb.path("small.raw");
    make_image(&small, 8 * MIB, &[]);
    let dev = Loop::attach(&small, false).unwrap();
    let out = sb.run(&["restore", "--store", &store, snap, &dev.0, "--force"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the device holds"));
    let _ = file_hash(&backing);
}

/// Issue 16.6: a block device keeps its size, times and inode through writes by another
/// node or a mounted file system, so resuming a killed job from it made a snapshot of two
/// states (158 chunks old, 99 new, exit 0 in the review). A resumed run now reads a sample
/// of the recorded positions again and refuses when they differ.
#[test]
fn resuming_from_a_block_device_written_meanwhile_is_refused() {
    let mut rng = Rng::seeded("blockdev_resume");
    let sb = Sandbox::new();
    sb.init(&[]);
    let backing = sb.path("backing.raw");
    make_image(&backing, 64 * MIB, &[(0, rng.bytes(64 << 20))]);
    let Some(dev) = Loop::attach(&backing, false) else {
        assert!(
            std::env::var_os("BF_REQUIRE_TOOLS").is_none(),
            "loop devices are unavailable"
        );
        eprintln!("skipping: loop devices are unavailable here");
        return;
    };
    let store = sb.store();
    let device = std::path::Path::new(&dev.0);
    let packs = || blockferry_tests::objects(&store, "packs").len();
    blockferry_tests::kill_when(&sb, device, &["--bwlimit", "16M", "--workers", "1"], || {
        packs() >= 2
    });
    // Another writer rewrites the disk through the device.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(device)
            .unwrap();
        f.write_all(&rng.bytes(64 << 20)).unwrap();
        f.sync_all().unwrap();
    }
    sb.fails(
        &["replicate", &dev.0, "--store", &store],
        1,
        &["the source changed", "differ"],
    );
    let r = sb.replicate(device, &["--restart"]);
    let out = sb.restore(r["snapshot"].as_str().unwrap(), "out.raw");
    drop(dev);
    assert_eq!(file_hash(&out), file_hash(&backing));
}
