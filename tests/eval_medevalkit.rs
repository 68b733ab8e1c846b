//! `infimed eval --rules medevalkit` against MedEvalKit's own code, and the LLM judge against a
//! stand-in server on 127.0.0.1.
//!
//! tests/fixtures/medevalkit (see its README): made-up records of the seven benchmarks in their
//! published layouts (`raw/`), one reply per record (`responses.jsonl`, many reply forms per
//! benchmark) and what MedEvalKit's code makes of them (`reference.jsonl`, `reference_metrics.json`,
//! `judge_prompts.jsonl`, written by `make_reference.py` from a MedEvalKit checkout at commit
//! 9b12e3b3). The records go through `infimed bench-convert`, as a user's would.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/medevalkit")
        .join(p)
}

fn infimed(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_infimed"))
        .args(args)
        .env("INFIMED_LOG", "warn")
        .output()
        .expect("run infimed")
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn json_file(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The seven benchmarks converted by `infimed bench-convert` into `dir`; the bench files.
fn convert_all(dir: &Path) -> Vec<PathBuf> {
    let inputs = [
        ("vqa-rad", "raw/VQA_RAD/rows.jsonl"),
        ("pathvqa", "raw/PATH_VQA/rows.json"),
        ("slake", "raw/SLAKE"),
        ("pmc-vqa", "raw/PMC_VQA/test_2.csv"),
        ("omnimedvqa", "raw/OmniMedVQA"),
        ("medxpertqa", "raw/MedXpertQA/medxpertqa_mm_input.jsonl"),
        ("mmmu", "raw/MMMU"),
    ];
    inputs
        .iter()
        .map(|(format, input)| {
            let out = dir.join(format!("{format}.jsonl"));
            ok(&infimed(&[
                "bench-convert",
                "--format",
                format,
                "--input",
                s(&fixture(input)),
                "--out",
                s(&out),
            ]));
            out
        })
        .collect()
}

fn eval_args(benches: &[PathBuf], out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec!["eval".into(), "--responses".into()];
    a.push(s(&fixture("responses.jsonl")).to_string());
    for b in benches {
        a.extend(["--bench".to_string(), s(b).to_string()]);
    }
    a.extend(["--out".to_string(), s(out).to_string()]);
    a.extend(extra.iter().map(|e| e.to_string()));
    a
}

fn eval(benches: &[PathBuf], out: &Path, extra: &[&str]) -> Output {
    let args = eval_args(benches, out, extra);
    infimed(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The reference: id -> (correct, random_guess, crash).
fn reference() -> BTreeMap<String, (bool, bool, Option<String>)> {
    jsonl(&fixture("reference.jsonl"))
        .into_iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                (
                    r["correct"].as_bool().unwrap(),
                    r["random_guess"].as_bool().unwrap(),
                    r["crash"].as_str().map(str::to_string),
                ),
            )
        })
        .collect()
}

/// The benchmark files without the records on which MedEvalKit raises (its own runs leave them
/// out, see make_reference.py), for comparing whole-benchmark metrics.
fn without_crashes(benches: &[PathBuf], dir: &Path) -> Vec<PathBuf> {
    let crashed: HashSet<String> = reference()
        .into_iter()
        .filter(|(_, v)| v.2.is_some())
        .map(|(k, _)| k)
        .collect();
    benches
        .iter()
        .map(|b| {
            let out = dir.join(b.file_name().unwrap());
            let text: String = std::fs::read_to_string(b)
                .unwrap()
                .lines()
                .filter(|l| {
                    let v: Value = serde_json::from_str(l).unwrap();
                    !crashed.contains(v["id"].as_str().unwrap())
                })
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(&out, text).unwrap();
            out
        })
        .collect()
}

#[test]
fn every_reply_scored_as_medevalkit_scores_it() {
    let dir = tempfile::tempdir().unwrap();
    let benches = convert_all(dir.path());
    let out = dir.path().join("report");
    ok(&eval(&benches, &out, &["--rules", "medevalkit"]));
    let reference = reference();
    let results = jsonl(&out.join("results.jsonl"));
    assert_eq!(results.len(), reference.len());
    let mut per_bench: BTreeMap<String, [usize; 4]> = BTreeMap::new();
    let mut disagree = Vec::new();
    for r in &results {
        let id = r["id"].as_str().unwrap();
        let ours = (
            r["correct"].as_bool().unwrap(),
            r.get("random_guess").is_some_and(|v| v == true),
            r.get("crash").and_then(Value::as_str).map(str::to_string),
        );
        let theirs = reference
            .get(id)
            .unwrap_or_else(|| panic!("{id} not in the reference"));
        let e = per_bench
            .entry(r["benchmark"].as_str().unwrap().to_string())
            .or_default();
        e[0] += 1;
        if &ours == theirs {
            e[1] += 1;
        } else {
            disagree.push(format!(
                "{id}: ours {ours:?}, MedEvalKit {theirs:?}, reply {:?}",
                r["response"]
            ));
        }
        e[2] += usize::from(ours.1);
        e[3] += usize::from(ours.2.is_some());
    }
    for (b, [n, agree, guesses, crashes]) in &per_bench {
        println!("{b}: {n} replies, {agree} agree, {guesses} random guesses, {crashes} crashes");
    }
    let n: usize = per_bench.values().map(|v| v[0]).sum();
    let guesses: usize = per_bench.values().map(|v| v[2]).sum();
    let crashes: usize = per_bench.values().map(|v| v[3]).sum();
    println!(
        "all: {n} replies, {} agree, {guesses} random guesses, {crashes} crashes",
        n - disagree.len()
    );
    assert!(
        disagree.is_empty(),
        "{} disagree:\n{}",
        disagree.len(),
        disagree.join("\n")
    );
    assert_eq!(per_bench.len(), 7);
    // random guesses are counted with their expected credit, crashes are counted
    let summary = json_file(&out.join("summary.json"));
    let mmmu = &summary["benchmarks"]["MMMU-H&M"];
    assert_eq!(mmmu["random_guesses"], per_bench["MMMU-H&M"][2]);
    assert!(mmmu["random_expected_credit"].as_f64().unwrap() > 0.0);
    assert_eq!(
        summary["medevalkit_commit"],
        "9b12e3b34232a8779cc1275417bf4f72f03d28e0"
    );
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(md.contains("where MedEvalKit guesses at random"), "{md}");
    assert!(md.contains("on which MedEvalKit raises"), "{md}");
}

/// Compare MedEvalKit's metrics (Python) with ours, BLEU / ROUGE aside (not computed).
fn same_metrics(path: &str, theirs: &Value, ours: &Value) {
    match (theirs, ours) {
        (Value::Object(t), Value::Object(o)) => {
            let tk: HashSet<&String> = t
                .keys()
                .filter(|k| !k.starts_with("bleu") && !k.starts_with("rouge"))
                .collect();
            let ok: HashSet<&String> = o.keys().collect();
            assert_eq!(tk, ok, "{path}: keys");
            for k in tk {
                same_metrics(&format!("{path}.{k}"), &t[k], &o[k]);
            }
        }
        (Value::Number(t), Value::Number(o)) => {
            let (t, o) = (t.as_f64().unwrap(), o.as_f64().unwrap());
            assert!(
                (t - o).abs() <= 1e-12 * t.abs().max(1.0),
                "{path}: MedEvalKit {t}, ours {o}"
            );
        }
        _ => assert_eq!(theirs, ours, "{path}"),
    }
}

#[test]
fn metrics_in_medevalkit_layout_match_its_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let benches = without_crashes(&convert_all(dir.path()), dir.path());
    let out = dir.path().join("report");
    ok(&eval(&benches, &out, &["--rules", "medevalkit"]));
    let reference = json_file(&fixture("reference_metrics.json"));
    let ours = json_file(&out.join("medevalkit.json"));
    same_metrics("rules", &reference["rules"], &ours);
    // the per-language breakdown of SLAKE (en + zh by default)
    let summary = json_file(&out.join("summary.json"));
    let langs = &summary["benchmarks"]["SLAKE"]["breakdown"]["lang"];
    assert!(langs["en"]["n"].as_u64().unwrap() > 0 && langs["zh"]["n"].as_u64().unwrap() > 0);
    // --lang en restricts the scoring; the zh records' responses are not "unmatched" (the
    // responses of the records left out above are)
    let out_en = dir.path().join("report-en");
    ok(&eval(
        &benches,
        &out_en,
        &["--rules", "medevalkit", "--lang", "en"],
    ));
    let en = json_file(&out_en.join("summary.json"));
    assert_eq!(en["benchmarks"]["SLAKE"]["n"], langs["en"]["n"]);
    assert_eq!(en["unmatched_responses"], summary["unmatched_responses"]);
}

