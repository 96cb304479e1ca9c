//! The process's log layout: every line as ztunnel writes it, in text or JSON.
//!
//! **Text** (`LOG_FORMAT=plain`, the default), one line per event, columns separated by tabs (`\t`
//! below):
//!
//! ```text
//! <time>\t<level>\t<target>\t<message>\t<fields>
//! 2025-01-23T05:07:25.806642Z\tinfo\taccess\tconnection complete\tsrc.addr=10.0.0.1:40000 dst.addr=10.0.0.2:15008 direction="inbound" bytes_sent=5 bytes_recv=7 duration="3ms"
//! ```
//!
//! - the time in UTC, RFC 3339 with microseconds and `Z`;
//! - the level in lower case (`error`, `warn`, `info`, `debug`, `trace`);
//! - the target, without the crate prefix of the binaries (`meshwire_dataplane::`,
//!   `meshwire_dataplane_uring::`, `ztunnel::`, `ztunnel_uring::`; ztunnel strips `ztunnel::`), then
//!   `:<span>{<fields>}` for each span the event is in, outermost first;
//! - when the event has fields: a tab, the message and a tab, then the other fields as `key=value`
//!   separated by single spaces. String values are quoted and escaped as Rust's `Debug` does
//!   (`"a \"b\"\n"`); numbers, booleans and values logged with `%` or `?` (addresses, say) are
//!   written bare.
//!
//! **JSON** (`LOG_FORMAT=json`): one object per line, `level` (lower case), `time`, `scope` (the full
//! target), `message`, then the other fields by name (flattened; numbers and booleans as JSON values,
//! everything else as strings), then one object per span, named after it.
//!
//! ```json
//! {"level":"info","time":"2025-01-23T05:07:25.806642Z","scope":"access","message":"connection complete","src.addr":"10.0.0.1:40000","dst.addr":"10.0.0.2:15008","direction":"inbound","bytes_sent":5,"bytes_recv":7,"duration":"3ms"}
//! ```
//!
//! **One line, whatever a value holds.** A value cannot end the line, add a column or, in text, pass
//! for another field: string values are quoted with every quote, backslash and control character
//! escaped; the message and bare values have their control characters (tabs and line breaks among
//! them) and the Unicode line and paragraph separators escaped (`\n`, `\t`, `\u{2028}`). JSON escapes
//! them too (`\n`, `\u2028`): DEL, the C1 controls and the separators, which JSON allows raw, included.
//! ztunnel writes messages and bare values as they are; the escaping only changes what contains such
//! characters.
//!
//! [`render`] writes what a closure logs in this layout at a given time, for tests and examples:
//!
//! ```
//! use std::time::{Duration, SystemTime};
//! use meshwire_dataplane::telemetry::layout::render;
//! use meshwire_dataplane::telemetry::accesslog::LogFormat;
//!
//! let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_737_608_845_806_642);
//! let text = render(LogFormat::Text, at, || {
//!     tracing::warn!(target: "meshwire_dataplane::proxy", peer = %"10.0.0.1:1", reason = "bad\tinput", "refused")
//! });
//! assert_eq!(text, "2025-01-23T05:07:25.806642Z\twarn\tproxy\trefused\tpeer=10.0.0.1:1 reason=\"bad\\tinput\"\n");
//! let json = render(LogFormat::Json, at, || tracing::info!(target: "access", bytes = 5, "done"));
//! assert_eq!(
//!     json,
//!     r#"{"level":"info","time":"2025-01-23T05:07:25.806642Z","scope":"access","message":"done","bytes":5}"#.to_owned() + "\n"
//! );
//! ```

use std::fmt::{self, Write as _};
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;

use super::accesslog::LogFormat;

/// Target prefixes left out of text lines, as ztunnel leaves out `ztunnel::`.
const STRIPPED_PREFIXES: &[&str] = &[
    "meshwire_dataplane::",
    "meshwire_dataplane_uring::",
    "ztunnel::",
    "ztunnel_uring::",
];

/// The event and field formatter of the process's log subscriber (see the [module
/// documentation](self)): `tracing_subscriber::fmt::layer().event_format(layout.clone()).fmt_fields(layout)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLayout {
    format: LogFormat,
    /// `None`: the system clock.
    at: Option<SystemTime>,
}

