//! 3×3, stride-1, zero-padded convolutions of channels-last maps as im2col + matmul, whose
//! backward is matmuls and slices — much faster on the CPU than candle's convolution backward.
//!
//! [`im2col`] gathers every pixel's 3×3 patch, [`col2im`] is its adjoint (each pixel sums the
//! patch entries that read it); each is the other's backward. For f32 on the CPU they are
//! custom kernels; elsewhere (the GPU path) they are compositions of standard candle ops
//! ([`im2col_composed`], [`col2im_composed`]) whose backward autograd derives.
//! [`conv3x3`] is the convolution itself. The identity encoders and the attribute reader
//! ([`ConvTower`](super::ConvTower)) are built on it.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

/// The contiguous f32 data of a CPU tensor argument of a custom op.
fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: only f32 is supported");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: the input must be contiguous");
    };
    Ok(&v[a..b])
}

/// 3×3 patches of a channels-last (B, H, W, C) map with zero padding 1: (B, H, W, 9·C), the
/// patch laid out as (dy, dx, c). Its backward ([`Col2Im`]) sums the patches back.
struct Im2Col;

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col-3x3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l, "im2col")?;
        let (b, h, w, c) = l.shape().dims4()?;
        let mut out = vec![0f32; b * h * w * 9 * c];
        out.par_chunks_mut(w * 9 * c)
            .enumerate()
            .for_each(|(row, o)| {
                let (n, y) = (row / h, row % h);
                for dy in 0..3 {
                    let sy = y as i64 + dy as i64 - 1;
                    if sy < 0 || sy >= h as i64 {
                        continue;
                    }
                    let src = &x[(n * h + sy as usize) * w * c..][..w * c];
                    for xx in 0..w {
                        for dx in 0..3 {
                            let sx = xx as i64 + dx as i64 - 1;
                            if sx < 0 || sx >= w as i64 {
                                continue;
                            }
                            let at = xx * 9 * c + (dy * 3 + dx) * c;
                            o[at..at + c].copy_from_slice(&src[sx as usize * c..][..c]);
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, h, w, 9 * c))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (_, _, _, c) = arg.dims4()?;
        Ok(Some(col2im(grad, c)?))
    }
}

/// The adjoint of [`Im2Col`]: (B, H, W, 9·C) → (B, H, W, C). Its backward is [`Im2Col`].
struct Col2Im {
    c: usize,
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im-3x3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = cpu_f32(s, l, "col2im")?;
        let (b, h, w, k) = l.shape().dims4()?;
        let c = self.c;
        if k != 9 * c {
            candle_core::bail!("col2im: {k} columns for {c} channels");
        }
        let mut out = vec![0f32; b * h * w * c];
        // Each output row y gathers from input rows y-1, y, y+1 (no write conflicts).
        out.par_chunks_mut(w * c).enumerate().for_each(|(row, o)| {
            let (n, y) = (row / h, row % h);
            for dy in 0..3 {
                // Output pixel (y, x) was read by patch (y + 1 - dy, x + 1 - dx) at (dy, dx).
                let py = y as i64 + 1 - dy as i64;
                if py < 0 || py >= h as i64 {
                    continue;
                }
                let src = &g[(n * h + py as usize) * w * k..][..w * k];
                for xx in 0..w {
                    for dx in 0..3 {
                        let px = xx as i64 + 1 - dx as i64;
                        if px < 0 || px >= w as i64 {
                            continue;
                        }
                        let at = px as usize * k + (dy * 3 + dx) * c;
                        let dst = &mut o[xx * c..(xx + 1) * c];
                        dst.iter_mut()
                            .zip(&src[at..at + c])
                            .for_each(|(d, v)| *d += v);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, h, w, c))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(im2col(grad)?))
    }
}

/// Whether an op on `x` runs as a composition of standard candle ops (the GPU path): the
/// kernels here implement `cpu_fwd` only.
fn composed(x: &Tensor) -> bool {
    !x.device().is_cpu()
}

/// 3×3 patches of a channels-last (B, H, W, C) map with zero padding 1: (B, H, W, 9·C), the
/// patch laid out as (dy, dx, c). The kernel for f32 on the CPU, else [`im2col_composed`].
pub fn im2col(x: &Tensor) -> candle_core::Result<Tensor> {
    if composed(x) || x.dtype() != DType::F32 {
        im2col_composed(x)
    } else {
        x.contiguous()?.apply_op1(Im2Col)
    }
}

/// [`im2col`] as standard candle ops: the zero-padded map's nine shifted (H, W) views,
/// concatenated along the channels. Autograd gives the backward (narrow and cat).
pub fn im2col_composed(x: &Tensor) -> candle_core::Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    let xp = x.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1)?;
    let mut shifted = Vec::with_capacity(9);
    for dy in 0..3 {
        for dx in 0..3 {
            shifted.push(xp.narrow(1, dy, h)?.narrow(2, dx, w)?);
        }
    }
    Tensor::cat(&shifted, 3)
}

