//! The SFT data: the sources read, every record's length known (from the length cache, without
//! decoding an image), the optimizer steps of the run scheduled from the seeded mixed order, and
//! the samples of upcoming steps encoded on worker threads ahead of the training step.
//!
//! - **Lengths** ([`crate::data::lengths`]): tokens and target tokens after encoding and
//!   truncation; invalid records are an error naming FILE:LINE (or, with `skip_invalid`,
//!   counted and left out), records whose image tokens alone exceed `cutoff_len` are skipped and
//!   counted.
//! - **Schedule** ([`SftData::schedule`]): per epoch the seeded mixed order (`sft::plan`) cut into
//!   micro-batches of `per_device_batch x world size` rows, `grad_accum` micro-batches per
//!   optimizer step; each rank takes its `per_device_batch` rows of every micro-batch. A row is one
//!   sample, or with `packing` several: the run's samples are packed once into rows of at most
//!   `cutoff_len` tokens ([`crate::learn::batch::pack_rows`] over the seed's order) and every
//!   epoch shuffles the rows. A pure function of the recipe, the lengths and the position, so a
//!   resumed run continues exactly.
//! - **Loading** ([`Loader`]): `loader_workers` threads read the images, resize them and encode
//!   the samples of the next `prefetch_steps` steps while the current one trains; the batches are
//!   those the synchronous path (`loader_workers = 0`) builds, in the same order.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::data::encode::Encoded;
use crate::data::lengths::{sample_lengths, LengthEncoder, SampleLength};
use crate::data::sharegpt::{read_sharegpt_with_media_dir, Conversation};
use crate::inputs::Processor;
use crate::learn::batch::{collate, collate_packed, pack_rows, MicroBatch};
use crate::sft::mix::{mix_counts, mixed_order};
use crate::sft::recipe::{DataSource, SftRecipe};

/// A sample: `(source, record)`.
pub type SampleId = (usize, usize);
/// One row of a micro-batch: one sample, or several when packing.
pub type Row = Vec<SampleId>;

/// Skipped records, by reason.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SkipReport {
    pub invalid: usize,
    pub too_long_vision: usize,
    pub examples: Vec<String>,
}

impl SkipReport {
    fn note(&mut self, what: String) {
        if self.examples.len() < 5 {
            self.examples.push(what);
        }
    }
}

/// Read every source (sharegpt; errors name FILE:LINE).
pub fn read_sources(sources: &[DataSource]) -> Result<Vec<Vec<Conversation>>> {
    sources
        .iter()
        .map(|s| read_sharegpt_with_media_dir(&s.path, s.media_dir.as_deref()))
        .collect()
}

/// The lengths of every record of every source (cached next to each file), with the skips
/// they imply; an invalid record is an error unless `skip_invalid`.
pub fn source_lengths(
    recipe: &SftRecipe,
    processor: &Processor,
    sources: &[Vec<Conversation>],
    quiet: bool,
) -> Result<(Vec<Vec<SampleLength>>, SkipReport)> {
    let encoder = LengthEncoder {
        tokenizer: &processor.tokenizer,
        template: &processor.template,
        images: &processor.images,
        cutoff_len: recipe.cutoff_len,
        train_on: recipe.train_on,
    };
    let mut skips = SkipReport::default();
    let mut out = Vec::with_capacity(sources.len());
    for (src, convs) in recipe.data.iter().zip(sources) {
        let (lengths, _) = sample_lengths(&src.path, convs, &encoder, quiet)?;
        for (conv, l) in convs.iter().zip(&lengths) {
            match l {
                SampleLength::Ok(..) => {}
                SampleLength::Invalid(reason) if !recipe.skip_invalid => {
                    bail!("{reason}\n(set skip_invalid = true to skip and count such records)")
                }
                SampleLength::Invalid(reason) => {
                    skips.invalid += 1;
                    skips.note(reason.clone());
                }
                SampleLength::TooLong => {
                    skips.too_long_vision += 1;
                    skips.note(format!(
                        "{}: image tokens alone exceed cutoff_len {} (or no label left)",
                        conv.origin, recipe.cutoff_len
                    ));
                }
            }
        }
        out.push(lengths);
    }
    Ok((out, skips))
}

