//! Ledger microbenchmarks (criterion). Figures and commands: docs/BENCHMARKS.md.
//!
//! - `allocate/memory/{1,100}`: `Ledger::in_memory` + `allocate_batch` with
//!   unique keys, then `fold_pending` (the automerge change), one batch per
//!   iteration (all keys of a batch in one shard, shards taken in turn, as
//!   the node's per-shard queues do).
//! - `allocate/durable/{1,100}`: the same through a redb [`Storage`] sink,
//!   each batch's journal entries waited on until fsynced (`wait_durable`).
//! - `merge/{N}/merge_bytes_8_shards`: two ledgers with N unique
//!   allocations each plus 100 keys allocated in both; time to merge every
//!   shard of one (`save_shard` bytes) into a fresh copy of the other.
//! - `merge/{N}/conflicts`: the conflict report on the merged ledger
//!   (asserted to hold exactly the 100 shared keys).
//! - `merge/{N}/save_shard`: one shard's full save (what compaction and
//!   `GET /v1/documents/{id}` cost).
//! - `merge/{N}/sync_both_ways`: the same two ledgers brought together by
//!   the automerge sync protocol, as peers do after a partition: messages
//!   made and applied on both sides, every shard, until neither has one to
//!   send (no network, no disk: the CPU of converging).
//!
//! N is 10k. Set `ONCEMESH_BENCH_MERGE_N` to a comma-separated list (e.g.
//! `10000,1000000`) for larger ledgers: building takes minutes at 1M and
//! each merge sample several seconds, so large sizes are opt-in.

use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use oncemesh::key::{fingerprint, Fingerprint, IdempotencyKey};
use oncemesh::ledger::{
    AllocateRequest, ChunkSink, DiscardSink, DocId, Ledger, NodeIdentity, Stored, StoredDocument,
    Windows, Withhold, SHARD_COUNT,
};
use oncemesh::storage::Storage;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Keys shared by both ledgers in the merge benchmark: the expected conflicts.
const SHARED: usize = 100;
/// Batch size used to build the merge ledgers (one automerge change each).
const BUILD_BATCH: usize = 100;

/// Unique keys sorted into per-shard buckets, so a batch is one shard's.
struct KeyGen {
    prefix: String,
    next: u64,
    buckets: Vec<Vec<IdempotencyKey>>,
    fingerprint: Fingerprint,
}

impl KeyGen {
    fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            next: 0,
            buckets: vec![Vec::new(); SHARD_COUNT],
            fingerprint: payload_fingerprint(),
        }
    }

    /// `n` requests with fresh keys that all live in `shard`.
    fn batch(&mut self, shard: usize, n: usize) -> Vec<AllocateRequest> {
        while self.buckets[shard].len() < n {
            let raw = format!("{}-{:012}", self.prefix, self.next);
            self.next += 1;
            let key = IdempotencyKey::parse(&raw).expect("generated keys are valid");
            let s = key.shard(SHARD_COUNT);
            self.buckets[s].push(key);
        }
        let keys: Vec<IdempotencyKey> = self.buckets[shard].drain(..n).collect();
        keys.into_iter()
            .map(|key| request(key, self.fingerprint.clone()))
            .collect()
    }
}

fn payload_fingerprint() -> Fingerprint {
    fingerprint(&serde_json::json!({"amount": 1250, "currency": "EUR"})).expect("valid payload")
}

fn request(key: IdempotencyKey, fingerprint: Fingerprint) -> AllocateRequest {
    AllocateRequest {
        key,
        fingerprint,
        confidence: 0.99,
        stake: None,
    }
}

fn identity(name: &str) -> NodeIdentity {
    NodeIdentity {
        region: name.to_owned(),
        node: format!("12D3KooBench{name}"),
    }
}

fn allocate_all(ledger: &Ledger, shard: usize, requests: &[AllocateRequest]) {
    for outcome in ledger.allocate_batch(shard, requests) {
        assert!(!outcome.expect("allocation").replay, "keys are unique");
    }
}

fn bench_allocate_memory(c: &mut Criterion) {
    let mut group = c.benchmark_group("allocate/memory");
    for n in [1usize, 100] {
        let ledger = Ledger::in_memory(identity("mem"), Vec::new());
        let mut keys = KeyGen::new(&format!("mem{n}"));
        let mut turn = 0usize;
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_batched(
                || {
                    turn += 1;
                    let shard = turn % SHARD_COUNT;
                    (shard, keys.batch(shard, n))
                },
                |(shard, requests)| {
                    black_box(ledger.allocate_batch(shard, &requests));
                    black_box(ledger.fold_pending())
                },
                BatchSize::SmallInput,
            )
        });
        eprintln!(
            "allocate/memory/{n}: ledger holds {} keys after the run",
            ledger.stats().keys
        );
    }
    group.finish();
}

/// Hands chunks to redb storage, as the node's sink does.
struct StorageSink(Arc<Storage>);

