//! The data loaders: IDX (plain and gzip), the built-in mnist-5k, image folders, CSV / TSV /
//! JSONL texts, the seeded split, the caps, and the error messages.

mod common;

use common::TempDir;
use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use peft_studio::data::*;

fn idx3(n: usize, h: usize, w: usize, pixels: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 3];
    for d in [n, h, w] {
        v.extend_from_slice(&(d as u32).to_be_bytes());
    }
    v.extend_from_slice(pixels);
    v
}

fn idx1(labels: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 1];
    v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    v.extend_from_slice(labels);
    v
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn cfg(source: DataSource) -> DataConfig {
    DataConfig {
        source,
        ..DataConfig::default()
    }
}

fn text_source(path: &Path, text: &str, label: &str) -> DataSource {
    DataSource::Text {
        path: path.to_path_buf(),
        text_column: text.into(),
        label_column: label.into(),
    }
}

fn images(s: &Samples) -> &ImageSet {
    match s {
        Samples::Images(s) => s,
        Samples::Texts(_) => panic!("expected images"),
    }
}

fn texts(s: &Samples) -> &TextSet {
    match s {
        Samples::Texts(s) => s,
        Samples::Images(_) => panic!("expected texts"),
    }
}

fn err(cfg: &DataConfig) -> String {
    match load(cfg) {
        Ok(_) => panic!("expected an error for {:?}", cfg.source),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} should mention {p:?}");
    }
}

// ---------------------------------------------------------------------------------- IDX ----

#[test]
fn idx_round_trip_plain_and_gzip() {
    let t = TempDir::new("idx");
    let (n, h, w) = (5, 3, 4);
    let px: Vec<u8> = (0..n * h * w).map(|i| (i * 7 % 256) as u8).collect();
    let labels = [0u8, 3, 1, 3, 2];
    let ev_px: Vec<u8> = (0..2 * h * w).map(|i| 255 - i as u8).collect();
    let ev_labels = [4u8, 0];
    // Plain training files, gzip held-out files; one gzip file without a .gz extension.
    let src = DataSource::Idx {
        images: t.write("train-images", &idx3(n, h, w, &px)),
        labels: t.write("train-labels.idx1", &idx1(&labels)),
        eval_images: Some(t.write("eval-images.gz", &gzip(&idx3(2, h, w, &ev_px)))),
        eval_labels: Some(t.write("eval-labels.bin", &gzip(&idx1(&ev_labels)))),
    };
    let ds = load(&cfg(src)).unwrap();
    assert_eq!(ds.name, "train-images");
    assert_eq!(ds.classes, ["0", "1", "2", "3", "4"]);
    assert_eq!(ds.num_classes(), 5);
    let tr = images(&ds.train);
    assert_eq!((tr.channels, tr.height, tr.width), (1, 3, 4));
    assert_eq!(tr.pixels, px);
    assert_eq!(tr.labels, [0, 3, 1, 3, 2]);
    assert_eq!(tr.image(1), &px[12..24]);
    let ev = images(&ds.eval);
    assert_eq!(ev.pixels, ev_px);
    assert_eq!(ds.eval.labels(), &[4, 0]);
    assert_eq!(
        ds.class_counts(),
        (vec![1, 1, 1, 2, 0], vec![1, 0, 0, 0, 1])
    );

    // The readers on their own.
    let im = read_idx_images(&t.path("eval-images.gz")).unwrap();
    assert_eq!((im.count, im.height, im.width), (2, 3, 4));
    assert_eq!(
        read_idx_labels(&t.path("train-labels.idx1")).unwrap(),
        labels
    );

    // Without held-out files the eval split is cut from the training files.
    let src = DataSource::Idx {
        images: t.path("train-images"),
        labels: t.path("train-labels.idx1"),
        eval_images: None,
        eval_labels: None,
    };
    let ds = load(&DataConfig {
        eval_fraction: 0.4,
        ..cfg(src)
    })
    .unwrap();
    assert_eq!((ds.train.len(), ds.eval.len()), (3, 2));
    assert_eq!(ds.classes, ["0", "1", "2", "3"]);
    // Every image survives the split intact, with its label.
    for set in [images(&ds.train), images(&ds.eval)] {
        for i in 0..set.len() {
            let j = (0..n)
                .find(|&j| &px[j * 12..(j + 1) * 12] == set.image(i))
                .unwrap();
            assert_eq!(set.labels[i], labels[j] as u32);
        }
    }
}

