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

/// One bar chart: a kernel on a device, one group of bars per case.
#[derive(Clone, Debug, PartialEq)]
pub struct BarChart {
    pub title: String,
    /// "GB/s" or "TFLOP/s".
    pub unit: &'static str,
    pub baseline_name: Option<String>,
    /// (case, ours, the baseline's rate on the same work model).
    pub bars: Vec<(String, f64, Option<f64>)>,
}

/// The chart for one (device, kernel): GB/s where every case has it, else TFLOP/s. The baseline
/// does the same work, so its rate is ours times (our time / its time).
pub fn bar_chart(rows: &[&Line]) -> BarChart {
    let use_gbps = rows.iter().all(|l| l.gbps.is_some());
    let unit = if use_gbps { "GB/s" } else { "TFLOP/s" };
    let bars = rows
        .iter()
        .map(|l| {
            let ours = if use_gbps { l.gbps } else { l.tflops }.unwrap_or(0.0);
            (l.case.clone(), ours, l.speedup().map(|s| ours / s))
        })
        .collect();
    BarChart {
        title: format!("{} on {} ({unit})", rows[0].kernel, rows[0].device),
        unit,
        baseline_name: rows.iter().find_map(|l| l.baseline.as_ref().map(|(n, _)| n.clone())),
        bars,
    }
}

/// Bar charts, one PNG per (device, kernel): `bench-results/<slug>-<kernel>.png`.
pub fn plot(lines: &[Line], dir: &Path) -> Result<Vec<PathBuf>> {
    register_font()?;
    let mut groups: BTreeMap<(String, String), Vec<&Line>> = BTreeMap::new();
    for l in lines {
        groups.entry((l.slug.clone(), l.kernel.clone())).or_default().push(l);
    }
    let mut written = Vec::new();
    for ((slug, kernel), rows) in groups {
        let path = dir.join(format!("{slug}-{kernel}.png"));
        draw_bar_chart(&bar_chart(&rows), &path).map_err(|e| format!("cannot draw {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

const OURS: plotters::style::RGBColor = plotters::style::RGBColor(31, 119, 180);
const BASELINE: plotters::style::RGBColor = plotters::style::RGBColor(160, 160, 160);

/// Draws `chart` as a 960x540 PNG: ours and the baseline side by side per case, values on top,
/// case names under each group.
fn draw_bar_chart(chart: &BarChart, path: &Path) -> std::result::Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let n = chart.bars.len().max(1);
    let top = chart.bars.iter().flat_map(|(_, o, b)| [Some(*o), *b]).flatten().fold(1e-9, f64::max) * 1.15;
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut c = ChartBuilder::on(&root)
        .caption(&chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(chart.unit)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE)
        .draw()?;
    let value_style = TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    let label = |v: f64| if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.1}") };
    // (left edge, height) of each bar of one series; a bar is 0.4 wide, its group 1.0.
    let ours: Vec<(f64, f64)> = chart.bars.iter().enumerate().map(|(i, (_, o, _))| (i as f64 + 0.1, *o)).collect();
    let base: Vec<(f64, f64)> = chart.bars.iter().enumerate().filter_map(|(i, (_, _, b))| b.map(|b| (i as f64 + 0.5, b))).collect();
    let baseline = chart.baseline_name.as_deref().unwrap_or("baseline");
    for (bars, color, name) in [(ours, OURS, "deepkern"), (base, BASELINE, baseline)].into_iter().filter(|(bars, _, _)| !bars.is_empty()) {
        c.draw_series(bars.iter().map(|&(x, v)| Rectangle::new([(x, 0.0), (x + 0.4, v)], color.filled())))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
        c.draw_series(bars.iter().map(|&(x, v)| Text::new(label(v), (x + 0.2, v), value_style.clone())))?;
    }
    c.configure_series_labels().position(SeriesLabelPosition::UpperLeft).background_style(WHITE).border_style(BLACK).draw()?;
    let case_style = TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, (case, _, _)) in chart.bars.iter().enumerate() {
        let (x, y) = c.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(case.clone(), (x, y + 8), case_style.clone()))?;
    }
    root.present()?;
    Ok(())
}

/// Registers DejaVu Sans, embedded from the `dejavu` crate, as plotters' "sans-serif", so the
/// plots look the same everywhere and need no system fonts or font libraries.
fn register_font() -> Result<()> {
    use std::sync::OnceLock;
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, dejavu::sans::regular()).is_ok());
    if ok { Ok(()) } else { Err("the embedded DejaVu Sans font could not be loaded".into()) }
}

