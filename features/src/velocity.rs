//! Velocity features, computed in-stream: per entity (for fraud, the card), how many
//! transactions and how much money over sliding windows (say 1 minute, 1 hour, 24 hours).
//!
//! # Semantics
//!
//! - **Event time.** Row *r* of entity *k* with event time *t* gets, for each window *w*, the
//!   count and amount sum of the transactions of *k* processed so far — this one included —
//!   whose event time is in `(t − w, t]`. Rows of one batch are applied in batch order, so the
//!   second of two same-card rows in a batch sees the first.
//! - **Idempotent.** A transaction is recorded under its id and amount: a redelivered message
//!   (at-least-once after a crash) is not counted twice.
//! - **Out of order and late events.** At the end of each batch, per entity, events at or
//!   before `newest − horizon` are trimmed, where `newest` is the newest event time seen for
//!   the entity and `horizon = longest window + allowed-lateness`. A row at most
//!   `allowed-lateness` older than `newest` therefore gets exact figures. A *late* row (older
//!   than that) is still recorded and scored, but its windows only see what is retained, so
//!   its counts may be low (never high); the `late` column says so. A row is never revised
//!   after its decision went out.
//! - **Bounded memory.** Every write refreshes the entity key's TTL to `horizon` (processing
//!   time): an idle entity's key disappears by itself, and trimming bounds an active one.
//!
//! # Storage
//!
//! Redis: one sorted set per entity (`<key-prefix><key>`), member `<amount cents>:<id>`,
//! score = event time in ms. All rows of a batch go in **one** `EVAL` of [`VELOCITY_LUA`],
//! sent in the same pipeline as the batch's hash lookups: one round trip for reads and
//! updates together, applied atomically. Amounts are kept in integer cents so sums are
//! exact. Counting is linear in the entity's retained events (its last 24 hours, say), which
//! suits payment cards; an entity with tens of thousands of events a day would want bucketed
//! counters instead. (A Redis Cluster would need all keys of a batch in one slot; verdict
//! talks to one primary.)

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanBuilder, Float64Builder, Int64Builder, StringArray,
    UInt32Array,
};
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use serde::Deserialize;
use smallvec::{smallvec, SmallVec};
use verdict_schemas::columns::ROW_ID;

use crate::{FeatureError, Result};

/// `[[workloads.velocity]]`: one set of sliding-window aggregates, exposed to the SQL as a
/// table aligned to the input rows.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VelocitySpec {
    /// Table name the SQL uses, e.g. `card_velocity`.
    pub name: String,
    /// Input column with the entity key (string), e.g. `card_id`.
    pub key_column: String,
    /// Redis key prefix, e.g. `velocity:card:`.
    pub key_prefix: String,
    /// Input column with the event time, Int64 milliseconds since the epoch.
    #[serde(default = "default_time_column")]
    pub time_column: String,
    /// Input column with the amount (Float64, in currency units; summed in cents).
    #[serde(default = "default_amount_column")]
    pub amount_column: String,
    /// Input column with the transaction id (string): a redelivered id is counted once.
    #[serde(default = "default_id_column")]
    pub id_column: String,
    /// Window lengths, e.g. `["1m", "1h", "24h"]`. Each gives the columns
    /// `tx_count_<window>` (Int64) and `amount_sum_<window>` (Float64).
    pub windows: Vec<String>,
    /// How far behind the entity's newest event a row may be and still get exact figures.
    #[serde(with = "humantime_serde", default = "default_allowed_lateness")]
    pub allowed_lateness: Duration,
}

fn default_time_column() -> String {
    "event_time_ms".into()
}
fn default_amount_column() -> String {
    "amount".into()
}
fn default_id_column() -> String {
    "transaction_id".into()
}
fn default_allowed_lateness() -> Duration {
    Duration::from_secs(300)
}

