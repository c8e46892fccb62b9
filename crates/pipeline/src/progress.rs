//! Progress reporting: a bar with rate and ETA on a terminal, plain log lines otherwise
//! (CI logs, pipes), so the output is readable in both.

use std::io::IsTerminal;
use std::time::Instant;

/// Counts units of work towards a known total.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    label: String,
    unit: String,
    total: u64,
    done: u64,
    start: Instant,
}

impl Progress {
    /// `unit` names what is counted ("images", "steps").
    pub fn new(label: &str, unit: &str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            let style = indicatif::ProgressStyle::with_template(&format!(
                "{label} [{{bar:40}}] {{pos}}/{{len}} {unit} {{per_sec}} ETA {{eta}}"
            ))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            b.set_style(style);
            b
        });
        Self {
            bar,
            label: label.into(),
            unit: unit.into(),
            total,
            done: 0,
            start: Instant::now(),
        }
    }

    /// Records `n` more units done.
    pub fn inc(&mut self, n: u64) {
        self.done += n;
        match &self.bar {
            Some(b) => b.inc(n),
            None => {
                let secs = self.start.elapsed().as_secs_f64();
                let rate = self.done as f64 / secs.max(1e-9);
                let eta = (self.total.saturating_sub(self.done)) as f64 / rate.max(1e-9);
                eprintln!(
                    "{}: {}/{} {} ({:.0}%), {:.2} {}/s, ETA {}",
                    self.label,
                    self.done,
                    self.total,
                    self.unit,
                    100.0 * self.done as f64 / self.total.max(1) as f64,
                    rate,
                    self.unit,
                    format_duration(eta)
                );
            }
        }
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// "1h 02m", "3m 05s", "12s".
pub fn format_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_read_naturally() {
        assert_eq!(super::format_duration(5.2), "5s");
        assert_eq!(super::format_duration(185.0), "3m 05s");
        assert_eq!(super::format_duration(3720.0), "1h 02m");
    }
}
