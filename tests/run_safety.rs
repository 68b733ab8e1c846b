//! Runs never lose work: an output directory that holds a run is refused unless `--resume` or
//! `--overwrite` says what to do with it; one process per output directory; the newest
//! `keep_checkpoints` checkpoints are kept; SIGTERM stops a run after its step with a
//! checkpoint that resumes exactly; a non-finite loss stops the run naming the step, its samples
//! and the last good checkpoint, or is skipped and counted.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn demo_data(dir: &Path) -> PathBuf {
    let o = Command::new(env!("CARGO_BIN_EXE_infimed"))
        .args(["demo-data", "--out"])
        .arg(dir)
        .args(["--train", "64", "--val", "4"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    dir.join("train.jsonl")
}

/// `infimed sft` of the demo recipe on ndarray, small steps, into `out`.
fn sft(data: &Path, out: &Path, sets: &[&str], flags: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_infimed"));
    c.current_dir(root())
        .args(["sft", "--recipe", "recipes/demo-sft.toml"]);
    let base = [
        "backend=ndarray".to_string(),
        format!("data.0.path={}", data.display()),
        "eval_data=[]".into(),
        format!("output_dir={}", out.display()),
        "per_device_batch=4".into(),
        "loader_workers=0".into(),
    ];
    for s in base.iter().map(String::as_str).chain(sets.iter().copied()) {
        c.args(["--set", s]);
    }
    c.args(flags);
    c
}

fn run(mut c: Command) -> Output {
    c.output().unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    err
}

fn failed(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "succeeded: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

fn checkpoints(dir: &Path) -> Vec<usize> {
    let mut steps: Vec<usize> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()
        })
        .collect();
    steps.sort();
    steps
}

/// The steps of `dir/metrics.jsonl`'s step records.
fn metrics_steps(dir: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let records = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap());
    records
        .filter(|r| r.get("loss").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn an_output_dir_that_holds_a_run_is_refused_unless_resumed_or_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(&tmp.path().join("data"));
    let out = tmp.path().join("run");
    let steps = ["max_steps=4", "save_every=2"];
    ok(&run(sft(&data, &out, &steps, &[])));
    let before = snapshot(&out);

    // Again without a flag: refused, every file as it was.
    let err = failed(&run(sft(&data, &out, &["max_steps=1"], &[])));
    assert!(
        err.contains("holds a run") && err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    assert!(
        err.contains("metrics.jsonl (4 lines)") && err.contains("model.safetensors"),
        "{err}"
    );
    assert_eq!(
        snapshot(&out),
        before,
        "a refused run changed the earlier run's files"
    );
    eprintln!("refused: {}", err.trim());

    // --resume continues it (to 6 steps), from checkpoint-4.
    let err = ok(&run(sft(
        &data,
        &out,
        &["max_steps=6", "save_every=2"],
        &["--resume"],
    )));
    assert!(err.contains("checkpoint-4"), "{err}");
    assert_eq!(metrics_steps(&out), vec![1, 2, 3, 4, 5, 6]);

    // --overwrite replaces it; another file of the folder stays.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    ok(&run(sft(&data, &out, &["max_steps=1"], &["--overwrite"])));
    assert_eq!(metrics_steps(&out), vec![1]);
    assert_eq!(checkpoints(&out), vec![1]);
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );

    // Plain --resume with nothing to resume is an error; --resume=auto starts fresh.
    let empty = tmp.path().join("empty");
    let err = failed(&run(sft(&data, &empty, &["max_steps=1"], &["--resume"])));
    assert!(
        err.contains("nothing to resume") && err.contains("--resume=auto"),
        "{err}"
    );
    ok(&run(sft(
        &data,
        &empty,
        &["max_steps=1"],
        &["--resume=auto"],
    )));
    assert_eq!(metrics_steps(&empty), vec![1]);
}

/// Starts `c` with its stderr read on a thread; returns the child and a receiver of its lines.
fn spawn(mut c: Command) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = c
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).split(b'\n') {
            let Ok(line) = line else { break };
            if tx.send(String::from_utf8_lossy(&line).to_string()).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn wait_for_line(rx: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) {
            if line.contains(needle) {
                return line;
            }
        }
    }
    panic!("no line with {needle:?}");
}

