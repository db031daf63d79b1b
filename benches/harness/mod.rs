//! Shared GPU benchmark harness: CUDA-event timing, L2 flushing, and the JSON lines of
//! `bench-results/<device-slug>.jsonl`.
//!
//! How a figure is made:
//! 1. The caller checks the kernel's output against the CPU reference once, before any timing.
//! 2. criterion drives its own sampling through [`GpuBench::time`] (`iter_custom`): back-to-back
//!    launches between two CUDA events, so its console report is GPU time with a warm L2.
//! 3. The recorded median comes from [`GpuBench::median_us`]: `reps` launches, each timed alone with
//!    a pair of CUDA events on the stream that runs it, with L2 flushed (a memset over twice the L2
//!    size) before each launch, outside the timed region.
//!
//! Without a usable GPU, [`GpuBench::open`] prints why and returns `None` (exit 0), unless
//! `DEEPKERN_REQUIRE_GPU=1`, where it exits with status 1.

#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deepkern::Device;
use deepkern::cudarc::driver::sys::CUevent_flags;
use deepkern::cudarc::driver::{CudaEvent, CudaSlice, CudaStream};
use serde_json::{Value, json};

/// Launches per recorded median.
pub const MEDIAN_REPS: usize = 50;

pub struct GpuBench {
    pub device: Device,
    pub stream: Arc<CudaStream>,
    flush: CudaSlice<u8>,
    events: Vec<(CudaEvent, CudaEvent)>,
    out_dir: PathBuf,
}

/// xorshift: deterministic inputs without a generator crate in the timed process.
#[allow(dead_code)] // not every bench uses it
pub struct Xs(pub u64);

#[allow(dead_code)]
impl Xs {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `lo .. hi` (24 bits of the next state).
    pub fn f(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
}

/// One line of `bench-results/<device-slug>.jsonl`.
pub struct Record {
    pub kernel: &'static str,
    pub case: String,
    pub shape: Value,
    pub median_us: f64,
    /// Floating-point operations of one launch (`None` for pure data movement).
    pub flops: Option<f64>,
    /// Bytes one launch must move to and from global memory, by the documented byte model.
    pub bytes: Option<f64>,
    /// The strongest alternative measured in the same run, doing the same work or moving the same bytes.
    pub baseline: Option<(&'static str, f64)>,
}

impl GpuBench {
    /// Opens device 0 for benchmarking, or says why not.
    pub fn open() -> Option<Self> {
        let required = std::env::var("DEEPKERN_REQUIRE_GPU").is_ok_and(|v| v == "1");
        let device = match open_device() {
            Ok(d) => d,
            Err(reason) if required => {
                eprintln!("DEEPKERN_REQUIRE_GPU=1 but {reason}: GPU benches cannot run");
                std::process::exit(1);
            }
            Err(reason) => {
                eprintln!("{reason}: skipping GPU benches");
                return None;
            }
        };
        let stream = device.new_stream().expect("create stream");
        let flush = stream.alloc_zeros::<u8>(2 * device.info().l2_cache_bytes.max(1 << 20)).expect("alloc L2 flush buffer");
        let out_dir = std::env::var_os("DEEPKERN_BENCH_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench-results"));
        let i = device.info();
        eprintln!("GPU benches on {} ({} SMs, L2 {} MiB); results to {}", i.name, i.sm_count, i.l2_cache_bytes >> 20, out_dir.display());
        Some(Self { device, stream, flush, events: Vec::new(), out_dir })
    }

    /// Evicts L2 by overwriting a buffer twice its size (on the bench stream, not timed).
    pub fn flush_l2(&mut self) {
        self.stream.memset_zeros(&mut self.flush).expect("flush L2");
    }

    /// Makes sure at least `n` start/end event pairs exist.
    fn ensure_events(&mut self, n: usize) {
        let ctx = self.stream.context();
        while self.events.len() < n {
            let new = || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("create timing event");
            self.events.push((new(), new()));
        }
    }

