//! File names inside a personaliser folder (what `difflora-build` writes and
//! [`Personaliser::load`](super::pipeline::Personaliser::load) reads).

/// The base generator's weights.
pub const GENERATOR: &str = "generator.safetensors";
/// The generator's training checkpoint (the last one stays, to train longer later).
pub const GENERATOR_CHECKPOINT: &str = "generator.checkpoint.safetensors";
/// A latent generator's image codec (its weights are also inside the generator file).
pub const CODEC: &str = "image_codec.safetensors";
/// The codec's training checkpoint.
pub const CODEC_CHECKPOINT: &str = "image_codec.checkpoint.safetensors";
/// Held-out renders above their codec reconstructions (enlarged), to look at.
pub const CODEC_PREVIEW: &str = "image_codec_preview.png";
/// The codec with its decoder sharpened (the `decoder` stage); the generator file carries it.
pub const SHARP_CODEC: &str = "image_codec_sharp.safetensors";
/// The decoder refinement's training checkpoint.
pub const SHARP_CODEC_CHECKPOINT: &str = "image_codec_sharp.checkpoint.safetensors";
/// Held-out renders above the codec's and the sharpened codec's reconstructions (enlarged).
pub const SHARP_CODEC_PREVIEW: &str = "image_codec_sharp_preview.png";
/// Generator samples for a few prompts (enlarged), to look at; redrawn at every checkpoint.
pub const GENERATOR_PREVIEW: &str = "generator_preview.png";
/// The preset the folder was built from.
pub const PRESET: &str = "preset.toml";
/// The identity-oriented LoRA bank.
pub const BANK: &str = "lora_bank.safetensors";
/// The identity encoder that conditions the hypernetwork.
pub const ENCODER: &str = "identity_encoder.safetensors";
/// The evaluation identity encoder (never used for conditioning).
pub const EVAL_ENCODER: &str = "eval_encoder.safetensors";
/// Ridge regression from evaluation embeddings to identity parameters (synthetic only).
pub const PARAM_REGRESSOR: &str = "param_regressor.safetensors";
/// The LoRA autoencoder.
pub const AUTOENCODER: &str = "lora_autoencoder.safetensors";
/// The conditional latent denoiser.
pub const DENOISER: &str = "latent_denoiser.safetensors";
/// What the build measured (losses, accuracies, seconds per stage).
pub const BUILD_REPORT: &str = "build_report.json";
