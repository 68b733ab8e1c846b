//! The Qwen2-VL image processor (`Qwen2VLImageProcessor`, the slow PIL path of transformers).
//!
//! Pipeline (reference doc section 2): convert to RGB as PIL's `convert("RGB")` does ->
//! `smart_resize` -> Pillow bicubic resize of the 8-bit image (bit-exact port of Pillow's
//! `ImagingResample`) -> `x as f64 * rescale_factor` then f32 -> `(x - mean) / std` in f32 ->
//! channels first -> frame repeated to `temporal_patch_size` -> patches flattened in
//! merge-unit order.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use image::{DynamicImage, RgbImage};
use serde_json::Value;

/// transformers' `OPENAI_CLIP_MEAN`, the Qwen2-VL default (Python float -> f32, as numpy does).
pub const CLIP_MEAN: [f32; 3] = [
    0.48145466_f64 as f32,
    0.4578275_f64 as f32,
    0.40821073_f64 as f32,
];
/// transformers' `OPENAI_CLIP_STD`, the Qwen2-VL default (Python float -> f32, as numpy does).
pub const CLIP_STD: [f32; 3] = [
    0.26862954_f64 as f32,
    0.26130258_f64 as f32,
    0.27577711_f64 as f32,
];

/// Settings of `Qwen2VLImageProcessor` (read from `preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
    pub do_convert_rgb: bool,
    /// Optional resize done *before* the processor, as LLaMA-Factory's `_preprocess_image`
    /// (and verl's `process_image`) do with `image_max_pixels` / `image_min_pixels`.
    /// `None` (the default) = plain transformers behaviour. See [`llamafactory_preresize`].
    pub preresize: Option<PreResize>,
    /// Whose bicubic pass order to reproduce (default: Pillow 13).
    pub pillow: PillowVersion,
}

/// LLaMA-Factory's image pre-processing limits (`image_max_pixels`, `image_min_pixels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreResize {
    pub max_pixels: usize,
    pub min_pixels: usize,
}

impl Default for ImageProcessorConfig {
    /// The class defaults of transformers' `Qwen2VLImageProcessor` (what it uses for a field a
    /// `preprocessor_config.json` lacks): min_pixels 56*56, max_pixels 28*28*1280.
    fn default() -> Self {
        Self {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
            rescale_factor: 1.0 / 255.0,
            do_resize: true,
            do_rescale: true,
            do_normalize: true,
            do_convert_rgb: true,
            preresize: None,
            pillow: PillowVersion::V13,
        }
    }
}

/// One processed image: `rows x cols` row-major patch matrix and its `[t, h, w]` grid.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    pub pixel_values: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    pub grid_thw: [usize; 3],
}

/// Number of LLM tokens (`<|image_pad|>` copies) for one image grid.
pub fn num_image_tokens(grid_thw: [usize; 3], merge_size: usize) -> usize {
    grid_thw[0] * grid_thw[1] * grid_thw[2] / (merge_size * merge_size)
}

impl ImageProcessorConfig {
    /// The published Qwen2-VL / Qwen2.5-VL `preprocessor_config.json` values
    /// (min_pixels 3136, max_pixels 12845056).
    pub fn qwen2_5_vl() -> Self {
        Self {
            min_pixels: 3136,
            max_pixels: 12_845_056,
            ..Self::default()
        }
    }

