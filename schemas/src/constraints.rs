//! Value constraints of an input contract, checked on decoded Arrow batches.
//!
//! The Arrow schema derived in [`crate::input`] catches wrong types and missing required
//! fields; these catch well-typed values the contract still forbids: a negative amount, an
//! amount that overflowed to infinity (`1e999`), a channel that is not one of the enumerated
//! categories (the SQL would silently map it to "not online" and the model would score a
//! category it never saw), an empty id. The JSON Schema keywords read are `minimum`,
//! `maximum`, `exclusiveMinimum`, `exclusiveMaximum`, `enum` (strings), `minLength` and
//! `maxLength`; every `number` must also be finite, whether or not the schema says so.
//!
//! Details name the field and the rule, never the value: a dead letter's detail header and
//! logs must not carry what could be a card number pasted into the wrong field.

use std::collections::BTreeSet;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use serde_json::Value;

use crate::SchemaError;

/// A number that is NaN or ±infinity (JSON has no such literals, but `1e999` overflows).
pub const NON_FINITE: &str = "non-finite-number";
/// A number outside `minimum` / `maximum` / `exclusiveMinimum` / `exclusiveMaximum`.
pub const OUT_OF_RANGE: &str = "out-of-range";
/// A string not among the property's `enum` values.
pub const UNKNOWN_CATEGORY: &str = "unknown-category";
/// A string shorter than `minLength` or longer than `maxLength` (in characters).
pub const INVALID_LENGTH: &str = "invalid-length";

