//! Run directories: every training run writes its own `[output] runs/<kind>-<UTC time>/`
//! holding the resolved config, the trained weights and `metrics.json`, so a run can always be
//! reproduced and `predict` reloads exactly what was trained.
//!
//! A run is *finished* once its `metrics.json` says `"status": "finished"`; while training (or
//! after a crash) it says `"running"`. Choosing a run ([`latest_finished`]) passes over
//! unfinished runs and runs whose `metrics.json` cannot be read, and says which it passed over,
//! so another run's file never breaks `predict` or a report.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, IoContext, Result};
use crate::features::store::atomic_write;

/// Name of the resolved config inside a run directory.
pub const CONFIG_FILE: &str = "config.toml";
/// Name of the metrics file inside a run directory.
pub const METRICS_FILE: &str = "metrics.json";

/// A run's directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    /// Creates `runs/<kind>-<YYYYMMDD-HHMMSS>` (with a `-N` suffix if that exists already).
    pub fn create(runs: &Path, kind: &str) -> Result<Self> {
        std::fs::create_dir_all(runs).at(runs)?;
        let stamp = utc_stamp(SystemTime::now());
        for n in 0.. {
            let name = match n {
                0 => format!("{kind}-{stamp}"),
                _ => format!("{kind}-{stamp}-{n}"),
            };
            let path = runs.join(name);
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(Self { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::Io { path, source: e }),
            }
        }
        unreachable!("the loop above returns")
    }

    /// A file inside the run.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes the resolved config (`config.toml`).
    pub fn write_config(&self, config: &Config) -> Result<()> {
        let text = toml::to_string_pretty(config).map_err(|e| Error::Config {
            path: self.file(CONFIG_FILE),
            message: e.to_string(),
        })?;
        atomic_write(&self.file(CONFIG_FILE), text.as_bytes())
    }

    /// Writes `value` as pretty JSON to `name`.
    pub fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let path = self.file(name);
        let json = serde_json::to_vec_pretty(value).map_err(|e| Error::Io {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        atomic_write(&path, &json)
    }
}

/// Reads a run's resolved config back (paths in it are absolute already).
pub fn read_config(run: &Path) -> Result<Config> {
    let path = run.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).at(&path)?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Config {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Config::from_table(table, &path)
}

/// Where a training run stands, as its `metrics.json` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Training under way, or interrupted: final metrics (and weights) may be missing.
    Running,
    /// Training ended; final metrics and weights are written.
    Finished,
}

/// The status a parsed `metrics.json` records: its `status` key; in files written before that
/// key existed, the `finished` flag; in files older still, whether both accuracies are
/// numbers. `Err` says why the file is not a run's metrics.
pub fn status_of(json: &serde_json::Value) -> std::result::Result<RunStatus, String> {
    let obj = json.as_object().ok_or("not a JSON object")?;
    if let Some(status) = obj.get("status") {
        return serde_json::from_value(status.clone()).map_err(|_| {
            format!("unknown `status` {status} (expected \"running\" or \"finished\")")
        });
    }
    if let Some(finished) = obj.get("finished") {
        return match finished.as_bool() {
            Some(true) => Ok(RunStatus::Finished),
            Some(false) => Ok(RunStatus::Running),
            None => Err(format!("`finished` is {finished}, not true or false")),
        };
    }
    let number = |key: &str| obj.get(key).is_some_and(serde_json::Value::is_number);
    Ok(if number("train_accuracy") && number("val_accuracy") {
        RunStatus::Finished
    } else {
        RunStatus::Running
    })
}

/// The status of the run in `run` from its `metrics.json`; `Err` says why it cannot be told
/// (no such file, not JSON, not a run's metrics), naming the file.
pub fn read_status(run: &Path) -> std::result::Result<RunStatus, String> {
    let path = run.join(METRICS_FILE);
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    status_of(&json).map_err(|e| format!("{}: {e}", path.display()))
}

/// A run passed over when choosing the latest finished one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRun {
    pub dir: PathBuf,
    /// Unfinished, or why its `metrics.json` could not be used.
    pub reason: String,
    /// True for a run that is merely unfinished (still training or crashed).
    pub unfinished: bool,
}

