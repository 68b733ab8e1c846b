//! Positions: the vision tower's 2D rotary table and window index, and the language model's
//! M-RoPE (`get_rope_index`, `rope_delta`). Everything here is host-side integer work on small
//! arrays; the cos/sin tables are uploaded once per forward pass.

use anyhow::{bail, Result};

/// `inv_freq[j] = 1 / theta^(2j / dim)` computed in f32 as torch does.
pub fn inv_freq(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim / 2)
        .map(|j| {
            let exponent = (2 * j) as f32 / dim as f32;
            1.0f32 / (theta as f32).powf(exponent)
        })
        .collect()
}

/// Per patch `(h, w)` positions, in the processor's merge-unit row order, for every image.
pub fn vision_patch_positions(grids: &[[usize; 3]], merge: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            for br in 0..h / merge {
                for bc in 0..w / merge {
                    for ir in 0..merge {
                        for ic in 0..merge {
                            out.push((br * merge + ir, bc * merge + ic));
                        }
                    }
                }
            }
        }
    }
    out
}

/// cos/sin tables `[n_patches, head_dim]` of the vision rotary embedding for the given patch
/// positions: `rot = cat(freqs[h], freqs[w])` (head_dim / 2 values), `emb = cat(rot, rot)`.
pub fn vision_cos_sin(positions: &[(usize, usize)], head_dim: usize) -> (Vec<f32>, Vec<f32>) {
    let rot_dim = head_dim / 2;
    let inv = inv_freq(rot_dim, 10000.0);
    let half = inv.len(); // rot_dim / 2
    let mut cos = Vec::with_capacity(positions.len() * head_dim);
    let mut sin = Vec::with_capacity(positions.len() * head_dim);
    let mut row = vec![0f32; head_dim];
    for &(h, w) in positions {
        for j in 0..half {
            row[j] = h as f32 * inv[j];
            row[half + j] = w as f32 * inv[j];
        }
        let (a, b) = row.split_at_mut(rot_dim);
        b.copy_from_slice(a);
        for &f in row.iter() {
            cos.push(f.cos());
            sin.push(f.sin());
        }
    }
    (cos, sin)
}

/// `get_window_index`: the order in which merged units are visited so that each window's
/// units are consecutive, and the cumulative window boundaries in patches.
///
/// Returns `(window_index, cu_window_seqlens)`; `window_index` holds merged-unit indices (one
/// per `merge^2` patches), `cu_window_seqlens` starts at 0 and has consecutive duplicates
/// (empty windows) removed.
pub fn window_index(
    grids: &[[usize; 3]],
    merge: usize,
    window_units: usize,
) -> (Vec<usize>, Vec<usize>) {
    let unit = merge * merge;
    let vw = window_units;
    let mut index = Vec::new();
    let mut cu = vec![0usize];
    let mut offset = 0usize;
    for &[t, h, w] in grids {
        let (lh, lw) = (h / merge, w / merge);
        let pad_h = vw - lh % vw;
        let pad_w = vw - lw % vw;
        let (nh, nw) = ((lh + pad_h) / vw, (lw + pad_w) / vw);
        for ti in 0..t {
            for wy in 0..nh {
                for wx in 0..nw {
                    let mut count = 0;
                    for y in wy * vw..(wy + 1) * vw {
                        for x in wx * vw..(wx + 1) * vw {
                            if y < lh && x < lw {
                                index.push(offset + ti * lh * lw + y * lw + x);
                                count += 1;
                            }
                        }
                    }
                    let last = *cu.last().unwrap();
                    cu.push(last + count * unit);
                }
            }
        }
        offset += t * lh * lw;
    }
    cu.dedup();
    (index, cu)
}

/// Attention segments of the full-attention blocks: one per frame of each image, cumulative.
pub fn full_cu_seqlens(grids: &[[usize; 3]]) -> Vec<usize> {
    let mut cu = vec![0usize];
    for &[t, h, w] in grids {
        for _ in 0..t {
            let last = *cu.last().unwrap();
            cu.push(last + h * w);
        }
    }
    cu
}

/// `argsort` of a permutation.
pub fn inverse_permutation(p: &[usize]) -> Vec<usize> {
    let mut inv = vec![0usize; p.len()];
    for (i, &x) in p.iter().enumerate() {
        inv[x] = i;
    }
    inv
}

