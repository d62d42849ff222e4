//! What the CLI prints: aligned tables for a person at a terminal, the broker's JSON for scripts.

use comfy_table::{presets, ContentArrangement, Table};
use serde_json::Value;

/// `--output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

impl Output {
    /// The default: a table on a terminal, JSON when piped.
    pub fn detect() -> Self {
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            Self::Table
        } else {
            Self::Json
        }
    }
}

/// `s` safe to print on a terminal: control characters (an escape sequence stored in a
/// field, a carriage return, a newline) shown escaped (`\u{1b}[2J`), everything else as is.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// Rows under a header, columns aligned, no borders (as `kubectl get` prints). Cells are
/// shown `printable`.
pub fn table(headers: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(headers.iter().copied());
    for row in rows {
        t.add_row(row.iter().map(|c| printable(c).into_owned()));
    }
    t.lines()
        .map(|l| l.strip_prefix(' ').unwrap_or(&l).trim_end().to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `label  value` lines for one object.
pub fn fields(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:width$}  {}", printable(v)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The broker's JSON as YAML (the same fields).
pub fn yaml(v: &Value) -> String {
    serde_yaml::to_string(v).expect("JSON values serialise as YAML")
}

pub fn pretty_json(v: &Value) -> String {
    serde_json::to_string_pretty(v).expect("serialises")
}

/// Seconds as `1h 2m`, `4m 59s`, `12s`.
pub fn duration(secs: i64) -> String {
    let secs = secs.max(0);
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

/// A tenant's health in a word or two: `ok`, `circuit open`, `error: <code>`, `never minted`.
pub fn health_summary(health: &super::views::Health) -> String {
    // The broker's own one-word health (`health.state`), so the CLI and the console agree.
    match health.state.as_str() {
        "circuit_open" => "circuit open".into(),
        "error" => format!(
            "error: {}",
            health
                .last_error
                .as_ref()
                .and_then(|e| e.code.as_deref())
                .unwrap_or("-")
        ),
        "ok" => "ok".into(),
        "never_minted" => "never minted".into(),
        other => other.to_owned(),
    }
}

/// The current token's time left, or `-`.
pub fn token_left(health: &super::views::Health) -> String {
    health
        .token
        .as_ref()
        .map_or_else(|| "-".into(), |t| duration(t.expires_in))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn terminal_escapes_are_shown_not_run() {
        assert_eq!(
            printable("https://x.example.com/\u{1b}[2J\r\nfake"),
            "https://x.example.com/\\u{1b}[2J\\r\\nfake"
        );
        let t = table(&["A"], [vec!["a\u{7}b\u{9b}c".to_string()]]);
        assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "{t:?}");
        assert!(t.contains("a\\u{7}b\\u{9b}c"), "{t}");
        assert_eq!(printable("plain é"), "plain é");
    }

    #[test]
    fn health_in_a_word() {
        let word = |v: Value| health_summary(&super::super::views::read(&v, "health").unwrap());
        let health = |state: &str, last_error: Value| {
            json!({"state": state, "last_success_at": null, "last_error": last_error,
                "circuit": null, "token": null, "mints_last_hour": 0})
        };
        assert_eq!(word(health("never_minted", Value::Null)), "never minted");
        assert_eq!(word(health("ok", Value::Null)), "ok");
        assert_eq!(
            word(health(
                "error",
                json!({"at": "t", "code": "upstream_rejected_credentials", "detail": "d"})
            )),
            "error: upstream_rejected_credentials"
        );
        assert_eq!(word(health("circuit_open", Value::Null)), "circuit open");
    }

    #[test]
    fn durations_and_tables() {
        assert_eq!(duration(3725), "1h 2m");
        assert_eq!(duration(299), "4m 59s");
        assert_eq!(duration(-5), "0s");
        let t = table(&["ID", "NAME"], vec![vec!["a".into(), "long name".into()]]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].find("NAME"), lines[1].find("long name"));
    }
}
