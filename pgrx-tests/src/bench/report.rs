//! What a run prints and keeps: a Markdown table per section (median with min–max over the
//! repetitions that passed their check, and cloudmig's ratio to each peer), the raw outcomes as
//! JSON, and an SVG bar chart written here by hand (no plotting dependency).
//!
//! Only outcomes with [`Status::Ok`] enter a figure; the others are listed under their table
//! with their reason. Every figure says the link it was taken over: with one link, the header
//! names it; with several, each link gets its own tables (and panels of the chart), and the
//! full copy a table of each tool's time over each link against its direct time.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::bench::stats::Spread;
use crate::bench::{Link, Outcome, Section, Status, Tool};

/// Facts about the run printed above the tables and kept in the JSON.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// When it started (the source's clock, ISO 8601).
    pub started: String,
    /// `/proc/loadavg` at start.
    pub load_average: String,
    /// Processors online.
    pub cpus: usize,
    /// The PostgreSQL server version.
    pub postgres: String,
    /// The cloudmig build measured (commit, dirty flag, profile).
    pub cloudmig_build: String,
    /// The command line, for the README.
    pub command: String,
    /// The options, rendered.
    pub options: Value,
    /// Sizes of the source's databases in bytes.
    pub database_bytes: BTreeMap<String, i64>,
}

/// The medians (with range) of `metric` over the passed outcomes of `section` per tool.
fn spreads(outcomes: &[Outcome], section: Section, metric: &str) -> BTreeMap<Tool, Option<Spread>> {
    let mut values: BTreeMap<Tool, Vec<f64>> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.section == section) {
        let entry = values.entry(o.tool).or_default();
        if o.status == Status::Ok {
            if let Some(v) = o.metrics.get(metric) {
                entry.push(*v);
            }
        }
    }
    values
        .into_iter()
        .map(|(tool, v)| (tool, Spread::of(&v)))
        .collect()
}

fn tools_of(outcomes: &[Outcome], section: Section) -> Vec<Tool> {
    let mut tools: Vec<Tool> = outcomes
        .iter()
        .filter(|o| o.section == section)
        .map(|o| o.tool)
        .collect();
    tools.sort();
    tools.dedup();
    tools
}

fn passed(outcomes: &[Outcome], section: Section, tool: Tool) -> String {
    let all: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.section == section && o.tool == tool)
        .collect();
    let ok = all.iter().filter(|o| o.status == Status::Ok).count();
    format!("{ok}/{}", all.len())
}

fn cell(spread: Option<&Option<Spread>>, decimals: usize) -> String {
    match spread {
        Some(Some(s)) => s.show(decimals),
        _ => "–".to_owned(),
    }
}

/// cloudmig's median over `tool`'s, as `0.42×`.
fn ratio(spreads: &BTreeMap<Tool, Option<Spread>>, tool: Tool) -> String {
    match (spreads.get(&Tool::Cloudmig), spreads.get(&tool)) {
        (_, _) if tool == Tool::Cloudmig => "1×".to_owned(),
        (Some(Some(c)), Some(Some(t))) if t.median > 0.0 => format!("{:.2}×", c.median / t.median),
        _ => "–".to_owned(),
    }
}

/// Median of `metric` over the outcomes of `section` and `tool` that did not finish (their
/// figures are not checked, so they are shown apart, never as results).
fn unfinished_median(
    outcomes: &[Outcome],
    section: Section,
    tool: Tool,
    metric: &str,
) -> Option<Spread> {
    let values: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.section == section && o.tool == tool)
        .filter(|o| matches!(o.status, Status::Unfinished(_)))
        .filter_map(|o| o.metrics.get(metric).copied())
        .collect();
    Spread::of(&values)
}

/// [`ratio`] of drain rates; when no cloudmig drain finished, the rate it drained at until its
/// timeout over the peer's, marked as such.
fn apply_ratio(outcomes: &[Outcome], rate: &BTreeMap<Tool, Option<Spread>>, tool: Tool) -> String {
    let finished = ratio(rate, tool);
    if finished != "–" || tool == Tool::Cloudmig {
        return finished;
    }
    let partial = unfinished_median(
        outcomes,
        Section::Apply,
        Tool::Cloudmig,
        "partial_txn_per_s",
    );
    match (partial, rate.get(&tool).copied().flatten()) {
        (Some(c), Some(t)) if t.median > 0.0 => {
            format!("≈{:.4}× (cloudmig unfinished)", c.median / t.median)
        }
        _ => finished,
    }
}

