//! Where a measured process's own CPU goes, thread by thread, from `/proc/<pid>/task`.
//!
//! The thread that spent the CPU says which part did: `tokio-rt-worker` runs every stage of
//! verdict's own — consuming, batching and decoding, the feature lookup, the join, the tensor
//! and ONNX Runtime, the decision, the hand-off to the producer and its acknowledgements
//! (until stop 30 scoring and the delivery reports had threads of their own,
//! `score-<workload>` and `delivery-report`, and until stop 31 the source,
//! `source-<workload>`); librdkafka's `rdk:broker<id>`
//! threads do the network I/O of the consumer and the producer, `rdk:main` their timers. The
//! stage timers measure wall time (a feature lookup is mostly waiting for Redis); this
//! measures CPU.
//!
//! Threads are grouped by name with a trailing number dropped (`rdk:broker1` and
//! `rdk:broker-1` are both `rdk:broker`). A thread that ends between the two samples is not
//! counted: the split can add up to a little less than the process's CPU.

use std::collections::BTreeMap;

/// CPU seconds per thread of one process at one moment, keyed by thread id.
#[derive(Debug, Clone, Default)]
pub struct ThreadCpuSample {
    threads: BTreeMap<u32, (String, f64)>,
}

/// CPU per thread group over a measured part.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ThreadCpuSplit {
    /// (thread group, CPU µs per decision), largest first.
    pub groups: Vec<(String, f64)>,
}

impl ThreadCpuSample {
    /// Reads every thread of `pid`; an empty sample if the process is gone.
    pub fn of(pid: u32) -> Self {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Self::default();
        };
        let threads = tasks
            .flatten()
            .filter_map(|task| {
                let tid: u32 = task.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
                let (name, seconds) = parse_task_stat(&stat)?;
                Some((tid, (name, seconds)))
            })
            .collect();
        Self { threads }
    }

    /// Each group's CPU between `self` (earlier) and `later`, per decision.
    pub fn split_until(&self, later: &Self, decided: usize) -> ThreadCpuSplit {
        let per_decision = 1e6 / decided.max(1) as f64;
        let mut groups: BTreeMap<String, f64> = BTreeMap::new();
        for (tid, (name, seconds)) in &later.threads {
            // A thread started during the measured part spent all of its CPU in it.
            let earlier = self
                .threads
                .get(tid)
                .filter(|(n, _)| n == name)
                .map_or(0.0, |(_, s)| *s);
            *groups.entry(group_of(name).to_string()).or_default() +=
                (seconds - earlier) * per_decision;
        }
        let mut groups: Vec<(String, f64)> = groups.into_iter().collect();
        groups.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        ThreadCpuSplit { groups }
    }
}

impl ThreadCpuSplit {
    /// One line for the human report: the groups that spent anything, largest first.
    pub fn describe(&self, process: &str) -> String {
        let parts: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, us)| *us >= 0.05)
            .map(|(name, us)| format!("{name} {us:.1}"))
            .collect();
        format!(
            "    {process}'s threads, CPU µs per decision: {}",
            if parts.is_empty() {
                "none measured".to_string()
            } else {
                parts.join(", ")
            }
        )
    }
}

/// A thread's name and its CPU seconds (user + system) from its `stat` line. The name sits in
/// parentheses and may itself contain spaces or parentheses, so the fields are counted from
/// the last `)`.
fn parse_task_stat(stat: &str) -> Option<(String, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // After the name: state is field 0, utime field 11, stime field 12 (`man 5 proc`).
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // The kernel reports clock ticks, 100 a second on Linux (USER_HZ).
    Some((name, ticks / 100.0))
}

