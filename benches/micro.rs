//! Micro-benchmarks of each stage, one chunk (1 MiB) at a time:
//! `cargo bench -p blockferry-benches --bench micro` (criterion; a filter narrows it, e.g.
//! `-- lz4`).
//!
//! Data is the harness's OS-like content (lz4 to about 0.7) and random bytes (nothing to
//! compress). Read engines read a 256 MiB file from the page cache.

use std::hint::black_box;
use std::path::Path;

use blockferry::internals::changes::ExtentSet;
use blockferry::internals::io::buf::BufferPool;
use blockferry::internals::io::sys::AlignedBuf;
use blockferry::internals::io::{Pread, ReadBackend, SourceFile};
use blockferry::internals::pipeline::is_zero;
use blockferry::internals::store::crypto::Keys;
use blockferry::internals::store::format::{self, MetaKind};
use blockferry_benches::{Rng, make_os_image, os_page};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const CHUNK: usize = 1 << 20;

fn os_chunk(seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; CHUNK];
    for page in buf.chunks_mut(4096) {
        os_page(&mut rng, page);
    }
    buf
}

fn random_chunk(seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; CHUNK];
    Rng(seed).fill(&mut buf);
    buf
}

fn stages(c: &mut Criterion) {
    let keys = Keys::derive(&[7; 32], b"bench store id..", true);
    let sealer = keys.pack_sealer(&[1; 16]);
    let mut g = c.benchmark_group("stage");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    for (name, data) in [("os", os_chunk(1)), ("random", random_chunk(2))] {
        g.bench_with_input(BenchmarkId::new("zero-test", name), &data, |b, d| {
            b.iter(|| is_zero(black_box(d)));
        });
        g.bench_with_input(BenchmarkId::new("blake3-keyed", name), &data, |b, d| {
            b.iter(|| keys.chunk_id(black_box(d)));
        });
        let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(CHUNK)];
        g.bench_with_input(BenchmarkId::new("lz4-compress", name), &data, |b, d| {
            b.iter(|| lz4_flex::block::compress_into(black_box(d), &mut out));
        });
        let compressed = lz4_flex::block::compress(&data);
        let mut plain = vec![0u8; CHUNK];
        g.bench_with_input(
            BenchmarkId::new("lz4-decompress", name),
            &compressed,
            |b, d| {
                b.iter(|| lz4_flex::block::decompress_into(black_box(d), &mut plain));
            },
        );
        let mut sealed = Vec::with_capacity(CHUNK + 64);
        g.bench_with_input(BenchmarkId::new("aes-256-gcm-seal", name), &data, |b, d| {
            b.iter(|| {
                sealed.clear();
                sealed.extend_from_slice(&[0u8; 12]);
                sealed.extend_from_slice(d);
                sealer.seal(b"aad", &mut sealed, 0)
            });
        });
        let id = keys.chunk_id(&data);
        // Into a reused aligned buffer, as a worker packs.
        let mut pack = AlignedBuf::new(format::blob_bound(CHUNK));
        g.bench_with_input(
            BenchmarkId::new("encode-blob (lz4+seal)", name),
            &data,
            |b, d| {
                b.iter(|| {
                    pack.set_len(0);
                    format::encode_blob(&sealer, &id, black_box(d), true, &mut pack)
                });
            },
        );
        g.bench_with_input(
            BenchmarkId::new("hash+encode (a chunk's work)", name),
            &data,
            |b, d| {
                b.iter(|| {
                    pack.set_len(0);
                    let id = keys.chunk_id(black_box(d));
                    format::encode_blob(&sealer, &id, d, true, &mut pack)
                });
            },
        );
        let mut blob = Vec::with_capacity(format::blob_bound(CHUNK));
        format::encode_blob(&sealer, &id, &data, true, &mut blob).expect("encodes");
        let mut opened = Vec::with_capacity(CHUNK);
        g.bench_with_input(BenchmarkId::new("decode-blob", name), &blob, |b, d| {
            b.iter(|| {
                let mut record = d.clone();
                opened.clear();
                format::decode_blob(&sealer, &id, &mut record, CHUNK, "pack", 0, &mut opened)
            });
        });
    }
    g.finish();
}

