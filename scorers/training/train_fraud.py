#!/usr/bin/env python3
"""Train verdict's first fraud model and export it to ONNX with its metadata.

Python appears here, in training, and never on the scoring path. The script is
reproducible: fixed seeds, pinned package versions (requirements.txt beside it),
and it writes everything the Rust side needs into the model directory:

    model.onnx   StandardScaler + MLP classifier, input `features` float32 [N, F],
                 output `probabilities` float32 [N, 2] (column 1 = fraud)
    model.json   name, version, ordered features with their imputation defaults,
                 output tensor and column, SHA-256 of model.onnx, holdout quality,
                 and a golden parity set (feature rows -> sklearn score) that the
                 Rust tests replay through ONNX Runtime.

The synthetic world (cards, merchants, transactions with planted fraud) mirrors
`verdict::generator` in pipeline/src/generator.rs: same entity fields, same
derived features as the workload SQL in pipeline/src/workloads/fraud.toml.

Run:  python3 scorers/training/train_fraud.py --out scorers/models/fraud-mlp
"""

import argparse
import hashlib
import json
import pathlib

import numpy as np
import onnxruntime as ort
from skl2onnx import to_onnx
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

SEED = 20261122
COUNTRIES = ["US", "GB", "DE", "FR", "NL", "ES", "IT", "BR", "IN", "NG"]
COUNTRY_WEIGHTS = [0.30, 0.12, 0.12, 0.10, 0.06, 0.08, 0.08, 0.06, 0.05, 0.03]

# Model input order. The workload SQL must produce these columns; verdict checks it on load.
# `default` is what a null becomes before scoring (an unknown card is treated as a brand-new
# card with no history), and the training data is imputed the same way so the model has seen it.
FEATURES = [
    ("amount", None),
    ("amount_to_card_avg", 1.0),
    ("card_tx_count_30d", 0.0),
    ("card_chargebacks_90d", 0.0),
    ("card_age_days", 0.0),
    ("is_foreign", 0.0),
    ("merchant_fraud_rate_90d", 0.01),
    ("merchant_risk_score", 0.5),
    ("is_online", None),
    ("hour_of_day", None),
]


def make_cards(rng, n):
    return {
        "avg_amount_30d": np.exp(rng.normal(np.log(50.0), 0.8, n)),
        "tx_count_30d": rng.integers(0, 121, n).astype(np.float64),
        "chargeback_count_90d": np.where(rng.random(n) < 0.95, 0, rng.integers(1, 4, n)).astype(np.float64),
        "card_age_days": rng.integers(1, 3651, n).astype(np.float64),
        "home_country": rng.choice(len(COUNTRIES), n, p=COUNTRY_WEIGHTS),
    }


def make_merchants(rng, n):
    high_risk = rng.random(n) < 0.05
    return {
        "fraud_rate_90d": np.where(high_risk, rng.uniform(0.02, 0.10, n), rng.beta(1.0, 200.0, n)),
        "risk_score": np.clip(np.where(high_risk, rng.uniform(0.6, 1.0, n), rng.uniform(0.0, 0.7, n)), 0, 1),
    }


