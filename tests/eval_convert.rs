//! One test per benchmark reader, on the small samples in tests/fixtures/eval/<bench>/ (made-up
//! content in the public layouts).

use std::path::{Path, PathBuf};

use infimed::eval::convert::{convert, BenchFormat, ConvertOptions};
use infimed::eval::{AnswerType, BenchRecord};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/eval")
        .join(p)
}

fn run(format: BenchFormat, input: &str, opts: ConvertOptions) -> Vec<BenchRecord> {
    let c = convert(format, &fixture(input), &opts).unwrap();
    assert!(c.skipped.is_empty(), "{:?}", c.skipped);
    for r in &c.records {
        assert_eq!(r.benchmark, format.benchmark());
        assert!(r.id.starts_with(&format!("{}/", format.key())), "{}", r.id);
        for img in &r.images {
            assert!(Path::new(img).is_absolute(), "{img}");
        }
        // records round-trip through the JSONL reader
        let v = serde_json::to_value(r).unwrap();
        assert_eq!(&BenchRecord::from_value(&v).unwrap(), r);
    }
    c.records
}

fn types(rs: &[BenchRecord]) -> Vec<AnswerType> {
    rs.iter().map(|r| r.answer_type).collect()
}

#[test]
fn slake_both_languages_unless_lang() {
    // MedEvalKit scores all SLAKE test questions, English and Chinese: so does the default
    let all = run(BenchFormat::Slake, "slake", ConvertOptions::default());
    assert_eq!(all.len(), 4);
    assert_eq!(all[2].lang.as_deref(), Some("zh"));
    assert_eq!(all[2].answer, "肺");
    let rs = run(
        BenchFormat::Slake,
        "slake/test.json",
        ConvertOptions {
            lang: Some("en".into()),
            ..Default::default()
        },
    );
    assert_eq!(rs.len(), 3);
    assert_eq!(
        types(&rs),
        vec![AnswerType::Open, AnswerType::Closed, AnswerType::Closed]
    );
    assert_eq!(rs[0].id, "slake/11934");
    assert_eq!(rs[0].answer, "Lung");
    // closed yes/no answers are kept as written (MedEvalKit's scoring depends on the case)
    assert_eq!(rs[1].answer, "No");
    assert!(rs[0].images[0].ends_with("slake/imgs/xmlab102/source.jpg"));
    assert_eq!(rs[0].lang, None);
    let zh = run(
        BenchFormat::Slake,
        "slake",
        ConvertOptions {
            lang: Some("zh".into()),
            ..Default::default()
        },
    );
    assert_eq!(zh, vec![all[2].clone()]);
}

#[test]
fn vqa_rad_osf_test_split_and_hf_rows() {
    let rs = run(BenchFormat::VqaRad, "vqa-rad", ConvertOptions::default());
    let ids: Vec<&str> = rs.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, vec!["vqa-rad/1", "vqa-rad/2", "vqa-rad/4"]);
    // yes/no -> yes_no (answer lowercased); everything else open, even OSF "CLOSED" ones
    assert_eq!(
        types(&rs),
        vec![AnswerType::YesNo, AnswerType::Open, AnswerType::Open]
    );
    assert_eq!(rs[0].answer, "no");
    assert_eq!(rs[1].answer, "2");
    assert!(rs[0].images[0].ends_with("VQA_RAD Image Folder/synpic29265.jpg"));
    let all = run(
        BenchFormat::VqaRad,
        "vqa-rad",
        ConvertOptions {
            split: Some("all".into()),
            ..Default::default()
        },
    );
    assert_eq!(all.len(), 5);
    let rows = run(
        BenchFormat::VqaRad,
        "vqa-rad/hf_rows.jsonl",
        ConvertOptions::default(),
    );
    assert_eq!(types(&rows), vec![AnswerType::YesNo, AnswerType::Open]);
    assert!(rows[0].images[0].ends_with("vqa-rad/images/test_0.jpg"));
    assert!(rows[1].images[0].ends_with("vqa-rad/images/test_1.jpg"));
}