    /// Reads `DIR/preprocessor_config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join("preprocessor_config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading image processor config {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Parses the content of a `preprocessor_config.json`.
    ///
    /// Pixel limits: `min_pixels`/`max_pixels` win (as in transformers' `__init__`), else
    /// `size.shortest_edge`/`size.longest_edge`, else the class defaults.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).context("invalid JSON")?;
        let obj = v.as_object().context("expected a JSON object")?;
        let mut cfg = Self::default();
        let get_usize = |key: &str| -> Result<Option<usize>> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .with_context(|| format!("`{key}` must be a non-negative integer, got {x}")),
            }
        };
        let get_bool = |key: &str, default: bool| -> Result<bool> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x
                    .as_bool()
                    .with_context(|| format!("`{key}` must be a boolean, got {x}")),
            }
        };
        let get_triple = |key: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Number(n)) => {
                    let f = n.as_f64().unwrap_or(0.0) as f32;
                    Ok([f; 3])
                }
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x
                            .as_f64()
                            .with_context(|| format!("`{key}` entries must be numbers"))?
                            as f32;
                    }
                    Ok(out)
                }
                Some(x) => bail!("`{key}` must be a number or a list of 3 numbers, got {x}"),
            }
        };

        if let Some(size) = obj.get("size").and_then(Value::as_object) {
            if let Some(n) = size.get("shortest_edge").and_then(Value::as_u64) {
                cfg.min_pixels = n as usize;
            }
            if let Some(n) = size.get("longest_edge").and_then(Value::as_u64) {
                cfg.max_pixels = n as usize;
            }
        }
        if let Some(n) = get_usize("min_pixels")? {
            cfg.min_pixels = n;
        }
        if let Some(n) = get_usize("max_pixels")? {
            cfg.max_pixels = n;
        }
        if let Some(n) = get_usize("patch_size")? {
            cfg.patch_size = n;
        }
        if let Some(n) = get_usize("temporal_patch_size")? {
            cfg.temporal_patch_size = n;
        }
        if let Some(n) = get_usize("merge_size")? {
            cfg.merge_size = n;
        }
        cfg.image_mean = get_triple("image_mean", cfg.image_mean)?;
        cfg.image_std = get_triple("image_std", cfg.image_std)?;
        if let Some(x) = obj.get("rescale_factor").filter(|x| !x.is_null()) {
            cfg.rescale_factor = x
                .as_f64()
                .with_context(|| format!("`rescale_factor` must be a number, got {x}"))?;
        }
        cfg.do_resize = get_bool("do_resize", cfg.do_resize)?;
        cfg.do_rescale = get_bool("do_rescale", cfg.do_rescale)?;
        cfg.do_normalize = get_bool("do_normalize", cfg.do_normalize)?;
        cfg.do_convert_rgb = get_bool("do_convert_rgb", cfg.do_convert_rgb)?;
        if let Some(r) = get_usize("resample")? {
            // PILImageResampling.BICUBIC == 3: the only filter implemented (and Qwen's).
            ensure!(
                r == 3,
                "only bicubic resampling (resample = 3) is supported, got resample = {r}"
            );
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Overrides `max_pixels` (the InfiMed recipe uses 262144).
    pub fn with_max_pixels(mut self, max_pixels: usize) -> Self {
        self.max_pixels = max_pixels;
        self
    }

    /// Overrides `min_pixels`.
    pub fn with_min_pixels(mut self, min_pixels: usize) -> Self {
        self.min_pixels = min_pixels;
        self
    }

    fn validate(&self) -> Result<()> {
        ensure!(self.patch_size > 0, "patch_size must be > 0");
        ensure!(
            self.temporal_patch_size > 0,
            "temporal_patch_size must be > 0"
        );
        ensure!(self.merge_size > 0, "merge_size must be > 0");
        ensure!(self.max_pixels > 0, "max_pixels must be > 0");
        ensure!(
            self.min_pixels <= self.max_pixels,
            "min_pixels ({}) > max_pixels ({})",
            self.min_pixels,
            self.max_pixels
        );
        Ok(())
    }

    /// `patch_size * merge_size` (28 for Qwen).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Columns of the patch matrix: `3 * temporal_patch_size * patch_size^2` (1176 for Qwen).
    pub fn patch_dim(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Number of `<|image_pad|>` tokens for one grid.
    pub fn num_image_tokens(&self, grid_thw: [usize; 3]) -> usize {
        num_image_tokens(grid_thw, self.merge_size)
    }

    /// The (height, width) the image will be resized to (after the optional pre-resize).
    pub fn target_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        if self.do_resize {
            smart_resize(
                height,
                width,
                self.factor(),
                self.min_pixels,
                self.max_pixels,
            )
        } else {
            Ok((height, width))
        }
    }

    /// Processes one image into its patch matrix.
    pub fn process(&self, img: &DynamicImage) -> Result<ProcessedImage> {
        self.validate()?;
        // Always RGB: the model has 3 input channels (transformers with do_convert_rgb=false
        // would keep e.g. a 1-channel image and then fail in the model).
        let mut rgb = to_rgb8_pil(img);
        if let Some(pre) = self.preresize {
            rgb = llamafactory_preresize(&rgb, pre.max_pixels, pre.min_pixels, self.pillow)?;
        }
        let (w0, h0) = (rgb.width() as usize, rgb.height() as usize);
        ensure!(w0 > 0 && h0 > 0, "empty image ({w0}x{h0})");
        let (h, w) = self.target_size(h0, w0)?;
        if (h, w) != (h0, w0) {
            rgb = pil_resize_bicubic_as(&rgb, w as u32, h as u32, self.pillow)?;
        }
        let f = self.factor();
        ensure!(
            h % f == 0 && w % f == 0,
            "image size {w}x{h} is not a multiple of {f} (do_resize is false)"
        );

        // Per-channel lookup table: u8 -> processed f32 (bit-identical to numpy's path).
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (x, out) in table.iter_mut().enumerate() {
                let mut v = if self.do_rescale {
                    (x as f64 * self.rescale_factor) as f32
                } else {
                    x as f32
                };
                if self.do_normalize {
                    v = (v - self.image_mean[c]) / self.image_std[c];
                }
                *out = v;
            }
        }

        let (p, m, tp) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let (gh, gw) = (h / p, w / p);
        let rows = gh * gw; // grid_t = 1
        let cols = self.patch_dim();
        let raw = rgb.as_raw();
        let mut out = Vec::with_capacity(rows * cols);
        for br in 0..gh / m {
            for bc in 0..gw / m {
                for ir in 0..m {
                    for ic in 0..m {
                        let y0 = (br * m + ir) * p;
                        let x0 = (bc * m + ic) * p;
                        for (c, table) in lut.iter().enumerate() {
                            for _tt in 0..tp {
                                for py in 0..p {
                                    let row = &raw[((y0 + py) * w + x0) * 3..];
                                    out.extend((0..p).map(|px| table[row[px * 3 + c] as usize]));
                                }
                            }
                        }
                    }
                }
            }
        }
        debug_assert_eq!(out.len(), rows * cols);
        Ok(ProcessedImage {
            pixel_values: out,
            rows,
            cols,
            grid_thw: [1, gh, gw],
        })
    }

    /// What [`Self::process`] makes of an image of `width x height` pixels, without its pixels:
    /// the grid and the patch matrix's shape (`pixel_values` empty). The sizes follow the same
    /// arithmetic (optional pre-resize, then `smart_resize`).
    pub fn shape_of(&self, width: usize, height: usize) -> Result<ProcessedImage> {
        self.validate()?;
        ensure!(width > 0 && height > 0, "empty image ({width}x{height})");
        let (w0, h0) = match self.preresize {
            Some(pre) => preresize_size(width, height, pre.max_pixels, pre.min_pixels),
            None => (width, height),
        };
        let (h, w) = self.target_size(h0, w0)?;
        let f = self.factor();
        ensure!(
            h % f == 0 && w % f == 0,
            "image size {w}x{h} is not a multiple of {f} (do_resize is false)"
        );
        let (gh, gw) = (h / self.patch_size, w / self.patch_size);
        Ok(ProcessedImage {
            pixel_values: vec![],
            rows: gh * gw,
            cols: self.patch_dim(),
            grid_thw: [1, gh, gw],
        })
    }

    /// [`Self::shape_of`] an image file, from its header (the pixels are not decoded).
    pub fn shape_of_path(&self, path: &Path) -> Result<ProcessedImage> {
        let (w, h) = image_size(path)?;
        self.shape_of(w, h)
            .with_context(|| format!("image {}", path.display()))
    }

    /// Loads and processes an image file.
    pub fn process_path(&self, path: &Path) -> Result<ProcessedImage> {
        let img = load_image(path)?;
        self.process(&img)
            .with_context(|| format!("processing image {}", path.display()))
    }
}

