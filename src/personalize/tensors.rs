//! Conversions between images and the (N, 3, S, S) tensors in [-1, 1] every personalisation
//! model reads and writes.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::device::HOST;

/// Stacks same-sized RGB images into one (N, 3, H, W) f32 tensor with values in [-1, 1].
///
/// Errors when `images` is empty or the sizes differ.
pub fn images_to_tensor(images: &[RgbImage], device: &Device) -> candle_core::Result<Tensor> {
    let first = images.first().ok_or_else(|| {
        candle_core::Error::Msg("no images given: the image list is empty".into())
    })?;
    let (w, h) = first.dimensions();
    let mut data = Vec::with_capacity(images.len() * (w * h * 3) as usize);
    for (i, img) in images.iter().enumerate() {
        if img.dimensions() != (w, h) {
            return Err(candle_core::Error::Msg(format!(
                "image {i} is {:?}, the first is {:?}",
                img.dimensions(),
                (w, h)
            )));
        }
        data.extend(img.as_raw().iter().map(|&v| v as f32 / 127.5 - 1.0));
    }
    Tensor::from_vec(data, (images.len(), h as usize, w as usize, 3), device)?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

/// The inverse of [`images_to_tensor`]: (N, 3, H, W) values in [-1, 1] (clamped) to images.
pub fn tensor_to_images(t: &Tensor) -> candle_core::Result<Vec<RgbImage>> {
    let (n, c, h, w) = t.dims4()?;
    if c != 3 {
        return Err(candle_core::Error::Msg(format!(
            "expected 3 channels, got {c}"
        )));
    }
    let hwc = t
        .to_device(&HOST)?
        .to_dtype(DType::F32)?
        .clamp(-1.0, 1.0)?
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let per = h * w * 3;
    Ok((0..n)
        .map(|i| {
            let bytes = hwc[i * per..(i + 1) * per]
                .iter()
                .map(|v| ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8)
                .collect();
            RgbImage::from_raw(w as u32, h as u32, bytes).expect("buffer has the image's size")
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_exact_on_bytes() {
        let a = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 255]));
        let b = RgbImage::from_fn(5, 4, |x, y| image::Rgb([0, (x * y) as u8, 7]));
        let t = images_to_tensor(&[a.clone(), b.clone()], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 3, 4, 5]);
        let back = tensor_to_images(&t).unwrap();
        assert_eq!(back, vec![a, b]);
        assert!(images_to_tensor(&[], &Device::Cpu).is_err());
    }
}
