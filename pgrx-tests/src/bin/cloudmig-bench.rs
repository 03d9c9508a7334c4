//! `make bench`: cloudmig against pg_dump, pgcopydb, native logical replication and pglogical,
//! on the same data, in one run (see `cloudmig_e2e::bench` for the sections and their method).
//!
//! Starts one source cluster, loads the data sets, runs the chosen sections with a fresh
//! destination per measurement, prints a table per section and writes
//! `bench-results/run-<time>.{json,md,svg}`. Every cluster it started is stopped when it ends.
//!
//! `cloudmig-bench --help` lists the flags (or `BENCH_*` environment variables);
//! `cloudmig-bench --report bench-results/run-X.json` renders a saved run's tables and chart again.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use cloudmig_e2e::bench::data::{self, BENCH_DB, EXTRA_DB};
use cloudmig_e2e::bench::report::{self, RunInfo};
use cloudmig_e2e::bench::{apply, copy, switchover, tools, Bench, Link, Options, Section};
use cloudmig_e2e::proxy::{Direction, Proxy};
use cloudmig_e2e::{bindir, chown_to_server};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, path] = &args[..] {
        if flag == "--report" {
            rerender(Path::new(path));
            return;
        }
    }
    let opts = match Options::parse(&args) {
        Ok(opts) => opts,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    // A failed measurement is reported in its table; on stderr one line says where it happened.
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("panic");
        let at = info
            .location()
            .map(|l| format!(" at {l}"))
            .unwrap_or_default();
        eprintln!("  (failed{at}: {})", message.lines().next().unwrap_or(""));
    }));
    // Our clusters live apart from the test suite's, so neither reaps the other's.
    if std::env::var_os("CLOUDMIG_E2E_DIR").is_none() {
        std::env::set_var(
            "CLOUDMIG_E2E_DIR",
            std::env::temp_dir().join("cloudmig-bench"),
        );
    }
    let base = std::path::PathBuf::from(
        std::env::var_os("CLOUDMIG_E2E_DIR").expect("CLOUDMIG_E2E_DIR was just set"),
    );
    fs::create_dir_all(&base).unwrap_or_else(|e| panic!("cannot create {}: {e}", base.display()));
    let scratch = base.join(format!("scratch-{}", std::process::id()));
    fs::create_dir_all(&scratch)
        .and_then(|()| chown_to_server(&scratch))
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", scratch.display()));

    let load_average = fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let with_extra = opts.extra && opts.runs(Section::Copy);
    println!(
        "cloudmig-bench: scale {}, {} repetition(s), sections {}, load average {load_average}, {cpus} CPUs, binaries {}",
        opts.scale,
        opts.reps,
        opts.sections.iter().map(|s| s.name()).collect::<Vec<_>>().join(","),
        bindir().display()
    );
    println!("starting the source and loading data ...");
    let source = data::start_source(&opts, with_extra);
    let mut databases = vec![BENCH_DB.to_owned()];
    if with_extra {
        databases.push(EXTRA_DB.to_owned());
    }
    let database_bytes: BTreeMap<String, i64> = databases
        .iter()
        .map(|db| (db.clone(), data::database_size(&source, db)))
        .collect();
    let info = RunInfo {
        started: source.query_scalar(
            "postgres",
            "SELECT to_char(now(), 'YYYY-MM-DD\"T\"HH24:MI:SSOF')",
        ),
        load_average,
        cpus,
        postgres: source.query_scalar("postgres", "SHOW server_version"),
        cloudmig_build: cloudmig_build(),
        command: command_line(&args),
        options: serde_json::json!({
            "scale": opts.scale,
            "reps": opts.reps,
            "sections": opts.sections.iter().map(|s| s.name()).collect::<Vec<_>>(),
            "backlog_seconds": opts.backlog_seconds,
            "drain_timeout_s": opts.drain_timeout.as_secs(),
            "copy_timeout_s": opts.copy_timeout.as_secs(),
            "setup_timeout_s": opts.setup_timeout.as_secs(),
            "rate": opts.rate,
            "lag_seconds": opts.lag_seconds,
            "small_tables": if with_extra { opts.small_tables } else { 0 },
            "links": opts.links.iter().map(|l| l.name()).collect::<Vec<_>>(),
        }),
        database_bytes,
    };
    let out_dir = opts.out_dir.clone();
    let mut bench = Bench {
        opts,
        source,
        databases,
        outcomes: Vec::new(),
        scratch: scratch.clone(),
        link: Link::Direct,
        proxy: None,
    };
    for link in bench.opts.links.clone() {
        // The previous one is dropped (every proxied connection closed) here.
        bench.proxy = emulate(&bench, link);
        bench.link = link;
        if bench.opts.runs(Section::Apply) || bench.opts.runs(Section::Lag) {
            apply::run(&mut bench);
        }
        if bench.opts.runs(Section::Copy) {
            copy::run(&mut bench);
        }
        if bench.opts.runs(Section::Switchover) {
            switchover::run(&mut bench);
        }
        tools::route_source(None);
        bench.proxy = None;
    }
    let _ = fs::remove_dir_all(&scratch);

    let markdown = report::markdown(&info, &bench.outcomes);
    println!("\n{markdown}");
    let stamp = info.started.replace([':', '+'], "").replace('-', "");
    let stamp = stamp.get(..15).unwrap_or(&stamp).to_owned();
    write(&out_dir, &format!("run-{stamp}.md"), &markdown);
    write(
        &out_dir,
        &format!("run-{stamp}.json"),
        &serde_json::to_string_pretty(&report::json(&info, &bench.outcomes))
            .expect("outcomes are plain JSON values"),
    );
    write(
        &out_dir,
        &format!("run-{stamp}.svg"),
        &report::svg(&info, &bench.outcomes),
    );
    // `bench` (and with it the source cluster) is dropped here: the server stops.
}

