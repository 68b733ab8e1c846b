//! `infimed rl-filter`: n answers per prompt from the rollout engine, scored with the recipe's
//! rewards; the kept prompts are the input records whose pass rate is in the range; the same seed
//! writes the same files.

use std::path::Path;
use std::process::Command;

use infimed::demo::{write_demo_data, DemoDataConfig};

fn rl_filter(data: &Path, out: &Path, rates: &Path, seed: &str, batch: &str) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_infimed"))
        .args(["rl-filter", "--model", "builtin:demo-tiny", "--data"])
        .arg(data)
        .args(["--n", "4", "--keep", "0.2..0.8", "--max-new-tokens", "4"])
        .args([
            "--seed",
            seed,
            "--batch-size",
            batch,
            "--backend",
            "ndarray",
        ])
        .arg("--out")
        .arg(out)
        .arg("--rates")
        .arg(rates)
        .env("INFIMED_LOG", "warn")
        .output()
        .expect("run infimed");
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

#[test]
fn same_seed_same_file_and_kept_records_are_the_input_lines_in_range() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let cfg = DemoDataConfig {
        seed: 2,
        train: 12,
        val: 2,
        image_size: 56,
        image_pool: None,
    };
    write_demo_data(&data, &cfg).unwrap();
    let rl = data.join("rl_train.jsonl");
    let (a, b) = (tmp.path().join("a.jsonl"), tmp.path().join("b.jsonl"));
    let (ra, rb) = (tmp.path().join("ra.jsonl"), tmp.path().join("rb.jsonl"));
    let table = rl_filter(&rl, &a, &ra, "5", "64");
    rl_filter(&rl, &b, &rb, "5", "3");
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(std::fs::read(&ra).unwrap(), std::fs::read(&rb).unwrap());
    assert!(
        table.contains("pass rate histogram (4 answers per prompt)"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("all ") && l.contains(" 12 ")),
        "{table}"
    );

    let rates: Vec<serde_json::Value> = std::fs::read_to_string(&ra)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rates.len(), 12);
    let input_text = std::fs::read_to_string(&rl).unwrap();
    let input: Vec<&str> = input_text.lines().collect();
    let kept: Vec<serde_json::Value> = std::fs::read_to_string(&a)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut k = 0;
    for (line, r) in input.iter().zip(&rates) {
        let p = r["pass_rate"].as_f64().unwrap();
        assert_eq!(r["kept"].as_bool().unwrap(), (0.2..=0.8).contains(&p));
        if (0.2..=0.8).contains(&p) {
            let mut want: serde_json::Value = serde_json::from_str(line).unwrap();
            let got = &kept[k];
            assert_eq!(got["pass_rate"].as_f64().unwrap(), p);
            want["pass_rate"] = got["pass_rate"].clone();
            want["mean_reward"] = got["mean_reward"].clone();
            assert_eq!(got, &want);
            k += 1;
        }
    }
    assert_eq!(k, kept.len());
}
