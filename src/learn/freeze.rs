//! What trains: stable parameter ids, freezing by part (LLaMA-Factory's units), parameter counts.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

use crate::model::Qwen25VL;

/// Which parts of Qwen2.5-VL are frozen. LLaMA-Factory's parts for qwen2_5_vl: vision tower =
/// `visual.patch_embed` + `visual.blocks`; projector = `visual.merger`; language model =
/// `language_model` (embeddings, layers, final norm) + `lm_head` (tied to the embeddings in the 3B).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeConfig {
    #[serde(default = "yes")]
    pub vision_tower: bool,
    #[serde(default = "yes")]
    pub projector: bool,
    #[serde(default)]
    pub language_model: bool,
}

fn yes() -> bool {
    true
}

impl Default for FreezeConfig {
    /// The paper's setting (and LLaMA-Factory's defaults): vision tower and projector frozen,
    /// language model trained.
    fn default() -> Self {
        Self {
            vision_tower: true,
            projector: true,
            language_model: false,
        }
    }
}

impl FreezeConfig {
    pub fn check(&self, field: &str, errors: &mut Vec<String>) {
        if self.vision_tower && self.projector && self.language_model {
            errors.push(format!(
                "{field}: every part is frozen (vision_tower, projector, language_model): nothing to train"
            ));
        }
    }
}

/// Give every parameter an id from its position in the module tree, so optimizer state saved
/// by one process matches the parameters of the next (burn draws ids at random by default).
pub fn assign_stable_param_ids<B: Backend, M: Module<B>>(module: M) -> M {
    struct Ids(u64);
    impl<B: Backend> ModuleMapper<B> for Ids {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (_, tensor, mapper) = param.consume();
            self.0 += 1;
            Param::from_mapped_value(ParamId::from(self.0), tensor, mapper)
        }
    }
    module.map(&mut Ids(0))
}

/// Freeze parts of the model as LLaMA-Factory does for qwen2_5_vl: vision tower =
/// `visual.patch_embed` + `visual.blocks`; projector = `visual.merger`; language model =
/// `model.*` + `lm_head`. Frozen parameters get no gradient and no optimizer state.
pub fn apply_freeze<B: AutodiffBackend>(
    mut model: Qwen25VL<B>,
    freeze: &FreezeConfig,
) -> Qwen25VL<B> {
    if freeze.vision_tower {
        model.visual.patch_embed = model.visual.patch_embed.no_grad();
        model.visual.blocks = model
            .visual
            .blocks
            .into_iter()
            .map(|b| b.no_grad())
            .collect();
    }
    if freeze.projector {
        model.visual.merger = model.visual.merger.no_grad();
    }
    if freeze.language_model {
        model.model = model.model.no_grad();
        model.lm_head = model.lm_head.map(|h| h.no_grad());
    }
    model
}

/// Trainable and frozen parameter counts of a model as it is.
pub fn count_params<B: Backend, M: Module<B>>(module: &M) -> (usize, usize) {
    struct Count(usize, usize);
    impl<B: Backend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let n = param.shape().num_elements();
            if param.is_require_grad() {
                self.0 += n
            } else {
                self.1 += n
            }
        }
    }
    let mut c = Count(0, 0);
    module.visit(&mut c);
    (c.0, c.1)
}