impl VelocitySpec {
    /// Window lengths in ms, in the configured order. Refuses an unparsable, zero or
    /// non-identifier window (it becomes part of a column name).
    pub fn window_lengths_ms(&self) -> Result<Vec<i64>> {
        if self.windows.is_empty() {
            return Err(self.error("`windows` is empty"));
        }
        self.windows
            .iter()
            .map(|w| {
                if !w.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return Err(self.error(&format!(
                        "window `{w}` must be written like 1m, 1h or 24h (it names columns)"
                    )));
                }
                let length = humantime::parse_duration(w)
                    .map_err(|e| self.error(&format!("window `{w}`: {e}")))?;
                match i64::try_from(length.as_millis()) {
                    Ok(ms) if ms > 0 => Ok(ms),
                    _ => Err(self.error(&format!("window `{w}` must be longer than 0 ms"))),
                }
            })
            .collect()
    }

    /// How far back events are retained: the longest window plus the allowed lateness.
    pub fn horizon_ms(&self) -> Result<i64> {
        let longest = self.window_lengths_ms()?.into_iter().max().unwrap_or(0);
        Ok(longest + self.allowed_lateness.as_millis() as i64)
    }

    /// `row_id`, the key, `late`, then `tx_count_<w>`, `amount_sum_<w>` per window.
    pub fn table_schema(&self) -> SchemaRef {
        let mut fields = vec![
            Field::new(ROW_ID, DataType::UInt32, false),
            Field::new(&self.key_column, DataType::Utf8, true),
            Field::new("late", DataType::Boolean, true),
        ];
        for w in &self.windows {
            fields.push(Field::new(format!("tx_count_{w}"), DataType::Int64, true));
            fields.push(Field::new(
                format!("amount_sum_{w}"),
                DataType::Float64,
                true,
            ));
        }
        Arc::new(Schema::new(fields))
    }

    fn error(&self, reason: &str) -> FeatureError {
        FeatureError::Velocity {
            name: self.name.clone(),
            reason: reason.to_string(),
        }
    }
}

/// One event to record, and whose windows to read. The pipeline's events borrow their key
/// and id from the batch (two allocations per row less); tests may own them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VelocityEvent<'a> {
    /// Full store key (prefix included).
    pub key: Cow<'a, str>,
    pub event_time_ms: i64,
    pub amount_cents: i64,
    pub id: Cow<'a, str>,
}

/// All events of one spec in one batch, in batch order: the store applies each key's events in
/// that order (keys are independent of one another).
#[derive(Debug, Clone)]
pub struct VelocityUpdate<'a> {
    pub windows_ms: Vec<i64>,
    pub horizon_ms: i64,
    pub events: Vec<VelocityEvent<'a>>,
}

/// Windows a [`VelocityCounts`] holds without a heap allocation. Specs have a handful of
/// windows (the example has three); more still work, one allocation per event each.
pub const INLINE_WINDOWS: usize = 4;

/// Per window, one value of an event (inline up to [`INLINE_WINDOWS`]): a batch answers one
/// of these per event, and two `Vec`s per event were two allocations per row.
pub type PerWindow = SmallVec<[i64; INLINE_WINDOWS]>;

/// What one event saw: per window, the count and the amount sum in cents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VelocityCounts {
    pub late: bool,
    pub counts: PerWindow,
    pub sums_cents: PerWindow,
}

/// The Redis side: records every event of a batch and returns its windows, atomically.
///
/// `KEYS[i]` is event *i*'s sorted set; `ARGV` = window count, the windows (ms), the horizon
/// (ms), then per event: event time (ms), amount (cents), id. Returns per event
/// `late, count_1, sum_1, …, count_n, sum_n` (all integers), in the order sent.
///
/// **The caller sends a key's events together** (one contiguous run per key, in batch order;
/// [`crate::RedisFeatureStore`] sorts them stably by key and puts the answers back in batch
/// order). The script then handles one key at a time with plain locals: read it once
/// (`ZRANGE 0 -1`), count its events, write it once (one `ZADD` of its new events,
/// `PEXPIRE`, and `ZREMRANGEBYSCORE` only when something has fallen out of the horizon).
/// The key's trimming comes after all of its events of the batch, so within a batch every
/// event sees the same retained history plus the batch's earlier events (exact for non-late
/// events either way). Most keys of a batch are an entity's first event within the horizon;
/// they take a short path that builds no table.
pub const VELOCITY_LUA: &str = r#"
local nw = tonumber(ARGV[1])
local windows = {}
local longest = 0
for i = 1, nw do
  windows[i] = tonumber(ARGV[1 + i])
  if windows[i] > longest then longest = windows[i] end
