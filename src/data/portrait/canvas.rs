//! The supersampled float canvas shapes are filled on (one-pixel analytic edge ramp), its
//! lighting gradient, and the box-filtered downsampling to the final image.

use image::{Rgb, RgbImage};

use super::attributes::Lighting;
use super::geometry::{Shape, V2, v2};

pub(super) type Rgbf = [f32; 3];

pub(super) fn scale_rgb(c: Rgbf, k: f32) -> Rgbf {
    [
        (c[0] * k).clamp(0.0, 1.0),
        (c[1] * k).clamp(0.0, 1.0),
        (c[2] * k).clamp(0.0, 1.0),
    ]
}

pub(super) fn mix_rgb(a: Rgbf, b: Rgbf, t: f32) -> Rgbf {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

/// Relative luminance-ish brightness.
pub(super) fn luma(c: Rgbf) -> f32 {
    0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2]
}

/// A supersampled float canvas. Shapes are given in "figure" space; the nuisance transform
/// (scale and shift) maps figure space to canvas units.
pub(super) struct Canvas {
    pub(super) w: usize,
    pub(super) px: Vec<Rgbf>,
    /// Coverage of the figure (not background), for the lighting.
    pub(super) fg: Vec<f32>,
    /// Supersampled pixels per canvas unit.
    pub(super) ppu: f32,
    /// Figure → canvas: `canvas = figure * zoom + shift`.
    pub(super) zoom: f32,
    pub(super) shift: V2,
}

impl Canvas {
    pub(super) fn new(w: usize, bg: Rgbf, zoom: f32, shift: V2) -> Canvas {
        Canvas {
            w,
            px: vec![bg; w * w],
            fg: vec![0.0; w * w],
            ppu: w as f32,
            zoom,
            shift,
        }
    }

    /// Paints `shape` with `color` at `opacity`, marking it as figure.
    pub(super) fn fill(&mut self, shape: &Shape, color: Rgbf, opacity: f32) {
        let (lo, hi) = shape.bbox();
        let half = self.w as f32 * 0.5;
        // Figure → supersampled pixel coordinates.
        let to_px = |p: V2| -> V2 {
            let c = p * self.zoom + self.shift;
            v2(c.x * self.ppu + half, c.y * self.ppu + half)
        };
        let a = to_px(lo);
        let b = to_px(hi);
        let wmax = self.w as f32;
        let x0 = (a.x.max(0.0).min(wmax) - 1.0).max(0.0) as usize;
        let y0 = (a.y.max(0.0).min(wmax) - 1.0).max(0.0) as usize;
        let x1 = ((b.x.max(0.0).min(wmax)) + 1.0).min(wmax) as usize;
        let y1 = ((b.y.max(0.0).min(wmax)) + 1.0).min(wmax) as usize;
        if x0 >= x1 || y0 >= y1 {
            return;
        }
        // Distance in figure units → supersampled pixels.
        let d_to_px = self.zoom * self.ppu;
        for y in y0..y1 {
            for x in x0..x1 {
                let cx = ((x as f32 + 0.5) - half) / self.ppu;
                let cy = ((y as f32 + 0.5) - half) / self.ppu;
                let p = v2(
                    (cx - self.shift.x) / self.zoom,
                    (cy - self.shift.y) / self.zoom,
                );
                let d = shape.sdf(p) * d_to_px;
                let cov = (0.5 - d).clamp(0.0, 1.0) * opacity;
                if cov <= 0.0 {
                    continue;
                }
                let i = y * self.w + x;
                self.px[i] = mix_rgb(self.px[i], color, cov);
                self.fg[i] = self.fg[i] + (1.0 - self.fg[i]) * cov;
            }
        }
    }

    pub(super) fn light(&mut self, lighting: Lighting) {
        if lighting == Lighting::Even {
            return;
        }
        let half = self.w as f32 * 0.5;
        for y in 0..self.w {
            for x in 0..self.w {
                let i = y * self.w + x;
                let f = self.fg[i];
                if f <= 0.0 {
                    continue;
                }
                let cx = ((x as f32 + 0.5) - half) / self.ppu;
                let cy = ((y as f32 + 0.5) - half) / self.ppu;
                let k = 1.0 + (lighting.factor(cx, cy) - 1.0) * f;
                self.px[i] = scale_rgb(self.px[i], k);
            }
        }
    }

    /// Box-filters down by `ss` into an 8-bit image.
    pub(super) fn downsample(&self, ss: usize) -> RgbImage {
        let out = self.w / ss;
        let n = (ss * ss) as f32;
        let mut img = RgbImage::new(out as u32, out as u32);
        for oy in 0..out {
            for ox in 0..out {
                let mut acc = [0.0f32; 3];
                for dy in 0..ss {
                    let row = (oy * ss + dy) * self.w + ox * ss;
                    for p in &self.px[row..row + ss] {
                        acc[0] += p[0];
                        acc[1] += p[1];
                        acc[2] += p[2];
                    }
                }
                let to8 = |v: f32| ((v / n).clamp(0.0, 1.0) * 255.0 + 0.5) as u8;
                img.put_pixel(
                    ox as u32,
                    oy as u32,
                    Rgb([to8(acc[0]), to8(acc[1]), to8(acc[2])]),
                );
            }
        }
        img
    }
}