/// The group a thread counts under: its name without a trailing number or dash.
fn group_of(name: &str) -> &str {
    let trimmed = name.trim_end_matches(|c: char| c.is_ascii_digit());
    let trimmed = trimmed.trim_end_matches('-');
    if trimmed.is_empty() {
        name
    } else {
        trimmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_the_name_and_the_cpu_seconds() {
        let stat = "4242 (rdk:broker111) S 1 4242 4242 0 -1 4194368 90 0 0 0 250 37 0 0 20 0 9 0 \
                    123 456 789";
        assert_eq!(
            parse_task_stat(stat),
            Some(("rdk:broker111".to_string(), 2.87))
        );
        // A name with a space and a parenthesis.
        let odd = "7 (a b) c) R 1 7 7 0 -1 0 0 0 0 0 3 1 0 0 20 0 1 0 0 0 0";
        assert_eq!(parse_task_stat(odd), Some(("a b) c".to_string(), 0.04)));
        assert_eq!(parse_task_stat("garbage"), None);
    }

    #[test]
    fn threads_are_grouped_without_their_trailing_number() {
        assert_eq!(group_of("rdk:broker111"), "rdk:broker");
        assert_eq!(group_of("rdk:broker-1"), "rdk:broker");
        assert_eq!(group_of("tokio-rt-worker"), "tokio-rt-worker");
        assert_eq!(group_of("source-fraud"), "source-fraud");
        assert_eq!(group_of("1234"), "1234");
    }

    #[test]
    fn the_split_counts_each_groups_growth_and_new_threads_in_full() {
        let sample = |threads: &[(u32, &str, f64)]| ThreadCpuSample {
            threads: threads
                .iter()
                .map(|(tid, name, s)| (*tid, (name.to_string(), *s)))
                .collect(),
        };
        let before = sample(&[
            (1, "verdict", 1.0),
            (2, "tokio-rt-worker", 2.0),
            (3, "tokio-rt-worker", 3.0),
            (4, "rdk:broker1", 0.5),
            (9, "gone", 7.0),
        ]);
        let after = sample(&[
            (1, "verdict", 1.0),
            (2, "tokio-rt-worker", 2.5),
            (3, "tokio-rt-worker", 3.25),
            (4, "rdk:broker1", 0.75),
            (5, "rdk:broker-1", 0.25),
            // A thread id reused by a new thread with another name counts from zero.
            (6, "score-fraud", 0.5),
        ]);
        let before = ThreadCpuSample {
            threads: before
                .threads
                .into_iter()
                .chain([(6, ("http".to_string(), 0.4))])
                .collect(),
        };
        let split = before.split_until(&after, 1_000_000);
        assert_eq!(
            split.groups,
            vec![
                ("tokio-rt-worker".to_string(), 0.75),
                ("rdk:broker".to_string(), 0.5),
                ("score-fraud".to_string(), 0.5),
                ("verdict".to_string(), 0.0),
            ]
        );
        assert_eq!(
            split.describe("verdict"),
            "    verdict's threads, CPU µs per decision: tokio-rt-worker 0.8, rdk:broker 0.5, score-fraud 0.5"
        );
    }

    #[test]
    fn a_busy_named_thread_of_this_process_shows_up() {
        let pid = std::process::id();
        let before = ThreadCpuSample::of(pid);
        std::thread::Builder::new()
            .name("busy-probe".into())
            .spawn(move || {
                // Burn CPU until this thread has been charged at least one clock tick, then
                // take a sample while it is still alive.
                let started = std::time::Instant::now();
                let mut x = 0u64;
                loop {
                    for i in 0..1_000_000u64 {
                        x = x.wrapping_mul(31).wrapping_add(i);
                    }
                    std::hint::black_box(x);
                    let now = ThreadCpuSample::of(pid);
                    let spent = before
                        .split_until(&now, 1_000_000)
                        .groups
                        .into_iter()
                        .find(|(name, _)| name == "busy-probe")
                        .map(|(_, us)| us);
                    if spent.is_some_and(|us| us > 0.0) {
                        return;
                    }
                    assert!(
                        started.elapsed() < std::time::Duration::from_secs(10),
                        "the busy thread never showed up with CPU: {spent:?}"
                    );
                }
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