/// Batches of one epoch: the seeded mixed order (skipped samples left out) cut into batches.
/// With `group_by_length` (HF's `group_by_length`, off by default as in HF and LLaMA-Factory) the
/// order is first split into mega-batches of 50 batches, each sorted by length (longest first) as
/// HF's length-grouped sampler does: less padding, but consecutive batches then hold samples of
/// similar length, which on data where length reveals the task (the demo) means one task per step.
pub fn epoch_batches(
    order: &[(usize, usize)],
    lengths: &dyn Fn(usize, usize) -> Option<usize>,
    batch: usize,
    group_by_length: bool,
) -> Vec<Vec<(usize, usize)>> {
    let valid: Vec<(usize, usize, usize)> = order
        .iter()
        .filter_map(|&(s, r)| lengths(s, r).map(|l| (s, r, l)))
        .collect();
    let mut batches = vec![];
    if !group_by_length {
        return valid
            .chunks(batch)
            .map(|b| b.iter().map(|&(s, r, _)| (s, r)).collect())
            .collect();
    }
    for mega in valid.chunks(batch * 50) {
        let mut mega = mega.to_vec();
        mega.sort_by_key(|m| std::cmp::Reverse(m.2)); // stable: ties keep the seeded order
        for b in mega.chunks(batch) {
            batches.push(b.iter().map(|&(s, r, _)| (s, r)).collect());
        }
    }
    batches
}

/// Samples that packing considers together (first-fit decreasing within each window).
pub const PACKING_WINDOW: usize = 1024;

/// The run's samples packed into rows of at most `cutoff_len` tokens: the seed's order (epoch 0
/// of the mix, skipped samples left out) packed first-fit decreasing in windows of
/// [`PACKING_WINDOW`] samples.
pub fn packed_rows(
    recipe: &SftRecipe,
    counts: &[usize],
    available: &[usize],
    length: &dyn Fn(SampleId) -> Option<usize>,
) -> Vec<Row> {
    let order: Vec<(SampleId, usize)> = mixed_order(counts, available, recipe.seed, 0)
        .into_iter()
        .filter_map(|id| length(id).map(|l| (id, l)))
        .collect();
    let lens: Vec<usize> = order.iter().map(|&(_, l)| l).collect();
    pack_rows(&lens, recipe.cutoff_len, PACKING_WINDOW)
        .into_iter()
        .map(|r| r.into_iter().map(|i| order[i].0).collect())
        .collect()
}

/// Padding of an epoch's batches, without and with packing (what the dry run and the run log
/// report).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PaddingStats {
    /// Samples that train (after skips) and their tokens.
    pub samples: usize,
    pub tokens: usize,
    /// One sample per row: micro-batches of epoch 0 and the fraction of their token slots that
    /// are padding (each batch is padded to its longest row).
    pub batches: usize,
    pub padding: f64,
    /// Packed: rows, micro-batches of rows and their padding fraction.
    pub packed_rows: usize,
    pub packed_batches: usize,
    pub packed_padding: f64,
}

/// [`PaddingStats`] of the recipe's mix with the given sample lengths.
pub fn padding_stats(
    recipe: &SftRecipe,
    counts: &[usize],
    available: &[usize],
    length: &dyn Fn(SampleId) -> Option<usize>,
) -> PaddingStats {
    let slots = |batches: &mut dyn Iterator<Item = Vec<usize>>| -> (usize, usize) {
        let (mut n, mut slots) = (0, 0);
        for rows in batches {
            n += 1;
            slots += rows.len() * rows.iter().copied().max().unwrap_or(0);
        }
        (n, slots)
    };
    let order = mixed_order(counts, available, recipe.seed, 0);
    let lens: Vec<usize> = order.iter().filter_map(|&id| length(id)).collect();
    let tokens: usize = lens.iter().sum();
    let (batches, unpacked_slots) = slots(
        &mut lens
            .chunks(recipe.per_device_batch.max(1))
            .map(<[usize]>::to_vec),
    );
    let rows: Vec<usize> = packed_rows(recipe, counts, available, length)
        .iter()
        .map(|r| r.iter().map(|&id| length(id).unwrap_or(0)).sum())
        .collect();
    let (packed_batches, packed_slots) = slots(
        &mut rows
            .chunks(recipe.per_device_batch.max(1))
            .map(<[usize]>::to_vec),
    );
    let frac = |slots: usize| {
        if slots == 0 {
            0.0
        } else {
            1.0 - tokens as f64 / slots as f64
        }
    };
    PaddingStats {
        samples: lens.len(),
        tokens,
        batches,
        padding: frac(unpacked_slots),
        packed_rows: rows.len(),
        packed_batches,
        packed_padding: frac(packed_slots),
    }
}

