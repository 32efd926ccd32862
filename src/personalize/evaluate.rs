//! `eval-personalize`: DiffLoRA against the base generator and direct LoRA fine-tuning on
//! held-out people, scored by the evaluation encoder (never used for conditioning) and, for
//! synthetic people, by the error of the identity parameters recovered from the images, by
//! what the attribute reader ([`super::attribute_reader`]) reads in the images (prompt
//! adherence, identity agreement), and by the Fréchet distance of the images to renders of the
//! same people and prompts in the evaluation encoder's feature space ([`super::image_stats`]).

use std::fmt::Write as _;

use candle_core::Tensor;
use image::RgbImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::attribute_reader::{
    ATTRIBUTE_COUNT, ATTRIBUTES, AttributeReader, BUILD_HINT, IDENTITY_ATTRIBUTES, Labels,
    identity_agreement, identity_labels, prompt_adherence, prompt_all_correct, prompt_labels,
};
use super::comparison::{ComparisonRow, PICTURE_PEOPLE};
use super::image_stats::frechet_distance;
use super::pipeline::{Gallery, Personaliser, merged};
use super::tensors::images_to_tensor;
use crate::data::people::PeopleSource;
use crate::data::portrait::{Attributes, Identity, render};

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
    /// Share of (image, prompt attribute) pairs the attribute reader reads as the prompt
    /// says (synthetic people with a reader only).
    #[serde(default)]
    pub prompt_adherence: Option<f32>,
    /// Share of images whose five prompt attributes are all read as the prompt says.
    #[serde(default)]
    pub prompt_all_correct: Option<f32>,
    /// Share of (image, identity attribute) pairs the reader reads as the reference person's
    /// (hair style, hair colour, skin tone, glasses, facial hair).
    #[serde(default)]
    pub identity_agreement: Option<f32>,
    /// Per attribute (the reader's order): the share read correctly — identity attributes
    /// against the person, prompt attributes against the image's prompt.
    #[serde(default)]
    pub attribute_accuracy: Option<Vec<f32>>,
    /// Fréchet distance of the images to renders of the same people and prompts, in the
    /// evaluation encoder's feature space (set over all people by [`summarise`]).
    #[serde(default)]
    pub frechet: Option<f32>,
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
    /// The Fréchet distance between two independent render sets of the same people and
    /// prompts (the floor of [`PathScores::frechet`] at this sample size).
    #[serde(default)]
    pub frechet_floor: Option<f32>,
    /// Why the reader's scores are missing, when they are.
    #[serde(default)]
    pub reader_note: Option<String>,
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
    /// Evaluation-encoder features for the Fréchet distances (synthetic people only).
    #[serde(default)]
    pub features: Option<FeatureSets>,
    /// Why the reader's scores are missing, when they are.
    #[serde(default)]
    pub reader_note: Option<String>,
    /// The person's row of the comparison picture (the first [`PICTURE_PEOPLE`] people).
    #[serde(default)]
    pub picture: Option<ComparisonRow>,
}

/// Evaluation-encoder features of one person's images, for the Fréchet distances.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FeatureSets {
    /// Generated images: base, DiffLoRA, direct.
    pub generated: [Vec<Vec<f32>>; 3],
    /// Renders of the person with the gallery's prompt.
    pub renders: Vec<Vec<f32>>,
    /// Another render set of the same person and prompt (other render seeds).
    pub renders_again: Vec<Vec<f32>>,
}

/// `n` renders of person `identity_seed` with `attrs`, render seeds from `seed`.
fn renders_of(
    identity_seed: u64,
    attrs: &Attributes,
    n: usize,
    size: u32,
    seed: u64,
) -> Vec<RgbImage> {
    let id = Identity::random(identity_seed);
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| render(&id, attrs, size, rng.random()))
        .collect()
}

/// What the reader reads in `images` against the person `identity` and each image's prompt
/// (`prompts`: one for all, or one per image).
fn reader_scores(
    reader: &AttributeReader,
    images: &[RgbImage],
    identity: &[usize; 5],
    prompts: &[Attributes],
    scores: &mut PathScores,
) -> anyhow::Result<()> {
    let read: Vec<Labels> = reader.read(images)?;
    scores.prompt_adherence = Some(prompt_adherence(&read, prompts));
    scores.prompt_all_correct = Some(prompt_all_correct(&read, prompts));
    scores.identity_agreement = Some(identity_agreement(&read, identity));
    let mut hits = [0usize; ATTRIBUTE_COUNT];
    for (i, r) in read.iter().enumerate() {
        let p = prompt_labels(&prompts[i.min(prompts.len() - 1)]);
        for (a, h) in hits.iter_mut().enumerate() {
            let want = if IDENTITY_ATTRIBUTES.contains(&a) {
                identity[a]
            } else {
                p[a - IDENTITY_ATTRIBUTES.end]
            };
            *h += usize::from(r[a] == want);
        }
    }
    let n = read.len().max(1) as f32;
    scores.attribute_accuracy = Some(hits.iter().map(|&h| h as f32 / n).collect());
    Ok(())
}