/// The latest finished run of a kind, and the newer runs passed over on the way.
#[derive(Debug, Clone)]
pub struct Latest<T> {
    /// The chosen run's directory and what `read` made of it.
    pub run: Option<(PathBuf, T)>,
    /// Runs newer than the chosen one (all runs when none was chosen), newest first.
    pub skipped: Vec<SkippedRun>,
}

impl<T> Latest<T> {
    /// The chosen run's directory.
    pub fn dir(&self) -> Option<&Path> {
        self.run.as_ref().map(|(d, _)| d.as_path())
    }

    /// One log line per skipped run, prefixed with `who` ("predict", "report"), ending with the
    /// run used instead: `predict: skipping unfinished run runs/head-b (...); using runs/head-a`.
    pub fn notes(&self, who: &str) -> Vec<String> {
        let using = match self.dir() {
            Some(d) => format!("using {}", d.display()),
            None => "no finished run left".to_string(),
        };
        self.skipped
            .iter()
            .map(|s| {
                if s.unfinished {
                    format!(
                        "{who}: skipping unfinished run {} ({}); {using}",
                        s.dir.display(),
                        s.reason
                    )
                } else {
                    format!(
                        "{who}: skipping run {}: {}; {using}",
                        s.dir.display(),
                        s.reason
                    )
                }
            })
            .collect()
    }
}

/// The most recent finished run under `runs` whose directory name starts with `prefix`, read
/// with `read` (e.g. its full metrics). Runs are taken newest first (by the time their
/// `metrics.json`, or the directory, was last written); an unfinished run, a run without a
/// readable `metrics.json`, and a finished run `read` fails on are skipped and listed, never
/// an error. A missing or unreadable `runs` folder holds no runs.
pub fn latest_finished<T>(
    runs: &Path,
    prefix: &str,
    mut read: impl FnMut(&Path) -> Result<T>,
) -> Latest<T> {
    let mut candidates: Vec<(SystemTime, PathBuf)> = std::fs::read_dir(runs)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .map(|p| {
                    let written = std::fs::metadata(p.join(METRICS_FILE))
                        .or_else(|_| std::fs::metadata(&p))
                        .and_then(|m| m.modified())
                        .unwrap_or(UNIX_EPOCH);
                    (written, p)
                })
                .collect()
        })
        .unwrap_or_default();
    // Newest first; equal times in reverse name order (later stamps first).
    candidates.sort_by(|a, b| b.cmp(a));
    let mut skipped = Vec::new();
    for (_, dir) in candidates {
        let skip = |reason: String, unfinished: bool| SkippedRun {
            dir: dir.clone(),
            reason,
            unfinished,
        };
        if !dir.join(METRICS_FILE).exists() {
            skipped.push(skip(format!("no {METRICS_FILE} yet"), true));
            continue;
        }
        match read_status(&dir) {
            Ok(RunStatus::Running) => skipped.push(skip(
                format!("{METRICS_FILE} says \"running\": still training, or crashed"),
                true,
            )),
            Err(e) => skipped.push(skip(e, false)),
            Ok(RunStatus::Finished) => match read(&dir) {
                Ok(value) => {
                    return Latest {
                        run: Some((dir, value)),
                        skipped,
                    }
                }
                Err(e) => skipped.push(skip(e.to_string(), false)),
            },
        }
    }
    Latest { run: None, skipped }
}

/// The most recent finished run under `runs` whose name starts with `prefix` (see
/// [`latest_finished`]), with the runs skipped on the way.
pub fn latest(runs: &Path, prefix: &str) -> Latest<()> {
    latest_finished(runs, prefix, |_| Ok(()))
}

