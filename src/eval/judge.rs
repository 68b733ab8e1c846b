//! The LLM judge of `infimed eval --judge URL --judge-model NAME [--judge-key-env VAR]`: any
//! OpenAI-compatible chat-completions endpoint (a local vLLM / ollama / llama.cpp server or a
//! hosted API) is asked MedEvalKit's judge prompt
//! ([`super::medevalkit::compare_prompt`], verbatim) as one user message, with MedEvalKit's
//! settings (`temperature` 0, `max_tokens` 4096, `n` 1); the verdict is MedEvalKit's
//! ([`super::medevalkit::judge_verdict`]).
//!
//! * `URL` is the API base (`http://localhost:8000/v1`; `/chat/completions` is appended) or the
//!   full `.../chat/completions` address.
//! * At most `concurrency` requests are in flight; a request that fails to connect, times out or
//!   gets HTTP 429 / 5xx is retried `retries` times, waiting `backoff`, then twice that, ...;
//!   any other HTTP status, or retries used up, stops the run with an error naming the URL.
//! * Replies are cached in `cache` (JSONL `{"model", "prompt", "reply"}`, one line written as each
//!   reply arrives): a re-run with the same output folder asks nothing it already has, and a run
//!   stopped half-way resumes where it stopped.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// How to reach the judge.
#[derive(Debug, Clone)]
pub struct JudgeConfig {
    /// As given by the user (see [`endpoint`]).
    pub url: String,
    pub model: String,
    /// Sent as `Authorization: Bearer ...` when present.
    pub api_key: Option<String>,
    /// Requests in flight at most (at least 1).
    pub concurrency: usize,
    /// Retries of a failed request.
    pub retries: u32,
    /// The first wait before a retry (doubled each time).
    pub backoff: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
    /// The reply cache (JSONL).
    pub cache: PathBuf,
}

/// What a run of the judge did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JudgeStats {
    /// Distinct prompts sent to the endpoint.
    pub asked: usize,
    /// Distinct prompts answered from the cache.
    pub cached: usize,
}

/// The chat-completions address of a user's judge URL.
pub fn endpoint(url: &str) -> String {
    let u = url.trim_end_matches('/');
    if u.ends_with("/chat/completions") {
        u.to_string()
    } else {
        format!("{u}/chat/completions")
    }
}

type Cache = HashMap<(String, String), String>;

fn load_cache(cfg: &JudgeConfig) -> Result<Cache> {
    let mut cache = Cache::new();
    let file = match File::open(&cfg.cache) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(cache),
        Err(e) => return Err(e).with_context(|| format!("opening {}", cfg.cache.display())),
    };
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let loc = format!("{}:{}", cfg.cache.display(), i + 1);
        let line = line.with_context(|| format!("{loc}: reading"))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line)
            .map_err(|e| anyhow!("{loc}: malformed judge cache line: {e}"))?;
        let field = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| anyhow!("{loc}: judge cache line without string `{k}`"))
        };
        cache.insert((field("model")?, field("prompt")?), field("reply")?);
    }
    Ok(cache)
}

/// Whether a failed request is worth retrying, and its message.
enum Failure {
    Retry(String),
    Fatal(String),
}

/// One chat-completions request: the reply's `choices[0].message.content` (`""` when null).
fn ask(agent: &ureq::Agent, cfg: &JudgeConfig, url: &str, prompt: &str) -> Result<String, Failure> {
    let body = json!({
        "model": cfg.model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": 4096,
        "n": 1,
    });
    let mut req = agent.post(url).set("Content-Type", "application/json");
    if let Some(k) = &cfg.api_key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let text = match req.send_string(&body.to_string()) {
        Ok(resp) => resp
            .into_string()
            .map_err(|e| Failure::Retry(format!("reading the reply: {e}")))?,
        Err(ureq::Error::Status(code, resp)) => {
            let body: String = resp
                .into_string()
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect();
            let msg = format!("HTTP {code}: {body}");
            return Err(if code == 429 || code >= 500 {
                Failure::Retry(msg)
            } else {
                Failure::Fatal(msg)
            });
        }
        Err(ureq::Error::Transport(t)) => return Err(Failure::Retry(format!("unreachable: {t}"))),
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        Failure::Fatal(format!(
            "answered something that is not JSON ({e}): {:.300}",
            text
        ))
    })?;
    match v.pointer("/choices/0/message/content") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Null) => Ok(String::new()),
        _ => Err(Failure::Fatal(format!(
            "answered without choices[0].message.content: {:.300}",
            text
        ))),
    }
}

