//! `make bench`: cloudmig against its peers, on the same data, on the same machine, in one run.
//!
//! One source cluster holds the data (pgbench's database `bench`, and the extra data sets in
//! `extra`); every tool gets a fresh destination cluster per measurement. Sections:
//!
//! | section      | what is timed                                                            | tools |
//! |--------------|--------------------------------------------------------------------------|-------|
//! | `apply`      | draining a pgbench backlog held back by a lock on the destination        | cloudmig, native, pglogical |
//! | `lag`        | lag in bytes and seconds under `pgbench -R`, sampled every second        | same, after the drain |
//! | `copy`       | a full copy of `bench` and `extra` until the destination is usable       | pg_dump (2 ways), pgcopydb, native, pglogical, cloudmig |
//! | `switchover` | `cloudmig.switchover()` under `pgbench -R`: downtime and its steps       | cloudmig |
//!
//! Invariants:
//! - a figure is printed only for a run whose destination was checked equal to the source (row
//!   count and an order-independent checksum per table, [`verify`]); anything else is reported as
//!   failed or unfinished with the reason, never as a number;
//! - every wait is bounded: a tool that does not finish in time is reported as such and the run
//!   goes on with the next;
//! - repetitions visit the tools in a rotated order, so none always runs first (cold) or last;
//! - with `--link` other than `direct`, every tool reaches the source through a link emulator
//!   ([`crate::proxy::Proxy`]: delay per direction, token-bucket rate, in-flight cap), and
//!   every figure is tagged with the link it was taken over ([`Link`]);
//! - the source is returned to its state before each measurement (slots, publications, pglogical
//!   nodes, read-only fence dropped: [`tools::reset_source`]).

pub mod apply;
pub mod copy;
pub mod cpu;
pub mod data;
pub mod report;
pub mod stats;
pub mod switchover;
pub mod tools;
pub mod verify;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::cluster::Cluster;

/// The parts of a run, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Section {
    /// Apply throughput by backlog drain.
    Apply,
    /// Lag under a fixed rate (runs on the streaming set up for `apply`).
    Lag,
    /// Full copy of the data sets.
    Copy,
    /// cloudmig's switchover downtime under load.
    Switchover,
}

impl Section {
    /// Every section, in run order.
    pub const ALL: [Section; 4] = [
        Section::Apply,
        Section::Lag,
        Section::Copy,
        Section::Switchover,
    ];

    /// The name used on the command line, in JSON and in titles.
    pub fn name(self) -> &'static str {
        match self {
            Section::Apply => "apply",
            Section::Lag => "lag",
            Section::Copy => "copy",
            Section::Switchover => "switchover",
        }
    }
}

impl FromStr for Section {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Section::ALL
            .into_iter()
            .find(|section| section.name() == s.trim())
            .ok_or_else(|| format!("unknown section {s:?} (expected apply, lag, copy, switchover)"))
    }
}

/// A tool measured; the peers of cloudmig are all real programs from Debian packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tool {
    /// This extension, from `cloudmig.start()`.
    Cloudmig,
    /// PostgreSQL's own logical replication (publication and subscription).
    Native,
    /// The pglogical extension (`postgresql-15-pglogical`).
    Pglogical,
    /// `pg_dump -Fc | pg_restore`.
    PgDumpPipe,
    /// `pg_dump -Fd -j2` then `pg_restore -j2`.
    PgDumpParallel,
    /// `pgcopydb clone --table-jobs 2 --index-jobs 2`.
    Pgcopydb,
    /// Not an applier: `pg_recvlogical` with pgoutput draining the backlog to /dev/null, the
    /// source's decoding alone, which bounds every applier's drain (section `apply` only).
    Decoding,
}

impl Tool {
    /// The tools that apply a change stream.
    pub const APPLIERS: [Tool; 3] = [Tool::Cloudmig, Tool::Native, Tool::Pglogical];
    /// The tools that copy a whole database.
    pub const COPIERS: [Tool; 6] = [
        Tool::Cloudmig,
        Tool::PgDumpPipe,
        Tool::PgDumpParallel,
        Tool::Pgcopydb,
        Tool::Native,
        Tool::Pglogical,
    ];

