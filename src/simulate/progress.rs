//! The live view of a run on stderr: with a terminal, two indicatif lines redrawn every second
//! (connected devices as a bar; rates, totals, errors and ack percentiles, and the twin, method
//! and C2D rates with answered/sent when those run); without one (CI, a pipe), a plain line
//! every ten seconds; nothing with `--quiet`.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::stats::Snapshot;
use super::timeline::Sample;

/// Interval of the plain lines when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

enum View {
    Quiet,
    Plain { last: Mutex<Option<Instant>> },
    Live { multi: MultiProgress, online: ProgressBar, line: ProgressBar },
}

pub struct Progress {
    view: View,
}

fn style(template: &str) -> ProgressStyle {
    // The templates are constants; a bad one is a programming error caught by the tests.
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl Progress {
    pub fn new(enabled: bool, devices: u64) -> Self {
        let view = if !enabled {
            View::Quiet
        } else if !std::io::stderr().is_terminal() {
            View::Plain { last: Mutex::new(None) }
        } else {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
            let online = multi.add(ProgressBar::new(devices));
            online.set_style(
                style("{spinner:.green} {elapsed_precise:.dim} connected {pos:>7}/{len:7} {bar:32.cyan/blue} {msg}")
                    .progress_chars("█▉▊▋▌▍▎▏ "),
            );
            let line = multi.add(ProgressBar::new_spinner());
            line.set_style(style("  {msg}"));
            View::Live { multi, online, line }
        };
        Self { view }
    }

    /// A bar for provisioning `n` devices (hidden unless live).
    pub fn provisioning(&self, n: u64) -> ProgressBar {
        match &self.view {
            View::Live { multi, .. } => {
                let bar = multi.insert(0, ProgressBar::new(n));
                bar.set_style(style("  provisioning {pos:>7}/{len:7} {bar:32.yellow/blue} {per_sec}"));
                bar
            }
            _ => ProgressBar::hidden(),
        }
    }

    /// A line of its own above the live lines.
    pub fn note(&self, text: &str) {
        match &self.view {
            View::Quiet => {}
            View::Plain { .. } => eprintln!("simulate: {text}"),
            View::Live { multi, .. } => {
                let _ = multi.println(format!("simulate: {text}"));
            }
        }
    }

    pub fn update(&self, sample: &Sample, totals: &Snapshot) {
        match &self.view {
            View::Quiet => {}
            View::Plain { last } => {
                let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
                if last.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) {
                    *last = Some(Instant::now());
                    eprintln!(
                        "simulate: {:>5.0}s connected {:>7} | {}",
                        sample.t_s,
                        sample.online,
                        line(sample, totals)
                    );
                }
            }
            View::Live { online, line: text, .. } => {
                online.set_position(sample.online);
                online.set_message(format!("attempts {} · drops {}", totals.connect_attempts, totals.disconnects));
                text.set_message(line(sample, totals));
                online.tick();
            }
        }
    }

    pub fn finish(&self) {
        if let View::Live { online, line, .. } = &self.view {
            online.abandon();
            line.abandon();
        }
    }
}

fn line(sample: &Sample, t: &Snapshot) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    let mut text = format!(
        "{:>8.0} msg/s acked ({:.0} sent) · sent {} acked {} · errors {} · ack p50 {} p99 {} ms",
        sample.acked_per_s,
        sample.sent_per_s,
        t.telemetry_sent,
        t.telemetry_acked,
        t.errors,
        ms(sample.ack_p50_ms),
        ms(sample.ack_p99_ms),
    );
    if t.twin_sent > 0 {
        text.push_str(&format!(" · twin {:.0}/s ({}/{})", sample.twin_acked_per_s, t.twin_acked, t.twin_sent));
    }
    if t.methods_called > 0 {
        text.push_str(&format!(
            " · methods {:.0}/s ({}/{})",
            sample.methods_per_s, t.methods_succeeded, t.methods_called
        ));
    } else if t.methods_answered > 0 {
        text.push_str(&format!(" · methods {}", t.methods_answered));
    }
    if t.c2d_sent > 0 {
        text.push_str(&format!(" · c2d {:.0}/s ({}/{})", sample.c2d_delivered_per_s, t.c2d_delivered, t.c2d_sent));
    } else if t.c2d_received > 0 {
        text.push_str(&format!(" · c2d {}", t.c2d_received));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_valid() {
        for t in [
            "{spinner:.green} {elapsed_precise:.dim} connected {pos:>7}/{len:7} {bar:32.cyan/blue} {msg}",
            "  {msg}",
            "  provisioning {pos:>7}/{len:7} {bar:32.yellow/blue} {per_sec}",
        ] {
            assert!(ProgressStyle::with_template(t).is_ok(), "{t}");
        }
    }
}
