//! First-use downloads against real HTTP servers on 127.0.0.1 (`testkit::http`): the dataset
//! archive (download, resume, unpack, content digest, errors) and hub weights through hf-hub
//! (etag and pinned SHA-256 checks); plus the committed pipeline.toml with the offline layer.

use std::path::{Path, PathBuf};

use pipeline::config::{apply_layer, Config, DataConfig};
use pipeline::data::fetch::http;
use pipeline::data::fetch::hub::Hub;
use pipeline::data::fetch::Source;
use pipeline::{Dataset, WeightsSource};
use testkit::archive::{content_digest, sha256_hex as sha256, study_entries, zip_bytes, STUDY_TOP};
use testkit::http::{Route, Server};

/// Bytes that are not all alike, so a wrong offset shows.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Files under `dir`, recursively (to show nothing was left behind).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn source(location: String, digest: &str, cache: &Path) -> Source {
    Source {
        location,
        digest: digest.into(),
        cache: cache.to_owned(),
    }
}

#[test]
fn archive_is_downloaded_unpacked_checked_once_then_read_from_the_cache() {
    let dir = testkit::temp_dir("fetch-archive");
    let entries = study_entries(6, 2);
    let digest = content_digest(&entries, STUDY_TOP);
    let server = Server::start();
    server.route("/study.zip", Route::file(zip_bytes(&entries)));
    let config = dir.join("pipeline.toml");
    std::fs::write(
        &config,
        format!(
            "[data]\nsource = \"{}\"\nsource_digest = \"{digest}\"\ncache = \"cache\"\n\
             csv = \"source:Emergency_Vehicles/train.csv\"\n\
             images = \"source:Emergency_Vehicles/train\"\n\
             image_column = \"image_names\"\nlabel_column = \"emergency_or_not\"\n",
            server.url("/study.zip")
        ),
    )
    .expect("config");
    let c = Config::load(&config, &[]).expect("config loads without fetching");
    assert!(
        server.requests("/study.zip").is_empty(),
        "nothing fetched yet"
    );
    let ds = Dataset::load(&c.data).expect("fetched on first use");
    assert_eq!(ds.samples.len(), 6);
    assert_eq!(ds.classes, vec!["0", "1"]);
    let folder = dir.join(format!("cache/data/study-{}", &digest[..16]));
    assert!(ds.samples[0].path.starts_with(&folder));
    assert!(
        folder.join("notebook.ipynb").is_file(),
        "top folder stripped"
    );
    assert!(folder.join("Emergency_Vehicles/test/t001.jpg").is_file());
    // Only the unpacked folder stays: no archive, no .part, no temporary folder.
    let kept: Vec<PathBuf> = files_under(&dir.join("cache"))
        .into_iter()
        .filter(|p| !p.starts_with(&folder))
        .collect();
    assert!(kept.is_empty(), "{kept:?}");
    assert_eq!(server.requests("/study.zip").len(), 1);
    drop(server);
    // Later runs find it in the cache, with no server to ask.
    let again = Dataset::load(&c.data).expect("from the cache");
    assert_eq!(again.samples, ds.samples);
}

#[test]
fn interrupted_transfer_is_resumed_with_a_range_request() {
    let dir = testkit::temp_dir("fetch-resume");
    let body = pattern(3_000_000);
    let server = Server::start();
    server.route(
        "/big.bin",
        Route {
            drop_after: Some(1_234_567),
            ..Route::file(body.clone())
        },
    );
    let dest = dir.join("downloads/big.bin");
    http::download(&server.url("/big.bin"), &dest, Some(&sha256(&body))).expect("resumed");
    assert_eq!(std::fs::read(&dest).expect("read"), body);
    assert!(!http::part_path(&dest).exists());
    let requests = server.requests("/big.bin");
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0].header("Range"), None);
    assert_eq!(requests[1].header("Range"), Some("bytes=1234567-"));
}