/// M-RoPE position ids of one (unpadded) sequence: `get_rope_index` for images.
///
/// Returns the three rows (t, h, w) and `rope_delta = max(position) + 1 - len`.
/// Every run of `image_token_id` tokens takes the next grid (in order) and must hold exactly
/// `t * (h / merge) * (w / merge)` tokens.
pub fn rope_index(
    ids: &[u32],
    image_token_id: Option<u32>,
    grids: &[[usize; 3]],
    merge: usize,
) -> Result<([Vec<i64>; 3], i64)> {
    let n = ids.len();
    let mut pos: [Vec<i64>; 3] = [
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    ];
    let mut next = 0i64; // max position so far + 1
    let mut i = 0usize;
    let mut grid_iter = grids.iter();
    while i < n {
        if Some(ids[i]) == image_token_id {
            let Some(&[t, h, w]) = grid_iter.next() else {
                bail!(
                    "more image tokens than images ({} grids given)",
                    grids.len()
                );
            };
            let (lh, lw) = (h / merge, w / merge);
            let count = t * lh * lw;
            if i + count > n || ids[i..i + count].iter().any(|&x| Some(x) != image_token_id) {
                let run = ids[i..]
                    .iter()
                    .take_while(|&&x| Some(x) == image_token_id)
                    .count();
                bail!("an image of grid [{t}, {h}, {w}] needs {count} image tokens, the run at token {i} has {run}");
            }
            let base = next;
            let mut max = base;
            for _ti in 0..t {
                for r in 0..lh {
                    for c in 0..lw {
                        // Images: the temporal index is always 0.
                        pos[0].push(base);
                        pos[1].push(base + r as i64);
                        pos[2].push(base + c as i64);
                        max = max.max(base + (r.max(c)) as i64);
                    }
                }
            }
            next = max + 1;
            i += count;
        } else {
            for row in pos.iter_mut() {
                row.push(next);
            }
            next += 1;
            i += 1;
        }
    }
    if grid_iter.next().is_some() {
        bail!(
            "fewer image token runs than images ({} grids given)",
            grids.len()
        );
    }
    let delta = next - n as i64;
    Ok((pos, delta))
}

/// Positions of a padded batch row: real tokens get `rope_index` of the unpadded sequence,
/// padding gets 1 (as transformers fills it). The delta is relative to the padded length, so a
/// token at cache index `i` decodes at position `i + delta` on all three rows.
pub fn rope_index_padded(
    ids: &[u32],
    valid: &[bool],
    image_token_id: Option<u32>,
    grids: &[[usize; 3]],
    merge: usize,
) -> Result<([Vec<i64>; 3], i64)> {
    let real: Vec<u32> = ids
        .iter()
        .zip(valid)
        .filter(|(_, &v)| v)
        .map(|(&x, _)| x)
        .collect();
    let (p, _) = rope_index(&real, image_token_id, grids, merge)?;
    let mut out: [Vec<i64>; 3] = [vec![1; ids.len()], vec![1; ids.len()], vec![1; ids.len()]];
    let mut k = 0;
    let mut max = -1i64;
    for (j, &v) in valid.iter().enumerate() {
        if v {
            for r in 0..3 {
                out[r][j] = p[r][k];
                max = max.max(p[r][k]);
            }
            k += 1;
        }
    }
    Ok((out, max + 1 - ids.len() as i64))
}

/// Positions of a packed batch row (several samples one after another, then padding):
/// `segments[j]` is the sample of token `j` (-1: padding). Each sample's tokens get
/// `rope_index` of that sample alone, as if it were its own row (positions restart at 0); its
/// images are the next grids in order. Padding gets 1.
pub fn rope_index_packed(
    ids: &[u32],
    segments: &[i32],
    image_token_id: Option<u32>,
    grids: &[[usize; 3]],
    merge: usize,
) -> Result<[Vec<i64>; 3]> {
    let unit = merge * merge;
    let mut out: [Vec<i64>; 3] = [vec![1; ids.len()], vec![1; ids.len()], vec![1; ids.len()]];
    let mut grids = grids.iter();
    let mut start = 0;
    while start < ids.len() {
        let seg = segments[start];
        let mut end = start + 1;
        while end < ids.len() && segments[end] == seg {
            end += 1;
        }
        if seg >= 0 {
            let span = &ids[start..end];
            let n_img = span.iter().filter(|&&x| Some(x) == image_token_id).count();
            let mut mine = vec![];
            let mut have = 0;
            while have < n_img {
                let Some(g) = grids.next() else {
                    bail!("packed sample at token {start} holds {n_img} image tokens but the image grids run out after {have}");
                };
                have += g[0] * g[1] * g[2] / unit;
                mine.push(*g);
            }
            let (p, _) = rope_index(span, image_token_id, &mine, merge)?;
            for r in 0..3 {
                out[r][start..end].copy_from_slice(&p[r]);
            }
        }
        start = end;
    }
    if grids.next().is_some() {
        bail!("more images than image token runs in the packed row");
    }
    Ok(out)
}

