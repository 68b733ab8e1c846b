//! Data at scale: lengths from image headers equal a full encode, the length cache is used when
//! current and recomputed when the file changes, the background loader hands out exactly the
//! batches of the synchronous path, and packed schedules hold every sample once per epoch.

mod common;

use std::sync::Arc;

use infimed::data::encode::{encode_conversation_shape, TrainOn};
use infimed::data::lengths::{cache_path, sample_lengths, LengthEncoder, SampleLength};
use infimed::data::sharegpt::read_sharegpt;
use infimed::inputs::Processor;
use infimed::learn::batch::MicroBatch;
use infimed::learn::recipe::Recipe;
use infimed::sft::data::{Loader, SftData};
use infimed::sft::recipe::SftRecipe;

fn demo(n: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = infimed::demo::DemoDataConfig {
        seed: 4,
        train: n,
        val: 8,
        image_size: 56,
        image_pool: None,
    };
    infimed::demo::write_demo_data(dir.path(), &cfg).unwrap();
    let train = dir.path().join("train.jsonl");
    (dir, train)
}

fn recipe(train: &std::path::Path, extra: &[&str]) -> SftRecipe {
    let mut set: Vec<String> = vec![
        format!("data.0.path={}", train.display()),
        "eval_data=[]".into(),
        "per_device_batch=4".into(),
    ];
    set.extend(extra.iter().map(|s| s.to_string()));
    SftRecipe::from_file(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/demo-sft.toml"),
        &set,
    )
    .unwrap()
}

#[test]
fn header_lengths_equal_a_full_encode() {
    for (model, data) in [
        (
            common::model_dir("tiny-gqa2"),
            common::fixtures().join("samples.jsonl"),
        ),
        (
            common::model_dir("tiny-gqa4-untied"),
            common::fixtures().join("samples.jsonl"),
        ),
    ] {
        let p = Processor::from_dir(&model, Some(112 * 112)).unwrap();
        for conv in read_sharegpt(&data).unwrap() {
            let full = p.encode(&conv, TrainOn::AllAssistant).unwrap();
            let shape = encode_conversation_shape(
                &p.tokenizer,
                &p.template,
                &p.images,
                &conv,
                TrainOn::AllAssistant,
            )
            .unwrap();
            assert_eq!(full.input_ids, shape.input_ids, "{}", conv.origin);
            assert_eq!(full.labels, shape.labels, "{}", conv.origin);
            assert_eq!(full.image_grids, shape.image_grids, "{}", conv.origin);
            assert_eq!(full.pixel_rows, shape.pixel_rows, "{}", conv.origin);
        }
    }
}

#[test]
fn length_cache_is_reused_and_invalidated_by_a_change() {
    let (_dir, train) = demo(40);
    let p = Processor::from_dir(&infimed::models::builtin_dir("demo-tiny").unwrap(), None).unwrap();
    let enc = LengthEncoder {
        tokenizer: &p.tokenizer,
        template: &p.template,
        images: &p.images,
        cutoff_len: 256,
        train_on: TrainOn::AllAssistant,
    };
    let convs = read_sharegpt(&train).unwrap();
    let (a, ra) = sample_lengths(&train, &convs, &enc, true).unwrap();
    assert!(!ra.cached && cache_path(&train).exists());
    let (b, rb) = sample_lengths(&train, &convs, &enc, true).unwrap();
    assert!(rb.cached);
    assert_eq!(a, b);
    // Every length is the full encode's.
    for (c, l) in convs.iter().zip(&a) {
        assert_eq!(
            *l,
            SampleLength::Ok(
                p.encode(c, TrainOn::AllAssistant).unwrap().input_ids.len() as u32,
                l.clone().targets()
            ),
            "{}",
            c.origin
        );
    }
    // A different cutoff is a different key.
    let enc2 = LengthEncoder {
        cutoff_len: 20,
        ..enc
    };
    let (_, r2) = sample_lengths(&train, &convs, &enc2, true).unwrap();
    assert!(!r2.cached);
    // A changed file (one more record) recomputes.
    let text = std::fs::read_to_string(&train).unwrap();
    let first = text.lines().next().unwrap().to_string();
    std::fs::write(&train, format!("{text}{first}\n")).unwrap();
    let convs = read_sharegpt(&train).unwrap();
    let (c, rc) = sample_lengths(&train, &convs, &enc2, true).unwrap();
    assert!(!rc.cached);
    assert_eq!(c.len(), 41);
}

fn same(a: &[MicroBatch], b: &[MicroBatch]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.input.input_ids, y.input.input_ids);
        assert_eq!(x.input.attention_mask, y.input.attention_mask);
        assert_eq!(x.input.segments, y.input.segments);
        assert_eq!(x.input.pixel_values, y.input.pixel_values);
        assert_eq!(x.input.image_grids, y.input.image_grids);
        assert_eq!(x.labels, y.labels);
        assert_eq!(x.target_tokens, y.target_tokens);
    }
}

#[test]
fn background_loader_gives_the_synchronous_batches() {
    let (_dir, train) = demo(60);
    for packing in [false, true] {
        let r = recipe(&train, &[&format!("packing={packing}"), "grad_accum=2"]);
        let p = Arc::new(
            Processor::from_dir(&infimed::models::builtin_dir("demo-tiny").unwrap(), None).unwrap(),
        );
        let data = Arc::new(SftData::load(&r, &p).unwrap());
        let schedule = Arc::new(data.schedule(&r, 0, 0, 20).unwrap());
        let recipe = Arc::new(r);
        let mut sync = Loader::start(
            data.clone(),
            p.clone(),
            recipe.clone(),
            schedule.clone(),
            0,
            1,
        );
        let mut bg = Loader::start(
            data.clone(),
            p.clone(),
            recipe.clone(),
            schedule.clone(),
            2,
            3,
        );
        for _ in 0..schedule.len() {
            same(&sync.next_step().unwrap(), &bg.next_step().unwrap());
        }
        assert!(bg.next_step().is_err(), "past the schedule");
    }
}

#[test]
fn packed_epochs_hold_every_sample_once() {
    let (_dir, train) = demo(90);
    let r = recipe(&train, &["packing=true", "cutoff_len=128"]);
    let p = Processor::from_dir(&infimed::models::builtin_dir("demo-tiny").unwrap(), None).unwrap();
    let data = SftData::load(&r, &p).unwrap();
    for epoch in 0..2 {
        let batches = data.epoch_batches(&r, epoch);
        let mut seen: Vec<(usize, usize)> = batches.iter().flatten().flatten().copied().collect();
        for row in batches.iter().flatten() {
            assert!(
                row.iter()
                    .map(|&id| data.length(id).unwrap())
                    .sum::<usize>()
                    <= 128
            );
        }
        seen.sort();
        let mut all: Vec<(usize, usize)> = (0..90)
            .map(|i| (0, i))
            .filter(|&id| data.length(id).is_some())
            .collect();
        all.sort();
        assert_eq!(seen, all, "epoch {epoch}");
        // First-fit: no two rows could have been one (each later row's samples did not fit
        // into any earlier row, and rows only grow).
        let rows: Vec<usize> = batches
            .iter()
            .flatten()
            .map(|r| r.iter().map(|&id| data.length(id).unwrap()).sum())
            .collect();
        for i in 0..rows.len() {
            for j in i + 1..rows.len() {
                assert!(
                    rows[i] + rows[j] > 128,
                    "rows {i} ({}) and {j} ({}) fit in one",
                    rows[i],
                    rows[j]
                );
            }
        }
        assert!(rows.len() < 90, "several samples share rows");
    }
}
