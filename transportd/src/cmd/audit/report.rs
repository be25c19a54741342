//! `transportd audit report`: the evidence report as one self-contained HTML page, JSON
//! or CSV. The data is [`libtransport::audit::evidence_report`]'s; this file only renders
//! it. Every string put into the page is escaped (identities, dataset names and reasons
//! come from peers and files), and the page loads nothing: its Content-Security-Policy
//! forbids every fetch, and its charts are inline SVG drawn here.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use libtransport::audit::{
    EvidenceReport, NodeSection, NodeTrail, ReportFilter, WitnessCheck, evidence_report,
    read_receipts,
};
use libtransport::clock::{Clock, SystemClock};
use libtransport::policy::DataClass;

use super::when;
use crate::cli::{ClassArg, ReportFormat};

/// The arguments of `audit report`.
#[derive(Debug)]
pub(crate) struct ReportArgs<'a> {
    pub(crate) dirs: &'a [PathBuf],
    pub(crate) from: Option<&'a str>,
    pub(crate) to: Option<&'a str>,
    pub(crate) dataset: Option<&'a str>,
    pub(crate) class: Option<ClassArg>,
    pub(crate) out: Option<&'a Path>,
    pub(crate) format: ReportFormat,
    pub(crate) bundle: Option<&'a Path>,
    pub(crate) witness: &'a [PathBuf],
}

/// A report was written, but a trail in it failed verification (exit 65).
#[derive(Debug, thiserror::Error)]
#[error("{failed} of {total} trails failed verification (the report marks them FAILED)")]
pub(crate) struct TrailsFailed {
    failed: usize,
    total: usize,
}

/// `audit report DIR...`.
pub(crate) fn report_cmd(a: &ReportArgs<'_>) -> anyhow::Result<()> {
    let now = SystemClock.now();
    for d in a.dirs {
        if !d.is_dir() {
            bail!("{} is not a directory holding an audit trail", d.display());
        }
    }
    let filter = ReportFilter {
        from: a.from.map(|s| when(s, now)).transpose().context("--from")?,
        to: a.to.map(|s| when(s, now)).transpose().context("--to")?,
        dataset: a.dataset.map(str::to_owned),
        class: a.class.map(|c| match c {
            ClassArg::Phi => DataClass::Phi,
            ClassArg::Deidentified => DataClass::Deidentified,
            ClassArg::Public => DataClass::Public,
        }),
    };
    let bundle = a
        .bundle
        .map(|b| {
            let text =
                std::fs::read_to_string(b).with_context(|| format!("reading {}", b.display()))?;
            certs::TrustBundle::from_pem(&text).with_context(|| format!("{}", b.display()))
        })
        .transpose()?;
    let mut receipts = Vec::new();
    for f in a.witness {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        receipts.extend(read_receipts(&text).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?);
    }
    let trails: Vec<NodeTrail> = a
        .dirs
        .iter()
        .map(|dir| NodeTrail {
            dir: dir.clone(),
            receipts: (!a.witness.is_empty()).then(|| receipts_for(dir, &receipts)),
        })
        .collect();
    let report = evidence_report(&trails, bundle.as_ref(), &filter, now);
    let text = match a.format {
        ReportFormat::Html => html(&report),
        ReportFormat::Json => serde_json::to_string_pretty(&report)? + "\n",
        ReportFormat::Csv => csv(&report),
    };
    match a.out {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "{}: {} trails, {}",
                path.display(),
                report.nodes.len(),
                if report.all_verified {
                    "all verified"
                } else {
                    "some FAILED verification"
                }
            );
        }
        None => print!("{text}"),
    }
    let failed = report.nodes.iter().filter(|n| !node_ok(n)).count();
    if failed > 0 {
        return Err(TrailsFailed {
            failed,
            total: report.nodes.len(),
        }
        .into());
    }
    Ok(())
}

/// The receipts naming the node that signed the trail in `dir`.
fn receipts_for(
    dir: &Path,
    all: &[libtransport::audit::Receipt],
) -> Vec<libtransport::audit::Receipt> {
    let signer = libtransport::audit::query(
        dir,
        &libtransport::audit::Query {
            event: Some("checkpoint".into()),
            ..Default::default()
        },
    )
    .ok()
    .and_then(|c| {
        c.last()
            .and_then(|c| c["signer"].as_str().map(str::to_owned))
    });
    all.iter()
        .filter(|r| signer.as_deref() == Some(r.node.as_str()))
        .cloned()
        .collect()
}