end
-- Every number handed to Redis is a string: the horizon and the event times as the caller
-- sent them, ranges as literals. A Lua number becomes a string through printf's %.14g, whose
-- floating-point path was a seventh of Redis's CPU in this script.
local horizon_arg = ARGV[nw + 2]
local horizon = tonumber(horizon_arg)
local lateness = horizon - longest
local base = nw + 2
local out = {}
-- Per event: late flag, then count and cents per window, formatted as integers in one call.
local row_format = string.rep('%d ', 2 * nw) .. '%d'
local row = {}
-- The current key's retained and new events; reused from key to key (only 1..n is live).
local times, cents, members, add = {}, {}, {}, {}
local nkeys = #KEYS
local first = 1
while first <= nkeys do
  local key = KEYS[first]
  local last = first
  while last < nkeys and KEYS[last + 1] == key do last = last + 1 end
  local all = redis.call('ZRANGE', key, '0', '-1', 'WITHSCORES')
  if #all == 0 and last == first then
    -- Nothing retained and one event: it sees itself alone in every window, and is newest.
    local a = base + 3 * (first - 1)
    local c = ARGV[a + 2]
    out[first] = '0' .. string.rep(' 1 ' .. c, nw)
    redis.call('ZADD', key, ARGV[a + 1], c .. ':' .. ARGV[a + 3])
  else
    local n = 0
    local newest = nil
    for i = 1, #all, 2 do
      n = n + 1
      local t = tonumber(all[i + 1])
      local m = all[i]
      times[n] = t
      members[n] = m
      cents[n] = tonumber(string.sub(m, 1, string.find(m, ':', 1, true) - 1))
      if newest == nil or t > newest then newest = t end
    end
    local nadd = 0
    for r = first, last do
      local a = base + 3 * (r - 1)
      local time_arg = ARGV[a + 1]
      local t = tonumber(time_arg)
      local c = ARGV[a + 2]
      local member = c .. ':' .. ARGV[a + 3]
      -- A redelivered event is a member already there. A scan, not a table: Lua compares
      -- strings by reference, and building a table per key cost more than the scans.
      local p = nil
      for e = 1, n do
        if members[e] == member then
          p = e
          break
        end
      end
      if p == nil then
        n = n + 1
        p = n
        members[p] = member
        cents[p] = tonumber(c)
      end
      times[p] = t
      add[nadd + 1] = time_arg
      add[nadd + 2] = member
      nadd = nadd + 2
      if newest == nil or t > newest then newest = t end
      if t < newest - lateness then row[1] = 1 else row[1] = 0 end
      for i = 1, 2 * nw do row[1 + i] = 0 end
      for e = 1, n do
        local et = times[e]
        if et <= t and et > t - longest then
          for i = 1, nw do
            if et > t - windows[i] then
              row[2 * i] = row[2 * i] + 1
              row[2 * i + 1] = row[2 * i + 1] + cents[e]
            end
          end
        end
      end
      out[r] = string.format(row_format, unpack(row, 1, 1 + 2 * nw))
    end
    -- In chunks of 500 pairs: unpack is bounded by Lua's stack.
    local i = 1
    while i <= nadd do
      local j = math.min(i + 999, nadd)
      redis.call('ZADD', key, unpack(add, i, j))
      i = j + 1
    end
    local cut = newest - horizon
    for e = 1, n do
      if times[e] <= cut then
        redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%d', cut))
        break
      end
    end
  end
  redis.call('PEXPIRE', key, horizon_arg)
  first = last + 1
end
-- One bulk string, not an array of integers: a 500-row batch answers 3,500 integers, and
-- parsing that many RESP elements cost the client more than the script's own work.
return table.concat(out, ' ')
"#;

