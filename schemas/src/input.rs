//! Input contracts: a workload's input is described by a JSON Schema (what the publishing team
//! reads), and the Arrow schema the decoder targets is derived from it, so the two cannot drift.
//!
//! Only flat objects are supported: each property becomes one column. `required` properties are
//! non-nullable, so a message missing one fails to decode and is dead-lettered instead of
//! becoming a row of nulls.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use serde_json::Value;

use crate::SchemaError;

/// Names accepted by [`builtin_input_schema`].
pub const BUILTIN_NAMES: &[&str] = &["fraud-transaction", "pricing-quote"];

/// JSON Schema of the fraud workload's input (card transactions).
pub const FRAUD_TRANSACTION_JSON_SCHEMA: &str =
    include_str!("../json/fraud-transaction.schema.json");

/// JSON Schema of the pricing workload's input (ride quote requests).
pub const PRICING_QUOTE_JSON_SCHEMA: &str = include_str!("../json/pricing-quote.schema.json");

/// The JSON Schema text of a built-in input contract.
pub fn builtin_input_schema(name: &str) -> Result<&'static str, SchemaError> {
    match name {
        "fraud-transaction" => Ok(FRAUD_TRANSACTION_JSON_SCHEMA),
        "pricing-quote" => Ok(PRICING_QUOTE_JSON_SCHEMA),
        other => Err(SchemaError::UnknownBuiltin(other.to_string())),
    }
}

/// Derives the Arrow schema of a flat JSON object schema. `name` is only used in errors.
pub fn arrow_schema_from_json_schema(
    name: &str,
    json_schema: &str,
) -> Result<SchemaRef, SchemaError> {
    let unsupported = |reason: String| SchemaError::Unsupported {
        schema: name.to_string(),
        reason,
    };
    let doc: Value = serde_json::from_str(json_schema)?;
    let properties = doc
        .get("properties")
        .and_then(Value::as_object)
        .ok_or_else(|| unsupported("has no `properties` object".into()))?;
    let required: Vec<&str> = doc
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();

    let mut fields = Vec::with_capacity(properties.len());
    for (prop, spec) in properties {
        let (json_type, nullable_by_type) = match spec.get("type") {
            Some(Value::String(t)) => (t.as_str(), false),
            // ["number", "null"]: the one non-null type, nullable.
            Some(Value::Array(types)) => {
                let non_null: Vec<&str> = types
                    .iter()
                    .filter_map(Value::as_str)
                    .filter(|t| *t != "null")
                    .collect();
                match non_null.as_slice() {
                    [one] => (*one, non_null.len() < types.len()),
                    _ => {
                        return Err(unsupported(format!(
                            "property `{prop}` must have exactly one non-null type"
                        )))
                    }
                }
            }
            _ => return Err(unsupported(format!("property `{prop}` has no `type`"))),
        };
        let data_type = match json_type {
            "string" => DataType::Utf8,
            "number" => DataType::Float64,
            "integer" => DataType::Int64,
            "boolean" => DataType::Boolean,
            other => {
                return Err(unsupported(format!(
                    "property `{prop}` has type `{other}`; only flat string/number/integer/boolean properties become columns"
                )))
            }
        };
        let nullable = nullable_by_type || !required.contains(&prop.as_str());
        fields.push(Field::new(prop, data_type, nullable));
    }
    for r in &required {
        if !properties.contains_key(*r) {
            return Err(unsupported(format!(
                "required property `{r}` is not declared"
            )));
        }
    }
    Ok(Arc::new(Schema::new(fields)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraud_transaction_schema_maps_to_typed_columns() {
        let schema = arrow_schema_from_json_schema("fraud", FRAUD_TRANSACTION_JSON_SCHEMA).unwrap();
        let amount = schema.field_with_name("amount").unwrap();
        assert_eq!(amount.data_type(), &DataType::Float64);
        assert!(!amount.is_nullable());
        let time = schema.field_with_name("event_time_ms").unwrap();
        assert_eq!(time.data_type(), &DataType::Int64);
        // Declared order is kept: the first column is the id.
        assert_eq!(schema.field(0).name(), "transaction_id");
    }

    #[test]
    fn optional_and_nullable_properties_are_nullable() {
        let schema = arrow_schema_from_json_schema(
            "t",
            r#"{"required": ["a"], "properties": {"a": {"type": "string"}, "b": {"type": "integer"}, "c": {"type": ["number", "null"]}}}"#,
        )
        .unwrap();
        assert!(!schema.field(0).is_nullable());
        assert!(schema.field(1).is_nullable());
        assert!(schema.field(2).is_nullable());
        assert_eq!(schema.field(2).data_type(), &DataType::Float64);
    }

    #[test]
    fn nested_and_undeclared_properties_are_refused_with_the_property_name() {
        let err =
            arrow_schema_from_json_schema("t", r#"{"properties": {"x": {"type": "object"}}}"#)
                .unwrap_err()
                .to_string();
        assert!(err.contains("`x`"), "{err}");
        let err = arrow_schema_from_json_schema("t", r#"{"required": ["y"], "properties": {}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`y`"), "{err}");
    }
}
