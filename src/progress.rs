//! Progress of long work (replays, evaluations, publishing, downloads, imports), one way for
//! every command.
//!
//! The rule, in four lines:
//! * stderr is a terminal and progress is enabled: an indicatif bar on stderr, nothing logged;
//! * otherwise (pods, CI, pipes, `-q`): no bar, and an `info` log line at most every
//!   [`LOG_INTERVAL`] plus one at the end, `{label}: {pos}/{len} ({pct}%), {rate}/s, eta {eta}`;
//! * [`Progress::inc`] is cheap enough for hot loops: an atomic add, and without a bar one
//!   clock read; a line is formatted only when one is due;
//! * [`with_bars_suspended`] hides the visible bars while a log line is written to the terminal.
//!
//! The bars share one process-wide indicatif [`MultiProgress`] (the one process-wide piece of
//! this module, like the logger: there is one stderr), so several bars stack instead of
//! overwriting each other, and log lines can be written between redraws.

use std::borrow::Cow;
use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Shortest time between two periodic log lines of one [`Progress`] without a bar.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How often a visible bar redraws on its own (elapsed time and spinners move between updates).
const TICK: Duration = Duration::from_millis(500);

/// `len` of a progress whose total is not known.
const UNKNOWN: u64 = u64::MAX;

/// The process-wide switch [`set_enabled`] turns: bars are drawn only while it is on.
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Bars currently in [`BARS`], so that [`with_bars_suspended`] costs nothing without any.
static VISIBLE: AtomicUsize = AtomicUsize::new(0);

/// The one stack of bars on stderr (created with the first bar).
static BARS: OnceLock<MultiProgress> = OnceLock::new();

/// Turns progress bars on or off for the whole process (`-q` turns them off). Off: no bars,
/// but the periodic log lines stay (they are `info` logs; the log filter decides about them).
/// Bars already drawn stay until their work ends.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Runs `f` (which writes to stderr, e.g. a log line) with every visible bar hidden, then
/// redraws them, so log lines and bars do not garble each other on a terminal.
pub fn with_bars_suspended<R>(f: impl FnOnce() -> R) -> R {
    match BARS.get() {
        Some(bars) if VISIBLE.load(Ordering::Relaxed) > 0 => bars.suspend(f),
        _ => f(),
    }
}

/// What a progress counts, for showing its figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Unit {
    /// Things (records, images, files, steps).
    #[default]
    Items,
    /// Bytes, shown as KiB, MiB, GiB.
    Bytes,
}

/// How a [`Progress`] counts and shows itself.
#[derive(Debug, Clone, Copy)]
pub struct ProgressOptions {
    /// What is counted.
    pub unit: Unit,
    /// Where counting starts (a resumed run): rate and eta count only what this run does.
    pub start: u64,
    /// Whether a bar may be drawn (false: log lines only, as `train --no-progress`).
    pub bar: bool,
}

impl Default for ProgressOptions {
    fn default() -> Self {
        Self {
            unit: Unit::Items,
            start: 0,
            bar: true,
        }
    }
}

/// The progress of one piece of long work. Clones share it (a reader thread and a processing
/// loop can both count); the bar goes away when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Progress {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Names the work in the bar and in log lines (`replay labelled-images`, `publish`, …).
    label: String,
    unit: Unit,
    /// The visible bar, or `None` when progress goes to the log.
    bar: Option<ProgressBar>,
    pos: AtomicU64,
    /// The total, or [`UNKNOWN`].
    len: AtomicU64,
    /// Position when counting started (for the rate).
    start: u64,
    started: Instant,
    /// Milliseconds after `started` when the next periodic line is due.
    next_line_ms: AtomicU64,
    /// The message for log lines (the bar keeps its own).
    message: Mutex<Option<String>>,
    finished: AtomicBool,
}

impl Progress {
    /// Progress of `total` items (`None`: unknown, a spinner), named `label`.
    pub fn new(label: impl Into<String>, total: Option<u64>) -> Self {
        Self::with_options(label, total, ProgressOptions::default())
    }