/// One optimizer step of the schedule: its micro-batches (over all ranks) and where the run is
/// after it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledStep {
    /// `grad_accum` (or fewer, at an epoch's end) micro-batches of up to
    /// `per_device_batch x world size` rows; [`ScheduledStep::shard`] cuts out one rank's part.
    pub micro: Vec<Vec<Row>>,
    /// Epoch of this step, and the rows of that epoch done after it.
    pub epoch: usize,
    pub rows_end: usize,
    /// Rows in the epoch.
    pub rows_in_epoch: usize,
}

impl ScheduledStep {
    /// The part of this step that `rank` computes: the `rank`-th `per_device_batch` rows of
    /// every micro-batch (micro-batches left empty, at the end of an epoch, are dropped).
    pub fn shard(&self, rank: usize, per_device_batch: usize) -> ScheduledStep {
        let micro = self
            .micro
            .iter()
            .map(|m| crate::learn::parallel::shard(m, rank, per_device_batch))
            .filter(|m| !m.is_empty())
            .collect();
        ScheduledStep {
            micro,
            ..self.clone()
        }
    }

    /// Samples of the step, over all ranks.
    pub fn samples(&self) -> impl Iterator<Item = SampleId> + '_ {
        self.micro.iter().flatten().flatten().copied()
    }
}

/// The training data of a run: records and their lengths (the samples are encoded per step).
pub struct SftData {
    pub sources: Vec<Vec<Conversation>>,
    pub lengths: Vec<Vec<SampleLength>>,
    /// Records per source in the files.
    pub available: Vec<usize>,
    /// Records per source and epoch after mixing.
    pub counts: Vec<usize>,
    pub skips: SkipReport,
    /// Validation conversations (`[[eval_data]]`).
    pub eval: Vec<Conversation>,
    /// With packing: the run's rows (packed once), each epoch shuffles them.
    packed: Option<Vec<Row>>,
}

impl SftData {
    /// Read the recipe's sources and their lengths (skips counted and reported).
    pub fn load(recipe: &SftRecipe, processor: &Processor) -> Result<Self> {
        let sources = read_sources(&recipe.data)?;
        let (lengths, skips) = source_lengths(recipe, processor, &sources, false)?;
        if skips.invalid + skips.too_long_vision > 0 {
            eprintln!(
                "skipped {} invalid and {} over-long records (vision tokens alone over cutoff_len); e.g. {:?}",
                skips.invalid, skips.too_long_vision, skips.examples
            );
        }
        let eval = read_sources(&recipe.eval_data)?
            .into_iter()
            .flatten()
            .collect();
        Self::new(recipe, sources, lengths, skips, eval)
    }

    pub fn new(
        recipe: &SftRecipe,
        sources: Vec<Vec<Conversation>>,
        lengths: Vec<Vec<SampleLength>>,
        skips: SkipReport,
        eval: Vec<Conversation>,
    ) -> Result<Self> {
        let available: Vec<usize> = sources.iter().map(Vec::len).collect();
        let counts = mix_counts(&recipe.data, &available)?;
        let mut data = Self {
            sources,
            lengths,
            available,
            counts,
            skips,
            eval,
            packed: None,
        };
        if recipe.packing {
            data.packed = Some(data.pack(recipe));
        }
        Ok(data)
    }

    /// Tokens of a sample after truncation (`None`: skipped).
    pub fn length(&self, (s, r): SampleId) -> Option<usize> {
        self.lengths[s][r].tokens()
    }

    /// The selected samples of the run packed into rows (see the module docs).
    fn pack(&self, recipe: &SftRecipe) -> Vec<Row> {
        packed_rows(recipe, &self.counts, &self.available, &|id| self.length(id))
    }

