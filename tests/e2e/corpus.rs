//! Real-world images made by Hyper-V and ESXi (../shared/corpus/README.md), fetched by
//! tests/fetch-corpus.sh into `BF_CORPUS` (default target/corpus).

use std::path::PathBuf;
use std::process::Command;

use blockferry_tests::{Sandbox, bin};

/// The corpus folder, or `None` (a failure under `BF_REQUIRE_TOOLS`) when it was not fetched.
fn corpus() -> Option<PathBuf> {
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
    let ok = dir.join(".done").exists();
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
