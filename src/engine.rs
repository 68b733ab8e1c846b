//! The rollout engine: what `generate`, `eval --model`, `synth-reflective --generate-with`, SFT
//! validation and GRPO's rollouts all decode with.
//!
//! - **Requests** are prompts with `n` samples each (GRPO's group; `n = 1` otherwise). A request's
//!   prompt is prefilled **once** — vision tower included — and its keys and values are held once
//!   for all `n` samples ([`crate::model::kv`]); each sample has its own preallocated buffer for
//!   its new tokens, written in place. The requests one prefill admits form a cohort whose
//!   attention runs as one batched product per layer and step.
//! - **Continuous batching**: requests wait in a queue (shortest prompt first, ties in input
//!   order); whenever rows finish (stop token or `max_new_tokens`), finished groups leave and
//!   waiting ones are prefilled and join, as long as the batch stays within `max_rows` rows
//!   (`generation_batch`) and `max_batch_tokens` cached tokens (prompt once plus `n x
//!   max_new_tokens` per group; vLLM's `max_num_batched_tokens` in spirit).
//! - **Sampling on the device**: temperature, top-k and top-p are applied to the logits on the
//!   backend and the draw is an inverse-CDF lookup of one uniform number per row, so only token
//!   ids come back to the host. Each sample has its own RNG, seeded by its request's seed and
//!   its index in the group: a sample's tokens do not depend on which other sequences share its
//!   batch (the same seed gives the same completions with any `generation_batch`).

use std::collections::VecDeque;

use anyhow::{bail, Result};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::generate::{left_padded_batch, Generation, Prompt, SamplingConfig};
use crate::model::kv::CohortKv;
use crate::model::{ModelBackend, Qwen25VL};

/// Generate for every prompt (greedy, or sampled with seeds drawn from `rng`), all prompts at
/// once (see [`generate_batched`]).
pub fn generate<B: ModelBackend>(
    model: &Qwen25VL<B>,
    prompts: &[Prompt],
    cfg: &SamplingConfig,
    stop: &[u32],
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Generation>> {
    generate_batched(
        model,
        prompts,
        cfg,
        stop,
        rng,
        prompts.len().max(1),
        |_, _| {},
    )
}

/// Generate for many prompts with the rollout engine ([`crate::engine`]): at most `batch_size`
/// rows decode together, finished rows are replaced by waiting prompts at once; the results
/// come back in input order. Prompt `i` samples with the seed `rng`'s next value + `i`, so its
/// tokens do not depend on `batch_size`. `on_batch(indices, generations)` is called as prompts
/// complete.
pub fn generate_batched<B: ModelBackend>(
    model: &Qwen25VL<B>,
    prompts: &[Prompt],
    cfg: &SamplingConfig,
    stop: &[u32],
    rng: &mut ChaCha8Rng,
    batch_size: usize,
    mut on_batch: impl FnMut(&[usize], &[Generation]),
) -> Result<Vec<Generation>> {
    if batch_size == 0 {
        bail!("batch size must be at least 1");
    }
    let base: u64 = rng.random();
    let requests: Vec<Request> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request {
            prompt: p.clone(),
            n: 1,
            seed: base.wrapping_add(i as u64),
        })
        .collect();
    let (out, _) = generate_requests(
        model,
        &requests,
        cfg,
        stop,
        &EngineConfig::rows(batch_size),
        |i, g| on_batch(&[i], g),
    )?;
    Ok(out.into_iter().map(|mut g| g.remove(0)).collect())
}

/// One prompt and how many samples to draw from it.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Prompt,
    pub n: usize,
    /// Seed of this request's samples (sample `j` draws from `sample_rng(seed, j)`).
    pub seed: u64,
}

/// The engine's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Rows decoded together at most (`generation_batch`).
    pub max_rows: usize,
    /// Tokens the cache may hold at most over the running groups (prompt once + `n x
    /// max_new_tokens` each); 0: no limit besides `max_rows`. A group larger than the budget
    /// still runs, alone.
    pub max_batch_tokens: usize,
}

