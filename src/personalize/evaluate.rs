//! `eval-personalize`: DiffLoRA against the base generator and direct LoRA fine-tuning on
//! held-out people, scored by the evaluation encoder (never used for conditioning) and, for
//! synthetic people, by the error of the identity parameters recovered from the images.

use std::fmt::Write as _;

use candle_core::Tensor;
use image::RgbImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::pipeline::{Gallery, Personaliser, merged};
use super::tensors::images_to_tensor;

/// Settings of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalSettings {
    /// Reference images per person (the first ones); the rest are held out.
    pub references: usize,
    /// Images generated per person and path.
    pub images: usize,
    /// Seed of sampling.
    pub seed: u64,
}

impl Default for EvalSettings {
    fn default() -> Self {
        Self {
            references: 4,
            images: 4,
            seed: 0,
        }
    }
}

/// Most images a gallery (`--n`) or a reference set (`--refs`) may hold.
pub const MAX_IMAGES: usize = 64;

impl EvalSettings {
    /// Checks the counts; the error names the option and its range.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (opt, v) in [("--refs", self.references), ("--n", self.images)] {
            anyhow::ensure!(
                (1..=MAX_IMAGES).contains(&v),
                "{opt} {v}: must be between 1 and {MAX_IMAGES}"
            );
        }
        Ok(())
    }
}

/// Scores of one path (base, DiffLoRA or direct LoRA), averaged over people.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PathScores {
    /// Cosine similarity of the fused generated images to the fused references.
    pub identity_similarity: f32,
    /// Mean cosine similarity of single generated images to the fused references.
    pub image_similarity: f32,
    /// Fraction of people whose gallery is nearer (fused) to their own references than to any
    /// other evaluated person's.
    pub identification: f32,
    /// Mean absolute error of the identity parameters recovered from the gallery (synthetic).
    pub param_error: Option<f32>,
    /// Seconds from references to a ready generator (0 for the base generator).
    pub personalise_seconds: f64,
    /// Seconds to draw the gallery.
    pub gallery_seconds: f64,
}

/// The outcome of an evaluation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    /// People evaluated.
    pub people: usize,
    /// The settings.
    pub settings: Option<EvalSettings>,
    /// The base generator (no LoRA).
    pub base: PathScores,
    /// DiffLoRA (predicted LoRA).
    pub difflora: PathScores,
    /// LoRA fine-tuned directly on the references.
    pub direct: PathScores,
    /// The held-out real images of each person against their references (a ceiling).
    pub held_out_real: PathScores,
    /// DiffLoRA's identity similarity as a fraction of direct fine-tuning's (the issue's
    /// target), with its standard error over people (bootstrap).
    #[serde(default)]
    pub ratio: RatioEstimate,
    /// Every person's identity similarity per path.
    #[serde(default)]
    pub per_person: Vec<PersonSimilarity>,
}

/// A ratio of two means over people, with its bootstrap standard error.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct RatioEstimate {
    /// mean(DiffLoRA) / mean(direct).
    pub value: f32,
    /// Standard deviation of the ratio over bootstrap resamples of the people.
    pub standard_error: f32,
}

/// One person's identity similarity (fused, evaluation encoder) for each path.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PersonSimilarity {
    /// The person's name.
    pub name: String,
    /// Base generator.
    pub base: f32,
    /// DiffLoRA.
    pub difflora: f32,
    /// Direct LoRA fine-tuning.
    pub direct: f32,
    /// Held-out real images.
    pub held_out_real: f32,
}

/// The evaluation of one person: what [`summarise`] needs (scores and fused embeddings).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PersonEval {
    /// Position of the person in the evaluation set (it also sets the sampling seed).
    pub index: usize,
    /// The person's name.
    pub name: String,
    /// Fused evaluation embedding of the references.
    pub fused_refs: Vec<f32>,
    /// Fused evaluation embedding of each path's images: base, DiffLoRA, direct, held-out.
    pub fused: [Vec<f32>; 4],
    /// Scores of each path, same order.
    pub scores: [PathScores; 4],
}

fn fused_of(p: &Personaliser, images: &Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(p.eval_encoder().fuse(images)?.to_vec1::<f32>()?)
}

