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

/// A configuration file that cannot be used. Every variant names what is wrong and where.
#[cfg(feature = "config")]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `${…}` expansion failed.
    #[error(transparent)]
    Expand(#[from] SettingError),
    /// The text is not YAML.
    #[error("configuration is not valid YAML: {0}")]
    Yaml(String),
    /// A key is unknown or its value has the wrong type.
    #[error("key `{key}`{origin}: {message}")]
    Key {
        /// Dotted path of the key.
        key: String,
        /// What is wrong.
        message: String,
        /// ` (set by AKOSHA_…)` when the value came from the environment.
        origin: String,
    },
    /// A value has the right type but is out of range or inconsistent.
    #[error("key `{key}`: {message}")]
    Invalid {
        /// Dotted path of the key.
        key: String,
        /// What is wrong and what is allowed.
        message: String,
    },
}

#[cfg(feature = "config")]
impl ConfigError {
    /// A value out of range, naming the key.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid { key: key.into(), message: message.into() }
    }
}

/// How environment variables override a configuration file.
#[cfg(feature = "config")]
#[derive(Debug, Clone, Copy)]
pub struct EnvOverrides<'a> {
    /// Variables `<prefix>SECTION__KEY` set `section.key` (e.g. `AKOSHA_AGENT__BUFFER__MAX_BYTES`).
    pub prefix: &'a str,
    /// Documented short names, e.g. `("AKOSHA_WARM_PATH", "warm.path")`.
    pub aliases: &'a [(&'a str, &'a str)],
}

/// Parses a YAML configuration: expands `${VAR:default}` with `lookup`, applies environment overrides from
/// `env` (precedence: environment > file > defaults of `T`), then deserialises into `T`, whose unknown keys and
/// bad values come back as [`ConfigError::Key`] naming the dotted key (and the variable, if one set it).
#[cfg(feature = "config")]
pub fn parse_config<T: serde::de::DeserializeOwned>(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
    env: &[(String, String)],
    overrides: EnvOverrides<'_>,
) -> Result<T, ConfigError> {
    use serde_norway::{Mapping, Value};

    let expanded = expand_env(text, lookup)?;
    let mut root: Value = serde_norway::from_str(&expanded).map_err(|e| ConfigError::Yaml(e.to_string()))?;
    if root.is_null() {
        root = Value::Mapping(Mapping::new());
    }
    let mut origins: Vec<(String, String)> = Vec::new();
    for (name, raw) in env {
        let path = match overrides.aliases.iter().find(|(alias, _)| alias == name) {
            Some((_, path)) => (*path).to_owned(),
            None => match name.strip_prefix(overrides.prefix) {
                Some(rest) if !rest.is_empty() => {
                    rest.split("__").map(str::to_ascii_lowercase).collect::<Vec<_>>().join(".")
                }
                _ => continue,
            },
        };
        let value: Value = serde_norway::from_str(raw).unwrap_or_else(|_| Value::String(raw.clone()));
        let value = if value.is_null() { Value::String(raw.clone()) } else { value };
        set_path(&mut root, &path, value).map_err(|message| ConfigError::Key {
            key: path.clone(),
            message,
            origin: format!(" (set by {name})"),
        })?;
        origins.push((path, name.clone()));
    }
    serde_path_to_error::deserialize(root).map_err(|e| {
        let key = e.path().to_string();
        let origin = origins
            .iter()
            .find(|(path, _)| {
                key == *path || key.starts_with(&format!("{path}.")) || path.starts_with(&format!("{key}."))
            })
            .map(|(_, name)| format!(" (set by {name})"))
            .unwrap_or_default();
        ConfigError::Key { key, message: e.into_inner().to_string(), origin }
    })
}

#[cfg(feature = "config")]
fn set_path(root: &mut serde_norway::Value, path: &str, value: serde_norway::Value) -> Result<(), String> {
    use serde_norway::{Mapping, Value};
    let mut node = root;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let Value::Mapping(map) = node else {
            return Err(format!("cannot set `{part}` inside a value that is not a mapping"));
        };
        let key = Value::String(part.to_owned());
        if parts.peek().is_none() {
            map.insert(key, value);
            return Ok(());
        }
        node = map.entry(key).or_insert_with(|| Value::Mapping(Mapping::new()));
        if node.is_null() {
            *node = Value::Mapping(Mapping::new());
        }
    }
    Ok(())
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

    #[cfg(feature = "config")]
    mod loading {
        use super::super::*;

        #[derive(Debug, serde::Deserialize, PartialEq)]
        #[serde(deny_unknown_fields)]
        struct Conf {
            name: String,
            #[serde(default)]
            inner: Inner,
        }

        #[derive(Debug, Default, serde::Deserialize, PartialEq)]
        #[serde(deny_unknown_fields)]
        struct Inner {
            #[serde(default)]
            size: u32,
            #[serde(default)]
            path: String,
        }

        const OVERRIDES: EnvOverrides<'static> =
            EnvOverrides { prefix: "APP__", aliases: &[("APP_PATH", "inner.path")] };

        fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
            pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
        }

        #[test]
        fn environment_beats_file_beats_default() {
            let c: Conf = parse_config(
                "name: a\ninner: {size: 1}",
                |_| None,
                &env(&[("APP__INNER__SIZE", "7"), ("APP_PATH", "/p")]),
                OVERRIDES,
            )
            .unwrap();
            assert_eq!(c, Conf { name: "a".into(), inner: Inner { size: 7, path: "/p".into() } });
        }

        #[test]
        fn errors_name_the_key_and_the_variable() {
            let e = parse_config::<Conf>("name: a\ninner: {sise: 1}", |_| None, &[], OVERRIDES).unwrap_err();
            assert!(e.to_string().starts_with("key `inner.sise`: unknown field `sise`"), "{e}");
            let e =
                parse_config::<Conf>("name: a", |_| None, &env(&[("APP__INNER__SIZE", "big")]), OVERRIDES).unwrap_err();
            assert!(e.to_string().contains("key `inner.size` (set by APP__INNER__SIZE)"), "{e}");
            let e = parse_config::<Conf>("name: [", |_| None, &[], OVERRIDES).unwrap_err();
            assert!(matches!(e, ConfigError::Yaml(_)));
        }
    }
}
