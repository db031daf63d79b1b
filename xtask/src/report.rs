//! `bench-results/*.jsonl` -> `bench-results/README.md`, PNG bar charts, and the results section of
//! the root README (between `<!-- bench-results:begin -->` and `<!-- bench-results:end -->`).
//! Only committed measurement lines go in: nothing here invents or edits a figure.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Result, project_root};

pub const BEGIN: &str = "<!-- bench-results:begin -->";
pub const END: &str = "<!-- bench-results:end -->";
pub const NONE_YET: &str = "No GPU results have been committed yet.";

/// One measurement line.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    /// File stem of the .jsonl it came from (the device slug).
    pub slug: String,
    pub device: String,
    pub driver: String,
    pub kernel: String,
    pub case: String,
    pub shape: String,
    pub median_us: f64,
    pub tflops: Option<f64>,
    pub gbps: Option<f64>,
    pub baseline: Option<(String, f64)>,
    pub check: String,
    pub date: String,
    pub commit: String,
}

impl Line {
    fn parse(slug: &str, v: &Value) -> Option<Self> {
        let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
        let shape = match &v["shape"] {
            Value::Object(m) => m
                .iter()
                .map(|(k, x)| format!("{k}={}", x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string())))
                .collect::<Vec<_>>()
                .join(" "),
            other => other.to_string(),
        };
        Some(Line {
            slug: slug.to_string(),
            device: s("device"),
            driver: s("driver"),
            kernel: v["kernel"].as_str()?.to_string(),
            case: v["case"].as_str()?.to_string(),
            shape,
            median_us: v["median_us"].as_f64()?,
            tflops: v["tflops"].as_f64(),
            gbps: v["gbps"].as_f64(),
            baseline: v["baseline"]["name"].as_str().zip(v["baseline"]["median_us"].as_f64()).map(|(n, t)| (n.to_string(), t)),
            check: s("check"),
            date: s("date"),
            commit: s("commit"),
        })
    }

    /// Baseline time over ours: above 1 means faster than the baseline.
    pub fn speedup(&self) -> Option<f64> {
        self.baseline.as_ref().map(|(_, t)| t / self.median_us)
    }
}

/// Every line of every `*.jsonl` under `dir`, files in name order, lines in file order.
pub fn load(dir: &Path) -> Result<Vec<Line>> {
    let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "jsonl")).collect(),
        Err(_) => return Ok(Vec::new()),
    };
    files.sort();
    let mut lines = Vec::new();
    for f in files {
        let slug = f.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        let text = fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        for (i, raw) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(raw).map_err(|e| format!("{}:{}: {e}", f.display(), i + 1))?;
            lines.push(Line::parse(&slug, &v).ok_or_else(|| format!("{}:{}: missing kernel, case or median_us", f.display(), i + 1))?);
        }
    }
    Ok(lines)
}

/// The latest line per (device slug, kernel, case), in order of first appearance.
pub fn latest(lines: &[Line]) -> Vec<Line> {
    let mut order: Vec<(String, String, String)> = Vec::new();
    let mut last: BTreeMap<(String, String, String), Line> = BTreeMap::new();
    for l in lines {
        let key = (l.slug.clone(), l.kernel.clone(), l.case.clone());
        if !last.contains_key(&key) {
            order.push(key.clone());
        }
        last.insert(key, l.clone());
    }
    order.into_iter().map(|k| last.remove(&k).expect("key recorded")).collect()
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into())
}