def make_transactions(rng, cards, merchants, n, unknown_card_rate=0.03):
    n_cards = len(cards["avg_amount_30d"])
    n_merchants = len(merchants["fraud_rate_90d"])
    card = rng.integers(0, n_cards, n)
    merchant = rng.integers(0, n_merchants, n)
    unknown = rng.random(n) < unknown_card_rate
    avg = cards["avg_amount_30d"][card]
    amount = np.round(avg * np.exp(rng.normal(0.0, 0.5, n)), 2)
    foreign_draw = rng.random(n) < 0.10
    country = np.where(foreign_draw, rng.integers(0, len(COUNTRIES), n), cards["home_country"][card])
    is_online = (rng.random(n) < 0.6).astype(np.float64)
    hour = rng.integers(0, 24, n).astype(np.float64)

    # Planted fraud: unusual amount for the card, foreign country, risky or new merchant,
    # online, night time, young cards and cards with chargebacks.
    ratio = amount / avg
    is_foreign = (country != cards["home_country"][card]).astype(np.float64)
    night = ((hour < 6) | (hour >= 23)).astype(np.float64)
    young = (cards["card_age_days"][card] < 60).astype(np.float64)
    logit = (
        -6.0
        + 1.8 * np.log(np.clip(ratio, 0.2, 50.0))
        + 1.6 * is_foreign
        + 35.0 * merchants["fraud_rate_90d"][merchant]
        + 1.2 * merchants["risk_score"][merchant]
        + 0.8 * is_online
        + 0.9 * night
        + 1.3 * young
        + 0.8 * cards["chargeback_count_90d"][card]
    )
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)

    # What the pipeline sees: an unknown card has no features in Redis, so its derived
    # features are null and get the model's defaults.
    defaults = dict(FEATURES)
    x = np.column_stack(
        [
            amount,
            np.where(unknown, defaults["amount_to_card_avg"], ratio),
            np.where(unknown, defaults["card_tx_count_30d"], cards["tx_count_30d"][card]),
            np.where(unknown, defaults["card_chargebacks_90d"], cards["chargeback_count_90d"][card]),
            np.where(unknown, defaults["card_age_days"], cards["card_age_days"][card]),
            np.where(unknown, defaults["is_foreign"], is_foreign),
            merchants["fraud_rate_90d"][merchant],
            merchants["risk_score"][merchant],
            is_online,
            hour,
        ]
    ).astype(np.float32)
    return x, label


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()

    rng = np.random.default_rng(SEED)
    cards = make_cards(rng, 20_000)
    merchants = make_merchants(rng, 2_000)
    x, y = make_transactions(rng, cards, merchants, args.rows)
    split = int(len(y) * 0.8)
    x_train, y_train, x_test, y_test = x[:split], y[:split], x[split:], y[split:]

    model = make_pipeline(
        StandardScaler(),
        MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=60, early_stopping=True, random_state=SEED),
    )
    model.fit(x_train, y_train)
    p_test = model.predict_proba(x_test)[:, 1]
    roc_auc = float(roc_auc_score(y_test, p_test))
    pr_auc = float(average_precision_score(y_test, p_test))
    print(f"holdout rows={len(y_test)} fraud_rate={y_test.mean():.4f} roc_auc={roc_auc:.4f} pr_auc={pr_auc:.4f}")

    onx = to_onnx(
        model,
        x_train[:1],
        options={id(model.steps[-1][1]): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
        final_types=None,
    )
    # Rename the graph input to the contract's name.
    input_name = onx.graph.input[0].name
    for node in onx.graph.node:
        node.input[:] = ["features" if i == input_name else i for i in node.input]
    onx.graph.input[0].name = "features"
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_bytes = onx.SerializeToString()
    (args.out / "model.onnx").write_bytes(onnx_bytes)

    # Golden parity: sklearn's own scores against ONNX Runtime's, on the holdout.
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    p_onnx = session.run(["probabilities"], {"features": x_test})[0][:, 1]
    max_diff = float(np.max(np.abs(p_onnx - p_test)))
    print(f"parity sklearn vs onnxruntime: max |diff| = {max_diff:.2e}")
    assert max_diff < 1e-5, "exported model disagrees with the trained one"

    golden = [{"features": [float(v) for v in x_test[i]], "score": float(p_test[i])} for i in range(16)]
    meta = {
        "name": "fraud-mlp",
        "version": "1.0.0",
        "description": "StandardScaler + MLP(32,16) on synthetic card transactions with planted fraud",
        "input": "features",
        "features": [{"name": name, "default": default} for name, default in FEATURES],
        "output": {"name": "probabilities", "column": 1, "meaning": "probability that the transaction is fraud"},
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "training": {
            "seed": SEED,
            "rows": args.rows,
            "holdout_rows": int(len(y_test)),
            "holdout_fraud_rate": float(y_test.mean()),
            "roc_auc": roc_auc,
            "pr_auc": pr_auc,
        },
        "golden": golden,
    }
    (args.out / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out}/model.onnx ({len(onnx_bytes)} bytes) and model.json")


if __name__ == "__main__":
    main()
