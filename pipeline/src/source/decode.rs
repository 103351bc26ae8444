//! JSON messages → one Arrow `RecordBatch` per micro-batch, with arrow-json.
//!
//! The fast path decodes the whole batch with one decoder (per-row flushing costs ~7× more).
//! A message that is not valid UTF-8 or not exactly one JSON value is caught as it is fed in;
//! one whose values do not fit the schema (wrong type, missing required field) only fails the
//! final flush, and then the batch is decoded again message by message to find which ones,
//! so one bad message never costs the rest of its batch. A message over `max-message-bytes` is
//! rejected before parsing; decoded rows whose values break the contract's value rules
//! (ranges, enums, lengths, finiteness: `verdict_schemas::constraints`) are then filtered out.
//! Rejected messages come back with their cause, for the dead-letter topic.

use std::sync::Arc;

use arrow::array::{BooleanArray, RecordBatch, UInt32Array};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow_json::reader::{Decoder, ReaderBuilder};
use verdict_schemas::columns::ROW_ID;
use verdict_schemas::InputConstraints;

use crate::PipelineError;

/// Why a message was rejected at decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeCause {
    /// No payload (a tombstone) or an empty one.
    EmptyPayload,
    NotUtf8,
    /// Not a single well-formed JSON value.
    InvalidJson,
    /// Well-formed JSON that does not fit the input schema.
    SchemaMismatch,
    /// Larger than the workload's `max-message-bytes`: not parsed at all.
    Oversized,
    /// Arrays or objects nested deeper than [`MAX_NESTING_DEPTH`]: not parsed at all.
    TooDeep,
    /// Well-typed values the contract forbids (range, enum, length, non-finite); the cause
    /// names the rule (`verdict_schemas::constraints`).
    Constraint(&'static str),
}

impl DecodeCause {
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeCause::EmptyPayload => "empty-payload",
            DecodeCause::NotUtf8 => "not-utf8",
            DecodeCause::InvalidJson => "invalid-json",
            DecodeCause::SchemaMismatch => "schema-mismatch",
            DecodeCause::Oversized => "oversized",
            DecodeCause::TooDeep => "nesting-too-deep",
            DecodeCause::Constraint(cause) => cause,
        }
    }
}

/// A rejected message: its index in the batch, the cause and a detail for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub index: usize,
    pub cause: DecodeCause,
    pub detail: String,
}

/// The decoded batch.
#[derive(Debug)]
pub struct Decoded {
    /// Accepted rows with a `row_id` column appended (0..n).
    pub batch: RecordBatch,
    /// For each row of `batch`, the index of its message in the input slice.
    pub message_index: Vec<usize>,
    pub rejected: Vec<Rejection>,
}

/// Decodes payloads against one workload's input schema.
pub struct JsonBatchDecoder {
    input_schema: SchemaRef,
    output_schema: SchemaRef,
    max_rows: usize,
    decoder: Decoder,
    constraints: InputConstraints,
    max_message_bytes: usize,
}

/// Deepest nesting of arrays and objects accepted. Inputs are flat objects; the bound exists
/// because arrow-json formats some errors by recursing over the value, and 32,000 nested
/// brackets (64 KB) overflowed a thread's stack — one message could crash the process.
pub const MAX_NESTING_DEPTH: usize = 64;

/// Default bound on one message's value: card transactions are a few hundred bytes, and a
/// multi-megabyte one is a bug or an attack that should not reach the parser.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;