// ------------------------------------------------------------------------------------------
// The judge's stand-in: an OpenAI-compatible chat-completions server on 127.0.0.1

fn judge_reply(prompt: &str) -> &'static str {
    [
        "<think>ok</think>\n<judge>0</judge>",
        "<judge>1</judge>",
        "0",
        "I cannot tell.",
    ][prompt.chars().count() % 4]
}

#[derive(Clone, Default)]
struct StandIn {
    prompts: Arc<Mutex<Vec<String>>>,
    bodies: Arc<Mutex<Vec<Value>>>,
    auth: Arc<Mutex<HashSet<String>>>,
    /// Requests to answer with HTTP 503 first (retries).
    fail_first: Arc<AtomicUsize>,
}

impl StandIn {
    /// Start serving on 127.0.0.1; the base URL.
    fn start(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let me = self.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let me = me.clone();
                std::thread::spawn(move || me.serve(stream));
            }
        });
        format!("http://{addr}/v1")
    }

    /// HTTP/1.1 with keep-alive: requests until the client closes.
    fn serve(&self, stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut stream = stream;
        loop {
            let mut start = String::new();
            if reader.read_line(&mut start).unwrap_or(0) == 0 {
                return;
            }
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap();
                match k.to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().unwrap(),
                    "authorization" => {
                        self.auth.lock().unwrap().insert(v.trim().to_string());
                    }
                    _ => {}
                }
            }
            let mut body = vec![0u8; len];
            reader.read_exact(&mut body).unwrap();
            assert!(start.starts_with("POST /v1/chat/completions "), "{start}");
            let v: Value = serde_json::from_slice(&body).unwrap();
            let failing = self
                .fail_first
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let (status, reply) = if failing {
                ("503 Service Unavailable", json!({"error": "busy"}))
            } else {
                let prompt = v["messages"][0]["content"].as_str().unwrap().to_string();
                let content = judge_reply(&prompt);
                self.prompts.lock().unwrap().push(prompt);
                self.bodies.lock().unwrap().push(v);
                (
                    "200 OK",
                    json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}),
                )
            };
            let text = reply.to_string();
            write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            )
            .unwrap();
            stream.flush().unwrap();
        }
    }
}