fn node_ok(n: &NodeSection) -> bool {
    n.verified && !matches!(n.witness, WitnessCheck::Failed { .. })
}

/// The report as one HTML page.
fn html(r: &EvidenceReport) -> String {
    let mut h = String::new();
    let failed: Vec<&NodeSection> = r.nodes.iter().filter(|n| !node_ok(n)).collect();
    h.push_str(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
         style-src 'unsafe-inline'; img-src data:\">\n\
         <title>Audit evidence report</title>\n<style>",
    );
    h.push_str(STYLE);
    h.push_str("</style>\n</head>\n<body>\n<h1>Audit evidence report</h1>\n");
    let _ = writeln!(
        h,
        "<p class=\"meta\">Generated {} from {} trail{}. Period: {} to {}.{}{}</p>",
        esc(&r.generated_at),
        r.nodes.len(),
        if r.nodes.len() == 1 { "" } else { "s" },
        esc(r.from.as_deref().unwrap_or("the first record")),
        esc(r.to.as_deref().unwrap_or("the last record")),
        r.dataset
            .as_deref()
            .map(|d| format!(" Dataset: {}.", esc(d)))
            .unwrap_or_default(),
        r.class
            .map(|c| format!(" Data class: {c}."))
            .unwrap_or_default(),
    );
    if failed.is_empty() {
        h.push_str(
            "<div id=\"overall\" class=\"banner ok\">All trails VERIFIED: every record's hash \
             link, sequence number and checkpoint signature checks out.</div>\n",
        );
    } else {
        let _ = write!(
            h,
            "<div id=\"overall\" class=\"banner failed\">Verification FAILED for {} of {} \
             trails. The records of a failed trail are shown below but cannot be trusted.<ul>",
            failed.len(),
            r.nodes.len()
        );
        for n in &failed {
            let _ = write!(
                h,
                "<li><b>{}</b>: {}</li>",
                esc(&node_name(n)),
                esc(&failure_text(n))
            );
        }
        h.push_str("</ul></div>\n");
    }

    h.push_str("<h2>Trail verification</h2>\n<table id=\"verification\">\n<thead><tr><th>node</th><th>directory</th><th>status</th><th>detail</th><th>witness</th></tr></thead>\n<tbody>\n");
    for n in &r.nodes {
        let (class, status) = if n.verified {
            ("status verified", "verified")
        } else {
            ("status failed", "FAILED")
        };
        let detail = match &n.verify {
            Some(v) => format!(
                "{} records in {} segments, {} signed checkpoints{}{}",
                v.records,
                v.segments,
                v.checkpoints,
                if v.signers_verified {
                    ", signers checked against the bundle"
                } else {
                    ", signers not checked against a bundle"
                },
                if v.unsealed > 0 {
                    format!(
                        "; {} records after the latest checkpoint not sealed yet",
                        v.unsealed
                    )
                } else {
                    String::new()
                }
            ),
            None => format!(
                "{}; {} records read{}",
                n.failure.as_deref().unwrap_or("not verified"),
                n.records,
                if n.unreadable > 0 {
                    format!(", {} lines unreadable", n.unreadable)
                } else {
                    String::new()
                }
            ),
        };
        let (wclass, witness) = match &n.witness {
            WitnessCheck::NotChecked => ("", "no receipts given".to_owned()),
            WitnessCheck::Matched(w) => (
                "verified",
                format!(
                    "matches: {} witnessed checkpoints, the latest seq {}",
                    w.witnessed, w.last_witnessed
                ),
            ),
            WitnessCheck::Failed { reason } => ("failed", format!("FAILED: {reason}")),
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"{class}\">{status}</td><td>{}</td><td class=\"{wclass}\">{}</td></tr>",
            esc(n.node.as_deref().unwrap_or("(no signed checkpoint)")),
            esc(&n.dir),
            esc(&detail),
            esc(&witness)
        );
    }
    h.push_str("</tbody>\n</table>\n");

    h.push_str("<h2>Accesses</h2>\n<p>Authorization decisions by identity, dataset, data class and action.</p>\n");
    table(
        &mut h,
        "accesses",
        &[
            "identity", "dataset", "class", "action", "allowed", "denied", "first", "last", "nodes",
        ],
        r.accesses.iter().map(|a| {
            vec![
                a.identity.clone(),
                a.dataset.clone(),
                a.class.clone().unwrap_or_else(|| "-".into()),
                a.action.clone(),
                a.allowed.to_string(),
                a.denied.to_string(),
                a.first.clone(),
                a.last.clone(),
                a.nodes.join(", "),
            ]
        }),
    );
    if !r.timeline.is_empty() {
        let _ = writeln!(
            h,
            "<h3>Decisions over time</h3>\n<p>Per {}; allowed in blue, denied in red.</p>",
            width_words(r.bucket_secs)
        );
        timeline_svg(&mut h, r);
    }

    h.push_str("<h2>Refusals</h2>\n");
    table(
        &mut h,
        "refusals",
        &["time", "node", "event", "who", "what", "reason", "count"],
        r.refusals.iter().map(|f| {
            vec![
                f.time.clone(),
                f.node.clone(),
                f.event.clone(),
                f.who.clone(),
                f.what.clone(),
                f.reason.clone(),
                f.count.to_string(),
            ]
        }),
    );

    h.push_str("<h2>Identity events</h2>\n");
    table(
        &mut h,
        "identity",
        &["time", "node", "event", "identity", "serial", "detail"],
        r.identity_events.iter().map(|i| {
            vec![
                i.time.clone(),
                i.node.clone(),
                i.kind.clone(),
                i.id.clone(),
                i.serial.clone(),
                i.detail.clone(),
            ]
        }),
    );

    h.push_str("<h2>Emergency access</h2>\n<p>Break-glass grants: who gave them and why, who approved them, how often they were used, and how they ended.</p>\n");
    table(
        &mut h,
        "emergency",
        &[
            "granted",
            "node",
            "grant",
            "peer",
            "dataset",
            "actions",
            "reason",
            "by uid",
            "approved by uid",
            "expires",
            "uses",
            "ended",
        ],
        r.emergency.iter().map(|e| {
            let uid = |u: Option<u64>| u.map(|u| u.to_string()).unwrap_or_default();
            vec![
                e.granted_at.clone(),
                e.node.clone(),
                e.grant.clone(),
                e.peer.clone(),
                e.dataset.clone(),
                e.actions.join(", "),
                e.reason.clone(),
                uid(e.granted_by),
                uid(e.approved_by),
                e.expires_at.clone(),
                e.uses.to_string(),
                if e.ended.is_empty() {
                    "in force at the window's end".to_owned()
                } else {
                    format!("{} {}", e.ended, e.ended_at)
                },
            ]
        }),
    );

    h.push_str("<h2>Policy changes</h2>\n<table id=\"policy\">\n<thead><tr><th>time</th><th>node</th><th>source</th><th>digest</th><th>rules</th><th>changes</th></tr></thead>\n<tbody>\n");
    if r.policy_changes.is_empty() {
        h.push_str("<tr><td colspan=\"6\" class=\"none\">none</td></tr>\n");
    }
    for p in &r.policy_changes {
        let mut diff = String::new();
        if !p.lines_recorded {
            diff.push_str(
                "<i>the record holds no policy lines; only the digest shows a change</i>",
            );
        } else if p.diff.is_empty() {
            diff.push_str("<i>no change from the policy before</i>");
        } else {
            if !p.has_previous {
                diff.push_str("<i>first load in the trail</i>");
            }
            diff.push_str("<pre>");
            for l in &p.diff {
                let class = if l.starts_with('-') { "del" } else { "add" };
                let _ = writeln!(diff, "<span class=\"{class}\">{}</span>", esc(l));
            }
            diff.push_str("</pre>");
        }
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{diff}</td></tr>",
            esc(&p.time),
            esc(&p.node),
            esc(&p.source),
            esc(p.digest.get(..16).unwrap_or(&p.digest)),
            p.rules
        );
    }
    h.push_str("</tbody>\n</table>\n");

    h.push_str("<h2>Transfers by path</h2>\n");
    table(
        &mut h,
        "transfers",
        &["path", "direction", "transfers", "complete", "bytes"],
        r.transfers.iter().map(|t| {
            vec![
                t.path.clone(),
                t.direction.clone(),
                t.transfers.to_string(),
                t.complete.to_string(),
                format!("{} ({})", t.bytes, human_bytes(t.bytes)),
            ]
        }),
    );
    if !r.transfers.is_empty() {
        h.push_str("<h3>Bytes by path</h3>\n");
        bytes_svg(&mut h, r);
    }
    h.push_str(
        "<p class=\"meta\">Object names are left out of this report; \
         <code>transportd audit query</code> shows them.</p>\n</body>\n</html>\n",
    );
    h
}