/// transformers' `smart_resize`: both sides multiples of `factor`, area within
/// `[min_pixels, max_pixels]`, aspect ratio kept as closely as possible. Python's `round` (ties
/// to even) is reproduced.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    ensure!(
        height > 0 && width > 0,
        "image has an empty side ({width}x{height})"
    );
    ensure!(factor > 0, "factor must be > 0");
    let (hf, wf, ff) = (height as f64, width as f64, factor as f64);
    let ratio = hf.max(wf) / hf.min(wf);
    ensure!(
        ratio <= 200.0,
        "absolute aspect ratio must be smaller than 200, got {ratio} ({width}x{height})"
    );
    let mut h_bar = (hf / ff).round_ties_even() as usize * factor;
    let mut w_bar = (wf / ff).round_ties_even() as usize * factor;
    if h_bar * w_bar > max_pixels {
        let beta = ((hf * wf) / max_pixels as f64).sqrt();
        h_bar = factor.max((hf / beta / ff).floor() as usize * factor);
        w_bar = factor.max((wf / beta / ff).floor() as usize * factor);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (hf * wf)).sqrt();
        h_bar = (hf * beta / ff).ceil() as usize * factor;
        w_bar = (wf * beta / ff).ceil() as usize * factor;
    }
    ensure!(
        h_bar > 0 && w_bar > 0,
        "smart_resize gave an empty size for {width}x{height}"
    );
    Ok((h_bar, w_bar))
}

/// Opens and decodes an image file (format guessed from the content). EXIF orientation is not
/// applied (neither PIL's `Image.open` nor transformers apply it).
///
/// JPEGs are decoded with libjpeg-turbo's decoder (the `mozjpeg` crate: the library Pillow's
/// wheels ship, same islow IDCT, fancy upsampling and YCbCr->RGB), so pixels are bit-identical
/// to PIL's; the image crate's decoder differs by up to 4 levels. A truncated JPEG is an error,
/// as in PIL. CMYK/YCCK JPEGs fall back to the image crate (PIL converts them differently).
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot open image {}", path.display()))?;
    decode_image(&bytes).with_context(|| format!("cannot decode image {}", path.display()))
}

/// `(width, height)` of an image file from its header, without decoding the pixels.
pub fn image_size(path: &Path) -> Result<(usize, usize)> {
    let reader = image::ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?;
    let (w, h) = reader
        .into_dimensions()
        .with_context(|| format!("cannot decode image {}", path.display()))?;
    Ok((w as usize, h as usize))
}

/// The size [`llamafactory_preresize`] gives an image of `width x height` pixels.
pub fn preresize_size(
    width: usize,
    height: usize,
    max_pixels: usize,
    min_pixels: usize,
) -> (usize, usize) {
    let (mut w, mut h) = (width as u32, height as u32);
    let area = |w: u32, h: u32| w as f64 * h as f64;
    if area(w, h) > max_pixels as f64 {
        let f = (max_pixels as f64 / area(w, h)).sqrt();
        (w, h) = ((w as f64 * f) as u32, (h as f64 * f) as u32);
    }
    if area(w, h) < min_pixels as f64 {
        let f = (min_pixels as f64 / area(w, h)).sqrt();
        (w, h) = ((w as f64 * f) as u32, (h as f64 * f) as u32);
    }
    if w.min(h) < 28 {
        (w, h) = (w.max(28), h.max(28));
    }
    if w as f64 / h as f64 > 200.0 {
        w = h * 180;
    }
    if h as f64 / w as f64 > 200.0 {
        h = w * 180;
    }
    (w as usize, h as usize)
}

