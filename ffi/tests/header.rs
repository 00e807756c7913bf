//! The committed header is what cbindgen makes of the crate now: a change to the C ABI must
//! come with its header. `BF_BLESS=1 cargo test -p blockferry-ffi --test header` rewrites it.

use std::path::Path;

#[test]
fn committed_header_matches_the_crate() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let generated = String::from_utf8(generated).expect("utf-8");
    let path = crate_dir.join("include/blockferry.h");
    if std::env::var_os("BF_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("writing the header");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "ffi/include/blockferry.h is out of date with ffi/src: run \
         BF_BLESS=1 cargo test -p blockferry-ffi --test header, and commit it"
    );
}
