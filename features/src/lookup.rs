//! Entity lookups: for each configured entity (for fraud: the card and the merchant), fetch its
//! feature hash and lay the values out as a typed Arrow table aligned to the input rows.
//!
//! Alignment is the contract the SQL relies on: row *i* of every lookup table describes the
//! entity of input row *i*, and carries the same `row_id`. Keys repeated within a batch are read
//! once; a missing entity (or a null key) gives a row of nulls, never a missing row. All lookups
//! and velocity updates of a batch share one round trip to the store; velocity tables follow
//! the lookup tables, in config order.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanBuilder, Float64Builder, Int64Builder, StringArray, StringBuilder,
    UInt32Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use serde::Deserialize;
use verdict_schemas::columns::ROW_ID;

use crate::store::{FeatureStore, HashRead, HashValues};
use crate::velocity::{VelocityPlan, VelocitySpec};
use crate::{FeatureError, Result};

/// Type of a feature field; values are stored in Redis as strings and parsed into this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureType {
    Float64,
    Int64,
    Utf8,
    Boolean,
}

impl FeatureType {
    fn data_type(self) -> DataType {
        match self {
            FeatureType::Float64 => DataType::Float64,
            FeatureType::Int64 => DataType::Int64,
            FeatureType::Utf8 => DataType::Utf8,
            FeatureType::Boolean => DataType::Boolean,
        }
    }
}

/// One field of an entity's feature hash.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FeatureField {
    /// Hash field name, also the column name in the lookup table.
    pub name: String,
    /// Arrow type the string value is parsed into.
    #[serde(rename = "type")]
    pub kind: FeatureType,
}

/// One entity lookup (`[[workloads.lookups]]` in the config).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct EntityLookup {
    /// Table name the SQL uses for this lookup, e.g. `card`.
    pub name: String,
    /// Input column holding the entity key, e.g. `card_id` (must be a string column).
    pub key_column: String,
    /// Prefix of the Redis key: the hash read is `<key-prefix><key>`, e.g. `card:`.
    pub key_prefix: String,
    /// Fields read from the hash, in order.
    pub fields: Vec<FeatureField>,
}

impl EntityLookup {
    /// Schema of this lookup's table: `row_id`, the key column, then the fields.
    pub fn table_schema(&self) -> SchemaRef {
        let mut fields = vec![
            Field::new(ROW_ID, DataType::UInt32, false),
            Field::new(&self.key_column, DataType::Utf8, true),
        ];
        fields.extend(
            self.fields
                .iter()
                .map(|f| Field::new(&f.name, f.kind.data_type(), true)),
        );
        Arc::new(Schema::new(fields))
    }

    fn field_names(&self) -> Vec<String> {
        self.fields.iter().map(|f| f.name.clone()).collect()
    }
}

/// What the lookups of one batch found, for logs and metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LookupStats {
    /// Distinct keys read, over all lookups.
    pub keys_read: usize,
    /// Distinct keys whose hash had none of the requested fields.
    pub entities_missing: usize,
    /// Field values present in Redis but not parseable as their declared type (became null).
    pub values_unparseable: usize,
    /// Velocity events recorded (rows with a key, time, amount and id).
    pub velocity_events: usize,
    /// Of those, events older than the allowed lateness (their windows may undercount).
    pub velocity_late: usize,
}

/// Runs every lookup and velocity update of a workload against one batch.
pub struct Lookups {
    lookups: Vec<EntityLookup>,
    field_names: Vec<Vec<String>>,
    velocity: Vec<VelocitySpec>,
}

impl Lookups {
    /// Refuses a velocity spec with bad windows.
    pub fn new(lookups: Vec<EntityLookup>, velocity: Vec<VelocitySpec>) -> Result<Self> {
        for spec in &velocity {
            spec.horizon_ms()?;
        }
        let field_names = lookups.iter().map(EntityLookup::field_names).collect();
        Ok(Self {
            lookups,
            field_names,
            velocity,
        })
    }

    pub fn specs(&self) -> &[EntityLookup] {
        &self.lookups
    }

    /// Name and schema of every table `fetch` returns, in order.
    pub fn table_schemas(&self) -> Vec<(String, SchemaRef)> {
        self.lookups
            .iter()
            .map(|l| (l.name.clone(), l.table_schema()))
            .chain(
                self.velocity
                    .iter()
                    .map(|v| (v.name.clone(), v.table_schema())),
            )
            .collect()
    }