impl LogLayout {
    /// The layout of `format`, timestamped with the system clock.
    pub fn new(format: LogFormat) -> Self {
        Self { format, at: None }
    }

    /// The same layout with every line timestamped `at` (for reproducible output).
    pub fn at(mut self, at: SystemTime) -> Self {
        self.at = Some(at);
        self
    }

    /// The format it writes.
    pub fn format(&self) -> LogFormat {
        self.format
    }

    fn now(&self) -> SystemTime {
        self.at.unwrap_or_else(SystemTime::now)
    }
}

/// Writes `at` in UTC as RFC 3339 with microseconds: `2025-01-23T05:07:25.806642Z` (ztunnel's time
/// stamps). A time before 1970 is written as 1970's first instant.
pub fn write_time(out: &mut impl fmt::Write, at: SystemTime) -> fmt::Result {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since.subsec_micros()
    )
}

/// The proleptic Gregorian date `days` days after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Whether `c` must be escaped to keep a line one line (and its columns its columns).
fn breaks_line(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// A writer that escapes, as Rust's `Debug` does, the characters [`breaks_line`] finds.
struct Escaping<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(breaks_line) {
            let (plain, tail) = rest.split_at(at);
            self.0.write_str(plain)?;
            let mut chars = tail.chars();
            if let Some(c) = chars.next() {
                write!(self.0, "{}", c.escape_debug())?;
            }
            rest = chars.as_str();
        }
        self.0.write_str(rest)
    }
}

/// Writes `value`'s `Debug` form with [`breaks_line`] characters escaped.
fn write_escaped(out: &mut impl fmt::Write, value: &dyn fmt::Debug) -> fmt::Result {
    write!(Escaping(out), "{value:?}")
}

/// The text form of an event's or a span's fields: the message and a tab, then `key=value` pairs.
struct TextFields<'w, W: fmt::Write> {
    out: &'w mut W,
    first: bool,
    result: fmt::Result,
}

impl<W: fmt::Write> TextFields<'_, W> {
    fn pair(&mut self, field: &Field, value: impl FnOnce(&mut W) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let separator = if std::mem::replace(&mut self.first, false) {
            ""
        } else {
            " "
        };
        self.result = write!(self.out, "{separator}{}=", field.name()).and_then(|()| value(self.out));
    }
}

impl<W: fmt::Write> Visit for TextFields<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.pair(field, |out| write!(out, "{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            if self.result.is_ok() {
                self.result = write_escaped(self.out, value).and_then(|()| self.out.write_char('\t'));
            }
        } else {
            self.pair(field, |out| write_escaped(out, value));
        }
    }
}

/// The JSON form of an event's or a span's fields: `"key":value` members (without the braces), the
/// first one preceded by a comma unless `first`.
struct JsonFields<'w> {
    out: &'w mut String,
    first: bool,
}

impl JsonFields<'_> {
    fn member(&mut self, name: &str, value: impl FnOnce(&mut String)) {
        if !std::mem::replace(&mut self.first, false) {
            self.out.push(',');
        }
        push_json_str(self.out, name);
        self.out.push(':');
        value(self.out);
    }
}

