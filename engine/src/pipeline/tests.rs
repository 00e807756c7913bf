use super::*;

#[test]
fn plan_stays_within_budget() {
    for budget in [32usize << 20, 64 << 20, 256 << 20, 4 << 30] {
        for chunk in [64usize << 10, 1 << 20, 4 << 20] {
            for workers in [1, 2, 8] {
                if let Ok(p) = plan(budget, chunk, workers) {
                    assert!(p.total <= budget, "{budget} {chunk} {workers}: {p:?}");
                    assert!(p.read_bufs > p.workers);
                    assert!(p.pack_target >= 2 * chunk);
                }
            }
        }
    }
    let err = plan(8 << 20, 16 << 20, 2).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("too small"), "{err}");
}

#[test]
fn zero_detection() {
    let mut buf = vec![0u8; 1 << 20];
    assert!(is_zero(&buf));
    assert!(is_zero(&[]));
    for at in [0, 4095, 4096, (1 << 20) - 1] {
        buf[at] = 1;
        assert!(!is_zero(&buf), "{at}");
        buf[at] = 0;
    }
    assert!(is_zero(&buf[..12345]));
}

#[test]
fn default_budget_follows_the_machine_and_plans() {
    let budget = default_memory_budget();
    let floor = (worker_count(0) * (8 << 20)).max(64 << 20);
    assert!(budget >= floor, "{budget}");
    if let Some(usable) = usable_memory() {
        assert!(budget <= (usable / 8).max(floor), "{budget} of {usable}");
    }
    // The pipeline fits in it with the default chunk size and workers.
    plan(budget, 1 << 20, 0).unwrap();
}

#[test]
fn the_least_budget_always_plans() {
    for chunk in [64usize << 10, 1 << 20, 4 << 20, 16 << 20] {
        for workers in [1, 2, 8] {
            for (uploads, min_part, part_size) in [
                (1, None, 0),
                (4, Some(5u64 << 20), 0),
                (2, Some(5 << 20), 32 << 20),
            ] {
                let least = min_memory_budget(chunk, workers, uploads, min_part, part_size);
                let p = plan_parts(least, chunk, workers, uploads, min_part, part_size)
                    .unwrap_or_else(|e| panic!("{chunk} {workers} {uploads}: {e}"));
                assert!(p.total <= least);
            }
        }
    }
}
