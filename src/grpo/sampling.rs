//! Which groups a step trains on. Without `algorithm.dynamic_sampling`: the groups of one round of
//! `rollout.prompts_per_step` prompts (those with all rewards equal left out of the update with
//! `drop_zero_variance_groups`). With it (DAPO's dynamic sampling; verl `filter_groups`, EasyR1
//! `online_filtering`): rounds of `prompts_per_step` new prompts are rolled out and scored, groups
//! whose rewards are all equal are dropped, until `prompts_per_step` informative groups are found
//! (the first ones found; informative groups beyond them are not used, as verl does) or
//! `algorithm.max_sampling_rounds` rounds are done (the step then trains on those it has).
//!
//! Every round draws its prompts from the seeded order ([`crate::grpo::data::next_prompts`]), so
//! the position in [`crate::learn::checkpoint::TrainState`] after a step covers all its rounds and
//! a resumed run draws what the uninterrupted run drew; every rank sees every group's rewards
//! (the generations are gathered), so all ranks keep the same groups.

use anyhow::Result;

use crate::generate::Prompt;
use crate::grpo::recipe::AlgorithmConfig;
use crate::grpo::rollout::ScoredGroups;

/// One round: the prompts rolled out (after skips) and their scored groups, `n` responses each.
pub struct Round {
    pub prompts: Vec<Prompt>,
    pub scored: ScoredGroups,
    /// Prompts of the round skipped as invalid (`skip_invalid`).
    pub skipped: usize,
}

/// The groups of a step.
pub struct StepGroups {
    /// The prompts of the groups trained on, and their groups.
    pub prompts: Vec<Prompt>,
    pub train: ScoredGroups,
    /// Every group rolled out this step, in all rounds (the step's reward metrics).
    pub all: ScoredGroups,
    pub rounds: usize,
    /// Zero-variance groups dropped by dynamic sampling.
    pub dropped: usize,
    pub skipped: usize,
}

fn informative(rewards: &[f64]) -> bool {
    rewards.iter().any(|r| *r != rewards[0])
}

