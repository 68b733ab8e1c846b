//! The data mix: how many records each source contributes per epoch and the seeded order of an
//! epoch (the rules are in [`crate::sft::plan`]'s docs). Pure functions of the recipe, the record
//! counts and the seed: a resumed run recomputes them exactly.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::sft::recipe::{DataSource, Mix};

/// Number of records in a sharegpt file without parsing them: non-blank lines of a JSONL file, or
/// the elements of a JSON array (a file whose first non-blank character is `[`).
pub fn count_records(path: impl AsRef<Path>) -> Result<usize> {
    let path = path.as_ref();
    let file = std::fs::File::open(path)
        .with_context(|| format!("dataset {}: cannot open", path.display()))?;
    let mut reader = BufReader::new(file);
    // Peek at the first non-blank byte.
    let first = loop {
        let buf = reader
            .fill_buf()
            .with_context(|| format!("dataset {}: read error", path.display()))?;
        if buf.is_empty() {
            return Ok(0);
        }
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(i) => {
                let b = buf[i];
                reader.consume(i);
                break b;
            }
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    };
    if first == b'[' {
        let mut text = String::new();
        reader
            .read_to_string(&mut text)
            .with_context(|| format!("dataset {}: read error", path.display()))?;
        let items: Vec<serde::de::IgnoredAny> = serde_json::from_str(&text)
            .with_context(|| format!("dataset {}: invalid JSON array", path.display()))?;
        return Ok(items.len());
    }
    let mut count = 0;
    for line in reader.lines() {
        let line = line.with_context(|| format!("dataset {}: read error", path.display()))?;
        if !line.trim().is_empty() {
            count += 1;
        }
    }
    Ok(count)
}

/// [`count_records`] of every source.
pub fn count_available(sources: &[DataSource]) -> Result<Vec<usize>> {
    sources.iter().map(|s| count_records(&s.path)).collect()
}

/// Records each source contributes per epoch (see the module docs for the rules).
pub fn mix_counts(sources: &[DataSource], available: &[usize]) -> Result<Vec<usize>> {
    if sources.len() != available.len() {
        bail!(
            "{} data sources but {} record counts",
            sources.len(),
            available.len()
        );
    }
    sources
        .iter()
        .zip(available)
        .enumerate()
        .map(|(i, (s, &avail))| {
            let n = match s.mix() {
                Mix::All => avail,
                Mix::Samples(n) => n,
                Mix::Weight(w) => {
                    if !(w.is_finite() && w >= 0.0) {
                        bail!("data.{i}.weight must be a finite number >= 0, got {w}");
                    }
                    (w * avail as f64).round() as usize
                }
            };
            if n > 0 && avail == 0 {
                bail!(
                    "data.{i} ({}): {} requested but the file has no records",
                    s.path.display(),
                    s.mix()
                );
            }
            Ok(n)
        })
        .collect()
}

/// The record indices source `source` contributes per epoch: every index `count / available`
/// times, plus a random subset (seeded by `seed` and `source`, not by the epoch) of
/// `count % available` indices. Sorted. Empty when `available == 0`.
pub fn selected_records(count: usize, available: usize, seed: u64, source: usize) -> Vec<usize> {
    if available == 0 {
        return Vec::new();
    }
    let (repeats, rest) = (count / available, count % available);
    let mut out = Vec::with_capacity(count);
    for _ in 0..repeats {
        out.extend(0..available);
    }
    if rest > 0 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(source as u64 + 1);
        let mut perm: Vec<usize> = (0..available).collect();
        perm.shuffle(&mut rng);
        out.extend_from_slice(&perm[..rest]);
    }
    out.sort_unstable();
    out
}

/// The order of one epoch: `(source, record index)` pairs, every selected record of every source
/// ([`selected_records`]) exactly as often as selected, shuffled with ChaCha8 seeded by
/// `seed + epoch`. Deterministic: the same arguments give the same order.
pub fn mixed_order(
    counts: &[usize],
    available: &[usize],
    seed: u64,
    epoch: usize,
) -> Vec<(usize, usize)> {
    assert_eq!(
        counts.len(),
        available.len(),
        "mixed_order: counts and available differ in length"
    );
    let mut order: Vec<(usize, usize)> = Vec::with_capacity(counts.iter().sum());
    for (s, (&c, &a)) in counts.iter().zip(available).enumerate() {
        order.extend(selected_records(c, a, seed, s).into_iter().map(|r| (s, r)));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch as u64));
    order.shuffle(&mut rng);
    order
}
