//! RESP2, the part of it verdict speaks: commands written as arrays of bulk strings, and the
//! replies of `HMGET`, `EVAL`, `AUTH`, `SELECT` and `PING` read in place from a connection's
//! read buffer.
//!
//! Why not the redis crate's parser: it builds a `Value` per reply element (an allocation per
//! field value) and hands the tree over a channel to the caller. A batch's hash reads are
//! hundreds of values, and that was most of the ~4 µs per row verdict spent on them
//! (`examples/feature_read_cost.rs`). Here a reply is first found complete ([`reply_len`],
//! no allocation), then its values are copied straight into the batch's [`HashValues`].
//!
//! Pure functions over byte slices, so every edge (a reply split anywhere, nil, errors,
//! nesting) is unit-tested without a server; `redis_store` owns the sockets.

use crate::store::HashValues;

/// Why a reply could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The server answered `-<message>`, e.g. `WRONGTYPE Operation against a key …`.
    #[error("{0}")]
    Server(String),
    /// Bytes that are not RESP2, or a reply of a type the command cannot return: the
    /// connection is out of step and must not be reused.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Appends `*<len>\r\n`: the header of a command of `len` arguments (the name included).
pub fn push_command(out: &mut Vec<u8>, len: usize) {
    out.push(b'*');
    push_decimal(out, len as i64);
    out.extend_from_slice(b"\r\n");
}

/// Appends one argument as a bulk string.
pub fn push_arg(out: &mut Vec<u8>, arg: &[u8]) {
    out.push(b'$');
    push_decimal(out, arg.len() as i64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(arg);
    out.extend_from_slice(b"\r\n");
}

/// Appends one integer argument, written in decimal as Redis expects.
pub fn push_int_arg(out: &mut Vec<u8>, value: i64) {
    let mut digits = itoa::Buffer::new();
    push_arg(out, digits.format(value).as_bytes());
}

fn push_decimal(out: &mut Vec<u8>, value: i64) {
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(digits.format(value).as_bytes());
}

/// The line starting at `at` (without its `\r\n`) and the position after it; `None` if the
/// buffer ends first.
fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(at..)?;
    let cr = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((&rest[..cr], at + cr + 2))
}

fn integer(digits: &[u8]) -> Result<i64, ReplyError> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .ok_or_else(|| {
            ReplyError::Protocol(format!(
                "`{}` is not a length",
                String::from_utf8_lossy(digits)
            ))
        })
}

/// The length in bytes of the first reply in `buf` if all of it is there, `None` if more
/// bytes are needed. Nested arrays are walked with a count of pending elements, not recursion,
/// so a hostile nesting depth costs nothing.
pub fn reply_len(buf: &[u8]) -> Result<Option<usize>, ReplyError> {
    let mut at = 0;
    let mut pending: u64 = 1;
    while pending > 0 {
        let Some(&kind) = buf.get(at) else {
            return Ok(None);
        };
        let Some((header, next)) = line(buf, at + 1) else {
            return Ok(None);
        };
        at = next;
        pending -= 1;
        match kind {
            b'+' | b'-' | b':' => {}
            b'$' => {
                let len = integer(header)?;
                if len >= 0 {
                    at = at.saturating_add(len as usize).saturating_add(2);
                    if at > buf.len() {
                        return Ok(None);
                    }
                    if &buf[at - 2..at] != b"\r\n" {
                        return Err(ReplyError::Protocol(
                            "bulk string not followed by CRLF".into(),
                        ));
                    }
                } else if len != -1 {
                    return Err(ReplyError::Protocol(format!("bulk length {len}")));
                }
            }
            b'*' => {
                let len = integer(header)?;
                if len > 0 {
                    pending += len as u64;
                } else if len < -1 {
                    return Err(ReplyError::Protocol(format!("array length {len}")));
                }
            }
            other => {
                return Err(ReplyError::Protocol(format!(
                    "reply type byte {other:#04x}"
                )))
            }
        }
    }
    Ok(Some(at))
}

