//! Turning a [`Dataset`](crate::data::Dataset) split into model batches: pixels normalised as ViT's processor does,
//! texts tokenised once up front and padded per batch.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use tokenizers::Tokenizer;

use crate::data::Samples;
use crate::models::{Batch, InputKind, pixels_to_tensor};

/// A split ready for batching.
pub enum Encoded {
    /// Images: bytes N×C×H×W.
    Images {
        /// Channels, height, width.
        chw: (usize, usize, usize),
        /// Pixels.
        pixels: Vec<u8>,
    },
    /// Token ids per example (truncated), and the padding id.
    Tokens {
        /// Ids.
        ids: Vec<Vec<u32>>,
        /// Padding id.
        pad: u32,
    },
}

/// An encoded split with labels.
pub struct EncodedSplit {
    /// Inputs.
    pub inputs: Encoded,
    /// Labels.
    pub labels: Vec<u32>,
}

impl EncodedSplit {
    /// Encodes `samples` for a model reading `input`; texts need the `tokenizer`.
    pub fn new(
        samples: &Samples,
        input: InputKind,
        tokenizer: Option<&Tokenizer>,
        max_length: usize,
    ) -> anyhow::Result<Self> {
        match (samples, input) {
            (
                Samples::Images(s),
                InputKind::Image {
                    channels,
                    height,
                    width,
                },
            ) => {
                if (s.channels, s.height, s.width) != (channels, height, width) {
                    anyhow::bail!(
                        "the dataset's images are {}×{}×{} but the model expects {height}×{width}×{channels}",
                        s.height,
                        s.width,
                        s.channels
                    );
                }
                Ok(Self {
                    inputs: Encoded::Images {
                        chw: (channels, height, width),
                        pixels: s.pixels.clone(),
                    },
                    labels: s.labels.clone(),
                })
            }
            (
                Samples::Texts(s),
                InputKind::Text {
                    max_positions,
                    pad_id,
                },
            ) => {
                let tok =
                    tokenizer.ok_or_else(|| anyhow::anyhow!("this text model has no tokenizer"))?;
                let max = max_length.min(max_positions).max(2);
                let enc = tok
                    .encode_batch(s.texts.clone(), true)
                    .map_err(|e| anyhow::anyhow!("tokenising the texts: {e}"))?;
                let ids = enc
                    .iter()
                    .map(|e| {
                        let mut v = e.get_ids().to_vec();
                        if v.len() > max {
                            // Keep the closing special token (e.g. [SEP]).
                            let last = v[v.len() - 1];
                            v.truncate(max);
                            v[max - 1] = last;
                        }
                        v
                    })
                    .collect();
                Ok(Self {
                    inputs: Encoded::Tokens { ids, pad: pad_id },
                    labels: s.labels.clone(),
                })
            }
            (Samples::Images(_), InputKind::Text { .. }) => {
                anyhow::bail!("this is an image dataset, but the model reads text")
            }
            (Samples::Texts(_), InputKind::Image { .. }) => {
                anyhow::bail!("this is a text dataset, but the model reads images")
            }
        }
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The batch of the examples at `idx`, and their labels.
    pub fn batch(&self, idx: &[usize], device: &Device) -> candle_core::Result<(Batch, Tensor)> {
        let labels: Vec<u32> = idx.iter().map(|&i| self.labels[i]).collect();
        let labels = Tensor::new(labels.as_slice(), device)?;
        let batch = match &self.inputs {
            Encoded::Images {
                chw: (c, h, w),
                pixels,
            } => {
                let size = c * h * w;
                let mut bytes = Vec::with_capacity(idx.len() * size);
                for &i in idx {
                    bytes.extend_from_slice(&pixels[i * size..(i + 1) * size]);
                }
                Batch::Images(pixels_to_tensor(&bytes, idx.len(), *c, *h, *w, device)?)
            }
            Encoded::Tokens { ids, pad } => {
                let t = idx.iter().map(|&i| ids[i].len()).max().unwrap_or(1).max(1);
                let mut flat = Vec::with_capacity(idx.len() * t);
                let mut mask = Vec::with_capacity(idx.len() * t);
                for &i in idx {
                    let row = &ids[i];
                    flat.extend_from_slice(row);
                    flat.extend(std::iter::repeat_n(*pad, t - row.len()));
                    mask.extend(std::iter::repeat_n(1f32, row.len()));
                    mask.extend(std::iter::repeat_n(0f32, t - row.len()));
                }
                Batch::Tokens {
                    ids: Tensor::from_vec(flat, (idx.len(), t), device)?,
                    mask: Tensor::from_vec(mask, (idx.len(), t), device)?,
                }
            }
        };
        Ok((batch, labels))
    }
}

/// Seeded, epoch-wise shuffled batch indices.
pub struct Sampler {
    order: Vec<usize>,
    pos: usize,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    /// A sampler over `n` examples.
    pub fn new(n: usize, seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        Self { order, pos: 0, rng }
    }

    /// The next `size` indices (reshuffling at each epoch's end).
    pub fn next_batch(&mut self, size: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(size);
        while out.len() < size && !self.order.is_empty() {
            if self.pos == self.order.len() {
                self.order.shuffle(&mut self.rng);
                self.pos = 0;
            }
            out.push(self.order[self.pos]);
            self.pos += 1;
        }
        out
    }
}