/// Cosine similarity of two fused (unit) embeddings.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Evaluates `personaliser` on its preset's held-out people (`people.eval`).
/// `progress(done, total, what)` after each person.
pub fn evaluate(
    personaliser: &Personaliser,
    settings: EvalSettings,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> anyhow::Result<EvalReport> {
    let results = evaluate_shard(personaliser, settings, 0, 1, progress)?;
    summarise(settings, &results)
}

/// Evaluates the people of shard `shard` of `shards` (every `shards`-th person, from the
/// `shard`-th): shards run in separate processes give, together, what [`evaluate`] gives
/// (each person's seed depends on their position in the whole set only).
pub fn evaluate_shard(
    personaliser: &Personaliser,
    settings: EvalSettings,
    shard: usize,
    shards: usize,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> anyhow::Result<Vec<PersonEval>> {
    settings.validate()?;
    anyhow::ensure!(
        shards >= 1 && shard < shards,
        "shard {shard} of {shards} does not exist (shards are numbered from 0)"
    );
    let preset = personaliser.preset();
    let people = preset.people.eval.load(preset.image_size)?;
    anyhow::ensure!(!people.is_empty(), "no evaluation people");
    let device = personaliser.device().clone();
    let mut results = Vec::new();
    for (i, person) in people.iter().enumerate() {
        if i % shards != shard {
            continue;
        }
        anyhow::ensure!(
            person.images.len() > settings.references,
            "{} has {} images; {} references and at least one held-out image are needed",
            person.name,
            person.images.len(),
            settings.references
        );
        let refs: Vec<RgbImage> = person.images[..settings.references].to_vec();
        let held: Vec<RgbImage> = person.images[settings.references..].to_vec();
        let ref_prompts: Vec<String> = person.prompts[..settings.references].to_vec();
        let prompt = person.prompts[settings.references].clone();
        let seed = settings.seed.wrapping_add(i as u64);
        let refs_t = images_to_tensor(&refs, &device)?;
        let fused_refs = fused_of(personaliser, &refs_t)?;
        let truth = person.params.as_ref();

        let score = |gallery: &Gallery,
                     images: &Tensor,
                     personalise: f64|
         -> anyhow::Result<(Vec<f32>, PathScores)> {
            let fused = fused_of(personaliser, images)?;
            let sim = dot(&fused, &fused_refs);
            let param_error = match (personaliser.regressor(), truth) {
                (Some(reg), Some(t)) => {
                    let e = personaliser.eval_encoder().embed(images)?;
                    let pred = reg.predict(&e)?.mean(0)?.to_vec1::<f32>()?;
                    Some(
                        pred.iter().zip(t).map(|(a, b)| (a - b).abs()).sum::<f32>()
                            / t.len() as f32,
                    )
                }
                _ => None,
            };
            Ok((
                fused,
                PathScores {
                    identity_similarity: sim,
                    image_similarity: gallery.mean_score(),
                    identification: 0.0,
                    param_error,
                    personalise_seconds: personalise,
                    gallery_seconds: gallery.seconds,
                },
            ))
        };
        let gallery_tensor = |g: &Gallery| images_to_tensor(&g.images, &device);

        let base = personaliser.gallery(
            personaliser.generator(),
            &refs,
            &prompt,
            settings.images,
            seed,
        )?;
        let (f_base, s_base) = score(&base, &gallery_tensor(&base)?, 0.0)?;
        progress(i, people.len(), "base");

        let diff = personaliser.personalise(&refs, &prompt, settings.images, seed)?;
        let (f_diff, s_diff) = score(
            &diff.gallery,
            &gallery_tensor(&diff.gallery)?,
            diff.seconds.personalise_total,
        )?;
        progress(i, people.len(), "difflora");

        let prompts = if preset.people.eval.is_synthetic() {
            Some(ref_prompts.as_slice())
        } else {
            None
        };
        let (direct_g, secs) = personaliser.direct_lora(&refs, prompts, seed, &mut |_, _, _| {
            std::ops::ControlFlow::Continue(())
        })?;
        let direct =
            personaliser.gallery(&merged(&direct_g)?, &refs, &prompt, settings.images, seed)?;
        let (f_direct, s_direct) = score(&direct, &gallery_tensor(&direct)?, secs)?;
        progress(i, people.len(), "direct");

        let held_t = images_to_tensor(&held, &device)?;
        let held_gallery = Gallery {
            scores: personaliser.identity_scores(&held_t, &refs_t)?,
            images: held,
            seconds: 0.0,
        };
        let (f_held, s_held) = score(&held_gallery, &held_t, 0.0)?;
        results.push(PersonEval {
            index: i,
            name: person.name.clone(),
            fused_refs,
            fused: [f_base, f_diff, f_direct, f_held],
            scores: [s_base, s_diff, s_direct, s_held],
        });
        progress(i + 1, people.len(), &person.name);
    }
    Ok(results)
}

/// Resamples of the people in [`ratio_estimate`]'s bootstrap.
const BOOTSTRAP_RESAMPLES: usize = 2000;

/// mean(`num`) / mean(`den`) and its bootstrap standard error over the pairs (seeded, so
/// reports are reproducible).
pub fn ratio_estimate(num: &[f32], den: &[f32]) -> RatioEstimate {
    let ratio = |idx: &mut dyn Iterator<Item = usize>| {
        let (a, b) = idx.fold((0f64, 0f64), |(a, b), i| {
            (a + f64::from(num[i]), b + f64::from(den[i]))
        });
        if b == 0.0 { 0.0 } else { a / b }
    };
    let n = num.len().min(den.len());
    if n == 0 {
        return RatioEstimate::default();
    }
    let value = ratio(&mut (0..n));
    let mut rng = StdRng::seed_from_u64(0);
    let samples: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            let pick: Vec<usize> = (0..n).map(|_| rng.random_range(0..n)).collect();
            ratio(&mut pick.into_iter())
        })
        .collect();
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    let var = samples.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / samples.len() as f64;
    RatioEstimate {
        value: value as f32,
        standard_error: var.sqrt() as f32,
    }
}