/// Decodes an image held in memory (see [`load_image`]).
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage> {
    let format = image::guess_format(bytes).context("unknown image format")?;
    if format == image::ImageFormat::Jpeg {
        if let Some(img) = decode_jpeg_libjpeg(bytes)? {
            return Ok(img);
        }
    }
    Ok(image::load_from_memory_with_format(bytes, format)?)
}

/// libjpeg-turbo decoding to RGB; `Ok(None)` for colour spaces left to the image crate.
fn decode_jpeg_libjpeg(bytes: &[u8]) -> Result<Option<DynamicImage>> {
    // libjpeg's memory source silently completes a truncated stream (a warning we cannot see
    // through the crate); PIL raises "image file is truncated". The main image's entropy-coded
    // data cannot contain an EOI, so a complete file has an EOI after its last SOS marker.
    let last = |m: u8| bytes.windows(2).rposition(|w| w == [0xFF, m]);
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) if eoi > sos => {}
        (None, _) => bail!("JPEG without image data (no SOS marker)"),
        _ => bail!("image file is truncated (no JPEG end-of-image marker after the image data)"),
    }
    // libjpeg errors unwind through the crate (`resume_unwind`, no panic hook, nothing printed);
    // catch them here.
    let decoded = std::panic::catch_unwind(|| -> std::io::Result<Option<RgbImage>> {
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        use mozjpeg::ColorSpace::*;
        if !matches!(d.color_space(), JCS_GRAYSCALE | JCS_YCbCr | JCS_RGB) {
            return Ok(None);
        }
        let mut started = d.rgb()?;
        let (w, h) = (started.width() as u32, started.height() as u32);
        let data = started.read_scanlines::<u8>()?;
        started.finish()?;
        Ok(RgbImage::from_raw(w, h, data))
    });
    match decoded {
        Ok(Ok(Some(img))) => Ok(Some(DynamicImage::ImageRgb8(img))),
        Ok(Ok(None)) => Ok(None),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("libjpeg")),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg error".into());
            bail!("{msg}")
        }
    }
}

/// Converts to 8-bit RGB as PIL's `convert("RGB")` does on what PIL would have decoded:
/// alpha is dropped (no compositing), gray is replicated, 16-bit RGB(A)/LA keep the high byte
/// (PIL's `RGB;16B` unpacking), 16-bit gray is clamped to 255 (PIL's `I;16` -> `RGB`).
/// Float images use the image crate's conversion.
pub fn to_rgb8_pil(img: &DynamicImage) -> RgbImage {
    use image::ImageBuffer;
    let (w, h) = (img.width(), img.height());
    let from_fn =
        |f: &dyn Fn(u32, u32) -> [u8; 3]| ImageBuffer::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    match img {
        DynamicImage::ImageRgb8(im) => im.clone(),
        DynamicImage::ImageRgba8(im) => from_fn(&|x, y| {
            let p = im.get_pixel(x, y).0;
            [p[0], p[1], p[2]]
        }),
        DynamicImage::ImageLuma8(im) => from_fn(&|x, y| [im.get_pixel(x, y).0[0]; 3]),
        DynamicImage::ImageLumaA8(im) => from_fn(&|x, y| [im.get_pixel(x, y).0[0]; 3]),
        DynamicImage::ImageRgb16(im) => from_fn(&|x, y| {
            let p = im.get_pixel(x, y).0;
            [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8]
        }),
        DynamicImage::ImageRgba16(im) => from_fn(&|x, y| {
            let p = im.get_pixel(x, y).0;
            [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8]
        }),
        DynamicImage::ImageLuma16(im) => {
            from_fn(&|x, y| [im.get_pixel(x, y).0[0].min(255) as u8; 3])
        }
        DynamicImage::ImageLumaA16(im) => {
            from_fn(&|x, y| [(im.get_pixel(x, y).0[0] >> 8) as u8; 3])
        }
        other => other.to_rgb8(),
    }
}