/// Decodes [`VELOCITY_LUA`]'s reply, space-separated integers (per event: the late flag,
/// then count and cents per window), into one [`VelocityCounts`] per event.
pub fn decode_lua_reply(
    reply: &[u8],
    events: usize,
    windows: usize,
) -> Result<Vec<VelocityCounts>> {
    let per_event = 1 + 2 * windows;
    let mut reply_values = Vec::with_capacity(events * per_event);
    for token in reply.split(|&b| b == b' ').filter(|t| !t.is_empty()) {
        let value = std::str::from_utf8(token)
            .ok()
            .and_then(|t| t.parse::<i64>().ok())
            .ok_or_else(|| {
                FeatureError::Output(format!(
                    "velocity script returned a non-integer `{}`",
                    String::from_utf8_lossy(&token[..token.len().min(24)])
                ))
            })?;
        reply_values.push(value);
    }
    let reply = reply_values;
    if reply.len() != events * per_event {
        return Err(FeatureError::Output(format!(
            "velocity script returned {} values for {events} events of {windows} windows",
            reply.len()
        )));
    }
    Ok(reply
        .chunks_exact(per_event)
        .map(|chunk| VelocityCounts {
            late: chunk[0] != 0,
            counts: chunk[1..].iter().step_by(2).copied().collect(),
            sums_cents: chunk[2..].iter().step_by(2).copied().collect(),
        })
        .collect())
}

/// The same semantics in process memory: the test double's store, and the offline feature
/// computation for training data (`verdict gen --dataset`), so training and serving count
/// the same way. Not shared between processes; keys never expire (only trimming applies).
#[derive(Debug, Default)]
pub struct InMemoryVelocity {
    /// key → (event time, member) → amount cents.
    entities: HashMap<String, BTreeMap<(i64, String), i64>>,
}

impl InMemoryVelocity {
    pub fn apply(&mut self, update: &VelocityUpdate<'_>) -> Vec<VelocityCounts> {
        let longest = update.windows_ms.iter().copied().max().unwrap_or(0);
        let lateness = update.horizon_ms - longest;
        // Per key: the newest event time, from the retained set at the key's first event in
        // this batch, then a running maximum (as the Lua script keeps it).
        let mut newest: HashMap<&str, i64> = HashMap::new();
        let counts = update
            .events
            .iter()
            .map(|e| {
                let set = self.entities.entry(e.key.to_string()).or_default();
                let before = set.keys().next_back().map(|(t, _)| *t);
                let newest = newest
                    .entry(e.key.as_ref())
                    .or_insert_with(|| before.unwrap_or(e.event_time_ms));
                *newest = (*newest).max(e.event_time_ms);
                let member = format!("{}:{}", e.amount_cents, e.id);
                // ZADD semantics: a member is unique; re-adding moves it to the new time.
                set.retain(|(_, m), _| *m != member);
                set.insert((e.event_time_ms, member), e.amount_cents);
                let t = e.event_time_ms;
                let mut counts = VelocityCounts {
                    late: t < *newest - lateness,
                    counts: smallvec![0; update.windows_ms.len()],
                    sums_cents: smallvec![0; update.windows_ms.len()],
                };
                for ((et, _), cents) in set.range((t - longest + 1, String::new())..) {
                    if *et > t {
                        break;
                    }
                    for (i, w) in update.windows_ms.iter().enumerate() {
                        if *et > t - w {
                            counts.counts[i] += 1;
                            counts.sums_cents[i] += cents;
                        }
                    }
                }
                counts
            })
            .collect();
        // Trimming at the end of the batch, as the Lua script does.
        for (key, newest) in newest {
            if let Some(set) = self.entities.get_mut(key) {
                let cut = newest - update.horizon_ms;
                set.retain(|(t, _), _| *t > cut);
            }
        }
        counts
    }
}