impl EngineConfig {
    pub fn rows(max_rows: usize) -> Self {
        Self {
            max_rows,
            max_batch_tokens: 0,
        }
    }
}

/// What a run did (for tests, metrics and benches).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Prefill forward passes and the prompts / prompt tokens they covered.
    pub prefills: usize,
    pub prefill_prompts: usize,
    pub prefill_tokens: usize,
    /// Images the prefills ran through the vision tower (each prompt's once, however many
    /// samples it has).
    pub prefill_images: usize,
    pub decode_steps: usize,
    pub new_tokens: usize,
    /// Most rows decoded together.
    pub peak_rows: usize,
    /// Most bytes held at once by the groups' shared prompt caches and by their rows' own buffers.
    pub peak_prefix_bytes: usize,
    pub peak_own_bytes: usize,
}

/// The RNG of sample `j` of a request seeded `seed`.
pub fn sample_rng(seed: u64, j: usize) -> ChaCha8Rng {
    let mut z = seed
        ^ (j as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ChaCha8Rng::seed_from_u64(z ^ (z >> 31))
}

struct Seq {
    sample: usize,
    tokens: Vec<u32>,
    /// The log-prob of each token under the distribution it was drawn from (see [`Generation`]).
    logprobs: Vec<f32>,
    rng: ChaCha8Rng,
    stopped: bool,
}

/// A request being decoded.
struct Running {
    request: usize,
    /// Rows still decoding, aligned with its group's rows in the cohort's cache.
    live: Vec<Seq>,
    done: Vec<Seq>,
}

/// The requests one prefill admitted, still decoding, and their cache (group `k` of `kv` is
/// `groups[k]`).
struct Cohort<B: ModelBackend> {
    groups: Vec<Running>,
    kv: CohortKv<B>,
}

/// Generate `requests[i].n` samples for every request. `on_done(i, generations)` is called as
/// each request completes (its samples in order); the results come back in request order.
pub fn generate_requests<B: ModelBackend>(
    model: &Qwen25VL<B>,
    requests: &[Request],
    cfg: &SamplingConfig,
    stop: &[u32],
    engine: &EngineConfig,
    mut on_done: impl FnMut(usize, &[Generation]),
) -> Result<(Vec<Vec<Generation>>, EngineStats)> {
    cfg.validate()?;
    if engine.max_rows == 0 {
        bail!("generation batch must be at least 1 row");
    }
    if let Some(i) = requests.iter().position(|r| r.prompt.input_ids.is_empty()) {
        bail!("prompt {i} is empty");
    }
    let mut stats = EngineStats::default();
    let mut out: Vec<Option<Vec<Generation>>> = vec![None; requests.len()];
    // A request with n = 0 or no new tokens at all is done at once.
    let mut queue: VecDeque<usize> = VecDeque::new();
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| requests[i].prompt.input_ids.len());
    for i in order {
        if requests[i].n == 0 || cfg.max_new_tokens == 0 {
            let gens = vec![
                Generation {
                    tokens: vec![],
                    logprobs: vec![],
                    stopped: false
                };
                requests[i].n
            ];
            on_done(i, &gens);
            out[i] = Some(gens);
        } else {
            queue.push_back(i);
        }
    }
    let pad_id = model.config.tokens.pad_token_id.unwrap_or(0);
    let head = model.head_matrix();
    let banned = banned_row::<B>(model, &head);
    let cost = |i: usize| requests[i].prompt.input_ids.len() + requests[i].n * cfg.max_new_tokens;
    let mut cohorts: Vec<Cohort<B>> = vec![];
    while !queue.is_empty() || !cohorts.is_empty() {
        // Admit waiting requests while rows and the token budget allow (always one if idle).
        let running = || {
            cohorts
                .iter()
                .flat_map(|c| c.groups.iter().zip(&c.kv.prefix_lens))
        };
        let mut rows: usize = running().map(|(g, _)| g.live.len()).sum();
        let mut tokens: usize = running()
            .map(|(g, &p)| p + requests[g.request].n * cfg.max_new_tokens)
            .sum();
        let mut admit = vec![];
        while let Some(&i) = queue.front() {
            let n = requests[i].n;
            let fits_rows = rows + n <= engine.max_rows;
            let fits_tokens =
                engine.max_batch_tokens == 0 || tokens + cost(i) <= engine.max_batch_tokens;
            // The first request is always admitted, so one too large for the limits still runs.
            let first = cohorts.is_empty() && admit.is_empty();
            if !(fits_rows && fits_tokens || first) {
                break;
            }
            queue.pop_front();
            rows += n;
            tokens += cost(i);
            admit.push(i);
        }
        if !admit.is_empty() {
            let prompts: Vec<&Prompt> = admit.iter().map(|&i| &requests[i].prompt).collect();
            let input = left_padded_batch(&prompts, pad_id);
            let sizes: Vec<usize> = admit.iter().map(|&i| requests[i].n).collect();
            let (kv, last) = model.prefill_groups(&input, &sizes, cfg.max_new_tokens)?;
            stats.prefills += 1;
            stats.prefill_images += input.image_grids.len();
            stats.prefill_prompts += admit.len();
            stats.prefill_tokens += prompts.iter().map(|p| p.input_ids.len()).sum::<usize>();
            // First tokens: every sample of a group draws from the prompt's last position.
            let rows_of: Vec<usize> = admit
                .iter()
                .enumerate()
                .flat_map(|(g, &i)| std::iter::repeat_n(g, requests[i].n))
                .collect();
            let device = last.device();
            let hidden = if rows_of.len() == admit.len() {
                last
            } else {
                last.select(0, crate::model::nn::int1::<B>(&rows_of, &device))
            };
            let mut seqs: Vec<Seq> = admit
                .iter()
                .flat_map(|&i| (0..requests[i].n).map(move |j| (i, j)))
                .map(|(i, j)| Seq {
                    sample: j,
                    tokens: vec![],
                    logprobs: vec![],
                    rng: sample_rng(requests[i].seed, j),
                    stopped: false,
                })
                .collect();
            let next = next_tokens(&head, &banned, hidden, cfg, &mut seqs);
            let mut seqs = seqs.into_iter();
            let groups: Vec<Running> = admit
                .iter()
                .map(|&i| Running {
                    request: i,
                    live: seqs.by_ref().take(requests[i].n).collect(),
                    done: vec![],
                })
                .collect();
            let mut cohort = Cohort { groups, kv };
            for g in push_tokens(&mut cohort, &next, stop, cfg.max_new_tokens, &mut stats) {
                complete(g, &mut on_done, &mut out);
            }
            cohorts.push(cohort);
        }
        cohorts.retain(|c| !c.groups.is_empty());
        if cohorts.is_empty() {
            continue;
        }
        let (p, o) = cohorts
            .iter()
            .map(|c| c.kv.bytes())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        stats.peak_prefix_bytes = stats.peak_prefix_bytes.max(p);
        stats.peak_own_bytes = stats.peak_own_bytes.max(o);
        // One decode step of every live row.
        let feed: Vec<u32> = cohorts
            .iter()
            .flat_map(|c| {
                c.groups.iter().flat_map(|g| {
                    g.live
                        .iter()
                        .map(|s| *s.tokens.last().expect("a live row has a token"))
                })
            })
            .collect();
        stats.peak_rows = stats.peak_rows.max(feed.len());
        let hidden = {
            let mut kvs: Vec<&mut CohortKv<B>> = cohorts.iter_mut().map(|c| &mut c.kv).collect();
            model.decode_groups(&feed, &mut kvs)?
        };
        stats.decode_steps += 1;
        let mut seqs: Vec<Seq> = cohorts
            .iter_mut()
            .flat_map(|c| {
                c.groups
                    .iter_mut()
                    .flat_map(|g| std::mem::take(&mut g.live))
            })
            .collect();
        let next = next_tokens(&head, &banned, hidden, cfg, &mut seqs);
        let (mut seqs, mut next) = (seqs.into_iter(), next.as_slice());
        for c in cohorts.iter_mut() {
            for (g, &n) in c.groups.iter_mut().zip(c.kv.group_rows()) {
                g.live = seqs.by_ref().take(n).collect();
            }
            let rows = c.kv.rows();
            for g in push_tokens(c, &next[..rows], stop, cfg.max_new_tokens, &mut stats) {
                complete(g, &mut on_done, &mut out);
            }
            next = &next[rows..];
        }
        cohorts.retain(|c| !c.groups.is_empty());
    }
    Ok((
        out.into_iter()
            .map(|g| g.expect("every request generated"))
            .collect(),
        stats,
    ))
}

