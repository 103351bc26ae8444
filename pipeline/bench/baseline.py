#!/usr/bin/env python3
"""The stack verdict is measured against: the fraud workload as a competent team writes it in
Python today.

confluent-kafka consumer (batched `consume`, manual commits), redis-py (one pipeline per batch:
the card and merchant `HMGET`s and the velocity update), numpy features, onnxruntime (one
`session.run` per batch), a confluent-kafka producer; each batch is produced, flushed, and only
then are its offsets committed (at least once, like verdict).

It computes what verdict's example fraud workload computes, from the same Redis data:
- the same lookups (`card:<id>`, `merchant:<id>` hashes) and the same SQL features, with the
  model's documented defaults for missing values (read from model.json);
- velocity through the very Lua script verdict sends (read from features/src/velocity.rs,
  the single source of it), so both update and read the same sorted sets;
- the same policy (approve below 0.30, review below 0.80, else decline).
A message that is not a valid transaction, or whose features are not finite, goes to the
dead-letter topic. `verdict bench --baseline python` runs it beside verdict on the same
broker, Redis, data and model and checks both give the same decisions.

Prints one JSON line of figures when it has handled `--expect` messages, or, without
`--expect`, when SIGTERM stops it (after finishing and committing the batch in hand).
"""

import argparse
import json
import os
import re
import resource
import signal
import sys
import time

import numpy as np
import onnxruntime as ort
import redis
from confluent_kafka import Consumer, KafkaError, Producer

CARD_FIELDS = ["avg_amount_30d", "tx_count_30d", "chargeback_count_90d", "card_age_days", "home_country"]
MERCHANT_FIELDS = ["fraud_rate_90d", "risk_score", "age_days"]
# [[workloads.velocity]] of the example config: windows 1m, 1h, 24h, allowed lateness 5m.
WINDOWS_MS = [60_000, 3_600_000, 86_400_000]
HORIZON_MS = 86_400_000 + 300_000
REVIEW, DECLINE = 0.30, 0.80
REQUIRED = {
    "transaction_id": str,
    "card_id": str,
    "merchant_id": str,
    "amount": (int, float),
    "currency": str,
    "country": str,
    "channel": str,
    "event_time_ms": int,
}


def velocity_lua(repo_root):
    source = open(os.path.join(repo_root, "features/src/velocity.rs"), encoding="utf-8").read()
    match = re.search(r'pub const VELOCITY_LUA: &str = r#"(.*?)"#;', source, re.S)
    if not match:
        sys.exit("VELOCITY_LUA not found in features/src/velocity.rs")
    return match.group(1)


def parse(message):
    """The transaction, or the dead-letter cause."""
    value = message.value()
    if value is None:
        return None, "empty"
    try:
        tx = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None, "malformed-json"
    if not isinstance(tx, dict):
        return None, "malformed-json"
    for name, kind in REQUIRED.items():
        v = tx.get(name)
        if v is None or isinstance(v, bool) or not isinstance(v, kind):
            return None, "schema-mismatch"
    return tx, None


