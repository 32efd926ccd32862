//! Signed-distance shapes in figure space: points ([`V2`]), ellipses, rounded rectangles,
//! polygons, strokes and Bézier curves, with unions, intersections and outlines.

/// A point (or offset) in figure space.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct V2 {
    pub(super) x: f32,
    pub(super) y: f32,
}

/// Shorthand for a [`V2`].
pub(super) const fn v2(x: f32, y: f32) -> V2 {
    V2 { x, y }
}

impl V2 {
    pub(super) fn dot(self, o: V2) -> f32 {
        self.x * o.x + self.y * o.y
    }
    pub(super) fn len(self) -> f32 {
        self.dot(self).sqrt()
    }
    pub(super) fn rot(self, a: f32) -> V2 {
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
pub(super) enum Shape {
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

pub(super) fn sd_ellipse(p: V2, r: V2) -> f32 {
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

pub(super) fn sd_segment(p: V2, a: V2, b: V2) -> f32 {
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

pub(super) fn sd_polygon(p: V2, v: &[V2]) -> f32 {
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
    pub(super) fn ellipse(c: V2, rx: f32, ry: f32) -> Shape {
        Shape::Ellipse {
            c,
            r: v2(rx, ry),
            rot: 0.0,
        }
    }

    pub(super) fn circle(c: V2, r: f32) -> Shape {
        Shape::ellipse(c, r, r)
    }

    pub(super) fn rrect(c: V2, hx: f32, hy: f32, radius: f32) -> Shape {
        Shape::RoundRect {
            c,
            half: v2(hx, hy),
            radius,
            rot: 0.0,
        }
    }

    pub(super) fn outline(self, width: f32) -> Shape {
        Shape::Outline(Box::new(self), width * 0.5)
    }

    pub(super) fn offset(self, by: f32) -> Shape {
        Shape::Offset(Box::new(self), by)
    }

    pub(super) fn and(self, other: Shape) -> Shape {
        Shape::Intersect(Box::new(self), Box::new(other))
    }

    pub(super) fn minus(self, other: Shape) -> Shape {
        Shape::Subtract(Box::new(self), Box::new(other))
    }

    /// The region above (smaller `y` than) the horizontal line at `y`.
    pub(super) fn above(y: f32) -> Shape {
        Shape::HalfPlane {
            p0: v2(0.0, y),
            n: v2(0.0, 1.0),
        }
    }

    /// The region below the horizontal line at `y`.
    pub(super) fn below(y: f32) -> Shape {
        Shape::HalfPlane {
            p0: v2(0.0, y),
            n: v2(0.0, -1.0),
        }
    }

    pub(super) fn sdf(&self, p: V2) -> f32 {
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
    pub(super) fn bbox(&self) -> (V2, V2) {
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
pub(super) fn bezier(a: V2, ctrl: V2, b: V2, n: usize) -> Vec<V2> {
    (0..=n)
        .map(|i| {
            let t = i as f32 / n as f32;
            let u = 1.0 - t;
            a * (u * u) + ctrl * (2.0 * u * t) + b * (t * t)
        })
        .collect()
}