    /// One table per lookup then per velocity spec, aligned to `input`'s rows, from one
    /// store round trip.
    pub async fn fetch(
        &self,
        store: &dyn FeatureStore,
        input: &RecordBatch,
    ) -> Result<(Vec<RecordBatch>, LookupStats)> {
        // Per lookup: the key of each row, and each row's index into that lookup's distinct keys.
        let mut plans = Vec::with_capacity(self.lookups.len());
        for lookup in &self.lookups {
            plans.push(KeyPlan::build(lookup, input)?);
        }
        // Every Redis key of the batch (prefix + entity id) in one string rather than one
        // `String` per key: a few hundred small allocations per batch less.
        let mut key_text = String::with_capacity(
            self.lookups
                .iter()
                .zip(&plans)
                .map(|(lookup, plan)| {
                    plan.distinct.len() * lookup.key_prefix.len()
                        + plan.distinct.iter().map(|k| k.len()).sum::<usize>()
                })
                .sum(),
        );
        let mut key_ends = Vec::with_capacity(plans.iter().map(|p| p.distinct.len()).sum());
        for (lookup, plan) in self.lookups.iter().zip(&plans) {
            for key in &plan.distinct {
                key_text.push_str(&lookup.key_prefix);
                key_text.push_str(key);
                key_ends.push(key_text.len());
            }
        }
        let mut reads = Vec::with_capacity(key_ends.len());
        let mut key_start = 0;
        let mut ends = key_ends.iter();
        for (plan, fields) in plans.iter().zip(&self.field_names) {
            for &key_end in ends.by_ref().take(plan.distinct.len()) {
                reads.push(HashRead {
                    key: &key_text[key_start..key_end],
                    fields,
                });
                key_start = key_end;
            }
        }
        let velocity_plans = self
            .velocity
            .iter()
            .map(|spec| VelocityPlan::build(spec, input))
            .collect::<Result<Vec<_>>>()?;
        let updates: Vec<_> = velocity_plans.iter().map(VelocityPlan::update).collect();
        let answer = store.fetch(&reads, &updates).await?;
        if answer.hashes.len() != reads.len() {
            return Err(FeatureError::Output(format!(
                "feature store answered {} of {} reads",
                answer.hashes.len(),
                reads.len()
            )));
        }

        let mut stats = LookupStats {
            keys_read: reads.len(),
            ..LookupStats::default()
        };
        let mut tables = Vec::with_capacity(self.lookups.len());
        // The reads are the lookups' distinct keys, one lookup after the other.
        let mut first_read = 0;
        for (lookup, plan) in self.lookups.iter().zip(&plans) {
            let reads_of_lookup = first_read..first_read + plan.distinct.len();
            stats.entities_missing += reads_of_lookup
                .filter(|&read| answer.hashes.read(read).all(|v| v.is_none()))
                .count();
            tables.push(plan.table(lookup, &answer.hashes, first_read, &mut stats)?);
            first_read += plan.distinct.len();
        }
        for (((spec, plan), update), counts) in self
            .velocity
            .iter()
            .zip(&velocity_plans)
            .zip(&updates)
            .zip(&answer.velocity)
        {
            if counts.len() != update.events.len() {
                return Err(FeatureError::Output(format!(
                    "feature store answered {} of {} velocity events of `{}`",
                    counts.len(),
                    update.events.len(),
                    spec.name
                )));
            }
            stats.velocity_events += counts.len();
            stats.velocity_late += counts.iter().filter(|c| c.late).count();
            tables.push(plan.table(spec, Some(counts))?);
        }
        if answer.velocity.len() != self.velocity.len() {
            return Err(FeatureError::Output(
                "feature store skipped velocity updates".into(),
            ));
        }
        Ok((tables, stats))
    }
}

impl Lookups {
    /// The tables `fetch` would return if no entity existed: every feature null. Used when the
    /// store is unreachable, so the batch is scored with the model's defaults instead of
    /// waiting for Redis.
    pub fn all_missing(&self, input: &RecordBatch) -> Result<Vec<RecordBatch>> {
        let mut stats = LookupStats::default();
        let mut tables = self
            .lookups
            .iter()
            .map(|lookup| {
                // No reads answered: every value is missing.
                KeyPlan::build(lookup, input)?.table(lookup, &HashValues::default(), 0, &mut stats)
            })
            .collect::<Result<Vec<_>>>()?;
        for spec in &self.velocity {
            tables.push(VelocityPlan::build(spec, input)?.table(spec, None)?);
        }
        Ok(tables)
    }
}