/// [`ask`] with the retries and backoff of `cfg`; the error names the endpoint.
fn ask_with_retries(
    agent: &ureq::Agent,
    cfg: &JudgeConfig,
    url: &str,
    prompt: &str,
    stop: &AtomicBool,
) -> Result<String> {
    let mut wait = cfg.backoff;
    for attempt in 0..=cfg.retries {
        match ask(agent, cfg, url, prompt) {
            Ok(r) => return Ok(r),
            Err(Failure::Fatal(m)) => bail!("judge endpoint {url} {m}"),
            Err(Failure::Retry(m)) if attempt == cfg.retries || stop.load(Ordering::Relaxed) => {
                bail!(
                    "judge endpoint {url} {m} (after {} attempt(s); is the server running and --judge right?)",
                    attempt + 1
                )
            }
            Err(Failure::Retry(m)) => {
                tracing::warn!("judge endpoint {url}: {m}; retrying in {wait:?}");
                std::thread::sleep(wait);
                wait *= 2;
            }
        }
    }
    unreachable!("the last attempt returns")
}

/// The judge's replies to `prompts` (same order): from the cache where it has them, else asked
/// (each distinct prompt once), with the cache extended as replies arrive.
pub fn ask_all(cfg: &JudgeConfig, prompts: &[String]) -> Result<(Vec<String>, JudgeStats)> {
    let mut cache = load_cache(cfg)?;
    let mut todo: Vec<&String> = Vec::new();
    let mut stats = JudgeStats::default();
    {
        let mut seen = std::collections::HashSet::new();
        for p in prompts {
            if seen.insert(p) {
                if cache.contains_key(&(cfg.model.clone(), p.clone())) {
                    stats.cached += 1;
                } else {
                    todo.push(p);
                }
            }
        }
    }
    if !todo.is_empty() {
        if let Some(dir) = cfg.cache.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.cache)
            .with_context(|| format!("opening {}", cfg.cache.display()))?;
        let writer = Mutex::new(file);
        let url = endpoint(&cfg.url);
        let agent = ureq::AgentBuilder::new().timeout(cfg.timeout).build();
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let replies: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
        let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..cfg.concurrency.max(1).min(todo.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= todo.len() || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let prompt = todo[i];
                    let res = ask_with_retries(&agent, cfg, &url, prompt, &stop).and_then(|r| {
                        let line = json!({"model": cfg.model, "prompt": prompt, "reply": r});
                        let mut w = writer.lock().expect("cache writer");
                        writeln!(w, "{line}")
                            .with_context(|| format!("writing {}", cfg.cache.display()))?;
                        Ok(r)
                    });
                    match res {
                        Ok(r) => replies.lock().expect("replies").push((prompt.clone(), r)),
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            first_error.lock().expect("error").get_or_insert(e);
                            break;
                        }
                    }
                });
            }
        });
        if let Some(e) = first_error.into_inner().expect("error") {
            return Err(e);
        }
        for (p, r) in replies.into_inner().expect("replies") {
            cache.insert((cfg.model.clone(), p), r);
        }
        stats.asked = todo.len();
    }
    let out = prompts
        .iter()
        .map(|p| cache[&(cfg.model.clone(), p.clone())].clone())
        .collect();
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        assert_eq!(
            endpoint("http://h:8000/v1"),
            "http://h:8000/v1/chat/completions"
        );
        assert_eq!(
            endpoint("http://h:8000/v1/"),
            "http://h:8000/v1/chat/completions"
        );
        assert_eq!(
            endpoint("https://api.x.com/v1/chat/completions"),
            "https://api.x.com/v1/chat/completions"
        );
    }

    #[test]
    fn cache_only_run_makes_no_request_and_bad_cache_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("judge_cache.jsonl");
        std::fs::write(
            &cache,
            "{\"model\": \"m\", \"prompt\": \"p\", \"reply\": \"<judge>0</judge>\"}\n",
        )
        .unwrap();
        let cfg = JudgeConfig {
            // nothing listens there: any request would fail
            url: "http://127.0.0.1:9/v1".into(),
            model: "m".into(),
            api_key: None,
            concurrency: 2,
            retries: 0,
            backoff: Duration::from_millis(1),
            timeout: Duration::from_secs(5),
            cache: cache.clone(),
        };
        let (r, s) = ask_all(&cfg, &["p".to_string(), "p".to_string()]).unwrap();
        assert_eq!(r, vec!["<judge>0</judge>"; 2]);
        assert_eq!(
            s,
            JudgeStats {
                asked: 0,
                cached: 1
            }
        );
        std::fs::write(&cache, "{\"model\": \"m\"}\n").unwrap();
        let e = ask_all(&cfg, &["p".to_string()]).unwrap_err().to_string();
        assert!(
            e.contains("judge_cache.jsonl:1") && e.contains("prompt"),
            "{e}"
        );
    }
}