#[test]
fn judge_receives_medevalkits_prompts_and_its_verdicts_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let benches = without_crashes(&convert_all(dir.path()), dir.path());
    let server = StandIn::default();
    server.fail_first.store(2, Ordering::SeqCst);
    let url = server.start();
    let out = dir.path().join("report");
    let judge = [
        "--rules",
        "medevalkit",
        "--judge",
        &url,
        "--judge-model",
        "stand-in-judge",
        "--judge-key-env",
        "INFIMED_TEST_JUDGE_KEY",
        "--judge-concurrency",
        "4",
    ];
    let run = |out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_infimed"))
            .args(eval_args(&benches, out, &judge))
            .env("INFIMED_LOG", "warn")
            .env("INFIMED_TEST_JUDGE_KEY", "sk-test")
            .output()
            .unwrap()
    };
    ok(&run(&out));

    // the prompts, character for character, as MedEvalKit builds them (each distinct one once)
    let expected: Vec<Value> = jsonl(&fixture("judge_prompts.jsonl"));
    let mut want: Vec<String> = expected
        .iter()
        .map(|p| p["prompt"].as_str().unwrap().to_string())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let mut got = server.prompts.lock().unwrap().clone();
    want.sort();
    got.sort();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "the judge prompts differ from MedEvalKit's");
    let body = &server.bodies.lock().unwrap()[0];
    assert_eq!(body["model"], "stand-in-judge");
    assert_eq!(body["temperature"], 0);
    assert_eq!(body["max_tokens"], 4096);
    assert_eq!(
        *server.auth.lock().unwrap(),
        HashSet::from(["Bearer sk-test".to_string()])
    );

    // the verdicts applied with MedEvalKit's arithmetic (PathVQA's reset, SLAKE's double count)
    let reference = json_file(&fixture("reference_metrics.json"));
    let ours = json_file(&out.join("medevalkit_judged.json"));
    for name in ["VQA_RAD", "SLAKE", "PATH_VQA"] {
        same_metrics(name, &reference["judged"][name], &ours[name]);
    }
    // rule-based and judged accuracy side by side
    let summary = json_file(&out.join("summary.json"));
    let slake = &summary["benchmarks"]["SLAKE"];
    let judged = reference["judged"]["SLAKE"]["total metrics"]["acc"]
        .as_f64()
        .unwrap();
    assert!((slake["judged_accuracy"].as_f64().unwrap() - 100.0 * judged).abs() < 1e-9);
    let rules = reference["rules"]["SLAKE"]["total metrics"]["acc"]
        .as_f64()
        .unwrap();
    assert!((slake["accuracy"].as_f64().unwrap() - 100.0 * rules).abs() < 1e-9);
    assert_eq!(summary["judge_model"], "stand-in-judge");
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        md.lines()
            .nth(3)
            .unwrap()
            .contains("(judge stand-in-judge)"),
        "{md}"
    );
    // per record: the verdict of each judged record
    let verdicts: HashMap<String, bool> = expected
        .iter()
        .map(|p| {
            let r = judge_reply(p["prompt"].as_str().unwrap());
            (
                p["id"].as_str().unwrap().to_string(),
                r.contains("<judge>0") || r == "0",
            )
        })
        .collect();
    for r in jsonl(&out.join("results.jsonl")) {
        let id = r["id"].as_str().unwrap();
        assert_eq!(
            r.get("judge").and_then(Value::as_bool),
            verdicts.get(id).copied(),
            "{id}"
        );
    }

    // a second run with the same output folder asks nothing: the cache answers
    let asked = server.prompts.lock().unwrap().len();
    ok(&run(&out));
    assert_eq!(server.prompts.lock().unwrap().len(), asked);
    assert_eq!(json_file(&out.join("medevalkit_judged.json")), ours);
}

