//! The validator's public, read-only web site (`[web] listen`): competitions with their
//! state and schedule, leaderboards with verdicts and validator agreement, per-job pages
//! with every submission's losses, checks and timings, miner pages with hardware, verified
//! speed and history, plots drawn as inline SVG on the server, and live updates as jobs
//! finish (server-sent events). No assets to fetch; no script but the live-update hook.
//!
//! What it shows is chosen field by field from the viewer's view (never a serialised
//! record): no test split or synthetic records, no canaries, no nonces, no endpoints, and
//! no commitment or artifact before its job is scored.

use crate::validator::{Shared, Validator};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;
use tunenet_engine::{JobPhase, JobState, SubmissionState};
use tunenet_types::{JobKind, Leaderboard, Outcome, Verdict};

/// `[web]` in a validator's config.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// Where to serve the site (host:port).
    pub listen: String,
}

/// One submission as the site shows it.
#[derive(Clone, Debug)]
pub struct SubmissionView {
    /// The miner.
    pub miner: String,
    /// waiting, revealed, scored or failed.
    pub state: &'static str,
    /// Mean loss on the hidden test split.
    pub test_loss: Option<f64>,
    /// Mean loss on the synthetic set.
    pub synthetic_loss: Option<f64>,
    /// Its quality in the job, once scored.
    pub quality: Option<f64>,
    /// Why it got the penalty.
    pub penalty: Option<String>,
    /// The integrity checks.
    pub verdicts: Vec<Verdict>,
    /// When its commitment arrived, relative to the deadline (ms before it), once scored.
    pub committed_before_deadline_ms: Option<i64>,
    /// The artifact's id, once its job is scored.
    pub artifact: Option<String>,
}

/// One job as the site shows it.
#[derive(Clone, Debug)]
pub struct JobView {
    /// The job.
    pub id: String,
    /// Its phase in words.
    pub phase: String,
    /// Whether it is scored.
    pub done: bool,
    /// Its deadline, once running.
    pub deadline_ms: Option<u64>,
    /// Its time budget.
    pub budget_ms: u64,
    /// Records in its training shard.
    pub shard_records: u64,
    /// Its submissions.
    pub submissions: Vec<SubmissionView>,
}

/// One competition as the site shows it.
#[derive(Clone, Debug)]
pub struct CompetitionView {
    /// Its id.
    pub id: String,
    /// fine-tune or inference.
    pub kind: JobKind,
    /// Where it stands.
    pub state: String,
    /// Its leaderboard, with the validators' agreement.
    pub leaderboard: Leaderboard,
    /// Its jobs in order.
    pub jobs: Vec<JobView>,
}

fn phase_words(p: &JobPhase) -> (String, bool, Option<u64>) {
    match p {
        JobPhase::Pending => ("pending".into(), false, None),
        JobPhase::Offering { .. } => ("offering".into(), false, None),
        JobPhase::Running { deadline } => ("training".into(), false, Some(*deadline)),
        JobPhase::Revealing { deadline, .. } => ("evaluating".into(), false, Some(*deadline)),
        JobPhase::Done { note } => (
            match note {
                Some(n) => format!("done: {n}"),
                None => "scored".into(),
            },
            true,
            None,
        ),
    }
}

/// The public view of one job.
pub fn job_view(j: &JobState) -> JobView {
    let (phase, done, deadline) = phase_words(&j.phase);
    let deadline = deadline.or_else(|| j.slots.values().next().map(|s| s.assignment.deadline_ms));
    let submissions = j
        .slots
        .iter()
        .map(|(m, s)| {
            let score = j.scores.iter().find(|x| &x.miner == m);
            let (state, test_loss, synthetic_loss, verdicts, artifact) = match &s.submission {
                SubmissionState::Waiting => ("waiting", None, None, vec![], None),
                SubmissionState::Uploaded { .. } => ("revealed", None, None, vec![], None),
                SubmissionState::Evaluated {
                    test_loss,
                    synthetic_loss,
                    verdicts,
                    artifact,
                    ..
                } => (
                    if done { "scored" } else { "evaluated" },
                    Some(*test_loss),
                    *synthetic_loss,
                    verdicts.clone(),
                    Some(artifact.to_string()),
                ),
                SubmissionState::Failed {
                    verdicts, artifact, ..
                } => (
                    "failed",
                    None,
                    None,
                    verdicts.clone(),
                    artifact.map(|a| a.to_string()),
                ),
            };
            SubmissionView {
                miner: m.0.clone(),
                state,
                test_loss: test_loss.filter(|_| done),
                synthetic_loss: synthetic_loss.filter(|_| done),
                quality: score.map(|s| s.quality),
                penalty: score.and_then(|s| s.penalty_reason.clone()),
                verdicts: if done { verdicts } else { vec![] },
                committed_before_deadline_ms: s
                    .receipt
                    .as_ref()
                    .filter(|_| done)
                    .map(|r| s.assignment.deadline_ms as i64 - r.received_at_ms as i64),
                artifact: artifact.filter(|_| done),
            }
        })
        .collect();
    JobView {
        id: j.plan.job_id.to_string(),
        phase,
        done,
        deadline_ms: deadline,
        budget_ms: j.plan.time_budget_ms,
        shard_records: j.plan.shard_records,
        submissions,
    }
}