#[test]
fn builtin_mnist_5k() {
    let ds = load(&DataConfig::default()).unwrap();
    assert_eq!(ds.name, "mnist-5k");
    assert_eq!(
        ds.classes,
        ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
    );
    assert_eq!((ds.train.len(), ds.eval.len()), (4000, 1000));
    for s in [&ds.train, &ds.eval] {
        let im = images(s);
        assert_eq!((im.channels, im.height, im.width), (1, 28, 28));
        assert_eq!(im.pixels.len(), im.len() * 784);
        assert!(im.pixels.iter().copied().max().unwrap() > 200);
        assert!(im.labels.iter().all(|&l| l < 10));
    }
    let (tr, ev) = ds.class_counts();
    assert_eq!(tr, vec![400; 10]);
    assert_eq!(ev, vec![100; 10]);
    assert!(BUILTIN_DATASETS.contains(&"mnist-5k"));
    assert!(assets_dir().join("data").is_dir());

    // Caps keep the class mix, and are deterministic.
    let capped = DataConfig {
        max_train: Some(1000),
        max_eval: Some(200),
        split_seed: 3,
        ..DataConfig::default()
    };
    let a = load(&capped).unwrap();
    assert_eq!((a.train.len(), a.eval.len()), (1000, 200));
    let (tr, ev) = a.class_counts();
    assert!(tr.iter().all(|&c| (60..=140).contains(&c)), "{tr:?}");
    assert!(ev.iter().all(|&c| c > 0), "{ev:?}");
    let b = load(&capped).unwrap();
    assert_eq!(a.train, b.train);
    assert_eq!(a.eval, b.eval);
}

// ------------------------------------------------------------------------- image folder ----

