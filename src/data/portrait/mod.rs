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
//!
//! The renderer's parts, one file each: `rng` (its own random numbers), `identity`
//! (who the person is), `attributes` (what a prompt changes), `geometry` (signed-distance
//! shapes), `canvas` (filling, lighting, downsampling), `draw` (the figure and [`render`]) and
//! `features` (hair, eyes, nose, mouth, facial hair, glasses, hat, scarf).

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

mod attributes;
mod canvas;
mod draw;
mod features;
mod geometry;
mod identity;
mod rng;

pub use attributes::{Accessory, Attributes, Background, Expression, HeadTurn, Lighting};
pub use draw::{render, render_set};
pub use identity::{
    FacialHair, Glasses, HAIR_COLOURS, HairStyle, IDENTITY_DIMS, Identity, SKIN_TONES,
};