/// A group whose samples are all done: its generations, in sample order, to `on_done` and `out`.
fn complete(
    g: Running,
    on_done: &mut impl FnMut(usize, &[Generation]),
    out: &mut [Option<Vec<Generation>>],
) {
    let mut done = g.done;
    done.sort_by_key(|s| s.sample);
    let gens: Vec<Generation> = done
        .into_iter()
        .map(|s| Generation {
            tokens: s.tokens,
            logprobs: s.logprobs,
            stopped: s.stopped,
        })
        .collect();
    on_done(g.request, &gens);
    out[g.request] = Some(gens);
}

/// Append each live row's next token (`next`: the cohort's rows, group by group); rows that stop
/// or reach `max_new` move to their group's `done` and their cache rows are dropped. Returns the
/// groups left without live rows, which leave the cohort (and its cache).
fn push_tokens<B: ModelBackend>(
    c: &mut Cohort<B>,
    next: &[(u32, f32)],
    stop: &[u32],
    max_new: usize,
    stats: &mut EngineStats,
) -> Vec<Running> {
    let mut next = next.iter();
    let mut keep: Vec<Vec<usize>> = Vec::with_capacity(c.groups.len());
    for g in c.groups.iter_mut() {
        let mut kept = vec![];
        for (r, mut s) in std::mem::take(&mut g.live).into_iter().enumerate() {
            let &(t, logprob) = next.next().expect("a token per live row");
            s.tokens.push(t);
            s.logprobs.push(logprob);
            stats.new_tokens += 1;
            if stop.contains(&t) {
                s.stopped = true;
            }
            if s.stopped || s.tokens.len() >= max_new {
                g.done.push(s);
            } else {
                kept.push(r);
                g.live.push(s);
            }
        }
        keep.push(kept);
    }
    c.kv.retain(&keep);
    let (live, finished) = std::mem::take(&mut c.groups)
        .into_iter()
        .partition(|g| !g.live.is_empty());
    c.groups = live;
    finished
}

