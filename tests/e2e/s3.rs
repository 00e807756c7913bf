//! The S3 backend against a real S3 server on loopback (SeaweedFS, started by the tests):
//! round trips of every image kind, clear and fast errors, concurrent writers.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use blockferry_tests::{
    MIB, PASSPHRASE, Rng, Sandbox, expect_failure, file_hash, have_qemu, make_image, qemu_from_raw,
    s3,
};

/// A 48 MiB disk with random and text data, zero runs and holes at random places.
fn sample_disk(sb: &Sandbox, rng: &mut Rng, name: &str) -> PathBuf {
    let size = 48 * MIB;
    let mut regions = Vec::new();
    for _ in 0..10 {
        let off = rng.below(size - 2 * MIB);
        let len = 4096 + rng.below(2 * MIB - 4096) as usize;
        let data = match rng.below(3) {
            0 => rng.bytes(len),
            1 => rng.texty(len),
            _ => vec![0; len],
        };
        regions.push((off, data));
    }
    let raw = sb.path(name);
    make_image(&raw, size, &regions);
    raw
}

#[test]
fn every_image_kind_round_trips_through_s3() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("s3_every_kind");
    let sb = Sandbox::new_s3("kinds");
    sb.init(&[]);
    let raw = sample_disk(&sb, &mut rng, "disk.raw");
    let want = file_hash(&raw);
    let mut images = vec![raw.clone()];
    for (name, fmt, opts) in [
        ("dyn.vhd", "vpc", "subformat=dynamic,force_size=on"),
        ("fixed.vhd", "vpc", "subformat=fixed,force_size=on"),
        ("dyn.vhdx", "vhdx", "block_size=8M"),
        ("fixed.vhdx", "vhdx", "subformat=fixed"),
        ("sparse.vmdk", "vmdk", ""),
        ("stream.vmdk", "vmdk", "subformat=streamOptimized"),
        ("flat.vmdk", "vmdk", "subformat=monolithicFlat"),
        ("split.vmdk", "vmdk", "subformat=twoGbMaxExtentSparse"),
    ] {
        let image = sb.path(name);
        qemu_from_raw(&raw, &image, fmt, opts);
        images.push(image);
    }
    let stream = std::fs::read(sb.path("stream.vmdk")).unwrap();
    let ova = sb.path("vm.ova");
    std::fs::write(
        &ova,
        crate::ova::tar(&[
            ("vm.ovf", crate::ova::ovf(&[("disk.vmdk", 48 * MIB)])),
            ("disk.vmdk", stream),
        ]),
    )
    .unwrap();
    images.push(ova);

    for (i, image) in images.iter().enumerate() {
        let report = sb.replicate(image, &[]);
        let snap = report["snapshot"].as_str().unwrap();
        let out = sb.restore(snap, &format!("out{i}.raw"));
        assert_eq!(file_hash(&out), want, "{} through S3", image.display());
        if i > 0 {
            // The same disk in another format: every chunk is already in the store.
            assert_eq!(report["bytes_new"], 0, "{}: {report}", image.display());
        }
    }
    sb.verify_latest_against(&raw);
}

/// Runs blockferry against S3 with `env` overriding the working settings; returns the
/// output and how long it took.
fn timed(sb: &Sandbox, args: &[&str], env: &[(&str, &str)]) -> (std::process::Output, Duration) {
    let start = Instant::now();
    let out = sb.run_env(args, env);
    (out, start.elapsed())
}