impl ChunkSink for StorageSink {
    fn journal(&self, epoch: u32, record: Vec<u8>) -> u64 {
        self.0.append_journal(epoch, record)
    }
    fn forget_journal(&self, seqs: Vec<u64>) {
        self.0.forget_journal(seqs);
    }
    fn persist(&self, doc: DocId, bytes: Vec<u8>) -> u64 {
        self.0.append_chunk((doc.epoch, doc.shard), bytes)
    }
    fn snapshot(&self, doc: DocId, bytes: Vec<u8>) -> u64 {
        self.0.replace_with_snapshot((doc.epoch, doc.shard), bytes)
    }
    fn drop_document(&self, doc: DocId) {
        self.0.drop_document((doc.epoch, doc.shard));
    }
    fn retire(&self, doc: DocId, txns: Vec<String>) {
        self.0.retire((doc.epoch, doc.shard), txns);
    }
}

fn bench_allocate_durable(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut group = c.benchmark_group("allocate/durable");
    for n in [1usize, 100] {
        // In the target dir's file system (not a tmpfs), like a node's data dir.
        let dir = tempfile::Builder::new()
            .prefix("oncemesh-bench-")
            .tempdir_in(std::env::temp_dir())
            .expect("temp dir");
        let (storage, _loaded) = Storage::open(dir.path(), Arc::new(|_| {})).expect("storage");
        let ledger = Ledger::open(
            identity("disk"),
            Vec::new(),
            std::sync::Arc::new(oncemesh::time::SystemClock),
            500,
            Windows::default(),
            Stored::default(),
            Arc::new(StorageSink(storage.clone())),
        )
        .expect("ledger");
        let mut keys = KeyGen::new(&format!("disk{n}"));
        let mut turn = 0usize;
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_batched(
                || {
                    turn += 1;
                    let shard = turn % SHARD_COUNT;
                    (shard, keys.batch(shard, n))
                },
                |(shard, requests)| {
                    let outcomes = ledger.allocate_batch(shard, &requests);
                    ledger.fold_pending();
                    for outcome in outcomes {
                        let durable = outcome.expect("allocation").allocation.durable;
                        runtime.block_on(storage.wait(durable)).expect("durable");
                    }
                },
                BatchSize::SmallInput,
            )
        });
        storage.close();
    }
    group.finish();
}

/// Two ledgers, `n` unique allocations each and `SHARED` keys in both.
fn build_pair(n: usize) -> (Ledger, Ledger) {
    let started = Instant::now();
    let build = |name: &str| {
        let ledger = Ledger::in_memory(identity(name), Vec::new());
        let mut keys = KeyGen::new(name);
        let mut made = 0;
        let mut shard = 0;
        while made < n {
            let batch = keys.batch(shard, BUILD_BATCH.min(n - made));
            made += batch.len();
            allocate_all(&ledger, shard, &batch);
            shard = (shard + 1) % SHARD_COUNT;
        }
        let fp = payload_fingerprint();
        for i in 0..SHARED {
            let key = IdempotencyKey::parse(&format!("shared-{i:04}")).expect("valid key");
            let shard = key.shard(SHARD_COUNT);
            allocate_all(&ledger, shard, &[request(key, fp.clone())]);
        }
        ledger.fold_pending();
        ledger
    };
    let a = build("A");
    let b = build("B");
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "merge/{n}: built 2 x {} allocations in {secs:.1} s ({:.0} allocations/s, batches of {BUILD_BATCH})",
        n + SHARED,
        (2 * (n + SHARED)) as f64 / secs
    );
    (a, b)
}

fn merge_sizes() -> Vec<usize> {
    std::env::var("ONCEMESH_BENCH_MERGE_N")
        .ok()
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().parse().expect("ONCEMESH_BENCH_MERGE_N: numbers"))
                .collect()
        })
        .unwrap_or_else(|| vec![10_000])
}

fn open_copy(name: &str, saved: &[(DocId, Vec<u8>)]) -> Ledger {
    Ledger::open(
        identity(name),
        Vec::new(),
        std::sync::Arc::new(oncemesh::time::SystemClock),
        500,
        Windows::default(),
        Stored {
            documents: saved
                .iter()
                .map(|(doc, bytes)| {
                    (
                        *doc,
                        StoredDocument {
                            bytes: bytes.clone(),
                        },
                    )
                })
                .collect(),
            ..Stored::default()
        },
        Arc::new(DiscardSink),
    )
    .expect("reload")
}

/// Every document of a ledger as saved bytes.
fn save_all(ledger: &Ledger) -> Vec<(DocId, Vec<u8>)> {
    ledger
        .digests()
        .into_iter()
        .filter_map(|(doc, _)| Some((doc, ledger.save_document(doc)?)))
        .collect()
}