/// LLaMA-Factory's `Qwen2VLPlugin._preprocess_image` (also verl's `process_image` for the
/// first two steps): if the area exceeds `max_pixels`, resize by `sqrt(max/area)` with `int()`
/// truncation; likewise up to `min_pixels`; then make both sides >= 28 and clamp the aspect
/// ratio to 180 when it exceeds 200. Every resize is PIL's default (bicubic).
///
/// Deviation: LLaMA-Factory resizes before converting to RGB (so RGBA is resized
/// premultiplied); here the image is already RGB.
pub fn llamafactory_preresize(
    img: &RgbImage,
    max_pixels: usize,
    min_pixels: usize,
    pillow: PillowVersion,
) -> Result<RgbImage> {
    let mut im = img.clone();
    let area = |im: &RgbImage| im.width() as f64 * im.height() as f64;
    if area(&im) > max_pixels as f64 {
        let f = (max_pixels as f64 / area(&im)).sqrt();
        let (w, h) = (
            (im.width() as f64 * f) as u32,
            (im.height() as f64 * f) as u32,
        );
        im = pil_resize_bicubic_as(&im, w, h, pillow)?;
    }
    if area(&im) < min_pixels as f64 {
        let f = (min_pixels as f64 / area(&im)).sqrt();
        let (w, h) = (
            (im.width() as f64 * f) as u32,
            (im.height() as f64 * f) as u32,
        );
        im = pil_resize_bicubic_as(&im, w, h, pillow)?;
    }
    if im.width().min(im.height()) < 28 {
        let (w, h) = (im.width().max(28), im.height().max(28));
        im = pil_resize_bicubic_as(&im, w, h, pillow)?;
    }
    if im.width() as f64 / im.height() as f64 > 200.0 {
        let (w, h) = (im.height() * 180, im.height());
        im = pil_resize_bicubic_as(&im, w, h, pillow)?;
    }
    if im.height() as f64 / im.width() as f64 > 200.0 {
        let (w, h) = (im.width(), im.width() * 180);
        im = pil_resize_bicubic_as(&im, w, h, pillow)?;
    }
    Ok(im)
}

// ---------------------------------------------------------------------------------------------
// Pillow's bicubic resampling (src/libImaging/Resample.c), 8 bits per channel, bit-exact.
// ---------------------------------------------------------------------------------------------

/// `PRECISION_BITS = 32 - 8 - 2`.
const PRECISION_BITS: u32 = 32 - 8 - 2;
const BICUBIC_SUPPORT: f64 = 2.0;

#[inline]
fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = if x < 0.0 { -x } else { x };
    if x < 1.0 {
        return ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    }
    if x < 2.0 {
        return (((x - 5.0) * x + 8.0) * x - 4.0) * A;
    }
    0.0
}

/// Pillow's `clip8`: `in >> PRECISION_BITS` looked up in a table clamping to 0..=255.
#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Fixed-point filter taps for one axis (`precompute_coeffs` + `normalize_coeffs_8bpc`).
struct Coeffs {
    ksize: usize,
    /// (first input index, number of taps) per output index.
    bounds: Vec<(usize, usize)>,
    kk: Vec<i32>,
}

fn precompute_coeffs(in_size: usize, in0: f32, in1: f32, out_size: usize) -> Result<Coeffs> {
    ensure!(
        out_size > 0 && in_size > 0,
        "resize to or from an empty size"
    );
    // C: `filterscale = scale = (double)(in1 - in0) / outSize;` (float subtraction).
    let scale = (in1 - in0) as f64 / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = BICUBIC_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 as f64 + (xx as f64 + 0.5) * scale;
        // C `(int)` truncates toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let n = (xmax - xmin).max(0) as usize;
        let xmin = xmin as usize;
        ensure!(n <= ksize, "internal error: filter window {n} > {ksize}");
        let mut ww = 0.0f64;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic_filter(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
            *kx = w;
            ww += w;
        }
        let row = &mut kk[xx * ksize..xx * ksize + ksize];
        for x in 0..n {
            let mut v = k[x];
            if ww != 0.0 {
                v /= ww;
            }
            let scaled = v * (1u32 << PRECISION_BITS) as f64;
            row[x] = if v < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Ok(Coeffs { ksize, bounds, kk })
}

/// Simple 3-channel u8 image buffer used between passes.
struct Plane {
    w: usize,
    h: usize,
    data: Vec<u8>,
}

fn resample_horizontal(input: &Plane, offset: usize, out_h: usize, c: &Coeffs) -> Plane {
    let out_w = c.bounds.len();
    let mut data = vec![0u8; out_w * out_h * 3];
    let half = 1i32 << (PRECISION_BITS - 1);
    for yy in 0..out_h {
        let line = &input.data[(yy + offset) * input.w * 3..(yy + offset + 1) * input.w * 3];
        let out = &mut data[yy * out_w * 3..(yy + 1) * out_w * 3];
        for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
            let k = &c.kk[xx * c.ksize..xx * c.ksize + n];
            let (mut s0, mut s1, mut s2) = (half, half, half);
            for (x, &kx) in k.iter().enumerate() {
                let p = &line[(x + xmin) * 3..(x + xmin) * 3 + 3];
                s0 = s0.wrapping_add((p[0] as i32).wrapping_mul(kx));
                s1 = s1.wrapping_add((p[1] as i32).wrapping_mul(kx));
                s2 = s2.wrapping_add((p[2] as i32).wrapping_mul(kx));
            }
            out[xx * 3] = clip8(s0);
            out[xx * 3 + 1] = clip8(s1);
            out[xx * 3 + 2] = clip8(s2);
        }
    }
    Plane {
        w: out_w,
        h: out_h,
        data,
    }
}

