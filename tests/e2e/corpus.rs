//! Real-world images made by Hyper-V and ESXi (../shared/corpus/README.md), fetched by
//! tests/fetch-corpus.sh into `BF_CORPUS` (default target/corpus).

use std::path::PathBuf;
use std::process::Command;

use blockferry_tests::{Sandbox, bin};

/// The corpus folder, or `None` (a failure under `BF_REQUIRE_TOOLS`) when it was not fetched.
pub(crate) fn corpus() -> Option<PathBuf> {
    let dir = std::env::var_os("BF_CORPUS").map_or_else(
        || {
            bin()
                .parent()
                .and_then(|d| d.parent())
                .map(|t| t.join("corpus"))
                .unwrap_or_default()
        },
        PathBuf::from,
    );
    let ok = dir.join(".done2").exists();
    assert!(
        ok || std::env::var_os("BF_REQUIRE_TOOLS").is_none(),
        "corpus missing: run tests/fetch-corpus.sh"
    );
    if !ok {
        eprintln!("skipping: the corpus is not fetched (tests/fetch-corpus.sh)");
    }
    ok.then_some(dir)
}

fn sha256(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Each image converts to the raw bytes whose sha256 the corpus README lists.
#[test]
fn real_world_images_read_to_their_hashes() {
    let Some(dir) = corpus() else { return };
    let sb = Sandbox::new();
    for (file, size, sha) in [
        (
            "fixed.vhd",
            10_485_760,
            "459325ab1fcd1d5ec9854cba790ee26378317cda177ffc1072008a1df88e6463",
        ),
        (
            "dynamic.vhd",
            10_485_760,
            "ecff2ef6615a3cddc6a6885f1c6d9cf13a232697e1dc6575f2c2f01f57247784",
        ),
    ] {
        let image = dir.join(file);
        let info: serde_json::Value =
            serde_json::from_str(&sb.ok(&["info", image.to_str().unwrap(), "--json"])).unwrap();
        assert_eq!(info["virtual_size"], size, "{file}: {info}");
        let out = sb.path(&format!("{file}.raw"));
        sb.ok(&["convert", image.to_str().unwrap(), out.to_str().unwrap()]);
        assert_eq!(sha256(&out), sha, "{file} reads to the wrong bytes");
        std::fs::remove_file(out).unwrap();
    }
}

/// A Hyper-V differencing disk whose parent is not shipped: it parses, `info` names the
/// parent from its locator, and opening it for data fails with "parent not found".
#[test]
fn differencing_vhdx_without_its_parent() {
    let Some(dir) = corpus() else { return };
    let sb = Sandbox::new();
    let image = dir.join("differencing.avhdx");
    let out = sb.run(&["info", image.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["subformat"], "differencing", "{info}");
    assert_eq!(info["virtual_size"], 8u64 << 30);
    let named = info["parent_paths"][0].as_str().unwrap();
    assert!(
        named.ends_with("Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx"),
        "{info}"
    );
    let out = sb.run(&[
        "convert",
        image.to_str().unwrap(),
        sb.path("x.raw").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("parent not found") && err.contains("Generation 1_49C4BAF3"),
        "{err}"
    );
}

/// Hyper-V's images also map the same through every reader path: `map` covers the disk.
#[test]
fn corpus_maps_cover_each_disk() {
    let Some(dir) = corpus() else { return };
    let sb = Sandbox::new();
    for file in ["fixed.vhd", "dynamic.vhd", "fixed.vhdx", "dynamic.vhdx"] {
        let v: serde_json::Value =
            serde_json::from_str(&sb.ok(&["map", dir.join(file).to_str().unwrap(), "--json"]))
                .unwrap();
        let total: u64 = v
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        assert_eq!(total, 10_485_760, "{file}");
    }
}

/// ESXi's SEsparse sample: the first 16 MiB read as `a`, the rest as zeros, opened bare and
/// through a descriptor that names it.
#[test]
fn esxi_sesparse_reads_as_expected() {
    let Some(dir) = corpus() else { return };
    let sb = Sandbox::new();
    std::fs::copy(dir.join("sesparse.vmdk"), sb.path("sesparse.vmdk")).unwrap();
    std::fs::write(
        sb.path("desc.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"seSparse\"\nRW 1048576 SESPARSE \"sesparse.vmdk\"\n",
    )
    .unwrap();
    for name in ["sesparse.vmdk", "desc.vmdk"] {
        let out = sb.path(&format!("{name}.raw"));
        sb.ok(&[
            "convert",
            sb.path(name).to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        let raw = std::fs::read(&out).unwrap();
        assert_eq!(raw.len(), 512 << 20, "{name}");
        assert!(
            raw[..16 << 20].iter().all(|&b| b == b'a'),
            "{name}: first 16 MiB"
        );
        assert!(raw[16 << 20..].iter().all(|&b| b == 0), "{name}: the rest");
    }
}
