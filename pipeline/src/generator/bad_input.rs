//! A corpus of bad fraud-workload input: every kind of malformed or contract-breaking message
//! verdict is expected to dead-letter, each with the stage and cause it must get. The tests
//! mix it into valid traffic; the demo shows a few.

/// One kind of bad input.
#[derive(Debug, Clone)]
pub struct BadInput {
    /// Short name, unique in the corpus; the tests use it as the message key.
    pub kind: &'static str,
    /// The message value; `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    /// The `verdict.stage` header its dead letter must carry.
    pub stage: &'static str,
    /// The `verdict.cause` header its dead letter must carry.
    pub cause: &'static str,
}

/// What a corpus needs from the environment: ids that exist in the feature store, and a card
/// whose 30-day average amount is 0 (so `amount / avg_amount_30d` is infinite or NaN).
#[derive(Debug, Clone)]
pub struct CorpusIds<'a> {
    pub card_id: &'a str,
    pub merchant_id: &'a str,
    pub zero_average_card_id: &'a str,
    pub event_time_ms: i64,
}

/// A valid transaction with `fields` replaced (or added), as JSON text; a field whose value
/// is `None` is removed.
fn transaction(ids: &CorpusIds<'_>, id: &str, fields: &[(&str, Option<&str>)]) -> String {
    let mut pairs: Vec<(String, String)> = vec![
        ("transaction_id".into(), format!("\"{id}\"")),
        ("card_id".into(), format!("\"{}\"", ids.card_id)),
        ("merchant_id".into(), format!("\"{}\"", ids.merchant_id)),
        ("amount".into(), "12.5".into()),
        ("currency".into(), "\"EUR\"".into()),
        ("country".into(), "\"DE\"".into()),
        ("channel".into(), "\"pos\"".into()),
        ("event_time_ms".into(), ids.event_time_ms.to_string()),
    ];
    for (name, value) in fields {
        let at = pairs.iter().position(|(n, _)| n == name);
        match (at, value) {
            (Some(i), Some(v)) => pairs[i].1 = v.to_string(),
            (Some(i), None) => {
                pairs.remove(i);
            }
            (None, Some(v)) => pairs.push((name.to_string(), v.to_string())),
            (None, None) => {}
        }
    }
    let body: Vec<String> = pairs.iter().map(|(n, v)| format!("\"{n}\":{v}")).collect();
    format!("{{{}}}", body.join(","))
}