/// The groups of a step (see the module docs): `round(r)` rolls out and scores round `r`.
pub fn sample_groups(
    alg: &AlgorithmConfig,
    per_step: usize,
    g: usize,
    mut round: impl FnMut(usize) -> Result<Round>,
) -> Result<StepGroups> {
    let rounds_max = if alg.dynamic_sampling {
        alg.max_sampling_rounds
    } else {
        1
    };
    let mut out = StepGroups {
        prompts: vec![],
        train: ScoredGroups::default(),
        all: ScoredGroups::default(),
        rounds: 0,
        dropped: 0,
        skipped: 0,
    };
    while out.rounds < rounds_max {
        let Round {
            prompts,
            scored,
            skipped,
        } = round(out.rounds)?;
        out.rounds += 1;
        out.skipped += skipped;
        for (k, prompt) in prompts.into_iter().enumerate() {
            let group = scored.group(k, g);
            if !alg.dynamic_sampling {
                out.train.push_group(&scored, k, g, scored.in_update[k]);
                out.prompts.push(prompt);
            } else if !informative(group.rewards) {
                out.dropped += 1;
            } else if out.prompts.len() < per_step {
                out.train.push_group(&scored, k, g, true);
                out.prompts.push(prompt);
            }
        }
        out.all.append(scored, g);
        if out.prompts.len() >= per_step {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::Generation;
    use crate::grpo::data::{epoch_order, next_prompts};
    use crate::grpo::rollout::score_groups;
    use crate::learn::checkpoint::TrainState;
    use crate::rewards::{RewardBreakdown, Task};

    const G: usize = 4;
    const N_RECORDS: usize = 40;
    const SEED: u64 = 9;

    /// Whether record `r`'s group has zero variance: `r % 4 == 0` or `r % 5 == 0` (16 of the 40
    /// records: a known share of 40%).
    fn zero_variance(r: usize) -> bool {
        r.is_multiple_of(4) || r.is_multiple_of(5)
    }

    /// Only `r % 10 >= 8` varies (8 of the 40 records: 80% zero variance).
    fn mostly_zero_variance(r: usize) -> bool {
        r % 10 < 8
    }

    /// Record `r`'s rewards: all equal when `zero(r)`, else one success in the group.
    fn rewards_of(record: usize, zero: fn(usize) -> bool) -> Vec<f64> {
        match zero(record) {
            true => vec![(record % 2) as f64; G],
            false => (0..G).map(|j| (j == record % G) as u8 as f64).collect(),
        }
    }

    fn round_of(picked: &[usize], alg: &AlgorithmConfig, zero: fn(usize) -> bool) -> Round {
        let responses = picked
            .iter()
            .flat_map(|&r| {
                (0..G).map(move |j| {
                    let gen = Generation {
                        tokens: vec![j as u32],
                        logprobs: vec![-1.0],
                        stopped: true,
                    };
                    (r, gen)
                })
            })
            .collect();
        let reward = |record: usize, text: &str, _: usize| RewardBreakdown {
            task: Task::Mcq,
            format: 1.0,
            accuracy: 0.0,
            reward: rewards_of(record, zero)[text.parse::<usize>().unwrap()],
            extracted: None,
        };
        let scored = score_groups(
            responses,
            |t| Ok(t[0].to_string()),
            reward,
            G,
            true,
            alg.drop_zero_variance_groups,
        )
        .unwrap();
        Round {
            prompts: picked
                .iter()
                .map(|&r| Prompt {
                    input_ids: vec![r as u32],
                    ..Prompt::default()
                })
                .collect(),
            scored,
            skipped: 0,
        }
    }

    /// `steps` steps from `state`: per step the records trained on and the rounds.
    fn run(
        state: &mut TrainState,
        alg: &AlgorithmConfig,
        (per_step, steps): (usize, usize),
        zero: fn(usize) -> bool,
    ) -> Vec<(Vec<usize>, usize, usize)> {
        let mut order = epoch_order(N_RECORDS, SEED, state.epoch);
        (0..steps)
            .map(|_| {
                let s = sample_groups(alg, per_step, G, |_| {
                    let picked = next_prompts(state, &mut order, N_RECORDS, per_step, SEED);
                    Ok(round_of(&picked, alg, zero))
                })
                .unwrap();
                state.step += 1;
                let records: Vec<usize> =
                    s.prompts.iter().map(|p| p.input_ids[0] as usize).collect();
                let train_records: Vec<usize> = s
                    .train
                    .rollouts
                    .iter()
                    .step_by(G)
                    .map(|r| r.record)
                    .collect();
                assert_eq!(records, train_records);
                assert_eq!(s.all.rollouts.len(), s.rounds * per_step * G);
                let zero: usize = s
                    .all
                    .rollouts
                    .iter()
                    .step_by(G)
                    .filter(|r| zero(r.record))
                    .count();
                assert_eq!(s.dropped, zero, "every zero-variance group is dropped");
                (records, s.rounds, s.dropped)
            })
            .collect()
    }

    fn state() -> TrainState {
        TrainState {
            seed: SEED,
            ..TrainState::default()
        }
    }

    #[test]
    fn dynamic_sampling_fills_every_step_within_the_round_bound_and_resumes() {
        let alg = AlgorithmConfig {
            dynamic_sampling: true,
            max_sampling_rounds: 4,
            ..AlgorithmConfig::default()
        };
        let per_step = 5;
        let mut a = state();
        let whole = run(&mut a, &alg, (per_step, 12), zero_variance);
        for (step, (records, rounds, _)) in whole.iter().enumerate() {
            assert_eq!(records.len(), per_step, "step {step} filled");
            assert!(records.iter().all(|&r| !zero_variance(r)));
            assert!((1..=4).contains(rounds), "step {step}: {rounds} rounds");
        }
        // 40% zero variance: some steps need a second round, and the draws go on into epoch 2.
        assert!(whole.iter().any(|s| s.1 > 1));
        assert!(a.epoch >= 2, "{a:?}");
        // Stop after 5 steps (the state as a checkpoint holds it), resume: the same prompts.
        let mut b = state();
        let first = run(&mut b, &alg, (per_step, 5), zero_variance);
        let saved: TrainState = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        let mut resumed = saved;
        let rest = run(&mut resumed, &alg, (per_step, 7), zero_variance);
        assert_eq!([first, rest].concat(), whole);
        assert_eq!(
            (resumed.epoch, resumed.batch_in_epoch),
            (a.epoch, a.batch_in_epoch)
        );
    }

    #[test]
    fn the_round_bound_holds_when_groups_are_scarce() {
        let alg = AlgorithmConfig {
            dynamic_sampling: true,
            max_sampling_rounds: 2,
            ..AlgorithmConfig::default()
        };
        // 5 informative groups wanted, at most 2 x 5 prompts drawn, 20% informative: most
        // steps stop at the bound with fewer groups (and then no informative group is unused).
        let mut s = state();
        let steps = run(&mut s, &alg, (5, 8), mostly_zero_variance);
        for (records, rounds, dropped) in &steps {
            assert!((1..=2).contains(rounds));
            if records.len() < 5 {
                assert_eq!((*rounds, records.len() + dropped), (2, 10));
            }
        }
        assert!(
            steps.iter().filter(|s| s.0.len() < 5).count() >= 4,
            "{steps:?}"
        );
    }

    #[test]
    fn without_dynamic_sampling_one_round_keeps_every_group() {
        let alg = AlgorithmConfig {
            drop_zero_variance_groups: true,
            ..AlgorithmConfig::default()
        };
        let mut s = state();
        let mut order = epoch_order(N_RECORDS, SEED, 0);
        let out = sample_groups(&alg, 8, G, |r| {
            assert_eq!(r, 0);
            let picked = next_prompts(&mut s, &mut order, N_RECORDS, 8, SEED);
            Ok(round_of(&picked, &alg, zero_variance))
        })
        .unwrap();
        assert_eq!((out.rounds, out.dropped, out.prompts.len()), (1, 0, 8));
        let zero = out.train.in_update.iter().filter(|k| !**k).count();
        assert_eq!(zero, out.train.zero_variance);
    }
}
