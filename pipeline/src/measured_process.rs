//! A process under measurement: a `verdict run` or the Python baseline started as a child,
//! with its CPU time and memory read from the OS (`/proc/<pid>`), stopped with SIGTERM as
//! Kubernetes stops a pod.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::children::{track, Tracked};
use crate::scrape::{get, samples};

pub struct MeasuredProcess {
    child: Child,
    /// Its entry among the children killed if the bench is stopped by a signal.
    _tracked: Tracked,
    /// `verdict run`'s operations endpoint; `None` for a process that serves none.
    pub metrics: Option<SocketAddr>,
}

impl MeasuredProcess {
    /// `verdict run --config <config>` with the broker and Redis addresses from the
    /// environment overrides and a metrics port of its own; output goes to `log`.
    pub fn verdict(
        exe: &Path,
        config: &Path,
        brokers: &str,
        redis: &str,
        log: &Path,
    ) -> anyhow::Result<Self> {
        // A free port, released just before the child binds it.
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut command = Command::new(exe);
        command
            .args(["run", "--config"])
            .arg(config)
            .env("VERDICT_KAFKA_BROKERS", brokers)
            .env("VERDICT_REDIS_URL", redis)
            .env("VERDICT_HTTP_LISTEN", metrics.to_string())
            .env("RUST_LOG", "warn,verdict=info");
        let mut process = Self::spawn(command, log).context("starting `verdict run`")?;
        process.metrics = Some(metrics);
        Ok(process)
    }

    /// Any command, output to `log`.
    pub fn spawn(mut command: Command, log: &Path) -> anyhow::Result<Self> {
        let log = std::fs::File::create(log)?;
        let stdout = log.try_clone()?;
        let child = command.stdout(stdout).stderr(log).spawn()?;
        Ok(Self {
            _tracked: track(child.id()),
            child,
            metrics: None,
        })
    }

    pub fn scrape(&self) -> anyhow::Result<Vec<crate::scrape::Sample>> {
        let metrics = self.metrics.context("this process serves no metrics")?;
        let (status, body) = get(metrics, "/metrics")?;
        anyhow::ensure!(status == 200, "/metrics answered {status}");
        Ok(samples(&body))
    }

    /// `/readyz` answers 200 (a process without an endpoint never is).
    pub fn ready(&self) -> bool {
        self.metrics
            .is_some_and(|m| matches!(get(m, "/readyz"), Ok((200, _))))
    }

    /// Waits for readiness; fails if the process exits or `timeout` passes first.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.ready() {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("the process exited before it was ready: {status}");
            }
            anyhow::ensure!(Instant::now() < deadline, "not ready within {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User + system CPU seconds of the process so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        crate::bench::cpu_seconds_of(&format!("/proc/{}/stat", self.child.id()))
    }

    /// Resident memory now (`VmRSS`), MiB.
    pub fn rss_mib(&self) -> Option<f64> {
        status_mib(self.child.id(), "VmRSS:")
    }

    /// Peak resident memory so far (`VmHWM`), MiB.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        status_mib(self.child.id(), "VmHWM:")
    }

    /// SIGTERM, then wait for the drain (SIGKILL after 45 s, like a pod's grace period).
    pub fn stop(mut self) -> anyhow::Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill(2) with a pid this process spawned and has not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(45);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill()?;
        self.child.wait()?;
        anyhow::bail!("a measured process did not stop within 45 s of SIGTERM")
    }
}

impl Drop for MeasuredProcess {
    // A run that fails half-way must not leave processes behind: they would keep consuming
    // (and reconnect to a later broker that happens to reuse the port).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `kB` line of `/proc/<pid>/status`, in MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