#[test]
fn a_part_file_left_by_a_killed_run_is_continued() {
    let dir = testkit::temp_dir("fetch-part");
    let body = pattern(100_000);
    let server = Server::start();
    server.route("/f.bin", Route::file(body.clone()));
    let dest = dir.join("f.bin");
    std::fs::write(http::part_path(&dest), &body[..40_000]).expect("part");
    http::download(&server.url("/f.bin"), &dest, Some(&sha256(&body))).expect("continued");
    assert_eq!(std::fs::read(&dest).expect("read"), body);
    let requests = server.requests("/f.bin");
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].header("Range"), Some("bytes=40000-"));
}

#[test]
fn a_server_that_cannot_resume_gets_a_fresh_download() {
    let dir = testkit::temp_dir("fetch-no-ranges");
    let body = pattern(50_000);
    let server = Server::start();
    server.route(
        "/f.bin",
        Route {
            no_ranges: true,
            ..Route::file(body.clone())
        },
    );
    let dest = dir.join("f.bin");
    // A stale partial file that does not even match the start of the body.
    std::fs::write(http::part_path(&dest), vec![0xff; 20_000]).expect("part");
    http::download(&server.url("/f.bin"), &dest, Some(&sha256(&body))).expect("restarted");
    assert_eq!(std::fs::read(&dest).expect("read"), body);
}

#[test]
fn wrong_sha256_deletes_the_download_and_names_both_digests() {
    let dir = testkit::temp_dir("fetch-sha");
    let body = pattern(10_000);
    let server = Server::start();
    server.route("/f.bin", Route::file(body.clone()));
    let dest = dir.join("f.bin");
    let wrong = "0".repeat(64);
    let err = http::download(&server.url("/f.bin"), &dest, Some(&wrong))
        .expect_err("wrong digest")
        .to_string();
    assert!(
        err.contains(&wrong) && err.contains(&sha256(&body)),
        "{err}"
    );
    assert!(err.contains("deleted"), "{err}");
    assert!(files_under(&dir).is_empty(), "{:?}", files_under(&dir));
}

#[test]
fn wrong_content_digest_deletes_the_download_and_the_unpacked_files() {
    let dir = testkit::temp_dir("fetch-digest");
    let entries = study_entries(2, 1);
    let right = content_digest(&entries, STUDY_TOP);
    let server = Server::start();
    server.route("/study.zip", Route::file(zip_bytes(&entries)));
    let wrong = "1".repeat(64);
    let err = source(server.url("/study.zip"), &wrong, &dir)
        .ensure()
        .expect_err("digest differs")
        .to_string();
    assert!(
        err.contains(&wrong) && err.contains(&right) && err.contains("/study.zip"),
        "{err}"
    );
    assert!(err.contains("deleted"), "{err}");
    assert!(files_under(&dir).is_empty(), "{:?}", files_under(&dir));
    // With the right digest the same server's archive is accepted.
    let ok = source(server.url("/study.zip"), &right, &dir).ensure();
    assert!(ok
        .expect("right digest")
        .join("Emergency_Vehicles/train.csv")
        .is_file());
}

#[test]
fn missing_archive_is_an_error_naming_the_url_and_the_status() {
    let dir = testkit::temp_dir("fetch-404");
    let server = Server::start();
    let url = server.url("/nosuch.zip");
    let err = source(url.clone(), &"2".repeat(64), &dir)
        .ensure()
        .expect_err("404")
        .to_string();
    assert!(err.contains(&url) && err.contains("404"), "{err}");
    assert_eq!(
        server.requests("/nosuch.zip").len(),
        1,
        "a 404 is not retried"
    );
    assert!(files_under(&dir).is_empty(), "{:?}", files_under(&dir));
}

#[test]
fn unreachable_server_is_an_error_naming_the_url() {
    let dir = testkit::temp_dir("fetch-unreachable");
    let url = {
        let server = Server::start();
        server.url("/study.zip")
    }; // stopped: the port refuses connections
    let err = http::download(&url, &dir.join("x.zip"), None)
        .expect_err("refused")
        .to_string();
    assert!(err.contains(&url) && err.contains("gave up"), "{err}");
}