    /// The tool's name on the command line and in cluster directory names.
    pub fn slug(self) -> &'static str {
        match self {
            Tool::Cloudmig => "cloudmig",
            Tool::Native => "native",
            Tool::Pglogical => "pglogical",
            Tool::PgDumpPipe => "pgdump-pipe",
            Tool::PgDumpParallel => "pgdump-j2",
            Tool::Pgcopydb => "pgcopydb",
            Tool::Decoding => "decoding",
        }
    }

    /// A short label for tables, JSON and the chart.
    pub fn label(self) -> &'static str {
        match self {
            Tool::Cloudmig => "cloudmig",
            Tool::Native => "native subscription",
            Tool::Pglogical => "pglogical",
            Tool::PgDumpPipe => "pg_dump -Fc | pg_restore",
            Tool::PgDumpParallel => "pg_dump -Fd -j2 + pg_restore -j2",
            Tool::Pgcopydb => "pgcopydb clone 2+2",
            Tool::Decoding => "decoding alone (pg_recvlogical)",
        }
    }
}

impl FromStr for Tool {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tool::COPIERS
            .into_iter()
            .find(|tool| tool.slug() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown tool {s:?} (expected {})",
                    Tool::COPIERS.map(Tool::slug).join(", ")
                )
            })
    }
}

impl fmt::Display for Tool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The network between the tools and the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Link {
    /// Straight to the source's port on 127.0.0.1.
    Direct,
    /// Through the proxy: a source in the same region, 0.5 ms round trip, 10 Gbit/s each way.
    Lan,
    /// Through the proxy: 30 ms round trip, 1 Gbit/s each way.
    Ms30Gbit1,
    /// Through the proxy: 30 ms round trip, 100 Mbit/s each way.
    Ms30Mbit100,
}

impl Link {
    /// Every link, in run order.
    pub const ALL: [Link; 4] = [Link::Direct, Link::Lan, Link::Ms30Gbit1, Link::Ms30Mbit100];

    /// The name on the command line, in JSON and in titles.
    pub fn name(self) -> &'static str {
        match self {
            Link::Direct => "direct",
            Link::Lan => "lan",
            Link::Ms30Gbit1 => "30ms-1gbit",
            Link::Ms30Mbit100 => "30ms-100mbit",
        }
    }

    /// Delay each way, rate each way in bytes per second, and in-flight cap per connection and
    /// direction; None for the direct link.
    ///
    /// The cap, 4 MiB, is about what Linux's receive-buffer autotuning (`tcp_rmem` up to 6 MB,
    /// part of it overhead) lets one connection keep in flight, and a little more than the
    /// bandwidth-delay product of 1 Gbit/s over 30 ms (3.75 MB): one stream can about fill
    /// the faster link, as it would on a real one with default settings.
    pub fn emulation(self) -> Option<(Duration, u64, usize)> {
        const CAP: usize = 4 << 20;
        match self {
            Link::Direct => None,
            Link::Lan => Some((Duration::from_micros(250), 1_250_000_000, CAP)),
            Link::Ms30Gbit1 => Some((Duration::from_millis(15), 125_000_000, CAP)),
            Link::Ms30Mbit100 => Some((Duration::from_millis(15), 12_500_000, CAP)),
        }
    }
}

impl FromStr for Link {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Link::ALL
            .into_iter()
            .find(|link| link.name() == s.trim())
            .ok_or_else(|| {
                format!(
                    "unknown link {s:?} (expected {})",
                    Link::ALL.map(Link::name).join(", ")
                )
            })
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How one measurement ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Finished, and the destination was checked equal to the source.
    Ok,
    /// Still running when its time was up: what it had done by then.
    Unfinished(String),
    /// An error, or a destination that differs from the source.
    Failed(String),
}

impl Status {
    /// `ok`, `unfinished` or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Unfinished(_) => "unfinished",
            Status::Failed(_) => "failed",
        }
    }

    /// The reason, empty for [`Status::Ok`].
    pub fn reason(&self) -> &str {
        match self {
            Status::Ok => "",
            Status::Unfinished(reason) | Status::Failed(reason) => reason,
        }
    }
}

/// One measurement: a tool, in a section, in one repetition.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The section it belongs to.
    pub section: Section,
    /// The tool measured.
    pub tool: Tool,
    /// The repetition, from 1.
    pub rep: u32,
    /// Its position among the tools of this repetition, from 1.
    pub order: usize,
    /// The link between the tool and the source.
    pub link: Link,
    /// Whether its figures count.
    pub status: Status,
    /// Named figures (`seconds`, `txn_per_s`, `downtime_ms`, ...).
    pub metrics: BTreeMap<String, f64>,
    /// Remarks worth printing (e.g. "sequences not copied").
    pub notes: Vec<String>,
}