/// Whether `bench-results/` holds any measurement file.
pub fn has_results(root: &Path) -> bool {
    fs::read_dir(root.join("bench-results"))
        .map(|rd| rd.filter_map(|e| e.ok()).any(|e| e.path().extension().is_some_and(|x| x == "jsonl")))
        .unwrap_or(false)
}

/// Regenerates everything from the project's `bench-results/`.
pub fn run() -> Result<()> {
    run_in(&project_root())
}

/// Regenerates `root/bench-results/README.md`, the plots, and `root/README.md`'s results section.
pub fn run_in(root: &Path) -> Result<()> {
    let dir = root.join("bench-results");
    let lines = latest(&load(&dir)?);
    let table = markdown(&lines);
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let header = "# Benchmark results\n\nGenerated by `cargo xtask report` from the `*.jsonl` lines in this folder (the latest line per device, kernel and case). Each line is one GPU run of the bench bundle.\n\n";
    fs::write(dir.join("README.md"), format!("{header}{table}")).map_err(|e| e.to_string())?;
    let plots = plot(&lines, &dir)?;
    eprintln!("report: {} results -> bench-results/README.md and {} plot(s)", lines.len(), plots.len());
    update_readme(&root.join("README.md"), &table)
}

/// Replaces the results section of the root README, if it has both markers.
fn update_readme(path: &Path, table: &str) -> Result<()> {
    let readme = fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    match splice(&readme, table) {
        Some(new) if new != readme => {
            fs::write(path, new).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            eprintln!("report: updated the results section of {}", path.display());
        }
        Some(_) => eprintln!("report: the results section of {} is already up to date", path.display()),
        None => eprintln!("report: {} lacks the {BEGIN} / {END} markers; left it alone", path.display()),
    }
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
    fn chart_uses_gbps_and_derives_the_baseline_rate_from_the_times() {
        let dir = std::env::temp_dir().join(format!("deepkern-report-chart-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("h100.jsonl"), JSONL).unwrap();
        let lines = latest(&load(&dir).unwrap());
        fs::remove_dir_all(&dir).unwrap();
        let quant = bar_chart(&[&lines[0]]);
        assert_eq!((quant.unit, quant.baseline_name.as_deref()), ("GB/s", Some("copy")));
        // 125 GB/s in 8 µs; the copy took 6 µs for the same bytes: 125 * 8 / 6.
        assert_eq!(quant.bars, vec![("128x7168".to_string(), 125.0, Some(125.0 * 8.0 / 6.0))]);
        let gemm = bar_chart(&[&lines[1]]);
        assert_eq!((gemm.unit, gemm.baseline_name, gemm.bars[0].2), ("TFLOP/s", None, None));
    }

    /// A scratch project root with a README that has the markers.
    fn scratch_root(tag: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("deepkern-report-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("bench-results")).unwrap();
        fs::write(root.join("README.md"), format!("# x\n\n{BEGIN}\nold table\n{END}\n\nafter\n")).unwrap();
        root
    }

    #[test]
    fn writes_tables_plots_and_the_readme_section() {
        let root = scratch_root("full");
        fs::write(root.join("bench-results/nvidia-h100-80gb-hbm3.jsonl"), JSONL).unwrap();
        assert!(has_results(&root));
        run_in(&root).unwrap();
        let table = fs::read_to_string(root.join("bench-results/README.md")).unwrap();
        assert!(table.contains("| quant | 128x7168 |") && table.contains("**NVIDIA H100 80GB HBM3** (driver 580.65)"), "{table}");
        let readme = fs::read_to_string(root.join("README.md")).unwrap();
        assert!(readme.contains("| gemm | 4096 |") && !readme.contains("old table") && readme.ends_with(&format!("{END}\n\nafter\n")));
        for kernel in ["quant", "gemm"] {
            let png = fs::read(root.join(format!("bench-results/nvidia-h100-80gb-hbm3-{kernel}.png"))).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{kernel} plot is not a PNG");
        }
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn without_results_both_places_say_so() {
        let root = scratch_root("empty");
        assert!(!has_results(&root));
        run_in(&root).unwrap();
        assert!(fs::read_to_string(root.join("bench-results/README.md")).unwrap().contains(NONE_YET));
        assert!(fs::read_to_string(root.join("README.md")).unwrap().contains(&format!("{BEGIN}\n{NONE_YET}\n{END}")));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn splices_between_markers_only() {
        let readme = format!("a\n{BEGIN}\nold\n{END}\nb\n");
        assert_eq!(splice(&readme, "new\n").unwrap(), format!("a\n{BEGIN}\nnew\n{END}\nb\n"));
        assert_eq!(splice("no markers", "x"), None);
        assert_eq!(markdown(&[]), format!("{NONE_YET}\n"));
    }
}