/// Markdown tables, one per device.
pub fn markdown(lines: &[Line]) -> String {
    if lines.is_empty() {
        return format!("{NONE_YET}\n");
    }
    let mut out = String::new();
    let mut devices: Vec<&str> = lines.iter().map(|l| l.slug.as_str()).collect();
    devices.dedup();
    for slug in devices {
        let rows: Vec<&Line> = lines.iter().filter(|l| l.slug == slug).collect();
        out.push_str(&format!("**{}** (driver {})\n\n", rows[0].device, rows[0].driver));
        out.push_str("| kernel | case | shape | median µs | TFLOP/s | GB/s | baseline | vs baseline | check | date | commit |\n");
        out.push_str("|---|---|---|---:|---:|---:|---|---:|---|---|---|\n");
        for l in rows {
            let base = l.baseline.as_ref().map(|(n, t)| format!("{n} {t:.2} µs")).unwrap_or_else(|| "-".into());
            let vs = l.speedup().map(|s| format!("{s:.2}x")).unwrap_or_else(|| "-".into());
            out.push_str(&format!(
                "| {} | {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} |\n",
                l.kernel,
                l.case,
                l.shape,
                l.median_us,
                opt(l.tflops, 1),
                opt(l.gbps, 0),
                base,
                vs,
                l.check,
                l.date.get(..10).unwrap_or(&l.date),
                l.commit
            ));
        }
        out.push('\n');
    }
    out
}

/// `readme` with the text between the markers replaced by `body`; `None` if a marker is missing.
pub fn splice(readme: &str, body: &str) -> Option<String> {
    let start = readme.find(BEGIN)? + BEGIN.len();
    let end = readme[start..].find(END)? + start;
    Some(format!("{}\n{}{}", &readme[..start], body, &readme[end..]))
}

