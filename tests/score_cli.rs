//! `infimed score` end to end on the fixtures: target ids identical to transformers, per-token
//! log-probs within 1e-4 where no image is resized and 2e-2 where one is (our own image
//! processor, Pillow's bicubic); bad input fails with FILE:LINE and no panic.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn infimed() -> Command {
    Command::new(env!("CARGO_BIN_EXE_infimed"))
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("infimed-score-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run_score(model: &Path, data: &Path, out: &Path) -> std::process::Output {
    infimed()
        .args(["score", "--model"])
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn score_matches_transformers_on_every_checkpoint() {
    let data = fixtures().join("samples.jsonl");
    let dir = tmp("parity");
    for ckpt in CHECKPOINTS {
        let out = dir.join(format!("{ckpt}.jsonl"));
        let o = run_score(&model_dir(ckpt), &data, &out);
        assert!(
            o.status.success(),
            "{ckpt}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let refs = read_json(&format!("refs/{ckpt}/logprobs.json"));
        let got: Vec<serde_json::Value> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let want = refs["samples"].as_array().unwrap();
        assert_eq!(got.len(), want.len());
        let (mut worst_plain, mut worst_resized) = (0f64, 0f64);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g["index"].as_u64().unwrap() as usize, i);
            assert_eq!(
                u32s(&g["target_ids"]),
                u32s(&w["target_ids"]),
                "{ckpt} / {}",
                w["name"]
            );
            let d = f64s(&g["logprobs"])
                .iter()
                .zip(f64s(&w["logprobs"]))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            let resized = w["resized"].as_bool().unwrap();
            let tol = if resized { 2e-2 } else { 1e-4 };
            assert!(
                d < tol,
                "{ckpt} / {}: max |logprob diff| = {d} (tolerance {tol})",
                w["name"]
            );
            if resized {
                worst_resized = worst_resized.max(d);
            } else {
                worst_plain = worst_plain.max(d);
            }
            let sum: f64 = f64s(&g["logprobs"]).iter().sum();
            assert!((sum - g["sum_logprob"].as_f64().unwrap()).abs() < 1e-9);
        }
        eprintln!(
            "{ckpt}: max |diff| {worst_plain:.2e} (no resize), {worst_resized:.2e} (resized)"
        );
    }
}

fn expect_failure(name: &str, lines: &[&str], want: &[&str]) {
    let dir = tmp(name);
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::copy(
        fixtures().join("images/noise_rgb_56x56.png"),
        dir.join("images/ok.png"),
    )
    .unwrap();
    std::fs::write(
        dir.join("images/corrupt.png"),
        b"\x89PNG\r\n\x1a\nthis is not a png",
    )
    .unwrap();
    let data = dir.join("data.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let o = run_score(&model_dir("tiny-gqa2"), &data, &dir.join("out.jsonl"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{name}: should fail");
    assert!(!err.contains("panicked"), "{name}: panic: {err}");
    for w in want {
        assert!(err.contains(w), "{name}: stderr lacks `{w}`:\n{err}");
    }
}

const OK: &str = r#"{"messages": [{"role": "user", "content": "<image>What is shown?"}, {"role": "assistant", "content": "A scan."}], "images": ["images/ok.png"]}"#;

#[test]
fn bad_input_names_file_and_line() {
    expect_failure(
        "missing",
        &[
            OK,
            r#"{"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "x"}], "images": ["images/nope.png"]}"#,
        ],
        &["data.jsonl:2", "nope.png"],
    );
    expect_failure(
        "corrupt",
        &[
            OK,
            OK,
            r#"{"messages": [{"role": "user", "content": "<image>Hi"}, {"role": "assistant", "content": "x"}], "images": ["images/corrupt.png"]}"#,
        ],
        &["data.jsonl:3", "corrupt.png"],
    );
    expect_failure(
        "malformed",
        &[OK, "{\"messages\": [", OK],
        &["data.jsonl:2"],
    );
    expect_failure(
        "too_many_tags",
        &[
            r#"{"messages": [{"role": "user", "content": "<image><image>Hi"}, {"role": "assistant", "content": "x"}], "images": ["images/ok.png"]}"#,
        ],
        &["data.jsonl:1", "2", "1"],
    );
}
