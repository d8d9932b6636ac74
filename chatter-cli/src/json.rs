//! JSON to MessagePack and back, through serde: arguments are `serde_json::Value`s
//! (serialized as chatter-rpc encodes any serde value), replies and application errors are
//! decoded from whatever MessagePack value arrives into JSON ([`Json`]).

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Any MessagePack value, as JSON: byte strings become arrays of numbers (what a `Vec<u8>`
/// argument accepts back), integers beyond 64 bits decimal strings, map keys that are not
/// strings their JSON text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Json(pub(crate) Value);

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor).map(Json)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any MessagePack value")
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

    fn visit_i128<E>(self, v: i128) -> Result<Value, E> {
        Ok(i64::try_from(v).map_or_else(|_| Value::String(v.to_string()), Value::from))
    }

    fn visit_u128<E>(self, v: u128) -> Result<Value, E> {
        Ok(u64::try_from(v).map_or_else(|_| Value::String(v.to_string()), Value::from))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // NaN and the infinities have no JSON form.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_bytes<E>(self, v: &[u8]) -> Result<Value, E> {
        Ok(Value::Array(v.iter().map(|&b| Value::from(b)).collect()))
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Json::deserialize(d).map(|j| j.0)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Json::deserialize(d).map(|j| j.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(Json(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some((Json(key), Json(value))) = map.next_entry()? {
            let key = match key {
                Value::String(s) => s,
                other => other.to_string(),
            };
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, _data: A) -> Result<Value, A::Error> {
        Err(de::Error::custom("an enum outside any MessagePack form"))
    }
}

/// Parses the command line's arguments, one JSON value each; the error names the
/// argument (`describe` gives its name and type, when known).
pub(crate) fn parse_args(
    args: &[String],
    describe: impl Fn(usize) -> Option<String>,
) -> Result<Vec<Value>, String> {
    args.iter()
        .enumerate()
        .map(|(i, text)| {
            let which = describe(i).map_or_else(String::new, |d| format!(" ({d})"));
            parse_value(text, &format!("argument {}{which}", i + 1))
        })
        .collect()
}

/// Parses one JSON value from the command line; the error says `what` it was and, when it
/// looks like a bare string, how to quote it.
pub(crate) fn parse_value(text: &str, what: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| {
        let quoted = if text.starts_with('"') {
            String::new()
        } else {
            format!("; a string needs JSON quotes, quoted for the shell too: '\"{text}\"'")
        };
        format!("{what} is not JSON: {e}: {text}{quoted}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_json_names_the_argument_and_suggests_quotes() {
        let args = vec!["2".to_owned(), "ada".to_owned()];
        let err = parse_args(&args, |i| Some(format!("arg{i}: String"))).unwrap_err();
        assert!(
            err.starts_with("argument 2 (arg1: String) is not JSON"),
            "{err}"
        );
        assert!(err.contains("'\"ada\"'"), "{err}");
        let ok = parse_args(&["[1, 2]".to_owned()], |_| None).unwrap();
        assert_eq!(ok, vec![serde_json::json!([1, 2])]);
    }
}
