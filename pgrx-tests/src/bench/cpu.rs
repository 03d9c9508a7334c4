//! CPU time and peak memory of server processes, read from `/proc` (the clusters run on this
//! machine): `utime + stime` of `/proc/<pid>/stat`, `VmHWM` of `/proc/<pid>/status`.
//!
//! CPU is what tells a walsender-bound drain from an applier-bound one: wall time alone does not
//! say which side a tool waits for, and the machine is shared, so seconds of CPU per transaction
//! are steadier than transactions per second.

use std::collections::BTreeMap;

use crate::cluster::Cluster;

/// Clock ticks per second of `/proc/<pid>/stat`'s times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// CPU seconds (user + system) process `pid` has used so far; `None` once it is gone.
pub fn cpu_seconds(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are utime and stime: 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_second())
}

/// Peak resident set size of process `pid` in bytes (`VmHWM`); `None` once it is gone.
pub fn peak_rss_bytes(pid: i32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let kb: f64 = line
            .strip_prefix("VmHWM:")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024.0)
    })
}

/// Fields of `/proc/<pid>/stat` after the command name, from field 3 (state) on.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// CPU seconds a whole cluster has used so far: the postmaster's own, its reaped children's
/// (`cutime + cstime`: backends that already ended, such as a dump's connections), and its
/// live children's. `None` when the postmaster is not found.
pub fn cluster_cpu_seconds(cluster: &Cluster) -> Option<f64> {
    let pid_file = std::fs::read_to_string(cluster.data_dir.join("postmaster.pid")).ok()?;
    let postmaster: i32 = pid_file.lines().next()?.trim().parse().ok()?;
    let fields = stat_fields(postmaster)?;
    // utime, stime, cutime, cstime: fields 14 to 17 of the line, 12 to 15 after the name.
    let own: f64 = fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<f64>().unwrap_or(0.0))
        .sum();
    let mut children = 0.0;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Some(fields) = stat_fields(pid) else {
            continue;
        };
        // Field 4, the parent: 2 after the name.
        if fields.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(postmaster) {
            children += fields
                .get(11..13)
                .map(|t| t.iter().map(|f| f.parse::<f64>().unwrap_or(0.0)).sum())
                .unwrap_or(0.0);
        }
    }
    Some((own + children) / ticks_per_second())
}

/// The pids `sql` (one integer column) returns on `cluster`; none when the query fails.
pub fn pids(cluster: &Cluster, db: &str, sql: &str) -> Vec<i32> {
    match cluster.try_client(db) {
        Ok(mut client) => client
            .query(sql, &[])
            .map(|rows| {
                rows.iter()
                    .filter_map(|row| row.try_get::<_, i32>(0).ok())
                    .collect()
            })
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// CPU used by a set of processes between [`Meter::start`] and [`Meter::used`]; a process that
/// ends in between counts up to its last [`Meter::sample`].
#[derive(Debug, Clone, Default)]
pub struct Meter {
    /// pid -> (CPU seconds at the start, latest reading).
    readings: BTreeMap<i32, (f64, f64)>,
}

impl Meter {
    /// Starts measuring `pids` (those already gone are left out).
    pub fn start(pids: &[i32]) -> Meter {
        let readings = pids
            .iter()
            .filter_map(|&pid| cpu_seconds(pid).map(|cpu| (pid, (cpu, cpu))))
            .collect();
        Meter { readings }
    }

    /// Whether no process is measured.
    pub fn is_empty(&self) -> bool {
        self.readings.is_empty()
    }

    /// Reads the processes again (call it now and then, so one that exits still counts).
    pub fn sample(&mut self) {
        for (pid, (_, latest)) in self.readings.iter_mut() {
            if let Some(cpu) = cpu_seconds(*pid) {
                *latest = cpu;
            }
        }
    }

    /// CPU seconds used since the start, over all the processes.
    pub fn used(&mut self) -> f64 {
        self.sample();
        self.readings
            .values()
            .map(|(start, latest)| latest - start)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::{cpu_seconds, peak_rss_bytes, Meter};

    #[test]
    fn own_process_is_measured() {
        let me = std::process::id() as i32;
        let mut meter = Meter::start(&[me]);
        assert!(!meter.is_empty());
        // Some work, so the reading can move (it is in clock ticks).
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(meter.used() >= 0.0);
        assert!(cpu_seconds(me).is_some());
        assert!(peak_rss_bytes(me).is_some_and(|b| b > 0.0));
        assert!(cpu_seconds(-1).is_none());
    }
}
