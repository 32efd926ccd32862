//! Portrait data for personalisation: the procedural renderer (determinism, identity vs.
//! nuisance differences, attributes, prompts, sizes) and the identity-folder loader (formats,
//! natural order, errors naming the path, the ORL faces when present).

mod common;

use common::TempDir;
use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, Rgb, RgbImage};
use peft_studio::data::identity_folder::*;
use peft_studio::data::portrait::*;

/// Mean absolute difference per channel, in 0..255 units.
fn mad(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let s: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| (*x as i32 - *y as i32).unsigned_abs() as u64)
        .sum();
    s as f64 / a.as_raw().len() as f64
}

/// Mean colour of the `k`×`k` top-left corner.
fn corner_mean(img: &RgbImage, k: u32) -> [f64; 3] {
    let mut acc = [0.0; 3];
    for y in 0..k {
        for x in 0..k {
            let p = img.get_pixel(x, y);
            for c in 0..3 {
                acc[c] += p[c] as f64;
            }
        }
    }
    acc.map(|v| v / (k * k) as f64)
}

fn attrs(bg: Background) -> Attributes {
    Attributes {
        background: bg,
        ..Attributes::default()
    }
}

#[test]
fn render_is_deterministic_and_seed_jitter_is_small() {
    let id = Identity::random(7);
    let a = Attributes::random(3);
    let r1 = render(&id, &a, 64, 11);
    let r2 = render(&id, &a, 64, 11);
    assert_eq!(r1.dimensions(), (64, 64));
    assert_eq!(r1.as_raw(), r2.as_raw(), "same seed must be byte-identical");
    let r3 = render(&id, &a, 64, 12);
    assert_ne!(
        r1.as_raw(),
        r3.as_raw(),
        "another seed must jitter the render"
    );
    let d = mad(&r1, &r3);
    assert!(
        d > 0.05 && d < 10.0,
        "seed jitter should be small but present: {d}"
    );
    // Identity::random and Attributes::random are deterministic too.
    assert_eq!(Identity::random(7), id);
    assert_eq!(Attributes::random(3), a);
}

#[test]
fn identities_differ_much_more_than_renders_of_one_identity() {
    let a = attrs(Background::Grey);
    let ids: Vec<Identity> = (0..20).map(|i| Identity::random(1000 + i)).collect();
    let imgs: Vec<RgbImage> = ids.iter().map(|id| render(id, &a, 64, 1)).collect();
    let mut within = Vec::new();
    for (id, img) in ids.iter().zip(&imgs) {
        for s in 2..4 {
            within.push(mad(img, &render(id, &a, 64, s)));
        }
    }
    let mut between = Vec::new();
    for i in 0..imgs.len() {
        for j in i + 1..imgs.len() {
            between.push(mad(&imgs[i], &imgs[j]));
        }
    }
    let mean_within = within.iter().sum::<f64>() / within.len() as f64;
    let max_within = within.iter().cloned().fold(0.0, f64::max);
    let mean_between = between.iter().sum::<f64>() / between.len() as f64;
    println!(
        "mean abs diff within one identity: mean {mean_within:.2} max {max_within:.2}; between identities: mean {mean_between:.2}"
    );
    assert!(
        mean_between > 4.0 * mean_within,
        "identities should differ far more than renders: {mean_between} vs {mean_within}"
    );
    // Nearest neighbour: a re-render of each person is closest to that person's first render,
    // with a margin.
    let mut worst = f64::MAX;
    for (i, id) in ids.iter().enumerate() {
        let probe = render(id, &a, 64, 99);
        let own = mad(&probe, &imgs[i]);
        for (j, other) in imgs.iter().enumerate() {
            if j != i {
                let d = mad(&probe, other);
                worst = worst.min(d / own);
                assert!(
                    d > own * 1.5,
                    "identity {i} re-rendered is {own:.2} from itself but {d:.2} from {j}"
                );
            }
        }
    }
    println!("worst nearest-other / own ratio: {worst:.2}");
    // Distances on the parameter vector agree: distinct people are apart, a person is 0.
    assert_eq!(ids[0].distance(&ids[0]), 0.0);
    assert!(ids[0].distance(&ids[1]) > 0.1);
}

