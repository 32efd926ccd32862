//! Who a synthetic person is: [`Identity`] (face shape, colours, hair, eyes, nose, mouth,
//! facial hair, glasses), drawn from a seed, and its 24-number vector form
//! ([`Identity::to_vector`], [`IDENTITY_DIMS`]).

use super::rng::SplitMix64;

small_enum! {
    /// Hair style of an [`Identity`].
    HairStyle {
        /// Short cropped hair with a side part.
        Short => "short",
        /// Long hair falling to the shoulders, centre part.
        Long => "long",
        /// No hair on top; a little at the sides.
        Bald => "bald",
        /// Hair pulled back into a bun on top of the head.
        Bun => "bun",
        /// A chin-length bob with a straight fringe (bangs).
        Fringe => "fringe",
        /// Big round curly hair.
        Curly => "curly",
    }
}

small_enum! {
    /// Facial hair of an [`Identity`].
    FacialHair {
        /// Clean shaven.
        None => "none",
        /// A moustache above the mouth.
        Moustache => "moustache",
        /// A full beard (with moustache) along the jaw and chin.
        Beard => "beard",
    }
}

small_enum! {
    /// Glasses of an [`Identity`] (they are part of the person, not an accessory).
    Glasses {
        /// No glasses.
        None => "none",
        /// Round frames.
        Round => "round",
        /// Rectangular frames.
        Square => "square",
    }
}

/// The facial parameters of one synthetic person.
///
/// Every continuous parameter lies in the range given by the constant of the same name on
/// [`Identity`] (e.g. [`Identity::FACE_RATIO`]); colours are sRGB triples scaled to `[0, 1]`
/// (byte / 255). Lengths are in canvas units (1 = the image side) unless said otherwise.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// Width / height of the head, [`Identity::FACE_RATIO`] (narrow → round).
    pub face_ratio: f32,
    /// Jaw width: how much the lower face keeps its width, [`Identity::JAW_WIDTH`]
    /// (small → pointed chin, 1 → a plain oval).
    pub jaw_width: f32,
    /// Skin colour (from a palette of skin tones, with jitter).
    pub skin: [f32; 3],
    /// Hair style.
    pub hair_style: HairStyle,
    /// Hair colour (also the colour of brows and facial hair).
    pub hair_color: [f32; 3],
    /// Iris colour.
    pub eye_color: [f32; 3],
    /// Eye centre distance from the face's midline, as a fraction of the face half-width,
    /// [`Identity::EYE_SPACING`].
    pub eye_spacing: f32,
    /// Eye radius, [`Identity::EYE_SIZE`].
    pub eye_size: f32,
    /// Brow stroke width, [`Identity::BROW_THICKNESS`].
    pub brow_thickness: f32,
    /// Brow tilt in radians, [`Identity::BROW_TILT`]; positive lifts the outer ends.
    pub brow_tilt: f32,
    /// From the eye line to the base of the nose, [`Identity::NOSE_LENGTH`].
    pub nose_length: f32,
    /// Width of the base of the nose, [`Identity::NOSE_WIDTH`].
    pub nose_width: f32,
    /// Mouth half-width as a fraction of the face half-width, [`Identity::MOUTH_WIDTH`].
    pub mouth_width: f32,
    /// Lip colour.
    pub lip_color: [f32; 3],
    /// Facial hair.
    pub facial_hair: FacialHair,
    /// Glasses.
    pub glasses: Glasses,
}

/// Length of [`Identity::to_vector`].
///
/// Order: `0` face ratio, `1` jaw width, `2..5` skin RGB, `5` hair style, `6..9` hair RGB,
/// `9..12` eye RGB, `12` eye spacing, `13` eye size, `14` brow thickness, `15` brow tilt,
/// `16` nose length, `17` nose width, `18` mouth width, `19..22` lip RGB, `22` facial hair,
/// `23` glasses. Ranges map linearly to `[0, 1]`; an enum with `n` values maps its index `i` to
/// `i / (n - 1)`.
pub const IDENTITY_DIMS: usize = 24;

/// Skin tones (sRGB bytes), light to dark.
pub(super) const SKIN_PALETTE: [[u8; 3]; 9] = [
    [255, 226, 200],
    [246, 203, 170],
    [236, 188, 150],
    [224, 170, 128],
    [204, 142, 100],
    [176, 114, 76],
    [142, 90, 60],
    [112, 70, 46],
    [84, 52, 36],
];

/// Hair colours: black, dark brown, brown, auburn, ginger, blonde, platinum, grey, and two dyes.
pub(super) const HAIR_PALETTE: [[u8; 3]; 10] = [
    [28, 24, 24],
    [66, 42, 30],
    [112, 72, 42],
    [138, 54, 30],
    [204, 104, 44],
    [222, 186, 112],
    [236, 226, 196],
    [150, 150, 152],
    [60, 90, 190],
    [206, 86, 150],
];
pub(super) const HAIR_WEIGHTS: [f32; 10] = [3.0, 3.0, 2.5, 1.5, 1.2, 2.0, 0.8, 1.2, 0.5, 0.5];