/// The first rule a row breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Machine-readable cause (one of this module's constants).
    pub cause: &'static str,
    /// For humans: the field and the rule, never the value.
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Bound {
    value: f64,
    exclusive: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum Rule {
    Finite,
    Range {
        min: Option<Bound>,
        max: Option<Bound>,
    },
    OneOf(BTreeSet<String>),
    Length {
        min: Option<usize>,
        max: Option<usize>,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct PropertyRule {
    property: String,
    rule: Rule,
}

/// The value rules of one input contract.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InputConstraints {
    rules: Vec<PropertyRule>,
}

impl InputConstraints {
    /// Reads the rules of a flat JSON object schema (the same document the Arrow schema is
    /// derived from). `name` is only used in errors.
    pub fn from_json_schema(name: &str, json_schema: &str) -> Result<Self, SchemaError> {
        let unsupported = |reason: String| SchemaError::Unsupported {
            schema: name.to_string(),
            reason,
        };
        let doc: Value = serde_json::from_str(json_schema)?;
        let properties = doc
            .get("properties")
            .and_then(Value::as_object)
            .ok_or_else(|| unsupported("has no `properties` object".into()))?;
        let mut rules = Vec::new();
        for (property, spec) in properties {
            let mut push = |rule| {
                rules.push(PropertyRule {
                    property: property.clone(),
                    rule,
                })
            };
            let types: Vec<&str> = match spec.get("type") {
                Some(Value::String(t)) => vec![t.as_str()],
                Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            let number = |key: &str| -> Result<Option<f64>, SchemaError> {
                match spec.get(key) {
                    None => Ok(None),
                    Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                        unsupported(format!("`{property}`: `{key}` must be a number"))
                    }),
                }
            };
            let count = |key: &str| -> Result<Option<usize>, SchemaError> {
                match spec.get(key) {
                    None => Ok(None),
                    Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                        unsupported(format!(
                            "`{property}`: `{key}` must be a non-negative integer"
                        ))
                    }),
                }
            };
            if types.contains(&"number") {
                push(Rule::Finite);
            }
            let bound =
                |inclusive: Option<f64>, exclusive: Option<f64>| match (inclusive, exclusive) {
                    (_, Some(value)) => Some(Bound {
                        value,
                        exclusive: true,
                    }),
                    (Some(value), None) => Some(Bound {
                        value,
                        exclusive: false,
                    }),
                    (None, None) => None,
                };
            let min = bound(number("minimum")?, number("exclusiveMinimum")?);
            let max = bound(number("maximum")?, number("exclusiveMaximum")?);
            if min.is_some() || max.is_some() {
                if !types.iter().any(|t| matches!(*t, "number" | "integer")) {
                    return Err(unsupported(format!(
                        "`{property}`: numeric bounds on a non-numeric property"
                    )));
                }
                push(Rule::Range { min, max });
            }
            if let Some(values) = spec.get("enum") {
                let values = values
                    .as_array()
                    .ok_or_else(|| unsupported(format!("`{property}`: `enum` must be an array")))?;
                let mut allowed = BTreeSet::new();
                for v in values {
                    match v {
                        Value::String(s) => {
                            allowed.insert(s.clone());
                        }
                        // A nullable enum lists null; nulls are the Arrow schema's business.
                        Value::Null => {}
                        _ => {
                            return Err(unsupported(format!(
                                "`{property}`: only string `enum` values are supported"
                            )))
                        }
                    }
                }
                push(Rule::OneOf(allowed));
            }
            let (min_len, max_len) = (count("minLength")?, count("maxLength")?);
            if min_len.is_some() || max_len.is_some() {
                push(Rule::Length {
                    min: min_len,
                    max: max_len,
                });
            }
        }
        Ok(Self { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Checks every row of `batch` (decoded against the same contract); returns, per row, the
    /// first rule it breaks. Nulls pass: whether a field may be null is the Arrow schema's
    /// rule. A property the batch lacks, or of another type, is a programming error reported
    /// as such.
    pub fn check(&self, batch: &RecordBatch) -> Result<Vec<Option<Violation>>, SchemaError> {
        let rows = batch.num_rows();
        let mut out: Vec<Option<Violation>> = vec![None; rows];
        for PropertyRule { property, rule } in &self.rules {
            let column =
                batch
                    .column_by_name(property)
                    .ok_or_else(|| SchemaError::Unsupported {
                        schema: "decoded batch".into(),
                        reason: format!("no column `{property}` to check"),
                    })?;
            let mismatch = || SchemaError::Unsupported {
                schema: "decoded batch".into(),
                reason: format!("column `{property}` is {}", column.data_type()),
            };
            let mut flag = |row: usize, cause: &'static str, detail: String| {
                if out[row].is_none() {
                    out[row] = Some(Violation { cause, detail });
                }
            };
            match rule {
                Rule::Finite => {
                    let values = column
                        .as_primitive_opt::<Float64Type>()
                        .ok_or_else(mismatch)?;
                    for row in 0..rows {
                        if values.is_valid(row) && !values.value(row).is_finite() {
                            flag(
                                row,
                                NON_FINITE,
                                format!("`{property}` is not a finite number"),
                            );
                        }
                    }
                }
                Rule::Range { min, max } => {
                    let value_at: Box<dyn Fn(usize) -> Option<f64>> = match column.data_type() {
                        DataType::Float64 => {
                            let c = column.as_primitive::<Float64Type>();
                            Box::new(move |r| c.is_valid(r).then(|| c.value(r)))
                        }
                        DataType::Int64 => {
                            let c = column.as_primitive::<Int64Type>();
                            Box::new(move |r| c.is_valid(r).then(|| c.value(r) as f64))
                        }
                        _ => return Err(mismatch()),
                    };
                    for row in 0..rows {
                        let Some(v) = value_at(row) else { continue };
                        // NaN fails no comparison: the finiteness rule reports it.
                        if let Some(b) = min {
                            if v < b.value || (b.exclusive && v == b.value) {
                                let word = if b.exclusive { "above" } else { "at least" };
                                flag(
                                    row,
                                    OUT_OF_RANGE,
                                    format!("`{property}` must be {word} {}", b.value),
                                );
                            }
                        }
                        if let Some(b) = max {
                            if v > b.value || (b.exclusive && v == b.value) {
                                let word = if b.exclusive { "below" } else { "at most" };
                                flag(
                                    row,
                                    OUT_OF_RANGE,
                                    format!("`{property}` must be {word} {}", b.value),
                                );
                            }
                        }
                    }
                }
                Rule::OneOf(allowed) => {
                    let values = column.as_string_opt::<i32>().ok_or_else(mismatch)?;
                    for row in 0..rows {
                        if values.is_valid(row) && !allowed.contains(values.value(row)) {
                            let list: Vec<&str> = allowed.iter().map(String::as_str).collect();
                            flag(
                                row,
                                UNKNOWN_CATEGORY,
                                format!("`{property}` must be one of {}", list.join(", ")),
                            );
                        }
                    }
                }
                Rule::Length { min, max } => {
                    let values = column.as_string_opt::<i32>().ok_or_else(mismatch)?;
                    for row in 0..rows {
                        if !values.is_valid(row) {
                            continue;
                        }
                        let s = values.value(row);
                        let chars = s.chars().count();
                        let short = min.is_some_and(|m| chars < m);
                        let long = max.is_some_and(|m| chars > m);
                        if short || long {
                            let rule = match (min, max) {
                                (Some(a), Some(b)) if a == b => format!("exactly {a}"),
                                (Some(a), Some(b)) => format!("{a} to {b}"),
                                (Some(a), None) => format!("at least {a}"),
                                (None, Some(b)) => format!("at most {b}"),
                                (None, None) => unreachable!("a length rule has a bound"),
                            };
                            flag(
                                row,
                                INVALID_LENGTH,
                                format!("`{property}` must be {rule} characters long"),
                            );
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{arrow_schema_from_json_schema, FRAUD_TRANSACTION_JSON_SCHEMA};
    use arrow::array::{Float64Array, Int64Array, StringArray};
    use std::sync::Arc;

    const SCHEMA: &str = r#"{"required": ["id", "amount"], "properties": {
        "id": {"type": "string", "minLength": 1, "maxLength": 4},
        "amount": {"type": "number", "minimum": 0, "exclusiveMaximum": 100},
        "kind": {"type": ["string", "null"], "enum": ["a", "b", null]},
        "n": {"type": "integer", "exclusiveMinimum": 0}
    }}"#;

    fn batch(ids: &[&str], amounts: &[f64], kinds: &[Option<&str>], ns: &[i64]) -> RecordBatch {
        let schema = arrow_schema_from_json_schema("t", SCHEMA).unwrap();
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(ids.to_vec())),
                Arc::new(Float64Array::from(amounts.to_vec())),
                Arc::new(StringArray::from(kinds.to_vec())),
                Arc::new(Int64Array::from(ns.to_vec())),
            ],
        )
        .unwrap()
    }

    fn causes(out: &[Option<Violation>]) -> Vec<Option<&'static str>> {
        out.iter().map(|v| v.as_ref().map(|v| v.cause)).collect()
    }

    #[test]
    fn each_keyword_is_enforced_and_nulls_pass() {
        let c = InputConstraints::from_json_schema("t", SCHEMA).unwrap();
        let b = batch(
            &["ok", "", "okay!", "ok", "ok", "ok", "ok", "ok", "éééé"],
            &[
                1.0,
                1.0,
                1.0,
                -0.5,
                100.0,
                f64::INFINITY,
                f64::NAN,
                1.0,
                0.0,
            ],
            &[
                Some("a"),
                None,
                None,
                None,
                None,
                None,
                None,
                Some("c"),
                Some("b"),
            ],
            &[1, 1, 1, 1, 1, 1, 1, 0, 1],
        );
        let out = c.check(&b).unwrap();
        assert_eq!(
            causes(&out),
            vec![
                None,
                Some(INVALID_LENGTH),
                Some(INVALID_LENGTH),
                Some(OUT_OF_RANGE),
                Some(OUT_OF_RANGE),
                Some(NON_FINITE),
                Some(NON_FINITE),
                Some(UNKNOWN_CATEGORY),
                None, // four characters, eight bytes: lengths count characters
            ]
        );
        assert_eq!(
            out[4].as_ref().unwrap().detail,
            "`amount` must be below 100"
        );
        assert_eq!(
            out[7].as_ref().unwrap().detail,
            "`kind` must be one of a, b"
        );
    }

    #[test]
    fn the_first_broken_rule_of_a_row_is_reported() {
        let c = InputConstraints::from_json_schema("t", SCHEMA).unwrap();
        let out = c
            .check(&batch(&["toolong"], &[-1.0], &[Some("z")], &[0]))
            .unwrap();
        assert!(out[0].is_some());
    }

    #[test]
    fn details_never_carry_the_value() {
        let c = InputConstraints::from_json_schema("t", SCHEMA).unwrap();
        let out = c
            .check(&batch(
                &["4111"],
                &[4111111111.0],
                &[Some("4111111111111111")],
                &[1],
            ))
            .unwrap();
        let detail = &out[0].as_ref().unwrap().detail;
        assert!(!detail.contains("4111"), "{detail}");
    }

    #[test]
    fn the_fraud_contract_has_rules_for_amount_channel_and_ids() {
        let c = InputConstraints::from_json_schema("fraud", FRAUD_TRANSACTION_JSON_SCHEMA).unwrap();
        let props: BTreeSet<&str> = c.rules.iter().map(|r| r.property.as_str()).collect();
        for p in [
            "amount",
            "channel",
            "transaction_id",
            "currency",
            "event_time_ms",
        ] {
            assert!(props.contains(p), "no rule for {p}");
        }
    }

    #[test]
    fn unsupported_keywords_are_refused_with_the_property() {
        let err = InputConstraints::from_json_schema(
            "t",
            r#"{"properties": {"x": {"type": "integer", "enum": [1, 2]}}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`x`"), "{err}");
        let err = InputConstraints::from_json_schema(
            "t",
            r#"{"properties": {"s": {"type": "string", "minimum": 1}}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`s`"), "{err}");
    }
}
