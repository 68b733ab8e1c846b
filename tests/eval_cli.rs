//! `infimed eval --responses` end to end on the hand-computed 40-response fixture
//! (tests/fixtures/eval/score40, see its README), and the bad-input paths.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/eval")
        .join(p)
}

fn infimed(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_infimed"))
        .args(args)
        .env("INFIMED_LOG", "warn")
        .output()
        .expect("run infimed")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn forty_responses_match_hand_computed_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let o = infimed(&[
        "eval",
        "--responses",
        s(&fixture("score40/responses.jsonl")),
        "--bench",
        s(&fixture("score40/bench_a.jsonl")),
        "--bench",
        s(&fixture("score40/bench_b.jsonl")),
        "--out",
        s(&out),
    ]);
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("score40/expected.json")).unwrap())
            .unwrap();

    // per record
    let results = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let results: Vec<Value> = results
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let exp_records = expected["records"].as_object().unwrap();
    assert_eq!(results.len(), 42);
    assert_eq!(exp_records.len(), 42);
    for r in &results {
        let id = r["id"].as_str().unwrap();
        assert_eq!(r["correct"], exp_records[id], "record {id}: {r}");
    }
    let missing: Vec<&str> = results
        .iter()
        .filter(|r| r["missing"] == true)
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(missing, vec!["vr4", "pm6"]);
    let vr6 = results.iter().find(|r| r["id"] == "vr6").unwrap();
    assert!((vr6["f1"].as_f64().unwrap() - 0.8).abs() < 1e-12);

    // per benchmark and the average
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let exp_b = expected["benchmarks"].as_object().unwrap();
    let got_b = summary["benchmarks"].as_object().unwrap();
    assert_eq!(got_b.len(), 7, "{summary}");
    for (name, e) in exp_b {
        let g = &got_b[name];
        assert_eq!(g["n"], e["n"], "{name}");
        assert_eq!(g["correct"], e["correct"], "{name}");
        assert!(
            (g["accuracy"].as_f64().unwrap() - e["accuracy"].as_f64().unwrap()).abs() < 1e-9,
            "{name}: {g}"
        );
    }
    let avg = summary["average"].as_f64().unwrap();
    assert!((avg - 1420.0 / 21.0).abs() < 1e-9, "{avg}");
    assert!((avg - expected["average"].as_f64().unwrap()).abs() < 1e-9);
    assert_eq!(summary["missing_responses"], 2);
    assert_eq!(summary["unmatched_responses"], 0);

    // the Table 1 row
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    let lines: Vec<&str> = md.lines().collect();
    assert_eq!(lines[0], "| Model | MMMU-H&M | VQA-RAD | SLAKE | PathVQA | PMC-VQA | OmniMedVQA | MedXpertQA | Avg. |");
    assert_eq!(lines[2], expected["markdown_row"].as_str().unwrap());
}

#[test]
fn library_path_gives_the_same_figures() {
    let (records, skipped) = infimed::eval::read_bench_files(
        &[
            fixture("score40/bench_a.jsonl"),
            fixture("score40/bench_b.jsonl"),
        ],
        false,
    )
    .unwrap();
    assert!(skipped.is_empty());
    let (responses, _) =
        infimed::eval::read_responses(&fixture("score40/responses.jsonl"), false).unwrap();
    assert_eq!(responses.len(), 40);
    let rep = infimed::eval::score_responses(&records, &responses, infimed::eval::Rules::Infimed);
    let names: Vec<&str> = rep.benchmarks.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "MMMU-H&M",
            "VQA-RAD",
            "SLAKE",
            "PathVQA",
            "PMC-VQA",
            "OmniMedVQA",
            "MedXpertQA"
        ]
    );
    let correct: Vec<usize> = rep.benchmarks.iter().map(|b| b.correct).collect();
    assert_eq!(correct, vec![3, 4, 6, 4, 4, 3, 4]);
    assert!((rep.average.unwrap() - 1420.0 / 21.0).abs() < 1e-9);
    // answer types are all covered
    let types: std::collections::BTreeSet<_> = rep.results.iter().map(|r| r.answer_type).collect();
    assert_eq!(types.len(), 4);
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const GOOD: &str = r#"{"id": "a", "benchmark": "VQA-RAD", "question": "q", "answer": "yes", "answer_type": "yes_no"}"#;