/// The keys of one lookup in one batch.
struct KeyPlan<'a> {
    keys: &'a StringArray,
    /// Distinct non-null keys, in first-seen order.
    distinct: Vec<&'a str>,
    /// For each input row, its index in `distinct` (None for a null key).
    row_to_distinct: Vec<Option<usize>>,
}

impl<'a> KeyPlan<'a> {
    fn build(lookup: &EntityLookup, input: &'a RecordBatch) -> Result<Self> {
        let key_error = |reason: &str| FeatureError::KeyColumn {
            lookup: lookup.name.clone(),
            column: lookup.key_column.clone(),
            reason: reason.to_string(),
        };
        let column = input
            .column_by_name(&lookup.key_column)
            .ok_or_else(|| key_error("not in the input"))?;
        let keys = column
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| key_error("is not a string column"))?;
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(keys.len());
        let mut distinct = Vec::with_capacity(keys.len());
        let row_to_distinct = (0..keys.len())
            .map(|row| {
                if keys.is_null(row) {
                    return None;
                }
                let key = keys.value(row);
                Some(*index.entry(key).or_insert_with(|| {
                    distinct.push(key);
                    distinct.len() - 1
                }))
            })
            .collect();
        Ok(Self {
            keys,
            distinct,
            row_to_distinct,
        })
    }

    /// The lookup's table; `values` holds its distinct keys' reads from `first_read` on.
    fn table(
        &self,
        lookup: &EntityLookup,
        values: &HashValues,
        first_read: usize,
        stats: &mut LookupStats,
    ) -> Result<RecordBatch> {
        let rows = self.row_to_distinct.len();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(lookup.fields.len() + 2);
        columns.push(Arc::new(UInt32Array::from_iter_values(0..rows as u32)));
        columns.push(Arc::new(self.keys.clone()));
        for (field_index, field) in lookup.fields.iter().enumerate() {
            let value_at = |row: usize| -> Option<&[u8]> {
                self.row_to_distinct[row].and_then(|d| values.get(first_read + d, field_index))
            };
            let column: ArrayRef = match field.kind {
                FeatureType::Float64 => {
                    let mut b = Float64Builder::with_capacity(rows);
                    for row in 0..rows {
                        let value = text(value_at(row), stats);
                        b.append_option(parse(value, stats));
                    }
                    Arc::new(b.finish())
                }
                FeatureType::Int64 => {
                    let mut b = Int64Builder::with_capacity(rows);
                    for row in 0..rows {
                        let value = text(value_at(row), stats);
                        b.append_option(parse(value, stats));
                    }
                    Arc::new(b.finish())
                }
                FeatureType::Boolean => {
                    let mut b = BooleanBuilder::with_capacity(rows);
                    for row in 0..rows {
                        let value = text(value_at(row), stats);
                        b.append_option(parse_bool(value, stats));
                    }
                    Arc::new(b.finish())
                }
                FeatureType::Utf8 => {
                    let mut b = StringBuilder::with_capacity(rows, rows * 8);
                    for row in 0..rows {
                        b.append_option(text(value_at(row), stats));
                    }
                    Arc::new(b.finish())
                }
            };
            columns.push(column);
        }
        Ok(RecordBatch::try_new(lookup.table_schema(), columns)?)
    }
}

/// A stored value as text. One that is not UTF-8 is counted as unparseable and read as
/// missing, like a number that does not parse: bad data in one hash does not fail the batch.
fn text<'v>(value: Option<&'v [u8]>, stats: &mut LookupStats) -> Option<&'v str> {
    match std::str::from_utf8(value?) {
        Ok(text) => Some(text),
        Err(_) => {
            stats.values_unparseable += 1;
            None
        }
    }
}

fn parse<T: std::str::FromStr>(value: Option<&str>, stats: &mut LookupStats) -> Option<T> {
    let value = value?;
    let parsed = value.trim().parse().ok();
    if parsed.is_none() {
        stats.values_unparseable += 1;
    }
    parsed
}