/// `-inf` at the image/video placeholder ids (never emitted: a response holding one would claim
/// an image slot without pixels), 0 elsewhere: `[1, V]`.
fn banned_row<B: ModelBackend>(model: &Qwen25VL<B>, head: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let v = head.dims()[1];
    let banned: Vec<usize> = [
        model.config.tokens.image_token_id,
        model.config.tokens.video_token_id,
    ]
    .into_iter()
    .flatten()
    .map(|t| t as usize)
    .filter(|&t| t < v)
    .collect();
    if banned.is_empty() {
        return None;
    }
    let mut row = vec![0.0f32; v];
    for t in banned {
        row[t] = f32::NEG_INFINITY;
    }
    Some(Tensor::from_data(
        TensorData::new(row, [1, v]),
        &head.device(),
    ))
}

/// The next token of every row from its final hidden state `[rows, C]`, on the device, with its
/// log-prob; each sampling row draws one uniform number from its own RNG.
fn next_tokens<B: ModelBackend>(
    head: &Tensor<B, 2>,
    banned: &Option<Tensor<B, 2>>,
    hidden: Tensor<B, 2>,
    cfg: &SamplingConfig,
    seqs: &mut [Seq],
) -> Vec<(u32, f32)> {
    let logits = crate::model::nn::upcast(hidden.matmul(head.clone()));
    let u: Vec<f64> = if cfg.is_greedy() {
        vec![]
    } else {
        seqs.iter_mut().map(|s| s.rng.random::<f64>()).collect()
    };
    let (tokens, logprobs) = sample_on_device(logits, banned.clone(), cfg, &u);
    tokens.into_iter().zip(logprobs).collect()
}