impl Outcome {
    /// A new outcome with no figures yet.
    pub fn new(section: Section, tool: Tool, rep: u32, order: usize) -> Outcome {
        Outcome {
            section,
            tool,
            rep,
            order,
            link: Link::Direct,
            status: Status::Ok,
            metrics: BTreeMap::new(),
            notes: Vec::new(),
        }
    }

    /// Records figure `name`.
    pub fn set(&mut self, name: &str, value: f64) {
        self.metrics.insert(name.to_owned(), value);
    }
}

/// What a run measures and how much: from flags or `BENCH_*` environment variables.
#[derive(Debug, Clone)]
pub struct Options {
    /// pgbench scale of database `bench`; the extra data sets grow with it.
    pub scale: u32,
    /// Repetitions of every measurement.
    pub reps: u32,
    /// The sections to run.
    pub sections: Vec<Section>,
    /// `pgbench -T` while the destination is locked (the backlog), in seconds.
    pub backlog_seconds: u32,
    /// How long an applier may take to drain the backlog.
    pub drain_timeout: Duration,
    /// How long one full copy may take.
    pub copy_timeout: Duration,
    /// How long an applier may take to reach streaming (its initial copy) before a measurement.
    pub setup_timeout: Duration,
    /// `pgbench -R` of the lag and switchover sections, transactions per second.
    pub rate: u32,
    /// How long the lag section samples, in seconds.
    pub lag_seconds: u32,
    /// `pgbench -R` of the switchover section (default: `rate`).
    pub switchover_rate: u32,
    /// How long pgbench writes before the switchover is called, in seconds.
    pub switchover_warmup_seconds: u32,
    /// Small tables (with an index each) in database `extra`; 0 leaves them out.
    pub small_tables: u32,
    /// Whether database `extra` (the data sets beyond pgbench) is copied at all.
    pub extra: bool,
    /// Where results go.
    pub out_dir: PathBuf,
    /// The tools measured (all by default).
    pub tools: Vec<Tool>,
    /// The links the sections run over, each in turn (direct by default).
    pub links: Vec<Link>,
    /// cloudmig's `copy_workers` start option (default: its `cloudmig.copy_workers`).
    pub copy_workers: Option<u32>,
}