/// An error reply's message, if `reply` is one.
fn server_error(reply: &[u8]) -> Option<ReplyError> {
    let (message, _) = line(reply, 1)?;
    (reply.first() == Some(&b'-'))
        .then(|| ReplyError::Server(String::from_utf8_lossy(message).into_owned()))
}

fn unexpected(reply: &[u8], wanted: &str) -> ReplyError {
    if let Some(error) = server_error(reply) {
        return error;
    }
    let shown = &reply[..reply.len().min(32)];
    ReplyError::Protocol(format!(
        "expected {wanted}, got `{}`",
        String::from_utf8_lossy(shown).escape_debug()
    ))
}

/// Reads one bulk string (or nil) at `at` of a complete reply.
fn bulk_at(reply: &[u8], at: usize) -> Result<(Option<&[u8]>, usize), ReplyError> {
    match (reply.get(at), line(reply, at + 1)) {
        (Some(b'$'), Some((header, next))) => {
            let len = integer(header)?;
            if len < 0 {
                return Ok((None, next));
            }
            let end = next + len as usize;
            let value = reply
                .get(next..end)
                .ok_or_else(|| ReplyError::Protocol("bulk string past the reply".into()))?;
            Ok((Some(value), end + 2))
        }
        _ => Err(unexpected(&reply[at.min(reply.len())..], "a bulk string")),
    }
}

/// Appends the values of one complete `HMGET` reply (an array of bulk strings and nils) to
/// `into` as one read of `fields` values.
pub fn decode_hmget(reply: &[u8], fields: usize, into: &mut HashValues) -> Result<(), ReplyError> {
    let Some((b'*', Some((header, mut at)))) = reply.first().map(|&k| (k, line(reply, 1))) else {
        return Err(unexpected(reply, "an array"));
    };
    let len = integer(header)?;
    if len != fields as i64 {
        return Err(ReplyError::Protocol(format!(
            "HMGET of {fields} fields answered {len} values"
        )));
    }
    for _ in 0..fields {
        let (value, next) = bulk_at(reply, at)?;
        into.push_value(value);
        at = next;
    }
    into.finish_read();
    Ok(())
}

/// The bytes of a complete bulk-string reply; nil and other types are errors.
pub fn decode_bulk(reply: &[u8]) -> Result<&[u8], ReplyError> {
    match bulk_at(reply, 0)? {
        (Some(value), _) => Ok(value),
        (None, _) => Err(ReplyError::Protocol(
            "expected a bulk string, got nil".into(),
        )),
    }
}

