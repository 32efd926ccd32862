//! BERT and RoBERTa encoders with a sequence-classification head (Hugging Face's
//! `BertForSequenceClassification` / `RobertaForSequenceClassification` names). Checkpoints with
//! or without the `bert.` / `roberta.` prefix load (sentence-transformers store `BertModel`).

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::encoder::{
    Block, EncoderConfig, NormPlacement, field_usize, first_token, mask_bias, norm,
};
use super::ops::layer_norm;
use super::weights::{Fill, WeightReader};
use super::{Batch, Classifier, InputKind, ModelError};
use crate::arch::Family;
use crate::peft::{AdaptedLinear, linear::LinearLayers};

/// A BERT or RoBERTa sequence classifier.
#[derive(Debug, Clone)]
pub struct BertClassifier {
    family: Family,
    config: Value,
    enc: EncoderConfig,
    prefix: String,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: (String, Tensor, Tensor),
    blocks: Vec<Block>,
    /// BERT's pooler (a backbone layer); RoBERTa has none.
    pooler: Option<AdaptedLinear>,
    /// BERT: `classifier`; RoBERTa: `classifier.dense`, `classifier.out_proj`.
    head: Vec<AdaptedLinear>,
    pad_token_id: usize,
    num_labels: usize,
}

impl BertClassifier {
    /// Builds the model from `config.json` (`v`, shown as `path` in errors) and a weight
    /// reader. The head has `num_labels` outputs; `fresh_head` re-initialises it even when the
    /// checkpoint has one.
    pub fn load(
        v: &Value,
        path: &str,
        r: &mut WeightReader,
        num_labels: usize,
        fresh_head: bool,
    ) -> Result<Self, ModelError> {
        let family = match v.get("model_type").and_then(Value::as_str) {
            Some("roberta" | "xlm-roberta" | "camembert") => Family::Roberta,
            _ => Family::Bert,
        };
        let default_eps = if family == Family::Roberta {
            1e-5
        } else {
            1e-12
        };
        let enc = EncoderConfig::from_json(v, path, default_eps)?;
        let h = enc.hidden;
        let prefix = if family == Family::Roberta {
            "roberta"
        } else {
            "bert"
        }
        .to_string();
        let vocab = field_usize(v, path, "vocab_size", None)?;
        let positions = field_usize(v, path, "max_position_embeddings", Some(512))?;
        let types = field_usize(v, path, "type_vocab_size", Some(2))?;
        let pad = field_usize(
            v,
            path,
            "pad_token_id",
            Some(if family == Family::Roberta { 1 } else { 0 }),
        )?;
        let e = format!("{prefix}.embeddings");
        let word = r.get(
            &format!("{e}.word_embeddings.weight"),
            &[vocab, h],
            Fill::Normal,
        )?;
        let position = r.get(
            &format!("{e}.position_embeddings.weight"),
            &[positions, h],
            Fill::Normal,
        )?;
        let token_type = r.get(
            &format!("{e}.token_type_embeddings.weight"),
            &[types.max(1), h],
            Fill::Normal,
        )?;
        let emb_norm = norm(r, &format!("{e}.LayerNorm"), h)?;
        let mut blocks = Vec::with_capacity(enc.layers);
        for i in 0..enc.layers {
            blocks.push(Block::load(
                r,
                &enc,
                &format!("{prefix}.encoder.layer.{i}"),
                "attention.self",
                ["attention.output.LayerNorm", "output.LayerNorm"],
                true,
                NormPlacement::Post,
            )?);
        }
        let pooler = if family == Family::Bert {
            let p = format!("{prefix}.pooler.dense");
            let w = r.get_or_init(&format!("{p}.weight"), &[h, h], Fill::Normal, false)?;
            let b = r.get_or_init(&format!("{p}.bias"), &[h], Fill::Zeros, false)?;
            Some(AdaptedLinear::new(p, w, Some(b)))
        } else {
            None
        };
        let head_linear =
            |r: &mut WeightReader, name: &str, out: usize| -> Result<AdaptedLinear, ModelError> {
                let w = r.get_or_init(
                    &format!("{name}.weight"),
                    &[out, h],
                    Fill::Normal,
                    fresh_head,
                )?;
                let b = r.get_or_init(&format!("{name}.bias"), &[out], Fill::Zeros, fresh_head)?;
                Ok(AdaptedLinear::new(name, w, Some(b)))
            };
        let head = if family == Family::Roberta {
            vec![
                head_linear(r, "classifier.dense", h)?,
                head_linear(r, "classifier.out_proj", num_labels)?,
            ]
        } else {
            vec![head_linear(r, "classifier", num_labels)?]
        };
        Ok(Self {
            family,
            config: v.clone(),
            enc,
            prefix,
            word,
            position,
            token_type,
            emb_norm,
            blocks,
            pooler,
            head,
            pad_token_id: pad,
            num_labels,
        })
    }

