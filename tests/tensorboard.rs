//! TensorBoard event files: the encoder writes what TensorBoard's own writer writes (a committed
//! file from `tests/fixtures/tensorboard/make_reference.py`), and a demo SFT run's
//! `tensorboard/` holds every scalar of its `metrics.jsonl` with the same step and value (f32),
//! also after a resume (no step twice). `tests/fixtures/tensorboard/check_run.py` checks the same
//! with TensorBoard's `EventAccumulator`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use infimed::learn::metrics::scalars;
use infimed::learn::tensorboard::{event_files, read_events, tf_record, Event};
use prost::Message;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn events_are_byte_identical_to_tensorboards_writer() {
    let reference =
        std::fs::read(root().join("tests/fixtures/tensorboard/reference.tfevents")).unwrap();
    let table = "| prompt | response |\n|---|---|\n| Is it? | Yes ✓ |";
    let events = [
        Event::version(1700000000.25),
        Event::scalars(
            1700000001.5,
            1,
            &[("loss".into(), 2.75), ("lr".into(), 5e-6)],
        ),
        Event::scalars(
            1700000002.125,
            20,
            &[
                ("grad_norm".into(), 0.0),
                ("by_task/mcq/reward".into(), -0.1),
                ("tokens".into(), 123456789.0),
            ],
        ),
        Event::text(1700000003.0, 20, "completions", table),
    ];
    let ours: Vec<u8> = events
        .iter()
        .flat_map(|e| tf_record(&e.encode_to_vec()))
        .collect();
    assert_eq!(ours.len(), reference.len());
    assert!(
        ours == reference,
        "the encoded events differ from TensorBoard's"
    );
}

/// `(tag, step) -> value` of every scalar in `dir`'s event files; a step twice is an error.
fn tensorboard_scalars(dir: &Path) -> BTreeMap<(String, i64), f32> {
    let mut out = BTreeMap::new();
    for f in event_files(dir).unwrap() {
        for e in read_events(&f).unwrap() {
            for v in e.summary.iter().flat_map(|s| &s.value) {
                if let Some(x) = v.simple_value {
                    let old = out.insert((v.tag.clone(), e.step), x);
                    assert!(old.is_none(), "{} at step {} twice", v.tag, e.step);
                }
            }
        }
    }
    out
}

/// Every scalar of `out/metrics.jsonl` is in `out/tensorboard/` at its step with its value (as
/// f32), and TensorBoard has nothing else. Returns the number of scalars.
fn check_run(out: &Path) -> usize {
    let tb = tensorboard_scalars(&out.join("tensorboard"));
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let mut n = 0;
    for line in text.lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = record["step"].as_i64().unwrap();
        for (tag, value) in scalars(&record) {
            let got = tb
                .get(&(tag.clone(), step))
                .unwrap_or_else(|| panic!("{tag} at step {step} missing"));
            assert_eq!(*got, value as f32, "{tag} at step {step}");
            n += 1;
        }
    }
    assert_eq!(
        tb.len(),
        n,
        "TensorBoard holds scalars that metrics.jsonl does not"
    );
    n
}

fn sft(data: &Path, out: &Path, resume: bool) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_infimed"));
    c.current_dir(root())
        .args(["sft", "--recipe", "recipes/demo-sft.toml"]);
    for s in [
        "backend=ndarray".to_string(),
        format!("data.0.path={}", data.display()),
        "eval_data=[]".into(),
        format!("output_dir={}", out.display()),
        "max_steps=6".into(),
        "save_every=3".into(),
        "per_device_batch=4".into(),
    ] {
        c.args(["--set", &s]);
    }
    if resume {
        c.arg("--resume");
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_demo_run_logs_every_metric_to_tensorboard_and_a_resume_continues_the_curves() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let o = Command::new(env!("CARGO_BIN_EXE_infimed"))
        .args(["demo-data", "--out"])
        .arg(&data)
        .args(["--train", "48", "--val", "4"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = tmp.path().join("run");
    sft(&data.join("train.jsonl"), &out, false);
    let n = check_run(&out);
    eprintln!("6 steps: {n} scalars of metrics.jsonl in TensorBoard");
    // Timings aside, a resumed run logs what the uninterrupted run logged.
    let untimed = |m: BTreeMap<(String, i64), f32>| -> BTreeMap<(String, i64), f32> {
        let timing = ["data_wait_s", "samples_per_s", "tokens_per_s"];
        m.into_iter()
            .filter(|((tag, _), _)| !timing.contains(&tag.as_str()))
            .collect()
    };
    let before = untimed(tensorboard_scalars(&out.join("tensorboard")));

    // As if the run had stopped after step 5: its newest complete checkpoint is step 3, so the
    // resumed run logs steps 4 to 6 again, and neither sink holds them twice.
    std::fs::remove_dir_all(out.join("checkpoint-6")).unwrap();
    sft(&data.join("train.jsonl"), &out, true);
    assert_eq!(check_run(&out), n);
    let after = untimed(tensorboard_scalars(&out.join("tensorboard")));
    assert_eq!(after, before, "the resumed run's curves differ");
}