/// A memory figure of this process from /proc/self/status, MiB (0 where unavailable).
fn rss_mib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// Resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0; no-op elsewhere).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn merge_into(target: &Ledger, source: &[(DocId, Vec<u8>)]) -> usize {
    let mut new = 0;
    for (doc, bytes) in source {
        new += target
            .merge_bytes(*doc, bytes)
            .expect("merge")
            .new_allocations
            .len();
    }
    new
}

/// Runs the sync protocol between `a` and `b` (peers "A" and "B") on every
/// document until neither side has a message; returns the allocations that
/// arrived on both sides.
fn sync_both_ways(a: &Ledger, b: &Ledger) -> usize {
    let docs: Vec<DocId> = a.digests().into_iter().map(|(doc, _)| doc).collect();
    let nothing = Withhold::nothing();
    let mut arrived = 0;
    for _round in 0..20 {
        let mut quiet = true;
        for &doc in &docs {
            for (from, to, from_name, to_name) in [(a, b, "A", "B"), (b, a, "B", "A")] {
                let Some(bytes) = from.generate_sync(doc, to_name, false, &nothing) else {
                    continue;
                };
                quiet = false;
                let message = automerge::sync::Message::decode(&bytes).expect("decode");
                arrived += to
                    .receive_sync(doc, from_name, message)
                    .expect("receive")
                    .new_allocations
                    .len();
            }
        }
        if quiet {
            return arrived;
        }
    }
    panic!("sync did not settle in 20 rounds");
}

fn bench_merge(c: &mut Criterion) {
    for n in merge_sizes() {
        let (a, b) = build_pair(n);
        let source = save_all(&a);
        let target = save_all(&b);
        drop((a, b));
        let bytes: usize = source.iter().map(|(_, b)| b.len()).sum();
        eprintln!(
            "merge/{n}: source document {bytes} bytes ({:.1} bytes/allocation)",
            bytes as f64 / (n + SHARED) as f64
        );
        let started = Instant::now();
        let merged = open_copy("B", &target);
        eprintln!(
            "merge/{n}: reopening one ledger from saved bytes took {:.2} s",
            started.elapsed().as_secs_f64()
        );
        let rss_before = rss_mib("VmRSS");
        reset_peak_rss();
        let started = Instant::now();
        assert_eq!(merge_into(&merged, &source), n + SHARED);
        eprintln!(
            "merge/{n}: first merge took {:.2} s; process RSS {rss_before} MiB before, peak {} MiB during, {} MiB after",
            started.elapsed().as_secs_f64(),
            rss_mib("VmHWM"),
            rss_mib("VmRSS"),
        );
        let conflicts = merged.conflicts();
        assert_eq!(conflicts.len(), SHARED, "exactly the shared keys conflict");
        assert!(conflicts
            .iter()
            .all(|c| c.key.key.starts_with("shared-") && c.key.allocations.len() == 2));
        assert_eq!(merged.stats().keys, (2 * n + SHARED) as u64);
        let (a, b) = (open_copy("A", &source), open_copy("B", &target));
        let started = Instant::now();
        assert_eq!(sync_both_ways(&a, &b), 2 * (n + SHARED));
        eprintln!(
            "merge/{n}: first sync both ways took {:.2} s",
            started.elapsed().as_secs_f64()
        );
        assert_eq!(a.conflicts().len(), SHARED);
        assert_eq!(b.stats().keys, (2 * n + SHARED) as u64);
        drop((a, b));

        let mut group = c.benchmark_group(format!("merge/{n}"));
        if n > 100_000 {
            group
                .sample_size(10)
                .sampling_mode(SamplingMode::Flat)
                .warm_up_time(Duration::from_millis(1))
                .measurement_time(Duration::from_secs(1));
        } else {
            group.sample_size(10).sampling_mode(SamplingMode::Flat);
        }
        group.throughput(Throughput::Elements((n + SHARED) as u64));
        group.bench_function("merge_bytes_8_shards", |bench| {
            bench.iter_batched(
                || open_copy("B", &target),
                |ledger| {
                    black_box(merge_into(&ledger, &source));
                    ledger
                },
                BatchSize::PerIteration,
            )
        });
        group.bench_function("sync_both_ways", |bench| {
            bench.iter_batched(
                || (open_copy("A", &source), open_copy("B", &target)),
                |(a, b)| {
                    black_box(sync_both_ways(&a, &b));
                    (a, b)
                },
                BatchSize::PerIteration,
            )
        });
        group.throughput(Throughput::Elements(1));
        group.bench_function("conflicts", |bench| {
            bench.iter(|| {
                let found = merged.conflicts();
                assert_eq!(found.len(), SHARED);
                found
            })
        });
        let first = merged.digests()[0].0;
        let size = merged.save_document(first).map_or(0, |b| b.len());
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function("save_shard", |bench| {
            bench.iter(|| black_box(merged.save_document(first)))
        });
        group.finish();
    }
}

criterion_group!(
    benches,
    bench_allocate_memory,
    bench_allocate_durable,
    bench_merge
);
criterion_main!(benches);