    /// Progress of `total` bytes (`None`: unknown until [`Progress::set_length`]).
    pub fn bytes(label: impl Into<String>, total: Option<u64>) -> Self {
        let options = ProgressOptions {
            unit: Unit::Bytes,
            ..ProgressOptions::default()
        };
        Self::with_options(label, total, options)
    }

    /// Progress with explicit options.
    pub fn with_options(label: impl Into<String>, total: Option<u64>, options: ProgressOptions) -> Self {
        let label = label.into();
        let draw = options.bar && ENABLED.load(Ordering::Relaxed) && std::io::stderr().is_terminal();
        let bar = draw.then(|| new_bar(&label, total, options));
        Self {
            inner: Arc::new(Inner {
                label,
                unit: options.unit,
                bar,
                pos: AtomicU64::new(options.start),
                len: AtomicU64::new(total.unwrap_or(UNKNOWN)),
                start: options.start,
                started: Instant::now(),
                next_line_ms: AtomicU64::new(millis(LOG_INTERVAL)),
                message: Mutex::new(None),
                finished: AtomicBool::new(false),
            }),
        }
    }

    /// Whether a bar is drawn (else progress goes to the log).
    pub fn has_bar(&self) -> bool {
        self.inner.bar.is_some()
    }

    /// Counts `n` more done.
    pub fn inc(&self, n: u64) {
        self.inner.pos.fetch_add(n, Ordering::Relaxed);
        match &self.inner.bar {
            Some(bar) => bar.inc(n),
            None => self.maybe_log(),
        }
    }

    /// Sets how much is done (a restarted download goes back to 0).
    pub fn set_position(&self, pos: u64) {
        self.inner.pos.store(pos, Ordering::Relaxed);
        match &self.inner.bar {
            Some(bar) => bar.set_position(pos),
            None => self.maybe_log(),
        }
    }

    /// Sets the total (learnt late, or corrected when the work turned out smaller).
    pub fn set_length(&self, len: u64) {
        let previous = self.inner.len.swap(len, Ordering::Relaxed);
        if let Some(bar) = &self.inner.bar {
            if previous == UNKNOWN {
                bar.set_style(bar_style(self.inner.unit, true));
            }
            bar.set_length(len);
        }
    }

    /// Sets the text shown after the figures (the stage, or a training step's losses).
    pub fn set_message(&self, message: impl Into<String>) {
        let message = message.into();
        match &self.inner.bar {
            Some(bar) => bar.set_message(message),
            None => {
                if let Ok(mut slot) = self.inner.message.lock() {
                    *slot = Some(message);
                }
            }
        }
    }

    /// Ends the work: the bar is cleared, or the final log line is written.
    pub fn finish(&self) {
        if self.inner.finished.swap(true, Ordering::Relaxed) {
            return;
        }
        match &self.inner.bar {
            Some(bar) => bar.finish_and_clear(),
            None => {
                let line = self.inner.line(true);
                tracing::info!(target: "attrstream::progress", "{line}");
            }
        }
    }

    /// Writes a periodic line when one is due (one clock read otherwise).
    fn maybe_log(&self) {
        let elapsed = millis(self.inner.started.elapsed());
        if claim_line(&self.inner.next_line_ms, elapsed, millis(LOG_INTERVAL)) {
            let line = self.inner.line(false);
            tracing::info!(target: "attrstream::progress", "{line}");
        }
    }
}

