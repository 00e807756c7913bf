use super::*;

fn pack(n: u8, size: u64, live: u64, entries: usize) -> Pack {
    Pack {
        id: [n; 16],
        size,
        entries: vec![
            Entry {
                id: [n; 32],
                offset: 24,
                stored_len: 1,
                raw_len: 1,
            };
            entries
        ],
        live_bytes: live,
        fate: Fate::Keep,
    }
}

#[test]
fn dead_packs_go_and_the_most_wasteful_are_repacked_until_within_the_allowance() {
    let mb = 1 << 20;
    let mut packs = vec![
        pack(1, 10 * mb, 0, 1),      // dead
        pack(2, 10 * mb, 9 * mb, 1), // 1 MiB unused
        pack(3, 10 * mb, 2 * mb, 1), // 8 MiB unused: repacked first
        pack(4, 10 * mb, 0, 1),      // nothing unused (below)
    ];
    packs[3].live_bytes = packs[3].size - overhead(&packs[3]);
    // Live 21 MiB; 5% allows about 1 MiB unused: repack 3 leaves 1 MiB (pack 2).
    plan_repack(&mut packs, 0.05);
    let fates: Vec<Fate> = packs.iter().map(|p| p.fate).collect();
    assert_eq!(fates, [Fate::Delete, Fate::Keep, Fate::Repack, Fate::Keep]);
    // 0% repacks every pack with unused bytes; 100% none.
    for p in &mut packs {
        p.fate = Fate::Keep;
    }
    plan_repack(&mut packs, 0.0);
    let fates: Vec<Fate> = packs.iter().map(|p| p.fate).collect();
    assert_eq!(
        fates,
        [Fate::Delete, Fate::Repack, Fate::Repack, Fate::Keep]
    );
    for p in &mut packs {
        p.fate = Fate::Keep;
    }
    plan_repack(&mut packs, 1.0);
    assert!(packs[1..].iter().all(|p| p.fate == Fate::Keep));
}

#[test]
fn index_batches_stay_under_the_entry_cap() {
    let half = INDEX_ENTRIES / 2;
    assert_eq!(batches(&[half; 5]), [0..2, 2..4, 4..5]);
    assert!(batches(&[]).is_empty());
    // A pack larger than the cap still goes, alone.
    assert_eq!(batches(&[1, INDEX_ENTRIES + 1, 1]), [0..1, 1..2, 2..3]);
}