#[test]
fn archive_entries_escaping_the_folder_are_refused() {
    let dir = testkit::temp_dir("fetch-escape");
    let entries = vec![
        ("top/a.txt".to_string(), b"a".to_vec()),
        ("top/../../evil.txt".to_string(), b"evil".to_vec()),
    ];
    let server = Server::start();
    server.route("/evil.zip", Route::file(zip_bytes(&entries)));
    let cache = dir.join("cache");
    let err = source(server.url("/evil.zip"), &"3".repeat(64), &cache)
        .ensure()
        .expect_err("refused")
        .to_string();
    assert!(err.contains("evil.txt") && err.contains("refused"), "{err}");
    assert!(!dir.join("evil.txt").exists() && !cache.join("evil.txt").exists());
    assert!(files_under(&cache).is_empty(), "{:?}", files_under(&cache));
}

#[test]
fn a_local_archive_is_unpacked_and_left_in_place() {
    let dir = testkit::temp_dir("fetch-local");
    let entries = study_entries(2, 0);
    let archive = dir.join("study.zip");
    std::fs::write(&archive, zip_bytes(&entries)).expect("zip");
    let digest = content_digest(&entries, STUDY_TOP);
    let folder = source(archive.display().to_string(), &digest, &dir.join("cache"))
        .ensure()
        .expect("unpacked");
    assert!(folder.join("Emergency_Vehicles/train/1001.jpg").is_file());
    assert!(archive.is_file(), "the user's archive is not deleted");
}

const REPO: &str = "test-org/vgg16-random";
const FILE: &str = "model.safetensors";

#[test]
fn hub_file_is_downloaded_checked_against_its_etag_and_then_cached() {
    let home = testkit::temp_dir("fetch-hub");
    let body = pattern(2_000_000);
    let server = Server::start();
    server.hub_file(REPO, FILE, body.clone(), &sha256(&body));
    let hub = Hub::new(server.endpoint(), &home);
    let path = hub.file(REPO, FILE).expect("downloaded");
    assert_eq!(std::fs::read(&path).expect("read"), body);
    assert!(path.starts_with(home.join("hub/models--test-org--vgg16-random/snapshots")));
    drop(server);
    assert_eq!(hub.file(REPO, FILE).expect("from the cache"), path);
}

#[test]
fn hub_transfer_broken_off_is_resumed() {
    let home = testkit::temp_dir("fetch-hub-resume");
    let body = pattern(1_500_000);
    let server = Server::start();
    server.hub_file(REPO, FILE, body.clone(), &sha256(&body));
    let path = format!("/{REPO}/resolve/main/{FILE}");
    server.update_route(&path, |r| r.drop_after = Some(600_000));
    let got = Hub::new(server.endpoint(), &home)
        .file(REPO, FILE)
        .expect("resumed");
    assert_eq!(std::fs::read(got).expect("read"), body);
    let ranges: Vec<Option<String>> = server
        .requests(&path)
        .iter()
        .map(|r| r.header("Range").map(str::to_string))
        .collect();
    // hf-hub's probe, the download, then the rest from where it broke off.
    assert_eq!(
        ranges.last().cloned().flatten().as_deref(),
        Some("bytes=600000-")
    );
}

#[test]
fn hub_file_with_a_wrong_etag_is_deleted_and_refused() {
    let home = testkit::temp_dir("fetch-hub-etag");
    let body = pattern(300_000);
    let server = Server::start();
    let wrong = sha256(b"something else");
    server.hub_file(REPO, FILE, body.clone(), &wrong);
    let hub = Hub::new(server.endpoint(), &home);
    let err = hub.file(REPO, FILE).expect_err("etag differs").to_string();
    assert!(
        err.contains(&wrong) && err.contains(&sha256(&body)) && err.contains("deleted"),
        "{err}"
    );
    let blobs = home.join("hub/models--test-org--vgg16-random/blobs");
    assert!(!blobs.join(&wrong).exists(), "bad blob removed");
    // Served correctly, the next run downloads it again and accepts it.
    server.hub_file(REPO, FILE, body.clone(), &sha256(&body));
    let path = hub.file(REPO, FILE).expect("good now");
    assert_eq!(std::fs::read(path).expect("read"), body);
}