fn resample_vertical(input: &Plane, c: &Coeffs) -> Plane {
    let out_h = c.bounds.len();
    let w3 = input.w * 3;
    let mut data = vec![0u8; w3 * out_h];
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut acc = vec![0i32; w3];
    for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
        let k = &c.kk[yy * c.ksize..yy * c.ksize + n];
        acc.fill(half);
        for (y, &ky) in k.iter().enumerate() {
            let line = &input.data[(y + ymin) * w3..(y + ymin + 1) * w3];
            for (a, &p) in acc.iter_mut().zip(line) {
                *a = a.wrapping_add((p as i32).wrapping_mul(ky));
            }
        }
        for (o, &a) in data[yy * w3..(yy + 1) * w3].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    Plane {
        w: input.w,
        h: out_h,
        data,
    }
}

/// Pillow's `ImagingResampleInner` for the bicubic filter on an RGB image.
fn resample_inner(
    input: Plane,
    xsize: usize,
    ysize: usize,
    bx: [f32; 4],
    pillow: PillowVersion,
) -> Result<Plane> {
    let need_horizontal = xsize != input.w || bx[0] != 0.0 || bx[2] != xsize as f32;
    let need_vertical = ysize != input.h || bx[1] != 0.0 || bx[3] != ysize as f32;
    // Pillow 13: "If height is being scaled down, but not width, run the vertical pass first".
    let horizontal_first = match pillow {
        PillowVersion::V13 => !(xsize as f32 >= bx[2] - bx[0] && (ysize as f32) < bx[3] - bx[1]),
        PillowVersion::V12_2 | PillowVersion::Legacy => true,
    };
    let mut vert = precompute_coeffs(input.h, bx[1], bx[3], ysize)?;
    let horiz = precompute_coeffs(input.w, bx[0], bx[2], xsize)?;
    let mut cur = input;
    if horizontal_first {
        if need_horizontal {
            // Only the source rows the vertical pass will read.
            let ybox_first = vert.bounds[0].0;
            let (last_min, last_n) = vert.bounds[ysize - 1];
            let ybox_last = last_min + last_n;
            for b in vert.bounds.iter_mut() {
                b.0 -= ybox_first;
            }
            cur = resample_horizontal(&cur, ybox_first, ybox_last - ybox_first, &horiz);
        }
        if need_vertical {
            cur = resample_vertical(&cur, &vert);
        }
    } else {
        if need_vertical {
            cur = resample_vertical(&cur, &vert);
        }
        if need_horizontal {
            let h = cur.h;
            cur = resample_horizontal(&cur, 0, h, &horiz);
        }
    }
    Ok(cur)
}

/// Which Pillow's pass order to reproduce. The passes round to 8 bits in between, so the order
/// changes some pixels by 1-2 levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PillowVersion {
    /// Pillow >= 13: vertical pass first when the height shrinks and the width does not.
    #[default]
    V13,
    /// Pillow 12.2 - 12.3: horizontal first, except images taller than 100x their width whose
    /// height shrinks, which are resized vertically then horizontally (two calls).
    V12_2,
    /// Pillow <= 12.1: always horizontal first.
    Legacy,
}

/// `PIL.Image.resize((width, height), Image.BICUBIC)` on an RGB image, bit-exact with
/// Pillow 13 (see [`pil_resize_bicubic_as`] for older pass orders).
pub fn pil_resize_bicubic(img: &RgbImage, width: u32, height: u32) -> Result<RgbImage> {
    pil_resize_bicubic_as(img, width, height, PillowVersion::V13)
}