#[test]
fn identity_stays_closer_than_other_people_across_attributes() {
    // A sad, side-lit render of each person is matched against smiling renders of everyone,
    // on the centre of the face (no background, no shoulders) at 32 px.
    let a1 = Attributes {
        expression: Expression::Smile,
        ..attrs(Background::Blue)
    };
    let a2 = Attributes {
        expression: Expression::Sad,
        lighting: Lighting::Left,
        ..attrs(Background::Blue)
    };
    let crop = |img: &RgbImage| image::imageops::crop_imm(img, 10, 6, 12, 16).to_image();
    let ids: Vec<Identity> = (0..12).map(|i| Identity::random(500 + i)).collect();
    let mut correct = 0;
    for (i, id) in ids.iter().enumerate() {
        let probe = crop(&render(id, &a2, 32, 9));
        let best = ids
            .iter()
            .enumerate()
            .map(|(j, other)| (j, mad(&probe, &crop(&render(other, &a1, 32, 4)))))
            .min_by(|x, y| x.1.total_cmp(&y.1))
            .map(|(j, _)| j);
        if best == Some(i) {
            correct += 1;
        }
    }
    println!("recognised across attributes at 32 px: {correct}/12");
    assert!(
        correct >= 10,
        "a person should be recognisable across expression and lighting at 32 px: {correct}/12"
    );
}

#[test]
fn background_colour_matches_the_named_colour() {
    let id = Identity::random(42);
    for &bg in Background::ALL {
        let img = render(&id, &attrs(bg), 48, 5);
        let m = corner_mean(&img, 5);
        let want = bg.rgb();
        for c in 0..3 {
            assert!(
                (m[c] - want[c] as f64).abs() < 3.0,
                "{:?}: corner {m:?} vs {want:?}",
                bg
            );
        }
        // The nearest named colour is the requested one.
        let nearest = Background::ALL
            .iter()
            .min_by_key(|b| {
                let w = b.rgb();
                (0..3)
                    .map(|c| ((m[c] - w[c] as f64).powi(2)) as u64)
                    .sum::<u64>()
            })
            .copied();
        assert_eq!(nearest, Some(bg));
    }
}

#[test]
fn every_attribute_visibly_changes_the_image() {
    let id = Identity::random(3);
    let base = Attributes::default();
    let img0 = render(&id, &base, 64, 1);
    let changes = [
        Attributes {
            expression: Expression::Smile,
            ..base
        },
        Attributes {
            expression: Expression::Surprised,
            ..base
        },
        Attributes {
            expression: Expression::Sad,
            ..base
        },
        Attributes {
            head_turn: HeadTurn::Left,
            ..base
        },
        Attributes {
            head_turn: HeadTurn::Right,
            ..base
        },
        Attributes {
            lighting: Lighting::Left,
            ..base
        },
        Attributes {
            lighting: Lighting::Top,
            ..base
        },
        Attributes {
            accessory: Accessory::Hat,
            ..base
        },
        Attributes {
            accessory: Accessory::Earrings,
            ..base
        },
        Attributes {
            accessory: Accessory::Scarf,
            ..base
        },
    ];
    for a in changes {
        let img = render(&id, &a, 64, 1);
        // Visible: a clear change (over 60 summed levels) on a good number of pixels.
        let changed = img0
            .pixels()
            .zip(img.pixels())
            .filter(|(p, q)| {
                (0..3)
                    .map(|c| (p[c] as i32 - q[c] as i32).abs())
                    .sum::<i32>()
                    > 60
            })
            .count();
        assert!(
            changed >= 12,
            "{} should change the image: {changed} px",
            a.prompt()
        );
    }
    // Light from the left: the left half of the face is brighter than with light from the right.
    let lum = |img: &RgbImage, x0: u32| -> f64 {
        let mut s = 0.0;
        for y in 16..48 {
            for x in x0..x0 + 12 {
                let p = img.get_pixel(x, y);
                s += p[0] as f64 + p[1] as f64 + p[2] as f64;
            }
        }
        s
    };
    let left = render(
        &id,
        &Attributes {
            lighting: Lighting::Left,
            ..base
        },
        64,
        1,
    );
    let right = render(
        &id,
        &Attributes {
            lighting: Lighting::Right,
            ..base
        },
        64,
        1,
    );
    assert!(lum(&left, 20) > lum(&right, 20));
    assert!(lum(&left, 32) < lum(&right, 32));
}