    /// Per-launch GPU times of `iters` launches of `launch`, each timed alone with L2 flushed first.
    pub fn time_each(&mut self, iters: usize, mut launch: impl FnMut(&Arc<CudaStream>)) -> Vec<Duration> {
        self.ensure_events(iters);
        for i in 0..iters {
            self.flush_l2();
            self.events[i].0.record(&self.stream).expect("record start");
            launch(&self.stream);
            self.events[i].1.record(&self.stream).expect("record end");
        }
        self.events[..iters]
            .iter()
            .map(|(start, end)| Duration::from_secs_f64(f64::from(start.elapsed_ms(end).expect("event time")) * 1e-3))
            .collect()
    }

    /// GPU time of `iters` back-to-back launches after one L2 flush: criterion's `iter_custom`
    /// measurement (one event pair, so criterion's many iterations stay cheap).
    pub fn time(&mut self, iters: u64, mut launch: impl FnMut(&Arc<CudaStream>)) -> Duration {
        self.ensure_events(1);
        self.flush_l2();
        self.events[0].0.record(&self.stream).expect("record start");
        for _ in 0..iters {
            launch(&self.stream);
        }
        let (start, end) = &self.events[0];
        end.record(&self.stream).expect("record end");
        Duration::from_secs_f64(f64::from(start.elapsed_ms(end).expect("event time")) * 1e-3)
    }

    /// Median of [`MEDIAN_REPS`] individually timed launches, in microseconds.
    pub fn median_us(&mut self, launch: impl FnMut(&Arc<CudaStream>)) -> f64 {
        let mut us: Vec<f64> = self.time_each(MEDIAN_REPS, launch).iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        let n = us.len();
        if n % 2 == 1 { us[n / 2] } else { 0.5 * (us[n / 2 - 1] + us[n / 2]) }
    }