impl Inner {
    /// The log line for the current figures.
    fn line(&self, done: bool) -> String {
        let len = self.len.load(Ordering::Relaxed);
        let figures = Figures {
            pos: self.pos.load(Ordering::Relaxed),
            len: (len != UNKNOWN).then_some(len),
            start: self.start,
            elapsed: self.started.elapsed(),
            unit: self.unit,
        };
        let message = self.message.lock().ok().and_then(|m| m.clone());
        format_line(&self.label, &figures, done, message.as_deref())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
            if let Some(bars) = BARS.get() {
                bars.remove(&bar);
            }
            VISIBLE.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The look of a bar: a bar with a total, a spinner without one.
fn bar_style(unit: Unit, bounded: bool) -> ProgressStyle {
    let figures = match (unit, bounded) {
        (Unit::Items, true) => "[{bar:30}] {pos}/{len} {per_sec} eta {eta}",
        (Unit::Bytes, true) => "[{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        (Unit::Items, false) => "{spinner} {pos} {per_sec}",
        (Unit::Bytes, false) => "{spinner} {bytes} {bytes_per_sec}",
    };
    // `wide_msg` takes what is left of the line and is cut there: the bar never wraps.
    let template = format!("{{prefix}} {{elapsed_precise}} {figures} {{wide_msg}}");
    ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// A bar in the process-wide stack.
fn new_bar(label: &str, total: Option<u64>, options: ProgressOptions) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::hidden())
        .with_style(bar_style(options.unit, total.is_some()))
        .with_prefix(Cow::Owned(label.to_string()))
        .with_position(options.start);
    let bars = BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
    VISIBLE.fetch_add(1, Ordering::Relaxed);
    let bar = bars.add(bar);
    bar.reset_eta();
    bar.enable_steady_tick(TICK);
    bar
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whether a periodic line is due `elapsed_ms` after the start; if so, moves the deadline
/// `interval_ms` on. Of threads calling at the same moment exactly one gets `true`.
fn claim_line(next_ms: &AtomicU64, elapsed_ms: u64, interval_ms: u64) -> bool {
    let due = next_ms.load(Ordering::Relaxed);
    elapsed_ms >= due
        && next_ms
            .compare_exchange(
                due,
                elapsed_ms.saturating_add(interval_ms),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
}

/// The numbers a log line is made of.
#[derive(Debug, Clone, Copy)]
struct Figures {
    pos: u64,
    len: Option<u64>,
    /// Where counting started (the rate counts from here).
    start: u64,
    elapsed: Duration,
    unit: Unit,
}

/// `{label}: {pos}/{len} ({pct}%), {rate}/s, eta {eta}`; without a total
/// `{label}: {pos}, {rate}/s`; at the end `done in {elapsed}` instead of the eta; the message,
/// if any, after a `;`. Plain text: no escape codes.
fn format_line(label: &str, f: &Figures, done: bool, message: Option<&str>) -> String {
    let amount = |n: u64| match f.unit {
        Unit::Items => n.to_string(),
        Unit::Bytes => HumanBytes(n).to_string(),
    };
    let seconds = f.elapsed.as_secs_f64();
    let rate = if seconds > 0.0 {
        f.pos.saturating_sub(f.start) as f64 / seconds
    } else {
        0.0
    };
    let rate_text = match f.unit {
        Unit::Items if rate >= 100.0 => format!("{rate:.0}"),
        Unit::Items => format!("{rate:.1}"),
        Unit::Bytes => HumanBytes(rate as u64).to_string(),
    };
    let mut line = match f.len {
        Some(len) => {
            let pct = if len == 0 {
                100
            } else {
                (u128::from(f.pos) * 100 / u128::from(len)).min(100)
            };
            format!("{label}: {}/{} ({pct}%), {rate_text}/s", amount(f.pos), amount(len))
        }
        None => format!("{label}: {}, {rate_text}/s", amount(f.pos)),
    };
    if done {
        line.push_str(&format!(", done in {}", format_duration(f.elapsed)));
    } else if let Some(len) = f.len {
        let left = len.saturating_sub(f.pos);
        let eta = if left == 0 {
            "0s".to_string()
        } else if rate > 0.0 {
            format_duration(Duration::from_secs_f64((left as f64 / rate).min(1e9)))
        } else {
            "?".to_string()
        };
        line.push_str(&format!(", eta {eta}"));
    }
    if let Some(m) = message.filter(|m| !m.is_empty()) {
        line.push_str("; ");
        line.push_str(m);
    }
    line
}

/// `42s`, `3m07s`, `2h05m`: short and sortable by eye.
fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(pos: u64, len: Option<u64>, secs: u64) -> Figures {
        Figures {
            pos,
            len,
            start: 0,
            elapsed: Duration::from_secs(secs),
            unit: Unit::Items,
        }
    }

    #[test]
    fn a_line_is_due_once_per_interval() {
        let next = AtomicU64::new(10_000);
        assert!(!claim_line(&next, 0, 10_000), "nothing at the start");
        assert!(!claim_line(&next, 9_999, 10_000));
        assert!(claim_line(&next, 10_000, 10_000));
        assert!(!claim_line(&next, 10_001, 10_000), "one line per interval");
        assert!(!claim_line(&next, 19_999, 10_000));
        // A long pause between updates: one line, then the next interval counts from it.
        assert!(claim_line(&next, 45_000, 10_000));
        assert!(!claim_line(&next, 54_999, 10_000));
        assert!(claim_line(&next, 55_000, 10_000));
    }

    #[test]
    fn only_one_of_many_threads_writes_the_line() {
        let next = Arc::new(AtomicU64::new(0));
        let winners: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| usize::from(claim_line(&next, 5, 10_000))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(winners, 1);
    }

    #[test]
    fn lines_show_position_total_percent_rate_and_eta() {
        assert_eq!(
            format_line("replay labelled-images", &figures(120, Some(1000), 10), false, None),
            "replay labelled-images: 120/1000 (12%), 12.0/s, eta 1m13s"
        );
        assert_eq!(
            format_line("publish", &figures(5000, Some(5000), 20), true, None),
            "publish: 5000/5000 (100%), 250/s, done in 20s"
        );
        assert_eq!(
            format_line("evaluate", &figures(0, Some(40), 0), false, None),
            "evaluate: 0/40 (0%), 0.0/s, eta ?"
        );
        assert_eq!(
            format_line("replay t", &figures(0, Some(0), 1), true, None),
            "replay t: 0/0 (100%), 0.0/s, done in 1s"
        );
        assert_eq!(format_line("scan", &figures(7, None, 2), false, None), "scan: 7, 3.5/s");
    }

    #[test]
    fn lines_of_bytes_resumed_work_and_messages() {
        let f = Figures {
            pos: 60 << 20,
            len: Some(160 << 20),
            start: 0,
            elapsed: Duration::from_secs(12),
            unit: Unit::Bytes,
        };
        assert_eq!(
            format_line("download", &f, false, Some("model.pth")),
            "download: 60.00 MiB/160.00 MiB (37%), 5.00 MiB/s, eta 20s; model.pth"
        );
        // Resumed at step 100 of 400: the rate counts this run's 50 steps only.
        let resumed = Figures {
            pos: 150,
            len: Some(400),
            start: 100,
            elapsed: Duration::from_secs(100),
            unit: Unit::Items,
        };
        assert_eq!(
            format_line("train", &resumed, false, Some("loss 0.412")),
            "train: 150/400 (37%), 0.5/s, eta 8m20s; loss 0.412"
        );
    }

    #[test]
    fn lines_carry_no_escape_codes() {
        let line = format_line("publish", &figures(3, Some(9), 1), false, Some("x"));
        assert!(line.bytes().all(|b| b != 0x1b && (b >= 0x20 || b == b'\t')), "{line:?}");
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(format_duration(Duration::from_secs(0)), "0s");
        assert_eq!(format_duration(Duration::from_secs(59)), "59s");
        assert_eq!(format_duration(Duration::from_secs(187)), "3m07s");
        assert_eq!(format_duration(Duration::from_secs(7500)), "2h05m");
    }

    #[test]
    fn without_a_terminal_there_is_no_bar_and_counting_still_works() {
        // Test runs have stderr captured or piped; forcing progress off covers a terminal too.
        let p = Progress::with_options(
            "test",
            Some(10),
            ProgressOptions {
                bar: false,
                ..ProgressOptions::default()
            },
        );
        assert!(!p.has_bar());
        let clone = p.clone();
        clone.inc(3);
        p.inc(2);
        p.set_message("stage");
        assert_eq!(p.inner.line(false).split(',').next(), Some("test: 5/10 (50%)"));
        assert!(p.inner.line(true).ends_with("; stage"));
        p.finish();
        p.finish();
        assert_eq!(with_bars_suspended(|| 7), 7);
    }
}
