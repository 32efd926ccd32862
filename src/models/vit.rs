//! The Vision Transformer with an image-classification head (Hugging Face's
//! `ViTForImageClassification` names): any image size, channel count and patch size.

use candle_core::Tensor;
use serde_json::Value;

use super::encoder::{Block, EncoderConfig, NormPlacement, field_usize, first_token, norm};
use super::ops::layer_norm;
use super::weights::{Fill, WeightReader};
use super::{Batch, Classifier, InputKind, ModelError};
use crate::peft::{AdaptedLinear, linear::LinearLayers};

/// A ViT image classifier.
#[derive(Debug, Clone)]
pub struct VitClassifier {
    config: Value,
    enc: EncoderConfig,
    image: usize,
    patch: usize,
    channels: usize,
    cls: Tensor,
    positions: Tensor,
    /// Patch projection weight (h, C, p, p): a stride-p convolution.
    proj_w: Tensor,
    proj_b: Tensor,
    blocks: Vec<Block>,
    final_norm: (String, Tensor, Tensor),
    head: Vec<AdaptedLinear>,
    num_labels: usize,
}

impl VitClassifier {
    /// Builds the model from `config.json` (`v`, shown as `path` in errors) and a reader.
    pub fn load(
        v: &Value,
        path: &str,
        r: &mut WeightReader,
        num_labels: usize,
        fresh_head: bool,
    ) -> Result<Self, ModelError> {
        let enc = EncoderConfig::from_json(v, path, 1e-12)?;
        let h = enc.hidden;
        let image = field_usize(v, path, "image_size", Some(224))?;
        let patch = field_usize(v, path, "patch_size", Some(16))?;
        let channels = field_usize(v, path, "num_channels", Some(3))?;
        if patch == 0 || image % patch != 0 {
            return Err(ModelError::File {
                path: path.into(),
                reason: format!("patch_size ({patch}) must divide image_size ({image})"),
            });
        }
        let qkv_bias = v.get("qkv_bias").and_then(Value::as_bool).unwrap_or(true);
        let patches = (image / patch).pow(2);
        let cls = r.get("vit.embeddings.cls_token", &[1, 1, h], Fill::Normal)?;
        let positions = r.get(
            "vit.embeddings.position_embeddings",
            &[1, patches + 1, h],
            Fill::Normal,
        )?;
        let pw = "vit.embeddings.patch_embeddings.projection";
        let proj_w = r.get(
            &format!("{pw}.weight"),
            &[h, channels, patch, patch],
            Fill::Normal,
        )?;
        let proj_b = r.get(&format!("{pw}.bias"), &[h], Fill::Zeros)?;
        let mut blocks = Vec::with_capacity(enc.layers);
        for i in 0..enc.layers {
            blocks.push(Block::load(
                r,
                &enc,
                &format!("vit.encoder.layer.{i}"),
                "attention.attention",
                ["layernorm_before", "layernorm_after"],
                qkv_bias,
                NormPlacement::Pre,
            )?);
        }
        let final_norm = norm(r, "vit.layernorm", h)?;
        let w = r.get_or_init(
            "classifier.weight",
            &[num_labels, h],
            Fill::Normal,
            fresh_head,
        )?;
        let b = r.get_or_init("classifier.bias", &[num_labels], Fill::Zeros, fresh_head)?;
        Ok(Self {
            config: v.clone(),
            enc,
            image,
            patch,
            channels,
            cls,
            positions,
            proj_w,
            proj_b,
            blocks,
            final_norm,
            head: vec![AdaptedLinear::new("classifier", w, Some(b))],
            num_labels,
        })
    }

    /// The last hidden state (B, patches + 1, H) after the final layer norm.
    pub fn encode(&self, pixels: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let (b, c, hh, ww) = pixels.dims4()?;
        if (c, hh, ww) != (self.channels, self.image, self.image) {
            candle_core::bail!(
                "images are {hh}×{ww}×{c} but the model expects {}×{}×{}",
                self.image,
                self.image,
                self.channels
            );
        }
        let p = self.patch;
        let g = self.image / p;
        let h = self.enc.hidden;
        // Patchify: (B, C, g, p, g, p) → (B, g, g, C, p, p) → (B·g², C·p²); conv = matmul.
        let cols = pixels
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * g * g, c * p * p))?;
        let w = self.proj_w.reshape((h, c * p * p))?;
        let patches = cols
            .matmul(&w.t()?)?
            .broadcast_add(&self.proj_b)?
            .reshape((b, g * g, h))?;
        let cls = self.cls.broadcast_as((b, 1, h))?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.positions)?;
        for block in &self.blocks {
            x = block.forward(&x, None, train)?;
        }
        layer_norm(&x, &self.final_norm.1, &self.final_norm.2, self.enc.eps)
    }
}

impl LinearLayers for VitClassifier {
    fn linears(&self) -> Vec<&AdaptedLinear> {
        self.blocks.iter().flat_map(|b| b.linears()).collect()
    }
    fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        self.blocks
            .iter_mut()
            .flat_map(|b| b.linears_mut())
            .collect()
    }
}

impl Classifier for VitClassifier {
    fn forward_t(&self, batch: &Batch, train: bool) -> candle_core::Result<Tensor> {
        let Batch::Images(pixels) = batch else {
            candle_core::bail!("ViT reads images, not token ids");
        };
        let x = self.encode(pixels, train)?;
        self.head[0]
            .forward_t(&first_token(&x)?, train)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn input(&self) -> InputKind {
        InputKind::Image {
            channels: self.channels,
            height: self.image,
            width: self.image,
        }
    }

    fn num_labels(&self) -> usize {
        self.num_labels
    }

    fn config_json(&self) -> Value {
        super::classification_config(&self.config, "ViTForImageClassification", self.num_labels)
    }

    fn summary(&self) -> String {
        format!(
            "ViT: {} layers, hidden {}, {} heads, {}×{}×{} images, patch {}, {} labels",
            self.enc.layers,
            self.enc.hidden,
            self.enc.heads,
            self.image,
            self.image,
            self.channels,
            self.patch,
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
        let pw = "vit.embeddings.patch_embeddings.projection";
        let (n, w, b) = &mut self.final_norm;
        let mut v = vec![
            ("vit.embeddings.cls_token".to_string(), &mut self.cls),
            (
                "vit.embeddings.position_embeddings".to_string(),
                &mut self.positions,
            ),
            (format!("{pw}.weight"), &mut self.proj_w),
            (format!("{pw}.bias"), &mut self.proj_b),
            (format!("{n}.weight"), w),
            (format!("{n}.bias"), b),
        ];
        for block in &mut self.blocks {
            v.extend(block.norms_mut());
        }
        v
    }

    fn other_params(&self) -> Vec<(String, Tensor)> {
        let pw = "vit.embeddings.patch_embeddings.projection";
        let (n, w, b) = &self.final_norm;
        let mut v = vec![
            ("vit.embeddings.cls_token".to_string(), self.cls.clone()),
            (
                "vit.embeddings.position_embeddings".to_string(),
                self.positions.clone(),
            ),
            (format!("{pw}.weight"), self.proj_w.clone()),
            (format!("{pw}.bias"), self.proj_b.clone()),
            (format!("{n}.weight"), w.clone()),
            (format!("{n}.bias"), b.clone()),
        ];
        for block in &self.blocks {
            v.extend(block.norms());
        }
        v
    }
}