#[test]
fn pathvqa_pickle_and_hf_rows() {
    let rs = run(
        BenchFormat::PathVqa,
        "pathvqa/pvqa",
        ConvertOptions::default(),
    );
    assert_eq!(
        types(&rs),
        vec![AnswerType::YesNo, AnswerType::Open, AnswerType::YesNo]
    );
    assert_eq!(rs[1].answer, "caseous necrosis");
    assert!(
        rs[2].images[0].ends_with("pvqa/images/test/test_0001.jpg"),
        "{}",
        rs[2].images[0]
    );
    let same = run(
        BenchFormat::PathVqa,
        "pathvqa/pvqa/qas/test/test_qa.pkl",
        ConvertOptions::default(),
    );
    assert_eq!(same, rs);
    let rows = run(
        BenchFormat::PathVqa,
        "pathvqa/hf_rows.json",
        ConvertOptions::default(),
    );
    assert_eq!(types(&rows), vec![AnswerType::Open, AnswerType::YesNo]);
    assert_eq!(rows[1].answer, "no");
}

#[test]
fn pmc_vqa_csv() {
    let rs = run(BenchFormat::PmcVqa, "pmc-vqa", ConvertOptions::default());
    assert_eq!(rs.len(), 3);
    let r = &rs[0];
    assert_eq!(r.id, "pmc-vqa/0");
    assert_eq!(r.question, "What imaging modality is shown?");
    let opts = r.options.as_ref().unwrap();
    assert_eq!(
        opts.values().cloned().collect::<Vec<_>>(),
        vec!["CT", "MRI", "X-ray", "Ultrasound"]
    );
    assert_eq!(r.answer, "A");
    assert!(r.images[0].ends_with("pmc-vqa/images/PMC8253867_Fig2_41.jpg"));
    // answer given as option text
    assert_eq!(rs[1].answer, "C");
    assert_eq!(rs[2].answer, "B");
    assert_eq!(rs[2].options.as_ref().unwrap()["B"], "H&E");
    // the cells as published, for MedEvalKit's prompt and judge
    assert_eq!(
        r.meta.as_ref().unwrap()["choices"],
        serde_json::json!([" A:CT ", " B:MRI ", " C:X-ray ", " D:Ultrasound "])
    );
    assert_eq!(
        r.meta_str("question"),
        Some("What imaging modality is shown? ")
    );
}

#[test]
fn omnimedvqa_open_access_jsons() {
    let rs = run(
        BenchFormat::OmniMedVqa,
        "omnimedvqa",
        ConvertOptions::default(),
    );
    let ids: Vec<&str> = rs.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        ids,
        vec![
            "omnimedvqa/Chest CT Scan_0000",
            "omnimedvqa/Chest CT Scan_0001",
            "omnimedvqa/Fundus_0000"
        ]
    );
    let answers: Vec<&str> = rs.iter().map(|r| r.answer.as_str()).collect();
    assert_eq!(answers, vec!["B", "B", "C"]); // the second matches "Adenocarcinoma" case-insensitively
                                              // MedEvalKit keeps a gold that is not exactly an option as text: the published one is kept
    assert_eq!(rs[1].meta_str("gt_answer"), Some("adenocarcinoma"));
    assert_eq!(rs[1].options.as_ref().unwrap().len(), 3);
    assert!(
        rs[0].images[0].ends_with("omnimedvqa/Images/Chest CT Scan/test/0001.png"),
        "{}",
        rs[0].images[0]
    );
    let one = run(
        BenchFormat::OmniMedVqa,
        "omnimedvqa/QA_information/Open-access/Fundus.json",
        ConvertOptions::default(),
    );
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].images, rs[2].images);
}