/// The events of one spec in one batch, and which input row each came from.
pub(crate) struct VelocityPlan {
    /// Every event's store key (prefix + entity) in one string: one allocation per batch,
    /// not one per row. `key_ends[e]` is where event `e`'s key ends.
    key_text: String,
    key_ends: Vec<usize>,
    /// Per event: input row, event time, amount in cents.
    events: Vec<(usize, i64, i64)>,
    /// For each input row, its index in the events (None: null key, time or amount).
    row_to_event: Vec<Option<usize>>,
    keys: StringArray,
    ids: StringArray,
    windows_ms: Vec<i64>,
    horizon_ms: i64,
}

impl VelocityPlan {
    pub fn build(spec: &VelocitySpec, input: &RecordBatch) -> Result<Self> {
        let column = |name: &str, wanted: &DataType| -> Result<ArrayRef> {
            let c = input
                .column_by_name(name)
                .ok_or_else(|| spec.error(&format!("column `{name}` is not in the input")))?;
            if c.data_type() != wanted {
                return Err(spec.error(&format!(
                    "column `{name}` is {}, expected {wanted}",
                    c.data_type()
                )));
            }
            Ok(c.clone())
        };
        let keys = column(&spec.key_column, &DataType::Utf8)?;
        let times = column(&spec.time_column, &DataType::Int64)?;
        let amounts = column(&spec.amount_column, &DataType::Float64)?;
        let ids = column(&spec.id_column, &DataType::Utf8)?;
        let (keys, times, amounts, ids) = (
            keys.as_string::<i32>().clone(),
            times.as_primitive::<Int64Type>(),
            amounts.as_primitive::<Float64Type>(),
            ids.as_string::<i32>().clone(),
        );
        let rows = input.num_rows();
        let mut key_text =
            String::with_capacity(rows * spec.key_prefix.len() + keys.value_data().len());
        let mut key_ends = Vec::with_capacity(rows);
        let mut events = Vec::with_capacity(rows);
        let row_to_event = (0..rows)
            .map(|row| {
                if keys.is_null(row)
                    || times.is_null(row)
                    || amounts.is_null(row)
                    || ids.is_null(row)
                    || !amounts.value(row).is_finite()
                {
                    return None;
                }
                key_text.push_str(&spec.key_prefix);
                key_text.push_str(keys.value(row));
                key_ends.push(key_text.len());
                let cents = (amounts.value(row) * 100.0).round() as i64;
                events.push((row, times.value(row), cents));
                Some(events.len() - 1)
            })
            .collect();
        Ok(Self {
            key_text,
            key_ends,
            events,
            row_to_event,
            keys,
            ids,
            windows_ms: spec.window_lengths_ms()?,
            horizon_ms: spec.horizon_ms()?,
        })
    }

    /// The batch's events for the store, borrowing their keys and ids from this plan.
    pub fn update(&self) -> VelocityUpdate<'_> {
        let mut key_start = 0;
        let events = self
            .events
            .iter()
            .zip(&self.key_ends)
            .map(|(&(row, event_time_ms, amount_cents), &key_end)| {
                let key = &self.key_text[key_start..key_end];
                key_start = key_end;
                VelocityEvent {
                    key: Cow::Borrowed(key),
                    event_time_ms,
                    amount_cents,
                    id: Cow::Borrowed(self.ids.value(row)),
                }
            })
            .collect();
        VelocityUpdate {
            windows_ms: self.windows_ms.clone(),
            horizon_ms: self.horizon_ms,
            events,
        }
    }

    /// The SQL table: one row per input row, nulls where the row had no event.
    pub fn table(
        &self,
        spec: &VelocitySpec,
        answers: Option<&[VelocityCounts]>,
    ) -> Result<RecordBatch> {
        let rows = self.row_to_event.len();
        let windows = spec.windows.len();
        let answer = |row: usize| self.row_to_event[row].and_then(|e| answers.map(|a| &a[e]));
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(UInt32Array::from_iter_values(0..rows as u32)),
            Arc::new(self.keys.clone()),
        ];
        let mut late = BooleanBuilder::with_capacity(rows);
        for row in 0..rows {
            late.append_option(answer(row).map(|a| a.late));
        }
        columns.push(Arc::new(late.finish()));
        for w in 0..windows {
            let mut counts = Int64Builder::with_capacity(rows);
            let mut sums = Float64Builder::with_capacity(rows);
            for row in 0..rows {
                let a = answer(row);
                counts.append_option(a.map(|a| a.counts[w]));
                sums.append_option(a.map(|a| a.sums_cents[w] as f64 / 100.0));
            }
            columns.push(Arc::new(counts.finish()));
            columns.push(Arc::new(sums.finish()));
        }
        Ok(RecordBatch::try_new(spec.table_schema(), columns)?)
    }
}

