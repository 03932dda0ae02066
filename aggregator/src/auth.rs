//! Bearer-token authentication, scopes and per-token rate limits for the HTTP API and MCP.
//!
//! Tokens live in config as the secret itself (usually `${ENV_VAR}`) or as its SHA-256; only the hash is kept in
//! memory and a presented token is hashed before the lookup, so comparison time says nothing about the secret.
//! Scopes: `read` (queries, search, stats, metrics), `write` (storing records), `admin` (everything). Each token
//! may carry a token-bucket rate limit; a request over it gets 429 with `Retry-After`. `/health` and `/ready` are
//! always open so that probes need no secret.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Queries.
    Read,
    /// Storing records.
    Write,
    /// Everything, including administration.
    Admin,
}

impl Scope {
    /// Parses `read`, `write`, `admin`.
    pub fn parse(text: &str) -> Result<Scope, String> {
        match text {
            "read" => Ok(Scope::Read),
            "write" => Ok(Scope::Write),
            "admin" => Ok(Scope::Admin),
            other => Err(format!("`{other}` is not one of read, write, admin")),
        }
    }

    /// The name used in config and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

/// A token-bucket limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: f64,
    /// Requests that may arrive at once.
    pub burst: f64,
}

impl RateLimit {
    /// Parses `N/s`, `N/m` or `N/h`; the burst defaults to one second's worth (at least 1).
    pub fn parse(text: &str, burst: Option<u32>) -> Result<RateLimit, String> {
        let bad = || format!("`{text}` is not a rate like 50/s, 600/m or 1000/h");
        let (count, unit) = text.split_once('/').ok_or_else(bad)?;
        let count: f64 = count.trim().parse().map_err(|_| bad())?;
        let seconds = match unit.trim() {
            "s" | "sec" | "second" => 1.0,
            "m" | "min" | "minute" => 60.0,
            "h" | "hour" => 3600.0,
            _ => return Err(bad()),
        };
        if !(count.is_finite() && count > 0.0) {
            return Err(bad());
        }
        let per_second = count / seconds;
        let burst = burst.map_or(per_second.max(1.0), f64::from);
        if burst < 1.0 {
            return Err("the burst must be at least 1".into());
        }
        Ok(RateLimit { per_second, burst })
    }
}

/// One configured token.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// Who holds it (logs and metrics; never the secret).
    pub name: String,
    /// SHA-256 of the secret.
    pub sha256: [u8; 32],
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// Its rate limit.
    pub rate_limit: Option<RateLimit>,
}

/// Validated auth settings.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Configured tokens; none means every request is anonymous with every scope.
    pub tokens: Vec<TokenConfig>,
}

/// The SHA-256 of a secret.
pub fn hash_token(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Parses a 64-digit hex SHA-256.
pub fn parse_sha256(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    if text.len() != 64 {
        return Err("must be 64 hex digits (a SHA-256)".into());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| "must be 64 hex digits (a SHA-256)")?;
    }
    Ok(out)
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Token name, or `anonymous`.
    pub name: Arc<str>,
    scopes: Vec<Scope>,
}