/// The reasons of every outcome of `section` that did not pass, one line each, and notes.
fn footnotes(outcomes: &[Outcome], section: Section) -> String {
    let mut out = String::new();
    for o in outcomes.iter().filter(|o| o.section == section) {
        if o.status != Status::Ok {
            let reason = o.status.reason().replace('\n', " ");
            let _ = writeln!(
                out,
                "- {} rep {}: **{}** — {}",
                md_cell(o.tool.label()),
                o.rep,
                o.status.kind(),
                crate::bench::first_lines(&reason, 1)
            );
        }
        for note in &o.notes {
            let _ = writeln!(out, "- {} rep {}: {note}", md_cell(o.tool.label()), o.rep);
        }
    }
    out
}

/// The Markdown report of all sections that ran.
pub fn markdown(info: &RunInfo, outcomes: &[Outcome]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Run of {} on {} CPUs, load average at start {}; PostgreSQL {}; cloudmig {}.\n\n\
         `{}`\n\nSource databases: {}. Figures are the median (min–max) over the repetitions that \
         passed their data check; tools ran in a rotated order in each repetition.\n",
        info.started,
        info.cpus,
        info.load_average,
        info.postgres,
        info.cloudmig_build,
        info.command,
        info.database_bytes
            .iter()
            .map(|(db, b)| format!("{db} {:.0} MB", *b as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let links = links_of(outcomes);
    match links[..] {
        [] => {}
        [link] => {
            let _ = writeln!(
                md,
                "Link between the tools and the source: {}.\n",
                link_words(link)
            );
            md.push_str(&sections(outcomes));
        }
        _ => {
            for link in &links {
                let over: Vec<Outcome> = outcomes
                    .iter()
                    .filter(|o| o.link == *link)
                    .cloned()
                    .collect();
                let _ = writeln!(md, "## Over link {link}\n\n{}.\n", link_words(*link));
                md.push_str(&sections(&over));
            }
            md.push_str(&copy_by_link(outcomes, &links));
        }
    }
    md
}

/// The links outcomes were taken over, in run order.
fn links_of(outcomes: &[Outcome]) -> Vec<Link> {
    let mut links: Vec<Link> = outcomes.iter().map(|o| o.link).collect();
    links.sort();
    links.dedup();
    links
}

/// What a link is, in words.
fn link_words(link: Link) -> String {
    match link.emulation() {
        None => "direct (TCP on 127.0.0.1)".to_owned(),
        Some((delay, rate, cap)) => format!(
            "{link}: through a TCP proxy on 127.0.0.1, {} ms each way ({} ms round trip), {} Mbit/s \
             each way (token bucket), at most {} MiB in flight per connection and direction",
            delay.as_secs_f64() * 1e3,
            2.0 * delay.as_secs_f64() * 1e3,
            rate * 8 / 1_000_000,
            cap >> 20
        ),
    }
}

/// The full copy's time per tool over each link, and its speed there against its direct speed
/// (direct time ÷ link time: 1 is no loss) where both were measured.
fn copy_by_link(outcomes: &[Outcome], links: &[Link]) -> String {
    let copies: Vec<Outcome> = outcomes
        .iter()
        .filter(|o| o.section == Section::Copy)
        .cloned()
        .collect();
    if copies.is_empty() {
        return String::new();
    }
    let per_link = |metric: &str| -> BTreeMap<Link, BTreeMap<Tool, Option<Spread>>> {
        links
            .iter()
            .map(|link| {
                let over: Vec<Outcome> =
                    copies.iter().filter(|o| o.link == *link).cloned().collect();
                (*link, spreads(&over, Section::Copy, metric))
            })
            .collect()
    };
    let (seconds, connections, exchanges) = (
        per_link("seconds"),
        per_link("link_connections"),
        per_link("link_exchanges"),
    );
    let mut md = String::from(
        "### Full copy over each link

| tool |",
    );
    let mut rule = String::from("|---|");
    for link in links {
        let _ = write!(md, " {link} s |");
        rule.push_str("---:|");
        if *link != Link::Direct {
            let _ = write!(
                md,
                " {link}: speed ÷ direct speed | connections, exchanges |"
            );
            rule.push_str("---:|---:|");
        }
    }
    let _ = writeln!(md, "\n{rule}");
    for tool in tools_of(&copies, Section::Copy) {
        let median = |link: &Link| {
            seconds
                .get(link)
                .and_then(|s| s.get(&tool).copied().flatten())
                .map(|s| s.median)
        };
        let direct = median(&Link::Direct);
        let _ = write!(md, "| {} |", md_cell(tool.label()));
        for link in links {
            let _ = write!(md, " {} |", cell(seconds[link].get(&tool), 1));
            if *link != Link::Direct {
                let words = match (direct, median(link)) {
                    (Some(d), Some(l)) if l > 0.0 => format!("{:.2}", d / l),
                    _ => "–".to_owned(),
                };
                let count = |figures: &BTreeMap<Link, BTreeMap<Tool, Option<Spread>>>| {
                    figures[link]
                        .get(&tool)
                        .copied()
                        .flatten()
                        .map_or("–".to_owned(), |s| format!("{:.0}", s.median))
                };
                let _ = write!(
                    md,
                    " {words} | {}, {} |",
                    count(&connections),
                    count(&exchanges)
                );
            }
        }
        md.push('\n');
    }
    md.push_str(
        "\nSpeed ÷ direct speed: the tool's median direct time over its median time over the \
         link (1.00 is no loss; the target for cloudmig over 30 ms is at least 0.80). \
         Connections, exchanges: what crossed the link during the copy (median): connections \
         opened to the source, and exchanges, the times a client sent bytes after the source had \
         answered, each a request it waited for and so at least a round trip.\n\n",
    );
    md
}

/// The tables of every section present in `outcomes` (taken over one link).
fn sections(outcomes: &[Outcome]) -> String {
    let mut md = String::new();
    let present = |s: Section| outcomes.iter().any(|o| o.section == s);

    if present(Section::Apply) {
        let rate = spreads(outcomes, Section::Apply, "txn_per_s");
        let secs = spreads(outcomes, Section::Apply, "seconds");
        let txns = spreads(outcomes, Section::Apply, "transactions");
        let pos = spreads(outcomes, Section::Apply, "position_seconds");
        let walsender = spreads(outcomes, Section::Apply, "walsender_us_per_txn");
        let applier = spreads(outcomes, Section::Apply, "applier_us_per_txn");
        md.push_str("### Apply throughput (backlog drain)\n\n");
        md.push_str("| applier | backlog txn | drain s | txn/s | cloudmig ÷ this | source walsender CPU µs/txn | applier CPU µs/txn | position passed end LSN, s | passed | unfinished: txn/s until the timeout |\n");
        md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for tool in tools_of(outcomes, Section::Apply) {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                md_cell(tool.label()),
                cell(txns.get(&tool), 0),
                cell(secs.get(&tool), 2),
                cell(rate.get(&tool), 0),
                apply_ratio(outcomes, &rate, tool),
                cell(walsender.get(&tool), 1),
                cell(applier.get(&tool), 1),
                cell(pos.get(&tool), 2),
                passed(outcomes, Section::Apply, tool),
                cell(
                    Some(&unfinished_median(
                        outcomes,
                        Section::Apply,
                        tool,
                        "partial_txn_per_s"
                    )),
                    1
                )
            );
        }
        md.push_str(
            "\nCPU: user + system time of the source's walsender and of the destination's applying \
             process, from before the backlog's load to the end of its drain, over the backlog's \
             transactions. The decoding-alone line is `pg_recvlogical` with pgoutput draining a \
             backlog of the same load to /dev/null: the rate the source's walsender decodes at with \
             no applier behind it, the ceiling of every applier.\n",
        );
        md.push('\n');
        md.push_str(&footnotes(outcomes, Section::Apply));
        md.push('\n');
    }
    if present(Section::Lag) {
        md.push_str("### Lag under a fixed rate\n\n");
        md.push_str("| applier | load txn/s | lag bytes p50 | p99 | max | lag s p50 | p99 | max | passed |\n");
        md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        let get = |m: &str| spreads(outcomes, Section::Lag, m);
        let (load, b50, b99, bmax, s50, s99, smax) = (
            get("load_txn_per_s"),
            get("bytes_p50"),
            get("bytes_p99"),
            get("bytes_max"),
            get("seconds_p50"),
            get("seconds_p99"),
            get("seconds_max"),
        );
        for tool in tools_of(outcomes, Section::Lag) {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                md_cell(tool.label()),
                cell(load.get(&tool), 0),
                cell(b50.get(&tool), 0),
                cell(b99.get(&tool), 0),
                cell(bmax.get(&tool), 0),
                cell(s50.get(&tool), 3),
                cell(s99.get(&tool), 3),
                cell(smax.get(&tool), 3),
                passed(outcomes, Section::Lag, tool)
            );
        }
        md.push_str(
            "\nLag bytes: the source's WAL position minus the slot's `confirmed_flush_lsn`; lag \
             seconds: the age of the newest heartbeat (written every 100 ms on the source) seen on \
             the destination, so it includes up to 0.1 s of heartbeat period. One sample a second; \
             medians over repetitions of each repetition's p50/p99/max.\n\n",
        );
        md.push_str(&footnotes(outcomes, Section::Lag));
        md.push('\n');
    }
    if present(Section::Copy) {
        let wall = spreads(outcomes, Section::Copy, "seconds");
        let rate = spreads(outcomes, Section::Copy, "mb_per_s");
        let source_cpu = spreads(outcomes, Section::Copy, "source_cpu_s_per_gb");
        let dest_cpu = spreads(outcomes, Section::Copy, "destination_cpu_s_per_gb");
        let rss = spreads(outcomes, Section::Copy, "worker_peak_rss_mb");
        md.push_str("### Full copy\n\n");
        md.push_str(
            "| tool | seconds | MB/s | cloudmig time ÷ this | source CPU s/GB | destination CPU s/GB | worker peak RSS MB | phases (median s) | passed |\n",
        );
        md.push_str("|---|---:|---:|---:|---:|---:|---:|---|---:|\n");
        for tool in tools_of(outcomes, Section::Copy) {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                md_cell(tool.label()),
                cell(wall.get(&tool), 1),
                cell(rate.get(&tool), 1),
                ratio(&wall, tool),
                cell(source_cpu.get(&tool), 1),
                cell(dest_cpu.get(&tool), 1),
                cell(rss.get(&tool), 0),
                phases(outcomes, tool),
                passed(outcomes, Section::Copy, tool)
            );
        }
        md.push_str(
            "\nCPU s/GB: user + system time of every process of each side's cluster (ended \
             backends included) during the copy, over the source's database size; the tools' own \
             client programs (pg_dump, pg_restore, pgcopydb) are not counted. Worker peak RSS: the \
             highest `VmHWM` of cloudmig's background workers, sampled every 100 ms (it counts the \
             shared buffers a worker touched).\n",
        );
        md.push('\n');
        md.push_str(&footnotes(outcomes, Section::Copy));
        md.push('\n');
    }
    if present(Section::Switchover) {
        md.push_str("### Switchover under load (cloudmig)\n\n");
        md.push_str("| downtime ms | fence ms | drain ms | sequences ms | cleanup ms | before the fence ms (not downtime) | call s | lag at call, bytes | passed |\n");
        md.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        let get = |m: &str| {
            let s = spreads(outcomes, Section::Switchover, m);
            cell(
                s.get(&Tool::Cloudmig),
                if m == "call_seconds" { 2 } else { 0 },
            )
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            get("downtime_ms"),
            get("fence_ms"),
            get("drain_ms"),
            get("sequences_ms"),
            get("cleanup_ms"),
            get("before_fence_ms"),
            get("call_seconds"),
            get("lag_bytes_at_call"),
            passed(outcomes, Section::Switchover, Tool::Cloudmig)
        );
        md.push('\n');
        md.push_str(&footnotes(outcomes, Section::Switchover));
        md.push('\n');
    }
    md
}