    /// The batches (of rows) of epoch `epoch`, of `per_device_batch` rows each.
    pub fn epoch_batches(&self, recipe: &SftRecipe, epoch: usize) -> Vec<Vec<Row>> {
        if let Some(rows) = &self.packed {
            let mut rows = rows.clone();
            let mut rng = ChaCha8Rng::seed_from_u64(recipe.seed.wrapping_add(epoch as u64));
            rows.shuffle(&mut rng);
            return rows
                .chunks(recipe.per_device_batch)
                .map(<[Row]>::to_vec)
                .collect();
        }
        let lengths = |s: usize, r: usize| self.length((s, r));
        let order = mixed_order(&self.counts, &self.available, recipe.seed, epoch);
        epoch_batches(
            &order,
            &lengths,
            recipe.per_device_batch,
            recipe.group_by_length,
        )
        .into_iter()
        .map(|b| b.into_iter().map(|id| vec![id]).collect())
        .collect()
    }

    /// The rows of epoch `epoch` in order: its batches one after the other. This order does not
    /// depend on the world size, so a run resumed on another number of ranks continues it.
    pub fn epoch_rows(&self, recipe: &SftRecipe, epoch: usize) -> Vec<Row> {
        self.epoch_batches(recipe, epoch).concat()
    }

    /// The next `steps` optimizer steps from position (`epoch`, `rows_done` rows of it).
    pub fn schedule(
        &self,
        recipe: &SftRecipe,
        epoch: usize,
        rows_done: usize,
        steps: usize,
    ) -> Result<Vec<ScheduledStep>> {
        self.schedule_until(recipe, (epoch, rows_done), None, steps)
    }

    /// The optimizer steps from position `from` (epoch, rows of it done) until `end` is reached
    /// (or `max_steps` steps): micro-batches of `per_device_batch x world` rows, `grad_accum`
    /// per step; an epoch's last step takes its leftover rows.
    pub fn schedule_until(
        &self,
        recipe: &SftRecipe,
        from: (usize, usize),
        end: Option<(usize, usize)>,
        max_steps: usize,
    ) -> Result<Vec<ScheduledStep>> {
        let (mut epoch, mut done) = from;
        let global = recipe.global_batch();
        let mut out = vec![];
        let mut rows = self.epoch_rows(recipe, epoch);
        if rows.is_empty() {
            bail!("no trainable sample left after skipping");
        }
        while out.len() < max_steps {
            if done >= rows.len() {
                epoch += 1;
                done = 0;
                rows = self.epoch_rows(recipe, epoch);
                continue;
            }
            if end.is_some_and(|end| (epoch, done) >= end) {
                break;
            }
            let step_end = (done + recipe.grad_accum * global).min(rows.len());
            let micro = rows[done..step_end]
                .chunks(global)
                .map(<[Row]>::to_vec)
                .collect();
            out.push(ScheduledStep {
                micro,
                epoch,
                rows_end: step_end,
                rows_in_epoch: rows.len(),
            });
            done = step_end;
        }
        Ok(out)
    }

    /// A sample encoded for training (pixels included), as its length says.
    pub fn encode(
        &self,
        processor: &Processor,
        recipe: &SftRecipe,
        (s, r): SampleId,
    ) -> Result<Encoded> {
        let conv = &self.sources[s][r];
        let e = processor.encode(conv, recipe.train_on)?;
        let e = crate::data::encode::truncate(e, recipe.cutoff_len, processor.tokenizer.special())?
            .with_context(|| {
                format!(
                    "{}: skipped by truncation now but not when its length was computed",
                    conv.origin
                )
            })?;
        if Some(e.input_ids.len()) != self.length((s, r)) {
            bail!(
                "{}: encodes to {} tokens, its cached length says {:?} (delete {} to recompute)",
                conv.origin,
                e.input_ids.len(),
                self.length((s, r)),
                crate::data::lengths::cache_path(&recipe.data[s].path).display()
            );
        }
        Ok(e)
    }