impl Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.member(field.name(), |out| push_json_str(out, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        self.member(field.name(), |out| push_json_str(out, &text));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.member(field.name(), |out| {
            let _ = write!(out, "{value}");
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.member(field.name(), |out| {
            let _ = write!(out, "{value}");
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.member(field.name(), |out| out.push_str(if value { "true" } else { "false" }));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.member(field.name(), |out| match serde_json::to_string(&value) {
            Ok(number) if value.is_finite() => out.push_str(&number),
            _ => out.push_str("null"),
        });
    }
}

/// Appends `value` as a JSON string, escaped so that the line stays one line: what JSON requires,
/// and DEL, the C1 controls and the Unicode line and paragraph separators as `\u` escapes.
fn push_json_str(out: &mut String, value: &str) {
    // A string always serializes; the fallback is never taken.
    let quoted = serde_json::to_string(value).unwrap_or_else(|_| String::from("\"\""));
    if !quoted.contains(breaks_line) {
        out.push_str(&quoted);
        return;
    }
    for c in quoted.chars() {
        if breaks_line(c) {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
}

impl<'w> FormatFields<'w> for LogLayout {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        match self.format {
            LogFormat::Text => {
                let mut visitor = TextFields {
                    out: &mut writer,
                    first: true,
                    result: Ok(()),
                };
                fields.record(&mut visitor);
                visitor.result
            }
            LogFormat::Json => {
                let mut members = String::new();
                fields.record(&mut JsonFields {
                    out: &mut members,
                    first: true,
                });
                write!(writer, "{{{members}}}")
            }
        }
    }

    fn add_fields(&self, current: &'w mut FormattedFields<Self>, fields: &tracing::span::Record<'_>) -> fmt::Result {
        match self.format {
            LogFormat::Text => {
                if !current.fields.is_empty() {
                    current.fields.push(' ');
                }
                self.format_fields(current.as_writer(), fields)
            }
            LogFormat::Json => {
                // Reopen the object: `{...}` becomes `{...,<new members>}`.
                let mut members = String::new();
                fields.record(&mut JsonFields {
                    out: &mut members,
                    first: current.fields.len() <= 2,
                });
                if current.fields.ends_with('}') {
                    current.fields.pop();
                    current.fields.push_str(&members);
                    current.fields.push('}');
                } else {
                    current.fields = format!("{{{members}}}");
                }
                Ok(())
            }
        }
    }
}

impl<S, N> FormatEvent<S, N> for LogLayout
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let level = meta.level().as_str().to_ascii_lowercase();
        match self.format {
            LogFormat::Text => {
                write_time(&mut writer, self.now())?;
                let target = meta.target();
                let target = STRIPPED_PREFIXES
                    .iter()
                    .find_map(|prefix| target.strip_prefix(prefix))
                    .unwrap_or(target);
                write!(writer, "\t{level}\t")?;
                Escaping(&mut writer).write_str(target)?;
                if let Some(scope) = ctx.event_scope() {
                    for span in scope.from_root() {
                        write!(writer, ":{}", span.metadata().name())?;
                        let extensions = span.extensions();
                        if let Some(fields) = extensions.get::<FormattedFields<N>>()
                            && !fields.is_empty()
                        {
                            write!(writer, "{{{fields}}}")?;
                        }
                    }
                }
                if event.fields().next().is_some() {
                    writer.write_char('\t')?;
                    let mut visitor = TextFields {
                        out: &mut writer,
                        first: true,
                        result: Ok(()),
                    };
                    event.record(&mut visitor);
                    visitor.result?;
                }
                writeln!(writer)
            }
            LogFormat::Json => {
                let mut line = String::with_capacity(256);
                line.push('{');
                let mut object = JsonFields {
                    out: &mut line,
                    first: true,
                };
                object.member("level", |out| push_json_str(out, &level));
                let mut time = String::with_capacity(27);
                write_time(&mut time, self.now())?;
                object.member("time", |out| push_json_str(out, &time));
                object.member("scope", |out| push_json_str(out, meta.target()));
                event.record(&mut object);
                if let Some(scope) = ctx.event_scope() {
                    for span in scope.from_root() {
                        let extensions = span.extensions();
                        let fields = extensions
                            .get::<FormattedFields<N>>()
                            .map(|fields| fields.fields.as_str())
                            .filter(|fields| fields.starts_with('{'))
                            .unwrap_or("{}");
                        object.member(span.metadata().name(), |out| out.push_str(fields));
                    }
                }
                line.push('}');
                writeln!(writer, "{line}")
            }
        }
    }
}

/// A shared buffer the rendered lines are written into.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl io::Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Buffer {
    type Writer = Buffer;

    fn make_writer(&'a self) -> Buffer {
        self.clone()
    }
}

/// The lines the events `log` emits on this thread would make in `format`, every one timestamped
/// `at` and ended by a newline; every level is enabled. The process's own subscriber is not involved.
pub fn render(format: LogFormat, at: SystemTime, log: impl FnOnce()) -> String {
    let buffer = Buffer::default();
    let layout = LogLayout::new(format).at(at);
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .event_format(layout)
            .fmt_fields(layout)
            .with_writer(buffer.clone()),
    );
    tracing::subscriber::with_default(subscriber, log);
    let bytes = std::mem::take(&mut *buffer.0.lock().unwrap_or_else(PoisonError::into_inner));
    String::from_utf8_lossy(&bytes).into_owned()
}