fn png_rgb(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y)));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn png_rgba(w: u32, h: u32, c: [u8; 4]) -> Vec<u8> {
    let img = image::RgbaImage::from_pixel(w, h, image::Rgba(c));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn pgm(w: usize, h: usize, v: u8) -> Vec<u8> {
    let mut out = format!("P5\n{w} {h}\n255\n").into_bytes();
    out.extend(std::iter::repeat_n(v, w * h));
    out
}

fn folder_fixture(tag: &str) -> TempDir {
    let t = TempDir::new(tag);
    // cat: a red 8×6 PNG, a 16×16 blue RGBA PNG; dog: a grey 10×5 PGM and a 20×10 PNG, black
    // on the left half and white on the right. Hidden files / folders and non-images skipped.
    t.write("cat/a.png", &png_rgb(8, 6, |_, _| [255, 0, 0]));
    t.write("cat/b.PNG", &png_rgba(16, 16, [0, 0, 255, 255]));
    t.write("dog/c.pgm", &pgm(10, 5, 100));
    t.write(
        "dog/d.png",
        &png_rgb(20, 10, |x, _| if x < 10 { [0; 3] } else { [255; 3] }),
    );
    t.write("dog/.DS_Store", b"junk");
    t.write("dog/notes.txt", b"not an image");
    t.write(".hidden/x.png", &png_rgb(3, 3, |_, _| [1, 2, 3]));
    t
}

#[test]
fn image_folder_rgb_grey_and_sizes() {
    let t = folder_fixture("folder");
    let src = DataSource::ImageFolder {
        path: t.0.clone(),
        size: Some([10, 10]),
        grayscale: false,
    };
    // eval_fraction 0.25 of 4 → 1 eval image.
    let c = DataConfig {
        eval_fraction: 0.25,
        ..cfg(src)
    };
    let ds = load(&c).unwrap();
    assert_eq!(ds.classes, ["cat", "dog"]);
    assert_eq!((ds.train.len(), ds.eval.len()), (3, 1));
    let (tr, ev) = ds.class_counts();
    assert_eq!(
        (tr[0] + ev[0], tr[1] + ev[1]),
        (2, 2),
        "2 cats and 2 dogs in all"
    );
    for s in [&ds.train, &ds.eval] {
        let im = images(s);
        assert_eq!((im.channels, im.height, im.width), (3, 10, 10));
        assert_eq!(im.pixels.len(), im.len() * 300);
    }
    // Find each image by its content; planes are C×H×W.
    let all: Vec<(&[u8], u32)> = [images(&ds.train), images(&ds.eval)]
        .into_iter()
        .flat_map(|s| (0..s.len()).map(move |i| (s.image(i), s.labels[i])))
        .collect();
    let red = all
        .iter()
        .find(|(p, _)| p[..100].iter().all(|&v| v == 255) && p[100..].iter().all(|&v| v == 0));
    assert_eq!(red.map(|r| r.1), Some(0), "the red cat");
    let blue = all
        .iter()
        .find(|(p, _)| p[..200].iter().all(|&v| v == 0) && p[200..].iter().all(|&v| v == 255));
    assert_eq!(blue.map(|r| r.1), Some(0), "the blue cat (alpha dropped)");
    let grey = all.iter().find(|(p, _)| p.iter().all(|&v| v == 100));
    assert_eq!(grey.map(|r| r.1), Some(1), "the grey PGM, made RGB");
    // The 20×10 half-black image, centre-cropped to 10×10 (columns 5..15): left half black.
    let split = all
        .iter()
        .find(|(p, _)| p[0] == 0 && p[9] == 255)
        .expect("the centre-cropped dog");
    assert_eq!(split.1, 1);
    for row in 0..10 {
        let r = &split.0[row * 10..row * 10 + 10];
        assert_eq!(r, &[0, 0, 0, 0, 0, 255, 255, 255, 255, 255]);
    }

    // Greyscale, no size: the first image's size (cat/a.png, 6 high, 8 wide).
    let src = DataSource::ImageFolder {
        path: t.0.clone(),
        size: None,
        grayscale: true,
    };
    let ds = load(&DataConfig {
        eval_fraction: 0.5,
        ..cfg(src)
    })
    .unwrap();
    let im = images(&ds.train);
    assert_eq!((im.channels, im.height, im.width), (1, 6, 8));
    assert_eq!(ds.train.len() + ds.eval.len(), 4);
    let ev = images(&ds.eval);
    assert_eq!(ev.pixels.len(), ev.len() * 48);
}

// ---------------------------------------------------------------------------------- text ----

#[test]
fn csv_and_tsv_string_and_integer_labels() {
    let t = TempDir::new("csv");
    let p = t.write(
        "reviews.csv",
        b"id,body,category\n1,\"great, really\",pos\n2,awful,neg\n3,meh,neutral\n4,fine,pos\n",
    );
    let ds = load(&DataConfig {
        eval_fraction: 0.25,
        ..cfg(text_source(&p, "body", "category"))
    })
    .unwrap();
    assert_eq!(ds.name, "reviews");
    assert_eq!(ds.classes, ["neg", "neutral", "pos"]);
    let mut all: Vec<(String, u32)> = [texts(&ds.train), texts(&ds.eval)]
        .into_iter()
        .flat_map(|s| s.texts.iter().cloned().zip(s.labels.iter().copied()))
        .collect();
    all.sort();
    assert_eq!(
        all,
        [
            ("awful".to_string(), 0),
            ("fine".to_string(), 2),
            ("great, really".to_string(), 2),
            ("meh".to_string(), 1)
        ]
    );

    // Integer labels: classes 0..=max, even when one is never used.
    let p = t.write("nums.tsv", b"text\tlabel\na\t0\nb\t2\nc\t2\nd\t0\n");
    let ds = load(&cfg(text_source(&p, "text", "label"))).unwrap();
    assert_eq!(ds.classes, ["0", "1", "2"]);
    let (tr, ev) = ds.class_counts();
    assert_eq!((tr[0] + ev[0], tr[1] + ev[1], tr[2] + ev[2]), (2, 0, 2));
}

#[test]
fn jsonl_string_and_integer_labels() {
    let t = TempDir::new("jsonl");
    let p = t.write(
        "mail.jsonl",
        "{\"text\": \"win money\", \"label\": \"spam\"}\n\n\
         {\"text\": \"lunch?\", \"label\": \"ham\", \"extra\": 1}\n   \n\
         {\"text\": \"héllo\", \"label\": \"ham\"}\n"
            .as_bytes(),
    );
    let ds = load(&DataConfig {
        eval_fraction: 0.3,
        ..cfg(text_source(&p, "text", "label"))
    })
    .unwrap();
    assert_eq!(ds.classes, ["ham", "spam"]);
    assert_eq!(ds.train.len() + ds.eval.len(), 3);
    let (tr, ev) = ds.class_counts();
    assert_eq!((tr[0] + ev[0], tr[1] + ev[1]), (2, 1));
    let all: Vec<&String> = [texts(&ds.train), texts(&ds.eval)]
        .into_iter()
        .flat_map(|s| s.texts.iter())
        .collect();
    assert!(all.iter().any(|s| s.as_str() == "héllo"));

    let p = t.write(
        "ints.jsonl",
        b"{\"sentence\": \"a\", \"y\": 1}\n{\"sentence\": \"b\", \"y\": 3}\n{\"sentence\": \"c\", \"y\": 0}\n",
    );
    let ds = load(&cfg(text_source(&p, "sentence", "y"))).unwrap();
    assert_eq!(ds.classes, ["0", "1", "2", "3"]);
    let mut all: Vec<(String, u32)> = [texts(&ds.train), texts(&ds.eval)]
        .into_iter()
        .flat_map(|s| s.texts.iter().cloned().zip(s.labels.iter().copied()))
        .collect();
    all.sort();
    assert_eq!(
        all,
        [
            ("a".to_string(), 1),
            ("b".to_string(), 3),
            ("c".to_string(), 0)
        ]
    );
}

// ------------------------------------------------------------------------ split and caps ----

fn numbered_csv(t: &TempDir, n: usize) -> PathBuf {
    let mut s = String::from("text,label\n");
    for i in 0..n {
        s.push_str(&format!("t{i},{}\n", if i % 3 == 0 { "a" } else { "b" }));
    }
    t.write("numbered.csv", s.as_bytes())
}

fn split_of(ds: &Dataset) -> (Vec<String>, Vec<String>) {
    (
        texts(&ds.train).texts.clone(),
        texts(&ds.eval).texts.clone(),
    )
}

#[test]
fn split_is_seeded_disjoint_and_sized() {
    let t = TempDir::new("split");
    let p = numbered_csv(&t, 50);
    let c = |seed: u64| DataConfig {
        split_seed: seed,
        eval_fraction: 0.2,
        ..cfg(text_source(&p, "text", "label"))
    };
    let (tr1, ev1) = split_of(&load(&c(1)).unwrap());
    let (tr1b, ev1b) = split_of(&load(&c(1)).unwrap());
    let (tr2, ev2) = split_of(&load(&c(2)).unwrap());
    assert_eq!((tr1.len(), ev1.len()), (40, 10));
    assert_eq!((&tr1, &ev1), (&tr1b, &ev1b), "same seed, same split");
    assert_ne!(ev1, ev2, "another seed, another split");
    assert_eq!((tr2.len(), ev2.len()), (40, 10));
    for (tr, ev) in [(&tr1, &ev1), (&tr2, &ev2)] {
        assert!(tr.iter().all(|x| !ev.contains(x)), "train and eval overlap");
        let mut all: Vec<&String> = tr.iter().chain(ev.iter()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 50);
    }
    // Tiny sets still get one sample on each side.
    let p3 = t.write("three.csv", b"text,label\nx,a\ny,b\nz,a\n");
    let ds = load(&DataConfig {
        eval_fraction: 0.01,
        ..cfg(text_source(&p3, "text", "label"))
    })
    .unwrap();
    assert_eq!((ds.train.len(), ds.eval.len()), (2, 1));
    let ds = load(&DataConfig {
        eval_fraction: 0.99,
        ..cfg(text_source(&p3, "text", "label"))
    })
    .unwrap();
    assert_eq!((ds.train.len(), ds.eval.len()), (1, 2));
}

#[test]
fn caps_are_deterministic_subsets() {
    let t = TempDir::new("caps");
    let p = numbered_csv(&t, 50);
    let base = DataConfig {
        split_seed: 5,
        ..cfg(text_source(&p, "text", "label"))
    };
    let (full_tr, full_ev) = split_of(&load(&base).unwrap());
    let capped = DataConfig {
        max_train: Some(7),
        max_eval: Some(3),
        ..base.clone()
    };
    let (tr, ev) = split_of(&load(&capped).unwrap());
    assert_eq!((tr.len(), ev.len()), (7, 3));
    assert!(tr.iter().all(|x| full_tr.contains(x)));
    assert!(ev.iter().all(|x| full_ev.contains(x)));
    assert_eq!((tr.clone(), ev.clone()), split_of(&load(&capped).unwrap()));
    // Not simply the first ones.
    assert_ne!(tr, full_tr[..7].to_vec());
    // Caps above the size change nothing.
    let loose = DataConfig {
        max_train: Some(1000),
        max_eval: Some(1000),
        ..base
    };
    assert_eq!(split_of(&load(&loose).unwrap()), (full_tr, full_ev));
}

#[test]
fn samples_helpers() {
    let s = Samples::Texts(TextSet {
        texts: vec!["a".into(), "b".into(), "c".into()],
        labels: vec![2, 0, 1],
    });
    assert_eq!(s.len(), 3);
    assert!(!s.is_empty());
    let sub = s.subset(&[2, 0]);
    assert_eq!(sub.labels(), &[1, 2]);
    assert_eq!(texts(&sub).texts, ["c", "a"]);
    let im = Samples::Images(ImageSet {
        channels: 1,
        height: 1,
        width: 2,
        pixels: vec![1, 2, 3, 4],
        labels: vec![0, 1],
    });
    let sub = im.subset(&[1]);
    assert_eq!(images(&sub).pixels, [3, 4]);
    assert_eq!(images(&im).image(0), &[1, 2]);
    assert!(im.subset(&[]).is_empty());
}

// -------------------------------------------------------------------------------- errors ----

#[test]
fn idx_errors_name_the_file() {
    let t = TempDir::new("idxerr");
    let good_im = t.write("im", &idx3(2, 2, 2, &[0; 8]));
    let good_lb = t.write("lb", &idx1(&[0, 1]));
    let idx = |images: &Path, labels: &Path| {
        cfg(DataSource::Idx {
            images: images.to_path_buf(),
            labels: labels.to_path_buf(),
            eval_images: None,
            eval_labels: None,
        })
    };
    // Missing file.
    let missing = t.path("nope-images.gz");
    let m = err(&idx(&missing, &good_lb));
    assert_mentions(&m, &["not found", "nope-images.gz"]);
    // Labels given as images: wrong magic.
    let m = err(&idx(&good_lb, &good_lb));
    assert_mentions(
        &m,
        &["lb", "magic", "0x00000801", "0x00000803", "label file"],
    );
    // Truncated images (plain and gzip).
    let short = t.write("short-images", &idx3(3, 2, 2, &[0; 8]));
    let m = err(&idx(&short, &good_lb));
    assert_mentions(&m, &["short-images", "truncated", "3×2×2"]);
    let shortgz = t.write("short-images.gz", &gzip(&idx3(3, 2, 2, &[0; 8])));
    assert_mentions(&err(&idx(&shortgz, &good_lb)), &["short-images.gz"]);
    // Corrupt gzip.
    let mut bad = gzip(&idx3(2, 2, 2, &[0; 8]));
    bad.truncate(bad.len() / 2);
    let badgz = t.write("bad.gz", &bad);
    assert_mentions(&err(&idx(&badgz, &good_lb)), &["bad.gz", "gzip"]);
    // Not an IDX file at all.
    let text = t.write("readme.txt", b"hello world");
    assert_mentions(&err(&idx(&text, &good_lb)), &["readme.txt", "not an IDX"]);
    // Count mismatch.
    let three = t.write("three-labels", &idx1(&[0, 1, 2]));
    let m = err(&idx(&good_im, &three));
    assert_mentions(&m, &["im", "three-labels", "2 images", "3 labels"]);
    // Held-out images of another size.
    let other = t.write("other-size", &idx3(2, 3, 3, &[0; 18]));
    let m = err(&cfg(DataSource::Idx {
        images: good_im.clone(),
        labels: good_lb.clone(),
        eval_images: Some(other),
        eval_labels: Some(good_lb.clone()),
    }));
    assert_mentions(&m, &["other-size", "3×3", "2×2"]);
    // Only one of the held-out pair.
    let m = err(&cfg(DataSource::Idx {
        images: good_im.clone(),
        labels: good_lb.clone(),
        eval_images: Some(good_im.clone()),
        eval_labels: None,
    }));
    assert_mentions(&m, &["eval_labels"]);
    // Empty IDX file.
    let empty = t.write("empty-images", &idx3(0, 2, 2, &[]));
    assert_mentions(&err(&idx(&empty, &good_lb)), &["empty-images", "empty"]);
}

#[test]
fn image_folder_errors_name_the_file() {
    let t = folder_fixture("imgerr");
    t.write(
        "dog/broken.png",
        b"\x89PNG\r\n\x1a\nthis is not really a png",
    );
    let src = |path: PathBuf| {
        cfg(DataSource::ImageFolder {
            path,
            size: Some([4, 4]),
            grayscale: false,
        })
    };
    assert_mentions(&err(&src(t.0.clone())), &["broken.png", "image"]);
    std::fs::remove_file(t.path("dog/broken.png")).unwrap();
    // A class folder with no images.
    std::fs::create_dir_all(t.path("empty-class")).unwrap();
    t.write("empty-class/readme.txt", b"x");
    assert_mentions(&err(&src(t.0.clone())), &["empty-class", "no images"]);
    // A folder without class folders, and a missing folder.
    let flat = TempDir::new("flat");
    flat.write("a.png", &png_rgb(2, 2, |_, _| [0; 3]));
    assert_mentions(&err(&src(flat.0.clone())), &["empty", "sub-folder"]);
    let gone = t.path("does-not-exist");
    assert_mentions(&err(&src(gone)), &["does-not-exist", "not found"]);
    // A zero size.
    let zero = cfg(DataSource::ImageFolder {
        path: flat.0.clone(),
        size: Some([0, 4]),
        grayscale: true,
    });
    assert_mentions(&err(&zero), &["size"]);
}

#[test]
fn text_errors_name_the_file_column_and_line() {
    let t = TempDir::new("texterr");
    // A label column that is absent: name it and list the columns found.
    let p = t.write("data.csv", b"sentence,target\nhi,a\n");
    let m = err(&cfg(text_source(&p, "sentence", "label")));
    assert_mentions(&m, &["data.csv", "'label'", "'sentence'", "'target'"]);
    let m = err(&cfg(text_source(&p, "text", "target")));
    assert_mentions(&m, &["data.csv", "text column 'text'"]);
    // JSONL: the field missing on line 2.
    let p = t.write(
        "data.jsonl",
        b"{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"tag\": \"y\"}\n",
    );
    let m = err(&cfg(text_source(&p, "text", "label")));
    assert_mentions(&m, &["data.jsonl", "line 2", "'label'", "'tag'"]);
    // A bad JSON line, after a blank one.
    let p = t.write(
        "bad.jsonl",
        b"{\"text\": \"a\", \"label\": 1}\n\n{\"text\": \"b\", \"label\": \n",
    );
    assert_mentions(
        &err(&cfg(text_source(&p, "text", "label"))),
        &["bad.jsonl", "line 3", "JSON"],
    );
    let p = t.write("arr.jsonl", b"[1, 2]\n");
    assert_mentions(
        &err(&cfg(text_source(&p, "text", "label"))),
        &["arr.jsonl", "line 1", "object"],
    );
    let p = t.write("neg.jsonl", b"{\"text\": \"a\", \"label\": -1}\n");
    assert_mentions(
        &err(&cfg(text_source(&p, "text", "label"))),
        &["neg.jsonl", "line 1", "-1"],
    );
    // A ragged CSV row and an empty label.
    let p = t.write("ragged.csv", b"text,label\na,x\nb\n");
    assert_mentions(
        &err(&cfg(text_source(&p, "text", "label"))),
        &["ragged.csv", "line 3"],
    );
    let p = t.write("nolabel.csv", b"text,label\na,x\nb,\n");
    assert_mentions(
        &err(&cfg(text_source(&p, "text", "label"))),
        &["nolabel.csv", "line 3", "empty label"],
    );
    // Empty dataset.
    let p = t.write("empty.csv", b"text,label\n");
    assert_mentions(
        &err(&cfg(text_source(&p, "text", "label"))),
        &["empty.csv", "empty"],
    );
    let p = t.write("empty.jsonl", b"\n\n");
    assert_mentions(
        &err(&cfg(text_source(&p, "text", "label"))),
        &["empty.jsonl", "empty"],
    );
    // Missing file, unknown extension.
    let p = t.path("missing.csv");
    assert_mentions(
        &err(&cfg(text_source(&p, "text", "label"))),
        &["missing.csv", "not found"],
    );
    let p = t.write("data.xlsx", b"x");
    assert_mentions(
        &err(&cfg(text_source(&p, "text", "label"))),
        &["data.xlsx", ".csv"],
    );
    // One row cannot be split.
    let p = t.write("one.csv", b"text,label\nonly,a\n");
    assert_mentions(
        &err(&cfg(text_source(&p, "text", "label"))),
        &["one.csv", "at least 2"],
    );
}

#[test]
fn config_errors() {
    let m = err(&cfg(DataSource::Builtin {
        name: "imagenet".into(),
    }));
    assert_mentions(&m, &["imagenet", "mnist-5k"]);
    let m = err(&DataConfig {
        eval_fraction: 1.5,
        ..DataConfig::default()
    });
    assert_mentions(&m, &["eval_fraction", "1.5"]);
    let m = err(&DataConfig {
        max_train: Some(0),
        ..DataConfig::default()
    });
    assert_mentions(&m, &["max_train"]);
    // The serde shape: kebab-case tags, defaults for columns.
    let c: DataConfig = serde_json::from_str(
        r#"{"source": {"kind": "text", "path": "x.csv"}, "eval_fraction": 0.1}"#,
    )
    .unwrap();
    assert_eq!(c.source, text_source(Path::new("x.csv"), "text", "label"));
    let c: DataConfig = serde_json::from_str(
        r#"{"source": {"kind": "image-folder", "path": "imgs", "size": [32, 48]}}"#,
    )
    .unwrap();
    assert_eq!(
        c.source,
        DataSource::ImageFolder {
            path: "imgs".into(),
            size: Some([32, 48]),
            grayscale: false
        }
    );
}
