//! CPU time of processes, from /proc: where the time goes during a measurement.

use std::time::Instant;

/// User + system CPU seconds a process has used so far (all its threads).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

pub fn rabbitmq_pid() -> Option<u32> {
    let out = std::process::Command::new("pgrep").args(["-o", "beam.smp"]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// Measures the CPU used by `pids` while `f` runs: (result, seconds elapsed, CPU seconds per pid).
pub fn measure<T>(pids: &[u32], f: impl FnOnce() -> T) -> (T, f64, Vec<f64>) {
    let before: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
    let started = Instant::now();
    let result = f();
    let elapsed = started.elapsed().as_secs_f64();
    let used = pids.iter().zip(before).map(|(p, b)| cpu_seconds(*p) - b).collect();
    (result, elapsed, used)
}