#[test]
fn judge_under_infimed_rules_and_unreachable_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let benches = convert_all(dir.path());
    let server = StandIn::default();
    let url = server.start();
    let out = dir.path().join("report");
    ok(&eval(
        &benches,
        &out,
        &["--judge", &url, "--judge-model", "j"],
    ));
    let summary = json_file(&out.join("summary.json"));
    assert_eq!(summary["rules"], "infimed");
    let vr = &summary["benchmarks"]["VQA-RAD"];
    let results = jsonl(&out.join("results.jsonl"));
    let judged: Vec<&Value> = results
        .iter()
        .filter(|r| r.get("judge").is_some())
        .collect();
    // free-text answers only (no mcq, no yes/no gold), each with the committed text
    assert!(!judged.is_empty());
    for r in &judged {
        assert!(
            ["open", "closed"].contains(&r["answer_type"].as_str().unwrap()),
            "{r}"
        );
    }
    let vr_records: Vec<&Value> = results
        .iter()
        .filter(|r| r["benchmark"] == "VQA-RAD")
        .collect();
    let judged_ok = vr_records
        .iter()
        .filter(|r| r.get("judge").map_or(r["correct"] == true, |j| j == true))
        .count();
    let expect = 100.0 * judged_ok as f64 / vr_records.len() as f64;
    assert!(
        (vr["judged_accuracy"].as_f64().unwrap() - expect).abs() < 1e-9,
        "{vr}"
    );
    assert!(server.prompts.lock().unwrap().len() <= judged.len());

    // nothing listens: a clear error naming the URL, no panic
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("http://127.0.0.1:{port}/v1");
    let o = eval(
        &benches,
        &dir.path().join("dead"),
        &[
            "--judge",
            &dead,
            "--judge-model",
            "j",
            "--judge-retries",
            "1",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(&format!(
            "judge endpoint {dead}/chat/completions unreachable"
        )),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // a missing key variable is named
    let o = eval(
        &benches,
        &dir.path().join("nokey"),
        &[
            "--judge",
            &url,
            "--judge-model",
            "j",
            "--judge-key-env",
            "INFIMED_NO_SUCH_VAR_31",
        ],
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("INFIMED_NO_SUCH_VAR_31"));
}
