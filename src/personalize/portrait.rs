//! A procedural renderer of synthetic cartoon portraits with ground-truth identity.
//!
//! A portrait is drawn from an [`Identity`] (who the person is) and [`Attributes`] (what a text
//! prompt may change: expression, head turn, background, lighting, accessory). Everything is
//! deterministic: [`Identity::random`], [`Attributes::random`] and [`render`] give the same
//! result for the same seed on every platform (they use their own SplitMix64 generator, not a
//! library one whose stream could change between versions).
//!
//! Drawing is pure Rust: every shape is a signed-distance function (ellipses, rounded
//! rectangles, polygons, strokes, and their unions / intersections / outlines) filled with an
//! analytic one-pixel edge ramp on a supersampled canvas, which is then box-filtered down, so
//! edges are smooth at every size.
//!
//! Coordinates: the canvas spans `[-0.5, 0.5]` on both axes, `y` pointing down, so one unit is
//! the image side. The head is centred a little above the middle; the face is about 0.55 high.

use image::{Rgb, RgbImage};

// ---------------------------------------------------------------------------------------------
// Random numbers
// ---------------------------------------------------------------------------------------------

/// SplitMix64: tiny, fast, and its stream is fixed forever (deterministic renders).
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64, stream: u64) -> Self {
        let mut s = SplitMix64(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        // Discard one output so that nearby seeds decorrelate immediately.
        s.next_u64();
        s
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[lo, hi)`.
    fn range(&mut self, (lo, hi): (f32, f32)) -> f32 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform index in `0..n` (`n > 0`).
    fn index(&mut self, n: usize) -> usize {
        ((self.next_u64() >> 33) % n.max(1) as u64) as usize
    }

    /// An index drawn with the given relative weights.
    fn weighted(&mut self, weights: &[f32]) -> usize {
        let total: f32 = weights.iter().sum();
        let mut x = self.unit() * total;
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len().saturating_sub(1)
    }
}

/// Mixes two words into one seed (for per-item seeds derived from a base seed).
fn mix_seed(a: u64, b: u64) -> u64 {
    let mut s = SplitMix64::new(a, b.wrapping_add(0x5851_F42D_4C95_7F2D));
    s.next_u64()
}

// ---------------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------------

/// Declares a small enum with `ALL`, `name()`, `index()` and `from_index()`.
macro_rules! small_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $word:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value, in declaration order (the order of [`Self::index`]).
            pub const ALL: &'static [$name] = &[ $( $name::$variant ),+ ];

            /// The word for this value (used in prompts and labels).
            pub fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $word ),+
                }
            }

            /// Position of this value in [`Self::ALL`].
            pub fn index(self) -> usize {
                Self::ALL.iter().position(|v| *v == self).unwrap_or(0)
            }

            /// The value at `i` in [`Self::ALL`], clamped to the last one.
            pub fn from_index(i: usize) -> Self {
                Self::ALL[i.min(Self::ALL.len() - 1)]
            }
        }
    };
}

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
const SKIN_PALETTE: [[u8; 3]; 9] = [
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
const HAIR_PALETTE: [[u8; 3]; 10] = [
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
const HAIR_WEIGHTS: [f32; 10] = [3.0, 3.0, 2.5, 1.5, 1.2, 2.0, 0.8, 1.2, 0.5, 0.5];

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
const EYE_PALETTE: [[u8; 3]; 7] = [
    [52, 32, 20],
    [100, 62, 30],
    [130, 110, 50],
    [170, 110, 30],
    [70, 140, 70],
    [60, 120, 210],
    [120, 136, 150],
];

/// Lip tints, mixed half and half with the skin tone.
const LIP_TINTS: [[u8; 3]; 5] = [
    [200, 70, 80],
    [150, 50, 60],
    [220, 110, 110],
    [160, 80, 60],
    [230, 60, 110],
];

fn rgb(c: [u8; 3]) -> [f32; 3] {
    [
        c[0] as f32 / 255.0,
        c[1] as f32 / 255.0,
        c[2] as f32 / 255.0,
    ]
}

fn jitter(rng: &mut SplitMix64, c: [f32; 3], amount: f32) -> [f32; 3] {
    let common = rng.range((-amount, amount));
    let mut out = c;
    for v in &mut out {
        *v = (*v + common + rng.range((-amount, amount)) * 0.4).clamp(0.0, 1.0);
    }
    out
}

fn norm(v: f32, (lo, hi): (f32, f32)) -> f32 {
    ((v - lo) / (hi - lo)).clamp(0.0, 1.0)
}

fn denorm(t: f32, (lo, hi): (f32, f32)) -> f32 {
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.5
    };
    lo + (hi - lo) * t
}

fn index_norm(i: usize, n: usize) -> f32 {
    if n <= 1 {
        0.0
    } else {
        i as f32 / (n - 1) as f32
    }
}

fn index_denorm(t: f32, n: usize) -> usize {
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

// ---------------------------------------------------------------------------------------------
// Attributes
// ---------------------------------------------------------------------------------------------

small_enum! {
    /// Facial expression (a prompt attribute, not part of the identity).
    Expression {
        /// Relaxed face, closed mouth.
        Neutral => "neutral",
        /// Open smile, slightly narrowed eyes.
        Smile => "smile",
        /// Wide eyes, raised brows, round open mouth.
        Surprised => "surprised",
        /// Down-turned mouth, brows raised in the middle.
        Sad => "sad",
    }
}

small_enum! {
    /// Where the head is turned (features shift sideways and squash slightly).
    HeadTurn {
        /// Turned towards the image's left.
        Left => "left",
        /// Facing the viewer.
        Front => "front",
        /// Turned towards the image's right.
        Right => "right",
    }
}

small_enum! {
    /// Background colour, from a named palette ([`Background::rgb`]).
    Background {
        /// Blue.
        Blue => "blue",
        /// Green.
        Green => "green",
        /// Red.
        Red => "red",
        /// Yellow.
        Yellow => "yellow",
        /// Purple.
        Purple => "purple",
        /// Grey.
        Grey => "grey",
        /// White.
        White => "white",
        /// Black.
        Black => "black",
    }
}

small_enum! {
    /// Lighting: a brightness gradient over the person (the background stays flat).
    Lighting {
        /// Uniform light.
        Even => "even",
        /// Brighter on the image's left.
        Left => "left",
        /// Brighter on the image's right.
        Right => "right",
        /// Brighter at the top.
        Top => "top",
    }
}

small_enum! {
    /// An accessory worn in this picture (not part of the identity).
    Accessory {
        /// Nothing.
        None => "none",
        /// A brimmed hat.
        Hat => "hat",
        /// Gold earrings.
        Earrings => "earrings",
        /// A striped scarf.
        Scarf => "scarf",
    }
}

impl HeadTurn {
    /// The phrase [`Attributes::prompt`] writes, e.g. `"face left"`.
    pub fn phrase(self) -> String {
        format!("face {}", self.name())
    }

    fn sign(self) -> f32 {
        match self {
            HeadTurn::Left => -1.0,
            HeadTurn::Front => 0.0,
            HeadTurn::Right => 1.0,
        }
    }
}

impl Background {
    /// The phrase [`Attributes::prompt`] writes, e.g. `"blue background"`.
    pub fn phrase(self) -> String {
        format!("{} background", self.name())
    }

    /// The colour as sRGB bytes (what a flat corner of the image shows).
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Background::Blue => [66, 118, 206],
            Background::Green => [76, 164, 88],
            Background::Red => [204, 64, 56],
            Background::Yellow => [238, 204, 64],
            Background::Purple => [132, 78, 176],
            Background::Grey => [128, 128, 128],
            Background::White => [242, 242, 242],
            Background::Black => [22, 22, 22],
        }
    }
}

impl Lighting {
    /// The phrase [`Attributes::prompt`] writes, e.g. `"light from the left"`.
    pub fn phrase(self) -> String {
        match self {
            Lighting::Even => "even light".to_string(),
            other => format!("light from the {}", other.name()),
        }
    }

    /// Brightness factor at canvas point `(x, y)` (both in `[-0.5, 0.5]`).
    fn factor(self, x: f32, y: f32) -> f32 {
        const A: f32 = 0.75;
        match self {
            Lighting::Even => 1.0,
            Lighting::Left => 1.0 - A * x,
            Lighting::Right => 1.0 + A * x,
            Lighting::Top => 1.0 - A * (y + 0.1),
        }
    }
}

impl Accessory {
    /// The phrase [`Attributes::prompt`] writes: the name, or `"no accessory"`.
    pub fn phrase(self) -> String {
        match self {
            Accessory::None => "no accessory".to_string(),
            other => other.name().to_string(),
        }
    }
}

impl Expression {
    /// The phrase [`Attributes::prompt`] writes (the name).
    pub fn phrase(self) -> String {
        self.name().to_string()
    }
}

/// The non-identity attributes of one picture: what a text prompt can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Attributes {
    /// Facial expression.
    pub expression: Expression,
    /// Head turn.
    pub head_turn: HeadTurn,
    /// Background colour.
    pub background: Background,
    /// Lighting.
    pub lighting: Lighting,
    /// Accessory.
    pub accessory: Accessory,
}

impl Default for Attributes {
    /// Neutral, facing front, grey background, even light, no accessory.
    fn default() -> Self {
        Attributes {
            expression: Expression::Neutral,
            head_turn: HeadTurn::Front,
            background: Background::Grey,
            lighting: Lighting::Even,
            accessory: Accessory::None,
        }
    }
}

/// Splits text into lower-case alphabetic words.
fn words_of(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

fn colour_word(w: &str) -> Option<Background> {
    Some(match w {
        "blue" => Background::Blue,
        "green" => Background::Green,
        "red" => Background::Red,
        "yellow" => Background::Yellow,
        "purple" | "violet" => Background::Purple,
        "grey" | "gray" => Background::Grey,
        "white" => Background::White,
        "black" => Background::Black,
        _ => return None,
    })
}

fn direction_word(w: &str) -> Option<&'static str> {
    Some(match w {
        "left" => "left",
        "right" => "right",
        "front" | "frontal" | "forward" | "straight" | "centre" | "center" => "front",
        "top" | "above" | "overhead" => "top",
        "even" | "flat" | "uniform" | "soft" => "even",
        _ => return None,
    })
}

impl Attributes {
    /// Uniformly random attributes, deterministic in `seed`.
    pub fn random(seed: u64) -> Attributes {
        let mut rng = SplitMix64::new(seed, 0x0A77_12B5);
        Attributes {
            expression: Expression::from_index(rng.index(Expression::ALL.len())),
            head_turn: HeadTurn::from_index(rng.index(HeadTurn::ALL.len())),
            background: Background::from_index(rng.index(Background::ALL.len())),
            lighting: Lighting::from_index(rng.index(Lighting::ALL.len())),
            accessory: Accessory::from_index(rng.index(Accessory::ALL.len())),
        }
    }

    /// Reads attributes from prompt text; anything not mentioned keeps its default
    /// ([`Attributes::default`]). Each element may be a word or a phrase, and a phrase may hold
    /// several comma-separated parts, so both `&["smile", "blue background"]` and
    /// `&[attrs.prompt().as_str()]` work; [`Attributes::prompt`] output always parses back to
    /// the same attributes.
    ///
    /// Within one comma-separated part: a part mentioning `light`/`lit`/`lighting` sets the
    /// lighting from a direction word (`left`, `right`, `top`/`above`, `even`); a part with a
    /// colour word sets the background; `left`/`right`/`front` elsewhere set the head turn;
    /// expression words (`neutral`, `smile`/`smiling`/`happy`, `surprised`, `sad`) and
    /// accessory words (`hat`, `earrings`, `scarf`, `no accessory`) are recognised anywhere.
    /// Unknown words are ignored.
    pub fn from_words(words: &[&str]) -> Attributes {
        let mut a = Attributes::default();
        for element in words {
            for part in element.split([',', ';', '\n']) {
                a.apply_part(&words_of(part));
            }
        }
        a
    }

    fn apply_part(&mut self, words: &[String]) {
        let lighting_part = words.iter().any(|w| {
            matches!(
                w.as_str(),
                "light" | "lit" | "lighting" | "lighted" | "lamp"
            )
        });
        let no = words.iter().any(|w| w == "no" || w == "without");
        for w in words {
            let w = w.as_str();
            match w {
                "neutral" | "calm" | "expressionless" => self.expression = Expression::Neutral,
                "smile" | "smiling" | "happy" | "grin" | "grinning" => {
                    self.expression = Expression::Smile
                }
                "surprised" | "surprise" | "shocked" | "astonished" => {
                    self.expression = Expression::Surprised
                }
                "sad" | "unhappy" | "frowning" | "frown" => self.expression = Expression::Sad,
                "hat" | "cap" => self.accessory = if no { Accessory::None } else { Accessory::Hat },
                "earrings" | "earring" => {
                    self.accessory = if no {
                        Accessory::None
                    } else {
                        Accessory::Earrings
                    }
                }
                "scarf" => {
                    self.accessory = if no {
                        Accessory::None
                    } else {
                        Accessory::Scarf
                    }
                }
                "accessory" | "accessories" if no => self.accessory = Accessory::None,
                _ => {}
            }
            if let Some(bg) = colour_word(w) {
                // A colour names the background (the only coloured prompt attribute).
                self.background = bg;
                continue;
            }
            if let Some(dir) = direction_word(w) {
                if lighting_part {
                    self.lighting = match dir {
                        "left" => Lighting::Left,
                        "right" => Lighting::Right,
                        "top" => Lighting::Top,
                        _ => Lighting::Even,
                    };
                } else {
                    match dir {
                        "left" => self.head_turn = HeadTurn::Left,
                        "right" => self.head_turn = HeadTurn::Right,
                        "front" => self.head_turn = HeadTurn::Front,
                        _ => {}
                    }
                }
            }
        }
    }

    /// The prompt for these attributes: every attribute as one comma-separated phrase, e.g.
    /// `"smile, face left, blue background, light from the left, hat"`.
    pub fn prompt(&self) -> String {
        [
            self.expression.phrase(),
            self.head_turn.phrase(),
            self.background.phrase(),
            self.lighting.phrase(),
            self.accessory.phrase(),
        ]
        .join(", ")
    }
}

// ---------------------------------------------------------------------------------------------
// Geometry: signed distance shapes
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
struct V2 {
    x: f32,
    y: f32,
}

const fn v2(x: f32, y: f32) -> V2 {
    V2 { x, y }
}

impl V2 {
    fn dot(self, o: V2) -> f32 {
        self.x * o.x + self.y * o.y
    }
    fn len(self) -> f32 {
        self.dot(self).sqrt()
    }
    fn rot(self, a: f32) -> V2 {
        let (s, c) = a.sin_cos();
        v2(c * self.x - s * self.y, s * self.x + c * self.y)
    }
}

impl std::ops::Add for V2 {
    type Output = V2;
    fn add(self, o: V2) -> V2 {
        v2(self.x + o.x, self.y + o.y)
    }
}

impl std::ops::Sub for V2 {
    type Output = V2;
    fn sub(self, o: V2) -> V2 {
        v2(self.x - o.x, self.y - o.y)
    }
}

impl std::ops::Mul<f32> for V2 {
    type Output = V2;
    fn mul(self, k: f32) -> V2 {
        v2(self.x * k, self.y * k)
    }
}

/// A shape as a signed distance (negative inside) in canvas units.
#[derive(Debug, Clone)]
enum Shape {
    /// Ellipse with centre, radii and rotation (radians).
    Ellipse {
        c: V2,
        r: V2,
        rot: f32,
    },
    /// Rounded rectangle with centre, half-size, corner radius and rotation.
    RoundRect {
        c: V2,
        half: V2,
        radius: f32,
        rot: f32,
    },
    /// A simple polygon (any winding, may be concave).
    Polygon(Vec<V2>),
    /// A polyline of round-capped width `w` (full width).
    Stroke {
        pts: Vec<V2>,
        w: f32,
    },
    /// A head: an ellipse whose lower half narrows towards the chin by `jaw`.
    Head {
        c: V2,
        r: V2,
        jaw: f32,
    },
    /// The half-plane where `dot(p - p0, n) <= 0` (`n` need not be unit).
    HalfPlane {
        p0: V2,
        n: V2,
    },
    /// The outline band of a shape: `|d| - half`.
    Outline(Box<Shape>, f32),
    /// Grown (positive) or shrunk (negative) by a distance.
    Offset(Box<Shape>, f32),
    Union(Vec<Shape>),
    Intersect(Box<Shape>, Box<Shape>),
    Subtract(Box<Shape>, Box<Shape>),
}

fn sd_ellipse(p: V2, r: V2) -> f32 {
    // Inigo Quilez's cheap approximation, exact on the curve and good near it.
    let rx = r.x.max(1e-6);
    let ry = r.y.max(1e-6);
    let k0 = v2(p.x / rx, p.y / ry).len();
    let k1 = v2(p.x / (rx * rx), p.y / (ry * ry)).len();
    if k1 < 1e-9 {
        -rx.min(ry)
    } else {
        k0 * (k0 - 1.0) / k1
    }
}

fn sd_segment(p: V2, a: V2, b: V2) -> f32 {
    let pa = p - a;
    let ba = b - a;
    let bb = ba.dot(ba);
    let h = if bb > 0.0 {
        (pa.dot(ba) / bb).clamp(0.0, 1.0)
    } else {
        0.0
    };
    (pa - ba * h).len()
}

fn sd_polygon(p: V2, v: &[V2]) -> f32 {
    let n = v.len();
    if n < 3 {
        return f32::INFINITY;
    }
    let mut d = (p - v[0]).dot(p - v[0]);
    let mut s = 1.0f32;
    let mut j = n - 1;
    for i in 0..n {
        let e = v[j] - v[i];
        let w = p - v[i];
        let ee = e.dot(e).max(1e-12);
        let b = w - e * (w.dot(e) / ee).clamp(0.0, 1.0);
        d = d.min(b.dot(b));
        let c1 = p.y >= v[i].y;
        let c2 = p.y < v[j].y;
        let c3 = e.x * w.y > e.y * w.x;
        if (c1 && c2 && c3) || (!c1 && !c2 && !c3) {
            s = -s;
        }
        j = i;
    }
    s * d.sqrt()
}

impl Shape {
    fn ellipse(c: V2, rx: f32, ry: f32) -> Shape {
        Shape::Ellipse {
            c,
            r: v2(rx, ry),
            rot: 0.0,
        }
    }

    fn circle(c: V2, r: f32) -> Shape {
        Shape::ellipse(c, r, r)
    }

    fn rrect(c: V2, hx: f32, hy: f32, radius: f32) -> Shape {
        Shape::RoundRect {
            c,
            half: v2(hx, hy),
            radius,
            rot: 0.0,
        }
    }

    fn outline(self, width: f32) -> Shape {
        Shape::Outline(Box::new(self), width * 0.5)
    }

    fn offset(self, by: f32) -> Shape {
        Shape::Offset(Box::new(self), by)
    }

    fn and(self, other: Shape) -> Shape {
        Shape::Intersect(Box::new(self), Box::new(other))
    }

    fn minus(self, other: Shape) -> Shape {
        Shape::Subtract(Box::new(self), Box::new(other))
    }

    /// The region above (smaller `y` than) the horizontal line at `y`.
    fn above(y: f32) -> Shape {
        Shape::HalfPlane {
            p0: v2(0.0, y),
            n: v2(0.0, 1.0),
        }
    }

    /// The region below the horizontal line at `y`.
    fn below(y: f32) -> Shape {
        Shape::HalfPlane {
            p0: v2(0.0, y),
            n: v2(0.0, -1.0),
        }
    }

    fn sdf(&self, p: V2) -> f32 {
        match self {
            Shape::Ellipse { c, r, rot } => {
                let q = if *rot == 0.0 {
                    p - *c
                } else {
                    (p - *c).rot(-*rot)
                };
                sd_ellipse(q, *r)
            }
            Shape::RoundRect {
                c,
                half,
                radius,
                rot,
            } => {
                let q = if *rot == 0.0 {
                    p - *c
                } else {
                    (p - *c).rot(-*rot)
                };
                let rad = radius.min(half.x).min(half.y).max(0.0);
                let qx = q.x.abs() - half.x + rad;
                let qy = q.y.abs() - half.y + rad;
                v2(qx.max(0.0), qy.max(0.0)).len() + qx.max(qy).min(0.0) - rad
            }
            Shape::Polygon(v) => sd_polygon(p, v),
            Shape::Stroke { pts, w } => {
                let mut d = f32::INFINITY;
                for seg in pts.windows(2) {
                    d = d.min(sd_segment(p, seg[0], seg[1]));
                }
                if pts.len() == 1 {
                    d = (p - pts[0]).len();
                }
                d - w * 0.5
            }
            Shape::Head { c, r, jaw } => {
                let q = p - *c;
                let t = (q.y / r.y).clamp(0.0, 1.0);
                let k = 1.0 - (1.0 - jaw) * t * t;
                sd_ellipse(v2(q.x / k, q.y), *r) * (0.5 + 0.5 * k)
            }
            Shape::HalfPlane { p0, n } => {
                let l = n.len().max(1e-9);
                (p - *p0).dot(*n) / l
            }
            Shape::Outline(s, half) => s.sdf(p).abs() - half,
            Shape::Offset(s, by) => s.sdf(p) - by,
            Shape::Union(v) => v.iter().map(|s| s.sdf(p)).fold(f32::INFINITY, f32::min),
            Shape::Intersect(a, b) => a.sdf(p).max(b.sdf(p)),
            Shape::Subtract(a, b) => a.sdf(p).max(-b.sdf(p)),
        }
    }

    /// A bounding box `(min, max)`; may be infinite.
    fn bbox(&self) -> (V2, V2) {
        const INF: f32 = f32::INFINITY;
        match self {
            Shape::Ellipse { c, r, rot } => {
                let m = if *rot == 0.0 {
                    *r
                } else {
                    v2(r.x.max(r.y), r.x.max(r.y))
                };
                (*c - m, *c + m)
            }
            Shape::RoundRect { c, half, rot, .. } => {
                let m = if *rot == 0.0 {
                    *half
                } else {
                    let l = half.len();
                    v2(l, l)
                };
                (*c - m, *c + m)
            }
            Shape::Polygon(v) | Shape::Stroke { pts: v, .. } => {
                let grow = match self {
                    Shape::Stroke { w, .. } => w * 0.5,
                    _ => 0.0,
                };
                let mut lo = v2(INF, INF);
                let mut hi = v2(-INF, -INF);
                for p in v {
                    lo = v2(lo.x.min(p.x), lo.y.min(p.y));
                    hi = v2(hi.x.max(p.x), hi.y.max(p.y));
                }
                (lo - v2(grow, grow), hi + v2(grow, grow))
            }
            Shape::Head { c, r, .. } => (*c - *r, *c + *r),
            Shape::HalfPlane { .. } => (v2(-INF, -INF), v2(INF, INF)),
            Shape::Outline(s, g) | Shape::Offset(s, g) => {
                let g = g.abs();
                let (lo, hi) = s.bbox();
                (lo - v2(g, g), hi + v2(g, g))
            }
            Shape::Union(v) => {
                let mut lo = v2(INF, INF);
                let mut hi = v2(-INF, -INF);
                for s in v {
                    let (a, b) = s.bbox();
                    lo = v2(lo.x.min(a.x), lo.y.min(a.y));
                    hi = v2(hi.x.max(b.x), hi.y.max(b.y));
                }
                (lo, hi)
            }
            Shape::Intersect(a, b) => {
                let (a0, a1) = a.bbox();
                let (b0, b1) = b.bbox();
                (
                    v2(a0.x.max(b0.x), a0.y.max(b0.y)),
                    v2(a1.x.min(b1.x), a1.y.min(b1.y)),
                )
            }
            Shape::Subtract(a, _) => a.bbox(),
        }
    }
}

/// Samples a quadratic Bézier curve into a polyline of `n` segments.
fn bezier(a: V2, ctrl: V2, b: V2, n: usize) -> Vec<V2> {
    (0..=n)
        .map(|i| {
            let t = i as f32 / n as f32;
            let u = 1.0 - t;
            a * (u * u) + ctrl * (2.0 * u * t) + b * (t * t)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Canvas
// ---------------------------------------------------------------------------------------------

type Rgbf = [f32; 3];

fn scale_rgb(c: Rgbf, k: f32) -> Rgbf {
    [
        (c[0] * k).clamp(0.0, 1.0),
        (c[1] * k).clamp(0.0, 1.0),
        (c[2] * k).clamp(0.0, 1.0),
    ]
}

fn mix_rgb(a: Rgbf, b: Rgbf, t: f32) -> Rgbf {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

/// Relative luminance-ish brightness.
fn luma(c: Rgbf) -> f32 {
    0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2]
}

/// A supersampled float canvas. Shapes are given in "figure" space; the nuisance transform
/// (scale and shift) maps figure space to canvas units.
struct Canvas {
    w: usize,
    px: Vec<Rgbf>,
    /// Coverage of the figure (not background), for the lighting.
    fg: Vec<f32>,
    /// Supersampled pixels per canvas unit.
    ppu: f32,
    /// Figure → canvas: `canvas = figure * zoom + shift`.
    zoom: f32,
    shift: V2,
}

impl Canvas {
    fn new(w: usize, bg: Rgbf, zoom: f32, shift: V2) -> Canvas {
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
    fn fill(&mut self, shape: &Shape, color: Rgbf, opacity: f32) {
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

    fn light(&mut self, lighting: Lighting) {
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
    fn downsample(&self, ss: usize) -> RgbImage {
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

// ---------------------------------------------------------------------------------------------
// The portrait
// ---------------------------------------------------------------------------------------------

/// Outline width, in figure units.
const OUTLINE: f32 = 0.007;
/// Figure → canvas scale before the nuisance jitter (the figure is drawn a little small).
const FIGURE_SCALE: f32 = 1.14;
/// Figure → canvas vertical shift (keeps room for hats and buns).
const FIGURE_DY: f32 = 0.035;

/// Renders one portrait, `size`×`size` pixels (meant for sizes of 32 and up; any size ≥ 1
/// works, 0 gives an empty image).
///
/// The same `(identity, attrs, size, seed)` always gives the byte-identical image. `seed`
/// only drives a small nuisance jitter — a sub-pixel shift (±0.5 px) and a ±2 % scale — so two
/// renders of one person with one set of attributes differ slightly.
pub fn render(identity: &Identity, attrs: &Attributes, size: u32, seed: u64) -> RgbImage {
    if size == 0 {
        return RgbImage::new(0, 0);
    }
    let ss: usize = if size <= 64 { 4 } else { 2 };
    let w = size as usize * ss;
    let mut rng = SplitMix64::new(seed, 0x02E4_DE12);
    let zoom = FIGURE_SCALE * (1.0 + rng.range((-0.02, 0.02)));
    let px = 1.0 / size as f32;
    let shift = v2(
        rng.range((-0.5, 0.5)) * px,
        FIGURE_DY + rng.range((-0.5, 0.5)) * px,
    );
    let mut cv = Canvas::new(w, rgb(attrs.background.rgb()), zoom, shift);
    draw_person(&mut cv, identity, attrs);
    cv.light(attrs.lighting);
    cv.downsample(ss)
}

/// Renders `count` portraits of the person `Identity::random(identity_seed)`, each with
/// random attributes; deterministic in `(identity_seed, count, size, seed)`. Item `i` uses
/// `Attributes::random` and a render seed both derived from `(seed, i)`.
pub fn render_set(
    identity_seed: u64,
    count: usize,
    size: u32,
    seed: u64,
) -> Vec<(Attributes, RgbImage)> {
    let identity = Identity::random(identity_seed);
    (0..count)
        .map(|i| {
            let attrs = Attributes::random(mix_seed(seed, 2 * i as u64));
            let img = render(&identity, &attrs, size, mix_seed(seed, 2 * i as u64 + 1));
            (attrs, img)
        })
        .collect()
}

/// Layout of a face, in figure units.
struct Layout {
    /// Head centre and radii.
    head_c: V2,
    head_r: V2,
    /// Horizontal offset of the facial features (head turn).
    feat_dx: f32,
    /// Horizontal squash of feature offsets (head turn).
    feat_sx: f32,
    eye_y: f32,
    nose_y: f32,
    mouth_y: f32,
    turn: f32,
}

impl Layout {
    /// A feature point `(x, y)` given relative to the face midline.
    fn feat(&self, x: f32, y: f32) -> V2 {
        v2(self.head_c.x + self.feat_dx + x * self.feat_sx, y)
    }
}

fn draw_person(cv: &mut Canvas, id: &Identity, attrs: &Attributes) {
    let skin = id.skin;
    let skin_shade = scale_rgb(skin, 0.86);
    let skin_line = scale_rgb(skin, 0.62);
    let hair = id.hair_color;
    // Hair outlines: darker, but visible on black hair too.
    let hair_line = if luma(hair) < 0.15 {
        mix_rgb(hair, [0.0, 0.0, 0.0], 0.6)
    } else {
        scale_rgb(hair, 0.65)
    };
    let turn = attrs.head_turn.sign();

    let head_ry = 0.25;
    let head_rx = head_ry * id.face_ratio;
    let head_c = v2(turn * 0.012, -0.04);
    let eye_y = head_c.y + 0.015;
    let nose_y = eye_y + id.nose_length;
    let mouth_y = (nose_y + 0.05).min(head_c.y + head_ry * 0.78);
    let l = Layout {
        head_c,
        head_r: v2(head_rx, head_ry),
        feat_dx: turn * head_rx * 0.22,
        feat_sx: 1.0 - 0.12 * turn.abs(),
        eye_y,
        nose_y,
        mouth_y,
        turn,
    };
    let head = Shape::Head {
        c: head_c,
        r: l.head_r,
        jaw: id.jaw_width,
    };
    let crown = head_c.y - head_ry;

    // --- behind the head: back hair -----------------------------------------------------
    draw_back_hair(cv, id, &l, hair, hair_line);

    // --- body ------------------------------------------------------------------------
    let shirt = [0.30, 0.34, 0.42];
    let body = Shape::rrect(v2(0.0, 0.47), 0.36, 0.22, 0.16);
    cv.fill(&body, shirt, 1.0);
    cv.fill(&body.clone().outline(OUTLINE), scale_rgb(shirt, 0.6), 1.0);
    let neck = Shape::rrect(
        v2(head_c.x * 0.5, head_c.y + head_ry * 0.95),
        head_rx * 0.42,
        0.12,
        0.03,
    );
    cv.fill(&neck, skin_shade, 1.0);
    cv.fill(&neck.clone().outline(OUTLINE), skin_line, 1.0);
    // V collar.
    let collar_y = 0.27;
    let collar = Shape::Polygon(vec![
        v2(-0.07, collar_y),
        v2(0.07, collar_y),
        v2(0.0, collar_y + 0.07),
    ]);
    cv.fill(&collar.clone().and(body.clone()), skin_shade, 1.0);

    if attrs.accessory == Accessory::Scarf {
        draw_scarf(cv, &l);
    }
    // Long hair falls in front of the shoulders.
    if id.hair_style == HairStyle::Long {
        for side in [-1.0f32, 1.0] {
            let lock = Shape::rrect(
                v2(head_c.x + side * head_rx * 1.0, head_c.y + head_ry * 0.85),
                head_rx * 0.30,
                head_ry * 0.75,
                head_rx * 0.28,
            )
            .and(Shape::HalfPlane {
                p0: v2(head_c.x, 0.0),
                n: v2(-side, 0.0),
            });
            cv.fill(&lock, hair, 1.0);
            cv.fill(&lock.clone().outline(OUTLINE), hair_line, 1.0);
        }
    }

    // --- ears ------------------------------------------------------------------------
    let ear_y = eye_y + 0.035;
    for side in [-1.0f32, 1.0] {
        // The ear on the side the head turns to hides behind the cheek.
        let out = if side * turn > 0.0 {
            0.90
        } else {
            1.0 + 0.04 * turn.abs()
        };
        let c = v2(head_c.x + side * head_rx * out, ear_y);
        let ear = Shape::ellipse(c, 0.032, 0.048);
        cv.fill(&ear, skin, 1.0);
        cv.fill(&ear.clone().outline(OUTLINE), skin_line, 1.0);
        let inner = Shape::ellipse(c + v2(side * 0.004, 0.0), 0.014, 0.026);
        cv.fill(&inner, skin_shade, 1.0);
        if attrs.accessory == Accessory::Earrings {
            let ring_c = c + v2(side * 0.004, 0.064);
            let ring = Shape::circle(ring_c, 0.021);
            cv.fill(&ring, [0.96, 0.78, 0.22], 1.0);
            cv.fill(&ring.clone().outline(0.006), [0.62, 0.44, 0.08], 1.0);
            cv.fill(
                &Shape::Stroke {
                    pts: vec![c + v2(side * 0.004, 0.04), ring_c],
                    w: 0.006,
                },
                [0.8, 0.62, 0.12],
                1.0,
            );
        }
    }

    // --- face ------------------------------------------------------------------------
    cv.fill(&head, skin, 1.0);
    // A soft cheek shading towards the side the head turns away from.
    if turn != 0.0 {
        let lit = Shape::Head {
            c: head_c + v2(-turn * head_rx * 0.3, -0.01),
            r: v2(head_rx * 1.05, head_ry * 1.02),
            jaw: id.jaw_width,
        };
        cv.fill(&head.clone().minus(lit), skin_shade, 0.6);
    }
    cv.fill(&head.clone().outline(OUTLINE), skin_line, 1.0);

    // --- facial hair (under the features) --------------------------------------------
    if id.facial_hair == FacialHair::Beard {
        let beard_top = Shape::Polygon(vec![
            v2(head_c.x - head_rx * 1.2, ear_y - 0.03),
            v2(head_c.x - head_rx * 0.92, ear_y - 0.03),
            l.feat(-head_rx * 0.72, mouth_y - 0.02),
            l.feat(-head_rx * 0.3, mouth_y + 0.028),
            l.feat(0.0, mouth_y + 0.032),
            l.feat(head_rx * 0.3, mouth_y + 0.028),
            l.feat(head_rx * 0.72, mouth_y - 0.02),
            v2(head_c.x + head_rx * 0.92, ear_y - 0.03),
            v2(head_c.x + head_rx * 1.2, ear_y - 0.03),
            v2(head_c.x + head_rx * 1.2, 0.5),
            v2(head_c.x - head_rx * 1.2, 0.5),
        ]);
        let beard = head.clone().offset(0.014).and(beard_top);
        cv.fill(&beard, hair, 1.0);
        cv.fill(&beard.clone().outline(OUTLINE), hair_line, 1.0);
    }

    draw_nose(cv, id, &l, skin_line);
    draw_mouth(cv, id, attrs.expression, &l);
    if id.facial_hair != FacialHair::None {
        let mw = id.mouth_width * head_rx;
        let tache = Shape::Stroke {
            pts: bezier(
                l.feat(-mw * 1.1, mouth_y - 0.002),
                l.feat(0.0, mouth_y - 0.062),
                l.feat(mw * 1.1, mouth_y - 0.002),
                10,
            ),
            w: 0.02,
        };
        cv.fill(&tache, hair, 1.0);
        cv.fill(&tache.clone().outline(OUTLINE * 0.8), hair_line, 1.0);
    }
    draw_eyes(cv, id, attrs.expression, &l);

    // --- hair on top -----------------------------------------------------------------
    draw_front_hair(
        cv,
        id,
        &l,
        &head,
        hair,
        hair_line,
        attrs.accessory == Accessory::Hat,
    );
    draw_glasses(cv, id, &l);
    if attrs.accessory == Accessory::Hat {
        draw_hat(cv, id, &l, crown);
    }
}

fn draw_back_hair(cv: &mut Canvas, id: &Identity, l: &Layout, hair: Rgbf, hair_line: Rgbf) {
    let c = l.head_c;
    let (rx, ry) = (l.head_r.x, l.head_r.y);
    let back_dx = -l.turn * 0.01;
    let shape = match id.hair_style {
        HairStyle::Long => Some(Shape::rrect(
            v2(c.x + back_dx, c.y + ry * 0.45),
            rx * 1.25,
            ry * 1.35,
            rx * 0.9,
        )),
        HairStyle::Fringe => Some(
            Shape::rrect(
                v2(c.x + back_dx, c.y + ry * 0.05),
                rx * 1.24,
                ry * 1.12,
                rx * 0.9,
            )
            .and(Shape::above(c.y + ry * 0.72)),
        ),
        HairStyle::Curly => {
            let mut blobs = vec![Shape::ellipse(
                v2(c.x + back_dx, c.y - ry * 0.12),
                rx * 1.45,
                ry * 1.12,
            )];
            let n = 14;
            for i in 0..n {
                let a = i as f32 / n as f32 * std::f32::consts::TAU;
                let p = v2(a.cos() * rx * 1.42, a.sin() * ry * 1.08);
                if p.y > ry * 0.7 {
                    continue;
                }
                blobs.push(Shape::circle(
                    v2(c.x + back_dx, c.y - ry * 0.12) + p,
                    rx * 0.26,
                ));
            }
            Some(Shape::Union(blobs).and(Shape::above(c.y + ry * 0.75)))
        }
        _ => None,
    };
    if let Some(s) = shape {
        cv.fill(&s, hair, 1.0);
        cv.fill(&s.clone().outline(OUTLINE), hair_line, 1.0);
        // Inner shadow behind the head.
        cv.fill(
            &Shape::Head {
                c: c + v2(0.0, 0.01),
                r: v2(rx * 1.05, ry * 1.02),
                jaw: id.jaw_width,
            }
            .and(s),
            scale_rgb(hair, 0.75),
            0.8,
        );
    }
}

fn draw_front_hair(
    cv: &mut Canvas,
    id: &Identity,
    l: &Layout,
    head: &Shape,
    hair: Rgbf,
    hair_line: Rgbf,
    hat: bool,
) {
    let c = l.head_c;
    let (rx, ry) = (l.head_r.x, l.head_r.y);
    let fx = c.x + l.feat_dx * 0.6;
    // The hair cap: the head grown a little, cut by a hairline polygon.
    let cap_base = head.clone().offset(0.012).and(Shape::above(c.y + ry * 0.1));
    let hairline = |pts: &[(f32, f32)]| -> Shape {
        let mut v: Vec<V2> = pts
            .iter()
            .map(|&(x, y)| v2(fx + x * rx, c.y + y * ry))
            .collect();
        v.push(v2(fx - 3.0 * rx, c.y - 3.0 * ry));
        v.push(v2(fx + 3.0 * rx, c.y - 3.0 * ry));
        Shape::Polygon(v)
    };
    let cap = match id.hair_style {
        HairStyle::Short => Some(cap_base.clone().and(hairline(&[
            (3.0, -0.25),
            (0.98, -0.25),
            (0.9, -0.50),
            (0.55, -0.60),
            (-0.25, -0.74),
            (-0.55, -0.55),
            (-0.9, -0.45),
            (-0.98, -0.25),
            (-3.0, -0.25),
        ]))),
        HairStyle::Long => Some(cap_base.clone().and(hairline(&[
            (3.0, 0.2),
            (0.99, 0.2),
            (0.85, -0.35),
            (0.45, -0.62),
            (0.06, -0.80),
            (-0.06, -0.80),
            (-0.45, -0.62),
            (-0.85, -0.35),
            (-0.99, 0.2),
            (-3.0, 0.2),
        ]))),
        HairStyle::Bald => {
            // Hair only at the sides, above the ears.
            let band = head.clone().offset(0.01).minus(head.clone().offset(-0.022));
            Some(
                band.and(Shape::above(c.y + ry * 0.12))
                    .and(Shape::below(c.y - ry * 0.45)),
            )
        }
        HairStyle::Bun => Some(cap_base.clone().and(hairline(&[
            (3.0, -0.1),
            (0.98, -0.1),
            (0.85, -0.5),
            (0.5, -0.72),
            (0.0, -0.80),
            (-0.5, -0.72),
            (-0.85, -0.5),
            (-0.98, -0.1),
            (-3.0, -0.1),
        ]))),
        HairStyle::Fringe => {
            // Straight bangs with a slightly jagged edge, sides down to the jaw.
            let mut pts = vec![(3.0, 0.5), (1.0, 0.5), (0.82, -0.2), (0.78, -0.45)];
            let n = 8;
            for i in 0..=n {
                let x = 0.78 - 1.56 * i as f32 / n as f32;
                let y = if i % 2 == 0 { -0.45 } else { -0.38 };
                pts.push((x, y));
            }
            pts.extend([(-0.82, -0.2), (-1.0, 0.5), (-3.0, 0.5)]);
            let cap = head
                .clone()
                .offset(0.014)
                .and(Shape::above(c.y + ry * 0.55));
            Some(cap.and(hairline(&pts)))
        }
        HairStyle::Curly => Some(cap_base.clone().and(hairline(&[
            (3.0, -0.2),
            (0.96, -0.2),
            (0.8, -0.55),
            (0.4, -0.62),
            (0.15, -0.52),
            (-0.15, -0.64),
            (-0.45, -0.56),
            (-0.8, -0.55),
            (-0.96, -0.2),
            (-3.0, -0.2),
        ]))),
    };
    if let Some(cap) = cap {
        cv.fill(&cap, hair, 1.0);
        cv.fill(&cap.clone().outline(OUTLINE), hair_line, 1.0);
        // A highlight streak.
        if id.hair_style != HairStyle::Bald {
            let hl = Shape::Stroke {
                pts: bezier(
                    v2(c.x - rx * 0.45, c.y - ry * 0.88),
                    v2(c.x - rx * 0.1, c.y - ry * 1.02),
                    v2(c.x + rx * 0.3, c.y - ry * 0.95),
                    8,
                ),
                w: 0.012,
            }
            .and(cap.clone().offset(-0.01));
            cv.fill(&hl, mix_rgb(hair, [1.0, 1.0, 1.0], 0.3), 0.5);
        }
    }
    if id.hair_style == HairStyle::Bun && !hat {
        let bun = Shape::circle(v2(c.x - l.turn * 0.01, c.y - ry * 1.12), rx * 0.42);
        cv.fill(&bun, hair, 1.0);
        cv.fill(&bun.clone().outline(OUTLINE), hair_line, 1.0);
        cv.fill(
            &Shape::Stroke {
                pts: bezier(
                    v2(c.x - rx * 0.3, c.y - ry * 1.12),
                    v2(c.x, c.y - ry * 1.0),
                    v2(c.x + rx * 0.3, c.y - ry * 1.12),
                    6,
                ),
                w: 0.006,
            },
            hair_line,
            1.0,
        );
    }
    if id.hair_style == HairStyle::Bald {
        // Shine on the scalp.
        let shine = Shape::ellipse(v2(c.x - rx * 0.35, c.y - ry * 0.72), rx * 0.22, ry * 0.08);
        cv.fill(&shine, mix_rgb(id.skin, [1.0, 1.0, 1.0], 0.35), 0.6);
    }
}

fn draw_eyes(cv: &mut Canvas, id: &Identity, expr: Expression, l: &Layout) {
    let r = id.eye_size;
    let (open, brow_lift, brow_sad) = match expr {
        Expression::Neutral => (1.0, 0.0, 0.0),
        Expression::Smile => (0.72, 0.004, 0.0),
        Expression::Surprised => (1.25, 0.028, 0.0),
        Expression::Sad => (0.85, 0.0, 0.32),
    };
    let spacing = id.eye_spacing * l.head_r.x;
    let dark = [0.12, 0.09, 0.08];
    let brow_col = if luma(id.hair_color) > 0.55 {
        scale_rgb(id.hair_color, 0.7)
    } else {
        id.hair_color
    };
    for side in [-1.0f32, 1.0] {
        let c = l.feat(side * spacing, l.eye_y);
        // Features on the far side of a turned head look narrower.
        let squash = 1.0 - 0.12 * (-side * l.turn).max(0.0);
        let rx = r * 1.3 * squash;
        let ry = r * 0.95 * open;
        let white = Shape::ellipse(c, rx, ry);
        cv.fill(&white, [0.97, 0.97, 0.96], 1.0);
        // Iris and pupil, looking where the head turns.
        let look = v2(l.turn * r * 0.35, 0.0);
        let iris = Shape::circle(c + look, r * 0.72).and(white.clone());
        cv.fill(&iris, id.eye_color, 1.0);
        let pupil = Shape::circle(c + look, r * 0.34).and(white.clone());
        cv.fill(&pupil, [0.04, 0.04, 0.05], 1.0);
        cv.fill(
            &Shape::circle(c + look + v2(-r * 0.25, -r * 0.25), r * 0.17),
            [1.0, 1.0, 1.0],
            0.9,
        );
        cv.fill(&white.clone().outline(OUTLINE * 0.9), dark, 1.0);
        // Upper lid line (slightly thicker).
        let lid = Shape::Stroke {
            pts: bezier(
                c + v2(-rx * 1.05, ry * 0.1),
                c + v2(0.0, -ry * 1.45),
                c + v2(rx * 1.05, ry * 0.1),
                8,
            ),
            w: OUTLINE * 1.4,
        };
        cv.fill(&lid, dark, 1.0);

        // Brow.
        let by = l.eye_y - r * 0.95 - 0.03 - brow_lift;
        let inner = l.feat(side * (spacing - r * 1.3), by);
        let outer = l.feat(side * (spacing + r * 1.5), by);
        let half_len = (outer.x - inner.x).abs() * 0.5;
        let tilt = id.brow_tilt;
        // Positive tilt lifts the outer end; sadness lifts the inner end.
        let inner = inner + v2(0.0, tilt * half_len - brow_sad * half_len);
        let outer = outer + v2(0.0, -tilt * half_len);
        let mid = (inner + outer) * 0.5 + v2(0.0, -0.008);
        let brow = Shape::Stroke {
            pts: bezier(inner, mid, outer, 8),
            w: id.brow_thickness,
        };
        cv.fill(&brow, brow_col, 1.0);
    }
}

fn draw_nose(cv: &mut Canvas, id: &Identity, l: &Layout, line: Rgbf) {
    let hw = id.nose_width * 0.5;
    let top = l.feat(0.0, l.eye_y + 0.02);
    let base = l.feat(0.0, l.nose_y);
    let shift = v2(l.feat_dx * 0.4, 0.0);
    // Shadow along one side of the bridge.
    let side = if l.turn < 0.0 { 1.0 } else { -1.0 };
    let bridge = Shape::Stroke {
        pts: bezier(
            top + v2(side * hw * 0.35, 0.0),
            top + v2(side * hw * 0.5, (base.y - top.y) * 0.6),
            base + shift + v2(side * hw * 0.7, -0.012),
            6,
        ),
        w: 0.007,
    };
    cv.fill(&bridge, scale_rgb(id.skin, 0.8), 1.0);
    // Tip and base.
    let tip = Shape::ellipse(base + shift + v2(0.0, -0.008), hw * 0.7, 0.018);
    cv.fill(&tip, scale_rgb(id.skin, 1.04), 1.0);
    let base_curve = Shape::Stroke {
        pts: bezier(
            base + shift + v2(-hw, -0.012),
            base + shift + v2(0.0, 0.018),
            base + shift + v2(hw, -0.012),
            8,
        ),
        w: 0.008,
    };
    cv.fill(&base_curve, line, 1.0);
    for s in [-1.0f32, 1.0] {
        let nostril = Shape::ellipse(base + shift + v2(s * hw * 0.42, -0.004), hw * 0.2, 0.006);
        cv.fill(&nostril, scale_rgb(id.skin, 0.45), 0.9);
    }
}

fn draw_mouth(cv: &mut Canvas, id: &Identity, expr: Expression, l: &Layout) {
    let mw = id.mouth_width * l.head_r.x * l.feat_sx;
    let y = l.mouth_y;
    let lip = id.lip_color;
    let lip_dark = scale_rgb(lip, 0.6);
    let inside = [0.32, 0.08, 0.1];
    match expr {
        Expression::Neutral => {
            let lips = Shape::ellipse(l.feat(0.0, y), mw, 0.02);
            cv.fill(&lips, lip, 1.0);
            let upper = Shape::ellipse(l.feat(0.0, y - 0.006), mw * 0.9, 0.012);
            cv.fill(&upper, scale_rgb(lip, 0.85), 1.0);
            let line = Shape::Stroke {
                pts: bezier(l.feat(-mw, y), l.feat(0.0, y + 0.006), l.feat(mw, y), 8),
                w: 0.006,
            };
            cv.fill(&line, lip_dark, 1.0);
        }
        Expression::Smile => {
            let w = mw * 1.12;
            let open =
                Shape::ellipse(l.feat(0.0, y - 0.012), w, 0.055).and(Shape::below(y - 0.008));
            cv.fill(&open, inside, 1.0);
            let teeth = open.clone().and(Shape::above(y + 0.01));
            cv.fill(&teeth, [0.98, 0.97, 0.93], 1.0);
            cv.fill(&open.clone().outline(0.012), lip, 1.0);
            // Dimples at the corners.
            for s in [-1.0f32, 1.0] {
                cv.fill(
                    &Shape::Stroke {
                        pts: vec![
                            l.feat(s * w * 1.0, y - 0.02),
                            l.feat(s * w * 1.12, y - 0.002),
                        ],
                        w: 0.005,
                    },
                    scale_rgb(id.skin, 0.7),
                    1.0,
                );
            }
        }
        Expression::Surprised => {
            let o = Shape::ellipse(l.feat(0.0, y + 0.008), mw * 0.45, 0.036);
            cv.fill(&o, inside, 1.0);
            cv.fill(&o.clone().outline(0.012), lip, 1.0);
        }
        Expression::Sad => {
            let frown = Shape::Stroke {
                pts: bezier(
                    l.feat(-mw * 0.95, y + 0.016),
                    l.feat(0.0, y - 0.024),
                    l.feat(mw * 0.95, y + 0.016),
                    10,
                ),
                w: 0.017,
            };
            cv.fill(&frown, lip, 1.0);
            let line = Shape::Stroke {
                pts: bezier(
                    l.feat(-mw * 0.95, y + 0.016),
                    l.feat(0.0, y - 0.024),
                    l.feat(mw * 0.95, y + 0.016),
                    10,
                ),
                w: 0.005,
            };
            cv.fill(&line, lip_dark, 1.0);
        }
    }
}

fn draw_glasses(cv: &mut Canvas, id: &Identity, l: &Layout) {
    if id.glasses == Glasses::None {
        return;
    }
    let frame = [0.08, 0.08, 0.1];
    let r = id.eye_size;
    let spacing = id.eye_spacing * l.head_r.x;
    let lw = 0.009;
    let mut lens_inner = Vec::new();
    for side in [-1.0f32, 1.0] {
        let c = l.feat(side * spacing, l.eye_y);
        let lens = match id.glasses {
            Glasses::Round => Shape::circle(c, r * 1.75),
            _ => Shape::rrect(c, r * 2.0, r * 1.45, r * 0.4),
        };
        cv.fill(&lens, [0.85, 0.92, 1.0], 0.18);
        cv.fill(&lens.clone().outline(lw), frame, 1.0);
        lens_inner.push((c, lens));
    }
    let (c0, _) = &lens_inner[0];
    let (c1, _) = &lens_inner[1];
    let edge = match id.glasses {
        Glasses::Round => r * 1.75,
        _ => r * 2.0,
    };
    // Bridge and temples.
    let bridge = Shape::Stroke {
        pts: bezier(
            *c0 + v2(edge * l.feat_sx, 0.0),
            (*c0 + *c1) * 0.5 + v2(0.0, -r * 0.6),
            *c1 - v2(edge * l.feat_sx, 0.0),
            6,
        ),
        w: lw,
    };
    cv.fill(&bridge, frame, 1.0);
    for (side, c) in [(-1.0f32, *c0), (1.0, *c1)] {
        let ear_x = l.head_c.x + side * l.head_r.x * 0.99;
        let start = c + v2(side * edge * l.feat_sx, -r * 0.3);
        if (ear_x - start.x) * side > 0.0 {
            cv.fill(
                &Shape::Stroke {
                    pts: vec![start, v2(ear_x, l.eye_y - r * 0.2)],
                    w: lw,
                },
                frame,
                1.0,
            );
        }
    }
}

fn draw_hat(cv: &mut Canvas, id: &Identity, l: &Layout, crown: f32) {
    let c = l.head_c;
    let rx = l.head_r.x;
    let felt = [0.36, 0.24, 0.18];
    let band = [0.80, 0.66, 0.30];
    let hx = c.x - l.turn * 0.006;
    let extra = match id.hair_style {
        HairStyle::Curly => 0.03,
        HairStyle::Bald => -0.01,
        _ => 0.0,
    };
    let brim_y = crown + 0.1 + extra * 0.5;
    let top = Shape::rrect(v2(hx, brim_y - 0.075), rx * 0.92 + extra, 0.08, 0.04);
    cv.fill(&top, felt, 1.0);
    cv.fill(&top.clone().outline(OUTLINE), scale_rgb(felt, 0.55), 1.0);
    let band_shape = top.clone().and(Shape::below(brim_y - 0.035));
    cv.fill(&band_shape, band, 1.0);
    let brim = Shape::ellipse(v2(hx, brim_y), rx * 1.55 + extra, 0.028);
    cv.fill(&brim, felt, 1.0);
    cv.fill(&brim.clone().outline(OUTLINE), scale_rgb(felt, 0.55), 1.0);
}

fn draw_scarf(cv: &mut Canvas, l: &Layout) {
    let red = [0.82, 0.20, 0.24];
    let cream = [0.96, 0.90, 0.78];
    let y = 0.255;
    let wrap = Shape::rrect(v2(l.head_c.x * 0.5, y), 0.2, 0.045, 0.04);
    let tail = Shape::rrect(v2(l.head_c.x * 0.5 + 0.09, y + 0.11), 0.045, 0.1, 0.02);
    let scarf = Shape::Union(vec![wrap, tail]);
    cv.fill(&scarf, red, 1.0);
    // Stripes.
    for i in 0..6 {
        let x = l.head_c.x * 0.5 - 0.17 + i as f32 * 0.07;
        let stripe = Shape::Stroke {
            pts: vec![v2(x, y - 0.06), v2(x + 0.03, y + 0.25)],
            w: 0.014,
        }
        .and(scarf.clone());
        cv.fill(&stripe, cream, 1.0);
    }
    cv.fill(&scarf.clone().outline(OUTLINE), scale_rgb(red, 0.55), 1.0);
}
