//! Shared helpers of the integration tests: fixture paths and reference readers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::Value;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn read_json(rel: &str) -> Value {
    let p = fixtures().join(rel);
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

pub fn grids(v: &Value) -> Vec<[usize; 3]> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|g| {
                    let g = g.as_array().unwrap();
                    [
                        g[0].as_u64().unwrap() as usize,
                        g[1].as_u64().unwrap() as usize,
                        g[2].as_u64().unwrap() as usize,
                    ]
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A tensor of a safetensors file as f32 (or i64 cast to f32) values and its shape.
pub fn read_tensor(rel: &str, key: &str) -> (Vec<f32>, Vec<usize>) {
    let p = fixtures().join(rel);
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st
        .tensor(key)
        .unwrap_or_else(|e| panic!("{key} in {}: {e:?}", p.display()));
    let data = t.data();
    let values = match t.dtype() {
        safetensors::Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::I64 => data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
            .collect(),
        other => panic!("unexpected dtype {other:?}"),
    };
    (values, t.shape().to_vec())
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Samples of `refs/samples.json` by name.
pub fn sample(name: &str) -> Value {
    let all = read_json("refs/samples.json");
    all["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .cloned()
        .unwrap()
}

pub fn sample_names() -> Vec<String> {
    let all = read_json("refs/samples.json");
    all["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

pub const CHECKPOINTS: [&str; 5] = [
    "tiny-gqa2",
    "tiny-gqa2-sharded",
    "tiny-gqa2-bf16",
    "tiny-gqa4-untied",
    "tiny-mha-newlayout",
];