fn competition_view(v: &Validator, i: usize) -> CompetitionView {
    let c = &v.comps[i];
    CompetitionView {
        id: c.id().to_string(),
        kind: c.record.config.kind,
        state: if c.engine.is_finished() {
            "finished".into()
        } else {
            c.record.state.to_string()
        },
        leaderboard: crate::quorum::leaderboard(v, i, false),
        jobs: c.engine.jobs().map(job_view).collect(),
    }
}

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn num(x: Option<f64>) -> String {
    x.map_or("–".into(), |v| format!("{v:.4}"))
}

fn short(peer: &str) -> String {
    if peer.len() > 16 {
        format!("{}…{}", &peer[..8], &peer[peer.len() - 6..])
    } else {
        peer.to_string()
    }
}

fn miner_link(peer: &str) -> String {
    format!(
        "<a class=\"miner\" href=\"/miners/{}\" title=\"{}\">{}</a>",
        esc(peer),
        esc(peer),
        esc(&short(peer))
    )
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}\
header{background:#1b1f24;color:#fff;padding:10px 24px}header a{color:#fff;text-decoration:none;font-weight:600}\
main{padding:16px 24px;max-width:1200px}table{border-collapse:collapse;background:#fff;margin:8px 0 20px;width:100%}\
th,td{padding:5px 8px;border-bottom:1px solid #e3e6ea;text-align:left;vertical-align:top}th{background:#eef0f3}\
td.n{text-align:right;font-variant-numeric:tabular-nums}.pass{color:#1a7f37}.flag{color:#9a6700}.fail{color:#cf222e}\
.plots{display:flex;flex-wrap:wrap;gap:16px}.plot{background:#fff;border:1px solid #e3e6ea;padding:8px}\
#feed{font-family:ui-monospace,monospace;font-size:12px;background:#fff;border:1px solid #e3e6ea;max-height:180px;overflow:auto;padding:6px}";

const SCRIPT: &str = "(function(){if(!window.EventSource)return;var es=new EventSource('/events');\
var feed=document.getElementById('feed');es.onmessage=function(e){var d=JSON.parse(e.data);\
if(feed){var li=document.createElement('div');li.textContent='['+d.competition+'] '+d.message;feed.prepend(li);}\
if(/scored|finished/.test(d.message)){fetch(location.href).then(function(r){return r.text()}).then(function(t){\
var doc=new DOMParser().parseFromString(t,'text/html');var a=doc.getElementById('live'),b=document.getElementById('live');\
if(a&&b)b.innerHTML=a.innerHTML;});}};})();";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\"><title>{} · tunenet</title><style>{STYLE}</style></head><body><header><a href=\"/\">tunenet</a> · {}</header><main>{body}<h3>Live</h3><div id=\"feed\"></div></main><script>{SCRIPT}</script></body></html>",
        esc(title),
        esc(title)
    )
}

const COLOURS: [&str; 8] = [
    "#0969da", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7b83", "#57606a",
];

/// A line chart: one polyline per series over (x, y) points, axes labelled.
pub fn line_chart(title: &str, series: &[(String, Vec<(f64, f64)>)], x: &str, y: &str) -> String {
    let (w, h, l, b) = (460.0, 260.0, 56.0, 36.0);
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().copied()).collect();
    let mut s = format!(
        "<figure class=\"plot\"><figcaption>{}</figcaption><svg role=\"img\" aria-label=\"{}\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">",
        esc(title),
        esc(title)
    );
    if pts.is_empty() {
        s.push_str("<text x=\"20\" y=\"40\">nothing scored yet</text></svg></figure>");
        return s;
    }
    let fold = |f: fn(f64, f64) -> f64, init: f64, pick: fn(&(f64, f64)) -> f64| {
        pts.iter().map(pick).fold(init, f)
    };
    let (x0, x1) = (
        fold(f64::min, f64::MAX, |p| p.0),
        fold(f64::max, f64::MIN, |p| p.0),
    );
    let (y0, y1) = (
        fold(f64::min, f64::MAX, |p| p.1),
        fold(f64::max, f64::MIN, |p| p.1),
    );
    let (xr, yr) = ((x1 - x0).max(1e-9), (y1 - y0).max(1e-9));
    let px = |v: f64| l + (v - x0) / xr * (w - l - 10.0);
    let py = |v: f64| (h - b) - (v - y0) / yr * (h - b - 10.0);
    let _ = write!(
        s,
        "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/><line x1=\"{l}\" y1=\"10\" x2=\"{l}\" y2=\"{}\" stroke=\"#888\"/>",
        h - b,
        w - 10.0,
        h - b,
        h - b
    );
    let _ = write!(
        s,
        "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{}</text><text x=\"12\" y=\"{}\" font-size=\"11\" transform=\"rotate(-90 12 {})\" text-anchor=\"middle\">{}</text>",
        (w + l) / 2.0,
        h - 6.0,
        esc(x),
        h / 2.0,
        h / 2.0,
        esc(y)
    );
    for (v, anchor) in [(y0, h - b), (y1, 10.0)] {
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\">{v:.3}</text>",
            l - 4.0,
            anchor + 4.0
        );
    }
    for (k, (name, p)) in series.iter().enumerate() {
        let c = COLOURS[k % COLOURS.len()];
        let line: Vec<String> = p
            .iter()
            .map(|(a, b)| format!("{:.1},{:.1}", px(*a), py(*b)))
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"><title>{}</title></polyline>",
            line.join(" "),
            esc(name)
        );
        for (a, b) in p {
            let _ = write!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{c}\"><title>{}: {b:.4}</title></circle>",
                px(*a),
                py(*b),
                esc(name)
            );
        }
        if k < 8 {
            let _ = write!(
                s,
                "<text x=\"{}\" y=\"{}\" font-size=\"10\" fill=\"{c}\">{}</text>",
                w - 150.0,
                20.0 + 12.0 * k as f64,
                esc(&short(name))
            );
        }
    }
    s.push_str("</svg></figure>");
    s
}