fn parse_bool(value: Option<&str>, stats: &mut LookupStats) -> Option<bool> {
    match value? {
        "1" | "true" | "TRUE" | "True" => Some(true),
        "0" | "false" | "FALSE" | "False" => Some(false),
        _ => {
            stats.values_unparseable += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::InMemoryFeatureStore;
    use arrow::array::{Float64Array, Int64Array};
    use arrow::util::pretty::pretty_format_batches;

    fn card_lookup() -> EntityLookup {
        EntityLookup {
            name: "card".into(),
            key_column: "card_id".into(),
            key_prefix: "card:".into(),
            fields: vec![
                FeatureField {
                    name: "avg_amount".into(),
                    kind: FeatureType::Float64,
                },
                FeatureField {
                    name: "age_days".into(),
                    kind: FeatureType::Int64,
                },
                FeatureField {
                    name: "home".into(),
                    kind: FeatureType::Utf8,
                },
            ],
        }
    }

    fn input(keys: Vec<Option<&str>>) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "card_id",
            DataType::Utf8,
            true,
        )]));
        RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(keys))]).unwrap()
    }

    #[tokio::test]
    async fn lookups_are_aligned_with_duplicates_misses_and_null_keys() {
        let store = InMemoryFeatureStore::new();
        store.insert(
            "card:a",
            &[("avg_amount", "10.5"), ("age_days", "3"), ("home", "DE")],
        );
        store.insert("card:b", &[("avg_amount", "20"), ("age_days", "400")]);
        let lookups = Lookups::new(vec![card_lookup()], vec![]).unwrap();
        let batch = input(vec![
            Some("b"),
            Some("a"),
            Some("zz"),
            Some("b"),
            None,
            Some("a"),
        ]);

        let (tables, stats) = lookups.fetch(&store, &batch).await.unwrap();

        assert_eq!(store.round_trips(), 1);
        assert_eq!(
            stats.keys_read, 3,
            "b, a, zz: duplicates read once, null key not at all"
        );
        assert_eq!(stats.entities_missing, 1);
        let expected = [
            "+--------+---------+------------+----------+------+",
            "| row_id | card_id | avg_amount | age_days | home |",
            "+--------+---------+------------+----------+------+",
            "| 0      | b       | 20.0       | 400      |      |",
            "| 1      | a       | 10.5       | 3        | DE   |",
            "| 2      | zz      |            |          |      |",
            "| 3      | b       | 20.0       | 400      |      |",
            "| 4      |         |            |          |      |",
            "| 5      | a       | 10.5       | 3        | DE   |",
            "+--------+---------+------------+----------+------+",
        ];
        assert_eq!(
            pretty_format_batches(&tables).unwrap().to_string(),
            expected.join("\n")
        );
    }

    #[tokio::test]
    async fn unparseable_values_become_null_and_are_counted() {
        let store = InMemoryFeatureStore::new();
        store.insert("card:a", &[("avg_amount", "lots"), ("age_days", "7.5")]);
        let lookups = Lookups::new(vec![card_lookup()], vec![]).unwrap();
        let (tables, stats) = lookups
            .fetch(&store, &input(vec![Some("a")]))
            .await
            .unwrap();
        assert_eq!(stats.values_unparseable, 2);
        let avg = tables[0]
            .column(2)
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap();
        let age = tables[0]
            .column(3)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        assert!(avg.is_null(0) && age.is_null(0));
    }

    #[tokio::test]
    async fn a_missing_key_column_is_a_clear_error() {
        let store = InMemoryFeatureStore::new();
        let mut lookup = card_lookup();
        lookup.key_column = "pan".into();
        let err = Lookups::new(vec![lookup], vec![])
            .unwrap()
            .fetch(&store, &input(vec![Some("a")]))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("`card`") && err.contains("`pan`"), "{err}");
    }

    proptest::proptest! {
        /// Whatever the mix of repeats and misses, row i of the lookup table holds the
        /// features of input row i's key.
        #[test]
        fn alignment_holds_for_any_key_sequence(keys in proptest::collection::vec(0u8..12, 0..80)) {
            let store = InMemoryFeatureStore::new();
            for k in (0u8..12).filter(|k| k % 3 != 0) {
                store.insert(&format!("card:{k}"), &[("avg_amount", &format!("{k}.5"))]);
            }
            let names: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
            let batch = input(names.iter().map(|s| Some(s.as_str())).collect());
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (tables, _) = rt.block_on(Lookups::new(vec![card_lookup()], vec![]).unwrap().fetch(&store, &batch)).unwrap();
            let avg = tables[0].column(2).as_any().downcast_ref::<Float64Array>().unwrap();
            proptest::prop_assert_eq!(avg.len(), keys.len());
            for (row, k) in keys.iter().enumerate() {
                if k % 3 == 0 {
                    proptest::prop_assert!(avg.is_null(row));
                } else {
                    proptest::prop_assert_eq!(avg.value(row), *k as f64 + 0.5);
                }
            }
        }
    }
}