    /// GPU time of `iters` rounds, counting in each only what it brackets with its [`Span`]: for a
    /// protocol whose timed call must be followed by another before it may run again (an EP
    /// dispatch by its combine). L2 is flushed before every round.
    pub fn time_spans(&mut self, iters: u64, mut round: impl FnMut(&Span<'_>)) -> Duration {
        (0..iters).map(|_| self.span(&mut round)).sum()
    }

    /// Median of [`MEDIAN_REPS`] rounds' spans ([`GpuBench::time_spans`]), in microseconds.
    pub fn median_span_us(&mut self, mut round: impl FnMut(&Span<'_>)) -> f64 {
        let mut us: Vec<f64> = (0..MEDIAN_REPS).map(|_| self.span(&mut round).as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        let n = us.len();
        if n % 2 == 1 { us[n / 2] } else { 0.5 * (us[n / 2 - 1] + us[n / 2]) }
    }

    fn span(&mut self, round: &mut impl FnMut(&Span<'_>)) -> Duration {
        self.ensure_events(1);
        self.flush_l2();
        let span = Span { stream: &self.stream, events: &self.events[0] };
        round(&span);
        let (start, end) = &self.events[0];
        Duration::from_secs_f64(f64::from(start.elapsed_ms(end).expect("event time")) * 1e-3)
    }

    /// Median time of a device-to-device copy of `bytes` bytes (which moves 2x that through DRAM).
    pub fn copy_median_us(&mut self, bytes: usize) -> f64 {
        let src = self.stream.alloc_zeros::<u8>(bytes).expect("alloc copy source");
        let mut dst = self.stream.alloc_zeros::<u8>(bytes).expect("alloc copy destination");
        self.median_us(|s| s.memcpy_dtod(&src, &mut dst).expect("device copy"))
    }

    /// Appends `r` to `<out>/<device-slug>.jsonl` and echoes it.
    pub fn record(&self, r: Record) {
        let gbps = r.bytes.map(|b| b / (r.median_us * 1e-6) / 1e9);
        let tflops = r.flops.map(|f| f / (r.median_us * 1e-6) / 1e12);
        let line = json!({
            "date": utc_now(),
            "commit": commit(),
            "device": self.device.info().name,
            "driver": driver(),
            "kernel": r.kernel,
            "case": r.case,
            "shape": r.shape,
            "median_us": round3(r.median_us),
            "tflops": tflops.map(round3),
            "gbps": gbps.map(round3),
            "baseline": r.baseline.map(|(name, us)| json!({"name": name, "median_us": round3(us)})),
            "check": "passed",
        });
        std::fs::create_dir_all(&self.out_dir).expect("create bench results folder");
        let path = self.out_dir.join(format!("{}.jsonl", self.device.info().slug()));
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("open bench results");
        writeln!(f, "{line}").expect("append bench result");
        eprintln!("recorded {line}");
    }
}

/// cuBLASLt's configuration for row-major `D[m, n] = X[m, k] · W[n, k]ᵀ` in bf16, which in
/// cuBLAS's column-major terms is `Dᵀ[n, m] = op(W) · Xᵀ` (pass W as `a`, X as `b`).
#[allow(dead_code)] // not every bench uses it
pub fn cublaslt_nt(m: usize, n: usize, k: usize) -> deepkern::cudarc::cublaslt::MatmulConfig {
    deepkern::cudarc::cublaslt::MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: k as i64,
        ldb: k as i64,
        beta: 0.0,
        ldc: n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    }
}

fn open_device() -> Result<Device, String> {
    if !deepkern::kernels_built() {
        return Err("kernels not built (no nvcc at build time)".into());
    }
    if deepkern::simulated() {
        return Err("this is a simulated build (DEEPKERN_SIM=1): the simulator measures no GPU time".into());
    }
    if !deepkern::cuda_available() {
        return Err("no CUDA device".into());
    }
    let device = Device::new(0).map_err(|e| e.to_string())?;
    device.check_supported().map_err(|e| e.to_string())?;
    Ok(device)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `DEEPKERN_COMMIT` (set by the bundle's run.sh), else `git rev-parse --short HEAD`, else "unknown".
fn commit() -> String {
    if let Ok(c) = std::env::var("DEEPKERN_COMMIT") {
        return c;
    }
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The NVIDIA driver version from nvidia-smi, else the CUDA version the driver supports.
fn driver() -> String {
    let smi = std::process::Command::new("nvidia-smi").args(["--query-gpu=driver_version", "--format=csv,noheader"]).output();
    if let Some(o) = smi.ok().filter(|o| o.status.success())
        && let Some(v) = String::from_utf8_lossy(&o.stdout).lines().next()
    {
        return v.trim().to_string();
    }
    match deepkern::driver_version() {
        Ok((major, minor)) => format!("cuda {major}.{minor}"),
        Err(_) => "unknown".into(),
    }
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SSZ` (no date crate needed).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, (rem % 3600) / 60, rem % 60)
}

/// The part of a bench round that is timed: [`Span::start`] and [`Span::stop`] record events on
/// the bench stream around it.
pub struct Span<'a> {
    pub stream: &'a Arc<CudaStream>,
    events: &'a (CudaEvent, CudaEvent),
}

impl Span<'_> {
    pub fn start(&self) {
        self.events.0.record(self.stream).expect("record start");
    }

    pub fn stop(&self) {
        self.events.1.record(self.stream).expect("record end");
    }

    /// One round of a two-call protocol on `e` (an EP dispatch, then its combine), timing only the
    /// first call (`time_first`) or only the second.
    pub fn one_of_two<E, T>(&self, e: &mut E, time_first: bool, first: impl FnOnce(&mut E) -> T, second: impl FnOnce(&mut E, T)) {
        if time_first {
            self.start();
        }
        let t = first(e);
        if time_first {
            self.stop();
        } else {
            self.start();
        }
        second(e, t);
        if !time_first {
            self.stop();
        }
    }
}
