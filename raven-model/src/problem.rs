//! Problems found in input objects. A problem names the object, the field and
//! the offending value, so an operator can find and fix it; it never stops the
//! rest of the cluster from being compiled.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The object (or the named part of it) was not used.
    Error,
    /// The object was used, but something in it is probably a mistake.
    Warning,
}

/// One problem with one input object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Problem {
    pub severity: Severity,
    /// The object, as `Kind/name` (`Gateway/gw-cloud`, `Node/edge-1`,
    /// `ConfigMap/kube-system/raven-cfg`) or, when no name could be read, the
    /// manifest document (`cloud.yaml#2`).
    pub object: String,
    /// Field path inside the object (`spec.endpoints[0].publicIP`); empty when
    /// the problem concerns the whole object.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub field: String,
    /// The offending value as written; empty when there is none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub value: String,
    pub message: String,
}

impl Problem {
    pub fn error(
        object: impl Into<String>,
        field: impl Into<String>,
        value: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            severity: Severity::Error,
            object: object.into(),
            field: field.into(),
            value: value.into(),
            message: message.into(),
        }
    }

    pub fn warning(
        object: impl Into<String>,
        field: impl Into<String>,
        value: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(object, field, value, message)
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{sev}: {}", self.object)?;
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        if !self.value.is_empty() {
            write!(f, " = {:?}", self.value)?;
        }
        write!(f, ": {}", self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_object_field_and_value() {
        let p = Problem::error(
            "Gateway/gw-cloud",
            "spec.endpoints[0].publicIP",
            "47.xx.xx.xx",
            "must be an IP address",
        );
        assert_eq!(
            p.to_string(),
            r#"error: Gateway/gw-cloud: spec.endpoints[0].publicIP = "47.xx.xx.xx": must be an IP address"#
        );
    }
}