fn extents(c: &mut Criterion) {
    let mut rng = Rng(3);
    let size = 1u64 << 40;
    let ranges = |rng: &mut Rng, n: usize| -> Vec<(u64, u64)> {
        (0..n)
            .map(|_| {
                (
                    rng.next_u64() % (size - (1 << 20)),
                    1 + rng.next_u64() % (1 << 20),
                )
            })
            .collect()
    };
    let a_ranges = ranges(&mut rng, 100_000);
    let b = ExtentSet::from_ranges(ranges(&mut rng, 100_000), size).expect("in range");
    let a = ExtentSet::from_ranges(a_ranges.clone(), size).expect("in range");
    let mut g = c.benchmark_group("extents (100k)");
    g.bench_function("from-ranges (sort, merge)", |bch| {
        bch.iter(|| ExtentSet::from_ranges(black_box(a_ranges.clone()), size));
    });
    g.bench_function("union", |bch| bch.iter(|| black_box(&a).union(&b)));
    g.bench_function("complement", |bch| {
        bch.iter(|| black_box(&a).complement(size));
    });
    g.bench_function("chunk-ranges (1 MiB)", |bch| {
        bch.iter(|| black_box(&a).chunk_ranges(1 << 20));
    });
    g.finish();
}

fn manifest(c: &mut Criterion) {
    let keys = Keys::derive(&[7; 32], b"bench store id..", true);
    let sealer = keys.meta_sealer();
    let mut rng = Rng(4);
    let ids: Vec<[u8; 32]> = (0..format::PAGE_ENTRIES)
        .map(|i| {
            if i % 4 == 0 {
                format::ZERO_ID
            } else {
                let mut id = [0u8; 32];
                rng.fill(&mut id);
                id
            }
        })
        .collect();
    let mut g = c.benchmark_group("manifest page");
    g.throughput(Throughput::Elements(ids.len() as u64));
    g.bench_function("encode+seal", |b| {
        b.iter(|| {
            let payload = format::encode_page(black_box(&ids)).expect("encodes");
            format::seal_meta(&sealer, MetaKind::Page, "pages/x", &payload)
        });
    });
    let payload = format::encode_page(&ids).expect("encodes");
    let sealed = format::seal_meta(&sealer, MetaKind::Page, "pages/x", &payload).expect("seals");
    g.bench_function("open+decode", |b| {
        b.iter(|| {
            let opened = format::open_meta(&sealer, MetaKind::Page, "pages/x", sealed.clone())
                .expect("opens");
            format::decode_page(&opened, "pages/x")
        });
    });
    g.finish();
}

fn read_engines(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-micro");
    std::fs::create_dir_all(&dir).expect("bench folder");
    let path = dir.join("read.raw");
    let mib = 256u64;
    if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(mib << 20) {
        make_os_image(&path, mib, 5).expect("image");
    }
    let file = SourceFile::open(&path).expect("opens");
    let mut g = c.benchmark_group("read 256 MiB, warm");
    g.throughput(Throughput::Bytes(mib << 20));
    g.sample_size(10);
    let mut buf = vec![0u8; CHUNK];
    g.bench_function("pread, 1 MiB at a time", |b| {
        b.iter(|| {
            let mut backend = Pread;
            for i in 0..mib {
                backend
                    .read_exact_at(&file, &mut buf, i << 20)
                    .expect("reads");
            }
        });
    });
    #[cfg(target_os = "linux")]
    for depth in [4usize, 16, 32] {
        use std::os::fd::AsFd;
        let Ok(mut ring) = blockferry::internals::io::uring::ChunkRing::new(depth) else {
            eprintln!("io_uring unavailable: skipped");
            break;
        };
        let pool = BufferPool::new(depth, CHUNK);
        let fd = file.file().as_fd();
        g.bench_function(format!("io_uring, depth {depth}"), |b| {
            b.iter(|| {
                let mut next = 0u64;
                let mut done = 0u64;
                while done < mib {
                    while next < mib && ring.has_room() {
                        let mut buf = pool
                            .get_timeout(std::time::Duration::from_secs(5))
                            .expect("a free buffer");
                        buf.set_len(CHUNK);
                        let read = blockferry::internals::io::uring::ChunkRead {
                            fd,
                            fallback_fd: fd,
                            file: 0,
                            at: 0,
                            len: CHUNK,
                            offset: next << 20,
                        };
                        ring.queue(next, buf, &[read]).expect("queues");
                        next += 1;
                    }
                    if let Some(d) = ring.complete(true).expect("completes") {
                        d.result.expect("reads");
                        done += 1;
                    }
                }
            });
        });
    }
    g.finish();
}

criterion_group!(benches, stages, extents, manifest, read_engines);
criterion_main!(benches);
