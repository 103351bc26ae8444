//! What one thread waking another costs on this host, in wall time and in CPU.
//!
//! `cargo run --release --example wakeup_cost`
//!
//! Every batch verdict decides crosses threads several times: librdkafka's broker thread
//! hands the fetched messages to a tokio worker, Redis's reply wakes a worker, the producer's
//! broker thread is woken to send the decisions and wakes a worker with their
//! acknowledgements. At 10,000 tx/s that is a few hundred wake-ups a second, and what each
//! costs depends on the host far more than on verdict: on a virtual machine, waking a thread
//! that sleeps on another virtual CPU can cost ten times what it costs on the same one.
//!
//! Two threads pass a token back and forth, each parking until the token is its own (each
//! hand-off a futex wake of a sleeping thread, as a tokio worker is woken), pinned to the same
//! CPU, to two different CPUs, and left to the scheduler. Printed per round trip (two
//! wake-ups): wall time, and the process's CPU time from the OS (`CLOCK_PROCESS_CPUTIME_ID`).
//! A plain system call (`getppid`) is the yardstick. Five repeats of each; the median.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use verdict::bench::cpu_clock_seconds;

const ROUND_TRIPS: u32 = 10_000;
const REPEATS: usize = 5;

/// The process's CPU time so far, in seconds.
fn process_cpu_seconds() -> f64 {
    cpu_clock_seconds(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// Pins the calling thread to `cpu`; `false` if the host does not let it (fewer CPUs).
fn pin_current_thread(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Wall and CPU microseconds per round trip between two threads on `cpus` (None: unpinned).
fn ping_pong(cpus: Option<(usize, usize)>) -> anyhow::Result<(f64, f64)> {
    // The token: 1 while the peer holds it, 0 while the main thread does, 2 to stop. Each side
    // parks until the token is its own; `unpark` is one futex wake of a sleeping thread, as
    // a tokio worker or librdkafka's queue is woken.
    let token = Arc::new(AtomicU8::new(0));
    let main_thread = std::thread::current();
    let peer = {
        let token = Arc::clone(&token);
        std::thread::spawn(move || {
            if let Some((_, cpu)) = cpus {
                pin_current_thread(cpu);
            }
            loop {
                match token.load(Ordering::Acquire) {
                    1 => {
                        token.store(0, Ordering::Release);
                        main_thread.unpark();
                    }
                    2 => return,
                    _ => std::thread::park(),
                }
            }
        })
    };
    if let Some((cpu, _)) = cpus {
        anyhow::ensure!(pin_current_thread(cpu), "cannot pin to CPU {cpu}");
    }
    let round_trip = || {
        token.store(1, Ordering::Release);
        peer.thread().unpark();
        while token.load(Ordering::Acquire) != 0 {
            std::thread::park();
        }
    };
    // Let the peer start and pin itself before the clock starts.
    round_trip();
    let (wall, cpu) = (Instant::now(), process_cpu_seconds());
    for _ in 0..ROUND_TRIPS {
        round_trip();
    }
    let wall_us = wall.elapsed().as_secs_f64() * 1e6 / f64::from(ROUND_TRIPS);
    let cpu_us = (process_cpu_seconds() - cpu) * 1e6 / f64::from(ROUND_TRIPS);
    token.store(2, Ordering::Release);
    peer.thread().unpark();
    let _ = peer.join();
    // Unpin the main thread for the next measurement.
    // SAFETY: as in `pin_current_thread`, with every CPU the host has.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..num_cpus() {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    Ok((wall_us, cpu_us))
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let calls = 1_000_000;
    let mut syscall_ns = Vec::new();
    for _ in 0..REPEATS {
        let start = Instant::now();
        for _ in 0..calls {
            // SAFETY: getppid has no preconditions.
            std::hint::black_box(unsafe { libc::getppid() });
        }
        syscall_ns.push(start.elapsed().as_secs_f64() * 1e9 / f64::from(calls));
    }
    println!(
        "a system call (getppid): {:.0} ns",
        median(syscall_ns.clone())
    );

    let mut layouts = vec![("same CPU", Some((0, 0)))];
    if num_cpus() > 1 {
        layouts.push(("two CPUs", Some((0, 1))));
    }
    layouts.push(("unpinned", None));
    println!("two threads handing a token back and forth, per round trip (two wake-ups), median of {REPEATS} × {ROUND_TRIPS}:");
    for (name, cpus) in layouts {
        let mut walls = Vec::new();
        let mut cpus_used = Vec::new();
        for _ in 0..REPEATS {
            let (wall, cpu) = ping_pong(cpus)?;
            walls.push(wall);
            cpus_used.push(cpu);
        }
        println!(
            "  {name:<9} wall {:6.1} µs, process CPU {:6.1} µs",
            median(walls),
            median(cpus_used)
        );
    }
    Ok(())
}