/// A bar chart of labelled values.
pub fn bar_chart(title: &str, bars: &[(String, f64)], unit: &str) -> String {
    let (w, h, l, b) = (460.0, 260.0, 40.0, 40.0);
    let mut s = format!(
        "<figure class=\"plot\"><figcaption>{}</figcaption><svg role=\"img\" aria-label=\"{}\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">",
        esc(title),
        esc(title)
    );
    let top = bars.iter().map(|x| x.1).fold(0.0, f64::max).max(1e-9);
    let bw = (w - l - 10.0) / bars.len().max(1) as f64;
    for (k, (label, v)) in bars.iter().enumerate() {
        let bh = v / top * (h - b - 16.0);
        let x = l + k as f64 * bw;
        let _ = write!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"{}\"><title>{}: {v:.3} {}</title></rect><text x=\"{:.1}\" y=\"{}\" font-size=\"9\" text-anchor=\"middle\">{}</text>",
            x + 2.0,
            h - b - bh,
            (bw - 4.0).max(1.0),
            COLOURS[k % COLOURS.len()],
            esc(label),
            esc(unit),
            x + bw / 2.0,
            h - b + 12.0,
            esc(&short(label))
        );
    }
    let _ = write!(
        s,
        "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/><text x=\"4\" y=\"16\" font-size=\"10\">{top:.3} {}</text></svg></figure>",
        h - b,
        w - 10.0,
        h - b,
        esc(unit)
    );
    s
}

