//! A loaded causal LM for scoring and sampling: base weights (optionally with a training
//! artifact applied), its tokenizer, and the device.

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{D, DType, Device, Tensor};

use crate::config::LlamaConfig;
use crate::data::{Example, Record, make_batch};
use crate::error::{CandleContext, MlError};
use crate::eval::load_model;
use crate::loader::{WeightDtype, load_tokenizer};
use crate::model::{Llama, Mode, masked_nll_sum};
use crate::model_dir::ModelDir;
use crate::scoring::{HellaSwagScorer, PackedGroup, ScoringModel};
use crate::tokenizer::TextTokenizer;

/// A model ready for inference.
pub struct CausalLm {
    llama: Llama,
    cfg: LlamaConfig,
    tok: TextTokenizer,
    device: Device,
    /// The weights arranged for batched scoring, built on first use.
    scoring: OnceLock<ScoringModel>,
}

impl std::fmt::Debug for CausalLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CausalLm")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// A record's token ids and, for each, whether it is a training target.
pub type TrainingTokens = (Vec<u32>, Vec<bool>);

impl CausalLm {
    /// Loads the model in `model` (with `artifact`, a LoRA adapter or full weights, applied
    /// when given) on `device`, its weights memory-mapped in `dtype` (`auto`: f32 on CPU,
    /// bf16 on a GPU; LoRA adapters stay f32).
    pub fn load(
        model: &ModelDir,
        artifact: Option<&Path>,
        dtype: WeightDtype,
        device: &Device,
    ) -> Result<CausalLm, MlError> {
        let cfg = model.config()?;
        let tok = load_tokenizer(model, &cfg)?;
        let mut llama = load_model(model, &cfg, artifact, dtype.resolve(device), device)?;
        llama
            .pack_frozen_for_cpu()
            .ctx("packing the weights for inference")?;
        Ok(CausalLm {
            llama,
            cfg,
            tok,
            device: device.clone(),
            scoring: OnceLock::new(),
        })
    }

    pub(crate) fn llama(&self) -> &Llama {
        &self.llama
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tok
    }

    /// The token ids a record trains on, and which of them are targets (the response of
    /// an instruction, the assistant turns of a conversation, all of plain text), exactly
    /// as training and scoring tokenize it (chat template included). None: nothing left
    /// to train on within `max_seq_len` tokens.
    pub fn training_tokens(
        &self,
        record: &Record,
        max_seq_len: usize,
    ) -> Result<Option<TrainingTokens>, MlError> {
        Ok(crate::data::tokenize(
            &self.tok,
            &self.cfg,
            std::slice::from_ref(record),
            max_seq_len,
        )?
        .pop()
        .map(|e| (e.ids, e.trained)))
    }

