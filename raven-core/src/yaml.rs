//! A YAML document reader that tolerates what people actually write: a
//! mapping key repeated with the same value is a harmless slip (reported as a
//! warning), a key repeated with a different value is an error naming both
//! values. `serde_yaml_ng::Value` alone rejects either outright.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_yaml_ng::{Mapping, Value};

/// A repeated key found while reading a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepeatedKey {
    /// Path of the mapping holding the key, then the key (`spec.endpoints[1].port`).
    pub path: String,
    pub first: String,
    pub repeated: String,
}

impl RepeatedKey {
    /// Same value twice: nothing is ambiguous.
    pub fn is_harmless(&self) -> bool {
        self.first == self.repeated
    }
}

/// Reads one document into a `Value`, collecting repeated keys instead of
/// failing on them. The first occurrence of a key wins.
pub fn read_document<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<(Value, Vec<RepeatedKey>), D::Error> {
    let repeats = RefCell::new(Vec::new());
    let value = Seed {
        path: String::new(),
        repeats: &repeats,
    }
    .deserialize(d)?;
    Ok((value, repeats.into_inner()))
}

struct Seed<'a> {
    path: String,
    repeats: &'a RefCell<Vec<RepeatedKey>>,
}

impl Seed<'_> {
    fn child(&self, segment: &str) -> Self {
        let path = if self.path.is_empty() || segment.starts_with('[') {
            format!("{}{segment}", self.path)
        } else {
            format!("{}.{segment}", self.path)
        };
        Seed {
            path,
            repeats: self.repeats,
        }
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => serde_yaml_ng::to_string(other)
            .map(|s| s.trim_end().to_owned())
            .unwrap_or_default(),
    }
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self.child(&format!("[{}]", out.len())))? {
            out.push(v);
        }
        Ok(Value::Sequence(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Mapping::new();
        while let Some(key) = map.next_key_seed(self.child("<key>"))? {
            let value = map.next_value_seed(self.child(&show(&key)))?;
            match out.get(&key) {
                Some(first) => self.repeats.borrow_mut().push(RepeatedKey {
                    path: self.child(&show(&key)).path,
                    first: show(first),
                    repeated: show(&value),
                }),
                None => {
                    out.insert(key, value);
                }
            }
        }
        Ok(Value::Mapping(out))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        // Tagged values (`!tag value`): keep the value, drop the tag.
        let (tag, variant): (Value, _) = data.variant_seed(self.child("<tag>"))?;
        let _ = tag;
        de::VariantAccess::newtype_variant_seed(variant, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(s: &str) -> (Value, Vec<RepeatedKey>) {
        read_document(serde_yaml_ng::Deserializer::from_str(s)).unwrap_or((Value::Null, vec![]))
    }

    #[test]
    fn repeated_key_with_same_value_is_harmless_and_reported_with_its_path() {
        let (v, r) = read("spec:\n  endpoints:\n  - port: 4500\n    port: 4500\n");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].path, "spec.endpoints[0].port");
        assert!(r[0].is_harmless());
        assert_eq!(
            v["spec"]["endpoints"][0]["port"],
            Value::Number(4500.into())
        );
    }

    #[test]
    fn repeated_key_with_different_values_keeps_both_values_for_the_report() {
        let (_, r) = read("type: tunnel\ntype: proxy\n");
        assert_eq!(
            r,
            vec![RepeatedKey {
                path: "type".into(),
                first: "tunnel".into(),
                repeated: "proxy".into()
            }]
        );
        assert!(!r[0].is_harmless());
    }
}
