use super::*;

const RULES: PartRules = PartRules {
    min_part: 5 * MIB,
    max_part: 5 << 30,
    max_parts: 10_000,
};

/// Checks what S3 asks of a multipart upload's parts, and that they tile the file.
fn check(plan: &[PartPlan], file: u64) {
    let mut at = 0;
    for (i, p) in plan.iter().enumerate() {
        assert_eq!(p.number as usize, i + 1);
        assert_eq!(p.range.start, at, "parts tile the file: {plan:?}");
        let len = p.range.end - p.range.start;
        assert!(len > 0);
        assert!(len <= RULES.max_part);
        if p.staged > 0 {
            // The staging object's first part is a copy: a smallest part at least; its last,
            // sent, holds at least a byte.
            assert!(!p.copy);
            assert!(p.staged >= RULES.min_part, "part {}: {plan:?}", p.number);
            assert!(p.staged < len);
        }
        if i + 1 < plan.len() {
            assert!(
                len >= RULES.min_part,
                "part {} of {len} bytes: {plan:?}",
                p.number
            );
        }
        at = p.range.end;
    }
    assert_eq!(at, file);
}

/// Bytes a plan sends (staged prefixes are copied).
fn sent(plan: &[PartPlan]) -> u64 {
    plan.iter()
        .filter(|p| !p.copy)
        .map(|p| p.range.end - p.range.start - p.staged)
        .sum()
}

/// Whether byte `b` is sent by the plan (not copied, nor staged from the base).
fn sends(plan: &[PartPlan], b: u64) -> bool {
    let p = plan.iter().find(|p| p.range.contains(&b)).unwrap();
    !p.copy && b >= p.range.start + p.staged
}

#[test]
fn uniform_parts_tile_the_file() {
    for (file, part) in [(1, MIB), (10 * MIB, 4 * MIB), (12 * MIB, 4 * MIB)] {
        let plan = uniform_plan(file, part).unwrap();
        assert!(plan.iter().all(|p| !p.copy));
        assert_eq!(plan.last().unwrap().range.end, file);
        assert_eq!(plan.len() as u64, file.div_ceil(part));
    }
}

#[test]
fn delta_parts_send_the_changes_and_copy_the_rest() {
    let file = 2048 * MIB;
    // Isolated 1 MiB changes are staged: only their own bytes are sent; one within a
    // smallest part of the start has nothing before it to stage, and is sent widened.
    let changed: Vec<_> = [3u64, 100, 700, 1500]
        .iter()
        .map(|&m| m * MIB..(m + 1) * MIB)
        .collect();
    let plan = delta_parts(file, &changed, RULES);
    check(&plan, file);
    assert_eq!(sent(&plan), 5 * MIB + 3 * MIB);
    assert_eq!(plan.iter().filter(|p| p.staged > 0).count(), 3);
    for c in &changed {
        assert!((c.start..c.end).step_by(4096).all(|b| sends(&plan, b)));
    }
    // Changes closer than a smallest part share one; one at the end of the file is the last
    // part whatever its size; none at all copies everything.
    let plan = delta_parts(
        file,
        &[10 * MIB..11 * MIB, 13 * MIB..14 * MIB, file - 512..file],
        RULES,
    );
    check(&plan, file);
    assert_eq!(plan.iter().filter(|p| !p.copy).count(), 2);
    assert_eq!(sent(&plan), 4 * MIB + 512);
    assert_eq!(plan.last().unwrap().range, file - 512..file);
    let plan = delta_parts(file, &[], RULES);
    check(&plan, file);
    assert!(plan.iter().all(|p| p.copy));
    // A short change after a gap shorter than two smallest parts stages the whole gap.
    let plan = delta_parts(
        file,
        &[Range {
            start: 7 * MIB,
            end: 8 * MIB,
        }],
        RULES,
    );
    check(&plan, file);
    assert_eq!(plan[0].range, 0..8 * MIB);
    assert_eq!(plan[0].staged, 7 * MIB);
    // Everything changed: sent in parts, nothing copied.
    let everything = vec![Range {
        start: 0,
        end: file,
    }];
    let plan = delta_parts(file, &everything, RULES);
    check(&plan, file);
    assert!(plan.iter().all(|p| !p.copy && p.staged == 0));
    assert_eq!(sent(&plan), file);
}

#[test]
fn delta_parts_hold_for_any_changes() {
    // A deterministic pseudo-random walk over change sets.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..500 {
        let file = (next() % (300 * MIB)).max(1);
        let mut changed: Vec<Range<u64>> = (0..next() % 12)
            .map(|_| {
                let start = next() % file;
                start..(start + 1 + next() % (8 * MIB)).min(file)
            })
            .collect();
        changed.sort_by_key(|r| r.start);
        let plan = delta_parts(file, &changed, RULES);
        check(&plan, file);
        for c in &changed {
            for b in [c.start, u64::midpoint(c.start, c.end), c.end - 1] {
                assert!(sends(&plan, b), "changed byte {b} not sent: {plan:?}");
            }
        }
    }
}
