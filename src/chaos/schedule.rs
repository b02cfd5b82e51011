//! The seeded fault schedule of a chaos run: pure, so one seed gives the
//! same faults at the same moments every time (what the processes do in
//! between is real, so outcomes may differ from one run to the next).
//!
//! Two tracks run side by side, so faults overlap: the network (one cut,
//! split, one-way link or added delay at a time) and the processes, their
//! disks and the endpoint (a SIGKILL and restart, a SIGSTOP pause, a
//! restart with a skewed clock, a full disk, a failing or hanging
//! compensation endpoint).

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Largest clock skew a restart gives a node, ms (±5 min).
pub const MAX_SKEW_MS: i64 = 5 * 60 * 1000;

/// One fault, begun at its episode's start and undone at its end.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Every link to and from the node is cut.
    Isolate(usize),
    /// The nodes in the group and the others cannot reach each other.
    Split(Vec<usize>),
    /// Bytes from `from` to `to` are held; the other way passes.
    OneWay {
        /// The node whose bytes are lost.
        from: usize,
        /// Their destination.
        to: usize,
    },
    /// Every link of the node gets this much latency each way, ms.
    Delay {
        /// The node.
        node: usize,
        /// Added latency, ms.
        ms: u64,
    },
    /// SIGKILL; restarted on its data dir at the end of the episode.
    Kill(usize),
    /// SIGSTOP; SIGCONT at the end of the episode.
    Pause(usize),
    /// A restart with its clock this far off; it stays skewed.
    Skew {
        /// The node.
        node: usize,
        /// Clock offset, ms.
        offset_ms: i64,
    },
    /// The node's data dir (a small filesystem of its own) is filled up
    /// under it; the space is freed at the end of the episode.
    FullDisk(usize),
    /// The compensation endpoint answers 503 to every call.
    WebhookFails,
    /// The compensation endpoint carries out each call but answers only
    /// after the nodes' webhook timeout.
    WebhookHangs,
}

impl Fault {
    /// A short name, for the summary's fault counts.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Isolate(_) => "isolate",
            Fault::Split(_) => "split",
            Fault::OneWay { .. } => "one-way",
            Fault::Delay { .. } => "delay",
            Fault::Kill(_) => "kill",
            Fault::Pause(_) => "pause",
            Fault::Skew { .. } => "skew",
            Fault::FullDisk(_) => "full-disk",
            Fault::WebhookFails => "webhook-fail",
            Fault::WebhookHangs => "webhook-hang",
        }
    }

    /// Whether it belongs to the network track (else the process and
    /// endpoint track).
    pub fn is_network(&self) -> bool {
        matches!(
            self,
            Fault::Isolate(_) | Fault::Split(_) | Fault::OneWay { .. } | Fault::Delay { .. }
        )
    }
}

/// A fault from `start_ms` to `end_ms` after the start of the workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Episode {
    /// When it begins, ms.
    pub start_ms: u64,
    /// When it is undone, ms.
    pub end_ms: u64,
    /// What it is.
    pub fault: Fault,
}

/// The episodes of a run of `seed` with `nodes` nodes over `workload_ms`,
/// sorted by start. Every episode starts at least a second before the
/// workload ends; the last ones may still be in force when it does, and the
/// heal at the end of the run undoes them.
pub fn plan(seed: u64, nodes: usize, workload_ms: u64) -> Vec<Episode> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut episodes = Vec::new();
    if nodes < 2 {
        return episodes;
    }
    let last_start = workload_ms.saturating_sub(1_000);
    for network in [true, false] {
        let mut at = rng.random_range(500..1_500u64);
        loop {
            let length = rng.random_range(1_000..4_000u64);
            if at > last_start {
                break;
            }
            let fault = if network {
                network_fault(&mut rng, nodes)
            } else {
                process_fault(&mut rng, nodes)
            };
            episodes.push(Episode {
                start_ms: at,
                end_ms: at + length,
                fault,
            });
            at += length + rng.random_range(300..1_500u64);
        }
    }
    episodes.sort_by_key(|e| e.start_ms);
    episodes
}

fn network_fault(rng: &mut StdRng, nodes: usize) -> Fault {
    let node = rng.random_range(0..nodes);
    match rng.random_range(0..4) {
        0 => Fault::Isolate(node),
        1 => {
            let size = rng.random_range(1..=nodes / 2);
            let mut group: Vec<usize> = (0..nodes).collect();
            for i in 0..size {
                let j = rng.random_range(i..nodes);
                group.swap(i, j);
            }
            group.truncate(size);
            group.sort_unstable();
            Fault::Split(group)
        }
        2 => Fault::OneWay {
            from: node,
            to: (node + rng.random_range(1..nodes)) % nodes,
        },
        _ => Fault::Delay {
            node,
            ms: rng.random_range(50..800),
        },
    }
}

fn process_fault(rng: &mut StdRng, nodes: usize) -> Fault {
    let node = rng.random_range(0..nodes);
    match rng.random_range(0..6) {
        0 => Fault::Kill(node),
        1 => Fault::Pause(node),
        2 => Fault::Skew {
            node,
            offset_ms: rng.random_range(-MAX_SKEW_MS..=MAX_SKEW_MS),
        },
        3 => Fault::FullDisk(node),
        4 => Fault::WebhookFails,
        _ => Fault::WebhookHangs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_schedule_and_tracks_do_not_overlap_themselves() {
        let plan_a = plan(7, 3, 30_000);
        assert_eq!(plan_a, plan(7, 3, 30_000));
        assert_ne!(plan_a, plan(8, 3, 30_000));
        for network in [true, false] {
            let track: Vec<&Episode> = plan_a
                .iter()
                .filter(|e| e.fault.is_network() == network)
                .collect();
            assert!(track.len() >= 3, "{track:?}");
            assert!(track.windows(2).all(|w| w[0].end_ms < w[1].start_ms));
        }
        assert!(plan_a.iter().all(|e| e.start_ms <= 29_000));
    }

    #[test]
    fn faults_name_real_nodes() {
        for seed in 0..200 {
            for e in plan(seed, 3, 30_000) {
                match e.fault {
                    Fault::Isolate(n) | Fault::Kill(n) | Fault::Pause(n) | Fault::FullDisk(n) => {
                        assert!(n < 3)
                    }
                    Fault::Split(g) => assert!(!g.is_empty() && g.len() < 3),
                    Fault::OneWay { from, to } => assert!(from != to && to < 3),
                    Fault::Delay { node, .. } => assert!(node < 3),
                    Fault::Skew { offset_ms, .. } => assert!(offset_ms.abs() <= MAX_SKEW_MS),
                    Fault::WebhookFails | Fault::WebhookHangs => {}
                }
            }
        }
    }
}