impl Options {
    /// The defaults, then `BENCH_*` variables, then `args` (`--name value` or `--name=value`).
    pub fn parse(args: &[String]) -> Result<Options, String> {
        let mut values: BTreeMap<String, String> = BTreeMap::new();
        for (key, value) in std::env::vars() {
            if let Some(name) = key.strip_prefix("BENCH_") {
                values.insert(name.to_ascii_lowercase().replace('_', "-"), value);
            }
        }
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                return Err(format!("unexpected argument {arg:?}"));
            };
            if flag == "help" {
                return Err(USAGE.to_owned());
            }
            let (name, value) = match flag.split_once('=') {
                Some((name, value)) => (name.to_owned(), value.to_owned()),
                None => {
                    let value = iter
                        .next()
                        .ok_or_else(|| format!("--{flag} needs a value"))?;
                    (flag.to_owned(), value.clone())
                }
            };
            values.insert(name, value);
        }
        let mut opts = Options::default();
        for (name, value) in &values {
            let number = || {
                value
                    .parse::<u32>()
                    .map_err(|e| format!("--{name} {value:?}: {e}"))
            };
            match name.as_str() {
                "scale" => opts.scale = number()?.max(1),
                "reps" => opts.reps = number()?.max(1),
                "sections" => {
                    let mut sections = value
                        .split(',')
                        .filter(|s| !s.trim().is_empty())
                        .map(Section::from_str)
                        .collect::<Result<Vec<_>, _>>()?;
                    sections.sort();
                    sections.dedup();
                    opts.sections = sections;
                }
                "backlog-seconds" => opts.backlog_seconds = number()?.max(1),
                "drain-timeout" => opts.drain_timeout = Duration::from_secs(number()?.into()),
                "copy-timeout" => opts.copy_timeout = Duration::from_secs(number()?.into()),
                "setup-timeout" => opts.setup_timeout = Duration::from_secs(number()?.into()),
                "rate" => opts.rate = number()?.max(1),
                "lag-seconds" => opts.lag_seconds = number()?.max(1),
                "switchover-rate" => opts.switchover_rate = number()?.max(1),
                "switchover-warmup" => opts.switchover_warmup_seconds = number()?,
                "small-tables" => opts.small_tables = number()?,
                "copy-workers" => opts.copy_workers = Some(number()?.max(1)),
                "extra" => opts.extra = !matches!(value.as_str(), "0" | "off" | "false" | "no"),
                "out" => opts.out_dir = PathBuf::from(value),
                "link" => {
                    let mut links = value
                        .split(',')
                        .filter(|s| !s.trim().is_empty())
                        .map(Link::from_str)
                        .collect::<Result<Vec<_>, _>>()?;
                    links.sort();
                    links.dedup();
                    if links.is_empty() {
                        return Err(format!("--link {value:?}: no link"));
                    }
                    opts.links = links;
                }
                "tools" => {
                    opts.tools = value
                        .split(',')
                        .filter(|s| !s.trim().is_empty())
                        .map(Tool::from_str)
                        .collect::<Result<Vec<_>, _>>()?;
                }
                // Variables of the environment that are not ours (BENCH_ANYTHING_ELSE) are ignored;
                // an unknown flag is a mistake.
                _ if args.iter().any(|a| a.starts_with(&format!("--{name}"))) => {
                    return Err(format!("unknown flag --{name}\n{USAGE}"));
                }
                _ => {}
            }
        }
        if !values.contains_key("switchover-rate") {
            opts.switchover_rate = opts.rate;
        }
        if !values.contains_key("small-tables") {
            opts.small_tables = 50 * opts.scale;
        }
        Ok(opts)
    }

    /// Whether `section` runs.
    pub fn runs(&self, section: Section) -> bool {
        self.sections.contains(&section)
    }

    /// The tools of `candidates` that were chosen, in `candidates`' order.
    pub fn chosen(&self, candidates: &[Tool]) -> Vec<Tool> {
        candidates
            .iter()
            .copied()
            .filter(|tool| self.tools.contains(tool))
            .collect()
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            scale: 4,
            reps: 3,
            sections: Section::ALL.to_vec(),
            backlog_seconds: 10,
            drain_timeout: Duration::from_secs(30),
            copy_timeout: Duration::from_secs(300),
            setup_timeout: Duration::from_secs(300),
            rate: 500,
            lag_seconds: 10,
            switchover_rate: 500,
            switchover_warmup_seconds: 5,
            small_tables: 200,
            extra: true,
            out_dir: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../bench-results")),
            tools: Tool::COPIERS.to_vec(),
            links: vec![Link::Direct],
            copy_workers: None,
        }
    }
}

/// `--help`.
pub const USAGE: &str = "\
cloudmig-bench: cloudmig against pg_dump, pgcopydb, native logical replication and pglogical

flags (or environment variables BENCH_<NAME>, e.g. BENCH_SCALE=20):
  --scale N              pgbench scale of the source (default 4, a run of about 15 minutes on
                         2 busy cores); the extra data sets grow with it
  --reps N               repetitions, tools in rotated order (default 3)
  --sections LIST        comma-separated: apply,lag,copy,switchover (default all)
  --backlog-seconds N    pgbench -T while the destination is locked (default 10)
  --drain-timeout N      seconds an applier may take to drain the backlog, and the switchover's
                         timeout_seconds (default 30)
  --copy-timeout N       seconds a full copy may take (default 300)
  --setup-timeout N      seconds an applier may take to reach streaming (default 300)
  --rate N               pgbench -R of the lag and switchover sections (default 500)
  --lag-seconds N        seconds of lag sampling (default 10)
  --switchover-rate N    pgbench -R of the switchover section (default: --rate)
  --switchover-warmup N  seconds of load before the switchover (default 5)
  --small-tables N       small tables in database extra (default 50 x scale; the method's full
                         data set has 2000, which takes minutes per tool for native and pgcopydb)
  --extra on|off         copy database extra (wide, TOAST, small tables, no key, partitions)
  --tools LIST           comma-separated: cloudmig,native,pglogical,pgdump-pipe,pgdump-j2,pgcopydb
                         (default all)
  --link LIST            comma-separated: direct,lan,30ms-1gbit,30ms-100mbit (default direct); the
                         chosen sections run over each in turn. Other than direct, every tool
                         reaches the source through a TCP proxy on 127.0.0.1 that delays each
                         direction (lan 0.25 ms at 10 Gbit/s; 30ms-* 15 ms at 1 Gbit/s or 100
                         Mbit/s), limits each to the rate (token bucket) and keeps at most 4 MiB
                         in flight per connection and direction
  --copy-workers N       cloudmig's copy_workers start option (default: cloudmig.copy_workers, 2)
  --out DIR              results directory (default bench-results/ of the repository)

