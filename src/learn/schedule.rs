//! Learning-rate schedules, as HF transformers computes them (`get_*_schedule_with_warmup`).
//!
//! `step` is the index of the optimizer step about to be taken (0-based, as HF's `LambdaLR`: the
//! first update uses `lr_at(.., 0, ..)`, which is 0 during warmup), `total` the number of
//! optimizer steps of the whole run (all epochs), `W = warmup_steps(total, warmup_ratio)`:
//!
//! - warmup (`t < W`): `base * t / max(1, W)`
//! - cosine: `base * max(0, 0.5 * (1 + cos(pi * p)))`, `p = (t - W) / max(1, T - W)`
//! - linear: `base * max(0, (T - t) / max(1, T - W))`
//! - constant: `base`
//!
//! With `min_lr_ratio = r`, after warmup the factor `f` becomes `f * (1 - r) + r`
//! (HF's `cosine_with_min_lr`). Steps past `total` keep the value at `total` (HF's cosine would
//! rise again; it is never called there).

use serde::{Deserialize, Serialize};

/// Learning-rate schedule shape (see [`crate::learn::schedule::lr_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// HF `get_cosine_schedule_with_warmup` (LLaMA-Factory's default).
    #[default]
    Cosine,
    /// HF `get_constant_schedule_with_warmup`.
    Constant,
    /// HF `get_linear_schedule_with_warmup`.
    Linear,
}

impl std::fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScheduleKind::Cosine => "cosine",
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
        })
    }
}

/// `[schedule]`: shape, linear warmup over `ceil(total_steps * warmup_ratio)` optimizer steps,
/// and an optional floor `min_lr_ratio * lr` after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    #[serde(default)]
    pub kind: ScheduleKind,
    #[serde(default)]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub min_lr_ratio: f64,
}

impl ScheduleConfig {
    pub fn check(&self, field: &str, errors: &mut Vec<String>) {
        if !(self.warmup_ratio.is_finite() && (0.0..=1.0).contains(&self.warmup_ratio)) {
            errors.push(format!(
                "{field}.warmup_ratio must be in [0, 1], got {}",
                self.warmup_ratio
            ));
        }
        if !(self.min_lr_ratio.is_finite() && (0.0..=1.0).contains(&self.min_lr_ratio)) {
            errors.push(format!(
                "{field}.min_lr_ratio must be in [0, 1], got {}",
                self.min_lr_ratio
            ));
        }
    }
}

/// Warmup steps as HF: `ceil(total * ratio)` in f64 (so, like HF, `ceil(100 * 0.07) = 8` because
/// `100.0 * 0.07 = 7.000000000000001`).
pub fn warmup_steps(total: usize, ratio: f64) -> usize {
    (total as f64 * ratio).ceil() as usize
}

/// The multiplier of the base learning rate at optimizer step `step` of `total`.
pub fn lr_lambda(cfg: &ScheduleConfig, step: usize, total: usize) -> f64 {
    let w = warmup_steps(total, cfg.warmup_ratio);
    if step < w {
        return step as f64 / w.max(1) as f64;
    }
    let t = step.min(total.max(w));
    let decay_len = total.saturating_sub(w).max(1) as f64;
    let factor = match cfg.kind {
        ScheduleKind::Constant => 1.0,
        ScheduleKind::Cosine => {
            let progress = ((t - w) as f64 / decay_len).min(1.0);
            (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
        }
        ScheduleKind::Linear => (total.saturating_sub(t) as f64 / decay_len).max(0.0),
    };
    let r = cfg.min_lr_ratio;
    if r > 0.0 {
        (factor * (1.0 - r) + r).max(0.0)
    } else {
        factor
    }
}

/// The learning rate at optimizer step `step` of `total` (see the module docs).
pub fn lr_at(cfg: &ScheduleConfig, base_lr: f64, step: usize, total_steps: usize) -> f64 {
    base_lr * lr_lambda(cfg, step, total_steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(warmup_ratio: f64) -> ScheduleConfig {
        ScheduleConfig {
            kind: ScheduleKind::Cosine,
            warmup_ratio,
            min_lr_ratio: 0.0,
        }
    }

    #[test]
    fn hf_cosine_reference_values() {
        let cfg = cosine(0.1);
        let want = [
            (0, 0.0),
            (1, 5e-7),
            (5, 2.5e-6),
            (10, 5e-6),
            (11, 4.99847706754774e-06),
            (55, 2.5e-06),
            (99, 1.5229324522605949e-09),
        ];
        for (t, w) in want {
            let got = lr_at(&cfg, 5e-6, t, 100);
            if w == 0.0 {
                assert_eq!(got, 0.0, "step {t}");
            } else {
                assert!(((got - w) / w).abs() < 1e-12, "step {t}: {got} vs {w}");
            }
        }
    }

    #[test]
    fn hf_warmup_rounding() {
        assert_eq!(warmup_steps(100, 0.1), 10);
        assert_eq!(warmup_steps(100, 0.07), 8); // as math.ceil(100 * 0.07) in Python
        assert_eq!(warmup_steps(30, 0.1), 3);
        assert_eq!(warmup_steps(7, 0.0), 0);
        assert_eq!(warmup_steps(7, 1.0), 7);
    }

    #[test]
    fn linear_constant_min_lr() {
        let lin = ScheduleConfig {
            kind: ScheduleKind::Linear,
            warmup_ratio: 0.1,
            min_lr_ratio: 0.0,
        };
        assert_eq!(lr_at(&lin, 1.0, 10, 100), 1.0);
        assert!((lr_at(&lin, 1.0, 55, 100) - 0.5).abs() < 1e-15);
        assert_eq!(lr_at(&lin, 1.0, 100, 100), 0.0);
        let con = ScheduleConfig {
            kind: ScheduleKind::Constant,
            warmup_ratio: 0.1,
            min_lr_ratio: 0.0,
        };
        assert_eq!(lr_at(&con, 2.0, 5, 100), 1.0);
        assert_eq!(lr_at(&con, 2.0, 99, 100), 2.0);
        let min = ScheduleConfig {
            kind: ScheduleKind::Cosine,
            warmup_ratio: 0.0,
            min_lr_ratio: 0.1,
        };
        assert!((lr_at(&min, 1.0, 100, 100) - 0.1).abs() < 1e-15);
        assert_eq!(lr_at(&min, 1.0, 0, 100), 1.0);
        // Past the end: stays at the floor.
        assert_eq!(lr_at(&cosine(0.0), 1.0, 150, 100), 0.0);
    }
}
