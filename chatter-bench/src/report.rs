//! Medians, ratios, the Markdown table and the SVG bar chart.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::harness::Layout;
use crate::workload::{System, Workload, ALL, SYSTEMS};

/// One measurement, as the child reports it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub ops_per_s: f64,
    pub mb_per_s: f64,
    pub p50_ns: f64,
    pub p99_ns: f64,
    pub peak_rss: f64,
    pub rss_per_conn: f64,
    /// The slowest stream's items over the fair share (`stream-fanout`; NaN otherwise).
    pub min_share: f64,
    /// Process CPU time (both ends) per item in the measured phase, in ns (stream
    /// workloads; NaN otherwise).
    pub cpu_ns_per_op: f64,
}

impl Sample {
    pub fn line(&self) -> String {
        format!(
            "RESULT {} {} {} {} {} {} {} {}",
            self.ops_per_s,
            self.mb_per_s,
            self.p50_ns,
            self.p99_ns,
            self.peak_rss,
            self.rss_per_conn,
            self.min_share,
            self.cpu_ns_per_op
        )
    }

    pub fn parse(line: &str) -> Option<Sample> {
        let mut f = line
            .strip_prefix("RESULT ")?
            .split(' ')
            .map(str::parse::<f64>);
        Some(Sample {
            ops_per_s: f.next()?.ok()?,
            mb_per_s: f.next()?.ok()?,
            p50_ns: f.next()?.ok()?,
            p99_ns: f.next()?.ok()?,
            peak_rss: f.next()?.ok()?,
            rss_per_conn: f.next()?.ok()?,
            min_share: f.next()?.ok()?,
            cpu_ns_per_op: f.next()?.ok()?,
        })
    }

    /// The headline figure of `w` in the unit of [`Workload::metric`].
    pub fn value(&self, w: Workload) -> f64 {
        match w {
            Workload::Latency => self.p50_ns / 1e3,
            Workload::Payload
            | Workload::TlsPayload
            | Workload::StreamBytes
            | Workload::StreamFanout => self.mb_per_s,
            Workload::Idle => self.rss_per_conn / 1e3,
            Workload::Connect => self.ops_per_s,
            _ => self.ops_per_s / 1e3,
        }
    }

    pub fn describe(&self, w: Workload) -> String {
        let (unit, _) = w.metric();
        match w {
            Workload::Idle => format!("{:.1} {unit}", self.value(w)),
            Workload::Connect => format!(
                "{:.0} {unit}, p50 {:.1} µs, p99 {:.1} µs per connection",
                self.value(w),
                self.p50_ns / 1e3,
                self.p99_ns / 1e3
            ),
            Workload::Signals => format!(
                "{:.0} {unit}, peak RSS {:.1} MB",
                self.value(w),
                self.peak_rss / 1e6
            ),
            Workload::StreamItems | Workload::StreamBytes | Workload::StreamFanout => {
                let mut d = format!(
                    "{:.0} kitems/s, {:.1} MB/s, CPU {:.0} ns/item, peak RSS {:.1} MB",
                    self.ops_per_s / 1e3,
                    self.mb_per_s,
                    self.cpu_ns_per_op,
                    self.peak_rss / 1e6
                );
                if !self.min_share.is_nan() {
                    let _ = write!(
                        d,
                        ", slowest stream {:.2} of its fair share",
                        self.min_share
                    );
                }
                d
            }
            _ => format!(
                "{:.1} {unit}, {:.0} kcalls/s, p50 {:.1} µs, p99 {:.1} µs, peak RSS {:.1} MB",
                self.value(w),
                self.ops_per_s / 1e3,
                self.p50_ns / 1e3,
                self.p99_ns / 1e3,
                self.peak_rss / 1e6
            ),
        }
    }
}

