//! Data parallelism (`[parallel]`), on ndarray with CPU workers as ranks:
//! - N ranks x `per_device_batch = b` take the same optimizer steps as 1 rank x `N x b`
//!   (weights after 3 steps within 1e-5), with and without gradient accumulation;
//! - a run stopped (SIGKILL) and resumed on another number of ranks sees the same samples as an
//!   uninterrupted run: every epoch's records once, none twice, none skipped;
//! - two processes on 127.0.0.1 (`nodes = 2`, 2 ranks each) give the weights of one process with
//!   4 ranks, for SFT and for GRPO; killing either one makes the other fail within 60 s naming the lost ranks, and the
//!   last checkpoint resumes.

use infimed::learn::recipe::Recipe;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn infimed() -> Command {
    Command::new(env!("CARGO_BIN_EXE_infimed"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn demo_data(tmp: &Path, train: usize) -> PathBuf {
    let dir = tmp.join("data");
    let o = infimed()
        .args(["demo-data", "--out"])
        .arg(&dir)
        .args(["--train", &train.to_string(), "--val", "4"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    dir.join("train.jsonl")
}

fn sft(data: &Path, out: &Path, sets: &[String], extra: &[&str]) -> Command {
    let mut c = infimed();
    c.current_dir(root())
        .args(["sft", "--recipe", "recipes/demo-sft.toml"]);
    let base = [
        format!("data.0.path={}", data.display()),
        "eval_data=[]".into(),
        format!("output_dir={}", out.display()),
        "backend=ndarray".into(),
        "loader_workers=1".into(),
    ];
    for s in base.iter().chain(sets) {
        c.args(["--set", s]);
    }
    c.args(extra);
    c
}

fn run_ok(mut c: Command) -> String {
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    err
}

/// Every tensor of `model.safetensors` (f32).
fn weights(dir: &Path) -> BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            let v = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, v)
        })
        .collect()
}

fn max_abs_diff(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f32 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .flat_map(|(k, x)| x.iter().zip(&b[k]).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn n_ranks_of_b_equal_one_rank_of_n_times_b() {
    let tmp = std::env::temp_dir().join(format!("infimed-dp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let data = demo_data(&tmp, 48);
    let init = {
        let out = tmp.join("init");
        run_ok(sft(
            &data,
            &out,
            &["max_steps=1".into(), "optimizer.lr=1e-30".into()],
            &[],
        ));
        weights(&out)
    };
    for accum in [1, 2] {
        let run = |devices: usize, b: usize| {
            let out = tmp.join(format!("a{accum}-d{devices}-b{b}"));
            let sets = [
                "max_steps=3".to_string(),
                format!("grad_accum={accum}"),
                format!("per_device_batch={b}"),
                format!("parallel.devices={devices}"),
            ];
            let err = run_ok(sft(&data, &out, &sets, &[]));
            assert!(err.contains(&format!("on {devices} rank(s)")), "{err}");
            weights(&out)
        };
        let one = run(1, 8);
        assert!(
            max_abs_diff(&one, &init) > 1e-4,
            "the steps changed the weights"
        );
        for (n, b) in [(2, 4), (4, 2)] {
            let d = max_abs_diff(&one, &run(n, b));
            eprintln!("grad_accum {accum}: {n} ranks x {b} vs 1 rank x 8: max |diff| = {d:e}");
            assert!(
                d <= 1e-5,
                "grad_accum {accum}: {n} ranks x {b} differ from 1 rank x 8 by {d}"
            );
        }
    }
}

/// The samples of the steps a run's `samples.jsonl` lists, by epoch.
fn samples_by_epoch(out: &Path) -> BTreeMap<u64, Vec<(u64, u64)>> {
    let mut by = BTreeMap::<u64, Vec<(u64, u64)>>::new();
    for l in std::fs::read_to_string(out.join("samples.jsonl"))
        .unwrap()
        .lines()
    {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let e = v["epoch"].as_u64().unwrap();
        for p in v["samples"].as_array().unwrap() {
            by.entry(e)
                .or_default()
                .push((p[0].as_u64().unwrap(), p[1].as_u64().unwrap()));
        }
    }
    for v in by.values_mut() {
        v.sort_unstable();
    }
    by
}

#[test]
fn a_run_resumed_on_another_number_of_ranks_sees_every_sample_once_per_epoch() {
    let tmp = std::env::temp_dir().join(format!("infimed-dp-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let data = demo_data(&tmp, 24);
    let sets = |devices: usize| {
        vec![
            "epochs=2".to_string(),
            "per_device_batch=2".into(),
            "save_every=3".into(),
            "log_samples=true".into(),
            format!("parallel.devices={devices}"),
        ]
    };
    let uninterrupted = tmp.join("whole");
    run_ok(sft(&data, &uninterrupted, &sets(2), &[]));
    let whole = samples_by_epoch(&uninterrupted);
    assert_eq!(whole.len(), 2);
    for v in whole.values() {
        let mut d = v.clone();
        d.dedup();
        assert_eq!((v.len(), d.len()), (24, 24), "every record once per epoch");
    }

    for (first, then) in [(2, 4), (4, 2)] {
        // Killed while writing its step-6 checkpoint (step 3's is complete), resumed on `then` ranks.
        let out = tmp.join(format!("r{first}-{then}"));
        let mut child = sft(&data, &out, &sets(first), &[])
            .env("INFIMED_CHECKPOINT_PAUSE_MS", "60000")
            .env("INFIMED_CHECKPOINT_PAUSE_STEP", "6")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        for line in BufReader::new(child.stderr.take().unwrap()).split(b'\n') {
            if String::from_utf8_lossy(&line.unwrap()).contains("checkpoint 6: pausing") {
                break;
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(out.join("checkpoint-3/trainer_state.json").exists());
        let err = run_ok(sft(&data, &out, &sets(then), &["--resume"]));
        assert!(
            err.contains(&format!(
                "the run was on {first} rank(s), continues on {then}"
            )),
            "{err}"
        );
        assert_eq!(
            samples_by_epoch(&out),
            whole,
            "{first} ranks resumed on {then}: the samples seen differ"
        );
    }
}

fn grpo_recipe(
    data: &Path,
    out: &Path,
    devices: usize,
    loss_agg: &str,
    ppo_epochs: usize,
) -> infimed::grpo::GrpoRecipe {
    infimed::grpo::GrpoRecipe::from_str_with(
        &grpo_recipe_text(data, out, devices, loss_agg, ppo_epochs),
        "test.toml",
        &[],
    )
    .unwrap()
}

fn grpo_recipe_text(
    data: &Path,
    out: &Path,
    devices: usize,
    loss_agg: &str,
    ppo_epochs: usize,
) -> String {
    format!(
        r#"
model = "builtin:demo-tiny"
backend = "ndarray"
data = "{data}"
max_prompt_len = 256
max_response_len = 5
max_steps = 3
seed = 3
output_dir = "{out}"
[freeze]
vision_tower = true
projector = true
[optimizer]
lr = 1e-3
weight_decay = 0.01
[rollout]
prompts_per_step = 4
n = 3
generation_batch = 4
[ppo]
mini_batch = 2
micro_batch = 2
epochs = {ppo_epochs}
[algorithm]
kl_coef = 0.05
loss_agg = "{loss_agg}"
[reward]
format = "none"
format_weight = 0.0
accuracy_weight = 1.0
[parallel]
devices = {devices}
"#,
        data = data.join("rl_train.jsonl").display(),
        out = out.display()
    )
}

#[test]
fn grpo_on_n_ranks_equals_one_rank() {
    type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
    let tmp = std::env::temp_dir().join(format!("infimed-dp-grpo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let data = demo_data(&tmp, 16).parent().unwrap().to_path_buf();
    for (loss_agg, ppo_epochs) in [("token_mean", 1), ("seq_mean_token_mean", 2)] {
        let run = |devices: usize| {
            let out = tmp.join(format!("{loss_agg}-{devices}"));
            let s = infimed::grpo::train_grpo::<B>(
                &grpo_recipe(&data, &out, devices, loss_agg, ppo_epochs),
                false,
                &Default::default(),
            )
            .unwrap();
            assert_eq!(s.steps, 3);
            (
                weights(&out),
                std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(),
            )
        };
        let (one, m1) = run(1);
        for n in [2, 4] {
            let (w, m) = run(n);
            let d = max_abs_diff(&one, &w);
            eprintln!(
                "grpo {loss_agg}, {ppo_epochs} ppo epoch(s): {n} ranks vs 1: max |diff| = {d:e}"
            );
            assert!(d <= 1e-5, "grpo {loss_agg}: {n} ranks differ from 1 by {d}");
            // The same rollouts and rewards (the samples are seeded per prompt).
            let rewards = |m: &str| {
                m.lines()
                    .map(|l| {
                        serde_json::from_str::<serde_json::Value>(l).unwrap()["reward_mean"].clone()
                    })
                    .collect::<Vec<_>>()
            };
            assert_eq!(rewards(&m1), rewards(&m));
        }
    }
}

/// Waits for `child` at most `secs` seconds (a hang is a failure, not a stuck test); its stderr
/// is read as it comes (a child blocked on a full pipe would look like a hang).
fn wait_bounded(mut child: std::process::Child, secs: u64) -> (bool, String, f64) {
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
        err
    });
    let t0 = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (
                status.success(),
                reader.join().unwrap(),
                t0.elapsed().as_secs_f64(),
            );
        }
        if t0.elapsed().as_secs() > secs {
            child.kill().unwrap();
            panic!("still running after {secs} s: a hang");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Waits for both nodes of a run (at most 600 s each) and asserts that both succeeded; node 0's
/// stderr.
fn wait_nodes([n0, n1]: [std::process::Child; 2]) -> String {
    let (ok1, err1, _) = wait_bounded(n1, 600);
    let (ok0, err0, _) = wait_bounded(n0, 600);
    assert!(ok0 && ok1, "node 0: {err0}\nnode 1: {err1}");
    err0
}

#[test]
fn steps_where_some_ranks_have_images_and_others_text_do_not_hang() {
    let tmp = std::env::temp_dir().join(format!("infimed-dp-mixed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let train = demo_data(&tmp, 8);
    // Even records with an image, odd ones text only; the vision tower trains (its gradients
    // then exist on the ranks that saw an image only).
    let lines: Vec<String> = std::fs::read_to_string(&train)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let text = r#"{"messages":[{"role":"user","content":"Is a lesion usually visible on a scan?"},{"role":"assistant","content":"often"}]}"#;
    let mixed: Vec<String> = (0..8)
        .map(|i| {
            if i % 2 == 0 {
                lines[i].clone()
            } else {
                text.to_string()
            }
        })
        .collect();
    let data = train.with_file_name("mixed.jsonl");
    std::fs::write(&data, mixed.join("\n") + "\n").unwrap();
    let run = |devices: usize, b: usize| {
        let out = tmp.join(format!("d{devices}"));
        let sets = [
            "max_steps=4".to_string(),
            format!("per_device_batch={b}"),
            format!("parallel.devices={devices}"),
            "freeze.vision_tower=false".into(),
            "freeze.projector=false".into(),
            "log_samples=true".into(),
        ];
        let child = sft(&data, &out, &sets, &[])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let (ok, err, _) = wait_bounded(child, 600);
        assert!(ok, "{err}");
        out
    };
    let two = run(2, 1);
    // Some step put an image record on one rank and a text record on the other.
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(two.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mixed_steps = steps
        .iter()
        .filter(|v| {
            let recs: Vec<u64> = v["samples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p[1].as_u64().unwrap() % 2)
                .collect();
            recs.contains(&0) && recs.contains(&1)
        })
        .count();
    assert!(
        mixed_steps > 0,
        "no step mixed an image record with a text one: {steps:?}"
    );
    let d = max_abs_diff(&weights(&two), &weights(&run(1, 2)));
    eprintln!("mixed image/text steps ({mixed_steps} of 4), vision tower trained: 2 ranks vs 1, max |diff| = {d:e}");
    assert!(d <= 1e-5, "{d}");
}

#[test]
fn a_rank_that_fails_stops_the_others_with_an_error_naming_it() {
    let tmp = std::env::temp_dir().join(format!("infimed-dp-fail-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let data = demo_data(&tmp, 16);
    // Image 5 keeps its header (its size is read at start-up) but its pixels are cut off: the
    // rank whose shard holds it fails when its loader decodes it.
    let img = data.parent().unwrap().join("images/00005.png");
    let bytes = std::fs::read(&img).unwrap();
    std::fs::write(&img, &bytes[..100]).unwrap();
    let sets = [
        "per_device_batch=2".to_string(),
        "parallel.devices=2".into(),
        "epochs=1".into(),
    ];
    let child = sft(&data, &tmp.join("out"), &sets, &[])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (ok, err, secs) = wait_bounded(child, 300);
    assert!(!ok, "the run should fail");
    eprintln!(
        "failed after {secs:.1} s: {}",
        err.lines()
            .filter(|l| l.contains("rank"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    assert!(err.contains("00005.png"), "the error names the file: {err}");
    assert!(err.contains(" of 2"), "the error names the rank: {err}");
    assert!(!err.contains("another rank failed") || err.contains("00005.png"));
}

/// A coordinator port `p` with `p + 1` and `p + 2` (the two nodes' tensor services) free.
fn free_ports() -> u16 {
    // Tests run on parallel threads: each call starts elsewhere.
    static CALLS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let free = |p: u16| std::net::TcpListener::bind(("0.0.0.0", p)).is_ok();
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let start = 20000 + (std::process::id() % 10000) as u16 + 3000 * call;
    (0..2000u16)
        .map(|i| start + 3 * i)
        .find(|&p| (p..p + 3).all(free))
        .expect("three free ports")
}

/// Node `node_rank` of a 2-node x 2-rank run meeting at 127.0.0.1:`port`.
fn node(
    data: &Path,
    out: &Path,
    port: u16,
    node_rank: usize,
    sets: &[String],
    extra: &[&str],
) -> std::process::Child {
    let mut sets = sets.to_vec();
    sets.extend([
        "parallel.devices=2".to_string(),
        "parallel.nodes=2".into(),
        format!("parallel.node_rank={node_rank}"),
        format!("parallel.coordinator=127.0.0.1:{port}"),
    ]);
    sft(data, out, &sets, extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn two_processes_of_two_ranks_equal_one_process_of_four() {
    let tmp = std::env::temp_dir().join(format!("infimed-dp-nodes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let data = demo_data(&tmp, 24);
    let sets = vec!["max_steps=3".to_string(), "per_device_batch=2".into()];
    let one = tmp.join("one");
    let mut four = sets.clone();
    four.push("parallel.devices=4".into());
    run_ok(sft(&data, &one, &four, &[]));

    // Both nodes write to one output folder, as on a shared file system; rank 0 alone writes there.
    let two = tmp.join("two");
    let port = free_ports();
    let err0 = wait_nodes([
        node(&data, &two, port, 0, &sets, &[]),
        node(&data, &two, port, 1, &sets, &[]),
    ]);
    assert!(err0.contains("on 4 rank(s)"), "{err0}");
    let d = max_abs_diff(&weights(&one), &weights(&two));
    eprintln!("2 processes x 2 ranks vs 1 process x 4 ranks, 3 steps: max |diff| = {d:e}");
    assert!(d <= 1e-5, "{d}");
}

#[test]
fn a_killed_node_stops_the_other_with_an_error_naming_its_ranks_and_the_run_resumes() {
    let tmp = std::env::temp_dir().join(format!("infimed-dp-nodekill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let data = demo_data(&tmp, 24);
    let sets = vec![
        "max_steps=400".to_string(),
        "per_device_batch=1".into(),
        "save_every=2".into(),
    ];
    for victim in [1, 0] {
        let out = tmp.join(format!("kill{victim}"));
        let port = free_ports();
        let mut nodes = [
            node(&data, &out, port, 0, &sets, &[]),
            node(&data, &out, port, 1, &sets, &[]),
        ];
        let t0 = std::time::Instant::now();
        while !out.join("checkpoint-4/trainer_state.json").exists() {
            assert!(t0.elapsed().as_secs() < 300, "no checkpoint-4 after 300 s");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        nodes[victim].kill().unwrap(); // SIGKILL
        nodes[victim].wait().unwrap();
        let [n0, n1] = nodes;
        let survivor = if victim == 1 { n0 } else { n1 };
        let (ok, err, secs) = wait_bounded(survivor, 120);
        let lost = if victim == 1 {
            "node 1 (ranks 2-3)"
        } else {
            "node 0 (ranks 0-1)"
        };
        eprintln!(
            "node {victim} killed: the other exited after {secs:.1} s: {}",
            err.lines().rfind(|l| l.contains("lost")).unwrap_or("")
        );
        assert!(!ok, "the surviving node should fail");
        assert!(
            err.contains(&format!("lost {lost}")),
            "the error names the lost ranks: {err}"
        );
        assert!(secs < 60.0, "{secs} s");
        if victim == 1 {
            // The newest complete checkpoint resumes (here on both nodes again) and the run ends.
            let last = std::fs::read_dir(&out)
                .unwrap()
                .filter_map(|e| {
                    e.unwrap()
                        .file_name()
                        .to_str()?
                        .strip_prefix("checkpoint-")?
                        .parse::<usize>()
                        .ok()
                })
                .filter(|s| {
                    out.join(format!("checkpoint-{s}/trainer_state.json"))
                        .exists()
                })
                .max()
                .unwrap();
            let port = free_ports();
            let end = vec![
                format!("max_steps={}", last + 4),
                "per_device_batch=1".into(),
                "save_every=2".into(),
            ];
            let err0 = wait_nodes([
                node(&data, &out, port, 0, &end, &["--resume"]),
                node(&data, &out, port, 1, &end, &["--resume"]),
            ]);
            assert!(
                err0.contains(&format!("checkpoint-{last} (step {last})")),
                "{err0}"
            );
            let state: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(
                    out.join(format!("checkpoint-{}/trainer_state.json", last + 4)),
                )
                .unwrap(),
            )
            .unwrap();
            assert_eq!(state["step"], last + 4, "{state}");
        }
    }
}

#[test]
fn grpo_on_two_processes_of_two_ranks_equals_one_process_of_four() {
    type B = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
    let tmp = std::env::temp_dir().join(format!("infimed-dp-grpo-nodes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let data = demo_data(&tmp, 16).parent().unwrap().to_path_buf();
    let one = tmp.join("one");
    infimed::grpo::train_grpo::<B>(
        &grpo_recipe(&data, &one, 4, "token_mean", 1),
        false,
        &Default::default(),
    )
    .unwrap();
    let two = tmp.join("two");
    let recipe = tmp.join("grpo.toml");
    std::fs::write(&recipe, grpo_recipe_text(&data, &two, 2, "token_mean", 1)).unwrap();
    let port = free_ports();
    let spawn = |k: usize| {
        infimed()
            .args(["grpo", "--recipe"])
            .arg(&recipe)
            .args([
                "--set",
                "parallel.nodes=2",
                "--set",
                &format!("parallel.node_rank={k}"),
                "--set",
                &format!("parallel.coordinator=127.0.0.1:{port}"),
            ])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let err0 = wait_nodes([spawn(0), spawn(1)]);
    assert!(err0.contains("on 4 rank(s)"), "{err0}");
    let d = max_abs_diff(&weights(&one), &weights(&two));
    eprintln!("grpo: 2 processes x 2 ranks vs 1 process x 4 ranks, 3 steps: max |diff| = {d:e}");
    assert!(d <= 1e-5, "{d}");
}
