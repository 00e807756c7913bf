//! Retention: `prune` forgets what its policy does not keep, per disk; what it keeps restores.

use blockferry_tests::{MIB, Rng, Sandbox, file_hash, make_image, write_at};

#[test]
fn prune_keeps_what_the_policy_says_and_kept_snapshots_restore() {
    let mut rng = Rng::seeded("prune");
    let sb = Sandbox::new();
    sb.init(&[]);
    let store = sb.store();
    let image = sb.path("vm.raw");
    make_image(&image, 16 * MIB, &[(0, rng.bytes((8 * MIB) as usize))]);
    let other = sb.path("db.raw");
    make_image(&other, 8 * MIB, &[(0, rng.bytes(MIB as usize))]);
    sb.replicate(&other, &[]);
    let mut ids = Vec::new();
    for _ in 0..5 {
        write_at(&image, rng.below(15 * MIB), &rng.bytes(4096));
        ids.push(
            sb.replicate(&image, &[])["snapshot"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let base = ["prune", "--store", store.as_str()];
    sb.fails(&base, 1, &["--keep-last"]);

    let mut dry = base.to_vec();
    dry.extend(["--keep-last", "2", "--dry-run", "--disk", "vm.raw"]);
    let report = sb.json(&dry);
    assert_eq!(report["forgotten"].as_array().unwrap().len(), 3, "{report}");
    assert_eq!(
        sb.json(&["snapshots", "--store", &store])["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        6
    );

    let mut real = base.to_vec();
    real.extend(["--keep-last", "2"]);
    let report = sb.json(&real);
    let forgotten: Vec<&str> = report["forgotten"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(forgotten, &ids[..3], "{report}");
    let left = sb.json(&["snapshots", "--store", &store]);
    assert_eq!(left["snapshots"].as_array().unwrap().len(), 3, "{left}");
    // The newest snapshot (a delta chain is not needed: each lists all its pages) restores.
    let out = sb.restore(&ids[4], "latest.raw");
    assert_eq!(file_hash(&out), file_hash(&image));
    sb.verify_latest_against(&image);
}