fn verdict_cell(vs: &[Verdict]) -> String {
    if vs.is_empty() {
        return "–".into();
    }
    vs.iter()
        .map(|v| {
            let (class, word) = match v.outcome {
                Outcome::Pass => ("pass", "pass"),
                Outcome::Flag => ("flag", "flag"),
                Outcome::Fail => ("fail", "fail"),
            };
            let figures = match (v.value, v.threshold) {
                (Some(a), Some(t)) => format!(" ({a:.4} vs {t:.4})"),
                (Some(a), None) => format!(" ({a:.4})"),
                _ => String::new(),
            };
            format!(
                "<span class=\"{class}\" title=\"{}\">{}: {word}{figures}</span>",
                esc(&v.reason),
                esc(&v.check)
            )
        })
        .collect::<Vec<_>>()
        .join("<br>")
}

/// The home page: every competition with its state and schedule.
pub fn render_index(comps: &[CompetitionView]) -> String {
    let mut b = String::from(
        "<h1>Competitions</h1><div id=\"live\"><table id=\"competitions\"><tr><th>competition</th><th>kind</th><th>state</th><th>jobs scored</th><th>miners</th><th>next deadline</th><th>leader</th></tr>",
    );
    for c in comps {
        let next = c
            .jobs
            .iter()
            .filter(|j| !j.done)
            .find_map(|j| j.deadline_ms)
            .map(|d| format!("<time data-ms=\"{d}\">{}</time>", fmt_ms(d)))
            .unwrap_or_else(|| "–".into());
        let leader = c
            .leaderboard
            .rows
            .first()
            .map(|r| miner_link(&r.miner.0))
            .unwrap_or_else(|| "–".into());
        let _ = write!(
            b,
            "<tr><td><a href=\"/competitions/{id}\">{id}</a></td><td>{}</td><td>{}</td><td class=\"n\">{} of {}</td><td class=\"n\">{}</td><td>{next}</td><td>{leader}</td></tr>",
            if c.kind == JobKind::Inference {
                "inference"
            } else {
                "fine-tune"
            },
            esc(&c.state),
            c.leaderboard.jobs_done,
            c.leaderboard.jobs_total,
            c.leaderboard.rows.len(),
            id = esc(&c.id),
        );
    }
    b.push_str("</table></div>");
    page("competitions", &b)
}

fn fmt_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (d, s) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = d as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

