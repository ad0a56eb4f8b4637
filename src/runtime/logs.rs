//! Logs: text or JSON lines, filtered by `log.level` (`RUST_LOG` wins when set).
//!
//! Field values often come from a message (its `request_id`, `model`, tenant, a reason
//! quoting its `reply_to`), so text logs escape every control character in every field and
//! in the message: a value can neither start a forged log line (`\n`, `\r`) nor send a
//! terminal escape sequence (`ESC`, the C1 controls) or reorder what is shown (the
//! bidirectional overrides). JSON logs escape `\n`, `\r` and `ESC` by being JSON.

use std::fmt::{self, Write as _};

use tracing_subscriber::{
    EnvFilter,
    field::{MakeExt, RecordFields},
    fmt::{self as tfmt, FormatFields, format::Writer},
};

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber; logs go to stderr so `llmq publish --wait` can print its
/// result on stdout. Calling it twice keeps the first.
pub fn init(cfg: &LogConfig) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(&cfg.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tfmt::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cfg.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder
            .with_target(false)
            .fmt_fields(EscapedFields)
            .try_init(),
    };
}

/// Formats the fields of text logs as `name=value` (the message bare), separated by spaces,
/// with control characters in values escaped ([`EscapeControls`]).
///
/// It replaces tracing-subscriber's own field formatter, and with it that formatter's
/// escaping of terminal escape sequences: whatever that escaped, this must escape too.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let format = tfmt::format::debug_fn(|w, field, value| {
            if field.name() != "message" {
                write!(w, "{}=", field.name())?;
            }
            write!(EscapeControls(w), "{value:?}")
        })
        .delimited(" ");
        format.format_fields(writer, fields)
    }
}

/// Writes through to `W` with every control character (C0, DEL, C1) and every
/// bidirectional formatting character written as an escape: `\n`, `\r` and `\t` as those two
/// characters, the others as `\x1b` (below 0x80) or `\u{9b}`. Nothing a message carries then
/// reaches a terminal or a log file as anything but visible text.
struct EscapeControls<'a, W: fmt::Write>(&'a mut W);

/// Whether `c` is written escaped: a control character, or one that reorders the text
/// displayed after it (U+202A to U+202E, U+2066 to U+2069).
fn is_escaped(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

impl<W: fmt::Write> fmt::Write for EscapeControls<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some((i, c)) = rest.char_indices().find(|(_, c)| is_escaped(*c)) {
            self.0.write_str(&rest[..i])?;
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c if u32::from(c) < 0x80 => write!(self.0, "\\x{:02x}", u32::from(c))?,
                c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::{error, info_span};

    use super::*;

    /// A writer into a shared buffer, for one test's subscriber.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let mut buffer = self
                .0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?;
            buffer.extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What the text format writes for the settle path's span and a dead-letter event.
    fn logged(request_id: &str, reason: &str) -> String {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tfmt::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_target(false)
            .without_time()
            .fmt_fields(EscapedFields)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = info_span!("job", %request_id, attempt = 1);
            let _entered = span.enter();
            error!(error_kind = "invalid_request", reason = %reason, "dead-lettered");
        });
        let bytes = buffer.0.lock().expect("not poisoned").clone();
        String::from_utf8(bytes).expect("UTF-8")
    }

    #[test]
    fn line_breaks_in_values_are_escaped() {
        let line = logged(
            "r1\nERROR forged line\r",
            "reply_to \"x\" is refused\nINFO forged",
        );
        assert_eq!(
            line,
            "ERROR job{request_id=r1\\nERROR forged line\\r attempt=1}: dead-lettered \
             error_kind=\"invalid_request\" reason=reply_to \"x\" is refused\\nINFO forged\n"
        );
    }

    /// A `request_id` (or any other value from a message) that carries a terminal escape
    /// sequence and a line break is written as visible text, on one line, as
    /// tracing-subscriber's own formatter would escape it.
    #[test]
    fn terminal_escapes_in_values_are_escaped() {
        let line = logged(
            "r1\x1b[31m\nERROR forged\x07",
            "model \u{9b}2J \u{202e}evil\x7f\t",
        );
        assert_eq!(
            line,
            "ERROR job{request_id=r1\\x1b[31m\\nERROR forged\\x07 attempt=1}: dead-lettered \
             error_kind=\"invalid_request\" reason=model \\u{9b}2J \\u{202e}evil\\x7f\\t\n"
        );
        assert!(
            !line.trim_end_matches('\n').chars().any(is_escaped),
            "{line:?}"
        );
    }

    #[test]
    fn plain_values_print_as_before() {
        assert_eq!(
            logged("r-1", "bad"),
            "ERROR job{request_id=r-1 attempt=1}: dead-lettered error_kind=\"invalid_request\" \
             reason=bad\n"
        );
    }
}