def floats(values, convert=float):
    """A column of optional values as float64 with NaN for missing."""
    return np.array([np.nan if v is None else convert(v) for v in values], dtype=np.float64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--redis", required=True)
    ap.add_argument("--input", default="transactions")
    ap.add_argument("--output", default="decisions.baseline")
    ap.add_argument("--dead-letters", default="transactions.dead-letter.baseline")
    ap.add_argument("--group", default="baseline.fraud")
    ap.add_argument("--model", required=True, help="model directory (model.onnx + model.json)")
    ap.add_argument("--repo", default=os.path.join(os.path.dirname(__file__), "../.."))
    ap.add_argument("--max-batch", type=int, default=512)
    ap.add_argument("--fetch-wait-ms", type=int, default=25, help="consumer fetch.wait.max.ms")
    ap.add_argument("--expect", type=int, help="stop after this many messages (default: at SIGTERM)")
    args = ap.parse_args()

    meta = json.load(open(os.path.join(args.model, "model.json"), encoding="utf-8"))
    names = [f["name"] for f in meta["features"]]
    defaults = np.array(
        [np.nan if f.get("default") is None else f["default"] for f in meta["features"]], dtype=np.float64
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        os.path.join(args.model, "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name
    output_name = meta["output"]["name"]
    output_column = meta["output"].get("column", 0)
    label = f"{meta['name']}"
    version = meta["version"]

    store = redis.Redis.from_url(args.redis)
    velocity = store.register_script(velocity_lua(args.repo))
    consumer = Consumer(
        {
            "bootstrap.servers": args.brokers,
            "group.id": args.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": args.fetch_wait_ms,  # as verdict's consumer
        }
    )
    # verdict's producer settings (see `KafkaConfig::producer` in pipeline/src/config.rs): an
    # idempotent librdkafka producer busy-polls while a request with 5 or more messages is in
    # flight, so both systems send one request at a time without idempotence.
    producer = Producer(
        {
            "bootstrap.servers": args.brokers,
            "linger.ms": 1,
            "acks": "all",
            "enable.idempotence": False,
            "max.in.flight.requests.per.connection": 1,
        }
    )
    consumer.subscribe([args.input])
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))

    handled = decisions = dead = 0
    first = None
    cpu_at_first = None
    while not stopping and (args.expect is None or handled < args.expect):
        batch = consumer.consume(num_messages=args.max_batch, timeout=0.05)
        if not batch:
            continue
        if first is None:
            first = time.monotonic()
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu_at_first = usage.ru_utime + usage.ru_stime
        rows, messages = [], []
        for m in batch:
            if m.error():
                if m.error().code() != KafkaError._PARTITION_EOF:
                    print(f"consume error: {m.error()}", file=sys.stderr)
                continue
            tx, cause = parse(m)
            handled += 1
            if tx is None:
                producer.produce(args.dead_letters, m.value() or b"", m.key(), headers={"verdict.cause": cause})
                dead += 1
            else:
                rows.append(tx)
                messages.append(m)
        if rows:
            n = len(rows)
            pipe = store.pipeline(transaction=False)
            for tx in rows:
                pipe.hmget("card:" + tx["card_id"], CARD_FIELDS)
                pipe.hmget("merchant:" + tx["merchant_id"], MERCHANT_FIELDS)
            # The script wants each card's events in one run, in batch order (a stable sort).
            by_card = sorted(range(n), key=lambda i: rows[i]["card_id"])
            velocity_args = [len(WINDOWS_MS), *WINDOWS_MS, HORIZON_MS]
            for i in by_card:
                tx = rows[i]
                velocity_args += [tx["event_time_ms"], round(tx["amount"] * 100), tx["transaction_id"]]
            velocity(keys=["velocity:card:" + rows[i]["card_id"] for i in by_card], args=velocity_args, client=pipe)
            replies = pipe.execute()
            cards, merchants, counts = replies[0:-1:2], replies[1:-1:2], replies[-1]

            def field(hashes, i):
                return [h[i].decode() if h[i] is not None else None for h in hashes]

            amount = np.array([tx["amount"] for tx in rows], dtype=np.float64)
            avg = floats(field(cards, 0))
            home = field(cards, 4)
            event_ms = np.array([tx["event_time_ms"] for tx in rows], dtype=np.int64)
            per_event = np.empty((n, 1 + 2 * len(WINDOWS_MS)), dtype=np.int64)
            per_event[by_card] = np.array(counts.split(), dtype=np.int64).reshape(n, 1 + 2 * len(WINDOWS_MS))
            columns = {
                "amount": amount,
                "amount_to_card_avg": amount / avg,
                "card_tx_count_30d": floats(field(cards, 1)),
                "card_chargebacks_90d": floats(field(cards, 2)),
                "card_age_days": floats(field(cards, 3)),
                "is_foreign": np.array(
                    [np.nan if h is None else float(tx["country"] != h) for tx, h in zip(rows, home)]
                ),
                "merchant_fraud_rate_90d": floats(field(merchants, 0)),
                "merchant_risk_score": floats(field(merchants, 1)),
                "merchant_age_days": floats(field(merchants, 2)),
                "is_online": np.array([float(tx["channel"] == "online") for tx in rows]),
                "hour_of_day": ((event_ms // 3_600_000) % 24).astype(np.float64),
                "card_tx_count_1m": per_event[:, 1].astype(np.float64),
                "card_tx_count_1h": per_event[:, 3].astype(np.float64),
                "card_tx_count_24h": per_event[:, 5].astype(np.float64),
                "card_amount_24h_to_avg": (per_event[:, 6] / 100.0) / avg,
            }
            x = np.column_stack([columns[name] for name in names])
            missing = np.isnan(x)
            x = np.where(missing, defaults, x)
            finite = np.isfinite(x).all(axis=1)
            scores = np.full(n, np.nan, dtype=np.float64)
            if finite.any():
                out = session.run([output_name], {input_name: x[finite].astype(np.float32)})[0]
                scores[finite] = out[:, output_column]
            now_ms = int(time.time() * 1000)
            for i, (tx, m) in enumerate(zip(rows, messages)):
                if not finite[i]:
                    producer.produce(
                        args.dead_letters, m.value(), m.key(), headers={"verdict.cause": "non-finite-feature"}
                    )
                    dead += 1
                    continue
                score = float(scores[i])
                outcome = "approve" if score < REVIEW else "review" if score < DECLINE else "decline"
                decision = {
                    "transaction_id": tx["transaction_id"],
                    "workload": "fraud",
                    "decision": outcome,
                    "score": score,
                    "model": label,
                    "model_version": version,
                    "event_time_ms": tx["event_time_ms"],
                    "decision_time_ms": now_ms,
                    "imputed_features": [names[j] for j in np.flatnonzero(missing[i])],
                }
                producer.produce(args.output, json.dumps(decision).encode(), tx["transaction_id"].encode())
                decisions += 1
        # At least once: offsets only after every output of the batch is acknowledged.
        if producer.flush(30) != 0:
            sys.exit("outputs not delivered within 30 s")
        consumer.commit(asynchronous=False)

    usage = resource.getrusage(resource.RUSAGE_SELF)
    # Not ru_maxrss: Linux carries it over from the parent across exec.
    with open("/proc/self/status", encoding="ascii") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(
        json.dumps(
            {
                "handled": handled,
                "decisions": decisions,
                "dead_letters": dead,
                "seconds": time.monotonic() - first if first is not None else 0.0,
                "cpu_seconds": usage.ru_utime + usage.ru_stime - (cpu_at_first or 0.0),
                "peak_rss_bytes": peak_kib * 1024,
            }
        ),
        flush=True,
    )
    consumer.close()


if __name__ == "__main__":
    main()