/// Puts `link` between the tools and the source: a proxy with its delay, rate and in-flight
/// cap, or nothing for the direct link.
fn emulate(bench: &Bench, link: Link) -> Option<Proxy> {
    let Some((delay, rate, cap)) = link.emulation() else {
        println!("\n== link: direct ==");
        tools::route_source(None);
        return None;
    };
    let proxy = Proxy::to_port(bench.source.port);
    proxy.set_delay(delay, delay);
    proxy.set_rate(Direction::Up, Some(rate));
    proxy.set_rate(Direction::Down, Some(rate));
    proxy.set_in_flight_cap(Some(cap));
    tools::route_source(Some(proxy.port()));
    println!(
        "\n== link: {link} (proxy on port {}: {} ms each way, {} Mbit/s each way, {} MiB in flight per connection and direction) ==",
        proxy.port(),
        delay.as_millis(),
        rate * 8 / 1_000_000,
        cap >> 20
    );
    Some(proxy)
}

/// `--report FILE.json`: renders a saved run's tables and chart again, beside the file.
fn rerender(path: &Path) {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let value: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    let (info, outcomes) = report::from_json(&value)
        .unwrap_or_else(|e| panic!("{} is not a cloudmig-bench result: {e}", path.display()));
    let markdown = report::markdown(&info, &outcomes);
    println!("{markdown}");
    let dir = path.parent().unwrap_or(Path::new("."));
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    write(dir, &format!("{stem}.md"), &markdown);
    write(dir, &format!("{stem}.svg"), &report::svg(&info, &outcomes));
}

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    fs::create_dir_all(dir)
        .and_then(|()| fs::write(&path, text))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    println!("wrote {}", path.display());
}

/// The last commit that changed the extension (`src/`, `sql/`, its manifest and control file),
/// `+dirty` when those have uncommitted changes, and the profile `CLOUDMIG_BUILD_PROFILE` names
/// (the Makefile installs a release build of the working tree it runs in).
fn cloudmig_build() -> String {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    const EXTENSION: [&str; 5] = ["--", "src", "sql", "Cargo.toml", "cloudmig.control"];
    let commit = git(&[&["log", "-1", "--format=%h"][..], &EXTENSION[..]].concat())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let dirty = git(&[&["status", "--porcelain"][..], &EXTENSION[..]].concat())
        .is_some_and(|s| !s.is_empty());
    let profile = std::env::var("CLOUDMIG_BUILD_PROFILE").unwrap_or_else(|_| "as installed".into());
    format!("{commit}{} ({profile})", if dirty { "+dirty" } else { "" })
}

fn command_line(args: &[String]) -> String {
    let mut line = String::from("cloudmig-bench");
    for arg in args {
        line.push(' ');
        line.push_str(arg);
    }
    let env: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("BENCH_"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if env.is_empty() {
        line
    } else {
        format!("{} {line}", env.join(" "))
    }
}