/// The definition, spelled out and slow (quadratic), for tests: what event `upto` of
/// `events` (in processing order) should see — every earlier-or-same event of its key, an
/// (amount, id) counted once, with event time in `(t − w, t]`. Returns counts and cent sums.
pub fn recount(
    events: &[VelocityEvent<'_>],
    windows_ms: &[i64],
    upto: usize,
) -> (Vec<i64>, Vec<i64>) {
    let me = &events[upto];
    let mut seen = std::collections::HashSet::new();
    let mut counts = vec![0; windows_ms.len()];
    let mut sums = vec![0; windows_ms.len()];
    for e in events[..=upto].iter().rev() {
        if e.key != me.key || !seen.insert((e.amount_cents, e.id.as_ref())) {
            continue;
        }
        for (i, w) in windows_ms.iter().enumerate() {
            if e.event_time_ms > me.event_time_ms - w && e.event_time_ms <= me.event_time_ms {
                counts[i] += 1;
                sums[i] += e.amount_cents;
            }
        }
    }
    (counts, sums)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Event sequences with bursts, out-of-order arrivals, late events and redeliveries.
    fn event_sequence() -> impl Strategy<Value = Vec<VelocityEvent<'static>>> {
        // Exact window lengths as gaps, and no skew, put events right on window boundaries.
        let gap = prop_oneof![
            0i64..200_000,
            Just(10_000i64),
            Just(60_000i64),
            Just(600_000i64)
        ];
        let skew = prop_oneof![Just(0i64), -30_000i64..4_000];
        proptest::collection::vec((0u8..4, gap, skew, 1i64..50_000, 0u8..10), 1..120).prop_map(
            |steps| {
                let mut clock = 1_700_000_000_000i64;
                let mut out: Vec<VelocityEvent<'static>> = Vec::new();
                for (n, (card, advance, jitter, cents, redeliver)) in steps.into_iter().enumerate()
                {
                    if redeliver == 0 && !out.is_empty() {
                        // At-least-once: the same message again.
                        let again = out[n % out.len()].clone();
                        out.push(again);
                        continue;
                    }
                    clock += advance;
                    out.push(VelocityEvent {
                        key: format!("v:card-{card}").into(),
                        event_time_ms: clock + jitter,
                        amount_cents: cents,
                        id: format!("tx-{n}").into(),
                    });
                }
                out
            },
        )
    }

    const WINDOWS_MS: [i64; 3] = [10_000, 60_000, 600_000];
    const LATENESS_MS: i64 = 5_000;

    proptest! {
        /// Non-late events get exactly the brute-force figures; late ones never more.
        #[test]
        fn in_memory_velocity_matches_a_brute_force_recount(
            events in event_sequence(),
            batch_size in 1usize..20,
        ) {
            let mut store = InMemoryVelocity::default();
            let mut answers = Vec::new();
            for chunk in events.chunks(batch_size) {
                answers.extend(store.apply(&VelocityUpdate {
                    windows_ms: WINDOWS_MS.to_vec(),
                    horizon_ms: 600_000 + LATENESS_MS,
                    events: chunk.to_vec(),
                }));
            }
            for (i, got) in answers.iter().enumerate() {
                let (counts, sums) = recount(&events, &WINDOWS_MS, i);
                if got.late {
                    for (got, recounted) in got.counts.iter().zip(&counts) {
                        prop_assert!(got <= recounted);
                    }
                } else {
                    prop_assert_eq!(got.counts.as_slice(), counts.as_slice(), "event {}", i);
                    prop_assert_eq!(got.sums_cents.as_slice(), sums.as_slice(), "event {}", i);
                }
            }
        }
    }

    #[test]
    fn the_lua_reply_decodes_per_event_and_window() {
        // A number Lua wrote in exponent notation would lose cents: refused, not rounded.
        assert!(decode_lua_reply(b"0 1 1e+14", 1, 1).is_err());
        assert!(decode_lua_reply(b"0 1 500 2", 1, 1).is_err());
        let decoded = decode_lua_reply(b"0 1 500 2 900 1 1 100 3 1200", 2, 2).unwrap();
        assert_eq!(
            decoded[1],
            VelocityCounts {
                late: true,
                counts: smallvec![1, 3],
                sums_cents: smallvec![100, 1200]
            }
        );
        assert!(decode_lua_reply(&[0, 1], 1, 2).is_err());
    }

    #[test]
    fn the_plan_lends_prefixed_keys_and_ids_and_skips_incomplete_rows() {
        use arrow::array::{Float64Array, Int64Array};
        let spec = VelocitySpec {
            name: "card_velocity".into(),
            key_column: "card_id".into(),
            key_prefix: "velocity:card:".into(),
            time_column: default_time_column(),
            amount_column: default_amount_column(),
            id_column: default_id_column(),
            windows: vec!["1m".into(), "1h".into()],
            allowed_lateness: Duration::from_secs(60),
        };
        let input = RecordBatch::try_from_iter([
            (
                "card_id",
                Arc::new(StringArray::from(vec![
                    Some("c-1"),
                    None,
                    Some("c-22"),
                    Some("c-1"),
                    Some("c-3"),
                ])) as ArrayRef,
            ),
            (
                "event_time_ms",
                Arc::new(Int64Array::from(vec![10, 20, 30, 40, 50])) as ArrayRef,
            ),
            (
                "amount",
                Arc::new(Float64Array::from(vec![
                    Some(1.25),
                    Some(2.0),
                    Some(3.5),
                    Some(f64::NAN),
                    Some(12.34),
                ])) as ArrayRef,
            ),
            (
                "transaction_id",
                Arc::new(StringArray::from(vec!["t1", "t2", "t3", "t4", "t5"])) as ArrayRef,
            ),
        ])
        .unwrap();
        let plan = VelocityPlan::build(&spec, &input).unwrap();
        let update = plan.update();
        assert_eq!(update.windows_ms, vec![60_000, 3_600_000]);
        assert_eq!(update.horizon_ms, 3_660_000);
        let event = |key: &'static str, t: i64, cents: i64, id: &'static str| VelocityEvent {
            key: key.into(),
            event_time_ms: t,
            amount_cents: cents,
            id: id.into(),
        };
        // Row 1 has no key and row 3 no finite amount: no event, a null row in the table.
        assert_eq!(
            update.events,
            vec![
                event("velocity:card:c-1", 10, 125, "t1"),
                event("velocity:card:c-22", 30, 350, "t3"),
                event("velocity:card:c-3", 50, 1234, "t5"),
            ]
        );
        assert!(update
            .events
            .iter()
            .all(|e| matches!((&e.key, &e.id), (Cow::Borrowed(_), Cow::Borrowed(_)))));
        assert_eq!(
            plan.row_to_event,
            vec![Some(0), None, Some(1), None, Some(2)]
        );
    }

    #[test]
    fn windows_must_name_columns_and_be_positive() {
        let spec = |w: &str| VelocitySpec {
            name: "v".into(),
            key_column: "card_id".into(),
            key_prefix: "v:".into(),
            time_column: default_time_column(),
            amount_column: default_amount_column(),
            id_column: default_id_column(),
            windows: vec![w.into()],
            allowed_lateness: Duration::from_secs(60),
        };
        assert_eq!(spec("24h").window_lengths_ms().unwrap(), vec![86_400_000]);
        assert_eq!(spec("24h").horizon_ms().unwrap(), 86_460_000);
        assert!(spec("1 h").window_lengths_ms().is_err());
        assert!(spec("0s").window_lengths_ms().is_err());
        assert!(spec("soon").window_lengths_ms().is_err());
    }
}
