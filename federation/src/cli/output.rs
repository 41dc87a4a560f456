//! What the commands print: standard output that ends quietly when its
//! reader goes away (`federation submit … | head -1`), aligned tables
//! (`comfy-table`), one status line that rewrites itself on a terminal, and
//! human forms of ages and times.

use std::io::{IsTerminal as _, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use comfy_table::{ContentArrangement, Table, presets};

/// Set once standard output's reader has gone away; later output is dropped.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `text` to standard output and flushes. A closed pipe (EPIPE) is
/// not an error: the command goes on (it may already have created a task)
/// and ends with its own exit code, printing nothing more. Other write
/// errors are reported once on standard error.
pub fn emit(text: &str) {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: writing to standard output: {e}");
        }
    }
}

/// Prints one line to standard output through [`emit`].
macro_rules! say {
    () => { $crate::cli::output::emit("\n") };
    ($($arg:tt)*) => {{
        let mut line = format!($($arg)*);
        line.push('\n');
        $crate::cli::output::emit(&line);
    }};
}
pub(crate) use say;

/// True once standard output's reader has gone away.
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::Relaxed)
}

/// A progress line on standard error: rewritten in place on a terminal
/// (`\r` and clear to end of line), one line per *change* otherwise, so a
/// log file does not get a line every poll.
#[derive(Debug, Default)]
pub struct Progress {
    tty: bool,
    last: Option<String>,
    shown: bool,
}

impl Progress {
    /// A progress line on standard error.
    pub fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            last: None,
            shown: false,
        }
    }

    /// Shows `line`. `changed_part` is the part whose change earns a new
    /// line when standard error is not a terminal (the elapsed time alone
    /// does not).
    pub fn show(&mut self, line: &str, changed_part: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
            self.shown = true;
        } else if self.last.as_deref() != Some(changed_part) {
            let _ = writeln!(err, "{line}");
        }
        self.last = Some(changed_part.to_string());
    }

    /// Ends the line (on a terminal), so what follows starts on its own.
    pub fn finish(&mut self) {
        if self.tty && self.shown {
            let _ = writeln!(std::io::stderr());
            self.shown = false;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A borderless table whose columns fit their widest cell, never wrapped
/// (output often goes to a pipe, where there is no width to fit).
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    // The NOTHING preset pads each cell with a space on both sides; the
    // first column needs no left margin.
    if let Some(col) = t.column_mut(0) {
        col.set_padding((0, 1));
    }
    t
}

/// The table as text, each line without trailing spaces, ending in `\n`.
pub fn render(t: &Table) -> String {
    let mut out = String::new();
    for line in t.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A duration for humans: `850ms`, `4.2s`, `3m05s`, `2h10m`, `3d4h`.
pub fn human(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    match s {
        _ if ms < 1000 => format!("{ms}ms"),
        0..=59 => format!("{:.1}s", d.as_secs_f64()),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Milliseconds for humans; a negative value is `-` (never / unknown).
pub fn human_ms(ms: i64) -> String {
    u64::try_from(ms).map_or_else(|_| "-".to_string(), |ms| human(Duration::from_millis(ms)))
}

/// A Unix time in milliseconds as RFC 3339 UTC (`2026-12-01T09:39:18Z`);
/// `-` for 0 or before 1970.
pub fn unix_ms_utc(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) if ms > 0 => {
            let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
            humantime::format_rfc3339_seconds(t).to_string()
        }
        _ => "-".to_string(),
    }
}

/// How long ago a Unix time in milliseconds was, for humans.
pub fn ago_unix_ms(ms: i64) -> String {
    if ms <= 0 {
        return "-".to_string();
    }
    human_ms(crate::clock::now_unix_ms().saturating_sub(ms).max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_stay_aligned_whatever_the_content() {
        let mut t = table(&["REGION", "STATE", "N"]);
        t.add_row(vec!["europe", "alive, draining", "1"]);
        t.add_row(vec!["a_very_long_region_name", "dead", "12345"]);
        let text = render(&t);
        let lines: Vec<&str> = text.lines().collect();
        let col = |l: &str, word: &str| l.find(word).expect("present");
        assert_eq!(col(lines[0], "STATE"), col(lines[1], "alive"), "{text}");
        assert_eq!(col(lines[0], "STATE"), col(lines[2], "dead"), "{text}");
        assert!(lines[0].starts_with("REGION"), "{text}");
        assert_eq!(
            lines[0].rfind(" N").map(|i| i + 1),
            lines[2].find("12345"),
            "{text}"
        );
        assert!(text.lines().all(|l| l == l.trim_end()), "{text:?}");
    }

    #[test]
    fn human_forms() {
        assert_eq!(human(Duration::from_millis(850)), "850ms");
        assert_eq!(human(Duration::from_millis(4200)), "4.2s");
        assert_eq!(human(Duration::from_secs(185)), "3m05s");
        assert_eq!(human(Duration::from_secs(7800)), "2h10m");
        assert_eq!(human_ms(-1), "-");
        assert_eq!(unix_ms_utc(0), "-");
        assert_eq!(unix_ms_utc(1_764_581_958_000), "2025-12-01T09:39:18Z");
    }
}
