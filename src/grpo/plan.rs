//! The GRPO plan (`infimed grpo --dry-run`): prompts, steps, updates and the objective, from the
//! recipe and the number of prompt records.

use crate::grpo::recipe::GrpoRecipe;

/// The plan as printed by `--dry-run` (`n_prompts` is `None` while the data file does not exist).
pub fn describe(recipe: &GrpoRecipe, n_prompts: Option<usize>, n_skipped: usize) -> String {
    let steps = n_prompts.map(|n| recipe.total_steps(n));
    let show = |x: Option<usize>| x.map_or("?".to_string(), |v| v.to_string());
    format!(
        "grpo plan: {} prompts ({} skipped as invalid), {} per step x n = {} -> {} responses per step\n  \
         {} steps ({} epochs), {} optimizer updates per step (mini-batch {} prompts, micro-batch {} responses, {} ppo epochs), {} updates in all\n  \
         lr {} ({}), kl {} x {}, clip [{}, {}], {:?} policy loss, {}, reward {} x format + {} x accuracy ({}){}",
        show(n_prompts),
        n_skipped,
        recipe.rollout.prompts_per_step,
        recipe.rollout.n,
        recipe.rollout.prompts_per_step * recipe.rollout.n,
        show(steps),
        recipe.epochs,
        recipe.updates_per_step(),
        recipe.ppo.mini_batch,
        recipe.ppo.micro_batch,
        recipe.ppo.epochs,
        show(steps.map(|s| s * recipe.updates_per_step())),
        recipe.optimizer.lr,
        recipe.schedule.kind,
        recipe.algorithm.kl_coef,
        recipe.algorithm.kl_kind,
        1.0 - recipe.algorithm.clip_low,
        1.0 + recipe.algorithm.clip_high,
        recipe.algorithm.policy_loss,
        recipe.algorithm.loss_agg,
        recipe.reward.format_weight,
        recipe.reward.accuracy_weight,
        recipe.reward.format,
        match recipe.algorithm.dynamic_sampling {
            true => format!(
                "\n  dynamic sampling: up to {} rounds of {} prompts per step",
                recipe.algorithm.max_sampling_rounds, recipe.rollout.prompts_per_step
            ),
            false => String::new(),
        },
    )
}
