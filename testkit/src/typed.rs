//! Reading a manifest's object into its Rust type strictly: serde ignores fields a type does
//! not know, so a misspelt or misplaced field in a manifest would pass a plain deserialization.
//! The round trip back to JSON shows what was lost or changed.

use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// Deserializes `raw` as `T` and fails, naming every path, on anything the round trip does not
/// keep: fields the type does not know, misspelt fields, values of the wrong shape.
pub fn typed<T: DeserializeOwned + Serialize>(raw: &Value, what: &str) -> Result<T, String> {
    let object: T = serde_json::from_value(raw.clone()).map_err(|e| format!("{what}: {e}"))?;
    let back = serde_json::to_value(&object).map_err(|e| format!("{what}: {e}"))?;
    let mut problems = Vec::new();
    lost_in_round_trip(raw, &back, "", &mut problems);
    if problems.is_empty() {
        Ok(object)
    } else {
        Err(format!("{what}:\n  {}", problems.join("\n  ")))
    }
}

/// Paths of `raw` that the typed round trip `typed` lost or changed.
fn lost_in_round_trip(raw: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (raw, typed) {
        (Value::Object(r), Value::Object(t)) => {
            for (key, value) in r {
                let here = format!("{path}.{key}");
                match t.get(key) {
                    Some(tv) => lost_in_round_trip(value, tv, &here, out),
                    None => out.push(format!("{here}: unknown field")),
                }
            }
        }
        (Value::Array(r), Value::Array(t)) if r.len() == t.len() => {
            for (i, (rv, tv)) in r.iter().zip(t).enumerate() {
                lost_in_round_trip(rv, tv, &format!("{path}[{i}]"), out);
            }
        }
        (r, t) if r == t => {}
        (r, t) => out.push(format!("{path}: {r} became {t}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, Serialize)]
    struct Port {
        port: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    }

    #[test]
    fn unknown_and_changed_fields_are_named() {
        let ok = serde_json::json!({"port": 80, "name": "http"});
        assert_eq!(typed::<Port>(&ok, "p").unwrap().port, 80);
        let misspelt = serde_json::json!({"port": 80, "nmae": "http"});
        let err = typed::<Port>(&misspelt, "p").unwrap_err();
        assert!(err.contains(".nmae: unknown field"), "{err}");
        let nested = serde_json::json!([{"port": 80}, {"port": 81, "extra": 1}]);
        let err = typed::<Vec<Port>>(&nested, "ports").unwrap_err();
        assert!(err.contains("[1].extra: unknown field"), "{err}");
        let wrong = serde_json::json!({"port": "80"});
        assert!(typed::<Port>(&wrong, "p").is_err());
    }
}
