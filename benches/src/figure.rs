//! A measured figure, and how a set of them is printed and saved.

use std::fmt;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Serialize, Serializer};

/// What a figure's ratio to its reference should be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    /// The ratio should be at least this.
    AtLeast(f64),
    /// The ratio should be at most this.
    AtMost(f64),
}

impl Goal {
    fn met_by(self, ratio: f64) -> bool {
        match self {
            Goal::AtLeast(g) => ratio >= g,
            Goal::AtMost(g) => ratio <= g,
        }
    }
}

impl fmt::Display for Goal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Goal::AtLeast(g) => write!(f, ">= {g}"),
            Goal::AtMost(g) => write!(f, "<= {g}"),
        }
    }
}

impl Serialize for Goal {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One measured figure, as written to `target/bench/<bench>.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable identifier.
    pub name: String,
    /// The measurement.
    pub value: f64,
    /// Its unit.
    pub unit: String,
    /// What the value was compared with (and that reference's own figure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// `value / reference` (for times: our time over the reference's time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// What the ratio should be.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub goal: Option<Goal>,
    /// How the figure was measured, where it is not obvious from the name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Figure {
    /// A figure without a reference.
    pub fn new(name: impl Into<String>, value: f64, unit: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value,
            unit: unit.into(),
            reference: None,
            ratio: None,
            goal: None,
            note: None,
        }
    }

    /// Adds what the figure was compared with, and the ratio when there is one (`None` when
    /// the reference could not be measured; `reference` then says why).
    pub fn compared(mut self, reference: impl Into<String>, ratio: Option<f64>) -> Self {
        self.reference = Some(reference.into());
        self.ratio = ratio;
        self
    }

    /// Adds the goal the ratio should meet.
    pub fn goal(mut self, goal: Goal) -> Self {
        self.goal = Some(goal);
        self
    }

    /// Adds a note on how it was measured.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// The verdict on the goal: `None` without a goal.
    pub fn status(&self) -> Option<&'static str> {
        let goal = self.goal?;
        Some(match self.ratio {
            None => "SKIPPED",
            Some(r) if goal.met_by(r) => "ok",
            Some(_) => "MISSED",
        })
    }
}

/// A value with about four significant digits, without an exponent.
pub fn fmt_value(v: f64) -> String {
    let a = v.abs();
    let decimals = if a >= 1000.0 || a == 0.0 {
        0
    } else if a >= 100.0 {
        1
    } else if a >= 10.0 {
        2
    } else if a >= 1.0 {
        3
    } else {
        (3.0 - a.log10().floor()).clamp(3.0, 9.0) as usize
    };
    format!("{v:.decimals$}")
}

/// Prints the figures as a table, then their references and notes.
pub fn print_table(title: &str, figures: &[Figure]) {
    let rows: Vec<[String; 6]> = figures
        .iter()
        .enumerate()
        .map(|(i, f)| {
            [
                format!("[{}] {}", i + 1, f.name),
                fmt_value(f.value),
                f.unit.clone(),
                f.ratio.map(|r| format!("{r:.3}")).unwrap_or_else(|| "-".to_owned()),
                f.goal.map(|g| g.to_string()).unwrap_or_else(|| "-".to_owned()),
                f.status().unwrap_or("").to_owned(),
            ]
        })
        .collect();
    let header = ["figure", "value", "unit", "ratio", "goal", "status"];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            // Numbers right-aligned, text left-aligned.
            if i == 1 || i == 3 {
                s.push_str(&format!("{c:>w$}  "));
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    println!();
    println!("== {title}");
    line(&header);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(&rule.iter().map(String::as_str).collect::<Vec<_>>());
    for r in &rows {
        line(&r.iter().map(String::as_str).collect::<Vec<_>>());
    }
    println!();
    for (i, f) in figures.iter().enumerate() {
        if let Some(r) = &f.reference {
            println!("[{}] reference: {r}", i + 1);
        }
        if let Some(n) = &f.note {
            println!("[{}] note: {n}", i + 1);
        }
    }
}

/// Writes the figures as a JSON list to `path`, creating its directory.
pub fn write_json(path: &Path, figures: &[Figure]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut json = serde_json::to_string_pretty(figures)?;
    json.push('\n');
    std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goal_and_status() {
        let f = Figure::new("x", 1.0, "s").compared("y", Some(0.95)).goal(Goal::AtLeast(0.9));
        assert_eq!(f.status(), Some("ok"));
        let f = Figure::new("x", 1.0, "s").compared("y", Some(1.6)).goal(Goal::AtMost(1.5));
        assert_eq!(f.status(), Some("MISSED"));
        let f = Figure::new("x", 1.0, "s").compared("fio missing", None).goal(Goal::AtLeast(0.9));
        assert_eq!(f.status(), Some("SKIPPED"));
        let json = serde_json::to_value(&f).unwrap();
        assert_eq!(json["goal"], ">= 0.9");
        assert!(json.get("ratio").is_none());
    }

    #[test]
    fn value_format() {
        assert_eq!(fmt_value(1234.6), "1235");
        assert_eq!(fmt_value(233.04), "233.0");
        assert_eq!(fmt_value(1.23456), "1.235");
        assert_eq!(fmt_value(0.000123456), "0.0001235");
    }
}