#[test]
fn s3_failures_are_clear_fast_and_leave_nothing() {
    let env = s3();
    let sb = Sandbox::new_s3("errors");
    let store = sb.store();
    let pass = [("BLOCKFERRY_PASSPHRASE", "pw")];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v = pass.to_vec();
        v.extend_from_slice(extra);
        v
    };
    let quick = Duration::from_secs(30);

    // Issue 16.8: no credentials at all, and an endpoint that is no URL, are said so (the
    // catch-all said "answered with an error" for both).
    let bare = |args: &[&str]| {
        std::process::Command::new(blockferry_tests::bin())
            .args(args)
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_PROFILE")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("HOME", sb.path("nohome"))
            .env("AWS_REGION", "us-east-1")
            .env("BLOCKFERRY_STATE_DIR", sb.path("state"))
            .output()
            .unwrap()
    };
    expect_failure(
        bare(&["snapshots", "--store", &store, "--endpoint", &env.endpoint]),
        1,
        &["no AWS credentials found", "AWS_ACCESS_KEY_ID"],
    );
    expect_failure(
        sb.run_env(
            &["snapshots", "--store", &store, "--endpoint", "not-a-url"],
            &pass,
        ),
        1,
        &["is not a URL", "not-a-url"],
    );

    // Refused credentials, at init: nothing may appear under the prefix.
    let (out, took) = timed(
        &sb,
        &["init", "--store", &store],
        &with(&[("AWS_ACCESS_KEY_ID", "nosuchkey")]),
    );
    expect_failure(
        out,
        1,
        &["does not know this access key id", "AWS_ACCESS_KEY_ID"],
    );
    assert!(took < quick, "{took:?}");
    let (out, took) = timed(
        &sb,
        &["init", "--store", &store],
        &with(&[("AWS_SECRET_ACCESS_KEY", "wrongsecret")]),
    );
    expect_failure(
        out,
        1,
        &["refused the request signature", "AWS_SECRET_ACCESS_KEY"],
    );
    assert!(took < quick, "{took:?}");
    let json = sb.run_env(
        &["init", "--store", &store, "--json"],
        &with(&[("AWS_SECRET_ACCESS_KEY", "x")]),
    );
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "AccessDenied", "{v}");
    // Nothing half-written: the prefix is still free for a real init.
    sb.init(&["--no-encryption"]);

    // A bucket that does not exist.
    let missing = format!("s3://nosuchbucket{}/x", std::process::id());
    let (out, took) = timed(&sb, &["snapshots", "--store", &missing], &[]);
    expect_failure(out, 1, &["bucket", "does not exist", &env.endpoint]);
    assert!(took < quick, "{took:?}");

    // Credentials that may read and write but not list.
    let (out, took) = timed(
        &sb,
        &["snapshots", "--store", &store],
        &[("AWS_ACCESS_KEY_ID", env.nolist_key.as_str())],
    );
    expect_failure(out, 1, &["access denied", "s3:ListBucket"]);
    assert!(took < quick, "{took:?}");

    // Nothing listens: connection refused.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (out, took) = timed(
        &sb,
        &["snapshots", "--store", &store, "--endpoint", &refused],
        &[],
    );
    expect_failure(out, 1, &["cannot reach", &refused]);
    assert!(took < quick, "{took:?}");

    // Something accepts connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let (out, took) = timed(
        &sb,
        &["snapshots", "--store", &store, "--endpoint", &silent_url],
        &[],
    );
    expect_failure(out, 1, &[&silent_url]);
    assert!(took < quick, "a silent endpoint took {took:?}");
    drop(silent);

    // A bad URL.
    sb.fails(
        &["snapshots", "--store", "s3://A_b/x"],
        1,
        &["not a valid bucket name"],
    );
}