/// The text of a complete simple-string reply (`+OK`, `+PONG`).
pub fn decode_simple(reply: &[u8]) -> Result<&[u8], ReplyError> {
    match (reply.first(), line(reply, 1)) {
        (Some(b'+'), Some((text, _))) => Ok(text),
        _ => Err(unexpected(reply, "a simple string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn command(args: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        push_command(&mut out, args.len());
        for arg in args {
            push_arg(&mut out, arg);
        }
        out
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        assert_eq!(
            command(&[b"HMGET", b"card:7", b""]),
            b"*3\r\n$5\r\nHMGET\r\n$6\r\ncard:7\r\n$0\r\n\r\n"
        );
        let mut out = Vec::new();
        push_int_arg(&mut out, -1_700_000_000_123);
        assert_eq!(out, b"$14\r\n-1700000000123\r\n");
    }

    #[test]
    fn an_hmget_reply_keeps_values_empties_and_nils_apart() {
        let reply = b"*3\r\n$4\r\n10.5\r\n$-1\r\n$0\r\n\r\n";
        assert_eq!(reply_len(reply), Ok(Some(reply.len())));
        let mut values = HashValues::default();
        decode_hmget(reply, 3, &mut values).unwrap();
        let expected: Vec<Option<&[u8]>> = vec![Some(b"10.5"), None, Some(b"")];
        assert_eq!(values.read(0).collect::<Vec<_>>(), expected);
    }

    #[test]
    fn values_may_hold_crlf_and_any_byte() {
        let reply = b"*1\r\n$4\r\na\r\n\xff\r\n";
        let mut values = HashValues::default();
        decode_hmget(reply, 1, &mut values).unwrap();
        assert_eq!(values.get(0, 0), Some(&b"a\r\n\xff"[..]));
    }

    #[test]
    fn error_replies_carry_the_servers_message() {
        let reply = b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n";
        assert_eq!(reply_len(reply), Ok(Some(reply.len())));
        let error = decode_hmget(reply, 2, &mut HashValues::default()).unwrap_err();
        assert!(
            matches!(&error, ReplyError::Server(m) if m.starts_with("WRONGTYPE ")),
            "{error:?}"
        );
        assert!(matches!(
            decode_bulk(b"-ERR boom\r\n"),
            Err(ReplyError::Server(m)) if m == "ERR boom"
        ));
    }

    #[test]
    fn wrong_types_and_counts_are_protocol_errors() {
        assert!(matches!(
            decode_hmget(b":1\r\n", 1, &mut HashValues::default()),
            Err(ReplyError::Protocol(_))
        ));
        assert!(matches!(
            decode_hmget(b"*1\r\n$1\r\nx\r\n", 2, &mut HashValues::default()),
            Err(ReplyError::Protocol(_))
        ));
        assert!(matches!(
            decode_bulk(b"$-1\r\n"),
            Err(ReplyError::Protocol(_))
        ));
        assert!(matches!(
            decode_simple(b"$2\r\nOK\r\n"),
            Err(ReplyError::Protocol(_))
        ));
        assert_eq!(decode_simple(b"+PONG\r\n"), Ok(&b"PONG"[..]));
        assert!(matches!(reply_len(b"?x\r\n"), Err(ReplyError::Protocol(_))));
        assert!(matches!(
            reply_len(b"$2\r\nabcd\r\n"),
            Err(ReplyError::Protocol(_))
        ));
    }

    #[test]
    fn nested_and_empty_arrays_are_measured_whole() {
        let reply = b"*3\r\n*0\r\n*-1\r\n*2\r\n:1\r\n+x\r\n";
        assert_eq!(reply_len(reply), Ok(Some(reply.len())));
        let mut two = reply.to_vec();
        two.extend_from_slice(b"+next\r\n");
        assert_eq!(reply_len(&two), Ok(Some(reply.len())));
    }

    /// Encodes `values` as an `HMGET` reply the way Redis does.
    fn hmget_reply(values: &[Option<Vec<u8>>]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", values.len()).into_bytes();
        for value in values {
            match value {
                Some(v) => {
                    out.extend_from_slice(format!("${}\r\n", v.len()).as_bytes());
                    out.extend_from_slice(v);
                    out.extend_from_slice(b"\r\n");
                }
                None => out.extend_from_slice(b"$-1\r\n"),
            }
        }
        out
    }

    proptest! {
        /// A reply cut anywhere is incomplete, never an error and never a wrong length: a
        /// socket read may end at any byte.
        #[test]
        fn a_reply_is_complete_only_at_its_last_byte(
            values in proptest::collection::vec(
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..12)), 0..8),
        ) {
            let reply = hmget_reply(&values);
            for cut in 0..reply.len() {
                prop_assert_eq!(reply_len(&reply[..cut]), Ok(None));
            }
            prop_assert_eq!(reply_len(&reply), Ok(Some(reply.len())));
            let mut decoded = HashValues::default();
            decode_hmget(&reply, values.len(), &mut decoded).unwrap();
            let expected: Vec<Option<&[u8]>> = values.iter().map(|v| v.as_deref()).collect();
            prop_assert_eq!(decoded.read(0).collect::<Vec<_>>(), expected);
        }
    }
}