/// The adjoint of [`im2col`], (B, H, W, 9·C) → (B, H, W, C): every pixel sums the patch
/// entries that read it. The kernel for f32 on the CPU, else [`col2im_composed`].
pub fn col2im(g: &Tensor, c: usize) -> candle_core::Result<Tensor> {
    if composed(g) || g.dtype() != DType::F32 {
        col2im_composed(g, c)
    } else {
        g.contiguous()?.apply_op1(Col2Im { c })
    }
}

/// [`col2im`] as standard candle ops: patch slot (dy, dx) of pixel (y, x) read pixel
/// (y + dy − 1, x + dx − 1), so each slot's (B, H, W, C) slice, zero-padded and shifted back by
/// (dy, dx), is added to the result.
pub fn col2im_composed(g: &Tensor, c: usize) -> candle_core::Result<Tensor> {
    let (_, h, w, k) = g.dims4()?;
    if k != 9 * c {
        candle_core::bail!("col2im: {k} columns for {c} channels");
    }
    let mut out: Option<Tensor> = None;
    for dy in 0..3 {
        for dx in 0..3 {
            let part = g
                .narrow(3, (dy * 3 + dx) * c, c)?
                .pad_with_zeros(1, 1, 1)?
                .pad_with_zeros(2, 1, 1)?
                .narrow(1, 2 - dy, h)?
                .narrow(2, 2 - dx, w)?;
            out = Some(match out {
                Some(o) => (o + part)?,
                None => part,
            });
        }
    }
    out.ok_or_else(|| candle_core::Error::Msg("col2im: no patch slots".into()))
}

