//! Where the whole box's CPU goes while a probe runs: the measured system, the broker, Redis,
//! the harness itself (load generator and measuring consumer) and everything else on the
//! machine, each in CPU µs per decision, plus Redis's own split by command.
//!
//! The sustained-rate target is for the whole box, and on a small box the broker and Redis
//! share the cores with the pipeline: this says which of them a higher rate waits on. All of
//! it comes from the OS (`/proc/<pid>/stat`, `/proc/stat`) and from Redis (`INFO
//! commandstats`), read before and after the measured part.

use std::collections::BTreeMap;

use crate::bench::cpu_seconds_of;

/// The processes to account for, by name.
pub struct BoxCpu {
    processes: Vec<(String, u32)>,
    redis_url: Option<String>,
}

/// One reading of every counter.
#[derive(Debug, Clone)]
pub struct BoxCpuSample {
    /// CPU seconds per process, in [`BoxCpu`]'s order; `None` where it could not be read.
    processes: Vec<Option<f64>>,
    /// Busy and stolen CPU seconds of the whole machine, all cores together.
    machine_s: Option<MachineSeconds>,
    /// Per Redis command: calls and µs spent, from `INFO commandstats`.
    redis_commands: BTreeMap<String, (f64, f64)>,
}

/// What each part of the box spent per decision over the measured part.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BoxCpuSplit {
    /// (process, CPU µs per decision), in [`BoxCpu`]'s order.
    pub processes: Vec<(String, f64)>,
    /// The rest of the machine: its busy time less the processes above.
    pub other_us: f64,
    /// The whole machine, µs per decision.
    pub machine_us: f64,
    /// Cores the machine kept busy on average.
    pub machine_busy_cores: f64,
    /// Cores the hypervisor took away on average (steal time): while a virtual core waits for
    /// a real one it is neither busy nor idle here, and a slow phase shows up in this figure
    /// only if the host reports it.
    pub machine_steal_cores: f64,
    /// Redis's time inside each command, µs per decision, largest first. A script's time
    /// includes the commands it calls, which are listed as well. Redis measures elapsed time,
    /// so on a box short of cores this includes Redis waiting for one, and the commands can
    /// add up to more than the `redis-server` process's CPU.
    pub redis_commands: Vec<(String, f64)>,
}

impl BoxCpu {
    pub fn new(processes: Vec<(String, u32)>, redis_url: Option<String>) -> Self {
        Self {
            processes,
            redis_url,
        }
    }

    pub fn sample(&self) -> BoxCpuSample {
        BoxCpuSample {
            processes: self
                .processes
                .iter()
                .map(|(_, pid)| cpu_seconds_of(&format!("/proc/{pid}/stat")))
                .collect(),
            machine_s: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|stat| machine_seconds(&stat)),
            redis_commands: self
                .redis_url
                .as_deref()
                .and_then(|url| redis_commandstats(url).ok())
                .map(|info| parse_commandstats(&info))
                .unwrap_or_default(),
        }
    }

    /// The split between two samples, over `decided` decisions and `elapsed_s` seconds.
    pub fn split(
        &self,
        before: &BoxCpuSample,
        after: &BoxCpuSample,
        decided: usize,
        elapsed_s: f64,
    ) -> BoxCpuSplit {
        let per_decision = 1e6 / decided.max(1) as f64;
        let processes: Vec<(String, f64)> = self
            .processes
            .iter()
            .zip(before.processes.iter().zip(&after.processes))
            .map(|((name, _), (b, a))| {
                let used = match (b, a) {
                    (Some(b), Some(a)) => (a - b) * per_decision,
                    _ => f64::NAN,
                };
                (name.clone(), used)
            })
            .collect();
        let (machine_s, steal_s) = match (before.machine_s, after.machine_s) {
            (Some(b), Some(a)) => (a.busy - b.busy, a.steal - b.steal),
            _ => (f64::NAN, f64::NAN),
        };
        let machine_us = machine_s * per_decision;
        let mut redis_commands: Vec<(String, f64)> = after
            .redis_commands
            .iter()
            .map(|(command, (_, usec))| {
                let earlier = before.redis_commands.get(command).map_or(0.0, |c| c.1);
                (command.clone(), (usec - earlier) / decided.max(1) as f64)
            })
            .filter(|(_, us)| *us > 0.0)
            .collect();
        redis_commands.sort_by(|a, b| b.1.total_cmp(&a.1));
        BoxCpuSplit {
            other_us: machine_us - processes.iter().map(|(_, us)| us).sum::<f64>(),
            processes,
            machine_us,
            machine_busy_cores: machine_s / elapsed_s.max(1e-9),
            machine_steal_cores: steal_s / elapsed_s.max(1e-9),
            redis_commands,
        }
    }
}