/// A competition's page: leaderboard with verdicts and agreement, plots, and its jobs.
pub fn render_competition(c: &CompetitionView) -> String {
    let inference = c.kind == JobKind::Inference;
    let lb = &c.leaderboard;
    let mut b = format!(
        "<h1>{}</h1><p>{} · {} · {} of {} jobs scored</p><div id=\"live\"><h2>Leaderboard</h2><table id=\"leaderboard\"><tr><th>rank</th><th>miner</th><th>jobs</th><th>{}</th><th>quality</th><th>standing</th><th>validators agreeing</th><th>verdicts</th></tr>",
        esc(&c.id),
        if inference { "inference" } else { "fine-tune" },
        esc(&c.state),
        lb.jobs_done,
        lb.jobs_total,
        if inference { "items/s" } else { "mean loss" }
    );
    for r in &lb.rows {
        let figure = if inference {
            r.mean_loss.map(|l| (-l).exp())
        } else {
            r.mean_loss
        };
        let agree = match &r.quorum {
            Some(q) if q.validators > 1 => {
                let out: Vec<String> = q
                    .outliers
                    .iter()
                    .map(|o| {
                        format!(
                            "<br><span class=\"flag\">outlier {}: standing {:.4}</span>",
                            esc(&short(&o.validator.0)),
                            o.standing
                        )
                    })
                    .collect();
                format!("{} of {}{}", q.agreeing, q.validators, out.join(""))
            }
            _ => "this validator only".into(),
        };
        let verdicts = if r.verdicts.is_empty() {
            "<span class=\"pass\">all passed</span>".to_string()
        } else {
            r.verdicts
                .iter()
                .map(|v| format!("<span class=\"fail\">{}</span>", esc(v)))
                .collect::<Vec<_>>()
                .join("<br>")
        };
        let _ = write!(
            b,
            "<tr><td class=\"n\">{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{:.4}</td><td class=\"n\">{:.4}</td><td>{agree}</td><td>{verdicts}</td></tr>",
            r.rank,
            miner_link(&r.miner.0),
            r.jobs,
            num(figure),
            r.mean_quality,
            r.standing
        );
    }
    b.push_str("</table><h2>Plots</h2><div class=\"plots\">");
    // Loss per job and miner; standing over time; the distribution of qualities.
    let mut loss: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut qualities: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut all_q = Vec::new();
    for (k, j) in c.jobs.iter().enumerate().filter(|(_, j)| j.done) {
        for s in &j.submissions {
            if let Some(l) = s.test_loss {
                loss.entry(s.miner.clone()).or_default().push((k as f64, l));
            }
            if let Some(q) = s.quality {
                qualities
                    .entry(s.miner.clone())
                    .or_default()
                    .push((k as f64, q));
                all_q.push(q);
            }
        }
    }
    let standing: Vec<(String, Vec<(f64, f64)>)> = qualities
        .into_iter()
        .map(|(m, qs)| {
            // The geometric mean of the qualities so far (a zero keeps it at zero).
            let mut log_sum = 0.0;
            let pts = qs
                .iter()
                .enumerate()
                .map(|(n, (x, q))| {
                    log_sum += q.max(1e-12).ln();
                    (*x, (log_sum / (n + 1) as f64).exp())
                })
                .collect();
            (m, pts)
        })
        .collect();
    if inference {
        let bars: Vec<(String, f64)> = lb
            .rows
            .iter()
            .filter_map(|r| r.mean_loss.map(|l| (r.miner.0.clone(), (-l).exp())))
            .collect();
        b.push_str(&bar_chart("inference items/s by miner", &bars, "items/s"));
    } else {
        let series: Vec<(String, Vec<(f64, f64)>)> = loss.into_iter().collect();
        b.push_str(&line_chart(
            "test loss per job",
            &series,
            "job",
            "mean test loss",
        ));
    }
    b.push_str(&line_chart(
        "standing over time",
        &standing,
        "job",
        "standing",
    ));
    let mut bins = [0usize; 8];
    for q in &all_q {
        bins[((q / 0.25) as usize).min(7)] += 1;
    }
    let hist: Vec<(String, f64)> = bins
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let lo = i as f64 * 0.25;
            let label = if i == 7 {
                format!("≥{lo:.2}")
            } else {
                format!("{lo:.2}")
            };
            (label, *n as f64)
        })
        .collect();
    b.push_str(&bar_chart("quality distribution", &hist, "submissions"));
    b.push_str("</div><h2>Jobs</h2><table id=\"jobs\"><tr><th>job</th><th>phase</th><th>budget</th><th>shard records</th><th>submissions</th><th>deadline</th></tr>");
    for j in &c.jobs {
        let _ = write!(
            b,
            "<tr><td><a href=\"/competitions/{}/jobs/{}\">{}</a></td><td>{}</td><td class=\"n\">{} s</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            esc(&c.id),
            esc(&j.id),
            esc(&j.id),
            esc(&j.phase),
            j.budget_ms / 1000,
            j.shard_records,
            j.submissions.len(),
            j.deadline_ms.map(fmt_ms).unwrap_or_else(|| "–".into())
        );
    }
    b.push_str("</table></div>");
    page(&c.id, &b)
}

/// A job's page: every submission's losses, checks and timing.
pub fn render_job(competition: &str, j: &JobView) -> String {
    let mut b = format!(
        "<h1>{}</h1><p><a href=\"/competitions/{c}\">{c}</a> · {} · budget {} s · {} shard records{}</p><div id=\"live\"><table id=\"submissions\"><tr><th>miner</th><th>state</th><th>test loss</th><th>synthetic loss</th><th>quality</th><th>committed before deadline</th><th>checks</th><th>penalty</th><th>artifact</th></tr>",
        esc(&j.id),
        esc(&j.phase),
        j.budget_ms / 1000,
        j.shard_records,
        j.deadline_ms
            .map(|d| format!(" · deadline {}", fmt_ms(d)))
            .unwrap_or_default(),
        c = esc(competition),
    );
    for s in &j.submissions {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            miner_link(&s.miner),
            s.state,
            num(s.test_loss),
            num(s.synthetic_loss),
            num(s.quality),
            s.committed_before_deadline_ms
                .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
                .unwrap_or_else(|| "–".into()),
            verdict_cell(&s.verdicts),
            s.penalty.as_deref().map(esc).unwrap_or_else(|| "–".into()),
            s.artifact
                .as_deref()
                .map(|a| format!(
                    "<code title=\"{}\">{}…</code>",
                    esc(a),
                    esc(&a[..12.min(a.len())])
                ))
                .unwrap_or_else(|| "–".into())
        );
    }
    if !j.done {
        b.push_str(
            "</table><p>Losses, checks and artifacts are shown once the job is scored.</p></div>",
        );
    } else {
        b.push_str("</table></div>");
    }
    page(&j.id, &b)
}

