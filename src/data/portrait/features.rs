//! The facial features and accessories drawn onto a laid-out face: hair (behind and in front
//! of the head), eyes and brows, nose, mouth, facial hair, glasses, hat and scarf.

use super::attributes::Expression;
use super::canvas::{Canvas, Rgbf, luma, mix_rgb, scale_rgb};
use super::draw::{Layout, OUTLINE};
use super::geometry::{Shape, V2, bezier, v2};
use super::identity::{Glasses, HairStyle, Identity};

pub(super) fn draw_back_hair(
    cv: &mut Canvas,
    id: &Identity,
    l: &Layout,
    hair: Rgbf,
    hair_line: Rgbf,
) {
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

pub(super) fn draw_front_hair(
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

pub(super) fn draw_eyes(cv: &mut Canvas, id: &Identity, expr: Expression, l: &Layout) {
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

pub(super) fn draw_nose(cv: &mut Canvas, id: &Identity, l: &Layout, line: Rgbf) {
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

pub(super) fn draw_mouth(cv: &mut Canvas, id: &Identity, expr: Expression, l: &Layout) {
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

pub(super) fn draw_glasses(cv: &mut Canvas, id: &Identity, l: &Layout) {
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

pub(super) fn draw_hat(cv: &mut Canvas, id: &Identity, l: &Layout, crown: f32) {
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

pub(super) fn draw_scarf(cv: &mut Canvas, l: &Layout) {
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