/// Names of the skin tones of the palette [`Identity::random`] draws from, light to dark.
pub const SKIN_TONES: [&str; 9] = [
    "skin 1 (lightest)",
    "skin 2",
    "skin 3",
    "skin 4",
    "skin 5",
    "skin 6",
    "skin 7",
    "skin 8",
    "skin 9 (darkest)",
];

/// Names of the hair colours of the palette [`Identity::random`] draws from.
pub const HAIR_COLOURS: [&str; 10] = [
    "black",
    "dark brown",
    "brown",
    "auburn",
    "ginger",
    "blonde",
    "platinum",
    "grey",
    "blue",
    "pink",
];

/// Iris colours: dark brown, brown, hazel, amber, green, blue, grey.
pub(super) const EYE_PALETTE: [[u8; 3]; 7] = [
    [52, 32, 20],
    [100, 62, 30],
    [130, 110, 50],
    [170, 110, 30],
    [70, 140, 70],
    [60, 120, 210],
    [120, 136, 150],
];

/// Lip tints, mixed half and half with the skin tone.
pub(super) const LIP_TINTS: [[u8; 3]; 5] = [
    [200, 70, 80],
    [150, 50, 60],
    [220, 110, 110],
    [160, 80, 60],
    [230, 60, 110],
];

pub(super) fn rgb(c: [u8; 3]) -> [f32; 3] {
    [
        c[0] as f32 / 255.0,
        c[1] as f32 / 255.0,
        c[2] as f32 / 255.0,
    ]
}

pub(super) fn jitter(rng: &mut SplitMix64, c: [f32; 3], amount: f32) -> [f32; 3] {
    let common = rng.range((-amount, amount));
    let mut out = c;
    for v in &mut out {
        *v = (*v + common + rng.range((-amount, amount)) * 0.4).clamp(0.0, 1.0);
    }
    out
}

pub(super) fn norm(v: f32, (lo, hi): (f32, f32)) -> f32 {
    ((v - lo) / (hi - lo)).clamp(0.0, 1.0)
}

pub(super) fn denorm(t: f32, (lo, hi): (f32, f32)) -> f32 {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.5
    };
    lo + (hi - lo) * t
}

pub(super) fn index_norm(i: usize, n: usize) -> f32 {
    if n <= 1 {
        0.0
    } else {
        i as f32 / (n - 1) as f32
    }
}

pub(super) fn index_denorm(t: f32, n: usize) -> usize {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    (t * (n.saturating_sub(1)) as f32).round() as usize
}

impl Identity {
    /// Range of [`Identity::face_ratio`].
    pub const FACE_RATIO: (f32, f32) = (0.70, 0.92);
    /// Range of [`Identity::jaw_width`].
    pub const JAW_WIDTH: (f32, f32) = (0.50, 1.0);
    /// Range of [`Identity::eye_spacing`].
    pub const EYE_SPACING: (f32, f32) = (0.34, 0.50);
    /// Range of [`Identity::eye_size`].
    pub const EYE_SIZE: (f32, f32) = (0.026, 0.042);
    /// Range of [`Identity::brow_thickness`].
    pub const BROW_THICKNESS: (f32, f32) = (0.008, 0.024);
    /// Range of [`Identity::brow_tilt`].
    pub const BROW_TILT: (f32, f32) = (-0.35, 0.35);
    /// Range of [`Identity::nose_length`].
    pub const NOSE_LENGTH: (f32, f32) = (0.05, 0.10);
    /// Range of [`Identity::nose_width`].
    pub const NOSE_WIDTH: (f32, f32) = (0.035, 0.08);
    /// Range of [`Identity::mouth_width`].
    pub const MOUTH_WIDTH: (f32, f32) = (0.30, 0.60);

    /// A random person, deterministic in `seed`.
    ///
    /// Colours come from palettes (skin, hair, eyes, lips) with a small jitter; the other
    /// parameters are uniform in their ranges; facial hair and glasses are each absent about
    /// half the time.
    pub fn random(seed: u64) -> Identity {
        Self::random_with_palette(seed).0
    }