/// cos/sin tables `[n, head_dim]` of M-RoPE for `n` positions given as three rows (t, h, w).
/// Dimension `d` uses frequency `d % (head_dim/2)` and the row of the section it falls in.
pub fn mrope_cos_sin(
    pos: [&[i64]; 3],
    head_dim: usize,
    theta: f64,
    section: [usize; 3],
) -> (Vec<f32>, Vec<f32>) {
    let inv = inv_freq(head_dim, theta);
    let half = head_dim / 2;
    let row_of: Vec<usize> = (0..half)
        .map(|j| {
            if j < section[0] {
                0
            } else if j < section[0] + section[1] {
                1
            } else {
                2
            }
        })
        .collect();
    let n = pos[0].len();
    let mut cos = Vec::with_capacity(n * head_dim);
    let mut sin = Vec::with_capacity(n * head_dim);
    let mut tmp_c = vec![0f32; half];
    let mut tmp_s = vec![0f32; half];
    // `pos` is indexed by (section row of frequency j, token i): no single iterator walks it.
    #[allow(clippy::needless_range_loop)]
    for i in 0..n {
        for j in 0..half {
            let f = pos[row_of[j]][i] as f32 * inv[j];
            tmp_c[j] = f.cos();
            tmp_s[j] = f.sin();
        }
        cos.extend_from_slice(&tmp_c);
        cos.extend_from_slice(&tmp_c);
        sin.extend_from_slice(&tmp_s);
        sin.extend_from_slice(&tmp_s);
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_index_worked_example() {
        let (idx, cu) = window_index(&[[1, 12, 20]], 2, 4);
        let mut expect: Vec<usize> =
            vec![0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33];
        for base in [4usize, 14, 24, 34] {
            expect.extend(base..base + 4);
        }
        expect.extend([8, 9, 18, 19, 28, 29, 38, 39]);
        expect.extend((40..44).chain(50..54));
        expect.extend((44..48).chain(54..58));
        expect.extend([48, 49, 58, 59]);
        assert_eq!(idx, expect);
        assert_eq!(cu, vec![0, 64, 128, 160, 192, 224, 240]);
    }

    #[test]
    fn window_index_offsets_second_image_and_handles_divisible_grids() {
        // 8x8 patches = 4x4 units: exactly one window, then padding adds empty windows.
        let (idx, cu) = window_index(&[[1, 8, 8], [1, 4, 4]], 2, 4);
        assert_eq!(idx, (0..20).collect::<Vec<_>>());
        assert_eq!(cu, vec![0, 64, 80]);
    }

    #[test]
    fn rope_index_worked_example() {
        // [A, B, <vs>, 6 pads (grid 1,4,6), <ve>, C, D]
        let p = 9u32;
        let ids = [1, 2, 3, p, p, p, p, p, p, 4, 5, 6];
        let (pos, delta) = rope_index(&ids, Some(p), &[[1, 4, 6]], 2).unwrap();
        assert_eq!(pos[0], vec![0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8]);
        assert_eq!(pos[1], vec![0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8]);
        assert_eq!(pos[2], vec![0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]);
        assert_eq!(delta, -3);
    }

    #[test]
    fn rope_index_text_only_is_arange() {
        let (pos, delta) = rope_index(&[5, 6, 7], Some(9), &[], 2).unwrap();
        assert_eq!(pos[0], vec![0, 1, 2]);
        assert_eq!(delta, 0);
    }

    #[test]
    fn rope_index_rejects_count_mismatch() {
        assert!(rope_index(&[9, 9, 9], Some(9), &[[1, 4, 6]], 2).is_err());
        assert!(rope_index(&[1, 2], Some(9), &[[1, 2, 2]], 2).is_err());
    }

    #[test]
    fn packed_samples_restart_positions() {
        let p = 9u32;
        let a = [1u32, 2, 3, p, p, p, p, p, p, 4, 5, 6];
        let b = [7u32, 8];
        let mut ids = a.to_vec();
        ids.extend_from_slice(&b);
        ids.extend_from_slice(&[0, 0]);
        let mut seg = vec![0; a.len()];
        seg.extend([1, 1, -1, -1]);
        let pos = rope_index_packed(&ids, &seg, Some(p), &[[1, 4, 6]], 2).unwrap();
        let (pa, _) = rope_index(&a, Some(p), &[[1, 4, 6]], 2).unwrap();
        for r in 0..3 {
            assert_eq!(&pos[r][..a.len()], &pa[r][..]);
            assert_eq!(&pos[r][a.len()..], &[0, 1, 1, 1]);
        }
    }

    #[test]
    fn left_padding_keeps_unpadded_positions() {
        let p = 9u32;
        let ids = [0, 0, 1, 2, 3, p, p, p, p, p, p, 4, 5, 6];
        let valid = [
            false, false, true, true, true, true, true, true, true, true, true, true, true, true,
        ];
        let (pos, delta) = rope_index_padded(&ids, &valid, Some(p), &[[1, 4, 6]], 2).unwrap();
        assert_eq!(&pos[1][2..], &[0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8]);
        // next token (cache index 14) decodes at 14 + delta = 9
        assert_eq!(14 + delta, 9);
    }
}