#[test]
fn study_weights_must_have_their_pinned_sha256() {
    let home = testkit::temp_dir("fetch-hub-pinned");
    let body = pattern(1000);
    let server = Server::start();
    // A consistent etag, but not torchvision's VGG16.
    server.hub_file("timm/vgg16.tv_in1k", FILE, body.clone(), &sha256(&body));
    let err = Hub::new(server.endpoint(), &home)
        .file("timm/vgg16.tv_in1k", FILE)
        .expect_err("not the pinned weights")
        .to_string();
    assert!(
        err.contains("57b026918159a6bf9faf8405c3a551903768e7138989d9c6224a14227203fad8")
            && err.contains("pinned"),
        "{err}"
    );
}

#[test]
fn hub_file_missing_is_an_error_naming_the_url_and_status() {
    let home = testkit::temp_dir("fetch-hub-404");
    let server = Server::start();
    let err = Hub::new(server.endpoint(), &home)
        .file("nobody/absent", FILE)
        .expect_err("404")
        .to_string();
    assert!(
        err.contains("nobody/absent") && err.contains("404") && err.contains("127.0.0.1"),
        "{err}"
    );
}

#[test]
fn committed_config_with_the_shared_layer_reads_only_local_files() {
    let Some(_shared) = testkit::shared_dir("committed_config_with_the_shared_layer") else {
        return;
    };
    let root = testkit::workspace_root();
    let config = root.join("pipeline.toml");
    let mut table: toml::Table = std::fs::read_to_string(&config)
        .expect("pipeline.toml")
        .parse()
        .expect("toml");
    let layer = root.join("configs/shared.toml");
    assert!(apply_layer(&mut table, &config, &layer).expect("layer"));
    let c = Config::from_table(table, &config).expect("valid");
    let data: &DataConfig = &c.data;
    for p in [&data.csv, &data.images, &c.predict.input] {
        let p = p.as_ref().expect("set");
        assert!(p.exists(), "{}", p.display());
    }
    assert!(
        matches!(&c.backbone.weights, WeightsSource::Local(w) if w.is_file()),
        "{}",
        c.backbone.weights
    );
    // The file's `source` stays set, unused: loading the data fetches nothing.
    let ds = Dataset::load(data).expect("local data");
    assert_eq!(ds.samples.len(), 1646);
}

#[test]
fn committed_config_fetches_the_pinned_study_archive_and_weights() {
    let root = testkit::workspace_root();
    let config = root.join("pipeline.toml");
    let table: toml::Table = std::fs::read_to_string(&config)
        .expect("pipeline.toml")
        .parse()
        .expect("toml");
    let c = Config::from_table(table, &config).expect("valid");
    assert_eq!(
        c.data.source.as_deref(),
        Some(
            "https://github.com/William-Hing/CNN-Image-Classification/archive/\
             65a66b0dffe4abef94e3c0bcc3c5f0a6e57f1d93.zip"
        )
    );
    // Computed from the repository's blobs at that commit (see notes/fetch.md).
    assert_eq!(
        c.data.source_digest.as_deref(),
        Some("1121c4f11a808d04cbb8e9e46239152ab5d93884e0339344ccdc1cf8d2ecf049")
    );
    assert_eq!(
        c.data.csv.as_deref(),
        Some(Path::new("source:Emergency_Vehicles/train.csv"))
    );
    assert_eq!(c.backbone.weights.to_string(), "hf:timm/vgg16.tv_in1k");
}
