//! What the binary's logging needs beyond tracing-subscriber's defaults:
//! - [`Journal`]: under systemd, each line carries its syslog priority as
//!   the sd-daemon prefix (`<4>`), so that `journalctl -p warning` finds the
//!   warnings, and no timestamp of its own (the journal has one).
//! - [`TextFields`]: text lines in which no value can pass for another
//!   field or line: every value and the message escaped, quoted when
//!   they are not one plain word (see [`crate::ops::escape`]).
//! - [`LogFile`]: `log_file`, rotated and pruned by tracing-appender, and
//!   reopened on request (SIGUSR1) after an external rotation.
//!
//! Why the prefix on standard output rather than the journal's native
//! socket (`tracing-journald`): the output stays one ordered stream, with
//! stderr's start-up errors and whatever systemd's `StandardOutput=` sends
//! it to; nothing changes outside systemd; no extra socket or dependency.

use crate::config::LogRotation;
use crate::ops::escape;
use std::fmt::Write as _;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The sd-daemon(3) priority of a level: error 3, warning 4, info 6,
/// debug and trace 7.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Whether `fd` is the stream systemd connected to the journal: its device
/// and inode are those in `JOURNAL_STREAM` (`DEV:INODE`), as
/// sd_journal_stream_fd(3) says to check.
pub fn is_journal_stream(fd: impl AsFd) -> bool {
    let Ok(want) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = fd.as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    want == format!("{}:{}", meta.dev(), meta.ino())
}

/// A line for the journal: `<P>` and the line without leading blanks.
/// Every line of a multi-line message gets the prefix, since the journal
/// makes each line an entry of its own.
pub fn journal_lines(priority: u8, text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    for line in text.trim_end_matches('\n').split('\n') {
        let _ = writeln!(out, "<{priority}>{}", line.trim_start());
    }
    out
}

/// A [`FormatEvent`] for the journal: the inner format's line (configure it
/// without a timestamp), each line prefixed with the event's priority.
pub struct Journal<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for Journal<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        writer.write_str(&journal_lines(priority(event.metadata().level()), &line))
    }
}

/// The fields of a text line (events and spans), so that whatever a
/// client, a guest or QEMU sent cannot forge a line or a field, nor reach
/// a terminal as control characters. One place for all call sites, so
/// none can forget:
/// - the message as it is when it is plain text (no `=`, quote,
///   backslash or control character), else quoted;
/// - `name=value`: string values (`name = s`) always quoted, as
///   tracing's default does; others (`%x`, `?x`, numbers) as they are
///   when they are one word, else quoted.
///
/// Quoted means a JSON string literal: in double quotes, with `"`, `\`
/// and control characters escaped (see [`escape`]).
pub struct TextFields;

impl<'w> FormatFields<'w> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> std::fmt::Result {
        let mut visitor = TextVisitor {
            italic: writer.has_ansi_escapes(),
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct TextVisitor<'w> {
    writer: Writer<'w>,
    /// Field names in italics, as tracing's default does on a terminal.
    italic: bool,
    first: bool,
    result: std::fmt::Result,
}

impl TextVisitor<'_> {
    /// One field: `string` when it was recorded as a string.
    fn field(&mut self, field: &Field, text: &str, string: bool) -> std::fmt::Result {
        let name = field.name();
        // `log` crate records carry their metadata as fields; tracing's
        // format shows it elsewhere.
        if name.starts_with("log.") {
            return Ok(());
        }
        if !std::mem::take(&mut self.first) {
            self.writer.write_char(' ')?;
        }
        let w = &mut self.writer;
        if name == "message" {
            return match escape::is_plain_message(text) {
                true => w.write_str(text),
                false => escape::write_quoted(w, text),
            };
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        match self.italic {
            true => write!(w, "\x1b[3m{name}\x1b[0m\x1b[2m=\x1b[0m")?,
            false => write!(w, "{name}=")?,
        }
        match !string && escape::is_word(text) {
            true => w.write_str(text),
            false => escape::write_quoted(w, text),
        }
    }
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_ok() {
            self.result = self.field(field, value, true);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if self.result.is_ok() {
            self.result = self.field(field, &format!("{value:?}"), false);
        }
    }
}

/// `log_file`, as tracing-appender writes it: a new file per
/// `log_rotation` period (named `FILE.DATE`; just `FILE` with `never`),
/// keeping at most `keep` of them. Clones share the file; [`reopen`]
/// opens it again by name, for after logrotate moved it.
///
/// [`reopen`]: LogFile::reopen
#[derive(Clone)]
pub struct LogFile {
    path: PathBuf,
    rotation: LogRotation,
    keep: Option<usize>,
    appender: Arc<Mutex<RollingFileAppender>>,
}

impl LogFile {
    pub fn open(path: &Path, rotation: LogRotation, keep: Option<usize>) -> io::Result<LogFile> {
        let appender = Arc::new(Mutex::new(appender(path, rotation, keep)?));
        Ok(LogFile {
            path: path.to_owned(),
            rotation,
            keep,
            appender,
        })
    }