/// 3×3, stride-1, zero-padded convolution of channels-last `x` (B, H, W, C) with `w`
/// (9·C, O) laid out as (dy, dx, c): returns (B·H·W, O) without the bias.
pub fn conv3x3(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, wd, c) = x.dims4()?;
    let cols = im2col(x)?;
    cols.reshape((b * h * wd, 9 * c))?.matmul(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::kit::normal_values as normal_vec;
    use crate::test_util::max_abs_diff;
    use candle_core::{Device, Var};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn im2col_conv_matches_the_composite_version_with_gradients() {
        let dev = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(3);
        let mk = |rng: &mut StdRng, dims: &[usize]| {
            let n = dims.iter().product();
            Var::from_tensor(
                &Tensor::from_vec(normal_vec(rng, n, 1.0).unwrap(), dims, &dev).unwrap(),
            )
            .unwrap()
        };
        let x = mk(&mut rng, &[2, 5, 4, 3]);
        let w = mk(&mut rng, &[27, 4]);
        let g = Tensor::from_vec(
            normal_vec(&mut rng, 2 * 5 * 4 * 4, 1.0).unwrap(),
            (40, 4),
            &dev,
        )
        .unwrap();
        let ours = conv3x3(x.as_tensor(), w.as_tensor()).unwrap();
        // Reference: candle's conv2d on channels-first data.
        let wk = w
            .as_tensor()
            .reshape((3, 3, 3, 4))
            .unwrap()
            .permute((3, 2, 0, 1))
            .unwrap()
            .contiguous()
            .unwrap();
        let theirs = x
            .as_tensor()
            .permute((0, 3, 1, 2))
            .unwrap()
            .contiguous()
            .unwrap()
            .conv2d(&wk, 1, 1, 1, 1)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap()
            .reshape((40, 4))
            .unwrap();
        assert!(max_abs_diff(&ours, &theirs) < 1e-4);
        let ga = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (theirs * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w] {
            assert!(max_abs_diff(ga.get(v).unwrap(), gb.get(v).unwrap()) < 1e-3);
        }
    }

    /// The GPU path of the patch ops: `im2col_composed` and `col2im_composed` equal the CPU
    /// kernels, forward and gradients (1e-5 relative), on ragged maps; the entry functions on
    /// every test device give the CPU kernels' results.
    #[test]
    fn the_composed_patch_ops_equal_the_kernels_with_gradients() {
        let rel = |a: &Tensor, b: &Tensor| {
            let a = a.to_device(&Device::Cpu).unwrap();
            let d = (&a - b).unwrap().abs().unwrap().max_all().unwrap();
            let s = b.abs().unwrap().max_all().unwrap();
            d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap().max(1.0)
        };
        let mut rng = StdRng::seed_from_u64(11);
        for (b, h, w, c) in [(2, 5, 4, 3), (1, 1, 1, 1), (1, 3, 7, 2), (3, 2, 6, 5)] {
            let x = Tensor::from_vec(
                normal_vec(&mut rng, b * h * w * c, 1.0).unwrap(),
                (b, h, w, c),
                &Device::Cpu,
            )
            .unwrap();
            let cols = Tensor::from_vec(
                normal_vec(&mut rng, b * h * w * 9 * c, 1.0).unwrap(),
                (b, h, w, 9 * c),
                &Device::Cpu,
            )
            .unwrap();
            // (input, output weighting) of each op.
            let r_fwd = Tensor::from_vec(
                normal_vec(&mut rng, b * h * w * 9 * c, 1.0).unwrap(),
                (b, h, w, 9 * c),
                &Device::Cpu,
            )
            .unwrap();
            let r_adj = x.clone();
            type Op = fn(&Tensor, usize) -> candle_core::Result<Tensor>;
            let ops: [(&str, &Tensor, &Tensor, Op, Op); 2] = [
                (
                    "im2col",
                    &x,
                    &r_fwd,
                    |t, _| t.contiguous()?.apply_op1(Im2Col),
                    |t, _| im2col_composed(t),
                ),
                (
                    "col2im",
                    &cols,
                    &r_adj,
                    |t, c| t.contiguous()?.apply_op1(Col2Im { c }),
                    |t, c| col2im_composed(t, c),
                ),
            ];
            for (name, input, r, kernel, comp) in ops {
                let run = |f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>, dev: &Device| {
                    let v = Var::from_tensor(&input.to_device(dev).unwrap()).unwrap();
                    let y = f(v.as_tensor()).unwrap();
                    let g = (&y * r.to_device(dev).unwrap())
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let gx = g.get(&v).unwrap().to_device(&Device::Cpu).unwrap();
                    (y.to_device(&Device::Cpu).unwrap(), gx)
                };
                let (want, want_g) = run(&|t| kernel(t, c), &Device::Cpu);
                let entry = |t: &Tensor| match name {
                    "im2col" => im2col(t),
                    _ => col2im(t, c),
                };
                let mut got = vec![("composed".to_string(), run(&|t| comp(t, c), &Device::Cpu))];
                for dev in crate::device::test_devices() {
                    got.push((crate::device::label(&dev), run(&entry, &dev)));
                }
                for (label, (y, g)) in got {
                    let (ey, eg) = (rel(&y, &want), rel(&g, &want_g));
                    assert!(
                        ey < 1e-5,
                        "{name} {label} {b}×{h}×{w}×{c}: output differs by {ey}"
                    );
                    assert!(
                        eg < 1e-5,
                        "{name} {label} {b}×{h}×{w}×{c}: gradient differs by {eg}"
                    );
                }
            }
        }
    }
}
