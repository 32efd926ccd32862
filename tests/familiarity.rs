//! The personaliser says when reference photos are unlike the people it was built on: the
//! built-in (synthetic) personaliser accepts held-out synthetic people and the sample people,
//! and warns about real photos (ORL, from `../shared/data`), in its warnings and report.

use std::path::PathBuf;

use candle_core::Device;
use peft_studio::data::identity_folder::load_references;
use peft_studio::personalize::commands::sample_person;
use peft_studio::personalize::pipeline::{Personaliser, builtin_dir};

fn orl() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/orl_faces");
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("skipped the real-photo part: {} is absent", p.display());
        None
    }
}

#[test]
fn synthetic_people_are_familiar_and_real_photos_are_not() {
    let p = Personaliser::load(&builtin_dir(), &Device::Cpu).unwrap();
    let size = p.image_size();
    let held_out = p.preset().people.eval.load(size).unwrap();
    for person in held_out.iter().take(48) {
        let f = p
            .familiarity(&person.images[..4])
            .unwrap()
            .expect("statistics ship");
        assert!(f.familiar, "{}: {f:?}", person.name);
    }
    for i in 0..4 {
        let refs = sample_person(i, size);
        assert!(
            p.reference_warnings(&refs).unwrap().is_empty(),
            "sample {i}"
        );
    }
    let Some(orl) = orl() else { return };
    for s in ["s1", "s7", "s16", "s30"] {
        let refs = load_references(&orl.join(s), size).unwrap()[..4].to_vec();
        let f = p.familiarity(&refs).unwrap().unwrap();
        assert!(!f.familiar && f.distance > f.threshold, "{s}: {f:?}");
        let w = p.reference_warnings(&refs).unwrap();
        assert!(
            w.iter()
                .any(|w| w.contains("unlike the pictures") && w.contains("distance")),
            "{s}: {w:?}"
        );
    }
}