    /// The micro-batches of one scheduled step, encoded.
    pub fn micro_batches(
        &self,
        processor: &Processor,
        recipe: &SftRecipe,
        step: &ScheduledStep,
    ) -> Result<Vec<MicroBatch>> {
        let pad_id = processor.tokenizer.special().pad();
        step.micro
            .iter()
            .map(|rows| {
                let enc: Vec<Vec<Encoded>> = rows
                    .iter()
                    .map(|row| {
                        row.iter()
                            .map(|&id| self.encode(processor, recipe, id))
                            .collect()
                    })
                    .collect::<Result<_>>()?;
                let refs: Vec<Vec<&Encoded>> = enc.iter().map(|row| row.iter().collect()).collect();
                Ok(if recipe.packing {
                    collate_packed(&refs, pad_id)
                } else {
                    collate(&refs.into_iter().flatten().collect::<Vec<_>>(), pad_id)
                })
            })
            .collect()
    }
}

/// Encodes the micro-batches of the scheduled steps ahead of training, on `workers` threads, at
/// most `depth` steps ahead of the one being taken; `next()` hands them out in schedule order.
/// With `workers = 0` every step is encoded when it is taken (the synchronous path).
pub struct Loader {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Synchronous path: what to encode.
    sync: Option<SyncSource>,
    taken: usize,
}

struct SyncSource {
    data: Arc<SftData>,
    processor: Arc<Processor>,
    recipe: Arc<SftRecipe>,
    schedule: Arc<Vec<ScheduledStep>>,
}

struct Shared {
    state: Mutex<LoaderState>,
    cv: Condvar,
}

struct LoaderState {
    ready: BTreeMap<usize, Result<Vec<MicroBatch>>>,
    next_job: usize,
    taken: usize,
    stop: bool,
}

impl Loader {
    pub fn start(
        data: Arc<SftData>,
        processor: Arc<Processor>,
        recipe: Arc<SftRecipe>,
        schedule: Arc<Vec<ScheduledStep>>,
        workers: usize,
        depth: usize,
    ) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(LoaderState {
                ready: BTreeMap::new(),
                next_job: 0,
                taken: 0,
                stop: false,
            }),
            cv: Condvar::new(),
        });
        if workers == 0 {
            return Self {
                shared,
                threads: vec![],
                sync: Some(SyncSource {
                    data,
                    processor,
                    recipe,
                    schedule,
                }),
                taken: 0,
            };
        }
        let depth = depth.max(1);
        let threads = (0..workers)
            .map(|_| {
                let (shared, data, processor, recipe, schedule) = (
                    shared.clone(),
                    data.clone(),
                    processor.clone(),
                    recipe.clone(),
                    schedule.clone(),
                );
                std::thread::spawn(move || loop {
                    let job = {
                        let mut st = shared.state.lock().expect("loader lock");
                        loop {
                            if st.stop || st.next_job >= schedule.len() {
                                return;
                            }
                            if st.next_job < st.taken + depth {
                                break;
                            }
                            st = shared.cv.wait(st).expect("loader lock");
                        }
                        st.next_job += 1;
                        st.next_job - 1
                    };
                    let batches = data.micro_batches(&processor, &recipe, &schedule[job]);
                    let mut st = shared.state.lock().expect("loader lock");
                    st.ready.insert(job, batches);
                    shared.cv.notify_all();
                })
            })
            .collect();
        Self {
            shared,
            threads,
            sync: None,
            taken: 0,
        }
    }

    /// The micro-batches of the next scheduled step.
    pub fn next_step(&mut self) -> Result<Vec<MicroBatch>> {
        let i = self.taken;
        self.taken += 1;
        if let Some(s) = &self.sync {
            let step = s
                .schedule
                .get(i)
                .context("the loader ran past the schedule")?;
            return s.data.micro_batches(&s.processor, &s.recipe, step);
        }
        let mut st = self.shared.state.lock().expect("loader lock");
        loop {
            if let Some(r) = st.ready.remove(&i) {
                st.taken = i + 1;
                self.shared.cv.notify_all();
                return r;
            }
            if st.next_job <= i && self.threads.iter().all(|t| t.is_finished()) {
                bail!("the loader ran past the schedule");
            }
            st = self.shared.cv.wait(st).expect("loader lock");
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.stop = true;
        }
        self.shared.cv.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