environment: CLOUDMIG_PG_BINDIR (PostgreSQL binaries, with cloudmig and pglogical installed),
CLOUDMIG_E2E_DIR (cluster directories, default <tmp>/cloudmig-bench)";

/// The rotation of `tools` for repetition `rep` (from 1): rep 1 keeps the order, rep 2 starts
/// with the second tool, and so on.
pub fn rotated(tools: &[Tool], rep: u32) -> Vec<Tool> {
    let mut order = tools.to_vec();
    if !order.is_empty() {
        let shift = (rep.saturating_sub(1) as usize) % order.len();
        order.rotate_left(shift);
    }
    order
}

/// Runs `measure`, turning a panic (the harness panics on any unexpected failure) into a
/// [`Status::Failed`] so that one tool's failure does not end the run.
pub fn guarded(outcome: &mut Outcome, measure: impl FnOnce(&mut Outcome) -> Status) {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| measure(outcome)));
    outcome.status = match result {
        Ok(status) => status,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panicked".to_owned());
            Status::Failed(first_lines(&message, 6))
        }
    };
}

/// The first `n` lines of `text`, for messages in tables and JSON.
pub fn first_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().take(n).collect();
    let mut out = lines.join("\n");
    if text.lines().count() > n {
        out.push_str(" …");
    }
    out
}

/// Everything a section needs: the options, the source, and the outcomes so far.
pub struct Bench {
    /// What to run.
    pub opts: Options,
    /// The source cluster, alive for the whole run.
    pub source: Cluster,
    /// The databases of the source that are copied (`bench`, and `extra` if enabled).
    pub databases: Vec<String>,
    /// The measurements, in the order they were taken.
    pub outcomes: Vec<Outcome>,
    /// A directory writable by the server user, for dumps and pgcopydb's work files.
    pub scratch: PathBuf,
    /// The link the sections run over now (outcomes are tagged with it).
    pub link: Link,
    /// Its emulator, None for the direct link.
    pub proxy: Option<crate::proxy::Proxy>,
}

impl Bench {
    /// Records `outcome` and prints a one-line summary of it.
    pub fn record(&mut self, mut outcome: Outcome) {
        outcome.link = self.link;
        let figures: Vec<String> = outcome
            .metrics
            .iter()
            .map(|(name, value)| format!("{name}={value:.3}"))
            .collect();
        println!(
            "    {:<10} {:<12} rep {} #{} {:<34} {:<10} {} {}",
            outcome.section.name(),
            outcome.link.name(),
            outcome.rep,
            outcome.order,
            outcome.tool.label(),
            outcome.status.kind(),
            figures.join(" "),
            first_lines(outcome.status.reason(), 1)
        );
        self.outcomes.push(outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_moves_the_first_tool_each_repetition() {
        let tools = [Tool::Cloudmig, Tool::Native, Tool::Pglogical];
        assert_eq!(rotated(&tools, 1), tools.to_vec());
        assert_eq!(
            rotated(&tools, 2),
            vec![Tool::Native, Tool::Pglogical, Tool::Cloudmig]
        );
        assert_eq!(rotated(&tools, 4), tools.to_vec());
    }

    #[test]
    fn flags_override_defaults() {
        let args: Vec<String> = ["--scale", "3", "--sections=copy,apply", "--reps", "1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let opts = Options::parse(&args).unwrap();
        assert_eq!(opts.scale, 3);
        assert_eq!(opts.reps, 1);
        assert_eq!(opts.sections, vec![Section::Apply, Section::Copy]);
        assert_eq!(opts.small_tables, 150);
        assert!(Options::parse(&["--bogus".to_owned(), "1".to_owned()]).is_err());
        assert!(Options::parse(&["--sections=fast".to_owned()]).is_err());
        assert_eq!(opts.links, vec![Link::Direct]);
        let links = Options::parse(&["--link=30ms-100mbit,lan,direct".to_owned()]).unwrap();
        assert_eq!(
            links.links,
            vec![Link::Direct, Link::Lan, Link::Ms30Mbit100]
        );
        assert!(Options::parse(&["--link=wan".to_owned()]).is_err());
    }

    #[test]
    fn a_panic_becomes_a_failure() {
        let mut outcome = Outcome::new(Section::Copy, Tool::Pgcopydb, 1, 1);
        guarded(&mut outcome, |_| panic!("boom\nline 2"));
        assert_eq!(outcome.status, Status::Failed("boom\nline 2".to_owned()));
    }
}