/// [`pil_resize_bicubic`] reproducing a given Pillow version's pass order.
pub fn pil_resize_bicubic_as(
    img: &RgbImage,
    width: u32,
    height: u32,
    pillow: PillowVersion,
) -> Result<RgbImage> {
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    let (w, h) = (width as usize, height as usize);
    ensure!(w0 > 0 && h0 > 0, "cannot resize an empty image ({w0}x{h0})");
    ensure!(w > 0 && h > 0, "cannot resize to an empty size ({w}x{h})");
    if (w, h) == (w0, h0) {
        return Ok(img.clone());
    }
    let plane = Plane {
        w: w0,
        h: h0,
        data: img.as_raw().clone(),
    };
    let out = if pillow == PillowVersion::V12_2 && h0 > w0 * 100 && h < h0 {
        // Image.resize: `self.im.resize((self.size[0], size[1]), resample, (0, box[1], self.size[0], box[3]))`
        // then `im.resize(size, resample, (box[0], 0, box[2], size[1]))`.
        let tmp = resample_inner(plane, w0, h, [0.0, 0.0, w0 as f32, h0 as f32], pillow)?;
        resample_inner(tmp, w, h, [0.0, 0.0, w0 as f32, h as f32], pillow)?
    } else {
        resample_inner(plane, w, h, [0.0, 0.0, w0 as f32, h0 as f32], pillow)?
    };
    RgbImage::from_raw(out.w as u32, out.h as u32, out.data)
        .context("internal error: resize buffer size")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn smart_resize_reference_values() {
        let (mn, mx) = (3136, 12_845_056);
        assert_eq!(smart_resize(42, 70, 28, mn, mx).unwrap(), (56, 56));
        assert_eq!(smart_resize(480, 640, 28, mn, mx).unwrap(), (476, 644));
        assert_eq!(smart_resize(1080, 1920, 28, mn, mx).unwrap(), (1092, 1932));
        // max_pixels branch (InfiMed's 262144).
        let (h, w) = smart_resize(1080, 1920, 28, mn, 262_144).unwrap();
        assert!(h * w <= 262_144 && h % 28 == 0 && w % 28 == 0);
        assert_eq!((h, w), (364, 672));
        // min_pixels branch.
        assert_eq!(smart_resize(10, 10, 28, mn, mx).unwrap(), (56, 56));
        assert!(smart_resize(1, 201, 28, mn, mx).is_err());
        assert!(smart_resize(1, 200, 28, mn, mx).is_ok());
        assert!(smart_resize(0, 10, 28, mn, mx).is_err());
    }

    #[test]
    fn config_parsing() {
        let c = ImageProcessorConfig::from_json_str(
            r#"{"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
                "rescale_factor": 0.00392156862745098, "image_processor_type": "Qwen2VLImageProcessor"}"#,
        )
        .unwrap();
        assert_eq!(c, ImageProcessorConfig::qwen2_5_vl());
        let c = ImageProcessorConfig::from_json_str(
            r#"{"size": {"shortest_edge": 100, "longest_edge": 5000}}"#,
        )
        .unwrap();
        assert_eq!((c.min_pixels, c.max_pixels), (100, 5000));
        let c = ImageProcessorConfig::from_json_str(
            r#"{"size": {"shortest_edge": 100, "longest_edge": 5000}, "max_pixels": 7000}"#,
        )
        .unwrap();
        assert_eq!((c.min_pixels, c.max_pixels), (100, 7000));
        assert_eq!(
            ImageProcessorConfig::from_json_str("{}").unwrap(),
            ImageProcessorConfig::default()
        );
        assert!(ImageProcessorConfig::from_json_str(r#"{"resample": 2}"#).is_err());
        assert!(ImageProcessorConfig::from_json_str(r#"{"max_pixels": "x"}"#).is_err());
        assert!(ImageProcessorConfig::from_json_str("[").is_err());
        let err = ImageProcessorConfig::from_dir("/nonexistent/dir").unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/dir/preprocessor_config.json"));
    }

    #[test]
    fn load_image_errors_name_the_path() {
        let err = load_image(Path::new("/nonexistent/x.png")).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/x.png"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.png");
        std::fs::write(&p, b"\x89PNG\r\n\x1a\nnot really a png").unwrap();
        let err = load_image(&p).unwrap_err();
        assert!(format!("{err:#}").contains("bad.png"), "{err:#}");
    }

    #[test]
    fn jpeg_decoding() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.jpg");
        DynamicImage::ImageRgb8(pattern(40, 30)).save(&p).unwrap();
        let img = load_image(&p).unwrap();
        assert_eq!((img.width(), img.height()), (40, 30));
        let bytes = std::fs::read(&p).unwrap();
        let t = dir.path().join("truncated.jpg");
        std::fs::write(&t, &bytes[..bytes.len() / 2]).unwrap();
        let err = format!("{:#}", load_image(&t).unwrap_err());
        assert!(
            err.contains("truncated.jpg") && err.contains("truncated"),
            "{err}"
        );
        // Corrupt header: a libjpeg error, reported (not a crash).
        let mut bad = bytes.clone();
        for b in bad.iter_mut().skip(2).take(200) {
            *b = 0x5A;
        }
        let c = dir.path().join("corrupt.jpg");
        std::fs::write(&c, &bad).unwrap();
        let err = format!("{:#}", load_image(&c).unwrap_err());
        assert!(err.contains("corrupt.jpg"), "{err}");
        // Grayscale JPEG comes back as RGB with equal channels.
        let g = dir.path().join("g.jpg");
        DynamicImage::ImageLuma8(image::GrayImage::from_fn(16, 8, |x, y| {
            image::Luma([(x * 9 + y) as u8])
        }))
        .save(&g)
        .unwrap();
        let img = load_image(&g).unwrap().to_rgb8();
        assert!(img.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
    }

    /// Deterministic test pattern (same formula in the Python that produced the expectations).
    pub(crate) fn pattern(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                ((x * 37 + y * 91 + 13) % 256) as u8,
                ((x * x * 7 + y * 3) % 256) as u8,
                (((x ^ y) * 29 + 200) % 256) as u8,
            ])
        })
    }

    #[test]
    fn process_layout_and_grid() {
        let cfg = ImageProcessorConfig::qwen2_5_vl();
        let img = DynamicImage::ImageRgb8(pattern(56, 84)); // no resize needed
        let out = cfg.process(&img).unwrap();
        assert_eq!(out.grid_thw, [1, 6, 4]);
        assert_eq!((out.rows, out.cols), (24, 1176));
        assert_eq!(cfg.num_image_tokens(out.grid_thw), 6);
        let raw = pattern(56, 84);
        let val = |c: usize, y: u32, x: u32| {
            let v = (raw.get_pixel(x, y).0[c] as f64 * (1.0 / 255.0)) as f32;
            (v - cfg.image_mean[c]) / cfg.image_std[c]
        };
        let (gh, gw) = (6usize, 4usize);
        for br in 0..gh / 2 {
            for bc in 0..gw / 2 {
                for ir in 0..2 {
                    for ic in 0..2 {
                        let row = ((br) * (gw / 2) + bc) * 4 + ir * 2 + ic;
                        for c in 0..3 {
                            for tt in 0..2 {
                                for py in [0usize, 5, 13] {
                                    for px in [0usize, 7, 13] {
                                        let col = ((c * 2 + tt) * 14 + py) * 14 + px;
                                        let y = ((br * 2 + ir) * 14 + py) as u32;
                                        let x = ((bc * 2 + ic) * 14 + px) as u32;
                                        assert_eq!(
                                            out.pixel_values[row * 1176 + col],
                                            val(c, y, x)
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Parity with PIL / transformers on the files written by `src/data/pil_check.py`; skipped
    /// unless `INFIMED_PIL_CHECK_DIR` names that output folder.
    #[test]
    fn parity_with_pil_and_transformers() {
        let Ok(dir) = std::env::var("INFIMED_PIL_CHECK_DIR") else {
            eprintln!("INFIMED_PIL_CHECK_DIR not set: skipping the PIL parity check");
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        let manifest: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap())
                .unwrap();
        let s = |v: &Value| v.as_str().unwrap().to_string();
        let mut failures = Vec::new();
        for case in manifest["resize"].as_array().unwrap() {
            let input = load_image(&dir.join(s(&case["input"]))).unwrap().to_rgb8();
            let expected = load_image(&dir.join(s(&case["output"]))).unwrap().to_rgb8();
            let (w, h) = (
                case["size"][0].as_u64().unwrap() as u32,
                case["size"][1].as_u64().unwrap() as u32,
            );
            let got = pil_resize_bicubic(&input, w, h).unwrap();
            let diff = got
                .as_raw()
                .iter()
                .zip(expected.as_raw())
                .filter(|(a, b)| a != b)
                .count();
            eprintln!(
                "resize {}x{} -> {w}x{h}: {diff} differing bytes",
                input.width(),
                input.height()
            );
            assert_eq!(got.dimensions(), expected.dimensions());
            if diff != 0 {
                failures.push(format!("resize case {case}"));
            }
            for (key, version) in [
                ("output_legacy", PillowVersion::Legacy),
                ("output_v12_2", PillowVersion::V12_2),
            ] {
                let expected = load_image(&dir.join(s(&case[key]))).unwrap().to_rgb8();
                let got = pil_resize_bicubic_as(&input, w, h, version).unwrap();
                if got != expected {
                    failures.push(format!("resize {version:?} case {case}"));
                }
            }
        }
        for case in manifest["decode"].as_array().unwrap() {
            let got = to_rgb8_pil(&load_image(&dir.join(s(&case["input"]))).unwrap());
            let expected = load_image(&dir.join(s(&case["decoded"])))
                .unwrap()
                .to_rgb8();
            let diffs: Vec<i32> = got
                .as_raw()
                .iter()
                .zip(expected.as_raw())
                .map(|(&a, &b)| (a as i32 - b as i32).abs())
                .collect();
            let n = diffs.iter().filter(|&&d| d != 0).count();
            eprintln!(
                "jpeg decode {}: {n}/{} bytes differ from PIL, max abs diff {}",
                s(&case["input"]),
                diffs.len(),
                diffs.iter().max().unwrap()
            );
            if n != 0 {
                failures.push(format!("decode {case}"));
            }
        }
        for case in manifest["process"].as_array().unwrap() {
            let cfg = ImageProcessorConfig::qwen2_5_vl()
                .with_min_pixels(case["min_pixels"].as_u64().unwrap() as usize)
                .with_max_pixels(case["max_pixels"].as_u64().unwrap() as usize);
            let name = s(&case["input"]);
            let got = cfg.process_path(&dir.join(&name)).unwrap();
            let bytes = std::fs::read(dir.join(s(&case["values"]))).unwrap();
            let expected: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let grid: Vec<usize> = case["grid"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(got.grid_thw.to_vec(), grid, "{name}");
            assert_eq!(
                (got.rows, got.cols),
                (
                    case["rows"].as_u64().unwrap() as usize,
                    case["cols"].as_u64().unwrap() as usize
                )
            );
            let max = got
                .pixel_values
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let n = got
                .pixel_values
                .iter()
                .zip(&expected)
                .filter(|(a, b)| a != b)
                .count();
            eprintln!(
                "process {name}: grid {grid:?}, {n}/{} values differ, max abs diff {max:e}",
                expected.len()
            );
            if n != 0 {
                failures.push(format!("process {name}"));
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn rgb_conversion_like_pil() {
        let g16 = image::ImageBuffer::from_fn(3, 1, |x, _| {
            image::Luma([[100u16, 256, 65535][x as usize]])
        });
        let rgb = to_rgb8_pil(&DynamicImage::ImageLuma16(g16));
        assert_eq!(rgb.as_raw(), &[100, 100, 100, 255, 255, 255, 255, 255, 255]);
        let rgba = image::RgbaImage::from_pixel(1, 1, image::Rgba([10, 20, 30, 0]));
        assert_eq!(
            to_rgb8_pil(&DynamicImage::ImageRgba8(rgba)).as_raw(),
            &[10, 20, 30]
        );
    }
}
