//! Run directories: every training run writes its own `[output] runs/<kind>-<UTC time>/`
//! holding the resolved config, the trained weights and `metrics.json`, so a run can always be
//! reproduced and `predict` reloads exactly what was trained.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, IoContext, Result};
use crate::store::atomic_write;

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

/// The most recent run directory whose name starts with `prefix` and that holds a
/// `metrics.json` (so unfinished runs are never picked).
pub fn latest(runs: &Path, prefix: &str) -> Result<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(runs) else {
        return Ok(None);
    };
    let mut found: Vec<(SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .filter(|p| p.join(METRICS_FILE).is_file())
        .filter_map(|p| {
            let t = std::fs::metadata(p.join(METRICS_FILE))
                .and_then(|m| m.modified())
                .ok()?;
            Some((t, p))
        })
        .collect();
    found.sort();
    Ok(found.pop().map(|(_, p)| p))
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
    use std::time::Duration;

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