/// A table with a header row; "none" when there are no rows.
fn table(h: &mut String, id: &str, head: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let _ = write!(h, "<table id=\"{id}\">\n<thead><tr>");
    for c in head {
        let _ = write!(h, "<th>{c}</th>");
    }
    h.push_str("</tr></thead>\n<tbody>\n");
    let mut any = false;
    for row in rows {
        any = true;
        h.push_str("<tr>");
        for c in row {
            let _ = write!(h, "<td>{}</td>", esc(&c));
        }
        h.push_str("</tr>\n");
    }
    if !any {
        let _ = writeln!(
            h,
            "<tr><td colspan=\"{}\" class=\"none\">none</td></tr>",
            head.len()
        );
    }
    h.push_str("</tbody>\n</table>\n");
}

/// Stacked bars of allowed and denied decisions per bucket.
fn timeline_svg(h: &mut String, r: &EvidenceReport) {
    let max = r
        .timeline
        .iter()
        .map(|b| b.allowed + b.denied)
        .max()
        .unwrap_or(0)
        .max(1);
    let bar = (CHART_WIDTH / r.timeline.len() as u64).clamp(4, 40);
    // Room for both end labels even with few bars.
    let width = (bar * r.timeline.len() as u64 + 60).max(480);
    let _ = write!(
        h,
        "<svg id=\"timeline\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{}\" role=\"img\" aria-label=\"decisions over time\">",
        CHART_HEIGHT + 40
    );
    let _ = write!(
        h,
        "<text x=\"0\" y=\"12\" class=\"axis\">{max}</text><text x=\"0\" y=\"{}\" class=\"axis\">0</text>",
        CHART_HEIGHT + 10
    );
    for (i, b) in r.timeline.iter().enumerate() {
        let x = 40 + i as u64 * bar;
        let allowed_h = b.allowed * CHART_HEIGHT / max;
        let denied_h = b.denied * CHART_HEIGHT / max;
        let base = CHART_HEIGHT + 10;
        let _ = write!(
            h,
            "<g><title>{}: {} allowed, {} denied</title>\
             <rect x=\"{x}\" y=\"{}\" width=\"{}\" height=\"{allowed_h}\" class=\"allow\"/>\
             <rect x=\"{x}\" y=\"{}\" width=\"{}\" height=\"{denied_h}\" class=\"deny\"/></g>",
            esc(&b.start),
            b.allowed,
            b.denied,
            base - allowed_h,
            bar.saturating_sub(1),
            base - allowed_h - denied_h,
            bar.saturating_sub(1),
        );
    }
    if let (Some(first), Some(last)) = (r.timeline.first(), r.timeline.last()) {
        let _ = write!(
            h,
            "<text x=\"40\" y=\"{}\" class=\"axis\">{}</text><text x=\"{}\" y=\"{}\" class=\"axis\" text-anchor=\"end\">{}</text>",
            CHART_HEIGHT + 30,
            esc(&first.start),
            width,
            CHART_HEIGHT + 30,
            esc(&last.start)
        );
    }
    h.push_str("</svg>\n");
}