/// The report of evaluated people (from [`evaluate_shard`], in any order): means per path,
/// identification among these people, the DiffLoRA/direct ratio with its standard error.
pub fn summarise(settings: EvalSettings, results: &[PersonEval]) -> anyhow::Result<EvalReport> {
    anyhow::ensure!(!results.is_empty(), "no evaluated people");
    let mut results: Vec<&PersonEval> = results.iter().collect();
    results.sort_by_key(|r| r.index);
    anyhow::ensure!(
        results.windows(2).all(|w| w[0].index != w[1].index),
        "a person was evaluated twice"
    );
    // Identification: is each gallery nearest to its own person's references?
    let mut mean = [
        PathScores::default(),
        PathScores::default(),
        PathScores::default(),
        PathScores::default(),
    ];
    let n = results.len() as f32;
    for (i, r) in results.iter().enumerate() {
        for (k, m) in mean.iter_mut().enumerate() {
            let best = results
                .iter()
                .map(|other| dot(&other.fused_refs, &r.fused[k]))
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(j, _)| j);
            let s = &r.scores[k];
            m.identity_similarity += s.identity_similarity / n;
            m.image_similarity += s.image_similarity / n;
            m.identification += if best == Some(i) { 1.0 / n } else { 0.0 };
            m.param_error = match (m.param_error, s.param_error) {
                (None, Some(e)) if i == 0 => Some(e / n),
                (Some(a), Some(e)) => Some(a + e / n),
                _ => None,
            };
            m.personalise_seconds += s.personalise_seconds / n as f64;
            m.gallery_seconds += s.gallery_seconds / n as f64;
        }
    }
    let [base, difflora, direct, held_out_real] = mean;
    let per_person: Vec<PersonSimilarity> = results
        .iter()
        .map(|r| PersonSimilarity {
            name: r.name.clone(),
            base: r.scores[0].identity_similarity,
            difflora: r.scores[1].identity_similarity,
            direct: r.scores[2].identity_similarity,
            held_out_real: r.scores[3].identity_similarity,
        })
        .collect();
    let column = |f: fn(&PersonSimilarity) -> f32| per_person.iter().map(f).collect::<Vec<_>>();
    let ratio = ratio_estimate(&column(|p| p.difflora), &column(|p| p.direct));
    Ok(EvalReport {
        people: results.len(),
        settings: Some(settings),
        base,
        difflora,
        direct,
        held_out_real,
        ratio,
        per_person,
    })
}

impl EvalReport {
    /// The report as a markdown table.
    pub fn markdown(&self, title: &str) -> String {
        let mut s = format!("# {title}\n\n");
        if let Some(st) = self.settings {
            let _ = writeln!(
                s,
                "{} held-out people, {} references and {} generated images each, seed {}.\n",
                self.people, st.references, st.images, st.seed
            );
        }
        s.push_str("| path | identity similarity (fused) | per-image similarity | identification | parameter error | seconds to personalise | seconds per gallery |\n");
        s.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for (name, p) in [
            ("base generator (no LoRA)", &self.base),
            ("DiffLoRA (predicted LoRA)", &self.difflora),
            ("direct LoRA fine-tuning", &self.direct),
            ("held-out real images (ceiling)", &self.held_out_real),
        ] {
            let _ = writeln!(
                s,
                "| {name} | {:.3} | {:.3} | {:.0}% | {} | {:.2} | {:.2} |",
                p.identity_similarity,
                p.image_similarity,
                100.0 * p.identification,
                p.param_error.map_or("–".to_string(), |e| format!("{e:.3}")),
                p.personalise_seconds,
                p.gallery_seconds
            );
        }
        if self.direct.identity_similarity > 0.0 {
            let _ = writeln!(
                s,
                "\nDiffLoRA reaches {:.0}% (standard error {:.0} points, bootstrap over people) of direct fine-tuning's identity similarity and personalises {:.0}× faster.",
                100.0 * self.ratio.value,
                100.0 * self.ratio.standard_error,
                self.direct.personalise_seconds / self.difflora.personalise_seconds.max(1e-9)
            );
        }
        s
    }
}