/// Bar charts, one PNG per (device, kernel): GB/s (or TFLOP/s) per case, baseline beside it.
fn plot(lines: &[Line], dir: &Path) -> Result<Vec<PathBuf>> {
    use plotters::prelude::*;
    if !register_font() {
        eprintln!("report: no TrueType font found (e.g. fonts-dejavu-core); skipping the PNG plots");
        return Ok(Vec::new());
    }
    let mut groups: BTreeMap<(String, String), Vec<&Line>> = BTreeMap::new();
    for l in lines {
        groups.entry((l.slug.clone(), l.kernel.clone())).or_default().push(l);
    }
    let mut written = Vec::new();
    for ((slug, kernel), rows) in groups {
        let use_gbps = rows.iter().all(|l| l.gbps.is_some());
        let metric = |l: &Line| if use_gbps { l.gbps } else { l.tflops };
        let ours: Vec<f64> = rows.iter().map(|l| metric(l).unwrap_or(0.0)).collect();
        // Same work model, so the baseline's rate is ours scaled by the time ratio.
        let base: Vec<f64> = rows.iter().zip(&ours).map(|(l, &o)| l.speedup().map_or(0.0, |s| o / s)).collect();
        let top = ours.iter().chain(&base).copied().fold(1e-9, f64::max) * 1.15;
        let path = dir.join(format!("{slug}-{kernel}.png"));
        let unit = if use_gbps { "GB/s" } else { "TFLOP/s" };
        let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
            let root = BitMapBackend::new(&path, (960, 540)).into_drawing_area();
            root.fill(&WHITE)?;
            let n = rows.len();
            let mut chart = ChartBuilder::on(&root)
                .caption(format!("{kernel} on {} ({unit}; grey: baseline)", rows[0].device), ("sans-serif", 20))
                .margin(16)
                .x_label_area_size(60)
                .y_label_area_size(70)
                .build_cartesian_2d(0f64..n as f64, 0f64..top)?;
            let cases: Vec<String> = rows.iter().map(|l| l.case.clone()).collect();
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(n.max(1))
                .x_label_formatter(&|x| cases.get(x.floor() as usize).filter(|_| x.fract() == 0.5).cloned().unwrap_or_default())
                .y_desc(unit)
                .draw()?;
            chart.draw_series(
                ours.iter().enumerate().map(|(i, &v)| Rectangle::new([(i as f64 + 0.1, 0.0), (i as f64 + 0.5, v)], BLUE.filled())),
            )?;
            chart.draw_series(
                base.iter()
                    .enumerate()
                    .map(|(i, &v)| Rectangle::new([(i as f64 + 0.5, 0.0), (i as f64 + 0.9, v)], RGBColor(150, 150, 150).filled())),
            )?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| format!("plot {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// Registers a system TrueType font as "sans-serif" for plotters; false if none is found.
fn register_font() -> bool {
    const FONTS: [&str; 4] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    ];
    let Some(bytes) = FONTS.iter().find_map(|p| fs::read(p).ok()) else { return false };
    plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, Box::leak(bytes.into_boxed_slice())).is_ok()
}

/// Regenerates everything from `bench-results/`.
pub fn run() -> Result<()> {
    let root = project_root();
    let dir = root.join("bench-results");
    let lines = latest(&load(&dir)?);
    let table = markdown(&lines);
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let header = "# Benchmark results\n\nGenerated by `cargo xtask report` from the `*.jsonl` lines in this folder (the latest line per device, kernel and case). Each line is one GPU run of the bench bundle.\n\n";
    fs::write(dir.join("README.md"), format!("{header}{table}")).map_err(|e| e.to_string())?;
    let plots = plot(&lines, &dir)?;
    let readme_path = root.join("README.md");
    let readme = fs::read_to_string(&readme_path).map_err(|e| e.to_string())?;
    match splice(&readme, &table) {
        Some(new) if new != readme => fs::write(&readme_path, new).map_err(|e| e.to_string())?,
        Some(_) => {}
        None => eprintln!("report: README.md lacks the {BEGIN} / {END} markers; left it alone"),
    }
    eprintln!("report: {} results, {} plots, bench-results/README.md and README.md updated", lines.len(), plots.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSONL: &str = r#"{"date":"2026-11-20T10:00:00Z","commit":"aaa","device":"NVIDIA H100 80GB HBM3","driver":"580.65","kernel":"quant","case":"128x7168","shape":{"m":128,"k":7168},"median_us":10.0,"tflops":null,"gbps":100.0,"baseline":{"name":"copy","median_us":5.0},"check":"passed"}
{"date":"2026-11-21T10:00:00Z","commit":"bbb","device":"NVIDIA H100 80GB HBM3","driver":"580.65","kernel":"quant","case":"128x7168","shape":{"m":128,"k":7168},"median_us":8.0,"tflops":null,"gbps":125.0,"baseline":{"name":"copy","median_us":6.0},"check":"passed"}
{"date":"2026-11-21T10:00:00Z","commit":"bbb","device":"NVIDIA H100 80GB HBM3","driver":"580.65","kernel":"gemm","case":"4096","shape":{"m":4096},"median_us":100.0,"tflops":600.5,"gbps":null,"baseline":null,"check":"passed"}
"#;

    #[test]
    fn keeps_the_latest_line_per_case_and_renders_a_table() {
        let dir = std::env::temp_dir().join(format!("deepkern-report-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("nvidia-h100-80gb-hbm3.jsonl"), JSONL).unwrap();
        let lines = latest(&load(&dir).unwrap());
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0].commit.as_str(), lines[0].median_us), ("bbb", 8.0));
        assert_eq!(lines[0].speedup(), Some(0.75));
        let md = markdown(&lines);
        assert!(
            md.contains("| quant | 128x7168 | k=7168 m=128 | 8.00 | - | 125 | copy 6.00 µs | 0.75x | passed | 2026-11-21 | bbb |"),
            "{md}"
        );
        assert!(md.contains("| gemm | 4096 | m=4096 | 100.00 | 600.5 | - | - | - | passed |"), "{md}");
    }

    #[test]
    fn splices_between_markers_only() {
        let readme = format!("a\n{BEGIN}\nold\n{END}\nb\n");
        assert_eq!(splice(&readme, "new\n").unwrap(), format!("a\n{BEGIN}\nnew\n{END}\nb\n"));
        assert_eq!(splice("no markers", "x"), None);
        assert_eq!(markdown(&[]), format!("{NONE_YET}\n"));
    }
}