/// One scored job of a miner: competition, job, loss, quality, penalty.
pub type HistoryRow = (String, String, Option<f64>, f64, Option<String>);

/// One miner's page: hardware, verified speed, and history.
pub fn render_miner(
    peer: &str,
    hardware: Option<&crate::hardware::HardwareRecord>,
    history: &[HistoryRow],
) -> String {
    let mut b = format!(
        "<h1>Miner</h1><p><code>{}</code></p><h2>Hardware</h2>",
        esc(peer)
    );
    match hardware {
        Some(h) => {
            let _ = write!(
                b,
                "<table id=\"hardware\"><tr><th>inventory</th><td>{}</td></tr><tr><th>verified speed</th><td>{:.2} TFLOPS</td></tr><tr><th>flags</th><td>{}</td></tr></table>",
                esc(&h.inventory.summary()),
                h.best_verified_tflops(),
                if h.flags.is_empty() {
                    "none".to_string()
                } else {
                    esc(&h.flags.join("; "))
                }
            );
        }
        None => b.push_str("<p>Not benchmarked by this validator.</p>"),
    }
    b.push_str("<div id=\"live\"><h2>History</h2><table id=\"history\"><tr><th>competition</th><th>job</th><th>loss</th><th>quality</th><th>penalty</th></tr>");
    for (c, j, loss, q, pen) in history {
        let _ = write!(
            b,
            "<tr><td><a href=\"/competitions/{c}\">{c}</a></td><td><a href=\"/competitions/{c}/jobs/{j}\">{j}</a></td><td class=\"n\">{}</td><td class=\"n\">{q:.4}</td><td>{}</td></tr>",
            num(*loss),
            pen.as_deref().map(esc).unwrap_or_else(|| "–".into()),
            c = esc(c),
            j = esc(j),
        );
    }
    let qs: Vec<(String, f64)> = history
        .iter()
        .map(|(_, j, _, q, _)| (j.clone(), *q))
        .collect();
    b.push_str("</table>");
    b.push_str(&bar_chart("quality per job", &qs, "quality"));
    b.push_str("</div>");
    page(&short(peer), &b)
}

/// What the handlers share: the validator loop, and the live-update streams allowed.
#[derive(Clone)]
struct Web {
    shared: Arc<Shared>,
    streams: Arc<tokio::sync::Semaphore>,
    /// Page requests per client address.
    pages: Arc<tunenet_p2p::RateBuckets<std::net::IpAddr>>,
}

/// Live-update streams open at once; more are refused (each holds a task and a queue).
pub const MAX_STREAMS: usize = 256;
/// Pages one client address may load per second, on average, and in a burst: each is a
/// pass over the validator's state on its loop.
pub const PAGES_PER_SEC: f64 = 10.0;
/// See [`PAGES_PER_SEC`].
pub const PAGE_BURST: u32 = 30;

/// The refusal of a client past its page rate, saying so (None: serve it).
fn refuse(w: &Web, from: std::net::SocketAddr) -> Option<Response> {
    if w.pages.allow(&from.ip()) {
        None
    } else {
        Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, "1")],
                format!(
                    "more than {PAGES_PER_SEC} pages a second from {}; slow down",
                    from.ip()
                ),
            )
                .into_response(),
        )
    }
}

impl std::ops::Deref for Web {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

fn html(s: String) -> Response {
    ([(header::CACHE_CONTROL, "no-store")], Html(s)).into_response()
}

fn not_found(what: String) -> Response {
    (
        StatusCode::NOT_FOUND,
        html(page("not found", &format!("<p>{}</p>", esc(&what)))),
    )
        .into_response()
}

async fn index(
    State(w): State<Web>,
    ConnectInfo(from): ConnectInfo<std::net::SocketAddr>,
) -> Response {
    if let Some(r) = refuse(&w, from) {
        return r;
    }
    match w
        .with(|v: &mut Validator| {
            Ok((0..v.comps.len())
                .map(|i| competition_view(v, i))
                .collect::<Vec<_>>())
        })
        .await
    {
        Ok(cs) => html(render_index(&cs)),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.message().to_string()).into_response(),
    }
}