    /// Opens the file again (appending, creating it if it is gone); on
    /// failure the old one stays in use.
    pub fn reopen(&self) -> io::Result<()> {
        let new = appender(&self.path, self.rotation, self.keep)?;
        *self.appender.lock().unwrap_or_else(PoisonError::into_inner) = new;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn appender(path: &Path, rotation: LogRotation, keep: Option<usize>) -> io::Result<RollingFileAppender> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(".".as_ref());
    let name = path.file_name().unwrap_or_default();
    let mut builder = RollingFileAppender::builder()
        .rotation(match rotation {
            LogRotation::Minutely => Rotation::MINUTELY,
            LogRotation::Hourly => Rotation::HOURLY,
            LogRotation::Daily => Rotation::DAILY,
            LogRotation::Never => Rotation::NEVER,
        })
        .filename_prefix(name.to_string_lossy());
    // With `never`, every file named FILE* would count (logrotate's too):
    // the config refuses `log_keep` there.
    if let Some(n) = keep.filter(|_| rotation != LogRotation::Never) {
        builder = builder.max_log_files(n);
    }
    builder
        .build(dir)
        .map_err(|e| io::Error::other(format!("cannot open log file {}: {e}", path.display())))
}

impl io::Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.appender.lock().unwrap_or_else(PoisonError::into_inner).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.appender.lock().unwrap_or_else(PoisonError::into_inner).flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn journal_lines_carry_the_priority_and_no_timestamp() {
        let out = Capture::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .event_format(Journal(
                tracing_subscriber::fmt::format().without_time().with_ansi(false),
            ))
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(vm = "a", "broken");
            tracing::warn!("careful");
            tracing::info!("fine");
            tracing::debug!("detail");
            tracing::trace!("more detail");
            tracing::warn!("two\nlines");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let target = module_path!();
        assert_eq!(
            lines,
            [
                format!("<3>ERROR {target}: broken vm=\"a\""),
                format!("<4>WARN {target}: careful"),
                format!("<6>INFO {target}: fine"),
                format!("<7>DEBUG {target}: detail"),
                format!("<7>TRACE {target}: more detail"),
                format!("<4>WARN {target}: two"),
                "<4>lines".to_owned(),
            ]
        );
    }

    #[test]
    fn text_fields_escape_what_could_forge_a_line_or_a_field() {
        let out = Capture::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .without_time()
            .with_ansi(false)
            .fmt_fields(TextFields)
            .with_writer(move || writer.clone())
            .finish();
        let forged = "ok\"\nINFO qmpmux::audit: command command=\"quit\" outcome=\"ok\"\u{1b}[2J\u{7}";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("client", id = 2);
            let _in = span.enter();
            tracing::info!(vm = %"web01", path = %"/run/a b.sock", command = "stop", n = 3, ok = true, "plain words");
            tracing::info!(reason = %forged, holder = ?"x", "lease acquired");
            tracing::warn!("sent {forged}");
            tracing::warn!(message = %forged, "two messages");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let target = module_path!();
        let q = crate::ops::escape::quoted(forged);
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                format!(
                    " INFO client{{id=2}}: {target}: plain words vm=web01 path=\"/run/a b.sock\" command=\"stop\" n=3 ok=true"
                ),
                format!(" INFO client{{id=2}}: {target}: lease acquired reason={q} holder=\"\\\"x\\\"\""),
                format!(" WARN client{{id=2}}: {target}: {}", crate::ops::escape::quoted(&format!("sent {forged}"))),
                format!(" WARN client{{id=2}}: {target}: two messages {q}"),
            ]
        );
    }

    #[test]
    fn only_the_stream_named_by_journal_stream_is_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("out")).unwrap();
        let other = std::fs::File::create(dir.path().join("other")).unwrap();
        let meta = file.metadata().unwrap();
        // No other test in this binary reads JOURNAL_STREAM.
        std::env::set_var("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        assert!(is_journal_stream(&file));
        assert!(!is_journal_stream(&other));
        std::env::remove_var("JOURNAL_STREAM");
        assert!(!is_journal_stream(&file));
    }

    #[test]
    fn log_file_reopens_after_a_move_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.log");
        let mut log = LogFile::open(&path, LogRotation::Never, None).unwrap();
        log.write_all(b"one\n").unwrap();
        std::fs::rename(&path, dir.path().join("q.log.1")).unwrap();
        log.write_all(b"two\n").unwrap();
        log.reopen().unwrap();
        log.write_all(b"three\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("q.log.1")).unwrap(),
            "one\ntwo\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");

        // Rotated files from earlier periods: with `log_keep = 3`, opening
        // leaves two of them beside the current one.
        let rotated = dir.path().join("rotated");
        std::fs::create_dir(&rotated).unwrap();
        for day in 1..=5 {
            std::fs::write(rotated.join(format!("q.log.2026-11-0{day}")), "old\n").unwrap();
        }
        let mut log = LogFile::open(&rotated.join("q.log"), LogRotation::Daily, Some(3)).unwrap();
        log.write_all(b"new\n").unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&rotated)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("q.log.")), "{names:?}");
    }
}