#[test]
fn bad_bench_lines_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let resp = write(
        dir.path(),
        "r.jsonl",
        "{\"id\": \"a\", \"response\": \"yes\"}\n",
    );
    let cases = [
        ("malformed.jsonl", format!("{GOOD}\n\n{{\"id\": \"b\", oops\n"), ":3:", "malformed JSON"),
        (
            "type.jsonl",
            format!("{GOOD}\n{{\"id\": \"b\", \"benchmark\": \"X\", \"question\": \"q\", \"answer\": \"x\", \"answer_type\": \"essay\"}}\n"),
            ":2:",
            "unknown answer_type",
        ),
        (
            "noopts.jsonl",
            format!("{GOOD}\n{{\"id\": \"b\", \"benchmark\": \"X\", \"question\": \"q\", \"answer\": \"A\", \"answer_type\": \"mcq\"}}\n"),
            ":2:",
            "options",
        ),
        ("dup.jsonl", format!("{GOOD}\n{GOOD}\n"), ":2:", "duplicate id"),
    ];
    for (name, text, line, what) in cases {
        let bench = write(dir.path(), name, &text);
        let out = dir.path().join(format!("out-{name}"));
        let o = infimed(&[
            "eval",
            "--responses",
            s(&resp),
            "--bench",
            s(&bench),
            "--out",
            s(&out),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name} should fail");
        assert!(
            err.contains(&format!("{}{line}", bench.display())),
            "{name}: {err}"
        );
        assert!(err.contains(what), "{name}: {err}");
        assert!(!err.contains("panicked"), "{err}");

        // --skip-invalid: counted and reported, the rest is scored
        let o = infimed(&[
            "eval",
            "--responses",
            s(&resp),
            "--bench",
            s(&bench),
            "--out",
            s(&out),
            "--skip-invalid",
        ]);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let summary: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(summary["skipped_invalid"], 1, "{name}");
        assert_eq!(summary["benchmarks"]["VQA-RAD"]["correct"], 1, "{name}");
        let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
        assert!(md.contains("1 invalid input line(s) skipped"), "{md}");
    }
}

#[test]
fn bad_responses_and_unmatched_ids() {
    let dir = tempfile::tempdir().unwrap();
    let bench = write(dir.path(), "b.jsonl", &format!("{GOOD}\n"));
    let out = dir.path().join("out");
    // malformed response line
    let resp = write(
        dir.path(),
        "r.jsonl",
        "{\"id\": \"a\", \"response\": \"yes\"}\nnot json\n",
    );
    let o = infimed(&[
        "eval",
        "--responses",
        s(&resp),
        "--bench",
        s(&bench),
        "--out",
        s(&out),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("{}:2:", resp.display())));
    // an unmatched id is a counted warning
    let resp = write(
        dir.path(),
        "r2.jsonl",
        "{\"id\": \"a\", \"response\": \"no\"}\n{\"id\": \"zz\", \"response\": \"yes\"}\n",
    );
    let o = infimed(&[
        "eval",
        "--responses",
        s(&resp),
        "--bench",
        s(&bench),
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["unmatched_responses"], 1);
    assert_eq!(summary["benchmarks"]["VQA-RAD"]["accuracy"], 0.0);
    // no response matches at all: an error
    let resp = write(
        dir.path(),
        "r3.jsonl",
        "{\"id\": \"zz\", \"response\": \"yes\"}\n",
    );
    let o = infimed(&[
        "eval",
        "--responses",
        s(&resp),
        "--bench",
        s(&bench),
        "--out",
        s(&out),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("matches a benchmark record"));
    // --model: a folder without a model is a clear error naming it
    let o = infimed(&[
        "eval",
        "--model",
        "no/such/model",
        "--mode",
        "reasoning",
        "--bench",
        s(&bench),
        "--out",
        s(&out),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no/such/model") && !err.contains("panicked"),
        "{err}"
    );
}
