//! Configuration conventions shared by the agent and the aggregator, as pure functions.
//!
//! Both binaries read YAML in which `${VAR}` and `${VAR:default}` are replaced from the environment before
//! parsing, and write sizes (`64MiB`) and durations (`250ms`) as strings. The lookup of variables is passed in,
//! so these functions stay free of I/O and are tested without touching the process environment.

use std::time::Duration;

/// A configuration value that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    /// `${` without a closing `}`.
    #[error("line {line}: unterminated `${{` in configuration")]
    Unterminated {
        /// 1-based line.
        line: usize,
    },
    /// `${VAR}` without default and the variable is not set.
    #[error("line {line}: environment variable `{name}` is not set and has no default (write `${{{name}:default}}`)")]
    Unset {
        /// 1-based line.
        line: usize,
        /// Variable name.
        name: String,
    },
    /// A variable name with characters other than letters, digits and `_`.
    #[error("line {line}: `{name}` is not a valid environment variable name")]
    BadName {
        /// 1-based line.
        line: usize,
        /// The name.
        name: String,
    },
    /// Not a size like `512KiB`.
    #[error("`{0}` is not a size (examples: 4096, 512KiB, 64MiB, 1GiB)")]
    BadSize(String),
    /// Not a duration like `250ms`.
    #[error("`{0}` is not a duration (examples: 500us, 250ms, 10s, 5m, 1h)")]
    BadDuration(String),
}

/// Replaces `${VAR}` and `${VAR:default}` using `lookup`. `$$` stands for a literal `$`.
///
/// Comments are expanded too: YAML comments are rare in places where that matters, and a variable in a
/// comment that is unset without default is reported rather than silently skipped.
pub fn expand_env(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, SettingError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let line_of = |rest: &str| text[..text.len() - rest.len()].matches('\n').count() + 1;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let at_dollar = &rest[pos..];
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail.find('}').ok_or(SettingError::Unterminated { line: line_of(at_dollar) })?;
            let inner = &tail[..end];
            let (name, default) = match inner.split_once(':') {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(SettingError::BadName { line: line_of(at_dollar), name: name.to_owned() });
            }
            match lookup(name).filter(|v| !v.is_empty()).or_else(|| default.map(str::to_owned)) {
                Some(value) => out.push_str(&value),
                None => return Err(SettingError::Unset { line: line_of(at_dollar), name: name.to_owned() }),
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Parses a byte size: a plain number of bytes or a number with `B`, `KB`, `KiB`, `MB`, `MiB`, `GB`, `GiB`, `TB`,
/// `TiB` (case-insensitive).
pub fn parse_byte_size(s: &str) -> Result<u64, SettingError> {
    let bad = || SettingError::BadSize(s.to_owned());
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        "tb" => 1_000_000_000_000,
        "tib" | "t" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = number * multiplier as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// Parses a duration: a number followed by `us`, `ms`, `s`, `m`, `h` or `d`.
pub fn parse_duration(s: &str) -> Result<Duration, SettingError> {
    let bad = || SettingError::BadDuration(s.to_owned());
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit.trim() {
        "us" | "µs" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        "d" => number * 86400.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| bad())
}

/// Replaces a leading `~/` with `home`.
pub fn expand_home(path: &str, home: Option<&str>) -> String {
    match (path.strip_prefix("~/"), home) {
        (Some(rest), Some(home)) => format!("{}/{rest}", home.trim_end_matches('/')),
        _ if path == "~" => home.unwrap_or("~").to_owned(),
        _ => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOME_DIR" => Some("/home/dev".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_variables_and_defaults() {
        assert_eq!(expand_env("a: ${HOME_DIR}/x", env).unwrap(), "a: /home/dev/x");
        assert_eq!(expand_env("a: ${NOPE:fallback}", env).unwrap(), "a: fallback");
        assert_eq!(expand_env("a: ${EMPTY:used}", env).unwrap(), "a: used");
        assert_eq!(expand_env("a: ${NOPE:}", env).unwrap(), "a: ");
        assert_eq!(expand_env("cost: $$5 $x", env).unwrap(), "cost: $5 $x");
        assert_eq!(expand_env("u: ${A:http://h:1}", env).unwrap(), "u: http://h:1");
    }

    #[test]
    fn expansion_errors_name_line_and_variable() {
        assert_eq!(
            expand_env("a: 1\nb: ${MISSING}", env),
            Err(SettingError::Unset { line: 2, name: "MISSING".into() })
        );
        assert_eq!(expand_env("a: ${OPEN", env), Err(SettingError::Unterminated { line: 1 }));
        assert!(matches!(expand_env("a: ${A B}", env), Err(SettingError::BadName { .. })));
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_byte_size("4096").unwrap(), 4096);
        assert_eq!(parse_byte_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_byte_size("1.5 GB").unwrap(), 1_500_000_000);
        assert!(parse_byte_size("12 parsecs").is_err());
        assert!(parse_byte_size("").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(expand_home("~/.akosha", Some("/root")), "/root/.akosha");
        assert_eq!(expand_home("/abs", Some("/root")), "/abs");
    }
}