#[test]
fn concurrent_writers_share_a_bucket_safely() {
    let mut rng = Rng::seeded("s3_concurrent");
    let sb = Sandbox::new_s3("shared");
    sb.init(&[]);
    let a = sample_disk(&sb, &mut rng, "a.raw");
    let b = sample_disk(&sb, &mut rng, "b.raw");
    // A second store on another prefix of the same bucket.
    let mut sb2 = Sandbox::new_s3("second");
    sb2.init(&[]);
    let store1 = sb.store();
    let store2 = sb2.store();
    let runs: Vec<(String, PathBuf)> = vec![
        (store1.clone(), a.clone()),
        (store1.clone(), b.clone()),
        (store2.clone(), a.clone()),
    ];
    let outs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = runs
            .iter()
            .map(|(store, image)| {
                let sb = &sb;
                s.spawn(move || {
                    sb.run(&[
                        "replicate",
                        image.to_str().unwrap(),
                        "--store",
                        store,
                        "--json",
                    ])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (out, (store, image)) in outs.iter().zip(&runs) {
        assert!(
            out.status.success(),
            "{store} {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let snap = v["snapshot"].as_str().unwrap();
        let restored = sb.path(&format!("{snap}.out"));
        sb.ok(&[
            "restore",
            "--store",
            store,
            snap,
            restored.to_str().unwrap(),
        ]);
        assert_eq!(file_hash(&restored), file_hash(image));
        let v = sb.json(&[
            "verify",
            "--store",
            store,
            snap,
            "--image",
            image.to_str().unwrap(),
        ]);
        assert_eq!(v["ok"], true, "{v}");
    }
    sb2.store_url = None;
}

#[test]
fn bwlimit_caps_the_upload_rate() {
    let mut rng = Rng::seeded("s3_bwlimit");
    let sb = Sandbox::new_s3("bwlimit");
    sb.init(&["--no-encryption"]);
    let image = sb.path("noise.raw");
    make_image(&image, 40 * MIB, &[(0, rng.bytes(40 << 20))]);
    let start = Instant::now();
    let report = sb.replicate(&image, &["--bwlimit", "10M", "--part-size", "5M"]);
    let took = start.elapsed();
    let sent = report["bytes_stored"].as_u64().unwrap();
    // The first part may go at once; every later byte waits its turn at 10 MiB/s.
    let floor = Duration::from_millis((sent - 6 * MIB) * 1000 / (10 * MIB));
    assert!(
        took >= floor,
        "{sent} bytes in {took:?}, faster than the cap allows ({floor:?})"
    );
}

#[test]
fn read_only_credentials_restore_without_a_store_lock() {
    let env = s3();
    let sb = Sandbox::new_s3("readonly");
    sb.init(&[]);
    let store = sb.store();
    // They cannot write the lock, so the restore goes on without one, warned.
    let image = sb.path("ro.raw");
    make_image(&image, 2 * MIB, &[(0, vec![7u8; MIB as usize])]);
    sb.replicate(&image, &[]);
    let out_path = sb.path("ro.out");
    let out = sb.run_env(
        &[
            "restore",
            "--store",
            &store,
            "latest",
            out_path.to_str().unwrap(),
            "--force",
        ],
        &[
            ("BLOCKFERRY_PASSPHRASE", PASSPHRASE),
            ("AWS_ACCESS_KEY_ID", env.readonly_key.as_str()),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("cannot write a store lock"), "{stderr}");
    assert_eq!(
        std::fs::read(&out_path).unwrap(),
        std::fs::read(&image).unwrap()
    );
}

/// S3 over HTTPS (SeaweedFS behind a certificate from a CA the test script makes): a
/// multipart round trip trusting that CA (`--ca-bundle`, or `AWS_CA_BUNDLE`); a certificate
/// from a CA not trusted, or for another name, is refused with a clear error, never accepted.
#[test]
fn tls_in_transit_is_used_and_checked() {
    let env = s3();
    let mut rng = Rng::seeded("s3_tls");
    let sb = Sandbox::new_s3("tls");
    let store = sb.store();
    let https = ["--endpoint", env.https_endpoint.as_str()];
    let ca = ["--ca-bundle", env.ca.as_str()];
    sb.ok(&[&["init", "--store", &store][..], &https, &ca].concat());
    let image = sb.path("disk.raw");
    make_image(&image, 24 * MIB, &[(0, rng.bytes(12 << 20))]);
    let img = image.to_str().unwrap();
    let replicate = [
        &[
            "replicate",
            img,
            "--store",
            &store,
            "--part-size",
            "5M",
            "--json",
        ][..],
        &https,
        &ca,
    ]
    .concat();
    let r: serde_json::Value = serde_json::from_str(&sb.ok(&replicate)).unwrap();
    let snap = r["snapshot"].as_str().unwrap();
    let out = sb.path("out.raw");
    // AWS_CA_BUNDLE works as the flag does.
    let restore = [
        &["restore", "--store", &store, snap, out.to_str().unwrap()][..],
        &https,
    ]
    .concat();
    let restored = sb.run_env(
        &restore,
        &[
            ("BLOCKFERRY_PASSPHRASE", PASSPHRASE),
            ("AWS_CA_BUNDLE", &env.ca),
        ],
    );
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    assert_eq!(file_hash(&out), file_hash(&image));
    // Refused: the system's authorities, another CA, a name the certificate is not for.
    sb.fails(
        &[&["snapshots", "--store", &store][..], &https].concat(),
        1,
        &["does not trust", "refused"],
    );
    sb.fails(
        &[
            &["snapshots", "--store", &store][..],
            &https,
            &["--ca-bundle", &env.other_ca],
        ]
        .concat(),
        1,
        &["UnknownIssuer"],
    );
    let wrong = [
        "snapshots",
        "--store",
        &store,
        "--endpoint",
        &env.https_wrong_name,
        "--ca-bundle",
        &env.ca,
    ];
    sb.fails(&wrong, 1, &["not valid for name"]);
}