impl JsonBatchDecoder {
    /// `max_rows`: the most messages one [`JsonBatchDecoder::decode`] call is given.
    pub fn new(input_schema: SchemaRef, max_rows: usize) -> Result<Self, PipelineError> {
        if input_schema.index_of(ROW_ID).is_ok() {
            return Err(PipelineError::Config(format!(
                "the input schema may not declare `{ROW_ID}`: verdict adds it"
            )));
        }
        let mut fields: Vec<Arc<Field>> = input_schema.fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new(ROW_ID, DataType::UInt32, false)));
        let output_schema = Arc::new(Schema::new(fields));
        let max_rows = max_rows.max(1);
        let decoder = Self::build(&input_schema, max_rows)?;
        Ok(Self {
            input_schema,
            output_schema,
            max_rows,
            decoder,
            constraints: InputConstraints::default(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        })
    }

    /// Rows whose values break the contract's rules are rejected with the rule as cause.
    pub fn with_constraints(mut self, constraints: InputConstraints) -> Self {
        self.constraints = constraints;
        self
    }

    /// Messages longer than this are rejected as `oversized` without being parsed.
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    fn build(schema: &SchemaRef, max_rows: usize) -> Result<Decoder, PipelineError> {
        // The decoder stops accepting rows at its batch size: make it the batch's bound.
        ReaderBuilder::new(Arc::clone(schema))
            .with_batch_size(max_rows)
            .build_decoder()
            .map_err(|e| PipelineError::Config(format!("input schema: {e}")))
    }

    /// Schema of the decoded batches (input schema + `row_id`).
    pub fn schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// Decodes a batch. `payloads[i]` is message i's value (`None` for a tombstone).
    pub fn decode(&mut self, payloads: &[Option<&[u8]>]) -> Result<Decoded, PipelineError> {
        if payloads.len() > self.max_rows {
            return Err(PipelineError::Decode(format!(
                "{} messages in a batch of at most {}",
                payloads.len(),
                self.max_rows
            )));
        }
        let mut rejected = Vec::new();
        let mut accepted = Vec::with_capacity(payloads.len());
        let mut fed_ok = true;
        for (index, payload) in payloads.iter().enumerate() {
            match self.feed(*payload) {
                Ok(()) => accepted.push(index),
                Err((cause, detail)) => {
                    rejected.push(Rejection {
                        index,
                        cause,
                        detail,
                    });
                    // The decoder may hold half a value now: start over for the rest.
                    if matches!(cause, DecodeCause::InvalidJson) {
                        fed_ok = false;
                        break;
                    }
                }
            }
        }
        let fast = if fed_ok {
            self.decoder.flush().ok().flatten()
        } else {
            None
        };
        let batch = match fast {
            Some(batch) if batch.num_rows() == accepted.len() => batch,
            None if fed_ok && accepted.is_empty() => {
                RecordBatch::new_empty(Arc::clone(&self.input_schema))
            }
            _ => {
                // Slow path: find the culprits one by one, then decode the rest together.
                self.decoder = Self::build(&self.input_schema, self.max_rows)?;
                rejected.clear();
                accepted.clear();
                for (index, payload) in payloads.iter().enumerate() {
                    match self.check_one(*payload) {
                        Ok(()) => accepted.push(index),
                        Err((cause, detail)) => rejected.push(Rejection {
                            index,
                            cause,
                            detail,
                        }),
                    }
                }
                for index in &accepted {
                    self.feed(payloads[*index]).map_err(|(_, d)| {
                        PipelineError::Decode(format!(
                            "a message that decoded alone failed in its batch: {d}"
                        ))
                    })?;
                }
                match self.decoder.flush() {
                    Ok(Some(batch)) => batch,
                    Ok(None) => RecordBatch::new_empty(Arc::clone(&self.input_schema)),
                    Err(e) => {
                        self.decoder = Self::build(&self.input_schema, self.max_rows)?;
                        return Err(PipelineError::Decode(format!(
                            "messages that decoded alone failed together: {e}"
                        )));
                    }
                }
            }
        };
        let (batch, accepted) = self.enforce_constraints(batch, accepted, &mut rejected)?;
        let rows = batch.num_rows() as u32;
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(UInt32Array::from_iter_values(0..rows)));
        let batch = RecordBatch::try_new(Arc::clone(&self.output_schema), columns)
            .map_err(|e| PipelineError::Decode(e.to_string()))?;
        Ok(Decoded {
            batch,
            message_index: accepted,
            rejected,
        })
    }

    /// Feeds one message to the batch decoder, checking it is exactly one complete value.
    /// Moves the rows that break a value rule from `batch` to `rejected`.
    fn enforce_constraints(
        &self,
        batch: RecordBatch,
        accepted: Vec<usize>,
        rejected: &mut Vec<Rejection>,
    ) -> Result<(RecordBatch, Vec<usize>), PipelineError> {
        if self.constraints.is_empty() || batch.num_rows() == 0 {
            return Ok((batch, accepted));
        }
        let violations = self
            .constraints
            .check(&batch)
            .map_err(|e| PipelineError::Decode(e.to_string()))?;
        if violations.iter().all(Option::is_none) {
            return Ok((batch, accepted));
        }
        let keep = BooleanArray::from_iter(violations.iter().map(|v| Some(v.is_none())));
        let mut kept = Vec::with_capacity(accepted.len());
        for (index, violation) in accepted.into_iter().zip(violations) {
            match violation {
                None => kept.push(index),
                Some(v) => rejected.push(Rejection {
                    index,
                    cause: DecodeCause::Constraint(v.cause),
                    detail: v.detail,
                }),
            }
        }
        rejected.sort_by_key(|r| r.index);
        let batch =
            filter_record_batch(&batch, &keep).map_err(|e| PipelineError::Decode(e.to_string()))?;
        Ok((batch, kept))
    }

    fn feed(&mut self, payload: Option<&[u8]>) -> Result<(), (DecodeCause, String)> {
        let payload = match payload {
            Some(p) if !p.iter().all(u8::is_ascii_whitespace) => p,
            _ => return Err((DecodeCause::EmptyPayload, "message has no value".into())),
        };
        if payload.len() > self.max_message_bytes {
            return Err((
                DecodeCause::Oversized,
                format!(
                    "{} bytes, more than max-message-bytes {}",
                    payload.len(),
                    self.max_message_bytes
                ),
            ));
        }
        if nesting_exceeds(payload, MAX_NESTING_DEPTH) {
            return Err((
                DecodeCause::TooDeep,
                format!("arrays or objects nested deeper than {MAX_NESTING_DEPTH}"),
            ));
        }
        if let Err(e) = std::str::from_utf8(payload) {
            return Err((
                DecodeCause::NotUtf8,
                format!("invalid UTF-8 at byte {}", e.valid_up_to()),
            ));
        }
        let before = self.decoder.len();
        let invalid = |detail: String| (DecodeCause::InvalidJson, detail);
        let consumed = self
            .decoder
            .decode(payload)
            .map_err(|e| invalid(redact(&e.to_string())))?;
        if consumed != payload.len() {
            return Err(invalid(format!(
                "decoder stopped at byte {consumed} of {}",
                payload.len()
            )));
        }
        if self.decoder.has_partial_record() {
            return Err(invalid("truncated JSON value".into()));
        }
        match self.decoder.len() - before {
            1 => Ok(()),
            n => Err(invalid(format!(
                "expected one JSON object per message, found {n}"
            ))),
        }
    }

    /// Decodes one message alone (slow path), leaving the decoder empty.
    fn check_one(&mut self, payload: Option<&[u8]>) -> Result<(), (DecodeCause, String)> {
        let fed = self.feed(payload);
        let flushed = match fed {
            Ok(()) => self.decoder.flush().map(|_| ()),
            Err(_) => Ok(()),
        };
        if fed.is_err() || flushed.is_err() {
            // Whatever it left behind must not leak into the next message.
            self.decoder = Self::build(&self.input_schema, self.max_rows)
                .map_err(|e| (DecodeCause::SchemaMismatch, e.to_string()))?;
        }
        fed?;
        flushed.map_err(|e| (DecodeCause::SchemaMismatch, redact(&e.to_string())))
    }
}

