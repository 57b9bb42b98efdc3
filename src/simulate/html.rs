//! `report.html`: the report as one self-contained page — inline CSS and SVG drawn here, no
//! script and no CDN, so it opens anywhere, offline, and can be attached to an issue.
//!
//! Plots: throughput over time (acked and sent per second), connected devices over time, ack
//! latency percentiles over time, the ack latency histogram, and — when they ran — twin
//! updates, method calls and C2D deliveries per second; then the counts, latency tables (twin,
//! method and C2D round trips among them), the connect storm, errors, memory and the scenario.

use std::fmt::Write as _;

use super::report::Report;
use super::stats::Summary;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 260.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 36.0;

/// Text made safe for HTML content and attribute values.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A step of 1, 2 or 5 × 10ⁿ giving about `ticks` intervals up to `max`.
fn nice_step(max: f64, ticks: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / ticks;
    let magnitude = 10f64.powf(raw.log10().floor());
    let m = raw / magnitude;
    let nice = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

fn number(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

struct Series<'a> {
    name: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
}

/// Axes, grid and one polyline per series; x is seconds into the run.
fn line_chart(title: &str, unit: &str, series: &[Series<'_>]) -> String {
    let x_max = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).fold(1.0, f64::max);
    let y_top = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0, f64::max);
    let y_step = nice_step(y_top.max(1e-9) * 1.05, 5.0);
    let y_max = (y_top / y_step).ceil().max(1.0) * y_step;
    let x_step = nice_step(x_max, 8.0);
    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let x = |v: f64| LEFT + v / x_max * pw;
    let y = |v: f64| TOP + ph - v / y_max * ph;
    let mut svg = open_svg(title);
    let mut tick = 0.0;
    while tick <= y_max + y_step * 0.01 {
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{py:.1}" y2="{py:.1}" class="grid"/><text x="{}" y="{:.1}" class="ylab">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y(tick) + 4.0,
            number(tick),
            py = y(tick),
        );
        tick += y_step;
    }
    let mut tick = 0.0;
    while tick <= x_max {
        let _ = write!(
            svg,
            r##"<text x="{:.1}" y="{}" class="xlab">{}s</text>"##,
            x(tick),
            HEIGHT - BOTTOM + 16.0,
            number(tick)
        );
        tick += x_step;
    }
    let _ = write!(
        svg,
        r##"<text x="12" y="{}" class="unit" transform="rotate(-90 12 {})">{}</text>"##,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        esc(unit)
    );
    for (i, s) in series.iter().enumerate() {
        if !s.points.is_empty() {
            let path: Vec<String> = s.points.iter().map(|(px, py)| format!("{:.1},{:.1}", x(*px), y(*py))).collect();
            let _ = write!(
                svg,
                r##"<polyline points="{}" fill="none" stroke="{}" stroke-width="1.8"/>"##,
                path.join(" "),
                s.color
            );
        }
        let lx = WIDTH - RIGHT - 150.0 * (series.len() - i) as f64;
        let _ = write!(
            svg,
            r##"<rect x="{lx:.0}" y="8" width="12" height="4" fill="{}"/><text x="{:.0}" y="14" class="legend">{}</text>"##,
            s.color,
            lx + 16.0,
            esc(s.name)
        );
    }
    svg.push_str("</svg>");
    svg
}

fn open_svg(title: &str) -> String {
    format!(
        r##"<svg viewBox="0 0 {WIDTH} {HEIGHT}" xmlns="http://www.w3.org/2000/svg" role="img"><title>{t}</title><text x="{LEFT}" y="14" class="title">{t}</text><rect x="{LEFT}" y="{TOP}" width="{}" height="{}" class="frame"/>"##,
        WIDTH - LEFT - RIGHT,
        HEIGHT - TOP - BOTTOM,
        t = esc(title)
    )
}

/// Bars of the ack latency histogram, log-spaced buckets labelled by their upper bound.
fn histogram_chart(report: &Report) -> String {
    let buckets = &report.latency.ack_histogram;
    let mut svg = open_svg("Ack latency histogram (PUBLISH → PUBACK)");
    if buckets.is_empty() {
        svg.push_str(r##"<text x="380" y="140" class="xlab">no QoS 1 acks in this run</text></svg>"##);
        return svg;
    }
    let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let top = buckets.iter().map(|b| b.count).max().unwrap_or(1).max(1) as f64;
    let y_step = nice_step(top * 1.05, 5.0);
    let y_max = (top / y_step).ceil().max(1.0) * y_step;
    let width = pw / buckets.len() as f64;
    let label_every = (buckets.len() / 10).max(1);
    let mut tick = 0.0;
    while tick <= y_max + y_step * 0.01 {
        let py = TOP + ph - tick / y_max * ph;
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{py:.1}" y2="{py:.1}" class="grid"/><text x="{}" y="{:.1}" class="ylab">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            py + 4.0,
            number(tick)
        );
        tick += y_step;
    }
    for (i, b) in buckets.iter().enumerate() {
        let h = b.count as f64 / y_max * ph;
        let bx = LEFT + i as f64 * width;
        let _ = write!(
            svg,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#4e79a7"><title>≤ {} ms: {}</title></rect>"##,
            bx + 1.0,
            TOP + ph - h,
            (width - 2.0).max(1.0),
            number(b.le_ms),
            b.count
        );
        if i % label_every == 0 {
            let _ = write!(
                svg,
                r##"<text x="{:.1}" y="{}" class="xlab">{}</text>"##,
                bx + width / 2.0,
                HEIGHT - BOTTOM + 16.0,
                number(b.le_ms)
            );
        }
    }
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" class="xlab">ms (upper bound of each bar)</text></svg>"##,
        WIDTH / 2.0,
        HEIGHT - 4.0
    );
    svg
}