#[test]
fn vector_round_trip_and_clamping() {
    for s in 0..50 {
        let id = Identity::random(s);
        let v = id.to_vector();
        assert_eq!(v.len(), IDENTITY_DIMS);
        assert!(v.iter().all(|x| (0.0..=1.0).contains(x)), "{v:?}");
        let back = Identity::from_vector(&v);
        assert_eq!(back.hair_style, id.hair_style);
        assert_eq!(back.facial_hair, id.facial_hair);
        assert_eq!(back.glasses, id.glasses);
        assert!(
            back.distance(&id) < 1e-5,
            "round trip drifted: {}",
            back.distance(&id)
        );
        let v2 = back.to_vector();
        for (a, b) in v.iter().zip(&v2) {
            assert!((a - b).abs() < 1e-5);
        }
    }
    // Out-of-range, non-finite and short vectors clamp instead of failing.
    let wild = Identity::from_vector(&[5.0, -3.0, f32::NAN, 2.0]);
    let v = wild.to_vector();
    assert!(v.iter().all(|x| (0.0..=1.0).contains(x)));
    assert_eq!(v[0], 1.0);
    assert_eq!(v[1], 0.0);
    assert_eq!(wild.face_ratio, Identity::FACE_RATIO.1);
    // Enum entries round to the nearest index.
    let mut v = Identity::random(1).to_vector();
    v[5] = 0.61; // 6 hair styles: 0.61 * 5 = 3.05 → index 3
    v[23] = 0.9; // glasses: → square
    let id = Identity::from_vector(&v);
    assert_eq!(id.hair_style, HairStyle::Bun);
    assert_eq!(id.glasses, Glasses::Square);
}

#[test]
fn prompt_parses_back_and_words_are_understood() {
    for s in 0..200 {
        let a = Attributes::random(s);
        let p = a.prompt();
        assert_eq!(Attributes::from_words(&[p.as_str()]), a, "{p}");
        let parts: Vec<&str> = p.split(", ").collect();
        assert_eq!(Attributes::from_words(&parts), a, "{p}");
    }
    let a = Attributes::from_words(&[
        "smile",
        "face left",
        "blue background",
        "light from the left",
        "hat",
    ]);
    assert_eq!(
        a.prompt(),
        "smile, face left, blue background, light from the left, hat"
    );
    assert_eq!(
        a,
        Attributes {
            expression: Expression::Smile,
            head_turn: HeadTurn::Left,
            background: Background::Blue,
            lighting: Lighting::Left,
            accessory: Accessory::Hat,
        }
    );
    // Light direction does not leak into the head turn, nor the reverse.
    let b = Attributes::from_words(&["a person facing right, lit from above, gray background"]);
    assert_eq!(b.head_turn, HeadTurn::Right);
    assert_eq!(b.lighting, Lighting::Top);
    assert_eq!(b.background, Background::Grey);
    // Unspecified attributes default.
    assert_eq!(Attributes::from_words(&[]), Attributes::default());
    assert_eq!(
        Attributes::from_words(&["surprised"]),
        Attributes {
            expression: Expression::Surprised,
            ..Attributes::default()
        }
    );
    for e in Expression::ALL {
        assert_eq!(Attributes::from_words(&[e.name()]).expression, *e);
    }
}

#[test]
fn sizes_32_48_64_and_render_set() {
    let id = Identity::random(9);
    for size in [32u32, 48, 64, 100] {
        let img = render(&id, &Attributes::random(size as u64), size, 0);
        assert_eq!(img.dimensions(), (size, size));
        // Not a blank image: many distinct colours.
        let mut colours: Vec<[u8; 3]> = img.pixels().map(|p| p.0).collect();
        colours.sort();
        colours.dedup();
        assert!(colours.len() > 50, "size {size}: {} colours", colours.len());
    }
    assert_eq!(
        render(&id, &Attributes::default(), 0, 0).dimensions(),
        (0, 0)
    );

    let set = render_set(5, 6, 32, 77);
    assert_eq!(set.len(), 6);
    let again = render_set(5, 6, 32, 77);
    for ((a1, i1), (a2, i2)) in set.iter().zip(&again) {
        assert_eq!(a1, a2);
        assert_eq!(i1.as_raw(), i2.as_raw());
        assert_eq!(i1.dimensions(), (32, 32));
    }
    // The set uses the person Identity::random(5).
    let (a0, img0) = &set[0];
    let other = render(&Identity::random(6), a0, 32, 0);
    let same = render(&Identity::random(5), a0, 32, 0);
    assert!(mad(img0, &same) < mad(img0, &other));
}

