//! The head options beyond the recipe, end to end on a generated dataset (random VGG16
//! weights at 32x32): feature scaling fitted on the training rows and saved with the head, the
//! cross-validated logistic head, weight decay, and prediction with all of them.

use crate::common::fixture;
use pipeline::config::{Config, HeadKind};
use pipeline::models::Head;
use pipeline::models::Scaling;
use pipeline::training::study::train_head;

fn setup(test: &str) -> (std::path::PathBuf, Config) {
    let (dir, mut c) = fixture(test, 24);
    c.split.val_fraction = 0.25;
    c.head.train.epochs = 3;
    c.head.train.batch_size = 4;
    c.output.runs = dir.join("runs");
    pipeline::features::extract::run(&c).expect("extract");
    (dir, c)
}

fn all_features(c: &Config) -> candle_core::Tensor {
    crate::common::load(c).expect("store").features
}

#[test]
fn scaling_is_saved_with_the_head_and_reapplied_to_new_features() {
    let (_dir, mut c) = setup("heads-scaling");
    for scaling in [Scaling::Standardize, Scaling::L2] {
        c.head.scaling = scaling;
        let run = train_head(&c).expect("train-head");
        let head =
            Head::load(&run.dir.join("head.safetensors"), &candle_core::Device::Cpu).expect("load");
        assert_eq!(head.scaler().kind, scaling);
        if scaling == Scaling::Standardize {
            let mean = head.scaler().mean.as_ref().expect("saved mean");
            assert_eq!(mean.len(), head.dim());
            assert!(mean.iter().any(|m| *m != 0.0), "fitted, not zeros");
        }
        // The loaded head's logits on raw features equal the trained head's recorded
        // validation accuracy when scored the way `predict` scores.
        let x = all_features(&c);
        let probs =
            pipeline::training::study::head_probabilities(&head, &x).expect("probabilities");
        assert_eq!(probs.len(), x.dim(0).expect("rows"));
        // The same rows, scaled by hand, through an unscaled copy give the same logits.
        let scaled = head.scaler().apply(&x).expect("scale");
        let plain = head.logits(&x).expect("logits");
        let by_hand = Head::load(&run.dir.join("head.safetensors"), &candle_core::Device::Cpu)
            .expect("load")
            .with_scaler(pipeline::models::Scaler::none())
            .expect("unscaled");
        // `with_scaler` on a loaded head replaces the scaler; feeding pre-scaled rows must give
        // identical logits.
        let again = by_hand.logits(&scaled).expect("logits");
        let (a, b): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
            (plain.to_vec2().expect("a"), again.to_vec2().expect("b"));
        assert_eq!(a, b, "{scaling:?}");
    }
}

#[test]
fn logistic_head_cross_validates_its_penalty_and_predicts() {
    let (dir, mut c) = setup("heads-logistic");
    c.head.kind = HeadKind::Logistic;
    c.head.scaling = Scaling::L2;
    c.head.c = vec![0.01, 1.0, 100.0];
    c.head.cv_folds = 3;
    let run = train_head(&c).expect("train-head");
    assert!(run
        .dir
        .file_name()
        .expect("name")
        .to_string_lossy()
        .starts_with("head-logistic"));
    let cv: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.dir.join("cv.json")).expect("cv.json"))
            .expect("json");
    let scores = cv.as_array().expect("one score per C");
    assert_eq!(scores.len(), 3);
    assert!(scores
        .iter()
        .all(|s| s["log_loss"].as_f64().is_some_and(f64::is_finite)));
    assert_eq!(run.metrics.history.len(), 1, "one record: no epochs");
    assert_eq!(
        run.metrics.status,
        pipeline::reporting::runs::RunStatus::Finished
    );
    // Deterministic: the same config gives the same head.
    let again = train_head(&c).expect("train-head");
    let w = |d: &std::path::Path| {
        let h = Head::load(&d.join("head.safetensors"), &candle_core::Device::Cpu).expect("load");
        h.logits(&all_features(&c))
            .and_then(|t| Ok(t.to_vec2::<f32>()?))
            .expect("logits")
    };
    assert_eq!(w(&run.dir), w(&again.dir));
    // `predict` uses it like any head.
    c.predict.input = Some(dir.join("images"));
    c.predict.output = Some(dir.join("predictions.csv"));
    c.predict.run = Some(run.dir.clone());
    let summary = pipeline::inference::predict::run(&c).expect("predict");
    assert_eq!(summary.images, 24);
}

#[test]
fn weight_decay_shrinks_the_head() {
    let (_dir, mut c) = setup("heads-decay");
    let norm = |c: &Config| {
        let run = train_head(c).expect("train-head");
        let h =
            Head::load(&run.dir.join("head.safetensors"), &candle_core::Device::Cpu).expect("load");
        use pipeline::training::Model;
        let params = h.params().sorted().expect("params");
        let w = params
            .iter()
            .find(|(n, _)| n == "fc.weight")
            .expect("fc.weight")
            .1
            .as_tensor()
            .sqr()
            .and_then(|t| t.sum_all())
            .and_then(|t| t.to_scalar::<f32>())
            .expect("norm");
        w
    };
    c.head.train.lr = 0.01;
    c.head.train.epochs = 5;
    let plain = norm(&c);
    c.head.train.weight_decay = 50.0;
    let decayed = norm(&c);
    assert!(decayed < 0.9 * plain, "{decayed} vs {plain}");
}
