//! Validated names. Queue names end up inside Redis keys (`ferry:{queue}:…`) and in JSON built by Lua scripts
//! without escaping, so the allowed alphabet is deliberately small: ASCII letters, digits, `.`, `_`, `-`, `:`.

use std::fmt;

use crate::ValidationError;

/// Longest queue name or kind accepted.
pub const MAX_NAME_LEN: usize = 128;

fn check(field: &str, s: &str) -> Result<(), ValidationError> {
    if s.is_empty() {
        return Err(ValidationError::field(field, "must not be empty"));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(ValidationError::field(
            field,
            format!("must be at most {MAX_NAME_LEN} characters, got {}", s.len()),
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')))
    {
        return Err(ValidationError::field(
            field,
            format!("invalid character {c:?}: use ASCII letters, digits, '.', '_', '-' or ':'"),
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validate and wrap; the error names the field.
            pub fn parse(s: impl Into<String>) -> Result<Self, ValidationError> {
                let s = s.into();
                check($field, &s)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = ValidationError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A queue name: 1–128 characters of `[A-Za-z0-9._:-]`.
    QueueName,
    "queue"
);
name_type!(
    /// A job kind (which handler runs it): 1–128 characters of `[A-Za-z0-9._:-]`.
    Kind,
    "kind"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_simple_names() {
        for s in ["emails", "a", "ferry.noop", "tenant-1:reports_v2"] {
            assert_eq!(QueueName::parse(s).unwrap().as_str(), s);
        }
    }

    #[test]
    fn rejects_bad_names_and_names_the_field() {
        let e = QueueName::parse("").unwrap_err();
        assert_eq!(e.errors[0].field, "queue");
        assert!(e.to_string().contains("must not be empty"));
        let e = Kind::parse("a{b}").unwrap_err();
        assert_eq!(e.errors[0].field, "kind");
        assert!(e.to_string().contains("'{'"), "{e}");
        assert!(QueueName::parse("x".repeat(129)).is_err());
        assert!(QueueName::parse("x".repeat(128)).is_ok());
        assert!(QueueName::parse("with space").is_err());
        assert!(QueueName::parse("quote\"").is_err());
    }

    #[test]
    fn deserialize_validates() {
        let r: Result<QueueName, _> = serde_json::from_str("\"ok\"");
        assert!(r.is_ok());
        let r: Result<QueueName, _> = serde_json::from_str("\"not ok\"");
        assert!(r.is_err());
    }
}