    /// [`Identity::random`] with the palette entries it drew the colours from: the skin tone
    /// (index into [`SKIN_TONES`]) and the hair colour (index into [`HAIR_COLOURS`]), before
    /// their jitter (what an attribute reader learns to name).
    pub fn random_with_palette(seed: u64) -> (Identity, usize, usize) {
        let mut rng = SplitMix64::new(seed, 0x1D3E_7717);
        let skin_index = rng.index(SKIN_PALETTE.len());
        let skin_base = rgb(SKIN_PALETTE[skin_index]);
        let skin = jitter(&mut rng, skin_base, 0.03);
        let hair_style = HairStyle::from_index(rng.weighted(&[1.0, 1.0, 0.5, 0.7, 0.8, 0.7]));
        let hair_index = rng.weighted(&HAIR_WEIGHTS);
        let hair_base = rgb(HAIR_PALETTE[hair_index]);
        let hair_color = jitter(&mut rng, hair_base, 0.04);
        let eye_base = rgb(EYE_PALETTE[rng.index(EYE_PALETTE.len())]);
        let eye_color = jitter(&mut rng, eye_base, 0.04);
        let tint = rgb(LIP_TINTS[rng.index(LIP_TINTS.len())]);
        let mut lip_color = [0.0; 3];
        for c in 0..3 {
            lip_color[c] = (0.45 * skin[c] + 0.55 * tint[c]).clamp(0.0, 1.0);
        }
        let lip_color = jitter(&mut rng, lip_color, 0.03);
        let identity = Identity {
            face_ratio: rng.range(Self::FACE_RATIO),
            jaw_width: rng.range(Self::JAW_WIDTH),
            skin,
            hair_style,
            hair_color,
            eye_color,
            eye_spacing: rng.range(Self::EYE_SPACING),
            eye_size: rng.range(Self::EYE_SIZE),
            brow_thickness: rng.range(Self::BROW_THICKNESS),
            brow_tilt: rng.range(Self::BROW_TILT),
            nose_length: rng.range(Self::NOSE_LENGTH),
            nose_width: rng.range(Self::NOSE_WIDTH),
            mouth_width: rng.range(Self::MOUTH_WIDTH),
            lip_color,
            facial_hair: FacialHair::from_index(rng.weighted(&[5.0, 2.0, 3.0])),
            glasses: Glasses::from_index(rng.weighted(&[5.0, 2.5, 2.5])),
        };
        (identity, skin_index, hair_index)
    }

    /// The parameters normalised to `[0, 1]`, [`IDENTITY_DIMS`] long, in the order documented
    /// at [`IDENTITY_DIMS`].
    pub fn to_vector(&self) -> Vec<f32> {
        let mut v = Vec::with_capacity(IDENTITY_DIMS);
        v.push(norm(self.face_ratio, Self::FACE_RATIO));
        v.push(norm(self.jaw_width, Self::JAW_WIDTH));
        v.extend(self.skin.iter().map(|c| c.clamp(0.0, 1.0)));
        v.push(index_norm(self.hair_style.index(), HairStyle::ALL.len()));
        v.extend(self.hair_color.iter().map(|c| c.clamp(0.0, 1.0)));
        v.extend(self.eye_color.iter().map(|c| c.clamp(0.0, 1.0)));
        v.push(norm(self.eye_spacing, Self::EYE_SPACING));
        v.push(norm(self.eye_size, Self::EYE_SIZE));
        v.push(norm(self.brow_thickness, Self::BROW_THICKNESS));
        v.push(norm(self.brow_tilt, Self::BROW_TILT));
        v.push(norm(self.nose_length, Self::NOSE_LENGTH));
        v.push(norm(self.nose_width, Self::NOSE_WIDTH));
        v.push(norm(self.mouth_width, Self::MOUTH_WIDTH));
        v.extend(self.lip_color.iter().map(|c| c.clamp(0.0, 1.0)));
        v.push(index_norm(self.facial_hair.index(), FacialHair::ALL.len()));
        v.push(index_norm(self.glasses.index(), Glasses::ALL.len()));
        debug_assert_eq!(v.len(), IDENTITY_DIMS);
        v
    }

    /// The inverse of [`Identity::to_vector`]: values are clamped to `[0, 1]` (non-finite
    /// values become the middle of the range), enum entries round to the nearest index, and
    /// missing trailing entries count as `0.5`; extra entries are ignored.
    pub fn from_vector(v: &[f32]) -> Identity {
        let at = |i: usize| -> f32 {
            let x = v.get(i).copied().unwrap_or(0.5);
            if x.is_finite() {
                x.clamp(0.0, 1.0)
            } else {
                0.5
            }
        };
        let col = |i: usize| [at(i), at(i + 1), at(i + 2)];
        Identity {
            face_ratio: denorm(at(0), Self::FACE_RATIO),
            jaw_width: denorm(at(1), Self::JAW_WIDTH),
            skin: col(2),
            hair_style: HairStyle::from_index(index_denorm(at(5), HairStyle::ALL.len())),
            hair_color: col(6),
            eye_color: col(9),
            eye_spacing: denorm(at(12), Self::EYE_SPACING),
            eye_size: denorm(at(13), Self::EYE_SIZE),
            brow_thickness: denorm(at(14), Self::BROW_THICKNESS),
            brow_tilt: denorm(at(15), Self::BROW_TILT),
            nose_length: denorm(at(16), Self::NOSE_LENGTH),
            nose_width: denorm(at(17), Self::NOSE_WIDTH),
            mouth_width: denorm(at(18), Self::MOUTH_WIDTH),
            lip_color: col(19),
            facial_hair: FacialHair::from_index(index_denorm(at(22), FacialHair::ALL.len())),
            glasses: Glasses::from_index(index_denorm(at(23), Glasses::ALL.len())),
        }
    }

    /// Euclidean distance between the two normalised vectors ([`Identity::to_vector`]); 0 for
    /// the same person, at most `sqrt(IDENTITY_DIMS)`.
    pub fn distance(&self, other: &Identity) -> f32 {
        self.to_vector()
            .iter()
            .zip(other.to_vector())
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            .sqrt()
    }
}
