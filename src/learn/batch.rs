//! Micro-batches: encoded samples right-padded into one model input (one sample per row, or
//! several packed into each row), with their labels.

use crate::data::encode::Encoded;
use crate::model::ModelInput;

/// A right-padded micro-batch.
pub struct MicroBatch {
    pub input: ModelInput,
    pub labels: Vec<Vec<Option<u32>>>,
    pub target_tokens: usize,
    pub samples: usize,
}

pub fn collate(samples: &[&Encoded], pad_id: u32) -> MicroBatch {
    let t = samples.iter().map(|e| e.input_ids.len()).max().unwrap_or(0);
    let mut input = ModelInput {
        attention_mask: Some(vec![]),
        ..Default::default()
    };
    let mut labels = vec![];
    let mut target_tokens = 0;
    for e in samples {
        let pad = t - e.input_ids.len();
        let mut ids = e.input_ids.clone();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        let mut mask = vec![true; e.input_ids.len()];
        mask.extend(std::iter::repeat_n(false, pad));
        let mut l = e.labels.clone();
        l.extend(std::iter::repeat_n(None, pad));
        target_tokens += e.labels.iter().skip(1).filter(|x| x.is_some()).count();
        input.input_ids.push(ids);
        input.attention_mask.as_mut().unwrap().push(mask);
        input.pixel_values.extend_from_slice(&e.pixel_values);
        input.image_grids.extend_from_slice(&e.image_grids);
        labels.push(l);
    }
    MicroBatch {
        input,
        labels,
        target_tokens,
        samples: samples.len(),
    }
}

/// Packed rows (LLaMA-Factory's `neat_packing`): each row holds several samples one after
/// another, then right padding to the longest row. Every token carries its sample's id
/// (`ModelInput::segments`), so attention stays within a sample and M-RoPE positions restart
/// per sample; a sample's first token has no label, so no target is predicted across a
/// boundary; `target_tokens` counts what [`collate`] counts for the same samples, so the loss
/// (mean over target tokens) is the same as without packing.
pub fn collate_packed(rows: &[Vec<&Encoded>], pad_id: u32) -> MicroBatch {
    let t = rows
        .iter()
        .map(|r| r.iter().map(|e| e.input_ids.len()).sum::<usize>())
        .max()
        .unwrap_or(0);
    let mut input = ModelInput {
        segments: Some(vec![]),
        ..Default::default()
    };
    let (mut labels, mut target_tokens, mut samples) = (vec![], 0, 0);
    for row in rows {
        let (mut ids, mut seg, mut lab) = (
            Vec::with_capacity(t),
            Vec::with_capacity(t),
            Vec::with_capacity(t),
        );
        for (s, e) in row
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.input_ids.is_empty())
        {
            ids.extend_from_slice(&e.input_ids);
            seg.extend(std::iter::repeat_n(s as i32, e.input_ids.len()));
            lab.push(None);
            lab.extend_from_slice(&e.labels[1..]);
            target_tokens += e.labels.iter().skip(1).filter(|x| x.is_some()).count();
            input.pixel_values.extend_from_slice(&e.pixel_values);
            input.image_grids.extend_from_slice(&e.image_grids);
        }
        let pad = t - ids.len();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        seg.extend(std::iter::repeat_n(-1, pad));
        lab.extend(std::iter::repeat_n(None, pad));
        samples += row.len();
        input.input_ids.push(ids);
        input.segments.as_mut().unwrap().push(seg);
        labels.push(lab);
    }
    MicroBatch {
        input,
        labels,
        target_tokens,
        samples,
    }
}

/// Pack samples (given by their lengths, in order) into rows of at most `cutoff_len` tokens:
/// first-fit decreasing within windows of `window` consecutive samples, so that rows fill well
/// while the seeded order still decides which samples train together. Returns, per row, the
/// indices into `lengths` (a row holds at least one sample; a sample longer than `cutoff_len`,
/// which truncation never leaves, gets a row of its own).
pub fn pack_rows(lengths: &[usize], cutoff_len: usize, window: usize) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = vec![];
    let window = window.max(1);
    for start in (0..lengths.len()).step_by(window) {
        let end = (start + window).min(lengths.len());
        let mut idx: Vec<usize> = (start..end).collect();
        idx.sort_by(|&a, &b| lengths[b].cmp(&lengths[a])); // stable: ties keep the order
        let mut open: Vec<(usize, Vec<usize>)> = vec![]; // (tokens, samples)
        for i in idx {
            match open
                .iter_mut()
                .find(|(used, _)| used + lengths[i] <= cutoff_len)
            {
                Some((used, r)) => {
                    *used += lengths[i];
                    r.push(i);
                }
                None => open.push((lengths[i], vec![i])),
            }
        }
        rows.extend(open.into_iter().map(|(_, r)| r));
    }
    rows
}