/// Horizontal bars of bytes per path and direction.
fn bytes_svg(h: &mut String, r: &EvidenceReport) {
    let max = r
        .transfers
        .iter()
        .map(|t| t.bytes)
        .max()
        .unwrap_or(0)
        .max(1);
    let row = 24;
    let _ = write!(
        h,
        "<svg id=\"bytes\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" role=\"img\" aria-label=\"bytes by path\">",
        CHART_WIDTH + 260,
        r.transfers.len() as u64 * row + 8
    );
    for (i, t) in r.transfers.iter().enumerate() {
        let y = i as u64 * row + 4;
        let w = (u128::from(t.bytes) * u128::from(CHART_WIDTH) / u128::from(max)) as u64;
        let _ = write!(
            h,
            "<text x=\"0\" y=\"{}\" class=\"axis\">{} {}</text><rect x=\"90\" y=\"{y}\" width=\"{}\" height=\"16\" class=\"allow\"/><text x=\"{}\" y=\"{}\" class=\"axis\">{}</text>",
            y + 13,
            esc(&t.path),
            esc(&t.direction),
            w.max(1),
            96 + w,
            y + 13,
            human_bytes(t.bytes)
        );
    }
    h.push_str("</svg>\n");
}

/// Access rows as CSV, a header first.
fn csv(r: &EvidenceReport) -> String {
    let mut out = String::from("identity,dataset,class,action,allowed,denied,first,last,nodes\n");
    for a in &r.accesses {
        let cells = [
            a.identity.clone(),
            a.dataset.clone(),
            a.class.clone().unwrap_or_default(),
            a.action.clone(),
            a.allowed.to_string(),
            a.denied.to_string(),
            a.first.clone(),
            a.last.clone(),
            a.nodes.join(" "),
        ];
        let line: Vec<String> = cells.iter().map(|c| csv_cell(c)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

/// One CSV cell: quoted when it holds a comma, quote or line break; a leading `=`, `+`,
/// `-` or `@` is prefixed with `'` so a spreadsheet does not run it as a formula.
fn csv_cell(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// `s` safe inside HTML text and double-quoted attributes.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn node_name(n: &NodeSection) -> String {
    n.node.clone().unwrap_or_else(|| n.dir.clone())
}

fn failure_text(n: &NodeSection) -> String {
    match (&n.failure, &n.witness) {
        (Some(f), _) => f.clone(),
        (None, WitnessCheck::Failed { reason }) => format!("does not match its witness: {reason}"),
        _ => String::new(),
    }
}

fn width_words(secs: u64) -> String {
    match secs {
        s if s % 86_400 == 0 => format!("{} day(s)", s / 86_400),
        s if s % 3600 == 0 => format!("{} hour(s)", s / 3600),
        s => format!("{} minute(s)", s / 60),
    }
}

fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Chart plot area, pixels.
const CHART_WIDTH: u64 = 720;
const CHART_HEIGHT: u64 = 120;

const STYLE: &str = "
body { font-family: sans-serif; margin: 2em; color: #222; max-width: 1200px; }
h1 { margin-bottom: 0.2em; }
.meta { color: #555; }
.banner { padding: 0.8em 1em; border-radius: 4px; font-weight: bold; margin: 1em 0; }
.banner.ok { background: #e6f4ea; border: 2px solid #1e8e3e; color: #0d652d; }
.banner.failed { background: #fce8e6; border: 3px solid #d93025; color: #a50e0e; font-size: 1.2em; }
.banner.failed ul { font-weight: normal; font-size: 0.85em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f1f3f4; }
td.verified { color: #0d652d; font-weight: bold; }
td.failed { color: #fff; background: #d93025; font-weight: bold; }
td.none { color: #777; font-style: italic; }
pre { margin: 0.3em 0; white-space: pre-wrap; overflow-wrap: anywhere; }
.add { color: #0d652d; }
.del { color: #a50e0e; }
svg .allow { fill: #4285f4; }
svg .deny { fill: #d93025; }
svg .axis { font-size: 11px; fill: #555; }
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes_what_peers_and_files_supply() {
        assert_eq!(
            esc(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
    }

    #[test]
    fn a_reason_with_markup_reaches_the_page_escaped() {
        let r = EvidenceReport {
            refusals: vec![libtransport::audit::RefusalRow {
                node: "n".into(),
                time: "t".into(),
                event: "policy_refused".into(),
                who: String::new(),
                what: "p.toml".into(),
                reason: "<img src=x onerror=alert(1)>".into(),
                count: 1,
            }],
            ..EvidenceReport::default()
        };
        let page = html(&r);
        assert!(!page.contains("<img"));
        assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;"));
        assert!(page.contains("default-src 'none'"));
    }

    #[test]
    fn csv_cells_are_quoted_and_never_formulas() {
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_cell("=cmd()"), "'=cmd()");
        assert_eq!(csv_cell("plain"), "plain");
    }
}