/// Whether `payload` nests arrays or objects deeper than `limit` (brackets inside strings do
/// not count). No allocation.
fn nesting_exceeds(payload: &[u8], limit: usize) -> bool {
    // A transaction is one flat object: with no more opening brackets in it than the limit,
    // anywhere, nothing can nest deeper. Counting them is one vectorised pass; the exact walk
    // below, a branch per byte, was the larger part of the source thread's checks before the
    // parser (1.6% of the process at 10,000 tx/s).
    let openers = payload
        .iter()
        .map(|&b| usize::from(b == b'[' || b == b'{'))
        .sum::<usize>();
    if openers <= limit {
        return false;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in payload {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Longest detail kept from a parser error.
const MAX_DETAIL_CHARS: usize = 200;

/// A parser error without the message's content: arrow-json quotes the offending value
/// (`expected { got [...]`, `failed to parse "4111…" as Int64`), and details travel in
/// dead-letter headers and logs, where a card number must never appear. Keeps the field
/// name and the rule; drops what follows "got", quoted text and long digit runs.
fn redact(error: &str) -> String {
    let error = match error.find(" got ") {
        Some(at) => &error[..at],
        None => error,
    };
    let mut out = String::with_capacity(error.len().min(MAX_DETAIL_CHARS));
    let mut in_quotes = false;
    let mut digits = 0;
    for c in error.chars() {
        if c == '"' {
            if !in_quotes {
                out.push_str("\"…\"");
            }
            in_quotes = !in_quotes;
            continue;
        }
        if in_quotes {
            continue;
        }
        if c.is_ascii_digit() {
            digits += 1;
            if digits == 6 {
                out.push('…');
            }
            if digits >= 6 {
                continue;
            }
        } else {
            digits = 0;
        }
        out.push(c);
        if out.chars().count() >= MAX_DETAIL_CHARS {
            out.push('…');
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Float64Type;
    use proptest::strategy::Strategy;

    fn decoder() -> JsonBatchDecoder {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("amount", DataType::Float64, false),
            Field::new("note", DataType::Utf8, true),
        ]));
        JsonBatchDecoder::new(schema, 64).unwrap()
    }

    fn decode(d: &mut JsonBatchDecoder, messages: &[&[u8]]) -> Decoded {
        let payloads: Vec<Option<&[u8]>> = messages.iter().map(|m| Some(*m)).collect();
        d.decode(&payloads).unwrap()
    }

    #[test]
    fn a_clean_batch_decodes_whole_with_row_ids() {
        let mut d = decoder();
        let out = decode(
            &mut d,
            &[
                br#"{"id":"a","amount":1.5}"#,
                br#"{"id":"b","amount":2,"note":"x","extra":[1]}"#,
            ],
        );
        assert!(out.rejected.is_empty());
        assert_eq!(out.batch.num_rows(), 2);
        assert_eq!(out.message_index, vec![0, 1]);
        let amount = out.batch.column(1).as_primitive::<Float64Type>();
        assert_eq!(amount.values(), &[1.5, 2.0]);
        let row_id = out.batch.column_by_name(ROW_ID).unwrap();
        assert_eq!(row_id.len(), 2);
    }

    #[test]
    fn bad_messages_are_isolated_with_their_cause_and_the_rest_decode() {
        let mut d = decoder();
        let messages: Vec<Option<&[u8]>> = vec![
            Some(br#"{"id":"a","amount":1}"#),
            Some(br#"{"id":"b","amount":"#), // truncated
            Some(br#"{"id":"c","amount":3}"#),
            Some(br#"{"id":"d","amount":"lots"}"#), // wrong type
            Some(b"\xff\xfe"),                      // not UTF-8
            None,                                   // tombstone
            Some(br#"{"amount":5}"#),               // missing required id
            Some(br#"{"id":"e","amount":1}{"id":"f","amount":2}"#), // two values
            Some(br#"{"id":"g","amount":7}"#),
        ];
        let out = d.decode(&messages).unwrap();
        assert_eq!(out.message_index, vec![0, 2, 8]);
        let causes: Vec<(usize, &str)> = out
            .rejected
            .iter()
            .map(|r| (r.index, r.cause.as_str()))
            .collect();
        assert_eq!(
            causes,
            vec![
                (1, "invalid-json"),
                (3, "schema-mismatch"),
                (4, "not-utf8"),
                (5, "empty-payload"),
                (6, "schema-mismatch"),
                (7, "invalid-json"),
            ]
        );
        let ids = out.batch.column(0).as_string::<i32>();
        assert_eq!(
            ids.iter().flatten().collect::<Vec<_>>(),
            vec!["a", "c", "g"]
        );

        // The decoder is clean afterwards.
        let next = decode(&mut d, &[br#"{"id":"z","amount":9}"#]);
        assert_eq!(next.batch.num_rows(), 1);
        assert!(next.rejected.is_empty());
    }

    #[test]
    fn an_all_bad_batch_gives_an_empty_batch_with_the_full_schema() {
        let mut d = decoder();
        let out = decode(&mut d, &[b"nope", br#"{"id":1}"#]);
        assert_eq!(out.batch.num_rows(), 0);
        assert_eq!(out.batch.schema(), *d.schema());
        assert_eq!(out.rejected.len(), 2);
    }

    #[test]
    fn details_do_not_quote_the_message() {
        let d = redact(
            r#"Json error: whilst decoding field 'card_id': failed to parse "4111111111111111" as Int64"#,
        );
        assert!(!d.contains("4111"), "{d}");
        assert!(d.contains("'card_id'"), "{d}");
        let d = redact("Json error: expected { got [4111111111111111]");
        assert_eq!(d, "Json error: expected {");
        let d = redact("value 12345678901234 out of range");
        assert!(!d.contains("123456"), "{d}");
    }

    #[test]
    fn nesting_is_measured_outside_strings() {
        assert!(!nesting_exceeds(br#"{"a":[[1]],"b":"[[[[[[[["}"#, 3));
        assert!(nesting_exceeds(br#"{"a":[[[1]]]}"#, 3));
        assert!(!nesting_exceeds(br#"{"a":"\"[[[[[["}"#, 1));
        // At the limit by the count alone, and one past it.
        assert!(!nesting_exceeds(br#"{"a":[1]}"#, 2));
        assert!(nesting_exceeds(br#"{"a":[[1]]}"#, 2));
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic the decoder, and every message is either a row or a
        /// rejection, never both, never neither.
        #[test]
        fn every_message_is_accounted_for(messages in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::collection::vec(proptest::num::u8::ANY, 0..40),
                proptest::strategy::Just(br#"{"id":"ok","amount":1.25}"#.to_vec()),
                "[a-z{}\":,0-9 ]{0,30}".prop_map(|s: String| s.into_bytes()),
            ], 0..30)) {
            let mut d = decoder();
            let payloads: Vec<Option<&[u8]>> = messages.iter().map(|m| Some(m.as_slice())).collect();
            let out = d.decode(&payloads).unwrap();
            let mut seen: Vec<usize> = out.message_index.clone();
            seen.extend(out.rejected.iter().map(|r| r.index));
            seen.sort();
            proptest::prop_assert_eq!(seen, (0..messages.len()).collect::<Vec<_>>());
            proptest::prop_assert_eq!(out.batch.num_rows(), out.message_index.len());
        }
    }
}