async fn competition(
    State(w): State<Web>,
    ConnectInfo(from): ConnectInfo<std::net::SocketAddr>,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = refuse(&w, from) {
        return r;
    }
    let want = id.clone();
    let r = w
        .with(move |v: &mut Validator| {
            Ok(v.comps
                .iter()
                .position(|c| c.id() == want)
                .map(|i| competition_view(v, i)))
        })
        .await;
    match r {
        Ok(Some(c)) => html(render_competition(&c)),
        Ok(None) => not_found(format!("no competition `{id}` on this validator")),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.message().to_string()).into_response(),
    }
}

async fn job(
    State(w): State<Web>,
    ConnectInfo(from): ConnectInfo<std::net::SocketAddr>,
    Path((id, job)): Path<(String, String)>,
) -> Response {
    if let Some(r) = refuse(&w, from) {
        return r;
    }
    let (want, want_job) = (id.clone(), job.clone());
    let r = w
        .with(move |v: &mut Validator| {
            Ok(v.comps.iter().find(|c| c.id() == want).and_then(|c| {
                c.engine
                    .jobs()
                    .find(|j| j.plan.job_id.as_str() == want_job)
                    .map(job_view)
            }))
        })
        .await;
    match r {
        Ok(Some(j)) => html(render_job(&id, &j)),
        Ok(None) => not_found(format!("no job `{job}` in competition `{id}`")),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.message().to_string()).into_response(),
    }
}

async fn miner(
    State(w): State<Web>,
    ConnectInfo(from): ConnectInfo<std::net::SocketAddr>,
    Path(peer): Path<String>,
) -> Response {
    if let Some(r) = refuse(&w, from) {
        return r;
    }
    let want = peer.clone();
    let r = w
        .with(move |v: &mut Validator| {
            let hw = crate::hardware::records(v.store.as_ref())
                .into_iter()
                .find(|r| r.miner == want);
            let mut history = Vec::new();
            for c in &v.comps {
                for j in c.engine.jobs() {
                    if let Some(s) = j.scores.iter().find(|s| s.miner.0 == want) {
                        history.push((
                            c.id().to_string(),
                            j.plan.job_id.to_string(),
                            s.loss,
                            s.quality,
                            s.penalty_reason.clone(),
                        ));
                    }
                }
            }
            Ok((hw, history))
        })
        .await;
    match r {
        Ok((None, h)) if h.is_empty() => not_found(format!("no miner `{peer}` known here")),
        Ok((hw, h)) => html(render_miner(&peer, hw.as_ref(), &h)),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.message().to_string()).into_response(),
    }
}