    /// The encoder's last hidden state (B, T, H) for ids (B, T) u32, mask (B, T) f32 and
    /// optional token types (B, T) u32.
    pub fn encode(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        types: Option<&Tensor>,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let dev = ids.device();
        let pos_ids = if self.family == Family::Roberta {
            // RoBERTa: positions count real tokens from pad_token_id + 1; padding gets pad_token_id.
            let rows = ids.to_vec2::<u32>()?;
            let pad = self.pad_token_id as u32;
            let mut p = Vec::with_capacity(b * t);
            for row in rows {
                let mut count = 0u32;
                for id in row {
                    if id != pad {
                        count += 1;
                        p.push(count + pad);
                    } else {
                        p.push(pad);
                    }
                }
            }
            Tensor::from_vec(p, (b, t), dev)?
        } else {
            Tensor::arange(0u32, t as u32, dev)?
                .unsqueeze(0)?
                .broadcast_as((b, t))?
                .contiguous()?
        };
        let max = self.position.dims()[0];
        if t > max {
            candle_core::bail!("sequence of {t} tokens is longer than the model's {max} positions");
        }
        let types = match types {
            Some(t) => t.clone(),
            None => Tensor::zeros((b, t), DType::U32, dev)?,
        };
        let x = (self
            .word
            .embedding(&ids.flatten_all()?)?
            .reshape((b, t, ())))?;
        let x = (x + self
            .position
            .embedding(&pos_ids.flatten_all()?)?
            .reshape((b, t, ()))?)?;
        let x = (x + self
            .token_type
            .embedding(&types.flatten_all()?)?
            .reshape((b, t, ()))?)?;
        let mut x = layer_norm(&x, &self.emb_norm.1, &self.emb_norm.2, self.enc.eps)?;
        let bias = mask_bias(&mask.to_dtype(DType::F32)?)?;
        for block in &self.blocks {
            x = block.forward(&x, Some(&bias), train)?;
        }
        Ok(x)
    }

    /// BERT's pooled output `tanh(pooler(h[:, 0]))`; `None` for RoBERTa.
    pub fn pool(&self, hidden: &Tensor, train: bool) -> candle_core::Result<Option<Tensor>> {
        match &self.pooler {
            Some(p) => Ok(Some(
                p.forward_t(&first_token(hidden)?, train)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                    .tanh()?,
            )),
            None => Ok(None),
        }
    }

    fn classify(&self, hidden: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let err = |e: crate::peft::PeftError| candle_core::Error::Msg(e.to_string());
        match self.family {
            Family::Roberta => {
                let x = self.head[0]
                    .forward_t(&first_token(hidden)?, train)
                    .map_err(err)?
                    .tanh()?;
                self.head[1].forward_t(&x, train).map_err(err)
            }
            _ => {
                let pooled = self
                    .pool(hidden, train)?
                    .ok_or_else(|| candle_core::Error::Msg("BERT without a pooler".into()))?;
                self.head[0].forward_t(&pooled, train).map_err(err)
            }
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.word.device()
    }

    /// Which family (BERT or RoBERTa).
    pub fn family(&self) -> Family {
        self.family
    }
}

impl LinearLayers for BertClassifier {
    fn linears(&self) -> Vec<&AdaptedLinear> {
        let mut v: Vec<&AdaptedLinear> = self.blocks.iter().flat_map(|b| b.linears()).collect();
        v.extend(self.pooler.iter());
        v
    }
    fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        let mut v: Vec<&mut AdaptedLinear> = self
            .blocks
            .iter_mut()
            .flat_map(|b| b.linears_mut())
            .collect();
        v.extend(self.pooler.iter_mut());
        v
    }
}

impl Classifier for BertClassifier {
    fn forward_t(&self, batch: &Batch, train: bool) -> candle_core::Result<Tensor> {
        let Batch::Tokens { ids, mask } = batch else {
            candle_core::bail!("{} reads token ids, not images", self.family_name());
        };
        let hidden = self.encode(ids, mask, None, train)?;
        self.classify(&hidden, train)
    }

    fn input(&self) -> InputKind {
        let offset = if self.family == Family::Roberta {
            self.pad_token_id + 1
        } else {
            0
        };
        InputKind::Text {
            max_positions: self.position.dims()[0] - offset,
            pad_id: self.pad_token_id as u32,
        }
    }

    fn num_labels(&self) -> usize {
        self.num_labels
    }

    fn config_json(&self) -> Value {
        let arch = if self.family == Family::Roberta {
            "RobertaForSequenceClassification"
        } else {
            "BertForSequenceClassification"
        };
        super::classification_config(&self.config, arch, self.num_labels)
    }

    fn summary(&self) -> String {
        format!(
            "{}: {} layers, hidden {}, {} heads, {} labels",
            self.family_name(),
            self.enc.layers,
            self.enc.hidden,
            self.enc.heads,
            self.num_labels
        )
    }

    fn head(&self) -> Vec<&AdaptedLinear> {
        self.head.iter().collect()
    }

    fn head_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        self.head.iter_mut().collect()
    }

    fn other_params_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let e = format!("{}.embeddings", self.prefix);
        let (n, w, b) = &mut self.emb_norm;
        let mut v = vec![
            (format!("{e}.word_embeddings.weight"), &mut self.word),
            (
                format!("{e}.position_embeddings.weight"),
                &mut self.position,
            ),
            (
                format!("{e}.token_type_embeddings.weight"),
                &mut self.token_type,
            ),
            (format!("{n}.weight"), w),
            (format!("{n}.bias"), b),
        ];
        for block in &mut self.blocks {
            v.extend(block.norms_mut());
        }
        v
    }

    fn other_params(&self) -> Vec<(String, Tensor)> {
        let e = format!("{}.embeddings", self.prefix);
        let (n, w, b) = &self.emb_norm;
        let mut v = vec![
            (format!("{e}.word_embeddings.weight"), self.word.clone()),
            (
                format!("{e}.position_embeddings.weight"),
                self.position.clone(),
            ),
            (
                format!("{e}.token_type_embeddings.weight"),
                self.token_type.clone(),
            ),
            (format!("{n}.weight"), w.clone()),
            (format!("{n}.bias"), b.clone()),
        ];
        for block in &self.blocks {
            v.extend(block.norms());
        }
        v
    }
}

impl BertClassifier {
    fn family_name(&self) -> &'static str {
        if self.family == Family::Roberta {
            "RoBERTa"
        } else {
            "BERT"
        }
    }
}