impl Caller {
    /// Whether the caller holds `scope` (admin holds every scope).
    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer …` header.
    #[error("this endpoint needs `Authorization: Bearer <token>`")]
    Missing,
    /// The token is unknown.
    #[error("the bearer token is not valid")]
    Invalid,
    /// The token lacks a scope.
    #[error("token `{token}` lacks the `{scope}` scope")]
    Forbidden {
        /// Token name.
        token: String,
        /// The missing scope.
        scope: &'static str,
    },
    /// Over the token's rate limit.
    #[error("token `{token}` is over its rate limit; retry in {retry_after_secs} s")]
    RateLimited {
        /// Token name.
        token: String,
        /// Seconds until a request would be admitted.
        retry_after_secs: u64,
    },
}

struct TokenState {
    name: Arc<str>,
    scopes: Vec<Scope>,
    limit: Option<RateLimit>,
    /// Tokens left and when they were counted.
    bucket: Mutex<(f64, Instant)>,
}

/// The authenticator.
pub struct Auth {
    tokens: HashMap<[u8; 32], TokenState>,
}

impl Auth {
    /// An authenticator for `config`.
    pub fn new(config: &AuthConfig) -> Auth {
        let tokens = config
            .tokens
            .iter()
            .map(|t| {
                let burst = t.rate_limit.map_or(0.0, |l| l.burst);
                (
                    t.sha256,
                    TokenState {
                        name: Arc::from(t.name.as_str()),
                        scopes: t.scopes.clone(),
                        limit: t.rate_limit,
                        bucket: Mutex::new((burst, Instant::now())),
                    },
                )
            })
            .collect();
        Auth { tokens }
    }

    /// Whether requests must carry a token.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Identifies the caller from the `Authorization` header value, charges its rate limit and checks that it
    /// holds `scope` (`None`: any authenticated caller).
    pub fn check(&self, authorization: Option<&str>, scope: Option<Scope>) -> Result<Caller, AuthError> {
        if !self.enabled() {
            return Ok(Caller { name: Arc::from("anonymous"), scopes: vec![Scope::Admin] });
        }
        let header = authorization.ok_or(AuthError::Missing)?;
        let secret = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or(AuthError::Missing)?;
        let state = self.tokens.get(&hash_token(secret)).ok_or(AuthError::Invalid)?;
        let caller = Caller { name: state.name.clone(), scopes: state.scopes.clone() };
        if let Some(scope) = scope
            && !caller.may(scope)
        {
            return Err(AuthError::Forbidden { token: state.name.to_string(), scope: scope.as_str() });
        }
        if let Some(limit) = state.limit {
            let mut bucket = state.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let refill = now.duration_since(bucket.1).as_secs_f64() * limit.per_second;
            bucket.0 = (bucket.0 + refill).min(limit.burst);
            bucket.1 = now;
            if bucket.0 < 1.0 {
                let wait = Duration::from_secs_f64((1.0 - bucket.0) / limit.per_second);
                return Err(AuthError::RateLimited {
                    token: state.name.to_string(),
                    retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                });
            }
            bucket.0 -= 1.0;
        }
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(&AuthConfig {
            tokens: vec![
                TokenConfig {
                    name: "reader".into(),
                    sha256: hash_token("r-secret"),
                    scopes: vec![Scope::Read],
                    rate_limit: Some(RateLimit { per_second: 0.001, burst: 2.0 }),
                },
                TokenConfig {
                    name: "ops".into(),
                    sha256: hash_token("a-secret"),
                    scopes: vec![Scope::Admin],
                    rate_limit: None,
                },
            ],
        })
    }

    #[test]
    fn tokens_scopes_and_limits() {
        let auth = auth();
        assert_eq!(auth.check(None, Some(Scope::Read)).unwrap_err(), AuthError::Missing);
        assert_eq!(auth.check(Some("Basic abc"), Some(Scope::Read)).unwrap_err(), AuthError::Missing);
        assert_eq!(auth.check(Some("Bearer nope"), Some(Scope::Read)).unwrap_err(), AuthError::Invalid);
        assert!(matches!(
            auth.check(Some("Bearer r-secret"), Some(Scope::Write)),
            Err(AuthError::Forbidden { scope: "write", .. })
        ));
        assert!(auth.check(Some("Bearer a-secret"), Some(Scope::Write)).is_ok(), "admin holds every scope");
        // The refused write above did not spend the reader's budget: two requests pass, the third waits.
        assert!(auth.check(Some("Bearer r-secret"), Some(Scope::Read)).is_ok());
        assert!(auth.check(Some("Bearer r-secret"), Some(Scope::Read)).is_ok());
        match auth.check(Some("Bearer r-secret"), Some(Scope::Read)) {
            Err(AuthError::RateLimited { retry_after_secs, .. }) => assert!(retry_after_secs >= 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn without_tokens_everyone_is_admin() {
        let auth = Auth::new(&AuthConfig::default());
        assert!(auth.check(None, Some(Scope::Admin)).unwrap().may(Scope::Write));
    }

    #[test]
    fn rates_and_hashes_parse() {
        assert_eq!(RateLimit::parse("600/m", None).unwrap(), RateLimit { per_second: 10.0, burst: 10.0 });
        assert_eq!(RateLimit::parse("1/h", Some(5)).unwrap().burst, 5.0);
        for bad in ["", "5", "x/s", "5/d", "0/s", "-1/s"] {
            assert!(RateLimit::parse(bad, None).is_err(), "{bad}");
        }
        let hex: String = hash_token("x").iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(parse_sha256(&hex).unwrap(), hash_token("x"));
        assert!(parse_sha256("abc").is_err());
        assert!(parse_sha256(&"zz".repeat(32)).is_err());
    }
}