/// `YYYYMMDD-HHMMSS` in UTC.
fn utc_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    #[test]
    fn status_comes_from_status_then_finished_then_the_numbers() {
        let s = |v: serde_json::Value| status_of(&v);
        assert_eq!(s(json!({"status": "running"})), Ok(RunStatus::Running));
        assert_eq!(
            s(json!({"status": "finished", "finished": false})),
            Ok(RunStatus::Finished)
        );
        // Written before `status` existed.
        assert_eq!(
            s(json!({"finished": false, "train_accuracy": null})),
            Ok(RunStatus::Running)
        );
        assert_eq!(s(json!({"finished": true})), Ok(RunStatus::Finished));
        // Older still: numbers mean finished, a null means it was not.
        assert_eq!(
            s(json!({"train_accuracy": 0.9, "val_accuracy": 0.8})),
            Ok(RunStatus::Finished)
        );
        assert_eq!(
            s(json!({"train_accuracy": 0.9, "val_accuracy": null})),
            Ok(RunStatus::Running)
        );
        let err = s(json!({"status": "paused"})).expect_err("unknown status");
        assert!(err.contains("paused"), "{err}");
        assert!(s(json!([1, 2])).is_err());
        assert!(s(json!({"finished": "yes"})).is_err());
    }

    /// A run directory `name` under `runs` whose metrics.json is `metrics` (none if `None`),
    /// written after every earlier call (file times must differ for the ordering).
    fn run_dir(runs: &Path, name: &str, metrics: Option<&str>) -> PathBuf {
        std::thread::sleep(Duration::from_millis(20));
        let dir = runs.join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        if let Some(m) = metrics {
            std::fs::write(dir.join(METRICS_FILE), m).expect("write");
        }
        dir
    }

    #[test]
    fn latest_finished_passes_over_newer_unfinished_and_unreadable_runs() {
        let runs = std::env::temp_dir().join(format!("pipeline-runs-pick-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&runs);
        let old = run_dir(&runs, "head-linear-a", Some(r#"{"status": "finished"}"#));
        let done = run_dir(&runs, "head-linear-b", Some(r#"{"finished": true}"#));
        run_dir(&runs, "cnn-c", Some(r#"{"status": "finished"}"#));
        let crashed = run_dir(
            &runs,
            "head-linear-d",
            Some(r#"{"status": "running", "train_accuracy": null}"#),
        );
        let garbled = run_dir(&runs, "head-mlp-e", Some("{not json"));
        let empty = run_dir(&runs, "head-linear-f", None);

        let l = latest(&runs, "head-");
        assert_eq!(l.dir(), Some(done.as_path()));
        let skipped: Vec<(&Path, bool)> = l
            .skipped
            .iter()
            .map(|s| (s.dir.as_path(), s.unfinished))
            .collect();
        assert_eq!(
            skipped,
            [
                (empty.as_path(), true),
                (garbled.as_path(), false),
                (crashed.as_path(), true)
            ]
        );
        let notes = l.notes("predict");
        assert_eq!(notes.len(), 3);
        let using = format!("; using {}", done.display());
        assert!(
            notes[2].starts_with(&format!(
                "predict: skipping unfinished run {}",
                crashed.display()
            )) && notes[2].contains("running")
                && notes[2].ends_with(&using),
            "{}",
            notes[2]
        );
        assert!(
            notes[1].contains(&garbled.join(METRICS_FILE).display().to_string())
                && notes[1].ends_with(&using),
            "{}",
            notes[1]
        );

        // A finished run the reader rejects is passed over too, for the next older one.
        let l = latest_finished(&runs, "head-linear-", |d| {
            if d == done {
                Err(Error::Model {
                    model: "test".into(),
                    message: "unreadable weights".into(),
                })
            } else {
                Ok(d.to_owned())
            }
        });
        assert_eq!(l.dir(), Some(old.as_path()));
        assert!(l
            .skipped
            .iter()
            .any(|s| s.dir == done && s.reason.contains("unreadable weights")));

        // Nothing finished: no run, every run listed, and the notes say so.
        let l = latest(&runs, "head-mlp-");
        assert!(l.run.is_none());
        assert!(l.notes("report")[0].ends_with("no finished run left"));
        assert!(latest(&runs.join("absent"), "head-").run.is_none());
        std::fs::remove_dir_all(&runs).ok();
    }

    #[test]
    fn stamps_known_dates() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101-000000");
        // 2026-11-28 08:44:50 UTC
        let t = UNIX_EPOCH + Duration::from_secs(1_795_855_490);
        assert_eq!(utc_stamp(t), "20261128-084450");
        // 2024-02-29 23:59:59 UTC (leap day)
        let t = UNIX_EPOCH + Duration::from_secs(1_709_251_199);
        assert_eq!(utc_stamp(t), "20240229-235959");
    }
}