/// Median phase durations of `tool`'s passed copies, as `schema 1.2, copy 3.4`.
fn phases(outcomes: &[Outcome], tool: Tool) -> String {
    let mut names: Vec<String> = Vec::new();
    for o in outcomes
        .iter()
        .filter(|o| o.section == Section::Copy && o.tool == tool && o.status == Status::Ok)
    {
        for name in o.metrics.keys().filter(|k| k.starts_with("phase_")) {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    // In the order the tools go through them; unknown names last.
    const ORDER: [&str; 8] = [
        "roles",
        "schema",
        "full_copy",
        "post_data",
        "dump",
        "restore",
        "sync",
        "structure+data",
    ];
    names.sort_by_key(|name| {
        ORDER
            .iter()
            .position(|p| name.strip_prefix("phase_") == Some(*p))
            .unwrap_or(ORDER.len())
    });
    let spreads_of = |name: &str| spreads(outcomes, Section::Copy, name);
    names
        .iter()
        .filter_map(|name| {
            let s = spreads_of(name).get(&tool).copied().flatten()?;
            Some(format!("{} {:.1}", &name["phase_".len()..], s.median))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Everything as JSON: the run's facts and every outcome with its figures.
pub fn json(info: &RunInfo, outcomes: &[Outcome]) -> Value {
    json!({
        "run": {
            "started": info.started,
            "load_average": info.load_average,
            "cpus": info.cpus,
            "postgres": info.postgres,
            "cloudmig_build": info.cloudmig_build,
            "command": info.command,
            "options": info.options,
            "database_bytes": info.database_bytes,
        },
        "outcomes": outcomes.iter().map(|o| json!({
            "section": o.section.name(),
            "tool": o.tool.label(),
            "rep": o.rep,
            "order": o.order,
            "link": o.link.name(),
            "status": o.status.kind(),
            "reason": o.status.reason(),
            "metrics": o.metrics,
            "notes": o.notes,
        })).collect::<Vec<_>>(),
    })
}

/// The run and outcomes [`json`] wrote, read back (to render a saved run again with
/// `cloudmig-bench --report FILE`); `Err` names what is missing.
pub fn from_json(value: &Value) -> Result<(RunInfo, Vec<Outcome>), String> {
    let run = &value["run"];
    let text = |v: &Value, key: &str| -> Result<String, String> {
        v[key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no string {key:?}"))
    };
    let info = RunInfo {
        started: text(run, "started")?,
        load_average: text(run, "load_average")?,
        cpus: run["cpus"].as_u64().unwrap_or(0) as usize,
        postgres: text(run, "postgres")?,
        cloudmig_build: text(run, "cloudmig_build")?,
        command: text(run, "command")?,
        options: run["options"].clone(),
        database_bytes: run["database_bytes"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_i64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default(),
    };
    let mut outcomes = Vec::new();
    for o in value["outcomes"].as_array().ok_or("no outcomes")? {
        let section: Section = text(o, "section")?.parse()?;
        let label = text(o, "tool")?;
        let tool = Tool::COPIERS
            .into_iter()
            .find(|t| t.label() == label)
            .ok_or_else(|| format!("unknown tool {label:?}"))?;
        let mut outcome = Outcome::new(
            section,
            tool,
            o["rep"].as_u64().unwrap_or(0) as u32,
            o["order"].as_u64().unwrap_or(0) as usize,
        );
        // Runs written before links existed were direct.
        outcome.link = match o["link"].as_str() {
            Some(link) => link.parse()?,
            None => Link::Direct,
        };
        let reason = text(o, "reason")?;
        outcome.status = match text(o, "status")?.as_str() {
            "ok" => Status::Ok,
            "unfinished" => Status::Unfinished(reason),
            _ => Status::Failed(reason),
        };
        if let Some(metrics) = o["metrics"].as_object() {
            for (name, v) in metrics {
                if let Some(v) = v.as_f64() {
                    outcome.set(name, v);
                }
            }
        }
        // Results written before `partial_txn_per_s` existed: the same figure from its parts.
        let drain_timeout = run["options"]["drain_timeout_s"]
            .as_f64()
            .filter(|t| *t > 0.0);
        if let (Section::Apply, Status::Unfinished(_), Some(drained), Some(timeout), None) = (
            section,
            &outcome.status,
            outcome.metrics.get("drained_transactions").copied(),
            drain_timeout,
            outcome.metrics.get("partial_txn_per_s"),
        ) {
            outcome.set("partial_txn_per_s", drained / timeout);
        }
        if let Some(notes) = o["notes"].as_array() {
            outcome.notes = notes
                .iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect();
        }
        outcomes.push(outcome);
    }
    Ok((info, outcomes))
}

/// One panel of the chart: a figure of a section per tool.
struct Panel {
    title: &'static str,
    section: Section,
    metric: &'static str,
    unit: &'static str,
    decimals: usize,
}

const PANELS: [Panel; 4] = [
    Panel {
        title: "Apply: backlog drained, txn/s (higher is better)",
        section: Section::Apply,
        metric: "txn_per_s",
        unit: "txn/s",
        decimals: 0,
    },
    Panel {
        title: "Full copy: wall seconds (lower is better)",
        section: Section::Copy,
        metric: "seconds",
        unit: "s",
        decimals: 1,
    },
    Panel {
        title: "Lag under fixed rate: p99 seconds (lower is better)",
        section: Section::Lag,
        metric: "seconds_p99",
        unit: "s",
        decimals: 2,
    },
    Panel {
        title: "Switchover downtime, ms (lower is better)",
        section: Section::Switchover,
        metric: "downtime_ms",
        unit: "ms",
        decimals: 0,
    },
];

/// The bar chart: one panel per section that ran; a bar per tool at its median with a min–max
/// whisker, or the word of its status when no repetition passed.
pub fn svg(info: &RunInfo, outcomes: &[Outcome]) -> String {
    const WIDTH: f64 = 820.0;
    const LABEL: f64 = 230.0;
    const BAR_MAX: f64 = 470.0;
    const ROW: f64 = 24.0;
    let mut body = String::new();
    let mut y = 66.0;
    let all = outcomes;
    let links = links_of(all);
    for (link, panel) in links
        .iter()
        .flat_map(|l| PANELS.iter().map(move |p| (*l, p)))
    {
        let over: Vec<Outcome> = all.iter().filter(|o| o.link == link).cloned().collect();
        let outcomes = &over[..];
        let tools = tools_of(outcomes, panel.section);
        if tools.is_empty() {
            continue;
        }
        let spreads = spreads(outcomes, panel.section, panel.metric);
        let top = spreads
            .values()
            .flatten()
            .map(|s| s.max)
            .fold(0.0_f64, f64::max)
            .max(f64::MIN_POSITIVE);
        let _ = writeln!(
            body,
            r#"<text x="10" y="{y}" font-weight="bold">{}</text>"#,
            escape(&format!("{} · link {link}", panel.title))
        );
        y += 10.0;
        for tool in tools {
            let colour = if tool == Tool::Cloudmig {
                "#d9534f"
            } else {
                "#5b8bd0"
            };
            let _ = writeln!(
                body,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                LABEL - 8.0,
                y + 15.0,
                escape(tool.label())
            );
            match spreads.get(&tool).copied().flatten() {
                Some(s) => {
                    let w = (s.median / top * BAR_MAX).max(1.0);
                    let (x0, x1) = (LABEL + s.min / top * BAR_MAX, LABEL + s.max / top * BAR_MAX);
                    let mid = y + 10.0;
                    let _ = writeln!(
                        body,
                        r#"<rect x="{LABEL}" y="{}" width="{w:.1}" height="16" fill="{colour}"/>"#,
                        y + 2.0
                    );
                    let _ = writeln!(
                        body,
                        r#"<path d="M{x0:.1} {mid} H{x1:.1} M{x0:.1} {} V{} M{x1:.1} {} V{}" stroke="black"/>"#,
                        mid - 5.0,
                        mid + 5.0,
                        mid - 5.0,
                        mid + 5.0
                    );
                    let _ = writeln!(
                        body,
                        r#"<text x="{:.1}" y="{}">{:.*} {}</text>"#,
                        LABEL + w.max(x1 - LABEL) + 6.0,
                        y + 15.0,
                        panel.decimals,
                        s.median,
                        panel.unit
                    );
                }
                None => {
                    let _ = writeln!(
                        body,
                        r##"<text x="{LABEL}" y="{}" fill="#a00">{}</text>"##,
                        y + 15.0,
                        escape(&status_words(outcomes, panel.section, tool))
                    );
                }
            }
            y += ROW;
        }
        y += 26.0;
    }
    let height = y + 10.0;
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="13">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="20" font-size="15" font-weight="bold">cloudmig and its peers, same data, same run</text>
<text x="10" y="36" fill="#555">{}</text>
{body}</svg>
"##,
        escape(&format!(
            "{} · {} CPUs, load {} · cloudmig {} · median, whisker min–max",
            info.started, info.cpus, info.load_average, info.cloudmig_build
        ))
    )
}

/// What happened to a tool none of whose repetitions passed, in a few words: the rate an
/// unfinished drain reached, else the first reason given.
fn status_words(outcomes: &[Outcome], section: Section, tool: Tool) -> String {
    if let Some(partial) = unfinished_median(outcomes, section, tool, "partial_txn_per_s") {
        return format!(
            "did not finish: {:.0} txn/s drained until the timeout (median)",
            partial.median
        );
    }
    let reason = outcomes
        .iter()
        .filter(|o| o.section == section && o.tool == tool)
        .map(|o| o.status.reason())
        .find(|r| !r.is_empty())
        .unwrap_or("failed");
    let reason = reason
        .replace("switchover: ERROR: ", "")
        .replace(" (SQLSTATE 55000)", "");
    let first = crate::bench::first_lines(&reason, 1);
    let mut words: String = first.chars().take(72).collect();
    if first.chars().count() > 72 {
        words.push('…');
    }
    words
}

/// `text` safe inside a Markdown table cell.
fn md_cell(text: &str) -> String {
    text.replace('|', "\\|")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(section: Section, tool: Tool, rep: u32, metric: &str, v: f64) -> Outcome {
        let mut o = Outcome::new(section, tool, rep, 1);
        o.set(metric, v);
        o
    }

    #[test]
    fn ratios_use_medians_of_passed_outcomes_only() {
        let mut failed = outcome(Section::Apply, Tool::Native, 3, "txn_per_s", 1.0);
        failed.status = Status::Failed("x".into());
        let outcomes = vec![
            outcome(Section::Apply, Tool::Cloudmig, 1, "txn_per_s", 100.0),
            outcome(Section::Apply, Tool::Cloudmig, 2, "txn_per_s", 300.0),
            outcome(Section::Apply, Tool::Native, 1, "txn_per_s", 1000.0),
            outcome(Section::Apply, Tool::Native, 2, "txn_per_s", 1000.0),
            failed,
        ];
        let s = spreads(&outcomes, Section::Apply, "txn_per_s");
        assert_eq!(s[&Tool::Cloudmig].unwrap().median, 200.0);
        assert_eq!(ratio(&s, Tool::Native), "0.20×");
        assert_eq!(passed(&outcomes, Section::Apply, Tool::Native), "2/3");
        let info = RunInfo {
            started: "now".into(),
            load_average: "1.0".into(),
            cpus: 2,
            postgres: "15".into(),
            cloudmig_build: "abc".into(),
            command: "make bench".into(),
            options: json!({}),
            database_bytes: BTreeMap::new(),
        };
        let md = markdown(&info, &outcomes);
        assert!(
            md.contains("| cloudmig | – | – | 200 (100–300) | 1× |"),
            "{md}"
        );
        assert!(md.contains("native subscription rep 3: **failed**"), "{md}");
        let (back, again) = from_json(&json(&info, &outcomes)).unwrap();
        assert_eq!(markdown(&back, &again), md);
        let svg = svg(&info, &outcomes);
        assert!(
            svg.starts_with("<svg") && svg.contains("200 txn/s"),
            "{svg}"
        );
    }

    #[test]
    fn each_link_has_its_tables_and_the_copy_its_ratio_to_direct() {
        let over = |link: Link, tool: Tool, seconds: f64| {
            let mut o = outcome(Section::Copy, tool, 1, "seconds", seconds);
            o.link = link;
            o
        };
        let outcomes = vec![
            over(Link::Direct, Tool::Cloudmig, 10.0),
            over(Link::Direct, Tool::PgDumpPipe, 20.0),
            {
                let mut o = over(Link::Ms30Gbit1, Tool::Cloudmig, 12.5);
                o.set("link_connections", 3.0);
                o.set("link_exchanges", 700.0);
                o
            },
            over(Link::Ms30Mbit100, Tool::PgDumpPipe, 40.0),
        ];
        let info = RunInfo {
            started: "now".into(),
            load_average: "1.0".into(),
            cpus: 2,
            postgres: "15".into(),
            cloudmig_build: "abc".into(),
            command: "make bench".into(),
            options: json!({}),
            database_bytes: BTreeMap::new(),
        };
        let md = markdown(&info, &outcomes);
        assert!(md.contains("## Over link 30ms-1gbit"), "{md}");
        assert!(
            md.contains("| cloudmig | 10.0 | 12.5 | 0.80 | 3, 700 | – | – | –, – |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| pg_dump -Fc \\| pg_restore | 20.0 | – | – | –, – | 40.0 | 0.50 | –, – |"
            ),
            "{md}"
        );
        let (back, again) = from_json(&json(&info, &outcomes)).unwrap();
        assert_eq!(markdown(&back, &again), md);
        assert!(svg(&info, &outcomes).contains("link 30ms-100mbit"));
    }
}
