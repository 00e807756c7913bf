//! The store is untrusted: whoever can write it must not be able to switch encryption off,
//! swap the store, or alter its index unnoticed.

use std::path::Path;

use blockferry_tests::{MIB, PASSPHRASE, Rng, Sandbox, Value, make_image, objects};

fn config(store: &str) -> Value {
    serde_json::from_slice(&std::fs::read(Path::new(store).join("config")).unwrap()).unwrap()
}

fn write_config(store: &str, v: &Value) {
    std::fs::write(
        Path::new(store).join("config"),
        serde_json::to_vec_pretty(v).unwrap(),
    )
    .unwrap();
}

/// `config` as an attacker who knows the format would forge it: unencrypted, with a MAC
/// under the master key it puts in the clear itself.
fn forged_unencrypted(mut c: Value) -> Value {
    let master = [0x5au8; 32];
    c["encryption"] = serde_json::json!({"mode": "none", "master_key": hex(&master)});
    c.as_object_mut().unwrap().remove("mac");
    let id: Vec<u8> = (0..16)
        .map(|i| {
            u8::from_str_radix(&c["store_id"].as_str().unwrap()[2 * i..2 * i + 2], 16).unwrap()
        })
        .collect();
    let keys = blockferry::internals::store::crypto::Keys::derive(&master, &id, false);
    // The canonical bytes: the config without its MAC, in the engine's field order.
    let cfg: blockferry::StoreConfig = serde_json::from_value(c.clone()).unwrap();
    let canonical = serde_json::to_vec(&cfg).unwrap();
    c["mac"] = Value::String(hex(&keys.config_mac(&canonical)));
    c
}

fn hex(b: &[u8]) -> String {
    blockferry::internals::store::format::hex(b)
}

/// Issue 16.1: replacing `config` with an unencrypted one made the next replicate (passphrase
/// given) warn once and store every chunk again in plaintext, exit 0. Now a client with a
/// passphrase refuses an unencrypted store, a client that knew the store encrypted refuses
/// it in any case, and nothing is written.
#[test]
fn encryption_cannot_be_switched_off_by_whoever_writes_the_store() {
    let mut rng = Rng::seeded("trust_encryption");
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    let image = sb.path("disk.raw");
    make_image(&image, 8 * MIB, &[(0, rng.bytes(2 << 20))]);
    sb.replicate(&image, &[]);
    let original = config(&store);
    write_config(&store, &forged_unencrypted(original.clone()));
    let packs = objects(&store, "packs").len();
    make_image(&image, 8 * MIB, &[(0, rng.bytes(4 << 20))]);
    let img = image.to_str().unwrap();
    sb.fails(
        &["replicate", img, "--store", &store],
        1,
        &["not encrypted", "passphrase was given"],
    );
    // Without a passphrase: this client knew the store encrypted.
    let out = sb.run_env(&["replicate", img, "--store", &store], &[]);
    blockferry_tests::expect_failure(out, 1, &["was encrypted and now says it is not"]);
    assert_eq!(
        objects(&store, "packs").len(),
        packs,
        "something was written"
    );
    // Put back, it is the store it was.
    write_config(&store, &original);
    sb.replicate(&image, &[]);
}

/// Issue 16.1: the config is authenticated: a field changed is refused, not used.
#[test]
fn an_altered_config_is_refused() {
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    let mut c = config(&store);
    assert_eq!(c["version"], 2);
    assert!(c["mac"].is_string(), "{c}");
    let original = c.clone();
    c["chunk_size"] = Value::from(65536);
    write_config(&store, &c);
    sb.fails(
        &["snapshots", "--store", &store],
        1,
        &["failed authentication"],
    );
    // A client that has never seen it refuses it too (the MAC, not a record, decides).
    let fresh = sb.run_env(
        &[
            "snapshots",
            "--store",
            &store,
            "--state-dir",
            sb.path("other").to_str().unwrap(),
        ],
        &[("BLOCKFERRY_PASSPHRASE", PASSPHRASE)],
    );
    blockferry_tests::expect_failure(fresh, 1, &["failed authentication"]);
    write_config(&store, &original);
    sb.ok(&["snapshots", "--store", &store]);
}

/// Issue 16.1: a client pins each store's id: another store put in its place is refused
/// until the client is told to forget the old one.
#[test]
fn a_store_replaced_under_a_client_is_refused() {
    let mut rng = Rng::seeded("trust_swap");
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    let image = sb.path("disk.raw");
    make_image(&image, 4 * MIB, &[(0, rng.bytes(1 << 20))]);
    sb.replicate(&image, &[]);
    // Another store made elsewhere (by another client) and moved into place.
    let other = sb.path("other");
    let init = sb.run_env(
        &[
            "init",
            "--store",
            other.to_str().unwrap(),
            "--state-dir",
            sb.path("elsewhere").to_str().unwrap(),
        ],
        &[("BLOCKFERRY_PASSPHRASE", PASSPHRASE)],
    );
    assert!(init.status.success());
    std::fs::remove_dir_all(&store).unwrap();
    std::fs::rename(&other, &store).unwrap();
    sb.fails(
        &["replicate", image.to_str().unwrap(), "--store", &store],
        1,
        &["is not the store this client used there", "unpin"],
    );
    sb.ok(&["unpin", "--store", &store]);
    sb.replicate(&image, &[]);
}

/// Issue 16.1: an index object that fails authentication stops a replication (before the
/// fix: a warning, and every chunk it listed stored again).
#[test]
fn an_index_that_fails_authentication_stops_a_replication() {
    let mut rng = Rng::seeded("trust_index");
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    let image = sb.path("disk.raw");
    make_image(&image, 8 * MIB, &[(0, rng.bytes(3 << 20))]);
    sb.replicate(&image, &[]);
    let index = objects(&store, "index");
    let mut bytes = std::fs::read(&index[0]).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&index[0], bytes).unwrap();
    let packs = objects(&store, "packs").len();
    sb.fails(
        &["replicate", image.to_str().unwrap(), "--store", &store],
        1,
        &["index", "failed authentication", "stopping"],
    );
    assert_eq!(objects(&store, "packs").len(), packs);
}