// ---------------------------------------------------------------------------------------------
// Contact sheet (a look at the drawing)
// ---------------------------------------------------------------------------------------------

/// Saves a contact sheet of identities (rows) × attributes (columns) and returns its path.
fn save_contact_sheet(name: &str, size: u32, ids: &[Identity], cols: &[Attributes]) -> PathBuf {
    let pad = 2;
    let w = cols.len() as u32 * (size + pad) + pad;
    let h = ids.len() as u32 * (size + pad) + pad;
    let mut sheet = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    for (r, id) in ids.iter().enumerate() {
        for (c, a) in cols.iter().enumerate() {
            let img = render(id, a, size, (r * 31 + c) as u64);
            image::imageops::overlay(
                &mut sheet,
                &img,
                (pad + c as u32 * (size + pad)) as i64,
                (pad + r as u32 * (size + pad)) as i64,
            );
        }
    }
    let path = std::env::temp_dir().join(name);
    sheet.save(&path).unwrap();
    path
}

/// A look at the drawing: sheets of 12 people (two of each hair style) × 8 prompts, at 64 and
/// 32 px, and a close-up at 192 px, written to the system temp dir.
#[test]
fn contact_sheet() {
    let prompts = [
        "neutral, face front, grey background, even light, no accessory",
        "smile, face left, blue background, light from the left, hat",
        "surprised, face right, green background, light from the top, earrings",
        "sad, face front, yellow background, light from the right, scarf",
        "smile, face right, white background, even light, no accessory",
        "neutral, face left, black background, light from the top, earrings",
        "surprised, face front, purple background, light from the left, scarf",
        "sad, face right, red background, even light, hat",
    ];
    let cols: Vec<Attributes> = prompts
        .iter()
        .map(|p| Attributes::from_words(&[p]))
        .collect();
    for (c, p) in cols.iter().zip(prompts) {
        assert_eq!(c.prompt(), p);
    }
    // Two people of each hair style, the first seeds that have it.
    let mut ids = Vec::new();
    let mut count = [0usize; 6];
    for seed in 0.. {
        let id = Identity::random(seed);
        let k = id.hair_style.index();
        if count[k] < 2 {
            count[k] += 1;
            ids.push(id);
        }
        if ids.len() == 12 {
            break;
        }
    }
    ids.sort_by_key(|id| id.hair_style.index());
    let p64 = save_contact_sheet("peft-studio-portraits-64.png", 64, &ids, &cols);
    let p32 = save_contact_sheet("peft-studio-portraits-32.png", 32, &ids, &cols);
    let p192 = save_contact_sheet("peft-studio-portraits-192.png", 192, &ids[..6], &cols[..5]);
    println!(
        "contact sheets: {}, {} and {}",
        p64.display(),
        p32.display(),
        p192.display()
    );
    for (a, c) in cols.iter().enumerate() {
        println!("column {a}: {}", c.prompt());
    }
    assert!(p64.exists() && p32.exists() && p192.exists());
}

// ---------------------------------------------------------------------------------------------
// Identity folders
// ---------------------------------------------------------------------------------------------

/// An RGB image with a bright left half, to check the centre crop.
fn rgb_img(w: u32, h: u32, colour: [u8; 3]) -> RgbImage {
    RgbImage::from_fn(w, h, |_, _| Rgb(colour))
}

fn grey_img(w: u32, h: u32, v: u8) -> GrayImage {
    GrayImage::from_fn(w, h, |_, _| Luma([v]))
}

