//! Export, checked with qemu-img as the oracle: every format converts back to the bytes a
//! restore writes, qemu's checks pass, and blockferry's own readers read the images too.

use blockferry_tests::{
    MIB, Rng, Sandbox, Value, have_qemu, make_image, qemu, qemu_from_raw, qemu_raw, random_disk,
};

/// qemu's name of each export format, and whether `qemu-img check` knows the format.
const FORMATS: [(&str, &str, bool); 5] = [
    ("raw", "raw", false),
    ("vmdk", "vmdk", true),
    ("vhd-fixed", "vpc", false),
    ("vhd", "vpc", false),
    ("vhdx", "vhdx", true),
];

#[test]
fn every_format_converts_back_to_the_restored_bytes() {
    if !have_qemu() {
        return;
    }
    let mut rng = Rng::seeded("every_format_converts_back_to_the_restored_bytes");
    let sb = Sandbox::new();
    sb.init(&["--no-encryption"]);
    // Sizes: whole MiB, and one a fixed VHD must round up (a sector short of 29 MiB).
    for (i, size) in [24 * MIB, 29 * MIB - 512].into_iter().enumerate() {
        let raw = sb.path(&format!("src{i}.raw"));
        random_disk(&mut rng, &raw, size);
        // Every input format blockferry reads, made by qemu from the same bytes.
        for (input, fmt, opts) in [
            ("raw", "raw", ""),
            ("vmdk", "vmdk", "subformat=monolithicSparse"),
            ("vhdx", "vhdx", ""),
            ("vhd", "vpc", "subformat=dynamic,force_size=on"),
        ] {
            let image = sb.path(&format!("src{i}.{input}"));
            if input != "raw" {
                qemu_from_raw(&raw, &image, fmt, opts);
            }
            let rep = sb.replicate(&image, &["--name", &format!("d{i}-{input}")]);
            let snap = rep["snapshot"].as_str().unwrap().to_owned();
            let restored = sb.path(&format!("restored{i}-{input}.raw"));
            sb.ok(&[
                "restore",
                &snap,
                restored.to_str().unwrap(),
                "--store",
                &sb.store(),
            ]);
            let want = std::fs::read(&restored).unwrap();
            assert_eq!(want, std::fs::read(&raw).unwrap(), "{input}: restore");
            for (format, qfmt, checkable) in FORMATS {
                let out = sb.path(&format!("out{i}-{input}.{format}"));
                let report: Value = serde_json::from_str(&sb.ok(&[
                    "export",
                    &snap,
                    out.to_str().unwrap(),
                    "--store",
                    &sb.store(),
                    "--format",
                    format,
                    "--json",
                ]))
                .unwrap();
                let info: Value = serde_json::from_str(&qemu(&[
                    "info",
                    "-f",
                    qfmt,
                    "--output=json",
                    out.to_str().unwrap(),
                ]))
                .unwrap();
                let virtual_size = info["virtual-size"].as_u64().unwrap();
                assert_eq!(
                    Some(virtual_size),
                    report["virtual_size"].as_u64(),
                    "{input} as {format}: qemu's size"
                );
                if format == "vhd-fixed" {
                    assert_eq!(virtual_size % MIB, 0, "a fixed VHD is whole MiB");
                    assert_eq!(std::fs::metadata(&out).unwrap().len(), virtual_size + 512);
                } else {
                    assert_eq!(virtual_size, size, "{input} as {format}");
                }
                if checkable {
                    qemu(&["check", "-f", qfmt, out.to_str().unwrap()]);
                }
                if format == "vmdk" {
                    assert_eq!(
                        info["format-specific"]["data"]["create-type"], "streamOptimized",
                        "{input} as vmdk: {info}"
                    );
                }
                let got = qemu_raw(&out, qfmt);
                assert_eq!(got.len() as u64, virtual_size);
                assert!(
                    got[..want.len()] == want[..] && got[want.len()..].iter().all(|&b| b == 0),
                    "{input} as {format}: qemu reads other bytes than the restore wrote"
                );
                // blockferry reads its own exports as it reads any image.
                let ours: Value =
                    serde_json::from_str(&sb.ok(&["info", out.to_str().unwrap(), "--json"]))
                        .unwrap();
                assert_eq!(
                    ours["virtual_size"].as_u64(),
                    Some(virtual_size),
                    "{format}"
                );
            }
        }
    }
}

#[test]
fn only_data_is_written() {
    if !have_qemu() {
        return;
    }
    let sb = Sandbox::new();
    sb.init(&["--no-encryption"]);
    // 1 GiB with 3 MiB of data in two places.
    let raw = sb.path("sparse.raw");
    make_image(
        &raw,
        1024 * MIB,
        &[
            (5 * MIB, vec![7; 2 * MIB as usize]),
            (900 * MIB, vec![9; MIB as usize]),
        ],
    );
    sb.replicate(&raw, &[]);
    for (format, qfmt, _) in FORMATS {
        let out = sb.path(&format!("out.{format}"));
        sb.ok(&[
            "export",
            "latest",
            out.to_str().unwrap(),
            "--store",
            &sb.store(),
            "--format",
            format,
        ]);
        // Blocks on disk: the data and the metadata, not the disk's gigabyte.
        let used = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&out).unwrap()) * 512;
        assert!(used < 8 * MIB, "{format}: {used} bytes on disk");
        // The image's own allocation: qemu's map for VHD (its VHDX driver maps every block
        // as data), blockferry's for VHDX.
        let map: Value = serde_json::from_str(&if qfmt == "vhdx" {
            sb.ok(&["map", out.to_str().unwrap(), "--json"])
        } else {
            qemu(&["map", "-f", qfmt, "--output=json", out.to_str().unwrap()])
        })
        .unwrap();
        let data: u64 = map
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true && e["zero"] == false)
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        if format != "raw" && format != "vhd-fixed" {
            // Allocated blocks only: the data rounded out to blocks (2 MiB for VHD, a chunk
            // of at least 1 MiB for VHDX).
            assert!(data <= 8 * MIB, "{format}: qemu maps {data} bytes of data");
        }
    }
}
