//! A GPU backend the machine cannot run is a clear error before any work starts, naming the
//! backend, what was looked for and the CPU alternative: never a panic inside the GPU runtime.
//! Every command that runs a model is tried with `--backend cuda` (on a machine without the
//! NVIDIA driver) and `--backend wgpu` with the Vulkan drivers hidden.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{fixtures, model_dir};
use infimed::backend::{probe, BackendKind};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The commands, each asking for `backend` (a flag, or a recipe override).
fn commands(backend: &str, out: &std::path::Path) -> Vec<(&'static str, Vec<String>)> {
    let model = model_dir("tiny-gqa2").display().to_string();
    let samples = fixtures().join("samples.jsonl").display().to_string();
    let o = |name: &str| out.join(name).display().to_string();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let flag = ["--backend", backend];
    let set = format!("backend={backend}");
    vec![
        (
            "score",
            [
                s(&[
                    "score",
                    "--model",
                    &model,
                    "--data",
                    &samples,
                    "--out",
                    &o("s.jsonl"),
                ]),
                s(&flag),
            ]
            .concat(),
        ),
        (
            "generate",
            [
                s(&["generate", "--model", &model, "--prompt", "Hi"]),
                s(&flag),
            ]
            .concat(),
        ),
        (
            "sft",
            s(&[
                "sft",
                "--recipe",
                "recipes/demo-sft.toml",
                "--set",
                &set,
                "--set",
                &format!("output_dir={}", o("sft")),
            ]),
        ),
        (
            "grpo",
            s(&[
                "grpo",
                "--recipe",
                "recipes/demo-grpo.toml",
                "--set",
                &set,
                "--set",
                "model=builtin:demo-tiny",
                "--set",
                &format!("output_dir={}", o("grpo")),
            ]),
        ),
        (
            "eval",
            [
                s(&[
                    "eval",
                    "--model",
                    &model,
                    "--mode",
                    "direct",
                    "--out",
                    &o("eval"),
                ]),
                s(&[
                    "--bench",
                    &fixtures()
                        .join("eval/score40/bench_a.jsonl")
                        .display()
                        .to_string(),
                ]),
                s(&flag),
            ]
            .concat(),
        ),
        ("bench sft", [s(&["bench", "sft"]), s(&flag)].concat()),
        (
            "bench generate",
            [s(&["bench", "generate"]), s(&flag)].concat(),
        ),
        (
            "bench load",
            [s(&["bench", "load", "--model", &model]), s(&flag)].concat(),
        ),
    ]
}

fn check_all(backend: &str, env: &[(&str, &str)]) {
    let tmp = tempfile::tempdir().unwrap();
    for (name, args) in commands(backend, tmp.path()) {
        let o = Command::new(env!("CARGO_BIN_EXE_infimed"))
            .current_dir(root())
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name} --backend {backend} succeeded");
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(
            !err.contains("panicked"),
            "{name}: a panic, not an error:\n{err}"
        );
        let want = format!("backend `{backend}` cannot run on this machine");
        assert!(
            err.contains(&want) && err.contains("--backend flex"),
            "{name}: {err}"
        );
        eprintln!("{name} --backend {backend}: {}", err.trim());
    }
}

#[test]
fn cuda_without_the_driver_is_a_clear_error() {
    if probe(BackendKind::Cuda, None).is_ok() {
        eprintln!("cuda_without_the_driver_is_a_clear_error: NOT RUN: this machine has a CUDA GPU");
        return;
    }
    check_all("cuda", &[]);
}

/// The Vulkan loader reads only the drivers these variables name: none.
const NO_VULKAN: [(&str, &str); 2] = [
    ("VK_ICD_FILENAMES", "/nonexistent/icd.json"),
    ("VK_DRIVER_FILES", "/nonexistent/icd.json"),
];

#[test]
fn wgpu_without_an_adapter_is_a_clear_error() {
    let probe_hidden = Command::new(env!("CARGO_BIN_EXE_infimed"))
        .args([
            "bench",
            "generate",
            "--backend",
            "wgpu",
            "--batch",
            "1",
            "--new-tokens",
            "1",
            "--repeat",
            "1",
        ])
        .envs(NO_VULKAN)
        .output()
        .unwrap();
    if probe_hidden.status.success() {
        eprintln!(
            "wgpu_without_an_adapter_is_a_clear_error: NOT RUN: an adapter is found without Vulkan"
        );
        return;
    }
    check_all("wgpu", &NO_VULKAN);
}
