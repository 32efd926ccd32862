//! What a prompt may change in a portrait: [`Attributes`] (expression, head turn, background,
//! lighting, accessory), drawn from a seed, written as a prompt and read back from one.

use super::rng::SplitMix64;

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

    pub(super) fn sign(self) -> f32 {
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
    pub(super) fn factor(self, x: f32, y: f32) -> f32 {
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
pub(super) fn words_of(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

pub(super) fn colour_word(w: &str) -> Option<Background> {
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

pub(super) fn direction_word(w: &str) -> Option<&'static str> {
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

    pub(super) fn apply_part(&mut self, words: &[String]) {
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
