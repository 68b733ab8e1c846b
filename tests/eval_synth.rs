//! `infimed synth-reflective` on tests/fixtures/eval/synth/candidates.jsonl (m = 0, 1, 5, 6, 10).

use std::path::{Path, PathBuf};
use std::process::Command;

use infimed::synth::REFLECTION;
use serde_json::Value;

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/eval")
        .join(p)
}

fn synth(out: &Path, seed: &str) -> (String, Vec<Value>) {
    let o = Command::new(env!("CARGO_BIN_EXE_infimed"))
        .args([
            "synth-reflective",
            "--candidates",
            fixture("synth/candidates.jsonl").to_str().unwrap(),
            "--out",
        ])
        .arg(out)
        .args(["--seed", seed])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(out).unwrap();
    let recs = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (String::from_utf8_lossy(&o.stdout).into_owned(), recs)
}

fn assistant(r: &Value) -> &str {
    r["messages"].as_array().unwrap().last().unwrap()["content"]
        .as_str()
        .unwrap()
}

#[test]
fn rules_per_m_and_determinism() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, recs) = synth(&dir.path().join("a.jsonl"), "42");
    assert!(stdout.contains("5 questions: best 2"), "{stdout}");
    assert!(stdout.contains("reflective 2"), "{stdout}");
    assert!(stdout.contains("dropped) 1"), "{stdout}");
    let ids: Vec<&str> = recs.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["q_m1", "q_m5", "q_m6", "q_m10"]); // m = 0 gives no record

    let get = |id: &str| recs.iter().find(|r| r["id"] == id).unwrap();
    // m = 1: reflective, y+ the only correct candidate, y- one of the incorrect ones
    let r = get("q_m1");
    assert_eq!(r["rule"], "reflective");
    let (neg, pos) = assistant(r)
        .split_once(&format!(" {REFLECTION} "))
        .expect("the sentence between single spaces");
    assert_eq!(
        pos,
        "Reasoning 3: the opacity is in the right middle lobe. \\boxed{B}"
    );
    assert!(
        neg.starts_with("Reasoning ") && !neg.ends_with("{B}"),
        "{neg}"
    );
    assert_eq!(
        r["messages"][0],
        serde_json::json!({"role": "user", "content": "<image>Which lobe is affected?"})
    );
    // m = 5: reflective, y+ one of the two score-9 correct candidates
    let r = get("q_m5");
    assert_eq!(r["rule"], "reflective");
    let (neg, pos) = assistant(r).split_once(&format!(" {REFLECTION} ")).unwrap();
    assert!(
        pos == "Correct path 1. Final answer: (D)" || pos == "Correct path 2. Final answer: (D)",
        "{pos}"
    );
    assert!(neg.starts_with("Wrong path "), "{neg}");
    assert_eq!(r["images"].as_array().unwrap().len(), 2);
    assert!(r["messages"][0]["content"]
        .as_str()
        .unwrap()
        .starts_with("<image><image>What"));
    // m = 6: best, the unique top score; the old assistant turn of the input is replaced
    let r = get("q_m6");
    assert_eq!(r["rule"], "best");
    assert_eq!(assistant(r), "Correct 5: \\boxed{C}");
    assert_eq!(r["messages"].as_array().unwrap().len(), 2);
    // m = 10: best, one of the equal-score candidates
    let r = get("q_m10");
    assert_eq!(r["rule"], "best");
    assert!(assistant(r).starts_with("Variant ") && assistant(r).ends_with("The answer is E."));

    // every record is a valid sharegpt SFT record
    for r in &recs {
        infimed::data::sharegpt::parse_record(r, dir.path(), "test").unwrap();
    }

    // same seed -> same bytes
    let a = std::fs::read(dir.path().join("a.jsonl")).unwrap();
    synth(&dir.path().join("b.jsonl"), "42");
    assert_eq!(a, std::fs::read(dir.path().join("b.jsonl")).unwrap());
}

#[test]
fn not_wired_flags_and_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_infimed"))
            .args(args)
            .output()
            .unwrap()
    };
    let cands = fixture("synth/candidates.jsonl");
    let out = dir.path().join("o.jsonl");
    // A missing model folder is a clear error naming it.
    let o = run(&[
        "synth-reflective",
        "--candidates",
        cands.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--generate-with",
        "no/such/m",
        "--n",
        "10",
        "--temperature",
        "0.7",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no/such/m") && !err.contains("panicked"),
        "{err}"
    );
    // Generation + judging with a (tiny, random) local model: n candidates per question are
    // written next to the output, then the rules run on them.
    let model =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-gqa2");
    let img = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/images/scan_gray_84x112.png");
    std::fs::copy(&img, dir.path().join("scan.png")).unwrap();
    let qs = dir.path().join("questions.jsonl");
    std::fs::write(
        &qs,
        "{\"id\": \"t1\", \"question\": \"Is aspirin an antiplatelet drug?\", \"answer\": \"yes\", \"task\": \"text\"}\n\
         {\"id\": \"i1\", \"question\": \"<image>Which side?\\nA. left\\nB. right\", \"images\": [\"scan.png\"], \"answer\": \"B\", \"task\": \"mcq\"}\n",
    )
    .unwrap();
    let cands = qs;
    let o = run(&[
        "synth-reflective",
        "--candidates",
        cands.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--generate-with",
        model.to_str().unwrap(),
        "--judge-model",
        model.to_str().unwrap(),
        "--n",
        "3",
        "--max-new-tokens",
        "6",
        "--judge-max-new-tokens",
        "6",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let prepared = std::fs::read_to_string(out.with_extension("candidates.jsonl")).unwrap();
    let n_in = std::fs::read_to_string(&cands)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    assert_eq!(prepared.lines().count(), n_in);
    for l in prepared.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["candidates"].as_array().unwrap().len(), 3);
    }
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\": \"x\", \"question\": \"q\", \"answer\": \"A\", \"candidates\": [{\"text\": \"A\"}]}\n{broken\n").unwrap();
    let o = run(&[
        "synth-reflective",
        "--candidates",
        bad.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("{}:2:", bad.display())));
    let o = run(&[
        "synth-reflective",
        "--candidates",
        bad.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--skip-invalid",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 invalid line(s) skipped"));
}
