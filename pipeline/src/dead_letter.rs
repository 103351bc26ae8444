//! Dead letters: a message verdict cannot decide goes to the workload's dead-letter topic with
//! its original key, value and headers, plus headers saying where it came from and why
//! (names in `verdict_schemas::dead_letter`). Its offset is committed only after the dead
//! letter is acknowledged, like any other output of its batch.

use std::sync::Arc;

use verdict_schemas::dead_letter as h;
use verdict_sinks::OutRecord;

use crate::source::RawMessage;

/// Pipeline stage that rejected a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Decode,
    Features,
    Score,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Features => "features",
            Stage::Score => "score",
        }
    }
}

/// Builds the dead letter of `message`.
pub fn dead_letter(
    message: &RawMessage,
    topic: &Arc<str>,
    workload: &str,
    stage: Stage,
    cause: &str,
    detail: &str,
) -> OutRecord {
    let mut headers = message.headers.clone();
    headers.extend([
        (
            h::SOURCE_TOPIC.to_string(),
            message.topic.as_bytes().to_vec(),
        ),
        (
            h::SOURCE_PARTITION.to_string(),
            message.partition.to_string().into_bytes(),
        ),
        (
            h::SOURCE_OFFSET.to_string(),
            message.offset.to_string().into_bytes(),
        ),
        (h::STAGE.to_string(), stage.as_str().as_bytes().to_vec()),
        (h::CAUSE.to_string(), cause.as_bytes().to_vec()),
        (h::DETAIL.to_string(), detail.as_bytes().to_vec()),
        (h::WORKLOAD.to_string(), workload.as_bytes().to_vec()),
    ]);
    OutRecord {
        topic: Arc::clone(topic),
        // The consumed message's own bytes, shared (its batch buffer), not copied.
        key: message.key.clone(),
        payload: message.payload.clone().unwrap_or_default(),
        headers,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn keeps_the_original_message_and_adds_provenance_and_cause() {
        let message = RawMessage {
            topic: "tx".into(),
            partition: 2,
            offset: 41,
            timestamp_ms: None,
            key: Some(Bytes::from_static(b"k")),
            payload: Some(Bytes::from_static(b"{bad")),
            headers: vec![("trace".into(), b"abc".to_vec())],
        };
        let record = dead_letter(
            &message,
            &"tx.dlq".into(),
            "fraud",
            Stage::Decode,
            "invalid-json",
            "truncated",
        );
        assert_eq!(&*record.topic, "tx.dlq");
        assert_eq!(record.key.as_deref(), Some(&b"k"[..]));
        assert_eq!(&record.payload[..], b"{bad");
        let header = |name: &str| {
            record
                .headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        };
        assert_eq!(header("trace").as_deref(), Some("abc"));
        assert_eq!(header(h::SOURCE_PARTITION).as_deref(), Some("2"));
        assert_eq!(header(h::SOURCE_OFFSET).as_deref(), Some("41"));
        assert_eq!(header(h::CAUSE).as_deref(), Some("invalid-json"));
        assert_eq!(header(h::STAGE).as_deref(), Some("decode"));
    }
}
