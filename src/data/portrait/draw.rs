//! The portrait itself: [`render`] and [`render_set`] lay out a face from an [`Identity`] and
//! [`Attributes`] and draw the figure (background, shoulders, neck, ears, head, features).

use image::RgbImage;

use super::attributes::{Accessory, Attributes};
use super::canvas::{Canvas, luma, mix_rgb, scale_rgb};
use super::features::{
    draw_back_hair, draw_eyes, draw_front_hair, draw_glasses, draw_hat, draw_mouth, draw_nose,
    draw_scarf,
};
use super::geometry::{Shape, V2, bezier, v2};
use super::identity::{FacialHair, HairStyle, Identity, rgb};
use super::rng::{SplitMix64, mix_seed};

/// Outline width, in figure units.
pub(super) const OUTLINE: f32 = 0.007;
/// Figure → canvas scale before the nuisance jitter (the figure is drawn a little small).
pub(super) const FIGURE_SCALE: f32 = 1.14;
/// Figure → canvas vertical shift (keeps room for hats and buns).
pub(super) const FIGURE_DY: f32 = 0.035;

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
pub(super) struct Layout {
    /// Head centre and radii.
    pub(super) head_c: V2,
    pub(super) head_r: V2,
    /// Horizontal offset of the facial features (head turn).
    pub(super) feat_dx: f32,
    /// Horizontal squash of feature offsets (head turn).
    pub(super) feat_sx: f32,
    pub(super) eye_y: f32,
    pub(super) nose_y: f32,
    pub(super) mouth_y: f32,
    pub(super) turn: f32,
}

impl Layout {
    /// A feature point `(x, y)` given relative to the face midline.
    pub(super) fn feat(&self, x: f32, y: f32) -> V2 {
        v2(self.head_c.x + self.feat_dx + x * self.feat_sx, y)
    }
}

pub(super) fn draw_person(cv: &mut Canvas, id: &Identity, attrs: &Attributes) {
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