fn rows(t: &Tensor) -> anyhow::Result<Vec<Vec<f32>>> {
    Ok(t.to_device(&crate::device::HOST)?.to_vec2::<f32>()?)
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
    let synthetic_seed = match &preset.people.eval {
        PeopleSource::Synthetic { first_seed, .. } => Some(*first_seed),
        PeopleSource::Folder { .. } => None,
    };
    let (reader, reader_note) = match AttributeReader::load_beside(personaliser.dir(), &device)? {
        _ if synthetic_seed.is_none() => (
            None,
            Some("the attribute reader reads renders: no reader scores for photos".to_string()),
        ),
        Some(r) if r.image_size() == preset.image_size => (Some(r), None),
        Some(r) => (
            None,
            Some(format!(
                "the attribute reader reads {0}×{0} images, the personaliser draws {1}×{1}",
                r.image_size(),
                preset.image_size
            )),
        ),
        None => (
            None,
            Some(format!(
                "prompt adherence and identity agreement need the attribute reader {}: build it with `{BUILD_HINT}`",
                personaliser
                    .dir()
                    .join(super::attribute_reader::READER_FILE)
                    .display()
            )),
        ),
    };
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
                    ..PathScores::default()
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
        let mut scores = [s_base, s_diff, s_direct, s_held];
        let mut features = None;
        if let Some(first) = synthetic_seed {
            let person_seed = first + i as u64;
            let attrs = Attributes::from_words(&[prompt.as_str()]);
            let galleries = [&base.images, &diff.gallery.images, &direct.images];
            if let Some(reader) = &reader {
                let identity = identity_labels(person_seed);
                for (k, images) in galleries.iter().enumerate() {
                    reader_scores(reader, images, &identity, &[attrs], &mut scores[k])?;
                }
                let held_prompts: Vec<Attributes> = person.prompts[settings.references..]
                    .iter()
                    .map(|p| Attributes::from_words(&[p.as_str()]))
                    .collect();
                reader_scores(
                    reader,
                    &held_gallery.images,
                    &identity,
                    &held_prompts,
                    &mut scores[3],
                )?;
            }
            let embed = |images: &[RgbImage]| -> anyhow::Result<Vec<Vec<f32>>> {
                rows(
                    &personaliser
                        .eval_encoder()
                        .embed(&images_to_tensor(images, &device)?)?,
                )
            };
            let size = preset.image_size;
            let render_seed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ person_seed;
            features = Some(FeatureSets {
                generated: [
                    embed(galleries[0])?,
                    embed(galleries[1])?,
                    embed(galleries[2])?,
                ],
                renders: embed(&renders_of(
                    person_seed,
                    &attrs,
                    settings.images,
                    size,
                    render_seed,
                ))?,
                renders_again: embed(&renders_of(
                    person_seed,
                    &attrs,
                    settings.images,
                    size,
                    render_seed ^ 0x5DEE_CE66_D1CE_4E5B,
                ))?,
            });
        }
        let picture = (i < PICTURE_PEOPLE)
            .then(|| ComparisonRow::new(&refs, &diff.gallery.images, &direct.images, &base.images))
            .flatten();
        results.push(PersonEval {
            picture,
            index: i,
            name: person.name.clone(),
            fused_refs,
            fused: [f_base, f_diff, f_direct, f_held],
            scores,
            features,
            reader_note: reader_note.clone(),
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
    for (k, m) in mean.iter_mut().enumerate() {
        let of = |f: fn(&PathScores) -> Option<f32>| -> Option<f32> {
            let v: Option<Vec<f32>> = results.iter().map(|r| f(&r.scores[k])).collect();
            v.map(|v| v.iter().sum::<f32>() / v.len() as f32)
        };
        m.prompt_adherence = of(|s| s.prompt_adherence);
        m.prompt_all_correct = of(|s| s.prompt_all_correct);
        m.identity_agreement = of(|s| s.identity_agreement);
        m.attribute_accuracy = (0..ATTRIBUTE_COUNT)
            .map(|a| {
                let v: Option<Vec<f32>> = results
                    .iter()
                    .map(|r| r.scores[k].attribute_accuracy.as_ref().map(|x| x[a]))
                    .collect();
                v.map(|v| v.iter().sum::<f32>() / v.len() as f32)
            })
            .collect();
    }
    let feats: Option<Vec<&FeatureSets>> = results.iter().map(|r| r.features.as_ref()).collect();
    let mut frechet_floor = None;
    if let Some(feats) = feats {
        let pool = |f: &dyn Fn(&FeatureSets) -> &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
            feats.iter().flat_map(|x| f(x).iter().cloned()).collect()
        };
        let renders = pool(&|x| &x.renders);
        for (k, m) in mean.iter_mut().take(3).enumerate() {
            m.frechet = Some(frechet_distance(&pool(&|x| &x.generated[k]), &renders)? as f32);
        }
        frechet_floor = Some(frechet_distance(&pool(&|x| &x.renders_again), &renders)? as f32);
    }
    let reader_note = results.iter().find_map(|r| r.reader_note.clone());
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
        frechet_floor,
        reader_note,
    })
}