    /// Next-token logits after every position of `ids`: `ids.len()` rows of `vocab_size`.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<Vec<f32>>, MlError> {
        self.check_ids(ids)?;
        let t = ids.len();
        let input = Tensor::from_vec(ids.to_vec(), (1, t), &self.device).ctx("making input")?;
        let mask = Tensor::ones((1, t), DType::F32, &self.device).ctx("making mask")?;
        let logits = self
            .llama
            .forward(&input, &mask, Mode::Infer)
            .ctx("running the model")?;
        logits
            .squeeze(0)
            .and_then(|l| l.to_vec2::<f32>())
            .ctx("reading logits")
    }

    /// For each `(context, continuation)` pair of token ids, the summed log-probability of
    /// the continuation given the context, and whether every continuation token was the
    /// greedy choice. The pairs run as one right-padded batch.
    pub fn continuation_logprobs(
        &self,
        pairs: &[(Vec<u32>, Vec<u32>)],
    ) -> Result<Vec<(f64, bool)>, MlError> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let seqs: Vec<Vec<u32>> = pairs
            .iter()
            .map(|(c, k)| c.iter().chain(k.iter()).copied().collect())
            .collect();
        for ((c, k), s) in pairs.iter().zip(&seqs) {
            if c.is_empty() || k.is_empty() {
                return Err(MlError::Invalid(
                    "scoring needs a non-empty context and continuation".into(),
                ));
            }
            self.check_ids(&s[..s.len() - 1])?;
        }
        let t = seqs.iter().map(|s| s.len() - 1).max().unwrap_or(1);
        let b = seqs.len();
        let mut input = vec![0u32; b * t];
        let mut mask = vec![0f32; b * t];
        for (row, s) in seqs.iter().enumerate() {
            for (j, &id) in s[..s.len() - 1].iter().enumerate() {
                input[row * t + j] = id;
                mask[row * t + j] = 1.0;
            }
        }
        let run = || -> candle_core::Result<Vec<Vec<Vec<f32>>>> {
            let input = Tensor::from_vec(input, (b, t), &self.device)?;
            let mask = Tensor::from_vec(mask, (b, t), &self.device)?;
            let logits = self.llama.forward(&input, &mask, Mode::Infer)?;
            candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec3::<f32>()
        };
        let logp = run().ctx("scoring continuations")?;
        let mut out = Vec::with_capacity(b);
        for (row, (c, k)) in pairs.iter().enumerate() {
            let mut sum = 0f64;
            let mut greedy = true;
            for (j, &target) in k.iter().enumerate() {
                let pos = c.len() - 1 + j;
                let lp = &logp[row][pos];
                sum += lp[target as usize] as f64;
                let best = lp
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, _)| i)
                    .unwrap_or(0);
                greedy &= best == target as usize;
            }
            out.push((sum, greedy));
        }
        Ok(out)
    }

    /// Mean next-token negative log-likelihood (nats) over a batch of token sequences
    /// (right-padded to the longest), computed on the device; one forward pass.
    pub fn mean_nll(&self, seqs: &[Vec<u32>]) -> Result<f64, MlError> {
        if seqs.is_empty() || seqs.iter().any(|s| s.len() < 2) {
            return Err(MlError::Invalid(
                "mean_nll needs sequences of at least two tokens".into(),
            ));
        }
        for s in seqs {
            self.check_ids(&s[..s.len() - 1])?;
            self.check_ids(&s[1..])?;
        }
        let examples: Vec<Example> = seqs
            .iter()
            .map(|s| Example::from_index(s.clone(), 1))
            .collect();
        let refs: Vec<&Example> = examples.iter().collect();
        let run = || -> candle_core::Result<f64> {
            let batch = make_batch(&refs, &self.device)?;
            let logits = self
                .llama
                .forward(&batch.inputs, &batch.key_mask, Mode::Infer)?;
            let sum = masked_nll_sum(&logits, &batch.targets, &batch.loss_mask)?;
            Ok(sum.to_dtype(DType::F64)?.to_scalar::<f64>()? / batch.predicted.max(1) as f64)
        };
        run().ctx("scoring a batch")
    }

    /// The model arranged for batched scoring (built once, then reused).
    pub fn scoring_model(&self) -> Result<&ScoringModel, MlError> {
        if let Some(m) = self.scoring.get() {
            return Ok(m);
        }
        let m = ScoringModel::from_causal_lm(self)?;
        Ok(self.scoring.get_or_init(|| m))
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), MlError> {
        if ids.is_empty() {
            return Err(MlError::Invalid("no tokens to run".into()));
        }
        if ids.len() > self.cfg.max_position_embeddings {
            return Err(MlError::Invalid(format!(
                "{} tokens exceed the model's context of {}",
                ids.len(),
                self.cfg.max_position_embeddings
            )));
        }
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(MlError::Invalid(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }
}

impl HellaSwagScorer for CausalLm {
    fn encode(&self, text: &str) -> Result<Vec<u32>, MlError> {
        self.tok.encode(text)
    }

    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    fn score_groups(&self, groups: &[PackedGroup]) -> Result<Vec<Vec<f64>>, MlError> {
        self.scoring_model()?.score_groups(groups)
    }

    fn describe(&self) -> String {
        self.scoring_model()
            .map(|m| m.describe())
            .unwrap_or_else(|_| "dense".into())
    }
}
