// Test data: small, trusted sizes.
#![allow(clippy::cast_possible_truncation)]

use std::time::Duration;

use super::*;

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

fn data(virt: u64, len: u64, offset: u64) -> Mapping {
    Mapping {
        virt,
        len,
        target: Target::Data { file: 0, offset },
    }
}

fn zero(virt: u64, len: u64) -> Mapping {
    Mapping {
        virt,
        len,
        target: Target::Zero,
    }
}

#[test]
fn mappings_become_pieces_at_their_place_in_the_chunk() {
    let mut pieces = Vec::new();
    let maps = [data(4096, 100, 7), zero(4196, 3996), data(8192, 4096, 0)];
    plan_reads(&maps, 4096, 8192, &mut pieces).unwrap();
    assert_eq!(
        pieces,
        [
            Piece::Data {
                file: 0,
                at: 0,
                len: 100,
                offset: 7
            },
            Piece::Zero { at: 100, len: 3996 },
            Piece::Data {
                file: 0,
                at: 4096,
                len: 4096,
                offset: 0
            },
        ]
    );
}

#[test]
fn mappings_that_do_not_tile_the_chunk_are_refused() {
    let mut pieces = Vec::new();
    // A gap, an overlap, a short and a long cover, a start elsewhere.
    for maps in [
        vec![data(0, 100, 0), data(200, 3896, 0)],
        vec![data(0, 200, 0), zero(100, 3996)],
        vec![data(0, 4000, 0)],
        vec![data(0, 4096, 0), zero(4096, 1)],
        vec![data(1, 4096, 0)],
        vec![data(0, u64::MAX, 0), zero(0, 1)],
    ] {
        let e = plan_reads(&maps, 0, 4096, &mut pieces).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Internal, "{maps:?}");
    }
}

#[test]
fn both_chunk_readers_read_what_pread_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let bytes: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
        .collect();
    std::fs::write(&path, &bytes).unwrap();
    let source = crate::image::open(&path).unwrap();
    let chunk = 64 << 10;
    let pool = BufferPool::new(4, chunk);
    let read_all = |reader: &mut dyn ChunkReader| {
        let mut got = vec![0u8; bytes.len()];
        let mut maps = Vec::new();
        let (mut next, mut done) = (0u64, 0);
        while done < 16 {
            while next < 16 && reader.has_room() {
                maps.clear();
                source
                    .map(next * chunk as u64, chunk as u64, &mut maps)
                    .unwrap();
                let mut buf = pool.get_timeout(Duration::from_secs(5)).unwrap();
                buf.set_len(chunk);
                buf.fill(0xee); // stale bytes a fill must overwrite
                reader
                    .submit(next, buf, &maps, next * chunk as u64)
                    .unwrap();
                next += 1;
            }
            // One chunk back (waiting for it), then whatever else is done.
            let mut wait = true;
            while let Some(f) = reader.complete(wait).unwrap() {
                let at = usize::try_from(f.token).unwrap() * chunk;
                got[at..at + chunk].copy_from_slice(&f.buf);
                done += 1;
                wait = false;
            }
        }
        got
    };
    let mut pread = PreadChunks::new(source.as_ref(), Box::new(Pread));
    assert!(read_all(&mut pread) == bytes);
    #[cfg(target_os = "linux")]
    match super::super::uring::ChunkRing::new(4) {
        Ok(ring) => {
            let direct = DirectFiles::new(source.as_ref());
            let mut ring = RingChunks::new(ring, source.as_ref(), Some(&direct), &pool);
            assert!(read_all(&mut ring) == bytes);
        }
        Err(e) => assert!(
            std::env::var_os("BF_REQUIRE_TOOLS").is_none(),
            "io_uring unavailable ({e}) and BF_REQUIRE_TOOLS is set"
        ),
    }
}