/// The corpus: 41 kinds of bad input for the fraud workload (`max-message-bytes` at its
/// default of 65,536).
pub fn fraud_corpus(ids: &CorpusIds<'_>) -> Vec<BadInput> {
    let tx = |kind: &str, fields: &[(&str, Option<&str>)]| transaction(ids, kind, fields);
    let bytes = |s: &str| Some(s.as_bytes().to_vec());
    let valid = tx("x", &[]);
    let utf16: Vec<u8> = valid.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let mut latin1 = tx("latin1", &[("note", Some("\"caf_\""))]).into_bytes();
    let at = latin1
        .windows(4)
        .position(|w| w == b"caf_")
        .expect("marker")
        + 3;
    latin1[at] = 0xe9; // é in Latin-1: not UTF-8
    let mut cut_multibyte = tx("cut-utf8", &[("note", Some("\"\u{20ac}\""))]).into_bytes();
    let euro = cut_multibyte
        .windows(3)
        .position(|w| w == "\u{20ac}".as_bytes())
        .expect("euro sign");
    cut_multibyte.remove(euro + 2);
    let padding = format!("\"{}\"", "x".repeat(70_000));
    let long_id = format!("\"{}\"", "c".repeat(200));

    let decode = |kind: &'static str, payload: Option<Vec<u8>>, cause: &'static str| BadInput {
        kind,
        payload,
        stage: "decode",
        cause,
    };
    vec![
        // No value.
        decode("tombstone", None, "empty-payload"),
        decode("zero-bytes", Some(Vec::new()), "empty-payload"),
        decode("whitespace-only", bytes(" \n\t "), "empty-payload"),
        // Not text.
        decode(
            "binary-garbage",
            Some(vec![0xff, 0xfe, 0x00, 0x81]),
            "not-utf8",
        ),
        decode("latin1-in-string", Some(latin1), "not-utf8"),
        // UTF-16 of ASCII text is valid UTF-8 (with NULs), so it fails as JSON instead.
        decode("utf16-json", Some(utf16), "invalid-json"),
        decode("truncated-multibyte", Some(cut_multibyte), "not-utf8"),
        // Not one JSON value.
        decode(
            "truncated-object",
            bytes(r#"{"transaction_id": "x","#),
            "invalid-json",
        ),
        decode("plain-text", bytes("approve this please"), "invalid-json"),
        decode(
            "missing-colon",
            bytes(r#"{"transaction_id" "x"}"#),
            "invalid-json",
        ),
        decode(
            "single-quotes",
            bytes(&valid.replace('"', "'")),
            "invalid-json",
        ),
        decode(
            "nan-literal",
            bytes(&tx("nan-literal", &[("amount", Some("NaN"))])),
            "invalid-json",
        ),
        decode(
            "two-objects",
            bytes(&format!("{valid}{valid}")),
            "invalid-json",
        ),
        decode(
            "unquoted-key",
            bytes(&valid.replacen("\"transaction_id\"", "transaction_id", 1)),
            "invalid-json",
        ),
        decode(
            "comment",
            bytes(&format!("// note\n{valid}")),
            "invalid-json",
        ),
        decode("unbalanced-brace", bytes("}"), "invalid-json"),
        // JSON, but not a transaction.
        decode("top-level-array", bytes("[1,2,3]"), "schema-mismatch"),
        decode(
            "top-level-string",
            bytes("\"transaction\""),
            "schema-mismatch",
        ),
        // arrow-json's tokenizer refuses a bare number before any schema applies.
        decode("top-level-number", bytes("42"), "invalid-json"),
        decode("empty-object", bytes("{}"), "schema-mismatch"),
        decode(
            "missing-amount",
            bytes(&tx("missing-amount", &[("amount", None)])),
            "schema-mismatch",
        ),
        decode(
            "missing-card",
            bytes(&tx("missing-card", &[("card_id", None)])),
            "schema-mismatch",
        ),
        decode(
            "null-id",
            bytes(&tx("null-id", &[("transaction_id", Some("null"))])),
            "schema-mismatch",
        ),
        decode(
            "amount-word",
            bytes(&tx("amount-word", &[("amount", Some("\"ten\""))])),
            "schema-mismatch",
        ),
        decode(
            "amount-object",
            bytes(&tx("amount-object", &[("amount", Some("{\"value\":1}"))])),
            "schema-mismatch",
        ),
        decode(
            "amount-bool",
            bytes(&tx("amount-bool", &[("amount", Some("true"))])),
            "schema-mismatch",
        ),
        decode(
            "time-word",
            bytes(&tx(
                "time-word",
                &[("event_time_ms", Some("\"yesterday\""))],
            )),
            "schema-mismatch",
        ),
        decode(
            "time-overflow",
            bytes(&tx("time-overflow", &[("event_time_ms", Some("1e30"))])),
            "schema-mismatch",
        ),
        // Too big or too deep to parse (deep nesting overflowed the stack of arrow-json's
        // error formatting: the fuzz test below found it).
        decode(
            "oversized",
            bytes(&tx("oversized", &[("note", Some(&padding))])),
            "oversized",
        ),
        decode(
            "deep-nesting",
            bytes(&format!("{}{}", "[".repeat(32_000), "]".repeat(32_000))),
            "nesting-too-deep",
        ),
        // Well-typed values the contract forbids.
        decode(
            "negative-amount",
            bytes(&tx("negative-amount", &[("amount", Some("-5"))])),
            "out-of-range",
        ),
        decode(
            "huge-amount",
            bytes(&tx("huge-amount", &[("amount", Some("2e7"))])),
            "out-of-range",
        ),
        decode(
            "epoch-time",
            bytes(&tx("epoch-time", &[("event_time_ms", Some("0"))])),
            "out-of-range",
        ),
        decode(
            "far-future-time",
            bytes(&tx(
                "far-future-time",
                &[("event_time_ms", Some("9999999999999"))],
            )),
            "out-of-range",
        ),
        decode(
            "infinite-amount",
            bytes(&tx("infinite-amount", &[("amount", Some("1e999"))])),
            "non-finite-number",
        ),
        decode(
            "unknown-channel",
            bytes(&tx(
                "unknown-channel",
                &[("channel", Some("\"telepathy\""))],
            )),
            "unknown-category",
        ),
        decode(
            "uppercase-channel",
            bytes(&tx("uppercase-channel", &[("channel", Some("\"ONLINE\""))])),
            "unknown-category",
        ),
        decode("empty-id", bytes(&tx("", &[])), "invalid-length"),
        decode(
            "long-currency",
            bytes(&tx("long-currency", &[("currency", Some("\"EURO\""))])),
            "invalid-length",
        ),
        decode(
            "long-card-id",
            bytes(&tx("long-card-id", &[("card_id", Some(&long_id))])),
            "invalid-length",
        ),
        // Decodes, but a feature computed from it is not a number.
        BadInput {
            kind: "infinite-feature",
            payload: bytes(&tx(
                "infinite-feature",
                &[(
                    "card_id",
                    Some(&format!("\"{}\"", ids.zero_average_card_id)),
                )],
            )),
            stage: "score",
            cause: "non-finite-feature",
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> CorpusIds<'static> {
        CorpusIds {
            card_id: "card-1",
            merchant_id: "m-1",
            zero_average_card_id: "card-zero",
            event_time_ms: 1_767_225_600_000,
        }
    }

    #[test]
    fn the_corpus_has_forty_one_distinct_kinds() {
        let corpus = fraud_corpus(&ids());
        let kinds: std::collections::BTreeSet<&str> = corpus.iter().map(|b| b.kind).collect();
        assert_eq!(kinds.len(), corpus.len(), "kinds are unique");
        assert_eq!(corpus.len(), 41);
    }

    /// Every decode-stage kind, mixed with valid messages in one batch, is rejected with its
    /// cause by the fraud contract's decoder, and every valid message survives.
    #[test]
    fn the_fraud_decoder_rejects_each_kind_with_its_cause() {
        use crate::source::{JsonBatchDecoder, DEFAULT_MAX_MESSAGE_BYTES};
        use verdict_schemas::input::FRAUD_TRANSACTION_JSON_SCHEMA;
        use verdict_schemas::{arrow_schema_from_json_schema, InputConstraints};

        let schema = arrow_schema_from_json_schema("fraud", FRAUD_TRANSACTION_JSON_SCHEMA).unwrap();
        let rules =
            InputConstraints::from_json_schema("fraud", FRAUD_TRANSACTION_JSON_SCHEMA).unwrap();
        let corpus: Vec<BadInput> = fraud_corpus(&ids())
            .into_iter()
            .filter(|b| b.stage == "decode")
            .collect();
        let mut payloads: Vec<Option<Vec<u8>>> = Vec::new();
        let mut expected: Vec<Option<&str>> = Vec::new();
        for (i, bad) in corpus.iter().enumerate() {
            payloads.push(Some(
                transaction(&ids(), &format!("good-{i}"), &[]).into_bytes(),
            ));
            expected.push(None);
            payloads.push(bad.payload.clone());
            expected.push(Some(bad.cause));
        }
        let mut decoder = JsonBatchDecoder::new(schema, payloads.len())
            .unwrap()
            .with_constraints(rules)
            .with_max_message_bytes(DEFAULT_MAX_MESSAGE_BYTES);
        let refs: Vec<Option<&[u8]>> = payloads.iter().map(|p| p.as_deref()).collect();
        let decoded = decoder.decode(&refs).unwrap();
        let mut got: Vec<Option<&str>> = vec![None; payloads.len()];
        for r in &decoded.rejected {
            got[r.index] = Some(r.cause.as_str());
        }
        let mismatches: Vec<String> = expected
            .iter()
            .zip(&got)
            .enumerate()
            .filter(|(_, (e, g))| e != g)
            .map(|(i, (e, g))| {
                let kind = if i % 2 == 1 {
                    corpus[i / 2].kind
                } else {
                    "valid"
                };
                format!("{kind}: expected {e:?}, got {g:?}")
            })
            .collect();
        assert!(mismatches.is_empty(), "{mismatches:#?}");
        assert_eq!(decoded.batch.num_rows(), corpus.len());
        assert_eq!(
            decoded.message_index,
            (0..corpus.len()).map(|i| 2 * i).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_base_transaction_is_valid_json_and_edits_apply() {
        let text = transaction(&ids(), "t1", &[("amount", Some("-1")), ("channel", None)]);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["amount"], -1);
        assert!(v.get("channel").is_none());
        assert_eq!(v["transaction_id"], "t1");
    }

    /// Structure-aware fuzzing of the fraud decoder: valid transactions with fields replaced by
    /// arbitrary JSON values, bytes flipped, inserted, deleted or cut, deep nesting, and raw
    /// bytes. Properties: decoding never fails or panics, every message is a row or a
    /// rejection (exactly one), accepted rows break no value rule, and the untouched valid
    /// messages of the batch are always accepted. `PROPTEST_CASES` scales it up.
    mod fuzz {
        use super::*;
        use crate::source::{JsonBatchDecoder, DEFAULT_MAX_MESSAGE_BYTES};
        use proptest::prelude::*;
        use verdict_schemas::input::FRAUD_TRANSACTION_JSON_SCHEMA;
        use verdict_schemas::{arrow_schema_from_json_schema, InputConstraints};

        const FIELDS: &[&str] = &[
            "transaction_id",
            "card_id",
            "merchant_id",
            "amount",
            "currency",
            "country",
            "channel",
            "event_time_ms",
            "extra",
        ];

        fn json_value() -> impl Strategy<Value = String> {
            let leaf = prop_oneof![
                Just("null".to_string()),
                any::<bool>().prop_map(|b| b.to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                any::<f64>().prop_map(|x| format!("{x:e}")),
                "-?[0-9]{1,40}(\\.[0-9]{0,20})?([eE][+-]?[0-9]{1,5})?",
                any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
                "\"(online|pos|ONLINE|EUR|DE|)\"",
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6)
                        .prop_map(|v| format!("[{}]", v.join(","))),
                    proptest::collection::vec(("[a-z_]{1,8}", inner), 0..6).prop_map(|kv| {
                        let body: Vec<String> =
                            kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                        format!("{{{}}}", body.join(","))
                    }),
                ]
            })
        }

        #[derive(Debug, Clone)]
        enum Mutation {
            Replace(usize, String),
            Remove(usize),
            Flip(usize, u8),
            Insert(usize, u8),
            Delete(usize),
            Truncate(usize),
            Nest(usize),
            Raw(Vec<u8>),
        }

        fn mutation() -> impl Strategy<Value = Mutation> {
            prop_oneof![
                4 => (0..FIELDS.len(), json_value()).prop_map(|(f, v)| Mutation::Replace(f, v)),
                1 => (0..FIELDS.len()).prop_map(Mutation::Remove),
                2 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
                2 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
                1 => any::<usize>().prop_map(Mutation::Delete),
                1 => any::<usize>().prop_map(Mutation::Truncate),
                1 => (1usize..200_000).prop_map(Mutation::Nest),
                1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Mutation::Raw),
            ]
        }

        fn apply(m: &Mutation, i: usize) -> Vec<u8> {
            let id = format!("fz-{i}");
            let base = || transaction(&ids(), &id, &[]).into_bytes();
            match m {
                Mutation::Replace(f, v) => {
                    transaction(&ids(), &id, &[(FIELDS[*f], Some(v.as_str()))]).into_bytes()
                }
                Mutation::Remove(f) => transaction(&ids(), &id, &[(FIELDS[*f], None)]).into_bytes(),
                Mutation::Flip(at, b) => {
                    let mut v = base();
                    let n = v.len();
                    v[at % n] ^= b | 1;
                    v
                }
                Mutation::Insert(at, b) => {
                    let mut v = base();
                    let n = v.len();
                    v.insert(at % (n + 1), *b);
                    v
                }
                Mutation::Delete(at) => {
                    let mut v = base();
                    let n = v.len();
                    v.remove(at % n);
                    v
                }
                Mutation::Truncate(at) => {
                    let v = base();
                    let n = v.len();
                    v[..at % n].to_vec()
                }
                Mutation::Nest(depth) => {
                    let mut v = "[".repeat(*depth).into_bytes();
                    v.extend("]".repeat(*depth).into_bytes());
                    v
                }
                Mutation::Raw(bytes) => bytes.clone(),
            }
        }

        proptest! {
            #[test]
            fn mutated_transactions_are_each_a_valid_row_or_a_dead_letter(
                mutations in proptest::collection::vec(mutation(), 1..24),
            ) {
                let schema = arrow_schema_from_json_schema("fraud", FRAUD_TRANSACTION_JSON_SCHEMA).unwrap();
                let rules = InputConstraints::from_json_schema("fraud", FRAUD_TRANSACTION_JSON_SCHEMA).unwrap();
                let mut payloads: Vec<Vec<u8>> = Vec::new();
                let mut controls = Vec::new();
                for (i, m) in mutations.iter().enumerate() {
                    payloads.push(apply(m, i));
                    controls.push(payloads.len());
                    payloads.push(transaction(&ids(), &format!("ok-{i}"), &[]).into_bytes());
                }
                let mut decoder = JsonBatchDecoder::new(schema, payloads.len())
                    .unwrap()
                    .with_constraints(rules.clone())
                    .with_max_message_bytes(DEFAULT_MAX_MESSAGE_BYTES);
                let refs: Vec<Option<&[u8]>> = payloads.iter().map(|p| Some(p.as_slice())).collect();
                let out = decoder.decode(&refs);
                prop_assert!(out.is_ok(), "decode failed: {:?}", out.err());
                let out = out.unwrap();
                let mut seen: Vec<usize> = out.message_index.clone();
                seen.extend(out.rejected.iter().map(|r| r.index));
                seen.sort();
                prop_assert_eq!(seen, (0..payloads.len()).collect::<Vec<_>>());
                prop_assert_eq!(out.batch.num_rows(), out.message_index.len());
                for c in controls {
                    prop_assert!(out.message_index.contains(&c), "valid message {} rejected", c);
                }
                let violations = rules.check(&out.batch).unwrap();
                prop_assert!(violations.iter().all(Option::is_none), "{:?}", violations);
            }
        }
    }
}
