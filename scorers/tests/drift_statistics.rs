//! verdict's drift statistics against numpy / scipy on committed fixtures
//! (`fixtures/make_drift_fixtures.py` wrote them), within 1e-6 relative.

use serde_json::Value;
use verdict_scorers::drift::statistics::{chi_square, kolmogorov_sf, ks_binned, psi, Correction};

fn fixtures() -> Value {
    serde_json::from_str(include_str!("fixtures/drift_fixtures.json")).expect("fixtures parse")
}

fn close(got: f64, want: f64, what: &str) {
    let tolerance = 1e-6 * want.abs().max(1e-300);
    assert!(
        (got - want).abs() <= tolerance,
        "{what}: verdict {got:e}, scipy {want:e}"
    );
}

fn counts(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_f64().unwrap())
        .collect()
}

#[test]
fn psi_and_binned_ks_match_numpy_and_scipy() {
    let f = fixtures();
    let cases = f["binned"].as_array().unwrap();
    assert!(cases.len() >= 40);
    for (i, case) in cases.iter().enumerate() {
        let (reference, live) = (counts(&case["reference"]), counts(&case["live"]));
        close(
            psi(&reference, &live).unwrap(),
            case["psi"].as_f64().unwrap(),
            &format!("psi #{i}"),
        );
        let (d, p) = ks_binned(&reference, &live).unwrap();
        close(d, case["ks_d"].as_f64().unwrap(), &format!("ks D #{i}"));
        close(p, case["ks_p"].as_f64().unwrap(), &format!("ks p #{i}"));
    }
}

#[test]
fn the_kolmogorov_survival_function_matches_scipy_special_kolmogorov() {
    for case in fixtures()["kolmogorov"].as_array().unwrap() {
        let x = case["x"].as_f64().unwrap();
        close(
            kolmogorov_sf(x),
            case["sf"].as_f64().unwrap(),
            &format!("kolmogorov({x})"),
        );
    }
}

#[test]
fn chi_square_matches_scipy_stats_chisquare() {
    for (i, case) in fixtures()["chi_square"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let (statistic, p) =
            chi_square(&counts(&case["observed"]), &floats(&case["weights"])).unwrap();
        close(
            statistic,
            case["statistic"].as_f64().unwrap(),
            &format!("chi2 #{i}"),
        );
        close(p, case["p"].as_f64().unwrap(), &format!("chi2 p #{i}"));
    }
}

#[test]
fn corrections_match_scipy_false_discovery_control_and_bonferroni() {
    for (i, case) in fixtures()["corrections"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let p = floats(&case["p"]);
        for (method, key) in [
            (Correction::BenjaminiHochberg, "bh"),
            (Correction::Bonferroni, "bonferroni"),
        ] {
            for (got, want) in method.adjust(&p).iter().zip(floats(&case[key])) {
                close(*got, want, &format!("{key} #{i}"));
            }
        }
    }
}

#[test]
fn degenerate_inputs_give_no_statistic_rather_than_nan() {
    assert_eq!(psi(&[0, 0], &[1, 2]), None);
    assert_eq!(ks_binned(&[1, 2], &[0, 0]), None);
    assert_eq!(chi_square(&[5], &[1.0]), None);
    assert_eq!(chi_square(&[5, 1], &[1.0, 0.0]), None);
}