type Key = (&'static str, &'static str, &'static str);

/// Every sample, by layout, workload and system.
#[derive(Default)]
pub struct Results {
    samples: BTreeMap<Key, Vec<Sample>>,
}

/// The median of `v` (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl Results {
    pub fn add(&mut self, layout: Layout, w: Workload, s: System, sample: Sample) {
        self.samples
            .entry((layout.name(), w.name(), s.name()))
            .or_default()
            .push(sample);
    }

    fn get(&self, layout: Layout, w: Workload, s: System) -> &[Sample] {
        self.samples
            .get(&(layout.name(), w.name(), s.name()))
            .map_or(&[], Vec::as_slice)
    }

    /// The median of a field over the runs (NaN when nothing ran).
    fn med(&self, l: Layout, w: Workload, s: System, f: impl Fn(&Sample) -> f64) -> f64 {
        median(self.get(l, w, s).iter().map(f).collect())
    }

    /// The median headline figure.
    pub fn value(&self, l: Layout, w: Workload, s: System) -> f64 {
        self.med(l, w, s, |x| x.value(w))
    }

    /// `s` relative to `base` as the issue states targets: value ratio (chatter/raw).
    pub fn ratio(&self, l: Layout, w: Workload, s: System, base: System) -> f64 {
        self.value(l, w, s) / self.value(l, w, base)
    }

    fn has(&self, l: Layout, w: Workload) -> bool {
        SYSTEMS.iter().any(|&s| !self.get(l, w, s).is_empty())
    }
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn fmt_ratio(r: f64) -> String {
    if r.is_nan() || r.is_infinite() {
        "–".into()
    } else {
        format!("{r:.2}x")
    }
}

/// Whether `ratio` (to raw) meets the target of `w`.
fn meets(w: Workload, ratio: f64) -> Option<bool> {
    if ratio.is_nan() || ratio.is_infinite() {
        return None;
    }
    let (_, higher_better) = w.metric();
    Some(if higher_better {
        ratio >= w.target()
    } else {
        ratio <= w.target()
    })
}

fn verdict(w: Workload, ratio: f64) -> &'static str {
    match meets(w, ratio) {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "–",
    }
}

/// The whole report as Markdown: summary per layout, then the details of every run.
pub fn markdown(
    r: &Results,
    layouts: &[Layout],
    systems: &[System],
    runs: usize,
    command: &str,
) -> String {
    let mut md = String::new();
    let has = |s: System| systems.contains(&s);
    let _ = writeln!(
        md,
        "Medians of {runs} run(s), each system run alternately; ratios are chatter/raw and \
         chatter/tarpc of the medians.\n\nCommand: `{command}`\n"
    );
    for &l in layouts {
        let _ = writeln!(md, "### Layout `{}`\n", l.name());
        let _ = writeln!(
            md,
            "| workload | metric | raw | tarpc | chatter-core | chatter-rpc | tarpc/raw | core/raw | rpc/raw | core/tarpc | rpc/tarpc | target (to raw) | core | rpc |"
        );
        let _ = writeln!(
            md,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"
        );
        for w in ALL {
            if !r.has(l, w) {
                continue;
            }
            let (unit, higher) = w.metric();
            let v = |s: System| {
                if has(s) {
                    fmt_value(r.value(l, w, s))
                } else {
                    "–".into()
                }
            };
            let rat = |a: System, b: System| fmt_ratio(r.ratio(l, w, a, b));
            let target = format!("{} {:.2}x", if higher { "≥" } else { "≤" }, w.target());
            let raw_name = if matches!(w, Workload::TlsPipelined | Workload::TlsPayload) {
                " (raw = TLS echo)"
            } else {
                ""
            };
            let _ = writeln!(
                md,
                "| {}{raw_name} | {unit} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {target} | {} | {} |",
                w.name(),
                v(System::Raw),
                v(System::Tarpc),
                v(System::Core),
                v(System::Rpc),
                rat(System::Tarpc, System::Raw),
                rat(System::Core, System::Raw),
                rat(System::Rpc, System::Raw),
                rat(System::Core, System::Tarpc),
                rat(System::Rpc, System::Tarpc),
                verdict(w, r.ratio(l, w, System::Core, System::Raw)),
                verdict(w, r.ratio(l, w, System::Rpc, System::Raw)),
            );
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "### Details (medians; latency of every call of the measured phase; peak RSS is the \
         whole process, both ends)\n"
    );
    let _ = writeln!(
        md,
        "| layout | workload | system | kcalls/s or kmsgs/s | MB/s | p50 µs | p99 µs | peak RSS MB | KB/conn | runs (headline) |"
    );
    let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|---:|---:|---|");
    for &l in layouts {
        for w in ALL {
            for &s in systems {
                let samples = r.get(l, w, s);
                if samples.is_empty() {
                    continue;
                }
                let m = |f: fn(&Sample) -> f64| r.med(l, w, s, f);
                let opt = |v: f64, show: bool| if show { fmt_value(v) } else { "–".into() };
                let calls = !matches!(w, Workload::Signals | Workload::Idle) && !w.is_stream();
                let all: Vec<String> = samples.iter().map(|x| fmt_value(x.value(w))).collect();
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    l.name(),
                    w.name(),
                    s.name(),
                    opt(m(|x| x.ops_per_s) / 1e3, w != Workload::Idle),
                    opt(
                        m(|x| x.mb_per_s),
                        matches!(w, Workload::Payload | Workload::TlsPayload) || w.is_stream()
                    ),
                    opt(m(|x| x.p50_ns) / 1e3, calls),
                    opt(m(|x| x.p99_ns) / 1e3, calls),
                    opt(m(|x| x.peak_rss) / 1e6, w != Workload::Idle),
                    opt(m(|x| x.rss_per_conn) / 1e3, w == Workload::Idle),
                    all.join(", "),
                );
            }
        }
    }
    stream_cpu(&mut md, r, layouts);
    fairness(&mut md, r, layouts, systems);
    md
}