/// Writes a binary PGM (P5).
fn write_pgm(path: &Path, w: u32, h: u32, v: u8) {
    let mut bytes = format!("P5\n{w} {h}\n255\n").into_bytes();
    bytes.extend(std::iter::repeat_n(v, (w * h) as usize));
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn loads_identity_folder_in_natural_order() {
    let t = TempDir::new("ok");
    // Person s10: an RGB PNG (wide) and a greyscale PNG (tall).
    rgb_img(120, 80, [200, 30, 40])
        .save(t.path("s10/2.png"))
        .unwrap();
    grey_img(50, 90, 100).save(t.path("s10/1.png")).unwrap();
    // Person s2: PGMs like the ORL faces, with 10 after 9.
    write_pgm(&t.path("s2/9.pgm"), 92, 112, 60);
    write_pgm(&t.path("s2/10.pgm"), 92, 112, 200);
    // Person s1: one JPEG-less BMP; plus junk that must be skipped.
    rgb_img(40, 40, [10, 200, 10])
        .save(t.path("s1/a.bmp"))
        .unwrap();
    std::fs::write(t.path("s1/notes.txt"), "not an image").unwrap();
    std::fs::write(t.path("s1/.hidden.png"), "corrupt but hidden").unwrap();
    std::fs::write(t.path("README"), "top-level files are ignored").unwrap();
    std::fs::create_dir_all(t.path(".git/objects")).unwrap();

    let people = load_identity_folder(&t.0, 48).unwrap();
    let names: Vec<&str> = people.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["s1", "s2", "s10"]);
    assert_eq!(people[0].images.len(), 1);
    assert_eq!(people[1].images.len(), 2);
    assert_eq!(people[2].images.len(), 2);
    for p in &people {
        for img in &p.images {
            assert_eq!(img.dimensions(), (48, 48));
        }
    }
    // Natural order within a person: 9.pgm (dark) before 10.pgm (bright).
    assert_eq!(people[1].images[0].get_pixel(20, 20).0, [60, 60, 60]);
    assert_eq!(people[1].images[1].get_pixel(20, 20).0, [200, 200, 200]);
    // Greyscale replicated to RGB; colour kept.
    assert_eq!(people[2].images[0].get_pixel(24, 24).0, [100, 100, 100]);
    assert_eq!(people[2].images[1].get_pixel(24, 24).0, [200, 30, 40]);

    // References: a flat folder, and a single file.
    let refs = load_references(&t.0.join("s2"), 32).unwrap();
    assert_eq!(refs.len(), 2);
    assert_eq!(refs[0].dimensions(), (32, 32));
    let one = load_references(&t.0.join("s10/2.png"), 20).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].dimensions(), (20, 20));
}

#[test]
fn centre_crop_keeps_the_middle() {
    let t = TempDir::new("crop");
    // A wide image: left and right thirds black, the centre square white.
    let img = RgbImage::from_fn(300, 100, |x, _| {
        if (100..200).contains(&x) {
            Rgb([255, 255, 255])
        } else {
            Rgb([0, 0, 0])
        }
    });
    img.save(t.path("wide.png")).unwrap();
    let out = load_references(&t.path("wide.png"), 32).unwrap();
    let mean: f64 = out[0].as_raw().iter().map(|v| *v as f64).sum::<f64>() / (32.0 * 32.0 * 3.0);
    assert!(
        mean > 250.0,
        "the centre square should be all white: {mean}"
    );
}

#[test]
fn natural_order() {
    let mut v = vec!["s10", "s2", "s1", "S3", "s02x", "a", "s100", "s20"];
    v.sort_by(|a, b| natural_cmp(a, b));
    assert_eq!(v, ["a", "s1", "s2", "s02x", "S3", "s10", "s20", "s100"]);
}