#[test]
fn a_second_process_on_the_same_output_dir_refuses() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(&tmp.path().join("data"));
    let out = tmp.path().join("run");
    let mut first = sft(&data, &out, &["max_steps=2", "save_every=1"], &[]);
    first
        .env("INFIMED_CHECKPOINT_PAUSE_MS", "60000")
        .env("INFIMED_CHECKPOINT_PAUSE_STEP", "1");
    let (mut child, rx) = spawn(first);
    wait_for_line(&rx, "checkpoint 1: pausing");
    let err = failed(&run(sft(&data, &out, &["max_steps=2"], &["--overwrite"])));
    assert!(
        err.contains("in use by another infimed run")
            && err.contains(&format!("pid {}", child.id())),
        "{err}"
    );
    eprintln!("second process: {}", err.trim());
    // A killed run leaves no stale lock: its checkpoint-in-progress aside, the folder resumes.
    child.kill().unwrap();
    child.wait().unwrap();
    ok(&run(sft(
        &data,
        &out,
        &["max_steps=2", "save_every=1"],
        &["--resume=auto"],
    )));
}

#[test]
fn keep_checkpoints_keeps_the_newest_and_a_run_killed_mid_checkpoint_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(&tmp.path().join("data"));
    let out = tmp.path().join("run");
    let sets = ["max_steps=10", "save_every=1", "keep_checkpoints=2"];
    ok(&run(sft(&data, &out, &sets, &[])));
    assert_eq!(
        checkpoints(&out),
        vec![9, 10],
        "10 checkpoints written, the newest 2 kept"
    );

    // Killed while checkpoint 6 is written: the two before it are complete, and a resume from
    // the newer of them runs to the end.
    let out = tmp.path().join("killed");
    let mut c = sft(&data, &out, &sets, &[]);
    c.env("INFIMED_CHECKPOINT_PAUSE_MS", "60000")
        .env("INFIMED_CHECKPOINT_PAUSE_STEP", "6");
    let (mut child, rx) = spawn(c);
    wait_for_line(&rx, "checkpoint 6: pausing");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(checkpoints(&out), vec![4, 5]);
    assert!(out.join(".tmp-checkpoint-6").exists());
    let err = ok(&run(sft(&data, &out, &sets, &["--resume"])));
    assert!(err.contains("checkpoint-5"), "{err}");
    assert_eq!(checkpoints(&out), vec![9, 10]);
}

/// SIGTERM after step 3 of a run on `ranks` CPU ranks: the run checkpoints the step it was in
/// and exits with 143; `--resume` then gives the uninterrupted run's weights, bit for bit.
fn sigterm_then_resume(ranks: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(&tmp.path().join("data"));
    let devices = format!("parallel.devices={ranks}");
    let sets = ["max_steps=40", "save_every=0", devices.as_str()];
    let whole = tmp.path().join("whole");
    ok(&run(sft(&data, &whole, &sets, &[])));

    let out = tmp.path().join("stopped");
    let (child, _rx) = spawn(sft(&data, &out, &sets, &[]));
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 3 {
        assert!(Instant::now() < deadline, "the run logged no 3 steps");
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: signals a child process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(143),
        "exit status of a run stopped by SIGTERM"
    );
    let stopped_at = *checkpoints(&out).last().expect("a checkpoint at the stop");
    assert!((3..40).contains(&stopped_at), "stopped at {stopped_at}");
    let err = ok(&run(sft(&data, &out, &sets, &["--resume"])));
    assert!(err.contains(&format!("checkpoint-{stopped_at}")), "{err}");
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(
        weights(&out) == weights(&whole),
        "{ranks} rank(s): the resumed run's weights differ"
    );
    eprintln!("{ranks} rank(s): SIGTERM after step {stopped_at}, resumed: the same weights");
}

#[test]
fn sigterm_checkpoints_the_step_and_resume_is_exact() {
    sigterm_then_resume(1);
}

#[test]
fn sigterm_on_two_cpu_ranks_stops_both_and_resume_is_exact() {
    sigterm_then_resume(2);
}

#[test]
fn a_non_finite_loss_stops_naming_the_step_and_its_samples_or_is_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let data = demo_data(&tmp.path().join("data"));
    let out = tmp.path().join("run");
    let sets = ["max_steps=5", "save_every=2"];
    let mut c = sft(&data, &out, &sets, &[]);
    c.env("INFIMED_FAULT_NAN_AT_STEP", "3");
    let err = failed(&run(c));
    assert!(
        err.contains("non-finite loss (NaN) at optimizer step 3"),
        "{err}"
    );
    assert!(
        err.contains("samples: ") && err.contains("train.jsonl:"),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "last good checkpoint is {}",
            out.join("checkpoint-2").display()
        )),
        "{err}"
    );
    eprintln!("stopped: {}", err.trim());

    let skip = tmp.path().join("skip");
    let mut c = sft(&data, &skip, &[sets[0], sets[1], "nan_policy=skip"], &[]);
    c.env("INFIMED_FAULT_NAN_AT_STEP", "3");
    ok(&run(c));
    let skipped: Vec<u64> = std::fs::read_to_string(skip.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("skipped_updates")?
                .as_u64()
        })
        .collect();
    assert_eq!(skipped, vec![0, 0, 1, 0, 0]);
}
