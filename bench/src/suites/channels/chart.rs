//! The channels suite's PNG: grouped bars, one group per column (target),
//! one bar per series, on a log scale, one panel per figure kind.
//!
//! Text is drawn with plotters' pure-Rust `ab_glyph` renderer from a TTF
//! found on the system (DejaVu or Liberation, else the first `.ttf` under
//! /usr/share/fonts); without one the chart is not written (and the run
//! says so).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, Context};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

const FONT: &str = "sans-serif";
const WIDTH: u32 = 1800;
const PANEL_HEIGHT: u32 = 560;

/// One panel: a value per target for each series (None: not measured).
pub struct Panel {
    pub title: String,
    pub unit: String,
    pub series: Vec<(String, Vec<Option<f64>>)>,
}

fn find_font() -> Option<PathBuf> {
    const KNOWN: [&str; 3] = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ];
    if let Some(p) = KNOWN.iter().map(PathBuf::from).find(|p| p.is_file()) {
        return Some(p);
    }
    let mut stack = vec![PathBuf::from("/usr/share/fonts")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x.eq_ignore_ascii_case("ttf")) {
                return Some(p);
            }
        }
    }
    None
}

/// Registers a system font once for the whole process.
fn load_font() -> anyhow::Result<()> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let path = find_font().ok_or_else(|| {
                "no TrueType font under /usr/share/fonts (apt-get install fonts-dejavu-core)"
                    .to_string()
            })?;
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            // Plotters keeps fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            register_font(FONT, FontStyle::Normal, bytes)
                .map_err(|_| format!("{} is not a usable font", path.display()))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

fn log_bounds(panel: &Panel) -> (f64, f64) {
    let values = panel
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .filter(|v| *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (0.1, 10.0);
    }
    (
        10f64.powf(lo.log10().floor()),
        10f64.powf((hi * 1.5).log10().ceil()),
    )
}

/// Writes the chart to `path`.
pub fn draw(path: &Path, title: &str, targets: &[String], panels: &[Panel]) -> anyhow::Result<()> {
    load_font()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let root = BitMapBackend::new(path, (WIDTH, PANEL_HEIGHT * panels.len() as u32 + 40))
        .into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root.titled(title, (FONT, 24)).map_err(|e| err(&e))?;
    let n = targets.len().max(1);
    for (k, (area, panel)) in root
        .split_evenly((panels.len(), 1))
        .iter()
        .zip(panels)
        .enumerate()
    {
        let (lo, hi) = log_bounds(panel);
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, (FONT, 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..n as f64, (lo..hi).log_scale())
            .map_err(|e| err(&e))?;
        let names = targets.to_vec();
        // Labels at every half unit; only the group centres get a name.
        let label = move |x: &f64| {
            let k = x - 0.5;
            let i = k.round();
            if (k - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                names[i as usize].clone()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(2 * n + 1)
            .x_label_formatter(&label)
            .y_desc(panel.unit.as_str())
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .draw()
            .map_err(|e| err(&e))?;
        let width = 0.84 / panel.series.len().max(1) as f64;
        for (j, (name, values)) in panel.series.iter().enumerate() {
            let color = Palette99::pick(j).to_rgba();
            chart
                .draw_series(values.iter().enumerate().filter_map(|(i, v)| {
                    let v = (*v)?;
                    let x0 = i as f64 + 0.08 + j as f64 * width;
                    Some(Rectangle::new(
                        [(x0, lo), (x0 + width * 0.9, v.max(lo))],
                        color.filled(),
                    ))
                }))
                .map_err(|e| err(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            // Latency grows to the right (r3fs), throughput shrinks.
            .position(if k == 0 {
                SeriesLabelPosition::UpperLeft
            } else {
                SeriesLabelPosition::UpperRight
            })
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FONT, 14))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