/// The stream workloads' CPU cost: process CPU time (both ends) per item and per GB of
/// payload, medians, and chatter-rpc's over raw's. On a busy host wall-clock rates swing
/// with other processes; CPU time per byte hardly does.
fn stream_cpu(md: &mut String, r: &Results, layouts: &[Layout]) {
    let streams: Vec<Workload> = ALL.into_iter().filter(|w| w.is_stream()).collect();
    if !layouts
        .iter()
        .any(|&l| streams.iter().any(|&w| r.has(l, w)))
    {
        return;
    }
    let _ = writeln!(
        md,
        "\n### Streams: CPU time (process CPU, both ends, over the measured phase; medians)\n"
    );
    let _ = writeln!(
        md,
        "| layout | workload | raw ns/item | rpc ns/item | raw CPU ms/GB | rpc CPU ms/GB | rpc/raw CPU |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|");
    for &l in layouts {
        for &w in &streams {
            if !r.has(l, w) {
                continue;
            }
            let ns = |s: System| r.med(l, w, s, |x| x.cpu_ns_per_op);
            let per_gb = |s: System| {
                let size = r.med(l, w, s, |x| x.mb_per_s * 1e6 / x.ops_per_s);
                ns(s) / size * 1e3
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                l.name(),
                w.name(),
                fmt_value(ns(System::Raw)),
                fmt_value(ns(System::Rpc)),
                fmt_value(per_gb(System::Raw)),
                fmt_value(per_gb(System::Rpc)),
                fmt_ratio(ns(System::Rpc) / ns(System::Raw)),
            );
        }
    }
}

/// The stream-fanout table: the slowest stream's share of the fair share (issue 16: no
/// stream below half of it), for the systems that multiplex streams.
fn fairness(md: &mut String, r: &Results, layouts: &[Layout], systems: &[System]) {
    let w = Workload::StreamFanout;
    if !layouts.iter().any(|&l| r.has(l, w)) {
        return;
    }
    let _ = writeln!(
        md,
        "\n### Stream fairness ({}: {} streams on one connection; slowest stream's items / \
         (all items / streams), over the measured phase)\n",
        w.name(),
        crate::workload::FANOUT_STREAMS
    );
    let _ = writeln!(
        md,
        "| layout | system | slowest share (median) | runs | target | verdict |"
    );
    let _ = writeln!(md, "|---|---|---:|---|---|---|");
    for &l in layouts {
        for &s in systems {
            let samples = r.get(l, w, s);
            if samples.is_empty() || samples.iter().all(|x| x.min_share.is_nan()) {
                continue;
            }
            let share = r.med(l, w, s, |x| x.min_share);
            let all: Vec<String> = samples
                .iter()
                .map(|x| format!("{:.2}", x.min_share))
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} | {share:.2} | {} | ≥ 0.50 | {} |",
                l.name(),
                s.name(),
                all.join(", "),
                if share >= 0.5 { "met" } else { "**missed**" }
            );
        }
    }
}