#[test]
fn medxpertqa_mm_jsonl() {
    let rs = run(
        BenchFormat::MedXpertQa,
        "medxpertqa",
        ConvertOptions::default(),
    );
    assert_eq!(rs.len(), 2);
    assert_eq!(rs[0].id, "medxpertqa/MM-0");
    assert_eq!(rs[0].answer, "B");
    assert_eq!(rs[0].options.as_ref().unwrap().len(), 5);
    assert_eq!(rs[0].images.len(), 2);
    assert!(
        rs[0].images[1].ends_with("medxpertqa/images/MM-0-b.jpeg"),
        "{}",
        rs[0].images[1]
    );
    assert!(rs[0].question.contains("Answer Choices:"));
    assert_eq!(rs[0].meta_str("medical_task"), Some("Diagnosis"));
}

/// The authors' eval input (`eval/data/medxpertqa/input/medxpertqa_mm_input.jsonl`): options as
/// `[{letter, content}]`, label `["B"]`, images `[{image_path}]`, converted to the same records as
/// the Hugging Face layout.
#[test]
fn medxpertqa_official_eval_input() {
    let hf = run(
        BenchFormat::MedXpertQa,
        "medxpertqa",
        ConvertOptions::default(),
    );
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input");
    std::fs::create_dir_all(&input).unwrap();
    let mut text = String::new();
    for line in std::fs::read_to_string(fixture("medxpertqa/MM/test.jsonl"))
        .unwrap()
        .lines()
    {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        let opts: Vec<serde_json::Value> = v["options"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, c)| serde_json::json!({"letter": k, "content": c}))
            .collect();
        v["options"] = opts.into();
        v["label"] = serde_json::json!([v["label"]]);
        let imgs: Vec<serde_json::Value> = v["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| serde_json::json!({"image_path": p}))
            .collect();
        v["images"] = imgs.into();
        text += &format!("{v}\n");
    }
    std::fs::write(input.join("medxpertqa_mm_input.jsonl"), &text).unwrap();
    // the images folder of the dataset, as for the Hugging Face layout
    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let official = convert(BenchFormat::MedXpertQa, &input, &ConvertOptions::default())
        .unwrap()
        .records;
    assert_eq!(official.len(), hf.len());
    for (o, h) in official.iter().zip(&hf) {
        assert_eq!(
            (&o.id, &o.answer, &o.options, &o.meta),
            (&h.id, &h.answer, &h.options, &h.meta)
        );
        let names = |r: &BenchRecord| -> Vec<String> {
            r.images
                .iter()
                .map(|p| {
                    Path::new(p)
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect()
        };
        assert_eq!(names(o), names(h));
        assert!(o
            .images
            .iter()
            .all(|p| p.starts_with(&*images.canonicalize().unwrap().to_string_lossy())));
    }
    // a label list of two letters is an error naming the line
    std::fs::write(
        input.join("medxpertqa_mm_input.jsonl"),
        text.replacen("\"label\":[\"B\"]", "\"label\":[\"B\",\"C\"]", 1),
    )
    .unwrap();
    let e = convert(BenchFormat::MedXpertQa, &input, &ConvertOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("medxpertqa_mm_input.jsonl:1") && e.contains("label"),
        "{e}"
    );
}

#[test]
fn mmmu_health_and_medicine_rows() {
    let c = convert(
        BenchFormat::Mmmu,
        &fixture("mmmu"),
        &ConvertOptions::default(),
    )
    .unwrap();
    assert_eq!(c.filtered, 1); // validation_Art_1
    let rs = run(BenchFormat::Mmmu, "mmmu", ConvertOptions::default());
    assert_eq!(types(&rs), vec![AnswerType::Mcq, AnswerType::Closed]);
    let o = rs[0].options.as_ref().unwrap();
    assert_eq!(o["B"], "Crohn's disease");
    assert_eq!(rs[0].answer, "B");
    assert_eq!(rs[0].images.len(), 1);
    assert_eq!(rs[1].images.len(), 2);
    assert_eq!(rs[1].answer, "3");
    assert_eq!(rs[0].meta.as_ref().unwrap()["subject"], "Clinical_Medicine");
}

#[test]
fn invalid_records_error_or_skip() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("Bad.json");
    std::fs::write(
        &f,
        r#"[{"question_id": "x1", "question": "q", "gt_answer": "Z", "option_A": "a", "option_B": "b", "image_path": "i.png"},
            {"question_id": "x2", "question": "q", "gt_answer": "b", "option_A": "a", "option_B": "b", "image_path": "i.png"}]"#,
    )
    .unwrap();
    let e = convert(BenchFormat::OmniMedVqa, &f, &ConvertOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Bad.json[0]") && e.contains("matches 0 of the options"),
        "{e}"
    );
    let c = convert(
        BenchFormat::OmniMedVqa,
        &f,
        &ConvertOptions {
            skip_invalid: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((c.records.len(), c.skipped.len()), (1, 1));
}

#[test]
fn bench_convert_cli_writes_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("slake.jsonl");
    let convert = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_infimed"))
            .args([
                "bench-convert",
                "--format",
                "slake",
                "--input",
                fixture("slake").to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    // both languages by default
    let o = convert(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout)
        .contains("SLAKE: 4 records (closed 2, open 2); 0 filtered out"));
    let o = convert(&["--lang", "en"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout)
        .contains("SLAKE: 3 records (closed 2, open 1); 1 filtered out"));
    let (rs, _) = infimed::eval::read_bench_files(std::slice::from_ref(&out), false).unwrap();
    assert_eq!(rs.len(), 3);
    let o = convert(&["--lang", "fr"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--lang must be en or zh"));
}

#[test]
fn mmmu_parquet_as_published_with_embedded_images() {
    let media = tempfile::tempdir().unwrap();
    let opts = ConvertOptions {
        media_dir: Some(media.path().to_path_buf()),
        ..Default::default()
    };
    let c = convert(BenchFormat::Mmmu, &fixture("mmmu_parquet"), &opts).unwrap();
    assert_eq!(c.filtered, 1); // validation_Art_1
    let rs = run(BenchFormat::Mmmu, "mmmu_parquet", opts);
    assert_eq!(types(&rs), vec![AnswerType::Mcq, AnswerType::Closed]);
    assert_eq!(rs[0].id, "mmmu/validation_Clinical_Medicine_1");
    assert_eq!(rs[0].options.as_ref().unwrap()["B"], "Crohn's disease");
    assert_eq!((rs[0].images.len(), rs[1].images.len()), (1, 2));
    // The embedded PNGs are written out and decode; the extension comes from the stored path
    // (x.jpeg), else from the bytes (png).
    for img in rs.iter().flat_map(|r| &r.images) {
        assert!(img.starts_with(media.path().to_str().unwrap()), "{img}");
        let bytes = std::fs::read(img).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{img}");
    }
    assert!(
        rs[1].images[0].ends_with(".png") && rs[1].images[1].ends_with(".jpeg"),
        "{:?}",
        rs[1].images
    );
}

#[test]
fn vqa_rad_hugging_face_parquet() {
    let media = tempfile::tempdir().unwrap();
    let opts = ConvertOptions {
        media_dir: Some(media.path().to_path_buf()),
        ..Default::default()
    };
    let rs = run(
        BenchFormat::VqaRad,
        "vqa-rad/hf/test-00000-of-00001.parquet",
        opts,
    );
    assert_eq!(types(&rs), vec![AnswerType::YesNo, AnswerType::Open]);
    assert_eq!(rs[1].answer, "left lung");
    assert!(std::path::Path::new(&rs[0].images[0]).exists());
    // Without a folder for the embedded images: a clear error naming the file and row.
    let e = convert(
        BenchFormat::VqaRad,
        &fixture("vqa-rad/hf/test-00000-of-00001.parquet"),
        &ConvertOptions::default(),
    )
    .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("test-00000-of-00001.parquet row 1") && e.contains("--media-dir"),
        "{e}"
    );
}

#[test]
fn corrupt_parquet_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("validation-00000-of-00001.parquet");
    std::fs::write(&f, b"PAR1 not really").unwrap();
    let e = format!(
        "{:#}",
        convert(BenchFormat::Mmmu, &f, &ConvertOptions::default()).unwrap_err()
    );
    assert!(
        e.contains("validation-00000-of-00001.parquet") && e.contains("parquet"),
        "{e}"
    );
}
