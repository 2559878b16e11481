//! Validated names. A `NodeName` or `GatewayName` that exists is a valid
//! Kubernetes object name (RFC 1123 subdomain), so code past the parsing edge
//! never handles an empty or malformed name.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Why a string is not a valid object name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("{0:?} is longer than 253 characters")]
    TooLong(String),
    #[error(
        "{0:?} is not a valid name: use lower-case letters, digits, '-' and '.', starting and ending with a letter or digit"
    )]
    Invalid(String),
}

fn check_subdomain(s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > 253 {
        return Err(NameError::TooLong(s.to_owned()));
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let first = s.chars().next().is_some_and(alnum);
    let last = s.chars().last().is_some_and(alnum);
    if !(first && last && s.chars().all(ok_char)) {
        return Err(NameError::Invalid(s.to_owned()));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Parses and validates a name.
            pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
                let s = s.into();
                check_subdomain(&s)?;
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

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        // Ordered and compared as the string it holds, so a map keyed by
        // names is looked up by `&str` too (no name built per lookup).
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// The name of a Kubernetes Node.
    NodeName
);
name_type!(
    /// The name of a (cluster-scoped) Raven `Gateway`.
    GatewayName
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kubernetes_node_names() {
        assert!(NodeName::new("izbp15inok0kbfkg3in52rz").is_ok());
        assert!(NodeName::new("node-1.example.com").is_ok());
    }

    #[test]
    fn rejects_empty_uppercase_and_edge_dashes() {
        assert_eq!(NodeName::new(""), Err(NameError::Empty));
        assert!(matches!(NodeName::new("Node1"), Err(NameError::Invalid(_))));
        assert!(matches!(
            GatewayName::new("-gw"),
            Err(NameError::Invalid(_))
        ));
        assert!(matches!(
            GatewayName::new("gw-"),
            Err(NameError::Invalid(_))
        ));
        assert!(matches!(
            GatewayName::new("a".repeat(254)),
            Err(NameError::TooLong(_))
        ));
    }
}