/// A horizontal bar chart of each system's performance relative to raw (1.0 = raw): the
/// throughput ratio, or raw/system for latency and memory where less is better, so that
/// longer is always better and the target is 0.8 everywhere.
pub fn svg(r: &Results, layouts: &[Layout], systems: &[System]) -> String {
    let shown: Vec<System> = systems
        .iter()
        .copied()
        .filter(|&s| s != System::Raw)
        .collect();
    let colors = |s: System| match s {
        System::Tarpc => "#9e9e9e",
        System::Core => "#4a90d9",
        System::Rpc => "#e8743b",
        System::Raw => "#333333",
    };
    let mut groups = Vec::new();
    for &l in layouts {
        for w in ALL {
            if r.has(l, w) {
                groups.push((l, w));
            }
        }
    }
    let bar_h = 12.0;
    let group_h = bar_h * shown.len() as f64 + 14.0;
    let left = 190.0;
    let width = 820.0;
    let plot_w = width - left - 60.0;
    let max = 1.5;
    let top = 56.0;
    let height = top + group_h * groups.len() as f64 + 50.0;
    let x = |v: f64| left + plot_w * (v.clamp(0.0, max) / max);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="20" font-size="14" font-weight="bold">chatter vs raw framed echo (1.0 = raw, longer is better)</text>"#,
        left - 170.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="36" fill="#555">throughput: system/raw; latency p50 and idle memory: raw/system. Dashed: target 0.8 (1.25x for latency and memory)</text>"##,
        left - 170.0
    );
    // Legend.
    for (i, &sys) in shown.iter().enumerate() {
        let lx = left + i as f64 * 120.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="42" width="10" height="10" fill="{}"/><text x="{}" y="51">{}</text>"#,
            colors(sys),
            lx + 14.0,
            sys.name()
        );
    }
    // Grid.
    let bottom = top + group_h * groups.len() as f64;
    for tick in [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5] {
        let tx = x(tick);
        let _ = writeln!(
            s,
            r##"<line x1="{tx}" y1="{top}" x2="{tx}" y2="{bottom}" stroke="{}" stroke-width="1"/><text x="{tx}" y="{}" text-anchor="middle" fill="#555">{tick}</text>"##,
            if tick == 1.0 { "#333" } else { "#e0e0e0" },
            bottom + 14.0
        );
    }
    let tx = x(0.8);
    let _ = writeln!(
        s,
        r##"<line x1="{tx}" y1="{top}" x2="{tx}" y2="{bottom}" stroke="#d62728" stroke-width="1.5" stroke-dasharray="5,3"/>"##
    );
    for (gi, &(l, w)) in groups.iter().enumerate() {
        let gy = top + gi as f64 * group_h;
        let (_, higher) = w.metric();
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{} · {}</text>"#,
            left - 8.0,
            gy + 7.0 + bar_h * shown.len() as f64 / 2.0,
            w.name(),
            l.name()
        );
        for (i, &sys) in shown.iter().enumerate() {
            let ratio = r.ratio(l, w, sys, System::Raw);
            if ratio.is_nan() || ratio.is_infinite() || ratio <= 0.0 {
                continue;
            }
            let perf = if higher { ratio } else { 1.0 / ratio };
            let by = gy + 4.0 + i as f64 * bar_h;
            let _ = writeln!(
                s,
                r##"<rect x="{left}" y="{by}" width="{:.1}" height="{}" fill="{}"/><text x="{:.1}" y="{}" fill="#222">{perf:.2}</text>"##,
                x(perf) - left,
                bar_h - 2.0,
                colors(sys),
                x(perf) + 3.0,
                by + bar_h - 3.0
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