/// Choose one token per row of `logits [rows, V]` on the device: greedy (argmax) or, with the
/// uniform numbers `u` (one per row), temperature, top-k (ties with the k-th kept), top-p (the
/// smallest prefix of the sorted distribution whose mass reaches `top_p`) and an inverse-CDF draw.
/// `banned` (`[1, V]`, 0 or `-inf`) is added to the logits the token is drawn from. Returns the
/// tokens and their log-probs `log_softmax(logits / temperature)` (temperature 1 when greedy;
/// before `banned`, top-k and top-p: the model's distribution, as the trainer computes it).
pub fn sample_on_device<B: Backend>(
    logits: Tensor<B, 2>,
    banned: Option<Tensor<B, 2>>,
    cfg: &SamplingConfig,
    u: &[f64],
) -> (Vec<u32>, Vec<f32>) {
    let [rows, v] = logits.dims();
    let device = logits.device();
    let ids = |t: Tensor<B, 2, Int>| -> Vec<u32> {
        t.into_data().iter::<i64>().map(|x| x as u32).collect()
    };
    let values = |t: Tensor<B, 2>| -> Vec<f32> { t.into_data().iter::<f32>().collect() };
    let t = if cfg.is_greedy() {
        1.0
    } else {
        cfg.temperature as f64
    };
    let z = logits.div_scalar(t);
    let log_probs = log_softmax(z.clone(), 1);
    let z = match banned {
        Some(b) => z + b,
        None => z,
    };
    if cfg.is_greedy() {
        let token = z.argmax(1);
        let logprob = log_probs.gather(1, token.clone());
        return (ids(token), values(logprob));
    }
    let filtered = cfg.top_k > 0 && cfg.top_k < v || cfg.top_p < 1.0;
    let (z, order) = if filtered {
        let (sorted, order) = z.sort_descending_with_indices(1);
        (sorted, Some(order))
    } else {
        (z, None)
    };
    let z = if cfg.top_k > 0 && cfg.top_k < v {
        let kth = z.clone().narrow(1, cfg.top_k - 1, 1);
        z.clone()
            .mask_fill(z.lower(kth.expand([rows, v])), f32::NEG_INFINITY)
    } else {
        z
    };
    let mut p = softmax(z, 1);
    if cfg.top_p < 1.0 {
        let exclusive = p.clone().cumsum(1) - p.clone();
        p = p.mask_fill(exclusive.greater_equal_elem(cfg.top_p as f64), 0.0);
    }
    let c = p.cumsum(1);
    let total = c.clone().narrow(1, v - 1, 1);
    let target = Tensor::<B, 2>::from_data(
        TensorData::new(u.iter().map(|&x| x as f32).collect::<Vec<_>>(), [rows, 1]),
        &device,
    ) * total;
    let j = c
        .lower_equal(target.expand([rows, v]))
        .int()
        .sum_dim(1)
        .clamp_max(v as i64 - 1);
    let token = match order {
        Some(order) => order.gather(1, j),
        None => j,
    };
    let logprob = log_probs.gather(1, token.clone());
    (ids(token), values(logprob))
}
