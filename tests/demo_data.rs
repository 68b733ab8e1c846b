//! The bundled demo's data (`infimed::demo`) and model directory (`assets/demo-tiny`).
//!
//! `cargo test --release --test demo_data -- --nocapture` also prints the token lengths.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use burn::backend::NdArray;
use infimed::data::{
    encode_conversation, read_sharegpt, ChatTemplate, ImageProcessorConfig, TextTokenizer, TrainOn,
};
use infimed::demo::{
    write_demo_data, DemoDataConfig, DemoTask, COUNT_QUESTION, PRESENCE_QUESTION, SIDE_QUESTION,
};
use infimed::eval::{read_bench_file, AnswerType};
use infimed::model::{ModelInput, Qwen25VL, Qwen25VlConfig};
use serde_json::Value;

fn demo_model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo-tiny")
}

fn small_cfg(seed: u64) -> DemoDataConfig {
    DemoDataConfig {
        seed,
        train: 120,
        val: 40,
        image_size: 56,
        image_pool: None,
    }
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Relative path -> bytes of every file under `dir`.
fn all_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_string_lossy().into_owned(),
                    fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The demo task of a question (as written in the sharegpt / RL records).
fn task_of(question: &str, has_image: bool) -> DemoTask {
    let q = question.trim_start_matches("<image>");
    match (has_image, q) {
        (true, q) if q.starts_with(PRESENCE_QUESTION) => DemoTask::Presence,
        (true, q) if q.starts_with(COUNT_QUESTION) => DemoTask::Count,
        (true, q) if q.contains(SIDE_QUESTION) => DemoTask::Side,
        (false, q) if q.contains("\nA. ") => DemoTask::TextMcq,
        (false, _) => DemoTask::TextYesNo,
        _ => panic!("unknown question {question:?}"),
    }
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let t = std::time::Instant::now();
    write_demo_data(a.path(), &small_cfg(11)).unwrap();
    eprintln!("160 records in {:?}", t.elapsed());
    write_demo_data(b.path(), &small_cfg(11)).unwrap();
    write_demo_data(c.path(), &small_cfg(12)).unwrap();
    let (fa, fb, fc) = (
        all_files(a.path()),
        all_files(b.path()),
        all_files(c.path()),
    );
    assert!(fa.len() > 100);
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (k, v) in &fa {
        assert!(
            fb[k] == *v,
            "{k} differs between two runs with the same seed"
        );
    }
    assert_ne!(fa["train.jsonl"], fc["train.jsonl"]);
    let same_png = fa
        .iter()
        .filter(|(k, v)| k.ends_with(".png") && fc.get(*k) == Some(*v))
        .count();
    assert_eq!(same_png, 0);
}

#[test]
fn default_size_counts_schemas_and_labels() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path();
    let cfg = DemoDataConfig {
        seed: 0,
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let summary = write_demo_data(out, &cfg).unwrap();
    let took = t.elapsed();
    eprintln!("default demo data (1200 + 200) in {took:?}");
    assert!(took.as_secs_f64() < 30.0, "{took:?}");

    // Counts.
    let train = read_jsonl(&out.join("train.jsonl"));
    let val = read_jsonl(&out.join("val.jsonl"));
    let rl_train = read_jsonl(&out.join("rl_train.jsonl"));
    let rl_val = read_jsonl(&out.join("rl_val.jsonl"));
    let bench = read_jsonl(&out.join("bench_val.jsonl"));
    assert_eq!(
        (
            train.len(),
            val.len(),
            rl_train.len(),
            rl_val.len(),
            bench.len()
        ),
        (1200, 200, 1200, 200, 200)
    );
    assert_eq!(summary.train.records, 1200);
    assert_eq!(summary.val.records, 200);
    assert_eq!(summary.train.text_only, 240);
    assert_eq!(summary.val.text_only, 40);
    let pngs = fs::read_dir(out.join("images")).unwrap().count();
    assert_eq!(pngs, summary.images);
    assert_eq!(
        summary.images,
        summary.train.with_image + summary.val.with_image
    );
    let saved: Value =
        serde_json::from_str(&fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(saved, serde_json::to_value(&summary).unwrap());
    for split in [&summary.train, &summary.val] {
        assert_eq!(
            split.tasks.values().map(|t| t.records).sum::<usize>(),
            split.records
        );
        for (name, t) in &split.tasks {
            let task = DemoTask::from_name(name).unwrap();
            assert_eq!(t.chance_accuracy, 1.0 / task.labels().len() as f64);
            let (lo, hi) = (
                t.labels.values().min().unwrap(),
                t.labels.values().max().unwrap(),
            );
            assert!(hi - lo <= 1, "{name}: unbalanced {:?}", t.labels);
        }
    }

    // Sharegpt records: schema, <image> count, image files, labels.
    let mut per_task: BTreeMap<DemoTask, BTreeSet<String>> = BTreeMap::new();
    for (recs, split) in [(&train, &summary.train), (&val, &summary.val)] {
        let mut counts: HashMap<DemoTask, usize> = HashMap::new();
        for r in recs.iter() {
            let msgs = r["messages"].as_array().unwrap();
            assert_eq!(msgs.len(), 2);
            assert_eq!(
                (msgs[0]["role"].as_str(), msgs[1]["role"].as_str()),
                (Some("user"), Some("assistant"))
            );
            let q = msgs[0]["content"].as_str().unwrap();
            let a = msgs[1]["content"].as_str().unwrap();
            let images: Vec<&str> = r["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(q.matches("<image>").count(), images.len(), "{q}");
            assert!(images.len() <= 1);
            for img in &images {
                let p = out.join(img);
                assert!(p.is_file(), "{}", p.display());
            }
            let task = task_of(q, !images.is_empty());
            assert!(task.labels().contains(&a), "{task:?}: {a:?} for {q:?}");
            per_task.entry(task).or_default().insert(a.to_string());
            *counts.entry(task).or_default() += 1;
        }
        for (task, n) in counts {
            assert_eq!(split.tasks[task.as_str()].records, n);
        }
    }
    // Every label of every task occurs.
    for task in DemoTask::ALL {
        assert_eq!(per_task[&task].len(), task.labels().len(), "{task:?}");
    }

    // The repo's sharegpt reader accepts them (images resolved against the file's folder).
    let convs = read_sharegpt(out.join("val.jsonl")).unwrap();
    assert_eq!(convs.len(), 200);
    for c in &convs {
        assert_eq!(c.num_image_parts(), c.images.len());
        assert!(c.images.iter().all(|p| p.is_file()));
    }

    // RL records match the sharegpt ones.
    for (rl, sft) in rl_train.iter().zip(&train).chain(rl_val.iter().zip(&val)) {
        assert_eq!(rl["problem"], sft["messages"][0]["content"]);
        assert_eq!(rl["answer"], sft["messages"][1]["content"]);
        assert_eq!(rl["images"], sft["images"]);
        let task = task_of(
            rl["problem"].as_str().unwrap(),
            !rl["images"].as_array().unwrap().is_empty(),
        );
        assert_eq!(rl["task"].as_str().unwrap(), task.rl_task());
        let p = rl["problem"].as_str().unwrap();
        assert_eq!(
            p.matches("<image>").count(),
            rl["images"].as_array().unwrap().len()
        );
    }

    // Bench records: the repo's reader accepts them; MCQ without inline options.
    let mut seen = HashMap::new();
    let (recs, skipped) = read_bench_file(&out.join("bench_val.jsonl"), false, &mut seen).unwrap();
    assert!(skipped.is_empty());
    assert_eq!(recs.len(), 200);
    for (b, sft) in recs.iter().zip(&val) {
        assert_eq!(
            b.benchmark,
            format!(
                "demo-{}",
                b.meta.as_ref().unwrap()["task"].as_str().unwrap()
            )
        );
        // The sharegpt prompt is MedEvalKit's direct prompt for the benchmark record.
        let q = sft["messages"][0]["content"]
            .as_str()
            .unwrap()
            .trim_start_matches("<image>");
        assert_eq!(
            q,
            infimed::eval::build_prompt(b, infimed::eval::Mode::Direct)
        );
        assert_eq!(b.answer, sft["messages"][1]["content"].as_str().unwrap());
        assert_eq!(serde_json::to_value(&b.images).unwrap(), sft["images"]);
        for img in &b.images {
            assert!(out.join(img).is_file());
        }
        let task = DemoTask::from_name(b.meta.as_ref().unwrap()["task"].as_str().unwrap()).unwrap();
        assert_eq!(b.answer_type, task.answer_type());
        assert!(
            !b.question.contains('\n') && !b.question.contains("<image>"),
            "{:?}",
            b.question
        );
        match b.answer_type {
            AnswerType::Mcq => {
                let opts = b.options.as_ref().unwrap();
                assert_eq!(
                    opts.keys().cloned().collect::<Vec<_>>(),
                    ["A", "B", "C", "D"]
                );
                assert!(opts.contains_key(&b.answer));
            }
            AnswerType::YesNo => assert!(b.answer == "yes" || b.answer == "no"),
            AnswerType::Closed => assert!(["0", "1", "2", "3"].contains(&b.answer.as_str())),
            AnswerType::Open => panic!("no open questions in the demo"),
        }
    }

    // Images: 56x56 grayscale.
    let first = train
        .iter()
        .find(|r| !r["images"].as_array().unwrap().is_empty())
        .unwrap();
    let img = image::open(out.join(first["images"][0].as_str().unwrap())).unwrap();
    assert_eq!((img.width(), img.height()), (56, 56));
    assert_eq!(img.color(), image::ColorType::L8);
}

#[test]
fn demo_tiny_model_dir_loads_and_tokenises_the_demo() {
    let dir = demo_model_dir();
    assert!(
        !dir.join("model.safetensors").exists(),
        "demo-tiny ships without weights"
    );

    // config.json
    let config = Qwen25VlConfig::from_dir(&dir).unwrap();
    config.validate().unwrap();
    let t = &config.text;
    assert_eq!(
        (
            t.hidden_size,
            t.num_hidden_layers,
            t.num_attention_heads,
            t.num_key_value_heads
        ),
        (128, 4, 4, 2)
    );
    assert_eq!(
        (
            t.head_dim,
            t.intermediate_size,
            t.vocab_size,
            t.tie_word_embeddings
        ),
        (32, 256, 640, true)
    );
    assert_eq!(t.mrope_section.iter().sum::<usize>() * 2, t.head_dim);
    let v = &config.vision;
    assert_eq!(
        (
            v.depth,
            v.hidden_size,
            v.num_heads,
            v.intermediate_size,
            v.out_hidden_size
        ),
        (2, 64, 4, 128, 128)
    );
    assert_eq!(
        (v.window_size, v.fullatt_block_indexes.clone()),
        (56, vec![1])
    );
    assert_eq!(config.tokens.image_token_id, Some(612));

    // Tokenizer, template, processor.
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let template = ChatTemplate::from_dir(&dir).unwrap();
    let processor = ImageProcessorConfig::from_dir(&dir).unwrap();
    assert_eq!((processor.min_pixels, processor.max_pixels), (3136, 3136));
    let raw = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert_eq!(raw.get_vocab_size(true), 614);

    let out = tempfile::tempdir().unwrap();
    write_demo_data(
        out.path(),
        &DemoDataConfig {
            seed: 5,
            train: 200,
            val: 50,
            image_size: 56,
            image_pool: None,
        },
    )
    .unwrap();
    let convs = read_sharegpt(out.path().join("train.jsonl")).unwrap();
    // Per task: raw question / answer token counts (tokenizers crate) and full SFT sequence lengths.
    let mut stats: BTreeMap<DemoTask, (usize, usize, usize, usize, usize)> = BTreeMap::new(); // n, q, a, seq, max seq
    for c in &convs {
        let q = c.messages[0].text_content();
        let a = c.messages[1].text_content();
        let task = task_of(&q, !c.images.is_empty());
        let q_ids = raw.encode(q.as_str(), false).unwrap().get_ids().len();
        let a_ids = raw.encode(a.as_str(), false).unwrap().get_ids().len();
        assert!(a_ids <= 2, "answer {a:?} takes {a_ids} tokens");
        let enc =
            encode_conversation(&tok, &template, &processor, c, TrainOn::AllAssistant).unwrap();
        assert_eq!(
            enc.input_ids.iter().filter(|&&i| i == 612).count(),
            4 * c.images.len()
        );
        assert_eq!(enc.image_grids, vec![[1, 4, 4]; c.images.len()]);
        // Labels: the answer tokens + <|im_end|> + "\n".
        assert_eq!(enc.num_label_tokens(), a_ids + 2, "{a:?}");
        let e = stats.entry(task).or_default();
        e.0 += 1;
        e.1 += q_ids;
        e.2 += a_ids;
        e.3 += enc.len();
        e.4 = e.4.max(enc.len());
    }
    eprintln!("task         n  question_tok  answer_tok  sft_seq_len(mean/max, incl. system prompt + 4 image tokens)");
    for (task, (n, q, a, s, m)) in &stats {
        let f = |x: usize| x as f64 / *n as f64;
        eprintln!(
            "{:<12} {n:>3}  {:>12.1}  {:>10.1}  {:>6.1} / {m}",
            task.as_str(),
            f(*q),
            f(*a),
            f(*s)
        );
        assert!(*m < 160, "{task:?}: sequences up to {m} tokens");
    }

    // A randomly initialised model runs the demo inputs (ndarray, f32).
    type B = NdArray<f32>;
    let device = Default::default();
    let model = Qwen25VL::<B>::init(&config, &device);
    let c = convs.iter().find(|c| !c.images.is_empty()).unwrap();
    let enc = encode_conversation(&tok, &template, &processor, c, TrainOn::AllAssistant).unwrap();
    let input = ModelInput {
        input_ids: vec![enc.input_ids.clone()],
        attention_mask: None,
        pixel_values: enc.pixel_values.clone(),
        image_grids: enc.image_grids.clone(),
        segments: None,
    };
    let logits = model.forward(&input).unwrap();
    assert_eq!(logits.dims(), [1, enc.len(), 640]);
    let values: Vec<f32> = logits.into_data().to_vec().unwrap();
    assert!(values.iter().all(|x| x.is_finite()));
}
