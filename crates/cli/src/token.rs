//! `ferry token`: mint an HS256 token for the gateway.

use std::time::Duration;

use ferry_gateway::auth::{MintClaims, Scope, mint};

use crate::CliError;
use crate::args::TokenArgs;

/// `90s`, `30m`, `1h`, `7d`, or plain seconds.
pub fn parse_ttl(s: &str) -> Result<Duration, CliError> {
    parse_duration("--ttl", s)
}

/// A duration flag's value: `90s`, `30m`, `1h`, `7d`, or plain seconds; an error names `flag`.
pub fn parse_duration(flag: &'static str, s: &str) -> Result<Duration, CliError> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| {
        CliError::usage(
            flag,
            format!("{s:?} is not a duration like 90s, 30m, 1h or 7d"),
        )
    })?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(CliError::usage(
                flag,
                format!("unknown unit {other:?}: use s, m, h or d"),
            ));
        }
    };
    let secs = n
        .checked_mul(unit_secs)
        .ok_or_else(|| CliError::usage(flag, format!("{s:?} is too long")))?;
    if secs == 0 {
        return Err(CliError::usage(flag, "must be longer than zero"));
    }
    Ok(Duration::from_secs(secs))
}

pub fn resolve(a: TokenArgs) -> Result<(Vec<u8>, MintClaims), CliError> {
    if a.sub.trim().is_empty() {
        return Err(CliError::usage("--sub", "must not be empty"));
    }
    let scopes: Vec<String> = a.scope.split_whitespace().map(str::to_owned).collect();
    if let Some(bad) = scopes.iter().find(|s| Scope::parse(s).is_none()) {
        let known: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
        return Err(CliError::usage(
            "--scope",
            format!("unknown scope {bad:?}; known scopes: {}", known.join(" ")),
        ));
    }
    let ttl = parse_ttl(&a.ttl)?;
    crate::gateway::check_secret("--secret", a.secret.as_bytes())?;
    Ok((
        a.secret.into_bytes(),
        MintClaims {
            sub: a.sub,
            scopes,
            tenant: a.tenant,
            ttl,
            issuer: a.issuer,
            audience: a.audience,
        },
    ))
}

pub fn run(secret: &[u8], claims: &MintClaims) -> Result<(), CliError> {
    let token = mint(secret, claims).map_err(|e| CliError::Internal(e.to_string()))?;
    println!("{token}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_ttl("60").unwrap(), Duration::from_secs(60));
        assert!(parse_ttl("1w").unwrap_err().to_string().contains("--ttl"));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("soon").is_err());
    }
}
