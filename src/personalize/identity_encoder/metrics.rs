//! How well embeddings tell people apart: nearest-centroid accuracy on held-out pictures and
//! leave-one-out verification accuracy.

use std::collections::BTreeMap;

use candle_core::Tensor;

use super::{EncoderError, IdentityEncoder, Result, rows_of};

/// Fraction of `queries` whose nearest class centroid (by cosine; centroids are the
/// normalised mean embeddings of `gallery` per label) has the right label. Queries whose
/// label has no gallery image count as wrong.
pub fn centroid_accuracy_of(
    gallery: &Tensor,
    gallery_labels: &[usize],
    queries: &Tensor,
    query_labels: &[usize],
) -> Result<f32> {
    let g = rows_of(gallery, "gallery embeddings", None)?;
    let e = g.first().map_or(0, Vec::len);
    let q = rows_of(queries, "query embeddings", Some(e))?;
    if g.len() != gallery_labels.len() || q.len() != query_labels.len() {
        return Err(EncoderError::Input(format!(
            "{} gallery labels for {} embeddings, {} query labels for {} embeddings",
            gallery_labels.len(),
            g.len(),
            query_labels.len(),
            q.len()
        )));
    }
    if q.is_empty() {
        return Err(EncoderError::Input("no queries".into()));
    }
    let mut sums: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for (row, &l) in g.iter().zip(gallery_labels) {
        let s = sums.entry(l).or_insert_with(|| vec![0.0; e]);
        s.iter_mut().zip(row).for_each(|(a, &b)| *a += b as f64);
    }
    let centroids: Vec<(usize, Vec<f64>)> = sums
        .into_iter()
        .map(|(l, mut v)| {
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= n);
            (l, v)
        })
        .collect();
    let mut right = 0usize;
    for (row, &l) in q.iter().zip(query_labels) {
        let best = centroids
            .iter()
            .map(|(cl, c)| {
                let s: f64 = c.iter().zip(row).map(|(a, &b)| a * b as f64).sum();
                (s, *cl)
            })
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if best.is_some_and(|(_, cl)| cl == l) {
            right += 1;
        }
    }
    Ok(right as f32 / q.len() as f32)
}

/// Nearest-centroid accuracy of `encoder` on held-out `queries` given a labelled `gallery`
/// (all (N, 3, S, S) images), see [`centroid_accuracy_of`].
pub fn centroid_accuracy(
    encoder: &IdentityEncoder,
    gallery: &Tensor,
    gallery_labels: &[usize],
    queries: &Tensor,
    query_labels: &[usize],
) -> Result<f32> {
    centroid_accuracy_of(
        &encoder.embed(gallery)?,
        gallery_labels,
        &encoder.embed(queries)?,
        query_labels,
    )
}

/// Leave-one-out nearest-centroid accuracy of embeddings (N, E) with `labels`: each image is
/// assigned to the label whose centroid (its own label's centroid excludes it) is most
/// cosine-similar. Only images whose label has at least two images are scored.
pub fn verification_accuracy_of(embeddings: &Tensor, labels: &[usize]) -> Result<f32> {
    let x = rows_of(embeddings, "embeddings", None)?;
    if x.len() != labels.len() {
        return Err(EncoderError::Input(format!(
            "{} labels for {} embeddings",
            labels.len(),
            x.len()
        )));
    }
    let e = x.first().map_or(0, Vec::len);
    let mut sums: BTreeMap<usize, (Vec<f64>, usize)> = BTreeMap::new();
    for (row, &l) in x.iter().zip(labels) {
        let s = sums.entry(l).or_insert_with(|| (vec![0.0; e], 0));
        s.0.iter_mut().zip(row).for_each(|(a, &b)| *a += b as f64);
        s.1 += 1;
    }
    let cos = |c: &[f64], row: &[f32]| -> f64 {
        let n = c.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        c.iter().zip(row).map(|(a, &b)| a * b as f64).sum::<f64>() / n
    };
    let (mut right, mut scored) = (0usize, 0usize);
    for (row, &l) in x.iter().zip(labels) {
        let (own_sum, own_n) = &sums[&l];
        if *own_n < 2 {
            continue;
        }
        scored += 1;
        let own: Vec<f64> = own_sum
            .iter()
            .zip(row)
            .map(|(a, &b)| a - b as f64)
            .collect();
        let own_score = cos(&own, row);
        let beaten = sums
            .iter()
            .any(|(&cl, (c, _))| cl != l && cos(c, row) > own_score);
        if !beaten {
            right += 1;
        }
    }
    if scored == 0 {
        return Err(EncoderError::Input(
            "no identity has two or more images to verify".into(),
        ));
    }
    Ok(right as f32 / scored as f32)
}

/// Leave-one-out nearest-centroid identity accuracy of `encoder` on `images` (N, 3, S, S)
/// with one label per image (see [`verification_accuracy_of`]); chance is about 1 / the
/// number of identities.
pub fn verification_accuracy(
    encoder: &IdentityEncoder,
    images: &Tensor,
    labels: &[usize],
) -> Result<f32> {
    verification_accuracy_of(&encoder.embed(images)?, labels)
}
