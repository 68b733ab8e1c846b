//! `infimed generate` (the CLI) against transformers' greedy generate: the fixture's sharegpt
//! records, all in one left-padded batch with images, give the reference tokens of each prompt;
//! sampling with a seed is reproducible and `--n` draws several answers per prompt.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn infimed(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_infimed"))
        .args(args)
        .env("INFIMED_LOG", "warn")
        .output()
        .expect("run infimed")
}

fn read_lines(p: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn greedy_cli_matches_transformers_in_one_batch() {
    let refs = read_json("refs/generate.json");
    let samples = read_json("refs/samples.json");
    let names: Vec<String> = samples["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    let data = fixtures().join("samples.jsonl");
    let tmp = tempfile::tempdir().unwrap();
    for (ckpt, r) in refs["checkpoints"].as_object().unwrap() {
        let out = tmp.path().join(format!("{ckpt}.jsonl"));
        let o = infimed(&[
            "generate",
            "--model",
            model_dir(ckpt).to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-new-tokens",
            "8",
            "--batch-size",
            "16",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = read_lines(&out);
        assert_eq!(got.len(), names.len());
        for single in r["single"].as_array().unwrap() {
            let name = single["sample"].as_str().unwrap();
            let i = names.iter().position(|n| n == name).unwrap();
            assert_eq!(got[i]["index"], i);
            assert_eq!(
                u32s(&got[i]["tokens"]),
                u32s(&single["new_tokens"]),
                "{ckpt} {name}"
            );
        }
    }
}

#[test]
fn sampling_is_seeded_and_n_gives_groups() {
    let data = fixtures().join("samples.jsonl");
    let tmp = tempfile::tempdir().unwrap();
    let run = |seed: &str, name: &str| {
        let out = tmp.path().join(name);
        let o = infimed(&[
            "generate",
            "--model",
            model_dir("tiny-gqa2").to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-new-tokens",
            "6",
            "--temperature",
            "1.0",
            "--top-p",
            "0.9",
            "--n",
            "3",
            "--seed",
            seed,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        read_lines(&out)
    };
    let a = run("7", "a.jsonl");
    let b = run("7", "b.jsonl");
    let c = run("8", "c.jsonl");
    assert_eq!(a.len(), 27);
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(
        (a[4]["index"].as_u64(), a[4]["sample"].as_u64()),
        (Some(1), Some(1))
    );
}

#[test]
fn one_prompt_from_flags_and_bad_input() {
    let img = fixtures().join("images/scan_gray_84x112.png");
    let o = infimed(&[
        "generate",
        "--model",
        model_dir("tiny-gqa2").to_str().unwrap(),
        "--prompt",
        "Describe.",
        "--image",
        img.to_str().unwrap(),
        "--max-new-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = infimed(&[
        "generate",
        "--model",
        model_dir("tiny-gqa2").to_str().unwrap(),
        "--prompt",
        "Describe.",
        "--image",
        "/no/such.png",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/no/such.png") && !err.contains("panicked"),
        "{err}"
    );
}
