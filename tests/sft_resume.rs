//! Resume: 6 optimizer steps in one run give bit-identical weights to a run that is killed
//! (SIGKILL) while writing its step-6 checkpoint and then resumed (`--resume`) from the
//! complete step-3 checkpoint, on ndarray.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn infimed() -> Command {
    Command::new(env!("CARGO_BIN_EXE_infimed"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn sft_cmd(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = infimed();
    c.current_dir(root())
        .args(["sft", "--recipe", "recipes/demo-sft.toml"]);
    for s in [
        format!("data.0.path={}", data.display()),
        "eval_data=[]".into(),
        format!("output_dir={}", out.display()),
        "max_steps=6".into(),
        "save_every=3".into(),
        "per_device_batch=4".into(),
    ] {
        c.args(["--set", &s]);
    }
    c.args(extra);
    c
}

#[test]
fn killed_during_checkpoint_then_resumed_equals_uninterrupted() {
    let tmp = std::env::temp_dir().join(format!("infimed-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let data_dir = tmp.join("data");
    let o = infimed()
        .args(["demo-data", "--out"])
        .arg(&data_dir)
        .args(["--train", "48", "--val", "4"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let data = data_dir.join("train.jsonl");

    // A: uninterrupted.
    let a = tmp.join("a");
    let o = sft_cmd(&data, &a, &[]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // B: killed while its step-6 checkpoint is being written.
    let b = tmp.join("b");
    let mut child = sft_cmd(&data, &b, &[])
        .env("INFIMED_CHECKPOINT_PAUSE_MS", "60000")
        .env("INFIMED_CHECKPOINT_PAUSE_STEP", "6")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    for line in BufReader::new(stderr).split(b'\n') {
        let line = String::from_utf8_lossy(&line.unwrap()).to_string();
        if line.contains("checkpoint 6: pausing") {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        b.join(".tmp-checkpoint-6").exists(),
        "the interrupted checkpoint is left as a temporary directory"
    );
    assert!(!b.join("checkpoint-6").exists());
    assert!(b.join("checkpoint-3/trainer_state.json").exists());

    let o = sft_cmd(&data, &b, &["--resume"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("resuming from") && err.contains("checkpoint-3"),
        "{err}"
    );

    let wa = std::fs::read(a.join("model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("model.safetensors")).unwrap();
    assert!(
        wa == wb,
        "resumed weights differ from the uninterrupted run"
    );

    // The demo recipe freezes the vision tower and projector, as the paper: every visual.*
    // tensor of the export is bit-identical to the initial (seed 42) model; the LM's changed.
    use burn::backend::NdArray;
    let device = Default::default();
    let init = infimed::models::load_model::<NdArray<f32>>("builtin:demo-tiny", 42, &device)
        .unwrap()
        .export_tensors();
    let trained = infimed::model::Qwen25VL::<NdArray<f32>>::load(&a, &device)
        .unwrap()
        .export_tensors();
    assert_eq!(init.len(), trained.len());
    let (mut visual, mut lm_changed, mut lm) = (0, 0, 0);
    for (i, t) in init.iter().zip(&trained) {
        assert_eq!(i.name, t.name);
        if i.name.starts_with("visual.") {
            visual += 1;
            assert!(
                i.values
                    .iter()
                    .zip(&t.values)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{} changed",
                i.name
            );
        } else {
            lm += 1;
            lm_changed += (i.values != t.values) as usize;
        }
    }
    eprintln!("{visual} visual.* tensors bit-identical; {lm_changed} of {lm} language-model tensors changed");
    assert!(
        visual > 0 && lm_changed == lm,
        "{lm_changed} of {lm} language-model tensors changed"
    );
    std::fs::remove_dir_all(&tmp).ok();
}