async fn events(State(w): State<Web>) -> Response {
    let Ok(permit) = w.streams.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_STREAMS} live-update streams are open; try again later"),
        )
            .into_response();
    };
    let mut rx = w.events.subscribe();
    let stream = async_stream_events(move |tx| async move {
        let _permit = permit;
        loop {
            match rx.recv().await {
                Ok(e) => {
                    let data = serde_json::json!({
                        "at_ms": e.at_ms,
                        "competition": e.competition,
                        "job": e.job,
                        "message": e.message,
                    });
                    if tx
                        .send(Ok::<_, std::convert::Infallible>(
                            axum::response::sse::Event::default().data(data.to_string()),
                        ))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            }
        }
    });
    axum::response::sse::Sse::new(stream)
        .keep_alive(axum::response::sse::KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// A stream fed by `f` through a small channel.
fn async_stream_events<T: Send + 'static, F, Fut>(f: F) -> tokio_stream::wrappers::ReceiverStream<T>
where
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The site's routes.
pub(crate) fn router(shared: Arc<Shared>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/", get(index))
        .route("/competitions/{id}", get(competition))
        .route("/competitions/{id}/jobs/{job}", get(job))
        .route("/miners/{peer}", get(miner))
        .route("/events", get(events))
        .with_state(Web {
            shared,
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
            pages: Arc::new(
                tunenet_p2p::RateBuckets::new(PAGES_PER_SEC, PAGE_BURST)
                    .expect("a positive page rate"),
            ),
        })
}

/// Binds `cfg.listen` now (a port in use fails the start) and serves the site.
pub(crate) fn serve(cfg: &WebConfig, shared: Arc<Shared>) -> Result<(), crate::error::NodeError> {
    let err = |reason: String| crate::error::NodeError::Listen {
        addr: cfg.listen.clone(),
        reason,
    };
    let std_listener = std::net::TcpListener::bind(&cfg.listen).map_err(|e| err(e.to_string()))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| err(e.to_string()))?;
    let listener =
        tokio::net::TcpListener::from_std(std_listener).map_err(|e| err(e.to_string()))?;
    tracing::info!(listen = %cfg.listen, "public web site serving");
    let app = router(shared);
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the web site stopped");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunenet_types::{CompetitionId, LeaderboardRow, PeerIdStr};

    /// A competition of `jobs` scored jobs of `per_job` submissions each.
    pub(crate) fn synthetic(jobs: usize, per_job: usize) -> CompetitionView {
        let miner = |k: usize| format!("12D3KooW{k:044}");
        let jobs: Vec<JobView> = (0..jobs)
            .map(|j| JobView {
                id: format!("c-{j}"),
                phase: "scored".into(),
                done: true,
                deadline_ms: Some(1_800_000_000_000 + j as u64 * 60_000),
                budget_ms: 600_000,
                shard_records: 250,
                submissions: (0..per_job)
                    .map(|k| SubmissionView {
                        miner: miner(k),
                        state: "scored",
                        test_loss: Some(1.0 + k as f64 / per_job as f64),
                        synthetic_loss: Some(1.1 + k as f64 / per_job as f64),
                        quality: Some(1.5 - k as f64 / per_job as f64),
                        penalty: (k % 17 == 3).then(|| "failed <exact_duplicate>".into()),
                        verdicts: vec![Verdict {
                            check: "delta_norm".into(),
                            outcome: Outcome::Pass,
                            value: Some(0.5),
                            threshold: Some(10.0),
                            reason: "within bounds".into(),
                        }],
                        committed_before_deadline_ms: Some(4_000),
                        artifact: Some(format!("{k:064x}")),
                    })
                    .collect(),
            })
            .collect();
        CompetitionView {
            id: "c".into(),
            kind: JobKind::FineTune,
            state: "running".into(),
            leaderboard: Leaderboard {
                competition_id: CompetitionId::new("c").unwrap(),
                rows: (0..per_job)
                    .map(|k| LeaderboardRow {
                        rank: k as u32 + 1,
                        miner: PeerIdStr(miner(k)),
                        jobs: jobs.len() as u32,
                        mean_loss: Some(1.0 + k as f64 / per_job as f64),
                        mean_quality: 1.0,
                        standing: 1.0,
                        verdicts: vec![],
                        acc_norm: None,
                        seconds: None,
                        quorum: None,
                    })
                    .collect(),
                jobs_done: jobs.len() as u32,
                jobs_total: jobs.len() as u32,
                kind: JobKind::FineTune,
            },
            jobs,
        }
    }

    #[test]
    fn pages_show_every_submission_escaped_and_plot_what_was_scored() {
        let c = synthetic(4, 250);
        let page = render_competition(&c);
        assert_eq!(page.matches("class=\"miner\"").count(), 250);
        assert_eq!(page.matches("<svg").count(), 3);
        assert!(page.contains("standing over time") && page.contains("quality distribution"));
        let job = render_job("c", &c.jobs[0]);
        assert_eq!(job.matches("class=\"miner\"").count(), 250);
        assert!(job.contains("failed &lt;exact_duplicate&gt;"), "escaped");
        assert!(!job.contains("<exact_duplicate>"));
        assert!(job.contains("delta_norm: pass (0.5000 vs 10.0000)"));
        let index = render_index(std::slice::from_ref(&c));
        assert!(index.contains("4 of 4"), "{index}");
        assert!(job.contains("deadline 2027-01-15 08:00:00 UTC"), "{job}");
        // Before its job is scored, a submission shows no loss, check or artifact.
        let mut running = c.jobs[0].clone();
        running.done = false;
        assert!(render_job("c", &running).contains("shown once the job is scored"));
    }

    #[test]
    fn a_thousand_submissions_render_in_one_page() {
        // 4 jobs of 250: 1,000 submissions on the competition's plots and tables.
        let c = synthetic(4, 250);
        let t = std::time::Instant::now();
        let page = render_competition(&c);
        let secs = t.elapsed().as_secs_f64();
        assert!(page.len() > 10_000);
        eprintln!(
            "rendered 1,000 submissions ({} bytes) in {secs:.4} s",
            page.len()
        );
        let dir = std::env::var_os("TUNENET_WEB_PAGE_OUT");
        if let Some(d) = dir {
            std::fs::write(std::path::Path::new(&d).join("thousand.html"), &page).unwrap();
        }
    }
}