impl BoxCpuSplit {
    /// One line for the human report, per decision.
    pub fn describe(&self) -> String {
        self.describe_per("decision")
    }

    /// One line for the human report, per `unit` (what the split was divided by). Redis's
    /// commands are left out when it ran none.
    pub fn describe_per(&self, unit: &str) -> String {
        let parts: Vec<String> = self
            .processes
            .iter()
            .map(|(name, us)| format!("{name} {us:.1}"))
            .collect();
        let redis: Vec<String> = self
            .redis_commands
            .iter()
            .take(5)
            .map(|(command, us)| format!("{command} {us:.1}"))
            .collect();
        let inside_redis = if redis.is_empty() {
            String::new()
        } else {
            format!(
                ". Inside Redis (elapsed µs per {unit}): {}",
                redis.join(", ")
            )
        };
        format!(
            "    whole box, CPU µs per {unit}: {}, everything else {:.1}; machine {:.1} ({:.2} cores busy, {:.2} stolen){inside_redis}",
            parts.join(", "),
            self.other_us,
            self.machine_us,
            self.machine_busy_cores,
            self.machine_steal_cores,
        )
    }
}

/// All cores' CPU seconds from `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq)]
struct MachineSeconds {
    /// Running anything: everything but idle, iowait and steal.
    busy: f64,
    /// Taken by the hypervisor.
    steal: f64,
}

/// All cores' busy and stolen seconds from `/proc/stat`'s `cpu` line.
fn machine_seconds(stat: &str) -> Option<MachineSeconds> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse::<f64>().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user]
    let busy: f64 = ticks.iter().take(7).sum::<f64>() - ticks.get(3)? - ticks.get(4)?;
    Some(MachineSeconds {
        busy: busy / 100.0,
        steal: ticks.get(7)? / 100.0,
    })
}

fn redis_commandstats(url: &str) -> redis::RedisResult<String> {
    let mut connection = redis::Client::open(url)?.get_connection()?;
    redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut connection)
}

/// `cmdstat_eval:calls=448,usec=847302,...` lines → command → (calls, µs).
fn parse_commandstats(info: &str) -> BTreeMap<String, (f64, f64)> {
    info.lines()
        .filter_map(|line| {
            let (command, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |name: &str| {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))?
                    .parse::<f64>()
                    .ok()
            };
            Some((command.to_string(), (field("calls")?, field("usec")?)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commandstats() {
        let info = "# Commandstats\r\ncmdstat_eval:calls=448,usec=847302,usec_per_call=1891.30,rejected_calls=0,failed_calls=0\r\ncmdstat_hmget:calls=117174,usec=194089,usec_per_call=1.66,rejected_calls=0,failed_calls=0\r\n";
        let stats = parse_commandstats(info);
        assert_eq!(stats.len(), 2);
        assert_eq!(stats["eval"], (448.0, 847302.0));
        assert_eq!(stats["hmget"], (117174.0, 194089.0));
    }

    #[test]
    fn machine_busy_leaves_out_idle_iowait_and_steal() {
        let stat = "cpu  100 20 30 1000 50 5 5 40 0 0\ncpu0 50 10 15 500 25 2 3 20 0 0\n";
        // user 100 + nice 20 + system 30 + irq 5 + softirq 5 = 160 ticks; steal 40.
        assert_eq!(
            machine_seconds(stat),
            Some(MachineSeconds {
                busy: 1.6,
                steal: 0.4
            })
        );
    }

    #[test]
    fn splits_per_decision() {
        let meter = BoxCpu::new(vec![("a".into(), 1), ("b".into(), 2)], None);
        let before = BoxCpuSample {
            processes: vec![Some(1.0), Some(2.0)],
            machine_s: Some(MachineSeconds {
                busy: 10.0,
                steal: 1.0,
            }),
            redis_commands: BTreeMap::from([("eval".to_string(), (10.0, 1_000.0))]),
        };
        let after = BoxCpuSample {
            processes: vec![Some(1.5), None],
            machine_s: Some(MachineSeconds {
                busy: 12.0,
                steal: 1.5,
            }),
            redis_commands: BTreeMap::from([
                ("eval".to_string(), (20.0, 6_000.0)),
                ("hmget".to_string(), (5.0, 2_000.0)),
            ]),
        };
        let split = meter.split(&before, &after, 1_000, 2.0);
        assert_eq!(split.processes[0], ("a".to_string(), 500.0));
        assert!(split.processes[1].1.is_nan());
        assert_eq!(split.machine_us, 2_000.0);
        assert_eq!(split.machine_busy_cores, 1.0);
        assert_eq!(split.machine_steal_cores, 0.25);
        assert_eq!(
            split.redis_commands,
            vec![("eval".to_string(), 5.0), ("hmget".to_string(), 2.0)]
        );
    }
}