/// Target of prompt adherence (every path) and of the two ratios to direct fine-tuning.
pub const READER_TARGET: f32 = 0.9;

/// "met" or "missed by X points" for a share `value` against `target`.
fn verdict(value: f32, target: f32) -> String {
    if value >= target {
        "met".to_string()
    } else {
        format!("missed by {:.1} points", 100.0 * (target - value))
    }
}

impl EvalReport {
    /// The attribute reader's scores, the Fréchet distances and the targets, as markdown
    /// (empty without any of them).
    pub fn reader_markdown(&self) -> String {
        let mut s = String::new();
        let paths = [
            ("base generator (no LoRA)", &self.base),
            ("DiffLoRA (predicted LoRA)", &self.difflora),
            ("direct LoRA fine-tuning", &self.direct),
            ("held-out renders (ceiling)", &self.held_out_real),
        ];
        let pct = |v: Option<f32>| v.map_or("–".to_string(), |v| format!("{:.1}%", 100.0 * v));
        s.push_str("\n## What a person sees: attribute reader and Fréchet distance\n\n");
        if let Some(note) = &self.reader_note {
            let _ = writeln!(s, "{note}.\n");
        }
        s.push_str("| path | prompt adherence | all 5 prompt attributes right | identity agreement | Fréchet distance to renders |\n");
        s.push_str("| --- | ---: | ---: | ---: | ---: |\n");
        for (name, p) in paths {
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {} |",
                pct(p.prompt_adherence),
                pct(p.prompt_all_correct),
                pct(p.identity_agreement),
                p.frechet.map_or("–".to_string(), |f| format!("{f:.3}"))
            );
        }
        if let Some(floor) = self.frechet_floor {
            let _ = writeln!(
                s,
                "\nFréchet distance between two independent render sets of the same people and prompts (the floor at this sample size): {floor:.3}. Features: the evaluation encoder's embeddings; one gallery's images against renders of its person with its prompt, pooled over people."
            );
        }
        if self.difflora.attribute_accuracy.is_some() {
            s.push_str("\nPer attribute (identity attributes against the person, prompt attributes against the prompt):\n\n| attribute | base | DiffLoRA | direct | held-out renders |\n| --- | ---: | ---: | ---: | ---: |\n");
            for (a, spec) in ATTRIBUTES.iter().enumerate() {
                let at = |p: &PathScores| pct(p.attribute_accuracy.as_ref().map(|v| v[a]));
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} |",
                    spec.name,
                    at(&self.base),
                    at(&self.difflora),
                    at(&self.direct),
                    at(&self.held_out_real)
                );
            }
        }
        s.push_str("\nTargets on the held-out people:\n\n");
        for (name, p) in &paths[..3] {
            if let Some(v) = p.prompt_adherence {
                let _ = writeln!(
                    s,
                    "- prompt adherence ≥ 90%, {name}: {:.1}% — {}",
                    100.0 * v,
                    verdict(v, READER_TARGET)
                );
            }
        }
        if let (Some(d), Some(r), Some(b)) = (
            self.difflora.identity_agreement,
            self.direct.identity_agreement,
            self.base.identity_agreement,
        ) {
            let ratio = if r > 0.0 { d / r } else { 0.0 };
            let _ = writeln!(
                s,
                "- DiffLoRA's identity agreement ≥ 90% of direct LoRA's: {:.1}% / {:.1}% = {:.0}% — {}",
                100.0 * d,
                100.0 * r,
                100.0 * ratio,
                verdict(ratio, READER_TARGET)
            );
            let _ = writeln!(
                s,
                "- DiffLoRA's identity agreement far above the base generator's: {:.1}% vs {:.1}% ({:+.1} points)",
                100.0 * d,
                100.0 * b,
                100.0 * (d - b)
            );
        }
        if self.direct.identity_similarity > 0.0 {
            let _ = writeln!(
                s,
                "- identity-similarity ratio ≥ 90% of direct: {:.0}% (standard error {:.0} points) — {}",
                100.0 * self.ratio.value,
                100.0 * self.ratio.standard_error,
                verdict(self.ratio.value, READER_TARGET)
            );
        }
        s
    }
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
        s.push_str(&self.reader_markdown());
        s
    }
}