fn latency_rows(out: &mut String, name: &str, s: &Option<Summary>) {
    if let Some(s) = s {
        let _ = write!(
            out,
            "<tr><td>{name}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td></tr>",
            s.count, s.min_ms, s.mean_ms, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
        );
    }
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:820px;color:#222}\
h1{font-size:20px}h2{font-size:16px;margin-top:28px}table{border-collapse:collapse;margin:8px 0}\
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}\
svg{width:100%;height:auto;margin:8px 0}.frame{fill:none;stroke:#bbb}.grid{stroke:#eee}\
.ylab{font-size:11px;text-anchor:end;fill:#555}.xlab{font-size:11px;text-anchor:middle;fill:#555}\
.unit{font-size:11px;text-anchor:middle;fill:#555}.title{font-size:13px;font-weight:600}.legend{font-size:11px}\
pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px}.err{color:#b00}";

/// The whole page.
pub fn render(report: &Report) -> String {
    let t = &report.timeline;
    let series = |f: fn(&super::timeline::Sample) -> Option<f64>| -> Vec<(f64, f64)> {
        t.iter().filter_map(|s| f(s).map(|v| (s.t_s, v))).collect()
    };
    let c = &report.counts.totals;
    let mut page = String::with_capacity(64 * 1024);
    let _ = write!(
        page,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>iothubd simulate — {target}</title>\
         <style>{STYLE}</style></head><body><h1>iothubd simulate — {devices} devices against {target}{host}</h1>\
         <p>Started {started}, sending for {sending:.1} s{interrupted}. Mode {mode}{tls}, shard {shard}.</p>",
        target = esc(&report.target),
        devices = report.shard.devices,
        host = report.hub_host.as_deref().map(|h| format!(" ({})", esc(h))).unwrap_or_default(),
        started = esc(&report.started_at),
        sending = report.sending_s,
        interrupted = if report.interrupted { " (interrupted)" } else { "" },
        mode = esc(report.scenario["mode"].as_str().unwrap_or("")),
        tls = if report.scenario["tls"] == true { " over TLS" } else { "" },
        shard = esc(report.scenario["shard"].as_str().unwrap_or("1/1")),
    );
    page.push_str(&line_chart(
        "Telemetry throughput",
        "messages / s",
        &[
            Series { name: "acked / s", color: "#4e79a7", points: series(|s| Some(s.acked_per_s)) },
            Series { name: "sent / s", color: "#f28e2b", points: series(|s| Some(s.sent_per_s)) },
            Series { name: "errors / s", color: "#e15759", points: series(|s| Some(s.errors_per_s)) },
        ],
    ));
    page.push_str(&line_chart(
        "Connected devices",
        "devices",
        &[Series { name: "connected", color: "#59a14f", points: series(|s| Some(s.online as f64)) }],
    ));
    page.push_str(&line_chart(
        "Ack latency over time (per second)",
        "ms",
        &[
            Series { name: "p50", color: "#4e79a7", points: series(|s| s.ack_p50_ms) },
            Series { name: "p99", color: "#e15759", points: series(|s| s.ack_p99_ms) },
        ],
    ));
    page.push_str(&histogram_chart(report));
    let ops = &report.operations;
    let mut op_series = Vec::new();
    if ops.twin.is_some() {
        op_series.push(Series {
            name: "twin updates / s",
            color: "#76b7b2",
            points: series(|s| Some(s.twin_acked_per_s)),
        });
    }
    if ops.methods.is_some() {
        op_series.push(Series {
            name: "method calls / s",
            color: "#b07aa1",
            points: series(|s| Some(s.methods_per_s)),
        });
    }
    if ops.c2d.is_some() {
        op_series.push(Series {
            name: "C2D delivered / s",
            color: "#edc948",
            points: series(|s| Some(s.c2d_delivered_per_s)),
        });
    }
    if !op_series.is_empty() {
        page.push_str(&line_chart("Device and service operations", "operations / s", &op_series));
    }

    let _ = write!(
        page,
        "<h2>Throughput</h2><table><tr><th>mean / s</th><th>steady / s</th><th>peak / s</th><th>sent / s</th></tr>\
         <tr><td>{:.0}</td><td>{}</td><td>{:.0}</td><td>{:.0}</td></tr></table>",
        report.throughput.mean_per_s,
        report.throughput.steady_per_s.map(|s| format!("{s:.0}")).unwrap_or_else(|| "-".into()),
        report.throughput.peak_per_s,
        report.throughput.sent_per_s,
    );
    page.push_str(
        "<h2>Latency (ms)</h2><table><tr><th></th><th>count</th><th>min</th><th>mean</th><th>p50</th><th>p90</th>\
         <th>p99</th><th>p99.9</th><th>max</th></tr>",
    );
    latency_rows(&mut page, "telemetry ack", &report.latency.ack);
    latency_rows(&mut page, "connect", &report.latency.connect);
    latency_rows(&mut page, "twin PATCH", &report.latency.twin);
    latency_rows(&mut page, "direct method (service)", &report.latency.method);
    latency_rows(&mut page, "C2D send → receive", &report.latency.c2d);
    page.push_str("</table>");
    if let Some(storm) = &report.connect_storm {
        let _ = write!(
            page,
            "<p>Connect storm: {} devices' first connections in {:.3} s, first CONNECT to last CONNACK: \
             <b>{:.0}</b> connects/s.</p>",
            storm.devices, storm.window_s, storm.per_s
        );
    }
    page.push_str("<h2>Counts</h2><table>");
    let rows: [(&str, u64); 21] = [
        ("connect attempts", c.connect_attempts),
        ("connects (CONNACK 0)", c.connects),
        ("peak online", c.peak_online),
        ("online at the end", c.online),
        ("connections dropped", c.disconnects),
        ("churn disconnects", c.churn_disconnects),
        ("telemetry sent", c.telemetry_sent),
        ("telemetry acked", c.telemetry_acked),
        ("telemetry unacked", report.counts.telemetry_unacked),
        ("telemetry skipped", c.telemetry_skipped),
        ("twin PATCH sent", c.twin_sent),
        ("twin PATCH answered 2xx", c.twin_acked),
        ("methods answered", c.methods_answered),
        ("C2D received", c.c2d_received),
        ("service: method calls", c.methods_called),
        ("service: method calls answered 200", c.methods_succeeded),
        ("service: C2D sent", c.c2d_sent),
        ("service: C2D accepted", c.c2d_accepted),
        ("service: C2D delivered", c.c2d_delivered),
        ("service: skipped", c.service_skipped),
        ("errors", c.errors),
    ];
    for (name, value) in rows {
        let _ = write!(page, "<tr><td>{name}</td><td>{value}</td></tr>");
    }
    page.push_str("</table>");
    if !report.errors.is_empty() {
        page.push_str("<h2 class=\"err\">Errors</h2><table>");
        for (kind, n) in &report.errors {
            let _ = write!(page, "<tr><td>{}</td><td>{n}</td></tr>", esc(kind));
        }
        for (code, n) in &report.connack_refused {
            let _ = write!(page, "<tr><td>CONNACK code {}</td><td>{n}</td></tr>", esc(code));
        }
        page.push_str("</table><pre>");
        for sample in &report.error_samples {
            let _ = writeln!(page, "{}", esc(sample));
        }
        page.push_str("</pre>");
    }
    let m = &report.memory;
    let _ = write!(
        page,
        "<h2>Simulator memory</h2><p>RSS {} KiB before the devices, {} KiB with {} connected: <b>{}</b> KiB per \
         connected device (kernel socket buffers not included). Open-file limit {}; local addresses: {}.</p>",
        m.rss_before_kib,
        m.rss_connected_kib,
        m.devices_at_sample,
        m.per_device_kib.map(|k| format!("{k:.2}")).unwrap_or_else(|| "-".into()),
        report.limits.open_files,
        if report.limits.source_addrs.is_empty() {
            "chosen by the kernel".to_owned()
        } else {
            esc(&report.limits.source_addrs.join(", "))
        },
    );
    let scenario = serde_json::to_string_pretty(&report.scenario).unwrap_or_default();
    let _ = write!(page, "<h2>Scenario</h2><pre>{}</pre></body></html>", esc(&scenario));
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(nice_step(100.0, 5.0), 20.0);
        assert_eq!(nice_step(9_000.0, 5.0), 2_000.0);
        assert_eq!(nice_step(0.3, 5.0), 0.1);
        assert_eq!(nice_step(0.0, 5.0), 1.0);
    }

    #[test]
    fn charts_escape_text_and_draw_every_series() {
        let svg = line_chart(
            "a <b>",
            "ms",
            &[
                Series { name: "x&y", color: "#000", points: vec![(1.0, 2.0), (2.0, 3.0)] },
                Series { name: "empty", color: "#111", points: vec![] },
            ],
        );
        assert!(svg.contains("a &lt;b&gt;") && svg.contains("x&amp;y"));
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.ends_with("</svg>"));
    }
}
