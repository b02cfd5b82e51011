//! Confidence model microbenchmarks (criterion). Figures and commands:
//! docs/BENCHMARKS.md. Every allocation asks the model once and tells it
//! once, under its lock, so both must stay well under the two microseconds
//! the issue allows.
//!
//! - `confidence/query/{2,50}_peers`: `estimate` with every peer unreachable
//!   at a different staleness (the costliest case: no peer is in sync), on
//!   a model with history.
//! - `confidence/update/allocation`, `.../replay`, `.../resolved`: one
//!   observation each.
//! - `confidence/tables`: a new model, which is one build of the tabulated
//!   risk terms: what a query costs extra once the observations since the
//!   last build reach 1 % of the model's history.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use oncemesh::confidence::{ConfidenceModel, ConfidenceParams, PeerView};
use std::hint::black_box;
use std::time::Duration;

/// A model that has seen some traffic, replays and partitions.
fn warmed() -> ConfidenceModel {
    let mut model = ConfidenceModel::new(ConfidenceParams::default());
    for i in 0..20_000u64 {
        model.observe_allocation();
        if i % 20 == 0 {
            model.observe_cross_region_replay(Duration::from_millis(500 + i % 30_000));
        }
    }
    for i in 0..30u64 {
        model.observe_peer_resync(Duration::from_secs(2 + i));
    }
    model
}

fn peers(n: usize) -> Vec<PeerView> {
    (0..n)
        .map(|i| PeerView {
            staleness: Duration::from_millis(300 + 997 * i as u64),
            connected: i % 4 == 0,
            behind: Duration::ZERO,
        })
        .collect()
}

fn query(c: &mut Criterion) {
    let mut group = c.benchmark_group("confidence/query");
    for n in [2, 50] {
        let views = peers(n);
        let mut model = warmed();
        group.bench_with_input(BenchmarkId::new("peers", n), &views, |b, views| {
            b.iter(|| black_box(model.estimate(black_box(views))))
        });
    }
    group.finish();
}

fn update(c: &mut Criterion) {
    let mut group = c.benchmark_group("confidence/update");
    let mut model = warmed();
    group.bench_function("allocation", |b| b.iter(|| model.observe_allocation()));
    let mut model = warmed();
    group.bench_function("replay", |b| {
        b.iter(|| model.observe_cross_region_replay(black_box(Duration::from_millis(1_500))))
    });
    let mut model = warmed();
    let estimate = model.estimate(&peers(2));
    group.bench_function("resolved", |b| {
        b.iter(|| model.observe_resolved(black_box(&estimate), black_box(false)))
    });
    group.finish();
    c.bench_function("confidence/tables", |b| {
        b.iter(|| black_box(ConfidenceModel::new(ConfidenceParams::default())))
    });
}

criterion_group!(benches, query, update);
criterion_main!(benches);