#[test]
fn identity_folder_errors_name_the_path() {
    // Missing folder.
    let missing = std::env::temp_dir().join("peft-studio-portraits-no-such-folder");
    let e = load_identity_folder(&missing, 32).unwrap_err();
    assert!(matches!(e, IdentityError::MissingFolder(_)));
    assert!(
        e.to_string()
            .contains("peft-studio-portraits-no-such-folder"),
        "{e}"
    );
    assert!(matches!(
        load_references(&missing, 32),
        Err(IdentityError::MissingFolder(_))
    ));

    // A file where a folder is expected.
    let t = TempDir::new("errors");
    rgb_img(20, 20, [1, 2, 3]).save(t.path("file.png")).unwrap();
    let e = load_identity_folder(&t.path("file.png"), 32).unwrap_err();
    assert!(matches!(e, IdentityError::NotAFolder(_)), "{e}");

    // A folder with no person sub-folders.
    let e = load_identity_folder(&t.0, 32).unwrap_err();
    assert!(matches!(e, IdentityError::NoPersons(_)), "{e}");

    // A person folder with no images.
    let t = TempDir::new("empty-person");
    rgb_img(20, 20, [1, 2, 3])
        .save(t.path("alice/1.png"))
        .unwrap();
    std::fs::write(t.path("bob/readme.txt"), "no pictures").unwrap();
    let e = load_identity_folder(&t.0, 32).unwrap_err();
    assert!(matches!(e, IdentityError::NoImages(_)), "{e}");
    assert!(e.to_string().contains("bob"), "{e}");
    let e = load_references(&t.0.join("bob"), 32).unwrap_err();
    assert!(matches!(e, IdentityError::NoImages(_)), "{e}");

    // A corrupt image.
    let t = TempDir::new("corrupt");
    rgb_img(20, 20, [1, 2, 3])
        .save(t.path("alice/1.png"))
        .unwrap();
    std::fs::write(t.path("alice/2.png"), b"\x89PNG\r\n\x1a\ntruncated").unwrap();
    let e = load_identity_folder(&t.0, 32).unwrap_err();
    assert!(matches!(e, IdentityError::Image { .. }), "{e}");
    assert!(e.to_string().contains("2.png"), "{e}");
    let e = load_references(&t.path("alice/2.png"), 32).unwrap_err();
    assert!(matches!(e, IdentityError::Image { .. }), "{e}");
    // Garbage with a PGM extension.
    std::fs::remove_file(t.path("alice/2.png")).unwrap();
    std::fs::write(t.path("alice/3.pgm"), b"P5\n92 112\n255\n\x01\x02").unwrap();
    let e = load_identity_folder(&t.0, 32).unwrap_err();
    assert!(e.to_string().contains("3.pgm"), "{e}");

    // An image too small.
    let t = TempDir::new("small");
    rgb_img(40, 40, [1, 2, 3])
        .save(t.path("alice/1.png"))
        .unwrap();
    rgb_img(40, 10, [1, 2, 3])
        .save(t.path("alice/2.png"))
        .unwrap();
    let e = load_identity_folder(&t.0, 32).unwrap_err();
    match &e {
        IdentityError::TooSmall {
            path,
            width,
            height,
        } => {
            assert!(path.ends_with("alice/2.png"));
            assert_eq!((*width, *height), (40, 10));
        }
        other => panic!("expected TooSmall, got {other}"),
    }
    assert!(e.to_string().contains("2.png"), "{e}");

    // Size zero.
    assert!(matches!(
        load_identity_folder(&t.0, 0),
        Err(IdentityError::InvalidSize(0))
    ));
}

#[test]
fn loads_orl_faces_when_present() {
    let root = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/orl_faces"
    ));
    if !root.is_dir() {
        println!("skipped: {} is absent", root.display());
        return;
    }
    let people = load_identity_folder(root, 64).unwrap();
    assert_eq!(people.len(), 32);
    assert_eq!(people[0].name, "s1");
    assert_eq!(people[1].name, "s2");
    assert_eq!(people[9].name, "s10");
    assert_eq!(people[31].name, "s32");
    for p in &people {
        assert_eq!(p.images.len(), 10, "{}", p.name);
        for img in &p.images {
            assert_eq!(img.dimensions(), (64, 64));
            // Greyscale replicated: R = G = B.
            assert!(img.pixels().all(|px| px[0] == px[1] && px[1] == px[2]));
        }
    }
    // Real faces: two images of one person are closer than images of two people, on average.
    let within: f64 = people
        .iter()
        .map(|p| mad(&p.images[0], &p.images[1]))
        .sum::<f64>()
        / people.len() as f64;
    let between: f64 = people
        .windows(2)
        .map(|w| mad(&w[0].images[0], &w[1].images[0]))
        .sum::<f64>()
        / (people.len() - 1) as f64;
    println!("ORL mean abs diff: within {within:.1}, between {between:.1}");
    assert!(within < between);
}
